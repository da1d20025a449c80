"""Fit check: compile the train step for a config's mesh without allocating the model.

    python -m llmjax.train --config=configs/llama3_8b.py --compile_only --num_devices=64 \
        --accelerator=v5p

prints, per device: parameter, optimizer-state and activation (XLA temporary) bytes,
the FLOPs of the compiled step, and the MFU bound they imply (model FLOPs over compiled
FLOPs: rematerialisation recomputes work that MFU does not count). Without enough real
devices it compiles for simulated CPU devices (`--num_devices`), which gives the
sharding and the sizes of parameters and optimizer state exactly; activation bytes are
those of the CPU compiler and approximate an accelerator's.

With a chip (`--accelerator`, or the device it runs on) it gives a verdict: the layout
fits when its total is within MARGIN of the chip's memory. When it does not, it tries
the memory levers in order of what they cost (`candidate_layouts`: each remat policy from
the configured one to "full", on the configured mesh and then with all devices on FSDP,
each with the fewest microbatches that fit) and prints the first layouts that fit with
their MFU bounds.
"""

import dataclasses
import math
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from llmjax.config import with_overrides
from llmjax.models import flops_per_token
from llmjax.models.attention_kernels import (
    PALLAS_KERNELS,
    attention_bytes_per_layer,
    kernel_platform,
    select_kernel,
)
from llmjax.models.layers import DTYPES
from llmjax.parallel import sharding
from llmjax.training import setup
from llmjax.training.accelerators import GIB, NAMES, Accelerator

# A layout fits when it needs at most this share of the chip: the runtime keeps buffers
# of its own, and activation bytes compiled on CPU devices only approximate the chip's.
MARGIN = 0.9
# Least recompute first: each policy saves fewer activations than the one before it.
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")


def _compile(config: ml_collections.ConfigDict, model_overrides: dict[str, Any]):
    """(the compiled train step, the assembled run) for `config`, allocating nothing."""
    if not config.model.vocab_size and not config.init_from:
        raise ValueError("config.model.vocab_size is 0: the fit check needs the vocabulary "
                         "size (it does not load the tokenizer)")
    # The chip runs the scan over layers one layer an iteration (scan_unroll 0 unrolls it
    # only on a CPU, models.layers.layers_per_iteration): compiled here on CPU devices,
    # the step keeps the chip's loop and the activations it holds.
    if not config.model.get("scan_unroll", 0):
        model_overrides = {"scan_unroll": 1, **model_overrides}
    # The chip's own attention kernel does not compile on CPU devices: XLA's stands in
    # (attention_memory sets the kernel's bytes against its scores), not chunked, the
    # kernel auto picks on a CPU.
    if config.model.get("attention_impl", "auto") == "auto":
        model_overrides = {"attention_impl": "xla", **model_overrides}
    run = setup.assemble(config, model_overrides=model_overrides)
    with sharding.activate(run.mesh, run.rules):
        compiled = run.train_step.lower(*run.abstract_inputs()).compile()
    return compiled, run


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", math.nan))


