"""Timing generation: decode tokens/s at N concurrent sequences, time to first token, and
warm-up (compile) time, each through the engine as a user runs it.

`decode_run` times generating `new_tokens` for `batch` prompts at once (prefill included,
as a caller waits for it); `first_token_run` times one prompt's prefill and first token on
an idle engine. The benchmark command (`python -m llmjax.bench --generate`) times these
beside Hugging Face generate and a plain-JAX KV-cache loop
(llmjax.training.benchmark_reference).
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flax import nnx

from llmjax.inference.engine import Engine
from llmjax.inference.requests import SamplingParams


def decode_run(model: nnx.Module, prompts: np.ndarray, new_tokens: int
               ) -> tuple[Callable[[], list[list[int]]], dict[str, Any]]:
    """(a function that generates `new_tokens` greedy tokens for every row of `prompts`
    [batch, prompt_len] at once and returns them, facts about the engine)."""
    batch, prompt_len = prompts.shape
    engine = Engine(model, max_slots=batch, max_seq_len=prompt_len + new_tokens,
                    prefill_buckets=(prompt_len,))
    warmup = engine.warmup()
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)

    def run() -> list[list[int]]:
        return [r.tokens for r in engine.generate(prompts.tolist(), params)]

    run()
    return run, {"warmup_seconds": warmup, "compilations": engine.compilations,
                 "engine": engine}


def first_token_run(model: nnx.Module, prompt_lens: Sequence[int], vocab_size: int,
                    seed: int = 0) -> tuple[dict[int, Callable[[], None]], dict[str, Any]]:
    """({prompt length: a function that prefills a random prompt of that length and samples
    its first token on an idle engine}, facts about the engine)."""
    rng = np.random.default_rng(seed)
    engine = Engine(model, max_slots=1, max_seq_len=max(prompt_lens) + 1,
                    prefill_buckets=tuple(prompt_lens))
    warmup = engine.warmup()
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    runs = {}
    for length in prompt_lens:
        prompt = rng.integers(3, vocab_size, length).tolist()
        runs[length] = lambda prompt=prompt: engine.generate([prompt], params) and None
        runs[length]()
    return runs, {"warmup_seconds": warmup, "compilations": engine.compilations,
                  "engine": engine}
