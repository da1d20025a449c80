"""Timing a config's train step: compile time, step time, tokens/s, MFU and memory.

`measure` times exactly what llmjax.train runs (llmjax.training.setup: the assembled run,
its initial state and jitted step, the mesh and batch placement) on random tokens, so it
needs no tokenizer or data files: `config.model.vocab_size` must be set. The command is
`python -m llmjax.bench`; llmjax.training.benchmark_reference times other stacks beside it.

Imports only jax, flax, optax, numpy, ml_collections and absl (no grain or
TensorFlow), so it runs on a bare accelerator machine.
"""

import dataclasses
import math
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from llmjax.models import flops_per_token
from llmjax.models.layers import layers_per_iteration
from llmjax.parallel import sharding
from llmjax.training import setup
from llmjax.training.flops import cpu_description, peak_flops_per_device

GIB = 2**30


@dataclasses.dataclass
class Measurement:
    """Timings of one implementation of the train step: one row of the table."""

    name: str
    step_seconds: list[float]  # each timed step, blocked until its results are ready
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float  # of all devices together
    compile_seconds: float = math.nan  # lower + compile; nan where nothing is compiled ahead
    first_step_seconds: float = math.nan
    first_loss: float = math.nan
    memory_bytes: dict[str, float] = dataclasses.field(default_factory=dict)
    faults_per_step: float = math.nan  # minor page faults of the process, median per step
    cpu_seconds_per_step: tuple[float, float] = (math.nan, math.nan)  # user, system (median)

    @property
    def best_seconds(self) -> float:
        return min(self.step_seconds)

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def tokens_per_sec_best(self) -> float:
        return self.tokens_per_step / self.best_seconds

    @property
    def tokens_per_sec_median(self) -> float:
        return self.tokens_per_step / self.median_seconds

    @property
    def mfu_best(self) -> float:
        return self.tokens_per_sec_best * self.flops_per_token / self.peak_flops

    @property
    def mfu_median(self) -> float:
        return self.tokens_per_sec_median * self.flops_per_token / self.peak_flops


def random_batch(rows: int, seq_len: int, vocab_size: int, seed: int,
                 packed: bool = True) -> dict[str, np.ndarray]:
    """Random tokens in the layout of llmjax.data.packing, one document per row.

    Each array is [rows, seq_len] int32. `packed=False` leaves out `segment_ids`.
    """
    tokens = np.random.default_rng(seed).integers(0, vocab_size, (rows, seq_len + 1),
                                                  dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "positions": np.tile(np.arange(seq_len, dtype=np.int32), (rows, 1)),
             "loss_mask": np.ones((rows, seq_len), np.int32)}
    if packed:
        batch["segment_ids"] = np.ones((rows, seq_len), np.int32)
    return batch


def _memory_analysis_bytes(compiled: Any) -> dict[str, float]:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    return {name: float(getattr(analysis, f"{name}_size_in_bytes"))
            for name in ("temp", "argument", "output", "alias")
            if getattr(analysis, f"{name}_size_in_bytes", None) is not None}


def prepare_train_step(config: ml_collections.ConfigDict,
                       packed: bool = True) -> tuple[Callable[[], None], dict[str, Any]]:
    """llmjax's train step for `config` on a random batch: compiled, and run once.

    Returns a function that runs one more step and blocks until it is done, and a dict
    with compile_seconds (lower + compile), first_step_seconds, first_loss,
    memory_bytes (XLA's memory analysis: temp, argument, output), flops_per_token,
    peak_flops_per_device, peak_source, num_devices, num_params, tokens_per_step,
    and a description of the run.
    """
    if not config.model.vocab_size:
        raise ValueError("config.model.vocab_size is 0: the benchmark uses random tokens and "
                         "no tokenizer, so set it (e.g. --config.model.vocab_size=32000)")
    run = setup.assemble(config)
    model_cfg = run.model_cfg
    rows = config.global_batch_size // jax.process_count()
    local = random_batch(rows, config.seq_len, model_cfg.vocab_size,
                         config.seed + jax.process_index(), packed)
    peak, peak_source = peak_flops_per_device(config.peak_flops_per_device)

    with sharding.activate(run.mesh, run.rules):
        frozen = setup.frozen_weights(run)
        state = jax.block_until_ready(setup.initial_state(run, frozen))
        batch = sharding.global_batch(local, run.batch_sharding, config.global_batch_size)
        if not packed:
            batch["segment_ids"] = None  # an empty subtree: the model then builds no mask
        start = time.perf_counter()
        compiled = run.train_step.lower(state, batch, frozen).compile()
        compile_seconds = time.perf_counter() - start

    holder = {"state": state}

    def run_step() -> None:
        holder["state"], metrics = compiled(holder["state"], batch, frozen)
        jax.block_until_ready((holder["state"], metrics))
        holder["loss"] = metrics["loss"]

    start = time.perf_counter()
    run_step()
    first_step_seconds = time.perf_counter() - start
    device = jax.devices()[0]
    unroll = layers_per_iteration(model_cfg.scan_unroll, model_cfg.num_layers)
    scan_note = f" ({unroll} layers an iteration)" if model_cfg.scan_layers else ""
    info = {
        "compile_seconds": compile_seconds,
        "first_step_seconds": first_step_seconds,
        "first_loss": float(holder["loss"]),
        "memory_bytes": _memory_analysis_bytes(compiled),
        "flops_per_token": flops_per_token(model_cfg, config.seq_len),
        "peak_flops_per_device": peak,
        "peak_source": peak_source,
        "num_devices": jax.device_count(),
        "num_params": run.num_params,
        "tokens_per_step": config.global_batch_size * config.seq_len,
        "description": (
            f"{jax.device_count()} x {device.device_kind} ({device.platform}"
            f"{': ' + cpu_description() if device.platform == 'cpu' else ''}), "
            f"mesh {dict(run.mesh.shape)}; batch {config.global_batch_size} x seq "
            f"{config.seq_len}; dtype {model_cfg.dtype} (params {model_cfg.param_dtype}), "
            f"scan_layers={model_cfg.scan_layers}{scan_note}, remat={model_cfg.remat_policy}, "
            f"attention={model_cfg.attention_impl}, segment ids {'on' if packed else 'off'}"),
    }
    return run_step, info


