"""The key/value cache of the decoders: an explicit argument and result, never hidden state.

A cache is {"k": [layers, batch, length, kv_heads, head_dim], "v": same} in the compute
dtype. A decoder's `decode(tokens, positions, cache)` writes the keys and values of
`tokens` at their `positions` (per row) and attends each query to the cached keys at
positions up to its own (within the sliding window, if any), so one function serves a
whole prompt (prefill) and one new token per row (a decode step). Positions a row has not
written yet hold stale values that no query can see: a query at position p sees keys
0..p only, and keys are written in order.

The cache's dims carry logical axis names (CACHE_AXES), so the rule presets of
llmjax.parallel.sharding place it as they place the activations: rows over the batch
axes, kv_heads over `tensor`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen, nnx

CACHE_AXES = ("layers", "act_batch", None, "kv_heads", "head_dim")
Cache = dict[str, jax.Array]


def init_cache(num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int,
               dtype: jnp.dtype) -> Cache:
    """An empty cache for `batch` rows of up to `length` positions."""
    shape = (num_layers, batch, length, kv_heads, head_dim)
    return {name: linen.with_logical_constraint(jnp.zeros(shape, dtype), CACHE_AXES)
            for name in ("k", "v")}


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                     cache: Cache, layer: jax.Array | int, *, sliding_window: int = 0
                     ) -> tuple[jax.Array, Cache]:
    """Causal attention of q [batch, T, heads, head_dim] at `positions` [batch, T] over
    the cache, after writing this layer's k, v [batch, T, kv_heads, head_dim] into it.

    Returns ([batch, T, heads, head_dim], the updated cache).
    """
    rows = jnp.arange(q.shape[0])[:, None]
    cache = {name: cache[name].at[layer, rows, positions].set(x.astype(cache[name].dtype))
             for name, x in (("k", k), ("v", v))}
    keys, values = cache["k"][layer], cache["v"][layer]
    slots = jnp.arange(keys.shape[1])[None, None, :]
    visible = slots <= positions[:, :, None]
    if sliding_window > 0:  # as in training: itself and the sliding_window - 1 before it
        visible &= slots > positions[:, :, None] - sliding_window
    out = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype),
                                       mask=visible[:, None])
    return out, cache


def run_blocks_cached(blocks: nnx.Module, x: jax.Array, cache: Cache, *args,
                      scan_layers: bool) -> tuple[jax.Array, Cache]:
    """x through a stack of blocks (parameters on a leading `layers` axis), each calling
    `block.decode(x, cache, layer, *args) -> (x, cache)`; under jax.lax.scan the cache is
    carried and updated in place, a layer at a time."""
    block_graph, block_state = nnx.split(blocks)
    num_layers = jax.tree.leaves(block_state)[0].shape[0]

    def run_block(carry, layer_state, layer) -> tuple[jax.Array, Cache]:
        x, cache = carry
        return nnx.merge(block_graph, layer_state).decode(x, cache, layer, *args)

    if scan_layers:
        step: Callable = lambda carry, xs: (run_block(carry, *xs), None)  # noqa: E731
        return jax.lax.scan(step, (x, cache), (block_state, jnp.arange(num_layers)))[0]
    carry = (x, cache)
    for i in range(num_layers):
        carry = run_block(carry, jax.tree.map(lambda a, i=i: a[i], block_state), i)
    return carry
