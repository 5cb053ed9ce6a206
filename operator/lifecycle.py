"""The state machine of an EmbeddingFinetune: from what is observed, what to do next.

`plan_reconcile` is pure: it reads the resource and its Jobs (and, for a failed Job, its
pods) and returns a Plan (objects to create, Jobs to delete, a status merge patch, Events).
Everything is derived from observed state and deterministic names, so running it twice, or
after an operator restart, plans the same thing and creating twice is a harmless 409.

    Pending -> Training -> Evaluating -> Succeeded
       |          |            |-------> Failed (evaluation failed, quality gate not met)
       |          |-> Failed (input error, restarts exhausted, deadline)
       |          |-> Pending (infrastructure failure: a new attempt from the last checkpoint)
       |-> Suspended -> Pending (runPolicy.suspend toggled)
    any -> Pending (a spec change: a new run; the old run goes to status.history)
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from embedtune.trainer.contract import TrainingProgress
from embedtune.trainer.errors import InputError

from .constants import LABEL_RUN_ID, Condition, Phase, Reason, Role
from .defaults import ClusterDefaults
from .failures import FailureKind, classify_failure, job_failed, job_succeeded
from .render import (
    JobLaunch,
    Run,
    build_evaluation_job,
    build_run_objects,
    evaluation_job_name,
    model_uri,
    plan_evaluation,
    plan_training,
    run_id_of,
    training_job_name,
)
from .spec import EmbeddingFinetuneSpec, parse_finetune

# The training pods' progress fields, cleared when a new run starts.
TRAINER_PROGRESS_FIELDS = TrainingProgress.status_keys()
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: Reason
    message: str


@dataclass
class Plan:
    status: dict[str, Any] = field(default_factory=dict)
    launches: list[JobLaunch] = field(default_factory=list)  # the Jobs to start
    create: list[dict[str, Any]] = field(default_factory=list)  # their Kubernetes objects, and the run's
    delete_jobs: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


def timestamp(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


class _Planner:
    def __init__(
        self,
        finetune: dict[str, Any],
        jobs: list[dict[str, Any]],
        pods: list[dict[str, Any]],
        defaults: ClusterDefaults,
        now: datetime.datetime,
        on_cluster: bool,
    ):
        self.on_cluster = on_cluster
        self.metadata = finetune["metadata"]
        self.finetune = finetune
        self.status: dict[str, Any] = dict(finetune.get("status") or {})
        self.jobs = {job["metadata"]["name"]: job for job in jobs}
        self.pods = pods
        self.defaults = defaults
        self.now = now
        self.plan = Plan()
        self.gate_condition: dict[str, Any] | None = None

    # -- status bookkeeping -------------------------------------------------------------

    def current(self, key: str, default: Any = None) -> Any:
        """The status as it will be after this plan."""
        return self.plan.status.get(key, self.status.get(key, default))

    def set_phase(self, phase: Phase, reason: Reason, message: str, *, warning: bool = False) -> None:
        previous = (self.current("phase"), self.current("reason"))
        self.plan.status.update({"phase": phase.value, "reason": reason.value, "message": message})
        if previous != (phase.value, reason.value):
            self.plan.status["phaseTime"] = timestamp(self.now)
            self.plan.events.append(Event("Warning" if warning else "Normal", reason, message))
        if phase.finished and not self.current("completionTime"):
            self.plan.status["completionTime"] = timestamp(self.now)
        self.plan.status["conditions"] = self.conditions(phase, reason, message)

    def conditions(self, phase: Phase, reason: Reason, message: str) -> list[dict[str, Any]]:
        wanted = {
            Condition.READY: phase is Phase.SUCCEEDED,
            Condition.RECONCILING: phase in (Phase.PENDING, Phase.TRAINING, Phase.EVALUATING),
            Condition.STALLED: phase is Phase.FAILED,
        }
        existing = {c["type"]: c for c in self.current("conditions") or []}
        result = []
        for condition_type, is_true in wanted.items():
            result.append(self.condition(existing, condition_type, is_true, reason.value, message))
        gate = self.gate_condition or existing.get(Condition.QUALITY_GATE)
        if gate is not None:
            result.append(gate)
        return result

    def condition(
        self, existing: dict[str, dict[str, Any]], condition_type: str, is_true: bool, reason: str, message: str
    ) -> dict[str, Any]:
        status = "True" if is_true else "False"
        before = existing.get(condition_type)
        since = before["lastTransitionTime"] if before and before.get("status") == status else timestamp(self.now)
        return {
            "type": condition_type,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": since,
            "observedGeneration": self.metadata.get("generation", 1),
        }

    # -- the state machine ---------------------------------------------------------------

    def run(self) -> Plan:
        self.plan.status["observedGeneration"] = self.metadata.get("generation", 1)
        try:
            spec = parse_finetune(self.finetune, on_cluster=self.on_cluster)
        except InputError as exc:
            self.set_phase(Phase.FAILED, Reason.INVALID_SPEC, "; ".join(exc.problems) or exc.summary, warning=True)
            # Whatever the fix, it starts a new run.
            self.plan.status["specFingerprint"] = None
            return self.plan
        if self.status.get("specFingerprint") != spec.run_fingerprint():
            self.start_run(spec)
        # After the fingerprint: a changed default (a new trainer image) applies to the next
        # Job created, it does not start a new run of every resource.
        spec = self.defaults.apply(spec)
        run = Run(
            self.metadata["namespace"], self.metadata["name"], self.current("runId"), self.current("specFingerprint")
        )
        self.drop_superseded_reports(run.run_id)
        phase = Phase(self.current("phase"))
        if phase.finished:
            return self.plan
        trained = self.jobs.get(training_job_name(run, self.training("attempt")))
        if spec.run_policy.suspend:
            self.suspend(run)
        elif phase is Phase.EVALUATING:
            self.evaluate(spec, run)
        elif phase is Phase.SUSPENDED and trained and job_succeeded(trained):
            self.set_phase(Phase.EVALUATING, Reason.RESUMED, "resumed: evaluating the trained model")
            self.evaluate(spec, run)
        else:
            self.train(spec, run, resumed=phase is Phase.SUSPENDED)
        return self.plan

    def start_run(self, spec: EmbeddingFinetuneSpec) -> None:
        previous_run = self.status.get("runId")
        if previous_run is not None:
            self.archive_run(spec, previous_run)
        run_id = run_id_of(self.metadata.get("generation", 1), self.metadata.get("uid", ""), spec.run_fingerprint())
        self.plan.status.update(
            {
                "runId": run_id,
                "specFingerprint": spec.run_fingerprint(),
                "startTime": timestamp(self.now),
                "completionTime": None,
                "training": {"job": None, "attempt": 1, "restarts": 0} | dict.fromkeys(TRAINER_PROGRESS_FIELDS),
                "checkpoint": None,
                "model": None,
                "evaluation": None,
                "metrics": None,
            }
        )
        existing = [c for c in self.status.get("conditions") or [] if c["type"] != Condition.QUALITY_GATE]
        self.plan.status["conditions"] = existing
        message = f"run {run_id} started" + (f", replacing run {previous_run}" if previous_run else "")
        self.set_phase(Phase.PENDING, Reason.NEW_RUN, message)

    def drop_superseded_reports(self, run_id: str) -> None:
        """A pod of a replaced run may still report before it stops; its reports carry its runId."""
        if self.training("runId") not in (None, run_id):
            self.update_training(**dict.fromkeys(TRAINER_PROGRESS_FIELDS))
        if (self.current("checkpoint") or {}).get("runId") not in (None, run_id):
            self.plan.status["checkpoint"] = None

    def archive_run(self, spec: EmbeddingFinetuneSpec, run_id: str) -> None:
        entry = {
            "runId": run_id,
            "phase": self.status.get("phase"),
            "reason": self.status.get("reason"),
            "startTime": self.status.get("startTime"),
            "completionTime": self.status.get("completionTime") or timestamp(self.now),
            "model": self.status.get("model"),
            "metrics": self.status.get("metrics"),
        }
        # a null inside a list item is stored as null, which the typed status schema refuses
        entry = {key: value for key, value in entry.items() if value is not None}
        history = [entry, *(self.status.get("history") or [])][: spec.run_policy.history_limit]
        self.plan.status["history"] = history
        # A superseded run's Jobs stop now; its checkpoints stay in storage.
        self.plan.delete_jobs += [
            name
            for name, job in self.jobs.items()
            if job["metadata"].get("labels", {}).get(LABEL_RUN_ID) == run_id
            and not (job_succeeded(job) or job_failed(job))
        ]

    def training(self, key: str) -> Any:
        return (self.current("training") or {}).get(key)

    def update_training(self, **values: Any) -> None:
        self.plan.status["training"] = {**(self.plan.status.get("training") or {}), **values}

    def suspend(self, run: Run) -> None:
        running = [
            name
            for name in (
                training_job_name(run, self.training("attempt")),
                evaluation_job_name(run, self.evaluation_attempt()),
            )
            if name in self.jobs and not (job_succeeded(self.jobs[name]) or job_failed(self.jobs[name]))
        ]
        self.plan.delete_jobs += running
        self.set_phase(
            Phase.SUSPENDED, Reason.SUSPENDED, "runPolicy.suspend is true; the Job is removed, checkpoints stay"
        )

    def train(self, spec: EmbeddingFinetuneSpec, run: Run, *, resumed: bool) -> None:
        attempt = self.training("attempt")
        if resumed:
            # A fresh Job name: the suspended one may still be terminating.
            attempt += 1
            self.update_training(attempt=attempt)
        name = training_job_name(run, attempt)
        job = self.jobs.get(name)
        if job is None:
            if not self.create_training_job(spec, run, attempt):
                return
            if resumed:
                self.set_phase(Phase.PENDING, Reason.RESUMED, f"resumed from the last checkpoint as job {name}")
            elif self.current("reason") != Reason.INFRASTRUCTURE_FAILURE.value:
                self.set_phase(Phase.PENDING, Reason.JOB_CREATED, f"training job {name} created")
        elif job_succeeded(job):
            self.update_training(job=name)
            self.plan.status["model"] = {"uri": model_uri(spec, run)}
            if spec.evaluation.enabled:
                self.set_phase(Phase.EVALUATING, Reason.TRAINING_SUCCEEDED, f"training job {name} succeeded")
                self.evaluate(spec, run)
            else:
                self.set_phase(Phase.SUCCEEDED, Reason.SUCCEEDED, f"training job {name} succeeded")
        elif job_failed(job):
            self.training_failed(spec, run, job)
        elif (job.get("status") or {}).get("ready", 0) >= 1 or (job.get("status") or {}).get("active", 0) >= 1:
            self.set_phase(Phase.TRAINING, Reason.TRAINING_STARTED, f"training job {name} is running")

    def create_training_job(self, spec: EmbeddingFinetuneSpec, run: Run, attempt: int) -> bool:
        """Plans the Job of this attempt with the rest of the run's deadline; False if none is left."""
        deadline = self.remaining_deadline(spec)
        if deadline is not None and deadline <= 0:
            self.set_phase(
                Phase.FAILED,
                Reason.DEADLINE_EXCEEDED,
                f"run {run.run_id} ran longer than runPolicy.activeDeadlineSeconds",
                warning=True,
            )
            return False
        if not self.allowed_by_policy(spec):
            return False
        launch = plan_training(spec, run, attempt, deadline)
        self.plan.launches.append(launch)
        self.plan.create += build_run_objects(spec, launch)
        self.update_training(job=launch.name)
        return True

    def allowed_by_policy(self, spec: EmbeddingFinetuneSpec) -> bool:
        """Checked before each Job is created, so a narrowed policy stops the next one too."""
        problems = self.defaults.policy.problems(spec)
        if problems:
            self.set_phase(Phase.FAILED, Reason.POLICY_REFUSED, "; ".join(problems), warning=True)
        return not problems

    def remaining_deadline(self, spec: EmbeddingFinetuneSpec) -> int | None:
        limit = spec.run_policy.active_deadline_seconds
        if limit is None:
            return None
        elapsed = (self.now - parse_timestamp(self.current("startTime"))).total_seconds()
        return int(limit - elapsed)

    def pods_of(self, job_name: str) -> list[dict[str, Any]]:
        return [pod for pod in self.pods if pod["metadata"].get("labels", {}).get(JOB_NAME_LABEL) == job_name]

    def training_failed(self, spec: EmbeddingFinetuneSpec, run: Run, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        failure = classify_failure(job, self.pods_of(name), Role.TRAIN.container)
        if failure.kind is FailureKind.INPUT:
            self.set_phase(Phase.FAILED, Reason.INPUT_ERROR, f"{failure.reason}: {failure.message}", warning=True)
        elif not failure.retryable:
            self.set_phase(Phase.FAILED, Reason.DEADLINE_EXCEEDED, failure.message, warning=True)
        elif self.training("restarts") >= spec.run_policy.max_restarts:
            self.set_phase(
                Phase.FAILED,
                Reason.RESTARTS_EXHAUSTED,
                f"{failure.reason}: {failure.message} (after {self.training('restarts')} restarts, "
                f"runPolicy.maxRestarts is {spec.run_policy.max_restarts})",
                warning=True,
            )
        else:
            restarts = self.training("restarts") + 1
            attempt = self.training("attempt") + 1
            self.update_training(restarts=restarts, attempt=attempt)
            self.set_phase(
                Phase.PENDING,
                Reason.INFRASTRUCTURE_FAILURE,
                f"{failure.reason}: {failure.message}; restart {restarts} of "
                f"{spec.run_policy.max_restarts} resumes from the last checkpoint",
                warning=True,
            )
            self.create_training_job(spec, run, attempt)

    def evaluation_attempt(self) -> int:
        return (self.current("evaluation") or {}).get("attempt", 1)

    def evaluate(self, spec: EmbeddingFinetuneSpec, run: Run) -> None:
        attempt = self.evaluation_attempt()
        name = evaluation_job_name(run, attempt)
        job = self.jobs.get(name)
        self.plan.status["evaluation"] = {"job": name, "attempt": attempt}
        if job is None:
            if not self.allowed_by_policy(spec):
                return
            launch = plan_evaluation(spec, run, attempt)
            self.plan.launches.append(launch)
            self.plan.create.append(build_evaluation_job(spec, launch))
        elif job_succeeded(job):
            self.evaluated(spec, name)
        elif job_failed(job):
            failure = classify_failure(job, self.pods_of(name), Role.EVALUATE.container)
            if failure.retryable and attempt <= spec.run_policy.max_restarts:
                # Evaluation starts over from the stored model; its retries have their own count.
                self.plan.status["evaluation"] = {"job": evaluation_job_name(run, attempt + 1), "attempt": attempt + 1}
                self.set_phase(
                    Phase.EVALUATING,
                    Reason.INFRASTRUCTURE_FAILURE,
                    f"evaluation job {name}: {failure.reason}: {failure.message}; retry {attempt} of "
                    f"{spec.run_policy.max_restarts}",
                    warning=True,
                )
                self.evaluate(spec, run)
            else:
                self.set_phase(
                    Phase.FAILED,
                    Reason.EVALUATION_FAILED,
                    f"evaluation job {name}: {failure.reason}: {failure.message}",
                    warning=True,
                )

    def evaluated(self, spec: EmbeddingFinetuneSpec, name: str) -> None:
        metrics = self.current("metrics")
        gate = spec.evaluation.gate
        if gate is None:
            self.set_phase(Phase.SUCCEEDED, Reason.SUCCEEDED, f"evaluation job {name} succeeded")
            return
        scores = metrics if gate.mode == "dense" else ((metrics or {}).get("modes") or {}).get(gate.mode)
        delta = ((scores or {}).get("delta") or {}).get(gate.metric)
        gated = gate.metric if gate.mode == "dense" else f"{gate.mode} {gate.metric}"
        if delta is None:
            where = "status.metrics.delta" if gate.mode == "dense" else f"status.metrics.modes.{gate.mode}.delta"
            passed, reason, message = None, Reason.METRICS_MISSING, f"{where} has no {gate.metric}"
        elif delta >= gate.min_improvement:
            passed, reason, message = (
                True,
                Reason.GATE_PASSED,
                (f"{gated} improved by {delta:+.4f} (at least {gate.min_improvement} required)"),
            )
        else:
            passed, reason, message = (
                False,
                Reason.GATE_NOT_MET,
                (f"{gated} changed by {delta:+.4f}; at least {gate.min_improvement} required"),
            )
        self.gate_condition = self.condition({}, Condition.QUALITY_GATE, bool(passed), reason.value, message)
        if passed:
            self.set_phase(Phase.SUCCEEDED, Reason.SUCCEEDED, f"evaluation job {name} succeeded; {message}")
        else:
            self.set_phase(Phase.FAILED, reason, message, warning=True)


def plan_conflict(finetune: dict[str, Any], message: str, now: datetime.datetime) -> Plan:
    """A child the run needs has its name taken by an object that is not the resource's: the
    run waits in its phase, with the reason in the status, until the name is free."""
    planner = _Planner(finetune, [], [], ClusterDefaults(), now, on_cluster=True)
    planner.set_phase(Phase(planner.current("phase") or Phase.PENDING), Reason.CHILD_CONFLICT, message, warning=True)
    return planner.plan


def plan_reconcile(
    finetune: dict[str, Any],
    jobs: list[dict[str, Any]],
    pods: list[dict[str, Any]],
    defaults: ClusterDefaults,
    now: datetime.datetime,
    *,
    on_cluster: bool = True,
) -> Plan:
    """What to do for `finetune` given its Jobs and their pods; see the module docstring.
    `on_cluster=False` is `embedtune run`, where storage and data may be local paths."""
    return _Planner(finetune, jobs, pods, defaults, now, on_cluster).run()
