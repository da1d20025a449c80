"""MFU's denominator on a CPU is a fixed figure (the same at every start, whatever the load)
and MFU is logged and printed in percent."""

import jax
import pytest

from llmjax.training import flops, metrics


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
