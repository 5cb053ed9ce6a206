"""The storage fault suite, `embedtune run` side: a whole run (tiny BERT on CPU, moto's S3
server behind a proxy the test switches off and on, tests/support/outage.py) with storage
down during a checkpoint upload, the model upload and the evaluation's metrics write, never
back, and back after 30 s (at a checkpoint upload and the metrics write). What was stored
stays intact, an unmarked checkpoint is never used, the run resumes from the last marked one,
every message names the last stored step, and the run ends cleanly in a truthful phase, also
when resource.yaml cannot be saved. The trainer side is tests/trainer/test_storage_faults.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from embedtune.trainer.checkpoints import CheckpointStore
from embedtune.trainer.config import StorageAccess
from embedtune.trainer.errors import EXIT_INPUT_ERROR, EXIT_STORAGE_UNAVAILABLE
from embedtune.trainer.layout import COMPLETE_MARKER, RunLayout
from embedtune.trainer.storage import open_storage
from support.outage import StorageOutage
from support.tiny import synthetic_records, write_jsonl

pytestmark = pytest.mark.storage_faults
OUTAGE_SECONDS = 30


@pytest.fixture
def outage(s3_endpoint):
    proxy = StorageOutage(s3_endpoint)
    yield proxy
    proxy.close()


def write_manifest(folder: Path, tiny_model: Path, storage: dict, *, max_steps: int) -> Path:
    write_jsonl(folder / "train.jsonl", synthetic_records(200, negatives=0))
    spec = {
        "model": {"base": str(tiny_model), "pooling": "mean", "queryMaxLength": 16, "passageMaxLength": 16},
        "data": {"train": ["train.jsonl"], "heldOutFraction": 0.1},
        "training": {"maxSteps": max_steps, "batchSizePerDevice": 8, "groupSize": 4, "precision": "fp32"},
        "checkpoint": {"everySteps": 10, "keep": 2},
        "evaluation": {"kValues": [1, 10]},
        "storage": storage,
        "runPolicy": {"maxRestarts": 0},
    }
    manifest = {"apiVersion": "embedtune.io/v1alpha1", "kind": "EmbeddingFinetune", "metadata": {"name": "tiny"}}
    path = folder / "finetune.yaml"
    path.write_text(yaml.safe_dump(manifest | {"spec": spec}))
    return path


def embedtune(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "embedtune.operator.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"OMP_NUM_THREADS": "1"} | env,
    )


def stored_run(storage) -> RunLayout:
    """The layout of the one run stored for default/tiny (its id has a digest of uid and spec)."""
    run_ids = {obj.key.split("/")[2].removeprefix("run-") for obj in storage.list("default/tiny") if "/run-" in obj.key}
    assert len(run_ids) == 1, run_ids
    return RunLayout("default", "tiny", run_ids.pop())


def stored_status(storage) -> dict:
    return yaml.safe_load(storage.read_bytes("default/tiny/resource.yaml"))["status"]


def ended_cleanly(result: subprocess.CompletedProcess, code: int) -> str:
    """The last line of stderr, once the run has exited with `code` and no traceback."""
    assert result.returncode == code, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_run_outlasts_outages_of_30_s_at_a_checkpoint_upload_and_at_the_metrics_write(
    tiny_model, tmp_path, s3_bucket, s3_endpoint, outage
):
    storage_uri = f"{s3_bucket}/runs"
    manifest = write_manifest(
        tmp_path, tiny_model, {"uri": storage_uri, "endpoint": outage.endpoint, "retrySeconds": 120}, max_steps=30
    )
    # The model upload takes the same path as a checkpoint's (Storage.upload_dir, then the marker)
    # in the same process: a third 30 s outage there would prove nothing more. The never-back test
    # covers what differs there, the message.
    for request in (rb"PUT /\S*/checkpoint-20/", rb"PUT /\S*/metrics\.json"):
        outage.cut_when(request, OUTAGE_SECONDS)
    result = embedtune("run", str(manifest), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(outage.begun) == 2, outage.begun
    assert "training waits for checkpoint-20 to be stored" in result.stderr  # not running ahead of storage
    storage = open_storage(storage_uri, StorageAccess(endpoint=s3_endpoint))
    status = stored_status(storage)
    assert (status["phase"], status["training"]["step"], status["checkpoint"]["step"]) == ("Succeeded", 30, 30)
    run = stored_run(storage)
    assert CheckpointStore(storage, run).complete_steps() == [30, 20]
    state = json.loads(storage.read_bytes(f"{run.checkpoint_prefix(30)}/trainer_state.json"))
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == list(range(10, 31, 10))
    assert storage.exists(f"{run.model_prefix}/{COMPLETE_MARKER}")
    finetuned = json.loads(storage.read_bytes(f"{run.run_prefix}/metrics.json"))["finetuned"]
    assert status["metrics"]["finetuned"] == {key: float(f"{value:.4g}") for key, value in finetuned.items()}


@pytest.mark.slow
def test_storage_that_never_comes_back_ends_each_stage_cleanly_and_the_run_resumes_from_what_is_stored(
    tiny_model, tmp_path, s3_bucket, s3_endpoint, outage
):
    storage_uri = f"{s3_bucket}/runs"
    manifest = write_manifest(
        tmp_path, tiny_model, {"uri": storage_uri, "endpoint": outage.endpoint, "retrySeconds": 2}, max_steps=50
    )
    storage = open_storage(storage_uri, StorageAccess(endpoint=s3_endpoint))
    work = tmp_path / "work"

    # 1. down at checkpoint 20's completion marker: its files are stored, it is not marked
    outage.cut_when(rb"PUT /\S*/checkpoint-20/_COMPLETE\.json", None)
    result = embedtune("run", str(manifest), "--work-dir", str(work), cwd=tmp_path)
    last_line = ended_cleanly(result, EXIT_STORAGE_UNAVAILABLE)
    run = stored_run(storage)
    store = CheckpointStore(storage, run)
    assert f"checkpoint-20 was not stored: storage {storage_uri} at {outage.endpoint} failed for 2 s" in result.stderr
    assert f"the last stored checkpoint is step 10 ({store.uri(10)}); running again resumes from it" in result.stderr
    assert last_line.startswith("storage unavailable: ") and "was not saved to" in last_line
    assert "the same command continues the run" in last_line
    # training waited at checkpoint 30 for checkpoint 20; it never trained on past it
    assert json.loads((work / "tiny-train-1-1" / "progress.json").read_text())["training"]["step"] <= 30
    outage.on()
    assert store.complete_steps() == [10] and storage.list(run.checkpoint_prefix(20))
    assert stored_status(storage)["phase"] == "Training"  # what was saved last: the run goes on

    # 2. down at the model upload
    outage.cut_when(rf"PUT /\S*/{run.run_prefix}/model/".encode(), None)
    result = embedtune("run", str(manifest), cwd=tmp_path)
    ended_cleanly(result, EXIT_STORAGE_UNAVAILABLE)
    assert "resuming from checkpoint 10" in result.stderr  # never from the unmarked checkpoint 20
    assert "the model was not stored: storage " in result.stderr
    assert f"the last stored checkpoint is step 50 ({store.uri(50)}); running again resumes from it" in result.stderr
    outage.on()
    assert store.complete_steps() == [50, 40] and not storage.exists(f"{run.model_prefix}/{COMPLETE_MARKER}")

    # 3. down at the evaluation's metrics write: the model is exported from checkpoint 50 alone
    outage.cut_when(rb"PUT /\S*/metrics\.json", None)
    result = embedtune("run", str(manifest), cwd=tmp_path)
    ended_cleanly(result, EXIT_STORAGE_UNAVAILABLE)
    assert "resuming from checkpoint 50" in result.stderr and "training finished" not in result.stderr
    assert f"storage unavailable: storage {storage_uri}/{run.run_prefix} at {outage.endpoint}" in result.stderr
    outage.on()
    assert storage.exists(f"{run.model_prefix}/{COMPLETE_MARKER}")
    assert stored_status(storage)["phase"] == "Evaluating"

    # 4. storage is back: the run ends where it stopped
    result = embedtune("run", str(manifest), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "training job" not in result.stderr
    status = stored_status(storage)
    assert (status["phase"], status["runId"]) == ("Succeeded", run.run_id)
    assert storage.exists(f"{run.run_prefix}/metrics.json")
    state = json.loads(storage.read_bytes(f"{run.checkpoint_prefix(50)}/trainer_state.json"))
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == list(range(10, 51, 10))


@pytest.mark.parametrize(
    "problem,code,message",
    [
        (
            "missing bucket",
            EXIT_INPUT_ERROR,
            "bucket 'no-such-bucket' does not exist at {endpoint}: create it, or fix the bucket name in "
            "spec.storage.uri",
        ),
        (
            "wrong secret",
            EXIT_INPUT_ERROR,
            "{endpoint} rejected the credentials (SignatureDoesNotMatch): fix AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY in the environment (on a cluster, the Secret named by "
            "spec.storage.credentialsSecret)",
        ),
        (
            "unreachable endpoint",
            EXIT_STORAGE_UNAVAILABLE,
            "storage unavailable: storage s3://{bucket}/runs at {endpoint} failed for 1 s "
            "(spec.storage.retrySeconds): Could not connect to the endpoint URL",
        ),
    ],
)
def test_storage_problems_end_in_one_line_naming_the_setting_and_never_print_the_credentials(
    tiny_model, tmp_path, s3_bucket, s3_endpoint, s3_user, outage, problem, code, message
):
    bucket = "no-such-bucket" if problem == "missing bucket" else s3_bucket.removeprefix("s3://")
    endpoint = outage.endpoint
    if problem == "unreachable endpoint":
        outage.off()
    storage = {"uri": f"s3://{bucket}/runs", "endpoint": endpoint, "retrySeconds": 1}
    manifest = write_manifest(tmp_path, tiny_model, storage, max_steps=10)
    credentials = s3_user | ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"} if problem == "wrong secret" else {})
    result = embedtune("-v", "run", str(manifest), cwd=tmp_path, **credentials)
    assert message.format(endpoint=endpoint, bucket=bucket) in ended_cleanly(result, code)
    # -v shows each storage operation, yet neither boto3 nor urllib3 prints the request headers
    assert f"DEBUG embedtune.trainer.storage: read runs/default/tiny/resource.yaml on {endpoint}" in result.stderr
    for secret in {s3_user["AWS_ACCESS_KEY_ID"], s3_user["AWS_SECRET_ACCESS_KEY"], "not-the-secret"}:
        assert secret not in result.stderr + result.stdout
