"""The Pallas attention kernels (splash, flash) in interpret mode and the chunked CPU
kernel, float32, against XLA's attention: outputs and gradients within 1e-5 for every
mask the families use (chunked hands bidirectional attention to XLA), a whole train step
on a tiny Llama, and splash under an 8-device mesh against one device.

Rows are 256 tokens in tiles of 128, so a document that spans positions 40..190 crosses
a tile boundary: the kernels' masks must hold across tiles, not only inside one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llmjax.models import build_model, model_config
from llmjax.models.layers import attention, constrain
from llmjax.parallel import sharding
from llmjax.training import step, tasks
from llmjax.training.state import TrainState

LENGTH, HEAD_DIM, TOL = 256, 32, 1e-5
BLOCKS = dict(block_q=128, block_kv=128)


def packed_ids(lengths_per_row):
    """[rows, LENGTH] segment ids: documents 1, 2, ... of the given lengths (0 after)."""
    rows = []
    for lengths in lengths_per_row:
        ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
        rows.append(np.pad(ids, (0, LENGTH - len(ids))))
    return jnp.asarray(np.stack(rows), jnp.int32)


# name -> (heads, kv_heads, causal, sliding_window, segment ids)
CASES = {
    "causal_gqa": (4, 2, True, 0, None),
    "packed_mqa": (2, 1, True, 0, packed_ids([[40, 150, 66], [128, 100, 28]])),
    "sliding_window_packed": (2, 2, True, 48, packed_ids([[40, 150, 66], [256]])),
    "bidirectional_padding": (2, 2, False, 0, packed_ids([[100, 90], [200]])),
}


def inputs(heads, kv_heads, batch=2, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, LENGTH, heads, HEAD_DIM), jnp.float32)
    k = jax.random.normal(keys[1], (batch, LENGTH, kv_heads, HEAD_DIM), jnp.float32)
    v = jax.random.normal(keys[2], (batch, LENGTH, kv_heads, HEAD_DIM), jnp.float32)
    return q, k, v, jax.random.normal(keys[3], q.shape, jnp.float32)


def value_and_grads(kernel, case, q, k, v, cotangent):
    """Attention's output and the gradients of <output, cotangent> w.r.t. q, k, v."""
    _, _, causal, window, ids = CASES[case]
    # Chunked in blocks of 96 queries: a last block shorter than the others.
    blocks = {**BLOCKS, "block_q": 96} if kernel == "chunked" else BLOCKS

    def project(q, k, v):
        out = attention(q, k, v, ids, kernel, causal=causal, sliding_window=window, **blocks)
        return jnp.sum(out * cotangent), out

    grads, out = jax.jit(jax.grad(project, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def max_diffs(result, reference):
    (out, grads), (ref_out, ref_grads) = result, reference
    return [float(jnp.max(jnp.abs(a - b))) for a, b in zip((out, *grads), (ref_out, *ref_grads))]


@pytest.mark.parametrize("kernel", ["splash", "flash", "chunked"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_xla_forward_and_gradients(kernel, case):
    heads, kv_heads, _, window, _ = CASES[case]
    q, k, v, cotangent = inputs(heads, kv_heads)
    if kernel == "flash" and window:
        with pytest.raises(ValueError, match="attention_impl=flash has no sliding window"):
            value_and_grads(kernel, case, q, k, v, cotangent)
        return
    diffs = max_diffs(value_and_grads(kernel, case, q, k, v, cotangent),
                      value_and_grads("xla", case, q, k, v, cotangent))
    print(f"{kernel} {case}: max |diff| out, dq, dk, dv = {diffs}")
    assert max(diffs) < TOL, diffs


def tiny_llama(kernel):
    # init_std 0.3: attention far from uniform, gradients far from zero. Chunked runs
    # the 128 tokens in blocks of 32 queries (document 2 starts inside the third).
    block = 32 if kernel == "chunked" else 128
    return model_config(dict(vocab_size=64, embed_dim=64, num_layers=2, num_heads=2,
                             num_kv_heads=1, mlp_dim=128, init_std=0.3,
                             attention_impl=kernel, attention_block_q=block,
                             attention_block_kv=128))


def lm_batch(rows=2, length=128):
    tokens = jax.random.randint(jax.random.key(1), (rows, length + 1), 0, 64)
    ids = np.ones((rows, length), np.int32)
    ids[0, 70:] = 2  # row 0 packs two documents (70 and 58 tokens), row 1 holds one
    positions = np.where(ids == 2, np.arange(length) - 70, np.arange(length))
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": jnp.asarray(ids), "positions": jnp.asarray(positions),
            "loss_mask": jnp.ones((rows, length), jnp.float32)}


def one_train_step(kernel):
    """(loss, gradients) of one SGD step at learning rate 1: the update is -gradient."""
    graphdef, params = nnx.split(build_model(tiny_llama(kernel), seed=0))
    params = nnx.to_pure_dict(params)
    tx = optax.sgd(1.0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    new_state, metrics = jax.jit(lambda s, b: step.train_step(
        s, b, None, graphdef=graphdef, tx=tx, schedule=optax.constant_schedule(1.0),
        task=tasks.TASKS["lm"], merge=lambda trainable, frozen: trainable,
        grad_accum_steps=1, z_loss=0.0))(state, lm_batch())
    grads = jax.tree.map(jnp.subtract, params, new_state.params)
    return metrics["loss"], grads


@pytest.mark.parametrize("kernel", ["splash", "chunked"])
def test_a_train_step_matches_xla(kernel):
    # Not flash: its forward and gradients are checked above, and each train step is a
    # compile of the whole model.
    loss, grads = one_train_step(kernel)
    ref_loss, ref_grads = one_train_step("xla")
    grad_diff = max(jax.tree.leaves(jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), grads, ref_grads)))
    largest = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads))
    print(f"{kernel} train step: loss {float(ref_loss):.4f}, |loss diff| "
          f"{abs(float(loss - ref_loss)):.2e}, max |grad diff| {grad_diff:.2e} "
          f"(largest |grad| {largest:.2e})")
    assert abs(float(loss - ref_loss)) < TOL and grad_diff < TOL
    assert largest > 1e-2  # gradients that could show a difference


