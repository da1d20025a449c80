"""The engine's compiled functions: pure functions of (parameters, arrays), each compiled
once at warm-up (llmjax.inference.engine) and never again.

    prefill   one prompt padded to a bucket -> its own cache, hidden states, first token
    score     a prefilled prompt's hidden states -> each prompt token's logprob
    insert    a prefilled cache -> one slot's rows of the decode cache
    generate  one token for every slot, the decode cache updated in place
    set_rows  newly admitted slots' tokens and positions into the decode inputs

`graphdef` (the model's structure) is bound with functools.partial before jitting.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.inference import sampling

TOP_N = 20  # alternatives computed per token (OpenAI's top_logprobs maximum)
SCORE_CHUNK = 64  # prompt positions whose [chunk, vocab] logits exist at once


def new_cache(graphdef: nnx.GraphDef, params: Any, slots: int, length: int) -> Any:
    return nnx.merge(graphdef, params).init_cache(slots, length)


def prefill(graphdef: nnx.GraphDef, params: Any, tokens: jax.Array, length: jax.Array,
            temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, seed: jax.Array
            ) -> tuple[Any, ...]:
    """tokens [1, bucket] (a prompt of `length` tokens, padded) -> (its cache of `bucket`
    positions, hidden states [1, bucket, embed], the first generated token [1] with its
    logprob [1] and top alternatives [1, TOP_N] (ids, logprobs))."""
    model = nnx.merge(graphdef, params)
    bucket = tokens.shape[1]
    hidden, cache = model.decode(tokens, jnp.arange(bucket)[None], model.init_cache(1, bucket))
    last = jax.lax.dynamic_index_in_dim(hidden, length - 1, axis=1)  # [1, 1, embed]
    logits = model.logits(last)[:, 0]
    token = sampling.choose(logits, temperature, top_k, top_p,
                            sampling.request_keys(seed, length[None]))
    return (cache, hidden, token, *sampling.logprobs(logits, token, TOP_N))


def score(graphdef: nnx.GraphDef, params: Any, hidden: jax.Array, tokens: jax.Array
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each prompt token's logprob given those before, [bucket] (position 0: none), with
    its top alternatives; [chunk, vocab] logits at a time."""
    model = nnx.merge(graphdef, params)
    bucket = tokens.shape[1]
    chunk = math.gcd(bucket, SCORE_CHUNK)
    # Position t predicts token t + 1: the logprob of token t comes from position t - 1.
    targets = jnp.roll(tokens[0], -1)

    def one(args):
        h, t = args
        return sampling.logprobs(model.logits(h[None])[0], t, TOP_N)

    out = jax.lax.map(one, (hidden[0].reshape(-1, chunk, hidden.shape[-1]),
                            targets.reshape(-1, chunk)))
    return jax.tree.map(lambda x: jnp.roll(x.reshape(bucket, *x.shape[2:]), 1, axis=0), out)


def insert(cache: Any, prefix: Any, slot: jax.Array) -> Any:
    """The prefilled cache of one request ([1, kv_heads, bucket, head_dim] per layer) into
    `slot`'s row of the decode cache ([slots, kv_heads, max_seq_len, head_dim] per layer;
    a stacked cache has a leading layers axis)."""
    return jax.tree.map(lambda c, p: jax.lax.dynamic_update_slice(
        c, p.astype(c.dtype), (0,) * (c.ndim - 4) + (slot, 0, 0, 0)), cache, prefix)


def generate(graphdef: nnx.GraphDef, max_seq_len: int, params: Any, cache: Any,
             tokens: jax.Array, positions: jax.Array, temperature: jax.Array,
             top_k: jax.Array, top_p: jax.Array, seeds: jax.Array, want_top: jax.Array
             ) -> tuple[Any, ...]:
    """One token for every slot: tokens [slots] at positions [slots] -> (the cache with
    their keys and values, the next token [slots] and its position [slots] (the next
    step's inputs), its logprob and top alternatives (zeros unless `want_top`))."""
    model = nnx.merge(graphdef, params)
    hidden, cache = model.decode(tokens[:, None], positions[:, None], cache)
    logits = model.logits(hidden)[:, 0]
    # The token sampled now will sit at position + 1: its key is that position's.
    token = sampling.choose(logits, temperature, top_k, top_p,
                            sampling.request_keys(seeds, positions + 1))
    # (A free slot's position runs on harmlessly; it stays inside the cache.)
    next_positions = jnp.minimum(positions + 1, max_seq_len - 1)
    return (cache, token, next_positions,
            *sampling.logprobs(logits, token, TOP_N, want_top))


def set_rows(tokens: jax.Array, positions: jax.Array, new_tokens: jax.Array,
             new_positions: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The decode inputs with the `rows` [slots] bool mask taken from the new values."""
    return jnp.where(rows, new_tokens, tokens), jnp.where(rows, new_positions, positions)
