"""The train state, and its layout: shapes and shardings known before any weight exists.

The state holds what trains. Without LoRA or virtual tokens that is every parameter;
with them it is the trainable tree of llmjax.training.peft_methods (adapters and trained
heads, or virtual tokens), and the frozen weights live outside the state (an argument of
the step, never checkpointed).
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util

from llmjax.models import ModelConfig, build_model
from llmjax.parallel import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # the trainable tree, a pure dict of arrays
    opt_state: Any


def init_params(model_cfg: ModelConfig, seed: int) -> dict:
    """Freshly initialised parameters, as a pure dict (call under jax.jit to place them)."""
    return nnx.to_pure_dict(nnx.split(build_model(model_cfg, seed))[1])


def state_from_params(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """Step 0 and a fresh optimizer state around `params` (fresh or pretrained weights)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def params_layout(model_cfg: ModelConfig, mesh: jax.sharding.Mesh, rules: Any
                  ) -> tuple[nnx.GraphDef, nnx.State, Any]:
    """(graphdef, abstract parameters as an nnx.State, their shardings as a pure dict)."""
    graphdef, abstract = nnx.split(jax.eval_shape(lambda: build_model(model_cfg, 0)))
    return graphdef, abstract, sharding.param_shardings(abstract, mesh, rules)


def state_layout(abstract_params: nnx.State, params_shardings: Any, tx, mesh,
                 split: Callable[[dict], Any] | None = None) -> tuple[TrainState, TrainState]:
    """(abstract train state, its shardings) for the parameters `abstract_params`.

    `split`: parameters -> the trainable tree (LoRA, virtual tokens); None: every
    parameter trains. In a trainable tree adapters and virtual tokens are replicated (they
    are small) and trained heads keep their parameter's sharding.
    """
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    pure = nnx.to_pure_dict(abstract_params)
    if split is not None:
        abstract = jax.eval_shape(lambda p: state_from_params(split(p), tx), pure)
        flat_shardings = traverse_util.flatten_dict(params_shardings, sep="/")
        params_shardings = {
            key: jax.tree.map(lambda _: replicated, tree) for key, tree in
            abstract.params.items() if key != "heads"}
        if "heads" in abstract.params:
            params_shardings["heads"] = traverse_util.unflatten_dict(
                {path: flat_shardings[path]
                 for path in traverse_util.flatten_dict(abstract.params["heads"], sep="/")},
                sep="/")
    else:
        abstract = jax.eval_shape(lambda p: state_from_params(p, tx), pure)
    shardings = TrainState(
        step=replicated, params=params_shardings,
        opt_state=sharding.like_params(abstract.opt_state, abstract.params, params_shardings,
                                       mesh))
    return abstract, shardings
