"""Embedtune's FlagEmbedding model, dataset and collator on a tiny model, without a Trainer:
loss and gradients of one batch, on one rank or several (see support.ranks)."""

from __future__ import annotations

from pathlib import Path

import torch

MAX_LENGTH = 16


def load_embedder(model_path: Path, *, negatives_cross_device: bool = False, temperature: float = 0.05):
    """The training model, without dropout, so that a batch's loss is a function of the batch."""
    from embedtune.trainer.model_loading import load_tokenizer_and_encoder
    from embedtune.trainer.runner import EmbedtuneEmbedderModel

    torch.manual_seed(0)
    tokenizer, encoder = load_tokenizer_and_encoder(str(model_path))
    for module in encoder.modules():
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
    dataset = PositiveHashingDataset(args=args, tokenizer=model.tokenizer)
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
