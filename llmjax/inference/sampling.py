"""Sampling text from a model: a plain loop that reruns the model over a fixed buffer.

Each new token costs one full forward over `len(prompt) + max_new_tokens` positions;
that is fine for the short samples printed after training. (A KV-cache decoder is a
later piece of work.)
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def sample_tokens(graphdef: nnx.GraphDef, params: Any, prompt: list[int], *,
                  max_new_tokens: int, temperature: float, top_k: int, seed: int) -> list[int]:
    """prompt ids -> prompt + `max_new_tokens` sampled ids (temperature 0: greedy)."""
    if not prompt:
        raise ValueError("sampling needs a prompt of at least one token (e.g. the BOS id)")
    start, total = len(prompt), len(prompt) + max_new_tokens
    buffer = jnp.zeros((1, total), jnp.int32).at[0, :start].set(jnp.asarray(prompt, jnp.int32))

    @jax.jit
    def run(params, buffer, key):
        model = nnx.merge(graphdef, params)

        def body(t, carry):
            tokens, key = carry
            logits = model(tokens)[0, t - 1]  # causal: positions >= t do not matter
            key, subkey = jax.random.split(key)
            if temperature == 0:
                token = jnp.argmax(logits)
            else:
                logits = logits / temperature
                if top_k:
                    kth = jax.lax.top_k(logits, top_k)[0][-1]
                    logits = jnp.where(logits < kth, -jnp.inf, logits)
                token = jax.random.categorical(subkey, logits)
            return tokens.at[0, t].set(token.astype(jnp.int32)), key

        return jax.lax.fori_loop(start, total, body, (buffer, key))[0]

    out = run(params, buffer, jax.random.key(seed))
    return [int(t) for t in jax.device_get(out)[0]]
