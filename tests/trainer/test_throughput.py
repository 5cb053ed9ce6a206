"""Issue 13: the GPU is fed by DataLoader workers, and what the steps cost is reported."""

from __future__ import annotations

from embedtune.trainer.batches import dataloader_workers


def test_workers_default_to_the_cpus_per_gpu_and_to_none_without_a_gpu(monkeypatch):
    monkeypatch.setattr("embedtune.trainer.batches.available_cpus", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert dataloader_workers(None, on_gpu=True) == 1  # 2 CPUs per GPU: one trains, one tokenizes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert dataloader_workers(None, on_gpu=True) == 4
    assert dataloader_workers(None, on_gpu=False) == 0
    assert dataloader_workers(3, on_gpu=False) == 3
