"""Layers shared by the model families: parameters with logical axes, norms, RoPE, attention.

Every parameter is created through `param`, which records its logical axis names
(`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `norm`, plus `layers` for
stacked blocks). `llmjax.sharding` maps those names to mesh axes; the model itself
knows nothing about meshes.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen, nnx

Initializer = Callable[..., jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str],
          dtype: jnp.dtype) -> nnx.Param:
    """A parameter of `shape` whose dimensions carry the logical names `axes`."""
    if len(axes) != len(shape):
        raise ValueError(f"parameter of shape {tuple(shape)} got axes {tuple(axes)}")
    # eager_sharding=False: the state is sharded once, by llmjax.sharding, not at creation.
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes),
                     eager_sharding=False)


def constrain(x: jax.Array, axes: Sequence[str]) -> jax.Array:
    """Hint the sharding of an activation by logical names (a no-op without rules in scope)."""
    return linen.with_logical_constraint(x, tuple(axes))


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32, returned in the input dtype."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        return y.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin for rotary embeddings, each [batch, length, 1, head_dim] in float32.

    Rotate-half layout (the first half of each head pairs with the second half), as in
    Hugging Face Llama, so imported weights need no permutation.
    """
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, length, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [batch, length, heads, head_dim] by the tables from `rope_tables`."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
              implementation: str | None) -> jax.Array:
    """Causal grouped-query attention.

    q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim]
    (heads a multiple of kv_heads). Tokens attend only within their own segment when
    `segment_ids` [batch, length] is given. Returns [batch, length, heads, head_dim].
    `implementation`: None (let JAX choose), "xla" or "cudnn".
    """
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None, :, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                        implementation=implementation)


REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(fn: Callable, policy: str) -> Callable:
    """Wrap a block function for rematerialisation under a named policy (see REMAT_POLICIES)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"config.model.remat_policy={policy!r}: choose one of "
                         f"{sorted(REMAT_POLICIES)}")
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy])
