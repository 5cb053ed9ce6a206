import asyncio

import pytest_asyncio
from kopf.testing import KopfRunner

from support.cluster import Cluster, write_kubeconfig


@pytest_asyncio.fixture
async def cluster(kmock, tmp_path, monkeypatch):
    """The emulated API server with the CRD installed, and a kubeconfig pointing at it."""
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url))))
    cluster = Cluster(kmock)
    await cluster.install_crd()
    return cluster


class Operator:
    """The real operator (kopf's runtime, our handlers) in a thread, restartable."""

    ARGS = ["run", "--all-namespaces", "--standalone", "-m", "embedtune.operator.handlers"]

    def __init__(self):
        self.runner = None
        self.outputs = []

    async def start(self):
        self.runner = KopfRunner(self.ARGS, timeout=30)
        # Entering and leaving block on the operator's thread; the emulator must keep serving.
        await asyncio.to_thread(self.runner.__enter__)

    async def stop(self):
        await asyncio.to_thread(self.runner.__exit__, None, None, None)
        self.outputs.append(self.runner.output)
        assert self.runner.exception is None
        assert self.runner.exit_code == 0

    @property
    def output(self) -> str:
        return "".join(self.outputs)


@pytest_asyncio.fixture
async def operator(cluster):
    operator = Operator()
    await operator.start()
    yield operator
    await operator.stop()
