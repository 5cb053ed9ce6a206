import yaml

from embedtune.operator.cli import main
from support.finetunes import EXAMPLES, minimal_manifest


def write(tmp_path, *manifests):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump_all(manifests))
    return path


def test_validate_accepts_the_example(capsys):
    assert main(["validate", str(EXAMPLES / "finetune.yaml")]) == 0


def test_validate_lists_every_problem_and_exits_2(tmp_path, capsys):
    path = write(
        tmp_path,
        minimal_manifest(resources={"gpusPerNode": -1}),
        minimal_manifest(name="other", storage={"uri": "/local"}),
    )
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "spec.resources.gpusPerNode: Input should be greater than or equal to 0" in err
    assert "spec.storage.uri: must be an s3:// URI" in err


def test_validate_reports_unreadable_files(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_render_prints_every_object(capsys):
    assert main(["render", str(EXAMPLES / "finetune.yaml"), "--trainer-image", "r/t:1"]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [obj["kind"] for obj in objects] == [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Service",
        "ConfigMap",
        "Job",
        "Job",
    ]
    assert {obj["metadata"]["namespace"] for obj in objects} == {"ml"}
    assert objects[5]["spec"]["template"]["spec"]["containers"][0]["image"] == "r/t:1"
    assert objects[5]["spec"]["activeDeadlineSeconds"] == 86400
    assert yaml.safe_load(objects[4]["data"]["trainer.yaml"])["run"]["name"] == "finance-bge"


def test_render_applies_the_operators_storage_defaults(tmp_path, capsys):
    manifest = minimal_manifest(storage={"uri": "s3://models/x"})
    assert (
        main(
            [
                "render",
                str(write(tmp_path, manifest)),
                "--storage-endpoint",
                "http://minio.s3:9000",
                "--storage-credentials-secret",
                "cluster-creds",
            ]
        )
        == 0
    )
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    [config_map] = [obj for obj in objects if obj["kind"] == "ConfigMap"]
    assert yaml.safe_load(config_map["data"]["trainer.yaml"])["storage"]["endpoint"] == "http://minio.s3:9000"
    assert yaml.safe_load(config_map["data"]["evaluation.yaml"])["storage"]["endpoint"] == "http://minio.s3:9000"
    jobs = [obj for obj in objects if obj["kind"] == "Job"]
    assert [job["metadata"]["name"] for job in jobs] == ["tiny-train-1-1", "tiny-eval-1-1"]
    for job in jobs:  # the training Job and the evaluation Job alike
        env = job["spec"]["template"]["spec"]["containers"][0]["env"]
        assert {e["valueFrom"]["secretKeyRef"]["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})} == {
            "cluster-creds"
        }


def test_render_refuses_invalid_manifests(tmp_path, capsys):
    assert main(["render", str(write(tmp_path, minimal_manifest(resources={"nodes": 0})))]) == 2
    assert "spec.resources.nodes" in capsys.readouterr().err
