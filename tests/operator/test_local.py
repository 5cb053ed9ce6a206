"""`embedtune run`: a manifest trained and evaluated on this machine by the operator's planner,
with real processes (a tiny BERT on CPU) and, for S3, moto's server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from embedtune.operator.local import check_inputs, localize, merge_patch
from embedtune.operator.spec import parse_finetune
from embedtune.trainer.config import StorageAccess
from embedtune.trainer.errors import InputError
from embedtune.trainer.layout import COMPLETE_MARKER, RunLayout
from embedtune.trainer.storage import open_storage
from support.processes import wait_for_training_step
from support.tiny import synthetic_records, write_jsonl


def write_manifest(folder: Path, tiny_model: Path, *, storage: dict | None = None, **sections) -> Path:
    """A manifest with paths relative to its own folder, as users write them."""
    write_jsonl(folder / "data" / "train.jsonl", synthetic_records(300, negatives=0))
    spec = {
        "model": {
            "base": os.path.relpath(tiny_model, folder),
            "pooling": "mean",
            "queryMaxLength": 16,
            "passageMaxLength": 16,
        },
        "data": {"train": ["data/train.jsonl"], "heldOutFraction": 0.1},
        "training": {
            "maxSteps": 30,
            "batchSizePerDevice": 8,
            "groupSize": 4,
            "learningRate": 5e-4,
            "precision": "fp32",
            "loggingSteps": 5,
        },
        "checkpoint": {"everySteps": 10, "keep": 2},
        "evaluation": {"kValues": [1, 10]},
    } | sections
    if storage is not None:
        spec["storage"] = storage
    path = folder / "finetune.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "embedtune.io/v1alpha1",
                "kind": "EmbeddingFinetune",
                "metadata": {"name": "tiny"},
                "spec": spec,
            }
        )
    )
    return path


def run_command(manifest: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "embedtune.operator.cli", "run", str(manifest), *extra]


def embedtune_run(manifest: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        run_command(manifest, *extra),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )


def training_curve_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return set(events.Tags()["scalars"])


def final_status(result: subprocess.CompletedProcess) -> dict:
    return yaml.safe_load(result.stdout[result.stdout.index("status:") :])["status"]


def test_a_manifest_trains_evaluates_and_reports_its_status_with_s3_storage(
    tiny_model, tmp_path, s3_bucket, s3_endpoint
):
    manifest = write_manifest(tmp_path, tiny_model, storage={"uri": f"{s3_bucket}/runs", "endpoint": s3_endpoint})
    result = embedtune_run(manifest, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    status = final_status(result)
    assert status["phase"] == "Succeeded" and status["runId"].startswith("1-") and status["observedGeneration"] == 1
    run = RunLayout("default", "tiny", status["runId"])
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True",
        "Reconciling": "False",
        "Stalled": "False",
    }
    assert status["training"]["step"] == 30 and status["training"]["totalSteps"] == 30
    assert status["checkpoint"]["step"] == 30
    assert status["model"]["uri"] == f"{s3_bucket}/runs/{run.model_prefix}"
    storage = open_storage(f"{s3_bucket}/runs", StorageAccess(endpoint=s3_endpoint))
    assert storage.exists(f"{run.model_prefix}/{COMPLETE_MARKER}")
    stored_metrics = json.loads(storage.read_bytes(f"{run.run_prefix}/metrics.json"))
    # exact in metrics.json, to 4 significant digits in the status
    assert status["metrics"]["finetuned"] == {key: float(f"{v:.4g}") for key, v in stored_metrics["finetuned"].items()}
    assert stored_metrics["delta"]["ndcg@10"] == pytest.approx(
        stored_metrics["finetuned"]["ndcg@10"] - stored_metrics["baseline"]["ndcg@10"]
    )
    # the table: one row per metric, baseline / fine-tuned / delta
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith("ndcg@10 "))
    assert [float(cell) for cell in row[1:4]] == pytest.approx(
        [
            stored_metrics["baseline"]["ndcg@10"],
            stored_metrics["finetuned"]["ndcg@10"],
            stored_metrics["delta"]["ndcg@10"],
        ],
        abs=1e-4,
    )
    # each delta with its 95% interval: in metrics.json, the status and the table
    for key, delta in stored_metrics["delta"].items():
        interval = stored_metrics["deltaInterval"][key]
        assert interval["low"] <= delta <= interval["high"]
        assert status["metrics"]["deltaInterval"][key] == {name: float(f"{v:.4g}") for name, v in interval.items()}
    interval = stored_metrics["deltaInterval"]["ndcg@10"]
    assert row[4:] == [f"[{interval['low']:+.4f},", f"{interval['high']:+.4f}]"]
    # the picture of the run, next to it
    assert f"picture: {storage.uri_for(run.run_prefix)}/run.png" in result.stdout
    assert storage.read_bytes(f"{run.run_prefix}/run.png").startswith(b"\x89PNG")
    # the model's card, rewritten with the evaluation's metrics
    card = storage.read_bytes(f"{run.model_prefix}/README.md").decode()
    assert f"| ndcg@10 | {stored_metrics['baseline']['ndcg@10']:.4f} |" in card and "Not evaluated yet" not in card
    # the curves in the run's storage: the training's, and the evaluation's metrics of both models
    curves = tmp_path / "curves"
    storage.download_dir(run.tensorboard_prefix, curves)
    assert training_curve_tags(curves / "training") >= {
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/samples_per_second",
        "train/tokens_per_second",
    }
    for role in ("baseline", "finetuned"):
        assert "evaluation/ndcg@10" in training_curve_tags(curves / "evaluation" / role)
    assert f"curves: tensorboard --logdir {storage.uri_for(run.tensorboard_prefix)}" not in result.stdout  # s3
    assert f"aws s3 sync {storage.uri_for(run.tensorboard_prefix)} " in result.stdout
    # what the jobs print goes to stderr: stdout is exactly the result, its table printed once
    assert '"model":' not in result.stdout
    assert (result.stdout + result.stderr).count("ndcg@10 ") == 1
    # the known library warnings are silenced at their source (progress bars stay)
    for chatter in ("Setting accelerator to CPU", "is ignored when `padding`", "is deprecated", "faiss.loader"):
        assert chatter not in result.stderr
    assert "upload checkpoint-10" in result.stderr
    stored = yaml.safe_load(storage.read_bytes("default/tiny/resource.yaml"))
    assert stored["status"] == status

    again = embedtune_run(manifest, tmp_path)  # a finished run is reported, not repeated
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"run {run.run_id} already Succeeded" in again.stderr and "training job" not in again.stderr
    assert final_status(again) == status

    # a changed spec is a new generation: a new run, the old one kept in the history; a quality
    # gate no model can pass fails it
    changed = write_manifest(
        tmp_path,
        tiny_model,
        storage={"uri": f"{s3_bucket}/runs", "endpoint": s3_endpoint},
        evaluation={"kValues": [1, 10], "gate": {"metric": "ndcg@10", "minImprovement": 2}},
    )
    gated = embedtune_run(changed, tmp_path)
    assert gated.returncode == 1, gated.stderr[-4000:]
    status = final_status(gated)
    assert (status["phase"], status["reason"]) == ("Failed", "GateNotMet") and status["runId"].startswith("2-")
    assert [(entry["runId"], entry["phase"]) for entry in status["history"]] == [(run.run_id, "Succeeded")]
    assert storage.exists(f"{RunLayout('default', 'tiny', status['runId']).model_prefix}/{COMPLETE_MARKER}")

    # the resource deleted and created again with another spec (fewer steps, another learning
    # rate and instruction): a new run of its own, never the stored run of the old incarnation
    storage.delete(["default/tiny/resource.yaml"])
    recreated = write_manifest(
        tmp_path,
        tiny_model,
        storage={"uri": f"{s3_bucket}/runs", "endpoint": s3_endpoint},
        training={"maxSteps": 20, "batchSizePerDevice": 8, "groupSize": 4, "learningRate": 1e-4, "precision": "fp32"},
        model={
            "base": os.path.relpath(tiny_model, tmp_path),
            "pooling": "mean",
            "queryInstruction": "q: ",
            "queryMaxLength": 16,
            "passageMaxLength": 16,
        },
    )
    fresh = embedtune_run(recreated, tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-4000:]
    status = final_status(fresh)
    assert status["runId"].startswith("1-") and status["runId"] != run.run_id and "history" not in status
    assert "training job" in fresh.stderr and status["training"]["step"] == 20
    assert status["model"]["uri"] != f"{s3_bucket}/runs/{run.model_prefix}"


def test_ctrl_c_leaves_a_checkpoint_and_the_same_command_resumes(tiny_model, tmp_path):
    manifest = write_manifest(
        tmp_path,
        tiny_model,
        training={"maxSteps": 300, "batchSizePerDevice": 8, "groupSize": 4, "learningRate": 5e-4, "precision": "fp32"},
        checkpoint={"everySteps": 1000, "keep": 2},
    )
    log_path = tmp_path / "interrupted.log"
    with open(log_path, "w") as log:
        # a session of its own: Ctrl-C in a terminal signals the whole foreground process group
        process = subprocess.Popen(
            run_command(manifest, "--work-dir", str(tmp_path / "work")),
            cwd=tmp_path,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    wait_for_training_step(tmp_path / "work" / "tiny-train-1-1" / "progress.json", 3, process, log_path)
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=120) == 130, log_path.read_text()[-4000:]
    output = log_path.read_text()
    storage = open_storage(str(tmp_path / "embedtune-runs"))  # the default storage, in the working folder
    stored = yaml.safe_load(storage.read_bytes("default/tiny/resource.yaml"))
    run = RunLayout("default", "tiny", stored["status"]["runId"])
    assert f"the same command resumes run {run.run_id} from checkpoint" in output
    stopped_at = stored["status"]["checkpoint"]["step"]
    assert 3 <= stopped_at < 300 and stored["status"]["phase"] == "Training"
    assert storage.exists(f"{run.checkpoint_prefix(stopped_at)}/{COMPLETE_MARKER}")

    resumed = embedtune_run(manifest, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming from checkpoint {stopped_at}" in resumed.stderr
    status = final_status(resumed)
    assert status["phase"] == "Succeeded" and status["runId"] == run.run_id and status["training"]["step"] == 300
    state = json.loads(storage.read_bytes(f"{run.checkpoint_prefix(300)}/trainer_state.json"))
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == list(range(10, 301, 10))


def test_sigterm_stops_like_ctrl_c_a_second_run_waits_and_a_killed_run_takes_its_trainer_along(tiny_model, tmp_path):
    import psutil

    from embedtune.operator.local import EXIT_BUSY

    manifest = write_manifest(
        tmp_path,
        tiny_model,
        training={"maxSteps": 300, "batchSizePerDevice": 8, "groupSize": 4, "learningRate": 5e-4, "precision": "fp32"},
        checkpoint={"everySteps": 1000, "keep": 2},
    )
    storage = open_storage(str(tmp_path / "embedtune-runs"))

    def start(log_path: Path) -> subprocess.Popen:
        with open(log_path, "w") as log:
            return subprocess.Popen(
                run_command(manifest, "--work-dir", str(tmp_path / "work")), cwd=tmp_path, stdout=log, stderr=log
            )

    first_log = tmp_path / "first.log"
    first = start(first_log)
    wait_for_training_step(tmp_path / "work" / "tiny-train-1-1" / "progress.json", 2, first, first_log)
    # a second run of the same manifest and storage refuses to start while the first holds the lock
    second = embedtune_run(manifest, tmp_path)
    assert second.returncode == EXIT_BUSY, second.stderr[-4000:]
    assert f"another embedtune run of this resource is in progress (process {first.pid} on" in second.stderr

    first.send_signal(signal.SIGTERM)  # e.g. `timeout -s TERM`: a stop, as Ctrl-C is, not a failure to retry
    assert first.wait(timeout=120) == 128 + signal.SIGTERM, first_log.read_text()[-4000:]
    stored = yaml.safe_load(storage.read_bytes("default/tiny/resource.yaml"))["status"]
    assert (stored["phase"], stored["training"]["attempt"], stored["training"]["restarts"]) == ("Training", 1, 0)
    assert stored["checkpoint"]["step"] >= 2 and "interrupted; the same command resumes" in first_log.read_text()
    assert not storage.exists("default/tiny/run.lock")

    # the command killed outright: its trainer stops with it, and the lock it left is taken over
    third_log = tmp_path / "third.log"
    third = start(third_log)
    wait_for_training_step(
        tmp_path / "work" / "tiny-train-1-1" / "progress.json", stored["checkpoint"]["step"] + 2, third, third_log
    )
    trainers = psutil.Process(third.pid).children(recursive=True)
    third.kill()
    third.wait()
    gone, alive = psutil.wait_procs(trainers, timeout=120)
    assert not alive, third_log.read_text()[-4000:]
    run = RunLayout("default", "tiny", stored["runId"])
    assert not storage.exists(f"{run.model_prefix}/{COMPLETE_MARKER}")  # it stopped, it did not train on
    assert storage.exists("default/tiny/run.lock")  # left behind by the killed command
    from embedtune.operator.run_lock import RunLock

    with RunLock(storage, "default/tiny/run.lock"):  # its process is gone: taken over at once
        pass


def test_invalid_data_stops_before_anything_runs_with_every_problem_listed(tiny_model, tmp_path):
    manifest = write_manifest(tmp_path, tiny_model)
    with open(tmp_path / "data" / "train.jsonl", "a") as data:
        data.write('{"query": "q", "pos": []}\n{"query": 3, "pos": ["p"]}\nnot json\n')
    result = embedtune_run(manifest, tmp_path)
    assert result.returncode == 2, result.stderr[-4000:]
    for problem in ("train.jsonl:301: pos: empty list", "train.jsonl:302: query:", "train.jsonl:303:"):
        assert problem in result.stderr
    assert not (tmp_path / "embedtune-runs").exists()


def test_the_candidate_pool_is_checked_with_the_data_before_anything_runs(tmp_path, tiny_model):
    write_jsonl(tmp_path / "train.jsonl", [{"query": "q", "pos": ["p"], "neg": ["p"]}])
    write_jsonl(tmp_path / "pool.jsonl", [{"text": "a"}, {"text": "\udc00"}])
    manifest = {
        "apiVersion": "embedtune.io/v1alpha1",
        "kind": "EmbeddingFinetune",
        "metadata": {"name": "pool"},
        "spec": {
            "model": {"base": str(tiny_model)},
            "data": {"train": "train.jsonl", "hardNegatives": {"mine": True, "candidates": "pool.jsonl"}},
            "evaluation": {"enabled": False},
        },
    }
    spec = parse_finetune(localize(manifest, tmp_path, str(tmp_path / "runs")), on_cluster=False)
    with pytest.raises(InputError) as caught:
        check_inputs(spec, tmp_path / "scratch")
    assert caught.value.problems == [
        f"{tmp_path / 'train.jsonl'}:1: neg[0]: same text as pos[0] (a passage cannot be both a positive and a "
        "negative of the query)",
        f"{tmp_path / 'pool.jsonl'}:2: text: not valid Unicode: lone surrogate \\udc00 at character 1 (a \\u escape "
        "without its pair)",
    ]


def test_with_distillation_records_without_scores_are_listed_before_anything_runs(tmp_path, tiny_model):
    rows = [
        {"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1], "neg_scores": [0]},
        {"query": "r", "pos": ["s"]},
    ]
    write_jsonl(tmp_path / "train.jsonl", rows)
    manifest = {
        "apiVersion": "embedtune.io/v1alpha1",
        "kind": "EmbeddingFinetune",
        "metadata": {"name": "distil"},
        "spec": {
            "model": {"base": str(tiny_model)},
            "data": {"train": "train.jsonl"},
            "training": {"groupSize": 2, "distillation": {}},
            "evaluation": {"enabled": False},
        },
    }
    spec = parse_finetune(localize(manifest, tmp_path, str(tmp_path / "runs")), on_cluster=False)
    with pytest.raises(InputError) as caught:
        check_inputs(spec, tmp_path / "scratch")
    assert caught.value.problems == [
        f"{tmp_path / 'train.jsonl'}:2: pos_scores: missing (training.distillation is on: every record needs a "
        "teacher score for each of its passages, or set data.teacher to score them)"
    ]


def test_a_base_model_that_cannot_load_is_listed_with_the_data_problems_before_anything_runs(tmp_path, tiny_model):
    (tmp_path / "empty-model").mkdir()
    manifest_path = write_manifest(tmp_path, tmp_path / "empty-model")
    with open(tmp_path / "data" / "train.jsonl", "a") as data:
        data.write('{"query": "q", "pos": []}\n')
    manifest = localize(yaml.safe_load(manifest_path.read_text()), tmp_path, str(tmp_path / "runs"))
    with pytest.raises(InputError) as caught:
        check_inputs(parse_finetune(manifest, on_cluster=False), tmp_path / "check")
    assert caught.value.problems[0] == f"model.base: cannot load '{tmp_path / 'empty-model'}': the folder is empty"
    assert "train.jsonl:301: pos: empty list" in caught.value.problems[1]


def test_an_invalid_manifest_lists_every_problem(tmp_path, tiny_model):
    manifest = write_manifest(
        tmp_path,
        tiny_model,
        training={"learningRate": -1, "groupSize": 0},
        evaluation={"kValues": [1], "gate": {"metric": "ndcg@10"}},
    )
    result = embedtune_run(manifest, tmp_path)
    assert result.returncode == 2
    for problem in (
        "spec.training.learningRate: Input should be greater than 0",
        "spec.training.groupSize: Input should be greater than or equal to 1",
    ):
        assert problem in result.stderr
    assert not (tmp_path / "embedtune-runs").exists()


def test_relative_paths_are_relative_to_the_manifest_and_storage_defaults(tmp_path):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    manifest = {
        "metadata": {"name": "x"},
        "spec": {
            "model": {"base": "models/mine"},
            "data": {
                "train": ["data/a.jsonl", "s3://b/train.jsonl"],
                "eval": "eval",
                "hardNegatives": {"mine": True, "candidates": "pool.jsonl"},
            },
        },
    }
    local = localize(manifest, tmp_path, "/runs")
    assert local["metadata"]["namespace"] == "default"
    assert local["spec"]["model"]["base"] == str(tmp_path / "models" / "mine")
    assert local["spec"]["data"]["train"] == [str(tmp_path / "data" / "a.jsonl"), "s3://b/train.jsonl"]
    assert local["spec"]["data"]["eval"] == str(tmp_path / "eval")
    assert local["spec"]["data"]["hardNegatives"]["candidates"] == str(tmp_path / "pool.jsonl")
    assert local["spec"]["storage"] == {"uri": "/runs"}
    hub_model = localize({"spec": {"model": {"base": "BAAI/bge-small-en-v1.5"}}}, tmp_path, "/runs")
    assert hub_model["spec"]["model"]["base"] == "BAAI/bge-small-en-v1.5"  # not a file here: a hub id
    assert manifest["spec"]["data"]["eval"] == "eval"  # the caller's manifest is not changed


def test_status_patches_merge_as_the_api_server_merges_them():
    status = {"phase": "Training", "training": {"step": 5, "loss": 1.0}, "history": [{"runId": "1"}]}
    patched = merge_patch(status, {"training": {"step": 6, "loss": None}, "history": [], "model": {"uri": "u"}})
    assert patched == {"phase": "Training", "training": {"step": 6}, "history": [], "model": {"uri": "u"}}
    assert status["training"] == {"step": 5, "loss": 1.0}


@pytest.mark.parametrize(
    "change,generation,new_run",
    [
        ({}, 1, False),  # the same spec: resume or report run 1
        ({"training": {"maxSteps": 31}}, 2, False),  # a changed spec: the planner decides
        ({"runPolicy": {"maxRestarts": 5}}, 2, False),  # (a new run, or not for runPolicy)
        ({"--new-run": True}, 2, True),
        ({"failed": True}, 2, True),  # running again after a failure
    ],
)
def test_a_stored_resource_is_a_new_generation_when_its_spec_changes(tmp_path, change, generation, new_run):
    from embedtune.operator.local import LocalOptions, LocalRun
    from embedtune.operator.spec import parse_finetune

    def local_run(manifest, options):
        manifest = localize(manifest, tmp_path, str(tmp_path / "store"))
        return LocalRun(manifest, parse_finetune(manifest, on_cluster=False), options, tmp_path)

    manifest = {
        "apiVersion": "embedtune.io/v1alpha1",
        "kind": "EmbeddingFinetune",
        "metadata": {"name": "tiny"},
        "spec": {"model": {"base": "m"}, "data": {"train": ["t.jsonl"], "heldOutFraction": 0.1}},
    }
    first = local_run(manifest, LocalOptions(str(tmp_path / "store")))
    first.load()
    first.resource["status"] = {
        "phase": "Failed" if change.get("failed") else "Succeeded",
        "specFingerprint": "abc",
        "runId": "1",
    }
    first.save()
    changed = json.loads(json.dumps(manifest))
    changed["spec"] |= {k: v for k, v in change.items() if k in ("training", "runPolicy")}
    again = local_run(changed, LocalOptions(str(tmp_path / "store"), new_run="--new-run" in change))
    again.load()
    assert again.resource["metadata"]["generation"] == generation
    assert (again.status["specFingerprint"] is None) == new_run
