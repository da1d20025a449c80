"""Benchmark a config's train step: compile time, step time, tokens/s, MFU and memory.

Run:  python -m llmjax.bench --config=configs/NAME.py [--config.KEY=VALUE ...] [--steps=N]
      python -m llmjax.bench --config=configs/bench_reference.py \\
          --reference=../shared/bench/baselines.py
      python -m llmjax.bench --generate --reference=../shared/bench/baselines.py
      python -m llmjax.bench --serve --model=runs/shakespeare

Times exactly what llmjax.train runs, on random tokens (llmjax.training.benchmark).
`--reference=PATH` also times the same model in the reference implementations of that
baselines file (plain JAX, Hugging Face transformers on eager torch), each in its own
process and round-robin with ours (llmjax.training.benchmark_reference). `--generate`
times generation instead (llmjax.training.benchmark_generation); `--serve` times
python -m llmjax.serve over HTTP beside the engine alone on the model at --model
(llmjax.inference.benchmark_serving). Prints one table.
"""

import math
import os
import tempfile

from absl import flags
from ml_collections import config_flags

from llmjax import cli
from llmjax.inference.benchmark_serving import compare_serving, format_levels
from llmjax.parallel import sharding
from llmjax.training import restore
from llmjax.training.benchmark import format_table, measure, table_header
from llmjax.training.benchmark_generation import compare_generation, save_reference_model
from llmjax.training.benchmark_products import ceiling_line
from llmjax.training.benchmark_reference import compare_with_reference, ratio_lines

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file to benchmark (configs/NAME.py).",
                                lock_config=True)
flags.DEFINE_integer("steps", 5, "Timed steps; the table gives the best and the median.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after the first (compiling) one.")
flags.DEFINE_bool("packed", True, "Batches carry segment ids, like the training pipeline's; "
                  "--nopacked leaves them out (plain causal attention, no mask array).")
flags.DEFINE_string("reference", "", "Path of a baselines file (shared/bench/baselines.py "
                    "beside this checkout): also time its plain-JAX and HF torch eager steps "
                    "of the same model, round-robin, each in its own process.")
flags.DEFINE_list("levers", [], "With --reference: also time llmjax with each of these XLA:CPU "
                  "flag sets (onednn, xnnpack, onednn_dot, xnn_dot, ynn; control: none, a "
                  "second worker), each beside the default llmjax row, round-robin.")
flags.DEFINE_bool("generate", False, "Time generation instead of training (needs --reference, "
                  "whose model it runs): decode tok/s at 1, 8 and 32 sequences, time to first "
                  "token, warm-up, beside HF generate and the plain-JAX KV-cache loop.")
flags.DEFINE_integer("reps", 3, "With --generate: interleaved timings of each row.")
flags.DEFINE_bool("serve", False, "Time llmjax.serve over HTTP (streaming clients) beside the "
                  "engine alone at 1, 8 and 32 concurrent clients, on --model or on the "
                  "--reference model.")
flags.DEFINE_string("model", None, "With --serve: a workdir, checkpoint, imported or HF "
                    "directory (as llmjax.serve takes).")
flags.DEFINE_integer("max_slots", 8, "With --serve: sequences decoded at once (both engines).")
flags.DEFINE_integer("prompt_tokens", 64, "With --serve: tokens per (random) prompt.")
flags.DEFINE_integer("new_tokens", 64, "With --serve: tokens generated per request.")
flags.DEFINE_integer("requests", 4, "With --serve: requests per client per round, one after "
                     "another.")
flags.DEFINE_integer("rounds", 3, "With --serve: rounds per level, engine and server alternating.")


def serve_table() -> str:
    if not FLAGS.model and not FLAGS.reference:
        raise ValueError("--serve times a model: give --model=PATH (e.g. runs/shakespeare) "
                         "or --reference=PATH/baselines.py")
    if not FLAGS.model:
        FLAGS.model = save_reference_model(
            FLAGS.reference, os.path.join(tempfile.mkdtemp("-llmjax-bench"), "reference"))
    tokenizer = restore.load_tokenizer_of(FLAGS.model)
    mesh, rules = sharding.placement()
    model = restore.load_model(FLAGS.model, mesh=mesh, rules=rules)
    levels, info = compare_serving(
        model, FLAGS.model, restore.eos_ids_of(FLAGS.model, tokenizer), tokenizer.decode,
        tokenizer.vocab_size, max_slots=FLAGS.max_slots, prompt_tokens=FLAGS.prompt_tokens,
        new_tokens=FLAGS.new_tokens, requests=FLAGS.requests, rounds=FLAGS.rounds)
    return (f"{FLAGS.model} ({info['parameters']:,} parameters): {FLAGS.prompt_tokens}-token "
            f"prompts, {FLAGS.new_tokens} tokens each, {FLAGS.requests} requests per client, "
            f"{FLAGS.rounds} rounds; {info['max_slots']} slots; engine warm-up "
            f"{info['warmup_seconds']:.1f}s, compilations after it "
            f"{info['compilations_after_warmup']}\n{format_levels(levels)}")


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.serve:
        print(serve_table(), flush=True)
        return
    if FLAGS.generate:
        if not FLAGS.reference:
            raise ValueError("--generate times the reference model: give --reference="
                             "PATH/baselines.py (shared/bench/baselines.py)")
        print(compare_generation(FLAGS.reference, FLAGS.reps)[0], flush=True)
        return
    config = cli.loaded_config(example="configs/bench_reference.py")
    if FLAGS.reference:
        rows, info = compare_with_reference(config, FLAGS.steps, FLAGS.warmup, FLAGS.reference,
                                            FLAGS.packed, FLAGS.levers)
        notes = [*ratio_lines(rows),
                 ceiling_line(rows, info["matmul_floor"], info["tokens_per_step"])]
    else:
        row, info = measure(config, FLAGS.steps, FLAGS.warmup, FLAGS.packed)
        rows, notes = [row], []
    print(format_table(rows, table_header(FLAGS["config"].config_filename, info)))
    for line in notes:
        print(line)
    losses = ", ".join(f"{r.name} {r.first_loss:.3f}" for r in rows if not math.isnan(r.first_loss))
    print(f"first-step loss (random tokens: about ln vocab = "
          f"{math.log(config.model.vocab_size):.3f}): {losses}", flush=True)


if __name__ == "__main__":
    cli.run(main, compilation_cache=False)  # compile time is one of its columns
