"""The picture `embedtune run` stores next to the run."""

from __future__ import annotations

import json

from embedtune.trainer.contract import ConfidenceInterval, MetricsReport
from embedtune.trainer.run_picture import draw_run, losses_of

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_the_loss_curve_comes_from_the_training_logs_only():
    state = {
        "log_history": [
            {"step": 5, "loss": 2.0, "learning_rate": 1e-4},
            {"step": 10, "loss": 1.5},
            {"step": 10, "train_loss": 1.7, "train_runtime": 3.0},  # the final summary
        ]
    }
    assert losses_of(json.dumps(state).encode()) == [(5, 2.0), (10, 1.5)]


def test_the_picture_is_a_png_with_or_without_metrics():
    report = MetricsReport(
        baseline={"ndcg@10": 0.5},
        finetuned={"ndcg@10": 0.6},
        delta={"ndcg@10": 0.1},
        deltaInterval={"ndcg@10": ConfidenceInterval(low=0.05, high=0.15)},
        queries=100,
        corpus=1000,
    )
    assert draw_run("ml/finance run 1", [(5, 2.0), (10, 1.5)], report, "ndcg@10").startswith(PNG_SIGNATURE)
    assert draw_run("ml/finance run 1", [], None, "ndcg@10").startswith(PNG_SIGNATURE)
