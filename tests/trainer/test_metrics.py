import math
import random

import numpy as np
import pytest

from embedtune.trainer.metrics import metric_keys, paired_bootstrap_intervals, per_query_metrics, retrieval_metrics


def _dcg(*gains):
    return sum(gain / math.log2(rank + 1) for rank, gain in enumerate(gains, start=1))


QRELS = {
    "binary": {"a": 1, "b": 1},
    "graded": {"a": 2, "b": 1, "c": 0},  # c judged not relevant
    "missed": {"z": 1},
    "absent": {"a": 1},  # retrieved nothing at all
}
RANKINGS = {
    "binary": ["x", "a", "y", "b"],
    "graded": ["b", "a"],  # fewer results than k
    "missed": ["a", "b", "c"],
}
# Hand-computed: query -> k -> (ndcg, recall, mrr, map, precision)
EXPECTED = {
    "binary": {
        1: (0, 0, 0, 0, 0),
        2: (_dcg(0, 1) / _dcg(1, 1), 1 / 2, 1 / 2, (1 / 2) / 2, 1 / 2),
        4: (_dcg(0, 1, 0, 1) / _dcg(1, 1), 1, 1 / 2, (1 / 2 + 2 / 4) / 2, 2 / 4),
    },
    "graded": {
        1: (1 / 2, 1 / 2, 1, 1 / 2, 1),
        2: (_dcg(1, 2) / _dcg(2, 1), 1, 1, (1 + 1) / 2, 1),
        4: (_dcg(1, 2) / _dcg(2, 1), 1, 1, (1 + 1) / 2, 2 / 4),
    },
    "missed": {k: (0, 0, 0, 0, 0) for k in (1, 2, 4)},
    "absent": {k: (0, 0, 0, 0, 0) for k in (1, 2, 4)},
}


def test_hand_computed_values_per_query():
    queries, values = per_query_metrics(RANKINGS, QRELS, [1, 2, 4])
    assert queries == list(QRELS)
    for row, qid in enumerate(queries):
        for k, expected in EXPECTED[qid].items():
            got = tuple(values[f"{name}@{k}"][row] for name in ("ndcg", "recall", "mrr", "map", "precision"))
            assert got == pytest.approx(expected, abs=1e-12), (qid, k)


def test_mean_counts_every_query_including_those_without_results():
    means = retrieval_metrics(RANKINGS, QRELS, [1, 2, 4])
    assert list(means) == metric_keys([1, 2, 4])
    assert means["ndcg@4"] == pytest.approx((_dcg(0, 1, 0, 1) / _dcg(1, 1) + _dcg(1, 2) / _dcg(2, 1)) / 4)
    assert means["mrr@4"] == pytest.approx((1 / 2 + 1) / 4)  # not / 2 (the queries that found something)
    assert means["recall@1"] == pytest.approx((1 / 2) / 4)


def test_ideal_ranking_scores_one():
    qrels = {"q": {"a": 3, "b": 2, "c": 1}}
    assert retrieval_metrics({"q": ["a", "b", "c"]}, qrels, [3])["ndcg@3"] == pytest.approx(1)
    swapped = retrieval_metrics({"q": ["b", "a", "c"]}, qrels, [3])["ndcg@3"]
    assert swapped == pytest.approx(_dcg(2, 3, 1) / _dcg(3, 2, 1))


def test_no_queries_is_an_error():
    with pytest.raises(ValueError, match="no judged queries"):
        retrieval_metrics({}, {}, [10])


def test_randomized_cross_check_against_pytrec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = random.Random(7)
    ks = [1, 3, 5, 10, 20]
    docs = [f"d{i}" for i in range(60)]
    qrels, rankings = {}, {}
    for q in range(300):
        qid = f"q{q}"
        judged = rng.sample(docs, rng.randint(1, 12))
        qrels[qid] = {d: rng.choice([0, 1, 1, 2, 3]) for d in judged}
        qrels[qid][judged[0]] = rng.randint(1, 3)  # at least one relevant passage
        if rng.random() < 0.9:  # some queries retrieve nothing
            rankings[qid] = rng.sample(docs, rng.randint(0, 25))
    queries, ours = per_query_metrics(rankings, qrels, ks)

    def run_of(depth):
        # strictly decreasing scores, so trec_eval keeps our order (it breaks ties by docid)
        return {
            qid: {d: float(-rank) for rank, d in enumerate(ranked[:depth])}
            for qid, ranked in rankings.items()
            if ranked
        }

    cut = ",".join(map(str, ks))
    full = pytrec_eval.RelevanceEvaluator(
        qrels, {f"ndcg_cut.{cut}", f"recall.{cut}", f"P.{cut}", f"map_cut.{cut}"}
    ).evaluate(run_of(max(ks)))
    compared = 0
    for k in ks:
        reciprocal = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run_of(k))
        for row, qid in enumerate(queries):
            theirs = full.get(qid)  # trec_eval skips queries without results: they score 0
            expected = {
                f"ndcg@{k}": theirs[f"ndcg_cut_{k}"] if theirs else 0.0,
                f"recall@{k}": theirs[f"recall_{k}"] if theirs else 0.0,
                f"precision@{k}": theirs[f"P_{k}"] if theirs else 0.0,
                f"map@{k}": theirs[f"map_cut_{k}"] if theirs else 0.0,
                f"mrr@{k}": reciprocal[qid]["recip_rank"] if qid in reciprocal else 0.0,
            }
            for key, value in expected.items():
                assert ours[key][row] == pytest.approx(value, abs=1e-6), (qid, key)
                compared += 1
    assert compared == len(queries) * len(ks) * 5


def test_a_constant_gain_has_an_interval_of_exactly_that_gain_however_hard_the_queries():
    # the queries differ wildly in difficulty, but the fine-tuned model gains 0.1 on each: a
    # paired bootstrap is sure of the gain (an unpaired one would see the difficulty's spread)
    rng = np.random.default_rng(1)
    baseline = {"ndcg@10": rng.uniform(0, 0.9, size=200)}
    finetuned = {"ndcg@10": baseline["ndcg@10"] + 0.1}
    (low, high) = paired_bootstrap_intervals(finetuned, baseline)["ndcg@10"]
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)


def test_the_interval_of_a_coin_flip_gain_matches_the_normal_approximation():
    # 400 queries, the fine-tuned model wins 1 on half of them and nothing on the rest: the mean
    # gain is 0.5 with a standard error of sqrt(0.25 / 400) = 0.025, so the 95% interval is
    # 0.5 -+ 1.96 * 0.025 = [0.451, 0.549]
    gains = np.array([1.0, 0.0] * 200)
    intervals = paired_bootstrap_intervals({"mrr@10": gains}, {"mrr@10": np.zeros(400)}, resamples=4000, seed=7)
    low, high = intervals["mrr@10"]
    assert low == pytest.approx(0.451, abs=0.01) and high == pytest.approx(0.549, abs=0.01)


def test_the_bootstrap_is_seeded_and_covers_every_metric():
    rng = np.random.default_rng(3)
    baseline = {key: rng.uniform(size=50) for key in ("ndcg@1", "recall@1")}
    finetuned = {key: values + rng.normal(0.05, 0.1, size=50) for key, values in baseline.items()}
    first = paired_bootstrap_intervals(finetuned, baseline, seed=5)
    assert first == paired_bootstrap_intervals(finetuned, baseline, seed=5)
    assert first != paired_bootstrap_intervals(finetuned, baseline, seed=6)
    for key, (low, high) in first.items():
        assert low < (finetuned[key] - baseline[key]).mean() < high
