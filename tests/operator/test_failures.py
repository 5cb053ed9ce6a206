import pytest

from embedtune.operator.failures import FailureKind, classify_failure

FAILED_JOB = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}


def pod(name="p-0", *, exit_code=None, reason=None, message=None, pod_reason=None, disruption=None):
    status = {"phase": "Failed"}
    if exit_code is not None:
        terminated = {"exitCode": exit_code, "reason": reason or "Error"}
        if message is not None:
            terminated["message"] = message
        status["containerStatuses"] = [
            {"name": "trainer", "state": {"terminated": terminated}},
            {"name": "sidecar", "state": {"terminated": {"exitCode": 2}}},
        ]
    if pod_reason:
        status["reason"], status["message"] = pod_reason, "The node was low on resource: memory."
    if disruption:
        status["conditions"] = [
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": disruption,
                "message": "preempted by a higher priority pod",
            }
        ]
    return {"metadata": {"name": name}, "status": status}


@pytest.mark.parametrize(
    ("pods", "kind", "reason", "in_message"),
    [
        (
            [pod(exit_code=2, message='{"reason": "InvalidData", "message": "a.jsonl:1: query: missing"}')],
            FailureKind.INPUT,
            "InvalidData",
            "a.jsonl:1: query: missing",
        ),
        ([pod(exit_code=2)], FailureKind.INPUT, "InputError", "exited 2"),
        ([pod(exit_code=137, reason="OOMKilled")], FailureKind.INFRASTRUCTURE, "OOMKilled", "out of memory"),
        ([pod(pod_reason="Evicted")], FailureKind.INFRASTRUCTURE, "Evicted", "low on resource"),
        ([pod(disruption="PreemptionByScheduler")], FailureKind.INFRASTRUCTURE, "PreemptionByScheduler", "preempted"),
        (
            [pod(exit_code=1, message="Traceback ...\nRuntimeError: NCCL timeout")],
            FailureKind.INFRASTRUCTURE,
            "ExitCode1",
            "NCCL timeout",
        ),
        (
            [
                pod(
                    exit_code=75,
                    message='{"reason": "StorageUnavailable", "message": "checkpoint-20 was not stored: storage '
                    's3://b at http://minio:9000 failed for 300 s; the last stored checkpoint is step 10"}',
                )
            ],
            FailureKind.INFRASTRUCTURE,
            "StorageUnavailable",
            "the last stored checkpoint is step 10",
        ),
        ([], FailureKind.INFRASTRUCTURE, "BackoffLimitExceeded", "none of its pods"),
        # One rank's input error decides, whatever the other ranks died of.
        (
            [pod("p-0", exit_code=137, reason="OOMKilled"), pod("p-1", exit_code=2)],
            FailureKind.INPUT,
            "InputError",
            "p-1",
        ),
    ],
)
def test_failures_are_classified_by_exit_code_and_reason(pods, kind, reason, in_message):
    failure = classify_failure(FAILED_JOB, pods, "trainer")
    assert (failure.kind, failure.reason) == (kind, reason)
    assert in_message in failure.message
    assert failure.retryable is (kind is FailureKind.INFRASTRUCTURE)


def test_deadline_is_its_own_kind():
    job = {
        "status": {
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "DeadlineExceeded",
                    "message": "Job was active longer than specified deadline",
                }
            ]
        }
    }
    failure = classify_failure(job, [pod(exit_code=143)], "trainer")
    assert failure.kind is FailureKind.DEADLINE and not failure.retryable
