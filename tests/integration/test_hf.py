"""llmjax.hf against transformers, for every family: tiny random HF models (built here with
CPU torch, never downloaded) load with the same logits, export to files transformers
reloads to the same logits, and import -> export -> import keeps every bit; a fine-tune
started from HF weights resumes from its own checkpoint; bad inputs fail clearly.

    python -m pytest tests/integration/test_hf.py -s   # also prints the measured differences
"""

import importlib
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_config
from flax import nnx
from hf_models import HF_MODELS, LENGTH, VOCAB, make_hf_model

from llmjax import hf
from llmjax.config import validate
from llmjax.hf import reader
from llmjax.models import build_model, flops_per_token, model_config
from llmjax.training import convert, init_from, restore
from llmjax.training.loop import train_and_evaluate
from llmjax.training.setup import build_data

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MEASURED = {}  # family -> (max |logit diff|, max per-token KL), printed at the end


def padded_batch(encoder: bool):
    """tokens, attention mask and positions: a full row, a right-padded row and (decoders)
    a left-padded row, whose positions count from its first token."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, VOCAB, (3, LENGTH))
    mask = np.ones((3, LENGTH), np.int64)
    mask[1, -4:] = 0
    if not encoder:
        mask[2, :3] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return tokens, mask, positions


def hf_logits(model, tokens, mask, positions, token_types=None):
    with torch.no_grad():
        kwargs = dict(attention_mask=torch.tensor(mask))
        if token_types is None:
            kwargs["position_ids"] = torch.tensor(positions)
        else:
            kwargs["token_type_ids"] = torch.tensor(token_types)
        return model(torch.tensor(tokens), **kwargs).logits.numpy()


def our_logits(model, tokens, mask, positions, token_types=None):
    if token_types is None:
        return np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)))
    return np.asarray(model.classify(jnp.asarray(tokens), segment_ids=jnp.asarray(mask),
                                     token_type_ids=jnp.asarray(token_types)))


def differences(ours, theirs):
    """(max |logit difference|, max per-token KL(theirs || ours)) in float64."""
    ours, theirs = ours.astype(np.float64), theirs.astype(np.float64)
    log_p = theirs - np.log(np.exp(theirs).sum(-1, keepdims=True))
    log_q = ours - np.log(np.exp(ours).sum(-1, keepdims=True))
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    return float(np.abs(ours - theirs).max()), float(kl.max())


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small trained tokenizer, carried along by import and export."""
    from llmjax.data.sources import read_documents
    from llmjax.data.tokenizer import load_tokenizer

    workdir = tmp_path_factory.mktemp("tok")
    load_tokenizer("bpe:300", read_documents("bundled:shakespeare")[:20], str(workdir))
    return str(workdir / "tokenizer")


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_round_trip_matches_transformers(name, tmp_path, tokenizer_dir):
    encoder = name == "bert"
    hf_model = make_hf_model(name)
    hf_model.save_pretrained(tmp_path / "hf")
    for filename in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, filename), tmp_path / "hf")
    tokens, mask, positions = padded_batch(encoder)
    types = (np.arange(LENGTH)[None] >= 6).astype(np.int64).repeat(3, 0) if encoder else None
    reference = hf_logits(hf_model, tokens, mask, positions, types)
    keep = slice(None) if encoder else mask.astype(bool)  # logits of padding do not matter

    # HF -> llmjax: the same logits.
    model = hf.from_pretrained(str(tmp_path / "hf"))
    padding_positions, segment_ids = hf.padding_inputs(mask)
    np.testing.assert_array_equal(padding_positions, positions)
    np.testing.assert_array_equal(segment_ids, mask)
    ours = our_logits(model, tokens, mask, positions, types)
    assert ours.shape == reference.shape
    max_diff, max_kl = differences(ours[keep], reference[keep])
    MEASURED[name] = (max_diff, max_kl)
    assert max_diff <= 1e-4 and max_kl <= 1e-6, (max_diff, max_kl)
    assert reference[keep].std() > 0.1  # logits that differ, not a trivial match

    # import -> export -> transformers reloads it: the HF model's logits again.
    convert.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "imported"))
    convert.export_checkpoint(str(tmp_path / "imported"), str(tmp_path / "exported"),
                         max_shard_size="40KB" if name == "llama" else "5GB")
    reloaded = type(hf_model).from_pretrained(tmp_path / "exported").eval()
    again = hf_logits(reloaded, tokens, mask, positions, types)
    np.testing.assert_array_equal(again[keep], reference[keep])
    if name == "llama":  # sharded: several files and an index
        assert os.path.isfile(tmp_path / "exported" / "model.safetensors.index.json")
        assert len([f for f in os.listdir(tmp_path / "exported") if f.endswith(".safetensors")]) > 1
    # The tokenizer came along, with its special token ids in config.json.
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert tokenizer.encode("ROMEO:") == transformers.AutoTokenizer.from_pretrained(
        tokenizer_dir).encode("ROMEO:")
    assert reloaded.config.eos_token_id == tokenizer.eos_token_id

    # ... and importing the export gives bit-identical parameters.
    convert.import_checkpoint(str(tmp_path / "exported"), str(tmp_path / "again"))
    first = nnx.to_pure_dict(nnx.state(restore.load_model(str(tmp_path / "imported"))))
    second = nnx.to_pure_dict(nnx.state(restore.load_model(str(tmp_path / "again"))))
    loaded = nnx.to_pure_dict(nnx.state(model))
    for a, b, c in zip(jax.tree.leaves(first), jax.tree.leaves(second), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_each_device_reads_only_its_slice(tmp_path, monkeypatch):
    """Loading reads every HF tensor element once in all, though 8 devices each hold a
    slice (FSDP) or a copy (norms) of each parameter."""
    make_hf_model("llama").save_pretrained(tmp_path)
    read_elements = []
    original_read = reader.HFTensors.read

    def counting_read(self, name, index):
        block = original_read(self, name, index)
        read_elements.append(block.size)
        return block

    monkeypatch.setattr(reader.HFTensors, "read", counting_read)
    model = hf.from_pretrained(str(tmp_path))
    q = model.blocks.attn.q[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
    assert {s.data.shape for s in q.addressable_shards} == {(2, 4, 4, 8)}
    tensors = reader.HFTensors(str(tmp_path))
    assert sum(read_elements) == sum(np.prod(tensors.shape(n)) for n in tensors.files)


def test_bert_without_a_classifier_gets_a_fresh_one(tmp_path):
    """As in transformers: a released BERT (BertModel, no head) starts a new classifier."""
    make_hf_model("bert").bert.save_pretrained(tmp_path)  # the bare encoder + pooler
    tokens, mask, _ = padded_batch(encoder=True)
    model = hf.from_pretrained(str(tmp_path), num_labels=5)
    assert model.classify(jnp.asarray(tokens), segment_ids=jnp.asarray(mask)).shape == (3, 5)
    reference = make_hf_model("bert")
    np.testing.assert_array_equal(np.asarray(model.pooler[...]),
                                  reference.bert.pooler.dense.weight.detach().numpy().T)


def test_init_from_reads_hf_and_imported_directories_alike(tmp_path):
    save_tiny_llama(tmp_path / "hf")
    convert.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "imported"))
    def resolved(directory, vocab_size):
        config = tiny_config(init_from=str(tmp_path / directory),
                             **{"model.dtype": "bfloat16", "model.embed_dim": 64})
        return init_from.resolve(config, vocab_size)[1]

    configs = [resolved(d, 100) for d in ("hf", "imported")]
    assert configs[0] == configs[1]
    assert configs[0].embed_dim == 32 and configs[0].dtype == "bfloat16"  # runtime from the run
    model = hf.from_pretrained(str(tmp_path / "hf"))
    shardings = jax.tree.map(lambda x: x.sharding, nnx.to_pure_dict(nnx.state(model)))
    for d in ("hf", "imported"):
        params = init_from.load_params(str(tmp_path / d), configs[0], shardings)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(nnx.state(model))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="tokenizer has 1000 ids but the model .* has 128"):
        resolved("hf", 1000)


