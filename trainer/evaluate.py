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

from .config import StorageAccess
from .contract import EvaluationConfig, IndexKind, Metrics, MetricsReport, RetentionMetrics
from .data import EvalSet
from .encoding import encode_passages, encode_queries, load_encoder
from .evalset import judgments, load_eval_set, passage_text
from .metrics import metric_keys, retrieval_metrics
from .search import NO_RESULT, search
from .storage import fetch_to_local, open_storage

logger = logging.getLogger(__name__)


def evaluate_model(
    model,
    eval_set: EvalSet,
    ks: Sequence[int],
    *,
    index: IndexKind = "exact",
    batch_size: int = 64,
    chunk_size: int = 16384,
) -> Metrics:
    """Every metric of one loaded model on the evaluation set."""
    queries = encode_queries(model, [query["text"] for query in eval_set.queries], batch_size=batch_size)
    passages = encode_passages(
        model, [passage_text(passage) for passage in eval_set.corpus], batch_size=batch_size, chunk_size=chunk_size
    )
    _, positions = search(queries, passages, max(ks), index)
    doc_ids = [passage["id"] for passage in eval_set.corpus]
    rankings = {
        query["id"]: [doc_ids[p] for p in row if p != NO_RESULT] for query, row in zip(eval_set.queries, positions)
    }
    return retrieval_metrics(rankings, judgments(eval_set), ks)


def metrics_report(scores: dict[str, Metrics], eval_set: EvalSet, retention: dict[str, Metrics] | None = None):
    """The report of each model's scores ("baseline", "finetuned", "merged"); the deltas are
    against the baseline, unset without one."""
    baseline, finetuned, merged = scores.get("baseline"), scores["finetuned"], scores.get("merged")

    def minus_baseline(metrics: Metrics | None) -> Metrics | None:
        return {key: metrics[key] - baseline[key] for key in metrics} if baseline and metrics else None

    return MetricsReport(
        baseline=baseline,
        finetuned=finetuned,
        delta=minus_baseline(finetuned),
        merged=merged,
        merged_delta=minus_baseline(merged),
        retention=RetentionMetrics.model_validate(retention) if retention else None,
        queries=len(eval_set.queries),
        corpus=len(eval_set.corpus),
    )


COLUMNS = ("baseline", "finetuned", "merged")


def format_table(report: MetricsReport, ks: Sequence[int]) -> str:
    sections = [("", report, ("delta", "merged_delta"))]
    if report.retention is not None:
        sections.append(("retention ", report.retention, ()))
    lines = [f"{report.queries} queries, {report.corpus} passages"]
    for title, scores, deltas in sections:
        columns = [name for name in (*COLUMNS, *deltas) if getattr(scores, name) is not None]
        header = [name.replace("merged_delta", "mergedDelta") for name in columns]
        lines.append(f"{title + 'metric':<20}" + "".join(f"{name:>12}" for name in header))
        for key in metric_keys(ks):
            cells = "".join(
                f"{getattr(scores, name)[key]:>+12.4f}" if "delta" in name else f"{getattr(scores, name)[key]:>12.4f}"
                for name in columns
            )
            lines.append(f"{key:<20}{cells}")
    return "\n".join(lines)


def write_report(report: MetricsReport, output: str, access: StorageAccess) -> None:
    """Write metrics.json to a local path or an s3:// URI."""
    directory, _, name = output.rstrip("/").rpartition("/")
    open_storage(directory or ".", access).write_bytes(name, report.model_dump_json(indent=2, by_alias=True).encode())


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
        scores: dict[str, Metrics] = {}
        retention: dict[str, Metrics] = {}
        for role, uri in (("baseline", config.baseline), ("finetuned", config.model), ("merged", config.merged)):
            if uri is None:
                continue
            path = fetch_to_local(uri, Path(work) / role, config.storage)
            encoder = load_encoder(path, overrides, precision=config.precision)
            for loaded, results in ((eval_set, scores), (retention_set, retention)):
                if loaded is None:
                    continue
                logger.info(
                    "evaluating %s model %s%s", role, uri, " on the retention set" if results is retention else ""
                )
                results[role] = evaluate_model(
                    encoder,
                    loaded,
                    config.k_values,
                    index=config.index,
                    batch_size=config.batch_size,
                    chunk_size=chunk_size,
                )
            del encoder
            gc.collect()  # one model in memory at a time
    return metrics_report(scores, eval_set, retention or None)


def evaluate(config: EvaluationConfig) -> MetricsReport:
    """The evaluation program: metrics, their table, metrics.json, the resource's status."""
    report = run_evaluation(config)
    print(format_table(report, config.k_values))
    if config.output:
        write_report(report, config.output, config.storage)
    if config.run is not None and config.run.report_status:
        from .status import patch_status_metrics

        patch_status_metrics(config.run, report.status())
    return report


if __name__ == "__main__":
    from .commands import evaluate_main

    sys.exit(evaluate_main())
