"""Prefix and prompt tuning (config.peft.method): only the virtual tokens train, every base
weight stays bit for bit what it was; a packed row gives each document what it gets alone
with the virtual tokens before it; bad configs fail in one line naming the key."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config
from flax import traverse_util

from llmjax.config import validate
from llmjax.models import GPT2Config, LlamaConfig, build_model
from llmjax.parallel import sharding
from llmjax.training import peft_methods, setup

LLAMA = dict(family="llama", vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
             num_kv_heads=2, mlp_dim=64)
GPT2 = dict(family="gpt2", vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
            max_positions=64)


def flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def peft_config(method, model, **overrides):
    config = tiny_config(**{"peft.method": method, "peft.num_virtual_tokens": 3,
                            "seq_len": 16, "optimizer.learning_rate": 0.1,
                            "optimizer.schedule": "constant", "optimizer.warmup_steps": 0,
                            **overrides})
    config.model = ml_collections.ConfigDict(model)
    return config


@pytest.mark.parametrize("method,model", [("prefix", LLAMA), ("prompt", GPT2)],
                         ids=["prefix-llama", "prompt-gpt2"])
def test_only_the_virtual_tokens_train(method, model):
    run = setup.assemble(peft_config(method, model))
    cfg = run.model_cfg
    shape = ((cfg.num_layers, 2, 3, cfg.num_kv_heads, cfg.head_dim) if method == "prefix"
             else (3, cfg.embed_dim))
    assert jax.tree.map(lambda x: x.shape, run.abstract_state.params) == {method: shape}
    tokens = np.random.default_rng(0).integers(0, 64, (8, 17), dtype=np.int32)
    # Two documents per row (packed), so the virtual tokens serve both.
    segments = np.repeat(np.array([[1] * 9 + [2] * 7]), 8, axis=0).astype(np.int32)
    positions = np.concatenate([np.arange(9), np.arange(7)])[None].repeat(8, 0).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
             "positions": positions, "loss_mask": np.ones((8, 16), np.int32)}
    with sharding.activate(run.mesh, run.rules):
        frozen = setup.frozen_weights(run)
        initial = flat(frozen)
        state = setup.initial_state(run, frozen)
        first = np.asarray(state.params[method])
        steps = setup.bind_steps(run, frozen)
        placed = sharding.global_batch(batch, run.batch_sharding, 8)
        losses = []
        for _ in range(3):
            state, metrics = steps.train(state, placed)
            losses.append(float(metrics["loss"]))
    assert losses[2] < losses[1] < losses[0], losses
    after = flat(frozen)
    assert all(np.array_equal(initial[k], after[k]) for k in initial)
    assert not np.array_equal(first, np.asarray(state.params[method]))
    # Optimizer moments for the virtual tokens alone; the share the start line prints.
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * int(np.prod(shape))
    assert run.num_params == run.num_trainable + sum(x.size for x in initial.values())
    assert run.num_trainable / run.num_params < 0.1


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_a_packed_row_gives_each_document_what_it_gets_alone(family, method):
    if family == "gpt2":
        cfg = GPT2Config(**{k: v for k, v in GPT2.items() if k != "family"})
    else:
        cfg = LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "family"},
                          sliding_window=4 if family == "mistral" else 0)
    model = build_model(cfg, 0)
    rng = np.random.default_rng(1)
    shape = ((cfg.num_layers, 2, 3, cfg.num_kv_heads, cfg.head_dim) if method == "prefix"
             else (3, cfg.embed_dim))
    virtual = {method: jnp.asarray(rng.standard_normal(shape), jnp.float32)}
    a, b = rng.integers(0, 64, 5), rng.integers(0, 64, 7)
    packed = jnp.asarray(np.concatenate([a, b])[None], jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(5), np.arange(7)])[None], jnp.int32)
    segments = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
    together = np.asarray(model(packed, positions, segments, **virtual))[0]
    # Each alone, one per row (the first padded at its end, which no earlier token sees).
    alone = np.asarray(model(jnp.asarray(np.stack([np.pad(a, (0, 2)), b]), jnp.int32),
                             **virtual))
    np.testing.assert_allclose(together, np.concatenate([alone[0, :5], alone[1]]), atol=2e-5)
    # ... and the virtual tokens change what every document's tokens predict.
    plain = np.asarray(model(jnp.asarray(b[None], jnp.int32)))[0]
    assert np.max(np.abs(plain - alone[1])) > 1e-2


@pytest.mark.parametrize("overrides,key", [
    ({"peft.method": "adapter"}, "config.peft.method"),
    ({"peft.method": "prefix", "peft.num_virtual_tokens": 0}, "config.peft.num_virtual_tokens"),
    ({"peft.method": "prompt", "lora.rank": 4}, "config.lora.rank=4"),
    ({"peft.method": "prefix", "task": "classify", "model.num_labels": 2}, "config.task=lm"),
    ({"peft.method": "prompt", "sample.max_new_tokens": 8}, "config.sample.max_new_tokens"),
])
def test_bad_peft_configs_fail_in_one_line(overrides, key):
    with pytest.raises(ValueError, match=key) as error:
        validate(tiny_config(**overrides))
    assert "\n" not in str(error.value)


def test_learned_positions_must_hold_the_virtual_tokens_too():
    config = peft_config("prefix", GPT2, seq_len=62)
    with pytest.raises(ValueError, match="config.peft.num_virtual_tokens=3 is longer than"):
        setup.assemble(config)
    config.seq_len = 61
    assert setup.assemble(config).frozen is not None


def test_lora_runs_keep_their_layout():
    assert peft_methods.method_of({}) == "lora"  # a config.json written before config.peft
    run = setup.assemble(tiny_config(**{"model.vocab_size": 64, "lora.rank": 4}))
    assert set(run.abstract_state.params) == {"adapters", "heads"}
    assert run.num_params == run.num_trainable + sum(
        x.size for x in jax.tree.leaves(run.frozen.abstract))
