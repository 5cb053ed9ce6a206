"""The EmbeddingFinetune's status as a typed model: the operator's own fields, and the sections
the job pods report (contract.py). The CRD's status schema is generated from it (crd.py), as
the spec schema is from the spec model, so what the pods send and what the API accepts cannot
drift apart.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from embedtune.trainer.config import CamelModel
from embedtune.trainer.contract import CheckpointStatus, StatusMetrics, TrainingProgress, all_optional

from .constants import Phase

_TIME = {"format": "date-time"}

# The pods' progress fields, each optional: the operator writes this section first (job,
# attempt, restarts) and the pods fill in the rest as training goes.
_ReportedTraining = all_optional(TrainingProgress, "ReportedTraining", exclude={"learning_rate"})


class TrainingStatus(_ReportedTraining):
    """The current run's training Job and, as the training pods report it, its progress."""

    job: str | None = Field(None, description="The training Job of the current attempt.")
    attempt: int | None = Field(None, description="1 for the first Job of the run, +1 for each new Job.")
    restarts: int | None = Field(None, description="New Jobs after infrastructure failures.")


class ConditionStatus(CamelModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    last_transition_time: str | None = Field(None, json_schema_extra=_TIME)
    observed_generation: int | None = None


class ModelLocation(CamelModel):
    uri: str = Field(description="The exported model (sentence-transformers layout).")


class EvaluationJobStatus(CamelModel):
    job: str
    attempt: int


class RunRecord(CamelModel):
    """A finished run, kept in status.history."""

    run_id: str
    phase: Phase | None = None
    reason: str | None = None
    start_time: str | None = Field(None, json_schema_extra=_TIME)
    completion_time: str | None = Field(None, json_schema_extra=_TIME)
    model: ModelLocation | None = None
    metrics: StatusMetrics | None = None


class FinetuneStatus(CamelModel):
    """Written by the operator; training progress and metrics by the job pods."""

    phase: Phase | None = None
    reason: str | None = None
    message: str | None = None
    phase_time: str | None = Field(None, json_schema_extra=_TIME)
    observed_generation: int | None = None
    run_id: str | None = Field(None, description="metadata.generation that started the current run.")
    spec_fingerprint: str | None = Field(None, description="Identifies the spec the current run trains.")
    start_time: str | None = Field(None, json_schema_extra=_TIME)
    completion_time: str | None = Field(None, json_schema_extra=_TIME)
    conditions: list[ConditionStatus] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    training: TrainingStatus | None = None
    checkpoint: CheckpointStatus | None = None
    model: ModelLocation | None = None
    evaluation: EvaluationJobStatus | None = None
    metrics: StatusMetrics | None = Field(None, description="baseline, finetuned and delta: metric@k -> value.")
    history: list[RunRecord] = Field(
        default_factory=list, description="The last runs, newest first (runPolicy.historyLimit)."
    )
