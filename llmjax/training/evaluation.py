"""Evaluation: aggregate an eval step over held-out batches; evaluate a run's checkpoint.

`evaluate` receives a step, not a config: anything that maps a placed global batch to
the sums of llmjax.training.step.eval_step (`loss_sum`, `tokens`, and for
classification `predictions`, for a masked LM `correct`) can be evaluated, the train
loop's and a restored run's alike.
"""

import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from llmjax import workdir as run_dir
from llmjax.data import classify
from llmjax.parallel import sharding
from llmjax.training import restore, setup

Batch = dict[str, np.ndarray]


def evaluate(eval_step: Callable[[dict[str, jax.Array]], dict[str, jax.Array]],
             batches: Sequence[Batch], place: Callable[[Batch], dict[str, jax.Array]],
             num_labels: int = 0) -> dict[str, float]:
    """eval/loss and eval/perplexity over `batches` (this process's rows, put on the mesh
    by `place`), and eval/masked_accuracy for a masked LM; with `num_labels`
    (classification) eval/loss, eval/accuracy and eval/f1."""
    loss_sum, tokens, correct, predicted, labels = 0.0, 0.0, None, [], []
    for batch in batches:
        placed = place(batch)
        out = eval_step(placed)
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
        if "correct" in out:
            correct = (correct or 0.0) + float(out["correct"])
        if num_labels:
            real = sharding.to_host(placed["loss_mask"]) > 0
            predicted.append(sharding.to_host(out["predictions"])[real])
            labels.append(sharding.to_host(placed["labels"])[real])
    loss = loss_sum / max(tokens, 1.0)
    if num_labels:
        accuracy, f1 = classify.accuracy_and_f1(np.concatenate(predicted),
                                                np.concatenate(labels), num_labels)
        return {"eval/loss": loss, "eval/accuracy": accuracy, "eval/f1": f1}
    results = {"eval/loss": loss, "eval/perplexity": float(np.exp(min(loss, 50.0)))}
    if correct is not None:
        results["eval/masked_accuracy"] = correct / max(tokens, 1.0)
    return results


def short_eval_note(config: Any, batches: Sequence[Batch]) -> str:
    """Why a language model's evaluation has fewer batches than config.eval_batches (the
    held-out documents ran out), or "" when it has them all; classifiers use every example."""
    if config.task == "classify" or len(batches) >= config.eval_batches:
        return ""
    return (f"the eval data fill {len(batches)} of config.eval_batches={config.eval_batches} "
            f"batches of {config.global_batch_size} x {config.seq_len}")


def evaluate_run(run: setup.Run, steps: setup.Steps, trainable: Any,
                 batches: Sequence[Batch]) -> dict[str, float]:
    """`evaluate` with the run's eval step on `trainable` and its batch placement."""
    num_labels = run.model_cfg.num_labels if run.task.name == "classify" else 0
    return evaluate(lambda batch: steps.evaluate(trainable, batch), batches,
                    lambda batch: sharding.global_batch(batch, run.batch_sharding,
                                                        run.config.global_batch_size),
                    num_labels)


def evaluate_workdir(workdir: str, *, data: str = "", best: bool = False, output: str = "",
                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The eval metrics of a workdir's newest (or best) checkpoint on the run's eval set
    (or on source `data`), also written to `output` as JSON if given.

    `overrides`: {"dotted.key": value} to change in the run's config before it is rebuilt
    (e.g. "eval_batches"). A language model uses `config.eval_batches` batches; a classifier
    every example of the eval source.
    """
    overrides = dict(overrides or {})
    if data:
        overrides["data.eval"] = data
    restored = restore.restore_run(workdir, best=best, config_overrides=overrides)
    config = restored.run.config
    run_data = setup.build_data(config, workdir)
    run_data.train_iter.close()
    with sharding.activate(restored.run.mesh, restored.run.rules):
        results: dict[str, Any] = evaluate_run(
            restored.run, setup.bind_steps(restored.run, restored.frozen), restored.trainable,
            run_data.eval_batches)
    classifier = restored.run.task.name == "classify"
    results.update({
        "workdir": workdir, "step": restored.step, "best": best,
        "data": config.data.eval or f"held out of {config.data.train}",
        "examples" if classifier else "batches": (
            int(sum(np.sum(b["loss_mask"]) for b in run_data.eval_batches)) if classifier
            else len(run_data.eval_batches))})
    note = short_eval_note(config, run_data.eval_batches)
    if note:
        results["note"] = note
    if output and jax.process_index() == 0:
        with run_dir.naming(output):
            epath.Path(output).write_text(json.dumps(results, indent=2) + "\n")
    return results
