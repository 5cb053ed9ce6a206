"""Masked false negatives: a passage of the batch (of any rank) whose text equals one of a
query's own positives is no negative of that query.

FlagEmbedding scores each query against every passage of the batch, and with cross-device
negatives against every passage of every rank; when two queries share a positive (FAQ and
product data often do), each is trained away from its own answer. The dataset adds the hashes
of each record's positives, the collator those of every passage, both with the passage
instruction applied (the text the model reads); the model gathers hashes, never texts, across
ranks and masks the matching scores before the loss (runner.FalseNegativeMasking). FlagEmbedding's
same-dataset batches (data.sameDatasetWithinBatch) are hashed likewise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from FlagEmbedding.abc.finetune.embedder import (
    AbsEmbedderCollator,
    AbsEmbedderSameDatasetCollator,
    AbsEmbedderSameDatasetTrainDataset,
)

from .batches import SeededPickDataset

# pads a query's positive hashes to the batch's longest list; text hashes are never negative
NO_HASH = -1


def text_hash(text: str) -> int:
    """A 63-bit hash of a text: equal texts match across processes (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def positive_hashes(args, positives: list[str]) -> list[int]:
    """The hashes of a record's positives as the model reads them (the passage instruction applied)."""
    instruction = args.passage_instruction_for_retrieval
    if instruction is not None:
        positives = [args.passage_instruction_format.format(instruction, p) for p in positives]
    return [text_hash(p) for p in positives]


def hash_tensors(passages: list[str], positives: list[list[int]]) -> dict[str, torch.Tensor]:
    """A batch's `passage_hashes` (one per passage) and `positive_hashes` (one row per query,
    padded with NO_HASH)."""
    longest = max(len(hashes) for hashes in positives)
    return {
        "positive_hashes": torch.tensor(
            [hashes + [NO_HASH] * (longest - len(hashes)) for hashes in positives], dtype=torch.int64
        ),
        "passage_hashes": torch.tensor([text_hash(passage) for passage in passages], dtype=torch.int64),
    }


class PositiveHashingDataset(SeededPickDataset):
    """The training dataset (seeded picks); each item also carries the hashes of its record's positives."""

    def __getitem__(self, item):
        query, passages, teacher_scores = super().__getitem__(item)
        return query, passages, teacher_scores, positive_hashes(self.args, self.dataset[item]["pos"])


@dataclass
class PassageHashingCollator(AbsEmbedderCollator):
    """FlagEmbedding's collator; the batch also holds the hashes (hash_tensors)."""

    def __call__(self, features):
        batch = super().__call__([feature[:3] for feature in features])
        passages = [passage for feature in features for passage in feature[1]]
        return batch | hash_tensors(passages, [feature[3] for feature in features])


class PositiveHashingSameDatasetTrainDataset(AbsEmbedderSameDatasetTrainDataset):
    """FlagEmbedding's same-dataset batches (each a whole batch of one training file); each
    also carries the hashes of its records' positives."""

    def _create_batch_data(self, batch_raw_data):
        self._positive_hashes = [positive_hashes(self.args, positives) for positives in batch_raw_data["pos"]]
        return super()._create_batch_data(batch_raw_data)

    def __getitem__(self, item):
        batch = super().__getitem__(item)  # creates the batch data, hashing its positives
        return (*batch, self._positive_hashes)


@dataclass
class PassageHashingSameDatasetCollator(AbsEmbedderSameDatasetCollator):
    """FlagEmbedding's same-dataset collator; the batch also holds the hashes (hash_tensors)."""

    def __call__(self, features):
        ((queries, passages, teacher_scores, no_in_batch_neg_flag, positives),) = features
        batch = super().__call__([(queries, passages, teacher_scores, no_in_batch_neg_flag)])
        return batch | hash_tensors(passages, positives)


def false_negatives(passage_hashes: torch.Tensor, positive_hashes: torch.Tensor) -> torch.Tensor:
    """(queries, passages) booleans: the passage's text is one of the query's positives, and the
    passage is not the positive the query is trained towards (the first of its group)."""
    queries, passages = positive_hashes.size(0), passage_hashes.size(0)
    same = (positive_hashes[:, None, :] == passage_hashes[None, :, None]).any(dim=-1)
    group_size = passages // queries
    own = torch.arange(queries, device=same.device)
    same[own, own * group_size] = False
    return same


def gather_hashes(passage_hashes: torch.Tensor, positive_hashes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's hashes in rank order, as FlagEmbedding gathers the embeddings. Ranks may hold
    queries with different numbers of positives: rows are padded to the longest first."""
    width = torch.tensor([positive_hashes.size(1)], device=positive_hashes.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    padded = torch.full(
        (positive_hashes.size(0), int(width.item())), NO_HASH, dtype=torch.int64, device=positive_hashes.device
    )
    padded[:, : positive_hashes.size(1)] = positive_hashes
    return _all_gather(passage_hashes), _all_gather(padded)


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
