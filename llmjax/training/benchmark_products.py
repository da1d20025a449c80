"""The least time a training step's matrix products take on this CPU, each timed alone.

A step of the benchmark's decoder multiplies the same few shapes many times (every
weight's forward product, its input gradient and its weight gradient; attention's scores
and values). Timed alone in the plain-JAX worker and in the torch worker (XLA's kernels
and torch's), the faster of the two for each shape, times how often the step runs it,
adds up to the time no implementation of that step beats: it runs all of those products,
and never faster than the fastest kernel at hand runs them alone. The benchmark prints
that bound as tokens/s beside the table (`ceiling_line`), and MFU's denominator is the
fastest rate any of the shapes reached.
"""

import dataclasses
from typing import Any

from llmjax.models import ModelConfig
from llmjax.training.benchmark import Measurement, best_seconds


@dataclasses.dataclass(frozen=True)
class Product:
    """`count` products of [batch, m, k] x [batch, k, n] in a step (batch 1: a plain matmul;
    a causal attention product counts half, the part a causal kernel computes)."""
    count: float
    batch: int
    m: int
    k: int
    n: int

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.k * self.n


def step_products(cfg: ModelConfig, rows: int, seq_len: int) -> list[Product]:
    """The float32 products of one training step of the Llama-style decoder `cfg` on
    `rows` x `seq_len` tokens (an untied output head; the embedding lookup is no product)."""
    tokens, d, layers = rows * seq_len, cfg.embed_dim, cfg.num_layers
    q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    weights = [(layers, d, q_width), (2 * layers, d, kv_width), (layers, q_width, d),
               ((cfg.mlp_matrices - 1) * layers, d, cfg.mlp_dim), (layers, cfg.mlp_dim, d),
               (1, d, cfg.vocab_size)]
    products = []
    for count, fan_in, fan_out in weights:
        products += [Product(count, 1, tokens, fan_in, fan_out),  # forward
                     Product(count, 1, tokens, fan_out, fan_in),  # input gradient
                     Product(count, 1, fan_in, tokens, fan_out)]  # weight gradient
    # Attention per layer: scores (q k^T; backward dO v^T) and values (p v; backward dv,
    # dq, dk), each over the causal half of the square.
    heads = rows * cfg.num_heads
    products += [Product(layers * 2 * 0.5, heads, seq_len, cfg.head_dim, seq_len),
                 Product(layers * 4 * 0.5, heads, seq_len, seq_len, cfg.head_dim)]
    return products


def w_time_products(install: str, kind: str, shapes: list[tuple[int, int, int, int]],
                    reps: int = 7) -> dict[str, Any]:
    """(Runs in a baselines worker: `kind` "jax" or "torch".) The best of `reps` timings
    of each float32 product [batch, m, k] x [batch, k, n] in `shapes`, alone."""
    del install  # the module this function was installed in; nothing else is needed
    if kind == "torch":
        import torch

        def make(batch, m, k, n):
            a, b = torch.randn(batch, m, k).squeeze(0), torch.randn(batch, k, n).squeeze(0)
            return lambda: torch.matmul(a, b)
    else:
        import jax
        import jax.numpy as jnp

        product = jax.jit(jnp.matmul)

        def make(batch, m, k, n):
            a = jnp.ones((batch, m, k) if batch > 1 else (m, k), jnp.float32)
            b = jnp.ones((batch, k, n) if batch > 1 else (k, n), jnp.float32)
            return lambda: product(a, b).block_until_ready()
    return {"seconds": [best_seconds(make(*shape), reps) for shape in shapes]}


def matmul_floor(products: list[Product], timed: dict[str, list[float]]) -> dict[str, float]:
    """From each worker's best seconds per product (`timed`: kind -> seconds, in the order
    of `products`): the step's least product time (the faster kernel for each shape,
    times its count) and the fastest rate any shape reached (FLOP/s)."""
    fastest = [min(seconds[i] for seconds in timed.values()) for i in range(len(products))]
    return {"seconds": sum(p.count * s for p, s in zip(products, fastest)),
            "peak": max(p.flops / s for p, s in zip(products, fastest))}


def ceiling_line(rows: list[Measurement], floor: dict[str, float], tokens: int) -> str:
    """The tokens/s that the step's products alone allow, and each allocator row's share."""
    ceiling = tokens / floor["seconds"]
    shares = ", ".join(f"{r.name} {r.tokens_per_sec_median / ceiling:.0%}" for r in rows
                       if r.name.endswith((", jemalloc", ", glibc")))
    return (f"the step's matrix products, each at the faster of XLA's and torch's speed for "
            f"its shape alone, take {floor['seconds']:.2f} s: no implementation passes "
            f"{ceiling:,.0f} tok/s on this CPU (fastest product "
            f"{floor['peak'] / 1e9:.0f} GFLOP/s, MFU's peak); median share: {shares}")
