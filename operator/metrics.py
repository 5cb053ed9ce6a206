"""Prometheus metrics of the operator: reconciles, runs by phase, time spent per phase."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram

from .constants import Phase

if TYPE_CHECKING:
    from .lifecycle import Plan

RECONCILES = Counter("embedtune_reconciles_total", "Reconciles of EmbeddingFinetunes, by outcome.", ["result"])
RECONCILE_SECONDS = Histogram("embedtune_reconcile_duration_seconds", "Time one reconcile takes.")
RUNS = Gauge("embedtune_runs", "EmbeddingFinetunes seen by this operator, by phase.", ["phase"])
PHASE_SECONDS = Histogram(
    "embedtune_phase_duration_seconds",
    "Time a run spent in a phase, observed when it leaves it.",
    ["phase"],
    buckets=(10, 60, 300, 900, 3600, 3 * 3600, 12 * 3600, 24 * 3600, 72 * 3600, float("inf")),
)

# The phase of each resource, to count runs by phase without listing them.
_phases: dict[tuple[str, str], str] = {}


@contextlib.contextmanager
def reconciling() -> Iterator[None]:
    with RECONCILE_SECONDS.time():
        try:
            yield
        except Exception:
            RECONCILES.labels(result="error").inc()
            raise
    RECONCILES.labels(result="ok").inc()


def forget(namespace: str, name: str) -> None:
    """A deleted resource no longer counts in any phase."""
    if _phases.pop((namespace, name), None) is not None:
        _set_run_counts()


def observe_plan(finetune: dict[str, Any], plan: Plan, now: datetime.datetime) -> None:
    from .lifecycle import parse_timestamp

    status = finetune.get("status") or {}
    new_phase = plan.status.get("phase")
    old_phase = status.get("phase")
    if new_phase is None:
        return
    if old_phase and old_phase != new_phase and status.get("phaseTime"):
        spent = (now - parse_timestamp(status["phaseTime"])).total_seconds()
        PHASE_SECONDS.labels(phase=old_phase).observe(spent)
    key = (finetune["metadata"]["namespace"], finetune["metadata"]["name"])
    _phases[key] = new_phase
    _set_run_counts()


def _set_run_counts() -> None:
    for phase in Phase:
        RUNS.labels(phase=phase.value).set(sum(1 for value in _phases.values() if value == phase.value))
