"""Sampling with per-row settings as arrays; what ends a request; which weight dims int8
scales follow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.inference import quantize, requests, sampling
from llmjax.inference.requests import Request, SamplingParams

ROWS, VOCAB = 6, 50


def choose(logits, temperature=0.0, top_k=0, top_p=1.0, seeds=None, positions=None):
    rows = logits.shape[0]
    seeds = np.zeros(rows, np.int32) if seeds is None else np.asarray(seeds, np.int32)
    positions = np.zeros(rows, np.int32) if positions is None else np.asarray(positions)
    return np.asarray(jax.jit(sampling.choose)(
        jnp.asarray(logits), jnp.full(rows, temperature, jnp.float32),
        jnp.full(rows, top_k, jnp.int32), jnp.full(rows, top_p, jnp.float32),
        sampling.request_keys(jnp.asarray(seeds), jnp.asarray(positions))))


@pytest.fixture(scope="module")
def logits():
    return np.random.default_rng(0).normal(size=(ROWS, VOCAB)).astype(np.float32) * 3


def test_greedy_top_k_one_and_a_tiny_top_p_all_take_the_argmax(logits):
    argmax = logits.argmax(-1)
    np.testing.assert_array_equal(choose(logits), argmax)
    np.testing.assert_array_equal(choose(logits, temperature=1.5, top_k=1), argmax)
    np.testing.assert_array_equal(choose(logits, temperature=1.5, top_p=1e-6), argmax)


def test_a_seed_and_position_decide_the_draw_whatever_the_row(logits):
    same = np.tile(logits[:1], (ROWS, 1))
    draws = choose(same, temperature=1.0, seeds=[7] * ROWS, positions=[3] * ROWS)
    assert len(set(draws.tolist())) == 1  # same seed and position: same token in every row
    again = choose(same, temperature=1.0, seeds=[7] * ROWS, positions=[3] * ROWS)
    np.testing.assert_array_equal(draws, again)
    many = choose(np.tile(logits[:1], (64, 1)), temperature=1.0, seeds=np.arange(64),
                  positions=np.zeros(64))
    assert len(set(many.tolist())) > 3  # different seeds: different draws


def test_a_row_draws_the_same_whatever_the_other_rows_filter(logits):
    seeds, positions = np.arange(ROWS), np.full(ROWS, 4)
    rows = jnp.asarray(logits) / 30  # nearly flat: every token may be drawn

    def draw(top_k, top_p):
        return np.asarray(jax.jit(sampling.choose)(
            rows, jnp.full(ROWS, 1.0), jnp.asarray(top_k, jnp.int32),
            jnp.asarray(top_p, jnp.float32),
            sampling.request_keys(jnp.asarray(seeds), jnp.asarray(positions))))

    for position in range(40):
        positions = np.full(ROWS, position)
        plain = draw([0] * ROWS, [1.0] * ROWS)  # nobody filters
        mixed = draw([3] + [0] * (ROWS - 1), [1.0] * (ROWS - 2) + [0.5, 1.0])
        np.testing.assert_array_equal(plain[1:4], mixed[1:4])  # rows that filter nothing
        np.testing.assert_array_equal(plain[5:], mixed[5:])


def test_top_k_and_top_p_only_ever_pick_allowed_tokens(logits):
    seeds = np.arange(ROWS)
    top3 = np.argsort(-logits, -1)[:, :3]
    for position in range(20):
        picked = choose(logits, temperature=2.0, top_k=3, seeds=seeds,
                        positions=np.full(ROWS, position))
        assert all(p in row for p, row in zip(picked, top3))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for position in range(20):
        picked = choose(logits, temperature=1.0, top_p=0.5, seeds=seeds,
                        positions=np.full(ROWS, position))
        for row, token in enumerate(picked):  # in the smallest set holding half the mass
            better = probs[row][probs[row] > probs[row, token]].sum()
            assert better < 0.5


def test_logprobs_are_log_softmax_with_the_top_alternatives(logits):
    tokens = jnp.asarray(logits.argmin(-1))
    chosen, top_ids, top_lps = sampling.logprobs(jnp.asarray(logits), tokens, 4)
    reference = jax.nn.log_softmax(jnp.asarray(logits), -1)
    np.testing.assert_allclose(chosen, reference[np.arange(ROWS), logits.argmin(-1)], atol=1e-6)
    np.testing.assert_array_equal(top_ids[:, 0], logits.argmax(-1))
    assert np.all(np.diff(np.asarray(top_lps), axis=-1) <= 0)


def test_eos_stop_tokens_stop_strings_and_max_tokens_end_a_request():
    def run(tokens, **params):
        request = Request([1], SamplingParams(**{"max_tokens": 10, **params}))
        for token in tokens:
            if requests.accept(request, token, -1.0, lambda: [], eos_ids=(2,),
                               detokenize=lambda ids: "".join(chr(96 + i) for i in ids),
                               room=100):
                break
        return request

    eos = run([5, 6, 2, 7])  # the ending token is in the ids, not in the text
    assert eos.tokens == [5, 6, 2] and eos.finish_reason == "stop" and eos.text == "ef"
    assert run([5, 2, 7], ignore_eos=True, max_tokens=3).tokens == [5, 2, 7]
    assert run([5, 9, 7], stop_token_ids=(9,)).text == "e"
    stopped = run([1, 2, 3, 4, 5], stop=("cd",), ignore_eos=True)  # text "abcde"
    assert stopped.text == "ab" and stopped.finish_reason == "stop"
    assert run([3, 3, 3, 3], max_tokens=2).finish_reason == "length"


@pytest.mark.parametrize("bad, message", [
    (dict(max_tokens=-1), "max_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"), (dict(logprobs=21), "logprobs"),
    (dict(stop=("",)), "stop strings"),
])
def test_bad_sampling_settings_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad).check(20)


@pytest.mark.parametrize("axes, expected", [
    (("layers", "embed", "heads", "head_dim"), (0, 2, 3)),  # q: [layers, embed, heads, hd]
    (("layers", "heads", "head_dim", "embed"), (0, 3)),  # o: out to embed
    (("layers", "mlp", "embed"), (0, 2)),  # down
    (("vocab", "embed"), (0,)),  # the embedding table: one scale per row
    (("embed", "vocab"), (1,)),  # an untied head
])
def test_int8_scales_follow_the_output_channels(axes, expected):
    assert quantize.output_axes(axes) == expected
