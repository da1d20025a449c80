"""Layers shared by the model families: parameters with logical axes, norms, RoPE, attention.

Every parameter is created through `param`, which records its logical axis names
(`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `norm`, `positions`,
`labels`, plus `layers` for stacked blocks). `llmjax.parallel.sharding` maps those names to mesh
axes; the model itself knows nothing about meshes. Bias parameters are named `bias` or
`*_bias`, which is how the optimizer leaves them out of weight decay.
"""

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from llmjax.models.attention_kernels import (
    PALLAS_KERNELS,
    chunked_attention,
    pallas_attention,
    select_kernel,
)
from llmjax.models.kv_cache import Cache, cached_attention
from llmjax.models.weights import dense

Initializer = Callable[..., jax.Array]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str],
          dtype: jnp.dtype) -> nnx.Param:
    """A parameter of `shape` whose dimensions carry the logical names `axes`."""
    if len(axes) != len(shape):
        raise ValueError(f"parameter of shape {tuple(shape)} got axes {tuple(axes)}")
    # eager_sharding=False: the state is sharded once, by llmjax.parallel.sharding, not at creation.
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes),
                     eager_sharding=False)


def constrain(x: jax.Array, axes: Sequence[str]) -> jax.Array:
    """Hint the sharding of an activation by logical names (a no-op without rules in scope)."""
    return linen.with_logical_constraint(x, tuple(axes))


def length_is_split() -> bool:
    """Whether the mesh and rules in scope split activations along their length."""
    mesh = jax.sharding.get_abstract_mesh()
    length_axes = linen.logical_to_mesh_axes(("act_length",))[0]
    if mesh.empty or length_axes is None:
        return False
    length_axes = (length_axes,) if isinstance(length_axes, str) else tuple(length_axes)
    return math.prod(mesh.shape[a] for a in length_axes) > 1


def constrain_tokens(x: jax.Array, last: str) -> jax.Array:
    """`constrain` for activations [batch, length, `last`] or, flattened, [batch * length,
    `last`] (rows batch-major, so the batch sharding of the first dim is the same)."""
    if x.ndim == 2:
        return constrain(x, ("act_batch", last))
    return constrain(x, ("act_batch", "act_length", last))


def gather_length(x: jax.Array) -> jax.Array:
    """x [batch, length, ...] whole along its length on every device, when the rules in scope
    split activations along the length (sequence parallelism); other dims are left to the
    compiler. Keys and values go through this: each device's queries see every key."""
    if not length_is_split():
        return x
    batch = linen.logical_to_mesh_axes(("act_batch",))[0]
    rest = (jax.sharding.PartitionSpec.UNCONSTRAINED,) * (x.ndim - 2)
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(batch, None, *rest))


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


class LayerNorm(nnx.Module):
    """(x - mean) / std * scale + bias, computed in float32, returned in the input dtype."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """The [head_dim / 2] float32 inverse frequencies of rotary embeddings."""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)


def llama3_rope_scaling(inv_freq: np.ndarray, *, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_max_positions: int) -> np.ndarray:
    """Llama 3.1's long-context RoPE: long wavelengths slowed down by `factor`, short ones
    kept, and a smooth blend between `original_max_positions / low_freq_factor` and
    `original_max_positions / high_freq_factor`."""
    wavelength = 2 * math.pi / inv_freq
    smooth = (original_max_positions / wavelength - low_freq_factor) / (
        high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = np.where(wavelength > original_max_positions / low_freq_factor,
                      inv_freq / factor, blended)
    scaled = np.where(wavelength < original_max_positions / high_freq_factor, inv_freq, scaled)
    return scaled.astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin for rotary embeddings, each [batch, length, 1, head_dim] in float32.

    `inv_freq` [head_dim / 2] from `rope_frequencies` (and maybe `llama3_rope_scaling`).
    Rotate-half layout (the first half of each head pairs with the second half), as in
    Hugging Face Llama, so imported weights need no permutation.
    """
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
              implementation: str = "auto", *, causal: bool = True, sliding_window: int = 0,
              block_q: int = 0, block_kv: int = 0) -> jax.Array:
    """Grouped-query attention, causal unless `causal=False` (encoders).

    q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim]
    (heads a multiple of kv_heads). Tokens attend only within their own segment when
    `segment_ids` [batch, length] is given (an encoder's padding: segment 0).
    `sliding_window` > 0: a query sees itself and the `sliding_window - 1` tokens before
    it (Mistral). Returns [batch, length, heads, head_dim].
    `implementation`: a `model.attention_impl` (llmjax.models.attention_kernels: auto
    resolves per backend); `block_q`, `block_kv`: the Pallas kernels' tiles (0: chosen).
    """
    kernel = select_kernel(
        implementation, jax.default_backend(), packed=segment_ids is not None,
        sliding_window=sliding_window, dtype=q.dtype)
    if kernel == "chunked" and (not causal or length_is_split()):
        # Its blocks skip only keys a causal query cannot see; a split length would
        # re-split every block of queries across devices.
        kernel = "xla"
    if kernel in PALLAS_KERNELS:
        return pallas_attention(
            kernel, q, k, v, segment_ids, causal=causal, sliding_window=sliding_window,
            block_q=block_q, block_kv=block_kv)
    k, v = gather_length(k), gather_length(v)
    if kernel == "chunked":
        return chunked_attention(q, k, v, segment_ids, sliding_window=sliding_window,
                                 block_q=block_q)
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None, :, :]
    window = (sliding_window - 1, 0) if sliding_window > 0 else None
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                        local_window_size=window, implementation=kernel)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     prefix: jax.Array | None) -> jax.Array:
    """Attention with virtual tokens (llmjax.models.virtual_tokens): q [batch, queries,
    heads, head_dim], k, v [batch, length, kv_heads, head_dim] after the layer's `prefix`
    [2, P, kv_heads, head_dim] (its keys and values; None for a prompt, whose tokens are in
    k, v already), `mask` from virtual_tokens.virtual_mask. Returns [batch, queries, heads,
    head_dim]."""
    if prefix is not None:
        batch = q.shape[0]
        prefix_k, prefix_v = (jnp.broadcast_to(p.astype(k.dtype)[None], (batch, *p.shape))
                              for p in prefix)
        k = jnp.concatenate([prefix_k, k], axis=1)
        v = jnp.concatenate([prefix_v, v], axis=1)
    k, v = gather_length(k), gather_length(v)
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


