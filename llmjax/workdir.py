"""The run directory: what a workdir holds, and how a path names a model.

    WORKDIR/config.json        the run's resolved config (a JSON dump of the ConfigDict)
    WORKDIR/metrics.jsonl      one JSON object per line: {"step": 50, "train/loss": 4.2, ...}
    WORKDIR/tensorboard/       TensorBoard event files
    WORKDIR/checkpoints/STEP/  Orbax checkpoints (train state, data position, config)
    WORKDIR/best/STEP/         the best checkpoint for config.early_stopping.metric
    WORKDIR/tokenizer/         the tokenizer trained for the run (bpe:N)
    WORKDIR/lock               who runs in it now: {"pid", "host", "since"} (`lock`)
    WORKDIR/wandb_run_id       the W&B run it logs to (config.logging.wandb_project)
    WORKDIR/wandb/             W&B's own files for that run (unless $WANDB_DIR says where)

`python -m llmjax.hf import` writes the same shape with parameters only, at step 0. A
model path (init_from, evaluate, export, generate, serve) is a workdir (its newest
checkpoint), one checkpoint WORKDIR/checkpoints/STEP or WORKDIR/best/STEP, an imported
directory, or a Hugging Face directory (config.json with a `model_type`).
Paths may be local or in an object store (gs://...).
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

from etils import epath

CONFIG = "config.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
BEST = "best"
TOKENIZER = "tokenizer"
LOCK = "lock"
WANDB_RUN_ID = "wandb_run_id"


def read_config(workdir: str) -> dict[str, Any]:
    """The resolved config of a workdir or import directory, as a dict.

    Raises FileNotFoundError (no config.json) or ValueError (not JSON), naming the file.
    """
    path = epath.Path(workdir) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: give an llmjax workdir (or "
                                "WORKDIR/checkpoints/STEP) or a directory from "
                                "`python -m llmjax.hf import`")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it from a checkpoint's "
                         "config or start in a new --workdir") from None


@contextlib.contextmanager
def naming(path: Any) -> Iterator[None]:
    """Give an OSError raised in the body `path` as its filename if it has none (a write
    that fills the disk says only "No space left on device")."""
    try:
        yield
    except OSError as e:
        if e.filename or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def split_checkpoint(path: str) -> tuple[str, str, int | None]:
    """(workdir, checkpoint subdirectory, step) of a model path: WORKDIR/checkpoints/N or
    WORKDIR/best/N name one step; anything else is a workdir (step None: the newest)."""
    path = path.rstrip("/") if "://" in path else os.path.normpath(path)
    parent, step = os.path.split(path)
    workdir, subdir = os.path.split(parent)
    if subdir in (CHECKPOINTS, BEST) and step.isdigit():
        return workdir, subdir, int(step)
    return path, CHECKPOINTS, None


def is_hf_dir(path: str) -> bool:
    """Whether `path` holds a Hugging Face model (config.json with a model_type)."""
    try:
        return "model_type" in json.loads((epath.Path(path) / CONFIG).read_text())
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
    """Hold WORKDIR/lock while the body runs, so one workdir has one run; raise ValueError
    naming the holder if another process holds it.

    The lock is the kernel's (flock): it goes when its process does, however it ends, so
    the lock of a killed run is stale and taken over (said in a line). The file names the
    holder for the refusal; it is emptied, not removed, on release (removing it would let
    a third run lock a new file while a second still holds the old one). Object stores
    (gs://) have no locks: there, nothing is checked.
    """
    if "://" in workdir:
        yield
        return
    path = os.path.join(workdir, LOCK)
    file = open(path, "a+", encoding="utf-8")  # "a+": never truncate a holder's record
    try:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{workdir} is in use by {_holder(file)}: wait for that run, "
                             "stop it, or give another --workdir") from None
        if (stale := _holder(file)) != "another process":
            print(f"Took over the lock of {stale} in {workdir} (that run is gone)",
                  flush=True)
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since":
                               datetime.datetime.now().isoformat(timespec="seconds")}))
        file.flush()
        try:
            yield
        finally:
            file.seek(0)
            file.truncate()
    finally:
        file.close()  # releases the flock


def _holder(file: Any) -> str:
    """Who a lock file names: "process PID on HOST (since TIME)" or "another process"."""
    file.seek(0)
    try:
        holder = json.loads(file.read())
        return f"process {holder['pid']} on {holder['host']} (since {holder['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"
