"""The GitOps examples: what Argo CD and Flux apply is valid, and what they show while a
resource trains, fails or succeeds follows from the status the operator really writes."""

from __future__ import annotations

import copy
import datetime
from pathlib import Path

import pytest
import yaml

from embedtune.operator.cli import main
from embedtune.operator.constants import API_VERSION, KIND
from embedtune.operator.defaults import ClusterDefaults
from embedtune.operator.lifecycle import plan_reconcile
from support.chart import ROOT
from support.finetunes import minimal_manifest

GITOPS = ROOT / "examples" / "gitops"
NOW = datetime.datetime(2026, 11, 22, 12, 0, tzinfo=datetime.UTC)
HEALTH_KEY = f"resource.customizations.health.{API_VERSION.split('/')[0]}_{KIND}"


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def reconciled(manifest: dict, jobs: list[dict] | None = None) -> tuple[dict, list[dict]]:
    """The manifest with the status the operator's next reconcile writes, and the objects it creates."""
    plan = plan_reconcile(manifest, jobs or [], [], ClusterDefaults("img"), NOW)
    result = copy.deepcopy(manifest)
    result["status"] = (manifest.get("status") or {}) | plan.status
    return result, plan.create


def with_job_status(job: dict, **status) -> dict:
    return job | {"status": status}


def resources_in_each_state() -> dict[str, dict]:
    """One resource per state Argo CD and Flux must tell apart, taken through the real planner."""
    manifest = minimal_manifest("gitops", evaluation={"enabled": False}, runPolicy={"historyLimit": 3})
    manifest["metadata"]["generation"] = 1
    pending, created = reconciled(manifest)
    job = next(obj for obj in created if obj["kind"] == "Job")
    training, _ = reconciled(pending, [with_job_status(job, active=2, ready=2)])
    succeeded, _ = reconciled(
        training, [with_job_status(job, succeeded=2, conditions=[{"type": "Complete", "status": "True"}])]
    )
    failed, _ = reconciled(
        training,
        [
            with_job_status(
                job, failed=1, conditions=[{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]
            )
        ],
    )
    suspend = copy.deepcopy(training)
    suspend["spec"]["runPolicy"]["suspend"] = True
    suspended, _ = reconciled(suspend, [with_job_status(job, active=2, ready=2)])
    # A new commit: the API server bumped the generation, the operator has not reconciled yet.
    committed = copy.deepcopy(succeeded)
    committed["metadata"]["generation"] = 2
    committed["spec"]["training"] = {"learningRate": 1e-4}
    retraining, _ = reconciled(committed)
    return {
        "pending": pending,
        "training": training,
        "succeeded": succeeded,
        "failed": failed,
        "suspended": suspended,
        "committed": committed,
        "retraining": retraining,
    }


STATES = resources_in_each_state()
ARGO_HEALTH = {
    "pending": "Progressing",
    "training": "Progressing",
    "succeeded": "Healthy",
    "failed": "Degraded",
    "suspended": "Suspended",
    "committed": "Progressing",
    "retraining": "Progressing",
}
KSTATUS = {
    "pending": "InProgress",
    "training": "InProgress",
    "succeeded": "Current",
    "failed": "Failed",
    "suspended": "InProgress",
    "committed": "InProgress",
    "retraining": "InProgress",
}


def test_the_states_are_the_ones_named():
    phases = {state: resource["status"]["phase"] for state, resource in STATES.items()}
    assert phases == {
        "pending": "Pending",
        "training": "Training",
        "succeeded": "Succeeded",
        "failed": "Failed",
        "suspended": "Suspended",
        "committed": "Succeeded",
        "retraining": "Pending",
    }
    assert [entry["runId"] for entry in STATES["retraining"]["status"]["history"]] == [
        STATES["succeeded"]["status"]["runId"]
    ]


def argo_health(resource: dict) -> dict:
    """Argo CD's way: the Lua script from argocd-cm, with the resource as the global `obj`."""
    import lupa

    (config_map,) = documents(GITOPS / "argocd" / "argocd-cm.yaml")
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(resource, recursive=True)
    result = lua.execute(config_map["data"][HEALTH_KEY])
    return {"status": result["status"], "message": result["message"]}


@pytest.mark.parametrize("state", STATES)
def test_argocd_health_check_reads_the_conditions(state):
    health = argo_health(STATES[state])
    assert health["status"] == ARGO_HEALTH[state], health
    if state not in ("committed",):
        assert STATES[state]["status"]["phase"] in health["message"]


def test_argocd_health_without_status_is_progressing():
    assert argo_health(minimal_manifest("fresh"))["status"] == "Progressing"


def kstatus(resource: dict) -> str:
    """kstatus's rules for a custom resource (sigs.k8s.io/cli-utils, what Flux's health checks use)."""
    status = resource.get("status") or {}
    if status.get("observedGeneration", resource["metadata"].get("generation")) != resource["metadata"].get(
        "generation"
    ):
        return "InProgress"
    conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
    if conditions.get("Reconciling") == "True":
        return "InProgress"
    if conditions.get("Stalled") == "True":
        return "Failed"
    if conditions.get("Ready") == "False":
        return "InProgress"
    return "Current"


@pytest.mark.parametrize("state", STATES)
def test_status_follows_kstatus_for_flux(state):
    assert kstatus(STATES[state]) == KSTATUS[state]


def test_argocd_application_syncs_the_valid_example_manifests(capsys):
    (application,) = documents(GITOPS / "argocd" / "application.yaml")
    assert application["kind"] == "Application"
    path = ROOT / application["spec"]["source"]["path"]
    manifests = sorted(path.glob("*.yaml"))
    assert manifests
    for manifest in manifests:
        # what `embedtune validate` checks before a commit
        assert main(["validate", str(manifest)]) == 0, capsys.readouterr().err
        assert {doc["metadata"]["namespace"] for doc in documents(manifest)} == {
            application["spec"]["destination"]["namespace"]
        }


def test_flux_kustomization_checks_the_health_of_every_finetune_it_applies():
    documents_by_kind = {doc["kind"]: doc for doc in documents(GITOPS / "flux" / "embedding-finetunes.yaml")}
    source, kustomization = documents_by_kind["GitRepository"], documents_by_kind["Kustomization"]
    assert kustomization["spec"]["sourceRef"] == {"kind": "GitRepository", "name": source["metadata"]["name"]}
    applied = [
        doc for manifest in sorted((ROOT / kustomization["spec"]["path"]).glob("*.yaml")) for doc in documents(manifest)
    ]
    checked = [
        (check["apiVersion"], check["kind"], check["name"], check["namespace"])
        for check in kustomization["spec"]["healthChecks"]
    ]
    assert sorted(checked) == sorted(
        (API_VERSION, KIND, doc["metadata"]["name"], doc["metadata"]["namespace"])
        for doc in applied
        if doc["kind"] == KIND
    )
