"""Evaluate a checkpoint: python -m llmjax.evaluate --workdir=W [--best] [--data=SOURCE]
[--output=FILE.json]

Restores the newest checkpoint of a training workdir (or, with --best, the one kept in
WORKDIR/best for the best `config.early_stopping.metric`), evaluates it on the run's
eval set or on SOURCE (a `config.data.eval` source string), and writes the numbers as
JSON: eval/loss and eval/perplexity for a language model, eval/loss, eval/accuracy and
eval/f1 for a classifier (every example of SOURCE; a language model uses
`config.eval_batches` batches).
"""

import argparse
import json
import os
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from llmjax import checkpoint, hf, lora, optim, sharding
from llmjax.data.tokenizer import load_tokenizer
from llmjax.models import model_config
from llmjax.step import init_params, jit_eval_step, params_layout, state_layout


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: give a workdir written by llmjax.train")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore(config: ml_collections.ConfigDict, workdir: str, vocab_size: int, mesh, rules, *,
            best: bool = False) -> tuple[Any, Any, Any, Any, Any]:
    """(model config, graphdef, trainable params, frozen params or None, step) of the newest
    (or best) checkpoint, placed on `mesh`. `lora.model_params(trainable, frozen,
    config.lora)` gives the weights the model runs with (adapters merged)."""
    if config.init_from:
        config, model_cfg = hf.resolve_init_from(config, vocab_size)
    else:
        model_cfg = model_config(config.model, vocab_size)
    tx = optim.make_optimizer(config.optimizer, config.num_train_steps)
    graphdef, abstract, shardings = state_layout(model_cfg, tx, config.seed, mesh, rules,
                                                 config.lora)
    subdir = checkpoint.BEST if best else "checkpoints"
    mngr = checkpoint.manager(workdir, max_to_keep=1, async_save=False, subdir=subdir)
    step = mngr.latest_step()
    mngr.close()
    trainable = checkpoint.restore_params(workdir, step, abstract.params, shardings.params,
                                          subdir)
    frozen = None
    if lora.enabled(config.lora):
        _, _, frozen_shardings = params_layout(model_cfg, config.seed, mesh, rules)
        frozen = (hf.load_init_params(config.init_from, model_cfg, frozen_shardings)
                  if config.init_from else
                  jax.jit(lambda: init_params(model_cfg, config.seed),
                          out_shardings=frozen_shardings)())
    return model_cfg, graphdef, trainable, frozen, step


def finetuned_model(workdir: str, *, best: bool = False
                    ) -> tuple[nnx.Module, Any, Any, ml_collections.ConfigDict]:
    """(model with its adapters merged into the weights, trainable tree, model config, run
    config) of the newest (or best) checkpoint of a LoRA run."""
    config = load_run_config(workdir)
    tokenizer = load_tokenizer(config.data.tokenizer, None, workdir)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_axis_rules(config.mesh.rules)
    with sharding.activate(mesh, rules):
        model_cfg, graphdef, trainable, frozen, _ = restore(
            config, workdir, tokenizer.vocab_size, mesh, rules, best=best)
        params = jax.jit(lambda t, f: lora.model_params(t, f, config.lora))(trainable, frozen)
    return nnx.merge(graphdef, params), trainable, model_cfg, config


def evaluate_workdir(workdir: str, *, data: str = "", best: bool = False,
                     output: str = "") -> dict[str, Any]:
    """The eval metrics of a workdir's checkpoint (see the module docstring), also written
    to `output` as JSON if given."""
    from llmjax.train import build_data, evaluate  # the train loop's own data and metrics

    config = load_run_config(workdir)
    if data:
        config.data.eval = data
    data_ = build_data(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_axis_rules(config.mesh.rules)
    batch_sharding = sharding.batch_sharding(mesh, rules, config.global_batch_size)
    step_batch_sharding = {k: sharding.rank_sharding(batch_sharding, v.ndim)
                           for k, v in data_.eval_batches[0].items()}
    with sharding.activate(mesh, rules):
        model_cfg, graphdef, trainable, frozen, step = restore(
            config, workdir, data_.tokenizer.vocab_size, mesh, rules, best=best)
        placement = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
        eval_step = jit_eval_step(graphdef, placement(trainable), step_batch_sharding,
                                  placement(frozen), config.lora, config.task)
        num_labels = getattr(model_cfg, "num_labels", 0) if config.task == "classify" else 0
        results: dict[str, Any] = evaluate(eval_step, trainable, data_.eval_batches,
                                           batch_sharding, config.global_batch_size, frozen,
                                           num_labels)
    data_.train_iter.close()
    results.update({"workdir": workdir, "step": step, "best": best,
                    "data": config.data.eval or f"held out of {config.data.train}",
                    "examples" if num_labels else "batches": (
                        int(sum(np.sum(b["loss_mask"]) for b in data_.eval_batches))
                        if num_labels else len(data_.eval_batches))})
    if output and jax.process_index() == 0:
        epath.Path(output).write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmjax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a workdir written by llmjax.train")
    parser.add_argument("--data", default="", help="eval source (default: the run's eval set)")
    parser.add_argument("--best", action="store_true", help="the best checkpoint, not the newest")
    parser.add_argument("--output", default="", help="write the metrics here as JSON")
    args = parser.parse_args(argv)
    try:
        results = evaluate_workdir(args.workdir, data=args.data, best=args.best,
                                   output=args.output)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
