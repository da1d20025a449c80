"""config.logging.wandb_project: an offline W&B run gets what metrics.jsonl gets (same
names, steps and values), the resolved config and the sample; rerunning in the workdir
continues the same W&B run."""

import glob
import json
import os
import struct

import pytest
from conftest import tiny_config

from llmjax.training.loop import train_and_evaluate

wandb = pytest.importorskip("wandb")
wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of framed chunks
_FULL, _LAST = 1, 4


def wandb_records(path):
    """The Record messages of a run's .wandb file (W&B's transaction log)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", data[:7]
    records, parts, pos = [], [], 7  # a 7-byte file header, then chunks
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a chunk header never spans blocks: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero fill at the end of a block
            pos += _BLOCK - pos % _BLOCK
            continue
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (_FULL, _LAST):
            records.append(wandb_internal_pb2.Record.FromString(b"".join(parts)))
            parts = []
    return records


def _key(item):
    return item.key or "/".join(item.nested_key)


def read_run(run_dir):
    """{"id", "tags", "config", "history": {step: {key: value}}, "summary"} of one offline
    run directory."""
    [path] = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    run = {"history": {}, "summary": {}}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, tags=list(record.run.tags), config={
                _key(u): json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in record.history.item}
            run["history"][row.pop("_step")] = {k: v for k, v in row.items()
                                                if not k.startswith("_")}
        elif kind == "summary":
            run["summary"].update({_key(u): json.loads(u.value_json)
                                   for u in record.summary.update})
    return run


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, quiet, its files under tmp_path, nothing sent anywhere."""
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                        "WANDB_ERROR_REPORTING": "false", "WANDB_DISABLE_GIT": "true",
                        "WANDB_DISABLE_CODE": "true", "WANDB_X_DISABLE_STATS": "true",
                        "WANDB_X_DISABLE_MACHINE_INFO": "true"}.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def test_wandb_run_logs_what_metrics_jsonl_logs_and_a_rerun_continues_it(
        tmp_path, offline_wandb):
    workdir = tmp_path / "run"
    config = tiny_config(num_train_steps=4, **{"logging.wandb_project": "llmjax-test",
                                               "logging.wandb_tags": "a, b"})
    train_and_evaluate(config, str(workdir))
    train_and_evaluate(config, str(workdir))  # all trained: restores, logs nothing new
    # W&B's service process writes the .wandb files behind finish(); a short run's file can
    # still be in its buffer. Stopping the service (as the exit of a command does) flushes it.
    wandb.teardown()

    # Each start wrote into the workdir's wandb/, a directory each, under one run id.
    runs = sorted(glob.glob(str(workdir / "wandb" / "offline-run-*")))
    assert len(runs) == 2, runs
    first, rerun = map(read_run, runs)
    assert first["id"] == rerun["id"] == (workdir / "wandb_run_id").read_text().strip()
    assert first["tags"] == ["a", "b"]
    assert not glob.glob(f"wandb/*{first['id']}*")  # nothing where the tests run from

    # Every scalar of metrics.jsonl, at its step, with its value; nothing else.
    expected = {}
    with open(workdir / "metrics.jsonl") as f:
        for record in map(json.loads, f):
            expected.setdefault(record.pop("step"), {}).update(record)
    logged = first["history"]
    assert sorted(logged) == sorted(expected) == [1, 2, 3, 4]
    for step, scalars in expected.items():
        assert logged[step] == pytest.approx(scalars, rel=1e-6), step
    assert {"train/loss", "train/tokens_per_sec", "eval/loss"} <= set(logged[4])
    assert rerun["history"] == {}

    # The resolved config, as config.json has it.
    with open(workdir / "config.json") as f:
        assert first["config"] == {**json.load(f), "_wandb": first["config"]["_wandb"]}
    assert first["config"]["model"]["vocab_size"] == 259  # resolved: the byte tokenizer's