def splash_with_grads(q, k, v, ids, cotangent):
    """Splash attention's output and gradients, with q, k, v laid out as the model's
    activations are under the rules in scope (no-ops without them)."""
    def project(q, k, v):
        q, k, v = (constrain(x, ("act_batch", "act_length", "act_heads", None))
                   for x in (q, k, v))
        out = attention(q, k, v, ids, "splash", sliding_window=0, **BLOCKS)
        return jnp.sum(out * cotangent), out
    grads, out = jax.grad(project, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@functools.cache
def mesh_case():
    """Inputs for the mesh test (4 rows, 4 heads sharing 1 K/V head) and the one-device
    result."""
    q, k, v, cotangent = inputs(4, 1, batch=4)
    ids = jnp.tile(CASES["packed_mqa"][4], (2, 1))
    return (q, k, v, ids, cotangent), jax.jit(splash_with_grads)(q, k, v, ids, cotangent)


@pytest.mark.parametrize("mesh_shape", [{"data": 4, "tensor": 2, "fsdp": 1},
                                        {"data": 2, "sequence": 2, "tensor": 2, "fsdp": 1}])
def test_splash_under_a_mesh_matches_one_device(mesh_shape):
    # Rows over data, heads over tensor; the one K/V head does not divide tensor=2, so
    # each shard takes its queries' own copy. With a split length the kernel sees whole rows.
    args, one_device = mesh_case()
    mesh = sharding.make_mesh(mesh_shape)
    with sharding.activate(mesh, sharding.logical_axis_rules("fsdp+tp")):
        sharded = jax.jit(splash_with_grads)(*args)
        text = jax.jit(splash_with_grads).lower(*args).as_text()
    assert "sdy.manual_computation" in text or "shard_map" in text  # per-shard kernels
    diffs = max_diffs(sharded, one_device)
    print(f"splash mesh {mesh_shape}: max |diff| out, dq, dk, dv = {diffs}")
    assert max(diffs) < TOL, diffs
