import json
import threading
import time

import pytest

from embedtune.trainer.checkpoints import CheckpointStore, CheckpointUploader, is_published, publish_dir
from embedtune.trainer.config import StorageAccess
from embedtune.trainer.layout import COMPLETE_MARKER, RunLayout
from embedtune.trainer.storage import open_storage


@pytest.fixture
def store(s3_bucket, s3_endpoint):
    return CheckpointStore(
        open_storage(f"{s3_bucket}/ckpt", StorageAccess(endpoint=s3_endpoint)), RunLayout("ml", "finance", "7")
    )


def _checkpoint(root, step, files=None):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name, data in (files or {"model.safetensors": f"weights {step}".encode(), "trainer_state.json": b"{}"}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def test_layout_of_a_stored_checkpoint(store, tmp_path):
    store.upload_part(_checkpoint(tmp_path, 50), 50, node_rank=0)
    assert store.complete_steps() == []  # uploaded, but not marked: not a checkpoint yet
    assert store.mark_complete(50, num_nodes=1)
    assert store.complete_steps() == [50]
    assert store.uri(50).endswith("/ckpt/ml/finance/run-7/checkpoints/checkpoint-50")
    marker = json.loads(store.storage.read_bytes("ml/finance/run-7/checkpoints/checkpoint-50/" + COMPLETE_MARKER))
    assert [(f["path"], f["size"]) for f in marker["files"]] == [
        ("model.safetensors", len(b"weights 50")),
        ("trainer_state.json", 2),
    ]
    assert all(len(f["sha256"]) == 64 for f in marker["files"])


def test_an_unmarked_newer_checkpoint_is_ignored(store, tmp_path):
    store.upload_part(_checkpoint(tmp_path, 10), 10, node_rank=0)
    store.mark_complete(10, 1)
    store.upload_part(_checkpoint(tmp_path, 20), 20, node_rank=0)  # the pod died before the marker
    step, path = store.download_latest(tmp_path / "restore")
    assert step == 10
    assert (path / "model.safetensors").read_bytes() == b"weights 10"


def test_a_corrupt_checkpoint_falls_back_to_the_one_before(store, tmp_path):
    for step in (10, 20):
        store.upload_part(_checkpoint(tmp_path, step), step, node_rank=0)
        store.mark_complete(step, 1)
    store.storage.write_bytes("ml/finance/run-7/checkpoints/checkpoint-20/model.safetensors", b"bit rot!!!!!!")
    step, path = store.download_latest(tmp_path / "restore")
    assert step == 10 and (path / "model.safetensors").read_bytes() == b"weights 10"


@pytest.mark.parametrize(
    "damage",
    [
        "a truncated marker",
        "a file deleted from storage",
        "a marker listing a file outside the checkpoint",
        "a marker without files",
    ],
)
def test_a_broken_checkpoint_falls_back_to_the_one_before(store, tmp_path, damage, caplog):
    for step in (10, 20):
        store.upload_part(_checkpoint(tmp_path, step), step, node_rank=0)
        store.mark_complete(step, 1)
    prefix = store.layout.checkpoint_prefix(20)
    marker = store.storage.read_bytes(f"{prefix}/{COMPLETE_MARKER}")
    if damage == "a truncated marker":
        store.storage.write_bytes(f"{prefix}/{COMPLETE_MARKER}", marker[: len(marker) // 2])
    elif damage == "a file deleted from storage":
        store.storage.delete([f"{prefix}/model.safetensors"])
    elif damage == "a marker listing a file outside the checkpoint":
        listed = json.loads(marker)
        listed["files"][0]["path"] = "../../../../escaped"
        store.storage.write_bytes(f"{prefix}/{COMPLETE_MARKER}", json.dumps(listed).encode())
    else:
        store.storage.write_bytes(f"{prefix}/{COMPLETE_MARKER}", b'{"step": 20}')
    step, path = store.download_latest(tmp_path / "restore")
    assert step == 10 and (path / "model.safetensors").read_bytes() == b"weights 10"
    assert "checkpoint-20: " in caplog.text and "trying an older checkpoint" in caplog.text
    assert not (tmp_path / "escaped").exists()


def test_every_node_must_report_before_the_marker(store, tmp_path):
    store.upload_part(_checkpoint(tmp_path / "n0", 30, {"model.safetensors": b"w", "rng_state_0.pth": b"0"}), 30, 0)
    assert not store.mark_complete(30, num_nodes=2, timeout_s=0.5, poll_s=0.1)
    assert store.complete_steps() == []

    def late_node():
        time.sleep(0.5)
        store.upload_part(_checkpoint(tmp_path / "n1", 30, {"rng_state_1.pth": b"1"}), 30, 1)

    threading.Thread(target=late_node).start()
    assert store.mark_complete(30, num_nodes=2, timeout_s=10, poll_s=0.1)
    _, path = store.download_latest(tmp_path / "restore")
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "rng_state_0.pth", "rng_state_1.pth"]


def test_prune_keeps_the_newest_complete_and_spares_newer_uploads(store, tmp_path):
    for step in (10, 20, 30, 40):
        store.upload_part(_checkpoint(tmp_path, step), step, 0)
        store.mark_complete(step, 1)
    store.upload_part(_checkpoint(tmp_path, 5), 5, 0)  # an old incomplete leftover
    store.upload_part(_checkpoint(tmp_path, 50), 50, 0)  # still uploading
    assert sorted(store.prune(keep=2)) == [5, 10, 20]
    assert store.complete_steps() == [40, 30]
    assert store.storage.list(store.layout.checkpoint_prefix(10)) == []
    assert store.storage.list(store.layout.checkpoint_prefix(50)) != []


def test_uploader_works_in_background_from_a_snapshot(store, tmp_path):
    stored = []
    uploader = CheckpointUploader(
        store, tmp_path / "staging", node_rank=0, num_nodes=1, keep=2, on_complete=lambda step, uri: stored.append(step)
    )
    for step in (1, 2, 3):
        folder = _checkpoint(tmp_path / "out", step)
        uploader.submit(step, folder)
        # the Trainer may rotate its local copy right away: the snapshot keeps the files
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    uploader.close()
    assert stored == [1, 2, 3] and uploader.failed == []
    assert store.complete_steps() == [3, 2]
    assert not any((tmp_path / "staging").iterdir())


def test_publish_dir_marks_completion_last(store, tmp_path):
    folder = _checkpoint(tmp_path, 1)
    assert not is_published(store.storage, "m")
    uri = publish_dir(store.storage, folder, "m", desc="model", extra={"step": 9})
    assert uri.endswith("/ckpt/m") and is_published(store.storage, "m")
    assert json.loads(store.storage.read_bytes("m/" + COMPLETE_MARKER))["step"] == 9
