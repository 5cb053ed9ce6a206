"""The Helm chart: lint, render with several value sets, Kubernetes schemas, RBAC, the operator's flags."""

from __future__ import annotations

import argparse

import pytest

from embedtune.operator.cli import build_parser
from embedtune.operator.permissions import operator_rules
from support.chart import CHART, RELEASE_NAMESPACE, ROOT, objects_of, render_chart

VALUE_SETS = {
    "defaults": {},
    "listed namespaces, peering, storage defaults, ServiceMonitor": {
        "watchNamespaces": ["ml", "search"],
        "highAvailability": {"peering": {"enabled": True}, "priorityClassName": "system-cluster-critical"},
        "storage": {"endpoint": "http://minio.minio:9000", "credentialsSecret": "s3-creds"},
        "trainer": {"image": "registry.example/embedtune-trainer:0.1.0"},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "policy": {
            "allowedImagePrefixes": ["registry.example/", "ghcr.io/embedtune/"],
            "allowedCredentialsSecrets": ["s3-creds"],
            "allowedPriorityClasses": ["batch-low"],
        },
    },
    "cluster-wide peering, no metrics, existing service account": {
        "highAvailability": {"peering": {"enabled": True}},
        "metrics": {"enabled": False},
        "serviceAccount": {"create": False, "name": "platform-operator"},
        "image": {"tag": "0.1.0-rc1"},
    },
}
# Kinds from other CRDs: the Prometheus operator's and kopf's; Kubernetes ships no schema for them.
CUSTOM_KINDS = {"ServiceMonitor", "KopfPeering", "ClusterKopfPeering"}
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas known.
KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")


def operator_container(objects) -> dict:
    (deployment,) = objects_of(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def operator_args(objects) -> argparse.Namespace:
    """The Deployment's args, parsed by the real CLI: a flag the operator lacks fails here."""
    return build_parser().parse_args(operator_container(objects)["args"])


def test_chart_crds_are_the_top_level_crds_byte_for_byte():
    top_level = {path.name: path.read_bytes() for path in (ROOT / "crds").iterdir()}
    in_chart = {path.name: path.read_bytes() for path in (CHART / "crds").iterdir()}
    assert in_chart == top_level


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS)
def test_chart_lints_without_warnings(values):
    import helm_python

    report = helm_python.lint(CHART, values, strict=True, namespace=RELEASE_NAMESPACE, kube_version="v1.27.0")
    # severity 1 is information (e.g. "icon is recommended"); 2 warning, 3 error
    problems = [message for message in report["messages"] if message["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS)
def test_rendered_objects_match_the_kubernetes_schemas(values):
    import kubernetes_validate
    import yaml

    crds = [obj for path in sorted((CHART / "crds").iterdir()) for obj in yaml.safe_load_all(path.read_text())]
    objects = render_chart(values) + crds
    for version in KUBERNETES_VERSIONS:
        for obj in objects:
            if obj["kind"] not in CUSTOM_KINDS:
                kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS)
def test_rbac_is_exactly_the_operators_declared_rules(values):
    objects = render_chart(values)
    args = operator_args(objects)
    in_namespaces, cluster_wide = operator_rules(clusterwide=not args.namespace, peering=args.peering is not None)
    (cluster_role,) = objects_of(objects, "ClusterRole")
    assert cluster_role["rules"] == [rule.as_rbac() for rule in cluster_wide]
    roles = objects_of(objects, "Role")
    assert sorted(role["metadata"]["namespace"] for role in roles) == sorted(args.namespace)
    for role in roles:
        assert role["rules"] == [rule.as_rbac() for rule in in_namespaces]
    (deployment,) = objects_of(objects, "Deployment")
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    for binding in objects_of(objects, "ClusterRoleBinding") + objects_of(objects, "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": RELEASE_NAMESPACE}]
        assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]


