import numpy as np
import pytest

from embedtune.trainer.search import NO_RESULT, search


def _chunks(vectors, size, order=None):
    order = np.arange(len(vectors)) if order is None else order
    return [(order[i : i + size], vectors[order[i : i + size]]) for i in range(0, len(vectors), size)]


def test_exact_search_over_chunks_equals_brute_force():
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((40, 16)).astype(np.float32)
    shuffled = rng.permutation(len(corpus))  # chunks arrive in any corpus order
    scores, positions = search(queries, _chunks(corpus, 64, shuffled), k=10)
    expected = np.argsort(-(queries @ corpus.T), axis=1, kind="stable")[:, :10]
    assert (positions == expected).all()
    assert np.allclose(scores, np.take_along_axis(queries @ corpus.T, expected, axis=1), atol=1e-5)


def test_ties_are_ordered_by_corpus_position_and_short_corpora_pad():
    corpus = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], dtype=np.float32)
    queries = np.array([[1, 0]], dtype=np.float32)
    order = np.array([3, 1, 2, 0])  # equal scores arrive in reverse position order
    scores, positions = search(queries, _chunks(corpus, 2, order), k=6)
    assert positions.tolist() == [[0, 2, 3, 1, NO_RESULT, NO_RESULT]]
    assert scores[0, :4].tolist() == [1, 1, 1, 0] and np.isneginf(scores[0, 4:]).all()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_nearly_all_exact_neighbours(kind):
    rng = np.random.default_rng(1)
    corpus = rng.standard_normal((4000, 32)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[:200] + 0.05 * rng.standard_normal((200, 32)).astype(np.float32)
    _, exact = search(queries, _chunks(corpus, 1000), k=10)
    _, approximate = search(queries, _chunks(corpus, 1000), k=10, index=kind)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact)])
    assert recall > 0.9
