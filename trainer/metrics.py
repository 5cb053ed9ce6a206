"""Retrieval metrics at cutoffs k, computed the way trec_eval (pytrec_eval) computes them,
averaged over EVERY judged query.

FlagEmbedding's own helpers drop queries that retrieved nothing and divide MRR by the number
of judged queries only; here a query that retrieves no relevant passage scores 0 and still
counts in the mean, so a model cannot look better by failing quietly.

Definitions (relevant = relevance > 0; R = number of relevant passages of the query):
  nDCG@k       sum over ranks i <= k of rel_i / log2(i + 1), divided by the same sum over
               the ideal ordering of the query's judgments (gains are the graded relevances)
  Recall@k     relevant in the top k / R
  P@k          relevant in the top k / k (a ranking shorter than k is not rewarded)
  MRR@k        1 / rank of the first relevant passage within the top k, else 0
  MAP@k        sum of P@i over the ranks i <= k holding a relevant passage, / R
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

METRIC_NAMES = ("ndcg", "recall", "mrr", "map", "precision")


def metric_keys(ks: Sequence[int]) -> list[str]:
    """The keys of a metrics dict, e.g. `ndcg@10`, in a stable display order."""
    return [f"{name}@{k}" for name in METRIC_NAMES for k in ks]


def per_query_metrics(
    rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]], ks: Sequence[int]
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Every metric for every judged query (the order of `qrels`).

    `rankings` maps a query id to its retrieved passage ids, best first; a query missing
    from it retrieved nothing. Returns the query ids and one array per metric key."""
    query_ids = list(qrels)
    depth = max(ks)
    gains = np.zeros((len(query_ids), depth))  # relevance of the passage at each rank
    ideal = np.zeros((len(query_ids), depth))  # the best possible gains, best first
    relevant_counts = np.zeros(len(query_ids))
    for row, qid in enumerate(query_ids):
        judged = qrels[qid]
        ranked = rankings.get(qid, ())[:depth]
        gains[row, : len(ranked)] = [max(judged.get(docid, 0), 0) for docid in ranked]
        best = sorted((rel for rel in judged.values() if rel > 0), reverse=True)[:depth]
        ideal[row, : len(best)] = best
        relevant_counts[row] = sum(rel > 0 for rel in judged.values())

    ranks = np.arange(1, depth + 1)
    discounted = gains / np.log2(ranks + 1)
    ideal_discounted = ideal / np.log2(ranks + 1)
    hits = gains > 0
    hits_so_far = np.cumsum(hits, axis=1)
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, depth + 1)
    precision_at_hits = np.where(hits, hits_so_far / ranks, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_query: dict[str, np.ndarray] = {}
        for k in ks:
            ideal_dcg = ideal_discounted[:, :k].sum(axis=1)
            per_query[f"ndcg@{k}"] = np.where(ideal_dcg > 0, discounted[:, :k].sum(axis=1) / ideal_dcg, 0.0)
            per_query[f"recall@{k}"] = np.where(relevant_counts > 0, hits_so_far[:, k - 1] / relevant_counts, 0.0)
            per_query[f"mrr@{k}"] = np.where(first_hit <= k, 1.0 / first_hit, 0.0)
            per_query[f"map@{k}"] = np.where(
                relevant_counts > 0, precision_at_hits[:, :k].sum(axis=1) / relevant_counts, 0.0
            )
            per_query[f"precision@{k}"] = hits_so_far[:, k - 1] / k
    return query_ids, {key: per_query[key] for key in metric_keys(ks)}


def retrieval_metrics(
    rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]], ks: Sequence[int]
) -> dict[str, float]:
    """The mean of every metric over all judged queries."""
    if not qrels:
        raise ValueError("no judged queries to evaluate")
    _, per_query = per_query_metrics(rankings, qrels, ks)
    return {key: float(values.mean()) for key, values in per_query.items()}


def paired_bootstrap_intervals(
    finetuned: Mapping[str, np.ndarray],
    baseline: Mapping[str, np.ndarray],
    *,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """The `confidence` interval of each metric's mean difference, finetuned - baseline, by a
    paired bootstrap over the queries (percentile method).

    The arrays hold one value per query, in the same query order for both models. Each resample
    draws the queries with replacement and keeps a query's two scores together, so what varies
    is the gain, not how hard the drawn queries are (both models find the same queries hard)."""
    keys = list(finetuned)
    differences = np.stack([finetuned[key] - baseline[key] for key in keys], axis=1)  # queries x metrics
    queries = len(differences)
    rng = np.random.default_rng(seed)
    means = np.empty((resamples, len(keys)))
    # how often each query is drawn, for a block of resamples at a time (bounded memory)
    block = max(1, 4_000_000 // queries)
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        counts = rng.multinomial(queries, np.full(queries, 1 / queries), size=size)
        means[start : start + size] = counts @ differences / queries
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail], axis=0)
    return {key: (float(low[i]), float(high[i])) for i, key in enumerate(keys)}
