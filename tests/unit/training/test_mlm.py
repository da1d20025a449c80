"""Masked-LM training: the masking rates, what is never masked, where the loss looks, and
that a step's mask depends on (seed, step) and the batch alone."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config

from llmjax.config import validate
from llmjax.data import masked
from llmjax.models import build_model, model_config
from llmjax.parallel import sharding
from llmjax.training import masking, setup, tasks

MASK_ID, VOCAB = 3, 1000
MASKING = masking.Masking(mask_id=MASK_ID, vocab_size=VOCAB)


def test_rates_are_fifteen_percent_of_which_eighty_ten_ten():
    rows, length = 400, 512  # 204,800 tokens, 3/4 of them maskable
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(10, VOCAB, (rows, length)), jnp.int32)
    maskable = jnp.asarray(rng.random((rows, length)) < 0.75, jnp.int32)
    corrupted, chosen = masking.mask_tokens(jax.random.key(1), tokens, maskable, MASKING)
    tokens, maskable, corrupted, chosen = map(np.asarray, (tokens, maskable, corrupted, chosen))
    assert not chosen[maskable == 0].any()
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.01
    picked_tokens, picked = tokens[chosen], corrupted[chosen]
    assert abs(np.mean(picked == MASK_ID) - 0.8) < 0.01
    # A random replacement equals the original 1 time in VOCAB: within the 1%.
    assert abs(np.mean(picked == picked_tokens) - 0.1) < 0.01
    assert abs(np.mean((picked != MASK_ID) & (picked != picked_tokens)) - 0.1) < 0.01
    np.testing.assert_array_equal(corrupted[~chosen], tokens[~chosen])  # the rest untouched


def test_special_tokens_and_padding_are_never_masked():
    special = (0, 1, 2, MASK_ID)  # pad, [CLS], [SEP], [MASK]
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 40, (64, 128)).astype(np.int32)  # 10% special ids
    segment_ids = np.ones_like(inputs)
    segment_ids[:, 100:] = 0  # padding (pad id or not)
    batch = masked.maskable({"inputs": inputs, "targets": inputs * 0,
                             "segment_ids": segment_ids, "positions": segment_ids * 0,
                             "loss_mask": segment_ids}, special)
    np.testing.assert_array_equal(batch["targets"], inputs)
    allowed = ~np.isin(inputs, special) & (segment_ids > 0)
    np.testing.assert_array_equal(batch["loss_mask"], allowed.astype(np.int32))
    everywhere = masking.Masking(mask_id=MASK_ID, vocab_size=40, mask_rate=1.0)
    for seed in range(5):
        out = masking.mask_batch(jax.tree.map(jnp.asarray, batch), jax.random.key(seed),
                                 everywhere)
        chosen = np.asarray(out["loss_mask"]) > 0
        np.testing.assert_array_equal(chosen, allowed)  # rate 1: every allowed one, no other
        np.testing.assert_array_equal(np.asarray(out["inputs"])[~allowed], inputs[~allowed])
        np.testing.assert_array_equal(np.asarray(out["targets"]), inputs)


def test_the_loss_has_zero_gradient_outside_the_masked_positions():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 16, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (4, 16)), jnp.int32)
    loss_mask = jnp.asarray(rng.random((4, 16)) < 0.15, jnp.int32)
    grads = jax.grad(lambda x: tasks.token_losses(x, targets, loss_mask, 1e-4)[0])(logits)
    per_position = np.abs(np.asarray(grads)).sum(-1)
    assert np.all(per_position[np.asarray(loss_mask) == 0] == 0.0)
    assert np.all(per_position[np.asarray(loss_mask) == 1] > 0.0)
    _, _, count = tasks.token_losses(logits, targets, loss_mask, 0.0)
    assert float(count) == float(loss_mask.sum())


def test_a_steps_mask_depends_on_seed_step_and_batch_alone():
    batch = {"inputs": jnp.arange(8 * 32, dtype=jnp.int32).reshape(8, 32) % 97 + 4,
             "loss_mask": jnp.ones((8, 32), jnp.int32)}
    mlm = ml_collections.ConfigDict(dict(tiny_config().mlm))
    mlm.mask_id = MASK_ID
    task = tasks.make_task("mlm", mlm, VOCAB)

    def chosen(seed, step, b=batch):
        return np.asarray(task.prepare(b, seed, None if step is None else jnp.int32(step))
                          ["loss_mask"])

    np.testing.assert_array_equal(chosen(0, 5), chosen(0, 5))
    assert (chosen(0, 5) != chosen(0, 6)).any() and (chosen(0, 5) != chosen(1, 5)).any()
    np.testing.assert_array_equal(chosen(0, None), chosen(0, None))  # every evaluation alike
    other = {**batch, "inputs": batch["inputs"] + 1}
    assert (chosen(0, None) != chosen(0, None, other)).any()  # eval batches differ

    # Sharded over 8 devices (the batch axis), under jit: the same bits.
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    placed = jax.device_put(batch, spec)
    jitted = jax.jit(lambda b, step: task.prepare(b, 0, step)["loss_mask"])
    np.testing.assert_array_equal(np.asarray(jitted(placed, jnp.int32(5))), chosen(0, 5))


def test_mlm_needs_an_encoder_and_sane_rates():
    config = tiny_config(task="mlm")  # the tiny config's model is a Llama
    with pytest.raises(ValueError, match="config.task=mlm needs an encoder"):
        validate(config)
    config.model = ml_collections.ConfigDict(dict(
        family="bert", vocab_size=0, embed_dim=32, num_layers=1, num_heads=4, mlp_dim=64))
    validate(config)
    for key, value, match in (("mask_rate", 0.0, "config.mlm.mask_rate"),
                              ("random_token_share", 0.3, "config.mlm.mask_token_share")):
        bad = config.copy_and_resolve_references()
        bad.mlm[key] = value
        with pytest.raises(ValueError, match=match):
            validate(bad)


def test_the_masked_lm_head_is_tied_to_the_word_embeddings():
    cfg = model_config(dict(family="bert", vocab_size=50, embed_dim=16, num_layers=1,
                            num_heads=2, mlp_dim=32))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 8)), jnp.int32)

    @jax.jit
    def logits_of(embed_scale):
        model = build_model(cfg, 0)
        model.embed[...] = model.embed[...] * embed_scale
        return model.masked_lm_logits(tokens)

    logits = logits_of(1.0)
    assert logits.shape == (2, 8, 50) and logits.dtype == jnp.float32
    # The decoder is the embedding: scaling it moves the logits.
    assert not np.allclose(np.asarray(logits_of(2.0)), np.asarray(logits))


def test_assemble_records_the_tokenizers_mask_id():
    config = tiny_config(task="mlm")
    config.model = ml_collections.ConfigDict(dict(
        family="bert", vocab_size=300, embed_dim=32, num_layers=1, num_heads=4, mlp_dim=64))
    run = setup.assemble(config, 300, mask_id=7)
    assert run.config.mlm.mask_id == 7 and run.task.name == "mlm"
