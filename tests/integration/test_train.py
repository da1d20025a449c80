"""End to end: the loss falls on the bundled corpus; a run killed at random moments
resumes to the same losses as an uninterrupted one; bad config keys and values fail with
one clear line."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
from conftest import documented_metric_keys, tiny_config

from llmjax.training.loop import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses_by_step(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def test_loss_falls_on_bundled_corpus(tmp_path):
    config = tiny_config(num_train_steps=60, eval_every_steps=30, checkpoint_every_steps=60,
                         **{"model.embed_dim": 64, "model.mlp_dim": 128,
                            "optimizer.warmup_steps": 10, "sample.max_new_tokens": 16,
                            "sample.prompt": "ROMEO:"})
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    summary = train_and_evaluate(config, str(tmp_path))
    assert signal.getsignal(signal.SIGTERM) is sigterm_handler  # preemption handler removed
    records = read_metrics(tmp_path)
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    first_loss = records[1]["train/loss"]
    assert abs(first_loss - np.log(259)) < 0.3  # untrained: about uniform over the bytes
    assert evals[-1] < first_loss - 2.0, (first_loss, evals)
    assert summary["sample"].startswith("ROMEO:") and len(summary["sample"]) > len("ROMEO:")
    for key in ("train/loss", "train/learning_rate", "train/tokens_per_sec", "train/mfu",
                "train/loss_tokens", "eval/loss", "eval/perplexity"):
        assert any(key in r for r in records), key
    # Every key logged is in the README's metrics table.
    assert {k for r in records for k in r} - {"step"} <= documented_metric_keys()
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["num_train_steps"] == 60
    assert any(name.startswith("events") for name in os.listdir(tmp_path / "tensorboard"))


def cli(workdir, *overrides):
    args = [sys.executable, "-m", "llmjax.train", "--config=tests/tiny_config.py",
            f"--workdir={workdir}", *overrides]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def last_logged_step(workdir):
    """The newest step with a train/loss in metrics.jsonl, tolerating a line mid-write."""
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "train/loss" in record:
            steps.append(record["step"])
    return max(steps)


def test_runs_killed_at_random_moments_resume_with_identical_losses(tmp_path):
    steps = ["--config.num_train_steps=40", "--config.checkpoint_every_steps=5",
             "--config.eval_every_steps=20"]
    train_and_evaluate(tiny_config(num_train_steps=40, checkpoint_every_steps=5,
                                   eval_every_steps=20), str(tmp_path / "straight"))
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    # Two kills: the first anywhere up to step 18 (perhaps before the first checkpoint,
    # perhaps mid-save or mid-log), the second later; then a run to the end.
    workdir = tmp_path / "killed"
    for low, high in ((1, 18), (19, 34)):
        target = rng.randint(low, high)
        proc = cli(workdir, *steps)
        deadline = time.time() + 300
        while last_logged_step(workdir) < target and proc.poll() is None:
            assert time.time() < deadline, f"seed {seed}"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, (f"seed {seed}", proc.communicate())
    proc = cli(workdir, *steps)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (f"seed {seed}", err[-3000:])
    resumed, straight = losses_by_step(workdir), losses_by_step(tmp_path / "straight")
    assert [r["step"] for r in read_metrics(workdir) if "train/loss" in r] == list(range(1, 41)), \
        f"seed {seed}: every step once, in order"
    assert sorted(tensorboard_steps(workdir / "tensorboard", "train/loss")) == sorted(resumed)
    np.testing.assert_allclose([resumed[s] for s in range(1, 41)],
                               [straight[s] for s in range(1, 41)], rtol=0, atol=1e-6,
                               err_msg=f"seed {seed}")


def test_bad_config_key_fails_with_one_clear_line(tmp_path):
    proc = cli(tmp_path, "--config.optimizer.shedule=cosine")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "shedule" in err
    assert "Traceback" not in err

    proc = cli(tmp_path, "--config.optimizer.schedule=cosin")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == ["error: config.optimizer.schedule='cosin': choose one of "
                     "('cosine', 'linear', 'constant', 'wsd', 'rsqrt')"]
    assert "Traceback" not in err


def tensorboard_steps(logdir, tag):
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    steps = []
    for name in sorted(os.listdir(logdir)):
        for record in tf.data.TFRecordDataset(os.path.join(logdir, name)):
            event = event_pb2.Event.FromString(record.numpy())
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def test_resume_drops_tensorboard_points_past_the_checkpoint(tmp_path):
    from llmjax.training import metrics, tensorboard

    logdir = str(tmp_path / "tensorboard")
    first = tensorboard.EventWriter(logdir)  # a run that logged 1..8, checkpointed at 5
    for step in range(1, 9):
        first.write_scalars(step, {"train/loss": 10.0 - step})
    first.close()
    metrics.drop_after(str(tmp_path), 5)
    resumed = tensorboard.EventWriter(logdir)  # a second file, as a resumed run opens
    for step in range(6, 11):
        resumed.write_scalars(step, {"train/loss": 1.0})
    resumed.close()
    assert sorted(tensorboard_steps(logdir, "train/loss")) == list(range(1, 11))
