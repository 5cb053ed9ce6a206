"""`embedtune run`: one EmbeddingFinetune on this machine, decided by the operator's own planner.

`lifecycle.plan_reconcile` decides here exactly as in a cluster, over the same spec model and
the same rendered objects. This module plays the parts Kubernetes plays there:

- the API server: the resource (manifest, generation, status) is kept in storage next to its
  runs, `<storage>/<namespace>/<name>/resource.yaml`; a changed spec bumps the generation,
  which starts a new run, as `kubectl apply` would;
- the Job controller and the kubelet: each Job the planner launches (a typed `JobLaunch`, the
  same one a cluster's Job is rendered from) runs its program here on its config: the trainer
  on all local GPUs, or CPU processes, with the pod's `/scratch` mapped to a local folder; the
  evaluator in one process;
- the pods' status reports: progress and metrics are read from the files the jobs write.

Ctrl-C, or SIGTERM to this command, makes the trainer store a checkpoint at the next step and
stop; running the same command again continues the same run from that checkpoint. One run of
a resource holds its lock in the storage (run_lock.py), so a second one refuses to start.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from embedtune.trainer.contract import (
    EvaluationConfig,
    MetricsReport,
    Program,
    ProgressFile,
    TrainerConfig,
    dump_config,
)
from embedtune.trainer.errors import (
    EXIT_FAILURE,
    EXIT_INPUT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    InputError,
    StorageUnavailable,
)
from embedtune.trainer.layout import join
from embedtune.trainer.storage import open_storage

from .constants import API_VERSION, KIND, Phase, Reason
from .defaults import ClusterDefaults
from .lifecycle import JOB_NAME_LABEL, plan_reconcile
from .render import JobLaunch, Run, metrics_key
from .run_lock import RunLock, RunLocked
from .spec import EmbeddingFinetuneSpec, parse_finetune

logger = logging.getLogger(__name__)

RESOURCE_FILE = "resource.yaml"
LOCK_FILE = "run.lock"
# Another run of the resource holds its lock: try again when it has ended.
EXIT_BUSY = 3
# No image runs here, and the manifest's own storage settings are the only ones.
LOCAL_DEFAULTS = ClusterDefaults(trainer_image="(this machine)")
# Ctrl-C ends a child with 130 when it handles the signal (the trainer), or by the signal itself
_INTERRUPTED_CODES = (EXIT_INTERRUPTED, -signal.SIGINT)


@dataclass(frozen=True)
class LocalOptions:
    default_storage: str  # when the manifest names none
    nproc_per_node: int | None = None  # default: one per GPU, or 1
    new_run: bool = False  # start a new run even when the spec has not changed
    work_dir: Path | None = None  # default: a temporary folder per run of the command


def _resolve(value: str, base: Path) -> str:
    """A relative path in the manifest means relative to the manifest's folder."""
    if "://" in value or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def localize(manifest: dict[str, Any], manifest_dir: Path, default_storage: str) -> dict[str, Any]:
    """The manifest as this machine reads it: paths resolved against its folder, storage and
    namespace defaulted. Malformed parts are left alone for validation to report."""
    manifest = copy.deepcopy(manifest)
    metadata = manifest.setdefault("metadata", {})
    if isinstance(metadata, dict):
        metadata.setdefault("namespace", "default")
    spec = manifest.get("spec")
    if not isinstance(spec, dict):
        return manifest
    storage = spec.setdefault("storage", {"uri": default_storage})
    if isinstance(storage, dict) and isinstance(storage.get("uri"), str):
        storage["uri"] = _resolve(storage["uri"], manifest_dir)
    model = spec.get("model")
    if isinstance(model, dict) and isinstance(model.get("base"), str) and (manifest_dir / model["base"]).exists():
        model["base"] = _resolve(model["base"], manifest_dir)  # otherwise a hub id such as BAAI/bge-base-en-v1.5
    data = spec.get("data")
    if isinstance(data, dict):
        train = data.get("train")
        if isinstance(train, str):
            data["train"] = _resolve(train, manifest_dir)
        elif isinstance(train, list):
            data["train"] = [_resolve(item, manifest_dir) if isinstance(item, str) else item for item in train]
        if isinstance(data.get("eval"), str):
            data["eval"] = _resolve(data["eval"], manifest_dir)
        mining = data.get("hardNegatives")
        if isinstance(mining, dict) and isinstance(mining.get("candidates"), str):
            mining["candidates"] = _resolve(mining["candidates"], manifest_dir)
    evaluation = spec.get("evaluation")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("retention"), str):
        evaluation["retention"] = _resolve(evaluation["retention"], manifest_dir)
    merge = spec.get("merge")
    if isinstance(merge, dict) and isinstance(merge.get("models"), list):
        merge["models"] = [
            _resolve(item, manifest_dir) if isinstance(item, str) and (manifest_dir / item).exists() else item
            for item in merge["models"]
        ]
    return manifest


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies the planner's status patches."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def check_inputs(spec: EmbeddingFinetuneSpec, scratch: Path) -> None:
    """Every problem of the base model, the training data, the candidate pool and the evaluation
    set, before anything runs."""
    from embedtune.trainer.data import (
        IGNORED_SCORES,
        REPLACED_SCORES,
        check_distillable,
        ignored_scores_warning,
        load_training_data,
    )
    from embedtune.trainer.evalset import load_eval_set
    from embedtune.trainer.mining import fetch_candidates
    from embedtune.trainer.model_loading import load_tokenizer_and_encoder
    from embedtune.trainer.storage import fetch_to_local

    problems = []
    try:  # loaded as the trainer loads it, then dropped
        base = fetch_to_local(spec.model.base, scratch / "model", spec.storage)
        load_tokenizer_and_encoder(str(base), trust_remote_code=spec.model.trust_remote_code)
    except InputError as exc:
        problems.append(exc.summary)
    loaded = load_training_data(spec.data.for_trainer(), scratch / "data", spec.storage)
    problems += loaded.problems
    if spec.training.distills and spec.data.teacher is None and not loaded.problems:
        try:
            check_distillable(loaded, spec.training.group_size)
        except InputError as exc:
            problems += exc.problems
    elif warning := ignored_scores_warning(loaded, IGNORED_SCORES if spec.data.teacher is None else REPLACED_SCORES):
        logger.warning("training data: %s", warning)
    if spec.data.hard_negatives is not None and spec.data.hard_negatives.mine:
        try:
            fetch_candidates(spec.data.hard_negatives, scratch / "candidates", spec.storage)
        except InputError as exc:
            problems += exc.problems or [exc.summary]
    if spec.evaluation.enabled and spec.data.eval is not None:
        try:
            load_eval_set(spec.data.eval, scratch / "eval", spec.storage)
        except InputError as exc:
            problems += exc.problems or [exc.summary]
    if problems:
        raise InputError(f"{len(problems)} problems in the model and data; fix them and run again", problems)


