"""Train a language model: python -m llmjax.train --config=configs/NAME.py [--workdir=DIR]

Reads top to bottom: data -> model and sharded train state -> resume or init ->
loop (step, log, evaluate, checkpoint) -> sample. Rerunning the same command in the
same workdir resumes from the newest complete checkpoint.
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
from ml_collections import config_flags

from llmjax import checkpoint, distributed, fit, flops, hf, metrics, optim, sharding
from llmjax.config import to_json, validate
from llmjax.data import loader
from llmjax.data.tokenizer import Tokenizer
from llmjax.generate import sample_tokens
from llmjax.models import DECODERS, family_of, flops_per_token, model_config
from llmjax.step import (
    init_train_state,
    jit_eval_step,
    jit_train_step,
    state_layout,
    train_state_from_params,
)


@dataclasses.dataclass
class Data:
    tokenizer: Tokenizer
    train_iter: Any  # grain iterator with get_state / set_state, yields process-local batches
    eval_batches: list[dict[str, np.ndarray]]


def build_data(config: ml_collections.ConfigDict, workdir: str) -> Data:
    """Sources -> tokenizer -> packed train stream and held-out eval batches (llmjax.data)."""
    tokenizer, train_iter, eval_batches = loader.build(
        config.data, seed=config.seed, seq_len=config.seq_len,
        global_batch_size=config.global_batch_size, eval_batches=config.eval_batches,
        workdir=workdir, process_index=jax.process_index(), process_count=jax.process_count())
    return Data(tokenizer, train_iter, eval_batches)


def evaluate(eval_step, params, batches, batch_sharding, global_batch_size) -> dict[str, float]:
    loss_sum, tokens = 0.0, 0.0
    for batch in batches:
        out = eval_step(params, sharding.global_batch(batch, batch_sharding, global_batch_size))
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = loss_sum / max(tokens, 1.0)
    return {"eval/loss": loss, "eval/perplexity": float(np.exp(min(loss, 50.0)))}


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
    if family_of(model_cfg) not in DECODERS:
        raise ValueError(f"config.model.family={family_of(model_cfg)!r}: llmjax.train trains "
                         f"decoders ({', '.join(DECODERS)}); load classifiers with llmjax.hf")
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_axis_rules(config.mesh.rules)
    schedule = optim.learning_rate_schedule(config.optimizer, config.num_train_steps)
    tx = optim.make_optimizer(config.optimizer, config.num_train_steps)
    graphdef, abstract_state, state_shardings = state_layout(model_cfg, tx, config.seed,
                                                             mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules, config.global_batch_size)
    num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
    if jax.process_index() == 0:
        (epath.Path(workdir) / "config.json").write_text(to_json(config))
    logging.info("model: %s parameters; mesh %s; rules %s", f"{num_params:,}",
                 dict(mesh.shape), config.mesh.rules)

    mngr = checkpoint.manager(workdir, max_to_keep=config.max_to_keep,
                              async_save=config.async_checkpointing)
    latest = mngr.latest_step()
    if latest is not None and jax.process_index() == 0:
        metrics.drop_records_after(os.path.join(workdir, "metrics.jsonl"), latest)
    writer = metrics.create_writer(workdir, config.num_train_steps)
    peak, peak_source = flops.peak_flops_per_device(config.peak_flops_per_device)
    throughput = metrics.Throughput(flops_per_token(model_cfg, config.seq_len), peak)
    tokens_per_step = config.global_batch_size * config.seq_len
    summary: dict[str, Any] = {"num_params": num_params, "preempted": False}
    preemption = distributed.Preemption()

    with sharding.activate(mesh, rules):
        if latest is not None:
            state, data_state = checkpoint.restore(mngr, latest, abstract_state, state_shardings)
            data.train_iter.set_state(data_state)
            print(f"Resumed from {mngr.directory}/{latest}", flush=True)
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
                                    batch_sharding=batch_sharding)
        eval_step = jit_eval_step(graphdef, state_shardings.params, batch_sharding)
        first_step = int(jax.device_get(state.step))
        print(f"Training {num_params:,} parameters on {jax.device_count()} devices "
              f"(mesh {dict(mesh.shape)}), steps {first_step}..{config.num_train_steps}; "
              f"MFU peak: {peak / 1e9:,.0f} GFLOP/s per device ({peak_source})", flush=True)

        throughput.reset(first_step)
        compile_start = time.perf_counter()
        for step in range(first_step + 1, config.num_train_steps + 1):
            batch = sharding.global_batch(next(data.train_iter), batch_sharding,
                                          config.global_batch_size)
            state, train_metrics = train_step(state, batch)
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
                                        batch_sharding, config.global_batch_size)
                writer.write_scalars(step, eval_metrics)
                summary.update(eval_metrics)
                throughput.reset(step)  # keep evaluation out of tokens/s
            preempted = preemption.should_stop(step)
            if (step % config.checkpoint_every_steps == 0 or step == config.num_train_steps
                    or preempted):
                checkpoint.save(mngr, step, state, data.train_iter.get_state(),
                                config.to_dict())
            if preempted:
                print(f"Preempted: saved step {step}; rerun the command to resume", flush=True)
                summary["preempted"] = True
                break
        mngr.wait_until_finished()

        if config.sample.max_new_tokens > 0 and not summary["preempted"]:
            prompt = [data.tokenizer.bos_id] + data.tokenizer.encode(config.sample.prompt)
            ids = sample_tokens(graphdef, state.params, prompt,
                                max_new_tokens=config.sample.max_new_tokens,
                                temperature=config.sample.temperature,
                                top_k=config.sample.top_k, seed=config.seed)
            summary["sample"] = data.tokenizer.decode(ids)
            writer.write_texts(config.num_train_steps, {"sample": summary["sample"]})
    writer.flush()
    writer.close()
    mngr.close()
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
