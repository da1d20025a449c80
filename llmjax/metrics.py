"""Metric writers (TensorBoard, metrics.jsonl, console) and throughput / MFU accounting.

`metrics.jsonl` holds one JSON object per write: {"step": int, "group/name": float, ...}.
"""

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers

# Dense bf16 peak FLOP/s per device, by `jax.Device.device_kind` prefix.
PEAK_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "NVIDIA B200": 2250e12,
    "TPU v6": 918e12,  # Trillium (v6e)
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,
    "TPU v4": 275e12,
    "TPU v3": 123e12,
}


def measure_cpu_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a float32 [size, size] matmul on the first CPU device, best of `repeats`."""
    x = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def peak_flops_per_device(override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if override:
        return float(override), "config.peak_flops_per_device"
    device = jax.devices()[0]
    for prefix, peak in PEAK_FLOPS.items():
        if device.device_kind.startswith(prefix):
            return peak, f"{device.device_kind} dense bf16 peak"
    if device.platform == "cpu":
        # Simulated CPU devices share the host's cores.
        peak = measure_cpu_peak_flops() / jax.local_device_count()
        return peak, "measured fp32 matmul on this CPU, shared by the local devices"
    return math.nan, f"unknown peak for {device.device_kind}; set config.peak_flops_per_device"


class JsonlWriter(metric_writers.MetricWriter):
    """Appends scalars to `path` as one JSON object per line."""

    def __init__(self, path: str):
        self._file = open(path, "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        record = {"step": int(step)}
        record.update({k: float(v) for k, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_texts(self, step: int, texts: Mapping[str, str]):
        self._file.write(json.dumps({"step": int(step), **texts}) + "\n")
        self._file.flush()

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


class ConsoleWriter(JsonlWriter):
    """One readable line per write on stdout, with steps/s and ETA for train metrics."""

    def __init__(self, num_train_steps: int):
        self._file = sys.stdout
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
            else:
                parts.append(f"{key} {value:.4g}")
        print(" | ".join(parts), flush=True)

    def write_texts(self, step: int, texts: Mapping[str, str]):
        for key, text in texts.items():
            print(f"step {step} {key}:\n{text}", flush=True)

    def close(self):
        self._file.flush()


def drop_records_after(path: str, step: int) -> None:
    """Remove metrics.jsonl records past `step`, so a resumed run does not log steps twice."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def create_writer(workdir: str, num_train_steps: int) -> metric_writers.MetricWriter:
    """TensorBoard + metrics.jsonl + console on process 0; nothing on the others."""
    if jax.process_index() != 0:
        return metric_writers.MultiWriter([])
    return metric_writers.MultiWriter([
        metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")),
        JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
        ConsoleWriter(num_train_steps),
    ])


class Throughput:
    """Tokens/s and MFU between two reports of the train loop."""

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
        tokens_per_sec = steps * tokens_per_step / seconds
        self.reset(step)
        return {
            "train/steps_per_sec": steps / seconds,
            "train/step_time_ms": 1000 * seconds / max(steps, 1),
            "train/tokens_per_sec": tokens_per_sec,
            "train/mfu": tokens_per_sec * self.flops_per_token / self.peak_total,
        }


def to_floats(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": float(np.asarray(v)) for k, v in metrics.items()}
