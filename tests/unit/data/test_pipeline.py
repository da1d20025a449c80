"""llmjax.data.pipeline: packing keeps every pair, epochs reshuffle, resumable and
per-process batches, worker processes, mixtures, eval batches, documents; the loader
reads a TFDS catalog dataset locally, never downloading."""

import collections
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config, write_text_tfds

from llmjax.data import loader, pipeline, sources, tokenizer
from llmjax.data.documents import split_documents, tokenize_documents
from llmjax.data.packing import BATCH_KEYS, PACKINGS
from llmjax.data.sources import Example
from llmjax.data.stream_state import combine_states

SHAKESPEARE_DIR = Path(sources.__file__).parent / "shakespeare"

BOS, EOS = 1, 2


def random_token_docs(num_docs, max_len, seed=0):
    """[bos] + ids + [eos] documents with lengths from 1 to max_len ids."""
    rng = np.random.default_rng(seed)
    return [np.array([BOS, *rng.integers(3, 200, rng.integers(1, max_len + 1)), EOS], np.int32)
            for _ in range(num_docs)]


def document_pairs(token_docs):
    return collections.Counter((int(a), int(b))
                               for d in token_docs for a, b in zip(d[:-1], d[1:], strict=True))


def batch_pairs(batches):
    pairs = collections.Counter()
    for b in batches:
        keep = b["loss_mask"] == 1
        pairs.update(zip(b["inputs"][keep].tolist(), b["targets"][keep].tolist(), strict=True))
    return pairs


def check_row_structure(batch, seq_len):
    """Segments are contiguous runs numbered 1, 2, ... with positions 0, 1, ...; padding is 0."""
    assert set(batch) == set(BATCH_KEYS)
    for key in BATCH_KEYS:
        assert batch[key].dtype == np.int32 and batch[key].shape[1] == seq_len
    for row in range(len(batch["inputs"])):
        seg, pos = batch["segment_ids"][row], batch["positions"][row]
        inputs, targets = batch["inputs"][row], batch["targets"][row]
        np.testing.assert_array_equal(batch["loss_mask"][row], seg > 0)
        padding = seg == 0
        assert not inputs[padding].any() and not targets[padding].any()
        assert not pos[padding].any()
        ids = seg[~padding]
        # Segment ids count up from 1 and each segment is one contiguous run.
        np.testing.assert_array_equal(np.unique(ids), np.arange(1, len(np.unique(ids)) + 1))
        assert np.all(np.diff(ids) >= 0)
        for s in np.unique(ids):
            where = np.flatnonzero(seg == s)
            assert np.all(np.diff(where) == 1)
            np.testing.assert_array_equal(pos[where], np.arange(len(where)))
            # Inside a segment, each target is the next input.
            np.testing.assert_array_equal(targets[where[:-1]], inputs[where[1:]])
            assert inputs[where[0]] == BOS or pos[where[0]] == 0


