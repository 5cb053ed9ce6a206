"""The RBAC rules the operator needs: the one list the Helm chart's roles must equal.

The tests hold it to the requests the operator really makes against the emulated API server,
and to the rules it grants the job pods (Kubernetes refuses to let anyone create a Role that
grants more than they hold themselves).
"""

from __future__ import annotations

from dataclasses import dataclass

from embedtune.trainer.contract import GROUP, PLURAL

PEERING_GROUP = "kopf.dev"


@dataclass(frozen=True)
class Rule:
    api_group: str
    resources: tuple[str, ...]
    verbs: tuple[str, ...]

    def as_rbac(self) -> dict[str, list[str]]:
        return {"apiGroups": [self.api_group], "resources": list(self.resources), "verbs": list(self.verbs)}


# In every served namespace.
NAMESPACED_RULES = (
    # kopf watches the resources and patches its finalizer and annotations; a reconcile reads one.
    Rule(GROUP, (PLURAL,), ("get", "list", "watch", "patch")),
    # The operator patches status; `get` is held only to grant it to the job pods.
    Rule(GROUP, (f"{PLURAL}/status",), ("get", "patch")),
    # `get`: a child's name already taken is checked for our owner reference (never used otherwise).
    Rule("batch", ("jobs",), ("get", "list", "watch", "create", "delete")),
    # A failed Job's pods explain the failure.
    Rule("", ("pods",), ("list",)),
    # The children of a run; they go with the resource by owner references, never deleted here.
    Rule("", ("configmaps", "serviceaccounts", "services"), ("get", "create")),
    Rule("rbac.authorization.k8s.io", ("rolebindings", "roles"), ("get", "create")),
    Rule("", ("events",), ("create",)),
)

# Cluster-scoped, whatever the served namespaces: kopf follows the CRDs it serves.
CLUSTER_RULES = (Rule("apiextensions.k8s.io", ("customresourcedefinitions",), ("list", "watch")),)

# Only when the operator serves listed namespaces: kopf lists them to see which exist.
NAMESPACE_LIST_RULES = (Rule("", ("namespaces",), ("list", "watch")),)

# With --peering: the peering object of the operator's scope.
CLUSTER_PEERING_RULES = (Rule(PEERING_GROUP, ("clusterkopfpeerings",), ("list", "watch", "patch")),)
NAMESPACED_PEERING_RULES = (Rule(PEERING_GROUP, ("kopfpeerings",), ("list", "watch", "patch")),)


def operator_rules(*, clusterwide: bool, peering: bool) -> tuple[tuple[Rule, ...], tuple[Rule, ...]]:
    """(rules held in each served namespace, rules held cluster-wide) for one way of running.

    Cluster-wide, everything is one ClusterRole; with listed namespaces, a Role in each.
    """
    if clusterwide:
        return (), NAMESPACED_RULES + CLUSTER_RULES + (CLUSTER_PEERING_RULES if peering else ())
    namespaced = NAMESPACED_RULES + (NAMESPACED_PEERING_RULES if peering else ())
    return namespaced, CLUSTER_RULES + NAMESPACE_LIST_RULES