class MultiHeadAttention(nnx.Module):
    """Attention with biased q/k/v/o projections and no RoPE (GPT-2, BERT).

    Parameters: q, k, v [embed, heads, head_dim] with q_bias, k_bias, v_bias
    [heads, head_dim]; o [heads, head_dim, embed] with o_bias [embed].
    """

    def __init__(self, embed_dim: int, num_heads: int, *, causal: bool, init_std: float,
                 param_dtype: jnp.dtype, dtype: jnp.dtype, implementation: str,
                 block_q: int = 0, block_kv: int = 0, rngs: nnx.Rngs):
        init, zeros = nnx.initializers.normal(init_std), nnx.initializers.zeros
        d, h, hd = embed_dim, num_heads, embed_dim // num_heads
        for name in ("q", "k", "v"):
            setattr(self, name, param(rngs, init, (d, h, hd), ("embed", "heads", "head_dim"),
                                      param_dtype))
            setattr(self, f"{name}_bias", param(rngs, zeros, (h, hd), ("heads", "head_dim"),
                                                param_dtype))
        self.o = param(rngs, init, (h, hd, d), ("heads", "head_dim", "embed"), param_dtype)
        self.o_bias = param(rngs, zeros, (d,), ("embed",), param_dtype)
        self.causal, self.dtype, self.impl = causal, dtype, implementation
        self.blocks = (block_q, block_kv)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None,
                 mask: jax.Array | None = None, prefix: jax.Array | None = None) -> jax.Array:
        """x [batch, length, embed] -> [batch, length, embed]. With virtual tokens: their
        `mask` and this layer's `prefix` (see `masked_attention`)."""
        q, k, v = self._project(x)
        if mask is not None:
            return self._output(masked_attention(q, k, v, mask, prefix))
        block_q, block_kv = self.blocks
        return self._output(attention(q, k, v, segment_ids, self.impl, causal=self.causal,
                                      block_q=block_q, block_kv=block_kv))

    def decode(self, x: jax.Array, positions: jax.Array, layer_cache: Cache
               ) -> tuple[jax.Array, Cache]:
        """The cached, causal form (llmjax.models.kv_cache): x [batch, T, embed] at
        `positions` [batch, T] -> (the same shape, this layer's cache with their keys)."""
        q, k, v = self._project(x)
        out, layer_cache = cached_attention(q, k, v, positions, layer_cache)
        return self._output(out), layer_cache

    def _project(self, x):
        dt = self.dtype

        def project(w, b):  # [embed, heads, head_dim]
            head_shape = w.get_value().shape[1:]
            return dense(x, w, dt).reshape(*x.shape[:-1], *head_shape) + b[...].astype(dt)

        q = project(self.q, self.q_bias)
        q = constrain(q, ("act_batch", "act_length", "act_heads", None))
        return q, project(self.k, self.k_bias), project(self.v, self.v_bias)

    def _output(self, out):
        dt = self.dtype
        return (dense(out.reshape(*out.shape[:-2], -1), self.o, dt, in_dims=2)
                + self.o_bias[...].astype(dt))


