"""The --reference benchmark's rows: every ratio compares stacks timed in one group on one
allocator, each lever is timed beside the default row, and the bound that the step's
matrix products set is counted as the FLOP formula counts them."""

import os

import pytest

from llmjax import runtime
from llmjax.models import flops_per_token, model_config
from llmjax.training import benchmark_products, benchmark_reference
from llmjax.training.benchmark import Measurement


def test_each_allocator_is_a_group_of_all_three_stacks_and_levers_sit_beside_the_default():
    groups = benchmark_reference.reference_rows(["onednn", "ynn"])
    allocators = ["jemalloc", "glibc"] if runtime.jemalloc_path() else ["glibc"]
    first, levers, rest = groups[0], groups[1:3], groups[3:]
    per_allocator = [first, *rest]  # one group each: at most three workers alive at once
    assert [[r.label.split(", ")[-1] for r in g] for g in per_allocator] == [
        [a] * 3 for a in allocators]
    for group in per_allocator:
        assert [r.kind for r in group] == ["llmjax", "jax", "torch"]
        assert all(r.env == group[0].env for r in group)  # the same allocator settings
    assert [g[0] for g in levers] == [first[0], first[0]]
    assert "--xla_cpu_use_onednn=true" in levers[0][1].env["XLA_FLAGS"]
    assert levers[0][1].env["LD_PRELOAD"] == first[0].env["LD_PRELOAD"]
    with pytest.raises(ValueError, match="--levers=mkl: choose from control, onednn"):
        benchmark_reference.reference_rows(["mkl"])
    (control,) = benchmark_reference.reference_rows(["control"])[1:2]
    assert control[1].label == f"{first[0].label} + nothing (control)"
    assert control[1].env == {**first[0].env, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}


def row(name, seconds):
    return Measurement(name=name, step_seconds=[seconds], tokens_per_step=4096,
                       flops_per_token=1.0, peak_flops=1.0, compile_seconds=0.0,
                       first_step_seconds=0.0, first_loss=0.0, memory_bytes={},
                       faults_per_step=0.0, cpu_seconds_per_step=(0.0, 0.0))


def test_ratios_are_median_tokens_per_second_within_an_allocator():
    rows = [row("llmjax, jemalloc", 1.0), row("plain JAX reference, jemalloc", 1.25),
            row("HF torch eager (sdpa), jemalloc", 2.0), row("llmjax, glibc", 2.0),
            row("plain JAX reference, glibc", 2.0), row("HF torch eager (sdpa), glibc", 1.0),
            row("llmjax, jemalloc + --xla_cpu_use_onednn=true", 0.8)]
    assert benchmark_reference.ratio_lines(rows) == [
        "jemalloc: llmjax / HF torch eager 2.00x, llmjax / plain JAX 1.25x",
        "glibc: llmjax / HF torch eager 0.50x, llmjax / plain JAX 1.00x",
        "--xla_cpu_use_onednn=true: +25.0% against llmjax, jemalloc (timed in the same group)"]


def test_the_steps_products_count_the_flops_of_a_causal_step():
    cfg = model_config(dict(vocab_size=8192, embed_dim=512, num_layers=8, num_heads=8,
                            num_kv_heads=2, mlp_dim=1408))
    products = benchmark_products.step_products(cfg, rows=8, seq_len=512)
    causal_half = 12 * 8 * 512 * 8 * 64 / 2  # of the attention flops_per_token counts
    assert sum(p.count * p.flops for p in products) == pytest.approx(
        (flops_per_token(cfg, 512) - causal_half) * 8 * 512)


def test_the_floor_takes_the_faster_kernel_per_shape_and_the_ceiling_is_tokens_over_it():
    products = [benchmark_products.Product(2, 1, 100, 100, 100),  # 2e6 FLOPs each
                benchmark_products.Product(0.5, 4, 10, 10, 10)]  # 8e3 FLOPs
    floor = benchmark_products.matmul_floor(products, {"jax": [1e-4, 1e-6],
                                                       "torch": [2e-4, 4e-7]})
    assert floor["seconds"] == pytest.approx(2 * 1e-4 + 0.5 * 4e-7)
    assert floor["peak"] == pytest.approx(2e10)  # 8e3 FLOPs in 4e-7 s
    rows = [row("llmjax, jemalloc", 1.0), row("HF torch eager (sdpa), jemalloc", 2.0),
            row("llmjax, jemalloc + --xla_cpu_use_onednn=true", 0.8)]
    line = benchmark_products.ceiling_line(rows, {"seconds": 0.5, "peak": 2e11}, 4096)
    assert "take 0.50 s: no implementation passes 8,192 tok/s" in line
    assert "fastest product 200 GFLOP/s" in line
    assert line.endswith("llmjax, jemalloc 50%, HF torch eager (sdpa), jemalloc 25%")
