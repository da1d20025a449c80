"""Cleaning and deduplication of text documents (the first stages of `llmjax.data.prepare`).

    clean_text          Unicode normalisation (NFC by default), control characters removed
                        (newlines and tabs kept), Windows line ends made Unix ones
    filter_reason       why a cleaned document is dropped: empty, too short or long, or
                        repetitive (too much of it in repeated lines or repeated word n-grams)
    exact_key           hash of the normalised text (case and whitespace folded): equal keys
                        are exact duplicates
    minhash             MinHash signature of a document's word 5-gram shingles
    near_duplicates     LSH over the signatures: which documents are near duplicates of an
                        earlier one (estimated Jaccard similarity >= threshold)

All of it is deterministic (no Python `hash()`, whose value changes per process), so
workers can compute keys and signatures in parallel and a rerun reproduces them.
"""

import dataclasses
import hashlib
import re
import unicodedata
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

NORMALIZATIONS = ("NFC", "NFKC", "none")
EMPTY, TOO_SHORT, TOO_LONG, REPEATED_LINES, REPEATED_NGRAMS = (
    "empty", "too_short", "too_long", "repeated_lines", "repeated_ngrams")
FILTER_REASONS = (EMPTY, TOO_SHORT, TOO_LONG, REPEATED_LINES, REPEATED_NGRAMS)
EXACT_DUPLICATE, NEAR_DUPLICATE = "exact_duplicate", "near_duplicate"

# Control characters (Unicode category Cc) other than tab and newline, and the
# zero-width / bidi formatting marks that only hide text.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_WORD = re.compile(r"\w+")
_MERSENNE_61 = np.uint64((1 << 61) - 1)
_SHINGLE_WORDS = 5
_MAX_COMPARISONS = 8


