"""Fit check: compile the train step for a config's mesh without allocating the model.

    python -m llmjax.train --config=configs/llama3_8b.py --compile_only --num_devices=64

prints, per device: parameter, optimizer-state and activation (XLA temporary) bytes,
the FLOPs of the compiled step, and the MFU bound they imply (model FLOPs over compiled
FLOPs: rematerialisation recomputes work that MFU does not count). Without enough real
devices it compiles for simulated CPU devices (`--num_devices`), which gives the
sharding and the sizes of parameters and optimizer state exactly; activation bytes are
those of the CPU compiler and approximate an accelerator's.
"""

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from llmjax.models import flops_per_token
from llmjax.parallel import sharding
from llmjax.training import setup


def _compile(config: ml_collections.ConfigDict, model_overrides: dict[str, Any]):
    """(the compiled train step, the assembled run) for `config`, allocating nothing."""
    if not config.model.vocab_size and not config.init_from:
        raise ValueError("config.model.vocab_size is 0: the fit check needs the vocabulary "
                         "size (it does not load the tokenizer)")
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


def fit_check(config: ml_collections.ConfigDict) -> dict[str, float]:
    """Compile the configured train step; return per-device memory and FLOPs."""
    start = time.perf_counter()
    compiled, run = _compile(config, {})
    compile_seconds = time.perf_counter() - start
    state, _, frozen = run.abstract_inputs()
    memory = compiled.memory_analysis()

    # XLA's cost analysis counts the body of a loop once (scanned layers, microbatches),
    # so measure one layer's FLOPs from 1- and 2-layer compiles without loops and scale
    # up to the real depth.
    probe = ml_collections.ConfigDict(config.to_dict())
    probe.grad_accum_steps = 1
    one = _flops(_compile(probe, dict(num_layers=1, scan_layers=False))[0])
    two = _flops(_compile(probe, dict(num_layers=2, scan_layers=False))[0])
    cfg, mesh = run.model_cfg, run.mesh
    compiled_flops = one + (cfg.num_layers - 1) * (two - one)
    tokens = config.global_batch_size * config.seq_len
    model_flops = flops_per_token(cfg, config.seq_len) * tokens / mesh.size
    return {
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "parameters": run.num_params,
        "param_bytes": _bytes_per_device((state.params, frozen)),
        "optimizer_bytes": _bytes_per_device(state.opt_state),
        "temp_bytes": memory.temp_size_in_bytes,
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "total_bytes": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                        - memory.alias_size_in_bytes + memory.temp_size_in_bytes),
        "model_flops": model_flops,
        "compiled_flops": compiled_flops,
        "mfu_bound": model_flops / compiled_flops,
        "compile_seconds": compile_seconds,
    }


def format_report(config: ml_collections.ConfigDict, r: dict[str, Any]) -> str:
    gib = 2.0**30
    rows = [
        ("mesh", f"{r['mesh']} ({r['devices']} devices), rules {config.mesh.rules}"),
        ("model", f"{r['parameters'] / 1e9:.3f}B parameters, {config.model.dtype} compute, "
                  f"remat {config.model.remat_policy}, scan {config.model.scan_layers}"),
        ("batch", f"{config.global_batch_size} x {config.seq_len} tokens, "
                  f"{config.grad_accum_steps} microbatch(es)"),
        ("parameters / device", f"{r['param_bytes'] / gib:.2f} GiB"),
        ("optimizer state / device", f"{r['optimizer_bytes'] / gib:.2f} GiB"),
        ("activations+temp / device", f"{r['temp_bytes'] / gib:.2f} GiB"),
        ("total / device", f"{r['total_bytes'] / gib:.2f} GiB"),
        ("model FLOPs / device / step", f"{r['model_flops'] / 1e12:.1f} TFLOP"),
        ("compiled FLOPs / device / step", f"{r['compiled_flops'] / 1e12:.1f} TFLOP"),
        ("MFU bound (model / compiled)", f"{100 * r['mfu_bound']:.1f}%"),
        ("compile time", f"{r['compile_seconds']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
