"""The planner on its own: situations the integration tests reach only slowly."""

import datetime

import pytest

from embedtune.operator.constants import Reason
from embedtune.operator.defaults import ClusterDefaults
from embedtune.operator.lifecycle import gate_verdict, plan_reconcile, timestamp
from embedtune.operator.spec import QualityGate, parse_finetune
from support.finetunes import minimal_manifest

NOW = datetime.datetime(2026, 11, 22, 12, 0, tzinfo=datetime.UTC)
DEFAULTS = ClusterDefaults("img")


def finetune(generation=1, status=None, **spec):
    manifest = minimal_manifest("t", **spec)
    manifest["metadata"] |= {"uid": "u-1", "generation": generation}
    if status is not None:
        manifest["status"] = status
    return manifest


def finished_run(run_id: str, history_limit: int, history: list) -> dict:
    spec = parse_finetune(finetune(runPolicy={"historyLimit": history_limit}))
    return {
        "phase": "Succeeded",
        "runId": run_id,
        "specFingerprint": "old-" + spec.run_fingerprint(),
        "startTime": timestamp(NOW),
        "training": {"attempt": 1, "restarts": 0},
        "model": {"uri": f"s3://m/run-{run_id}/model"},
        "history": history,
    }


def test_history_is_bounded_newest_first():
    history = [{"runId": str(run)} for run in (3, 2, 1)]
    plan = plan_reconcile(
        finetune(5, finished_run("4", 2, history), runPolicy={"historyLimit": 2}), [], [], DEFAULTS, NOW
    )
    assert [entry["runId"] for entry in plan.status["history"]] == ["4", "3"]
    assert plan.status["history"][0]["model"] == {"uri": "s3://m/run-4/model"}
    assert plan.status["runId"].startswith("5-")


def test_first_reconcile_plans_the_run_objects_in_dependency_order():
    plan = plan_reconcile(finetune(), [], [], DEFAULTS, NOW)
    assert [obj["kind"] for obj in plan.create] == [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Service",
        "ConfigMap",
        "Job",
    ]
    assert [event.reason.value for event in plan.events] == ["NewRun", "JobCreated"]
    assert plan.status["phase"] == "Pending" and plan.status["observedGeneration"] == 1


def test_invalid_spec_creates_nothing_and_any_fix_starts_a_new_run():
    plan = plan_reconcile(finetune(resources={"nodes": 0}), [], [], DEFAULTS, NOW)
    assert plan.create == [] and plan.status["phase"] == "Failed"
    assert plan.status["specFingerprint"] is None
    assert plan.status["message"] == "spec.resources.nodes: Input should be greater than or equal to 1"


def test_conditions_keep_their_transition_time_while_unchanged():
    first = plan_reconcile(finetune(), [], [], DEFAULTS, NOW)
    later = NOW + datetime.timedelta(minutes=5)
    again = plan_reconcile(finetune(status=first.status), [], [], DEFAULTS, later)
    times = {c["type"]: c["lastTransitionTime"] for c in again.status["conditions"]}
    assert times == {"Ready": timestamp(NOW), "Reconciling": timestamp(NOW), "Stalled": timestamp(NOW)}


def test_an_attempt_gets_what_is_left_of_the_runs_deadline():
    first = plan_reconcile(finetune(runPolicy={"activeDeadlineSeconds": 600}), [], [], DEFAULTS, NOW)
    status = first.status | {"training": {"attempt": 2, "restarts": 1}}
    later = plan_reconcile(
        finetune(status=status, runPolicy={"activeDeadlineSeconds": 600}),
        [],
        [],
        DEFAULTS,
        NOW + datetime.timedelta(seconds=200),
    )
    [job] = [obj for obj in later.create if obj["kind"] == "Job"]
    assert job["metadata"]["name"] == "t-train-1-2" and job["spec"]["activeDeadlineSeconds"] == 400
    expired = plan_reconcile(
        finetune(status=status, runPolicy={"activeDeadlineSeconds": 600}),
        [],
        [],
        DEFAULTS,
        NOW + datetime.timedelta(seconds=601),
    )
    assert expired.create == [] and expired.status["reason"] == "DeadlineExceeded"


