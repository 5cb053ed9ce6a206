"""Everything the operator and the job pods exchange, as typed models, in one place.

The operator (and `embedtune run`, which plays the operator's part on one machine) hands each
pod a config file; the pods report back through the resource's status subresource, files in
storage, and the container's termination message:

    operator -> training pods      TrainerConfig     (ConfigMap key trainer.yaml)
    operator -> evaluation pod     EvaluationConfig  (ConfigMap key evaluation.yaml)
    training pods -> status        TrainingProgress (status.training), CheckpointStatus (status.checkpoint)
    evaluation pod -> status       MetricsReport: metrics.json in storage, its `StatusMetrics` in status.metrics
    any pod -> operator            TerminationMessage (why it failed, and whether a retry can help)

The settings sections both sides share (model, data, training, checkpoint, storage) are the
resource's own, defined in `config.py`; a new setting added there reaches the trainer, the
evaluator and `embedtune run` with no other change. This module imports only pydantic, so the
operator image (no torch) reads it too.
"""

from __future__ import annotations

import json
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import Field, ValidationError, create_model, model_validator

from .config import (
    CamelModel,
    CheckpointSpec,
    DataSpec,
    MergeSpec,
    ModelSpec,
    StorageAccess,
    StorageSpec,
    TrainingSpec,
    model_training_problems,
    problems_from_validation_error,
)
from .errors import InputError, StorageUnavailable

# Where the resource lives in the Kubernetes API; the pods patch its status subresource.
GROUP = "embedtune.io"
VERSION = "v1alpha1"
PLURAL = "embeddingfinetunes"

# Config files as the operator mounts them into the pods (ConfigMap keys).
TRAINER_CONFIG_FILE = "trainer.yaml"
EVALUATION_CONFIG_FILE = "evaluation.yaml"

# Kubernetes names: a namespace or resource name is a DNS label, and storage keys are built
# from them, so nothing else may reach a path.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_LABEL_MAX_LENGTH = 63


class Program(StrEnum):
    """The programs the pods run, each as `python -m <module> --config FILE`."""

    TRAINER = "embedtune.trainer"
    EVALUATOR = "embedtune.trainer.evaluate"

    def arguments(self, config_file: str) -> list[str]:
        return ["-m", self.value, "--config", config_file]

    def command(self, config_file: str, *, python: str = "python") -> list[str]:
        return [python, *self.arguments(config_file)]


class RunIdentity(CamelModel):
    """Which run of which resource a pod works for, and whether it reports to the API."""

    namespace: str = Field("default", pattern=DNS_LABEL, max_length=DNS_LABEL_MAX_LENGTH)
    name: str = Field("local", pattern=DNS_LABEL, max_length=DNS_LABEL_MAX_LENGTH)
    run_id: str = Field("1", pattern=DNS_LABEL, max_length=DNS_LABEL_MAX_LENGTH)
    spec_fingerprint: str | None = Field(
        None, description="The resource spec this run trains; storage of a run with another spec is never reused."
    )
    report_status: bool = Field(
        False, description="Patch the EmbeddingFinetune's status (inside the cluster); `embedtune run` reads files."
    )


class TrainerConfig(CamelModel):
    """The training pods' config: the resource's settings and the run's identity."""

    model: ModelSpec
    data: DataSpec
    training: TrainingSpec = TrainingSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    merge: MergeSpec | None = None
    storage: StorageSpec
    run: RunIdentity = RunIdentity()
    work_dir: str = Field("/tmp/embedtune", description="Local scratch space for data, checkpoints and the model.")
    progress_interval_seconds: float = Field(5.0, gt=0, description="Minimum time between progress reports.")

    @model_validator(mode="after")
    def _sections_agree(self) -> TrainerConfig:
        if problems := model_training_problems(self.model, self.training):
            raise ValueError("; ".join(problems))
        return self


