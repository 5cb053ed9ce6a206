import yaml

from embedtune.operator.defaults import ClusterDefaults
from embedtune.operator.render import (
    Run,
    build_evaluation_job,
    build_run_objects,
    build_service,
    build_status_role,
    build_training_job,
    plan_evaluation,
    plan_training,
)
from embedtune.operator.spec import parse_finetune
from embedtune.trainer.contract import EvaluationConfig, TrainerConfig, load_config
from support.finetunes import minimal_manifest

RUN = Run("ml", "tiny", "3")
IMAGE = "registry.example/trainer:1"


def spec_of(**overrides):
    return ClusterDefaults(IMAGE).apply(parse_finetune(minimal_manifest(**overrides)))


def training_job(spec, attempt=1, deadline_seconds=None):
    return build_training_job(spec, plan_training(spec, RUN, attempt, deadline_seconds))


def evaluation_job(spec):
    return build_evaluation_job(spec, plan_evaluation(spec, RUN, 1))


def run_objects(spec):
    return build_run_objects(spec, plan_training(spec, RUN, 1))


def evaluation_config_of(spec) -> EvaluationConfig:
    """The config the evaluation Job runs with: its --config file, read from the run's ConfigMap."""
    objects = {obj["kind"]: obj for obj in run_objects(spec)}
    command = container_of(evaluation_job(spec))["command"]
    config_file = arg_after(command, "--config")
    mount = next(
        m for m in container_of(evaluation_job(spec))["volumeMounts"] if config_file.startswith(m["mountPath"])
    )
    assert mount["name"] == "config"
    return EvaluationConfig.model_validate(yaml.safe_load(objects["ConfigMap"]["data"][config_file.rsplit("/", 1)[1]]))


def container_of(job):
    [container] = job["spec"]["template"]["spec"]["containers"]
    return container


def arg_after(command, flag):
    return command[command.index(flag) + 1]


def test_without_gpus_each_pod_trains_in_one_cpu_process():
    job = training_job(spec_of(resources={"nodes": 2, "gpusPerNode": 0}))
    assert arg_after(container_of(job)["command"], "--nproc-per-node") == "1"
    assert "nvidia.com/gpu" not in container_of(job)["resources"]["limits"]


def test_training_job_is_an_indexed_torchrun_job_with_one_pod_per_node():
    job = training_job(spec_of(), attempt=2)
    assert job["metadata"]["name"] == "tiny-train-3-2"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["subdomain"] == build_service(spec_of(), RUN)["metadata"]["name"] == "tiny-train"
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
    job = training_job(
        spec_of(resources={"nodes": 1, "gpusPerNode": 8, "cpu": "32", "memory": "200Gi", "sharedMemory": "32Gi"})
    )
    resources = container_of(job)["resources"]
    assert resources["limits"] == {"nvidia.com/gpu": 8, "cpu": "32", "memory": "200Gi"}
    assert resources["requests"] == {"cpu": "32", "memory": "200Gi"}
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    mounts = {m["mountPath"]: m["name"] for m in container_of(job)["volumeMounts"]}
    assert mounts["/dev/shm"] == "shm"


