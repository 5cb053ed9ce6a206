"""Writing an EmbeddingFinetune's status from inside its pods.

The training job (progress, checkpoints) and the evaluation job (metrics) patch the
status subresource of the resource they work for; their service account may patch only
that. The operator owns the rest of the status and reads these sections (contract.py).
"""

from __future__ import annotations

import logging

from .contract import GROUP, PLURAL, VERSION, CheckpointStatus, RunIdentity, StatusMetrics, TrainingProgress

logger = logging.getLogger(__name__)


def _custom_objects_api():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def patch_resource_status(namespace: str, name: str, status: dict, *, api=None) -> None:
    """Merge `status` into the resource's status subresource."""
    api = api or _custom_objects_api()
    api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, {"status": status})


def patch_status_metrics(run: RunIdentity, metrics: StatusMetrics, *, api=None) -> None:
    """The evaluation's result into the resource's `status.metrics`; an unset section is sent
    as null, so the merge patch removes what an earlier run left there."""
    patch_resource_status(run.namespace, run.name, {"metrics": metrics.model_dump(by_alias=True)}, api=api)


class KubernetesStatusReporter:
    """A ProgressReporter that writes `status.training` and `status.checkpoint` for one run.

    Every patch carries the runId, so the operator can ignore reports of a superseded run."""

    def __init__(self, run: RunIdentity, *, api=None):
        self.run = run
        self.api = api or _custom_objects_api()

    def training_progress(self, progress: TrainingProgress) -> None:
        self._patch({"training": progress.model_copy(update={"run_id": self.run.run_id}).to_status()})

    def checkpoint_stored(self, step: int, uri: str) -> None:
        self._patch({"checkpoint": CheckpointStatus(step=step, uri=uri, run_id=self.run.run_id).to_dict()})

    def _patch(self, status: dict) -> None:
        patch_resource_status(self.run.namespace, self.run.name, status, api=self.api)
