"""GPT-2 in Flax NNX: learned positions, pre-norm LayerNorm blocks, GELU MLP, tied head.

Read top to bottom: `GPT2Config`, `Block` (x + attn(ln(x)), then + mlp(ln(x))) and
`GPT2` (token + position embeddings, the stacked blocks, a final LayerNorm and the
output head, which is the token embedding transposed). Attention and MLP are the
biased ones shared with BERT (llmjax.models.layers).
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.models.attention_kernels import KERNELS
from llmjax.models.kv_cache import Cache, init_cache, is_unstacked, run_blocks_cached
from llmjax.models.layers import (
    DTYPES,
    GELU_APPROXIMATE,
    REMAT_POLICIES,
    GeluMLP,
    LayerNorm,
    MultiHeadAttention,
    check_choice,
    check_scan_unroll,
    classify_last_token,
    constrain,
    param,
    run_blocks,
)
from llmjax.models.virtual_tokens import drop_prompt, num_virtual, virtual_inputs
from llmjax.models.weights import dense, lookup, weight


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    mlp_dim: int = 0  # 0: 4 * embed_dim
    max_positions: int = 1024  # rows of the learned position embedding
    norm_eps: float = 1e-5
    activation: str = "gelu_tanh"  # gelu_tanh (GPT-2's "gelu_new") | gelu (exact)
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

    mlp_matrices: ClassVar[int] = 2  # up, down (for llmjax.models.flops_per_token)

    def __post_init__(self):
        if self.mlp_dim == 0:
            object.__setattr__(self, "mlp_dim", 4 * self.embed_dim)
        for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "mlp_dim",
                     "max_positions"):
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
    """Pre-norm residual layer: x + attn(ln(x)), then + mlp(ln(x))."""

    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        pdt, dt = DTYPES[cfg.param_dtype], DTYPES[cfg.dtype]
        self.attn_norm = LayerNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.attn = MultiHeadAttention(
            cfg.embed_dim, cfg.num_heads, causal=True, init_std=cfg.init_std, param_dtype=pdt,
            dtype=dt, implementation=cfg.attention_impl,
            block_q=cfg.attention_block_q, block_kv=cfg.attention_block_kv, rngs=rngs)
        self.mlp_norm = LayerNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.mlp = GeluMLP(cfg.embed_dim, cfg.mlp_dim, activation=cfg.activation,
                           init_std=cfg.init_std, param_dtype=pdt, dtype=dt, rngs=rngs)

    def __call__(self, x, segment_ids, mask=None, prefix=None):
        x = x + self.attn(self.attn_norm(x), segment_ids, mask, prefix)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("act_batch", "act_length", "act_embed"))

    def decode(self, x, layer_cache, positions):
        attended, layer_cache = self.attn.decode(self.attn_norm(x), positions, layer_cache)
        x = x + attended
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("act_batch", "act_length", "act_embed")), layer_cache


class GPT2(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = DTYPES[cfg.param_dtype]
        init = nnx.initializers.normal(cfg.init_std)
        self.embed = param(rngs, init, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), pdt)
        self.pos_embed = param(rngs, init, (cfg.max_positions, cfg.embed_dim),
                               ("positions", "embed"), pdt)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = LayerNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        if cfg.num_labels:
            self.score = param(rngs, init, (cfg.embed_dim, cfg.num_labels), ("embed", "labels"),
                               pdt)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, *, prefix: jax.Array | None = None,
                 prompt: jax.Array | None = None) -> jax.Array:
        """tokens [batch, length] int -> next-token logits [batch, length, vocab] float32.

        positions [batch, length] (< max_positions) restart at 0 for each packed
        document (default 0..length-1); segment_ids [batch, length] keep attention
        inside a document. `prefix` [layers, 2, P, heads, head_dim] or `prompt` [P, embed]:
        trained virtual tokens before every document (llmjax.models.virtual_tokens; the
        real tokens' positions move up by P).
        """
        logits = self.logits(self.hidden_states(tokens, positions, segment_ids, prefix=prefix,
                                                prompt=prompt))
        return constrain(logits, ("act_batch", "act_length", "act_vocab"))

    def logits(self, x: jax.Array) -> jax.Array:
        """Final LayerNorm outputs [..., embed] -> next-token logits [..., vocab] float32
        (the head is the token embedding, transposed)."""
        return dense(x, self.embed, DTYPES[self.cfg.dtype], transposed=True).astype(jnp.float32)

    def init_cache(self, batch: int, length: int) -> Cache:
        """An empty key/value cache for `batch` rows of `length` positions."""
        cfg = self.cfg
        return init_cache(cfg.num_layers, batch, length, cfg.num_heads, cfg.head_dim,
                          DTYPES[cfg.dtype], per_layer=is_unstacked(self.blocks))

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: Cache
               ) -> tuple[jax.Array, Cache]:
        """The cached forward (llmjax.models.kv_cache): tokens [batch, T] at positions
        [batch, T] (< max_positions) -> (final LayerNorm outputs [batch, T, embed], the
        cache with their keys and values)."""
        cfg = self.cfg
        x = lookup(self.embed, tokens) + lookup(self.pos_embed, positions)
        x = constrain(x.astype(DTYPES[cfg.dtype]), ("act_batch", "act_length", "act_embed"))
        x, cache = run_blocks_cached(self.blocks, x, cache, positions,
                                     scan_layers=cfg.scan_layers)
        return self.final_norm(x), cache

    def classify(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens [batch, length] -> class logits [batch, num_labels] float32, from each row's
        last token whose segment id is not 0 (padding), through the `score` head."""
        if not self.cfg.num_labels:
            raise ValueError("this model has no classifier head: set config.model.num_labels")
        x = self.hidden_states(tokens, positions, segment_ids)
        return classify_last_token(x, segment_ids, weight(self.score, DTYPES[self.cfg.dtype]))

    def hidden_states(self, tokens: jax.Array, positions: jax.Array | None,
                      segment_ids: jax.Array | None, *, prefix: jax.Array | None = None,
                      prompt: jax.Array | None = None) -> jax.Array:
        """The final LayerNorm's output [batch, length, embed]."""
        cfg = self.cfg
        virtual = prefix is not None or prompt is not None
        num = num_virtual(prefix, prompt) if virtual else 0
        if tokens.shape[1] + num > cfg.max_positions:
            raise ValueError(f"sequences of {tokens.shape[1]} tokens (and {num} virtual ones) "
                             "are longer than GPT-2's config.model.max_positions="
                             f"{cfg.max_positions}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if virtual:
            x, positions, mask = virtual_inputs(lookup(self.embed, tokens), positions,
                                                segment_ids, prefix=prefix, prompt=prompt)
            x = x + lookup(self.pos_embed, positions)
            x = constrain(x.astype(DTYPES[cfg.dtype]), ("act_batch", "act_length", "act_embed"))
            x = run_blocks(self.blocks, x, None, mask, scan_layers=cfg.scan_layers,
                           scan_unroll=cfg.scan_unroll, remat_policy=cfg.remat_policy,
                           per_layer=prefix)
            x = self.final_norm(x)
            return x if prompt is None else drop_prompt(x, tokens.shape[0], num)
        x = lookup(self.embed, tokens) + lookup(self.pos_embed, positions)
        x = constrain(x.astype(DTYPES[cfg.dtype]), ("act_batch", "act_length", "act_embed"))
        x = run_blocks(self.blocks, x, segment_ids, scan_layers=cfg.scan_layers,
                       scan_unroll=cfg.scan_unroll, remat_policy=cfg.remat_policy)
        return self.final_norm(x)
