"""The non-finite guard: what a run does when a step's loss or gradient norm is NaN or inf.

The train step drops such an update itself (llmjax.training.step, metric `skipped`), so
the train state, and so every checkpoint, only ever holds finite values; a run that
diverges therefore never rotates its last healthy checkpoint out. `config.nan_policy`
decides the rest:

    stop       (default) end the run: one `error:` line naming the step and the likely
               causes, exit status 1; the newest checkpoint is the last finite state
    skip_step  go on; the dropped steps are counted in `train/skipped_steps`

A step's flag is read one step later (or at once before the loop logs, evaluates, saves
or ends, which wait for the device anyway), so checking it never makes the host wait for
the device between two steps.
"""

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from llmjax.config import NAN_POLICIES


class NonFiniteError(ValueError):
    """A step's loss or gradient norm was NaN or inf under nan_policy=stop."""


class Guard:
    def __init__(self, policy: str, learning_rate: float, skipped: int = 0):
        assert policy in NAN_POLICIES, policy  # llmjax.config.validate checked it
        self.policy, self.learning_rate = policy, learning_rate
        self.skipped = skipped  # dropped steps, this run and the runs it resumes
        self._pending: tuple[int, dict[str, Any]] | None = None

    def observe(self, step: int, metrics: dict[str, Any]) -> None:
        """Check the previous step's metrics; keep these for the next call."""
        self.check()
        self._pending = (step, metrics)

    def check(self) -> None:
        """Check the step observed last; raise NonFiniteError if it failed under `stop`."""
        if self._pending is None:
            return
        step, metrics = self._pending
        self._pending = None
        if not float(np.asarray(metrics["skipped"])):
            return
        self.skipped += 1
        if self.policy == "stop":
            raise NonFiniteError(self.message(step, metrics))

    def message(self, step: int, metrics: dict[str, Any]) -> str:
        loss, grad_norm = (float(np.asarray(metrics[k])) for k in ("loss", "grad_norm"))
        return (f"non-finite training at step {step} (train/loss {loss}, train/grad_norm "
                f"{grad_norm}): its update was dropped and the run stopped; checkpoints hold "
                "only finite states. Likely causes: config.optimizer.learning_rate="
                f"{self.learning_rate:g} too high, labels outside [0, config.model.num_labels), "
                "token ids >= config.model.vocab_size; or set config.nan_policy=skip_step "
                "to drop such steps and go on")

    def replay(self, records: Iterable[dict[str, Any]]) -> "Guard":
        """The count of dropped steps from earlier metrics.jsonl records (a resumed run)."""
        for record in records:
            value = record.get("train/skipped_steps")
            if value is not None and math.isfinite(float(value)):
                self.skipped = int(value)
        return self
