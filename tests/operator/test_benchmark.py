"""The benchmark script still runs (with a handful of resources)."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "operator_apply.py"


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_benchmark_measures_every_resource():
    spec = importlib.util.spec_from_file_location("operator_apply", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = await module.benchmark(count=3, timeout=60)
    assert result["resources"] == 3
    assert 0 < result["p50_seconds"] <= result["p99_seconds"] <= result["max_seconds"] < 60
    assert result["operator_peak_rss_mib"] > 10 and result["operator_cpu_seconds"] > 0
