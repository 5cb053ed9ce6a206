"""Hard-negative mining: passages a model ranks high for a query but that are not its
positives, the negatives contrastive training learns most from.

For every record, the model retrieves the top `last` passages of the corpus (the training
data's own passages, or a candidate pool) with faiss; the top `first` are skipped (near
the top, an unlabeled passage is often a real answer), and `count` negatives are drawn,
seeded, from the ranks `first+1..last` (FlagEmbedding's `range_for_sampling` "first-last").
A candidate is never one of the query's positives (over every record with that query),
never the query's own text, never a negative the record already has. The optional
false-negative guard skips candidates scoring above `max_score_ratio` times the query's
lowest-scoring positive. Mined negatives are added to the record's own.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import HardNegativesSpec, ModelSpec, StorageAccess, parse_rank_range
from .data import Record
from .encoding import encode_passages, encode_queries, load_encoder
from .errors import InputError
from .jsonl import read_json_lines, text_problem
from .search import NO_RESULT, search
from .storage import fetch_to_local

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MiningSummary:
    records: int
    mined: int
    short: int  # records that got fewer than `count` negatives: the window had too few candidates
    guarded: int  # candidates the false-negative guard skipped


def mine_hard_negatives(
    records: list[Record],
    model,
    spec: HardNegativesSpec,
    *,
    seed: int,
    candidates: list[str] | None = None,
    batch_size: int = 64,
) -> MiningSummary:
    """Add mined negatives to each record's `neg`, in place."""
    first, last = parse_rank_range(spec.rank_range)
    corpus = list(
        dict.fromkeys(candidates if candidates is not None else (p for r in records for p in (*r.pos, *r.neg)))
    )
    queries = list(dict.fromkeys(r.query.strip() for r in records))
    positives: dict[str, set[str]] = {}
    for record in records:
        positives.setdefault(record.query.strip(), set()).update(record.pos)

    query_vectors = encode_queries(model, queries, batch_size=batch_size)
    chunks = encode_passages(model, corpus, batch_size=batch_size)
    scores, ranked = search(query_vectors, chunks, min(last, len(corpus)))
    lowest_positive = (
        _lowest_positive_scores(model, queries, query_vectors, positives, batch_size)
        if spec.max_score_ratio is not None
        else None
    )

    rng = random.Random(seed)
    query_row = {query: row for row, query in enumerate(queries)}
    mined = short = guarded = 0
    for record in records:
        query = record.query.strip()
        row = query_row[query]
        excluded = positives[query] | set(record.neg)
        eligible = []
        for score, position in zip(scores[row, first:], ranked[row, first:]):
            if position == NO_RESULT:
                break
            text = corpus[position]
            if text in excluded or text.strip() == query:
                continue
            if lowest_positive is not None and score > spec.max_score_ratio * lowest_positive[row]:
                guarded += 1
                continue
            eligible.append(text)
        fresh = rng.sample(eligible, min(spec.count, len(eligible)))
        record.neg = record.neg + fresh
        mined += len(fresh)
        short += len(fresh) < spec.count
    summary = MiningSummary(len(records), mined, short, guarded)
    logger.info(
        "mined %d hard negatives for %d records (%d got fewer than %d; guard skipped %d candidates)",
        summary.mined,
        summary.records,
        summary.short,
        spec.count,
        summary.guarded,
    )
    return summary


def _lowest_positive_scores(
    model, queries: list[str], query_vectors: np.ndarray, positives: dict[str, set[str]], batch_size: int
) -> np.ndarray:
    """Per query, the score of its lowest-scoring positive: the guard's reference."""
    texts = sorted({p for query in queries for p in positives[query]})
    vectors = np.empty((len(texts), query_vectors.shape[1]), dtype=np.float32)
    for positions, chunk in encode_passages(model, texts, batch_size=batch_size):
        vectors[positions] = chunk
    row_of = {text: i for i, text in enumerate(texts)}
    return np.array(
        [min(float(query_vectors[q] @ vectors[row_of[p]]) for p in positives[query]) for q, query in enumerate(queries)]
    )


def load_candidates(path: Path) -> list[str]:
    """A candidate pool: JSONL lines of {"text": ...} (FlagEmbedding's candidate_pool format)."""
    texts, problems = [], []
    for line_no, row in read_json_lines(path, problems):
        if "text" not in row:
            problems.append(f"{path}:{line_no}: text: missing")
        elif problem := text_problem(row["text"]):
            problems.append(f"{path}:{line_no}: text: {problem}")
        else:
            texts.append(row["text"])
    if not texts and not problems:
        problems.append(f"{path}: no candidates")
    if problems:
        raise InputError(f'candidate pool {path}: expected JSONL lines of {{"text": ...}}', problems)
    return texts


def fetch_candidates(
    spec: HardNegativesSpec, download_dir: Path, access: StorageAccess | None = None
) -> list[str] | None:
    """The candidate pool `spec` names, read and checked; None when it names none (mining then
    searches the training data's own passages)."""
    if not spec.candidates:
        return None
    return load_candidates(fetch_to_local(spec.candidates, download_dir, access))


def mine_for_training(
    records: list[Record],
    spec: HardNegativesSpec,
    model: ModelSpec,
    model_path: str | Path,
    seed: int,
    download_dir: Path,
    access: StorageAccess | None = None,
) -> MiningSummary:
    """The trainer's mining step: the base model, encoding exactly as training will."""
    candidates = fetch_candidates(spec, download_dir, access)
    # fp32: every node mines for itself, and half precision could break near-ties differently
    encoder = load_encoder(model_path, model.model_dump(exclude={"base"}), precision="fp32", field="model.base")
    return mine_hard_negatives(records, encoder, spec, seed=seed, candidates=candidates)
