"""A cluster for the operator's integration tests: the emulated API server plus the test's
hands — applying manifests and playing the Job controller and the job pods."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

FINETUNES = "embedtune.io/v1alpha1/embeddingfinetunes"
JOBS = "batch/v1/jobs"
CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "embeddingfinetunes.embedtune.io.yaml"


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: emulator, cluster: {{server: "{server}"}}}}]
users: [{{name: tester, user: {{token: test-token}}}}]
contexts: [{{name: emulator, context: {{cluster: emulator, user: tester, namespace: default}}}}]
current-context: emulator
""")
    return path


class Cluster:
    def __init__(self, emulator, namespace: str = "default"):
        self.emulator = emulator
        self.namespace = namespace
        self.url = str(emulator.url).rstrip("/")

    # -- HTTP, so that watchers see every change ----------------------------------------

    async def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json"):
        async with aiohttp.ClientSession() as session:
            async with session.request(
                method, self.url + path, json=body, headers={"Content-Type": content_type}
            ) as response:
                payload = await response.json(content_type=None)
                if response.status >= 400:
                    raise AssertionError(f"{method} {path}: {response.status} {payload}")
                return payload

    def _path(self, resource: str, name: str | None = None) -> str:
        group_version, plural = resource.rsplit("/", 1)
        prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        path = f"{prefix}/namespaces/{self.namespace}/{plural}"
        return f"{path}/{name}" if name else path

    async def install_crd(self) -> None:
        import yaml

        await self.request(
            "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", yaml.safe_load(CRD_PATH.read_text())
        )

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", self._path(FINETUNES), manifest)

    async def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        await self.request("PATCH", self._path(FINETUNES, name), {"spec": spec}, "application/merge-patch+json")

    async def delete(self, name: str) -> None:
        await self.request("DELETE", self._path(FINETUNES, name))

    async def patch_status(self, resource: str, name: str, status: dict[str, Any]) -> None:
        await self.request(
            "PATCH", self._path(resource, name) + "/status", {"status": status}, "application/merge-patch+json"
        )

    # -- reading the emulator's store -----------------------------------------------------

    def objects(self, resource: str) -> list[dict[str, Any]]:
        group_version, plural = resource.rsplit("/", 1)
        return [
            obj.raw
            for (res, namespace, _), obj in self.emulator.objects.items()
            if not obj.deleted
            and res.plural == plural
            and namespace == self.namespace
            and f"{res.group}/{res.version}".lstrip("/") == group_version
        ]

    def get(self, resource: str, name: str) -> dict[str, Any] | None:
        return next((obj for obj in self.objects(resource) if obj["metadata"]["name"] == name), None)

    def status(self, name: str) -> dict[str, Any]:
        return (self.get(FINETUNES, name) or {}).get("status") or {}

    def job_names(self) -> list[str]:
        return sorted(job["metadata"]["name"] for job in self.objects(JOBS))

    def events(self, name: str) -> list[tuple[str, str]]:
        return [
            (event.get("reason"), event.get("message"))
            for event in self.objects("v1/events")
            if event.get("involvedObject", {}).get("name") == name
        ]

    async def eventually(self, check, timeout: float = 15.0, what: str = "condition") -> Any:
        """Wait until `check()` returns something truthy; the emulator serves while we wait."""
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    async def phase_becomes(self, name: str, phase: str, timeout: float = 15.0) -> dict[str, Any]:
        return await self.eventually(
            lambda: self.status(name) if self.status(name).get("phase") == phase else None,
            timeout,
            f"{name} phase {phase} (now {self.status(name).get('phase')})",
        )

    # -- playing the Job controller and the pods ------------------------------------------

    async def job_suspended(self, name: str, suspend: bool) -> None:
        """Kueue's part: admit a suspended Job (False), or preempt a running one (True: the Job
        controller then removes its pods)."""
        await self.request(
            "PATCH", self._path(JOBS, name), {"spec": {"suspend": suspend}}, "application/merge-patch+json"
        )
        if suspend:
            await self.patch_status(JOBS, name, {"active": 0, "ready": 0})

    async def job_running(self, name: str) -> None:
        await self.patch_status(JOBS, name, {"active": 1, "ready": 1})

    async def job_succeeded(self, name: str) -> None:
        await self.patch_status(
            JOBS,
            name,
            {"active": 0, "ready": 0, "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]},
        )

    async def job_failed(
        self,
        name: str,
        *,
        exit_code: int = 1,
        reason: str = "Error",
        message: str = "",
        job_reason: str = "BackoffLimitExceeded",
    ) -> None:
        """Pod 0 of the Job terminated as given, then the Job failed (backoffLimit 0)."""
        job = self.get(JOBS, name)
        container = job["spec"]["template"]["spec"]["containers"][0]["name"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{name}-0-abcde",
                "namespace": self.namespace,
                "labels": {**job["spec"]["template"]["metadata"]["labels"], "batch.kubernetes.io/job-name": name},
            },
            "status": {
                "phase": "Failed",
                "containerStatuses": [
                    {
                        "name": container,
                        "state": {"terminated": {"exitCode": exit_code, "reason": reason, "message": message}},
                    }
                ],
            },
        }
        await self.request("POST", self._path("v1/pods"), pod)
        await self.patch_status(
            JOBS,
            name,
            {
                "active": 0,
                "ready": 0,
                "failed": 1,
                "conditions": [{"type": "Failed", "status": "True", "reason": job_reason}],
            },
        )
