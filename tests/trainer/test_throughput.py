"""Issue 13: the GPU is fed by DataLoader workers, and what the steps cost is reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from embedtune.trainer.batches import dataloader_workers


def test_workers_default_to_the_cpus_per_gpu_and_to_none_without_a_gpu(monkeypatch):
    monkeypatch.setattr("embedtune.trainer.batches.available_cpus", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert dataloader_workers(None, on_gpu=True) == 1  # 2 CPUs per GPU: one trains, one tokenizes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert dataloader_workers(None, on_gpu=True) == 4
    assert dataloader_workers(None, on_gpu=False) == 0
    assert dataloader_workers(3, on_gpu=False) == 3


@pytest.mark.slow
def test_the_gpu_benchmark_runs_every_variant_at_its_tiny_size_on_cpu(tmp_path):
    script = Path(__file__).parents[2] / "benchmarks" / "gpu_throughput.py"
    command = [sys.executable, str(script), "--size", "tiny", "--steps", "3", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (raw,) = tmp_path.glob("gpu_throughput-tiny-cpu-*.json")
    report = json.loads(raw.read_text())
    rows = {row["variant"]: row for row in report["rows"]}
    assert set(rows) == {"embedtune", "embedtune-padded", "stock-w0", "stock-w4", "plain-padded"}
    for name, row in rows.items():
        assert row["real_tokens_per_second"] > 0 and row["token_slots_per_second"] >= row["real_tokens_per_second"]
        assert f"| {name} |" in result.stdout
    assert rows["embedtune"]["padding_share"] == 0 and rows["embedtune-padded"]["padding_share"] > 0
    # the same computation, padded or not: the same losses (the benchmark's model has no dropout)
    losses = {record["variant"]: record["losses"] for record in report["raw"]}
    assert losses["embedtune"] == pytest.approx(losses["embedtune-padded"], rel=1e-4)
