"""Names the operator shares with the cluster: labels, annotations, phases, condition types.

Everything a user or another controller can see is spelled once, here.
"""

from __future__ import annotations

from enum import StrEnum

from embedtune.trainer.contract import GROUP, VERSION

KIND = "EmbeddingFinetune"
API_VERSION = f"{GROUP}/{VERSION}"
SHORT_NAME = "eft"

# kopf keeps its progress and diff-base under this prefix; the finalizer is ours too.
ANNOTATION_PREFIX = GROUP
FINALIZER = f"{GROUP}/finalizer"

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "embedtune"
LABEL_FINETUNE = f"{GROUP}/finetune"
LABEL_RUN_ID = f"{GROUP}/run-id"
LABEL_ROLE = f"{GROUP}/role"
LABEL_ATTEMPT = f"{GROUP}/attempt"
# Kueue admits Jobs that carry this label (and are created suspended) from the named LocalQueue.
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"

# The job pods find their configs (contract.TRAINER_CONFIG_FILE, EVALUATION_CONFIG_FILE) here.
CONFIG_DIR = "/etc/embedtune"
MASTER_PORT = 29500

# How often every resource is reconciled even when nothing seems to happen.
RESYNC_SECONDS = 300

# A Job's pod hostname is `<job>-<index>` and must fit a 63-character DNS label; the job name
# adds `-train-<run>-<attempt>` to the resource name, so the resource name is capped.
MAX_NAME_LENGTH = 40


class Role(StrEnum):
    TRAIN = "train"
    EVALUATE = "evaluate"

    @property
    def container(self) -> str:
        """The container name of the role's pods, where its termination message is."""
        return "trainer" if self is Role.TRAIN else "evaluator"


class Phase(StrEnum):
    PENDING = "Pending"
    TRAINING = "Training"
    EVALUATING = "Evaluating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


class Condition(StrEnum):
    # kstatus (Argo CD, Flux): Ready=True is healthy, Reconciling=True is in progress,
    # Stalled=True is failed.
    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"
    QUALITY_GATE = "QualityGate"


class Reason(StrEnum):
    """Why a transition happened; the `reason` of conditions and Events."""

    INVALID_SPEC = "InvalidSpec"
    POLICY_REFUSED = "PolicyRefused"
    INSUFFICIENT_GPU_MEMORY = "InsufficientGPUMemory"
    CHILD_CONFLICT = "ChildConflict"
    JOB_CREATED = "JobCreated"
    TRAINING_STARTED = "TrainingStarted"
    TRAINING_SUCCEEDED = "TrainingSucceeded"
    INPUT_ERROR = "InputError"
    INFRASTRUCTURE_FAILURE = "InfrastructureFailure"
    RESTARTS_EXHAUSTED = "RestartsExhausted"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    SUSPENDED = "Suspended"
    RESUMED = "Resumed"
    NEW_RUN = "NewRun"
    EVALUATION_FAILED = "EvaluationFailed"
    SUCCEEDED = "Succeeded"
    GATE_PASSED = "GatePassed"
    GATE_NOT_MET = "GateNotMet"
    METRICS_MISSING = "MetricsMissing"
    WAITING_FOR_ADMISSION = "WaitingForAdmission"
    ADMITTED = "Admitted"


# The trainer image of this release; `embedtune operator --trainer-image` overrides it.
DEFAULT_TRAINER_IMAGE = "ghcr.io/embedtune/embedtune-trainer:0.1.0"
