"""Metric writers (TensorBoard, metrics.jsonl, console; W&B: wandb_writer) and throughput /
MFU accounting.

A writer has `write_scalars(step, {name: number})`, `write_texts(step, {name: str})`,
`flush()` and `close()`; `create_writer` gives the run's writers as one.

`metrics.jsonl` holds one JSON object per write: {"step": int, "group/name": float, ...}.
It is always strict JSON: a non-finite value is written as the string "NaN", "Infinity"
or "-Infinity" (which `float()` reads back); see `read_records` for a torn last line.
"""

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from llmjax import workdir as run_dir
from llmjax.training import tensorboard, wandb_writer


class JsonlWriter:
    """Appends scalars to `path` as one JSON object per line.

    Object stores (gs://) cannot append, so there the whole file is rewritten per write.
    """

    def __init__(self, path: str):
        self._path = epath.Path(path)
        self._remote = "://" in path
        if self._remote:
            self._lines = self._path.read_text().splitlines(True) if self._path.exists() else []
        else:
            self._file = open(path, "a", encoding="utf-8")

    def _append(self, record: dict) -> None:
        line = json.dumps(record, allow_nan=False) + "\n"
        with run_dir.naming(self._path):
            if self._remote:
                self._lines.append(line)
                self._path.write_text("".join(self._lines))
            else:
                self._file.write(line)
                self._file.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        self._append({"step": int(step), **{k: _json_number(v) for k, v in scalars.items()}})

    def write_texts(self, step: int, texts: Mapping[str, str]):
        self._append({"step": int(step), **texts})

    def flush(self):
        if not self._remote:
            self._file.flush()

    def close(self):
        if not self._remote:
            self._file.close()


def _json_number(value: Any) -> float | str:
    value = float(value)
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


class ConsoleWriter(JsonlWriter):
    """One readable line per write on stdout, with steps/s and ETA for train metrics."""

    def __init__(self, num_train_steps: int):
        self._file, self._remote = sys.stdout, False
        self._num_train_steps = num_train_steps

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        parts = [f"step {step}/{self._num_train_steps}"]
        for key, value in scalars.items():
            name = key.split("/", 1)[-1]
            if name == "steps_per_sec" and value > 0:
                eta = (self._num_train_steps - step) / value
                parts.append(f"{value:.2f} steps/s, ETA {eta // 60:.0f}m{eta % 60:02.0f}s")
            elif name == "learning_rate":
                parts.append(f"{key} {value:.2e}")
            elif name == "tokens_per_sec":
                parts.append(f"{key} {value:,.0f}")
            elif name == "mfu":
                parts.append(f"{key} {value:.3g}%")
            else:
                parts.append(f"{key} {value:.4g}")
        print(" | ".join(parts), flush=True)

    def write_texts(self, step: int, texts: Mapping[str, str]):
        for key, text in texts.items():
            print(f"step {step} {key}:\n{text}", flush=True)

    def close(self):
        self._file.flush()


def read_records(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (none if it does not exist).

    A cut-off last line (what a crash or a full disk mid-write leaves) is dropped with a
    warning naming the file; a bad line before it is a ValueError naming file and line.
    """
    return [record for _, record in _records(epath.Path(path))]


def _records(path: epath.Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for each record of a JSONL file we append to."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines(True) if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a {\"step\": ...} object")
        except ValueError as e:
            if number < len(lines):
                raise ValueError(f"{path}:{number} is not a metrics record ({e}); delete "
                                 "that line (or the file) to resume") from None
            logging.warning("%s: dropped its last line, cut off mid-write: %r", path,
                            line[:80])
            break
        records.append((line if line.endswith("\n") else line + "\n", record))
    return records


def drop_after(workdir: str, step: int) -> None:
    """Remove what a killed run logged past `step` (metrics.jsonl and TensorBoard), so its
    resumption logs every step once."""
    drop_records_after(os.path.join(workdir, run_dir.METRICS), step)
    tensorboard.drop_events_after(os.path.join(workdir, run_dir.TENSORBOARD), step)


def drop_records_after(path: str, step: int) -> None:
    """Remove metrics.jsonl records past `step` (and a torn last line), so a resumed run
    does not log steps twice. Rewritten beside itself and renamed: a crash loses nothing."""
    path = epath.Path(path)
    if not path.exists():
        return
    kept = [line for line, record in _records(path) if record["step"] <= step]
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


class MultiWriter:
    """Writes to each of `writers` in turn."""

    def __init__(self, writers: list[Any]):
        self.writers = writers

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for writer in self.writers:
            writer.write_scalars(step, scalars)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for writer in self.writers:
            writer.write_texts(step, texts)

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def create_writer(workdir: str, config: ml_collections.ConfigDict) -> MultiWriter:
    """TensorBoard + metrics.jsonl + console (+ W&B with config.logging.wandb_project) on
    process 0; nothing on the others. Raises ValueError if W&B cannot start its run."""
    if jax.process_index() != 0:
        return MultiWriter([])
    # W&B first: a run it refuses fails before the other writers open anything
    writers = [wandb_writer.start(config, workdir)] if config.logging.wandb_project else []
    return MultiWriter([
        *writers,
        tensorboard.EventWriter(os.path.join(workdir, run_dir.TENSORBOARD)),
        JsonlWriter(os.path.join(workdir, run_dir.METRICS)),
        ConsoleWriter(config.num_train_steps),
    ])


class Throughput:
    """Tokens/s (positions of the batch, padding included: what the step computes on) and
    MFU (percent of the devices' peak) between two reports of the train loop."""

    def __init__(self, flops_per_token: float, peak_flops_per_device: float):
        self.flops_per_token = flops_per_token
        self.peak_total = peak_flops_per_device * jax.device_count()
        self._last_time = time.perf_counter()
        self._last_step = 0

    def reset(self, step: int):
        self._last_time, self._last_step = time.perf_counter(), step

    def report(self, step: int, tokens_per_step: int) -> dict[str, float]:
        now = time.perf_counter()
        seconds = max(now - self._last_time, 1e-9)
        steps = step - self._last_step
        if steps <= 0:
            return {}
        tokens_per_sec = steps * tokens_per_step / seconds
        self.reset(step)
        return {
            "train/steps_per_sec": steps / seconds,
            "train/step_time_ms": 1000 * seconds / max(steps, 1),
            "train/tokens_per_sec": tokens_per_sec,
            # percent, as the README, the benchmark and the fit check give it
            "train/mfu": 100 * tokens_per_sec * self.flops_per_token / self.peak_total,
        }


def to_floats(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": float(np.asarray(v)) for k, v in metrics.items()}
