"""lm-evaluation-harness against the server: its `local-completions` backend (echo with
prompt logprobs, the server's own tokenizer endpoints) scores a small multiple-choice task,
built here from local files, as its `hf` backend scores the same model directory.

    python -m pytest tests/integration/test_lm_eval.py -s   # also prints the numbers
"""

import json
import os
import random

import numpy as np
import pytest
from served import make_model_dir, server

TASK = """task: llmjax_choices
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def write_task(folder: str, count: int = 24) -> None:
    rng = random.Random(0)
    words = "king queen lord sword crown night love death honour grief heaven earth".split()
    os.makedirs(folder, exist_ok=True)
    data = os.path.join(folder, "choices.jsonl")
    with open(data, "w") as f:
        for i in range(count):
            question = f"ROMEO: What of the {rng.choice(words)}, good {rng.choice(words)}?"
            choices = [" " + " ".join(rng.sample(words, 3)) for _ in range(4)]
            f.write(json.dumps({"question": question, "choices": choices,
                                "label": i % 4}) + "\n")
    with open(os.path.join(folder, "llmjax_choices.yaml"), "w") as f:
        f.write(TASK.format(data=data))


def evaluate(model: str, model_args: str, tasks_dir: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args,
                                   tasks=["llmjax_choices"], batch_size=4,
                                   task_manager=TaskManager(include_path=tasks_dir),
                                   log_samples=True, random_seed=0, numpy_random_seed=0,
                                   torch_random_seed=0)


def loglikelihoods(results: dict) -> np.ndarray:
    samples = sorted(results["samples"]["llmjax_choices"], key=lambda s: s["doc_id"])
    return np.array([[float(r[0]) for r in s["filtered_resps"]] for s in samples])


def test_local_completions_scores_as_the_hf_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_dir = make_model_dir(str(tmp_path / "model"))
    tasks_dir = str(tmp_path / "tasks")
    write_task(tasks_dir)
    with server(model_dir, "--served_model_name=tiny", "--max_slots=4") as s:
        served = evaluate("local-completions", f"base_url={s.url}/v1/completions,model=tiny,"
                          "num_concurrent=4,max_retries=1,tokenized_requests=True", tasks_dir)
    reference = evaluate("hf", f"pretrained={model_dir},dtype=float32,device=cpu", tasks_dir)
    ours, theirs = loglikelihoods(served), loglikelihoods(reference)
    accuracy = (served["results"]["llmjax_choices"]["acc,none"],
                reference["results"]["llmjax_choices"]["acc,none"])
    print(f"\nlm-eval on {len(ours)} questions x 4 choices: accuracy {accuracy[0]:.4f} "
          f"(local-completions on llmjax.serve) vs {accuracy[1]:.4f} (hf); loglikelihoods "
          f"max |diff| {np.abs(ours - theirs).max():.2e}")
    assert ours.shape == (24, 4)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert accuracy[0] == pytest.approx(accuracy[1])
