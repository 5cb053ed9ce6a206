"""End to end on a kind cluster: both images built and loaded, MinIO and the chart installed,
a tiny CPU fine-tune to Succeeded with metrics, and a training pod killed mid-run whose run
resumes from its checkpoint. Everything is deleted afterwards (E2E_KEEP_CLUSTER=1 keeps it)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from support.chart import CHART, RELEASE, RELEASE_NAMESPACE, ROOT
from support.tiny import build_tiny_bert

E2E = Path(__file__).resolve().parent
CLUSTER = "embedtune-e2e"
NAMESPACE = "e2e"
BUCKET = "e2e"
OPERATOR_IMAGE, TRAINER_IMAGE = "embedtune-operator:e2e", "embedtune-trainer:e2e"
# Chart values, as `helm install --set` takes them: the images loaded into kind, the in-cluster MinIO.
CHART_VALUES = {
    "image.repository": OPERATOR_IMAGE.split(":")[0],
    "image.tag": OPERATOR_IMAGE.split(":")[1],
    "image.pullPolicy": "Never",
    "trainer.image": TRAINER_IMAGE,
    "storage.endpoint": f"http://minio.{NAMESPACE}.svc:9000",
    "storage.credentialsSecret": "minio-creds",
}

pytestmark = pytest.mark.timeout(3600)


def sh(*command: str, timeout: float = 600, stdin: str | None = None) -> str:
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, interval: float = 5.0):
    deadline = time.monotonic() + timeout
    while (result := check()) is None or result is False:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return result


@pytest.fixture(scope="session")
def kubeconfig(tmp_path_factory):
    path = tmp_path_factory.mktemp("kind") / "kubeconfig"
    sh("kind", "create", "cluster", "--name", CLUSTER, "--kubeconfig", str(path), "--wait", "180s")
    yield path
    if not os.environ.get("E2E_KEEP_CLUSTER"):
        sh("kind", "delete", "cluster", "--name", CLUSTER)


@pytest.fixture(scope="session")
def kubectl(kubeconfig):
    return lambda *args, **kwargs: sh("kubectl", "--kubeconfig", str(kubeconfig), *args, **kwargs)


@pytest.fixture(scope="session")
def images(kubeconfig):
    builds = {
        OPERATOR_IMAGE: ["-f", "operator/Dockerfile"],
        # a CPU torch keeps the image small; kind has no GPUs
        TRAINER_IMAGE: [
            "-f",
            "trainer/Dockerfile",
            "--build-arg",
            "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu",
        ],
    }
    for image, arguments in builds.items():
        sh("docker", "build", *arguments, "-t", image, str(ROOT), timeout=3600)
        sh("kind", "load", "docker-image", image, "--name", CLUSTER, timeout=1200)


@pytest.fixture(scope="session")
def s3(kubeconfig, kubectl, tmp_path_factory):
    """MinIO in the cluster, port-forwarded; the bucket holds the tiny model and the data."""
    import boto3

    kubectl("create", "namespace", NAMESPACE)
    kubectl("apply", "-f", str(E2E / "minio.yaml"))
    kubectl("-n", NAMESPACE, "rollout", "status", "deployment/minio", "--timeout=300s")
    credentials = yaml.safe_load((E2E / "minio.yaml").read_text())["stringData"]
    port = free_port()
    forward = subprocess.Popen(
        ["kubectl", "--kubeconfig", str(kubeconfig), "-n", NAMESPACE, "port-forward", "svc/minio", f"{port}:9000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
    )
    wait_for(lambda: _reachable(client), 60, "MinIO through the port-forward", interval=1)
    client.create_bucket(Bucket=BUCKET)
    client.upload_file(str(E2E / "data" / "train.jsonl"), BUCKET, "data/train.jsonl")
    model = build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
    for path in model.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"models/tiny-bert/{path.relative_to(model).as_posix()}")
    yield client
    forward.terminate()
    forward.wait()


def _reachable(client) -> bool:
    try:
        client.list_buckets()
    except Exception:  # the port-forward is not up yet
        return False
    return True


@pytest.fixture(scope="session")
def operator(kubeconfig, images, s3):
    settings = [argument for key, value in CHART_VALUES.items() for argument in ("--set", f"{key}={value}")]
    sh(
        "helm",
        "install",
        RELEASE,
        str(CHART),
        "--kubeconfig",
        str(kubeconfig),
        "--namespace",
        RELEASE_NAMESPACE,
        "--create-namespace",
        *settings,
        "--wait",
        "--timeout",
        "5m",
    )
    yield
    sh("helm", "uninstall", RELEASE, "--kubeconfig", str(kubeconfig), "--namespace", RELEASE_NAMESPACE, "--wait")


def apply_finetune(kubectl, name: str, **training) -> None:
    manifest = yaml.safe_load((E2E / "finetune.yaml").read_text())
    manifest["metadata"]["name"] = name
    manifest["spec"]["training"] |= training
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))


def status_of(kubectl, name: str) -> dict:
    return json.loads(kubectl("-n", NAMESPACE, "get", "embeddingfinetune", name, "-o", "json")).get("status") or {}


def finished(kubectl, name: str, timeout: float) -> dict:
    def check():
        status = status_of(kubectl, name)
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    return wait_for(check, timeout, f"{name} to finish")


def test_tiny_finetune_succeeds_with_metrics_in_status(kubectl, operator, s3):
    apply_finetune(kubectl, "tiny")
    status = finished(kubectl, "tiny", timeout=1200)
    assert status["phase"] == "Succeeded", status
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    for model in ("baseline", "finetuned"):
        assert 0.0 <= status["metrics"][model]["ndcg@10"] <= 1.0
    model_prefix = status["model"]["uri"].removeprefix(f"s3://{BUCKET}/")
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=model_prefix)["KeyCount"] > 0


def test_a_killed_training_pod_resumes_from_its_checkpoint(kubectl, operator):
    apply_finetune(kubectl, "tiny-resume", epochs=60)

    def checkpointed():
        status = status_of(kubectl, "tiny-resume")
        return status if status.get("phase") == "Training" and (status.get("checkpoint") or {}).get("step") else None

    checkpoint = wait_for(checkpointed, 1200, "a checkpoint of the first attempt")["checkpoint"]["step"]
    kubectl(
        "-n",
        NAMESPACE,
        "delete",
        "pod",
        "--wait=false",
        "--grace-period=0",
        "--force",
        "-l",
        "embedtune.io/finetune=tiny-resume,embedtune.io/role=train",
    )

    status = finished(kubectl, "tiny-resume", timeout=2400)
    assert status["phase"] == "Succeeded", status
    assert (status["training"]["attempt"], status["training"]["restarts"]) == (2, 1)
    logs = kubectl("-n", NAMESPACE, "logs", "job/tiny-resume-train-1-2")
    resumed = re.search(r"resumed encoder weights from \S*checkpoint-(\d+)", logs)
    assert resumed and int(resumed[1]) >= checkpoint, logs[-3000:]