@pytest.mark.parametrize("packing", ["first_fit", "concat"])
def test_packing_keeps_every_pair_of_one_epoch(packing):
    seq_len = 16
    docs = random_token_docs(60, max_len=40)  # many documents are longer than seq_len
    iterator = pipeline.make_train_iterator(docs, seq_len=seq_len, global_batch_size=4, seed=3,
                                            packing=packing, num_epochs=1)
    batches = list(iterator)
    for b in batches:
        check_row_structure(b, seq_len)
        assert b["inputs"].shape == (4, seq_len)
    assert batch_pairs(batches) == document_pairs(docs)
    # Each document is one segment per seq_len-piece: count segments.
    pieces = sum(-(-(len(d) - 1) // seq_len) for d in docs)
    segments = sum(len(np.unique(row[row > 0])) for b in batches for row in b["segment_ids"])
    if packing == "first_fit":
        assert segments == pieces
    else:  # concat-then-split also cuts pieces at row ends
        assert segments >= pieces
        assert sum(int(b["loss_mask"].sum()) for b in batches) == sum(len(d) - 1 for d in docs)
    assert sum(int(b["loss_mask"].sum()) for b in batches) == sum(len(d) - 1 for d in docs)


def test_each_epoch_is_a_new_shuffle_of_all_documents():
    seq_len, num_docs, batch_size = 8, 12, 4
    # Every document is exactly one full row, so an epoch is exactly num_docs rows and
    # the first input after bos names the document.
    docs = [np.array([BOS, 100 + i, *[5] * (seq_len - 2), EOS], np.int32) for i in range(num_docs)]
    # One row per packing window, so rows come out in record order.
    iterator = pipeline.make_train_iterator(docs, seq_len=seq_len, global_batch_size=batch_size,
                                            seed=0, packing_bins=1)
    order = [int(x) - 100 for _ in range(3 * num_docs // batch_size)
             for x in next(iterator)["inputs"][:, 1]]
    epochs = [order[e * num_docs:(e + 1) * num_docs] for e in range(3)]
    assert all(sorted(epoch) == list(range(num_docs)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(num_docs))
    other_seed = pipeline.make_train_iterator(docs, seq_len=seq_len, global_batch_size=batch_size,
                                              seed=1, packing_bins=1)
    assert [int(x) - 100 for x in next(other_seed)["inputs"][:, 1]] != epochs[0][:batch_size]


# ---------------------------------------------------------------- resume and processes


def assert_batches_equal(expected, actual):
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual, strict=True):
        assert e.keys() == a.keys()
        for key in e:
            np.testing.assert_array_equal(e[key], a[key])


@pytest.mark.parametrize("packing", ["first_fit", "concat"])
def test_set_state_resumes_the_exact_stream(packing):
    docs = random_token_docs(30, max_len=50, seed=1)
    kwargs = dict(seq_len=16, global_batch_size=4, seed=7, packing=packing)
    total_pairs = sum(len(d) - 1 for d in docs)
    batches_per_epoch = total_pairs / (4 * 16)  # at least this many batches per epoch
    assert 3 < batches_per_epoch < 20
    reference = pipeline.make_train_iterator(docs, **kwargs)
    stream = [next(reference) for _ in range(60)]  # more than two epochs
    for k in (0, 1, 5, int(batches_per_epoch) + 1, 2 * int(batches_per_epoch) + 3):
        original = pipeline.make_train_iterator(docs, **kwargs)
        for _ in range(k):
            next(original)
        # The state survives a JSON round trip (it is saved with the checkpoint).
        state = json.loads(json.dumps(original.get_state()))
        resumed = pipeline.make_train_iterator(docs, **kwargs)
        resumed.set_state(state)
        assert_batches_equal(stream[k:k + 12], [next(resumed) for _ in range(12)])
        assert_batches_equal(stream[k:k + 3], [next(original) for _ in range(3)])


def numbered_docs(num_docs, max_len, seed=0):
    """Documents whose second token (1000 + i) names them, for counting who read what."""
    rng = np.random.default_rng(seed)
    return [np.array([BOS, 1000 + i, *rng.integers(3, 200, rng.integers(0, max_len)), EOS],
                     np.int32) for i in range(num_docs)]


def documents_seen(batches):
    """Document numbers at the start of segments (first pieces), with multiplicity."""
    seen = collections.Counter()
    for b in batches:
        starts = (b["positions"] == 0) & (b["segment_ids"] > 0) & (b["inputs"] == BOS)
        seen.update((b["targets"][starts] - 1000).tolist())
    return seen


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shares_are_disjoint_cover_the_epoch_and_make_the_same_batches(process_count):
    docs = numbered_docs(60, max_len=30, seed=2)
    kwargs = dict(seq_len=16, global_batch_size=8, seed=5)
    shares = [list(pipeline.make_train_iterator(docs, process_index=i,
                                                process_count=process_count, num_epochs=1,
                                                **kwargs))
              for i in range(process_count)]
    seen = [documents_seen(share) for share in shares]
    for i in range(process_count):
        for j in range(i + 1, process_count):
            assert not set(seen[i]) & set(seen[j])  # disjoint
    assert sum(seen, collections.Counter()) == collections.Counter(range(60))  # the epoch
    assert sum((batch_pairs(share) for share in shares), collections.Counter()) == \
        document_pairs(docs)

    # Rows come from row shards, so the global batch does not depend on the process count.
    whole = pipeline.make_train_iterator(docs, **kwargs)
    endless = [pipeline.make_train_iterator(docs, process_index=i, process_count=process_count,
                                            **kwargs) for i in range(process_count)]
    for _ in range(10):
        expected = next(whole)
        parts = [next(share) for share in endless]
        assert all(p["inputs"].shape == (8 // process_count, 16) for p in parts)
        for key in expected:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])
    combined = combine_states([share.local_state() for share in endless])
    assert json.dumps(combined) == json.dumps(whole.get_state())
    with pytest.raises(ValueError, match="global_batch_size=6"):
        pipeline.make_train_iterator(docs, seq_len=16, global_batch_size=6, seed=0,
                                     process_count=4)


def test_resume_on_another_process_count_continues_exactly():
    docs = random_token_docs(50, max_len=40, seed=3)
    kwargs = dict(seq_len=16, global_batch_size=8, seed=11)
    stream = pipeline.make_train_iterator(docs, **kwargs)
    expected = [next(stream) for _ in range(20)]
    # Two processes run 7 steps and checkpoint (each gathers both processes' shards).
    two = [pipeline.make_train_iterator(docs, process_index=i, process_count=2, **kwargs)
           for i in range(2)]
    for _ in range(7):
        for share in two:
            next(share)
    state = json.loads(json.dumps(combine_states([s.local_state() for s in two])))
    for process_count in (1, 4):
        resumed = [pipeline.make_train_iterator(docs, process_index=i,
                                                process_count=process_count, **kwargs)
                   for i in range(process_count)]
        for share in resumed:
            share.set_state(state)
        for step in range(7, 20):
            parts = [next(share) for share in resumed]
            for key in BATCH_KEYS:
                np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]),
                                              expected[step][key])


