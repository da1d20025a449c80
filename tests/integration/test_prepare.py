"""llmjax.data.prepare: cleaning, deduplication, bad input, TFDS round trip, reruns, the
`llmjax.prepare` command, and training input built from a prepared dataset."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
import transformers
from conftest import tiny_config, write_text_tfds

from llmjax.data import clean, loader, prepare, prepared, tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BYTE = tokenizer.load_tokenizer("byte")


def random_documents(count, seed=0, words=120):
    """Documents of random pseudo-words: no two share a word 5-gram by chance."""
    rng = np.random.default_rng(seed)
    vocabulary = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(3, 9)))
                  for _ in range(3000)]
    return [" ".join(rng.choice(vocabulary, words)) + "." for _ in range(count)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def options(tmp_path, *sources, **kwargs):
    kwargs.setdefault("tokenizer", "byte")
    kwargs.setdefault("num_workers", 1)
    return prepare.Options(sources=sources, output=str(tmp_path / "out" / "corpus"), **kwargs)


def byte_tokens(text):
    return (BYTE.bos_id, *BYTE.encode(text), BYTE.eos_id)


def read_back(output, split):
    records = tfds.data_source(os.path.basename(output), split=split,
                               data_dir=os.path.dirname(output), download=False)
    return [records[i] for i in range(len(records))]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A corpus with planted exact and near duplicates and filtered documents, prepared."""
    tmp_path = tmp_path_factory.mktemp("planted")
    distinct = random_documents(30)
    words, other_words = distinct[2].split(), distinct[4].split()
    near = [" ".join(words[:40] + ["zzzq", "yyyq"] + words[42:]),  # two words replaced
            distinct[3] + " and three more",  # a few words appended
            " ".join(other_words[:70] + other_words[72:])]  # two words deleted
    exact = [distinct[0], "  " + distinct[1].upper().replace(" ", "   \n") + " "]
    filtered = ["too short", "\n".join(["the same line again, and again"] * 20)]
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in distinct[:15] + exact[:1] + near])
    write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in distinct[15:] + exact[1:] + filtered])
    report = prepare.prepare(options(tmp_path, f"jsonl:{tmp_path}/*.jsonl",
                                     validation_fraction=0.1), show_progress=False)
    return distinct, report


def test_planted_duplicates_are_removed_and_counted(planted):
    _, report = planted
    dropped = {reason: entry["documents"] for reason, entry in report["dropped"].items()
               if entry["documents"]}
    assert dropped == {clean.EXACT_DUPLICATE: 2, clean.NEAR_DUPLICATE: 3, clean.TOO_SHORT: 1,
                       clean.REPEATED_LINES: 1}
    assert report["kept"]["documents"] == 30
    assert report["input"]["records"] == 37
    splits = report["kept"]["splits"]
    assert splits["train"]["documents"] == 27 and splits["validation"]["documents"] == 3
    # Tokens and bytes are counted for dropped documents too (byte tokenizer: bytes + 2).
    near = report["dropped"][clean.NEAR_DUPLICATE]
    assert near["tokens"] == near["bytes"] + 2 * 3


def test_prepared_dataset_round_trips_through_tfds_data_source(planted):
    distinct, report = planted
    output = report["output"]
    records = read_back(output, "train") + read_back(output, "validation")
    got = collections.Counter(tuple(int(t) for t in r["tokens"]) for r in records)
    # Every distinct document, exactly once: the first copy of each duplicate survived.
    assert got == collections.Counter(byte_tokens(d) for d in distinct)
    assert all(r["prompt_length"] == 0 for r in records)
    assert report["kept"]["tokens"] == sum(len(t) for t in got.elements())
    # Shuffled: not in input order.
    train = [tuple(int(t) for t in r["tokens"]) for r in read_back(output, "train")]
    assert train != sorted(train, key=lambda t: [byte_tokens(d) for d in distinct].index(t))
    assert prepared.read_metadata(output)["tokenizer"] == "byte"


