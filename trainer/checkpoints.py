"""Checkpoints in storage: upload with a completion marker, find the newest complete one,
download and verify it, prune old ones.

A checkpoint counts only once `_COMPLETE.json` exists; it is written last and lists every
file with its size and sha256. On several nodes each node uploads the files its ranks wrote
(DeepSpeed shards, RNG states) and a per-node part manifest; rank 0 merges the parts into the
marker once every node has reported, so an upload cut short anywhere is never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import StorageUnavailable
from .layout import COMPLETE_MARKER, PARTS_DIR, RunLayout, join, step_of_checkpoint_dir
from .storage import Storage, StoredObject, UnsafeKey

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


class CorruptCheckpoint(Exception):
    pass


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_of(local_dir: Path) -> list[FileEntry]:
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    return [FileEntry(p.relative_to(local_dir).as_posix(), p.stat().st_size, sha256_of(p)) for p in files]


def publish_dir(storage: Storage, local_dir: Path, prefix: str, *, desc: str, extra: dict | None = None) -> str:
    """Upload a finished directory (a model, an evaluation set) and mark it complete last."""
    entries = manifest_of(local_dir)
    storage.upload_dir(local_dir, prefix, desc=desc)
    marker = (extra or {}) | {"createdAt": time.time(), "files": [asdict(e) for e in entries]}
    storage.write_bytes(join(prefix, COMPLETE_MARKER), json.dumps(marker, indent=1).encode())
    return storage.uri_for(prefix)


def replace_published_file(storage: Storage, prefix: str, name: str, data: bytes) -> None:
    """Replace one file of a published folder (a model's card) and its entry in the completion
    marker, so the marker still describes every file."""
    marker_key = join(prefix, COMPLETE_MARKER)
    marker = json.loads(storage.read_bytes(marker_key))
    storage.write_bytes(join(prefix, name), data)
    entry = FileEntry(name, len(data), hashlib.sha256(data).hexdigest())
    marker["files"] = [f for f in marker["files"] if f["path"] != name] + [asdict(entry)]
    storage.write_bytes(marker_key, json.dumps(marker, indent=1).encode())


def is_published(storage: Storage, prefix: str) -> bool:
    return storage.exists(join(prefix, COMPLETE_MARKER))


class CheckpointStore:
    def __init__(self, storage: Storage, layout: RunLayout):
        self.storage = storage
        self.layout = layout

    def uri(self, step: int) -> str:
        return self.storage.uri_for(self.layout.checkpoint_prefix(step))

    # --- writing -------------------------------------------------------------------------

    def upload_part(self, local_dir: Path, step: int, node_rank: int) -> list[FileEntry]:
        """Upload what this node wrote for `step`, then its part manifest."""
        prefix = self.layout.checkpoint_prefix(step)
        entries = manifest_of(local_dir)
        self.storage.upload_dir(local_dir, prefix, desc=f"upload checkpoint-{step}")
        part = {"node": node_rank, "files": [asdict(e) for e in entries]}
        self.storage.write_bytes(join(prefix, PARTS_DIR, f"node-{node_rank}.json"), json.dumps(part).encode())
        return entries

    def mark_complete(self, step: int, num_nodes: int, *, timeout_s: float = 1800, poll_s: float = 2.0) -> bool:
        """Wait for every node's part, then write the marker. False if a node never reported."""
        prefix = self.layout.checkpoint_prefix(step)
        deadline = time.monotonic() + timeout_s
        parts: dict[int, bytes] = {}
        while True:
            for node in range(num_nodes):
                if node not in parts and (
                    data := self.storage.read_bytes(join(prefix, PARTS_DIR, f"node-{node}.json"))
                ):
                    parts[node] = data
            if len(parts) == num_nodes:
                break
            if time.monotonic() > deadline:
                logger.error(
                    "checkpoint-%d: nodes %s never finished uploading; it stays incomplete",
                    step,
                    sorted(set(range(num_nodes)) - set(parts)),
                )
                return False
            time.sleep(poll_s)
        files = {f["path"]: f for data in parts.values() for f in json.loads(data)["files"]}
        marker = {
            "step": step,
            "nodes": num_nodes,
            "createdAt": time.time(),
            "files": sorted(files.values(), key=lambda f: f["path"]),
        }
        self.storage.write_bytes(join(prefix, COMPLETE_MARKER), json.dumps(marker, indent=1).encode())
        return True

    def prune(self, keep: int) -> list[int]:
        """Keep the newest `keep` complete checkpoints; drop older ones, complete or not.
        Incomplete checkpoints newer than the newest complete one may still be uploading."""
        complete = self.complete_steps()
        if not complete:
            return []
        kept = set(complete[:keep])
        oldest_kept = min(kept)
        doomed = [s for s in self._all_steps() if s not in kept and s < oldest_kept]
        for step in doomed:
            prefix = self.layout.checkpoint_prefix(step)
            # marker first: a half-deleted checkpoint must never look complete
            self.storage.delete([join(prefix, COMPLETE_MARKER)])
            self.storage.delete([o.key for o in self.storage.list(prefix)])
        return doomed

    # --- reading -------------------------------------------------------------------------

    def _all_steps(self) -> list[int]:
        base = self.layout.checkpoints_prefix
        steps = set()
        for obj in self.storage.list(base):
            first = obj.key[len(base) :].strip("/").split("/", 1)[0]
            if (step := step_of_checkpoint_dir(first)) is not None:
                steps.add(step)
        return sorted(steps, reverse=True)

    def complete_steps(self) -> list[int]:
        """Steps with a completion marker, newest first."""
        return [
            s for s in self._all_steps() if self.storage.exists(join(self.layout.checkpoint_prefix(s), COMPLETE_MARKER))
        ]

    def download(self, step: int, dest: Path) -> Path:
        """Fetch every file the marker lists and check sizes and checksums."""
        prefix = self.layout.checkpoint_prefix(step)
        marker = self.storage.read_bytes(join(prefix, COMPLETE_MARKER))
        try:
            files = [FileEntry(**f) for f in json.loads(marker)["files"]]
        except (TypeError, KeyError, ValueError) as exc:  # no marker, or a truncated or malformed one
            raise CorruptCheckpoint(f"checkpoint-{step}: its completion marker is missing or unreadable") from exc
        if dest.exists():
            shutil.rmtree(dest)
        objects = [StoredObject(join(prefix, f.path), f.size) for f in files]
        try:
            self.storage.download_dir(prefix, dest, keys=objects, desc=f"download checkpoint-{step}")
        except FileNotFoundError as exc:
            raise CorruptCheckpoint(f"checkpoint-{step}: a file its marker lists is gone: {exc}") from exc
        except UnsafeKey as exc:
            raise CorruptCheckpoint(f"checkpoint-{step}: its marker lists a file outside it: {exc}") from exc
        for f in files:
            local = dest / f.path
            if local.stat().st_size != f.size or sha256_of(local) != f.sha256:
                raise CorruptCheckpoint(f"checkpoint-{step}: {f.path} does not match its manifest")
        return dest

    def download_latest(self, dest_parent: Path) -> tuple[int, Path] | None:
        """The newest complete checkpoint that verifies; a corrupt one (a file changed or gone, a
        broken marker) falls back to the one before. An outage is no reason to fall back: it
        raises StorageUnavailable."""
        for step in self.complete_steps():
            try:
                return step, self.download(step, dest_parent / f"checkpoint-{step}")
            except CorruptCheckpoint as exc:
                logger.error("%s; trying an older checkpoint", exc)
        return None

    def resume_hint(self, stored_step: int | None) -> str:
        """Where running again starts, given the newest stored checkpoint."""
        if stored_step is None:
            return "no checkpoint of this run is stored; running again starts training from the beginning"
        return (
            f"the last stored checkpoint is step {stored_step} ({self.uri(stored_step)}); running again resumes from it"
        )


class CheckpointUploader:
    """Uploads checkpoints in a background thread, one at a time: training goes on while a
    checkpoint uploads, and the next save waits until it is stored, so training never runs
    more than one checkpoint interval ahead of storage. An upload that fails (storage down
    longer than its retry window) fails training at the next save, or at `close`.

    `submit` hard-links the checkpoint into a staging folder first (instant, same
    filesystem), so the Trainer may rotate its local copy while the upload runs.
    `stored_step` is the newest checkpoint this node has stored (on node 0: marked complete).
    """

    def __init__(
        self,
        store: CheckpointStore,
        staging: Path,
        *,
        node_rank: int,
        num_nodes: int,
        keep: int,
        stored_step: int | None = None,
        on_complete: Callable[[int, str], None] | None = None,
    ):
        self.store = store
        self.staging = staging
        self.node_rank = node_rank
        self.num_nodes = num_nodes
        self.keep = keep
        self.stored_step = stored_step
        self.on_complete = on_complete
        self.failed: list[int] = []
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="checkpoint-upload", initializer=_yield_cpu_to_training
        )
        self._in_flight: tuple[int, Future] | None = None

    def submit(self, step: int, checkpoint_dir: Path) -> None:
        self.wait()
        snapshot = self.staging / checkpoint_dir.name
        if snapshot.exists():
            shutil.rmtree(snapshot)
        shutil.copytree(checkpoint_dir, snapshot, copy_function=_link_or_copy)
        self._in_flight = step, self._pool.submit(self._upload, step, snapshot)

    def _upload(self, step: int, snapshot: Path) -> None:
        started = time.monotonic()
        try:
            try:
                entries = self.store.upload_part(snapshot, step, self.node_rank)
                complete = self.node_rank != 0 or self.store.mark_complete(step, self.num_nodes)
            except StorageUnavailable as exc:
                raise StorageUnavailable(
                    f"checkpoint-{step} was not stored: {exc}; {self.store.resume_hint(self.stored_step)}"
                ) from exc
            if not complete:
                self.failed.append(step)
                return
            self.stored_step = step
            if self.node_rank == 0:
                if self.on_complete is not None:
                    self.on_complete(step, self.store.uri(step))
                pruned = self.store.prune(self.keep)
                logger.info(
                    "checkpoint-%d stored at %s (%.1f MB in %.1fs)%s",
                    step,
                    self.store.uri(step),
                    sum(e.size for e in entries) / 1e6,
                    time.monotonic() - started,
                    f"; pruned {pruned}" if pruned else "",
                )
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def run_later(self, task: Callable[[], None]) -> None:
        """Run a small upload (the training curves) on the upload thread, after what is queued
        there; it handles its own failures."""
        self._pool.submit(task)

    def wait(self) -> None:
        """Until the checkpoint in flight is stored; raises what its upload raised."""
        if self._in_flight is None:
            return
        (step, future), self._in_flight = self._in_flight, None
        if not future.done():
            logger.info("training waits for checkpoint-%d to be stored", step)
        future.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()


def _yield_cpu_to_training() -> None:
    """Lower this thread's scheduling priority (Linux nices threads one by one; the transfer
    threads it starts inherit it), so hashing and uploading take the CPU time training leaves."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
