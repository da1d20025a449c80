"""Peak FLOP/s per device: the denominator of model FLOPs utilisation (MFU, in percent).

On a GPU or TPU it is the chip's dense bf16 peak (llmjax.training.accelerators). On a CPU
it is a fixed nominal figure, CPU_PEAK_FLOPS_PER_CORE times the cores this process may
use, so that MFU compares between runs on one machine whatever else the machine is doing
(a matmul timed at start-up read anywhere from 7 to 144 GFLOP/s on one 2-core machine in
one hour). `config.peak_flops_per_device` replaces either.

Kept apart from llmjax.training.metrics (which needs etils and TensorBoard's protobufs) so that
llmjax.bench runs on machines with only jax, flax, optax and ml_collections installed.
"""

import math
import os

import jax

from llmjax.training import accelerators

# An AVX2 core's fp32 peak: two 8-lane FMA units (32 FLOP a cycle) at 3 GHz.
CPU_PEAK_FLOPS_PER_CORE = 96e9


def cpu_cores() -> int:
    """The cores this process may run on (its affinity: a container's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity call
        return os.cpu_count() or 1


def cpu_description() -> str:
    """The host CPU's model, the cores this process may use and its widest vector ISA, as a
    benchmark names them (speed figures compare only between rows of one machine)."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags
           else "no AVX2" if flags else "ISA unknown")
    extras = [name for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"))
              if flag in flags]
    return f"{model}, {cpu_cores()} cores, {', '.join([isa, *extras])}"


def peak_flops_per_device(override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if override:
        return float(override), "config.peak_flops_per_device"
    device = jax.devices()[0]
    accelerator = accelerators.of_device(device)
    if accelerator is not None:
        return accelerator.peak_flops, f"{device.device_kind} dense bf16 peak"
    if device.platform == "cpu":
        # Simulated CPU devices share the host's cores.
        cores = cpu_cores()
        peak = CPU_PEAK_FLOPS_PER_CORE * cores / jax.local_device_count()
        return peak, (f"nominal CPU peak, {CPU_PEAK_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s x "
                      f"{cores} core{'s' if cores != 1 else ''}, shared by "
                      f"{jax.local_device_count()} local device(s); "
                      f"set config.peak_flops_per_device for yours")
    return math.nan, f"unknown peak for {device.device_kind}; set config.peak_flops_per_device"
