"""MFU's denominator on a CPU is a fixed figure (the same at every start, whatever the load),
its numerator counts every matmul, and MFU is logged and printed in percent; an evaluation
short of config.eval_batches says so."""

import jax
import pytest
from conftest import tiny_config

from llmjax.models import flops_per_token, model_config
from llmjax.training import evaluation, flops, metrics


def test_the_cpu_peak_is_fixed_per_core_and_shared_by_the_local_devices():
    peak, source = flops.peak_flops_per_device()
    assert peak == flops.CPU_PEAK_FLOPS_PER_CORE * flops.cpu_cores() / jax.local_device_count()
    assert flops.peak_flops_per_device() == (peak, source)  # nothing measured: the same again
    assert "nominal CPU peak" in source and "config.peak_flops_per_device" in source
    assert flops.peak_flops_per_device(5e9) == (5e9, "config.peak_flops_per_device")


def test_mfu_is_in_percent_in_metrics_and_on_the_console(capsys):
    throughput = metrics.Throughput(flops_per_token=1e6, peak_flops_per_device=1e9)
    throughput.reset(0)
    report = throughput.report(4, tokens_per_step=256)
    peak_total = 1e9 * jax.device_count()
    assert report["train/mfu"] == pytest.approx(
        100 * report["train/tokens_per_sec"] * 1e6 / peak_total)
    assert report["train/tokens_per_sec"] == pytest.approx(
        4 * 256 / (report["train/step_time_ms"] * 4 / 1000))
    metrics.ConsoleWriter(10).write_scalars(4, {"train/mfu": 12.345})
    assert capsys.readouterr().out.strip() == "step 4/10 | train/mfu 12.3%"


def test_an_evaluation_short_of_its_batches_says_so():
    config = tiny_config(eval_batches=8)
    assert evaluation.short_eval_note(config, [{}] * 8) == ""
    assert evaluation.short_eval_note(config, [{}] * 6) == (
        "the eval data fill 6 of config.eval_batches=8 batches of 8 x 32")
    config.task = "classify"  # a classifier evaluates every example, in as many batches
    assert evaluation.short_eval_note(config, [{}] * 6) == ""


def test_flops_per_token_counts_the_matmuls_and_the_full_attention():
    # The benchmark's reference model: 8 layers of 512 (8 heads of 64), SwiGLU 1408,
    # an untied 8192-token head; rows of 512.
    cfg = model_config(dict(vocab_size=8192, embed_dim=512, num_layers=8, num_heads=8,
                            num_kv_heads=8, mlp_dim=1408))
    matmuls = 6 * (8 * (4 * 512 * 512 + 3 * 512 * 1408) + 512 * 8192)
    attention = 12 * 8 * 512 * 512  # scores and values over the whole square
    assert flops_per_token(cfg, 512) == matmuls + attention
