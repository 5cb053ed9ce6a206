"""Why a Job failed, read from the Job and its pods: the user's input, or the infrastructure.

The trainer and the evaluator exit 2 when the input is wrong (retrying cannot help) and write
a TerminationMessage (contract.py) saying why. Everything else (OOM kills, evictions,
preemption, lost nodes, storage unreachable for its whole retry window (exit 75, reason
StorageUnavailable), other exit codes) is infrastructure: worth a new attempt from the
last checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from embedtune.trainer.contract import FailureClass, TerminationMessage
from embedtune.trainer.errors import EXIT_INPUT_ERROR


class FailureKind(StrEnum):
    INPUT = "Input"
    INFRASTRUCTURE = "Infrastructure"
    DEADLINE = "Deadline"


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    reason: str
    message: str

    @property
    def retryable(self) -> bool:
        return self.kind is FailureKind.INFRASTRUCTURE


# Pod conditions and reasons with which Kubernetes reports that it took the pod away.
_DISRUPTION_CONDITION = "DisruptionTarget"
_EVICTION_REASONS = {"Evicted", "Preempting", "NodeLost", "Shutdown", "Terminated", "NodeShutdown"}


def job_condition(job: dict[str, Any], condition_type: str) -> dict[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == condition_type and condition.get("status") == "True":
            return condition
    return None


def job_succeeded(job: dict[str, Any]) -> bool:
    return job_condition(job, "Complete") is not None


def job_failed(job: dict[str, Any]) -> bool:
    return job_condition(job, "Failed") is not None


def job_suspended(job: dict[str, Any]) -> bool:
    """Created suspended and not admitted yet, or suspended again (Kueue's preemption)."""
    return bool((job.get("spec") or {}).get("suspend"))


def classify_failure(job: dict[str, Any], pods: list[dict[str, Any]], container: str) -> Failure:
    """The failure of a failed Job; an input error in any pod wins over everything else."""
    failed = job_condition(job, "Failed") or {}
    if failed.get("reason") == "DeadlineExceeded":
        return Failure(
            FailureKind.DEADLINE,
            "DeadlineExceeded",
            failed.get("message") or "the run exceeded runPolicy.activeDeadlineSeconds",
        )
    failures = [failure for pod in pods if (failure := _pod_failure(pod, container)) is not None]
    for failure in failures:
        if failure.kind is FailureKind.INPUT:
            return failure
    if failures:
        return failures[0]
    return Failure(
        FailureKind.INFRASTRUCTURE,
        failed.get("reason") or "PodsLost",
        failed.get("message") or "the job failed and none of its pods is left to say why",
    )


def _pod_failure(pod: dict[str, Any], container: str) -> Failure | None:
    status = pod.get("status") or {}
    name = pod.get("metadata", {}).get("name", "?")
    for condition in status.get("conditions") or []:
        if condition.get("type") == _DISRUPTION_CONDITION and condition.get("status") == "True":
            return Failure(
                FailureKind.INFRASTRUCTURE,
                condition.get("reason") or _DISRUPTION_CONDITION,
                f"pod {name}: {condition.get('message') or 'disrupted by Kubernetes'}",
            )
    if status.get("reason") in _EVICTION_REASONS:
        return Failure(FailureKind.INFRASTRUCTURE, status["reason"], f"pod {name}: {status.get('message', '')}".strip())
    for container_status in status.get("containerStatuses") or []:
        if container_status.get("name") != container:
            continue
        terminated = (container_status.get("state") or {}).get("terminated")
        if not terminated or terminated.get("exitCode", 0) == 0:
            continue
        code = terminated["exitCode"]
        text = (terminated.get("message") or "").strip()
        report = TerminationMessage.parse(text)
        # a crash leaves its log tail there (FallbackToLogsOnError) instead of a report
        reason, message = (report.reason, report.describe()) if report else (None, text[-500:] or None)
        if code == EXIT_INPUT_ERROR or (report is not None and report.failure is FailureClass.INPUT):
            return Failure(FailureKind.INPUT, reason or "InputError", message or f"pod {name} exited {code}")
        if terminated.get("reason") == "OOMKilled":
            return Failure(FailureKind.INFRASTRUCTURE, "OOMKilled", f"pod {name}: out of memory (exit code {code})")
        return Failure(
            FailureKind.INFRASTRUCTURE,
            reason or f"ExitCode{code}",
            message or f"pod {name}: container {container} exited with code {code}",
        )
    return None