def test_worker_processes_give_the_same_stream_and_state():
    docs = random_token_docs(40, max_len=40, seed=4)
    kwargs = dict(seq_len=16, global_batch_size=4, seed=2)
    expected = list(itertools.islice(pipeline.make_train_iterator(docs, **kwargs), 12))
    workers = pipeline.make_train_iterator(docs, num_workers=2, **kwargs)
    try:
        assert_batches_equal(expected[:6], [next(workers) for _ in range(6)])
        state = json.loads(json.dumps(workers.get_state()))
    finally:
        workers.close()
    resumed = pipeline.make_train_iterator(docs, **kwargs)  # without workers now
    resumed.set_state(state)
    assert_batches_equal(expected[6:], [next(resumed) for _ in range(6)])


def test_changed_batch_size_restarts_where_no_record_is_skipped():
    docs = numbered_docs(80, max_len=30, seed=5)
    before = pipeline.make_train_iterator(docs, seq_len=16, global_batch_size=8, seed=1,
                                          num_epochs=1)
    first = [next(before) for _ in range(5)]
    state = json.loads(json.dumps(before.get_state()))
    after = pipeline.make_train_iterator(docs, seq_len=16, global_batch_size=4, seed=1,
                                         num_epochs=1)
    after.set_state(state)
    seen = documents_seen(first) + documents_seen(list(after))
    assert set(seen) == set(range(80))  # nothing skipped
    assert sum(seen.values()) - 80 <= 8 * 8  # repeats: about a packing window per shard


def test_fine_tuning_loss_mask_survives_packing():
    rng = np.random.default_rng(6)
    examples = []
    for _ in range(40):  # prompt ids in [3, 100), response ids in [100, 200)
        prompt = rng.integers(3, 100, rng.integers(1, 20))
        response = rng.integers(100, 200, rng.integers(1, 30))
        examples.append({"tokens": np.array([BOS, *prompt, *response, EOS], np.int32),
                         "prompt_length": 1 + len(prompt)})
    for packing in PACKINGS:
        batches = list(pipeline.make_train_iterator(examples, seq_len=16, global_batch_size=4,
                                                    seed=0, packing=packing, num_epochs=1))
        trained = collections.Counter()
        for b in batches:
            response_or_eos = (b["targets"] >= 100) | (b["targets"] == EOS)
            np.testing.assert_array_equal(b["loss_mask"], response_or_eos & (b["segment_ids"] > 0))
            keep = b["loss_mask"] == 1
            trained.update(zip(b["inputs"][keep].tolist(), b["targets"][keep].tolist(),
                               strict=True))
        expected = collections.Counter()
        for e in examples:
            t = e["tokens"]
            expected.update((int(a), int(b)) for a, b in zip(t[e["prompt_length"] - 1:-1],
                                                             t[e["prompt_length"]:], strict=True))
        assert trained == expected


@pytest.mark.parametrize("packing", PACKINGS)
def test_mixture_proportions_follow_the_weights(packing):
    rng = np.random.default_rng(7)
    # Three sources of different document lengths; every token id, down to each source's
    # own bos (lo - 1) and eos (lo + 50), names the source.
    sources_ = [pipeline.TokenSource(name, [np.array([lo - 1, *rng.integers(lo, lo + 50, n),
                                                      lo + 50], np.int32)
                                            for n in rng.integers(low, high, 100)], weight)
                for name, lo, low, high, weight in [("a", 10, 2, 20, 0.5), ("b", 100, 10, 60, 0.3),
                                                    ("c", 200, 1, 8, 0.2)]]
    iterator = pipeline.make_mixture_iterator(sources_, seq_len=32, global_batch_size=8, seed=0,
                                              packing=packing)
    counts = np.zeros(3)
    for _ in range(100):
        b = next(iterator)
        targets = b["targets"][b["loss_mask"] == 1]
        counts += [((targets >= lo) & (targets <= lo + 50)).sum() for lo in (10, 100, 200)]
    np.testing.assert_allclose(counts / counts.sum(), [0.5, 0.3, 0.2], atol=0.02)



