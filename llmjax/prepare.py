"""Prepare a training dataset: raw text -> cleaned, deduplicated, tokenized TFDS shards.

    python -m llmjax.prepare --source='text:raw/**/*.txt' --output=data/my_corpus
    python -m llmjax.train --config=configs/shakespeare.py \\
        --config.data.train=prepared:data/my_corpus

Reads and cleans every source, drops duplicates, trains a tokenizer if asked (bpe:N,
unigram:N), tokenizes, and writes shuffled array_record shards of a TFDS dataset in
OUTPUT/1.0.0 (splits train and validation), then OUTPUT/report.json, also printed. A rerun
with the same arguments and unchanged inputs skips what is done (--force redoes everything).
--runner=beam runs the same stages as an Apache Beam pipeline (--beam_pipeline_options names
the runner: Dataflow, Flink, Spark; DirectRunner by default) and writes the same dataset.
The stages in detail, and the library this command calls: llmjax/data/prepare/__init__.py.
"""

from absl import flags

from llmjax import cli
from llmjax.data import clean
from llmjax.data.prepare import Options, format_report, prepare

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("source", None, "Input, as a data source string: text:GLOB, "
                          "jsonl:GLOB[#FIELD|#PROMPT+RESPONSE], parquet:GLOB[...], "
                          "tfds:NAME[/CONFIG][:SPLIT][#FIELD], bundled:shakespeare. Repeatable.")
flags.DEFINE_string("output", None, "Dataset directory DIR/NAME (NAME: lowercase, digits, _).")
flags.DEFINE_string("tokenizer", Options.tokenizer, "bpe:VOCAB or unigram:VOCAB (train on the "
                    "kept text), byte, or a directory AutoTokenizer loads.")
flags.DEFINE_enum("normalize", clean.CleanOptions.normalize, list(clean.NORMALIZATIONS),
                  "Unicode normalisation.")
flags.DEFINE_integer("min_chars", clean.CleanOptions.min_chars, "Drop shorter documents.")
flags.DEFINE_integer("max_chars", clean.CleanOptions.max_chars,
                     "Drop longer documents (0: no limit).")
flags.DEFINE_float("max_repeated_line_fraction", clean.CleanOptions.max_repeated_line_fraction,
                   "Drop documents with more of their characters in repeated lines.")
flags.DEFINE_float("max_repeated_ngram_fraction",
                   clean.CleanOptions.max_repeated_ngram_fraction,
                   "Drop documents with more of their words in repeated word 5-grams.")
flags.DEFINE_bool("exact_dedup", Options.exact_dedup, "Drop exact duplicates (normalised text).")
flags.DEFINE_float("near_duplicate_threshold", Options.near_duplicate_threshold, "Drop near "
                   "duplicates: estimated Jaccard similarity of word 5-grams >= this (0: keep "
                   "them).")
flags.DEFINE_integer("minhash_perms", Options.minhash_perms, "MinHash signature length.")
flags.DEFINE_float("validation_fraction", Options.validation_fraction, "Share of kept documents "
                   "in the validation split (at least one if > 0).")
flags.DEFINE_integer("num_shards", Options.num_shards, "Train split shards (0: about 256 MB "
                     "each, at least one per worker).")
flags.DEFINE_integer("num_workers", Options.num_workers, "Worker processes (0: one per core).")
flags.DEFINE_integer("seed", Options.seed, "Seed of the shuffle and of the validation split.")
flags.DEFINE_string("tfds_data_dir", Options.tfds_data_dir, "Where tfds: sources are prepared "
                    "(TFDS default if empty); nothing is downloaded.")
flags.DEFINE_bool("force", Options.force, "Redo every stage even if its results are there.")
flags.DEFINE_enum("runner", Options.runner, ["local", "beam"], "local: a pool of worker "
                  "processes on this machine; beam: an Apache Beam pipeline (the same dataset; "
                  'needs pip install -e ".[beam]").')
flags.DEFINE_string("beam_pipeline_options", Options.beam_pipeline_options, "For --runner=beam: "
                    "Beam's pipeline options, e.g. '--runner=DataflowRunner --project=P "
                    "--region=R --temp_location=gs://B/tmp' (default: DirectRunner here).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}; flags only (see --help)")
    if not FLAGS.source or not FLAGS.output:
        raise ValueError("give --source=KIND:LOCATION (one or more) and --output=DIR/NAME")
    options = Options(
        sources=tuple(FLAGS.source), output=FLAGS.output, tokenizer=FLAGS.tokenizer,
        cleaning=clean.CleanOptions(
            normalize=FLAGS.normalize, min_chars=FLAGS.min_chars, max_chars=FLAGS.max_chars,
            max_repeated_line_fraction=FLAGS.max_repeated_line_fraction,
            max_repeated_ngram_fraction=FLAGS.max_repeated_ngram_fraction),
        exact_dedup=FLAGS.exact_dedup, near_duplicate_threshold=FLAGS.near_duplicate_threshold,
        minhash_perms=FLAGS.minhash_perms, validation_fraction=FLAGS.validation_fraction,
        num_shards=FLAGS.num_shards, num_workers=FLAGS.num_workers, seed=FLAGS.seed,
        tfds_data_dir=FLAGS.tfds_data_dir, force=FLAGS.force, runner=FLAGS.runner,
        beam_pipeline_options=FLAGS.beam_pipeline_options)
    report = prepare(options)
    if report.get("up_to_date"):
        print(f"{report['dataset']} is up to date (same arguments and inputs); "
              "--force redoes it")
    print(format_report(report))
    print(f"\nTrain on it:\n  python -m llmjax.train --config=configs/shakespeare.py "
          f"--config.data.train=prepared:{options.output}")


if __name__ == "__main__":
    cli.run(main)
