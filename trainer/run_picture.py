"""One picture of a run, for `embedtune run`: the training loss over the steps, and the gate
metric of the base and the fine-tuned model side by side (with the delta's 95% interval).
matplotlib is optional (the trainer and quickstart extras install it)."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence

from .contract import CONFIDENCE, MetricsReport

RUN_PICTURE = "run.png"


def losses_of(trainer_state: bytes) -> list[tuple[int, float]]:
    """(step, loss) of every training log in a checkpoint's trainer_state.json (a resumed run's
    checkpoint carries the logs of the attempts before it)."""
    history = json.loads(trainer_state).get("log_history", [])
    return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry and "step" in entry]


def draw_run(
    title: str, losses: Sequence[tuple[int, float]], report: MetricsReport | None, metric: str
) -> bytes | None:
    """The picture as PNG bytes; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, (curve, bars) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    figure.suptitle(title)
    if losses:
        steps, values = zip(*losses)
        curve.plot(steps, values, marker="o", markersize=3)
    curve.set(title="training loss", xlabel="step", ylabel="loss")
    curve.grid(alpha=0.3)
    if report is not None and metric in report.finetuned:
        names, heights = ["fine-tuned"], [report.finetuned[metric]]
        if report.baseline is not None:
            names, heights = ["base model", "fine-tuned"], [report.baseline[metric], report.finetuned[metric]]
        drawn = bars.bar(names, heights, color=["#999999", "#1f77b4"][-len(names) :])
        bars.bar_label(drawn, fmt="%.4f")
        caption = f"{report.queries} queries"
        if report.delta is not None:
            caption = f"delta {report.delta[metric]:+.4f}"
            if report.delta_interval is not None:
                interval = report.delta_interval[metric]
                caption += f", {CONFIDENCE:.0%} interval [{interval.low:+.4f}, {interval.high:+.4f}]"
            caption += f"\n{report.queries} queries"
        bars.set(title=metric, xlabel=caption, ylim=(0, max(heights) * 1.2 or 1))
    else:
        bars.set(title="not evaluated")
        bars.axis("off")
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    plt.close(figure)
    return png.getvalue()
