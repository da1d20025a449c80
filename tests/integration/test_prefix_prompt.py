"""Prefix and prompt tuning against Hugging Face PEFT: our virtual tokens, written by
llmjax.hf.peft.save_virtual_tokens, load with `peft.PeftModel.from_pretrained` onto the
transformers model and give the same logits (1e-5, float32) on a Llama and a GPT-2; a
trained prefix run exports (base model + adapter) to the logits it trains with, refuses
to be served, and a prompt run resumes to the same losses.

    python -m pytest tests/integration/test_prefix_prompt.py -s   # prints the differences
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import straight_and_resumed_losses, tiny_config
from flax import nnx
from hf_models import make_hf_model
from safetensors.numpy import load_file

from llmjax import hf
from llmjax.hf import peft
from llmjax.training import convert, restore
from llmjax.training.loop import train_and_evaluate


def peft_logits(base_dir, adapter_dir, tokens):
    import peft as hf_peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    model = hf_peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
    return logits[:, -tokens.shape[1]:]  # prompt tuning also returns the virtual positions


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_virtual_tokens_give_peft_logits(name, method, tmp_path):
    make_hf_model(name).save_pretrained(tmp_path / "base")
    ours = hf.from_pretrained(str(tmp_path / "base"))
    cfg = ours.cfg
    rng = np.random.default_rng(0)
    shape = ((cfg.num_layers, 2, 4, cfg.num_kv_heads, cfg.head_dim) if method == "prefix"
             else (4, cfg.embed_dim))
    virtual = rng.standard_normal(shape).astype(np.float32)
    tokens = rng.integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    logits = np.asarray(ours(jnp.asarray(tokens), **{method: jnp.asarray(virtual)}))
    peft.save_virtual_tokens(str(tmp_path / "adapter"), method, virtual, model_cfg=cfg)
    theirs = peft_logits(str(tmp_path / "base"), str(tmp_path / "adapter"), tokens)
    changed = np.max(np.abs(logits - np.asarray(ours(jnp.asarray(tokens)))))
    print(f"\n{name} {method}: ours vs PEFT {np.max(np.abs(logits - theirs)):.2g} "
          f"(the virtual tokens move the logits by {changed:.3g})")
    assert changed > 1e-1
    np.testing.assert_allclose(logits, theirs, atol=1e-5)


def test_a_prefix_run_exports_to_its_logits_and_is_not_served(tmp_path):
    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny_config(num_train_steps=4, **{
        "peft.method": "prefix", "peft.num_virtual_tokens": 5}), workdir)
    convert.export_checkpoint(workdir, str(tmp_path / "hf"))
    restored = restore.restore_run(workdir)
    model = nnx.merge(restored.run.graphdef, restored.run.merge(restored.trainable,
                                                                restored.frozen))
    tokens = np.arange(1, 17, dtype=np.int32)[None]
    ours = np.asarray(model(jnp.asarray(tokens)))
    theirs = peft_logits(str(tmp_path / "hf"), str(tmp_path / "hf" / "adapter"), tokens)
    print(f"\nexported prefix run: ours vs PEFT {np.max(np.abs(ours - theirs)):.2g}")
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # The exported base model is the frozen weights, untouched by training.
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    np.testing.assert_array_equal(exported["model.embed_tokens.weight"],
                                  np.asarray(jax.device_get(restored.frozen["embed"])))
    with pytest.raises(ValueError, match="cannot be served") as error:
        restore.load_model(workdir)
    assert "\n" not in str(error.value) and "llmjax.hf export" in str(error.value)


def test_a_prompt_run_resumes_to_the_same_losses(tmp_path):
    # Checkpoints hold the soft prompt alone; the frozen weights are rebuilt from the seed.
    straight, resumed = straight_and_resumed_losses(
        tmp_path, **{"peft.method": "prompt", "peft.num_virtual_tokens": 4})
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6), step
