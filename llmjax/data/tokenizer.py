"""Tokenizers: one small interface over Hugging Face tokenizers and a built-in byte tokenizer.

`load_tokenizer(spec, documents, workdir)` understands three specs (config key `data.tokenizer`):

    DIR          a directory that `transformers.AutoTokenizer` loads (never downloaded)
    bpe:N        a byte-level BPE with vocabulary N, trained on `documents` with the `tokenizers`
                 library and saved to `{workdir}/tokenizer/`; a resumed run loads that directory
                 instead of retraining, so token ids never change mid-run. With `mask_token`
                 (masked-LM runs) it also has <mask>, id 3
    byte         UTF-8 bytes, no training: ids 0/1/2 are pad/bos/eos, byte b is id b + 3

DIR and the workdir may be object-store URLs (gs://...): a trained tokenizer is written
there file by file with a completion marker last (object stores cannot rename a directory),
and a remote DIR is copied to a local scratch directory to be loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:  # imported where used: 2 to 4 s that a byte-tokenizer run never needs
    import transformers

# Our own tokenizers (bpe:, byte) put the special tokens first, with pad at 0: the batch
# pipeline pads with zeros, so a padded position then also holds the pad id.
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
MASK_TOKEN = "<mask>"  # after the three, in tokenizers trained for masked-LM runs
TOKENIZER_SUBDIR = "tokenizer"
TRAINABLE = ("bpe", "unigram")  # what `train_tokenizer` (and `llmjax.prepare`) can train
REMOTE_COMPLETE = "llmjax_tokenizer_complete"  # written last into a remote tokenizer directory


class Tokenizer:
    """What the rest of llmjax sees of a tokenizer.

    Attributes:
      vocab_size: rows the model's embedding needs (every id produced is < vocab_size).
      bos_id, eos_id, pad_id: ids of the special tokens.
      mask_id: the id of the mask token ([MASK]) of masked-LM training; None if it has none.
      special_ids: every id that stands for a special token, not text.
      hf_tokenizer: the underlying `transformers` tokenizer, for saving beside an exported
        model; None for the byte tokenizer.
      source: where it came from (a directory, trained for this run, built in), for the
        start-up line (`describe`).
    """

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    mask_id: int | None = None
    hf_tokenizer: transformers.PreTrainedTokenizerBase | None = None
    source: str = ""

    @property
    def special_ids(self) -> tuple[int, ...]:
        ids = {self.bos_id, self.eos_id, self.pad_id, self.mask_id}
        if self.hf_tokenizer is not None:
            ids.update(self.hf_tokenizer.all_special_ids)
        return tuple(sorted(i for i in ids if i is not None))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (in parallel where the backend can)."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids` ([length] ints), leaving out special tokens."""
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: needs no training and no files, and never sees an unknown."""

    pad_id, bos_id, eos_id = 0, 1, 2
    byte_offset = len(SPECIAL_TOKENS)
    vocab_size = byte_offset + 256
    source = "built in (data.tokenizer=byte: UTF-8 bytes and pad/bos/eos, no files)"

    def encode(self, text: str) -> list[int]:
        return [b + self.byte_offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        data = bytes(int(i) - self.byte_offset for i in ids
                     if self.byte_offset <= int(i) < self.vocab_size)
        # A sampled sequence can stop inside a multi-byte character.
        return data.decode("utf-8", errors="replace")


class HuggingFaceTokenizer(Tokenizer):
    """A `transformers` tokenizer, encoding through its Rust backend when it has one."""

    def __init__(self, hf_tokenizer: transformers.PreTrainedTokenizerBase, spec: str):
        self.hf_tokenizer = hf_tokenizer
        # len() counts added special tokens too; `.vocab_size` does not.
        self.vocab_size = len(hf_tokenizer)
        # BERT-style tokenizers have no bos/eos: [CLS] begins (what BERT pools), [SEP] ends.
        eos_id = hf_tokenizer.eos_token_id
        if eos_id is None:
            eos_id = hf_tokenizer.sep_token_id
        if eos_id is None:
            raise ValueError(f"data.tokenizer={spec!r} defines no eos token; documents need "
                             "one to end them: use a tokenizer that has one, or bpe:N / byte")
        self.eos_id = eos_id
        # Some tokenizers (GPT-2, Qwen) have no separate bos or pad: the eos id serves.
        bos_id, pad_id = hf_tokenizer.bos_token_id, hf_tokenizer.pad_token_id
        bos_id = hf_tokenizer.cls_token_id if bos_id is None else bos_id
        self.bos_id = eos_id if bos_id is None else bos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.mask_id = hf_tokenizer.mask_token_id
        self._backend: _RustTokenizer | None = getattr(hf_tokenizer, "backend_tokenizer", None)
        self.source = f"from {spec}"  # a directory; bpe: and prepared datasets say more

    def encode(self, text: str) -> list[int]:
        return self.hf_tokenizer.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._backend is None:
            return self.hf_tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        # encode_batch_fast skips computing character offsets, which we never use.
        encodings = self._backend.encode_batch_fast(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.hf_tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(spec: str, documents: Sequence[str] | None = None,
                   workdir: str | None = None, mask_token: bool = False) -> Tokenizer:
    """The tokenizer named by `spec` (see the module docstring).

    `documents` (the training text) and `workdir` are used by `bpe:N` only, as is
    `mask_token` (train it with <mask>). Raises ValueError naming `spec` if it is none of
    the three forms.
    """
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        vocab_size = spec.removeprefix("bpe:")
        if not vocab_size.isdigit() or int(vocab_size) <= 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"data.tokenizer={spec!r}: bpe:N needs an integer N > "
                             f"{256 + len(SPECIAL_TOKENS)} (256 bytes + specials), e.g. bpe:4096")
        if workdir is None:
            raise ValueError(f"data.tokenizer={spec!r} needs a workdir to save the trained "
                             "tokenizer in")
        return _load_or_train_bpe(spec, int(vocab_size), documents, workdir, mask_token)
    if _is_remote(spec):
        return _load_remote_directory(spec, spec)
    if os.path.isdir(os.path.expanduser(spec)):
        return _load_directory(spec, os.path.expanduser(spec))
    raise ValueError(f"data.tokenizer={spec!r} is not a directory, 'bpe:VOCAB_SIZE' or 'byte'; "
                     "give a local tokenizer directory (saved with save_pretrained) or one of "
                     "those two")


def train_bpe(documents: Iterable[str], vocab_size: int, length: int | None = None,
              mask_token: bool = False) -> _RustTokenizer:
    """Trains a byte-level BPE (GPT-2 style pre-tokenization) with pad/bos/eos as ids 0/1/2
    (and <mask> as id 3 with `mask_token`)."""
    return train_tokenizer("bpe", documents, vocab_size, length, mask_token)


def train_tokenizer(kind: str, documents: Iterable[str], vocab_size: int,
                    length: int | None = None, mask_token: bool = False) -> _RustTokenizer:
    """Trains a byte-level `bpe` or `unigram` tokenizer with pad/bos/eos as ids 0/1/2
    (and <mask> as id 3 with `mask_token`).

    Both see text as UTF-8 bytes first (GPT-2 style pre-tokenization), so any later text
    encodes without an unknown token. `documents` may be a one-pass iterator; `length`
    (its size, if known) only feeds the progress estimate.
    """
    tokenizer = _RustTokenizer(models.BPE() if kind == "bpe" else models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # All 256 bytes, seen or not, so any later text encodes without an unknown token.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = [*SPECIAL_TOKENS, MASK_TOKEN] if mask_token else list(SPECIAL_TOKENS)
    if kind == "bpe":
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=alphabet, show_progress=False)
    elif kind == "unigram":
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size,
                                          special_tokens=specials,
                                          initial_alphabet=alphabet, show_progress=False)
    else:
        raise ValueError(f"tokenizer kind {kind!r} is not one of {', '.join(TRAINABLE)}")
    if length is None and isinstance(documents, Sequence):
        length = len(documents)
    tokenizer.train_from_iterator(documents, trainer, length=length)
    return tokenizer


def save_trained(raw: _RustTokenizer, directory: str) -> None:
    """Saves a trained tokenizer as a directory `transformers.AutoTokenizer` loads.

    Written to a scratch directory and renamed into place, so a process killed mid-save
    never leaves a half-written tokenizer that a later run would take as complete. If the
    directory appeared meanwhile (another process, same workdir), theirs is kept. An
    object-store directory (gs://) gets the files one by one, a completion marker last.
    """
    if _is_remote(directory):
        _upload_trained(raw, directory)
        return
    import transformers

    mask = {"mask_token": MASK_TOKEN} if raw.token_to_id(MASK_TOKEN) is not None else {}
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        **mask)
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".", dir=parent)
    hf_tokenizer.save_pretrained(scratch)
    try:
        os.rename(scratch, directory)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)


def describe(tokenizer: Tokenizer) -> str:
    """Kind, vocabulary and origin in one phrase: `BPE, 4,096 ids, from runs/x/tokenizer
    (bpe:4096 trained now on its training text)`."""
    if tokenizer.hf_tokenizer is None:
        kind = "byte"
    else:
        backend = getattr(tokenizer.hf_tokenizer, "backend_tokenizer", None)
        kind = (type(backend.model).__name__ if backend is not None
                else type(tokenizer.hf_tokenizer).__name__)
    return f"{kind}, {tokenizer.vocab_size:,} ids, {tokenizer.source}"


def fingerprint(tokenizer: Tokenizer) -> str:
    """A short hash of what ids a tokenizer produces: its vocabulary and special ids."""
    digest = hashlib.sha256(f"{tokenizer.bos_id} {tokenizer.eos_id} {tokenizer.pad_id} "
                            f"{tokenizer.vocab_size}".encode())
    if tokenizer.hf_tokenizer is not None:
        vocab = sorted(tokenizer.hf_tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        digest.update(json.dumps(vocab, ensure_ascii=False).encode())
    else:
        digest.update(type(tokenizer).__name__.encode())
    return digest.hexdigest()[:16]


def _is_remote(path: str) -> bool:
    return "://" in path


def _load_or_train_bpe(spec: str, vocab_size: int, documents: Sequence[str] | None,
                       workdir: str, mask_token: bool = False) -> Tokenizer:
    """`bpe:N`: the tokenizer saved in the workdir, trained and saved there first if absent.

    An object-store workdir (gs://) gets the files one by one with a completion marker
    last, so a half-uploaded tokenizer is never taken for a saved one.
    """
    remote = _is_remote(workdir)
    if remote:
        from tensorflow.io import gfile  # TensorFlow's filesystems speak gs://; on demand
        directory = workdir.rstrip("/") + "/" + TOKENIZER_SUBDIR
        saved = gfile.exists(directory + "/" + REMOTE_COMPLETE)
    else:
        directory = os.path.join(os.path.expanduser(workdir), TOKENIZER_SUBDIR)
        saved = os.path.isdir(directory)
    if not saved:
        if not documents:
            raise ValueError(f"data.tokenizer={spec!r}: no documents to train on and no "
                             f"saved tokenizer in {directory}")
        if remote:
            _upload_trained(train_bpe(documents, vocab_size, mask_token=mask_token), directory)
        else:
            save_trained(train_bpe(documents, vocab_size, mask_token=mask_token), directory)
    tokenizer = (_load_remote_directory(spec, directory) if remote
                 else _load_directory(spec, directory))
    tokenizer.source = (f"from {directory} ({spec} "
                        f"{'saved by this run before' if saved else 'trained now'} on its "
                        "training text)")
    return tokenizer


def _load_directory(spec: str, directory: str, shown: str | None = None) -> Tokenizer:
    import transformers

    try:
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory,
                                                                  local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"data.tokenizer={spec!r}: transformers cannot load a tokenizer from "
                         f"{shown or directory} ({str(e).splitlines()[0]}); point it at a "
                         "directory written by save_pretrained") from None
    return HuggingFaceTokenizer(hf_tokenizer, spec)


def _upload_trained(raw: _RustTokenizer, directory: str) -> None:
    """`save_trained` into an object-store `directory`: saved locally, copied file by file,
    then the completion marker."""
    from tensorflow.io import gfile

    with tempfile.TemporaryDirectory() as scratch:
        local = os.path.join(scratch, TOKENIZER_SUBDIR)
        save_trained(raw, local)
        gfile.makedirs(directory)
        for name in sorted(os.listdir(local)):
            gfile.copy(os.path.join(local, name), directory + "/" + name, overwrite=True)
    with gfile.GFile(directory + "/" + REMOTE_COMPLETE, "w") as marker:
        marker.write("complete\n")


def _load_remote_directory(spec: str, directory: str) -> Tokenizer:
    """Copy a tokenizer directory from an object store to a local scratch one and load it
    (the tokenizer lives in memory after loading; the copy is removed)."""
    from tensorflow.io import gfile

    directory = directory.rstrip("/")
    if not gfile.isdir(directory):
        raise ValueError(f"data.tokenizer={spec!r}: {directory} is not a directory")
    with tempfile.TemporaryDirectory() as scratch:
        for name in gfile.listdir(directory):
            name = name.rstrip("/")
            if name != REMOTE_COMPLETE and not gfile.isdir(directory + "/" + name):
                gfile.copy(directory + "/" + name, os.path.join(scratch, name), overwrite=True)
        return _load_directory(spec, scratch, shown=directory)
