"""Fine-tuning: LoRA trains its adapters only (frozen weights bit-identical, optimizer state
on the adapters alone), merges for export and exports in the PEFT layout that peft loads to
the same logits; SFT prompts give no gradient; classification learns a small sentiment set
to >= 95% accuracy; early stopping stops and keeps the best checkpoint; llmjax.evaluate.

    python -m pytest tests/integration/test_finetune.py -s   # also prints the measured numbers
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import documented_metric_keys, straight_and_resumed_losses, tiny_config
from flax import nnx, traverse_util

from llmjax import hf
from llmjax.config import base_config, validate
from llmjax.data import sentiment
from llmjax.hf import peft
from llmjax.models import LlamaConfig, build_model
from llmjax.parallel import sharding
from llmjax.training import convert, lora, restore, setup
from llmjax.training.evaluation import evaluate_workdir
from llmjax.training.init_from import model_fields
from llmjax.training.loop import train_and_evaluate
from llmjax.training.state import init_params
from llmjax.training.tasks import lm_losses

MODEL = LlamaConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64)
TARGETS = "blocks/(attn/(q|v|o)|mlp/down)"  # both input layouts: embed-first and embed-last


def flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def lora_config(**overrides):
    cfg = base_config().lora
    cfg.update({"rank": 4, "alpha": 8.0, "targets": TARGETS, **overrides})
    return cfg


def train_lora(steps=5, lr=3e-2):
    """A few LoRA steps on random tokens: (graphdef, frozen, initial weights, state, losses)."""
    config = tiny_config(**{"grad_accum_steps": 2, "seq_len": 16, "optimizer.learning_rate": lr,
                            "optimizer.schedule": "constant", "optimizer.warmup_steps": 0,
                            "optimizer.weight_decay": 0.0, "optimizer.grad_clip_norm": 0.0})
    config.model = ml_collections.ConfigDict(model_fields(MODEL))
    config.lora = lora_config()
    run = setup.assemble(config)
    tokens = np.random.default_rng(0).integers(0, MODEL.vocab_size, (8, 17), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "segment_ids": np.ones((8, 16), np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)),
             "loss_mask": np.ones((8, 16), np.int32)}
    with sharding.activate(run.mesh, run.rules):
        frozen = setup.frozen_weights(run)
        initial = flat(frozen)  # host copies
        state = setup.initial_state(run, frozen)
        steps_ = setup.bind_steps(run, frozen)
        placed = sharding.global_batch(batch, run.batch_sharding, 8)
        losses = []
        for _ in range(steps):
            state, metrics = steps_.train(state, placed)
            losses.append(float(metrics["loss"]))
    return run.graphdef, frozen, initial, state, losses, config.lora, batch


@pytest.fixture(scope="module")
def trained():
    return train_lora()


def test_lora_trains_adapters_only_and_frozen_weights_stay_bit_identical(trained):
    graphdef, frozen, initial, state, losses, lora_cfg, _ = trained
    assert losses[-1] < losses[0] - 0.05, losses
    # The frozen weights, as passed to every step, are the initial ones bit for bit ...
    after = flat(frozen)
    assert all(np.array_equal(initial[k], after[k]) for k in initial)
    # ... and so are the weights the model runs with, except the adapted ones.
    merged = flat(lora.model_params(state.params, frozen, lora_cfg))
    adapted = set(lora.adapter_items(state.params["adapters"]))
    assert adapted == {"blocks/attn/q", "blocks/attn/v", "blocks/attn/o", "blocks/mlp/down"}
    for path in initial:
        assert np.array_equal(initial[path], merged[path]) == (path not in adapted), path
    # The optimizer state covers the adapters alone.
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * lora.count(state.params)
    n, total, fraction = lora.trainable_report(state.params, frozen)
    print(f"\nLoRA rank 4 on {TARGETS}: {n:,} of {total:,} parameters trainable "
          f"({100 * fraction:.2f}%)")
    assert fraction < 0.1


def test_lora_merged_unmerged_and_peft_export_agree(trained, tmp_path):
    import peft as hf_peft
    import torch
    import transformers

    graphdef, frozen, _, state, _, lora_cfg, batch = trained
    tokens = batch["inputs"][:2]
    ours = np.asarray(nnx.merge(graphdef, lora.model_params(state.params, frozen, lora_cfg))(
        jnp.asarray(tokens)))
    # Base weights and adapters written separately (HF model + PEFT adapter) ...
    hf.save_pretrained(nnx.merge(graphdef, frozen), str(tmp_path / "base"))
    modules = peft.save_peft(str(tmp_path / "adapter"), lora.adapter_items(
        state.params["adapters"]), flat(state.params["heads"]), rank=lora_cfg.rank,
        alpha=lora_cfg.alpha, model_cfg=MODEL)
    assert modules == ["down_proj", "o_proj", "q_proj", "v_proj"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(
        os.listdir(tmp_path / "adapter"))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
    peft_model = hf_peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        unmerged = peft_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    # ... and merged into the weights (what `llmjax.hf export` of a LoRA run writes).
    hf.save_pretrained(nnx.merge(graphdef, (
        lora.model_params(state.params, frozen, lora_cfg))), str(tmp_path / "merged"))
    merged_hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    with torch.no_grad():
        merged = merged_hf.eval()(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    changed = float(np.max(np.abs(ours - np.asarray(nnx.merge(graphdef, frozen)(
        jnp.asarray(tokens))))))
    print(f"\nLoRA logits vs base {changed:.3g}; merged vs unmerged (PEFT) "
          f"{np.max(np.abs(merged - unmerged)):.2g}; ours vs PEFT "
          f"{np.max(np.abs(ours - unmerged)):.2g}")
    assert changed > 1e-2  # the adapters do something
    np.testing.assert_allclose(merged, unmerged, atol=1e-5)
    np.testing.assert_allclose(ours, unmerged, atol=1e-5)


def test_sft_prompt_tokens_get_zero_gradient():
    graphdef, state = nnx.split(build_model(MODEL, 0))
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, MODEL.vocab_size, (2, 13), dtype=np.int32)
    mask = np.zeros((2, 12), np.int32)
    mask[:, 7:] = 1  # the first 7 targets are the prompt's
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
             "segment_ids": np.ones((2, 12), np.int32),
             "positions": np.tile(np.arange(12, dtype=np.int32), (2, 1))}

    @jax.jit
    def grads(b):
        return jax.grad(lambda p: lm_losses(nnx.merge(graphdef, p), b, 0.0)[0])(params)

    # Change the prompt's targets: gradients are bit-identical (they contribute nothing).
    other = dict(batch, targets=np.where(mask == 0, (batch["targets"] + 5) % MODEL.vocab_size,
                                         batch["targets"]))
    for a, b in zip(jax.tree.leaves(grads(batch)), jax.tree.leaves(grads(other)), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # A response target does change them.
    third = dict(batch, targets=np.where(mask == 1, (batch["targets"] + 5) % MODEL.vocab_size,
                                         batch["targets"]))
    assert not np.array_equal(np.asarray(grads(batch)["embed"]),
                              np.asarray(grads(third)["embed"]))


def write_sentiment(path):
    """bundled:sentiment (filler words and one positive or negative word) as a JSONL file."""
    with open(path, "w") as f:
        for text, label in zip(*sentiment.examples()):
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


def classify_config(source, **overrides):
    return tiny_config(**{
        "task": "classify", "data.train": source, "data.eval_fraction": 0.2,
        "num_train_steps": 60, "eval_every_steps": 20, "checkpoint_every_steps": 60,
        "global_batch_size": 16, "seq_len": 40, "optimizer.learning_rate": 3e-3,
        # A BPE this small learns a token per word here, which a 2-layer BERT needs in 60 steps.
        "data.tokenizer": "bpe:320",
        "optimizer.warmup_steps": 5, **overrides})


BERT = dict(family="bert", vocab_size=0, embed_dim=32, num_layers=2, num_heads=4, mlp_dim=64,
            max_positions=64, num_labels=2)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_classification_learns_sentiment(family, tmp_path):
    # The same records from a JSONL file (llama) and generated in memory (bert).
    source = (f"jsonl:{write_sentiment(tmp_path / 'sentiment.jsonl')}" if family == "llama"
              else "bundled:sentiment")
    config = classify_config(source, **{"model.num_labels": 2} if family == "llama" else {})
    if family == "bert":
        config.model = ml_collections.ConfigDict(BERT)
    start = time.perf_counter()
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    print(f"\n{family} sentiment: eval accuracy {summary['eval/accuracy']:.3f}, "
          f"F1 {summary['eval/f1']:.3f}, {time.perf_counter() - start:.1f}s")
    assert summary["eval/accuracy"] >= 0.95, summary
    assert summary["eval/f1"] >= 0.95
    # A classifier counts examples, and every key it logs is in the README's metrics table.
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        keys = {k for record in map(json.loads, f) for k in record} - {"step"}
    assert "train/examples" in keys and "train/loss_tokens" not in keys
    assert keys <= documented_metric_keys()
    # llmjax.evaluate on the same held-out examples gives the same numbers.
    out = tmp_path / "eval.json"
    result = evaluate_workdir(str(tmp_path / "run"), output=str(out))
    assert result["eval/accuracy"] == pytest.approx(summary["eval/accuracy"])
    assert json.loads(out.read_text())["examples"] == 120


def test_lora_classifier_trains_adapters_and_head(tmp_path):
    config = classify_config("bundled:sentiment", **{"model.num_labels": 2, "lora.rank": 4,
                                      "lora.targets": "blocks/attn/(q|v)",
                                      "lora.trainable": "score", "num_train_steps": 80,
                                      "optimizer.learning_rate": 1e-2})
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    print(f"\nLoRA + head sentiment: accuracy {summary['eval/accuracy']:.3f}, trainable "
          f"{100 * summary['trainable_fraction']:.2f}%")
    assert summary["trainable_fraction"] < 0.1
    assert summary["eval/accuracy"] >= 0.9


def test_early_stopping_keeps_the_best_checkpoint(tmp_path):
    # A learning rate this high makes eval loss stall and climb after the first evaluations.
    config = tiny_config(num_train_steps=60, eval_every_steps=2, checkpoint_every_steps=30,
                         **{"optimizer.learning_rate": 0.3, "optimizer.warmup_steps": 0,
                            "optimizer.schedule": "constant", "optimizer.grad_clip_norm": 0.0,
                            "early_stopping.metric": "eval/loss",
                            "early_stopping.patience": 3})
    workdir = str(tmp_path / "run")
    summary = train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = {r["step"]: r["eval/loss"] for r in map(json.loads, f) if "eval/loss" in r}
    best_step = min(evals, key=evals.get)
    last = max(evals)
    print(f"\nearly stopping: stopped at {last} of 60, best eval/loss {evals[best_step]:.3f} "
          f"at step {best_step}")
    assert summary["early_stopped"] and last < 60
    assert last == best_step + 3 * 2  # patience 3 evaluations without a better loss
    assert os.listdir(os.path.join(workdir, "best")) == [str(best_step)]
    best = evaluate_workdir(workdir, best=True)
    assert best["step"] == best_step
    assert best["eval/loss"] == pytest.approx(evals[best_step], rel=1e-5)


def test_finetune_config_errors_are_one_line():
    for key, value, expected in [("task", "regress", "config.task"),
                                 ("early_stopping.mode", "up", "early_stopping.mode"),
                                 ("early_stopping.patience", 2, "early_stopping.metric")]:
        with pytest.raises(ValueError, match=expected):
            validate(tiny_config(**{key: value}))
    with pytest.raises(ValueError, match="lora.targets"):
        abstract = nnx.split(jax.eval_shape(lambda: build_model(MODEL, 0)))[1]
        lora.init_adapters(init_params(MODEL, 0), lora.logical_axes(abstract),
                           lora_config(targets="nothing/here"), 0)


def test_chat_records_render_with_the_chat_template_and_train_on_the_reply(tmp_path):
    import transformers

    from llmjax.data.documents import tokenize_documents
    from llmjax.data.sources import Chat, read_documents
    from llmjax.data.tokenizer import load_tokenizer, save_trained, train_bpe

    chat = [{"role": "user", "content": "How are you?"},
            {"role": "assistant", "content": "Fine, thanks."}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    [document] = read_documents(f"jsonl:{tmp_path}/chat.jsonl#messages")
    assert isinstance(document, Chat)
    save_trained(train_bpe(["How are you? Fine, thanks."] * 4, 300), str(tmp_path / "tok"))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    hf_tokenizer.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>"
                                  "{% endfor %}{% if add_generation_prompt %}<|assistant|>"
                                  "{% endif %}")
    hf_tokenizer.save_pretrained(str(tmp_path / "tok"))
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    [tokens] = tokenize_documents(tokenizer, [document])
    prompt = tokenizer.decode(tokens["tokens"][:tokens["prompt_length"]])
    reply = tokenizer.decode(tokens["tokens"][tokens["prompt_length"]:])
    assert prompt == "<|user|>How are you?<|end|><|assistant|>"
    assert reply == "Fine, thanks.<|end|>"


@pytest.mark.parametrize("name", ["bert_sentiment", "lora_sft", "classify_lora"])
def test_finetune_configs_are_valid(name):
    import importlib

    module = importlib.import_module(f"configs.{name}")
    assert "Run:" in module.__doc__ and "Expect:" in module.__doc__
    for arg in (None, "tiny"):
        validate(module.get_config(arg))


def test_exporting_a_lora_run_merges_its_adapters(tmp_path):
    import torch
    import transformers

    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny_config(num_train_steps=6, **{"lora.rank": 4}), workdir)
    convert.export_checkpoint(workdir, str(tmp_path / "hf"))
    assert os.path.isfile(tmp_path / "hf" / "adapter" / "adapter_model.safetensors")
    # `hf export --adapter`: the same PEFT files alone, in OUT itself.
    convert.export_checkpoint(workdir, str(tmp_path / "peft"), adapter_only=True)
    assert sorted(os.listdir(tmp_path / "peft")) == ["adapter_config.json",
                                                     "adapter_model.safetensors"]
    for name in os.listdir(tmp_path / "peft"):
        assert ((tmp_path / "peft" / name).read_bytes()
                == (tmp_path / "hf" / "adapter" / name).read_bytes())
    model = restore.load_model(workdir)
    tokens = np.arange(1, 17, dtype=np.int32)[None]
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        theirs = exported(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), theirs, atol=1e-4)


def test_lora_run_resumes_to_the_same_losses(tmp_path):
    # Checkpoints hold the adapters alone; the frozen weights are rebuilt from the seed.
    straight, resumed = straight_and_resumed_losses(tmp_path, **{"lora.rank": 4})
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6), step
