"""TextStream: the deltas of a completion decoded token by token join to its text."""

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmjax.data.tokenizer import ByteTokenizer, HuggingFaceTokenizer, train_bpe
from llmjax.inference.texts import Texts, TextStream

CORPUS = ["the quick brown fox jumps over the lazy dog", "naïve café — über straße",
          "ROMEO: wherefore art thou? 東京 ✓ emoji 🎉 ok", "  spaced   out\ttabs\nnewlines"]


def _metaspace() -> HuggingFaceTokenizer:
    """A SentencePiece-style tokenizer: '▁' for spaces, which a decode at the start of a
    sequence drops, so a delta needs the tokens before it."""
    raw = RustTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    alphabet = sorted({c for text in CORPUS for c in text.replace(" ", "▁")})
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=alphabet, show_progress=False))
    return HuggingFaceTokenizer(transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>"), "metaspace")


TOKENIZERS = {
    "byte": ByteTokenizer(),
    "byte-level bpe": HuggingFaceTokenizer(transformers.PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(CORPUS, 300), bos_token="<bos>", eos_token="<eos>",
        pad_token="<pad>"), "bpe:300"),
    "metaspace": _metaspace(),
}


def _stream(tokenizer, ids: list[int], stops: tuple[str, ...] = ()) -> list[str]:
    stream = TextStream(Texts(tokenizer), stops)
    pieces = [stream.delta(ids[:n], None) for n in range(1, len(ids) + 1)]
    return pieces + [stream.delta(ids, tokenizer.decode(ids))]


@pytest.mark.parametrize("name", TOKENIZERS)
@settings(max_examples=40, deadline=None)
@given(text=st.sampled_from(CORPUS) | st.text(alphabet="ab é東🎉\n▁", max_size=30))
def test_deltas_join_to_the_text(name, text):
    tokenizer = TOKENIZERS[name]
    ids = tokenizer.encode(text)
    if not ids:
        return
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    # Every piece before the end is whole text: no replacement character from a split one.
    assert all("\ufffd" not in p for p in pieces[:-1])


def test_a_character_split_over_tokens_waits_for_its_last_byte():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("a🎉b")  # the emoji is four byte tokens
    assert _stream(tokenizer, ids) == ["a", "", "", "", "🎉", "b", ""]


def test_what_may_start_a_stop_string_is_held_back():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("ab\nROMEO")
    pieces = _stream(tokenizer, ids, stops=("\nJULIET",))
    assert pieces[:3] == ["a", "b", ""]  # "\n" may begin "\nJULIET"
    assert pieces[3] == "\nR"  # "\nR" cannot
    assert "".join(pieces) == "ab\nROMEO"
