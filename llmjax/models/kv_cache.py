"""The key/value cache of the decoders: an explicit argument and result, never hidden state.

A cache is {"k": [layers, batch, kv_heads, length, head_dim], "v": same} in the compute
dtype, or the same per layer (`unstack_layers`). Heads come before positions so that
attention reads each head's keys as one block: in the [length, kv_heads] order every step
transposed the whole cache (3x slower at 32 sequences on XLA:CPU).

A decoder's `decode(tokens, positions, cache)` writes the keys and values of `tokens` at
their `positions` (per row) and attends each query to the cached keys at positions up to
its own (within the sliding window, if any), so one function serves a whole prompt
(prefill) and one new token per row (a decode step). Positions a row has not written yet
hold stale values that no query can see: a query at position p sees keys 0..p only, and
keys are written in order.

The cache's dims carry logical axis names (CACHE_AXES), so the rule presets of
llmjax.parallel.sharding place it as they place the activations: rows over the batch
axes, kv_heads over `tensor`.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx

CACHE_AXES = ("layers", "act_batch", "kv_heads", None, "head_dim")
Cache = dict[str, Any]  # {"k", "v"}: one stacked array, or a tuple of per-layer arrays


def init_cache(num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int,
               dtype: jnp.dtype, *, per_layer: bool) -> Cache:
    """An empty cache for `batch` rows of up to `length` positions: [layers, batch, kv_heads,
    length, head_dim] arrays, or with `per_layer` a tuple of [batch, kv_heads, length,
    head_dim] ones (the layout of unstacked blocks, see `unstack_layers`)."""
    if per_layer:
        shape, axes = (batch, kv_heads, length, head_dim), CACHE_AXES[1:]
        return {name: tuple(linen.with_logical_constraint(jnp.zeros(shape, dtype), axes)
                            for _ in range(num_layers)) for name in ("k", "v")}
    shape = (num_layers, batch, kv_heads, length, head_dim)
    return {name: linen.with_logical_constraint(jnp.zeros(shape, dtype), CACHE_AXES)
            for name in ("k", "v")}


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                     layer_cache: Cache, *, sliding_window: int = 0
                     ) -> tuple[jax.Array, Cache]:
    """Causal attention of q [batch, T, heads, head_dim] at `positions` [batch, T] over one
    layer's cache ([batch, kv_heads, length, head_dim] keys and values), after writing this
    layer's k, v [batch, T, kv_heads, head_dim] into it. Grouped queries (heads a multiple
    of kv_heads) read their group's keys; the softmax is in float32, scaled by
    1/sqrt(head_dim), as jax.nn.dot_product_attention does in training.

    Returns ([batch, T, heads, head_dim], the layer's updated cache).
    """
    batch, length, heads, head_dim = q.shape
    rows = jnp.arange(batch)[:, None]
    layer_cache = {name: layer_cache[name].at[rows, :, positions].set(
        x.astype(layer_cache[name].dtype)) for name, x in (("k", k), ("v", v))}
    keys, values = layer_cache["k"].astype(q.dtype), layer_cache["v"].astype(q.dtype)
    kv_heads = keys.shape[1]
    grouped = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    # Keys first: with the queries first, XLA:CPU fused the cache write into each reader
    # and copied every layer's key cache twice a step at one sequence (a one-sequence
    # int8 step went from 3.9 to 3.4 ms on the reference model; no change at 8).
    scores = jnp.einsum("bksd,btkgd->bkgts", keys, grouped).astype(jnp.float32)
    slots = jnp.arange(keys.shape[2])[None, None, :]
    visible = slots <= positions[:, :, None]
    if sliding_window > 0:  # as in training: itself and the sliding_window - 1 before it
        visible &= slots > positions[:, :, None] - sliding_window
    scores = jnp.where(visible[:, None, None], scores / jnp.sqrt(head_dim), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, values)
    return out.reshape(batch, length, heads, head_dim), layer_cache


def unstack_layers(model: nnx.Module) -> nnx.Module:
    """The model with each stacked block weight [layers, ...] held as a tuple of per-layer
    arrays, for decoding: a decode step is a handful of matrix-vector products per layer,
    and XLA:CPU copies a slice of a stacked weight (static or dynamic) before each one,
    about 3-5x the product's own time. Prefill and decode then run the layers unrolled,
    with one cache array per layer. (`model` itself is left as it is.)"""
    graphdef, state = nnx.split(nnx.clone(model))
    for _, variable in nnx.to_flat_state(state["blocks"]):
        value = variable.get_value()
        variable.set_value(tuple(value[i] for i in range(value.shape[0])))
    return nnx.merge(graphdef, state)


def is_unstacked(blocks: nnx.Module) -> bool:
    """Whether `unstack_layers` made these blocks' weights per-layer tuples."""
    return isinstance(_first_weight(blocks), tuple)


def _first_weight(blocks: nnx.Module) -> Any:
    state = nnx.split(blocks)[1]
    return jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, tuple))[0]


def run_blocks_cached(blocks: nnx.Module, x: jax.Array, cache: Cache, *args,
                      scan_layers: bool) -> tuple[jax.Array, Cache]:
    """x through a stack of blocks, each calling `block.decode(x, layer_cache, *args) ->
    (x, layer_cache)`. Unstacked blocks (`unstack_layers`) run unrolled over a per-layer
    cache; stacked ones (weights on a leading `layers` axis) over a stacked cache, under
    jax.lax.scan (`scan_layers`, the cache carried and updated in place) or unrolled."""
    block_graph, block_state = nnx.split(blocks)
    first = _first_weight(blocks)

    def run_block(x, layer_state, layer_cache) -> tuple[jax.Array, Cache]:
        return nnx.merge(block_graph, layer_state).decode(x, layer_cache, *args)

    if isinstance(first, tuple):  # unstacked: per-layer weights and cache arrays
        new = []
        for i in range(len(first)):
            layer_state = jax.tree.map(lambda layers, i=i: layers[i], block_state,
                                       is_leaf=lambda v: isinstance(v, tuple))
            x, layer_cache = run_block(x, layer_state, {n: c[i] for n, c in cache.items()})
            new.append(layer_cache)
        return x, {n: tuple(layer[n] for layer in new) for n in cache}

    def step(carry, xs):
        x, cache = carry
        layer_state, i = xs
        x, layer_cache = run_block(x, layer_state, {n: c[i] for n, c in cache.items()})
        return (x, {n: cache[n].at[i].set(layer_cache[n]) for n in cache}), None

    num_layers = first.shape[0]
    if scan_layers:
        return jax.lax.scan(step, (x, cache), (block_state, jnp.arange(num_layers)))[0]
    carry = (x, cache)
    for i in range(num_layers):
        carry = step(carry, (jax.tree.map(lambda a, i=i: a[i], block_state), i))[0]
    return carry
