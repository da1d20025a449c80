"""`bundled:sentiment`: a small labelled set that the `:tiny` classifier configs train on.

Generated on use, not stored: 600 five-word "reviews" (four filler words and one positive
or negative word, shuffled), label 1 for positive, alternating, from a seeded
random.Random, so every checkout and every run sees the same records. It is synthetic, made
by llmjax to check that a classifier learns (a 2-layer model reaches 100% held-out
accuracy in under a hundred steps); for a real benchmark use tfds:imdb_reviews or
tfds:glue/sst2.
"""

import random

POSITIVE = ("good", "great", "love", "fine")
NEGATIVE = ("bad", "awful", "hate", "poor")
FILLER = tuple("the a movie film plot actor was is it this very quite story".split())


def examples(num: int = 600, seed: int = 0) -> tuple[list[str], list[int]]:
    """(texts, labels) of the set: `num` records, labels 0, 1, 0, 1, ..."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(num):
        label = i % 2
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels
