"""The evaluation program: score a fine-tuned model (and its baseline) on an evaluation set,
as an EvaluationConfig says (`python -m embedtune.trainer.evaluate --config FILE`, the
evaluation pod's command, or `embedtune evaluate`).

Each model encodes the queries and, chunk by chunk, the corpus; faiss retrieves the top
max(k) passages of every query; the metrics average over every query of the set. The
result is a table on stdout and a MetricsReport (metrics.json), optionally stored (s3:// or
a path) and patched into an EmbeddingFinetune's `status.metrics`.
"""

from __future__ import annotations

import gc
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .config import StorageAccess
from .contract import (
    CONFIDENCE,
    ConfidenceInterval,
    EvaluationConfig,
    HybridWeights,
    IndexKind,
    M3Mode,
    Metrics,
    MetricsReport,
    ModeMetrics,
    RetentionMetrics,
    dimension_mode,
)
from .data import EvalSet
from .encoding import encode_passages, encode_queries, has_m3_heads, load_encoder, load_m3_encoder, model_settings
from .evalset import judgments, load_eval_set, passage_text
from .metrics import metric_keys, paired_bootstrap_intervals, per_query_metrics
from .model_card import MODEL_CARD, update_model_card
from .search import NO_RESULT, search
from .storage import fetch_to_local, open_storage
from .tracking import EVALUATION_LOGS, write_evaluation_logs

logger = logging.getLogger(__name__)

PerQuery = dict[str, np.ndarray]  # "ndcg@10" -> the metric of every judged query


def score_queries(
    model,
    eval_set: EvalSet,
    ks: Sequence[int],
    *,
    index: IndexKind = "exact",
    batch_size: int = 64,
    chunk_size: int = 16384,
    dimensions: Sequence[int] = (),
    m3=None,
    modes: Sequence[M3Mode] = (),
    hybrid_weights: HybridWeights | None = None,
    rerank_depth: int = 100,
    padding_free: bool | None = None,
) -> dict[str, PerQuery]:
    """Every metric of one loaded model for every judged query of the evaluation set (in the
    order of its judgments: the same for every model, so two models' scores pair up), by
    scoring mode: "dense", each Matryoshka `dimensions` ("dense-DIM"), and with the model's
    BGEM3FlagModel `m3` each of `modes` (padding-free: see encoding.py)."""
    texts = [query["text"] for query in eval_set.queries]
    queries = encode_queries(model, texts, batch_size=batch_size, padding_free=padding_free)
    chunks = encode_passages(
        model,
        [passage_text(passage) for passage in eval_set.corpus],
        batch_size=batch_size,
        chunk_size=chunk_size,
        padding_free=padding_free,
    )
    if dimensions:  # searched once per dimension
        chunks = list(chunks)
    depth = max(max(ks), rerank_depth) if m3 is not None and modes else max(ks)
    scores, positions = search(queries, chunks, depth, index)
    results = {"dense": _metrics(positions[:, : max(ks)], eval_set, ks)}
    normalize = any(type(module).__name__ == "Normalize" for module in model)
    for dimension in dimensions:
        cut = ((p, _leading(vectors, dimension, normalize)) for p, vectors in chunks)
        _, found = search(_leading(queries, dimension, normalize), cut, max(ks), index)
        results[dimension_mode(dimension)] = _metrics(found, eval_set, ks)
    if m3 is not None and modes:
        weights = hybrid_weights or HybridWeights()
        rankings = m3_rankings(m3, eval_set, modes, scores, positions, max(ks), weights, batch_size=batch_size)
        results |= {mode: _metrics(found, eval_set, ks) for mode, found in rankings.items()}
    return results


def _leading(vectors: np.ndarray, dimension: int, normalize: bool) -> np.ndarray:
    """The first `dimension` values of each vector, re-normalized when the model normalizes."""
    cut = np.ascontiguousarray(vectors[:, :dimension])
    if normalize:
        cut /= np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)
    return cut


def _metrics(positions: np.ndarray, eval_set: EvalSet, ks: Sequence[int]) -> PerQuery:
    doc_ids = [passage["id"] for passage in eval_set.corpus]
    rankings = {
        query["id"]: [doc_ids[p] for p in row if p != NO_RESULT] for query, row in zip(eval_set.queries, positions)
    }
    _, per_query = per_query_metrics(rankings, judgments(eval_set), ks)
    return per_query


def m3_rankings(
    m3,
    eval_set: EvalSet,
    modes: Sequence[M3Mode],
    dense_scores: np.ndarray,
    dense_positions: np.ndarray,
    k: int,
    weights: HybridWeights,
    *,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Corpus positions of the top k of every query by each bge-m3 mode: sparse searches the whole
    corpus (exact, by token-weight overlap); colbert and hybrid re-rank the dense candidates."""
    passages = [passage_text(passage) for passage in eval_set.corpus]
    queries = m3.encode_queries(
        [query["text"] for query in eval_set.queries],
        batch_size=batch_size,
        return_dense=False,
        return_sparse=True,
        return_colbert_vecs=bool({"colbert", "hybrid"} & set(modes)),
    )
    corpus = m3.encode_corpus(passages, batch_size=batch_size, return_dense=False, return_sparse=True)
    width = 1 + max((int(t) for w in [*queries["lexical_weights"], *corpus["lexical_weights"]] for t in w), default=0)
    sparse = _lexical_matrix(queries["lexical_weights"], width) @ _lexical_matrix(corpus["lexical_weights"], width).T
    sparse = sparse.toarray()
    results = {}
    if "sparse" in modes:
        # a passage sharing no weighted token with the query is not retrieved
        results["sparse"] = _top(np.where(sparse > 0, sparse, -np.inf), k)
    if {"colbert", "hybrid"} & set(modes):
        candidates = np.where(dense_positions >= 0, dense_positions, 0)
        wanted = np.unique(dense_positions[dense_positions >= 0])
        vectors = dict(
            zip(
                wanted.tolist(),
                m3.encode_corpus(
                    [passages[p] for p in wanted], batch_size=batch_size, return_dense=False, return_colbert_vecs=True
                )["colbert_vecs"],
            )
        )
        colbert = np.array(
            [
                [float(m3.colbert_score(query, vectors[p])) if p in vectors else 0.0 for p in row]
                for query, row in zip(queries["colbert_vecs"], candidates.tolist())
            ]
        )
        missing = dense_positions < 0
        for mode, combined in (
            ("colbert", colbert),
            (
                "hybrid",
                weights.dense * dense_scores
                + weights.sparse * np.take_along_axis(sparse, candidates, axis=1)
                + weights.colbert * colbert,
            ),
        ):
            if mode in modes:
                results[mode] = _top(np.where(missing, -np.inf, combined), k, candidates)
    return results


def _lexical_matrix(weights: list[dict], width: int):
    """Token weights ({token id: weight} per text) as a sparse matrix, one row per text."""
    from scipy.sparse import csr_matrix

    rows = [i for i, w in enumerate(weights) for _ in w]
    columns = [int(t) for w in weights for t in w]
    values = [float(v) for w in weights for v in w.values()]
    return csr_matrix((values, (rows, columns)), shape=(len(weights), width), dtype=np.float32)


def _top(scores: np.ndarray, k: int, labels: np.ndarray | None = None) -> np.ndarray:
    """The labels (default: column indices) of the k best scores of every row, best first, ties
    by label; a -inf score is no result (NO_RESULT)."""
    labels = np.broadcast_to(np.arange(scores.shape[1]), scores.shape) if labels is None else labels
    order = np.lexsort((labels, -scores), axis=1)[:, :k]
    found = np.take_along_axis(labels, order, axis=1)
    return np.where(np.isfinite(np.take_along_axis(scores, order, axis=1)), found, NO_RESULT)


def evaluate_model(model, eval_set: EvalSet, ks: Sequence[int], **options) -> dict[str, Metrics]:
    """Every metric of one loaded model by scoring mode, averaged over every judged query."""
    return {mode: mean_metrics(per_query) for mode, per_query in score_queries(model, eval_set, ks, **options).items()}


def mean_metrics(per_query: PerQuery) -> Metrics:
    return {key: float(values.mean()) for key, values in per_query.items()}


def metrics_report(
    scores: dict[str, dict[str, PerQuery]],
    eval_set: EvalSet,
    retention: dict[str, Metrics] | None = None,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> MetricsReport:
    """The report of each model's per-query scores by role ("baseline", "finetuned", "merged")
    and mode: dense at the top level, the fine-tuned and baseline models' other modes in `modes`.
    Deltas are against the baseline, each with its paired-bootstrap interval; they are unset
    without a baseline (or for a mode the baseline was not scored in)."""
    baseline, finetuned, merged = scores.get("baseline") or {}, scores["finetuned"], scores.get("merged") or {}

    def compared(per_query: PerQuery | None, mode: str = "dense") -> tuple[Metrics | None, dict | None]:
        base = baseline.get(mode)
        if per_query is None or base is None:
            return None, None
        means, base_means = mean_metrics(per_query), mean_metrics(base)
        bounds = paired_bootstrap_intervals(per_query, base, resamples=resamples, seed=seed, confidence=CONFIDENCE)
        return (
            {key: means[key] - base_means[key] for key in means},
            {key: ConfidenceInterval(low=low, high=high) for key, (low, high) in bounds.items()},
        )

    def means(per_query: PerQuery | None) -> Metrics | None:
        return mean_metrics(per_query) if per_query is not None else None

    modes = {}
    for mode, per_query in finetuned.items():
        if mode != "dense":
            delta, interval = compared(per_query, mode)
            modes[mode] = ModeMetrics(
                baseline=means(baseline.get(mode)), finetuned=means(per_query), delta=delta, delta_interval=interval
            )
    delta, interval = compared(finetuned["dense"])
    merged_delta, merged_interval = compared(merged.get("dense"))
    return MetricsReport(
        baseline=means(baseline.get("dense")),
        finetuned=means(finetuned["dense"]),
        delta=delta,
        delta_interval=interval,
        modes=modes or None,
        merged=means(merged.get("dense")),
        merged_delta=merged_delta,
        merged_delta_interval=merged_interval,
        retention=RetentionMetrics.model_validate(retention) if retention else None,
        queries=len(eval_set.queries),
        corpus=len(eval_set.corpus),
        bootstrap_resamples=resamples if baseline else None,
    )


COLUMNS = ("baseline", "finetuned", "merged")


def _label(name: str) -> str:
    return "mergedDelta" if name == "merged_delta" else name


def format_table(report: MetricsReport, ks: Sequence[int]) -> str:
    sections = [("dense" if report.modes else "metric", report, (*COLUMNS, "delta", "merged_delta"))]
    sections += [(mode, scores, ("baseline", "finetuned", "delta")) for mode, scores in (report.modes or {}).items()]
    if report.retention is not None:
        sections.append(("retention", report.retention, COLUMNS))
    lines = [f"{report.queries} queries, {report.corpus} passages"]
    for title, scores, names in sections:
        columns = [name for name in names if getattr(scores, name) is not None]
        intervals = [name for name in ("delta", "merged_delta") if getattr(scores, f"{name}_interval", None)]
        header = f"{title:<14}" + "".join(f"{_label(name):>12}" for name in columns)
        lines.append(header + "".join(f"  {CONFIDENCE:.0%} interval ({_label(name)})" for name in intervals))
        for key in metric_keys(ks):
            cells = "".join(
                f"{getattr(scores, name)[key]:>+12.4f}" if "delta" in name else f"{getattr(scores, name)[key]:>12.4f}"
                for name in columns
            )
            for name in intervals:
                interval = getattr(scores, f"{name}_interval")[key]
                cells += f"  [{interval.low:+.4f}, {interval.high:+.4f}]"
            lines.append(f"{key:<14}{cells}")
    return "\n".join(lines)


def write_report(report: MetricsReport, output: str, access: StorageAccess) -> None:
    """Write metrics.json to a local path or an s3:// URI."""
    directory, _, name = output.rstrip("/").rpartition("/")
    open_storage(directory or ".", access).write_bytes(name, report.model_dump_json(indent=2, by_alias=True).encode())


def add_to_curves(report: MetricsReport, tensorboard: str, access: StorageAccess) -> None:
    """The metrics of both models as TensorBoard points in the run's curves folder."""
    with tempfile.TemporaryDirectory(prefix="embedtune-curves-") as folder:
        if write_evaluation_logs(report, Path(folder)):
            open_storage(tensorboard, access).upload_dir(Path(folder), EVALUATION_LOGS, desc="upload evaluation curves")


def run_evaluation(config: EvaluationConfig, *, chunk_size: int = 16384) -> MetricsReport:
    """Load the evaluation set and the models (local paths, s3:// URIs or hub ids) and
    return the metrics report."""
    overrides = config.encoding.model_dump(exclude_none=True)
    with tempfile.TemporaryDirectory(prefix="embedtune-eval-") as work:
        eval_set = load_eval_set(config.eval_set, Path(work) / "eval", config.storage)
        retention_set = (
            load_eval_set(config.retention_set, Path(work) / "retention", config.storage)
            if config.retention_set
            else None
        )
        for name, loaded in (("evaluation", eval_set), ("retention", retention_set)):
            if loaded is not None:
                logger.info(
                    "%s set: %d queries, %d passages, %d judgments",
                    name,
                    len(loaded.queries),
                    len(loaded.corpus),
                    len(loaded.qrels),
                )
        scores: dict[str, dict[str, PerQuery]] = {}
        retention: dict[str, Metrics] = {}
        for role, uri in (("baseline", config.baseline), ("finetuned", config.model), ("merged", config.merged)):
            if uri is None:
                continue
            path = fetch_to_local(uri, Path(work) / role, config.storage)
            encoder = load_encoder(path, overrides, precision=config.precision)
            m3 = None
            if config.modes and has_m3_heads(path):
                m3 = load_m3_encoder(path, model_settings(encoder, str(path)), precision=config.precision)
            elif config.modes:
                logger.warning(
                    "%s model %s has no sparse and ColBERT heads (colbert_linear.pt, sparse_linear.pt): "
                    "it is scored with its dense vector only",
                    role,
                    uri,
                )
            logger.info("evaluating %s model %s", role, uri)
            scores[role] = score_queries(
                encoder,
                eval_set,
                config.k_values,
                index=config.index,
                batch_size=config.batch_size,
                chunk_size=chunk_size,
                dimensions=config.dimensions,
                m3=m3,
                modes=config.modes,
                hybrid_weights=config.hybrid_weights,
                rerank_depth=config.rerank_depth,
            )
            if retention_set is not None:  # what general ability is kept: dense vectors only
                logger.info("evaluating %s model %s on the retention set", role, uri)
                retention[role] = evaluate_model(
                    encoder,
                    retention_set,
                    config.k_values,
                    index=config.index,
                    batch_size=config.batch_size,
                    chunk_size=chunk_size,
                )["dense"]
            del encoder, m3
            gc.collect()  # one model in memory at a time
    return metrics_report(scores, eval_set, retention or None, resamples=config.bootstrap_resamples, seed=config.seed)


def evaluate(config: EvaluationConfig) -> MetricsReport:
    """The evaluation program: metrics, their table, metrics.json, the resource's status."""
    report = run_evaluation(config)
    if config.print_table:
        print(format_table(report, config.k_values))
    if config.output:
        write_report(report, config.output, config.storage)
    if config.tensorboard:
        add_to_curves(report, config.tensorboard, config.storage)
    if config.run is not None and update_model_card(config.model, report, config.k_values, config.storage):
        logger.info("model card updated with the metrics: %s/%s", config.model.rstrip("/"), MODEL_CARD)
    if config.run is not None and config.run.report_status:
        from .status import patch_status_metrics

        patch_status_metrics(config.run, report.status())
    return report


if __name__ == "__main__":
    from .commands import evaluate_main

    sys.exit(evaluate_main())
