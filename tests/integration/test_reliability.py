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

    # Rerun with skip_step: it resumes from step 2 and drops steps 3 and 4.
    config = tiny_config(num_train_steps=4, checkpoint_every_steps=1, max_to_keep=2,
                         **{"optimizer.learning_rate": 1e6, "nan_policy": "skip_step"})
    summary = train_and_evaluate(config, str(tmp_path))
    assert summary["train/skipped_steps"] == 2
    records = strict_records(tmp_path)
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]  # once each
    assert checkpoint.complete_steps(str(tmp_path)) == [3, 4]  # step 2's state, kept as is

def test_an_unreadable_newest_checkpoint_and_a_torn_log_line_do_not_block_resuming(
        tmp_path, capsys):
    workdir = tmp_path / "run"
    train_and_evaluate(tiny_config(), str(workdir))  # checkpoints 4 and 8
    straight = {r["step"]: r["train/loss"] for r in strict_records(workdir)
                if "train/loss" in r}
    for array_file in (workdir / "checkpoints" / "8" / "state").glob("ocdbt.process_0/d/*"):
        array_file.write_bytes(array_file.read_bytes()[:array_file.stat().st_size // 2])
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "train/lo')  # what a crash mid-write leaves
    capsys.readouterr()
    train_and_evaluate(tiny_config(**{"optimizer.learning_rate": 5e-3}), str(workdir))
    out = capsys.readouterr().out
    assert "Checkpoint step 8 cannot be read (ValueError: OUT_OF_RANGE" in out
    assert (workdir / "checkpoints_unreadable" / "8" / "state").is_dir()  # moved, not deleted
    assert f"Resumed from {workdir}/checkpoints/4" in out
    assert "Config changed since that checkpoint: config.optimizer.learning_rate: 0.01 -> " \
           "0.005" in out
    resumed = [r for r in strict_records(workdir) if "train/loss" in r]
    assert [r["step"] for r in resumed] == list(range(1, 9))  # each step once
    assert [r["train/loss"] for r in resumed][:4] == [straight[s] for s in range(1, 5)]
