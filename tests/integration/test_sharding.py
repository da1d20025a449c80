"""The same losses on 1 device and on 8-device meshes (sequence parallelism included);
accumulation == one full batch; the Llama 3 8B config's abstract state is fully sharded."""


import jax
import numpy as np
import pytest
from conftest import tiny_config

from llmjax.parallel import sharding
from llmjax.training import setup

BATCH, LENGTH, STEPS = 16, 32, 4


def synthetic_batches(vocab):
    """Packed-looking batches: two documents per row, padding at the end of some rows."""
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(STEPS):
        tokens = rng.integers(0, vocab, (BATCH, LENGTH + 1)).astype(np.int32)
        segment_ids = np.where(np.arange(LENGTH) < 20, 1, 2).astype(np.int32)
        segment_ids = np.tile(segment_ids, (BATCH, 1))
        segment_ids[::3, 28:] = 0  # padding
        positions = np.where(segment_ids == 2, np.arange(LENGTH) - 20, np.arange(LENGTH))
        batches.append(dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                            segment_ids=segment_ids, positions=positions.astype(np.int32),
                            loss_mask=(segment_ids > 0).astype(np.int32)))
    return batches


def train_losses(mesh_axes, devices, rules="fsdp+tp", grad_accum_steps=1):
    config = tiny_config(**{"model.vocab_size": 128, "z_loss": 1e-4, "mesh.rules": rules,
                            "grad_accum_steps": grad_accum_steps, "global_batch_size": BATCH,
                            **{f"mesh.{axis}": size for axis, size in mesh_axes.items()}})
    run = setup.assemble(config, devices=devices)
    with sharding.activate(run.mesh, run.rules):
        state = setup.initial_state(run, None)
        steps = setup.bind_steps(run, None)
        losses = []
        for batch in synthetic_batches(128):
            state, metrics = steps.train(state, sharding.global_batch(batch, run.batch_sharding,
                                                                      BATCH))
            losses.append(float(metrics["loss"]))
    return np.array(losses), state


@pytest.fixture(scope="module")
def single_device():
    return train_losses(dict(data=1, fsdp=1, sequence=1, tensor=1), jax.devices()[:1])


@pytest.mark.parametrize("mesh_axes", [dict(data=8, fsdp=1, tensor=1),
                                       dict(data=2, fsdp=4, tensor=1),
                                       dict(data=1, fsdp=2, tensor=4),
                                       dict(data=2, fsdp=1, tensor=4, rules="tp"),
                                       dict(data=8, fsdp=1, tensor=1, rules="dp"),
                                       dict(data=2, sequence=4),
                                       dict(fsdp=2, sequence=2, tensor=2)],
                         ids=["data8", "data2_fsdp4", "fsdp2_tensor4", "tp", "dp",
                              "data2_sequence4", "fsdp2_sequence2_tensor2"])
def test_mesh_gives_single_device_losses(single_device, mesh_axes):
    assert len(jax.devices()) == 8
    reference, reference_state = single_device
    mesh_axes = dict(mesh_axes)
    rules = mesh_axes.pop("rules", "fsdp+tp")
    losses, state = train_losses(mesh_axes, jax.devices(), rules=rules)
    assert reference[-1] < reference[0]  # it trains
    np.testing.assert_allclose(losses, reference, atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_fsdp_shrinks_per_device_state(single_device):
    _, replicated_state = single_device
    _, state = train_losses(dict(data=1, fsdp=8, tensor=1), jax.devices(), rules="fsdp")
    full = sharding.addressable_bytes(replicated_state.params)
    per_device = sharding.addressable_bytes(state.params)
    # everything but norm scales is split 8 ways
    assert per_device < full / 6


def test_gradient_accumulation_equals_full_batch(single_device):
    reference, _ = single_device
    losses, _ = train_losses(dict(data=1, fsdp=1, sequence=1, tensor=1), jax.devices()[:1],
                             grad_accum_steps=4)
    np.testing.assert_allclose(losses, reference, atol=1e-5, rtol=0)
