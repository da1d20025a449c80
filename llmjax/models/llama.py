"""A Llama-family decoder in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Read top to bottom: `LlamaConfig` (the numbers), `Attention`, `MLP`, `Block` (one
pre-norm residual layer), `Llama` (embeddings, a stack of blocks, final norm, head).
Blocks are created stacked along a leading `layers` axis, so the same parameters run
under `jax.lax.scan` (fast compile) or unrolled (`scan_layers=False`).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.models.layers import (
    RMSNorm,
    apply_rope,
    attention,
    constrain,
    param,
    remat,
    rope_tables,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"  # auto | xla | cudnn

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
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"config.model.{name}={getattr(self, name)!r}: choose one of "
                                 f"{sorted(DTYPES)}")
        if self.attention_impl not in ("auto", "xla", "cudnn"):
            raise ValueError(f"config.model.attention_impl={self.attention_impl!r}: choose "
                             "auto, xla or cudnn")


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.init_std)
        pdt = DTYPES[cfg.param_dtype]
        d, h, kv, hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q = param(rngs, init, (d, h, hd), ("embed", "heads", "head_dim"), pdt)
        self.k = param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pdt)
        self.v = param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pdt)
        self.o = param(rngs, init, (h, hd, d), ("heads", "head_dim", "embed"), pdt)
        self.dtype = DTYPES[cfg.dtype]
        self.impl = None if cfg.attention_impl == "auto" else cfg.attention_impl

    def __call__(self, x, cos, sin, segment_ids):
        """x [batch, length, embed] -> [batch, length, embed]."""
        dt = self.dtype
        q = jnp.einsum("bld,dhk->blhk", x, self.q[...].astype(dt))
        k = jnp.einsum("bld,dhk->blhk", x, self.k[...].astype(dt))
        v = jnp.einsum("bld,dhk->blhk", x, self.v[...].astype(dt))
        q = constrain(apply_rope(q, cos, sin), ("act_batch", "act_length", "act_heads", None))
        k = apply_rope(k, cos, sin)
        out = attention(q, k, v, segment_ids, self.impl)
        return jnp.einsum("blhk,hkd->bld", out, self.o[...].astype(dt))


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
        hidden = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
        hidden = constrain(hidden, ("act_batch", "act_length", "act_mlp"))
        return hidden @ self.down[...].astype(dt)


class Block(nnx.Module):
    """Pre-norm residual layer: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        pdt = DTYPES[cfg.param_dtype]
        self.attn_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, cos, sin, segment_ids):
        x = x + self.attn(self.attn_norm(x), cos, sin, segment_ids)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("act_batch", "act_length", "act_embed"))


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

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens [batch, length] int -> logits [batch, length, vocab] float32.

        positions [batch, length] restart at 0 for each packed document (default
        0..length-1); segment_ids [batch, length] keep attention inside a document.
        """
        cfg = self.cfg
        dt = DTYPES[cfg.dtype]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)

        block_graph, block_state = nnx.split(self.blocks)

        def run_block(x, layer_state):
            return nnx.merge(block_graph, layer_state)(x, cos, sin, segment_ids), None

        run_block = remat(run_block, cfg.remat_policy)
        if cfg.scan_layers:
            x, _ = jax.lax.scan(run_block, x, block_state)
        else:
            for i in range(cfg.num_layers):
                x, _ = run_block(x, jax.tree.map(lambda a, i=i: a[i], block_state))

        x = self.final_norm(x)
        head = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        logits = jnp.einsum("bld,dv->blv", x, head.astype(dt))
        logits = constrain(logits, ("act_batch", "act_length", "act_vocab"))
        return logits.astype(jnp.float32)