def _bytes_per_device(tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def measure_memory(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Compile the configured train step; return its per-device bytes and the run."""
    start = time.perf_counter()
    compiled, run = _compile(config, {})
    compile_seconds = time.perf_counter() - start
    state, _, frozen = run.abstract_inputs()
    memory = compiled.memory_analysis()
    return {
        "run": run,
        "devices": run.mesh.size,
        "mesh": dict(run.mesh.shape),
        "parameters": run.num_params,
        "param_bytes": _bytes_per_device((state.params, frozen)),
        "optimizer_bytes": _bytes_per_device(state.opt_state),
        "temp_bytes": memory.temp_size_in_bytes,
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "total_bytes": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                        - memory.alias_size_in_bytes + memory.temp_size_in_bytes),
        "compile_seconds": compile_seconds,
    }


def measure_flops(config: ml_collections.ConfigDict, run: setup.Run) -> dict[str, float]:
    """Model and compiled FLOPs per device per step, and their ratio (the MFU bound)."""
    # XLA's cost analysis counts the body of a loop once (scanned layers, microbatches),
    # so measure one layer's FLOPs from 1- and 2-layer compiles without loops and scale
    # up to the real depth.
    probe = ml_collections.ConfigDict(config.to_dict())
    probe.grad_accum_steps = 1
    one = _flops(_compile(probe, dict(num_layers=1, scan_layers=False))[0])
    two = _flops(_compile(probe, dict(num_layers=2, scan_layers=False))[0])
    compiled_flops = one + (run.model_cfg.num_layers - 1) * (two - one)
    tokens = config.global_batch_size * config.seq_len
    model_flops = flops_per_token(run.model_cfg, config.seq_len) * tokens / run.mesh.size
    return {"model_flops": model_flops, "compiled_flops": compiled_flops,
            "mfu_bound": model_flops / compiled_flops}


def fit_check(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Compile the configured train step; return per-device memory and FLOPs."""
    report = measure_memory(config)
    return {**report, **measure_flops(config, report["run"])}


def attention_memory(config: ml_collections.ConfigDict, run: setup.Run,
                     platform: str) -> dict[str, Any]:
    """The attention kernel `config.model.attention_impl` picks on `platform` for packed
    batches, and the bytes one layer's attention keeps per device with it and with XLA
    (llmjax.models.attention_kernels.attention_bytes_per_layer)."""
    cfg = run.model_cfg
    kernel = select_kernel(cfg.attention_impl, platform, packed=True,
                           sliding_window=getattr(cfg, "sliding_window", 0),
                           dtype=DTYPES[cfg.dtype])
    rows = config.global_batch_size // config.grad_accum_steps
    shape = (rows, config.seq_len, cfg.num_heads, cfg.head_dim)
    local = sharding.mesh_sharding(run.mesh, run.rules,
                                   ("act_batch", "act_length", "act_heads", None),
                                   shape).shard_shape(shape)
    # The Pallas kernels run on whole rows when the length is split (attention_kernels).
    q_length = config.seq_len if kernel in PALLAS_KERNELS else local[1]

    def kept(name):
        return attention_bytes_per_layer(
            name, batch=local[0], q_length=q_length if name == kernel else local[1],
            kv_length=config.seq_len, heads=local[2], head_dim=cfg.head_dim,
            dtype_bytes=jnp.dtype(DTYPES[cfg.dtype]).itemsize)

    return {"kernel": kernel, "platform": platform, "bytes": kept(kernel),
            "xla_bytes": kept("xla")}


def format_report(config: ml_collections.ConfigDict, r: dict[str, Any],
                  accelerator: Accelerator | None = None) -> str:
    """The fit check's table. The attention rows are for `accelerator`'s kernel (else the
    backend's): activation bytes compiled on CPU devices are XLA attention's."""
    platform = (kernel_platform(accelerator.kind_parts[0]) if accelerator
                else jax.default_backend())
    attn = attention_memory(config, r["run"], platform)
    rows = [
        ("mesh", f"{r['mesh']} ({r['devices']} devices), rules {config.mesh.rules}"),
        ("model", f"{r['parameters'] / 1e9:.3f}B parameters, {config.model.dtype} compute, "
                  f"remat {config.model.remat_policy}, scan {config.model.scan_layers}"),
        ("batch", f"{config.global_batch_size} x {config.seq_len} tokens, "
                  f"{config.grad_accum_steps} microbatch(es)"),
        ("parameters / device", f"{r['param_bytes'] / GIB:.2f} GiB"),
        ("optimizer state / device", f"{r['optimizer_bytes'] / GIB:.2f} GiB"),
        ("activations+temp / device", f"{r['temp_bytes'] / GIB:.2f} GiB"),
        ("attention kernel", f"{attn['kernel']} on {platform} "
                             f"(model.attention_impl={config.model.attention_impl})"),
        ("attention / layer / device", f"{_size(attn['bytes'])} kept for the backward "
                                       f"(xla: {_size(attn['xla_bytes'])})"),
        ("total / device", f"{r['total_bytes'] / GIB:.2f} GiB"),
        ("model FLOPs / device / step", f"{r['model_flops'] / 1e12:.1f} TFLOP"),
        ("compiled FLOPs / device / step", f"{r['compiled_flops'] / 1e12:.1f} TFLOP"),
        ("MFU bound (model / compiled)", f"{100 * r['mfu_bound']:.1f}%"),
        ("compile time", f"{r['compile_seconds']:.1f} s"),
    ]
    return _table(rows)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len("compiled FLOPs / device / step"), *(len(k) for k, _ in rows))
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@dataclasses.dataclass(frozen=True)
class Verdict:
    accelerator: Accelerator
    total_bytes: int  # what the layout needs per device

    @property
    def fits(self) -> bool:
        return self.total_bytes <= MARGIN * self.accelerator.memory_bytes

    @property
    def headroom_bytes(self) -> int:
        """The chip's memory left over (negative: short by this much)."""
        return self.accelerator.memory_bytes - self.total_bytes

    def __str__(self) -> str:
        need, have = self.total_bytes, self.accelerator.memory_bytes
        room = self.headroom_bytes
        if self.fits:
            return (f"fits: {_size(need)} of {_size(have)}, headroom {_size(room)} "
                    f"({100 * room / have:.0f}%)")
        short = (f"{_size(-room)} over" if room < 0 else
                 f"headroom {_size(room)} is under the {100 * (1 - MARGIN):.0f}% margin")
        return f"does not fit: {_size(need)} of {_size(have)}, {short}"


def _size(num_bytes: float) -> str:
    if num_bytes >= 0.1 * GIB:
        return f"{num_bytes / GIB:.2f} GiB"
    return f"{num_bytes / 2**20:.2f} MiB"


def candidate_layouts(config: ml_collections.ConfigDict) -> Iterator[list[dict[str, Any]]]:
    """The memory levers, cheapest first: per remat policy (recompute costs FLOPs) and
    mesh (more FSDP costs communication only, so it comes first), the overrides for each
    number of microbatches from the configured one up (one list per pair)."""
    meshes = [{}]
    if config.mesh.data > 1 or config.mesh.tensor > 1:  # more FSDP: shard the state wider
        meshes.append({"mesh.data": 1, "mesh.tensor": 1, "mesh.fsdp": -1})
    policy = config.model.remat_policy
    policies = REMAT_ORDER[REMAT_ORDER.index(policy):] if policy in REMAT_ORDER else (policy,)
    for remat in policies:
        for mesh in meshes:
            remat_override = {} if remat == policy else {"model.remat_policy": remat}
            accums = [n for n in (1, 2, 4, 8, 16, 32, 64, 128)
                      if n >= config.grad_accum_steps and config.global_batch_size % n == 0]
            yield [{**mesh, **remat_override,
                    **({} if n == config.grad_accum_steps else {"grad_accum_steps": n})}
                   for n in accums]


def _batch_shards(config: ml_collections.ConfigDict) -> int:
    """How many ways the batch is split: the rows of a microbatch must divide by it."""
    mesh = sharding.make_mesh(config.mesh)
    spec = sharding.batch_sharding(mesh, sharding.logical_axis_rules(config.mesh.rules))
    return config.global_batch_size // spec.shard_shape((config.global_batch_size, 1))[0]


def search_layouts(config: ml_collections.ConfigDict, accelerator: Accelerator,
                   max_layouts: int = 3, max_compiles: int = 12) -> Iterator[dict[str, Any]]:
    """The first layouts that fit `accelerator`: {overrides, verdict, mfu_bound}, in the
    order of `candidate_layouts`, compiling at most `max_compiles` candidates."""
    found = compiles = 0
    for ladder in candidate_layouts(config):
        for overrides in ladder:
            if not overrides:
                continue  # the configured layout: already measured
            if compiles == max_compiles:
                return
            candidate = with_overrides(config, overrides)
            try:
                if (candidate.global_batch_size // candidate.grad_accum_steps
                        % _batch_shards(candidate)):
                    continue  # a microbatch the batch sharding does not divide
                memory = measure_memory(candidate)
            except ValueError:  # a layout the config's checks refuse
                continue
            compiles += 1
            verdict = Verdict(accelerator, memory["total_bytes"])
            if verdict.fits:
                flops = measure_flops(candidate, memory["run"])
                yield {"overrides": overrides, "verdict": verdict,
                       "mfu_bound": flops["mfu_bound"]}
                found += 1
                if found == max_layouts:
                    return
                break  # more microbatches fit too, and cost more: try the next lever


def verdict_lines(config: ml_collections.ConfigDict, report: dict[str, Any],
                  accelerator: Accelerator | None, source: str) -> Iterator[str]:
    """The verdict on `report` (of fit_check) for `accelerator`, and the layouts that fit
    when it does not: lines to print as they come (the search compiles)."""
    if accelerator is None:
        yield (f"verdict: none ({source} is not a chip of the table); name one with "
               f"--accelerator={'|'.join(NAMES)}")
        return
    verdict = Verdict(accelerator, report["total_bytes"])
    yield _table([("accelerator", f"{accelerator.name}, {_size(accelerator.memory_bytes)} "
                                  f"per chip ({source})"),
                  ("verdict", str(verdict))])
    if verdict.fits:
        return
    yield ("trying the memory levers (more FSDP, remat policies, gradient accumulation) "
           "for layouts that fit:")
    any_found = False
    for layout in search_layouts(config, accelerator):
        any_found = True
        flags = " ".join(f"--config.{k}={v}" for k, v in layout["overrides"].items())
        yield (f"  {flags}\n      {layout['verdict']}, "
               f"MFU bound {100 * layout['mfu_bound']:.1f}%")
    if not any_found:
        yield ("  none of them fits: add devices (--num_devices), shorten seq_len or use "
               "a chip with more memory")
