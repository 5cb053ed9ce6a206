"""Training progress: what rank 0 reports, and the small interface it reports through.

The trainer logs every report; anything else that wants progress (the operator's status
writer, `embedtune run`'s display) implements `ProgressReporter` and is handed to the
trainer. Progress reports are throttled; checkpoint events always go through.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .contract import CheckpointStatus, ProgressFile, TrainingProgress

logger = logging.getLogger(__name__)


class ProgressReporter(Protocol):
    def training_progress(self, progress: TrainingProgress) -> None: ...

    def checkpoint_stored(self, step: int, uri: str) -> None: ...


class LogReporter:
    def training_progress(self, progress: TrainingProgress) -> None:
        eta = f"{progress.eta_seconds / 60:.1f} min" if progress.eta_seconds is not None else "?"
        rate = f"{progress.samples_per_second:.1f}" if progress.samples_per_second is not None else "?"
        loss = f"{progress.loss:.4f}" if progress.loss is not None else "?"
        lr = f"{progress.learning_rate:.2e}" if progress.learning_rate is not None else "?"
        tokens = f"{progress.tokens_per_second:.0f}" if progress.tokens_per_second is not None else "?"
        padding = f"{progress.padding_share:.0%}" if progress.padding_share is not None else "?"
        logger.info(
            "step %d/%d epoch %.2f loss %s lr %s samples/s %s tokens/s %s padding %s eta %s",
            progress.step,
            progress.total_steps,
            progress.epoch,
            loss,
            lr,
            rate,
            tokens,
            padding,
            eta,
        )

    def checkpoint_stored(self, step: int, uri: str) -> None:
        pass  # the uploader already logs it, with size and duration


class JsonFileReporter:
    """Keeps the latest progress and checkpoint in one JSON file (atomically replaced).

    Progress comes from the training loop, checkpoints from the upload thread: one lock
    orders the updates, so neither write loses the other's part."""

    def __init__(self, path: Path):
        self.path = path
        self.state = ProgressFile()
        self._lock = threading.Lock()

    def _update(self, **sections) -> None:
        with self._lock:
            self.state = self.state.model_copy(update=sections)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".tmp-{self.path.name}")
            tmp.write_text(self.state.model_dump_json(by_alias=True, exclude_none=True))
            tmp.replace(self.path)

    def training_progress(self, progress: TrainingProgress) -> None:
        self._update(training=progress)

    def checkpoint_stored(self, step: int, uri: str) -> None:
        self._update(checkpoint=CheckpointStatus(step=step, uri=uri))


class ThrottledReporter:
    """Forwards progress at most once per `interval` seconds (the last one is never lost:
    `flush` sends it), checkpoint events at once."""

    def __init__(self, reporters: list[ProgressReporter], interval: float, clock=time.monotonic):
        self.reporters = reporters
        self.interval = interval
        self.clock = clock
        self._last_sent = -float("inf")
        self._held: TrainingProgress | None = None

    def training_progress(self, progress: TrainingProgress) -> None:
        now = self.clock()
        if now - self._last_sent >= self.interval:
            self._send(progress)
            self._last_sent = now
        else:
            self._held = progress

    def flush(self) -> None:
        if self._held is not None:
            self._send(self._held)

    def _send(self, progress: TrainingProgress) -> None:
        self._held = None
        for reporter in self.reporters:
            _safely(reporter.training_progress, progress)

    def checkpoint_stored(self, step: int, uri: str) -> None:
        for reporter in self.reporters:
            _safely(reporter.checkpoint_stored, step, uri)


def _safely(method, *args) -> None:
    # A reporter that fails (status API down) must never stop training.
    try:
        method(*args)
    except Exception:
        logger.exception("progress reporter %s failed", type(method.__self__).__name__)


@dataclass
class Processed:
    """What this attempt's steps processed so far, over all ranks."""

    queries: int = 0
    tokens: int = 0  # real tokens of queries and passages
    token_slots: int = 0  # positions computed: real tokens plus padding

    def add(self, logs: dict) -> None:
        self.queries += logs["queries"]
        self.tokens += logs["tokens"]
        self.token_slots += logs["padded_tokens"]


def progress_from_log(
    step: int, total_steps: int, epoch: float, logs: dict, *, steps_done: int, elapsed: float, processed: Processed
) -> TrainingProgress:
    """Turn one Trainer log record into a progress report. Rates count only what this attempt
    ran (`steps_done` steps processing `processed` in `elapsed` seconds), so a resumed run
    reports honest speed; the queries and tokens are those really processed, not the
    configured batch."""
    steps_per_second = steps_done / elapsed if elapsed > 0 and steps_done > 0 else None
    return TrainingProgress(
        step=step,
        total_steps=total_steps,
        epoch=epoch,
        loss=logs.get("loss"),
        learning_rate=logs.get("learning_rate"),
        samples_per_second=processed.queries / elapsed if steps_per_second else None,
        tokens_per_second=processed.tokens / elapsed if steps_per_second else None,
        padding_share=1 - processed.tokens / processed.token_slots if processed.token_slots else None,
        eta_seconds=(total_steps - step) / steps_per_second if steps_per_second else None,
    )
