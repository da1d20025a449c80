"""The benchmark's reference rows: the same model in other stacks, timed beside llmjax.

`compare_with_reference` loads a baselines module by path (`--reference=PATH`; the
reference implementations live outside this package, e.g. shared/bench/baselines.py
beside a checkout), checks the config is its fixed model, and times llmjax's step, the
plain-JAX reference step and Hugging Face transformers on eager torch, each framework in
its own spawned process (torch and XLA slow each other down in one) and round-robin, so
background load hits every row alike.
"""

import dataclasses
import importlib
import math
import os
import sys
import time
from typing import Any

import ml_collections
import numpy as np

from llmjax import runtime
from llmjax.models import model_config
from llmjax.training.benchmark import Measurement, prepare_train_step
from llmjax.training.benchmark_products import (
    Product,
    matmul_floor,
    step_products,
    w_time_products,
)


def load_baselines(path: str) -> Any:
    """Import baselines.py by path. Its folder goes on sys.path too: its spawned workers
    import it by name, and spawn hands them the parent's sys.path."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--reference={path}: no such file; give the path of "
                                "shared/bench/baselines.py")
    directory, name = os.path.dirname(path), os.path.splitext(os.path.basename(path))[0]
    if directory not in sys.path:
        sys.path.insert(0, directory)
    module = importlib.import_module(name)
    if os.path.abspath(module.__file__) != path:
        raise ValueError(f"--reference={path}: another module named {name!r} shadows it "
                         f"({module.__file__})")
    return module


def reference_mismatches(config: ml_collections.ConfigDict, baselines: Any) -> list[str]:
    """Config keys whose values differ from the reference model, batch and sequence."""
    ref = baselines.Cfg()
    want = {"model.vocab_size": ref.vocab, "model.embed_dim": ref.d,
            "model.num_layers": ref.layers, "model.num_heads": ref.heads,
            "model.num_kv_heads": ref.heads, "model.mlp_dim": ref.inter,
            "model.rope_theta": ref.rope_theta, "model.norm_eps": ref.eps,
            "model.tie_embeddings": False, "model.dtype": "float32",
            "model.param_dtype": "float32", "seq_len": baselines.SEQ,
            "global_batch_size": baselines.BATCH}
    wrong = []
    for key, value in want.items():
        section, _, leaf = key.rpartition(".")
        have = (config[section] if section else config)[leaf]
        if have != value:
            wrong.append(f"config.{key}={have!r} (reference: {value!r})")
    return wrong


def w_train_llmjax(install: str, config: ml_collections.ConfigDict, packed: bool,
                   warmup: int) -> dict[str, Any]:
    """(Runs in a baselines worker.) Prepares llmjax's step and registers it as `llmjax`,
    the name the worker's timer calls. `install` is the baselines module's name."""
    run_step, info = prepare_train_step(config, packed)
    for _ in range(warmup):
        run_step()
    sys.modules[install]._REG["llmjax"] = run_step
    return info


def _install_in_worker(module_name: str, functions: dict[str, Any]) -> str:
    # A worker looks setup functions up by name in its baselines module; put ours there.
    for name, function in functions.items():
        setattr(sys.modules[module_name], name, function)
    return module_name


class InstallInWorker:
    """Unpickles (in the worker, before the setup call is looked up) to the baselines
    module's name, after adding `functions` ({name: module-level function}) to it."""

    def __init__(self, module_name: str, functions: dict[str, Any]):
        self.module_name, self.functions = module_name, functions

    def __reduce__(self):
        return _install_in_worker, (self.module_name, self.functions)


