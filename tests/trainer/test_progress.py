import pytest

from embedtune.trainer.contract import TrainingProgress
from embedtune.trainer.progress import (
    JsonFileReporter,
    LogReporter,
    Processed,
    ThrottledReporter,
    progress_from_log,
)


class Recorder:
    def __init__(self):
        self.progress, self.checkpoints = [], []

    def training_progress(self, progress):
        self.progress.append(progress.step)

    def checkpoint_stored(self, step, uri):
        self.checkpoints.append((step, uri))


class Broken:
    def training_progress(self, progress):
        raise ConnectionError("status API down")

    checkpoint_stored = training_progress


def _progress(step):
    return TrainingProgress(
        step=step,
        total_steps=100,
        epoch=step / 10,
        loss=1.0,
        learning_rate=1e-5,
        samples_per_second=8.0,
        eta_seconds=10.0,
    )


def test_progress_is_throttled_but_never_lost_and_a_failing_reporter_is_contained():
    now = [0.0]
    recorder = Recorder()
    throttled = ThrottledReporter([Broken(), recorder], interval=5, clock=lambda: now[0])
    for step in range(1, 12):
        throttled.training_progress(_progress(step))
        now[0] += 1
    throttled.checkpoint_stored(10, "s3://b/c")
    throttled.flush()
    assert recorder.progress == [1, 6, 11]
    assert recorder.checkpoints == [(10, "s3://b/c")]


def test_rates_count_only_this_attempts_steps():
    processed = Processed(queries=3200, tokens=300_000, token_slots=400_000)
    progress = progress_from_log(
        150, 200, 1.5, {"loss": 0.3, "learning_rate": 2e-5}, steps_done=50, elapsed=25.0, processed=processed
    )
    assert progress.samples_per_second == 128.0  # the queries processed, not steps x the configured batch
    assert progress.tokens_per_second == 12_000.0  # real tokens, not padded slots
    assert progress.padding_share == 0.25
    assert progress.eta_seconds == 25.0  # 50 steps left at 2 steps/s
    assert progress.to_status() == {
        "step": 150,
        "totalSteps": 200,
        "epoch": 1.5,
        "loss": 0.3,
        "samplesPerSecond": 128.0,
        "tokensPerSecond": 12000,
        "paddingShare": 0.25,
        "etaSeconds": 25,
    }
    nothing_yet = progress_from_log(1, 10, 0.1, {}, steps_done=0, elapsed=0.0, processed=Processed())
    assert nothing_yet.eta_seconds is None and nothing_yet.padding_share is None


def test_the_log_line_shows_real_tokens_per_second_and_the_padding_share(caplog):
    progress = progress_from_log(
        20, 40, 0.5, {"loss": 0.5}, steps_done=20, elapsed=10.0, processed=Processed(80, 6000, 10000)
    )
    with caplog.at_level("INFO", logger="embedtune.trainer.progress"):
        LogReporter().training_progress(progress)
    assert "samples/s 8.0 tokens/s 600 padding 40% eta" in caplog.text


def test_json_file_reporter_keeps_the_latest(tmp_path):
    reporter = JsonFileReporter(tmp_path / "p.json")
    reporter.training_progress(_progress(3))
    reporter.checkpoint_stored(3, "/c")
    import json

    state = json.loads((tmp_path / "p.json").read_text())
    assert state["training"]["step"] == 3 and state["checkpoint"] == {"step": 3, "uri": "/c"}


class Reports(list):
    def training_progress(self, progress):
        self.append(progress)

    def checkpoint_stored(self, step, uri):
        pass


def test_the_rate_counts_the_queries_processed_not_the_configured_batch(tmp_path):
    from transformers import TrainerState, TrainingArguments

    from embedtune.trainer.runner import ProgressCallback

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4096, use_cpu=True)
    reports = Reports()
    callback = ProgressCallback(ThrottledReporter([reports], interval=0), model=None)
    state = TrainerState(global_step=0, max_steps=10)
    callback.on_train_begin(args, state, None)
    for step in (1, 2):  # the data has 36 queries: each step is all of them
        state.global_step = step
        callback.on_log(args, state, None, logs={"loss": 1.0, "queries": 36, "tokens": 300, "padded_tokens": 400})
    # samples/s over steps/s (the ETA's rate) is the queries per step, however long the steps took
    last = reports[-1]
    assert last.samples_per_second * last.eta_seconds / (10 - last.step) == pytest.approx(36)
    assert last.tokens_per_second * last.eta_seconds / (10 - last.step) == pytest.approx(300)
    assert last.padding_share == pytest.approx(0.25)


def test_progress_and_checkpoints_written_from_two_threads_are_both_kept(tmp_path):
    """Progress comes from the training loop, checkpoints from the upload thread: neither write
    may fail on the other's temporary file, or lose the other's section."""
    import json
    import threading

    reporter = JsonFileReporter(tmp_path / "progress.json")
    errors = []

    def hammer(report):
        try:
            for step in range(300):
                report(step)
        except Exception as exc:  # any failure of a writer is the defect
            errors.append(exc)

    threads = [
        threading.Thread(target=hammer, args=(lambda step: reporter.training_progress(_progress(step)),)),
        threading.Thread(target=hammer, args=(lambda step: reporter.checkpoint_stored(step, f"/c/{step}"),)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    state = json.loads((tmp_path / "progress.json").read_text())
    assert state["training"]["step"] == 299 and state["checkpoint"] == {"step": 299, "uri": "/c/299"}
