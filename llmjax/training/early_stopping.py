"""Early stopping on an eval metric, and which evaluation is the best so far.

A NaN or infinite value is never the best (it counts as an evaluation without
improvement). A tie on the metric is broken by eval/loss (lower wins) when the metric is
another one, e.g. two evaluations of equal accuracy; a tie that remains goes to the later
step (it has trained longer). Winning a tie counts as an improvement.

Its state is a function of the metric's history, so a resumed run rebuilds it from the
workdir's metrics.jsonl (which the train loop truncates to the resumed checkpoint).
"""

import dataclasses
import math
from collections.abc import Iterable
from typing import Any


@dataclasses.dataclass
class EarlyStopping:
    metric: str  # e.g. "eval/loss"; empty: never better, never stop
    mode: str = "min"  # "min" | "max"
    patience: int = 0  # evaluations without improvement before stopping; 0: never stop
    best: float = math.nan
    best_step: int = -1  # -1: no finite evaluation yet
    best_loss: float = math.nan  # eval/loss at the best step: breaks ties of the metric
    stale: int = 0  # evaluations since the best

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Record an evaluation; True if it is the best so far."""
        if not self.metric:
            return False
        if self.metric not in metrics:
            raise ValueError(f"config.early_stopping.metric={self.metric!r} is not an eval "
                             f"metric of this run; choose one of {sorted(metrics)}")
        value = float(metrics[self.metric])
        loss = float(metrics.get("eval/loss", math.nan))
        better = math.isfinite(value) and (self.best_step < 0 or self._beats(value, loss))
        if better:
            self.best, self.best_step, self.best_loss, self.stale = value, step, loss, 0
        else:
            self.stale += 1
        return better

    def _beats(self, value: float, loss: float) -> bool:
        if value != self.best:
            return value < self.best if self.mode == "min" else value > self.best
        if self.metric != "eval/loss" and math.isfinite(loss) and loss != self.best_loss:
            return math.isnan(self.best_loss) or loss < self.best_loss
        return True  # a full tie: the later step

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.stale >= self.patience

    def report(self) -> dict[str, float]:
        """What the eval metrics record of it: the best step, and whether it stopped."""
        out: dict[str, float] = {}
        if self.metric:
            out["eval/best_step"] = self.best_step
        if self.should_stop:
            out["eval/early_stopped"] = 1
        return out

    def replay(self, records: Iterable[dict[str, Any]]) -> "EarlyStopping":
        """Feed the evaluations of earlier metrics.jsonl records (a resumed run)."""
        for record in records:
            if self.metric and self.metric in record:
                self.update(int(record["step"]), record)
        return self
