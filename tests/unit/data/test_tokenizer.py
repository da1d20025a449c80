"""llmjax.data.tokenizer: the byte tokenizer, trained BPE (local and object-store
workdirs), tokenizer directories, bad specs named."""

from pathlib import Path

import pytest
import transformers

from llmjax.data import sources, tokenizer

SHAKESPEARE_DIR = Path(sources.__file__).parent / "shakespeare"

TEXT = "To be, or not to be: that is the question.\nNaïve café — ☃ 🎭"


def test_byte_tokenizer_round_trips_and_reserves_special_ids():
    tok = tokenizer.load_tokenizer("byte", None, None)
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT.encode())
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
    assert min(ids) >= 3 and max(ids) < tok.vocab_size
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == TEXT
    assert tok.encode_batch([TEXT, "a"]) == [ids, [ord("a") + 3]]
    assert tokenizer.describe(tok).startswith("byte, 259 ids, built in")


def test_bpe_trains_saves_loadable_dir_and_reuses_it(tmp_path):
    documents = sources.read_documents("bundled:shakespeare")[:10]
    tok = tokenizer.load_tokenizer("bpe:512", documents, str(tmp_path))
    saved = tmp_path / "tokenizer"
    hf = transformers.AutoTokenizer.from_pretrained(saved, local_files_only=True)
    assert len(hf) == tok.vocab_size == 512
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    ids = tok.encode(TEXT)
    assert hf.encode(TEXT, add_special_tokens=False) == ids
    assert len(ids) < len(TEXT.encode())  # merges were learned
    assert max(ids) < tok.vocab_size
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == TEXT
    assert tok.encode_batch([TEXT, documents[0]]) == [ids, tok.encode(documents[0])]
    assert tokenizer.describe(tok) == (f"BPE, 512 ids, from {saved} (bpe:512 trained now on "
                                       "its training text)")
    # A resumed run loads the saved tokenizer: no documents needed, same ids, same file.
    mtime = (saved / "tokenizer.json").stat().st_mtime_ns
    again = tokenizer.load_tokenizer("bpe:512", None, str(tmp_path))
    assert again.encode(TEXT) == ids
    assert (saved / "tokenizer.json").stat().st_mtime_ns == mtime
    assert "(bpe:512 saved by this run before on its training text)" in tokenizer.describe(again)
    # The saved directory is itself a valid spec.
    direct = tokenizer.load_tokenizer(str(saved), None, None)
    assert direct.encode(TEXT) == ids
    assert tokenizer.describe(direct) == f"BPE, 512 ids, from {saved}"


def test_bpe_in_an_object_store_workdir(tmp_path, monkeypatch):
    """A gs:// workdir, played by TensorFlow's in-memory ram:// filesystem: the trained
    tokenizer goes there (marker last), a rerun loads it back, nothing lands locally."""
    from tensorflow.io import gfile

    monkeypatch.chdir(tmp_path)
    workdir = "ram://bucket/runs/bpe"
    documents = sources.read_documents("bundled:shakespeare")[:10]
    tok = tokenizer.load_tokenizer("bpe:512", documents, workdir)
    remote = sorted(gfile.listdir(workdir + "/tokenizer"))
    assert "tokenizer.json" in remote and tokenizer.REMOTE_COMPLETE in remote
    assert not list(tmp_path.iterdir())  # no stray local "ram:" directory
    again = tokenizer.load_tokenizer("bpe:512", None, workdir)  # loaded, not retrained
    assert again.encode(TEXT) == tok.encode(TEXT) and again.vocab_size == 512
    direct = tokenizer.load_tokenizer(workdir + "/tokenizer")
    assert direct.encode(TEXT) == tok.encode(TEXT)
    # Without the marker the upload counts as unfinished: nothing to train on is an error.
    gfile.remove(workdir + "/tokenizer/" + tokenizer.REMOTE_COMPLETE)
    with pytest.raises(ValueError, match="no documents to train on"):
        tokenizer.load_tokenizer("bpe:512", None, workdir)


def test_directory_tokenizer_without_bos_or_pad_uses_eos(tmp_path):
    # Like GPT-2: one special token ends documents and also stands in for bos and pad.
    raw = tokenizer.train_bpe(["a small corpus, a small corpus"], 300)
    raw.add_special_tokens(["<|endoftext|>"])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    hf.save_pretrained(tmp_path / "gpt2like")
    tok = tokenizer.load_tokenizer(str(tmp_path / "gpt2like"), None, None)
    eos = raw.token_to_id("<|endoftext|>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (eos, eos, eos)
    assert tok.vocab_size == raw.get_vocab_size() and tok.decode(tok.encode("a small")) == "a small"


@pytest.mark.parametrize("spec", ["bpe:abc", "bpe:100", "sentencepiece", "/no/such/dir"])
def test_bad_tokenizer_spec_is_named(spec, tmp_path):
    with pytest.raises(ValueError, match=repr(spec).replace("/", ".")):
        tokenizer.load_tokenizer(spec, ["some text"], str(tmp_path))


# ---------------------------------------------------------------- packing