def peak_rss_bytes(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --levers=NAME,...: llmjax on jemalloc with these XLA:CPU flags, each beside the default.
# "control" adds none: the same program in a second worker, created after the default's.
# On a 2-core VM the first worker a run creates was 10-35% slower than later ones with the
# same program and settings (same threads, affinity and RSS; no swap, no page faults), so a
# lever's row means only as much as it beats the control's.
LEVERS = {
    "control": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn_dot": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "xnn_dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "ynn": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
}
STEP_NAMES = {"llmjax": "llmjax", "jax": "jax", "torch": "hf_eager"}  # what workers register
LABELS = {"llmjax": "llmjax", "jax": "plain JAX reference", "torch": "HF torch eager (sdpa)"}


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    label: str
    kind: str  # llmjax | jax (the plain-JAX reference) | torch (HF transformers, eager)
    env: dict[str, str]  # set in its worker (LD_PRELOAD "" is glibc's malloc)


def reference_rows(levers: list[str]) -> list[list[Row]]:
    """Groups of rows, each group timed round-robin: llmjax, plain JAX and torch on the
    allocator llmjax's commands use (jemalloc, when installed), then one group per lever
    beside that llmjax row, then the three on glibc's malloc. Every ratio compares rows of
    one group, like with like; a group at a time keeps at most three workers of gigabytes
    each alive (all six at once were killed for memory on a 24 GiB machine)."""
    jemalloc = runtime.jemalloc_path()
    allocators = {"glibc": {"LD_PRELOAD": ""}}
    if jemalloc:
        allocators = {"jemalloc": {"LD_PRELOAD": jemalloc, "MALLOC_CONF": runtime.JEMALLOC_CONF},
                      **allocators}
    else:
        print("no jemalloc here (apt-get install libjemalloc2): glibc rows only", flush=True)
    per_allocator = [[Row(f"{kind}_{name}", f"{LABELS[kind]}, {name}", kind, env)
                      for kind in ("llmjax", "jax", "torch")]
                     for name, env in allocators.items()]
    first = per_allocator[0]
    groups = [first]
    flags = os.environ.get("XLA_FLAGS", "")
    for lever in levers:
        if lever not in LEVERS:
            raise ValueError(f"--levers={lever}: choose from {', '.join(LEVERS)}")
        env = {**first[0].env, "XLA_FLAGS": f"{flags} {LEVERS[lever]}".strip()}
        label = f"{first[0].label} + {LEVERS[lever] or 'nothing (control)'}"
        groups.append([first[0], Row(f"llmjax_{lever}", label,
                                     "llmjax", env)])
    return groups + per_allocator[1:]


def compare_with_reference(config: ml_collections.ConfigDict, steps: int, warmup: int,
                           baselines_path: str, packed: bool = True, levers: tuple = ()
                           ) -> tuple[list[Measurement], dict[str, Any]]:
    """The rows of `reference_rows`, each in its own worker process, each group timed
    round-robin `steps` times (a row in two groups is timed in both)."""
    baselines = load_baselines(baselines_path)
    wrong = reference_mismatches(config, baselines)
    if wrong:
        raise ValueError("--reference times baselines.py's fixed model; start from "
                         "configs/bench_reference.py. Differs: " + "; ".join(wrong))
    ref = baselines.Cfg()
    # The same tokens as baselines.py's own train section.
    tokens = np.random.default_rng(1).integers(0, ref.vocab, size=(baselines.BATCH,
                                                                    baselines.SEQ),
                                               dtype=np.int32)
    workers, info, results, rss = {}, {}, {}, {}
    groups = reference_rows(list(levers))
    try:
        for number, group in enumerate(groups):
            for row in group:
                if row.key not in workers:
                    workers[row.key] = baselines.Worker(row.key, env=row.env)
                    info[row.key] = _set_up(workers[row.key], row, baselines, config,
                                            packed, warmup, tokens)
            timers = [(row.key, workers[row.key].timer(STEP_NAMES[row.kind])) for row in group]
            for key, timed in baselines.interleave(timers, steps).items():
                if key in results:  # timed in an earlier group too: keep every timing
                    timed = {**timed, "all": results[key]["all"] + timed["all"]}
                results[key] = timed
            if number == 0:
                floor = time_products(baselines, workers, group, step_products(
                    model_config(config.model), config.global_batch_size, config.seq_len))
            # Close the workers no later group times: each holds gigabytes (on jemalloc,
            # its largest step's), and a 24 GiB machine holds about six.
            later = {row.key for g in groups[number + 1:] for row in g}
            for key in [key for key in workers if key not in later]:
                rss[key] = peak_rss_bytes(workers[key].proc.pid)
                workers.pop(key).close()
    finally:
        for worker in workers.values():
            worker.close()
    labels = {row.key: row.label for group in groups for row in group}
    default = next(iter(labels))
    ours = {**info[default], "matmul_floor": floor}
    if not config.peak_flops_per_device:  # MFU against what this CPU measured, not a nominal
        ours.update(peak_flops_per_device=floor["peak"] / ours["num_devices"],
                    peak_source="the fastest of the step's products on this CPU, measured")
    return [_measurement(labels[key], results[key], info[key], rss.get(key), ours)
            for key in labels], ours


def time_products(baselines: Any, workers: dict[str, Any], group: list[Row],
                  products: list[Product]) -> dict[str, float]:
    """benchmark_products.matmul_floor of `products`, each timed alone in the group's
    plain-JAX and torch workers (after the group's steps: nothing else runs then)."""
    shapes = [(p.batch, p.m, p.k, p.n) for p in products]
    unique = sorted(set(shapes))  # q, k, v and o share theirs: each is timed once
    install = InstallInWorker(baselines.__name__, {"w_time_products": w_time_products})
    timed = {}
    for row in group:
        if row.kind in ("jax", "torch"):
            seconds = workers[row.key].setup("w_time_products", install=install,
                                             kind=row.kind, shapes=unique)["seconds"]
            by_shape = dict(zip(unique, seconds))
            timed[row.kind] = [by_shape[shape] for shape in shapes]
    return matmul_floor(products, timed)


def _set_up(worker: Any, row: Row, baselines: Any, config: ml_collections.ConfigDict,
            packed: bool, warmup: int, tokens: np.ndarray) -> dict[str, Any]:
    start = time.perf_counter()
    worker.setup("w_init", kind="torch" if row.kind == "torch" else "jax")
    if row.kind == "llmjax":
        meta = worker.setup("w_train_llmjax", install=InstallInWorker(
            baselines.__name__, {"w_train_llmjax": w_train_llmjax}),
            config=config, packed=packed, warmup=warmup)
    elif row.kind == "jax":
        meta = worker.setup("w_train_jax", tokens=tokens, variants=("jax",))["jax"]
    else:
        meta = worker.setup("w_train_torch", tokens=tokens, do_compile=False)
        meta = {**meta["hf_eager"], "n_params": meta["n_params"]}
    if warmup > 0 and row.kind != "llmjax":  # one untimed step more, as baselines.py does
        worker.timer(STEP_NAMES[row.kind])()
    print(f"[bench] {row.label} ready in {time.perf_counter() - start:.0f}s", flush=True)
    return meta


def _measurement(label: str, timed: dict[str, Any], meta: dict[str, Any], rss: float | None,
                 ours: dict[str, Any]) -> Measurement:
    memory = dict(meta.get("memory_bytes", {}))
    if meta.get("temp_bytes") is not None:
        memory["temp"] = float(meta["temp_bytes"])
    if rss is not None:
        memory["host_peak_rss"] = rss
    return Measurement(
        name=label, step_seconds=list(timed["all"]), tokens_per_step=ours["tokens_per_step"],
        flops_per_token=ours["flops_per_token"],
        peak_flops=ours["peak_flops_per_device"] * ours["num_devices"],
        compile_seconds=meta.get("compile_seconds", meta.get("lower_compile_s", math.nan)),
        first_step_seconds=meta.get("first_step_seconds", meta.get("first_step_s")),
        first_loss=meta.get("first_loss", math.nan), memory_bytes=memory,
        faults_per_step=timed["minflt_median"],
        cpu_seconds_per_step=(timed["utime_median"], timed["stime_median"]))


def ratio_lines(rows: list[Measurement]) -> list[str]:
    """llmjax's median tok/s over each other row's, per allocator and per lever."""
    by_name = {r.name: r.tokens_per_sec_median for r in rows}
    lines = []
    for allocator in ("jemalloc", "glibc"):
        ours = by_name.get(f"llmjax, {allocator}")
        torch = by_name.get(f"{LABELS['torch']}, {allocator}")
        jax = by_name.get(f"{LABELS['jax']}, {allocator}")
        if ours and torch and jax:
            lines.append(f"{allocator}: llmjax / HF torch eager {ours / torch:.2f}x, "
                         f"llmjax / plain JAX {ours / jax:.2f}x")
    default = rows[0]
    for r in rows:
        if r.name.startswith(default.name + " + "):
            lines.append(f"{r.name[len(default.name) + 3:]}: "
                         f"{r.tokens_per_sec_median / default.tokens_per_sec_median - 1:+.1%} "
                         f"against {default.name} (timed in the same group)")
    return lines
