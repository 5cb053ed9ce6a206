"""The objects an EmbeddingFinetune becomes, as plain dicts. Pure functions, no I/O.

Names are deterministic (resource, run, attempt), so creating a child twice is a 409 and
nothing else. Owner references are added by the caller (`kopf.adopt`), which knows the uid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from embedtune.trainer.config import RunIdentity, TrainerConfig
from embedtune.trainer.layout import RunLayout, join

from .constants import (
    EVALUATOR_CONTAINER,
    GROUP,
    LABEL_ATTEMPT,
    LABEL_FINETUNE,
    LABEL_MANAGED_BY,
    LABEL_ROLE,
    LABEL_RUN_ID,
    MANAGED_BY,
    MASTER_PORT,
    PLURAL,
    TRAINER_CONFIG_DIR,
    TRAINER_CONFIG_KEY,
    TRAINER_CONTAINER,
    Role,
)
from .spec import EmbeddingFinetuneSpec

WORK_DIR = "/scratch"
_USER_ID = 1000


@dataclass(frozen=True)
class Run:
    """Which run of which resource the children belong to."""

    namespace: str
    name: str
    run_id: str

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.namespace, self.name, self.run_id)


def service_account_name(name: str) -> str:
    return f"{name}-embedtune"


def service_name(name: str) -> str:
    return f"{name}-train"


def config_map_name(run: Run) -> str:
    return f"{run.name}-config-{run.run_id}"


def training_job_name(run: Run, attempt: int) -> str:
    return f"{run.name}-train-{run.run_id}-{attempt}"


def evaluation_job_name(run: Run, attempt: int) -> str:
    return f"{run.name}-eval-{run.run_id}-{attempt}"


def storage_uri(spec: EmbeddingFinetuneSpec, prefix: str) -> str:
    scheme, separator, rest = spec.storage.uri.partition("://")
    if not separator:  # a local folder (`embedtune run`)
        return (
            "/" + join(spec.storage.uri, prefix) if spec.storage.uri.startswith("/") else join(spec.storage.uri, prefix)
        )
    return f"{scheme}://{join(rest, prefix)}"


def model_uri(spec: EmbeddingFinetuneSpec, run: Run) -> str:
    return storage_uri(spec, run.layout.model_prefix)


def eval_set_uri(spec: EmbeddingFinetuneSpec, run: Run) -> str:
    """The held-out set the trainer wrote, or the user's own."""
    if spec.data.held_out_fraction is not None:
        return storage_uri(spec, run.layout.eval_prefix)
    return spec.data.eval


def metrics_key(run: Run) -> str:
    """Where the evaluation job stores metrics.json, within the storage."""
    return join(run.layout.run_prefix, "metrics.json")


def metrics_uri(spec: EmbeddingFinetuneSpec, run: Run) -> str:
    return storage_uri(spec, metrics_key(run))


def build_labels(name: str, run_id: str | None = None, role: Role | None = None) -> dict[str, str]:
    labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_FINETUNE: name}
    if run_id is not None:
        labels[LABEL_RUN_ID] = run_id
    if role is not None:
        labels[LABEL_ROLE] = role.value
    return labels


def _metadata(name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": labels}


def build_trainer_config(spec: EmbeddingFinetuneSpec, run: Run) -> dict[str, Any]:
    config = TrainerConfig(
        model=spec.model,
        data=spec.data.for_trainer(),
        training=spec.training,
        checkpoint=spec.checkpoint,
        storage=spec.storage,
        run=RunIdentity(namespace=run.namespace, name=run.name, run_id=run.run_id, report_status=True),
        work_dir=WORK_DIR,
    )
    return config.to_dict()


def build_config_map(spec: EmbeddingFinetuneSpec, run: Run) -> dict[str, Any]:
    import yaml

    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(config_map_name(run), run.namespace, build_labels(run.name, run.run_id)),
        "data": {TRAINER_CONFIG_KEY: yaml.safe_dump(build_trainer_config(spec, run), sort_keys=False)},
    }


def build_service(namespace: str, name: str) -> dict[str, Any]:
    """Headless, so every training pod gets a DNS name `<job>-<index>.<service>`; torchrun's
    rendezvous needs pod 0's before it is ready, hence publishNotReadyAddresses."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(service_name(name), namespace, build_labels(name)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": build_labels(name, role=Role.TRAIN),
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
        },
    }


def build_service_account(namespace: str, name: str, spec: EmbeddingFinetuneSpec) -> dict[str, Any]:
    metadata = _metadata(service_account_name(name), namespace, build_labels(name))
    if spec.resources.service_account_annotations:
        metadata["annotations"] = dict(spec.resources.service_account_annotations)
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata}


def build_status_role(namespace: str, name: str) -> dict[str, Any]:
    """The job pods may read and patch this one resource's status, nothing else."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(service_account_name(name), namespace, build_labels(name)),
        "rules": [
            {
                "apiGroups": [GROUP],
                "resources": [f"{PLURAL}/status"],
                "resourceNames": [name],
                "verbs": ["get", "patch"],
            }
        ],
    }


