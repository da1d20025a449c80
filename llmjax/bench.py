"""Benchmark a config's train step: compile time, step time, tokens/s, MFU and memory.

Run:  python -m llmjax.bench --config=configs/NAME.py [--config.KEY=VALUE ...] [--steps=N]
      python -m llmjax.bench --config=configs/bench_reference.py --reference

Times exactly what llmjax.train runs (the sharded state from `state_layout`,
`init_train_state`, `jit_train_step`, the mesh and batch placement of llmjax.sharding)
on random tokens, so it needs no tokenizer or data files: `config.model.vocab_size` must
be set. With --reference, the same model is also timed as the plain-JAX reference step
and as Hugging Face transformers on eager torch from ../shared/bench/baselines.py, each
framework in its own spawned process (torch and XLA slow each other down in one) and
round-robin with ours, so background load hits every row alike. Prints one table.

Imports only jax, flax, optax, numpy, ml_collections and absl (no clu, grain or
TensorFlow), so it runs on a bare accelerator machine.
"""

import dataclasses
import importlib
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from llmjax import optim, sharding
from llmjax.config import validate
from llmjax.flops import peak_flops_per_device
from llmjax.models import flops_per_token, model_config
from llmjax.step import init_train_state, jit_train_step, state_layout

GIB = 2**30
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BASELINES = os.path.join(REPO_ROOT, "..", "shared", "bench", "baselines.py")


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
    """Random tokens in the layout of llmjax.data.pipeline, one document per row.

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
    validate(config)
    if not config.model.vocab_size:
        raise ValueError("config.model.vocab_size is 0: the benchmark uses random tokens and "
                         "no tokenizer, so set it (e.g. --config.model.vocab_size=32000)")
    model_cfg = model_config(config.model)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_axis_rules(config.mesh.rules)
    schedule = optim.learning_rate_schedule(config.optimizer, config.num_train_steps)
    tx = optim.make_optimizer(config.optimizer, config.num_train_steps)
    graphdef, abstract_state, state_shardings = state_layout(model_cfg, tx, config.seed,
                                                             mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    rows = config.global_batch_size // jax.process_count()
    local = random_batch(rows, config.seq_len, model_cfg.vocab_size,
                         config.seed + jax.process_index(), packed)
    peak, peak_source = peak_flops_per_device(config.peak_flops_per_device)

    with sharding.activate(mesh, rules):
        init = jax.jit(lambda: init_train_state(model_cfg, tx, config.seed),
                       out_shardings=state_shardings)
        state = jax.block_until_ready(init())
        batch = sharding.global_batch(local, batch_sharding, config.global_batch_size)
        if not packed:
            batch["segment_ids"] = None  # an empty subtree: the model then builds no mask
        train_step = jit_train_step(graphdef, tx, schedule,
                                    grad_accum_steps=config.grad_accum_steps,
                                    z_loss=config.z_loss, state_shardings=state_shardings,
                                    batch_sharding=batch_sharding)
        start = time.perf_counter()
        compiled = train_step.lower(state, batch).compile()
        compile_seconds = time.perf_counter() - start

    holder = {"state": state}

    def run_step() -> None:
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))
        holder["loss"] = metrics["loss"]

    start = time.perf_counter()
    run_step()
    first_step_seconds = time.perf_counter() - start
    device = jax.devices()[0]
    info = {
        "compile_seconds": compile_seconds,
        "first_step_seconds": first_step_seconds,
        "first_loss": float(holder["loss"]),
        "memory_bytes": _memory_analysis_bytes(compiled),
        "flops_per_token": flops_per_token(model_cfg, config.seq_len),
        "peak_flops_per_device": peak,
        "peak_source": peak_source,
        "num_devices": jax.device_count(),
        "num_params": int(sum(x.size for x in jax.tree.leaves(abstract_state.params))),
        "tokens_per_step": config.global_batch_size * config.seq_len,
        "description": (
            f"{jax.device_count()} x {device.device_kind} ({device.platform}), "
            f"mesh {dict(mesh.shape)}; batch {config.global_batch_size} x seq "
            f"{config.seq_len}; dtype {model_cfg.dtype} (params {model_cfg.param_dtype}), "
            f"scan_layers={model_cfg.scan_layers}, remat={model_cfg.remat_policy}, "
            f"attention={model_cfg.attention_impl}, segment ids {'on' if packed else 'off'}"),
    }
    return run_step, info


def device_peak_bytes() -> float | None:
    """Peak bytes in use on the first local device (GPU/TPU allocators), or None (CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return float(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


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


# ---------------------------------------------------------------------------------------
# --reference: the same model in ../shared/bench/baselines.py, in worker processes.
# ---------------------------------------------------------------------------------------

def load_baselines(path: str) -> Any:
    """Import baselines.py by path. Its folder goes on sys.path too: its spawned workers
    import it by name, and spawn hands them the parent's sys.path."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--baselines={path}: no such file; give the path of "
                                "shared/bench/baselines.py")
    directory, name = os.path.dirname(path), os.path.splitext(os.path.basename(path))[0]
    if directory not in sys.path:
        sys.path.insert(0, directory)
    module = importlib.import_module(name)
    if os.path.abspath(module.__file__) != path:
        raise ValueError(f"--baselines={path}: another module named {name!r} shadows it "
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


def _install_in_worker(module_name: str) -> str:
    # A worker looks setup functions up by name in its baselines module; put ours there.
    sys.modules[module_name].w_train_llmjax = w_train_llmjax
    return module_name


class _InstallInWorker:
    """Unpickles (in the worker, before the setup call is looked up) to the baselines
    module's name, after adding `w_train_llmjax` to that module."""

    def __init__(self, module_name: str):
        self.module_name = module_name

    def __reduce__(self):
        return _install_in_worker, (self.module_name,)


def _peak_rss_bytes(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def compare_with_reference(config: ml_collections.ConfigDict, steps: int, warmup: int,
                           baselines_path: str, packed: bool = True
                           ) -> tuple[list[Measurement], dict[str, Any]]:
    """llmjax, the plain-JAX reference and HF torch eager (and llmjax with mimalloc, if
    installed), each in a worker process, timed round-robin `steps` times."""
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
    labels = {"llmjax": "llmjax", "jax": "plain JAX reference", "torch": "HF torch eager (sdpa)",
              "llmjax_mimalloc": "llmjax + mimalloc"}
    envs = {"llmjax": None, "jax": None, "torch": None}
    mimalloc = baselines.mimalloc_env()
    if mimalloc is not None:
        envs["llmjax_mimalloc"] = mimalloc
    else:
        print("cmeel-mimalloc is not installed: no 'llmjax + mimalloc' row", flush=True)
    workers, info = {}, {}
    try:
        for key, env in envs.items():
            workers[key] = baselines.Worker(key, env=env)
            workers[key].setup("w_init", kind="torch" if key == "torch" else "jax")
        for key in workers:
            start = time.perf_counter()
            if key.startswith("llmjax"):
                info[key] = workers[key].setup(
                    "w_train_llmjax", install=_InstallInWorker(baselines.__name__),
                    config=config, packed=packed, warmup=warmup)
            elif key == "jax":
                info[key] = workers[key].setup("w_train_jax", tokens=tokens,
                                               variants=("jax",))["jax"]
            else:
                meta = workers[key].setup("w_train_torch", tokens=tokens, do_compile=False)
                info[key] = {**meta["hf_eager"], "n_params": meta["n_params"]}
            print(f"[bench] {labels[key]} ready in {time.perf_counter() - start:.0f}s",
                  flush=True)
        step_names = {"llmjax": "llmjax", "llmjax_mimalloc": "llmjax", "jax": "jax",
                      "torch": "hf_eager"}  # what each worker registered
        timers = [(key, workers[key].timer(step_names[key])) for key in workers]
        if warmup > 0:  # one more untimed step each for the references, as baselines.py does
            for key, timer in timers:
                if not key.startswith("llmjax"):
                    timer()
        results = baselines.interleave(timers, steps)
        rss = {key: _peak_rss_bytes(w.proc.pid) for key, w in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()

    ours = info["llmjax"]
    peak_total = ours["peak_flops_per_device"] * ours["num_devices"]
    rows = []
    for key in workers:
        res, meta = results[key], info[key]
        memory = dict(meta.get("memory_bytes", {}))
        if key == "jax" and meta.get("temp_bytes") is not None:
            memory["temp"] = float(meta["temp_bytes"])
        if rss[key] is not None:
            memory["host_peak_rss"] = rss[key]
        compile_seconds = meta.get("compile_seconds", meta.get("lower_compile_s", math.nan))
        rows.append(Measurement(
            name=labels[key], step_seconds=list(res["all"]),
            tokens_per_step=ours["tokens_per_step"], flops_per_token=ours["flops_per_token"],
            peak_flops=peak_total, compile_seconds=compile_seconds,
            first_step_seconds=meta.get("first_step_seconds", meta.get("first_step_s")),
            first_loss=meta.get("first_loss", math.nan), memory_bytes=memory,
            faults_per_step=res["minflt_median"],
            cpu_seconds_per_step=(res["utime_median"], res["stime_median"])))
    return rows, info


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags; defined on demand so that importing this module (tests,
    notebooks) never clashes with llmjax.train's --config."""
    config_flags.DEFINE_config_file("config", None, "Config file to benchmark (configs/NAME.py).",
                                    lock_config=True)
    flags.DEFINE_integer("steps", 5, "Timed steps; the table gives the best and the median.")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after the first (compiling) one.")
    flags.DEFINE_bool("packed", True, "Batches carry segment ids, like the training pipeline's; "
                      "--nopacked leaves them out (plain causal attention, no mask array).")
    flags.DEFINE_bool("reference", False, "Also time baselines.py's plain-JAX and HF torch eager "
                      "steps of the same model, round-robin, each in its own process.")
    flags.DEFINE_string("baselines", DEFAULT_BASELINES, "Path of shared/bench/baselines.py.")


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    if config is None:
        sys.exit("error: give a config: --config=configs/bench_reference.py")
    config_name = FLAGS["config"].config_filename
    try:
        if FLAGS.reference:
            rows, info = compare_with_reference(config, FLAGS.steps, FLAGS.warmup,
                                                FLAGS.baselines, FLAGS.packed)
            info = info["llmjax"]
        else:
            row, info = measure(config, FLAGS.steps, FLAGS.warmup, FLAGS.packed)
            rows = [row]
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(format_table(rows, table_header(config_name, info)))
    losses = ", ".join(f"{r.name} {r.first_loss:.3f}" for r in rows if not math.isnan(r.first_loss))
    print(f"first-step loss (random tokens: about ln vocab = "
          f"{math.log(config.model.vocab_size):.3f}): {losses}", flush=True)


def parse_flags(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        detail = " ".join(str(e).replace("\\n", " ").strip("'\"").split())
        sys.exit(f"error: bad flag or --config override: {detail}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
