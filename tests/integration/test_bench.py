"""llmjax.training.benchmark: the measuring function gives sane numbers and a table with its row."""

import math

from llmjax.training import benchmark as bench


def test_measure_reports_sane_numbers_and_a_table(make_config):
    config = make_config(**{"model.vocab_size": 97, "peak_flops_per_device": 1e12})
    row, info = bench.measure(config, steps=2, warmup=0)

    assert len(row.step_seconds) == 2 and min(row.step_seconds) > 0
    assert row.tokens_per_step == config.global_batch_size * config.seq_len
    assert row.tokens_per_sec_best >= row.tokens_per_sec_median > 0
    assert 0 < row.mfu_median <= row.mfu_best <= 1
    assert row.compile_seconds > 0 and row.first_step_seconds > 0
    assert abs(row.first_loss - math.log(97)) < 1.0  # random tokens, fresh model
    assert row.memory_bytes["argument"] > 0
    assert info["num_devices"] == 8 and info["num_params"] > 0

    table = bench.format_table([row], bench.table_header("tiny", info))
    assert "MFU best/med" in table
    assert any(line.startswith("llmjax ") for line in table.splitlines())
