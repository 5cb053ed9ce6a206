"""The EmbeddingFinetune spec: the trainer's own sections plus what only a cluster needs.

model, data, training, checkpoint and storage are the trainer config's classes, so the
resource and the trainer cannot drift apart. resources, evaluation and runPolicy exist only
here. `parse_finetune` validates a manifest completely and lists every problem with the
field path a user edits, including the rules the CRD schema cannot express.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError

from embedtune.trainer.config import (
    CamelModel,
    CheckpointSpec,
    DataSpec,
    MergeSpec,
    ModelSpec,
    StorageSpec,
    TrainingSpec,
    model_training_problems,
    problems_from_validation_error,
)
from embedtune.trainer.contract import DNS_LABEL, DNS_LABEL_MAX_LENGTH, HybridWeights, dimension_mode
from embedtune.trainer.errors import InputError

from .constants import API_VERSION, KIND, MAX_NAME_LENGTH

_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
_GATE_METRIC = re.compile(r"^(ndcg|recall|mrr|map|precision)@([0-9]+)$")
_DNS_LABEL = re.compile(DNS_LABEL)


class FinetuneDataSpec(DataSpec):
    """Training pairs (FlagEmbedding JSONL or a Hugging Face dataset), the evaluation set, and mining."""

    eval: str | None = Field(
        None,
        description="Storage URI of an evaluation set (queries.jsonl, corpus.jsonl, qrels.jsonl); "
        "alternative to heldOutFraction.",
    )

    def for_trainer(self) -> DataSpec:
        """The trainer reads only the training sources; the evaluation job gets `eval`."""
        return DataSpec.model_validate(self.model_dump(exclude={"eval"}))


class Toleration(CamelModel):
    """A Kubernetes toleration of the training pods."""

    key: str | None = Field(None, description="Taint key; empty with operator Exists tolerates every taint.")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Equal (the default) compares value.")
    value: str | None = Field(None, description="Taint value, for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; every effect when empty."
    )
    toleration_seconds: int | None = Field(None, description="How long a NoExecute taint is tolerated.")


class ResourcesSpec(CamelModel):
    """The training pods: how many, their GPUs, image and placement."""

    nodes: int = Field(1, ge=1, le=1024, description="Training pods (torchrun nodes), one Job completion index each.")
    gpus_per_node: int = Field(
        1,
        ge=0,
        le=64,
        description="nvidia.com/gpu per pod; torchrun's --nproc-per-node. 0 trains on CPU, one process per pod.",
    )
    image: str | None = Field(None, description="Trainer image; the operator's default when unset.")
    cpu: str | None = Field(None, pattern=_QUANTITY, description="CPU request and limit per pod, e.g. '16'.")
    memory: str | None = Field(None, pattern=_QUANTITY, description="Memory request and limit per pod, e.g. '120Gi'.")
    shared_memory: str = Field("16Gi", pattern=_QUANTITY, description="Size of /dev/shm (NCCL, dataloader workers).")
    gpu_memory: str | None = Field(
        None,
        pattern=_QUANTITY,
        description="Memory of one GPU, e.g. '80Gi'; a spec whose estimated memory per GPU exceeds it is refused. "
        "Unset: read from the nvidia.com/gpu.product node selector where it names a known GPU.",
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods must match.")
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Taints the pods tolerate, e.g. GPU nodes'."
    )
    priority_class_name: str | None = Field(None, description="PriorityClass of the pods (preemption order).")
    scheduler_name: str | None = Field(None, description="E.g. a gang scheduler such as volcano.")
    queue_name: str | None = Field(
        None,
        pattern=DNS_LABEL,
        max_length=DNS_LABEL_MAX_LENGTH,
        description="A Kueue LocalQueue of the resource's namespace: the training and evaluation Jobs are created "
        "suspended with its kueue.x-k8s.io/queue-name label, and run when Kueue admits them (phase Pending, reason "
        "WaitingForAdmission, until then). A Job Kueue preempts resumes from its last checkpoint when admitted again.",
    )
    service_account_annotations: dict[str, str] = Field(
        default_factory=dict,
        description="Annotations of the job pods' service account, e.g. eks.amazonaws.com/role-arn for IRSA.",
    )


class QualityGate(CamelModel):
    metric: str = Field("ndcg@10", pattern=_GATE_METRIC.pattern, description="<metric>@<k>, k one of kValues.")
    min_improvement: float = Field(0.0, description="Fine-tuned minus baseline must be at least this.")
    mode: str = Field(
        "dense",
        description="The scoring mode whose metric is read: dense; sparse, colbert or hybrid (model.outputs "
        "[dense, sparse, colbert]); dense-DIM for a training.matryoshkaDims dimension.",
    )
    compare: Literal["delta", "lowerBound"] = Field(
        "delta",
        description="What must reach minImprovement: the delta itself, or the lower bound of its 95% "
        "confidence interval (pass only when the gain is sure, not luck of the evaluation queries).",
    )


class EvaluationSpec(CamelModel):
    """The evaluation job: base vs fine-tuned on the held-out or given evaluation set."""

    enabled: bool = Field(True, description="Run the evaluation job after training.")
    k_values: list[Annotated[int, Field(ge=1, le=10000)]] = Field(
        default_factory=lambda: [1, 10, 100], min_length=1, description="Cut-offs k of the metrics."
    )
    gpus: int = Field(1, ge=0, le=8, description="nvidia.com/gpu of the evaluation pod; 0 runs on CPU.")
    bootstrap_resamples: int = Field(
        1000, ge=100, le=100000, description="Resamples of the paired bootstrap behind each delta's 95% interval."
    )
    gate: QualityGate | None = Field(
        None,
        description="Fail the run when the fine-tuned model (or the merged one: merge.gate) does not improve enough.",
    )
    retention: str | None = Field(
        None,
        description="Storage URI of a second, general-domain evaluation set (queries.jsonl, corpus.jsonl, "
        "qrels.jsonl) every model is also scored on: what fine-tuning and merging kept and cost.",
    )
    hybrid_weights: HybridWeights = Field(
        default_factory=HybridWeights,
        description="bge-m3's hybrid score: weights of the dense, sparse and ColBERT scores.",
    )
    rerank_depth: int = Field(
        100, ge=1, le=10000, description="Dense candidates per query that the colbert and hybrid modes re-rank."
    )


class RunPolicySpec(CamelModel):
    """Restarts, deadline, suspension and history of runs."""

    max_restarts: int = Field(3, ge=0, le=100, description="New Job attempts after infrastructure failures.")
    active_deadline_seconds: int | None = Field(None, ge=1, description="Fail a run that trains longer than this.")
    suspend: bool = Field(False, description="Remove the running Job (checkpoints stay); false resumes.")
    history_limit: int = Field(5, ge=0, le=50, description="Finished runs kept in status.history.")


class EmbeddingFinetuneSpec(CamelModel):
    model: ModelSpec
    data: FinetuneDataSpec
    training: TrainingSpec = TrainingSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    merge: MergeSpec | None = None
    storage: StorageSpec
    resources: ResourcesSpec = ResourcesSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    run_policy: RunPolicySpec = RunPolicySpec()

    def run_fingerprint(self) -> str:
        """Changes exactly when a change of the spec needs a new run: runPolicy and the storage
        retry window do not."""
        relevant = self.model_dump(mode="json", exclude={"run_policy": True, "storage": {"retry_seconds"}})
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def cross_field_problems(spec: EmbeddingFinetuneSpec, *, on_cluster: bool = True) -> list[str]:
    """Rules between fields, each as `spec.path: reason` (the CRD's CEL rules mirror them).
    On one machine (`embedtune run`) local paths are fine too."""
    problems = [f"spec.{problem}" for problem in model_training_problems(spec.model, spec.training)]
    gate = spec.evaluation.gate
    if gate is not None and gate.mode != "dense" and spec.merge is not None and spec.merge.gated == "merged":
        problems.append(
            f"spec.evaluation.gate.mode: the merged model is scored with its dense vectors only, not {gate.mode}; "
            "set gate.mode: dense or merge.gate: finetuned"
        )
    if on_cluster:
        if not spec.storage.uri.startswith("s3://"):
            problems.append("spec.storage.uri: must be an s3:// URI; pods share nothing else")
        for index, uri in enumerate(spec.data.train):
            if not uri.startswith("s3://"):
                problems.append(f"spec.data.train.{index}: must be an s3:// URI on a cluster")
        if spec.evaluation.enabled and spec.data.eval is not None and not spec.data.eval.startswith("s3://"):
            problems.append("spec.data.eval: must be an s3:// URI on a cluster")
        retention = spec.evaluation.retention
        if spec.evaluation.enabled and retention is not None and not retention.startswith("s3://"):
            problems.append("spec.evaluation.retention: must be an s3:// URI on a cluster")
    if spec.evaluation.enabled and (spec.data.held_out_fraction is None) == (spec.data.eval is None):
        problems.append("spec.data: set exactly one of `heldOutFraction` or `eval` when evaluation is enabled")
    if spec.data.teacher is not None and not spec.training.distills:
        problems.append("spec.data.teacher: its scores train only with training.distillation on")
    if spec.evaluation.gate is not None:
        match = _GATE_METRIC.match(spec.evaluation.gate.metric)
        if match and int(match.group(2)) not in spec.evaluation.k_values:
            problems.append(
                f"spec.evaluation.gate.metric: k={match.group(2)} must be one of evaluation.kValues "
                f"{spec.evaluation.k_values}"
            )
        if not spec.evaluation.enabled:
            problems.append("spec.evaluation.gate: needs evaluation.enabled: true")
        if spec.evaluation.gate.mode not in (modes := evaluated_modes(spec)):
            problems.append(
                f"spec.evaluation.gate.mode: {spec.evaluation.gate.mode!r} is not evaluated for this model; "
                f"one of {', '.join(modes)}"
            )
    return problems


def evaluated_modes(spec: EmbeddingFinetuneSpec) -> list[str]:
    """The scoring modes the evaluation reports for the model trained: its dense vector, bge-m3's
    other outputs, and each Matryoshka dimension."""
    unified = ["sparse", "colbert", "hybrid"] if spec.model.unified else []
    return ["dense", *unified, *(dimension_mode(d) for d in spec.training.matryoshka_dims)]


def metadata_problems(manifest: dict[str, Any]) -> list[str]:
    """The metadata fields embedtune reads: names become object names and storage keys, so
    they must be DNS labels (nothing else may reach a path or a pod's hostname)."""
    metadata = manifest.get("metadata")
    if not isinstance(metadata, dict):
        return [f"metadata: expected a mapping with a name, got {_json_type(metadata)}"]
    problems = []
    name = metadata.get("name")
    if not isinstance(name, str) or not _DNS_LABEL.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        problems.append(
            f"metadata.name: must be a DNS label of at most {MAX_NAME_LENGTH} characters "
            "(lowercase letters, digits, '-'); the Job and pod names derive from it"
        )
    namespace = metadata.get("namespace")
    if namespace is not None and (
        not isinstance(namespace, str) or not _DNS_LABEL.fullmatch(namespace) or len(namespace) > DNS_LABEL_MAX_LENGTH
    ):
        problems.append(
            f"metadata.namespace: must be a DNS label of at most {DNS_LABEL_MAX_LENGTH} characters "
            "(lowercase letters, digits, '-')"
        )
    return problems


def _json_type(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "nothing"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def parse_finetune(manifest: Any, *, on_cluster: bool = True) -> EmbeddingFinetuneSpec:
    """The spec of an EmbeddingFinetune manifest; InputError lists every problem found."""
    if not isinstance(manifest, dict):
        raise InputError(
            "not an EmbeddingFinetune manifest", [f"(document): expected a mapping, got {_json_type(manifest)}"]
        )
    problems = []
    if manifest.get("apiVersion") != API_VERSION:
        problems.append(f"apiVersion: must be {API_VERSION}")
    if manifest.get("kind") != KIND:
        problems.append(f"kind: must be {KIND}")
    problems += metadata_problems(manifest)
    spec = None
    try:
        spec = EmbeddingFinetuneSpec.model_validate(manifest.get("spec"))
    except ValidationError as exc:
        problems.extend(problems_from_validation_error(exc, "spec"))
    else:
        # Only a spec whose fields are valid can be checked across fields.
        problems.extend(cross_field_problems(spec, on_cluster=on_cluster))
    if problems:
        raise InputError(f"invalid {KIND} {_name_of(manifest)}", problems)
    return spec


def _name_of(manifest: dict[str, Any]) -> str:
    metadata = manifest.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return name if isinstance(name, str) and name else "(unnamed)"
