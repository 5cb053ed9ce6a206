import yaml

from embedtune.operator.render import (
    Run,
    build_evaluation_job,
    build_run_objects,
    build_service,
    build_status_role,
    build_training_job,
)
from embedtune.operator.spec import parse_finetune
from embedtune.trainer.config import TrainerConfig
from support.finetunes import minimal_manifest

RUN = Run("ml", "tiny", "3")
IMAGE = "registry.example/trainer:1"


def spec_of(**overrides):
    return parse_finetune(minimal_manifest(**overrides))


def container_of(job):
    [container] = job["spec"]["template"]["spec"]["containers"]
    return container


def arg_after(command, flag):
    return command[command.index(flag) + 1]


def test_without_gpus_each_pod_trains_in_one_cpu_process():
    job = build_training_job(spec_of(resources={"nodes": 2, "gpusPerNode": 0}), RUN, attempt=1, image=IMAGE)
    assert arg_after(container_of(job)["command"], "--nproc-per-node") == "1"
    assert "nvidia.com/gpu" not in container_of(job)["resources"]["limits"]


def test_training_job_is_an_indexed_torchrun_job_with_one_pod_per_node():
    job = build_training_job(spec_of(), RUN, attempt=2, image=IMAGE)
    assert job["metadata"]["name"] == "tiny-train-3-2"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["subdomain"] == build_service("ml", "tiny")["metadata"]["name"] == "tiny-train"
    command = container_of(job)["command"]
    assert command[:3] == ["python", "-m", "embedtune.trainer.launch"]
    assert arg_after(command, "--nnodes") == "2"
    assert arg_after(command, "--nproc-per-node") == "4"
    assert arg_after(command, "--node-rank") == "$(JOB_COMPLETION_INDEX)"
    assert arg_after(command, "--master-addr") == "tiny-train-3-2-0.tiny-train"
    assert arg_after(command, "--config") == "/etc/embedtune/trainer.yaml"
    env = {item["name"]: item for item in container_of(job)["env"]}
    # Kubernetes expands $(VAR) in a command only for variables the container declares.
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )


def test_gpus_cpu_memory_and_shared_memory():
    job = build_training_job(
        spec_of(resources={"nodes": 1, "gpusPerNode": 8, "cpu": "32", "memory": "200Gi", "sharedMemory": "32Gi"}),
        RUN,
        1,
        IMAGE,
    )
    resources = container_of(job)["resources"]
    assert resources["limits"] == {"nvidia.com/gpu": 8, "cpu": "32", "memory": "200Gi"}
    assert resources["requests"] == {"cpu": "32", "memory": "200Gi"}
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    mounts = {m["mountPath"]: m["name"] for m in container_of(job)["volumeMounts"]}
    assert mounts["/dev/shm"] == "shm"


