"""The e2e suite's own files, checked without a cluster: they would fail only late on kind."""

from __future__ import annotations

import yaml

from embedtune.operator.cli import build_parser, main
from support.chart import objects_of, render_chart, values_from_set

from .test_kind import CHART_VALUES, E2E, NAMESPACE, OPERATOR_IMAGE, TRAINER_IMAGE


def test_the_tiny_manifest_is_valid_and_runs_on_cpu(capsys):
    assert main(["validate", str(E2E / "finetune.yaml")]) == 0, capsys.readouterr().err
    manifest = yaml.safe_load((E2E / "finetune.yaml").read_text())
    assert manifest["metadata"]["namespace"] == NAMESPACE
    assert manifest["spec"]["resources"]["gpusPerNode"] == 0 and manifest["spec"]["evaluation"]["gpus"] == 0


def test_the_chart_values_point_the_operator_at_the_suites_minio_and_images():
    import kubernetes_validate

    objects = render_chart(values_from_set([f"{key}={value}" for key, value in CHART_VALUES.items()]))
    (deployment,) = objects_of(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == OPERATOR_IMAGE
    args = build_parser().parse_args(container["args"])
    assert args.trainer_image == TRAINER_IMAGE
    minio = {obj["kind"]: obj for obj in yaml.safe_load_all((E2E / "minio.yaml").read_text())}
    for obj in minio.values():
        kubernetes_validate.validate(obj, "1.37.0", strict=True)
    service = minio["Service"]["metadata"]
    assert args.storage_endpoint == f"http://{service['name']}.{service['namespace']}.svc:9000"
    assert args.storage_credentials_secret == minio["Secret"]["metadata"]["name"]
    assert minio["Secret"]["metadata"]["namespace"] == NAMESPACE  # where the job pods read it
