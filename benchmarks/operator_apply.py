"""How fast the operator turns many applied resources into training Jobs.

Starts the emulated API server (tests/support/kube_emulator.py) in this process and
`embedtune operator` as a separate process, applies N EmbeddingFinetunes at once, and
reports the time from each resource's apply to its training Job's creation (p50, p99),
plus the operator's peak RSS.

    python benchmarks/operator_apply.py --resources 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import attrs
import kmock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.cluster import Cluster, write_kubeconfig  # noqa: E402
from support.finetunes import minimal_manifest  # noqa: E402
from support.kube_emulator import ApiServerEmulator  # noqa: E402


@attrs.define(kw_only=True)
class TimedEmulator(ApiServerEmulator):
    """Notes when each Job is created, on the server's side of the wire."""

    job_created: dict[str, float] = attrs.field(factory=dict)

    async def _handle(self, request):
        response = await super()._handle(request)
        if request.resource is not None and request.resource.plural == "jobs" and request.method == "POST":
            self.job_created.setdefault(request.data["metadata"]["name"], time.monotonic())
        return response


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def benchmark(count: int, timeout: float) -> dict[str, float]:
    async with TimedEmulator() as emulator, kmock.Server(emulator):
        cluster = Cluster(emulator)
        await cluster.install_crd()
        with tempfile.TemporaryDirectory() as scratch:
            env = os.environ | {"KUBECONFIG": str(write_kubeconfig(Path(scratch) / "kubeconfig", str(emulator.url)))}
            operator = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "embedtune.operator.cli",
                "operator",
                "--all-namespaces",
                "--liveness-port",
                "0",
                "--metrics-port",
                "0",
                env=env,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                await asyncio.sleep(3)  # the operator's discovery and first watches
                applied: dict[str, float] = {}

                async def apply(name: str) -> None:
                    sent = time.monotonic()
                    await cluster.apply(minimal_manifest(name))
                    applied[f"{name}-train-1-1"] = sent

                await asyncio.gather(*(apply(f"bench-{index:04d}") for index in range(count)))
                deadline = time.monotonic() + timeout
                while len(emulator.job_created) < count and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                rss = peak_rss_mib(operator.pid)
                operator_cpu = cpu_seconds(operator.pid)
                emulator_cpu = cpu_seconds(os.getpid())
            finally:
                operator.terminate()
                await operator.wait()
    latencies = [emulator.job_created[job] - applied[job] for job in applied if job in emulator.job_created]
    if len(latencies) < count:
        raise SystemExit(f"only {len(latencies)} of {count} training Jobs appeared within {timeout}s")
    return {
        "resources": count,
        "p50_seconds": statistics.median(latencies),
        "p99_seconds": percentile(latencies, 0.99),
        "max_seconds": max(latencies),
        "operator_peak_rss_mib": rss,
        "operator_cpu_seconds": operator_cpu,
        "emulator_cpu_seconds": emulator_cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resources", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    result = asyncio.run(benchmark(args.resources, args.timeout))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    for key, value in result.items():
        print(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
