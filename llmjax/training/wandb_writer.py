"""Weights & Biases as one more metric writer: `config.logging.wandb_project` (the `wandb`
extra, `pip install -e ".[wandb]"`).

The W&B run gets every scalar that metrics.jsonl gets (same names, same steps), the
resolved config, and texts (the final sample) as summary entries. Its id is kept in
WORKDIR/wandb_run_id, so rerunning the command in the workdir continues the same W&B run.
W&B keeps its own files in WORKDIR/wandb ($WANDB_DIR if set; the system's temporary
directory for an object-store workdir). With WANDB_MODE=offline nothing leaves the
machine; `wandb sync WORKDIR/wandb/offline-run-*` uploads later.

A run W&B cannot start (not logged in, no network) is a ValueError before the first step.
Once started, a failing write is one warning and W&B is dropped for the rest of the run:
training never stops for its logs.
"""

import os
import secrets
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from llmjax import workdir as run_dir


class WandbWriter:
    """Writes scalars and texts to a started W&B run (`start` makes one); closing
    finishes the run."""

    def __init__(self, run: Any):
        self._run = run
        # W&B takes steps only forward: on resume it continues after the last step it has,
        # and the steps that a killed run logged past its checkpoint keep their first values
        # (the same losses; see README, "Weights & Biases").
        self._first_step = int(run.starting_step)

    def _guarded(self, what: str, write: Any, *args: Any, **kwargs: Any) -> None:
        if self._run is None:
            return
        try:
            write(*args, **kwargs)
        except Exception as e:  # whatever W&B raises, training goes on without it
            logging.warning("W&B %s failed (%s: %s); the run goes on, logging to "
                            "metrics.jsonl and TensorBoard only", what, type(e).__name__, e)
            self._run = None

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        if self._run is None or step < self._first_step:
            return
        values = {key: float(np.asarray(value)) for key, value in scalars.items()}
        self._guarded("log", self._run.log, values, step=int(step))

    def write_texts(self, step: int, texts: Mapping[str, str]):
        if self._run is not None:
            self._guarded("summary", self._run.summary.update, dict(texts))

    def flush(self):
        pass  # W&B sends in the background

    def close(self):
        if self._run is not None:
            # Closed while an error ends the run (the train loop closes its writers on the
            # way out): W&B shows it failed rather than finished.
            failed = sys.exc_info()[0] is not None
            self._guarded("finish", self._run.finish, exit_code=1 if failed else None)
            self._run = None


def start(config: ml_collections.ConfigDict, workdir: str) -> WandbWriter:
    """Start (or, with WORKDIR/wandb_run_id, continue) the W&B run of `config.logging`,
    with the resolved `config` as its config.

    Raises ValueError naming config.logging.wandb_project if W&B cannot start it.
    """
    import wandb  # the optional extra; config.validate has said what to install without it

    settings = config.logging
    id_path = epath.Path(workdir) / run_dir.WANDB_RUN_ID
    if id_path.exists():
        run_id = id_path.read_text().strip()
    else:
        run_id = secrets.token_hex(6)  # W&B's ids are any letters and digits
        with run_dir.naming(id_path):
            id_path.write_text(run_id + "\n")  # before W&B knows it: a retry reuses it
    tags = [tag.strip() for tag in settings.wandb_tags.split(",") if tag.strip()]
    try:
        run = wandb.init(project=settings.wandb_project, entity=settings.wandb_entity or None,
                         name=settings.wandb_run_name or None, tags=tags or None, id=run_id,
                         resume="allow", config=config.to_dict(), dir=_wandb_dir(workdir))
    except Exception as e:  # not logged in, offline, refused: one line before the first step
        detail = " ".join(str(e).split()).rstrip(".") or type(e).__name__
        raise ValueError(
            f"W&B could not start a run for config.logging.wandb_project="
            f"{settings.wandb_project!r}: {detail}; run `wandb login`, set WANDB_MODE=offline "
            "(sync later), or leave the key empty") from e
    print(f"W&B: run {run_id} of project {settings.wandb_project} (files in "
          f"{os.path.dirname(run.dir)})", flush=True)
    return WandbWriter(run)


def _wandb_dir(workdir: str) -> str:
    """Where W&B keeps its files: $WANDB_DIR if set, else the workdir, or a local temporary
    directory when the workdir is in an object store. Always given to W&B: it reads its
    environment once a process, and its default is the current directory."""
    if os.environ.get("WANDB_DIR"):
        return os.environ["WANDB_DIR"]
    return tempfile.gettempdir() if "://" in workdir else workdir
