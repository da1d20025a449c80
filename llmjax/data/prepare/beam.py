"""`--runner=beam`: a preparation as one Apache Beam pipeline (DirectRunner, Dataflow, Flink,
Spark), writing the same dataset and report as the local pool.

    read + clean    one element per input unit (file, TFDS record range): stages.read_unit
    exact dedup     GroupByKey on the exact key; the first document (in document order,
                    order.DocKey) of each group is kept
    near dedup      GroupByKey per LSH band bucket, candidate pairs and similarity as
                    clean.near_duplicates has them, then the connected groups of the pairs
                    (on one worker: pairs are few) drop all but their first document
    split, shuffle  kept documents ranked by order.shuffle_key (GroupByKey on the hash's top
                    bits, a prefix sum of the bucket sizes): validation first, then train
    tokenizer       trained on one worker from the train documents order.py samples, saved
                    in OUTPUT/tokenizer, read by every worker
    tokenize        every document (dropped ones are counted in the report too)
    write           GroupByKey per shard, records in shuffled order, prepared.write_shard

Then this process writes the TFDS metadata and OUTPUT/report.json from the pipeline's totals
(OUTPUT/work/beam_results.json). OUTPUT may be a gs:// URL. Nothing is reused from an
earlier run: the runner retries failed work itself.
"""

import json
import os
import shlex
import time
from typing import Any

import llmjax.data.prepare.beam_steps as steps  # (by module path: the package imports run.py)
import llmjax.data.prepare.order as order
from llmjax.data import clean, files, prepared, sources
from llmjax.data.prepare.options import KEPT, REPORT_FILE, WORK_SUBDIR, Options
from llmjax.data.prepare.report import assemble_report, reason_table
from llmjax.data.sources import SourceSpec
from llmjax.data.tokenizer import TRAINABLE, load_tokenizer

RESULTS_FILE = "beam_results.json"


def prepare_with_beam(options: Options, specs: list[SourceSpec], name: str) -> dict[str, Any]:
    """Runs the pipeline on the runner --beam_pipeline_options names (DirectRunner if none);
    returns the report (also saved as JSON)."""
    try:
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise ValueError('--runner=beam needs Apache Beam: pip install -e ".[beam]"') from None
    started = time.perf_counter()
    output = (options.output.rstrip("/") if files.is_remote(options.output)
              else os.path.abspath(os.path.expanduser(options.output)))
    data_dir = options.tfds_data_dir or None
    units = [(s, u, unit) for s, spec in enumerate(specs)
             for u, unit in enumerate(sources.input_units(spec, data_dir))]
    version_dir = os.path.join(output, prepared.VERSION)
    work = os.path.join(output, WORK_SUBDIR)
    files.remove_tree(version_dir)
    for directory in (version_dir, work):
        files.makedirs(directory)
    tokenizer_dir = os.path.join(output, prepared.TOKENIZER_SUBDIR)
    if options.tokenizer.partition(":")[0] in TRAINABLE:
        files.remove_tree(tokenizer_dir)
    pipeline_options = PipelineOptions(shlex.split(options.beam_pipeline_options))
    with beam.Pipeline(options=pipeline_options) as pipeline:
        _build(beam, pipeline, options, specs, units, name, version_dir, tokenizer_dir,
               os.path.join(work, RESULTS_FILE))
    seconds = {"beam_pipeline": time.perf_counter() - started}
    return _finish(options, output, name, version_dir, units,
                   json.loads(files.read_text(os.path.join(work, RESULTS_FILE))), seconds,
                   started)


