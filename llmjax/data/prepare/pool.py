"""Where the stages run: a pool of worker processes (or this process), with progress bars."""

import multiprocessing
import signal
import sys
from collections.abc import Sequence

from tqdm import tqdm

from llmjax.data.sources import SourceSpec


def worker_pool(num_workers: int, specs: Sequence[SourceSpec]):
    """A pool of `num_workers` processes (an inline one for one worker), to be opened before
    any tokenizer has run in this process."""
    # Forked before any tokenizer runs (a fork after the Rust thread pool started would
    # make each child fall back to one thread, with a warning). Reading array_record files
    # (tfds: sources) in a forked child can hang on the parent's reader thread pool, so
    # those runs start fresh worker processes instead (slower to start).
    forkable = sys.platform == "linux" and all(spec.kind != "tfds" for spec in specs)
    context = multiprocessing.get_context("fork" if forkable else "spawn")
    return (context.Pool(num_workers, initializer=_worker_signals) if num_workers > 1
            else _InlinePool())


def _worker_signals() -> None:
    """A pool worker dies on SIGTERM (Pool.terminate), whatever handler it was forked with."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _InlinePool:
    """multiprocessing.Pool's interface, run in this process (--num_workers=1)."""

    def __enter__(self) -> "_InlinePool":
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def imap(self, function, iterable):
        return map(function, iterable)

    imap_unordered = imap


def progress_bar(show: bool, description: str, total: int, unit: str):
    """A tqdm bar on stderr (counts/s and ETA), or a silent one if not `show`."""
    return tqdm(total=total, desc=description, unit=unit, unit_scale=True, disable=not show,
                file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
