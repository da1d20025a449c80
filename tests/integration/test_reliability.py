"""A run that diverges stops without saving a non-finite state; one workdir holds one run;
a torn metrics.jsonl or an unreadable newest checkpoint does not block resuming."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config

from llmjax.training import checkpoint
from llmjax.training.loop import train_and_evaluate
from llmjax.training.nonfinite import NonFiniteError


def strict_records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=pytest.fail) for line in f]


def test_a_diverging_run_stops_and_keeps_only_finite_checkpoints(tmp_path):
    # lr 1e6: step 2 blows the weights up, step 3's gradient norm is NaN.
    config = tiny_config(num_train_steps=3, checkpoint_every_steps=1, max_to_keep=2,
                         **{"optimizer.learning_rate": 1e6})
    with pytest.raises(NonFiniteError, match="non-finite training at step 3"):
        train_and_evaluate(config, str(tmp_path))
    assert checkpoint.complete_steps(str(tmp_path)) == [1, 2]
    for step in (1, 2):
        state = ocp.PyTreeCheckpointer().restore(tmp_path / "checkpoints" / str(step) / "state")
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
    assert max(r["step"] for r in strict_records(tmp_path)) <= 3

    config = tiny_config(num_train_steps=4, **{"optimizer.learning_rate": 1e6,
                                               "nan_policy": "skip_step"})
    summary = train_and_evaluate(config, str(tmp_path / "skip"))
    assert summary["train/skipped_steps"] == 2  # steps 3 and 4 dropped, the run finished
    assert strict_records(tmp_path / "skip")[-1]["step"] == 4
