"""The fit check's verdict: a layout fits a chip when its compiled total is within the
margin of the chip's memory; when it does not, the levers' search returns a layout whose
own compiled total fits. Four compiles of a tiny model on 8 simulated devices."""

import pytest
from conftest import tiny_config

from llmjax.training import accelerators, memory, setup
from llmjax.training.accelerators import GIB, Accelerator


def chip(memory_bytes: float) -> Accelerator:
    return Accelerator("test", ("no such device",), int(memory_bytes), 1e12)


def test_the_table_names_the_chips_by_name_and_slice():
    assert accelerators.by_name("v5p").memory_bytes == 95 * GIB
    assert accelerators.by_name("v5p-128") == accelerators.by_name("v5p")
    assert accelerators.by_name("A100-80GB").memory_bytes == 80 * GIB
    for name in ("v4", "v5e", "v6e", "a100-40gb", "h100", "h200", "b200"):
        assert accelerators.by_name(name).name == name
    with pytest.raises(ValueError, match="--accelerator='tpu9'"):
        accelerators.by_name("tpu9")


def test_fits_with_headroom_and_does_not_fit_then_finds_a_layout():
    # Activations dominate this config (256 positions, 32-wide model): microbatches help.
    config = tiny_config(**{"model.vocab_size": 256, "seq_len": 256, "global_batch_size": 16})
    total = memory.measure_memory(config)["total_bytes"]

    roomy = memory.Verdict(chip(2 * total), total)
    assert roomy.fits and roomy.headroom_bytes == total
    assert str(roomy).startswith("fits: ") and "headroom" in str(roomy) and "(50%)" in str(roomy)

    usable = 0.8 * total  # the configured layout needs 25% more than this chip allows
    small = chip(usable / memory.MARGIN)
    tight = memory.Verdict(small, total)
    assert not tight.fits and tight.headroom_bytes < 0
    assert str(tight).startswith("does not fit: ") and " over" in str(tight)
    # Within the chip's memory but not within the margin is "does not fit" too.
    assert not memory.Verdict(chip(total / (memory.MARGIN + 0.05)), total).fits

    [layout] = memory.search_layouts(config, small, max_layouts=1)
    # Cheapest lever first: the configured remat policy, two microbatches.
    assert layout["overrides"] == {"grad_accum_steps": 2}
    assert layout["verdict"].fits and layout["verdict"].total_bytes <= usable < total
    assert 0.5 < layout["mfu_bound"] <= 1.0


def test_the_levers_come_cheapest_first():
    config = tiny_config(**{"model.remat_policy": "dots", "mesh.data": 2})
    ladders = list(memory.candidate_layouts(config))
    # Remat from "dots" to "full", each on the configured mesh, then every device on FSDP.
    fsdp = {"mesh.data": 1, "mesh.tensor": 1, "mesh.fsdp": -1}
    assert [ladder[0] for ladder in ladders] == [
        {}, fsdp, {"model.remat_policy": "dots_no_batch"},
        {**fsdp, "model.remat_policy": "dots_no_batch"}, {"model.remat_policy": "full"},
        {**fsdp, "model.remat_policy": "full"}]
    # Microbatches that divide the batch of 8, fewest first.
    assert [x.get("grad_accum_steps", 1) for x in ladders[0]] == [1, 2, 4, 8]


def test_attention_memory_per_layer_is_that_of_the_chips_kernel():
    # 8 rows over data=2, 4 heads over tensor=4: 4 rows and 1 head of 8 wide per device.
    config = tiny_config(**{"model.vocab_size": 64, "seq_len": 8192, "mesh.data": 2,
                            "mesh.fsdp": 1, "mesh.tensor": 4})
    run = setup.assemble(config)  # nothing compiles
    kernel_bytes = 4 * 1 * 8192 * (8 * 4 + 4)  # the fp32 output and log-sum-exp per query
    xla_bytes = kernel_bytes + 4 * 1 * 8192 * 8192 * 8  # + fp32 scores and probabilities
    tpu = memory.attention_memory(config, run, "tpu")
    assert tpu == {"kernel": "splash", "platform": "tpu", "bytes": kernel_bytes,
                   "xla_bytes": xla_bytes}
    assert memory.attention_memory(config, run, "gpu")["kernel"] == "flash"  # packed
    # On a CPU, chunked: 64 blocks of 128 queries, block i against 128 * (i + 1) keys.
    cpu = memory.attention_memory(config, run, "cpu")
    assert cpu["kernel"] == "chunked"
    assert cpu["bytes"] == kernel_bytes + 4 * 1 * 128 * 128 * sum(range(1, 65)) * 8
