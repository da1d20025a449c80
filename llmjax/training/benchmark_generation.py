"""Generation beside other stacks: llmjax's engine, Hugging Face generate and the plain-JAX
KV-cache loop of a baselines file, on the same model and weights, in one run.

    python -m llmjax.bench --generate --reference=../shared/bench/baselines.py

The reference model (baselines.Cfg) is built by transformers in the torch worker with the
baselines' seed and saved as safetensors, which the plain-JAX worker (from the same
weights) and llmjax's worker (llmjax.hf.from_pretrained) read. Each stack runs in its own
spawned process, and every timed call is interleaved round-robin with the others'. Rows:
decode tokens/s with 1, 8 and 32 sequences at once (prompt baselines.PROMPT, then
baselines.NEW_TOKENS greedy tokens, prefill included), time to first token for a 64- and
a 512-token prompt on an idle engine, and warm-up (compile) time; llmjax with int8
weights (and with int8 inputs too, w8a8) as rows of their own, and HF generate with
torch's dynamic int8 quantization (w8a8's numerics) beside them; llama.cpp from the same
weights as GGUF, when llama-cpp-python is installed (llmjax.training.benchmark_llamacpp).
Under the table, the bound memory puts on one sequence: the weights a step reads over the
read bandwidth measured in llmjax's worker.
"""

import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from llmjax.training import benchmark_llamacpp
from llmjax.training.benchmark import best_seconds
from llmjax.training.benchmark_reference import InstallInWorker, load_baselines, peak_rss_bytes

BATCHES = (1, 8, 32)
FIRST_TOKEN_LENGTHS = (64, 512)


def _reference_hf_model(baselines: Any, seed: int) -> Any:
    """The reference HF model w_decode_torch builds, set to generate exactly what is asked."""
    model = baselines.make_hf_model(baselines.Cfg(), seed=seed).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    return model


def _hf_greedy(model: Any, prompt: np.ndarray, tokens: int) -> Callable[[], np.ndarray]:
    """A function that generates `tokens` greedy tokens after `prompt` [batch, length] and
    returns them [batch, tokens] (the prompt is converted once, outside the timed call)."""
    import torch

    ids = torch.from_numpy(prompt.astype(np.int64))

    def generate() -> np.ndarray:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=tokens, do_sample=False)
        return out[:, ids.shape[1]:].numpy().copy()

    return generate


def w_hf_first_token(install: str, seed: int, save_to: str,
                     prompts: dict[int, np.ndarray]) -> dict[str, Any]:
    """(In the torch worker.) Save the reference HF model (the one w_decode_torch builds)
    to `save_to`, and register `hf_ttft{L}`: prefill and one greedy token."""
    baselines = sys.modules[install]
    model = _reference_hf_model(baselines, seed)
    model.save_pretrained(save_to)
    for length, prompt in prompts.items():
        first = _hf_greedy(model, prompt, 1)
        first()
        baselines._REG[f"hf_ttft{length}"] = first
    return {}


