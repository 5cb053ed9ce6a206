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
from .contract import CONFIDENCE, ConfidenceInterval, EvaluationConfig, IndexKind, Metrics, MetricsReport
from .data import EvalSet
from .encoding import encode_passages, encode_queries, load_encoder
from .evalset import judgments, load_eval_set, passage_text
from .metrics import metric_keys, paired_bootstrap_intervals, per_query_metrics
from .model_card import MODEL_CARD, update_model_card
from .search import NO_RESULT, search
from .storage import fetch_to_local, open_storage
from .tracking import EVALUATION_LOGS, write_evaluation_logs

logger = logging.getLogger(__name__)


def score_queries(
    model,
    eval_set: EvalSet,
    ks: Sequence[int],
    *,
    index: IndexKind = "exact",
    batch_size: int = 64,
    chunk_size: int = 16384,
) -> dict[str, np.ndarray]:
    """Every metric of one loaded model for every judged query of the evaluation set (in the
    order of its judgments: the same for every model, so two models' scores pair up)."""
    queries = encode_queries(model, [query["text"] for query in eval_set.queries], batch_size=batch_size)
    passages = encode_passages(
        model, [passage_text(passage) for passage in eval_set.corpus], batch_size=batch_size, chunk_size=chunk_size
    )
    _, positions = search(queries, passages, max(ks), index)
    doc_ids = [passage["id"] for passage in eval_set.corpus]
    rankings = {
        query["id"]: [doc_ids[p] for p in row if p != NO_RESULT] for query, row in zip(eval_set.queries, positions)
    }
    _, per_query = per_query_metrics(rankings, judgments(eval_set), ks)
    return per_query


def evaluate_model(model, eval_set: EvalSet, ks: Sequence[int], **options) -> Metrics:
    """Every metric of one loaded model, averaged over every judged query."""
    return mean_metrics(score_queries(model, eval_set, ks, **options))


def mean_metrics(per_query: dict[str, np.ndarray]) -> Metrics:
    return {key: float(values.mean()) for key, values in per_query.items()}


def metrics_report(
    finetuned: dict[str, np.ndarray],
    baseline: dict[str, np.ndarray] | None,
    eval_set: EvalSet,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> MetricsReport:
    """The means of the per-query scores; `baseline`, `delta` and its intervals are unset
    without a baseline."""
    means = mean_metrics(finetuned)
    baseline_means = delta = intervals = None
    if baseline is not None:
        baseline_means = mean_metrics(baseline)
        delta = {key: means[key] - baseline_means[key] for key in means}
        bounds = paired_bootstrap_intervals(finetuned, baseline, resamples=resamples, seed=seed, confidence=CONFIDENCE)
        intervals = {key: ConfidenceInterval(low=low, high=high) for key, (low, high) in bounds.items()}
    return MetricsReport(
        baseline=baseline_means,
        finetuned=means,
        delta=delta,
        delta_interval=intervals,
        queries=len(eval_set.queries),
        corpus=len(eval_set.corpus),
        bootstrap_resamples=resamples if baseline is not None else None,
    )


def format_table(report: MetricsReport, ks: Sequence[int]) -> str:
    columns = ["baseline", "finetuned", "delta"] if report.baseline is not None else ["finetuned"]
    interval_header = f"{CONFIDENCE:.0%} interval" if report.delta_interval is not None else ""
    lines = [
        f"{report.queries} queries, {report.corpus} passages",
        f"{'metric':<14}" + "".join(f"{name:>12}" for name in columns) + f"  {interval_header}".rstrip(),
    ]
    for key in metric_keys(ks):
        cells = "".join(
            f"{getattr(report, name)[key]:>+12.4f}" if name == "delta" else f"{getattr(report, name)[key]:>12.4f}"
            for name in columns
        )
        if report.delta_interval is not None:
            interval = report.delta_interval[key]
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
        logger.info(
            "evaluation set: %d queries, %d passages, %d judgments",
            len(eval_set.queries),
            len(eval_set.corpus),
            len(eval_set.qrels),
        )
        scores: dict[str, dict[str, np.ndarray]] = {}
        for role, uri in (("baseline", config.baseline), ("finetuned", config.model)):
            if uri is None:
                continue
            path = fetch_to_local(uri, Path(work) / role, config.storage)
            encoder = load_encoder(path, overrides, precision=config.precision)
            logger.info("evaluating %s model %s", role, uri)
            scores[role] = score_queries(
                encoder,
                eval_set,
                config.k_values,
                index=config.index,
                batch_size=config.batch_size,
                chunk_size=chunk_size,
            )
            del encoder
            gc.collect()  # one model in memory at a time
    return metrics_report(
        scores["finetuned"],
        scores.get("baseline"),
        eval_set,
        resamples=config.bootstrap_resamples,
        seed=config.seed,
    )


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
