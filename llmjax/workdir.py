"""The run directory: what a workdir holds, and how a path names a model.

    WORKDIR/config.json        the run's resolved config (a JSON dump of the ConfigDict)
    WORKDIR/metrics.jsonl      one JSON object per line: {"step": 50, "train/loss": 4.2, ...}
    WORKDIR/tensorboard/       TensorBoard event files
    WORKDIR/checkpoints/STEP/  Orbax checkpoints (train state, data position, config)
    WORKDIR/best/STEP/         the best checkpoint for config.early_stopping.metric
    WORKDIR/tokenizer/         the tokenizer trained for the run (bpe:N)

`python -m llmjax.hf import` writes the same shape with parameters only, at step 0. A
model path (init_from, evaluate, export, generate, serve) is a workdir (its newest
checkpoint), one checkpoint WORKDIR/checkpoints/STEP or WORKDIR/best/STEP, an imported
directory, or a Hugging Face directory (config.json with a `model_type`).
Paths may be local or in an object store (gs://...).
"""

import json
import os
from typing import Any

from etils import epath

CONFIG = "config.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
BEST = "best"
TOKENIZER = "tokenizer"


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