@dataclass
class LocalJob:
    """A Job the planner launched, and how it ended here."""

    launch: JobLaunch
    exit_code: int | None = None
    termination_message: str = ""
    deadline_exceeded: bool = False

    @property
    def name(self) -> str:
        return self.launch.name

    def observed(self) -> dict[str, Any]:
        """The Job as the planner reads it from the API."""
        if self.exit_code is None:
            status = {"active": 1}
        elif self.exit_code == 0:
            status = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
        else:
            reason = "DeadlineExceeded" if self.deadline_exceeded else "BackoffLimitExceeded"
            status = {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": reason}]}
        return {"metadata": {"name": self.name, "labels": self.launch.labels}, "status": status}

    def pod(self) -> dict[str, Any]:
        """Its pod, which tells the planner why it failed (exit code, termination message)."""
        terminated = {"exitCode": self.exit_code, "reason": "Error", "message": self.termination_message}
        container = {"name": self.launch.role.container, "state": {"terminated": terminated}}
        return {
            "metadata": {"name": f"{self.name}-0", "labels": {JOB_NAME_LABEL: self.name}},
            "status": {"containerStatuses": [container]},
        }


@dataclass
class LocalRun:
    manifest: dict[str, Any]
    spec: EmbeddingFinetuneSpec
    options: LocalOptions
    scratch: Path
    resource: dict[str, Any] = field(default_factory=dict)
    jobs: dict[str, LocalJob] = field(default_factory=dict)

    @functools.cached_property
    def storage(self):  # one client for the whole command
        return open_storage(self.spec.storage.uri, self.spec.storage)

    @property
    def resource_key(self) -> str:
        metadata = self.manifest["metadata"]
        return join(metadata["namespace"], metadata["name"], RESOURCE_FILE)

    @property
    def lock_key(self) -> str:
        metadata = self.manifest["metadata"]
        return join(metadata["namespace"], metadata["name"], LOCK_FILE)

    @property
    def status(self) -> dict[str, Any]:
        return self.resource.setdefault("status", {})

    def load(self) -> None:
        """The stored resource. A changed spec is a new generation, as the API server counts
        them (the planner starts a new run when the change needs one); so is running again
        after a failure, or with --new-run, and those always start a new run."""
        stored = self.storage.read_bytes(self.resource_key)
        previous = yaml.safe_load(stored) if stored else None
        generation = previous["metadata"]["generation"] if previous else 0
        status = previous["status"] if previous else {}
        new_run = self.options.new_run or status.get("phase") == Phase.FAILED
        if previous is None or previous["spec"] != self.manifest["spec"] or new_run:
            generation += 1
        if new_run:
            status = status | {"specFingerprint": None}
        # The API server gives every resource a uid; here the stored resource keeps one, and a
        # resource created anew (its resource.yaml deleted) gets another, as on a cluster.
        uid = previous["metadata"].get("uid") if previous else None
        metadata = self.manifest["metadata"] | {"generation": generation, "uid": uid or uuid.uuid4().hex}
        self.resource = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": metadata,
            "spec": self.manifest["spec"],
            "status": status,
        }

    def save(self) -> None:
        try:
            self.storage.write_bytes(self.resource_key, yaml.safe_dump(self.resource, sort_keys=False).encode())
        except StorageUnavailable as exc:  # what was stored is still the record: running again continues from it
            raise StorageUnavailable(
                f"{exc}; the run's status ({self.status.get('phase')}: {self.status.get('message')}) was not "
                f"saved to {self.storage.uri_for(self.resource_key)}; the same command continues the run"
            ) from exc

    def reconcile(self) -> None:
        plan = plan_reconcile(
            self.resource,
            [job.observed() for job in self.jobs.values()],
            [job.pod() for job in self.jobs.values() if job.exit_code],
            LOCAL_DEFAULTS,
            datetime.datetime.now(tz=datetime.UTC),
            on_cluster=False,
        )
        # stored as the API stores it: JSON (the planner's enums become their strings)
        self.resource["status"] = merge_patch(self.status, json.loads(json.dumps(plan.status)))
        for event in plan.events:
            print(f"{event.type}: {event.reason.value}: {event.message}", file=sys.stderr)
        for name in plan.delete_jobs:
            self.jobs.pop(name, None)
        for launch in plan.launches:
            self.jobs.setdefault(launch.name, LocalJob(launch))
        self.save()

    def next_job(self) -> LocalJob | None:
        return next((job for job in self.jobs.values() if job.exit_code is None), None)

    def run_job(self, job: LocalJob) -> int | None:
        """Run one Job to its end; the signal that stopped it, when the user stopped it."""
        from embedtune.trainer.launch import run_child

        work = self.scratch / job.name
        work.mkdir(parents=True, exist_ok=True)
        termination_log = work / "termination-log"
        env = os.environ | {"PYTHONUNBUFFERED": "1", "EMBEDTUNE_TERMINATION_LOG": str(termination_log)}
        config_file = work / job.launch.config_file
        config_file.write_text(dump_config(self.local_config(job.launch.config, work)))
        if job.launch.program is Program.TRAINER:
            command = self.training_command(job, config_file)
        else:
            command = job.launch.program.command(str(config_file), python=sys.executable)
        deadline = job.launch.deadline_seconds
        started = time.monotonic()
        # stdout is for the run's result; what the jobs print is progress, like their logs
        ended = run_child(command, env, timeout=deadline, stdout=sys.stderr)
        job.exit_code = ended.exit_code
        job.deadline_exceeded = deadline is not None and time.monotonic() - started >= deadline
        job.termination_message = termination_log.read_text() if termination_log.exists() else ""
        if job.launch.program is Program.TRAINER:
            self.report_training(work)
        elif job.exit_code == 0:
            self.report_metrics()
        # Stopped by the user (Ctrl-C, or SIGTERM to this command): not a failure to retry, as a
        # pod's 143 is on a cluster; the same command resumes.
        if ended.signal is not None:
            return ended.signal
        return signal.SIGINT if job.exit_code in _INTERRUPTED_CODES else None

    @staticmethod
    def local_config(config: TrainerConfig | EvaluationConfig, work: Path) -> TrainerConfig | EvaluationConfig:
        """The pod's config as this machine runs it: its emptyDir is a local folder, what it
        would patch into the status it leaves in files this executor reads (it is the API here),
        and the metrics table is printed once, with the run's result."""
        update: dict[str, Any] = {"run": config.run.model_copy(update={"report_status": False})}
        if isinstance(config, TrainerConfig):
            update["work_dir"] = str(work)
        else:
            update["print_table"] = False
        return config.model_copy(update=update)

    def training_command(self, job: LocalJob, config_file: Path) -> list[str]:
        from embedtune.trainer.launch import local_processes, local_trainer_command

        nproc = self.options.nproc_per_node or local_processes()
        # spec.resources sizes cluster pods; here the machine's own devices decide
        print(f"training job {job.name}: {nproc} process(es) on this machine", file=sys.stderr)
        print(f"training curves, updated as it goes: {self.tensorboard_command()}", file=sys.stderr)
        return local_trainer_command(config_file, nproc)

    def report_training(self, work: Path) -> None:
        """What the trainer would have patched into the status: its progress, its checkpoint."""
        progress_file = work / "progress.json"
        if not progress_file.exists():
            return
        progress = ProgressFile.model_validate_json(progress_file.read_text())
        run_id = self.status["runId"]
        patch = {}
        if progress.training is not None:
            patch["training"] = progress.training.model_copy(update={"run_id": run_id}).to_status()
        if progress.checkpoint is not None:
            patch["checkpoint"] = progress.checkpoint.model_copy(update={"run_id": run_id}).to_dict()
        self.resource["status"] = merge_patch(self.status, patch)

    def report_metrics(self) -> None:
        metrics = self.metrics_report().status().model_dump(by_alias=True)
        self.resource["status"] = merge_patch(self.status, {"metrics": metrics})

    @property
    def current_run(self) -> Run:
        return Run(self.manifest["metadata"]["namespace"], self.manifest["metadata"]["name"], self.status["runId"])

    def store_picture(self, report: MetricsReport | None) -> str | None:
        """The run's picture (loss curve, gate metric of both models) next to its other files;
        where it is, or None without a stored checkpoint or without matplotlib."""
        from embedtune.trainer.run_picture import RUN_PICTURE, draw_run, losses_of

        checkpoint = self.status.get("checkpoint")
        if checkpoint is None:
            return None
        run = self.current_run
        state = self.storage.read_bytes(join(run.layout.checkpoint_prefix(checkpoint["step"]), "trainer_state.json"))
        gate = self.spec.evaluation.gate
        ks = self.spec.evaluation.k_values
        metric = gate.metric if gate is not None else f"ndcg@{10 if 10 in ks else ks[0]}"
        title = f"{run.namespace}/{run.name} run {run.run_id}: {self.spec.model.base.rsplit('/', 1)[-1]}"
        png = draw_run(title, losses_of(state) if state else [], report, metric)
        if png is None:
            print("no picture of the run: matplotlib is not installed", file=sys.stderr)
            return None
        key = join(run.layout.run_prefix, RUN_PICTURE)
        self.storage.write_bytes(key, png)
        return self.storage.uri_for(key)

    def tensorboard_command(self) -> str:
        """The command that shows the run's curves (TensorBoard reads local folders; an S3
        folder is copied first)."""
        run = self.current_run
        uri = self.storage.uri_for(run.layout.tensorboard_prefix)
        if uri.startswith("s3://"):
            local = f"./tensorboard-{run.run_id}"
            return f"aws s3 sync {uri} {local} && tensorboard --logdir {local}"
        return f"tensorboard --logdir {uri}"

    def metrics_report(self) -> MetricsReport | None:
        run = self.current_run
        stored = self.storage.read_bytes(metrics_key(run))
        return MetricsReport.model_validate_json(stored) if stored else None


