"""The train loop: python -m llmjax.train calls `train_and_evaluate(config, workdir)`.

Reads top to bottom: set up (data, the assembled run, checkpoints, writers) -> resume or
initialise -> loop (step, log, evaluate, keep the best, stop early, checkpoint) -> sample.
Rerunning in the same workdir resumes from the newest complete checkpoint.
"""

import contextlib
import os
import time
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from llmjax import workdir as run_dir
from llmjax.config import changed_keys, to_json, validate
from llmjax.inference.engine import Engine
from llmjax.inference.requests import SamplingParams
from llmjax.models import flops_per_token
from llmjax.parallel import distributed, sharding
from llmjax.training import checkpoint, metrics, nonfinite, setup
from llmjax.training.early_stopping import EarlyStopping
from llmjax.training.evaluation import evaluate_run, short_eval_note
from llmjax.training.flops import peak_flops_per_device


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train per `config` in `workdir` (resuming if it holds a checkpoint).

    Returns the last train and eval metrics, and the sample text if one was asked for.
    Raises ValueError if another run holds the workdir (llmjax.workdir.lock).
    """
    validate(config)  # before anything is read or written
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    # `cleanup` closes the checkpoint managers and writers however the run ends (a stop on
    # a non-finite step, an error): the logs are flushed and the saves under way complete.
    with (run_dir.lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext(),
          contextlib.ExitStack() as cleanup):
        return _train_and_evaluate(config, workdir, cleanup)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        cleanup: contextlib.ExitStack) -> dict[str, Any]:
    # --- Set up: data, the run, checkpoints, writers ---------------------------------------
    data = setup.build_data(config, workdir)
    run = setup.assemble(config, data.tokenizer.vocab_size, mask_id=data.tokenizer.mask_id)
    setup.check_data(run, data)
    config = run.config  # with init_from's model: what config.json records
    logging.info("model: %s parameters; mesh %s; rules %s", f"{run.num_params:,}",
                 dict(run.mesh.shape), config.mesh.rules)
    mngr = cleanup.enter_context(contextlib.closing(checkpoint.manager(
        workdir, max_to_keep=config.max_to_keep, async_save=config.async_checkpointing)))
    # The newest checkpoint that restores (unreadable ones are moved aside), or None.
    restored = checkpoint.restore_newest(mngr, run.abstract_state, run.state_shardings,
                                         config.to_dict())
    latest = None if restored is None else restored[0]
    if jax.process_index() == 0:  # steps past the checkpoint (or all: none) are trained again
        metrics.drop_after(workdir, latest or 0)
    writer = cleanup.enter_context(contextlib.closing(
        metrics.create_writer(workdir, config)))
    peak, peak_source = peak_flops_per_device(config.peak_flops_per_device)
    throughput = metrics.Throughput(flops_per_token(run.model_cfg, config.seq_len), peak)
    stopping = EarlyStopping(config.early_stopping.metric, config.early_stopping.mode,
                             int(config.early_stopping.patience))
    guard = nonfinite.Guard(config.nan_policy, config.optimizer.learning_rate)
    if latest is not None:
        records = metrics.read_records(os.path.join(workdir, run_dir.METRICS))
        stopping.replay(records)
        guard.replay(records)
    best_mngr = (cleanup.enter_context(contextlib.closing(checkpoint.manager(
        workdir, max_to_keep=1, async_save=False, subdir=run_dir.BEST)))
        if stopping.metric else None)
    summary: dict[str, Any] = {
        "num_params": run.num_params, "num_trainable": run.num_trainable,
        "trainable_fraction": run.num_trainable / run.num_params, "preempted": False,
        "early_stopped": False}

    with distributed.Preemption() as preemption, sharding.activate(run.mesh, run.rules):
        # --- Resume or initialise ----------------------------------------------------------
        frozen = setup.frozen_weights(run)
        if restored is not None:
            latest, state, data_state = restored
            data.train_iter.set_state(data_state)
            print(f"Resumed from {mngr.directory}/{latest}", flush=True)
            old = checkpoint.saved_config(mngr, latest)
            if old is not None and (changes := changed_keys(old, config.to_dict())):
                print(f"Config changed since that checkpoint: {'; '.join(changes)}",
                      flush=True)
        else:
            state = setup.initial_state(run, frozen)
            if config.init_from:
                print(f"Initialised from {config.init_from}", flush=True)
        if jax.process_index() == 0:  # once the state restored: it is the run's config now
            with run_dir.naming(epath.Path(workdir) / run_dir.CONFIG):
                (epath.Path(workdir) / run_dir.CONFIG).write_text(to_json(config))
        steps = setup.bind_steps(run, frozen)
        first_step = int(jax.device_get(state.step))
        if jax.process_count() > 1:
            multihost_utils.assert_equal(first_step, "processes start from different steps")
        from llmjax.data.tokenizer import describe  # transformers: not for the fit check

        print(f"Tokenizer: {describe(data.tokenizer)}", flush=True)
        if note := short_eval_note(config, data.eval_batches):
            print(f"Evaluation: {note}", flush=True)
        print(_start_line(run, first_step, peak, peak_source), flush=True)

        # --- Train loop ----------------------------------------------------------------------
        def save(mngr_: Any, step: int) -> None:
            checkpoint.save(mngr_, step, state, data.train_iter.get_state(), config.to_dict())

        throughput.reset(first_step)
        compile_start = time.perf_counter()
        last_step = first_step if stopping.should_stop else config.num_train_steps
        for step in range(first_step + 1, last_step + 1):
            is_last = step == config.num_train_steps
            batch = sharding.global_batch(next(data.train_iter), run.batch_sharding,
                                          config.global_batch_size)
            state, train_metrics = steps.train(state, batch)
            guard.observe(step, train_metrics)  # checks the step before (no wait)
            if step == first_step + 1:  # keep compilation out of tokens/s
                jax.block_until_ready(train_metrics)
                writer.write_scalars(step, {"train/first_step_seconds":
                                            time.perf_counter() - compile_start})
                throughput.reset(step)
            is_log = step % config.log_every_steps == 0 or is_last
            is_eval = step % config.eval_every_steps == 0 or is_last
            preempted = preemption.should_stop(step)
            if is_log or is_eval or preempted or step % config.checkpoint_every_steps == 0:
                guard.check()  # never log, evaluate or save past a non-finite step unseen
            if is_log:
                scalars = metrics.to_floats(train_metrics, "train")
                del scalars["train/skipped"]
                if guard.skipped:
                    scalars["train/skipped_steps"] = guard.skipped
                scalars.update(throughput.report(step, config.global_batch_size
                                                 * config.seq_len))
                writer.write_scalars(step, scalars)
                summary.update(scalars)
            if is_eval:
                eval_metrics = evaluate_run(run, steps, state.params, data.eval_batches)
                if stopping.update(step, eval_metrics):  # the best so far: keep it
                    save(best_mngr, step)
                eval_metrics.update(stopping.report())
                writer.write_scalars(step, eval_metrics)
                summary.update(eval_metrics)
                throughput.reset(step)  # keep evaluation out of tokens/s
            if (step % config.checkpoint_every_steps == 0 or is_last or preempted
                    or stopping.should_stop):
                save(mngr, step)
            if stopping.should_stop:
                print(f"Early stop at step {step}: {stopping.metric} has not improved for "
                      f"{stopping.stale} evaluations; best {stopping.best:.4g} at step "
                      f"{stopping.best_step} ({workdir}/{run_dir.BEST})", flush=True)
                summary["early_stopped"] = True
                break
            if preempted:
                print(f"Preempted: saved step {step}; rerun the command to resume", flush=True)
                summary["preempted"] = True
                break
        guard.check()
        mngr.wait_until_finished()
        if stopping.metric:
            summary.update({"best_step": stopping.best_step, "best_metric": stopping.best})

        # --- Sample ----------------------------------------------------------------------
        if (config.sample.max_new_tokens > 0 and not summary["preempted"]
                and run.task.name == "lm"):
            summary["sample"] = _sample(run, steps.params(state.params), data.tokenizer)
            writer.write_texts(config.num_train_steps, {"sample": summary["sample"]})
    return summary


def _start_line(run: setup.Run, first_step: int, peak: float, peak_source: str) -> str:
    devices = jax.device_count()
    return (f"Training {run.num_trainable:,} of {run.num_params:,} parameters "
            f"({100 * run.num_trainable / run.num_params:.3g}%) on {devices} "
            f"device{'s' if devices != 1 else ''} (mesh {dict(run.mesh.shape)}), steps "
            f"{first_step}..{run.config.num_train_steps}; MFU peak: {peak / 1e9:,.0f} GFLOP/s "
            f"per device ({peak_source})")


def _sample(run: setup.Run, params: Any, tokenizer: Any) -> str:
    """The prompt of `config.sample` and what the trained model continues it with, through
    the inference engine (until EOS or sample.max_new_tokens)."""
    sample = run.config.sample
    prompt = [tokenizer.bos_id] + tokenizer.encode(sample.prompt)
    model = nnx.merge(run.graphdef, params)
    with Engine(model, max_slots=1, max_seq_len=len(prompt) + sample.max_new_tokens,
                prefill_buckets=(len(prompt),), eos_ids=(tokenizer.eos_id,), mesh=run.mesh,
                rules=run.rules) as engine:
        engine.warmup()
        [request] = engine.generate([prompt], SamplingParams(
            max_tokens=sample.max_new_tokens, temperature=sample.temperature,
            top_k=sample.top_k, seed=run.config.seed))
    return tokenizer.decode(prompt + request.tokens)
