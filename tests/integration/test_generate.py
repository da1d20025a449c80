"""python -m llmjax.generate on a model trained here: the command's completions are the
engine's; int8 weights (alone, or with int8 inputs to every product: w8a8) keep the
held-out loss within 2% at under 30% of the bytes; bad input is one error line.

    python -m pytest tests/integration/test_generate.py -s   # also prints the int8 numbers
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from llmjax.inference import quantize
from llmjax.inference.engine import Engine
from llmjax.inference.requests import SamplingParams
from llmjax.parallel import sharding
from llmjax.training import restore, setup
from llmjax.training.loop import train_and_evaluate
from llmjax.training.tasks import lm_losses

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config(num_train_steps=80, eval_every_steps=80, checkpoint_every_steps=80,
                         **{"model.embed_dim": 64, "model.mlp_dim": 128, "eval_batches": 4,
                            "optimizer.warmup_steps": 10})
    train_and_evaluate(config, workdir)
    return workdir, config


def generate(*args):
    return subprocess.run([sys.executable, "-m", "llmjax.generate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_the_command_writes_what_the_engine_generates(trained, tmp_path):
    workdir, _ = trained
    out = tmp_path / "out.jsonl"
    result = generate(f"--model={workdir}", "--prompt=ROMEO:", "--prompt=JULIET: O Romeo",
                      "--max_new_tokens=12", f"--output={out}", "--logprobs=2")
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["ROMEO:", "JULIET: O Romeo"]

    tokenizer = restore.load_tokenizer_of(workdir)
    model = restore.load_model(workdir)
    with Engine(model, max_slots=2, max_seq_len=32, eos_ids=(tokenizer.eos_id,),
                detokenize=tokenizer.decode) as engine:
        engine.warmup()
        expected = engine.generate([[tokenizer.bos_id] + tokenizer.encode(r["prompt"])
                                    for r in records], SamplingParams(max_tokens=12))
    for record, request in zip(records, expected):
        assert record["tokens"] == request.tokens and record["completion"] == request.text
        assert record["finish_reason"] in ("stop", "length")
        assert len(record["top_logprobs"][0]) == 2
        np.testing.assert_allclose(record["logprobs"], request.logprobs, atol=1e-5)


@nnx.jit
def loss_sums(model, batch):
    _, cross_entropy, tokens = lm_losses(model, batch, 0.0)
    return cross_entropy, tokens


def held_out_loss(model, config, workdir):
    """Mean next-token loss over the run's held-out batches, with the training loss."""
    data = setup.build_data(config, workdir)
    data.train_iter.close()
    sums = [loss_sums(model, batch) for batch in data.eval_batches]
    return sum(float(s) for s, _ in sums) / sum(float(n) for _, n in sums)


@pytest.mark.parametrize("mode", ["int8", "w8a8"])
def test_int8_keeps_the_held_out_loss(trained, mode):
    workdir, config = trained
    mesh, rules = sharding.placement()
    model = restore.load_model(workdir, mesh=mesh, rules=rules)
    int8 = quantize.quantize_model(restore.load_model(workdir, mesh=mesh, rules=rules), mode)
    ratio = quantize.weight_bytes(int8) / quantize.weight_bytes(model)
    fp32_loss, int8_loss = held_out_loss(model, config, workdir), held_out_loss(
        int8, config, workdir)
    prompts = [[1] + list(b"ROMEO:"), [1] + list(b"First Citizen:"), [1] + list(b"KING")]
    agree = []
    for m in (model, int8):
        with Engine(m, max_slots=4, max_seq_len=64) as engine:
            engine.warmup()
            agree.append([r.tokens for r in engine.generate(prompts,
                                                            SamplingParams(max_tokens=32))])
    same = np.mean([a == b for x, y in zip(*agree) for a, b in zip(x, y)])
    print(f"\n{mode}: weights {100 * ratio:.1f}% of fp32; held-out loss {fp32_loss:.4f} -> "
          f"{int8_loss:.4f} ({100 * (int8_loss / fp32_loss - 1):+.2f}%); greedy tokens "
          f"agree {100 * same:.0f}%")
    assert ratio <= 0.30
    assert abs(int8_loss / fp32_loss - 1) < 0.02


@pytest.mark.parametrize("args, message", [
    (["--model=/no/such/run", "--prompt=x"], "/no/such/run/config.json not found"),
    (["--prompt=x"], "give --model=PATH"),
    (["--model=MODEL", "--max_new_tokens=100", "--max_seq_len=64", "--prompt=x"],
     "plus max_tokens=100 exceed max_seq_len=64"),
    (["--model=MODEL", "--quantize=int4", "--prompt=x"], "--quantize"),
    (["--model=MODEL"], "give --prompt=TEXT"),
    (["--model=MODEL", "--prompts=/no/prompts.jsonl"], "--prompts=/no/prompts.jsonl: no such"),
])
def test_bad_input_is_one_error_line(trained, args, message):
    workdir, _ = trained
    result = generate(*(a.replace("MODEL", workdir) for a in args))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert message in line, line
