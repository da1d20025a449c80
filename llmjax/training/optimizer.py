"""The optax chain: learning-rate schedule, global-norm clipping, optimizer, decay mask."""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from llmjax.config import OPTIMIZERS, SCHEDULES

# Parameters whose name is one of these, or ends in "_bias" (q_bias, up_bias, ...), get no
# weight decay (norm scales, biases).
NO_DECAY_NAMES = ("scale", "bias")


def learning_rate_schedule(opt_cfg: Any, num_train_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then a decay.

    cosine / linear: to `learning_rate * min_lr_ratio` at `num_train_steps`;
    constant: flat; wsd (warmup-stable-decay): flat, then linear to the minimum over
    the last `decay_fraction` of training; rsqrt: `learning_rate * sqrt(warmup / step)`.
    """
    peak = float(opt_cfg.learning_rate)
    warmup = int(opt_cfg.warmup_steps)
    end = peak * float(opt_cfg.get("min_lr_ratio", 0.0))
    decay_steps = max(num_train_steps - warmup, 1)
    name = opt_cfg.schedule
    if name == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    elif name == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif name == "constant":
        decay = optax.constant_schedule(peak)
    elif name == "wsd":
        cooldown = max(int(decay_steps * float(opt_cfg.get("decay_fraction", 0.2))), 1)
        decay = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, end, cooldown)],
            [decay_steps - cooldown])
    elif name == "rsqrt":
        w = max(warmup, 1)

        def decay(step):
            return peak * jnp.sqrt(w / (jnp.maximum(step, 0) + w))
    else:
        raise ValueError(f"config.optimizer.schedule={name!r}: choose one of {SCHEDULES}")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: everything but norm scales and biases."""
    def one(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return name not in NO_DECAY_NAMES and not name.endswith("_bias")
    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(opt_cfg: Any, num_train_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm (if grad_clip_norm > 0), then the configured optimizer."""
    schedule = learning_rate_schedule(opt_cfg, num_train_steps)
    name = opt_cfg.get("name", "adamw")
    wd = float(opt_cfg.weight_decay)
    if name == "adamw":
        opt = optax.adamw(schedule, b1=opt_cfg.get("b1", 0.9), b2=opt_cfg.get("b2", 0.95),
                          eps=opt_cfg.get("eps", 1e-8), weight_decay=wd, mask=decay_mask)
    elif name == "adafactor":
        opt = optax.adafactor(schedule, weight_decay_rate=wd or None,
                              weight_decay_mask=decay_mask)
    elif name == "sgd":
        opt = optax.chain(optax.add_decayed_weights(wd, mask=decay_mask),
                          optax.sgd(schedule, momentum=opt_cfg.get("momentum", 0.9)))
    else:
        raise ValueError(f"config.optimizer.name={name!r}: choose one of {OPTIMIZERS}")
    clip = float(opt_cfg.grad_clip_norm)
    return optax.chain(optax.clip_by_global_norm(clip), opt) if clip > 0 else opt
