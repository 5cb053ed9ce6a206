"""The training curves' mirror in storage."""

from __future__ import annotations

from embedtune.trainer.storage import open_storage
from embedtune.trainer.tracking import FolderMirror


def test_the_mirror_uploads_new_and_grown_files_only(tmp_path):
    local, stored = tmp_path / "local", open_storage(str(tmp_path / "stored"))
    (local / "training").mkdir(parents=True)
    events = local / "training" / "events.out"
    events.write_bytes(b"a")
    mirror = FolderMirror(stored, local, "run-1/tensorboard")
    mirror.sync()
    assert stored.read_bytes("run-1/tensorboard/training/events.out") == b"a"

    stored.write_bytes("run-1/tensorboard/training/events.out", b"changed in storage")
    mirror.sync()  # unchanged here: not uploaded again
    assert stored.read_bytes("run-1/tensorboard/training/events.out") == b"changed in storage"

    events.write_bytes(b"ab")  # appended to
    (local / "evaluation").mkdir()
    (local / "evaluation" / "events.out").write_bytes(b"e")
    mirror.sync()
    assert stored.read_bytes("run-1/tensorboard/training/events.out") == b"ab"
    assert stored.read_bytes("run-1/tensorboard/evaluation/events.out") == b"e"