def run_finetune(manifest: dict[str, Any], manifest_dir: Path, options: LocalOptions) -> int:
    """Run the manifest's EmbeddingFinetune to its end here; the exit code of `embedtune run`."""
    manifest = localize(manifest, manifest_dir, options.default_storage)
    spec = parse_finetune(manifest, on_cluster=False)
    with tempfile.TemporaryDirectory(prefix="embedtune-run-") as temporary:
        run = LocalRun(manifest, spec, options, options.work_dir or Path(temporary))
        run.load()
        if run.status.get("specFingerprint") != spec.run_fingerprint():  # not a run to resume
            check_inputs(spec, run.scratch / "check")  # before anything is written
        try:
            with RunLock(run.storage, run.lock_key):
                run.load()  # again: another run may have ended while the inputs were checked
                return run_to_end(run)
        except RunLocked as exc:
            print(exc, file=sys.stderr)
            return EXIT_BUSY


def run_to_end(run: LocalRun) -> int:
    run.reconcile()
    if Phase(run.status["phase"]).finished and not run.jobs:
        print(
            f"run {run.status['runId']} already {run.status['phase']}; a changed spec or --new-run starts a new one",
            file=sys.stderr,
        )
    while not Phase(run.status["phase"]).finished and Phase(run.status["phase"]) is not Phase.SUSPENDED:
        job = run.next_job()
        if job is None:  # the planner waits for something that will not happen here
            raise RuntimeError(f"nothing to run in phase {run.status['phase']}: {run.status.get('message')}")
        run.reconcile()  # the Job is running: phase Training or Evaluating
        stopped_by = run.run_job(job)
        if stopped_by is not None:
            run.save()
            print_interrupted(run)
            return 128 + stopped_by  # as a shell reports a process ended by the signal
        run.reconcile()
    print_summary(run)
    return exit_code(run.status)


