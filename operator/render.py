"""What a run of an EmbeddingFinetune becomes. Pure functions, no I/O.

First, typed launch plans (`plan_training`, `plan_evaluation`): which program runs with
which config (contract.py), on how many processes, until when. A cluster and `embedtune run`
both start jobs from these. Then the Kubernetes objects of a plan, as plain dicts: every
builder takes `(spec, run)` or `(spec, launch)`; the image is `spec.resources.image`, which
the cluster defaults have filled in.

Names are deterministic (resource, run, attempt), so creating a child twice is a 409 and
nothing else. Owner references are added by the caller (`kopf.adopt`), which knows the uid.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from embedtune.trainer.contract import (
    EVALUATION_CONFIG_FILE,
    GROUP,
    PLURAL,
    TRAINER_CONFIG_FILE,
    EncodingSettings,
    EvaluationConfig,
    Program,
    RunIdentity,
    TrainerConfig,
    dump_config,
)
from embedtune.trainer.layout import RunLayout, join

from .constants import (
    CONFIG_DIR,
    LABEL_ATTEMPT,
    LABEL_FINETUNE,
    LABEL_KUEUE_QUEUE,
    LABEL_MANAGED_BY,
    LABEL_ROLE,
    LABEL_RUN_ID,
    MANAGED_BY,
    MASTER_PORT,
    Role,
)
from .spec import EmbeddingFinetuneSpec

WORK_DIR = "/scratch"
_USER_ID = 1000


def run_id_of(generation: int, uid: str, spec_fingerprint: str) -> str:
    """`<generation>-<digest of the resource's uid and spec>`: a run's identity in storage,
    status and labels. A deleted and re-created resource (a new uid, the generation counting
    from 1 again) or another spec never meets an earlier run's checkpoints or model."""
    digest = hashlib.sha256(f"{uid}/{spec_fingerprint}".encode()).hexdigest()[:6]
    return f"{generation}-{digest}"


@dataclass(frozen=True)
class Run:
    """Which run of which resource the children belong to."""

    namespace: str
    name: str
    run_id: str
    spec_fingerprint: str | None = None

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.namespace, self.name, self.run_id)

    @property
    def generation(self) -> str:
        """Names of Kubernetes objects carry only the generation: they must fit a DNS label with
        the resource's name, and the owner reference ties them to one incarnation."""
        return self.run_id.partition("-")[0]

    def identity(self, *, report_status: bool = True) -> RunIdentity:
        return RunIdentity(
            namespace=self.namespace,
            name=self.name,
            run_id=self.run_id,
            spec_fingerprint=self.spec_fingerprint,
            report_status=report_status,
        )


# --- names and storage locations -----------------------------------------------------------


def service_account_name(run: Run) -> str:
    return f"{run.name}-embedtune"


def service_name(run: Run) -> str:
    return f"{run.name}-train"


def config_map_name(run: Run) -> str:
    return f"{run.name}-config-{run.generation}"


def training_job_name(run: Run, attempt: int) -> str:
    return f"{run.name}-train-{run.generation}-{attempt}"


def evaluation_job_name(run: Run, attempt: int) -> str:
    return f"{run.name}-eval-{run.generation}-{attempt}"


def storage_uri(spec: EmbeddingFinetuneSpec, prefix: str) -> str:
    scheme, separator, rest = spec.storage.uri.partition("://")
    if not separator:  # a local folder (`embedtune run`)
        return (
            "/" + join(spec.storage.uri, prefix) if spec.storage.uri.startswith("/") else join(spec.storage.uri, prefix)
        )
    return f"{scheme}://{join(rest, prefix)}"


def model_uri(spec: EmbeddingFinetuneSpec, run: Run) -> str:
    """The shipped model (status.model): the merged one where spec.merge ships it."""
    if spec.merge is not None and spec.merge.ship == "merged":
        return storage_uri(spec, run.layout.merged_model_prefix)
    return storage_uri(spec, run.layout.model_prefix)


def eval_set_uri(spec: EmbeddingFinetuneSpec, run: Run) -> str:
    """The held-out set the trainer wrote, or the user's own."""
    if spec.data.held_out_fraction is not None:
        return storage_uri(spec, run.layout.eval_prefix)
    return spec.data.eval


def metrics_key(run: Run) -> str:
    """Where the evaluation job stores metrics.json, within the storage."""
    return join(run.layout.run_prefix, "metrics.json")


# --- the pods' configs and the launch plans ------------------------------------------------


def trainer_config(spec: EmbeddingFinetuneSpec, run: Run) -> TrainerConfig:
    return TrainerConfig(
        model=spec.model,
        data=spec.data.for_trainer(),
        training=spec.training,
        checkpoint=spec.checkpoint,
        merge=spec.merge,
        storage=spec.storage,
        run=run.identity(),
        work_dir=WORK_DIR,
    )


def evaluation_config(spec: EmbeddingFinetuneSpec, run: Run) -> EvaluationConfig:
    """Base vs fine-tuned, both encoded with the resource's model settings: the base model
    exactly as the fine-tuned one was trained."""
    return EvaluationConfig(
        model=storage_uri(spec, run.layout.model_prefix),
        baseline=spec.model.base,
        merged=storage_uri(spec, run.layout.merged_model_prefix) if spec.merge is not None else None,
        eval_set=eval_set_uri(spec, run),
        retention_set=spec.evaluation.retention,
        k_values=spec.evaluation.k_values,
        encoding=EncodingSettings.model_validate(spec.model.model_dump(exclude={"base", "lora"})),
        modes=["sparse", "colbert", "hybrid"] if spec.model.unified else [],
        dimensions=spec.training.matryoshka_dims,
        hybrid_weights=spec.evaluation.hybrid_weights,
        rerank_depth=spec.evaluation.rerank_depth,
        bootstrap_resamples=spec.evaluation.bootstrap_resamples,
        seed=spec.training.seed,
        output=storage_uri(spec, metrics_key(run)),
        tensorboard=storage_uri(spec, run.layout.tensorboard_prefix),
        storage=spec.storage.access(),
        run=run.identity(),
    )


@dataclass(frozen=True)
class JobLaunch:
    """One Job of a run as both executors start it: a cluster (`build_*_job`) and
    `embedtune run` (local processes) read nothing else."""

    name: str
    role: Role
    run: Run
    attempt: int
    program: Program
    config: TrainerConfig | EvaluationConfig
    nodes: int
    processes_per_node: int
    gpus_per_node: int
    deadline_seconds: int | None

    @property
    def config_file(self) -> str:
        return TRAINER_CONFIG_FILE if self.program is Program.TRAINER else EVALUATION_CONFIG_FILE

    @property
    def labels(self) -> dict[str, str]:
        return build_labels(self.run.name, self.run.run_id, self.role) | {LABEL_ATTEMPT: str(self.attempt)}


def plan_training(
    spec: EmbeddingFinetuneSpec, run: Run, attempt: int, deadline_seconds: int | None = None
) -> JobLaunch:
    """torchrun over `nodes` pods of `gpusPerNode` processes (one CPU process without GPUs)."""
    gpus = spec.resources.gpus_per_node
    return JobLaunch(
        name=training_job_name(run, attempt),
        role=Role.TRAIN,
        run=run,
        attempt=attempt,
        program=Program.TRAINER,
        config=trainer_config(spec, run),
        nodes=spec.resources.nodes,
        processes_per_node=gpus or 1,
        gpus_per_node=gpus,
        deadline_seconds=deadline_seconds,
    )


def plan_evaluation(spec: EmbeddingFinetuneSpec, run: Run, attempt: int) -> JobLaunch:
    return JobLaunch(
        name=evaluation_job_name(run, attempt),
        role=Role.EVALUATE,
        run=run,
        attempt=attempt,
        program=Program.EVALUATOR,
        config=evaluation_config(spec, run),
        nodes=1,
        processes_per_node=1,
        gpus_per_node=spec.evaluation.gpus,
        deadline_seconds=None,
    )


# --- Kubernetes objects --------------------------------------------------------------------


def build_labels(name: str, run_id: str | None = None, role: Role | None = None) -> dict[str, str]:
    labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_FINETUNE: name}
    if run_id is not None:
        labels[LABEL_RUN_ID] = run_id
    if role is not None:
        labels[LABEL_ROLE] = role.value
    return labels


def _metadata(name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": labels}


def build_config_map(spec: EmbeddingFinetuneSpec, run: Run) -> dict[str, Any]:
    """The configs of both of the run's programs; each Job mounts it at CONFIG_DIR."""
    data = {TRAINER_CONFIG_FILE: dump_config(trainer_config(spec, run))}
    if spec.evaluation.enabled:
        data[EVALUATION_CONFIG_FILE] = dump_config(evaluation_config(spec, run))
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(config_map_name(run), run.namespace, build_labels(run.name, run.run_id)),
        "data": data,
    }


def build_service(spec: EmbeddingFinetuneSpec, run: Run) -> dict[str, Any]:
    """Headless, so every training pod gets a DNS name `<job>-<index>.<service>`; torchrun's
    rendezvous needs pod 0's before it is ready, hence publishNotReadyAddresses."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(service_name(run), run.namespace, build_labels(run.name)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": build_labels(run.name, role=Role.TRAIN),
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
        },
    }


def build_service_account(spec: EmbeddingFinetuneSpec, run: Run) -> dict[str, Any]:
    metadata = _metadata(service_account_name(run), run.namespace, build_labels(run.name))
    if spec.resources.service_account_annotations:
        metadata["annotations"] = dict(spec.resources.service_account_annotations)
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata}


def build_status_role(spec: EmbeddingFinetuneSpec, run: Run) -> dict[str, Any]:
    """The job pods may read and patch this one resource's status, nothing else."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(service_account_name(run), run.namespace, build_labels(run.name)),
        "rules": [
            {
                "apiGroups": [GROUP],
                "resources": [f"{PLURAL}/status"],
                "resourceNames": [run.name],
                "verbs": ["get", "patch"],
            }
        ],
    }


