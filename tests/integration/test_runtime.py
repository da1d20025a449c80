"""A command's runtime (llmjax.runtime): jemalloc preloaded when installed, which changes no
loss, and the persistent compilation cache, which a rerun loads instead of compiling."""

import json
import os
import subprocess
import sys

import pytest

from llmjax import runtime

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train(workdir, cache, **env):
    result = subprocess.run(
        [sys.executable, "-m", "llmjax.train", "--config=tests/tiny_config.py",
         f"--workdir={workdir}", "--config.num_train_steps=4", "--config.eval_every_steps=4"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "LLMJAX_COMPILATION_CACHE": str(cache), **env})
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("Runtime:")]
    return losses, line


def test_jemalloc_changes_no_loss_and_a_rerun_compiles_nothing(tmp_path):
    if runtime.jemalloc_path() is None:
        pytest.skip("no jemalloc here (apt-get install libjemalloc2; .ci/run installs it)")
    cache = tmp_path / "xla"
    system, line = train(tmp_path / "system", cache, LLMJAX_ALLOCATOR="system")
    assert "allocator the system's" in line and f"compilation cache {cache}" in line
    programs = sorted(os.listdir(cache))
    assert programs

    jemalloc, line = train(tmp_path / "jemalloc", cache)
    assert "allocator jemalloc (retain:true" in line  # loaded: read from /proc/self/maps
    assert jemalloc == system  # bit for bit
    assert sorted(os.listdir(cache)) == programs  # every program came from the cache


def test_a_users_preload_and_choice_are_kept():
    env = runtime.allocator_env({"LD_PRELOAD": "/opt/libother.so", "MALLOC_CONF": "x:1"})
    if runtime.jemalloc_path():
        assert env["LD_PRELOAD"].endswith(":/opt/libother.so")
    assert env["MALLOC_CONF"] == "x:1"
    system = runtime.allocator_env({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "system")
    assert "LD_PRELOAD" not in system and system["LLMJAX_ALLOCATOR"] == "system"
