"""The inference engine against things we did not write: the training forward (greedy
tokens and logprobs, every decoder family) and transformers' generate; continuous batching
that does not change a request's tokens; no compilation after warm-up; the same tokens on
a tensor-parallel mesh; int8 weights; bad input in one line.

    python -m pytest tests/integration/test_engine.py -s   # also prints the measured numbers
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import make_hf_model

from llmjax import hf
from llmjax.inference import quantize
from llmjax.inference.engine import Engine
from llmjax.inference.requests import SamplingParams
from llmjax.models import build_model, model_config
from llmjax.parallel import sharding

VOCAB = 97
LLAMA = dict(vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
             mlp_dim=64)
FAMILIES = {
    "llama": LLAMA,
    "mistral": dict(LLAMA, sliding_window=5),  # shorter than the sequences
    "qwen2": dict(LLAMA, qkv_bias=True, tie_embeddings=True),
    "gpt2": dict(family="gpt2", vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=4,
                 max_positions=64),
}
PROMPT_LENGTHS = (1, 5, 16, 23)
NEW_TOKENS = 12


def prompts(lengths=PROMPT_LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, n).tolist() for n in lengths]


def make_engine(model, **kwargs):
    return Engine(model, **{"max_slots": 4, "max_seq_len": 48, "prefill_buckets": (8, 32, 48),
                            **kwargs})


@nnx.jit
def forward(model, tokens):
    return model(tokens)


def greedy_reference(model, prompt, new_tokens, length=48):
    """Greedy decoding with the training forward over the whole sequence, one token at a
    time, and the log_softmax of its logits at every position. (The sequence is padded to
    one `length`: causal, so what follows a position does not change its logits.)"""
    tokens = list(prompt)
    for _ in range(new_tokens):
        logits = forward(model, jnp.asarray([tokens + [0] * (length - len(tokens))]))
        tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1])))
    logits = forward(model, jnp.asarray([tokens + [0] * (length - len(tokens))]))
    return tokens[len(prompt):], np.asarray(jax.nn.log_softmax(logits[0], axis=-1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_equals_the_training_forward(family):
    model = build_model(model_config(FAMILIES[family]), seed=1)
    with make_engine(model, prompt_logprobs=True) as engine:
        engine.warmup()
        # More prompts than slots: some wait and join while others are mid-generation.
        batch = prompts((*PROMPT_LENGTHS, 9, 2))
        done = engine.generate(batch, SamplingParams(max_tokens=NEW_TOKENS, logprobs=3,
                                                     prompt_logprobs=True))
    worst_token, worst_prompt = 0.0, 0.0
    for prompt, request in zip(batch, done):
        tokens, log_probs = greedy_reference(model, prompt, NEW_TOKENS)
        assert request.tokens == tokens and request.finish_reason == "length"
        at = [log_probs[len(prompt) - 1 + i, t] for i, t in enumerate(tokens)]
        worst_token = max(worst_token, np.abs(np.array(request.logprobs) - at).max())
        given = [log_probs[i - 1, prompt[i]] for i in range(1, len(prompt))]
        assert request.prompt_logprobs[0] is None
        if given:
            worst_prompt = max(worst_prompt, np.abs(np.array(request.prompt_logprobs[1:])
                                                    - given).max())
        # The top alternatives are the forward's best, the sampled (greedy) one first.
        best = np.argsort(-log_probs[len(prompt) - 1])[:3].tolist()
        assert [token for token, _ in request.top_logprobs[0]] == best
    print(f"\n{family}: greedy tokens equal; max |logprob diff| {worst_token:.2e} "
          f"(generated), {worst_prompt:.2e} (prompt)")
    assert worst_token < 1e-5 and worst_prompt < 1e-5


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gpt2"])
def test_engine_equals_transformers_generate(name, tmp_path):
    hf_model = make_hf_model(name)
    hf_model.generation_config.eos_token_id = None  # always NEW_TOKENS tokens
    hf_model.generation_config.pad_token_id = 0
    hf_model.save_pretrained(tmp_path)
    model = hf.from_pretrained(str(tmp_path))
    batch = prompts((3, 11, 20), seed=2)  # Mistral's window (4) is shorter than all of them
    with make_engine(model) as engine:
        engine.warmup()
        done = engine.generate(batch, SamplingParams(max_tokens=NEW_TOKENS))
    for prompt, request in zip(batch, done):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), do_sample=False,
                                    max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        assert request.tokens == out[0, len(prompt):].tolist(), name


def test_a_request_does_not_depend_on_its_batch_or_when_it_joined():
    model = build_model(model_config(LLAMA), seed=2)
    sampled = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.9, top_k=20, seed=5)
    target = prompts((7,), seed=3)[0]
    with make_engine(model) as engine:
        engine.warmup()
        alone = engine.generate([target], sampled)[0].tokens
        crowded = engine.generate([*prompts((20, 3, 9), seed=4), target], [
            SamplingParams(max_tokens=4), SamplingParams(max_tokens=25, temperature=1.0),
            SamplingParams(max_tokens=10, top_p=0.5, temperature=0.7), sampled])[-1].tokens
        # Joining while three others are mid-generation.
        others = [engine.submit(p, SamplingParams(max_tokens=20, temperature=0.5, seed=i))
                  for i, p in enumerate(prompts((5, 20, 12), seed=6))]
        for _ in range(5):
            engine.step()
        late = engine.submit(target, sampled)
        engine.run()
    assert all(r.finished for r in others)
    assert alone == crowded == late.tokens


def test_no_compilation_after_warmup():
    model = build_model(model_config(LLAMA), seed=3)
    with make_engine(model, prompt_logprobs=True) as engine:
        engine.warmup()  # (what an earlier test compiled alike comes from JAX's cache)
        before = engine.compilations
        lengths = (1, 7, 8, 9, 31, 33, 40)
        settings = [SamplingParams(max_tokens=6), SamplingParams(max_tokens=3, temperature=1.3,
                                                                 seed=9),
                    SamplingParams(max_tokens=8, top_k=5, temperature=0.8),
                    SamplingParams(max_tokens=4, top_p=0.3, temperature=1.0, logprobs=5,
                                   prompt_logprobs=True),
                    SamplingParams(max_tokens=0, prompt_logprobs=True)]
        for round_ in range(3):  # slots full, partly full, emptied and refilled
            batch = prompts(lengths[round_:], seed=round_)
            engine.generate(batch, [settings[i % len(settings)] for i in range(len(batch))])
        print(f"\ncompilations: {before} at warm-up ({engine.warmup_seconds:.1f}s), "
              f"{engine.compilations - before} after")
        assert engine.compilations == before


def test_seeds_top_k_and_stop_strings():
    model = build_model(model_config(LLAMA), seed=4)
    detokenize = "".join  # token t -> the character chr(t)
    with make_engine(model, detokenize=lambda ids: detokenize(chr(64 + t) for t in ids)) as engine:
        engine.warmup()
        prompt = prompts((6,), seed=7)[0]
        sample = SamplingParams(max_tokens=10, temperature=1.0, seed=11)
        first, again = (engine.generate([prompt], sample)[0].tokens for _ in range(2))
        other_seed = engine.generate([prompt], SamplingParams(
            max_tokens=10, temperature=1.0, seed=12))[0].tokens
        assert first == again and first != other_seed
        greedy = engine.generate([prompt], SamplingParams(max_tokens=10))[0]
        top1 = engine.generate([prompt], SamplingParams(max_tokens=10, top_k=1,
                                                        temperature=1.5, seed=3))[0]
        assert top1.tokens == greedy.tokens
        stop = greedy.text[4:6]
        stopped = engine.generate([prompt], SamplingParams(max_tokens=10, stop=(stop,)))[0]
        assert stopped.finish_reason == "stop"
        assert stopped.text == greedy.text[:greedy.text.find(stop)]
        assert stop not in stopped.text


def test_tensor_parallel_mesh_gives_the_same_tokens():
    config = dict(LLAMA, num_heads=8, num_kv_heads=8)
    single = build_model(model_config(config), seed=5)
    batch = prompts((4, 19, 30), seed=8)
    params = SamplingParams(max_tokens=NEW_TOKENS, logprobs=2)
    with make_engine(single) as engine:
        engine.warmup()
        reference = engine.generate(batch, params)
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=8))
    rules = sharding.logical_axis_rules("tp")
    model = sharding.place_model(single, mesh, rules)
    assert model.blocks.attn.q[...].sharding.spec[2] == "tensor"  # heads split 8 ways
    with make_engine(model, mesh=mesh, rules=rules) as engine:
        engine.warmup()
        split = engine.generate(batch, params)
    for a, b in zip(reference, split):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_w8a8_tokens_depend_neither_on_the_batch_nor_on_a_tensor_parallel_mesh():
    # Each row's inputs are quantized with its own scale, so rows stay independent.
    config = dict(LLAMA, num_heads=8, num_kv_heads=8)
    single = quantize.quantize_model(build_model(model_config(config), seed=5), "w8a8")
    batch = prompts((4, 19, 30), seed=8)
    params = SamplingParams(max_tokens=NEW_TOKENS, logprobs=2)
    with make_engine(single) as engine:
        engine.warmup()
        together = engine.generate(batch, params)
        alone = [engine.generate([p], params)[0] for p in batch]
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=8))
    rules = sharding.logical_axis_rules("tp")
    placed = sharding.place_model(build_model(model_config(config), seed=5), mesh, rules)
    with make_engine(quantize.quantize_model(placed, "w8a8"), mesh=mesh, rules=rules) as engine:
        engine.warmup()
        split = engine.generate(batch, params)
    for a, b, c in zip(together, alone, split):
        assert a.tokens == b.tokens == c.tokens
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        np.testing.assert_allclose(a.logprobs, c.logprobs, atol=1e-4)


def test_int8_weights_generate_with_a_quarter_of_the_bytes():
    model = build_model(model_config(LLAMA), seed=6)
    int8 = quantize.quantize_model(build_model(model_config(LLAMA), seed=6), "int8")
    ratio = quantize.weight_bytes(int8) / quantize.weight_bytes(model)
    assert ratio <= 0.30, ratio
    with make_engine(int8) as engine:
        engine.warmup()
        done = engine.generate(prompts(), SamplingParams(max_tokens=NEW_TOKENS))
    assert all(len(r.tokens) == NEW_TOKENS for r in done)
    with pytest.raises(ValueError, match="quantize='int4': choose one of none, int8"):
        quantize.quantize_model(model, "int4")


def test_bad_requests_fail_clearly():
    model = build_model(model_config(LLAMA), seed=7)
    engine = make_engine(model)
    with pytest.raises(ValueError, match=r"40 tokens plus max_tokens=10 exceed max_seq_len=48"):
        engine.submit(list(range(1, 41)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(ValueError, match="without prompt_logprobs=True"):
        engine.submit([1, 2], SamplingParams(prompt_logprobs=True))
    with pytest.raises(ValueError, match="call engine.warmup"):
        engine.step()
    engine.close()
    gpt2 = build_model(model_config(FAMILIES["gpt2"]), seed=0)
    with pytest.raises(ValueError, match="max_seq_len=128 is longer than the model's 64"):
        Engine(gpt2, max_seq_len=128)
    bert = build_model(model_config(dict(family="bert", vocab_size=VOCAB, embed_dim=32,
                                         num_layers=1, num_heads=4, mlp_dim=64)), seed=0)
    with pytest.raises(ValueError, match="Bert has no cached decoder"):
        Engine(bert)