def build_status_role_binding(spec: EmbeddingFinetuneSpec, run: Run) -> dict[str, Any]:
    name = service_account_name(run)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(name, run.namespace, build_labels(run.name)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": run.namespace}],
    }


def _storage_env(spec: EmbeddingFinetuneSpec) -> list[dict[str, Any]]:
    # Credentials only by reference; without a secret the pod's service account (IRSA) applies.
    secret = spec.storage.credentials_secret
    if secret is None:
        return []
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    ]


def _pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": _USER_ID,
        "runAsGroup": _USER_ID,
        "fsGroup": _USER_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_resources(spec: EmbeddingFinetuneSpec, gpus: int) -> dict[str, Any]:
    limits: dict[str, Any] = {}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    if spec.resources.cpu:
        limits["cpu"] = spec.resources.cpu
    if spec.resources.memory:
        limits["memory"] = spec.resources.memory
    requests = {key: value for key, value in limits.items() if key != "nvidia.com/gpu"}
    return {"limits": limits, "requests": requests} if requests else {"limits": limits}


def _pod_placement(spec: EmbeddingFinetuneSpec) -> dict[str, Any]:
    placement: dict[str, Any] = {}
    if spec.resources.node_selector:
        placement["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        placement["tolerations"] = [t.to_dict() for t in spec.resources.tolerations]
    if spec.resources.priority_class_name:
        placement["priorityClassName"] = spec.resources.priority_class_name
    if spec.resources.scheduler_name:
        placement["schedulerName"] = spec.resources.scheduler_name
    return placement


def _job(spec: EmbeddingFinetuneSpec, launch: JobLaunch, command: list[str]) -> dict[str, Any]:
    """A Job running `command` in one container per pod, with the run's configs at CONFIG_DIR."""
    container = {
        "name": launch.role.container,
        "image": spec.resources.image,
        "command": command,
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "HF_HOME", "value": f"{WORK_DIR}/hf"},
            *_storage_env(spec),
        ],
        "resources": _container_resources(spec, launch.gpus_per_node),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "scratch", "mountPath": WORK_DIR},
        ],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        # The programs write their TerminationMessage there; logs are the fallback for crashes.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec = {
        "restartPolicy": "Never",
        "serviceAccountName": service_account_name(launch.run),
        "securityContext": _pod_security_context(),
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(launch.run)}},
            {"name": "scratch", "emptyDir": {}},
        ],
    } | _pod_placement(spec)
    job_spec: dict[str, Any] = {
        "completions": launch.nodes,
        "parallelism": launch.nodes,
        # Restarts are the operator's: it classifies a failure before retrying from a checkpoint.
        "backoffLimit": 0,
        "template": {"metadata": {"labels": launch.labels}, "spec": pod_spec},
    }
    if launch.deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = launch.deadline_seconds
    labels = launch.labels
    if spec.resources.queue_name is not None:
        # Kueue unsuspends the Job when it admits it, and suspends it again to preempt it
        labels = labels | {LABEL_KUEUE_QUEUE: spec.resources.queue_name}
        job_spec["suspend"] = True
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(launch.name, launch.run.namespace, labels),
        "spec": job_spec,
    }


def build_training_job(spec: EmbeddingFinetuneSpec, launch: JobLaunch) -> dict[str, Any]:
    """Indexed Job: pod i is torchrun node i; pod 0 hosts the rendezvous."""
    command = [
        "python",
        "-m",
        "embedtune.trainer.launch",
        "--nnodes",
        str(launch.nodes),
        "--nproc-per-node",
        str(launch.processes_per_node),
        "--node-rank",
        "$(JOB_COMPLETION_INDEX)",
        "--master-addr",
        f"{launch.name}-0.{service_name(launch.run)}",
        "--master-port",
        str(MASTER_PORT),
        *launch.program.arguments(f"{CONFIG_DIR}/{launch.config_file}"),
    ]
    job = _job(spec, launch, command)
    job["spec"]["completionMode"] = "Indexed"
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    # Declared so Kubernetes expands $(JOB_COMPLETION_INDEX) in the command.
    completion_index = {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    container["env"].insert(0, {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": completion_index}})
    container["ports"] = [{"name": "rendezvous", "containerPort": MASTER_PORT}]
    container["volumeMounts"].append({"name": "shm", "mountPath": "/dev/shm"})
    pod["volumes"].append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}})
    # on SIGTERM the trainer finishes its step and stores a checkpoint; torchrun allows it 30 s
    pod |= {"subdomain": service_name(launch.run), "terminationGracePeriodSeconds": 60}
    return job


def build_evaluation_job(spec: EmbeddingFinetuneSpec, launch: JobLaunch) -> dict[str, Any]:
    return _job(spec, launch, launch.program.command(f"{CONFIG_DIR}/{launch.config_file}"))


def build_run_objects(spec: EmbeddingFinetuneSpec, training: JobLaunch) -> list[dict[str, Any]]:
    """Everything a run needs before its training Job starts, then the Job itself."""
    run = training.run
    return [
        build_service_account(spec, run),
        build_status_role(spec, run),
        build_status_role_binding(spec, run),
        build_service(spec, run),
        build_config_map(spec, run),
        build_training_job(spec, training),
    ]
