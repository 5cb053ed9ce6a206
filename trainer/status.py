"""Writing an EmbeddingFinetune's status from inside its pods.

The training job (progress, checkpoints) and the evaluation job (metrics) patch the
status subresource of the resource they work for; their service account may patch only
that. The operator owns the rest of the status and reads these fields.
"""

from __future__ import annotations

import logging

from .progress import TrainingProgress

logger = logging.getLogger(__name__)

GROUP = "embedtune.io"
VERSION = "v1alpha1"
PLURAL = "embeddingfinetunes"


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


class KubernetesStatusReporter:
    """A ProgressReporter that writes `status.training` and `status.checkpoint` for one run.

    Every patch carries the runId, so the operator can ignore reports of a superseded run."""

    def __init__(self, namespace: str, name: str, run_id: str, *, api=None):
        self.namespace, self.name, self.run_id = namespace, name, run_id
        self.api = api or _custom_objects_api()

    def training_progress(self, progress: TrainingProgress) -> None:
        self._patch({"training": progress.to_status() | {"runId": self.run_id}})

    def checkpoint_stored(self, step: int, uri: str) -> None:
        self._patch({"checkpoint": {"step": step, "uri": uri, "runId": self.run_id}})

    def _patch(self, status: dict) -> None:
        patch_resource_status(self.namespace, self.name, status, api=self.api)
