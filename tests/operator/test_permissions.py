"""The operator's RBAC rules (embedtune.operator.permissions) against what it really does.

The real operator runs one resource through every code path that calls the API (create,
infrastructure failure, a spec change that replaces the Job, evaluation, deletion) against
the emulated API server; every request it sends must be allowed by the declared rules, and
every declared rule must be used, or be one the operator grants the job pods (Kubernetes lets
it create a Role only with permissions it holds itself).
"""

from __future__ import annotations

import asyncio
from urllib.parse import unquote

import pytest
import yaml
from kopf.testing import KopfRunner

from embedtune.operator.permissions import operator_rules
from embedtune.operator.render import Run, build_status_role
from embedtune.operator.spec import parse_finetune
from support.cluster import CRD_PATH, FINETUNES, JOBS
from support.finetunes import minimal_manifest

EMULATOR = pytest.mark.kmock(cls=__import__("support.kube_emulator", fromlist=["x"]).ApiServerEmulator)

PEERING_CRDS = CRD_PATH.parent / "kopfpeerings.kopf.dev.yaml"
PEERING_NAME = "embedtune"
# The operator's own clients: kopf, and the Kubernetes client library under operator/kube.py.
# The test's hands (aiohttp) and kubectl send other User-Agents.
OPERATOR_USER_AGENTS = ("kopf/", "OpenAPI-Generator/")
# The kopf command line of `embedtune operator` (operator/main.py) in each way of running it.
MODES = {
    "cluster-wide": (True, False, ["--all-namespaces", "--standalone"]),
    "listed namespace with peering": (False, True, ["--namespace", "default", "--peering", PEERING_NAME]),
}


