"""Training curves and other records people look at: TensorBoard event files in the run's
storage (`<run>/tensorboard/`), written as training goes, plus the evaluation's metrics at the
end, so `tensorboard --logdir` on that folder shows the run.

`training/` holds the Trainer's logs (loss, learning rate, gradient norm, queries and tokens
per second); `evaluation/baseline` and `evaluation/finetuned` hold one point per metric, under
the same tags, so TensorBoard draws the two models side by side.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .contract import MetricsReport
from .errors import StorageUnavailable
from .layout import join

logger = logging.getLogger(__name__)

TRAINING_LOGS = "training"
EVALUATION_LOGS = "evaluation"


class FolderMirror:
    """Keeps a storage prefix a copy of a local folder whose files only grow (event files are
    appended to): each sync uploads the files whose size changed. A failed sync is a warning:
    the curves catch up at the next one, and they are never worth stopping training for."""

    def __init__(self, storage, local_dir: Path, prefix: str):
        self.storage = storage
        self.local_dir = local_dir
        self.prefix = prefix
        self._uploaded: dict[Path, int] = {}
        self._lock = threading.Lock()  # one sync at a time

    def sync(self) -> None:
        with self._lock:
            for path in sorted(p for p in self.local_dir.rglob("*") if p.is_file()):
                size = path.stat().st_size
                if self._uploaded.get(path) == size:
                    continue
                key = join(self.prefix, path.relative_to(self.local_dir).as_posix())
                try:
                    self.storage.upload_file(path, key)
                except StorageUnavailable as exc:
                    logger.warning("training curves not stored this time (%s); the next sync retries", exc)
                    return
                self._uploaded[path] = size


def tensorboard_callback(folder: Path, upload: Callable[[], None] | None, interval_seconds: float):
    """HF's TensorBoard writer, writing into `folder`; `upload` (when this process stores the
    curves) is called at most every `interval_seconds` after a log, and at the end. None
    without the tensorboard package (an install without the trainer extra)."""
    from transformers.integrations import TensorBoardCallback, is_tensorboard_available

    if not is_tensorboard_available():
        logger.warning("tensorboard is not installed: no training curves (pip install 'embedtune[trainer]')")
        return None

    class TensorBoardUpload(TensorBoardCallback):
        def __init__(self):
            super().__init__()
            self.logging_dir = str(folder)
            self._uploaded_at = -float("inf")

        def on_log(self, args, state, control, logs=None, **kwargs):
            super().on_log(args, state, control, logs=logs, **kwargs)
            if upload is not None and state.is_world_process_zero:
                if time.monotonic() - self._uploaded_at >= interval_seconds:
                    self._uploaded_at = time.monotonic()
                    upload()

        def on_train_end(self, args, state, control, **kwargs):
            super().on_train_end(args, state, control, **kwargs)  # closes the event file
            if upload is not None and state.is_world_process_zero:
                upload()

    return TensorBoardUpload()


def write_evaluation_logs(report: MetricsReport, folder: Path) -> bool:
    """One TensorBoard point per metric and model into `folder`/baseline and /finetuned;
    False when no TensorBoard writer is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("tensorboard is not installed: the evaluation's metrics are not added to the curves")
        return False
    for role in ("baseline", "finetuned"):
        metrics = getattr(report, role)
        if metrics is None:
            continue
        with SummaryWriter(log_dir=str(folder / role)) as writer:
            for key, value in metrics.items():
                writer.add_scalar(f"evaluation/{key}", value, 0)
    return True
