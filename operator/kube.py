"""The few API calls the operator makes, over the official client's REST layer, as plain dicts.

Creation is idempotent (409 means the object exists: done) and so is deletion (404: gone).
"""

from __future__ import annotations

import json
import os
from typing import Any

from embedtune.trainer.contract import GROUP, PLURAL, VERSION

_PLURALS = {
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Service": "services",
    "ConfigMap": "configmaps",
    "Job": "jobs",
    "Pod": "pods",
}


def new_api_client():
    """In-cluster credentials, else the kubeconfig (KUBECONFIG read now, not at import)."""
    from kubernetes import client, config

    try:
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    except config.ConfigException:
        return config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))


def _collection(api_version: str, kind_plural: str, namespace: str) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{kind_plural}"


class ChildConflict(Exception):
    """An object with a child's name exists and belongs to something else."""

    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name
        super().__init__(
            f"{kind} {name} already exists and does not belong to this EmbeddingFinetune; delete or rename it "
            "(the operator never uses objects it did not create)"
        )


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


class Kube:
    def __init__(self, api_client):
        self.api_client = api_client

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        request = self.api_client.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            body=body,
            header_params={"Accept": "application/json", "Content-Type": content_type},
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*request)
        response.read()
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=response.data.decode(errors="replace"), data=None)
        return json.loads(response.data or b"{}")

    def create_if_absent(self, obj: dict[str, Any]) -> bool:
        """True if created now, False if it existed already as this owner's child; an object of
        that name that belongs to someone else is a ChildConflict, never taken over."""
        from kubernetes.client.exceptions import ApiException

        path = _collection(obj["apiVersion"], _PLURALS[obj["kind"]], obj["metadata"]["namespace"])
        try:
            self._call("POST", path, obj)
        except ApiException as exc:
            if exc.status != 409:
                raise
            existing = self._call("GET", f"{path}/{obj['metadata']['name']}")
            if not any(owned_by(existing, ref["uid"]) for ref in obj["metadata"].get("ownerReferences", [])):
                raise ChildConflict(obj["kind"], obj["metadata"]["name"]) from exc
            return False
        return True

    def delete_job(self, namespace: str, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        # Background propagation removes the Job's pods too.
        try:
            self._call(
                "DELETE", f"{_collection('batch/v1', 'jobs', namespace)}/{name}", {"propagationPolicy": "Background"}
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def list(self, api_version: str, kind: str, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{key}={value}" for key, value in labels.items())
        path = _collection(api_version, _PLURALS[kind], namespace)
        return self._call("GET", path, query={"labelSelector": selector}).get("items", [])

    def get_finetune(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._call("GET", f"{_collection(f'{GROUP}/{VERSION}', PLURAL, namespace)}/{name}")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_finetune_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        path = f"{_collection(f'{GROUP}/{VERSION}', PLURAL, namespace)}/{name}/status"
        self._call("PATCH", path, {"status": status}, content_type="application/merge-patch+json")