def w_hf_int8(install: str, seed: int, prompts: dict[int, np.ndarray],
              first: dict[int, np.ndarray], new_tokens: int) -> dict[str, Any]:
    """(In the torch worker.) The reference HF model with torch's dynamic int8
    quantization of every Linear (int8 weights with a scale per output channel, inputs
    quantized per call: w8a8's numerics), registered as `hf_int8_b{B}` and
    `hf_int8_ttft{L}`; its greedy outputs under the name "hf_int8_outputs"."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    baselines = sys.modules[install]
    model = quantize_dynamic(_reference_hf_model(baselines, seed),
                             {torch.nn.Linear: per_channel_dynamic_qconfig})
    outputs = {}
    for batch, prompt in prompts.items():
        generate = _hf_greedy(model, prompt, new_tokens)

        def run(generate=generate, batch=batch):
            outputs[f"hf_int8_b{batch}"] = generate()

        run()
        baselines._REG[f"hf_int8_b{batch}"] = run
    for length, prompt in first.items():
        baselines._REG[f"hf_int8_ttft{length}"] = _hf_greedy(model, prompt, 1)
        baselines._REG[f"hf_int8_ttft{length}"]()
    baselines._REG["hf_int8_outputs"] = lambda: outputs
    return {}


def w_jax_first_token(install: str, weights: dict[str, np.ndarray],
                      prompts: dict[int, np.ndarray]) -> dict[str, Any]:
    """(In the plain-JAX worker.) Register `jax_ttft{L}`: the reference's jitted generate
    with one new token (its prefill and first token)."""
    import jax
    import jax.numpy as jnp

    baselines = sys.modules[install]
    cfg = baselines.Cfg()
    *_, generate = baselines.jax_model_fns(cfg)
    params = baselines.hf_to_jax_params(weights, cfg)
    for length, prompt in prompts.items():
        tokens = jnp.asarray(prompt)
        compiled = generate.lower(params, tokens, new_tokens=1).compile()
        baselines._REG[f"jax_ttft{length}"] = (
            lambda c=compiled, t=tokens: jax.block_until_ready(c(params, t)))
        baselines._REG[f"jax_ttft{length}"]()
    return {}


def w_generate_llmjax(install: str, hf_dir: str, prompts: dict[int, np.ndarray],
                      first_token_lengths: tuple[int, ...], new_tokens: int
                      ) -> dict[str, Any]:
    """(In llmjax's worker.) Register `llmjax_b{B}`, `llmjax_ttft{L}` and the same for
    each quantize mode (`llmjax_int8_b{B}`, `llmjax_w8a8_ttft{L}`, ...); return the greedy
    outputs, warm-up seconds and compilations."""
    import jax

    from llmjax import hf
    from llmjax.inference import benchmark, quantize

    registry = sys.modules[install]._REG
    model = hf.from_pretrained(hf_dir)
    info: dict[str, Any] = {"outputs": {}, "warmup_seconds": {}, "weight_bytes": {},
                            "streamed_bytes": {}, "read_bandwidth": read_bandwidth()}
    for mode, name in (("none", "llmjax"), ("int8", "llmjax_int8"), ("w8a8", "llmjax_w8a8")):
        variant = quantize.quantize_model(model, mode)
        info["weight_bytes"][name] = quantize.weight_bytes(variant)
        # A step reads every weight once, but of an untied embedding table one row a token.
        table = 0 if model.cfg.tie_embeddings else quantize.array_bytes(
            variant.embed.get_value())
        info["streamed_bytes"][name] = info["weight_bytes"][name] - table
        for batch, prompt in prompts.items():
            run, facts = benchmark.decode_run(variant, prompt, new_tokens)
            registry[f"{name}_b{batch}"] = run
            info["outputs"][f"{name}_b{batch}"] = np.array(run())
            info["warmup_seconds"][f"{name}_b{batch}"] = facts["warmup_seconds"]
            facts["engine"].close()
        runs, facts = benchmark.first_token_run(variant, first_token_lengths,
                                                model.cfg.vocab_size)
        facts["engine"].close()
        for length, run in runs.items():
            registry[f"{name}_ttft{length}"] = run
        info["warmup_seconds"][f"{name}_ttft"] = facts["warmup_seconds"]
    # From here on every compilation is one a timed call caused: there should be none.
    compilations = [0]

    def count(event: str, duration: float, **kwargs: Any) -> None:
        compilations[0] += event == "/jax/core/compile/backend_compile_duration"

    jax.monitoring.register_event_duration_secs_listener(count)
    registry["llmjax_compilations"] = lambda: compilations[0]
    return info


def read_bandwidth(gib: int = 1) -> float:
    """Bytes/s at which this machine streams weights from memory: the best of five jitted
    products of a `gib` GiB float32 matrix with a vector (one read of the matrix each)."""
    import jax
    import jax.numpy as jnp

    matrix = jnp.ones((gib * 2**28 // 4096, 4096), jnp.float32)
    vector = jnp.ones((4096,), jnp.float32)
    product = jax.jit(jnp.matmul)
    return matrix.nbytes / best_seconds(lambda: product(matrix, vector).block_until_ready(), 5)


def save_reference_model(baselines_path: str, directory: str, seed: int = 7) -> str:
    """The reference model (baselines.Cfg, built by transformers with `seed`) as a Hugging
    Face directory any llmjax command takes, with a byte-level BPE of its vocabulary size
    trained on the bundled plays (the server needs a tokenizer; its texts mean nothing)."""
    from llmjax.data.sources import read_documents
    from llmjax.data.tokenizer import save_trained, train_bpe

    baselines = load_baselines(baselines_path)
    cfg = baselines.Cfg()
    # The tokenizer first: save_trained renames its files into place as `directory`.
    save_trained(train_bpe(read_documents("bundled:shakespeare"), cfg.vocab), directory)
    baselines.make_hf_model(cfg, seed=seed).save_pretrained(directory)
    return directory


def compare_generation(baselines_path: str, reps: int) -> tuple[str, dict[str, Any]]:
    """Run every stack's generation, interleaved `reps` times; (the table, the numbers)."""
    baselines = load_baselines(baselines_path)
    cfg, new_tokens = baselines.Cfg(), baselines.NEW_TOKENS
    rng = np.random.default_rng(2)
    prompts = {b: rng.integers(3, cfg.vocab, (b, baselines.PROMPT), dtype=np.int32)
               for b in BATCHES}
    first = {n: rng.integers(3, cfg.vocab, (1, n), dtype=np.int32) for n in FIRST_TOKEN_LENGTHS}
    install = InstallInWorker(baselines.__name__, {
        "w_hf_first_token": w_hf_first_token, "w_hf_int8": w_hf_int8,
        "w_jax_first_token": w_jax_first_token,
        "w_generate_llmjax": w_generate_llmjax,
        "w_generate_llamacpp": benchmark_llamacpp.w_generate_llamacpp})
    workers: dict[str, Any] = {}
    hf_dir = tempfile.mkdtemp(prefix="llmjax-bench-generate-")
    llamacpp_missing = benchmark_llamacpp.available()
    kinds = [("torch", "torch"), ("jax", "jax"), ("llmjax", "jax")]
    if llamacpp_missing is None:
        kinds.append(("llamacpp", "torch"))  # "torch": the worker that imports no JAX
    try:
        for key, kind in kinds:
            workers[key] = baselines.Worker(key)
            workers[key].setup("w_init", kind=kind)
        start = time.perf_counter()
        workers["torch"].setup("w_decode_torch", seed=7, prompts=prompts)
        workers["torch"].setup("w_hf_first_token", install=install, seed=7, save_to=hf_dir,
                               prompts=first)
        workers["torch"].setup("w_hf_int8", install=install, seed=7, prompts=prompts,
                               first=first, new_tokens=new_tokens)
        weights = workers["torch"].call("weights")
        workers["jax"].setup("w_decode_jax", weights=weights, prompts=prompts)
        workers["jax"].setup("w_jax_first_token", install=install, weights=weights,
                             prompts=first)
        print(f"[bench] references ready in {time.perf_counter() - start:.0f}s", flush=True)
        start = time.perf_counter()
        ours = workers["llmjax"].setup("w_generate_llmjax", install=install, hf_dir=hf_dir,
                                       prompts=prompts, first_token_lengths=FIRST_TOKEN_LENGTHS,
                                       new_tokens=new_tokens)
        print(f"[bench] llmjax ready in {time.perf_counter() - start:.0f}s", flush=True)
        outputs = {**{f"hf_b{b}": o for b, o in workers["torch"].call("outputs").items()},
                   **{f"jax_b{b}": o for b, o in workers["jax"].call("outputs").items()},
                   **workers["torch"].call("hf_int8_outputs"),
                   **ours["outputs"]}
        rows = [("hf", "torch"), ("hf_int8", "torch"), ("jax", "jax"), ("llmjax", "llmjax"),
                ("llmjax_int8", "llmjax"), ("llmjax_w8a8", "llmjax")]
        if "llamacpp" in workers:
            llamacpp = workers["llamacpp"].setup(
                "w_generate_llamacpp", install=install, hf_dir=hf_dir, prompts=prompts,
                first=first, new_tokens=new_tokens)
            print(f"[bench] llama.cpp ready (GGUF written in "
                  f"{llamacpp['convert_seconds']:.1f}s)", flush=True)
            outputs.update(llamacpp["outputs"])
            rows.append(("llamacpp", "llamacpp"))
        timers = [(f"{name}_b{b}", workers[w].timer(f"{name}_b{b}"))
                  for b in BATCHES for name, w in rows]
        timers += [(f"{name}_ttft{n}", workers[w].timer(f"{name}_ttft{n}"))
                   for n in FIRST_TOKEN_LENGTHS for name, w in rows]
        results = baselines.interleave(timers, reps)
        ours["timed_compilations"] = workers["llmjax"].call("llmjax_compilations")
        rss = {key: peak_rss_bytes(w.proc.pid) for key, w in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()
    numbers = {"results": results, "outputs": outputs, "llmjax": ours, "rss": rss,
               "new_tokens": new_tokens, "prompt": baselines.PROMPT,
               "left_out": llamacpp_missing}
    return format_table(numbers), numbers


def _agreement(outputs: dict[str, np.ndarray], name: str, reference: str) -> float:
    """Share of greedy tokens equal to the reference's before the first difference."""
    same = total = 0
    for b in BATCHES:
        ours, theirs = np.asarray(outputs[f"{name}_b{b}"]), np.asarray(outputs[f"{reference}_b{b}"])
        for row, other in zip(ours, theirs):
            differs = np.nonzero(row != other)[0]
            same += len(row) if not len(differs) else int(differs[0])
            total += len(row)
    return same / total


def format_table(numbers: dict[str, Any]) -> str:
    results, new_tokens = numbers["results"], numbers["new_tokens"]
    labels = {"hf": "HF transformers generate (torch eager)",
              "hf_int8": "HF generate, torch dynamic int8 (w8a8)",
              "jax": "plain JAX KV-cache loop",
              "llmjax": "llmjax engine", "llmjax_int8": "llmjax engine, int8 weights",
              "llmjax_w8a8": "llmjax engine, w8a8 (int8 weights and inputs)",
              "llamacpp": "llama.cpp (llama-cpp-python, fp32 GGUF)"}
    labels = {name: label for name, label in labels.items() if f"{name}_b1" in results}
    header = ["implementation", *(f"tok/s @{b}" for b in BATCHES),
              *(f"TTFT ms @{n}" for n in FIRST_TOKEN_LENGTHS), "warm-up s @8", "greedy = HF"]
    warmups = numbers["llmjax"]["warmup_seconds"]
    lines = []
    for name, label in labels.items():
        rates = [b * new_tokens / statistics.median(results[f"{name}_b{b}"]["all"])
                 for b in BATCHES]
        ttft = [1000 * statistics.median(results[f"{name}_ttft{n}"]["all"])
                for n in FIRST_TOKEN_LENGTHS]
        warm = warmups.get(f"{name}_b8", math.nan)
        agree = 1.0 if name == "hf" else _agreement(numbers["outputs"], name, "hf")
        lines.append([label, *(f"{r:,.0f}" for r in rates), *(f"{t:,.0f}" for t in ttft),
                      "-" if math.isnan(warm) else f"{warm:.1f}", f"{100 * agree:.0f}%"])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(  # noqa: E731
        [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])])
    rule = "-" * len(fmt(header))
    speeds = []
    others = {"hf": "HF", "hf_int8": "HF int8", "jax": "plain JAX", "llamacpp": "llama.cpp"}
    for ours_name, ours_label in (("llmjax", "llmjax"), ("llmjax_w8a8", "llmjax w8a8")):
        if ours_name not in labels:
            continue
        ratios = []
        for b in BATCHES:
            ours = statistics.median(results[f"{ours_name}_b{b}"]["all"])
            ratios.append(f"@{b}: " + ", ".join(
                f"{statistics.median(results[f'{name}_b{b}']['all']) / ours:.2f}x {label}"
                for name, label in others.items() if name in labels))
        speeds.append(f"{ours_label} decode speed " + "; ".join(ratios))
    bytes_ = numbers["llmjax"]["weight_bytes"]
    bandwidth, streamed = numbers["llmjax"]["read_bandwidth"], numbers["llmjax"]["streamed_bytes"]
    ceilings = ", ".join(f"{label} {bandwidth / streamed[name]:,.0f}" for name, label in (
        ("llmjax", "fp32"), ("llmjax_int8", "int8")))
    return "\n".join([
        f"generation: prompt {numbers['prompt']} + {new_tokens} greedy tokens per sequence "
        "(medians of interleaved runs); TTFT: prefill + first token, idle engine",
        rule, fmt(header), rule, *map(fmt, lines), rule,
        *speeds,
        f"weights: {bytes_['llmjax'] / 2**20:.1f} MiB fp32, {bytes_['llmjax_int8'] / 2**20:.1f} "
        f"MiB int8 ({100 * bytes_['llmjax_int8'] / bytes_['llmjax']:.0f}%); compilations "
        f"during the timed runs: {numbers['llmjax']['timed_compilations']}",
        f"memory read {bandwidth / 1e9:.1f} GB/s (a 1 GiB matrix-vector product); a decode "
        "step reads every weight once (an untied embedding table: one row), so one sequence "
        f"is capped at tok/s: {ceilings}",
        *([numbers["left_out"]] if numbers.get("left_out") else [])])
