"""The exported model's README.md: a model card as the Hugging Face Hub and
sentence-transformers users know them (YAML front matter, then what the model is, how good it
is, how it was made, how to load it).

Written at export, when it says the model is not evaluated yet, and again when the evaluation
finishes, with its metrics. Everything it says comes from the model's `embedtune.json` (the
settings, the data files and record count, the run) and the evaluation's MetricsReport; it
never quotes the training data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .contract import CONFIDENCE, MetricsReport
from .metrics import metric_keys

MODEL_CARD = "README.md"

# The training settings a reader compares runs by, in display order (TrainingSpec aliases).
_SETTINGS = (
    "epochs",
    "maxSteps",
    "learningRate",
    "warmupRatio",
    "batchSizePerDevice",
    "gradientAccumulationSteps",
    "groupSize",
    "temperature",
    "negativesCrossDevice",
    "precision",
    "matryoshkaDims",
    "seed",
)


def render_model_card(record: dict[str, Any], report: MetricsReport | None, ks: Sequence[int] | None = None) -> str:
    """The card of an exported model; `record` is its embedtune.json."""
    model, training = record["model"], record.get("training", {})
    base = model["base"]
    run = training.get("run", {})
    resource = f"{run.get('namespace', 'default')}/{run.get('name', 'local')}"
    title = f"{run.get('name', 'embedding model')}: {base.rsplit('/', 1)[-1]} fine-tuned for retrieval"
    lines = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: sentence-similarity",
        f"base_model: {base}",
        "tags: [sentence-transformers, feature-extraction, sentence-similarity, embedtune]",
        "---",
        "",
        f"# {title}",
        "",
        f"`{base}` fine-tuned with embedtune (contrastive InfoNCE "
        f"training with FlagEmbedding) by the EmbeddingFinetune `{resource}`, run `{run.get('runId', '?')}`.",
        "",
        "## Evaluation",
        "",
        *_evaluation(report, ks),
        "",
        "## Training",
        "",
        *_training(model, training),
        "",
        "## Usage",
        "",
        *_usage(model),
    ]
    return "\n".join(lines) + "\n"


def _evaluation(report: MetricsReport | None, ks: Sequence[int] | None) -> list[str]:
    if report is None:
        return ["Not evaluated yet: the evaluation rewrites this card with its metrics."]
    keys = [key for key in metric_keys(ks) if key in report.finetuned] if ks else list(report.finetuned)
    if report.baseline is None:
        rows = ["| metric | fine-tuned |", "|---|---|"]
        rows += [f"| {key} | {report.finetuned[key]:.4f} |" for key in keys]
    else:
        header = f"| metric | base model | fine-tuned | delta | {CONFIDENCE:.0%} interval of the delta |"
        rows = [header, "|---|---|---|---|---|"]
        for key in keys:
            interval = report.delta_interval[key] if report.delta_interval else None
            bounds = f"[{interval.low:+.4f}, {interval.high:+.4f}]" if interval else ""
            rows.append(
                f"| {key} | {report.baseline[key]:.4f} | {report.finetuned[key]:.4f} | {report.delta[key]:+.4f} "
                f"| {bounds} |"
            )
    note = f"On {report.queries} evaluation queries searched among {report.corpus} passages (exact search)."
    if report.bootstrap_resamples:
        note += (
            f" The interval is a paired bootstrap over the queries ({report.bootstrap_resamples} resamples): "
            "a low end above 0 means the gain is not luck of the query sample."
        )
    return [*rows, "", note]


def _training(model: dict[str, Any], training: dict[str, Any]) -> list[str]:
    data = training.get("data", {})
    sources = data.get("train") or [data.get("huggingFace", {}).get("path", "?")]
    records = training.get("trainRecords")
    lines = [
        f"- Data: {', '.join(f'`{source}`' for source in sources)}"
        + (f", {records} training records" if records is not None else ""),
    ]
    if data.get("heldOutFraction"):
        lines.append(f"- Held out for evaluation: {data['heldOutFraction']:.0%} of the queries")
    if data.get("hardNegatives", {}).get("mine"):
        lines.append(f"- Hard negatives mined with the base model: ranks {data['hardNegatives'].get('range')}")
    settings = training.get("settings", {})
    shown = ", ".join(f"{key} {settings[key]}" for key in _SETTINGS if settings.get(key) not in (None, []))
    lines.append(f"- Settings: {shown}")
    if training.get("step") is not None:
        loss = training.get("finalLoss")
        lines.append(f"- Trained {training['step']} steps" + (f", final loss {loss:.4f}" if loss is not None else ""))
    lines.append(
        f"- Encoding: {model.get('pooling', 'cls')} pooling, "
        f"{'normalized' if model.get('normalize', True) else 'not normalized'}, queries up to "
        f"{model.get('queryMaxLength')} tokens, passages up to {model.get('passageMaxLength')}"
        + (f", query instruction `{model['queryInstruction']}`" if model.get("queryInstruction") else "")
        + (f", passage instruction `{model['passageInstruction']}`" if model.get("passageInstruction") else "")
    )
    return lines


def _usage(model: dict[str, Any]) -> list[str]:
    pooling = "last_token" if model.get("pooling") == "lastToken" else model.get("pooling", "cls")
    flag_options = [f'pooling_method="{pooling}"', f"normalize_embeddings={bool(model.get('normalize', True))}"]
    if model.get("queryInstruction"):
        flag_options.append(f"query_instruction_for_retrieval={model['queryInstruction']!r}")
    return [
        "With sentence-transformers (pooling, normalization and instructions are in this folder):",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        'model = SentenceTransformer("path/to/this/folder")',
        'queries = model.encode_query(["what is a reverse dictionary?"])',
        'passages = model.encode_document(["a dictionary ordered by meaning"])',
        "scores = model.similarity(queries, passages)",
        "```",
        "",
        "With FlagEmbedding:",
        "",
        "```python",
        "from FlagEmbedding import FlagModel",
        "",
        f'model = FlagModel("path/to/this/folder", {", ".join(flag_options)})',
        'queries = model.encode_queries(["what is a reverse dictionary?"])',
        'passages = model.encode_corpus(["a dictionary ordered by meaning"])',
        "scores = queries @ passages.T",
        "```",
    ]


def update_model_card(model_uri: str, report: MetricsReport, ks: Sequence[int], access) -> bool:
    """Rewrite the card of a model stored by a run with the evaluation's metrics (and its entry
    in the folder's completion marker); False when `model_uri` is no such model (a hub id, a
    folder embedtune did not export)."""
    import json

    from .checkpoints import replace_published_file
    from .export import TRAINING_RECORD
    from .layout import COMPLETE_MARKER
    from .storage import open_storage

    if "://" not in model_uri and not model_uri.startswith("/"):
        return False  # a hub id
    storage = open_storage(model_uri, access)
    record = storage.read_bytes(TRAINING_RECORD)
    if record is None or not storage.exists(COMPLETE_MARKER):
        return False
    card = render_model_card(json.loads(record), report, ks)
    replace_published_file(storage, "", MODEL_CARD, card.encode())
    return True