def build_status_role_binding(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(service_account_name(name), namespace, build_labels(name)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": service_account_name(name)},
        "subjects": [{"kind": "ServiceAccount", "name": service_account_name(name), "namespace": namespace}],
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


def _container_security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


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


def _job(
    name: str,
    run: Run,
    role: Role,
    *,
    completions: int,
    pod_spec: dict[str, Any],
    extra_labels: dict[str, str],
    deadline_seconds: int | None,
) -> dict[str, Any]:
    labels = build_labels(run.name, run.run_id, role) | extra_labels
    job_spec: dict[str, Any] = {
        "completions": completions,
        "parallelism": completions,
        # Restarts are the operator's: it classifies a failure before retrying from a checkpoint.
        "backoffLimit": 0,
        "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
    }
    if deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(name, run.namespace, labels),
        "spec": job_spec,
    }


def _pod_spec(
    spec: EmbeddingFinetuneSpec, run: Run, container: dict[str, Any], volumes: list[dict[str, Any]]
) -> dict[str, Any]:
    container |= {
        "securityContext": _container_security_context(),
        # The trainer writes its reason there; logs are the fallback for crashes.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return {
        "restartPolicy": "Never",
        "serviceAccountName": service_account_name(run.name),
        "securityContext": _pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    } | _pod_placement(spec)


def build_training_job(
    spec: EmbeddingFinetuneSpec, run: Run, attempt: int, image: str, deadline_seconds: int | None = None
) -> dict[str, Any]:
    """Indexed Job: pod i is torchrun node i; pod 0 hosts the rendezvous."""
    name = training_job_name(run, attempt)
    nodes, gpus = spec.resources.nodes, spec.resources.gpus_per_node
    command = [
        "python",
        "-m",
        "embedtune.trainer.launch",
        "--nnodes",
        str(nodes),
        "--nproc-per-node",
        str(gpus or 1),  # no GPU: one CPU process per pod
        "--node-rank",
        "$(JOB_COMPLETION_INDEX)",
        "--master-addr",
        f"{name}-0.{service_name(run.name)}",
        "--master-port",
        str(MASTER_PORT),
        "-m",
        "embedtune.trainer",
        "--config",
        f"{TRAINER_CONFIG_DIR}/{TRAINER_CONFIG_KEY}",
    ]
    env = [
        # Declared so Kubernetes expands $(JOB_COMPLETION_INDEX) in the command.
        {
            "name": "JOB_COMPLETION_INDEX",
            "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
            },
        },
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HF_HOME", "value": f"{WORK_DIR}/hf"},
        *_storage_env(spec),
    ]
    container = {
        "name": TRAINER_CONTAINER,
        "image": image,
        "command": command,
        "env": env,
        "ports": [{"name": "rendezvous", "containerPort": MASTER_PORT}],
        "resources": _container_resources(spec, gpus),
        "volumeMounts": [
            {"name": "config", "mountPath": TRAINER_CONFIG_DIR, "readOnly": True},
            {"name": "scratch", "mountPath": WORK_DIR},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    volumes = [
        {"name": "config", "configMap": {"name": config_map_name(run)}},
        {"name": "scratch", "emptyDir": {}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}},
    ]
    # on SIGTERM the trainer finishes its step and stores a checkpoint; torchrun allows it 30 s
    pod_spec = _pod_spec(spec, run, container, volumes) | {
        "subdomain": service_name(run.name),
        "terminationGracePeriodSeconds": 60,
    }
    job = _job(
        name,
        run,
        Role.TRAIN,
        completions=nodes,
        pod_spec=pod_spec,
        extra_labels={LABEL_ATTEMPT: str(attempt)},
        deadline_seconds=deadline_seconds,
    )
    job["spec"]["completionMode"] = "Indexed"
    return job


def build_evaluation_command(spec: EmbeddingFinetuneSpec, run: Run, namespace_name: str) -> list[str]:
    command = [
        "embedtune",
        "evaluate",
        "--model",
        model_uri(spec, run),
        "--baseline",
        spec.model.base,
        "--eval-set",
        eval_set_uri(spec, run),
        "--k",
        ",".join(str(k) for k in spec.evaluation.k_values),
        "--output",
        metrics_uri(spec, run),
        "--patch-status",
        namespace_name,
        # the same encoding for both models: the base model as the fine-tuned one was trained
        "--pooling",
        spec.model.pooling,
        "--normalize" if spec.model.normalize else "--no-normalize",
        "--query-max-length",
        str(spec.model.query_max_length),
        "--passage-max-length",
        str(spec.model.passage_max_length),
    ]
    if spec.model.query_instruction:
        command += ["--query-instruction", spec.model.query_instruction]
    if spec.model.passage_instruction:
        command += ["--passage-instruction", spec.model.passage_instruction]
    if spec.storage.endpoint:
        command += ["--storage-endpoint", spec.storage.endpoint]
    if spec.storage.region:
        command += ["--storage-region", spec.storage.region]
    return command


def build_evaluation_job(spec: EmbeddingFinetuneSpec, run: Run, image: str, attempt: int = 1) -> dict[str, Any]:
    container = {
        "name": EVALUATOR_CONTAINER,
        "image": image,
        "command": build_evaluation_command(spec, run, f"{run.namespace}/{run.name}"),
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "HF_HOME", "value": f"{WORK_DIR}/hf"},
            *_storage_env(spec),
        ],
        "resources": _container_resources(spec, spec.evaluation.gpus),
        "volumeMounts": [{"name": "scratch", "mountPath": WORK_DIR}],
    }
    pod_spec = _pod_spec(spec, run, container, [{"name": "scratch", "emptyDir": {}}])
    return _job(
        evaluation_job_name(run, attempt),
        run,
        Role.EVALUATE,
        completions=1,
        pod_spec=pod_spec,
        extra_labels={LABEL_ATTEMPT: str(attempt)},
        deadline_seconds=None,
    )


def build_run_objects(
    spec: EmbeddingFinetuneSpec, run: Run, image: str, attempt: int = 1, deadline_seconds: int | None = None
) -> list[dict[str, Any]]:
    """Everything a run needs before its training Job starts, then the Job itself."""
    return [
        build_service_account(run.namespace, run.name, spec),
        build_status_role(run.namespace, run.name),
        build_status_role_binding(run.namespace, run.name),
        build_service(run.namespace, run.name),
        build_config_map(spec, run),
        build_training_job(spec, run, attempt, image, deadline_seconds),
    ]
