"""`bundled:word_order`: a labelled set for asking whether pretraining an encoder helps.

Lines of the bundled plays, lowercased with punctuation removed, either as written
(label 1) or with their words shuffled (label 0). Both kinds hold the same words, so a
classifier must know how English (Shakespeare's) orders words: little to learn from a few
hundred examples, what the masked-LM objective on the plays (configs/bert_mlm.py) is meant
to teach. Measured with configs/bert_word_order.py: bert_mlm's encoder lifts held-out
accuracy from 0.547 to 0.686 (README.md, "Masked-LM pretraining"). Each line is used
once (never both as written and shuffled), and the records are generated on use from a
seeded random.Random: every checkout and every run sees the same set."""

import random
import re

from llmjax.data import sources

MIN_WORDS, MAX_WORDS = 6, 12
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


def candidate_lines() -> list[list[str]]:
    """The words of every line of the bundled plays with MIN_WORDS..MAX_WORDS words, in
    file order, once each (speaker names and stage directions are lines of their own and
    mostly shorter)."""
    seen, lines = set(), []
    for path in sorted((sources.BUNDLED_DIR / "shakespeare").glob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            words = _WORD.findall(line.lower())
            key = " ".join(words)
            if (MIN_WORDS <= len(words) <= MAX_WORDS and len(set(words)) > 1
                    and key not in seen):
                seen.add(key)
                lines.append(words)
    return lines


def examples(num: int = 600, seed: int = 0) -> tuple[list[str], list[int]]:
    """(texts, labels) of the set: `num` records from distinct lines, labels 0, 1, 0, 1..."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i, words in enumerate(rng.sample(candidate_lines(), num)):
        label = i % 2
        if not label:
            shuffled = list(words)
            while shuffled == words:  # a shuffle that leaves the line as written is not one
                rng.shuffle(shuffled)
            words = shuffled
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels
