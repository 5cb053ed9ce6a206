import http.server
import os
import re
import threading
import urllib.request
from pathlib import Path

import pytest

from embedtune.trainer.config import StorageAccess
from embedtune.trainer.errors import InputError
from embedtune.trainer.storage import LocalStorage, S3Storage, UnsafeKey, fetch_to_local, open_storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "store"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"{bucket}/some/prefix", StorageAccess(endpoint=request.getfixturevalue("s3_endpoint")))


def _tree(root, files):
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_directory_round_trip_list_and_delete(storage, tmp_path):
    files = {"a.bin": os.urandom(3000), "sub/b.txt": b"hello", "sub/deeper/c": b""}
    uploaded = storage.upload_dir(_tree(tmp_path / "src", files), "run/x")
    assert sorted(o.key for o in uploaded) == ["run/x/a.bin", "run/x/sub/b.txt", "run/x/sub/deeper/c"]
    assert [(o.key, o.size) for o in storage.list("run/x")] == [
        ("run/x/a.bin", 3000),
        ("run/x/sub/b.txt", 5),
        ("run/x/sub/deeper/c", 0),
    ]
    assert storage.list("run/x/sub/b") == []  # a prefix is a folder, not a string prefix
    storage.download_dir("run/x", tmp_path / "dst")
    for name, data in files.items():
        assert (tmp_path / "dst" / name).read_bytes() == data
    assert storage.read_bytes("run/x/sub/b.txt") == b"hello"
    assert storage.read_bytes("run/x/nope") is None
    assert storage.exists("run/x/a.bin") and not storage.exists("run/x/sub")
    storage.write_bytes("run/x/marker.json", b"{}")
    storage.delete([o.key for o in storage.list("run/x")])
    assert storage.list("run/x") == []


def test_large_files_use_multipart_uploads(s3_bucket, s3_endpoint, tmp_path):
    from boto3.s3.transfer import TransferConfig

    storage = open_storage(s3_bucket, StorageAccess(endpoint=s3_endpoint))
    storage.transfer = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20, max_concurrency=4)
    data = os.urandom(11 * 2**20 + 17)
    (tmp_path / "big").write_bytes(data)
    storage.upload_file(tmp_path / "big", "big")
    head = storage.client.head_object(Bucket=storage.bucket, Key="big")
    assert head["ETag"].strip('"').endswith("-3")  # S3 marks multipart objects with "-<parts>"
    storage.download_file("big", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data


class FlakyProxy(http.server.ThreadingHTTPServer):
    """Answers the first `failures` requests with S3's throttling error, then forwards
    (bodiless requests only: enough for reads)."""

    def __init__(self, upstream: str, failures: int, status: int):
        self.upstream, self.failures, self.status, self.seen = upstream, failures, status, 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _handle(self):
        server: FlakyProxy = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with server.lock:
            server.seen += 1
            fail = server.seen <= server.failures
        if fail:
            payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(server.status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        request = urllib.request.Request(
            server.upstream + self.path,
            data=body or None,
            method=self.command,
            headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
        )
        try:
            with urllib.request.urlopen(request) as response:
                status, headers, payload = response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            status, headers, payload = error.code, error.headers, error.read()
        self.send_response(status)
        for key, value in headers.items():
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


@pytest.mark.parametrize("status", [503, 500])
def test_throttling_and_server_errors_are_retried(s3_bucket, s3_endpoint, status):
    proxy = FlakyProxy(s3_endpoint, failures=3, status=status)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    open_storage(s3_bucket, StorageAccess(endpoint=s3_endpoint)).write_bytes("k", b"survived")
    try:
        flaky = open_storage(s3_bucket, StorageAccess(endpoint=f"http://127.0.0.1:{proxy.server_address[1]}"))
        assert flaky.read_bytes("k") == b"survived"
        assert proxy.seen == 4  # three refusals, then the real request
    finally:
        proxy.shutdown()


def test_uri_forms(tmp_path):
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    assert open_storage(str(tmp_path)).uri_for("a/b") == f"{tmp_path}/a/b"
    s3 = open_storage("s3://bucket/deep/prefix/", StorageAccess(endpoint="http://127.0.0.1:1"))
    assert isinstance(s3, S3Storage) and s3.uri_for("a/b") == "s3://bucket/deep/prefix/a/b"
    with pytest.raises(InputError, match="unsupported scheme 'gs'"):
        open_storage("gs://bucket/x")
    with pytest.raises(InputError, match="missing or invalid bucket name"):
        open_storage("s3:///x")


def test_fetch_to_local_downloads_objects_and_prefixes(s3_bucket, s3_endpoint, tmp_path):
    storage = open_storage(s3_bucket, StorageAccess(endpoint=s3_endpoint))
    storage.write_bytes("data/train.jsonl", b"{}\n")
    storage.write_bytes("data/more/x.jsonl", b"[]\n")
    single = fetch_to_local(f"{s3_bucket}/data/train.jsonl", tmp_path, StorageAccess(endpoint=s3_endpoint))
    assert single.read_bytes() == b"{}\n"
    folder = fetch_to_local(f"{s3_bucket}/data", tmp_path / "f", StorageAccess(endpoint=s3_endpoint))
    assert (folder / "more" / "x.jsonl").read_bytes() == b"[]\n"
    assert fetch_to_local("/some/local/path", tmp_path) == tmp_path.__class__("/some/local/path")
    with pytest.raises(InputError, match="no such object or prefix"):
        fetch_to_local(f"{s3_bucket}/nothing-here", tmp_path, StorageAccess(endpoint=s3_endpoint))


def test_package_uris_point_into_installed_packages():
    import tqdm as installed

    assert fetch_to_local("package://tqdm/std.py", Path("unused")) == Path(installed.__file__).parent / "std.py"
    with pytest.raises(InputError, match="no installed Python package named 'no_such_package'"):
        fetch_to_local("package://no_such_package/model", Path("unused"))
    with pytest.raises(InputError, match="package 'tqdm' has no model"):
        fetch_to_local("package://tqdm/model", Path("unused"))


@pytest.mark.parametrize("key", ["../outside", "run/../../outside", "{tmp}/outside", "run/.."])
def test_keys_that_leave_the_storage_root_are_refused(storage, key, tmp_path):
    key = key.format(tmp=tmp_path)
    for operation in (
        lambda: storage.write_bytes(key, b"x"),
        lambda: storage.read_bytes(key),
        lambda: storage.exists(key),
        lambda: storage.list(key),
        lambda: storage.upload_file(_tree(tmp_path / "src", {"f": b"x"}) / "f", key),
        lambda: storage.download_file(key, tmp_path / "dst" / "f"),
        lambda: storage.delete([key]),
    ):
        with pytest.raises(UnsafeKey, match=f"storage key '{re.escape(key)}' leaves the storage root {storage.uri}"):
            operation()
    assert not (tmp_path / "outside").exists() and not (tmp_path / "dst").exists()


def test_an_object_whose_key_leaves_the_root_is_never_downloaded_outside(s3_bucket, s3_endpoint, tmp_path):
    storage = open_storage(f"{s3_bucket}/root", StorageAccess(endpoint=s3_endpoint))
    storage.write_bytes("set/fine.txt", b"fine")
    # S3 keys are plain strings: a `..` segment is a valid key there, and would be a path here
    storage.client.put_object(Bucket=storage.bucket, Key="root/set/../../escaped.txt", Body=b"bad")
    with pytest.raises(UnsafeKey):
        storage.download_dir("set", tmp_path / "local" / "set")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "local" / "escaped.txt").exists()
    with pytest.raises(UnsafeKey):
        fetch_to_local(
            f"{s3_bucket}/root/set/../../escaped.txt", tmp_path / "fetched", StorageAccess(endpoint=s3_endpoint)
        )
    with pytest.raises(InputError, match="leaves the storage root"):
        open_storage(f"{s3_bucket}/../other", StorageAccess(endpoint=s3_endpoint))


@pytest.mark.parametrize(
    "problem,message",
    [
        (
            "missing bucket",
            "bucket 'no-such-bucket' does not exist at {endpoint}: create it, or fix the bucket name "
            "in spec.storage.uri",
        ),
        (
            "wrong secret",
            "{endpoint} rejected the credentials (SignatureDoesNotMatch): fix AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY in the environment (on a cluster, the Secret named by "
            "spec.storage.credentialsSecret)",
        ),
        ("unknown key", "{endpoint} rejected the credentials (InvalidAccessKeyId): fix AWS_ACCESS_KEY_ID"),
        (
            "no credentials",
            "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the "
            "environment (on a cluster, spec.storage.credentialsSecret names a Secret with both)",
        ),
    ],
)
def test_storage_misconfiguration_is_an_input_error_naming_the_setting(
    s3_bucket, s3_endpoint, s3_user, monkeypatch, problem, message
):
    bucket = "s3://no-such-bucket" if problem == "missing bucket" else s3_bucket
    credentials = s3_user | {
        "wrong secret": {"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
        "unknown key": {"AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000"},
    }.get(problem, {})
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    if problem == "no credentials":
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage = open_storage(f"{bucket}/runs", StorageAccess(endpoint=s3_endpoint, retry_seconds=0))
    for operation in (
        lambda: storage.write_bytes("k", b"x"),
        lambda: storage.read_bytes("k"),
        lambda: storage.exists("k"),
        lambda: storage.list(""),
    ):
        with pytest.raises(InputError) as raised:
            operation()
        assert message.format(endpoint=s3_endpoint) in str(raised.value)
        assert s3_user["AWS_SECRET_ACCESS_KEY"] not in str(raised.value)
        assert s3_user["AWS_ACCESS_KEY_ID"] not in str(raised.value)


def test_an_invalid_endpoint_names_the_setting():
    with pytest.raises(InputError, match="spec.storage.endpoint 'minio:9000': .*expected a URL"):
        open_storage("s3://bucket/x", StorageAccess(endpoint="minio:9000"))