def test_credentials_only_by_secret_reference():
    for job in (training_job(spec_of()), evaluation_job(spec_of())):
        env = {item["name"]: item for item in container_of(job)["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[key]
            assert env[key]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": key}}
    # The test process has AWS_* credentials in its environment (conftest); none may leak in.
    rendered = yaml.safe_dump_all(run_objects(spec_of()))
    assert "testing" not in rendered


def test_without_a_secret_the_service_account_carries_the_identity():
    spec = spec_of(
        storage={"uri": "s3://m"},
        resources={"serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/t"}},
    )
    objects = {obj["kind"]: obj for obj in run_objects(spec)}
    assert not any(item["name"].startswith("AWS_") for item in container_of(objects["Job"])["env"])
    assert objects["ServiceAccount"]["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/t"
    }
    assert objects["Job"]["spec"]["template"]["spec"]["serviceAccountName"] == "tiny-embedtune"


def test_pods_run_as_non_root_without_privilege_escalation():
    for job in (training_job(spec_of()), evaluation_job(spec_of())):
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
    pod = training_job(spec)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["priorityClassName"] == "training" and pod["schedulerName"] == "volcano"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_labels_identify_resource_run_role_and_attempt():
    job = training_job(spec_of(), attempt=2)
    expected = {
        "app.kubernetes.io/managed-by": "embedtune",
        "embedtune.io/finetune": "tiny",
        "embedtune.io/run-id": "3",
        "embedtune.io/role": "train",
        "embedtune.io/attempt": "2",
    }
    assert job["metadata"]["labels"] == expected
    assert job["spec"]["template"]["metadata"]["labels"] == expected
    assert build_service(spec_of(), RUN)["spec"]["selector"] == {
        "app.kubernetes.io/managed-by": "embedtune",
        "embedtune.io/finetune": "tiny",
        "embedtune.io/role": "train",
    }


def test_deadline_is_set_on_the_job_when_given():
    assert "activeDeadlineSeconds" not in training_job(spec_of())["spec"]
    assert training_job(spec_of(), deadline_seconds=120)["spec"]["activeDeadlineSeconds"] == 120


def test_trainer_config_is_a_valid_trainer_config_that_reports_status():
    objects = {obj["kind"]: obj for obj in run_objects(spec_of())}
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
    objects = {obj["kind"]: obj for obj in run_objects(spec_of())}
    assert build_status_role(spec_of(), RUN)["rules"] == [
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
    spec = spec_of(storage={"uri": "s3://m/p", "endpoint": "http://minio:9000", "region": "eu-1"})
    job = evaluation_job(spec)
    assert job["metadata"]["name"] == "tiny-eval-3-1" and job["spec"]["backoffLimit"] == 0
    assert container_of(job)["command"] == [
        "python",
        "-m",
        "embedtune.trainer.evaluate",
        "--config",
        "/etc/embedtune/evaluation.yaml",
    ]
    config = evaluation_config_of(spec)
    assert config.model == "s3://m/p/ml/tiny/run-3/model"
    assert config.baseline == "BAAI/bge-small-en-v1.5"
    assert config.eval_set == "s3://m/p/ml/tiny/run-3/eval"
    assert config.k_values == [1, 10, 100]
    assert config.output == "s3://m/p/ml/tiny/run-3/metrics.json"
    assert (config.run.namespace, config.run.name, config.run.report_status) == ("ml", "tiny", True)
    # pooling unset: the evaluator takes the model's family default (cls for BERT, lastToken for decoders)
    assert (config.encoding.pooling, config.encoding.family, config.encoding.normalize) == (None, "auto", True)
    assert (config.encoding.query_max_length, config.encoding.passage_max_length) == (64, 256)
    assert (config.storage.endpoint, config.storage.region, config.storage.retry_seconds) == (
        "http://minio:9000",
        "eu-1",
        300,
    )
    assert container_of(job)["resources"] == {"limits": {"nvidia.com/gpu": 1}}


def test_the_baseline_is_encoded_as_the_model_was_trained(tmp_path):
    model = {
        "base": "intfloat/e5-base-v2",
        "pooling": "mean",
        "normalize": False,
        "queryInstruction": "query: ",
        "passageInstruction": "passage: ",
        "queryMaxLength": 32,
        "passageMaxLength": 128,
    }
    config = evaluation_config_of(spec_of(model=model))
    assert config.baseline == "intfloat/e5-base-v2"
    assert config.encoding.pooling == "mean" and config.encoding.normalize is False
    assert config.encoding.query_instruction == "query: "
    assert config.encoding.passage_instruction == "passage: "
    assert config.encoding.query_max_length == 32 and config.encoding.passage_max_length == 128
    path = tmp_path / "evaluation.yaml"  # the evaluation program reads exactly this config
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert load_config(path, EvaluationConfig) == config


def test_evaluation_uses_the_users_eval_set_without_held_out_split():
    config = evaluation_config_of(spec_of(data={"train": "s3://d/t.jsonl", "eval": "s3://d/eval"}))
    assert config.eval_set == "s3://d/eval"