def device_peak_bytes() -> float | None:
    """Peak bytes in use on the first local device (GPU/TPU allocators), or None (CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return float(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def best_seconds(run: Callable[[], Any], reps: int) -> float:
    """The least wall time of `reps` calls of `run` (which blocks until its work is done),
    after one untimed call (compiling, warming buffers)."""
    run()
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure(config: ml_collections.ConfigDict, steps: int, warmup: int = 1,
            packed: bool = True, name: str = "llmjax") -> tuple[Measurement, dict[str, Any]]:
    """Compile and time llmjax's train step in this process: `warmup` untimed steps after
    the first, then `steps` timed ones. Returns the row and prepare_train_step's info."""
    if steps < 1:
        raise ValueError(f"--steps={steps} must be at least 1")
    run_step, info = prepare_train_step(config, packed)
    for _ in range(warmup):
        run_step()
    seconds, faults, user, system = [], [], [], []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        run_step()
        seconds.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - before.ru_minflt)
        user.append(after.ru_utime - before.ru_utime)
        system.append(after.ru_stime - before.ru_stime)
    memory = dict(info["memory_bytes"])
    peak_device = device_peak_bytes()
    if peak_device is not None:
        memory["device_peak"] = peak_device
    memory["host_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    row = Measurement(
        name=name, step_seconds=seconds, tokens_per_step=info["tokens_per_step"],
        flops_per_token=info["flops_per_token"],
        peak_flops=info["peak_flops_per_device"] * info["num_devices"],
        compile_seconds=info["compile_seconds"],
        first_step_seconds=info["first_step_seconds"], first_loss=info["first_loss"],
        memory_bytes=memory, faults_per_step=statistics.median(faults),
        cpu_seconds_per_step=(statistics.median(user), statistics.median(system)))
    return row, info


def _memory_note(memory: dict[str, float]) -> str:
    labels = (("temp", "XLA temp"), ("argument", "args"), ("output", "out"),
              ("device_peak", "device peak"), ("host_peak_rss", "peak RSS"))
    parts = [f"{label} {memory[key] / GIB:.2f}" for key, label in labels if key in memory]
    return ", ".join(parts) or "-"


def format_table(rows: list[Measurement], header: str = "") -> str:
    """The rows as a fixed-width table (memory in GiB), under `header`."""
    def num(x: float, fmt: str) -> str:
        return "-" if x is None or math.isnan(x) else format(x, fmt)

    columns = ("implementation", "tok/s best", "tok/s median", "step s best/med",
               "MFU best/med", "compile s", "1st step s", "faults/step", "cpu usr/sys s",
               "memory GiB")
    lines = []
    for r in rows:
        user, system = r.cpu_seconds_per_step
        lines.append((
            r.name, num(r.tokens_per_sec_best, ",.0f"), num(r.tokens_per_sec_median, ",.0f"),
            f"{num(r.best_seconds, '.3f')}/{num(r.median_seconds, '.3f')}",
            f"{num(100 * r.mfu_best, '.1f')}/{num(100 * r.mfu_median, '.1f')}%",
            num(r.compile_seconds, ".1f"), num(r.first_step_seconds, ".1f"),
            num(r.faults_per_step, ",.0f"), f"{num(user, '.1f')}/{num(system, '.1f')}",
            _memory_note(r.memory_bytes)))
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(columns)]

    def fmt(cells):
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:-1], widths[1:-1])]
        return "  ".join([first, *rest, cells[-1]])

    rule = "-" * len(fmt(columns))
    out = [header] if header else []
    out += [rule, fmt(columns), rule, *map(fmt, lines), rule]
    return "\n".join(out)


def table_header(config_name: str, info: dict[str, Any]) -> str:
    peak = info["peak_flops_per_device"]
    return (f"llmjax.bench {config_name}: {info['num_params']:,} parameters; "
            f"{info['description']}\n"
            f"{info['tokens_per_step']:,} tokens/step; FLOPs/token "
            f"{info['flops_per_token'] / 1e6:,.1f}M (llmjax.models.flops_per_token: 6 x matmul "
            f"params + attention); MFU peak {peak / 1e9:,.1f} GFLOP/s x {info['num_devices']} "
            f"device(s) ({info['peak_source']})")