def all_optional(model: type[CamelModel], name: str, exclude: set[str]) -> type[CamelModel]:
    """`model`'s fields, each optional and unset by default: the settings given explicitly,
    or a status section that merge patches fill in part by part."""
    fields = {
        field_name: (info.annotation | None, Field(None, description=info.description))
        for field_name, info in model.model_fields.items()
        if field_name not in exclude
    }
    return create_model(name, __base__=CamelModel, __doc__=f"{model.__doc__} Each field optional.", **fields)


# How a model encodes text (ModelSpec without `base`). A field given here replaces the model's
# own setting: the evaluation encodes the base model exactly as the fine-tuned one was trained.
EncodingSettings = all_optional(ModelSpec, "EncodingSettings", exclude={"base", "lora"})

IndexKind = Literal["exact", "ivf", "hnsw"]
EncodePrecision = Literal["auto", "fp32", "fp16", "bf16"]
# How a bge-m3 model scores besides its dense vector: sparse token weights (exact search over
# the corpus), ColBERT token vectors and the weighted hybrid (both re-rank the dense top
# `rerankDepth`, as bge-m3 recommends)
M3Mode = Literal["sparse", "colbert", "hybrid"]


def dimension_mode(dimension: int) -> str:
    """The name of the dense vector cut to its leading `dimension` values (Matryoshka)."""
    return f"dense-{dimension}"


class HybridWeights(CamelModel):
    """Weights of the hybrid score; bge-m3's authors recommend 0.4 / 0.2 / 0.4."""

    dense: float = Field(0.4, ge=0)
    sparse: float = Field(0.2, ge=0)
    colbert: float = Field(0.4, ge=0)


class EvaluationConfig(CamelModel):
    """The evaluation pod's config: which models to score on which evaluation set, and where
    the result goes."""

    model: str = Field(description="The fine-tuned model: path, storage URI or model id.")
    baseline: str | None = Field(None, description="The model to compare with, e.g. the base model.")
    merged: str | None = Field(None, description="The fine-tuned model merged with others (spec.merge), if any.")
    eval_set: str = Field(description="Directory or storage prefix of queries.jsonl, corpus.jsonl, qrels.jsonl.")
    retention_set: str | None = Field(
        None, description="A second (general-domain) evaluation set every model is also scored on."
    )
    k_values: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 10, 100], min_length=1)
    encoding: EncodingSettings = Field(default_factory=EncodingSettings)  # type: ignore[valid-type]
    index: IndexKind = "exact"
    batch_size: int = Field(
        64,
        ge=1,
        description="Texts per forward pass when encoding with padding (padding-free passes are bounded by tokens).",
    )
    precision: EncodePrecision = Field("auto", description="auto: bf16 (or fp16) on a GPU, fp32 on CPU.")
    modes: list[M3Mode] = Field(
        default_factory=list, description="bge-m3 scoring modes evaluated besides dense (the model needs its heads)."
    )
    dimensions: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list, description="Also evaluate the dense vector cut to each of these leading dimensions."
    )
    hybrid_weights: HybridWeights = Field(default_factory=HybridWeights)
    rerank_depth: int = Field(100, ge=1, description="Dense candidates per query that colbert and hybrid re-rank.")
    output: str | None = Field(None, description="Where metrics.json is written: a path or storage URI.")
    tensorboard: str | None = Field(
        None, description="The run's TensorBoard folder (path or storage URI): the metrics are added to the curves."
    )
    storage: StorageAccess = Field(default_factory=StorageAccess)
    run: RunIdentity | None = Field(None, description="The resource whose status.metrics to patch, if any.")
    bootstrap_resamples: int = Field(
        1000, ge=100, le=100000, description="Resamples of the paired bootstrap behind each delta's interval."
    )
    seed: int = Field(0, description="Seeds the bootstrap: the same scores give the same intervals.")
    print_table: bool = Field(
        True, description="Print the metrics table (`embedtune run` prints it once, with the run's result)."
    )


Config = TypeVar("Config", TrainerConfig, EvaluationConfig)


def load_config(path: str | Path, model: type[Config]) -> Config:
    """Read a JSON or YAML config file; InputError lists every invalid field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    is_json = path.suffix == ".json"
    try:
        raw = json.loads(text) if is_json else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise InputError(f"{path}: not valid {'JSON' if is_json else 'YAML'}: {exc}") from exc
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise InputError(f"{path}: invalid {model.__name__}", problems_from_validation_error(exc, "config")) from exc


def dump_config(config: CamelModel) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


# --- what the pods report ---------------------------------------------------------------


class TrainingProgress(CamelModel):
    """status.training as the training pods report it (rank 0, every few seconds)."""

    step: int
    total_steps: int
    epoch: float
    loss: float | None = None
    learning_rate: float | None = Field(None, description="In progress.json and the logs, not in the status.")
    samples_per_second: float | None = None
    tokens_per_second: float | None = Field(
        None, description="Real (non-padding) tokens of queries and passages trained per second, all GPUs together."
    )
    padding_share: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Share of the token slots computed that were padding (0 when training runs padding-free): "
        "what the data's length mix costs.",
    )
    eta_seconds: float | None = None
    run_id: str | None = Field(None, description="The run reporting; the operator ignores a replaced run's reports.")

    def to_status(self) -> dict[str, Any]:
        """The status fields, rounded to what a reader can use; the learning rate stays in the logs."""
        status: dict[str, Any] = {"step": self.step, "totalSteps": self.total_steps, "epoch": round(self.epoch, 3)}
        if self.loss is not None:
            status["loss"] = significant(self.loss)
        if self.samples_per_second is not None:
            status["samplesPerSecond"] = round(self.samples_per_second, 2)
        if self.tokens_per_second is not None:
            status["tokensPerSecond"] = round(self.tokens_per_second)
        if self.padding_share is not None:
            status["paddingShare"] = round(self.padding_share, 3)
        if self.eta_seconds is not None:
            status["etaSeconds"] = int(self.eta_seconds)
        if self.run_id is not None:
            status["runId"] = self.run_id
        return status

    @classmethod
    def status_keys(cls) -> tuple[str, ...]:
        """The status.training keys the pods own (cleared when a new run starts)."""
        return tuple(info.alias for name, info in cls.model_fields.items() if name != "learning_rate")


class CheckpointStatus(CamelModel):
    """status.checkpoint: the newest checkpoint that is completely stored."""

    step: int
    uri: str
    run_id: str | None = None


class ProgressFile(CamelModel):
    """The training pod's progress.json: its latest progress and stored checkpoint, which
    `embedtune run` reads where a cluster would read the status."""

    training: TrainingProgress | None = None
    checkpoint: CheckpointStatus | None = None


Metrics = dict[str, float]  # "ndcg@10" -> value

# Digits of a number in the status, where people read it: a mean over a thousand queries is
# uncertain in its second or third digit, so more digits (or 0.5922000000000001) are noise.
STATUS_DIGITS = 4


def significant(value: float, digits: int = STATUS_DIGITS) -> float:
    """`value` rounded to `digits` significant digits: 0.5922000000000001 -> 0.5922."""
    return float(f"{value:.{digits}g}")


def _rounded(value: Any) -> Any:
    """Every float in `value` (nested dicts and lists) to STATUS_DIGITS significant digits."""
    if isinstance(value, float):
        return significant(value)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


# Of the interval around each delta.
CONFIDENCE = 0.95


class ConfidenceInterval(CamelModel):
    """Where the true gain lies with 95% confidence, by a paired bootstrap over the queries."""

    low: float
    high: float


Intervals = dict[str, ConfidenceInterval]


class ModeMetrics(CamelModel):
    """Each model's metric@k in one scoring mode, fine-tuned minus baseline, and how sure that gain is."""

    baseline: Metrics | None = None
    finetuned: Metrics
    delta: Metrics | None = None
    delta_interval: Intervals | None = Field(
        None,
        description="95% confidence interval of each delta: a paired bootstrap over the evaluation queries. "
        "A low above 0 means the gain is not luck of the query sample.",
    )


