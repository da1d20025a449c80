"""Prepare a training dataset: raw text -> cleaned, deduplicated, tokenized TFDS shards.

    python -m llmjax.prepare --source='text:raw/**/*.txt' --output=data/my_corpus
    python -m llmjax.train --config=configs/shakespeare.py \\
        --config.data.train=prepared:data/my_corpus

Stages (each shows progress with counts/s and ETA, and uses every core; --runner=beam runs
them on a Beam runner instead, see beam.py):

    1. read + clean   every input file (or TFDS record range), in parallel: Unicode
                      normalisation, control characters removed, length and repetition
                      filters; bad input (unreadable file, invalid UTF-8, malformed JSON line,
                      missing field) is counted per file, never fatal
    2. deduplicate    exact duplicates (hash of the normalised text), then near duplicates
                      (MinHash + LSH at --near_duplicate_threshold); the first copy is kept
    3. tokenizer      --tokenizer=bpe:N or unigram:N trains one on the kept training text and
                      saves it in OUTPUT/tokenizer (a directory AutoTokenizer loads); or a
                      directory, or `byte`
    4. tokenize       in parallel, per input file
    5. write          shuffled array_record shards of a TFDS dataset in OUTPUT/1.0.0
                      (splits train and validation), read by tfds.data_source

Then OUTPUT/report.json (also printed) says how many documents, bytes and tokens were kept,
and dropped for each reason, and how long each stage took. Stages 1 and 4 keep their results
per input file in OUTPUT/work/, and a run with the same arguments and unchanged inputs skips
what is done: a finished dataset is not rewritten at all (--force redoes everything).

The command is `python -m llmjax.prepare` (its flags are the fields of `Options`). From
Python, `prepare(Options(sources=(...,), output=...))` returns the report and
`format_report(report)` renders it as the table the command prints.

    options.py  Options, the names of what is written, stamps and keys of finished work
    order.py    which document goes where (document keys, shuffle, split, tokenizer sample,
                shards): the rules both runners apply
    run.py      prepare(): the stages in order, skipping finished ones
    stages.py   1. read + clean, 2. deduplicate and split
    tokens.py   3. tokenizer, 4. tokenize, 5. write the shards
    pool.py     the worker pool (fork or spawn) and progress bars
    report.py   the report and its table
    beam.py     --runner=beam: the same stages as an Apache Beam pipeline (Dataflow, Flink,
                Spark, DirectRunner), the same dataset; beam_steps.py: its per-element steps
"""

from llmjax.data.prepare.options import KEPT, REPORT_FILE, STAMP_FILE, WORK_SUBDIR, Options
from llmjax.data.prepare.report import format_report
from llmjax.data.prepare.run import prepare

__all__ = ["KEPT", "REPORT_FILE", "STAMP_FILE", "WORK_SUBDIR", "Options", "format_report",
           "prepare"]
