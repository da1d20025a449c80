"""The benchmark's reference rows: the same model in other stacks, timed beside llmjax.

`compare_with_reference` loads a baselines module by path (`--reference=PATH`; the
reference implementations live outside this package, e.g. shared/bench/baselines.py
beside a checkout), checks the config is its fixed model, and times llmjax's step, the
plain-JAX reference step and Hugging Face transformers on eager torch, each framework in
its own spawned process (torch and XLA slow each other down in one) and round-robin, so
background load hits every row alike.
"""

import importlib
import math
import os
import sys
import time
from typing import Any

import ml_collections
import numpy as np

from llmjax.training.benchmark import Measurement, prepare_train_step


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
                    "w_train_llmjax", install=InstallInWorker(
                        baselines.__name__, {"w_train_llmjax": w_train_llmjax}),
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
        rss = {key: peak_rss_bytes(w.proc.pid) for key, w in workers.items()}
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
