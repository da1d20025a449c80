"""Every test sees 8 simulated CPU devices (set before JAX initialises)."""

import os
import sys

# Tests compile at LLVM's lowest optimisation level: their models are tiny, so compiling
# is most of what they cost (a whole tiny `python -m llmjax.train`: 19-25 s at the default
# level, 12.5 s at this one). The HLO passes are XLA's usual ones; only the machine code
# differs (unvectorised loops: the tiny run's losses moved by at most 1e-7 relative).
# Commands the tests start inherit it; speed is measured by llmjax.bench, never here.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a process of the tests with `devices` simulated CPU devices."""
    return f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"


if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # (a process started by a test may have been given its own count)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags(8)}".strip()
# The hundreds of processes the tests start import jax, transformers and torch: with
# PYTHONDONTWRITEBYTECODE set (machines of CI's kind set it), each compiles them again.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False  # and this process keeps what it compiles from here on
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session's tests, both pytest workers and the
# commands they start (llmjax.runtime): a resumed or repeated tiny run loads its programs
# instead of compiling them (8 s -> 1 s a first step). Kept between sessions: entries are
# keyed by the program, the jaxlib and the devices, so a stale one is never used.
os.environ.setdefault("LLMJAX_COMPILATION_CACHE", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "xla"))

import pytest  # noqa: E402

from llmjax import runtime  # noqa: E402
from llmjax.config import base_config, with_overrides  # noqa: E402

runtime.enable_compilation_cache()


def tiny_config(**overrides):
    """A config small enough to train for a few steps in seconds on one CPU core."""
    config = base_config()
    config.name = "tiny"
    config.num_train_steps = 8
    config.global_batch_size = 8
    config.seq_len = 32
    config.log_every_steps = 1
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 4
    config.eval_batches = 2
    config.data.tokenizer = "byte"
    config.model.embed_dim = 32
    config.model.num_layers = 2
    config.model.num_heads = 4
    config.model.num_kv_heads = 2
    config.model.mlp_dim = 64
    config.optimizer.learning_rate = 1e-2
    config.optimizer.warmup_steps = 2
    config.peak_flops_per_device = 1e9  # a known peak for the MFU figures tests read
    return with_overrides(config, overrides)


@pytest.fixture
def make_config():
    return tiny_config


def straight_and_resumed_losses(tmp_path, **overrides):
    """({step: train/loss} of 8 steps straight, the same of 4 steps then a resume to 8), for
    a tiny run with `overrides` (checkpoints every 4 steps, a constant learning rate)."""
    import json

    from llmjax.training.loop import train_and_evaluate

    def run(workdir, steps):
        train_and_evaluate(tiny_config(num_train_steps=steps, checkpoint_every_steps=4,
                                       eval_every_steps=8, **{
                                           "optimizer.schedule": "constant", **overrides}),
                           workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}

    straight = run(str(tmp_path / "straight"), 8)
    run(str(tmp_path / "resumed"), 4)
    return straight, run(str(tmp_path / "resumed"), 8)


def write_text_tfds(data_dir, name, splits):
    """A TFDS dataset with a `text` feature, in array_record files, as `tfds build` makes."""
    import tensorflow_datasets as tfds

    from llmjax.data import prepared

    features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
    directory = data_dir / name / "1.0.0"
    directory.mkdir(parents=True)
    lengths = {}
    for split, texts in splits.items():
        path = directory / prepared.shard_filename(name, split, 0, 1)
        lengths[split] = ([len(texts)], prepared.write_shard(
            str(path), ({"text": t} for t in texts), features)[1])
    prepared.write_metadata(str(directory), name, features, lengths, {}, "test")


def documented_metric_keys():
    """The keys of the README's metrics table (its first column)."""
    import re

    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "README.md")
    with open(readme, encoding="utf-8") as f:
        rows = [line.split("|")[1] for line in f if line.startswith("| `")]
    return {key for cell in rows for key in re.findall(r"`([a-z_]+(?:/[a-z_0-9]+)?)`", cell)}
