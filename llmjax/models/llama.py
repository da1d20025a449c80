"""A Llama-family decoder in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Read top to bottom: `LlamaConfig` (the numbers), `Attention`, `MLP`, `Block` (one
pre-norm residual layer), `Llama` (embeddings, a stack of blocks, final norm, head).
Training calls `Llama.__call__`; generation the same modules through `decode`, which
threads an explicit key/value cache (llmjax.models.kv_cache).
Blocks are created stacked along a leading `layers` axis, so the same parameters run
under `jax.lax.scan` (fast compile) or unrolled (`scan_layers=False`).

The same file covers Llama 2 and 3 (`rope_scaling="llama3"` for 3.1+ long context),
Mistral (`sliding_window`) and Qwen2 (`qkv_bias`).
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.models.attention_kernels import KERNELS
from llmjax.models.kv_cache import (
    Cache,
    cached_attention,
    init_cache,
    is_unstacked,
    run_blocks_cached,
)
from llmjax.models.layers import (
    DTYPES,
    REMAT_POLICIES,
    RMSNorm,
    apply_rope,
    attention,
    check_choice,
    check_scan_unroll,
    classify_last_token,
    constrain,
    constrain_tokens,
    length_is_split,
    llama3_rope_scaling,
    masked_attention,
    param,
    rope_frequencies,
    rope_tables,
    run_blocks,
)
from llmjax.models.virtual_tokens import drop_prompt, virtual_inputs
from llmjax.models.weights import dense, lookup, weight


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    head_dim: int = 0  # 0: embed_dim // num_heads
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none | llama3 (Llama 3.1+: the four rope_* fields below)
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    sliding_window: int = 0  # > 0: attend to at most this many tokens (Mistral); 0: all
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    max_positions: int = 0  # context length it was trained for (kept for HF export); 0: unset
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    num_labels: int = 0  # > 0: a `score` head for classify() (last-token pooling)
    init_std: float = 0.02
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    scan_layers: bool = True
    scan_unroll: int = 0  # layers per scan iteration; 0: all on a CPU, 1 elsewhere
    remat_policy: str = "none"
    attention_impl: str = "auto"  # a name in attention_kernels.KERNELS
    attention_block_q: int = 0  # query tile or block (Pallas, chunked); 0: chosen
    attention_block_kv: int = 0  # Pallas kernels' key/value tile

    mlp_matrices: ClassVar[int] = 3  # gate, up, down (for llmjax.models.flops_per_token)

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)
        for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                     "mlp_dim", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config.model.{name}={getattr(self, name)} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"config.model.num_heads={self.num_heads} must be a multiple of "
                             f"config.model.num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"config.model head_dim={self.head_dim} must be even for RoPE")
        for name in ("param_dtype", "dtype"):
            check_choice(name, getattr(self, name), DTYPES)
        check_choice("attention_impl", self.attention_impl, KERNELS)
        check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
        check_scan_unroll(self.scan_unroll)
        check_choice("rope_scaling", self.rope_scaling, ("none", "llama3"))
        if self.sliding_window < 0:
            raise ValueError(f"config.model.sliding_window={self.sliding_window} must be >= 0")

    def rope_frequencies(self):
        """[head_dim / 2] float32 inverse frequencies, scaled as `rope_scaling` says."""
        inv_freq = rope_frequencies(self.head_dim, self.rope_theta)
        if self.rope_scaling == "llama3":
            inv_freq = llama3_rope_scaling(
                inv_freq, factor=self.rope_scaling_factor,
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_positions=self.rope_original_max_positions)
        return inv_freq


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.init_std)
        pdt = DTYPES[cfg.param_dtype]
        d, h, kv, hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q = param(rngs, init, (d, h, hd), ("embed", "heads", "head_dim"), pdt)
        self.k = param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pdt)
        self.v = param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pdt)
        self.o = param(rngs, init, (h, hd, d), ("heads", "head_dim", "embed"), pdt)
        if cfg.qkv_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = param(rngs, zeros, (h, hd), ("heads", "head_dim"), pdt)
            self.k_bias = param(rngs, zeros, (kv, hd), ("kv_heads", "head_dim"), pdt)
            self.v_bias = param(rngs, zeros, (kv, hd), ("kv_heads", "head_dim"), pdt)
        self.qkv_bias = cfg.qkv_bias
        self.sliding_window = cfg.sliding_window
        self.dtype = DTYPES[cfg.dtype]
        self.impl = cfg.attention_impl
        self.blocks = (cfg.attention_block_q, cfg.attention_block_kv)

    def __call__(self, x, cos, sin, segment_ids, mask=None, prefix=None):
        """x [batch, length, embed] or [batch * length, embed] -> the same shape.

        Projections are plain 2-D matmuls on whatever layout x has; only attention itself
        sees [batch, length, heads, head_dim] (batch and length from `cos`). With virtual
        tokens: their `mask` and this layer's `prefix` (layers.masked_attention).
        """
        q, k, v = self._project(x, cos, sin)
        if mask is not None:
            return self._output(masked_attention(q, k, v, mask, prefix), x.shape)
        block_q, block_kv = self.blocks
        out = attention(q, k, v, segment_ids, self.impl, sliding_window=self.sliding_window,
                        block_q=block_q, block_kv=block_kv)
        return self._output(out, x.shape)

    def decode(self, x, cos, sin, positions, layer_cache):
        """The cached form (llmjax.models.kv_cache): x [batch, T, embed] at `positions`
        [batch, T] -> (the same shape, this layer's cache with their keys and values)."""
        q, k, v = self._project(x, cos, sin)
        out, layer_cache = cached_attention(q, k, v, positions, layer_cache,
                                            sliding_window=self.sliding_window)
        return self._output(out, x.shape), layer_cache

    def _project(self, x, cos, sin):
        dt = self.dtype
        batch, length = cos.shape[:2]

        def project(w):  # [embed, heads, head_dim]
            return dense(x, w, dt).reshape(batch, length, *w.get_value().shape[1:])

        q, k, v = project(self.q), project(self.k), project(self.v)
        if self.qkv_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        q = constrain(apply_rope(q, cos, sin), ("act_batch", "act_length", "act_heads", None))
        return q, apply_rope(k, cos, sin), v

    def _output(self, out, shape):
        # o: [heads, head_dim, embed]
        return dense(out.reshape(*shape[:-1], -1), self.o, self.dtype, in_dims=2)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.init_std)
        pdt = DTYPES[cfg.param_dtype]
        self.gate = param(rngs, init, (cfg.embed_dim, cfg.mlp_dim), ("embed", "mlp"), pdt)
        self.up = param(rngs, init, (cfg.embed_dim, cfg.mlp_dim), ("embed", "mlp"), pdt)
        self.down = param(rngs, init, (cfg.mlp_dim, cfg.embed_dim), ("mlp", "embed"), pdt)
        self.dtype = DTYPES[cfg.dtype]

    def __call__(self, x):
        dt = self.dtype
        hidden = jax.nn.silu(dense(x, self.gate, dt)) * dense(x, self.up, dt)
        hidden = constrain_tokens(hidden, "act_mlp")
        return dense(hidden, self.down, dt)