@dataclasses.dataclass(frozen=True)
class CleanOptions:
    """What `clean_text` and `filter_reason` do; every field is a flag of llmjax.prepare."""

    normalize: str = "NFC"  # one of NORMALIZATIONS
    min_chars: int = 16  # shorter (after cleaning) is dropped as too_short
    max_chars: int = 1_000_000  # longer is dropped as too_long; 0: no limit
    max_repeated_line_fraction: float = 0.3  # of characters in lines seen before in the doc
    max_repeated_ngram_fraction: float = 0.3  # of words covered by word 5-grams seen before

    def __post_init__(self):
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"--normalize={self.normalize!r} is not one of "
                             f"{', '.join(NORMALIZATIONS)}")
        for name in ("max_repeated_line_fraction", "max_repeated_ngram_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"--{name}={getattr(self, name)} must be in (0, 1]")


def clean_text(text: str, options: CleanOptions) -> tuple[str, int]:
    """(cleaned text, number of control characters removed)."""
    if options.normalize != "none":
        text = unicodedata.normalize(options.normalize, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    cleaned, removed = _CONTROL.subn("", text)
    return cleaned, removed


def filter_reason(text: str, options: CleanOptions) -> str | None:
    """Why a cleaned document should be dropped (one of FILTER_REASONS), or None to keep it."""
    stripped = text.strip()
    if not stripped:
        return EMPTY
    if len(stripped) < options.min_chars:
        return TOO_SHORT
    if options.max_chars and len(stripped) > options.max_chars:
        return TOO_LONG
    if repeated_line_fraction(stripped) > options.max_repeated_line_fraction:
        return REPEATED_LINES
    if repeated_ngram_fraction(stripped) > options.max_repeated_ngram_fraction:
        return REPEATED_NGRAMS
    return None


def repeated_line_fraction(text: str) -> float:
    """Share of the characters of non-blank lines that are in a line seen earlier in `text`."""
    seen: set[str] = set()
    total = repeated = 0
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        total += len(line)
        if line in seen:
            repeated += len(line)
        seen.add(line)
    return repeated / total if total else 0.0


def repeated_ngram_fraction(text: str, n: int = _SHINGLE_WORDS) -> float:
    """Share of words that lie in a word n-gram seen earlier in `text` (lower-cased)."""
    hashes = _shingle_hashes(_WORD.findall(text.lower()), n)
    if len(hashes) < 2:
        return 0.0
    _, first = np.unique(hashes, return_index=True)
    repeat = np.ones(len(hashes), bool)
    repeat[first] = False
    covered = np.zeros(len(hashes) + n - 1, bool)
    for offset in range(n):  # every word of a repeated n-gram is covered
        covered[offset:offset + len(hashes)] |= repeat
    return float(covered.mean())


def exact_key(text: str) -> bytes:
    """16-byte hash of the text with case and runs of whitespace folded."""
    folded = " ".join(text.lower().split())
    return hashlib.blake2b(folded.encode("utf-8"), digest_size=16).digest()


def minhash(text: str, num_perm: int = 128, seed: int = 0) -> np.ndarray:
    """[num_perm] uint32 MinHash signature of the lower-cased word 5-gram shingles.

    Two documents' signatures agree in a fraction of places that estimates the Jaccard
    similarity of their shingle sets. A document shorter than 5 words is one shingle.
    """
    shingles = _shingle_hashes(_WORD.findall(text.lower()), _SHINGLE_WORDS)
    if len(shingles) == 0:
        shingles = np.zeros(1, np.uint64)
    a, b = _permutations(num_perm, seed)
    signature = np.full(num_perm, np.iinfo(np.uint64).max, np.uint64)
    for start in range(0, len(shingles), 4096):  # bounded memory for long documents
        block = shingles[start:start + 4096, None]
        # Universal hashing (a * x + b) mod (2^61 - 1); a, x < 2^32 keep a * x below 2^64.
        signature = np.minimum(signature, ((block * a + b) % _MERSENNE_61).min(axis=0))
    return (signature & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def lsh_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows), bands * rows <= num_perm, for LSH at `threshold`.

    Minimises the area of false candidates below the threshold plus three times the area
    of missed pairs above it, under the S-curve 1 - (1 - s^rows)^bands: candidates are
    checked against their signatures anyway, so a miss costs more than a false alarm.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"--near_duplicate_threshold={threshold} must be in (0, 1)")
    below, above = np.linspace(0, threshold, 200), np.linspace(threshold, 1, 200)

    def cost(br: tuple[int, int]) -> float:
        bands, rows = br
        false_alarms = np.trapezoid(1 - (1 - below**rows) ** bands, below)
        misses = np.trapezoid((1 - above**rows) ** bands, above)
        return float(false_alarms + 3 * misses)

    options = [(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)]
    return min(options, key=cost)


def near_duplicates(signatures: np.ndarray, threshold: float) -> np.ndarray:
    """Which documents are near duplicates of an earlier one: [num_docs] bool.

    `signatures` is [num_docs, num_perm] (from `minhash`), in the order that decides which
    copy survives: the first document of each group of near duplicates is kept. Candidate
    pairs share an LSH band (`bucket_pairs`); a pair counts if its signatures agree in >=
    `threshold` of places. Groups are closed transitively (A~B and B~C drop B and C:
    `component_followers`). The Beam pipeline applies the same three functions per bucket.
    """
    num_docs, num_perm = signatures.shape
    bands, rows = lsh_bands(num_perm, threshold)
    checked: set[tuple[int, int]] = set()
    edges: list[tuple[int, int]] = []
    for band in range(bands):
        buckets: dict[bytes, list[int]] = {}
        for doc in range(num_docs):
            buckets.setdefault(band_key(signatures[doc], band, rows), []).append(doc)
        for members in buckets.values():
            for earlier, later in bucket_pairs(members):
                if (earlier, later) in checked:  # met in another band already
                    continue
                checked.add((earlier, later))
                if similar(signatures[earlier], signatures[later], threshold):
                    edges.append((earlier, later))
    followers = component_followers(edges)
    return np.array([i in followers for i in range(num_docs)], bool)


def band_key(signature: np.ndarray, band: int, rows: int) -> bytes:
    """The LSH bucket of a [num_perm] signature in one band: its `rows` values there."""
    return signature[band * rows:(band + 1) * rows].tobytes()


def bucket_pairs(members: Sequence) -> list[tuple]:
    """Candidate pairs (earlier, later) of one LSH bucket whose `members` are in document
    order: each member against the first few before it.

    A few earlier members per bucket suffice (a bucket of boilerplate copies would
    otherwise cost quadratic time); `component_followers` joins the rest transitively.
    """
    return [(members[j], members[i]) for i in range(1, len(members))
            for j in range(min(i, _MAX_COMPARISONS))]


def similar(a: np.ndarray, b: np.ndarray, threshold: float) -> bool:
    """Whether two MinHash signatures estimate a Jaccard similarity >= threshold."""
    return bool(np.mean(a == b) >= threshold)


def component_followers(edges: Iterable[tuple]) -> set:
    """The nodes of each connected component of `edges` other than its least one (nodes
    compare in document order): the near duplicates to drop."""
    parent: dict = {}

    def root(node):
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b in edges:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {node for node in parent if root(node) != node}


def _shingle_hashes(words: Sequence[str], n: int) -> np.ndarray:
    """uint64 hashes (< 2^32) of each run of n consecutive words."""
    if not words:
        return np.zeros(0, np.uint64)
    word_hashes = np.array([zlib.crc32(w.encode("utf-8")) for w in words], np.uint64)
    if len(words) < n:
        n = len(words)
    combined = np.zeros(len(words) - n + 1, np.uint64)
    for offset in range(n):  # polynomial combination mod 2^32 (wrapping is fine)
        combined = combined * np.uint64(1_000_003) + word_hashes[offset:offset + len(combined)]
    return combined & np.uint64(0xFFFFFFFF)


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 32, num_perm, dtype=np.uint64)
    b = rng.integers(0, 1 << 32, num_perm, dtype=np.uint64)
    return a, b
