"""The storage fault suite, trainer side: S3 (moto's server) behind a proxy the test switches
off and on (tests/support/outage.py). What was stored stays intact, an unmarked checkpoint is
never used, training runs at most one checkpoint interval ahead of storage, and an outage
longer than the retry window fails with a message naming the last stored checkpoint. The
`embedtune run` side, with the model upload and the evaluation's metrics write, is
tests/operator/test_local_storage_faults.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from embedtune.trainer.checkpoints import CheckpointStore, CheckpointUploader
from embedtune.trainer.config import StorageAccess
from embedtune.trainer.errors import StorageUnavailable
from embedtune.trainer.layout import RunLayout
from embedtune.trainer.storage import open_storage
from support.outage import StorageOutage
from support.processes import wait_for_training_step
from support.tiny import synthetic_records, write_jsonl

pytestmark = pytest.mark.storage_faults
RUN = RunLayout("ml", "tiny", "1")


@pytest.fixture
def outage(s3_endpoint):
    proxy = StorageOutage(s3_endpoint)
    yield proxy
    proxy.close()


def _checkpoint(root, step):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(f"weights {step}".encode())
    return folder


def test_an_operation_outlasts_an_outage_longer_than_botocores_own_retries(outage, s3_bucket, s3_endpoint):
    storage = open_storage(f"{s3_bucket}/runs", StorageAccess(endpoint=outage.endpoint, retry_seconds=60))
    storage.write_bytes("before", b"stored before")
    # botocore alone gives up within 3 s (3 attempts), and at once when its retry quota is spent
    outage.cut_when(rb"PUT /\S*/during ", outage_seconds=5)
    storage.write_bytes("during", b"stored once storage is back")
    assert outage.begun, "the outage never began"
    direct = open_storage(f"{s3_bucket}/runs", StorageAccess(endpoint=s3_endpoint))
    assert direct.read_bytes("before") == b"stored before"
    assert direct.read_bytes("during") == b"stored once storage is back"


def test_storage_down_for_the_whole_window_raises_storage_unavailable_naming_the_settings(outage, s3_bucket):
    storage = open_storage(f"{s3_bucket}/runs", StorageAccess(endpoint=outage.endpoint, retry_seconds=2))
    outage.off()
    with pytest.raises(StorageUnavailable) as raised:
        storage.write_bytes("k", b"x")
    message = str(raised.value)
    assert f"{s3_bucket}/runs at {outage.endpoint} failed for 2 s (spec.storage.retrySeconds)" in message
    assert "check spec.storage.endpoint" in message


def test_the_next_save_waits_for_the_checkpoint_in_flight(outage, s3_bucket, s3_endpoint, tmp_path):
    uri = f"{s3_bucket}/ckpt"
    store = CheckpointStore(open_storage(uri, StorageAccess(endpoint=outage.endpoint, retry_seconds=60)), RUN)
    stored = CheckpointStore(open_storage(uri, StorageAccess(endpoint=s3_endpoint)), RUN)
    uploader = CheckpointUploader(store, tmp_path / "staging", node_rank=0, num_nodes=1, keep=5)
    uploader.submit(2, _checkpoint(tmp_path, 2))
    outage.cut_when(rb"PUT /\S*/checkpoint-4/", outage_seconds=5)
    uploader.submit(4, _checkpoint(tmp_path, 4))  # waits for checkpoint 2 only; 4 uploads while training goes on
    uploader.submit(6, _checkpoint(tmp_path, 6))  # training pauses here until storage has checkpoint 4
    assert outage.begun
    # checkpoint 4 is stored by the time submit(6) returns; 6 (9 bytes) may already be, too
    assert stored.complete_steps()[-2:] == [4, 2]
    uploader.close()
    assert stored.complete_steps() == [6, 4, 2] and uploader.stored_step == 6


def test_a_checkpoint_storage_never_took_fails_the_next_save_naming_the_last_stored_one(
    outage, s3_bucket, s3_endpoint, tmp_path
):
    uri = f"{s3_bucket}/ckpt"
    store = CheckpointStore(open_storage(uri, StorageAccess(endpoint=outage.endpoint, retry_seconds=2)), RUN)
    stored = CheckpointStore(open_storage(uri, StorageAccess(endpoint=s3_endpoint)), RUN)
    uploader = CheckpointUploader(store, tmp_path / "staging", node_rank=0, num_nodes=1, keep=5)
    uploader.submit(2, _checkpoint(tmp_path, 2))
    # the files arrive, the completion marker does not: checkpoint 4 must never count
    outage.cut_when(rb"PUT /\S*/checkpoint-4/_COMPLETE\.json", outage_seconds=None)
    uploader.submit(4, _checkpoint(tmp_path, 4))
    with pytest.raises(StorageUnavailable) as raised:
        uploader.submit(6, _checkpoint(tmp_path, 6))
    assert str(raised.value).startswith("checkpoint-4 was not stored: storage ")
    assert str(raised.value).endswith(
        f"the last stored checkpoint is step 2 ({stored.uri(2)}); running again resumes from it"
    )
    uploader.close()
    outage.on()
    assert stored.storage.list(RUN.checkpoint_prefix(4)), "checkpoint 4's files were uploaded"
    assert stored.complete_steps() == [2]  # but it is not marked, so it does not count
    assert stored.storage.list(RUN.checkpoint_prefix(6)) == []  # one upload in flight, never two
    step, path = stored.download_latest(tmp_path / "restore")
    assert step == 2 and (path / "model.safetensors").read_bytes() == b"weights 2"


def write_config(tmp_path, tiny_model, storage: dict) -> Path:
    config = tmp_path / "trainer.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"base": str(tiny_model), "queryMaxLength": 16, "passageMaxLength": 16},
                "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", synthetic_records(96, negatives=2)))},
                "training": {"maxSteps": 400, "batchSizePerDevice": 4, "groupSize": 4, "loggingSteps": 1},
                "checkpoint": {"everySteps": 5, "keep": 2},
                "storage": storage,
                "run": {"namespace": RUN.namespace, "name": RUN.name, "runId": RUN.run_id},
                "workDir": str(tmp_path / "work"),
                "progressIntervalSeconds": 0.5,
            }
        )
    )
    return config


def trainer(config: Path) -> list[str]:
    return [sys.executable, "-m", "embedtune.trainer", "--config", str(config)]


TRAINER_ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_ctrl_c_during_an_outage_names_the_checkpoint_that_is_stored(tiny_model, tmp_path, s3_bucket, outage):
    config = write_config(tmp_path, tiny_model, {"uri": s3_bucket, "endpoint": outage.endpoint, "retrySeconds": 3})
    log_path = tmp_path / "trainer.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(trainer(config), env=TRAINER_ENV, stdout=log, stderr=log)
    wait_for_training_step(tmp_path / "work" / "progress.json", 6, process, log_path)
    outage.cut_when(rb"PUT /\S*/checkpoint-\d+/", outage_seconds=None)  # from the next checkpoint on
    time.sleep(1)  # let the next save begin, so Ctrl-C comes during the outage
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130, log_path.read_text()[-3000:]
    outage.on()
    output = log_path.read_text()
    assert outage.begun, output[-3000:]
    store = CheckpointStore(open_storage(s3_bucket, StorageAccess(endpoint=outage.endpoint)), RUN)
    last_stored = store.complete_steps()[0]
    stopped = re.search(r"SIGINT: stopped at step (\d+) but checkpoint-(\d+) was not stored: storage .*", output)
    assert stopped, output[-3000:]
    assert int(stopped[1]) >= int(stopped[2]) > last_stored
    assert stopped[0].endswith(
        f"the last stored checkpoint is step {last_stored} ({store.uri(last_stored)}); running again resumes from it"
    )
    assert "with a checkpoint there" not in output and "Traceback" not in output
