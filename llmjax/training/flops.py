"""Peak FLOP/s per device, for model FLOPs utilisation (MFU).

Kept apart from llmjax.training.metrics (which needs clu) so that llmjax.bench runs on machines
with only jax, flax, optax and ml_collections installed.
"""

import math
import time

import jax
import jax.numpy as jnp

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