def test_eval_batches_are_fixed_shape_deterministic_and_complete():
    docs = random_token_docs(9, max_len=30, seed=4)
    kwargs = dict(seq_len=16, global_batch_size=4)
    batches = pipeline.make_eval_batches(docs, max_batches=100, **kwargs)
    assert_batches_equal(batches, pipeline.make_eval_batches(docs, max_batches=100, **kwargs))
    for b in batches:
        check_row_structure(b, 16)
        assert b["inputs"].shape == (4, 16)
    assert batch_pairs(batches) == document_pairs(docs)
    assert len(pipeline.make_eval_batches(docs, max_batches=2, **kwargs)) == 2
    # One short document still gives one full-shape batch, padded with empty rows.
    [single] = pipeline.make_eval_batches([np.array([BOS, 7, 8, EOS])], max_batches=3, **kwargs)
    assert single["inputs"].shape == (4, 16)
    assert single["inputs"][0, :3].tolist() == [BOS, 7, 8]
    assert single["loss_mask"][0].sum() == 3 and single["loss_mask"][1:].sum() == 0
    halves = [pipeline.make_eval_batches(docs, max_batches=100, process_index=i,
                                         process_count=2, **kwargs) for i in range(2)]
    for whole, first, second in zip(batches, *halves, strict=True):
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])


def test_tokenize_documents_frames_each_document():
    tok = tokenizer.load_tokenizer("byte", None, None)
    framed = tokenize_documents(tok, ["ab", "c"])
    assert [d.tolist() for d in framed] == [[1, 97 + 3, 98 + 3, 2], [1, 99 + 3, 2]]
    assert all(d.dtype == np.int32 for d in framed)


def test_split_documents_is_deterministic_disjoint_and_complete():
    documents = [f"doc {i}" for i in range(50)]
    train, held_out = split_documents(documents, 0.1, seed=0)
    assert len(held_out) == 5 and len(train) == 45
    assert set(train).isdisjoint(held_out) and set(train) | set(held_out) == set(documents)
    assert split_documents(documents, 0.1, seed=0) == (train, held_out)
    assert split_documents(documents, 0.1, seed=1)[1] != held_out
    assert len(split_documents(documents[:3], 0.01, seed=0)[1]) == 1
    assert split_documents(documents, 0.0, seed=0) == (documents, [])
    with pytest.raises(ValueError, match="cannot hold out"):  # no text to cut
        split_documents([Example("a prompt", "a response")], 0.5, seed=0)


def test_one_text_document_holds_out_its_tail_cut_at_a_line_break():
    lines = [f"line {i} of the only file\n" for i in range(100)]
    [head], [tail] = split_documents(["".join(lines)], 0.05, seed=0)
    assert (head, tail) == ("".join(lines[:95]), "".join(lines[95:]))
    [head], [tail] = split_documents(["no line breaks here"], 0.25, seed=0)
    assert (head, tail) == ("no line breaks", " here")


def test_tfds_catalog_source_reads_locally_and_never_downloads(tmp_path):
    texts = [f"line {i} of a tiny catalog dataset" for i in range(30)]
    write_text_tfds(tmp_path, "tiny_text", {"train": texts[:25], "validation": texts[25:]})
    config = tiny_config(**{"data.train": "tfds:tiny_text", "data.tfds_data_dir": str(tmp_path)})
    tok, train_iter, eval_batches = loader.build(
        config.data, seed=0, seq_len=16, global_batch_size=4, eval_batches=10,
        workdir=str(tmp_path / "run"))
    byte = tokenizer.load_tokenizer("byte")
    train = tokenize_documents(byte, texts[:25])
    batches = [next(train_iter) for _ in range(40)]
    assert set(batch_pairs(batches)) == set(document_pairs(train))  # tokenized on the fly
    held_out = tokenize_documents(byte, texts[25:])
    assert batch_pairs(eval_batches) == document_pairs(held_out)  # its validation split
    missing = tiny_config(**{"data.train": "tfds:tiny_text:test",
                             "data.tfds_data_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="never downloads") as info:
        loader.build(missing.data, seed=0, seq_len=16, global_batch_size=4, eval_batches=1,
                     workdir=str(tmp_path / "run"))
    assert "\n" not in str(info.value)