GELU_APPROXIMATE = {"gelu": False, "gelu_tanh": True}  # exact erf (BERT) | tanh (GPT-2)


class GeluMLP(nnx.Module):
    """down(gelu(up(x) + up_bias)) + down_bias: the two-matrix MLP of GPT-2 and BERT."""

    def __init__(self, embed_dim: int, mlp_dim: int, *, activation: str, init_std: float,
                 param_dtype: jnp.dtype, dtype: jnp.dtype, rngs: nnx.Rngs):
        init, zeros = nnx.initializers.normal(init_std), nnx.initializers.zeros
        self.up = param(rngs, init, (embed_dim, mlp_dim), ("embed", "mlp"), param_dtype)
        self.up_bias = param(rngs, zeros, (mlp_dim,), ("mlp",), param_dtype)
        self.down = param(rngs, init, (mlp_dim, embed_dim), ("mlp", "embed"), param_dtype)
        self.down_bias = param(rngs, zeros, (embed_dim,), ("embed",), param_dtype)
        self.approximate = GELU_APPROXIMATE[activation]
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        hidden = dense(x, self.up, dt) + self.up_bias[...].astype(dt)
        hidden = jax.nn.gelu(hidden, approximate=self.approximate)
        hidden = constrain(hidden, ("act_batch", "act_length", "act_mlp"))
        return dense(hidden, self.down, dt) + self.down_bias[...].astype(dt)


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


def classify_last_token(x: jax.Array, segment_ids: jax.Array | None,
                        score: jax.Array) -> jax.Array:
    """Decoder sequence classification: x [batch, length, embed] at each row's last
    non-padding token (segment id != 0; the last position without segment ids) times
    score [embed, num_labels] -> logits [batch, num_labels] float32."""
    length = x.shape[1]
    if segment_ids is None:
        last = jnp.full((x.shape[0],), length - 1)
    else:
        last = jnp.max(jnp.where(segment_ids != 0, jnp.arange(length), 0), axis=1)
    pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    return (pooled @ score).astype(jnp.float32)


def run_blocks(blocks: nnx.Module, x: jax.Array, *args, scan_layers: bool,
               remat_policy: str, per_layer: jax.Array | None = None,
               scan_unroll: int = 1) -> jax.Array:
    """x through a stack of blocks made with nnx.vmap (parameters on a leading `layers`
    axis): `block(x, *args)` for each layer, under jax.lax.scan (`scan_unroll` layers an
    iteration, see `layers_per_iteration`) or unrolled. `per_layer` [layers, ...] (a
    prefix's keys and values): layer i's slice is the block's last argument."""
    block_graph, block_state = nnx.split(blocks)
    num_layers = jax.tree.leaves(block_state)[0].shape[0]

    def run_block(x, layer):
        layer_state, layer_input = layer
        extra = () if layer_input is None else (layer_input,)
        return nnx.merge(block_graph, layer_state)(x, *args, *extra), None

    run_block = remat(run_block, remat_policy)
    if scan_layers:
        unroll = layers_per_iteration(scan_unroll, num_layers)
        return jax.lax.scan(run_block, x, (block_state, per_layer), unroll=unroll)[0]
    for i in range(num_layers):
        x, _ = run_block(x, jax.tree.map(lambda a, i=i: a[i], (block_state, per_layer)))
    return x


def layers_per_iteration(scan_unroll: int, num_layers: int) -> int:
    """How many layers one iteration of the scan over blocks runs: `scan_unroll`, or with 0
    (config.model.scan_unroll's default) every layer on a CPU backend and one elsewhere.
    XLA:CPU's rolled loop copies each layer's saved activations into stacked buffers and
    back out for the backward pass: 11% of the training step of configs/bench_reference.py
    (README, "Speed on a CPU"). On accelerators one layer an iteration keeps the compile
    time of deep models flat; the program computes the same either way."""
    if scan_unroll == 0:
        return num_layers if jax.default_backend() == "cpu" else 1
    return min(scan_unroll, num_layers)


def check_scan_unroll(scan_unroll: int) -> None:
    """ValueError naming config.model.scan_unroll unless it is >= 0."""
    if scan_unroll < 0:
        raise ValueError(f"config.model.scan_unroll={scan_unroll} must be >= 0 (0: every layer "
                         "on a CPU, one elsewhere)")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """ValueError naming config.model.`name` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"config.model.{name}={value!r}: choose one of {sorted(choices)}")
