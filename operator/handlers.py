"""kopf handlers: thin triggers of one idempotent reconcile per EmbeddingFinetune.

The resource's own changes (create, spec update, operator resume) and every change of a Job
it owns lead to the same `reconcile`: read the resource, its Jobs and (for failures) their
pods, plan with `lifecycle.plan_reconcile`, then apply the plan. Reconciles of one resource
are serialized; the plan depends only on what was read, so repeats are harmless.
"""

from __future__ import annotations

import collections
import datetime
import logging
import threading
from typing import Any

import kopf

from embedtune.trainer.contract import GROUP, PLURAL, VERSION

from . import metrics
from .constants import (
    ANNOTATION_PREFIX,
    FINALIZER,
    LABEL_FINETUNE,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    RESYNC_SECONDS,
)
from .defaults import ClusterDefaults
from .failures import job_failed
from .kube import ChildConflict, Kube, new_api_client, owned_by
from .lifecycle import Plan, plan_conflict, plan_reconcile

logger = logging.getLogger(__name__)

# A child's name taken by an object that is not ours: try again after this long (the user
# deletes or renames it).
CONFLICT_RETRY_SECONDS = 30


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf's bookkeeping under our own names, in annotations (the status is the user's view).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-applied-spec"
    )
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.INFO
    memo.setdefault("defaults", ClusterDefaults())
    memo.kube = Kube(new_api_client())
    memo.locks = collections.defaultdict(threading.Lock)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # kopf's own readers: the client library's kubeconfig loader fixes KUBECONFIG at import.
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def finetune_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    reconcile(memo, namespace, name)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
def finetune_resync(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    # A safety net: a Job event whose reconcile failed is not retried by kopf.
    reconcile(memo, namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_FINETUNE: kopf.PRESENT})
def job_changed(type: str | None, namespace: str, labels: dict[str, str], memo: kopf.Memo, **_: Any) -> None:
    # The initial listing: the resources' resume handlers reconcile them anyway. An added Job
    # was created by a reconcile that has already accounted for it.
    if type in (None, "ADDED"):
        return
    reconcile(memo, namespace, labels[LABEL_FINETUNE])


def reconcile(memo: kopf.Memo, namespace: str, name: str) -> Plan | None:
    kube: Kube = memo.kube
    with memo.locks[(namespace, name)], metrics.reconciling():
        finetune = kube.get_finetune(namespace, name)
        if finetune is None or finetune["metadata"].get("deletionTimestamp"):
            metrics.forget(namespace, name)
            # a later reconcile of the same name makes a new lock; this one is no longer needed
            memo.locks.pop((namespace, name), None)
            return None  # deleted: the children go by their owner references
        selector = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_FINETUNE: name}
        # Only this resource's own Jobs: anything else with its labels is not ours to read.
        jobs = [
            job for job in kube.list("batch/v1", "Job", namespace, selector) if owned_by(job, finetune_uid(finetune))
        ]
        # Pods matter only to explain a failure; skip the listing otherwise.
        pods = kube.list("v1", "Pod", namespace, selector) if any(job_failed(job) for job in jobs) else []
        now = datetime.datetime.now(tz=datetime.UTC)
        plan = plan_reconcile(finetune, jobs, pods, memo.defaults, now)
        try:
            apply_plan(kube, finetune, plan)
        except ChildConflict as conflict:
            apply_plan(kube, finetune, plan_conflict(finetune, str(conflict), now))
            raise kopf.TemporaryError(str(conflict), delay=CONFLICT_RETRY_SECONDS) from conflict
        metrics.observe_plan(finetune, plan, now)
        return plan


def finetune_uid(finetune: dict[str, Any]) -> str:
    return finetune["metadata"]["uid"]


def apply_plan(kube: Kube, finetune: dict[str, Any], plan: Plan) -> None:
    namespace = finetune["metadata"]["namespace"]
    for job_name in plan.delete_jobs:
        kube.delete_job(namespace, job_name)
    for child in plan.create:
        kopf.adopt(child, owner=finetune)
        kube.create_if_absent(child)
    current = finetune.get("status") or {}
    changes = {key: value for key, value in plan.status.items() if current.get(key) != value}
    if changes:
        kube.patch_finetune_status(namespace, finetune["metadata"]["name"], changes)
    for event in plan.events:
        kopf.event(finetune, type=event.type, reason=event.reason.value, message=event.message)
