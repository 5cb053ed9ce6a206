"""Waiting on the real trainer processes the tests start."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest


def wait_for_training_step(
    progress_file: Path, step: int, process: subprocess.Popen, log: Path, timeout: float = 300
) -> None:
    """Until the trainer's progress.json reports `step`; fails with the log if it ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if progress_file.exists() and json.loads(progress_file.read_text()).get("training", {}).get("step", 0) >= step:
            return
        time.sleep(0.05)
    pytest.fail(f"no training progress to step {step} (exit {process.poll()}):\n{log.read_text()[-4000:]}")
