"""The chips llmjax targets: memory and dense bf16 peak FLOP/s per chip.

One table for the fit check's verdict (llmjax.training.memory: does a layout fit the
chip's memory?) and for MFU's denominator (llmjax.training.flops). Chosen by name
(`--accelerator=v5p`, `v5p-128` and `a100-80gb` work too) or from a `jax.Device`.
A JAX device is one chip on all of these (v4 and v5p run as one device per chip).
"""

import dataclasses
import re

import jax

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str  # as --accelerator takes it
    kind_parts: tuple[str, ...]  # all appear in its jax.Device.device_kind
    memory_bytes: int  # per chip (HBM)
    peak_flops: float  # dense bf16 FLOP/s per chip


# Memory as the runtime reports it per chip (rounded to whole GiB); peaks are the
# vendors' dense (not sparse) bf16 figures. First match wins, so the more specific
# kind comes first (A100 80GB before A100; v5 lite before v5).
ACCELERATORS = (
    Accelerator("v4", ("TPU v4",), 32 * GIB, 275e12),
    Accelerator("v5e", ("TPU v5 lite",), 16 * GIB, 197e12),
    Accelerator("v5e", ("TPU v5e",), 16 * GIB, 197e12),
    Accelerator("v5p", ("TPU v5",), 95 * GIB, 459e12),
    Accelerator("v6e", ("TPU v6",), 32 * GIB, 918e12),
    Accelerator("a100-80gb", ("A100", "80GB"), 80 * GIB, 312e12),
    Accelerator("a100-40gb", ("A100",), 40 * GIB, 312e12),
    Accelerator("h100", ("H100",), 80 * GIB, 989e12),
    Accelerator("h200", ("H200",), 140 * GIB, 989e12),
    Accelerator("b200", ("B200",), 179 * GIB, 2250e12),
    Accelerator("l4", ("L4",), 22 * GIB, 121e12),
)
NAMES = tuple(dict.fromkeys(a.name for a in ACCELERATORS))
_ALIASES = {"v5litepod": "v5e", "v6": "v6e", "trillium": "v6e", "a100": "a100-40gb"}


def by_name(name: str) -> Accelerator:
    """`v5p`, `v5p-128` (a slice: its chip), `A100-80GB`, ... -> the table's entry."""
    key = re.sub(r"-\d+$", "", name.strip().lower())  # v5p-128 -> v5p
    key = _ALIASES.get(key, key)
    for accelerator in ACCELERATORS:
        if accelerator.name == key:
            return accelerator
    raise ValueError(f"--accelerator={name!r}: choose one of {', '.join(NAMES)}")


def of_device(device: jax.Device) -> Accelerator | None:
    """The table's entry for `device` (None for a CPU or an unknown chip), with the memory
    the runtime reports for it when it reports one."""
    for accelerator in ACCELERATORS:
        if all(part in device.device_kind for part in accelerator.kind_parts):
            stats = _memory_stats(device)
            if stats.get("bytes_limit"):
                return dataclasses.replace(accelerator, memory_bytes=int(stats["bytes_limit"]))
            return accelerator
    return None


def _memory_stats(device: jax.Device) -> dict:
    try:
        return device.memory_stats() or {}
    except (NotImplementedError, RuntimeError):  # not every backend reports memory
        return {}
