"""The --reference benchmark's rows: every ratio compares stacks timed in one group on one
allocator, and each lever is timed beside the default row."""

import pytest

from llmjax import runtime
from llmjax.training import benchmark_reference
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
    with pytest.raises(ValueError, match="--levers=mkl: choose from onednn"):
        benchmark_reference.reference_rows(["mkl"])


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


def test_the_ceiling_is_the_matmul_peak_over_the_causal_flops_of_a_token():
    # 4096 tokens a step: 1 s is 4096 tok/s, 2 s 2048; the ceiling 100e9 / 20e6 = 5000.
    rows = [row("llmjax, jemalloc", 1.0), row("HF torch eager (sdpa), jemalloc", 2.0),
            row("llmjax, jemalloc + --xla_cpu_use_onednn=true", 0.8)]
    line = benchmark_reference.ceiling_line(
        rows, {"matmul_peak": 100e9, "causal_flops_per_token": 20e6})
    assert "fp32 matmul peak 100 GFLOP/s" in line and "20.0 MFLOP a token" in line
    assert "passes 5,000 tok/s" in line
    assert line.endswith("llmjax, jemalloc 82%, HF torch eager (sdpa), jemalloc 41%")
