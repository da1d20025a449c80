"""Masked-LM pretraining end to end: BERT's masked-LM head against transformers'
BertForMaskedLM (a tiny random model built here, never downloaded), and
configs/bert_mlm.py:tiny trained once: resumed to the same losses, exported, and a
classifier (configs/bert_word_order.py, pointed at that run) fine-tuned from it."""

import importlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import documented_metric_keys
from flax import nnx, traverse_util
from hf_models import LENGTH, VOCAB, make_hf_model

from llmjax import hf
from llmjax.training import checkpoint, convert, restore, setup
from llmjax.training.loop import train_and_evaluate
from llmjax.training.state import init_params


def hf_masked_lm_logits(model, tokens, mask, types):
    with torch.no_grad():
        return model(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                     token_type_ids=torch.tensor(types)).logits.numpy()


def our_masked_lm_logits(model, tokens, mask, types):
    return np.asarray(model.masked_lm_logits(jnp.asarray(tokens), segment_ids=jnp.asarray(mask),
                                             token_type_ids=jnp.asarray(types)))


def test_masked_lm_head_matches_transformers_and_exports(tmp_path):
    hf_model = make_hf_model("bert", transformers.BertForMaskedLM, num_labels=2)
    hf_model.save_pretrained(tmp_path / "hf")
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, VOCAB, (2, LENGTH))
    mask = np.ones((2, LENGTH), np.int64)
    mask[1, -4:] = 0
    types = (np.arange(LENGTH)[None] >= 6).astype(np.int64).repeat(2, 0)
    reference = hf_masked_lm_logits(hf_model, tokens, mask, types)

    model = hf.from_pretrained(str(tmp_path / "hf"))
    ours = our_masked_lm_logits(model, tokens, mask, types)
    assert ours.shape == reference.shape == (2, LENGTH, VOCAB)
    assert reference.std() > 0.1  # logits that differ, not a trivial match
    real = mask.astype(bool)  # padding's logits do not matter (its queries differ)
    np.testing.assert_allclose(ours[real], reference[real], atol=1e-5, rtol=1e-5)

    # Written as a masked LM, reloaded by transformers: the same logits.
    hf.save_pretrained(model, str(tmp_path / "out"), task="mlm")
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["architectures"] == ["BertForMaskedLM"]
    reloaded = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(hf_masked_lm_logits(reloaded, tokens, mask, types)[real],
                               ours[real], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """configs/bert_mlm.py:tiny trained in a workdir."""
    workdir = str(tmp_path_factory.mktemp("bert_mlm"))
    train_and_evaluate(tiny_mlm_config(), workdir)
    return workdir


def tiny_mlm_config():
    config = importlib.import_module("configs.bert_mlm").get_config("tiny")
    config.peak_flops_per_device = 1e9  # skip measuring the CPU
    config.log_every_steps = 1
    config.async_checkpointing = False  # every checkpoint complete when the run returns
    return config


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def test_an_mlm_run_resumes_to_the_same_losses(pretrained, tmp_path):
    # The masks come from (seed, step): resumed steps draw the ones the first run did.
    workdir = str(tmp_path / "resumed")
    shutil.copytree(pretrained, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))  # as if stopped after step 3
    train_and_evaluate(tiny_mlm_config(), workdir)
    first, resumed = losses(pretrained), losses(workdir)
    assert sorted(resumed) == sorted(first) == list(range(1, 7))
    for step in range(4, 7):
        assert resumed[step] == pytest.approx(first[step], rel=1e-6), step


def test_pretrain_export_and_fine_tune_from_the_run(pretrained, tmp_path):
    with open(os.path.join(pretrained, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert {k for r in records for k in r} - {"step"} <= documented_metric_keys()
    evals = [r for r in records if "eval/masked_accuracy" in r]
    assert evals and {"eval/loss", "eval/perplexity"} <= set(evals[-1])
    assert 0.0 <= evals[-1]["eval/masked_accuracy"] <= 1.0

    # Export: transformers' BertForMaskedLM gives the run's logits.
    model = restore.load_model(pretrained)
    convert.export_checkpoint(pretrained, str(tmp_path / "hf"))
    reloaded = transformers.BertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    tokens = np.random.default_rng(0).integers(4, 300, (2, 16))
    mask, types = np.ones_like(tokens), np.zeros_like(tokens)
    np.testing.assert_allclose(hf_masked_lm_logits(reloaded, tokens, mask, types),
                               our_masked_lm_logits(model, tokens, mask, types), atol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").mask_token == "<mask>"

    # A classifier from the run: its encoder, a fresh pooler and classifier.
    config = importlib.import_module("configs.bert_word_order").get_config()
    config.init_from = pretrained
    config.data.tokenizer = os.path.join(pretrained, "tokenizer")
    config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps = 2, 2, 2
    config.peak_flops_per_device = 1e9
    run = setup.assemble(config, 300)
    start = traverse_util.flatten_dict(jax.device_get(setup.initial_state(run, None).params),
                                       sep="/")
    stored = traverse_util.flatten_dict(jax.device_get(checkpoint.restore_params(
        pretrained, None, run.abstract_state.params, run.state_shardings.params)), sep="/")
    fresh = traverse_util.flatten_dict(jax.device_get(jax.jit(
        lambda: init_params(run.model_cfg, config.seed))()), sep="/")
    for path, value in start.items():
        expected = fresh if path.split("/")[0] in ("pooler", "pooler_bias", "classifier",
                                                   "classifier_bias") else stored
        np.testing.assert_array_equal(value, expected[path], err_msg=path)
    assert not np.array_equal(start["pooler"], stored["pooler"])

    finetuned = str(tmp_path / "classifier")
    summary = train_and_evaluate(config, finetuned)
    assert 0.0 <= summary["eval/accuracy"] <= 1.0
    assert nnx.to_pure_dict(nnx.state(restore.load_model(finetuned)))["classifier"].shape == (
        32, 2)
