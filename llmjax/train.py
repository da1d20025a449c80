"""Train a language model: python -m llmjax.train --config=configs/NAME.py [--workdir=DIR]

Reads top to bottom: data -> model and sharded train state -> resume or init ->
loop (step, log, evaluate, keep the best, stop early, checkpoint) -> sample. Rerunning
the same command in the same workdir resumes from the newest complete checkpoint.

`config.task`: "lm" (next-token loss; SFT records train on their responses only) or
"classify" (labels per sequence: BERT's classifier or a decoder with model.num_labels).
`config.lora.rank` > 0 trains low-rank adapters and the heads `config.lora.trainable`
names, with every other weight frozen (llmjax.lora).
"""

import dataclasses
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_flags

from llmjax import checkpoint, distributed, fit, flops, hf, lora, metrics, optim, sharding
from llmjax.config import to_json, validate
from llmjax.data import classify, loader
from llmjax.data.tokenizer import Tokenizer
from llmjax.early_stopping import EarlyStopping
from llmjax.generate import sample_tokens
from llmjax.models import DECODERS, family_of, flops_per_token, model_config
from llmjax.step import (
    init_finetune_state,
    init_params,
    init_train_state,
    jit_eval_step,
    jit_train_step,
    params_layout,
    state_layout,
    train_state_from_params,
)


@dataclasses.dataclass
class Data:
    tokenizer: Tokenizer
    train_iter: Any  # grain iterator with get_state / set_state, yields process-local batches
    eval_batches: list[dict[str, np.ndarray]]


def build_data(config: ml_collections.ConfigDict, workdir: str) -> Data:
    """Sources -> tokenizer -> packed train stream and held-out eval batches (llmjax.data);
    for classification, labelled rows (llmjax.data.classify)."""
    if config.task == "classify":
        return Data(*classify.build(
            config.data, seed=config.seed, seq_len=config.seq_len,
            global_batch_size=config.global_batch_size, workdir=workdir,
            process_index=jax.process_index(), process_count=jax.process_count()))
    tokenizer, train_iter, eval_batches = loader.build(
        config.data, seed=config.seed, seq_len=config.seq_len,
        global_batch_size=config.global_batch_size, eval_batches=config.eval_batches,
        workdir=workdir, process_index=jax.process_index(), process_count=jax.process_count())
    return Data(tokenizer, train_iter, eval_batches)


def evaluate(eval_step, params, batches, batch_sharding, global_batch_size, frozen=None,
             num_labels: int = 0) -> dict[str, float]:
    """eval/loss and eval/perplexity over `batches`; with `num_labels` (classification)
    eval/loss, eval/accuracy and eval/f1."""
    loss_sum, tokens, predicted, labels = 0.0, 0.0, [], []
    for batch in batches:
        placed = sharding.global_batch(batch, batch_sharding, global_batch_size)
        out = eval_step(params, placed, frozen)
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
        if num_labels:
            real = _host(placed["loss_mask"]) > 0
            predicted.append(_host(out["predictions"])[real])
            labels.append(_host(placed["labels"])[real])
    loss = loss_sum / max(tokens, 1.0)
    if num_labels:
        accuracy, f1 = classify.accuracy_and_f1(np.concatenate(predicted),
                                                np.concatenate(labels), num_labels)
        return {"eval/loss": loss, "eval/accuracy": accuracy, "eval/f1": f1}
    return {"eval/loss": loss, "eval/perplexity": float(np.exp(min(loss, 50.0)))}


