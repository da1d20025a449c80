"""The same losses on 1 device and on 8-device meshes (sequence parallelism included);
accumulation == one full batch; the Llama 3 8B config's abstract state is fully sharded."""

import math

import jax
import numpy as np
import pytest
from conftest import tiny_config

from llmjax import optim, sharding
from llmjax.models import model_config
from llmjax.step import init_train_state, jit_train_step, state_layout

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
    config = tiny_config()
    model_cfg = model_config(config.model, vocab_size=128)
    tx = optim.make_optimizer(config.optimizer, config.num_train_steps)
    schedule = optim.learning_rate_schedule(config.optimizer, config.num_train_steps)
    mesh = sharding.make_mesh(mesh_axes, devices)
    logical_rules = sharding.logical_axis_rules(rules)
    graphdef, _, shardings = state_layout(model_cfg, tx, 0, mesh, logical_rules)
    batch_sharding = sharding.batch_sharding(mesh, logical_rules)
    with sharding.activate(mesh, logical_rules):
        state = jax.jit(lambda: init_train_state(model_cfg, tx, 0), out_shardings=shardings)()
        step = jit_train_step(graphdef, tx, schedule, grad_accum_steps=grad_accum_steps,
                              z_loss=1e-4, state_shardings=shardings,
                              batch_sharding=batch_sharding)
        losses = []
        for batch in synthetic_batches(128):
            state, metrics = step(state, sharding.global_batch(batch, batch_sharding, BATCH))
            losses.append(float(metrics["loss"]))
    return np.array(losses), state


@pytest.fixture(scope="module")
def single_device():
    return train_losses(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])


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
    losses, _ = train_losses(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1],
                             grad_accum_steps=4)
    np.testing.assert_allclose(losses, reference, atol=1e-5, rtol=0)


def test_llama3_8b_abstract_state_is_sharded():
    from configs.llama3_8b import get_config

    config = get_config()
    model_cfg = model_config(config.model)
    tx = optim.make_optimizer(config.optimizer, config.num_train_steps)
    mesh = sharding.make_mesh(config.mesh)  # fsdp = all 8 devices
    rules = sharding.logical_axis_rules(config.mesh.rules)
    _, abstract, shardings = state_layout(model_cfg, tx, 0, mesh, rules)
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    assert abs(num_params - 8.03e9) / 8.03e9 < 0.01, num_params
    big = 0
    for tree, tree_shardings in [(abstract.params, shardings.params),
                                 (abstract.opt_state, shardings.opt_state)]:
        for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(tree_shardings)):
            if math.prod(leaf.shape) >= 1_000_000:
                big += 1
                shard = s.shard_shape(leaf.shape)
                assert math.prod(shard) * 8 == math.prod(leaf.shape), (leaf.shape, s.spec)
    assert big == 3 * 9  # embed, head, q, k, v, o, gate, up, down: params, mu, nu


def test_a_mesh_axis_the_rules_ignore_is_refused():
    mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=4))
    with pytest.raises(ValueError, match=r"config\.mesh\.tensor=4 .*\['fsdp\+tp', 'tp'\]"):
        sharding.batch_sharding(mesh, sharding.logical_axis_rules("fsdp"))
    sharding.batch_sharding(mesh, sharding.logical_axis_rules("fsdp+tp"))  # uses it: fine
