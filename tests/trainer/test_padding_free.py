"""Padding-free forward passes (issue 13: 2): packed sequences give the padded embeddings."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoTokenizer

from embedtune.trainer.padding_free import enable_padding_free, pack, reference_varlen_attention
from embedtune.trainer.runner import EmbedtuneEmbedderModel
from support.tiny import WORDS

# lengths from 1 to 20 words: most of a padded batch is padding
TEXTS = [" ".join(WORDS[i : i + 1 + (i * 7) % 20]) for i in range(12)]


def tiny_encoder(kind: str):
    from transformers import (
        BertConfig,
        BertModel,
        DistilBertConfig,
        DistilBertModel,
        ModernBertConfig,
        ModernBertModel,
        RobertaConfig,
        RobertaModel,
        XLMRobertaConfig,
        XLMRobertaModel,
    )

    torch.manual_seed(0)
    size = {"vocab_size": len(WORDS) + 8, "pad_token_id": 0}
    layers = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    if kind == "bert":
        return BertModel(BertConfig(**size, **layers, max_position_embeddings=64))
    if kind in ("roberta", "xlm-roberta"):
        config_class, model_class = {
            "roberta": (RobertaConfig, RobertaModel),
            "xlm-roberta": (XLMRobertaConfig, XLMRobertaModel),
        }[kind]
        return model_class(config_class(**size, **layers, max_position_embeddings=64))
    if kind == "modernbert":
        # a local window of 8 tokens, so the sliding-window layers matter on these texts
        config = ModernBertConfig(**size, **layers, max_position_embeddings=64, local_attention=8)
        return ModernBertModel(config)
    return DistilBertModel(DistilBertConfig(**size, dim=32, n_layers=1, n_heads=2, hidden_dim=64))


@pytest.mark.parametrize("kind", ["bert", "roberta", "xlm-roberta", "modernbert"])
@pytest.mark.parametrize("pooling", ["cls", "mean", "last_token"])
def test_packed_embeddings_equal_the_padded_ones(tiny_model, kind, pooling):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    encoder = tiny_encoder(kind).eval()
    model = EmbedtuneEmbedderModel(
        encoder, tokenizer=tokenizer, sentence_pooling_method=pooling, normalize_embeddings=False
    )
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    if kind == "modernbert":
        batch.pop("token_type_ids")
    with torch.no_grad():
        padded = model.encode(batch)
        packing = enable_padding_free(encoder)
        assert packing is not None
        packed_batch = pack(batch, packing)
        packed = model.encode(packed_batch)
        assert torch.equal(model.encode(batch), padded)  # padded input is unchanged by the switch
    assert packed_batch["input_ids"].numel() == batch["attention_mask"].sum()  # no padding computed
    assert packed.shape == padded.shape
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)


def test_sliding_window_attention_stays_within_the_window():
    torch.manual_seed(0)
    q, k, v = (torch.randn(10, 2, 4) for _ in range(3))
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    out = reference_varlen_attention(q, k, v, cu, None, 0.0, window=1)
    # token 0 of the first sequence sees tokens 0 and 1 only
    expected = torch.nn.functional.scaled_dot_product_attention(
        q[:1].transpose(0, 1), k[:2].transpose(0, 1), v[:2].transpose(0, 1)
    ).transpose(0, 1)
    torch.testing.assert_close(out[:1], expected)


def test_a_model_it_cannot_pack_trains_with_padding_and_the_log_says_so(caplog):
    encoder = tiny_encoder("distilbert")
    with caplog.at_level(logging.INFO, logger="embedtune.trainer.padding_free"):
        assert enable_padding_free(encoder) is None
    assert "padding-free: not available for model type distilbert" in caplog.text
    assert "training with padding" in caplog.text
    assert encoder.config._attn_implementation != "embedtune_varlen"
