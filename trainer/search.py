"""Top-k inner-product search with faiss over a corpus that arrives in chunks.

`exact` (the default) scans every passage: each chunk is searched on its own and merged
into running top-k heaps, so only one chunk of passage vectors is in memory at a time.
`ivf` and `hnsw` build an approximate index over the whole corpus (it holds every vector
anyway); faster on large corpora, at a recall cost measured in docs/evaluation.md.

Results are ordered by score, ties by corpus position, so a ranking does not depend on the
order faiss happened to return equal scores in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import get_args

import numpy as np

from .contract import IndexKind

INDEX_KINDS: tuple[IndexKind, ...] = get_args(IndexKind)
# HNSW graph degree and search breadth; IVF lists probed per query (of about 4*sqrt(n)).
# Their recall@10 against exact depends on the data: 0.90-0.99 (HNSW) and 0.80-0.91 (IVF)
# on 100k x 384 vectors of intrinsic dimension 64-32, see docs/benchmarks.md.
HNSW_NEIGHBOURS = 32
HNSW_EF_SEARCH = 128
IVF_PROBES = 128
# A missing result (fewer than k passages) has this id, as in faiss.
NO_RESULT = -1


def search(
    queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int, index: IndexKind = "exact"
) -> tuple[np.ndarray, np.ndarray]:
    """The k best passages of every query by inner product.

    `chunks` yields (corpus positions, vectors) pairs covering the corpus. Returns
    (scores, positions), both (n_queries, k), best first; positions are NO_RESULT where
    the corpus has fewer than k passages."""
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if index == "exact":
        heap = faiss.ResultHeap(len(queries), k, keep_max=True)
        for positions, vectors in chunks:
            flat = faiss.IndexFlatIP(queries.shape[1])
            flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
            scores, found = flat.search(queries, min(k, len(positions)))
            heap.add_result(scores, np.where(found >= 0, positions[np.maximum(found, 0)], NO_RESULT))
        heap.finalize()
        scores, found = heap.D, heap.I
    else:
        parts = list(chunks)
        positions = np.concatenate([p for p, _ in parts])
        vectors = np.ascontiguousarray(np.concatenate([v for _, v in parts]), dtype=np.float32)
        approximate = build_approximate_index(vectors, index)
        scores, found = approximate.search(queries, k)
        found = np.where(found >= 0, positions[np.maximum(found, 0)], NO_RESULT)
    missing = found == NO_RESULT
    scores = np.where(missing, -np.inf, scores)
    order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, found), -scores), axis=1)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(found, order, axis=1)


def build_approximate_index(vectors: np.ndarray, kind: IndexKind):
    """An IVF or HNSW inner-product index holding `vectors`."""
    import faiss

    dim = vectors.shape[1]
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = HNSW_EF_SEARCH
    elif kind == "ivf":
        # faiss's rule of thumb: about sqrt(n) lists, and at least 39 training points per list
        lists = max(1, min(int(4 * math.sqrt(len(vectors))), len(vectors) // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(IVF_PROBES, lists)
    else:
        raise ValueError(f"index {kind!r}: expected one of {', '.join(INDEX_KINDS)}")
    index.add(vectors)
    return index
