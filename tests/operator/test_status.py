"""What the operator and the pods write into the status is what the typed status model (and so
the CRD's generated status schema) accepts: a run from start to a failed quality gate, then a
new run, with the pods' reports merged in as the API server merges them."""

import datetime

import jsonschema
import pytest
from pydantic import ValidationError

from embedtune.operator.crd import build_crd
from embedtune.operator.defaults import ClusterDefaults
from embedtune.operator.lifecycle import plan_reconcile
from embedtune.operator.local import merge_patch
from embedtune.operator.status import FinetuneStatus
from embedtune.trainer.contract import CheckpointStatus, MetricsReport, TrainingProgress
from support.finetunes import minimal_manifest

NOW = datetime.datetime(2026, 12, 4, 12, 0, tzinfo=datetime.UTC)


def finetune(generation, status, **spec):
    manifest = minimal_manifest("t", **spec)
    manifest["metadata"] |= {"uid": "u-1", "generation": generation}
    manifest["status"] = status
    return manifest


def job(plan, status):
    [created] = [obj for obj in plan.create if obj["kind"] == "Job"]
    return created | {"status": status}


DONE = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}


def statuses_of_two_runs():
    """Every status a gated run goes through, then those of two runs of later generations."""
    gate = {"evaluation": {"gate": {"metric": "ndcg@10", "minImprovement": 0.5}}}
    status, seen = {}, []

    def reconcile(generation, jobs, **spec):
        nonlocal status
        plan = plan_reconcile(finetune(generation, status, **(gate | spec)), jobs, [], ClusterDefaults("i"), NOW)
        status = merge_patch(status, plan.status)
        seen.append(status)
        return plan

    def report(section):  # what a pod patches
        nonlocal status
        status = merge_patch(status, section)
        seen.append(status)

    started = reconcile(1, [])
    training = job(started, {"active": 1})
    reconcile(1, [training])
    progress = TrainingProgress(
        step=5,
        total_steps=10,
        epoch=0.5,
        loss=0.7,
        learning_rate=1e-5,
        samples_per_second=3.5,
        eta_seconds=12.0,
        run_id=status["runId"],
    )
    report({"training": progress.to_status()})
    report({"checkpoint": CheckpointStatus(step=5, uri="s3://m/c", run_id=status["runId"]).to_dict()})
    evaluating = reconcile(1, [job(started, DONE)])
    metrics = MetricsReport(
        baseline={"ndcg@10": 0.5}, finetuned={"ndcg@10": 0.6}, delta={"ndcg@10": 0.1}, queries=3, corpus=9
    )
    report({"metrics": metrics.status().model_dump(by_alias=True)})
    reconcile(1, [job(started, DONE), job(evaluating, DONE)])
    reconcile(2, [], training={"maxSteps": 7})
    reconcile(3, [], training={"maxSteps": 8})  # replaces run 2 before it trained: no model, no metrics
    return seen


def test_every_status_of_a_run_fits_the_status_model_and_the_crd_schema():
    seen = statuses_of_two_runs()
    assert seen[-1]["phase"] == "Pending" and [entry["runId"][:2] for entry in seen[-1]["history"]] == ["2-", "1-"]
    assert seen[-1]["history"][1]["reason"] == "GateNotMet"
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    for status in seen:
        FinetuneStatus.model_validate(status)
        jsonschema.validate(status, schema)


def test_a_status_field_the_model_does_not_know_is_refused():
    status = statuses_of_two_runs()[-1]
    with pytest.raises(ValidationError):
        FinetuneStatus.model_validate(merge_patch(status, {"training": {"stepsDone": 3}}))