def test_resuming_after_training_finished_goes_on_to_evaluate():
    first = plan_reconcile(finetune(), [], [], DEFAULTS, NOW)
    status = first.status | {"phase": "Suspended", "reason": "Suspended"}
    trained = next(obj for obj in first.create if obj["kind"] == "Job")
    trained["status"] = {"succeeded": 2, "conditions": [{"type": "Complete", "status": "True"}]}
    plan = plan_reconcile(finetune(status=status), [trained], [], DEFAULTS, NOW)
    assert plan.status["phase"] == "Evaluating" and plan.status["reason"] == "Resumed"
    assert [obj["metadata"]["name"] for obj in plan.create] == ["t-eval-1-1"]


def test_reports_of_a_replaced_run_are_dropped():
    first = plan_reconcile(finetune(2), [], [], DEFAULTS, NOW)
    late_reports = {
        "training": first.status["training"] | {"step": 900, "runId": "1-abcdef"},
        "checkpoint": {"step": 900, "uri": "s3://m/run-1-abcdef/checkpoints/checkpoint-900", "runId": "1-abcdef"},
    }
    plan = plan_reconcile(finetune(2, status=first.status | late_reports), [], [], DEFAULTS, NOW)
    assert plan.status["training"]["step"] is None and plan.status["checkpoint"] is None
    current = {"training": first.status["training"] | {"step": 10, "runId": first.status["runId"]}}
    assert "checkpoint" not in plan_reconcile(finetune(2, status=first.status | current), [], [], DEFAULTS, NOW).status


def created(plan, kind: str) -> dict:
    return next(obj for obj in plan.create if obj["kind"] == kind)


def secret_names(container: dict) -> set[str]:
    return {
        env["valueFrom"]["secretKeyRef"]["name"]
        for env in container["env"]
        if "secretKeyRef" in env.get("valueFrom", {})
    }


def test_cluster_defaults_fill_what_the_resource_leaves_unset():
    defaults = ClusterDefaults("registry.test/trainer:2", "http://minio.s3:9000", "cluster-creds")
    plan = plan_reconcile(finetune(storage={"uri": "s3://models/x"}), [], [], defaults, NOW)
    container = created(plan, "Job")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.test/trainer:2"
    assert secret_names(container) == {"cluster-creds"}
    assert "endpoint: http://minio.s3:9000" in created(plan, "ConfigMap")["data"]["trainer.yaml"]


def test_the_resources_own_settings_win_over_cluster_defaults():
    defaults = ClusterDefaults("registry.test/trainer:2", "http://minio.s3:9000", "cluster-creds")
    own = {"uri": "s3://models/x", "endpoint": "http://own:9000", "credentialsSecret": "own-creds"}
    plan = plan_reconcile(finetune(storage=own, resources={"image": "own/image:1"}), [], [], defaults, NOW)
    container = created(plan, "Job")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "own/image:1"
    assert secret_names(container) == {"own-creds"}
    assert "endpoint: http://own:9000" in created(plan, "ConfigMap")["data"]["trainer.yaml"]


def test_a_changed_default_does_not_start_a_new_run():
    first = plan_reconcile(finetune(), [], [], DEFAULTS, NOW)
    upgraded = ClusterDefaults("img:new", "http://minio.s3:9000", "cluster-creds")
    again = plan_reconcile(finetune(status=first.status), [], [], upgraded, NOW)
    assert "runId" not in again.status and "history" not in again.status