def test_credentials_only_by_secret_reference():
    for job in (build_training_job(spec_of(), RUN, 1, IMAGE), build_evaluation_job(spec_of(), RUN, IMAGE)):
        env = {item["name"]: item for item in container_of(job)["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[key]
            assert env[key]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": key}}
    # The test process has AWS_* credentials in its environment (conftest); none may leak in.
    rendered = yaml.safe_dump_all(build_run_objects(spec_of(), RUN, IMAGE))
    assert "testing" not in rendered


def test_without_a_secret_the_service_account_carries_the_identity():
    spec = spec_of(
        storage={"uri": "s3://m"},
        resources={"serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/t"}},
    )
    objects = {obj["kind"]: obj for obj in build_run_objects(spec, RUN, IMAGE)}
    assert not any(item["name"].startswith("AWS_") for item in container_of(objects["Job"])["env"])
    assert objects["ServiceAccount"]["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/t"
    }
    assert objects["Job"]["spec"]["template"]["spec"]["serviceAccountName"] == "tiny-embedtune"


def test_pods_run_as_non_root_without_privilege_escalation():
    for job in (build_training_job(spec_of(), RUN, 1, IMAGE), build_evaluation_job(spec_of(), RUN, IMAGE)):
        pod = job["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert container_of(job)["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }


def test_scheduling_fields_pass_through():
    spec = spec_of(
        resources={
            "nodeSelector": {"pool": "h100"},
            "priorityClassName": "training",
            "schedulerName": "volcano",
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        }
    )
    pod = build_training_job(spec, RUN, 1, IMAGE)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["priorityClassName"] == "training" and pod["schedulerName"] == "volcano"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_labels_identify_resource_run_role_and_attempt():
    job = build_training_job(spec_of(), RUN, 2, IMAGE)
    expected = {
        "app.kubernetes.io/managed-by": "embedtune",
        "embedtune.io/finetune": "tiny",
        "embedtune.io/run-id": "3",
        "embedtune.io/role": "train",
        "embedtune.io/attempt": "2",
    }
    assert job["metadata"]["labels"] == expected
    assert job["spec"]["template"]["metadata"]["labels"] == expected
    assert build_service("ml", "tiny")["spec"]["selector"] == {
        "app.kubernetes.io/managed-by": "embedtune",
        "embedtune.io/finetune": "tiny",
        "embedtune.io/role": "train",
    }


def test_deadline_is_set_on_the_job_when_given():
    assert "activeDeadlineSeconds" not in build_training_job(spec_of(), RUN, 1, IMAGE)["spec"]
    assert build_training_job(spec_of(), RUN, 1, IMAGE, deadline_seconds=120)["spec"]["activeDeadlineSeconds"] == 120


def test_trainer_config_is_a_valid_trainer_config_that_reports_status():
    objects = {obj["kind"]: obj for obj in build_run_objects(spec_of(), RUN, IMAGE)}
    config = TrainerConfig.model_validate(yaml.safe_load(objects["ConfigMap"]["data"]["trainer.yaml"]))
    assert (config.run.namespace, config.run.name, config.run.run_id, config.run.report_status) == (
        "ml",
        "tiny",
        "3",
        True,
    )
    assert config.work_dir == "/scratch"
    volumes = {v["name"]: v for v in objects["Job"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"] == "tiny-config-3"
    assert volumes["scratch"] == {"name": "scratch", "emptyDir": {}}


def test_role_may_patch_only_this_resources_status():
    objects = {obj["kind"]: obj for obj in build_run_objects(spec_of(), RUN, IMAGE)}
    assert build_status_role("ml", "tiny")["rules"] == [
        {
            "apiGroups": ["embedtune.io"],
            "resources": ["embeddingfinetunes/status"],
            "resourceNames": ["tiny"],
            "verbs": ["get", "patch"],
        }
    ]
    binding = objects["RoleBinding"]
    assert binding["roleRef"]["name"] == objects["Role"]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tiny-embedtune", "namespace": "ml"}]


def test_evaluation_job_follows_the_contract():
    job = build_evaluation_job(
        spec_of(storage={"uri": "s3://m/p", "endpoint": "http://minio:9000", "region": "eu-1"}), RUN, IMAGE
    )
    assert job["metadata"]["name"] == "tiny-eval-3-1" and job["spec"]["backoffLimit"] == 0
    assert container_of(job)["command"] == [
        "embedtune",
        "evaluate",
        "--model",
        "s3://m/p/ml/tiny/run-3/model",
        "--baseline",
        "BAAI/bge-small-en-v1.5",
        "--eval-set",
        "s3://m/p/ml/tiny/run-3/eval",
        "--k",
        "1,10,100",
        "--output",
        "s3://m/p/ml/tiny/run-3/metrics.json",
        "--patch-status",
        "ml/tiny",
        "--pooling",
        "cls",
        "--normalize",
        "--query-max-length",
        "64",
        "--passage-max-length",
        "256",
        "--storage-endpoint",
        "http://minio:9000",
        "--storage-region",
        "eu-1",
    ]
    assert container_of(job)["resources"] == {"limits": {"nvidia.com/gpu": 1}}


def test_the_baseline_is_encoded_as_the_model_was_trained():
    model = {
        "base": "intfloat/e5-base-v2",
        "pooling": "mean",
        "normalize": False,
        "queryInstruction": "query: ",
        "passageInstruction": "passage: ",
        "queryMaxLength": 32,
        "passageMaxLength": 128,
    }
    command = container_of(build_evaluation_job(spec_of(model=model), RUN, IMAGE))["command"]
    assert arg_after(command, "--baseline") == "intfloat/e5-base-v2"
    assert arg_after(command, "--pooling") == "mean" and "--no-normalize" in command
    assert arg_after(command, "--query-instruction") == "query: "
    assert arg_after(command, "--passage-instruction") == "passage: "
    assert arg_after(command, "--query-max-length") == "32" and arg_after(command, "--passage-max-length") == "128"
    from embedtune.operator.cli import build_parser

    parsed = build_parser().parse_args(command[1:])  # the evaluate command accepts exactly these flags
    assert parsed.pooling == "mean" and parsed.normalize is False and parsed.query_instruction == "query: "


def test_evaluation_uses_the_users_eval_set_without_held_out_split():
    job = build_evaluation_job(spec_of(data={"train": "s3://d/t.jsonl", "eval": "s3://d/eval"}), RUN, IMAGE)
    command = container_of(job)["command"]
    assert arg_after(command, "--eval-set") == "s3://d/eval"