def rule_triples(rules) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of RBAC rules, given as dicts or `permissions.Rule`s."""
    triples = set()
    for rule in rules:
        rule = rule if isinstance(rule, dict) else rule.as_rbac()
        triples |= {
            (group, resource, verb)
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
    return triples


def request_triple(method: str, path: str, query: dict[str, str]) -> tuple[bool, tuple[str, str, str]] | None:
    """(namespaced?, (apiGroup, resource, verb)) of a resource request; None for discovery."""
    parts = [unquote(part) for part in path.strip("/").split("/")]
    group, rest = ("", parts[2:]) if parts[0] == "api" else ("/".join(parts[1:2]), parts[3:])
    if not rest:
        return None
    namespaced = len(rest) >= 3 and rest[0] == "namespaces"
    if namespaced:
        rest = rest[2:]
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    named = len(rest) > 1
    verb = {
        "GET": "get" if named else ("watch" if query.get("watch") in ("true", "1") else "list"),
        "POST": "create",
        "PATCH": "patch",
        "PUT": "update",
        "DELETE": "delete" if named else "deletecollection",
    }[method]
    return namespaced, (group, resource, verb)


def test_request_triples_name_scope_resource_and_verb():
    assert request_triple("GET", "/apis/batch/v1/jobs", {"watch": "true"}) == (False, ("batch", "jobs", "watch"))
    assert request_triple("GET", "/api/v1/namespaces", {}) == (False, ("", "namespaces", "list"))
    assert request_triple("PATCH", "/apis/embedtune.io/v1alpha1/namespaces/ml/embeddingfinetunes/a/status", {}) == (
        True,
        ("embedtune.io", "embeddingfinetunes/status", "patch"),
    )
    assert request_triple("POST", "/api/v1/namespaces/ml/events", {}) == (True, ("", "events", "create"))
    assert request_triple("GET", "/apis/batch/v1", {}) is None
    assert request_triple("GET", "/apis", {}) is None


async def exercise_every_api_call(cluster) -> None:
    # a Job of another owner already has the name of the run's first Job: a conflict until removed
    foreign = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "rbac-train-1-1"},
        "spec": {"template": {"spec": {"containers": [{"name": "x", "image": "x"}], "restartPolicy": "Never"}}},
    }
    await cluster.request("POST", cluster._path(JOBS), foreign)
    await cluster.apply(minimal_manifest("rbac", runPolicy={"maxRestarts": 1}))
    await cluster.eventually(lambda: cluster.status("rbac").get("reason") == "ChildConflict", what="conflict")
    await cluster.request("DELETE", cluster._path(JOBS, "rbac-train-1-1"))
    await cluster.eventually(
        lambda: (cluster.get(JOBS, "rbac-train-1-1") or {}).get("metadata", {}).get("ownerReferences"),
        what="training job",
    )
    await cluster.job_running("rbac-train-1-1")
    await cluster.job_failed("rbac-train-1-1", exit_code=137, reason="OOMKilled")  # the pods are read
    await cluster.eventually(lambda: cluster.get(JOBS, "rbac-train-1-2"), what="second attempt")
    await cluster.job_running("rbac-train-1-2")
    await cluster.patch_spec("rbac", {"training": {"learningRate": 1e-4}})  # the running Job is deleted
    await cluster.eventually(lambda: cluster.get(JOBS, "rbac-train-1-2") is None, what="superseded job deleted")
    await cluster.eventually(lambda: cluster.get(JOBS, "rbac-train-2-1"), what="job of the new run")
    await cluster.job_succeeded("rbac-train-2-1")
    await cluster.eventually(lambda: cluster.get(JOBS, "rbac-eval-2-1"), what="evaluation job")
    await cluster.patch_status(FINETUNES, "rbac", {"metrics": {"finetuned": {"ndcg@10": 0.5}}})
    await cluster.job_succeeded("rbac-eval-2-1")
    await cluster.phase_becomes("rbac", "Succeeded")
    await cluster.delete("rbac")
    await cluster.eventually(lambda: cluster.get(FINETUNES, "rbac") is None, what="finalizer removed")


@pytest.mark.asyncio
@pytest.mark.timeout(120)
@EMULATOR
@pytest.mark.parametrize("mode", MODES)
async def test_the_operator_uses_exactly_the_declared_rules(cluster, mode, monkeypatch):
    from embedtune.operator import handlers

    monkeypatch.setattr(handlers, "CONFLICT_RETRY_SECONDS", 1)
    clusterwide, peering, kopf_args = MODES[mode]
    if peering:
        for crd in yaml.safe_load_all(PEERING_CRDS.read_text()):
            await cluster.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
        await cluster.request(
            "POST",
            "/apis/kopf.dev/v1/namespaces/default/kopfpeerings",
            {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING_NAME}},
        )
    runner = KopfRunner(["run", *kopf_args, "-m", "embedtune.operator.handlers"], timeout=30)
    await asyncio.to_thread(runner.__enter__)
    try:
        await exercise_every_api_call(cluster)
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)
    assert runner.exception is None, runner.output

    requests = {
        request_triple(method, path, query)
        for method, path, query, agent in cluster.emulator.request_log
        if agent.startswith(OPERATOR_USER_AGENTS)
    } - {None}
    in_namespaces, cluster_wide = operator_rules(clusterwide=clusterwide, peering=peering)
    held_in_namespaces, held_cluster_wide = rule_triples(in_namespaces), rule_triples(cluster_wide)
    refused = {
        (namespaced, triple)
        for namespaced, triple in requests
        if triple not in held_cluster_wide and not (namespaced and triple in held_in_namespaces)
    }
    assert not refused, f"requests the declared rules do not allow: {sorted(refused)}"
    used = {triple for _, triple in requests}
    granted_to_job_pods = rule_triples(
        build_status_role(parse_finetune(minimal_manifest()), Run("default", "rbac", "1"))["rules"]
    )
    unused = (held_in_namespaces | held_cluster_wide) - used - granted_to_job_pods
    assert not unused, f"declared rules the operator never needed: {sorted(unused)}"


def test_the_operator_holds_what_it_grants_the_job_pods():
    granted = rule_triples(build_status_role(parse_finetune(minimal_manifest()), Run("ml", "x", "1"))["rules"])
    for clusterwide in (True, False):
        in_namespaces, cluster_wide = operator_rules(clusterwide=clusterwide, peering=False)
        assert granted <= rule_triples(in_namespaces) | rule_triples(cluster_wide)
