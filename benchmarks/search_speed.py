"""Search time for 10k queries over 100k x 384 vectors: exact (embedtune's default,
chunked) vs the approximate indexes, with the approximate indexes' recall@10 against exact.

Sentence embeddings fill only a low-dimensional part of their space, which is what makes
approximate indexes work (uniform random vectors in 384 dimensions have no neighbourhood
structure, the worst case for any index; well-separated clusters, the best). The vectors
here are random Gaussian points of `--intrinsic-dim` dimensions, mapped linearly into 384,
plus a little full-rank noise, normalized; queries are drawn the same way. A higher
intrinsic dimension is harder for the approximate indexes.
Run: python benchmarks/search_speed.py [--passages 100000 --queries 10000 --intrinsic-dim 32]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from embedtune.trainer.search import build_approximate_index, search


def low_rank(count: int, mapping: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    latent = rng.standard_normal((count, mapping.shape[0])).astype(np.float32)
    vectors = latent @ mapping + 0.1 * rng.standard_normal((count, mapping.shape[1])).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--intrinsic-dim", type=int, default=32, help="dimensions the vectors really vary in")
    parser.add_argument("--chunk", type=int, default=16384, help="exact search: passages per chunk")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    mapping = rng.standard_normal((args.intrinsic_dim, args.dim)).astype(np.float32) / np.sqrt(args.intrinsic_dim)
    corpus = low_rank(args.passages, mapping, rng)
    queries = low_rank(args.queries, mapping, rng)
    chunks = [
        (np.arange(s, min(s + args.chunk, len(corpus))), corpus[s : s + args.chunk])
        for s in range(0, len(corpus), args.chunk)
    ]

    print(
        f"{args.queries} queries x {args.passages} passages x {args.dim} dims, "
        f"intrinsic dimension {args.intrinsic_dim}, k=10"
    )
    print("| index | build (s) | search (s) | recall@10 vs exact |")
    print("|---|---|---|---|")
    start = time.perf_counter()
    _, exact = search(queries, chunks, 10)
    print(f"| exact (flat inner product, chunked) | - | {time.perf_counter() - start:.1f} | 1.000 |", flush=True)
    for kind in ("ivf", "hnsw"):
        start = time.perf_counter()
        index = build_approximate_index(corpus, kind)
        built = time.perf_counter()
        _, found = index.search(queries, 10)
        searched = time.perf_counter()
        recall = np.mean([len(np.intersect1d(a, e)) / 10 for a, e in zip(found, exact)])
        print(f"| {kind} | {built - start:.1f} | {searched - built:.1f} | {recall:.3f} |", flush=True)


if __name__ == "__main__":
    main()
