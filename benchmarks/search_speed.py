"""Search time for 10k queries over 100k x 384 vectors: exact (embedtune's default,
chunked) vs the approximate indexes, with the approximate indexes' recall@10 against exact.

The vectors are clustered like real sentence embeddings (uniform random vectors in 384
dimensions have no neighbourhood structure, the worst case for any approximate index):
1000 unit-norm centres, each vector a centre plus noise (`--noise`: its norm relative to
the centre's; more noise, less structure, lower approximate recall), normalized. Queries are drawn the
same way. Run: python benchmarks/search_speed.py [--passages 100000 --queries 10000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from embedtune.trainer.search import build_approximate_index, search


def clustered(count: int, centres: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    vectors = centres[rng.integers(len(centres), size=count)] + noise * rng.standard_normal(
        (count, centres.shape[1])).astype(np.float32) / np.sqrt(centres.shape[1])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--noise", type=float, default=0.6, help="noise norm relative to the cluster centres")
    parser.add_argument("--chunk", type=int, default=16384, help="exact search: passages per chunk")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    corpus = clustered(args.passages, centres, args.noise, rng).astype(np.float32)
    queries = clustered(args.queries, centres, args.noise, rng).astype(np.float32)
    chunks = [(np.arange(s, min(s + args.chunk, len(corpus))), corpus[s:s + args.chunk])
              for s in range(0, len(corpus), args.chunk)]

    print(f"{args.queries} queries x {args.passages} passages x {args.dim} dims, noise {args.noise}, k=10")
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
