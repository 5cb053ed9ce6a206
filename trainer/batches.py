"""Feeding the GPU: training batches are picked and tokenized in DataLoader worker processes
while the current step runs, so tokenization leaves the step's critical path.

FlagEmbedding picks each record's positive and negatives with the module-level `random`, whose
state differs in every worker process: with workers, the passages trained would depend on the
worker count. Here each record's pick is seeded by (seed, epoch, record), so the batches, and
the loss curve, are the same with any number of workers, on any rank layout, and on resume.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from FlagEmbedding.abc.finetune.embedder import AbsEmbedderTrainDataset
from transformers import TrainerCallback

# More workers than this rarely help one GPU: tokenizing a batch takes a fraction of a step.
MAX_AUTO_WORKERS = 4
# Batches each worker prepares ahead (PyTorch's default is 2; steps vary in length with the data).
PREFETCH_BATCHES = 4


class SeededPickDataset(AbsEmbedderTrainDataset):
    """FlagEmbedding's training dataset with the positive and negatives of each record picked by
    a random stream of its own, seeded by (seed, epoch, record index)."""

    def __init__(self, *, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.epoch = 0

    def __getitem__(self, item):
        # FlagEmbedding's __getitem__ draws from the module-level `random`; give it this record's
        # stream and put the process's own back afterwards, so nothing else sees a change
        outer = random.getstate()
        random.seed(f"{self.seed}:{self.epoch}:{item}")
        try:
            return super().__getitem__(item)
        finally:
            random.setstate(outer)


class EpochOfPicks(TrainerCallback):
    """Tells the dataset which epoch starts, so each epoch picks other negatives. Workers are
    started anew for every epoch (not persistent), so they copy the dataset with the new epoch."""

    def __init__(self, dataset: SeededPickDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.epoch = int(state.epoch or 0)  # a resumed run starts mid-epoch: 1.5 is epoch 1


def dataloader_workers(requested: int | None, *, on_gpu: bool) -> int:
    """The DataLoader workers of each training process: the setting, or one less than the CPUs
    this process may use (the training process needs one), at most MAX_AUTO_WORKERS. Without a
    GPU none: the CPUs compute the model, and workers would take cores from it."""
    if requested is not None:
        return requested
    if not on_gpu:
        return 0
    processes_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(MAX_AUTO_WORKERS, available_cpus() // max(1, processes_per_node) - 1))


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by the container's CPU limit (cgroup v2)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return cpus
    if quota == "max":
        return cpus
    return max(1, min(cpus, int(quota) // int(period)))
