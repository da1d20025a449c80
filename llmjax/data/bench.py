"""Data pipeline throughput next to its upper bound (the tokenizer) and its consumer (training).

Run:  python -m llmjax.data.bench [--config=configs/shakespeare.py] [--train_steps=30]
      python -m llmjax.data.bench --metrics=runs/shakespeare/metrics.jsonl  (no training)

Prints one table of tokens/s, each row measured on this machine over the config's
training text (`data.train`) with its tokenizer (`data.tokenizer`, trained here if bpe:N):

    tokenizer alone          encode_batch over every document: the upper bound of any
                             pipeline that tokenizes on the fly
    tokenize + pack + batch  text -> tokenize_documents -> make_train_iterator -> batches,
                             one epoch's worth of rows and more; timed end to end
    pack + batch             the same from already tokenized documents in memory
    prepared + pack + batch  reading a `llmjax.prepare` dataset (array_record, tfds) record by
                             record, with 0 and N grain worker processes
    train step               what `llmjax.train` consumes: tokens/s of a few real steps of
                             the config, run as `python -m llmjax.train` with the same
                             --config.KEY=VALUE overrides (or the median
                             train/tokens_per_sec of --metrics)

Pipeline rows count the positions they deliver (rows x seq_len, padding included), which is
what a train step consumes; the fill column says how many of them are trained tokens.
"""

import importlib.util
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from llmjax.data import clean, pipeline, prepare, prepared, sources
from llmjax.data.documents import tokenize_documents
from llmjax.data.tokenizer import load_tokenizer

FLAGS = flags.FLAGS
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "shakespeare.py")
config_flags.DEFINE_config_file("config", None, "Config file whose data and train step to "
                                "measure (configs/NAME.py[:ARG]; default: configs/shakespeare.py).",
                                lock_config=True)
flags.DEFINE_integer("train_steps", 30, "Real train steps to time (0: skip the train row).")
flags.DEFINE_string("metrics", "", "Read the train step's tokens/s from this metrics.jsonl "
                    "instead of training.")
flags.DEFINE_list("workers", ["0", "2"], "grain worker counts for the prepared-dataset rows.")
flags.DEFINE_float("seconds", 10.0, "Minimum time per pipeline measurement.")


def time_tokenizer(tokenizer, texts: list[str], seconds: float) -> float:
    """Tokens per second of encode_batch over `texts` (repeated for at least `seconds`)."""
    tokens, elapsed = 0, 0.0
    while elapsed < seconds:
        start = time.perf_counter()
        tokens += sum(len(ids) for ids in tokenizer.encode_batch(texts))
        elapsed += time.perf_counter() - start
    return tokens / elapsed


def time_batches(make_iterator, num_batches: int, seconds: float,
                 steady: bool = False) -> tuple[float, float, float]:
    """(positions per second, share of positions with a trained token, seconds to the first
    batch), from building the iterator and taking `num_batches` batches, repeated for at
    least `seconds`. `steady`: time from the first batch on, as a long run sees it."""
    positions = trained = 0
    elapsed = first_batch = 0.0
    while elapsed < seconds:
        start = time.perf_counter()
        iterator = make_iterator()
        try:
            for index in range(num_batches):
                batch = next(iterator)
                if index == 0:
                    first_batch = time.perf_counter() - start
                    if steady:
                        start = time.perf_counter()
                        continue
                positions += batch["inputs"].size
                trained += int(batch["loss_mask"].sum())
        finally:
            elapsed += time.perf_counter() - start
            if hasattr(iterator, "close"):
                iterator.close()
    return positions / elapsed, trained / positions, first_batch


def config_args(argv: Sequence[str]) -> list[str]:
    """The --config=FILE and --config.KEY=VALUE arguments of the parsed command line `argv`,
    in order, for the train step's run; --config=DEFAULT_CONFIG first if none names a file."""
    argv = FLAGS.read_flags_from_files(list(argv), force_gnu=False)  # as config_flags reads it
    found: list[str] = []
    for i, arg in enumerate(argv[1:], start=1):
        match = re.fullmatch(r"--?(no)?(config(?:\.[\w.]+)?)(=.*)?", arg, re.DOTALL)
        if match is None:
            continue
        found.append(arg)
        negated, name, value = match.groups()
        # `--config FILE`, `--config.KEY VALUE`: absl takes the next argument as the value
        # of any flag but a boolean one.
        if (value is None and not negated and i + 1 < len(argv)
                and not isinstance(FLAGS[name], flags.BooleanFlag)):
            found.append(argv[i + 1])
    if not any(re.match(r"--?config(=|$)", arg) for arg in found):
        found.insert(0, f"--config={DEFAULT_CONFIG}")
    return found


def train_tokens_per_sec(config_args: Sequence[str], steps: int, workdir: str) -> float:
    """Median train/tokens_per_sec of `steps` real steps of `python -m llmjax.train` with
    `config_args` (--config=FILE and overrides), after compilation, in `workdir`.

    Raises subprocess.CalledProcessError (with the command and its stderr) if it fails.
    """
    command = [sys.executable, "-m", "llmjax.train", *config_args,
               f"--config.num_train_steps={steps}",
               f"--config.log_every_steps={max(1, steps // 3)}",
               f"--config.eval_every_steps={steps * 10}",
               f"--config.checkpoint_every_steps={steps * 10}",
               "--config.sample.max_new_tokens=0", f"--workdir={workdir}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, command, result.stdout,
                                            result.stderr)
    return metrics_tokens_per_sec(os.path.join(workdir, "metrics.jsonl"))


