"""Learning-rate schedules at chosen steps, and which parameters get weight decay."""

import ml_collections
import numpy as np
import pytest

from llmjax.training.optimizer import decay_mask, learning_rate_schedule


def schedule(name, **extra):
    cfg = ml_collections.ConfigDict(dict(learning_rate=1.0, warmup_steps=10, schedule=name,
                                         min_lr_ratio=0.1, decay_fraction=0.2, **extra))
    return learning_rate_schedule(cfg, num_train_steps=110)


@pytest.mark.parametrize("name,expected", [
    # steps:   0    5    10   60                      110
    ("cosine", [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1]),
    ("linear", [0.0, 0.5, 1.0, 0.55, 0.1]),
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),
    # wsd: flat until step 90 (last 20% of the 100 decay steps), then linear to 0.1
    ("wsd", [0.0, 0.5, 1.0, 1.0, 0.1]),
    # rsqrt: sqrt(10 / (s - 10 + 10)) after warmup
    ("rsqrt", [0.0, 0.5, 1.0, np.sqrt(10 / 60), np.sqrt(10 / 110)]),
])
def test_schedule_values(name, expected):
    fn = schedule(name)
    got = [float(fn(s)) for s in (0, 5, 10, 60, 110)]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_wsd_decays_only_at_the_end():
    fn = schedule("wsd")
    assert float(fn(89)) == pytest.approx(1.0)
    assert float(fn(100)) == pytest.approx(0.55)


def test_unknown_schedule_names_the_key():
    with pytest.raises(ValueError, match="config.optimizer.schedule='cosin'"):
        schedule("cosin")


def test_weight_decay_skips_norms_and_biases():
    params = {"embed": np.zeros((4, 2)), "blocks": {"attn_norm": {"scale": np.zeros(2)},
                                                    "q": np.zeros((2, 2)), "bias": np.zeros(2),
                                                    "q_bias": np.zeros(2)}}
    mask = decay_mask(params)
    assert mask == {"embed": True, "blocks": {"attn_norm": {"scale": False}, "q": True,
                                              "bias": False, "q_bias": False}}