class Block(nnx.Module):
    """Pre-norm residual layer: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        pdt = DTYPES[cfg.param_dtype]
        self.attn_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, cos, sin, segment_ids, mask=None, prefix=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, segment_ids, mask, prefix)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain_tokens(x, "act_embed")

    def decode(self, x, layer_cache, cos, sin, positions):
        attended, layer_cache = self.attn.decode(self.attn_norm(x), cos, sin, positions,
                                                 layer_cache)
        x = x + attended
        x = x + self.mlp(self.mlp_norm(x))
        return constrain_tokens(x, "act_embed"), layer_cache


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = DTYPES[cfg.param_dtype]
        init = nnx.initializers.normal(cfg.init_std)
        self.embed = param(rngs, init, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), pdt)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, init, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"),
                                 pdt)
        if cfg.num_labels:
            self.score = param(rngs, init, (cfg.embed_dim, cfg.num_labels), ("embed", "labels"),
                               pdt)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, *, prefix: jax.Array | None = None,
                 prompt: jax.Array | None = None) -> jax.Array:
        """tokens [batch, length] int -> next-token logits [batch, length, vocab] float32.

        positions [batch, length] restart at 0 for each packed document (default
        0..length-1); segment_ids [batch, length] keep attention inside a document.
        `prefix` [layers, 2, P, kv_heads, head_dim] or `prompt` [P, embed]: trained virtual
        tokens before every document (llmjax.models.virtual_tokens).
        """
        x = self.hidden_states(tokens, positions, segment_ids, prefix=prefix, prompt=prompt)
        logits = self.logits(x).reshape(*tokens.shape, -1)
        return constrain(logits, ("act_batch", "act_length", "act_vocab"))

    def logits(self, x: jax.Array) -> jax.Array:
        """Final-norm outputs [..., embed] -> next-token logits [..., vocab] float32."""
        cfg = self.cfg
        dt = DTYPES[cfg.dtype]
        if cfg.tie_embeddings:
            return dense(x, self.embed, dt, transposed=True).astype(jnp.float32)
        return dense(x, self.lm_head, dt).astype(jnp.float32)

    def init_cache(self, batch: int, length: int) -> Cache:
        """An empty key/value cache for `batch` rows of `length` positions."""
        cfg = self.cfg
        return init_cache(cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim,
                          DTYPES[cfg.dtype], per_layer=is_unstacked(self.blocks))

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: Cache
               ) -> tuple[jax.Array, Cache]:
        """The cached forward (llmjax.models.kv_cache): tokens [batch, T] at positions
        [batch, T] -> (final-norm outputs [batch, T, embed], the cache with their keys and
        values). A prompt (T = its length) or one new token per row (T = 1)."""
        cfg = self.cfg
        x = lookup(self.embed, tokens, DTYPES[cfg.dtype])
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        cos, sin = rope_tables(positions, cfg.rope_frequencies())
        x, cache = run_blocks_cached(self.blocks, x, cache, cos, sin, positions,
                                     scan_layers=cfg.scan_layers)
        return self.final_norm(x), cache

    def classify(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens [batch, length] -> class logits [batch, num_labels] float32, from each row's
        last token whose segment id is not 0 (padding), through the `score` head."""
        cfg = self.cfg
        if not cfg.num_labels:
            raise ValueError("this model has no classifier head: set config.model.num_labels")
        x = self.hidden_states(tokens, positions, segment_ids).reshape(*tokens.shape, -1)
        return classify_last_token(x, segment_ids, weight(self.score, DTYPES[cfg.dtype]))

    def hidden_states(self, tokens: jax.Array, positions: jax.Array | None,
                      segment_ids: jax.Array | None, *, prefix: jax.Array | None = None,
                      prompt: jax.Array | None = None) -> jax.Array:
        """The final-norm output: [batch * length, embed] (or [batch, length, embed] when
        the length is split over devices)."""
        cfg = self.cfg
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = lookup(self.embed, tokens, DTYPES[cfg.dtype])
        virtual = prefix is not None or prompt is not None
        if virtual:
            x, positions, mask = virtual_inputs(x, positions, segment_ids, prefix=prefix,
                                                prompt=prompt,
                                                sliding_window=cfg.sliding_window)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        if not length_is_split():
            # The residual stream as [batch * length, embed]: every matmul is a plain 2-D
            # one (XLA:CPU runs the [batch, length, embed] layout's about 20% slower). With
            # the length split over devices the 3-D layout stays, since merging the two
            # split dims would move data between devices.
            x = constrain_tokens(x.reshape(-1, x.shape[-1]), "act_embed")
        cos, sin = rope_tables(positions, cfg.rope_frequencies())
        if virtual:  # the mask says what each token sees; segment ids are in it
            x = run_blocks(self.blocks, x, cos, sin, None, mask, scan_layers=cfg.scan_layers,
                           scan_unroll=cfg.scan_unroll, remat_policy=cfg.remat_policy,
                           per_layer=prefix)
            x = self.final_norm(x)
            return x if prompt is None else drop_prompt(x, tokens.shape[0], prompt.shape[0])
        x = run_blocks(self.blocks, x, cos, sin, segment_ids, scan_layers=cfg.scan_layers,
                       scan_unroll=cfg.scan_unroll, remat_policy=cfg.remat_policy)
        return self.final_norm(x)
