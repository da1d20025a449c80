"""Meshes and rule presets: degrees resolve or fail by name; the Llama 3 8B state is split."""

import math

import jax
import pytest

from llmjax.parallel import sharding
from llmjax.training import setup


def test_minus_one_takes_the_remaining_devices():
    mesh = sharding.make_mesh(dict(data=2, fsdp=-1, sequence=1, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}


@pytest.mark.parametrize("degrees, message", [
    (dict(data=-1, fsdp=-1), "at most one ICI degree may be -1"),
    (dict(data=3, fsdp=-1), r"do not divide 8 devices"),
    (dict(data=2, fsdp=2), r"use 4 devices but 8 are there"),
])
def test_bad_degrees_are_named(degrees, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(degrees)


def test_a_mesh_axis_the_rules_ignore_is_refused():
    mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=4))
    with pytest.raises(ValueError, match=r"config\.mesh\.tensor=4 .*\['fsdp\+tp', 'tp'\]"):
        sharding.batch_sharding(mesh, sharding.logical_axis_rules("fsdp"))
    sharding.batch_sharding(mesh, sharding.logical_axis_rules("fsdp+tp"))  # uses it: fine


def test_llama3_8b_abstract_state_is_sharded():
    from configs.llama3_8b import get_config

    run = setup.assemble(get_config())  # fsdp = all 8 devices; nothing allocated
    abstract, shardings = run.abstract_state, run.state_shardings
    assert abs(run.num_params - 8.03e9) / 8.03e9 < 0.01, run.num_params
    big = 0
    for tree, tree_shardings in [(abstract.params, shardings.params),
                                 (abstract.opt_state, shardings.opt_state)]:
        for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(tree_shardings)):
            if math.prod(leaf.shape) >= 1_000_000:
                big += 1
                shard = s.shard_shape(leaf.shape)
                assert math.prod(shard) * 8 == math.prod(leaf.shape), (leaf.shape, s.spec)
    assert big == 3 * 9  # embed, head, q, k, v, o, gate, up, down: params, mu, nu