def metrics_tokens_per_sec(path: str) -> float:
    with open(path) as f:
        rates = [r["train/tokens_per_sec"] for r in map(json.loads, f)
                 if "train/tokens_per_sec" in r]
    if not rates:
        raise ValueError(f"--metrics={path} has no train/tokens_per_sec records")
    return statistics.median(rates)


def run(config: ml_collections.ConfigDict, train_steps: int, metrics: str, workers: list[int],
        seconds: float, train_config_args: Sequence[str]) -> list[tuple]:
    """Rows of (what, tokens per second, fill or None). `train_config_args`: the --config
    arguments of the train step's run (`config` loaded from them)."""
    rows: list[tuple] = []
    scratch = tempfile.mkdtemp(prefix="llmjax-data-bench-")
    documents = sources.read_documents(config.data.train)
    texts = [sources.document_text(d) for d in documents]
    tokenizer = load_tokenizer(config.data.tokenizer, texts, scratch)
    threads = os.environ.get("RAYON_NUM_THREADS", str(os.cpu_count()))
    rows.append((f"tokenizer alone ({config.data.tokenizer}, encode_batch, {threads} threads)",
                 time_tokenizer(tokenizer, texts, seconds), None, None))

    shape = dict(seq_len=config.seq_len, global_batch_size=config.global_batch_size,
                 seed=config.seed, packing=config.data.packing,
                 packing_bins=config.data.packing_bins)
    token_docs = tokenize_documents(tokenizer, documents)
    epoch_batches = sum(len(t) for t in token_docs) // (config.seq_len
                                                        * config.global_batch_size) + 1
    rows.append(("tokenize + pack + batch (text in memory, one epoch)", *time_batches(
        lambda: pipeline.make_train_iterator(tokenize_documents(tokenizer, documents),
                                             **shape), epoch_batches, seconds)))
    rows.append(("pack + batch (tokens in memory, one epoch)", *time_batches(
        lambda: pipeline.make_train_iterator(token_docs, **shape), epoch_batches, seconds)))

    tokenizer_dir = os.path.join(scratch, "tokenizer")
    report = prepare.prepare(prepare.Options(
        sources=(config.data.train,), output=os.path.join(scratch, "bench_corpus"),
        tokenizer=tokenizer_dir if os.path.isdir(tokenizer_dir) else config.data.tokenizer,
        exact_dedup=False, near_duplicate_threshold=0, validation_fraction=0,
        cleaning=clean.CleanOptions(min_chars=0, max_repeated_line_fraction=1,
                                            max_repeated_ngram_fraction=1)),
        show_progress=False)
    records = pipeline.TokenSource("prepared", prepared.open_split(report["output"]))
    for num_workers in workers:
        rows.append((f"prepared array_record + pack + batch ({num_workers} workers, steady)",
                     *time_batches(lambda n=num_workers: pipeline.make_mixture_iterator(
                         [records], num_workers=n, **shape), 4 * epoch_batches, seconds,
                         steady=True)))

    if metrics:
        rows.append((f"train step ({metrics})", metrics_tokens_per_sec(metrics), None, None))
    elif train_steps > 0:
        rows.append((f"train step ({config.name}, {train_steps} steps)",
                     train_tokens_per_sec(train_config_args, train_steps,
                                          os.path.join(scratch, "run")),
                     None, None))
    return rows


def format_table(rows: list[tuple]) -> str:
    """Rows of (what, tokens/s, fill or None, seconds to first batch or None)."""
    train = next((row[1] for row in rows if row[0].startswith("train step")), None)
    width = max(len(row[0]) for row in rows)
    lines = [f"{'':{width}}  {'tokens/s':>12}  {'fill':>5}  {'first batch':>11}  "
             f"{'x train step':>12}",
             f"{'-' * width}  {'-' * 12}  {'-' * 5}  {'-' * 11}  {'-' * 12}"]
    for what, rate, fill, first in rows:
        ratio = f"{rate / train:,.1f}x" if train else "-"
        lines.append(f"{what:{width}}  {rate:>12,.0f}  "
                     f"{'' if fill is None else f'{fill:.0%}':>5}  "
                     f"{'' if first is None else f'{first:.2f} s':>11}  {ratio:>12}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TFDS and Orbax INFO lines drown the table
    config = FLAGS.config
    if config is None:  # no --config: the default job's
        spec = importlib.util.spec_from_file_location("shakespeare_config", DEFAULT_CONFIG)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
    try:
        rows = run(config, FLAGS.train_steps, FLAGS.metrics, [int(w) for w in FLAGS.workers],
                   FLAGS.seconds, config_args(sys.argv))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except subprocess.CalledProcessError as e:
        last_line = (e.stderr or "").strip().splitlines()[-1:] or ["(no output on stderr)"]
        sys.exit(f"error: {shlex.join(e.cmd)} failed (exit status {e.returncode}): "
                 f"{last_line[0]}")
    print(f"{os.cpu_count()} CPU cores; seq_len {config.seq_len}, global batch "
          f"{config.global_batch_size}, packing {config.data.packing}; source "
          f"{config.data.train}")
    print(format_table(rows))


if __name__ == "__main__":
    app.run(main)
