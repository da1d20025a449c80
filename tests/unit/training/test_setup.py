"""llmjax.training.setup decides everything before a step runs: what trains (all of the
model, or LoRA's adapters and heads with the rest frozen), where it lives, and the batch
each task takes. Nothing here compiles or allocates a model."""

import jax
import ml_collections
import pytest
from conftest import tiny_config

from llmjax.training import lora, setup

BERT = dict(family="bert", vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, mlp_dim=64,
            max_positions=64, num_labels=2)


def test_a_full_run_trains_every_parameter():
    run = setup.assemble(tiny_config(**{"model.vocab_size": 64}))
    assert run.frozen is None
    assert run.num_trainable == run.num_params > 0
    state, batch, frozen = run.abstract_inputs()
    assert frozen is None and set(batch) == {"inputs", "targets", "segment_ids", "positions",
                                             "loss_mask"}
    assert {x.shape for x in batch.values()} == {(8, 32)}
    # The optimizer state mirrors the parameters' shardings (FSDP over the 8 devices).
    embed = run.state_shardings.params["embed"]
    assert embed.spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_lora_trains_adapters_and_named_heads_only():
    config = tiny_config(**{"model.vocab_size": 64, "model.num_labels": 2, "task": "classify",
                            "lora.rank": 4, "lora.trainable": "score"})
    run = setup.assemble(config)
    trainable = run.abstract_state.params
    assert set(trainable) == {"adapters", "heads"} and set(trainable["heads"]) == {"score"}
    assert set(lora.adapter_items(trainable["adapters"])) == {"blocks/attn/q", "blocks/attn/v"}
    assert run.num_trainable < 0.2 * run.num_params
    assert run.frozen is not None and "embed" in run.frozen.abstract
    _, batch, frozen = run.abstract_inputs()
    assert {k: v.shape for k, v in batch.items()} == {
        "inputs": (8, 32), "segment_ids": (8, 32), "positions": (8, 32), "labels": (8,),
        "loss_mask": (8,)}
    assert jax.tree.structure(frozen) == jax.tree.structure(run.frozen.abstract)


def test_bert_classifies_and_cannot_train_as_a_language_model():
    config = tiny_config(task="classify")
    config.model = ml_collections.ConfigDict(BERT)
    assert setup.assemble(config).task.name == "classify"
    config.task = "lm"
    with pytest.raises(ValueError, match="is a classifier: set config.task=classify"):
        setup.assemble(config)


def test_model_overrides_apply_after_the_config():
    run = setup.assemble(tiny_config(**{"model.vocab_size": 64}),
                         model_overrides={"num_layers": 1, "scan_layers": False})
    assert run.model_cfg.num_layers == 1 and not run.model_cfg.scan_layers
