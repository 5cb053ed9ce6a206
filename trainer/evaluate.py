"""`embedtune evaluate`: score a fine-tuned model (and its baseline) on an evaluation set.

Each model encodes the queries and, chunk by chunk, the corpus; faiss retrieves the top
max(k) passages of every query; the metrics average over every query of the set. The
result is a table on stdout and a metrics.json (`baseline`, `finetuned`, `delta`,
`queries`, `corpus`), optionally stored (s3:// or a path) and patched into an
EmbeddingFinetune's `status.metrics`.
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import EvalSet
from .encoding import EncodePrecision, encode_passages, encode_queries, load_encoder
from .evalset import judgments, load_eval_set, passage_text
from .metrics import metric_keys, retrieval_metrics
from .search import NO_RESULT, IndexKind, search
from .storage import fetch_to_local, open_storage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationOptions:
    ks: tuple[int, ...] = (1, 10, 100)
    index: IndexKind = "exact"
    batch_size: int = 64
    chunk_size: int = 16384
    precision: EncodePrecision = "auto"
    # ModelSpec fields (snake_case) given explicitly; they replace the models' own settings
    overrides: dict[str, Any] = field(default_factory=dict)


def evaluate_model(model, eval_set: EvalSet, options: EvaluationOptions) -> dict[str, float]:
    """Every metric of one loaded model on the evaluation set."""
    queries = encode_queries(model, [query["text"] for query in eval_set.queries], batch_size=options.batch_size)
    passages = encode_passages(
        model,
        [passage_text(passage) for passage in eval_set.corpus],
        batch_size=options.batch_size,
        chunk_size=options.chunk_size,
    )
    _, positions = search(queries, passages, max(options.ks), options.index)
    doc_ids = [passage["id"] for passage in eval_set.corpus]
    rankings = {
        query["id"]: [doc_ids[p] for p in row if p != NO_RESULT] for query, row in zip(eval_set.queries, positions)
    }
    return retrieval_metrics(rankings, judgments(eval_set), options.ks)


def metrics_report(finetuned: dict[str, float], baseline: dict[str, float] | None, eval_set: EvalSet) -> dict:
    """The metrics.json document; `baseline` and `delta` are null without a baseline."""
    delta = {key: finetuned[key] - baseline[key] for key in finetuned} if baseline is not None else None
    return {
        "baseline": baseline,
        "finetuned": finetuned,
        "delta": delta,
        "queries": len(eval_set.queries),
        "corpus": len(eval_set.corpus),
    }


def format_table(report: dict, ks: tuple[int, ...]) -> str:
    columns = ["baseline", "finetuned", "delta"] if report["baseline"] is not None else ["finetuned"]
    lines = [
        f"{report['queries']} queries, {report['corpus']} passages",
        f"{'metric':<14}" + "".join(f"{name:>12}" for name in columns),
    ]
    for key in metric_keys(ks):
        cells = "".join(
            f"{report[name][key]:>+12.4f}" if name == "delta" else f"{report[name][key]:>12.4f}" for name in columns
        )
        lines.append(f"{key:<14}{cells}")
    return "\n".join(lines)


def write_report(report: dict, output: str, *, endpoint: str | None = None, region: str | None = None) -> None:
    """Write metrics.json to a local path or an s3:// URI."""
    directory, _, name = output.rstrip("/").rpartition("/")
    open_storage(directory or ".", endpoint=endpoint, region=region).write_bytes(
        name, json.dumps(report, indent=2).encode()
    )


def patch_status_metrics(namespace: str, name: str, report: dict, *, api=None) -> None:
    """Put the report's baseline, fine-tuned and delta metrics into an EmbeddingFinetune's
    `status.metrics` (a merge patch of the status subresource)."""
    from .status import patch_resource_status

    metrics = {key: report[key] for key in ("baseline", "finetuned", "delta")}
    patch_resource_status(namespace, name, {"metrics": metrics}, api=api)


def run_evaluation(
    model: str,
    eval_set_uri: str,
    options: EvaluationOptions,
    *,
    baseline: str | None = None,
    endpoint: str | None = None,
    region: str | None = None,
) -> dict:
    """Load the evaluation set and the models (local paths, s3:// URIs or hub ids) and
    return the metrics report."""
    with tempfile.TemporaryDirectory(prefix="embedtune-eval-") as work:
        eval_set = load_eval_set(eval_set_uri, Path(work) / "eval", endpoint=endpoint, region=region)
        logger.info(
            "evaluation set: %d queries, %d passages, %d judgments",
            len(eval_set.queries),
            len(eval_set.corpus),
            len(eval_set.qrels),
        )
        scores: dict[str, dict[str, float]] = {}
        for role, uri in (("baseline", baseline), ("finetuned", model)):
            if uri is None:
                continue
            path = fetch_to_local(uri, Path(work) / role, endpoint=endpoint, region=region)
            encoder = load_encoder(path, options.overrides, precision=options.precision)
            logger.info("evaluating %s model %s", role, uri)
            scores[role] = evaluate_model(encoder, eval_set, options)
            del encoder
            gc.collect()  # one model in memory at a time
    return metrics_report(scores["finetuned"], scores.get("baseline"), eval_set)
