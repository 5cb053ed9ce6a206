"""Tiny BERT models and synthetic retrieval data, built in the test (no model hub here)."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [f"w{i}" for i in range(300)]


def build_tiny_bert(
    path: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 2, dropout: float = 0.1
) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

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
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(config).save_pretrained(path)
    return path


def build_tiny_xlm_roberta(
    path: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 2, dropout: float = 0.1
) -> Path:
    """A tiny XLM-RoBERTa (bge-m3's architecture) with a SentencePiece-style Unigram tokenizer
    trained here with the `tokenizers` library."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizer

    path.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's ids 0..3, then <mask>
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    words = [*WORDS, "what", "is", "about"]
    tokenizer.train_from_iterator(
        [" ".join(words[i : i + 8]) for i in range(len(words))] * 4,
        trainers.UnigramTrainer(vocab_size=len(words) + 64, special_tokens=specials, unk_token="<unk>"),
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    XLMRobertaTokenizer(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    ).save_pretrained(path)
    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=130,  # positions start after the padding index (1), as in XLM-R
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    XLMRobertaModel(config).save_pretrained(path)
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
