"""One `embedtune run` of a resource at a time, on any machine that shares its storage.

Two runs of one manifest would train the same run, write and prune the same checkpoints, and
overwrite each other's resource.yaml. The lock is an object in the storage beside
resource.yaml, created only if absent (an atomic create on S3 and on a local disk), refreshed
while its run lives and deleted when it ends. A holder that died leaves it behind: on the same
machine it is taken over at once (the holder's process is gone); from elsewhere once it has
not been refreshed for STALE_SECONDS.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from embedtune.trainer.storage import Storage

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 60.0


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    started: str
    heartbeat: float  # time.time() of the last refresh

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}, running since {self.started}"


class RunLocked(Exception):
    def __init__(self, key: str, holder: LockHolder | None):
        self.key, self.holder = key, holder
        who = holder.describe() if holder else "another process"
        super().__init__(
            f"another embedtune run of this resource is in progress ({who}); wait for it to end or stop it "
            f"(Ctrl-C). A lock left by a process that died on another machine expires after {STALE_SECONDS:.0f} s "
            f"({key})"
        )


class RunLock:
    def __init__(self, storage: Storage, key: str, *, heartbeat_seconds: float = HEARTBEAT_SECONDS):
        self.storage, self.key = storage, key
        self.heartbeat_seconds = heartbeat_seconds
        self.token = uuid.uuid4().hex
        self.started = datetime.datetime.now(tz=datetime.UTC).isoformat(timespec="seconds")
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *_: Any) -> None:
        self.release()

    def _document(self) -> bytes:
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": self.started, "heartbeat": time.time()}
        return json.dumps(holder | {"token": self.token}).encode()

    def _read(self) -> tuple[LockHolder | None, str | None]:
        """The holder and its token; (None, None) when the lock is gone or unreadable."""
        data = self.storage.read_bytes(self.key)
        try:
            document = json.loads(data) if data is not None else None
            token = document.pop("token")
            return LockHolder(**document), token
        except (ValueError, TypeError, KeyError, AttributeError):
            return None, None

    def acquire(self) -> None:
        for _ in range(2):
            if self.storage.write_new(self.key, self._document()):
                self._heartbeat = threading.Thread(target=self._refresh, name="run-lock", daemon=True)
                self._heartbeat.start()
                return
            holder, _ = self._read()
            if holder is not None and not _stale(holder):
                raise RunLocked(self.storage.uri_for(self.key), holder)
            logger.warning(
                "taking over the lock of a run that ended without releasing it (%s)",
                holder.describe() if holder else "unreadable",
            )
            self.storage.delete([self.key])
        raise RunLocked(self.storage.uri_for(self.key), None)  # another process took it over first

    def _refresh(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                if self._read()[1] == self.token:  # never overwrite a lock another run has taken over
                    self.storage.write_bytes(self.key, self._document())
            except Exception as error:  # storage down for a while: the next refresh tries again
                logger.warning("could not refresh the run lock %s: %s", self.key, error)

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        try:
            if self._read()[1] == self.token:
                self.storage.delete([self.key])
        except Exception as error:  # storage down: the next run on this machine sees this process gone
            logger.warning("could not release the run lock %s: %s", self.key, error)


def _stale(holder: LockHolder) -> bool:
    if holder.host == socket.gethostname() and not _process_exists(holder.pid):
        return True
    return time.time() - holder.heartbeat > STALE_SECONDS


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True
