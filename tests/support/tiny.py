"""Tiny BERT models and synthetic retrieval data, built in the test (no model hub here)."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [f"w{i}" for i in range(300)]


def build_tiny_bert(
    path: Path,
    *,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    cross_encoder: bool = False,
    dropout: float = 0.1,
) -> Path:
    """A tiny BERT encoder, or with `cross_encoder` a reranker: BERT with a one-logit head."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "what", "is", "about"]
    # transformers 5 ignores `vocab_file=` (every word became [UNK]); it takes the vocabulary itself
    BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)}).save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(WORDS) + 8,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
        num_labels=1,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    (BertForSequenceClassification if cross_encoder else BertModel)(config).save_pretrained(path)
    return path


def synthetic_records(count: int, *, seed: int = 0, negatives: int = 3) -> list[dict]:
    """Queries share words with their positive passage; negatives are random words."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        topic = rng.sample(WORDS, 3)
        filler = rng.sample(WORDS, 3)
        passage = topic + filler
        rng.shuffle(passage)
        records.append(
            {
                "query": "what is " + " ".join(topic),
                "pos": [" ".join(passage)],
                "neg": [" ".join(rng.sample(WORDS, 6)) for _ in range(negatives)],
            }
        )
    return records


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path