def exit_code(status: dict[str, Any]) -> int:
    if status["phase"] in (Phase.SUCCEEDED, Phase.SUSPENDED):
        return EXIT_OK
    if status.get("reason") in (Reason.INPUT_ERROR, Reason.INVALID_SPEC):
        return EXIT_INPUT_ERROR
    return EXIT_FAILURE


def print_interrupted(run: LocalRun) -> None:
    if run.status["phase"] == Phase.EVALUATING:
        where = "its evaluation (the model is stored)"
    elif checkpoint := run.status.get("checkpoint"):
        where = f"checkpoint {checkpoint['step']} at {checkpoint['uri']}"
    else:
        where = "the start (no checkpoint yet)"
    print(f"interrupted; the same command resumes run {run.status['runId']} from {where}", file=sys.stderr)


def print_summary(run: LocalRun) -> None:
    from embedtune.trainer.evaluate import format_table

    report = run.metrics_report() if run.status.get("metrics") else None
    if report is not None:
        print(format_table(report, run.spec.evaluation.k_values))
    if run.status.get("model"):
        print(f"model: {run.status['model']['uri']}")
    if run.status.get("runId"):
        print(f"curves: {run.tensorboard_command()}")
    if picture := run.store_picture(report):
        print(f"picture: {picture}")
    print(f"resource: {run.storage.uri_for(run.resource_key)}")
    print(yaml.safe_dump({"status": run.status}, sort_keys=False), end="")
