"""What a preparation depends on (`Options`), the names of what it writes, and the keys and
stamps by which a rerun recognises finished work."""

import dataclasses
import hashlib
import json
import os
from typing import Any

from llmjax.data import clean

REPORT_FILE, STAMP_FILE, WORK_SUBDIR = "report.json", "stamp.json", "work"
KEPT = "kept"  # the reason of a document that is not dropped


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything a preparation depends on (the flags, as one value)."""

    sources: tuple[str, ...]
    output: str
    tokenizer: str = "bpe:8192"
    cleaning: clean.CleanOptions = clean.CleanOptions()
    exact_dedup: bool = True
    near_duplicate_threshold: float = 0.8
    minhash_perms: int = 128
    validation_fraction: float = 0.01
    num_shards: int = 0
    num_workers: int = 0
    seed: int = 0
    tfds_data_dir: str = ""
    force: bool = False
    runner: str = "local"  # or "beam" (llmjax.data.prepare.beam)
    beam_pipeline_options: str = ""  # for --runner=beam: Beam's own flags, space-separated

    def stamp(self) -> dict[str, Any]:
        """What, if unchanged (with the inputs), makes a rerun's result the same."""
        fields = dataclasses.asdict(self)
        for key in ("num_workers", "force", "runner", "beam_pipeline_options"):  # how, not what
            fields.pop(key)
        return fields


def check_tokenizer_flag(spec: str) -> None:
    """Raises ValueError unless `spec` is bpe:VOCAB, unigram:VOCAB, byte or a directory."""
    kind, _, size = spec.partition(":")
    if spec == "byte" or os.path.isdir(os.path.expanduser(spec)):
        return
    if kind in ("bpe", "unigram") and size.isdigit() and int(size) > 259:
        return
    raise ValueError(f"--tokenizer={spec!r} is not bpe:VOCAB, unigram:VOCAB (VOCAB > 259), "
                     "byte, or a tokenizer directory")


def stable_hash(value: Any) -> str:
    """A short key of a JSON-able value, the same in every process and run."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


def read_json(path: str) -> Any:
    """The JSON in `path`, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
