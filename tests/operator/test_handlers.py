"""The operator end to end: kopf's runtime and our handlers against the emulated API server.

The tests play the Job controller (patching Job status, creating failed pods) and the
evaluation pod (patching status.metrics)."""

import pytest

from support.cluster import FINETUNES, JOBS
from support.finetunes import minimal_manifest

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.kmock(cls=__import__("support.kube_emulator", fromlist=["x"]).ApiServerEmulator),
    pytest.mark.timeout(120),
]

METRICS = {
    "baseline": {"ndcg@10": 0.41, "recall@10": 0.6},
    "finetuned": {"ndcg@10": 0.52, "recall@10": 0.71},
    "delta": {"ndcg@10": 0.11, "recall@10": 0.11},
}


async def test_happy_path_to_succeeded_with_metrics(cluster, operator):
    await cluster.apply(minimal_manifest("happy", evaluation={"gate": {"metric": "ndcg@10", "minImprovement": 0.05}}))
    await cluster.eventually(lambda: cluster.get(JOBS, "happy-train-1-1"), what="training job")
    status = await cluster.phase_becomes("happy", "Pending")
    assert status["runId"].startswith("1-") and status["training"]["job"] == "happy-train-1-1"
    kinds = {
        (obj["kind"], obj["metadata"]["name"])
        for resource in (
            "v1/services",
            "v1/configmaps",
            "v1/serviceaccounts",
            "rbac.authorization.k8s.io/v1/roles",
            "rbac.authorization.k8s.io/v1/rolebindings",
        )
        for obj in cluster.objects(resource)
    }
    assert kinds == {
        ("Service", "happy-train"),
        ("ConfigMap", "happy-config-1"),
        ("ServiceAccount", "happy-embedtune"),
        ("Role", "happy-embedtune"),
        ("RoleBinding", "happy-embedtune"),
    }
    # kopf's bookkeeping is under our own prefix.
    annotations = await cluster.eventually(
        lambda: cluster.get(FINETUNES, "happy")["metadata"].get("annotations"), what="kopf's annotations"
    )
    assert all(key.startswith("embedtune.io/") for key in annotations), annotations
    assert cluster.get(FINETUNES, "happy")["metadata"]["finalizers"] == ["embedtune.io/finalizer"]
    owner = cluster.get(FINETUNES, "happy")["metadata"]["uid"]
    assert cluster.get(JOBS, "happy-train-1-1")["metadata"]["ownerReferences"][0]["uid"] == owner

    await cluster.job_running("happy-train-1-1")
    await cluster.phase_becomes("happy", "Training")
    await cluster.job_succeeded("happy-train-1-1")
    status = await cluster.phase_becomes("happy", "Evaluating")
    assert status["model"]["uri"] == f"s3://models/embedtune/default/happy/run-{status['runId']}/model"
    await cluster.eventually(lambda: cluster.get(JOBS, "happy-eval-1-1"), what="evaluation job")

    await cluster.patch_status(FINETUNES, "happy", {"metrics": METRICS})
    await cluster.job_succeeded("happy-eval-1-1")
    status = await cluster.phase_becomes("happy", "Succeeded")
    assert status["metrics"]["finetuned"]["ndcg@10"] == 0.52
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    assert conditions["QualityGate"]["status"] == "True" and conditions["QualityGate"]["reason"] == "GatePassed"
    assert status["observedGeneration"] == 1
    await cluster.eventually(lambda: "Succeeded" in [r for r, _ in cluster.events("happy")], what="events")
    reasons = [reason for reason, _ in cluster.events("happy")]
    assert reasons[:4] == ["NewRun", "JobCreated", "TrainingStarted", "TrainingSucceeded"]


async def train_to_success(cluster, job: str) -> None:
    await cluster.eventually(lambda: cluster.get(JOBS, job), what=job)
    await cluster.job_running(job)
    await cluster.job_succeeded(job)