def test_a_run_is_identified_by_generation_resource_and_spec():
    """A resource deleted and created again counts generations from 1 again, and a run's storage
    must not be found by a run of another incarnation or spec."""
    first = plan_reconcile(finetune(), [], [], DEFAULTS, NOW).status["runId"]
    assert first.startswith("1-") and plan_reconcile(finetune(), [], [], DEFAULTS, NOW).status["runId"] == first
    recreated = finetune()
    recreated["metadata"]["uid"] = "u-2"
    assert plan_reconcile(recreated, [], [], DEFAULTS, NOW).status["runId"] not in (first, None)
    other_spec = finetune(training={"learningRate": 1e-4})
    assert plan_reconcile(other_spec, [], [], DEFAULTS, NOW).status["runId"] not in (first, None)


def test_the_clusters_policy_refuses_images_secrets_and_priority_classes_it_does_not_list():
    from embedtune.operator.defaults import ClusterPolicy

    policy = ClusterPolicy(("registry.corp/ml/",), ("team-s3",), ("batch-low",))
    strict = ClusterDefaults("registry.corp/ml/trainer:1", policy=policy)
    allowed = finetune(
        storage={"uri": "s3://m/x", "credentialsSecret": "team-s3"}, resources={"priorityClassName": "batch-low"}
    )
    assert plan_reconcile(allowed, [], [], strict, NOW).status["phase"] == "Pending"
    refused = finetune(
        storage={"uri": "s3://m/x", "credentialsSecret": "prod-admin"},
        resources={"image": "docker.io/evil/miner:1", "priorityClassName": "system-node-critical"},
    )
    plan = plan_reconcile(refused, [], [], strict, NOW)
    assert plan.create == [] and plan.launches == []
    assert (plan.status["phase"], plan.status["reason"]) == ("Failed", "PolicyRefused")
    for refused_setting in (
        "spec.resources.image: 'docker.io/evil/miner:1' is not allowed on this cluster",
        "spec.storage.credentialsSecret: 'prod-admin' is not allowed",
        "spec.resources.priorityClassName: 'system-node-critical' is not allowed",
    ):
        assert refused_setting in plan.status["message"]
    assert [event.type for event in plan.events][-1] == "Warning"


def test_a_spec_that_cannot_fit_its_gpus_fails_before_a_job_takes_them():
    fits = finetune(model={"base": "BAAI/bge-base-en-v1.5"}, resources={"gpusPerNode": 8, "gpuMemory": "80Gi"})
    assert plan_reconcile(fits, [], [], DEFAULTS, NOW).launches
    too_big = finetune(
        model={"base": "Qwen/Qwen3-Embedding-8B", "passageMaxLength": 1024},
        training={"batchSizePerDevice": 64},
        resources={"gpusPerNode": 8, "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4"}},
    )
    plan = plan_reconcile(too_big, [], [], DEFAULTS, NOW)
    assert plan.create == [] and plan.launches == []
    assert (plan.status["phase"], plan.status["reason"]) == ("Failed", "InsufficientGPUMemory")
    assert "GiB per GPU but spec.resources.nodeSelector[nvidia.com/gpu.product] is 22.4 GiB" in plan.status["message"]
    assert "it would fit with" in plan.status["message"]


@pytest.mark.parametrize(
    ("compare", "interval", "passed", "reason"),
    [
        ("delta", {"low": -0.01, "high": 0.07}, True, Reason.GATE_PASSED),
        ("lowerBound", {"low": -0.01, "high": 0.07}, False, Reason.GATE_NOT_MET),
        ("lowerBound", {"low": 0.025, "high": 0.07}, True, Reason.GATE_PASSED),
        ("lowerBound", None, None, Reason.METRICS_MISSING),
    ],
)
def test_the_gate_compares_the_delta_or_the_lower_bound_of_its_interval(compare, interval, passed, reason):
    gate = QualityGate(metric="ndcg@10", minImprovement=0.02, compare=compare)
    metrics = {"delta": {"ndcg@10": 0.03}, "deltaInterval": {"ndcg@10": interval} if interval else None}
    verdict, why, message = gate_verdict(gate, metrics)
    assert (verdict, why) == (passed, reason)
    if interval is not None:
        assert f"ndcg@10 changed by +0.0300 (95% interval {interval['low']:+.4f} to +0.0700)" in message
