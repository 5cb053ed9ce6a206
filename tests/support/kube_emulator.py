"""kmock's Kubernetes emulator, made to behave enough like an API server for kopf and kubectl.

kmock 0.8 stores and streams objects, but leaves out what the API server adds: identities
(uid, resourceVersion, generation, creationTimestamp, names from generateName), 201 on
create, label selectors, the status subresource's separation from the rest, discovery of
posted CRDs, the namespace list, `kind` in lists, JSON watch streams, and garbage collection through owner
references. Each gap is fixed here in the smallest way the operator's tests need.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import json
import uuid
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import dicts, enums, rendering

# Resources the operator and kopf talk to: discovery must list them before any object exists.
BUILTIN_RESOURCES = {
    "v1/namespaces": ("Namespace", False, ()),
    "v1/events": ("Event", True, ()),
    "v1/pods": ("Pod", True, ("status",)),
    "v1/services": ("Service", True, ("status",)),
    "v1/configmaps": ("ConfigMap", True, ()),
    "v1/secrets": ("Secret", True, ()),
    "v1/serviceaccounts": ("ServiceAccount", True, ()),
    "batch/v1/jobs": ("Job", True, ("status",)),
    "rbac.authorization.k8s.io/v1/roles": ("Role", True, ()),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", True, ()),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, ("status",)),
}
VERBS = {"create", "delete", "get", "list", "patch", "update", "watch"}


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class ApiServerEmulator(kmock.KubernetesEmulator):
    _versions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    _created_namespaces: set[str] = attrs.field(factory=set, init=False)
    # (method, path, query, User-Agent) of every request, for the RBAC tests; kmock's own log
    # is trimmed below.
    request_log: list[tuple[str, str, dict[str, str], str]] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, (kind, namespaced, subresources) in BUILTIN_RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, verbs=VERBS, subresources=subresources, singular=kind.lower()
            )
        # kubectl asks for discovery with a trailing slash.
        self.fallback["get /apis/"] << self._serve_apis

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        self.request_log.append(
            (raw_request.method, raw_request.path, dict(raw_request.query), raw_request.headers.get("User-Agent", ""))
        )
        # kmock cannot even parse the path of the cluster-wide namespace collection.
        if raw_request.path.rstrip("/") == "/api/v1/namespaces" and raw_request.method in ("GET", "POST"):
            return await self._serve_namespaces(raw_request)
        try:
            return await super().__call__(raw_request)
        finally:
            # kmock matches every request against its whole request log, so a long run slows
            # down quadratically; nothing here reads the log, so it keeps the requests in flight.
            self._requests[:] = [request for request in self._requests if request._raw_request is not raw_request]

    async def _serve_namespaces(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Every namespace holding an object is a namespace, and so is every one created
        (`kubectl create namespace`); none is ever removed."""
        if raw_request.method == "POST":
            namespace = await raw_request.json()
            namespace["metadata"] |= {
                "uid": str(uuid.uuid4()),
                "creationTimestamp": _now(),
                "resourceVersion": str(next(self._versions)),
            }
            self._created_namespaces.add(namespace["metadata"]["name"])
            return aiohttp.web.json_response(namespace, status=201)
        if raw_request.query.get("watch") in ("true", "1"):
            response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(raw_request)
            await asyncio.sleep(2)  # an empty watch that ends soon: the client simply watches again
            return response
        names = sorted(
            {namespace for (_, namespace, _), obj in self.objects.items() if namespace}
            | self._created_namespaces
            | {"default"}
        )
        return aiohttp.web.json_response(
            {
                "apiVersion": "v1",
                "kind": "NamespaceList",
                "metadata": {"resourceVersion": str(next(self._versions))},
                "items": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}} for name in names],
            }
        )

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None:
            await self._complete_request(request)
        response = await super()._handle(request)
        if request.resource is None:
            return response
        if request.action == enums.action.CREATE and response.status == 200:
            response.set_status(201)
        if (
            request.action == enums.action.LIST
            and request.resource.plural
            and isinstance(response, aiohttp.web.Response)
        ):
            response = self._as_list(request, response)
        if request.action == enums.action.WATCH:
            response.content_type = "application/json"
        if request.action == enums.action.CREATE and request.resource.plural == "customresourcedefinitions":
            self._discover_crd(request.data)
        if request.action in (enums.action.DELETE, enums.action.UPDATE) and self._gone(request):
            await self._collect_garbage()
        return response

    async def _complete_request(self, request: rendering.Request) -> None:
        """What the API server adds to a write: identity, versions, generation."""
        if request.action == enums.action.CREATE and isinstance(request.data, dict):
            metadata = request.data.setdefault("metadata", {})
            if request.namespace and self._is_namespaced(request):
                metadata.setdefault("namespace", request.namespace)
            if "name" not in metadata and "generateName" in metadata:
                metadata["name"] = metadata["generateName"] + uuid.uuid4().hex[:5]
            metadata.setdefault("uid", str(uuid.uuid4()))
            metadata.setdefault("creationTimestamp", _now())
            metadata["resourceVersion"] = str(next(self._versions))
            metadata["generation"] = 1
        elif request.action == enums.action.UPDATE and isinstance(request.data, dict):
            key = (request.resource, request.namespace, request.name)
            if key not in self.objects or self.objects[key].deleted:
                return
            current = self.objects[key].raw
            if request.subresource == "status":
                # The status subresource changes nothing else.
                for field in list(request.data):
                    if field != "status":
                        del request.data[field]
            elif "status" in request.data and self._has_status_subresource(request):
                del request.data["status"]
            changed = dicts.patch_dict(copy.deepcopy(current), request.data)
            metadata = request.data.setdefault("metadata", {})
            metadata["resourceVersion"] = str(next(self._versions))
            if changed.get("spec") != current.get("spec"):
                metadata["generation"] = current.get("metadata", {}).get("generation", 1) + 1

    def _gone(self, request: rendering.Request) -> bool:
        """Deleted by this request: directly, or by its removing the last finalizer."""
        key = (request.resource, request.namespace, request.name)
        return key in self.objects and self.objects[key].deleted

    def _is_namespaced(self, request: rendering.Request) -> bool:
        for resource in self.resources:
            if resource == request.resource:
                return self.resources[resource].namespaced is not False
        return True

    def _has_status_subresource(self, request: rendering.Request) -> bool:
        for resource in self.resources:
            if resource == request.resource:
                return "status" in self.resources[resource].subresources
        return False

    def _as_list(self, request: rendering.Request, response: aiohttp.web.Response) -> aiohttp.web.Response:
        """A typed list, filtered by equality label selectors."""
        body = json.loads(response.body)
        wanted = dict(term.split("=", 1) for term in request.params.get("labelSelector", "").split(",") if "=" in term)
        body["items"] = [
            item
            for item in body.get("items", [])
            if wanted.items() <= (item.get("metadata", {}).get("labels") or {}).items()
        ]
        kind = next((self.resources[r].kind for r in self.resources if r == request.resource), None)
        resource = request.resource
        body["kind"] = f"{kind}List" if kind else "List"
        body["apiVersion"] = f"{resource.group}/{resource.version}" if resource.group else resource.version
        return aiohttp.web.json_response(body, status=response.status)

    def _discover_crd(self, crd: dict[str, Any]) -> None:
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            if version.get("served", True):
                self.resources[f"{spec['group']}/{version['name']}/{names['plural']}"] = kmock.ResourceInfo(
                    kind=names["kind"],
                    singular=names.get("singular"),
                    namespaced=spec["scope"] == "Namespaced",
                    shortnames=names.get("shortNames", ()),
                    verbs=VERBS,
                    subresources=tuple(version.get("subresources", {})),
                )

    async def _collect_garbage(self) -> None:
        """Delete, transitively, every object whose owners are all gone (foreground-free GC)."""
        while True:
            alive = {obj.raw["metadata"].get("uid") for obj in self._live_objects()}
            orphans = [
                (key, obj)
                for key, obj in self.objects.items()
                if not obj.deleted
                for owners in [obj.raw.get("metadata", {}).get("ownerReferences", [])]
                if owners and not any(owner["uid"] in alive for owner in owners)
            ]
            if not orphans:
                return
            async with self._lock:
                for (resource, _, _), obj in orphans:
                    raw = obj.raw
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})

    def _live_objects(self):
        return [obj for obj in self.objects.values() if not obj.deleted]