class RetentionMetrics(CamelModel):
    """Each model's metric@k on the retention set: what fine-tuning and merging kept."""

    baseline: Metrics | None = None
    finetuned: Metrics
    merged: Metrics | None = None


class StatusMetrics(ModeMetrics):
    """status.metrics: each model's metric@k with its dense vector, and in `modes` with every
    other way it was scored (sparse, colbert, hybrid; dense-DIM for Matryoshka dimensions); the
    merged model's and its delta where a merge ran; the retention set's scores."""

    modes: dict[str, ModeMetrics] | None = None
    merged: Metrics | None = None
    merged_delta: Metrics | None = None
    merged_delta_interval: Intervals | None = Field(None, description="95% confidence interval of each mergedDelta.")
    retention: RetentionMetrics | None = None


class MetricsReport(StatusMetrics):
    """metrics.json, written next to the model by the evaluation, with exact values."""

    queries: int
    corpus: int
    bootstrap_resamples: int | None = Field(None, description="Resamples behind the delta intervals.")

    def status(self) -> StatusMetrics:
        """status.metrics: the same numbers, to STATUS_DIGITS significant digits (the quality
        gate compares the delta as the status shows it)."""
        return StatusMetrics.model_validate(_rounded(self.model_dump(include=set(StatusMetrics.model_fields))))


class FailureClass(StrEnum):
    """Whether a new attempt can help."""

    INPUT = "Input"  # the user's data, settings or model: fix them; a retry cannot help
    INFRASTRUCTURE = "Infrastructure"  # anything else: a new attempt resumes from the last checkpoint
    STOPPED = "Stopped"  # stopped on a signal after storing a checkpoint: resume it


# Kubernetes keeps at most 4 KiB of a termination message.
TERMINATION_MESSAGE_LIMIT = 4000


class TerminationMessage(CamelModel):
    """What a pod writes to its termination message when it ends without success."""

    reason: str
    message: str
    failure: FailureClass | None = Field(None, description="Unset: the exit code decides (2 is the user's input).")
    problems: list[str] = Field(default_factory=list)

    @classmethod
    def of_input_error(cls, error: InputError) -> TerminationMessage:
        return cls(reason=error.reason, failure=FailureClass.INPUT, message=error.summary, problems=error.problems)

    @classmethod
    def of_storage_unavailable(cls, error: StorageUnavailable) -> TerminationMessage:
        return cls(reason="StorageUnavailable", failure=FailureClass.INFRASTRUCTURE, message=str(error))

    def write(self) -> None:
        """Best effort: the file exists only inside a Kubernetes container (or where
        EMBEDTUNE_TERMINATION_LOG names one, as `embedtune run` does)."""
        path = Path(os.environ.get("EMBEDTUNE_TERMINATION_LOG", "/dev/termination-log"))
        if not path.parent.is_dir() or not (path.exists() or "EMBEDTUNE_TERMINATION_LOG" in os.environ):
            return
        document = self
        while len(text := document.model_dump_json(by_alias=True)) > TERMINATION_MESSAGE_LIMIT:
            if document.problems:  # drop problems from the end until it fits
                document = document.model_copy(update={"problems": document.problems[: len(document.problems) // 2]})
            else:
                document = document.model_copy(update={"message": document.message[: TERMINATION_MESSAGE_LIMIT // 2]})
        try:
            path.write_text(text, encoding="utf-8")
        except OSError:
            pass

    @classmethod
    def parse(cls, text: str) -> TerminationMessage | None:
        """The pod's report; None for anything else (a crash leaves its log tail there)."""
        try:
            return cls.model_validate_json(text)
        except ValueError:
            return None

    def describe(self) -> str:
        return "\n".join([self.message, *self.problems])
