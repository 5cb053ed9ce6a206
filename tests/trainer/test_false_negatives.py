"""Masked false negatives: a passage equal to one of the query's positives is no negative of it,
within the batch and across ranks."""

from __future__ import annotations

import math

import pytest
import torch

from embedtune.trainer.contract import TrainerConfig
from embedtune.trainer.runner import build_model_and_data_arguments
from support.embedder import hashed_batch, load_embedder, loss_on_rank, m3_losses, m3_losses_on_rank
from support.ranks import run_on_ranks
from support.tiny import write_jsonl

SHARED = "w10 w11 w12 w13"
RECORDS = [  # records 0 and 2 share their positive: each is the other's false negative
    {"query": "what is w1 w2", "pos": [SHARED], "neg": ["w20 w21 w22"]},
    {"query": "what is w3 w4", "pos": ["w30 w31 w32"], "neg": ["w40 w41 w42"]},
    {"query": "what is w5 w6", "pos": [SHARED], "neg": ["w50 w51 w52"]},
    {"query": "what is w7 w8", "pos": ["w60 w61 w62"], "neg": ["w70 w71 w72"]},
]
GROUP_SIZE = 2


def loss_without_duplicates(model, batch) -> torch.Tensor:
    """The contrastive loss with each query's duplicates of its positive taken out of its row."""
    queries, passages = model.encode(batch["queries"]), model.encode(batch["passages"])
    scores = queries @ passages.T / model.temperature
    texts = [p for r in RECORDS for p in (r["pos"][0], r["neg"][0])]
    losses = []
    for i, record in enumerate(RECORDS):
        own = i * GROUP_SIZE
        kept = [j for j, text in enumerate(texts) if j == own or text not in record["pos"]]
        losses.append(torch.logsumexp(scores[i, kept], dim=0) - scores[i, own])
    return torch.stack(losses).mean()


# the dense families' models, by the fixture of their tiny base model
DENSE_FAMILIES = {"encoder": "tiny_model", "decoder": "tiny_decoder"}


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_a_duplicated_positive_is_masked_in_the_batch(request, tmp_path, family):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    model = load_embedder(request.getfixturevalue(DENSE_FAMILIES[family]), family=family)
    batch = hashed_batch(model, data, [0, 1, 2, 3], group_size=GROUP_SIZE)
    with torch.no_grad():
        masked = model(**batch).loss
        unmasked = model(**hashed_batch(model, data, [0, 1, 2, 3], group_size=GROUP_SIZE, hashes=False)).loss
        expected = loss_without_duplicates(model, batch)
    assert abs(masked.item() - expected.item()) < 1e-5
    assert abs(unmasked.item() - masked.item()) > 1e-3  # the duplicate did count as a negative before


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_a_duplicated_positive_on_another_rank_is_masked(request, tmp_path, family):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    model_path = request.getfixturevalue(DENSE_FAMILIES[family])
    model = load_embedder(model_path, family=family)
    with torch.no_grad():
        expected = loss_without_duplicates(model, hashed_batch(model, data, [0, 1, 2, 3], group_size=GROUP_SIZE))
    # rank 0 holds records 0 and 1, rank 1 records 2 and 3: the shared positive is on both
    losses = run_on_ranks(2, loss_on_rank, model_path, data, [0, 1, 2, 3], family)
    assert all(abs(loss - expected.item()) < 1e-5 for loss in losses), (losses, expected.item())


# query 0's false negative is record 2's positive, and query 2's is record 0's
DUPLICATES = [(0, 2 * GROUP_SIZE), (2, 0)]


def test_bge_m3_masks_every_score_it_trains_on_in_the_batch_and_its_dense_scores_across_ranks(
    tiny_xlm_roberta, tmp_path
):
    """Dense, sparse, ColBERT and their weighted sum, with self-distillation: each is trained on
    the batch without the duplicates. Across ranks FlagEmbedding scores only dense against the
    other ranks' passages (sparse and ColBERT within each rank's half, which has no duplicate)."""
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    model = load_embedder(tiny_xlm_roberta, family="m3")
    losses = m3_losses(model, hashed_batch(model, data, [0, 1, 2, 3], group_size=GROUP_SIZE), DUPLICATES)
    assert math.isfinite(losses["masked"]) and losses["masked"] == pytest.approx(losses["reference"], abs=1e-5)
    assert abs(losses["unmasked"] - losses["masked"]) > 1e-3  # the duplicates did count as negatives before

    for rank_losses in run_on_ranks(2, m3_losses_on_rank, tiny_xlm_roberta, data, [0, 1, 2, 3], DUPLICATES):
        assert rank_losses["masked"] == pytest.approx(rank_losses["reference"], abs=1e-5), rank_losses
        assert abs(rank_losses["unmasked"] - rank_losses["masked"]) > 1e-3


def test_masking_is_on_by_default_and_a_setting_turns_it_off(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    config = {"model": {"base": "m"}, "data": {"train": str(data)}, "storage": {"uri": str(tmp_path)}}
    _, data_args = build_model_and_data_arguments(TrainerConfig.model_validate(config), "m", data)
    assert data_args.mask_false_negatives
    config["training"] = {"maskFalseNegatives": False}
    _, data_args = build_model_and_data_arguments(TrainerConfig.model_validate(config), "m", data)
    assert not data_args.mask_false_negatives
