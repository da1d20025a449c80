"""bundled:word_order: lines as written against the same words shuffled, each line once."""

import pytest

from llmjax.data import classify, word_order


def test_records_are_distinct_lines_as_written_or_shuffled():
    texts, labels = classify.read_examples("bundled:word_order", "config.data.train")
    assert len(texts) == 600 and list(labels) == [0, 1] * 300
    lines = {" ".join(words) for words in word_order.candidate_lines()}
    words_of_lines = {tuple(sorted(line.split())) for line in lines}
    for text, label in zip(texts, labels):
        assert (text in lines) == bool(label), (text, label)  # shuffled: never as written
        assert tuple(sorted(text.split())) in words_of_lines  # the words of a line
    # never one line twice (as written and shuffled): the records' words all differ
    assert len({tuple(sorted(text.split())) for text in texts}) == 600
    assert (texts, list(labels)) == (word_order.examples()[0], [0, 1] * 300)  # seeded


def test_an_unknown_bundled_set_names_the_ones_there_are():
    with pytest.raises(ValueError, match="bundled:sentiment or bundled:word_order"):
        classify.read_examples("bundled:words", "config.data.train")