def test_corrupt_and_malformed_inputs_are_counted_not_raised(tmp_path):
    good = random_documents(5, seed=1)
    lines = [json.dumps({"text": good[0]}), "{not json", json.dumps({"title": "no text"}),
             json.dumps({"text": 42})]
    (tmp_path / "rows.jsonl").write_bytes(
        ("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff byte"}\n'
        + json.dumps({"text": good[1]}).encode() + b"\n")
    (tmp_path / "good.txt").write_text(good[2])
    (tmp_path / "latin1.txt").write_bytes(good[3].encode() + b" caf\xe9")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 this is not parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [good[4], "x"]}), tmp_path / "wrong_column.parquet")
    report = prepare.prepare(options(tmp_path, f"jsonl:{tmp_path}/*.jsonl",
                                     f"text:{tmp_path}/*.txt", f"parquet:{tmp_path}/*.parquet"),
                             show_progress=False)
    dropped = {reason: entry["documents"] for reason, entry in report["dropped"].items()
               if entry["documents"]}
    assert dropped == {"malformed_json": 1, "missing_field": 4, "invalid_utf8": 2,
                       "unreadable": 1}
    assert report["kept"]["documents"] == 3
    bad = report["bad_input"]
    assert bad[str(tmp_path / "rows.jsonl")]["counts"] == {
        "malformed_json": 1, "missing_field": 2, "invalid_utf8": 1}
    assert bad[str(tmp_path / "latin1.txt")]["counts"] == {"invalid_utf8": 1}
    assert bad[str(tmp_path / "garbage.parquet")]["counts"] == {"unreadable": 1}
    assert bad[str(tmp_path / "wrong_column.parquet")]["counts"] == {"missing_field": 2}
    assert "rows.jsonl:2" in " ".join(bad[str(tmp_path / "rows.jsonl")]["examples"])
    assert "invalid_utf8" in prepare.format_report(report)


def test_rerun_skips_finished_work_and_redoes_changed_inputs(tmp_path):
    documents = random_documents(4, seed=2)
    for i, text in enumerate(documents):
        (tmp_path / f"{i}.txt").write_text(text)
    first = prepare.prepare(options(tmp_path, f"text:{tmp_path}/*.txt", num_workers=2),
                            show_progress=False)
    assert first["cached"]["read_clean"] == "0/4 tasks"
    again = prepare.prepare(options(tmp_path, f"text:{tmp_path}/*.txt", num_workers=2),
                            show_progress=False)
    assert again.get("up_to_date") and again["kept"] == first["kept"]
    # The summary of a rerun says nothing was redone, not the first run's stage timings.
    [timings] = [x for x in prepare.format_report(again).splitlines() if x.startswith("seconds")]
    assert timings == (f"seconds: nothing redone now (the run that prepared it took "
                       f"{first['seconds']['total']:.1f} s)   reused: everything")
    assert "read_clean" in prepare.format_report(first)
    (tmp_path / "3.txt").write_text(documents[3] + " changed")
    changed = prepare.prepare(options(tmp_path, f"text:{tmp_path}/*.txt", num_workers=2),
                              show_progress=False)
    assert not changed.get("up_to_date")
    assert changed["cached"]["read_clean"] == "3/4 tasks"
    assert changed["kept"]["tokens"] == first["kept"]["tokens"] + len(" changed")


def test_fine_tuning_records_keep_their_prompt_length(tmp_path):
    pairs = [("Question: what is " + d[:30] + "?\nAnswer: ", d) for d in random_documents(6)]
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p, "response": r} for p, r in pairs])
    report = prepare.prepare(options(tmp_path, f"jsonl:{tmp_path}/sft.jsonl#prompt+response",
                                     validation_fraction=0), show_progress=False)
    records = read_back(report["output"], "train")
    expected = {byte_tokens(p + r): 1 + len(p) for p, r in pairs}
    got = {tuple(int(t) for t in r["tokens"]): int(r["prompt_length"]) for r in records}
    assert got == expected


