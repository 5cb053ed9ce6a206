import datetime

from prometheus_client import REGISTRY

from embedtune.operator import metrics
from embedtune.operator.lifecycle import Plan, timestamp

NOW = datetime.datetime(2026, 11, 22, 12, 0, tzinfo=datetime.UTC)


def sample(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def finetune(name, phase=None, since=None):
    status = {"phase": phase, "phaseTime": timestamp(since)} if phase else {}
    return {"metadata": {"namespace": "metrics-test", "name": name}, "status": status}


def test_time_in_a_phase_is_observed_when_the_run_leaves_it():
    before = sample("embedtune_phase_duration_seconds_sum", phase="Training")
    metrics.observe_plan(
        finetune("a", "Training", NOW - datetime.timedelta(seconds=90)), Plan(status={"phase": "Evaluating"}), NOW
    )
    assert sample("embedtune_phase_duration_seconds_sum", phase="Training") - before == 90


def test_runs_are_counted_by_phase_until_deleted():
    before = sample("embedtune_runs", phase="Suspended")
    metrics.observe_plan(finetune("b"), Plan(status={"phase": "Suspended"}), NOW)
    metrics.observe_plan(finetune("c"), Plan(status={"phase": "Suspended"}), NOW)
    assert sample("embedtune_runs", phase="Suspended") == before + 2
    metrics.forget("metrics-test", "b")
    assert sample("embedtune_runs", phase="Suspended") == before + 1


def test_reconciles_are_counted_by_outcome():
    ok, error = sample("embedtune_reconciles_total", result="ok"), sample("embedtune_reconciles_total", result="error")
    with metrics.reconciling():
        pass
    try:
        with metrics.reconciling():
            raise RuntimeError("API server unavailable")
    except RuntimeError:
        pass
    assert sample("embedtune_reconciles_total", result="ok") == ok + 1
    assert sample("embedtune_reconciles_total", result="error") == error + 1