def _host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train per `config` in `workdir` (resuming if it holds a checkpoint).

    Returns the last train and eval metrics, and the sample text if one was asked for.
    """
    validate(config)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    data = build_data(config, workdir)
    if config.init_from:  # architecture (and, for a fresh run, weights) from that directory
        config, model_cfg = hf.resolve_init_from(config, data.tokenizer.vocab_size)
    else:
        model_cfg = model_config(config.model, data.tokenizer.vocab_size)
    num_labels = getattr(model_cfg, "num_labels", 0) if config.task == "classify" else 0
    if config.task == "lm" and (family_of(model_cfg) not in DECODERS
                                or getattr(model_cfg, "num_labels", 0)):
        raise ValueError(f"config.model.family={family_of(model_cfg)!r} is a classifier: "
                         "set config.task=classify")
    if config.task == "classify" and not num_labels:
        raise ValueError("config.task=classify needs config.model.num_labels > 0")
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_axis_rules(config.mesh.rules)
    schedule = optim.learning_rate_schedule(config.optimizer, config.num_train_steps)
    tx = optim.make_optimizer(config.optimizer, config.num_train_steps)
    graphdef, abstract_state, state_shardings = state_layout(model_cfg, tx, config.seed,
                                                             mesh, rules, config.lora)
    frozen_shardings = axes = None
    if lora.enabled(config.lora):  # frozen weights: an argument of the step, not its state
        _, abstract_params, frozen_shardings = params_layout(model_cfg, config.seed, mesh, rules)
        axes = lora.logical_axes(abstract_params)
    batch_sharding = sharding.batch_sharding(mesh, rules, config.global_batch_size)
    # [batch] arrays (classification labels) are split along the batch like the rest.
    step_batch_sharding = (batch_sharding if config.task == "lm" else
                           {k: sharding.rank_sharding(batch_sharding, v.ndim)
                            for k, v in data.eval_batches[0].items()})
    num_trainable = sum(x.size for x in jax.tree.leaves(abstract_state.params))
    num_params = (num_trainable if axes is None
                  else lora.count(abstract_params) + lora.count(abstract_state.params["adapters"]))
    if jax.process_index() == 0:
        (epath.Path(workdir) / "config.json").write_text(to_json(config))
    logging.info("model: %s parameters; mesh %s; rules %s", f"{num_params:,}",
                 dict(mesh.shape), config.mesh.rules)

    mngr = checkpoint.manager(workdir, max_to_keep=config.max_to_keep,
                              async_save=config.async_checkpointing)
    latest = mngr.latest_step()
    if latest is not None and jax.process_index() == 0:
        metrics.drop_records_after(os.path.join(workdir, "metrics.jsonl"), latest)
        metrics.drop_events_after(os.path.join(workdir, "tensorboard"), latest)
    writer = metrics.create_writer(workdir, config.num_train_steps)
    peak, peak_source = flops.peak_flops_per_device(config.peak_flops_per_device)
    throughput = metrics.Throughput(flops_per_token(model_cfg, config.seq_len), peak)
    tokens_per_step = config.global_batch_size * config.seq_len
    summary: dict[str, Any] = {"num_params": num_params, "num_trainable": num_trainable,
                               "trainable_fraction": num_trainable / num_params,
                               "preempted": False, "early_stopped": False}
    stopping = EarlyStopping(config.early_stopping.metric, config.early_stopping.mode,
                             int(config.early_stopping.patience))
    if latest is not None:
        stopping.replay(metrics.read_records(os.path.join(workdir, "metrics.jsonl")))
    best_mngr = (checkpoint.manager(workdir, max_to_keep=1, async_save=False,
                                    subdir=checkpoint.BEST)
                 if config.early_stopping.metric else None)
    with distributed.Preemption() as preemption, sharding.activate(mesh, rules):
        frozen = None
        if axes is not None:  # rebuilt each run (pretrained or seeded), never checkpointed
            frozen = (hf.load_init_params(config.init_from, model_cfg, frozen_shardings)
                      if config.init_from else
                      jax.jit(lambda: init_params(model_cfg, config.seed),
                              out_shardings=frozen_shardings)())
        if latest is not None:
            state, data_state = checkpoint.restore(mngr, latest, abstract_state, state_shardings)
            data.train_iter.set_state(data_state)
            print(f"Resumed from {mngr.directory}/{latest}", flush=True)
        elif frozen is not None:
            state = jax.jit(lambda p: init_finetune_state(p, axes, tx, config.lora, config.seed),
                            out_shardings=state_shardings)(frozen)
        elif config.init_from:
            params = hf.load_init_params(config.init_from, model_cfg, state_shardings.params)
            state = jax.jit(lambda p: train_state_from_params(p, tx), donate_argnums=0,
                            out_shardings=state_shardings)(params)
            print(f"Initialised from {config.init_from}", flush=True)
        else:
            init = jax.jit(lambda: init_train_state(model_cfg, tx, config.seed),
                           out_shardings=state_shardings)
            state = init()
        train_step = jit_train_step(graphdef, tx, schedule,
                                    grad_accum_steps=config.grad_accum_steps,
                                    z_loss=config.z_loss, state_shardings=state_shardings,
                                    batch_sharding=step_batch_sharding,
                                    frozen_shardings=frozen_shardings, lora_cfg=config.lora,
                                    task=config.task)
        eval_step = jit_eval_step(graphdef, state_shardings.params, step_batch_sharding,
                                  frozen_shardings, config.lora, config.task)
        first_step = int(jax.device_get(state.step))
        if jax.process_count() > 1:
            multihost_utils.assert_equal(first_step, "processes start from different steps")
        print(f"Training {num_trainable:,} of {num_params:,} parameters "
              f"({100 * num_trainable / num_params:.3g}%) on {jax.device_count()} device"
              f"{'s' if jax.device_count() != 1 else ''} "
              f"(mesh {dict(mesh.shape)}), steps {first_step}..{config.num_train_steps}; "
              f"MFU peak: {peak / 1e9:,.0f} GFLOP/s per device ({peak_source})", flush=True)

        throughput.reset(first_step)
        compile_start = time.perf_counter()
        last_step = first_step if stopping.should_stop else config.num_train_steps
        for step in range(first_step + 1, last_step + 1):
            batch = sharding.global_batch(next(data.train_iter), batch_sharding,
                                          config.global_batch_size)
            state, train_metrics = (train_step(state, batch) if frozen is None
                                    else train_step(state, batch, frozen))
            if step == first_step + 1:
                jax.block_until_ready(train_metrics)
                compile_seconds = time.perf_counter() - compile_start
                writer.write_scalars(step, {"train/first_step_seconds": compile_seconds})
                throughput.reset(step)  # keep compilation out of tokens/s
            if step % config.log_every_steps == 0 or step == config.num_train_steps:
                scalars = metrics.to_floats(train_metrics, "train")
                scalars.update(throughput.report(step, tokens_per_step))
                writer.write_scalars(step, scalars)
                summary.update(scalars)
            if step % config.eval_every_steps == 0 or step == config.num_train_steps:
                eval_metrics = evaluate(eval_step, state.params, data.eval_batches,
                                        batch_sharding, config.global_batch_size, frozen,
                                        num_labels)
                if stopping.update(step, eval_metrics):  # the best so far: keep it
                    checkpoint.save(best_mngr, step, state, data.train_iter.get_state(),
                                    config.to_dict())
                if stopping.metric:
                    eval_metrics["eval/best_step"] = stopping.best_step
                if stopping.should_stop:
                    eval_metrics["eval/early_stopped"] = 1
                writer.write_scalars(step, eval_metrics)
                summary.update(eval_metrics)
                throughput.reset(step)  # keep evaluation out of tokens/s
            preempted = preemption.should_stop(step)
            if (step % config.checkpoint_every_steps == 0 or step == config.num_train_steps
                    or preempted or stopping.should_stop):
                checkpoint.save(mngr, step, state, data.train_iter.get_state(),
                                config.to_dict())
            if stopping.should_stop:
                print(f"Early stop at step {step}: {stopping.metric} has not improved for "
                      f"{stopping.stale} evaluations; best {stopping.best:.4g} at step "
                      f"{stopping.best_step} ({workdir}/{checkpoint.BEST})", flush=True)
                summary["early_stopped"] = True
                break
            if preempted:
                print(f"Preempted: saved step {step}; rerun the command to resume", flush=True)
                summary["preempted"] = True
                break
        mngr.wait_until_finished()
        if stopping.metric:
            summary.update({"best_step": stopping.best_step, "best_metric": stopping.best})

        if (config.sample.max_new_tokens > 0 and not summary["preempted"]
                and config.task == "lm"):
            prompt = [data.tokenizer.bos_id] + data.tokenizer.encode(config.sample.prompt)
            ids = sample_tokens(graphdef, lora.model_params(state.params, frozen, config.lora),
                                prompt,
                                max_new_tokens=config.sample.max_new_tokens,
                                temperature=config.sample.temperature,
                                top_k=config.sample.top_k, seed=config.seed)
            summary["sample"] = data.tokenizer.decode(ids)
            writer.write_texts(config.num_train_steps, {"sample": summary["sample"]})
    writer.flush()
    writer.close()
    mngr.close()
    if best_mngr is not None:
        best_mngr.close()
    return summary


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/NAME.py[:ARG]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and logs go (default: runs/NAME).")
flags.DEFINE_bool("compile_only", False, "Fit check: compile the train step for the configured "
                  "mesh and print per-device memory and FLOPs; allocate nothing, train nothing.")
flags.DEFINE_integer("num_devices", 0, "With --compile_only: simulate this many CPU devices "
                     "(e.g. 64 for a v5p-128 slice).")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process "
                    "runs outside TPU pods and Slurm (which need nothing).")
flags.DEFINE_integer("num_processes", 0, "With --coordinator_address: number of processes.")
flags.DEFINE_integer("process_id", -1, "With --coordinator_address: this process's index.")


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # library INFO logs (Orbax, clu) drown the metrics
    try:
        config = FLAGS.config
        if config is None:
            sys.exit("error: give a config: --config=configs/shakespeare.py")
        config.get("name")  # a config file that failed to load raises here
    except OSError as e:
        sys.exit(f"error: cannot load the config file: {str(e).splitlines()[-1].strip()}")
    workdir = FLAGS.workdir or os.path.join("runs", config.name)
    try:
        if FLAGS.compile_only:
            if FLAGS.num_devices:
                jax.config.update("jax_platforms", "cpu")
                jax.config.update("jax_num_cpu_devices", FLAGS.num_devices)
            validate(config)
            print(fit.format_report(config, fit.fit_check(config)), flush=True)
            return
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
        train_and_evaluate(config, workdir)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a bad --config override reported in one line."""
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        detail = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").strip("'\"").split())
        sys.exit(f"error: bad flag or --config override: {detail}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
