"""An independent computation of retrieval metrics: plain numpy ranking over
sentence-transformers embeddings, scored by pytrec_eval (trec_eval)."""

from __future__ import annotations

import numpy as np


def reference_metrics(query_vectors: np.ndarray, passage_vectors: np.ndarray, eval_set, ks) -> dict[str, float]:
    import pytrec_eval

    scores = query_vectors @ passage_vectors.T
    doc_ids = [p["id"] for p in eval_set.corpus]
    qrels: dict[str, dict[str, int]] = {q["id"]: {} for q in eval_set.queries}
    for row in eval_set.qrels:
        qrels[row["qid"]][row["docid"]] = row["relevance"]
    out = {}
    for k in ks:
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        # strictly decreasing scores keep this order inside trec_eval (which breaks ties by docid)
        run = {
            q["id"]: {doc_ids[j]: float(-rank) for rank, j in enumerate(row)} for q, row in zip(eval_set.queries, top)
        }
        cut = str(k)
        measures = {f"ndcg_cut.{cut}", f"recall.{cut}", f"P.{cut}", f"map_cut.{cut}", "recip_rank"}
        results = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
        for ours, theirs in (
            ("ndcg", f"ndcg_cut_{k}"),
            ("recall", f"recall_{k}"),
            ("mrr", "recip_rank"),
            ("map", f"map_cut_{k}"),
            ("precision", f"P_{k}"),
        ):
            out[f"{ours}@{k}"] = float(np.mean([results[q["id"]][theirs] for q in eval_set.queries]))
    return out
