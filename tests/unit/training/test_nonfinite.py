"""A NaN or inf never hides: the guard stops (or counts) a non-finite step, metrics.jsonl
stays strict JSON, and early stopping never keeps a non-finite best. Ties of the best
metric are broken by eval/loss, then by the later step."""

import json
import math

import numpy as np
import pytest

from llmjax.training import metrics
from llmjax.training.early_stopping import EarlyStopping
from llmjax.training.nonfinite import Guard, NonFiniteError


def step_metrics(skipped, loss=5.0, grad_norm=1.0):
    return {"skipped": np.float32(skipped), "loss": np.float32(loss),
            "grad_norm": np.float32(grad_norm)}


def test_stop_policy_names_the_non_finite_step_one_step_late_or_on_check():
    guard = Guard("stop", learning_rate=1e6)
    guard.observe(1, step_metrics(0))
    guard.observe(2, step_metrics(1, grad_norm=math.nan))  # read at the next observe
    with pytest.raises(NonFiniteError, match=r"step 2 .*grad_norm nan.*learning_rate=1e\+06"):
        guard.observe(3, step_metrics(0))
    guard = Guard("stop", learning_rate=1e-3)
    guard.observe(7, step_metrics(1, loss=math.inf))
    with pytest.raises(NonFiniteError, match=r"step 7 \(train/loss inf"):
        guard.check()  # what the loop calls before it evaluates or saves


def test_skip_policy_counts_dropped_steps_across_a_resume():
    guard = Guard("skip_step", learning_rate=1e-3).replay(
        [{"step": 4, "train/skipped_steps": 2.0}, {"step": 4, "eval/loss": 3.0}])
    for step, skipped in enumerate([0, 1, 1, 0], start=5):
        guard.observe(step, step_metrics(skipped))
    guard.check()
    assert guard.skipped == 4


def test_metrics_jsonl_is_strict_json_with_non_finite_values(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    writer = metrics.JsonlWriter(path)
    writer.write_scalars(3, {"train/loss": np.float32("nan"), "train/grad_norm": math.inf,
                             "eval/loss": -math.inf, "train/tokens": 256})
    writer.close()
    with open(path) as f:
        [record] = [json.loads(line, parse_constant=pytest.fail) for line in f]
    assert record == {"step": 3, "train/loss": "NaN", "train/grad_norm": "Infinity",
                      "eval/loss": "-Infinity", "train/tokens": 256.0}
    assert math.isnan(float(record["train/loss"])) and float(record["eval/loss"]) == -math.inf


def test_early_stopping_never_picks_a_non_finite_best():
    stopping = EarlyStopping("eval/loss", "min", patience=3)
    assert not stopping.update(2, {"eval/loss": math.nan})  # nothing finite yet: no best
    assert stopping.best_step == -1 and stopping.stale == 1
    assert stopping.update(4, {"eval/loss": 3.0})
    assert not stopping.update(6, {"eval/loss": "NaN"})  # as a resumed run reads it back
    assert not stopping.update(8, {"eval/loss": -math.inf})
    assert (stopping.best, stopping.best_step, stopping.stale) == (3.0, 4, 2)


def test_a_tie_goes_to_the_lower_eval_loss_then_to_the_later_step():
    stopping = EarlyStopping("eval/accuracy", "max")
    assert stopping.update(2, {"eval/accuracy": 0.75, "eval/loss": 0.6})
    assert stopping.update(4, {"eval/accuracy": 0.75, "eval/loss": 0.5})  # lower loss wins
    assert not stopping.update(6, {"eval/accuracy": 0.75, "eval/loss": 0.55})
    assert stopping.update(8, {"eval/accuracy": 0.75, "eval/loss": 0.5})  # full tie: later
    assert (stopping.best_step, stopping.stale) == (8, 0)
    by_loss = EarlyStopping("eval/loss", "min").replay(
        [{"step": 2, "eval/loss": 0.5}, {"step": 4, "eval/loss": 0.5}])
    assert by_loss.best_step == 4