def test_print_measured_differences():
    """Runs after the round trips (pytest keeps file order): the table for the record."""
    print("\nfamily    max |logit diff|   max per-token KL")
    for name, (max_diff, max_kl) in MEASURED.items():
        print(f"{name:9} {max_diff:16.3e} {max_kl:18.3e}")


def save_tiny_llama(path, **config):
    hf_model = make_hf_model("llama", **config)
    hf_model.save_pretrained(path)
    return hf_model


def test_unsupported_architecture_and_mismatched_shapes_fail_clearly(tmp_path):
    save_tiny_llama(tmp_path)
    with open(tmp_path / "config.json") as f:
        good = json.load(f)

    def rewrite(**changes):
        with open(tmp_path / "config.json", "w") as f:
            json.dump({**good, **changes}, f)

    rewrite(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(ValueError, match="model_type 'gpt_neox'.*not supported.*llama"):
        hf.from_pretrained(str(tmp_path))
    rewrite(architectures=["LlamaForSequenceClassification"])
    with pytest.raises(ValueError, match="LlamaForSequenceClassification is not supported"):
        hf.from_pretrained(str(tmp_path))
    rewrite(intermediate_size=96)
    with pytest.raises(ValueError, match=r"mlp\.down_proj\.weight has shape \(32, 64\).*"
                                         r"needs \(32, 96\)"):
        hf.from_pretrained(str(tmp_path))
    rewrite(hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        hf.from_pretrained(str(tmp_path))
    # The command line prints the message, not a traceback.
    rewrite(intermediate_size=96)
    assert hf_command("import", str(tmp_path), str(tmp_path / "out")) == "has shape"
    assert hf_command("export", str(tmp_path / "nowhere"), str(tmp_path / "out")) == (
        "config.json not found")


def hf_command(*args):
    """Runs python -m llmjax.hf; returns which expected phrase its one error line holds."""
    proc = subprocess.run([sys.executable, "-m", "llmjax.hf", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    return next(phrase for phrase in ("has shape", "config.json not found", "--allow_pickle")
                if phrase in line)


def test_pickle_weights_need_explicit_opt_in(tmp_path):
    hf_model = save_tiny_llama(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle.*allow_pickle=True"):
        hf.from_pretrained(str(tmp_path))
    assert hf_command("import", str(tmp_path), str(tmp_path / "out")) == "--allow_pickle"
    model = hf.from_pretrained(str(tmp_path), allow_pickle=True)
    tokens, mask, positions = padded_batch(encoder=False)
    max_diff, _ = differences(our_logits(model, tokens, mask, positions)[mask.astype(bool)],
                              hf_logits(hf_model, tokens, mask, positions)[mask.astype(bool)])
    assert max_diff <= 1e-4


@pytest.mark.parametrize("name,num_params", [("gpt2_124m", 124_439_808),
                                              ("llama3_1b", 1_235_814_400),
                                              # BertForSequenceClassification's, and
                                              # BertForMaskedLM's head (decoder tied)
                                              ("bert_base", 109_482_240 + 768 * 2 + 2
                                               + 768 * 768 + 768 * 3 + 30_522)])
def test_presets_have_the_released_dimensions(name, num_params):
    config = importlib.import_module(f"configs.{name}").get_config()
    validate(config)
    cfg = model_config(config.model)
    abstract = nnx.state(jax.eval_shape(lambda: build_model(cfg, 0)))
    assert sum(x.size for x in jax.tree.leaves(abstract)) == num_params  # as on the HF hub


def test_training_a_classifier_stops_with_a_message(tmp_path):
    config = tiny_config()
    config.model = ml_collections.ConfigDict(dict(
        family="bert", vocab_size=0, embed_dim=32, num_layers=2, num_heads=4, mlp_dim=64))
    # A classifier trains as a task=classify run (test_finetune.py), not as an LM.
    with pytest.raises(ValueError, match="family='bert' .*is a classifier: set config.task"):
        train_and_evaluate(config, str(tmp_path))


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def test_fine_tune_from_hf_weights_resumes_from_its_own_checkpoint(tmp_path, capsys):
    hf_dir, workdir = tmp_path / "hf", tmp_path / "run"
    save_tiny_llama(hf_dir, vocab_size=259, tie_word_embeddings=True)  # the byte tokenizer's
    config = tiny_config(num_train_steps=4, checkpoint_every_steps=2, eval_every_steps=4,
                         init_from=str(hf_dir), **{"model.embed_dim": 64})
    train_and_evaluate(config, str(workdir))
    assert "Initialised from" in capsys.readouterr().out
    straight = losses(workdir)

    # Step 1's loss is that of the HF weights on the first batch: nothing else was used.
    model = hf.from_pretrained(str(hf_dir))
    batch = next(build_data(config, str(tmp_path / "scratch")).train_iter)
    logits = model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                   jnp.asarray(batch["segment_ids"]))
    log_probs = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(log_probs, jnp.asarray(batch["targets"])[..., None], -1)[..., 0]
    expected = float(jnp.sum(nll * batch["loss_mask"]) / np.sum(batch["loss_mask"]))
    assert abs(straight[1] - expected) < 1e-4, (straight[1], expected)
    with open(workdir / "config.json") as f:  # the architecture trained is the HF one
        assert json.load(f)["model"]["embed_dim"] == 32

    # Lose the last checkpoint; the rerun resumes from step 2, not from the HF weights.
    shutil.rmtree(workdir / "checkpoints" / "4")
    train_and_evaluate(config, str(workdir))
    out = capsys.readouterr().out
    assert "Resumed from" in out and "Initialised from" not in out
    resumed = losses(workdir)
    assert sorted(resumed) == [1, 2, 3, 4]
    np.testing.assert_allclose([resumed[3], resumed[4]], [straight[3], straight[4]], rtol=1e-5)

    # The fine-tuned run exports to a model transformers runs with the same logits.
    convert.export_checkpoint(str(workdir), str(tmp_path / "exported"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert reloaded.config.eos_token_id == 2  # the byte tokenizer's
    tokens, mask, positions = padded_batch(encoder=False)
    tuned = restore.load_model(str(workdir))
    keep = mask.astype(bool)
    max_diff, _ = differences(our_logits(tuned, tokens, mask, positions)[keep],
                              hf_logits(reloaded, tokens, mask, positions)[keep])
    assert max_diff <= 1e-4
    assert flops_per_token(tuned.cfg, 32) > 0