async def test_infrastructure_failure_is_retried_from_the_checkpoint(cluster, operator):
    await cluster.apply(minimal_manifest("flaky", evaluation={"enabled": False}, runPolicy={"maxRestarts": 2}))
    await cluster.eventually(lambda: cluster.get(JOBS, "flaky-train-1-1"), what="first attempt")
    await cluster.job_running("flaky-train-1-1")
    await cluster.patch_status(
        FINETUNES,
        "flaky",
        {"checkpoint": {"step": 500, "uri": "s3://x/checkpoint-500", "runId": cluster.status("flaky")["runId"]}},
    )
    await cluster.job_failed("flaky-train-1-1", exit_code=137, reason="OOMKilled")
    await cluster.eventually(lambda: cluster.get(JOBS, "flaky-train-1-2"), what="second attempt")
    status = await cluster.phase_becomes("flaky", "Pending")
    assert status["reason"] == "InfrastructureFailure"
    assert "OOMKilled" in status["message"] and "restart 1 of 2" in status["message"]
    assert (status["training"]["attempt"], status["training"]["restarts"]) == (2, 1)
    # The same run: the new attempt resumes from the run's checkpoints.
    assert status["runId"].startswith("1-") and status["checkpoint"]["step"] == 500
    config = cluster.get(JOBS, "flaky-train-1-2")["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
    assert config == "flaky-config-1"

    await train_to_success(cluster, "flaky-train-1-2")
    status = await cluster.phase_becomes("flaky", "Succeeded")
    assert cluster.job_names() == ["flaky-train-1-1", "flaky-train-1-2"]


async def test_input_error_fails_at_once_with_the_trainers_reason(cluster, operator):
    await cluster.apply(minimal_manifest("baddata"))
    await cluster.eventually(lambda: cluster.get(JOBS, "baddata-train-1-1"), what="training job")
    report = '{"reason": "InvalidData", "message": "train.jsonl:3: pos: must be a non-empty list"}'
    await cluster.job_failed("baddata-train-1-1", exit_code=2, message=report)
    status = await cluster.phase_becomes("baddata", "Failed")
    assert status["reason"] == "InputError"
    assert status["message"] == "InvalidData: train.jsonl:3: pos: must be a non-empty list"
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Ready": "False", "Reconciling": "False", "Stalled": "True"}
    assert cluster.job_names() == ["baddata-train-1-1"]
    await cluster.eventually(lambda: "InputError" in [r for r, _ in cluster.events("baddata")], what="event")


async def test_restarts_exhausted(cluster, operator):
    await cluster.apply(minimal_manifest("doomed", runPolicy={"maxRestarts": 1}))
    await cluster.eventually(lambda: cluster.get(JOBS, "doomed-train-1-1"), what="first attempt")
    await cluster.job_failed("doomed-train-1-1", exit_code=1)
    await cluster.eventually(lambda: cluster.get(JOBS, "doomed-train-1-2"), what="second attempt")
    await cluster.job_failed("doomed-train-1-2", exit_code=139, message="Segmentation fault")
    status = await cluster.phase_becomes("doomed", "Failed")
    assert status["reason"] == "RestartsExhausted"
    assert "Segmentation fault" in status["message"] and "runPolicy.maxRestarts is 1" in status["message"]
    assert cluster.job_names() == ["doomed-train-1-1", "doomed-train-1-2"]


async def test_suspend_removes_the_job_and_resume_continues_the_run(cluster, operator):
    await cluster.apply(minimal_manifest("pausable", evaluation={"enabled": False}))
    await cluster.eventually(lambda: cluster.get(JOBS, "pausable-train-1-1"), what="training job")
    await cluster.job_running("pausable-train-1-1")
    await cluster.phase_becomes("pausable", "Training")

    await cluster.patch_spec("pausable", {"runPolicy": {"suspend": True}})
    status = await cluster.phase_becomes("pausable", "Suspended")
    await cluster.eventually(lambda: cluster.job_names() == [], what="job removed")
    assert status["runId"].startswith("1-") and status["observedGeneration"] == 2

    await cluster.patch_spec("pausable", {"runPolicy": {"suspend": False}})
    await cluster.eventually(lambda: cluster.get(JOBS, "pausable-train-1-2"), what="resumed job")
    status = await cluster.phase_becomes("pausable", "Pending")
    assert status["runId"].startswith("1-") and (status["reason"], status["training"]["restarts"]) == ("Resumed", 0)
    await train_to_success(cluster, "pausable-train-1-2")
    await cluster.phase_becomes("pausable", "Succeeded")


async def test_spec_change_starts_a_new_run_and_keeps_history(cluster, operator):
    await cluster.apply(minimal_manifest("gitops", evaluation={"enabled": False}))
    await train_to_success(cluster, "gitops-train-1-1")
    first = await cluster.phase_becomes("gitops", "Succeeded")
    assert first["model"]["uri"].endswith(f"/run-{first['runId']}/model") and first["runId"].startswith("1-")

    await cluster.patch_spec("gitops", {"training": {"learningRate": 1e-4}})
    await cluster.eventually(lambda: cluster.get(JOBS, "gitops-train-2-1"), what="job of the new run")
    status = await cluster.phase_becomes("gitops", "Pending")
    assert status["runId"].startswith("2-") and status["observedGeneration"] == 2
    assert "model" not in status and "completionTime" not in status
    assert [(h["runId"], h["phase"]) for h in status["history"]] == [(first["runId"], "Succeeded")]
    assert status["history"][0]["model"]["uri"] == first["model"]["uri"]
    assert cluster.get("v1/configmaps", "gitops-config-2") is not None

    # A change while training replaces the running Job.
    await cluster.job_running("gitops-train-2-1")
    await cluster.patch_spec("gitops", {"training": {"learningRate": 2e-4}})
    await cluster.eventually(lambda: cluster.get(JOBS, "gitops-train-3-1"), what="job of the third run")
    await cluster.eventually(lambda: cluster.get(JOBS, "gitops-train-2-1") is None, what="old job removed")
    await cluster.eventually(lambda: cluster.status("gitops")["runId"].startswith("3-"), what="status of the third run")
    assert [h["runId"].split("-")[0] for h in cluster.status("gitops")["history"]] == ["2", "1"]


async def test_delete_removes_the_children(cluster, operator):
    await cluster.apply(minimal_manifest("gone"))
    await cluster.eventually(lambda: cluster.get(JOBS, "gone-train-1-1"), what="training job")
    await cluster.delete("gone")
    await cluster.eventually(
        lambda: (
            not cluster.objects(JOBS) and not cluster.objects("v1/configmaps") and not cluster.objects("v1/services")
        ),
        what="children gone",
    )
    assert cluster.get(FINETUNES, "gone") is None


async def test_operator_restart_mid_run_creates_no_duplicates(cluster, operator):
    await cluster.apply(minimal_manifest("steady", evaluation={"enabled": False}))
    await cluster.eventually(lambda: cluster.get(JOBS, "steady-train-1-1"), what="training job")
    await operator.stop()
    await cluster.job_running("steady-train-1-1")
    await operator.start()
    await cluster.phase_becomes("steady", "Training")
    assert cluster.job_names() == ["steady-train-1-1"]
    await cluster.job_succeeded("steady-train-1-1")
    await cluster.phase_becomes("steady", "Succeeded")
    assert cluster.job_names() == ["steady-train-1-1"]


async def test_invalid_spec_fails_with_the_field_to_fix(cluster, operator):
    # The emulator enforces no schema, so the operator's own validation is what catches it.
    await cluster.apply(minimal_manifest("broken", resources={"gpusPerNode": -1}))
    status = await cluster.phase_becomes("broken", "Failed")
    assert status["reason"] == "InvalidSpec"
    assert status["message"] == "spec.resources.gpusPerNode: Input should be greater than or equal to 0"
    assert cluster.job_names() == []


async def test_deadline_exceeded_fails_the_run(cluster, operator):
    await cluster.apply(minimal_manifest("slow", runPolicy={"activeDeadlineSeconds": 3600}))
    await cluster.eventually(lambda: cluster.get(JOBS, "slow-train-1-1"), what="training job")
    assert 3590 <= cluster.get(JOBS, "slow-train-1-1")["spec"]["activeDeadlineSeconds"] <= 3600
    await cluster.job_failed("slow-train-1-1", exit_code=143, job_reason="DeadlineExceeded")
    status = await cluster.phase_becomes("slow", "Failed")
    assert status["reason"] == "DeadlineExceeded"
    assert cluster.job_names() == ["slow-train-1-1"]


async def test_quality_gate_not_met_fails_the_run(cluster, operator):
    await cluster.apply(minimal_manifest("meh", evaluation={"gate": {"metric": "ndcg@10", "minImprovement": 0.2}}))
    await train_to_success(cluster, "meh-train-1-1")
    await cluster.eventually(lambda: cluster.get(JOBS, "meh-eval-1-1"), what="evaluation job")
    await cluster.patch_status(FINETUNES, "meh", {"metrics": METRICS})
    await cluster.job_succeeded("meh-eval-1-1")
    status = await cluster.phase_becomes("meh", "Failed")
    assert status["reason"] == "GateNotMet"
    gate = next(c for c in status["conditions"] if c["type"] == "QualityGate")
    assert gate["status"] == "False" and "+0.1100" in gate["message"]


async def test_the_quality_gate_reads_the_mode_it_names(cluster, operator):
    await cluster.apply(
        minimal_manifest(
            "hybrid",
            model={"base": "BAAI/bge-m3", "outputs": ["dense", "sparse", "colbert"]},
            evaluation={"gate": {"metric": "ndcg@10", "minImprovement": 0.2, "mode": "hybrid"}},
        )
    )
    await train_to_success(cluster, "hybrid-train-1-1")
    await cluster.eventually(lambda: cluster.get(JOBS, "hybrid-eval-1-1"), what="evaluation job")
    hybrid = {"baseline": {"ndcg@10": 0.4}, "finetuned": {"ndcg@10": 0.65}, "delta": {"ndcg@10": 0.25}}
    await cluster.patch_status(FINETUNES, "hybrid", {"metrics": METRICS | {"modes": {"hybrid": hybrid}}})
    await cluster.job_succeeded("hybrid-eval-1-1")
    status = await cluster.phase_becomes("hybrid", "Succeeded")  # dense improved by only 0.11
    gate = next(c for c in status["conditions"] if c["type"] == "QualityGate")
    assert gate["status"] == "True" and "hybrid ndcg@10 changed by +0.2500; at least 0.2 required" in gate["message"]
    assert status["message"].startswith("evaluation job hybrid-eval-1-1 succeeded; hybrid ndcg@10 changed by")


async def test_evaluation_input_error_fails_the_run(cluster, operator):
    await cluster.apply(minimal_manifest("noeval"))
    await train_to_success(cluster, "noeval-train-1-1")
    await cluster.eventually(lambda: cluster.get(JOBS, "noeval-eval-1-1"), what="evaluation job")
    await cluster.job_failed(
        "noeval-eval-1-1", exit_code=2, message='{"reason": "InvalidEvalSet", "message": "qrels.jsonl: missing"}'
    )
    status = await cluster.phase_becomes("noeval", "Failed")
    assert status["reason"] == "EvaluationFailed" and "qrels.jsonl: missing" in status["message"]


async def test_evaluation_lost_to_infrastructure_is_retried(cluster, operator):
    await cluster.apply(minimal_manifest("evicted", runPolicy={"maxRestarts": 1}))
    await train_to_success(cluster, "evicted-train-1-1")
    await cluster.eventually(lambda: cluster.get(JOBS, "evicted-eval-1-1"), what="evaluation job")
    await cluster.job_failed("evicted-eval-1-1", exit_code=137, reason="OOMKilled")
    await cluster.eventually(lambda: cluster.get(JOBS, "evicted-eval-1-2"), what="second evaluation job")
    await cluster.patch_status(FINETUNES, "evicted", {"metrics": METRICS})
    await cluster.job_succeeded("evicted-eval-1-2")
    status = await cluster.phase_becomes("evicted", "Succeeded")
    assert status["evaluation"] == {"job": "evicted-eval-1-2", "attempt": 2}
    assert cluster.job_names() == ["evicted-eval-1-1", "evicted-eval-1-2", "evicted-train-1-1"]


async def test_an_object_with_a_childs_name_that_is_not_ours_is_a_conflict_never_used(cluster, operator, monkeypatch):
    from embedtune.operator import handlers

    monkeypatch.setattr(handlers, "CONFLICT_RETRY_SECONDS", 1)
    # someone's Job with the name and labels a run's Job would have, but not owned by the resource
    foreign = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "clash-train-1-1",
            "labels": {"app.kubernetes.io/managed-by": "embedtune", "embedtune.io/finetune": "clash"},
        },
        "spec": {"template": {"spec": {"containers": [{"name": "x", "image": "evil"}], "restartPolicy": "Never"}}},
    }
    await cluster.request("POST", cluster._path(JOBS), foreign)
    await cluster.apply(minimal_manifest("clash"))
    status = await cluster.eventually(
        lambda: cluster.status("clash") if cluster.status("clash").get("reason") == "ChildConflict" else None,
        what="the conflict in the status",
    )
    assert "Job clash-train-1-1 already exists and does not belong to this EmbeddingFinetune" in status["message"]
    assert status["phase"] == "Pending" and "training" not in status or not status["training"].get("job")
    assert cluster.get(JOBS, "clash-train-1-1")["spec"]["template"]["spec"]["containers"][0]["image"] == "evil"
    assert ("ChildConflict", status["message"]) in cluster.events("clash")

    await cluster.request("DELETE", cluster._path(JOBS, "clash-train-1-1"))
    job = await cluster.eventually(
        lambda: (job := cluster.get(JOBS, "clash-train-1-1")) and job["metadata"].get("ownerReferences") and job,
        what="the run's own job once the name is free",
    )
    assert job["metadata"]["ownerReferences"][0]["uid"] == cluster.get(FINETUNES, "clash")["metadata"]["uid"]
    status = await cluster.phase_becomes("clash", "Pending")
    assert status["reason"] == "JobCreated"