def _build(beam, pipeline, options: Options, specs, units, name: str, version_dir: str,
           tokenizer_dir: str, results_path: str) -> None:
    """The pipeline's steps (see the module docstring)."""
    side = beam.pvalue

    # 1. read + clean
    read = (pipeline | "units" >> beam.Create(units) | "spread" >> beam.Reshuffle()
            | "read+clean" >> beam.FlatMap(steps.read_unit, specs, options))
    unit_info, documents = read | "unit or document" >> beam.Partition(
        lambda item, _: 0 if isinstance(item[0], str) else 1, 2)

    # 2. deduplicate
    passed = documents | "passed filters" >> beam.Filter(lambda kd: kd[1].reason is None)
    verdicts = []
    if options.exact_dedup:
        by_text = (passed | "by exact key" >> beam.Map(lambda kd: (kd[1].exact_key,
                                                                   (kd[0], kd[1].signature)))
                   | "group exact" >> beam.GroupByKey())
        survivors = by_text | "first copy" >> beam.Map(steps.first_copy)
        verdicts.append(by_text | "later copies" >> beam.FlatMap(steps.later_copies))
    else:
        survivors = passed | "signature" >> beam.Map(lambda kd: (kd[0], kd[1].signature))
    if options.near_duplicate_threshold > 0:
        bands, rows = clean.lsh_bands(options.minhash_perms, options.near_duplicate_threshold)
        verdicts.append(
            survivors | "bands" >> beam.FlatMap(steps.band_buckets, bands, rows)
            | "group bucket" >> beam.GroupByKey()
            | "pairs" >> beam.FlatMap(steps.bucket_edges, options.near_duplicate_threshold)
            | "distinct pairs" >> beam.Distinct()
            | "all pairs" >> beam.combiners.ToList()
            | "groups" >> beam.FlatMap(steps.near_duplicate_verdicts))
    verdict = (verdicts | "verdicts" >> beam.Flatten() if verdicts
               else pipeline | "no verdicts" >> beam.Create([]))
    judged = ({"document": documents, "verdict": verdict} | "join verdicts" >> beam.CoGroupByKey()
              | "judge" >> beam.Map(steps.judge))

    # split and shuffle: rank the kept documents by their shuffle key
    kept = (judged | "kept" >> beam.Filter(lambda j: j[1] == KEPT)
            | "shuffle key" >> beam.Map(lambda j: steps.bucket_of(
                order.shuffle_key(options.seed, j[0]))))
    ranking = side.AsSingleton(
        kept | "count bucket" >> beam.combiners.Count.PerKey()
        | "bucket counts" >> beam.combiners.ToList() | "starts" >> beam.Map(steps.bucket_starts))
    placement = (kept | "group rank bucket" >> beam.GroupByKey()
                 | "place" >> beam.FlatMap(steps.placements, ranking, options))
    placed = ({"judged": judged | "by key" >> beam.Map(lambda j: (j[0], j)),
               "placement": placement} | "join placement" >> beam.CoGroupByKey()
              | "placed" >> beam.Map(steps.attach_placement))

    # 3. tokenizer
    if options.tokenizer.partition(":")[0] in TRAINABLE:
        train = placed | "train docs" >> beam.Filter(lambda p: p[3] and p[3][0] == "train")
        rate = side.AsSingleton(
            train | "train bytes" >> beam.Map(lambda p: p[2].num_bytes)
            | "sum bytes" >> beam.CombineGlobally(sum)
            | "rate" >> beam.Map(order.tokenizer_sample_rate))
        tokenizer_spec = (
            train | "sample" >> beam.Filter(
                lambda p, r: order.in_tokenizer_sample(options.seed, p[0], r), rate)
            | "sample text" >> beam.Map(steps.document_text)
            | "gather sample" >> beam.combiners.ToList()
            | "train tokenizer" >> beam.Map(steps.train_and_save, options, tokenizer_dir))
    else:
        spec = options.tokenizer
        spec = spec if spec == "byte" else os.path.abspath(os.path.expanduser(spec))
        tokenizer_spec = pipeline | "tokenizer" >> beam.Create([spec])
    tokenizer = side.AsSingleton(tokenizer_spec)

    # 4. tokenize
    tokenized = (placed | "batch" >> beam.BatchElements(min_batch_size=16, max_batch_size=256)
                 | "tokenize" >> beam.FlatMap(steps.tokenize, tokenizer))
    token_counts, records = tokenized | "count or record" >> beam.Partition(
        lambda item, _: 0 if item[0] == "tokens" else 1, 2)

    # 5. write
    counts = side.AsSingleton(
        records | "split tokens" >> beam.Map(lambda r: (r[0], len(r[2])))
        | "sum split tokens" >> beam.CombinePerKey(sum) | "all splits" >> beam.combiners.ToList()
        | "shard counts" >> beam.Map(steps.shard_counts, ranking, tokenizer, options))
    shards = (records | "assign shard" >> beam.Map(steps.assign_shard, counts, ranking, options)
              | "group shard" >> beam.GroupByKey()
              | "write shard" >> beam.Map(steps.write_shard, counts, version_dir, name, tokenizer))

    # the report's totals, one small JSON file
    per_reason = (judged | "reason bytes" >> beam.Map(lambda j: (j[1], (1, j[2].num_bytes)))
                  | "sum reasons" >> beam.CombinePerKey(lambda v: tuple(map(sum, zip(*v))))
                  | "reason row" >> beam.Map(lambda kv: ("documents", kv[0], *kv[1])))
    per_reason_tokens = (token_counts | "reason tokens" >> beam.Map(lambda t: (t[1], t[2]))
                         | "sum tokens" >> beam.CombinePerKey(sum)
                         | "tokens row" >> beam.Map(lambda kv: ("tokens", *kv)))
    tokenizer_row = tokenizer_spec | "tokenizer row" >> beam.Map(lambda s: ("tokenizer", s))
    _ = ((unit_info, shards, per_reason, per_reason_tokens, tokenizer_row)
         | "rows" >> beam.Flatten() | "gather rows" >> beam.combiners.ToList()
         | "save rows" >> beam.Map(lambda rows: files.write_text(
             results_path, json.dumps(rows, default=_plain))))


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def _finish(options: Options, output: str, name: str, version_dir: str, units, rows,
            seconds: dict[str, float], started: float) -> dict[str, Any]:
    """The TFDS metadata and the report from the pipeline's result rows."""
    import llmjax.data.prepare.tokens as tokens

    by_reason = reason_table()
    bad_files: dict[str, dict[str, Any]] = {}
    control_removed = 0
    written: dict[str, dict[str, Any]] = {}
    shard_rows = []
    tokenizer_spec = "byte"
    for row in sorted(rows, key=lambda row: (row[0], row[1:2] if row[0] == "unit" else 0)):
        kind = row[0]
        if kind == "unit":
            _, _, bad, removed = row
            bad_files.update(bad)  # in input order, as the local pool lists them
            control_removed += removed
        elif kind == "documents":
            by_reason[row[1]]["documents"] += row[2]
            by_reason[row[1]]["bytes"] += row[3]
        elif kind == "tokens":
            by_reason[row[1]]["tokens"] += row[2]
        elif kind == "shard":
            shard_rows.append(row[1:])
        elif kind == "tokenizer":
            tokenizer_spec = row[1]
    if by_reason.get(KEPT, {}).get("documents", 0) == 0:
        raise ValueError("no document survived cleaning and deduplication; see the filters "
                         "(--min_chars, --max_repeated_*) and the inputs")
    for split in ("train", "validation"):
        mine = sorted(r for r in shard_rows if r[0] == split)
        if mine:
            written[split] = {"shard_lengths": [r[2] for r in mine],
                              "bytes": sum(r[3] for r in mine),
                              "documents": sum(r[2] for r in mine),
                              "tokens": sum(r[4] for r in mine), "shards": len(mine)}
    tokenizer = load_tokenizer(tokenizer_spec)
    clock = time.perf_counter()
    tokens.write_metadata(options, output, name, version_dir, tokenizer_spec, tokenizer, written)
    seconds["write_metadata"] = time.perf_counter() - clock
    seconds["total"] = time.perf_counter() - started
    report = assemble_report(options, output, by_reason, bad_files, len(units), control_removed,
                             written, tokenizer_spec, seconds, cached={"beam": "nothing reused"})
    files.write_text(os.path.join(output, REPORT_FILE), json.dumps(report, indent=2))
    return report