def test_values_become_the_operators_flags():
    values = VALUE_SETS["listed namespaces, peering, storage defaults, ServiceMonitor"]
    args = operator_args(render_chart(values))
    assert args.namespace == ["ml", "search"] and not args.all_namespaces
    assert args.trainer_image == "registry.example/embedtune-trainer:0.1.0"
    assert (args.storage_endpoint, args.storage_credentials_secret) == ("http://minio.minio:9000", "s3-creds")
    assert args.peering == "embedtune"
    from embedtune.operator.defaults import ClusterDefaults, ClusterPolicy

    assert ClusterDefaults.from_args(args).policy == ClusterPolicy(
        ("registry.example/", "ghcr.io/embedtune/"), ("s3-creds",), ("batch-low",)
    )

    defaults = operator_args(render_chart())
    assert defaults.all_namespaces and defaults.peering is None
    assert (defaults.storage_endpoint, defaults.storage_credentials_secret) == (None, None)
    assert ClusterDefaults.from_args(defaults).policy == ClusterPolicy()  # by default, anything


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS)
def test_probe_and_metrics_ports_are_the_ones_the_operator_serves(values):
    objects = render_chart(values)
    args, container = operator_args(objects), operator_container(objects)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["healthz"] == args.liveness_port and container["livenessProbe"]["httpGet"]["port"] == "healthz"
    services = objects_of(objects, "Service")
    if args.metrics_port:
        assert ports["metrics"] == args.metrics_port
        (service,) = services
        assert service["spec"]["ports"][0]["targetPort"] == "metrics"
        assert (
            service["spec"]["selector"].items()
            <= objects_of(objects, "Deployment")[0]["spec"]["template"]["metadata"]["labels"].items()
        )
    else:
        assert "metrics" not in ports and not services
    monitors = objects_of(objects, "ServiceMonitor")
    assert len(monitors) == (1 if values.get("metrics", {}).get("serviceMonitor", {}).get("enabled") else 0)


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS)
def test_operator_runs_non_root_on_a_read_only_root_filesystem(values):
    objects = render_chart(values)
    (deployment,) = objects_of(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = operator_container(objects)
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert not container["securityContext"]["allowPrivilegeEscalation"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # kopf has no leader election: one replica, and a rollout never runs two at once
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"


def test_peering_objects_follow_the_operators_scope():
    namespaced = render_chart(VALUE_SETS["listed namespaces, peering, storage defaults, ServiceMonitor"])
    assert sorted(obj["metadata"]["namespace"] for obj in objects_of(namespaced, "KopfPeering")) == ["ml", "search"]
    assert not objects_of(namespaced, "ClusterKopfPeering")
    clusterwide = render_chart(VALUE_SETS["cluster-wide peering, no metrics, existing service account"])
    assert [obj["metadata"]["name"] for obj in objects_of(clusterwide, "ClusterKopfPeering")] == ["embedtune"]
    assert not objects_of(render_chart(), "ClusterKopfPeering")


def test_service_account_is_created_unless_an_existing_one_is_named():
    assert [sa["metadata"]["name"] for sa in objects_of(render_chart(), "ServiceAccount")] == ["embedtune"]
    objects = render_chart(VALUE_SETS["cluster-wide peering, no metrics, existing service account"])
    assert not objects_of(objects, "ServiceAccount")
    assert objects_of(objects, "Deployment")[0]["spec"]["template"]["spec"]["serviceAccountName"] == "platform-operator"


def test_namespace_globs_are_refused_with_a_reason():
    import helm_python

    with pytest.raises(helm_python.HelmError, match="is a glob"):
        render_chart({"watchNamespaces": ["ml-*"]})


def test_misspelled_values_are_refused_by_the_schema():
    import helm_python

    with pytest.raises(helm_python.HelmError, match="watchNamespace"):
        render_chart({"watchNamespace": ["ml"]})
    with pytest.raises(helm_python.HelmError, match="pullPolicy"):
        render_chart({"image": {"pullPolicy": "Sometimes"}})
