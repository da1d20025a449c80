"""A BERT-style encoder with a pooler, a sequence-classification head and a masked-LM head.

Read top to bottom: `BertConfig`, `Block` (post-norm: ln(x + attn(x)), then
ln(x + mlp(x))) and `Bert` (token + position + token-type embeddings and a LayerNorm,
the stacked blocks, then two heads: tanh(dense) of the first token and a linear
classifier; and per token ln(gelu(dense)) projected onto the word embeddings plus a bias).
Attention is bidirectional; padding is segment 0 of `segment_ids`, so a Hugging Face
`attention_mask` can be passed as it is.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.models.attention_kernels import KERNELS
from llmjax.models.layers import (
    DTYPES,
    GELU_APPROXIMATE,
    REMAT_POLICIES,
    GeluMLP,
    LayerNorm,
    MultiHeadAttention,
    check_choice,
    check_scan_unroll,
    constrain,
    param,
    run_blocks,
)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    num_labels: int = 2
    max_positions: int = 512
    type_vocab_size: int = 2  # token types (sentence A / B)
    norm_eps: float = 1e-12
    activation: str = "gelu"  # gelu (exact) | gelu_tanh
    init_std: float = 0.02
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    scan_layers: bool = True
    scan_unroll: int = 0  # layers per scan iteration; 0: all on a CPU, 1 elsewhere
    remat_policy: str = "none"
    attention_impl: str = "auto"  # a name in attention_kernels.KERNELS
    attention_block_q: int = 0  # query tile or block (Pallas, chunked); 0: chosen
    attention_block_kv: int = 0  # Pallas kernels' key/value tile

    mlp_matrices: ClassVar[int] = 2  # up, down (for llmjax.models.flops_per_token)

    def __post_init__(self):
        for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "mlp_dim",
                     "num_labels", "max_positions", "type_vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config.model.{name}={getattr(self, name)} must be positive")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"config.model.embed_dim={self.embed_dim} must be a multiple of "
                             f"config.model.num_heads={self.num_heads}")
        for name in ("param_dtype", "dtype"):
            check_choice(name, getattr(self, name), DTYPES)
        check_choice("activation", self.activation, GELU_APPROXIMATE)
        check_choice("attention_impl", self.attention_impl, KERNELS)
        check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
        check_scan_unroll(self.scan_unroll)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads


class Block(nnx.Module):
    """Post-norm residual layer: ln(x + attn(x)), then ln(x + mlp(x))."""

    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        pdt, dt = DTYPES[cfg.param_dtype], DTYPES[cfg.dtype]
        self.attn = MultiHeadAttention(
            cfg.embed_dim, cfg.num_heads, causal=False, init_std=cfg.init_std, param_dtype=pdt,
            dtype=dt, implementation=cfg.attention_impl,
            block_q=cfg.attention_block_q, block_kv=cfg.attention_block_kv, rngs=rngs)
        self.attn_norm = LayerNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.mlp = GeluMLP(cfg.embed_dim, cfg.mlp_dim, activation=cfg.activation,
                           init_std=cfg.init_std, param_dtype=pdt, dtype=dt, rngs=rngs)
        self.mlp_norm = LayerNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)

    def __call__(self, x, segment_ids):
        x = self.attn_norm(x + self.attn(x, segment_ids))
        x = self.mlp_norm(x + self.mlp(x))
        return constrain(x, ("act_batch", "act_length", "act_embed"))


class Bert(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = DTYPES[cfg.param_dtype]
        init, zeros = nnx.initializers.normal(cfg.init_std), nnx.initializers.zeros
        d = cfg.embed_dim
        self.embed = param(rngs, init, (cfg.vocab_size, d), ("vocab", "embed"), pdt)
        self.pos_embed = param(rngs, init, (cfg.max_positions, d), ("positions", "embed"), pdt)
        self.type_embed = param(rngs, init, (cfg.type_vocab_size, d), ("types", "embed"), pdt)
        self.embed_norm = LayerNorm(d, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.pooler = param(rngs, init, (d, d), ("embed", "pooled"), pdt)
        self.pooler_bias = param(rngs, zeros, (d,), ("pooled",), pdt)
        self.classifier = param(rngs, init, (d, cfg.num_labels), ("embed", "labels"), pdt)
        self.classifier_bias = param(rngs, zeros, (cfg.num_labels,), ("labels",), pdt)
        # The masked-LM head; its decoder is the word embedding matrix (tied, as in BERT).
        self.mlm_dense = param(rngs, init, (d, d), ("embed", "mlm_hidden"), pdt)
        self.mlm_dense_bias = param(rngs, zeros, (d,), ("mlm_hidden",), pdt)
        self.mlm_norm = LayerNorm(d, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.mlm_bias = param(rngs, zeros, (cfg.vocab_size,), ("vocab",), pdt)

    def classify(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        """tokens [batch, length] int -> class logits [batch, num_labels] float32, pooled at
        each row's first token ([CLS]). Arguments as `hidden_states`."""
        dt = DTYPES[self.cfg.dtype]
        x = self.hidden_states(tokens, positions, segment_ids, token_type_ids)
        pooled = jnp.tanh(x[:, 0] @ self.pooler[...].astype(dt) + self.pooler_bias[...].astype(dt))
        logits = pooled @ self.classifier[...].astype(dt) + self.classifier_bias[...].astype(dt)
        return logits.astype(jnp.float32)

    def masked_lm_logits(self, tokens: jax.Array, positions: jax.Array | None = None,
                         segment_ids: jax.Array | None = None,
                         token_type_ids: jax.Array | None = None) -> jax.Array:
        """tokens [batch, length] int -> logits over the vocabulary [batch, length, vocab]
        float32 at every position (what a [MASK] there stands for). Arguments as
        `hidden_states`."""
        cfg = self.cfg
        dt = DTYPES[cfg.dtype]
        x = self.hidden_states(tokens, positions, segment_ids, token_type_ids)
        x = x @ self.mlm_dense[...].astype(dt) + self.mlm_dense_bias[...].astype(dt)
        x = self.mlm_norm(jax.nn.gelu(x, approximate=GELU_APPROXIMATE[cfg.activation]))
        logits = jnp.einsum("bld,vd->blv", x, self.embed[...].astype(dt))
        logits = logits + self.mlm_bias[...].astype(dt)
        return constrain(logits.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))

    def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None,
                      token_type_ids: jax.Array | None = None) -> jax.Array:
        """tokens [batch, length] int -> the encoder's output [batch, length, embed].

        One sequence per row. segment_ids [batch, length]: 0 marks padding (a Hugging Face
        attention_mask works as is); positions default to 0..length-1; token_type_ids
        default to 0.
        """
        cfg = self.cfg
        if tokens.shape[1] > cfg.max_positions:
            raise ValueError(f"sequences of {tokens.shape[1]} tokens are longer than BERT's "
                             f"config.model.max_positions={cfg.max_positions}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(tokens)
        x = (jnp.take(self.embed[...], tokens, axis=0)
             + jnp.take(self.pos_embed[...], positions, axis=0)
             + jnp.take(self.type_embed[...], token_type_ids, axis=0))
        x = self.embed_norm(x.astype(DTYPES[cfg.dtype]))
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        return run_blocks(self.blocks, x, segment_ids, scan_layers=cfg.scan_layers,
                          scan_unroll=cfg.scan_unroll, remat_policy=cfg.remat_policy)
