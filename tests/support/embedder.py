"""Embedtune's FlagEmbedding model, dataset and collator on a tiny model, without a Trainer:
loss and gradients of one batch, on one rank or several (see support.ranks)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

MAX_LENGTH = 16


def load_embedder(
    model_path: Path, *, negatives_cross_device: bool = False, temperature: float = 0.05, dropout: bool = False
):
    """The training model; without dropout (the default) a batch's loss is a function of the batch."""
    from embedtune.trainer.model_loading import load_tokenizer_and_encoder
    from embedtune.trainer.runner import EmbedtuneEmbedderModel

    torch.manual_seed(0)
    tokenizer, encoder = load_tokenizer_and_encoder(str(model_path))
    for module in encoder.modules() if not dropout else ():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model = EmbedtuneEmbedderModel(
        encoder,
        tokenizer=tokenizer,
        negatives_cross_device=negatives_cross_device,
        temperature=temperature,
        sentence_pooling_method="cls",
        normalize_embeddings=True,
    )
    return model.train()


def hashed_batch(model, train_file: Path, indices: list[int], *, group_size: int = 2, hashes: bool = True) -> dict:
    """The collated batch of the records at `indices` (in that order), with or without the
    passage hashes that mask false negatives."""
    from embedtune.trainer.false_negatives import PassageHashingCollator, PositiveHashingDataset
    from embedtune.trainer.runner import EmbedtuneDataArguments

    args = EmbedtuneDataArguments(
        train_data=[str(train_file)], train_group_size=group_size, query_max_len=MAX_LENGTH, passage_max_len=MAX_LENGTH
    )
    dataset = PositiveHashingDataset(seed=42, args=args, tokenizer=model.tokenizer)
    collator = PassageHashingCollator(
        tokenizer=model.tokenizer,
        query_max_len=MAX_LENGTH,
        passage_max_len=MAX_LENGTH,
        padding=True,
        return_tensors="pt",
    )
    batch = collator([dataset[i] for i in indices])
    if not hashes:
        del batch["passage_hashes"], batch["positive_hashes"]
    return batch


def loss_on_rank(rank: int, world_size: int, model_path: Path, train_file: Path, order: list[int]) -> float:
    """This rank's loss with cross-device negatives, on its share of `order`."""
    model = load_embedder(model_path, negatives_cross_device=True)
    share = len(order) // world_size
    return model(**hashed_batch(model, train_file, order[rank * share : (rank + 1) * share])).loss.item()


def loss_and_gradients(model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """One training step's loss and the gradient of every parameter."""
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def grad_cache_differences(model, batch: dict, mini_batch: int) -> tuple[float, float]:
    """|loss difference| and the largest |gradient difference| of a GradCache step against the plain step."""
    model.grad_cache_queries = 0
    plain_loss, plain = loss_and_gradients(model, batch)
    model.grad_cache_queries = mini_batch
    calls = []
    hook = model.model.register_forward_hook(lambda *_: calls.append(1))
    cached_loss, cached = loss_and_gradients(model, batch)
    hook.remove()
    # queries and passages: each mini-batch encoded, then encoded again in the backward
    assert len(calls) == 2 * 2 * math.ceil(batch["queries"]["input_ids"].size(0) / mini_batch)
    assert plain.keys() == cached.keys() and len(plain) > 0
    return abs(plain_loss - cached_loss), max((plain[n] - cached[n]).abs().max().item() for n in plain)


def grad_cache_differences_on_rank(
    rank: int, world_size: int, model_path: Path, train_file: Path, group_size: int, mini_batch: int
) -> tuple[float, float]:
    """grad_cache_differences with cross-device negatives, on this rank's half of the data."""
    model = load_embedder(model_path, negatives_cross_device=True)
    rows = list(range(rank * 4, rank * 4 + 4))
    batch = hashed_batch(model, train_file, rows, group_size=group_size)
    return grad_cache_differences(model, batch, mini_batch)
