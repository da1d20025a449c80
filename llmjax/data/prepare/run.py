"""`prepare`: the stages of a preparation in order, skipping what a previous run finished."""

import functools
import json
import os
import shutil
import time
from typing import Any

# Imported here, before the worker processes fork, so that they start with them loaded (the
# stage modules import clean, sources, prepared, documents and the tokenizers). By module
# path: `from llmjax.data.prepare import stages` would go through the package's __init__,
# which imports this module (a circle).
import llmjax.data.prepare.stages as stages
import llmjax.data.prepare.tokens as tokens
from llmjax.data import prepared, sources
from llmjax.data.prepare.options import (
    REPORT_FILE,
    STAMP_FILE,
    WORK_SUBDIR,
    Options,
    check_tokenizer_flag,
    read_json,
)
from llmjax.data.prepare.pool import progress_bar, worker_pool
from llmjax.data.prepare.report import build_report
from llmjax.data.tokenizer import fingerprint, load_tokenizer


def prepare(options: Options, show_progress: bool = True) -> dict[str, Any]:
    """Runs every stage (skipping finished ones); returns the report (also saved as JSON).

    `options.runner="beam"` runs them as an Apache Beam pipeline instead (beam.py): the same
    dataset, on whichever Beam runner `options.beam_pipeline_options` names."""
    started = time.perf_counter()
    name = prepared.check_name(options.output)
    specs = [sources.parse_source(s, "--source") for s in options.sources]
    if not specs:
        raise ValueError("give at least one --source")
    for spec in specs:
        if spec.kind == "prepared":
            raise ValueError(f"--source={spec.text!r} is already prepared; name raw sources")
    check_tokenizer_flag(options.tokenizer)
    if not 0 <= options.validation_fraction < 1:
        raise ValueError(f"--validation_fraction={options.validation_fraction} must be in "
                         "[0, 1)")
    if options.runner == "beam":
        from llmjax.data.prepare.beam import prepare_with_beam  # needs apache_beam

        return prepare_with_beam(options, specs, name)
    if options.runner != "local":
        raise ValueError(f"--runner={options.runner!r} is not local or beam")
    output = os.path.abspath(os.path.expanduser(options.output))
    work = os.path.join(output, WORK_SUBDIR)
    data_dir = options.tfds_data_dir or None
    num_workers = options.num_workers or os.cpu_count() or 1
    tasks = stages.plan_tasks(specs, data_dir, num_workers)
    # (through JSON, as it is saved: tuples become lists)
    stamp = json.loads(json.dumps({"options": options.stamp(),
                                   "inputs": [t["stamp"] for t in tasks]}))
    if not options.force and read_json(os.path.join(output, STAMP_FILE)) == stamp:
        report = read_json(os.path.join(output, REPORT_FILE))
        if report is not None and os.path.isdir(os.path.join(output, prepared.VERSION)):
            report["up_to_date"] = True
            return report
    if options.force:
        shutil.rmtree(work, ignore_errors=True)
        tokenizer_dir = os.path.join(output, prepared.TOKENIZER_SUBDIR)
        if os.path.exists(tokenizer_dir + ".stamp.json"):  # ours, trained here: retrain it
            shutil.rmtree(tokenizer_dir, ignore_errors=True)
            os.remove(tokenizer_dir + ".stamp.json")
    os.makedirs(work, exist_ok=True)
    seconds: dict[str, float] = {}
    cached: dict[str, str] = {}
    with worker_pool(num_workers, specs) as pool:
        # 1. read + clean
        clock = time.perf_counter()
        read = functools.partial(stages.read_and_clean, specs=specs, options=options, work=work)
        summaries: list[dict[str, Any]] = [None] * len(tasks)  # type: ignore[list-item]
        with progress_bar(show_progress, "read+clean", sum(t["bytes"] for t in tasks),
                          unit="B") as bar:
            for index, summary in pool.imap_unordered(read, enumerate(tasks)):
                summaries[index] = summary
                bar.update(summary["input_bytes"])
                bar.set_postfix(docs=f"{sum(s['num_docs'] for s in summaries if s):,}")
        seconds["read_clean"] = time.perf_counter() - clock
        cached["read_clean"] = f"{sum(s['cached'] for s in summaries)}/{len(tasks)} tasks"

        # 2. deduplicate, then pick the validation documents
        clock = time.perf_counter()
        reasons = stages.deduplicate(summaries, options)
        splits = stages.assign_splits(summaries, reasons, options)
        seconds["dedup"] = time.perf_counter() - clock

        # 3. tokenizer
        clock = time.perf_counter()
        tokenizer_spec, tokenizer_cached = tokens.find_or_train_tokenizer(
            options, output, summaries, reasons, splits, show_progress)
        seconds["tokenizer"] = time.perf_counter() - clock
        cached["tokenizer"] = "yes" if tokenizer_cached else "no"
        tokenizer = load_tokenizer(tokenizer_spec)
        tokenizer_fingerprint = fingerprint(tokenizer)

        # 4. tokenize
        clock = time.perf_counter()
        samples = tokens.sample_texts(summaries, splits["train"])
        load_args = (tokens.rust_only_matches(tokenizer_spec, tokenizer, samples),
                     tokenizer.bos_id, tokenizer.eos_id)
        tokenize = functools.partial(tokens.tokenize_task, tokenizer_spec=tokenizer_spec,
                                     fingerprint=tokenizer_fingerprint,
                                     vocab_size=tokenizer.vocab_size, work=work,
                                     load_args=load_args)
        jobs = [(i, summaries[i], reasons[i]) for i in range(len(tasks))]
        token_counts: list[dict[str, Any]] = [None] * len(tasks)  # type: ignore[list-item]
        with progress_bar(show_progress, "tokenize", sum(s["num_docs"] for s in summaries),
                          unit="doc") as bar:
            for index, counts in pool.imap_unordered(tokenize, jobs):
                token_counts[index] = counts
                bar.update(summaries[index]["num_docs"])
        seconds["tokenize"] = time.perf_counter() - clock
        cached["tokenize"] = f"{sum(c['cached'] for c in token_counts)}/{len(tasks)} tasks"

        # 5. write shuffled shards
        clock = time.perf_counter()
        version_dir = os.path.join(output, prepared.VERSION)
        shutil.rmtree(version_dir, ignore_errors=True)
        os.makedirs(version_dir)
        written = tokens.write_splits(pool, options, name, version_dir, token_counts, splits,
                                      tokenizer.vocab_size, show_progress)
        tokens.write_metadata(options, output, name, version_dir, tokenizer_spec, tokenizer,
                              written)
        seconds["write"] = time.perf_counter() - clock

    seconds["total"] = time.perf_counter() - started
    report = build_report(options, output, tasks, summaries, reasons, splits, token_counts,
                          written, tokenizer_spec, seconds, cached)
    with open(os.path.join(output, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(output, STAMP_FILE), "w") as f:
        json.dump(stamp, f, indent=2)
    return report
