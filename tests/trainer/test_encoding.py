"""Padding-free encoding (issue 13: 4) gives sentence-transformers' own vectors."""

from __future__ import annotations

import numpy as np
import pytest

from embedtune.trainer.config import ModelSpec
from embedtune.trainer.encoding import _token_budget_slices, encode_passages, encode_queries, load_encoder, packed_plan
from embedtune.trainer.export import export_sentence_transformers
from support.tiny import WORDS

TEXTS = [" ".join(WORDS[i : i + 1 + (i * 7) % 30]) for i in range(40)]


@pytest.mark.parametrize("pooling", ["cls", "mean", "lastToken"])
def test_padding_free_vectors_equal_sentence_transformers_own(tiny_model, tmp_path, pooling):
    spec = ModelSpec(base="tiny", pooling=pooling, query_instruction="what: ", passage_max_length=24)
    model = load_encoder(export_sentence_transformers(tiny_model, tmp_path / "model", spec))
    expected_queries = model.encode_query(TEXTS, convert_to_numpy=True)
    expected_passages = model.encode_document(TEXTS, convert_to_numpy=True)

    plan = packed_plan(model, True)
    plan.tokens_per_forward = 60  # several forward passes per tokenized group
    queries = encode_queries(model, TEXTS, padding_free=True)
    passages = np.empty_like(queries)
    for positions, vectors in encode_passages(model, TEXTS, chunk_size=16, padding_free=True):
        passages[positions] = vectors
    np.testing.assert_allclose(queries, expected_queries, rtol=0, atol=1e-5)
    np.testing.assert_allclose(passages, expected_passages, rtol=0, atol=1e-5)


def test_token_budget_slices_bound_the_real_tokens_of_each_forward_pass():
    assert list(_token_budget_slices([30, 20, 20, 10, 70, 5], 50)) == [
        slice(0, 2),
        slice(2, 4),
        slice(4, 5),  # longer than the budget alone: still encoded
        slice(5, 6),
    ]
    assert list(_token_budget_slices([], 50)) == []