async def test_kueue_admits_the_jobs_and_a_preempted_run_waits_then_resumes_from_its_checkpoint(cluster, operator):
    await cluster.apply(minimal_manifest("queued", resources={"nodes": 2, "gpusPerNode": 4, "queueName": "gpus"}))
    job = await cluster.eventually(lambda: cluster.get(JOBS, "queued-train-1-1"), what="training job")
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
    status = await cluster.eventually(lambda: waiting_for_admission(cluster.status("queued")), what="waiting")
    assert status["phase"] == "Pending" and "LocalQueue gpus" in status["message"]
    reconciling = next(c for c in status["conditions"] if c["type"] == "Reconciling")
    assert (reconciling["status"], reconciling["reason"]) == ("True", "WaitingForAdmission")

    await cluster.job_suspended("queued-train-1-1", False)  # admitted
    await cluster.job_running("queued-train-1-1")
    status = await cluster.phase_becomes("queued", "Training")
    checkpoint = {"step": 50, "uri": "s3://models/checkpoint-50", "runId": status["runId"]}
    await cluster.patch_status(FINETUNES, "queued", {"checkpoint": checkpoint})

    await cluster.job_suspended("queued-train-1-1", True)  # preempted: its pods are gone
    status = await cluster.eventually(lambda: waiting_for_admission(cluster.status("queued")), what="preempted")
    assert status["phase"] == "Pending" and "resumes from checkpoint 50" in status["message"]
    # the same Job waits (no restart counted, nothing deleted); admitted again, its new pods
    # resume from the stored checkpoint as a restarted trainer does
    assert (status["training"]["attempt"], status["training"]["restarts"]) == (1, 0)
    assert cluster.get(JOBS, "queued-train-1-1") is not None
    await cluster.job_suspended("queued-train-1-1", False)
    await cluster.job_running("queued-train-1-1")
    status = await cluster.phase_becomes("queued", "Training")
    assert status["checkpoint"]["step"] == 50

    await cluster.job_succeeded("queued-train-1-1")
    job = await cluster.eventually(lambda: cluster.get(JOBS, "queued-eval-1-1"), what="evaluation job")
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
    status = await cluster.eventually(lambda: waiting_for_admission(cluster.status("queued")), what="eval waiting")
    assert status["phase"] == "Evaluating"
    await cluster.job_suspended("queued-eval-1-1", False)
    await cluster.job_running("queued-eval-1-1")
    await cluster.patch_status(FINETUNES, "queued", {"metrics": METRICS})
    await cluster.job_succeeded("queued-eval-1-1")
    await cluster.phase_becomes("queued", "Succeeded")


def waiting_for_admission(status: dict) -> dict | None:
    return status if status.get("reason") == "WaitingForAdmission" else None
