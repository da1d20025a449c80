"""The report of a preparation: what was kept and dropped, and why; how long each stage took.

Saved as OUTPUT/report.json by `prepare` and printed by `format_report`.
"""

import os
from collections import defaultdict
from typing import Any

from llmjax.data import clean, prepared, sources
from llmjax.data.prepare.options import KEPT, Options


def build_report(options: Options, output: str, tasks, summaries, reasons, splits,
                 token_counts, written, tokenizer_spec: str, seconds: dict[str, float],
                 cached: dict[str, str]) -> dict[str, Any]:
    """The report (JSON-able) from every stage's results (the local pool's)."""
    by_reason = reason_table()
    bad_files: dict[str, dict[str, Any]] = {}
    for summary, task_reasons, counts in zip(summaries, reasons, token_counts, strict=True):
        for reason, num_bytes in zip(task_reasons, summary["bytes"], strict=True):
            by_reason[reason]["documents"] += 1
            by_reason[reason]["bytes"] += int(num_bytes)
        for reason, tokens in counts["tokens_by_reason"].items():
            by_reason[reason]["tokens"] += tokens
        bad_files.update(summary["bad"])
    return assemble_report(
        options, output, by_reason, bad_files, len(tasks),
        int(sum(s["control_removed"] for s in summaries)), written, tokenizer_spec, seconds,
        cached)


def reason_table() -> dict[str, dict[str, int]]:
    """{reason: {"documents", "bytes", "tokens"}} at zero, every reason listed (in the
    report's order), and any other (`kept`) added on first use."""
    by_reason: dict[str, dict[str, int]] = defaultdict(lambda: {"documents": 0, "bytes": 0,
                                                                 "tokens": 0})
    for reason in (*sources.BAD_INPUT_REASONS, *clean.FILTER_REASONS, clean.EXACT_DUPLICATE,
                   clean.NEAR_DUPLICATE):  # every reason in the report, even at zero
        by_reason[reason]
    return by_reason


def assemble_report(options: Options, output: str, by_reason: dict[str, dict[str, int]],
                    bad_files: dict[str, dict[str, Any]], num_tasks: int, control_removed: int,
                    written, tokenizer_spec: str, seconds: dict[str, float],
                    cached: dict[str, str]) -> dict[str, Any]:
    """The report from the totals: `by_reason` counts the documents read (bad input not
    yet), `bad_files` is {label: {"counts", "examples"}} in input order."""
    for entry in bad_files.values():
        for reason, count in entry["counts"].items():
            by_reason[reason]["documents"] += count
    kept = by_reason.pop(KEPT, {"documents": 0, "bytes": 0, "tokens": 0})
    records_read = sum(v["documents"] for v in by_reason.values()) + kept["documents"]
    input_bytes = sum(v["bytes"] for v in by_reason.values()) + kept["bytes"]
    return {
        "output": output,
        "dataset": os.path.join(output, prepared.VERSION),
        "tokenizer": tokenizer_spec,
        "sources": list(options.sources),
        "input": {"tasks": num_tasks, "records": records_read, "bytes": input_bytes},
        "kept": {**kept, "splits": {split: {k: info[k] for k in ("documents", "tokens",
                                                                  "shards", "bytes")}
                                    for split, info in written.items()}},
        "dropped": dict(by_reason),
        "bad_input": bad_files,
        "control_characters_removed": control_removed,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "cached": cached,
        "options": {k: v for k, v in options.stamp().items() if k not in ("sources",)},
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a table, for the console."""
    lines = [f"{'':28}{'documents':>12}{'bytes':>14}{'tokens':>14}"]

    def row(label: str, entry: dict[str, int]) -> None:
        tokens = f"{entry['tokens']:,}" if "tokens" in entry else "-"
        num_bytes = f"{entry['bytes']:,}" if entry.get("bytes") else "-"
        lines.append(f"{label:28}{entry['documents']:>12,}{num_bytes:>14}{tokens:>14}")

    row("kept", report["kept"])
    for split, info in report["kept"]["splits"].items():
        lines.append(f"  {split:26}{info['documents']:>12,}{'':>14}{info['tokens']:>14,}"
                     f"   ({info['shards']} shards, {info['bytes']:,} bytes on disk)")
    for reason, entry in report["dropped"].items():
        row(f"dropped: {reason}", entry)
    lines.append(f"control characters removed: {report['control_characters_removed']:,}")
    for label, entry in report["bad_input"].items():
        counts = ", ".join(f"{reason} {count:,}" for reason, count in entry["counts"].items())
        lines.append(f"bad input in {label}: {counts}  (e.g. {entry['examples'][0]})")
    seconds = report["seconds"]
    if report.get("up_to_date"):  # the saved report's timings are those of an earlier run
        lines.append(f"seconds: nothing redone now (the run that prepared it took "
                     f"{seconds['total']:.1f} s)   reused: everything")
    else:
        lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
                     + "   reused: " + ", ".join(f"{k} {v}" for k, v in report["cached"].items()))
    lines.append(f"dataset: {report['dataset']}   tokenizer: {report['tokenizer']}")
    return "\n".join(lines)