def test_tfds_catalog_source_is_prepared_without_download(tmp_path):
    documents = random_documents(8, seed=4)
    write_text_tfds(tmp_path / "tfds", "tiny_text", {"train": documents + documents[:1]})
    report = prepare.prepare(options(tmp_path, "tfds:tiny_text", validation_fraction=0,
                                     tfds_data_dir=str(tmp_path / "tfds")), show_progress=False)
    assert report["kept"]["documents"] == 8
    assert report["dropped"][clean.EXACT_DUPLICATE]["documents"] == 1
    got = collections.Counter(tuple(int(t) for t in r["tokens"])
                              for r in read_back(report["output"], "train"))
    assert got == collections.Counter(byte_tokens(d) for d in documents)
    with pytest.raises(ValueError, match="never downloads"):
        prepare.prepare(options(tmp_path, "tfds:not_built_here",
                                tfds_data_dir=str(tmp_path / "tfds")), show_progress=False)


def test_training_input_from_a_prepared_dataset_and_a_mixture(planted, tmp_path):
    _, report = planted
    write_jsonl(tmp_path / "sft.jsonl",
                [{"prompt": "Q" * 10, "response": "A" * 20} for _ in range(50)])
    config = tiny_config(**{"data.train": f"prepared:{report['output']}=0.75,"
                                          f"jsonl:{tmp_path}/sft.jsonl#prompt+response=0.25",
                            "data.tokenizer": "bpe:512"})
    tok, train_iter, eval_batches = loader.build(
        config.data, seed=0, seq_len=32, global_batch_size=8, eval_batches=2,
        workdir=str(tmp_path / "run"))
    assert isinstance(tok, tokenizer.ByteTokenizer)  # the dataset's own, not a new bpe:512
    assert tokenizer.describe(tok) == (
        f"byte, 259 ids, built in, the tokenizer of prepared:{report['output']} (in place of "
        "config.data.tokenizer=bpe:512: a prepared dataset is read with its own tokenizer)")
    assert not (tmp_path / "run" / "tokenizer").exists()
    batches = [next(train_iter) for _ in range(40)]
    sft_targets = sum(int(((b["targets"] == ord("A") + 3) & (b["loss_mask"] == 1)).sum())
                      for b in batches)
    masked_prompt = sum(int(((b["targets"] == ord("Q") + 3) & (b["loss_mask"] == 1)).sum())
                        for b in batches)
    assert sft_targets > 0 and masked_prompt == 0  # fine-tuning prompts are never targets
    assert len(eval_batches) == 2 and eval_batches[0]["inputs"].shape == (8, 32)
    # The eval batches are the validation split.
    validation = {tuple(int(t) for t in r["tokens"][1:6]) for r in
                  read_back(report["output"], "validation")}
    assert tuple(eval_batches[0]["inputs"][0, 1:6].tolist()) in validation
    with pytest.raises(ValueError, match="config.data.tokenizer"):
        other = tiny_config(**{"data.train": f"prepared:{report['output']}",
                               "data.tokenizer": str(tmp_path / "elsewhere")})
        tokenizer.save_trained(tokenizer.train_bpe(["some text"] * 3, 300),
                               str(tmp_path / "elsewhere"))
        loader.build(other.data, seed=0, seq_len=32, global_batch_size=8, eval_batches=1,
                     workdir=str(tmp_path / "run"))


def test_cli_prepares_with_a_trained_unigram_tokenizer(tmp_path):
    for i, text in enumerate(random_documents(6, seed=3)):
        (tmp_path / f"{i}.txt").write_text(text)
    output = tmp_path / "data" / "my_corpus"
    args = [sys.executable, "-m", "llmjax.prepare", f"--source=text:{tmp_path}/*.txt",
            f"--output={output}", "--tokenizer=unigram:300", "--num_workers=2"]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kept" in result.stdout and "prepared:" in result.stdout
    hf = transformers.AutoTokenizer.from_pretrained(output / "tokenizer", local_files_only=True)
    assert len(hf) == 300
    report = json.loads((output / "report.json").read_text())
    records = read_back(str(output), "train") + read_back(str(output), "validation")
    assert sum(len(r["tokens"]) for r in records) == report["kept"]["tokens"]
    assert hf.decode(records[0]["tokens"], skip_special_tokens=True) in {
        (tmp_path / f"{i}.txt").read_text() for i in range(6)}

    bad = subprocess.run([*args[:4], f"--output={tmp_path}/My-Corpus"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert bad.stderr.strip().startswith("error: --output=") and "my_corpus" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
