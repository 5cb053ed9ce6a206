"""Real trainer runs for the tests: a trainer config on a tiny model, the trainer under torchrun
(gloo on CPU), killed as a lost pod would be, and the losses its checkpoints logged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from embedtune.trainer.layout import RunLayout
from support.tiny import synthetic_records, write_jsonl

RUN = RunLayout("ml", "tiny", "1")


def write_config(
    tmp_path: Path,
    tiny_model: Path,
    storage_uri: str,
    endpoint: str | None = None,
    *,
    data: Path | str | None = None,
    model: dict | None = None,
    data_settings: dict | None = None,
    **training,
) -> Path:
    data = data or write_jsonl(tmp_path / "train.jsonl", synthetic_records(96, negatives=2))
    config = {
        "model": {"base": str(tiny_model), "pooling": "cls", "queryMaxLength": 16, "passageMaxLength": 16}
        | (model or {}),
        "data": {"train": str(data), "heldOutFraction": 0.1} | (data_settings or {}),
        "training": {
            "epochs": 1,
            "batchSizePerDevice": 4,
            "groupSize": 4,
            "learningRate": 1e-4,
            "loggingSteps": 1,
            "seed": 7,
        }
        | training.pop("training", {}),
        "checkpoint": training.pop("checkpoint", {"everySteps": 2, "keep": 2}),
        "storage": {"uri": storage_uri} | ({"endpoint": endpoint} if endpoint else {}),
        "run": {"namespace": RUN.namespace, "name": RUN.name, "runId": RUN.run_id},
        "workDir": str(tmp_path / training.pop("work", "work")),
        "progressIntervalSeconds": 0.5,
    }
    path = tmp_path / f"trainer-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def trainer_command(config: Path, nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "embedtune.trainer.launch",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "embedtune.trainer",
        "--config",
        str(config),
    ]


def trainer_env(**extra) -> dict:
    return os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"} | extra


def run_trainer(config: Path, nproc: int = 2, **env) -> subprocess.CompletedProcess:
    command = trainer_command(config, nproc)
    if nproc == 1:  # the local CLI, which runs one process without torchrun
        command = [sys.executable, "-m", "embedtune.operator.cli", "train", str(config), "--nproc-per-node=1"]
    return subprocess.run(command, env=trainer_env(**env), capture_output=True, text=True, timeout=600)


def kill_process_tree(process: subprocess.Popen) -> None:
    """SIGKILL a launcher and every worker at once, as losing the pod would (torchrun starts
    each worker in a session of its own, so a process-group kill would miss them)."""
    import psutil

    parent = psutil.Process(process.pid)
    for proc in [parent, *parent.children(recursive=True)]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:  # a short-lived helper process that ended on its own
            pass
    process.wait()


def training_logs(storage, step: int) -> list[dict]:
    state = json.loads(storage.read_bytes(f"{RUN.checkpoint_prefix(step)}/trainer_state.json"))
    return [entry for entry in state["log_history"] if "loss" in entry]


def losses(storage, step: int) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in training_logs(storage, step)}
