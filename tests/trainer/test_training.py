"""Real training runs: torchrun with gloo on CPU, a tiny BERT, moto's S3 server."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from embedtune.trainer.checkpoints import CheckpointStore
from embedtune.trainer.config import StorageAccess
from embedtune.trainer.layout import COMPLETE_MARKER
from embedtune.trainer.storage import open_storage
from support.processes import wait_for_training_step
from support.tiny import build_tiny_bert, build_tiny_xlm_roberta, synthetic_records, write_jsonl
from support.trainer_runs import (
    RUN,
    kill_process_tree,
    losses,
    run_trainer,
    trainer_command,
    trainer_env,
    training_logs,
    write_config,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("cross_device,queries,passages", [(True, 8, 32), (False, 4, 16)])
def test_two_ranks_score_each_query_against_the_passages_of_both(
    tiny_model, tmp_path, s3_bucket, s3_endpoint, cross_device, queries, passages
):
    storage = open_storage(s3_bucket, StorageAccess(endpoint=s3_endpoint))
    storage.upload_dir(
        write_jsonl(tmp_path / "data" / "train.jsonl", synthetic_records(96, negatives=2)).parent, "datasets/tiny"
    )
    config = write_config(
        tmp_path,
        tiny_model,
        s3_bucket,
        s3_endpoint,
        data=f"{s3_bucket}/datasets/tiny",
        training={"maxSteps": 4, "negativesCrossDevice": cross_device, "gradientCheckpointing": not cross_device},
    )
    result = run_trainer(config, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    # 4 queries per rank x 4 passages per query: gathered across both ranks that is 8 x 32
    state = "on" if cross_device else "off"
    assert (
        f"negatives: world size 2, each of {queries} queries scored against {passages} passages (cross-device {state})"
    ) in result.stderr

    assert storage.exists(f"{RUN.model_prefix}/{COMPLETE_MARKER}")
    assert storage.exists(f"{RUN.eval_prefix}/{COMPLETE_MARKER}")
    assert CheckpointStore(storage, RUN).complete_steps() == [4, 2]
    assert [entry["queries"] for entry in training_logs(storage, 4)] == [8, 8, 8, 8]  # summed over both ranks
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["model"] == f"{s3_bucket}/{RUN.model_prefix}" and summary["step"] == 4


def test_a_killed_run_resumes_from_its_last_checkpoint_with_the_saved_weights(
    tiny_model, tmp_path, s3_bucket, s3_endpoint
):
    kill_and_resume(tmp_path, tiny_model, s3_bucket, s3_endpoint, steps=120, every=10)


def test_a_killed_m3_run_resumes_with_its_heads_and_self_distillation_where_it_stopped(
    tmp_path, s3_bucket, s3_endpoint
):
    # Without dropout: the first batch after a resume has the reference's passages but its
    # negatives in another order (HF restores the RNG only after fetching it), so dropout masks
    # fall on other passages; BERT's losses stay within the tolerance, these do not.
    base = build_tiny_xlm_roberta(tmp_path / "xlm-roberta", dropout=0.0)
    # self-distillation starts after micro-batch 15, past the first checkpoint: a resumed run
    # whose counter restarted at 0 would train those steps without it
    kill_and_resume(
        tmp_path,
        base,
        s3_bucket,
        s3_endpoint,
        steps=40,
        every=10,
        model={"outputs": ["dense", "sparse", "colbert"]},
        training={"unified": {"selfDistill": True, "selfDistillStartStep": 15}},
    )
    stored = open_storage(s3_bucket, StorageAccess(endpoint=s3_endpoint))
    assert stored.exists(f"{RUN.checkpoint_prefix(40)}/colbert_linear.pt")
    assert stored.exists(f"{RUN.model_prefix}/sparse_linear.pt")


def test_a_killed_run_with_batches_from_one_file_each_resumes_at_its_batch(tmp_path, s3_bucket, s3_endpoint):
    # FlagEmbedding serves these batches by a counter, drawn anew each epoch: the run crosses
    # epochs (10 steps each) and resumes mid-epoch. Without dropout, as for M3 below.
    base = build_tiny_bert(tmp_path / "bert", dropout=0.0)
    records = synthetic_records(96, negatives=2)
    write_jsonl(tmp_path / "sources" / "a.jsonl", records[:48])
    write_jsonl(tmp_path / "sources" / "b.jsonl", records[48:])
    kill_and_resume(
        tmp_path,
        base,
        s3_bucket,
        s3_endpoint,
        steps=30,
        every=6,
        data=tmp_path / "sources",
        data_settings={"sameDatasetWithinBatch": True},
        # mean pooling and a higher rate: the losses of a tiny BERT's CLS vectors barely vary
        # from batch to batch, so a wrong batch would pass unnoticed
        model={"pooling": "mean"},
        training={"learningRate": 1e-3},
    )


def kill_and_resume(
    tmp_path,
    base: Path,
    s3_bucket,
    s3_endpoint,
    *,
    steps: int,
    every: int,
    model=None,
    training=None,
    data=None,
    data_settings=None,
) -> None:
    """Kill a 2-rank run after its first complete checkpoint; the resumed run must continue an
    uninterrupted reference run's loss curve step for step."""
    settings = {
        "data": data,
        "data_settings": data_settings,
        "model": model,
        "training": {"maxSteps": steps} | (training or {}),
        "checkpoint": {"everySteps": every, "keep": 2},
    }
    reference = write_config(tmp_path, base, str(tmp_path / "reference-store"), work="ref", **settings)
    finished = run_trainer(reference)
    assert finished.returncode == 0, finished.stderr[-3000:]
    expected = losses(open_storage(str(tmp_path / "reference-store")), steps)
    assert len(expected) == steps

    config = write_config(tmp_path, base, s3_bucket, s3_endpoint, **settings)
    store = CheckpointStore(open_storage(s3_bucket, StorageAccess(endpoint=s3_endpoint)), RUN)
    # a lost pod: the whole process group dies at once, right after its first complete checkpoint
    victim_log = tmp_path / "victim.log"
    with open(victim_log, "w") as log:
        victim = subprocess.Popen(trainer_command(config, 2), env=trainer_env(), stdout=log, stderr=log)
    deadline = time.monotonic() + 300
    while not store.complete_steps() and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.05)
    exited = victim.poll()
    kill_process_tree(victim)
    complete = store.complete_steps()
    assert complete and complete[0] < steps, (
        f"the run should have been killed mid-way (exit {exited}):\n{victim_log.read_text()[-3000:]}"
    )
    # an upload the kill cut short (no marker) must never be resumed from
    store.storage.write_bytes(f"{RUN.checkpoint_prefix(steps - every)}/model.safetensors", b"half an upload")

    resumed = run_trainer(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoint {complete[0]}" in resumed.stderr
    actual = losses(store.storage, steps)
    # the resumed run continues the reference loss curve step for step: same weights, optimizer,
    # scheduler and data position; from the base weights its losses would differ at once
    assert sorted(actual) == sorted(expected)
    for step in range(complete[0] + 1, steps + 1):
        assert actual[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), step


@pytest.mark.parametrize("nproc,signum", [(2, signal.SIGINT), (1, signal.SIGTERM)])
def test_a_signal_stops_training_with_a_checkpoint_and_the_next_run_resumes_there(tiny_model, tmp_path, nproc, signum):
    # Ctrl-C reaches torchrun, which passes it on; SIGTERM is how Kubernetes stops a pod
    store_uri = str(tmp_path / "store")
    config = write_config(
        tmp_path, tiny_model, store_uri, training={"maxSteps": 400}, checkpoint={"everySteps": 1000, "keep": 2}
    )
    command = (
        trainer_command(config, nproc)
        if nproc > 1
        else [sys.executable, "-m", "embedtune.operator.cli", "train", str(config), "--nproc-per-node=1"]
    )
    log_path = tmp_path / "stopped.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=trainer_env(), stdout=log, stderr=log)
    wait_for_training_step(tmp_path / "work" / "progress.json", 3, process, log_path)
    process.send_signal(signum)
    assert process.wait(timeout=120) == 128 + signum, log_path.read_text()[-3000:]
    store = CheckpointStore(open_storage(store_uri), RUN)
    [stopped_at] = store.complete_steps()  # none was due (every 1000 steps): the signal's own
    assert 3 <= stopped_at < 400
    assert f"stopped at step {stopped_at} with a checkpoint there" in log_path.read_text()
    assert not store.storage.exists(f"{RUN.model_prefix}/{COMPLETE_MARKER}")

    resumed = run_trainer(config, nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoint {stopped_at}" in resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == 400
    assert sorted(losses(store.storage, 400)) == list(range(1, 401))  # every step trained exactly once


@pytest.mark.parametrize(
    "problem,message",
    [
        ("data", ":3: pos: empty list (need at least one positive passage)"),
        # issue 10: an empty folder was retried as an infrastructure failure (exit 1)
        ("model", "model.base: cannot load '{model}': the folder is empty"),
        ("storage", f"holds run {RUN.run_id} of another spec (fingerprint old-spec, this config's new-spec)"),
    ],
)
def test_input_errors_exit_2_before_training(tiny_model, tmp_path, problem, message):
    data = write_jsonl(tmp_path / "bad.jsonl", synthetic_records(2) + [{"query": "q", "pos": []}])
    model = tiny_model
    if problem != "data":
        data = write_jsonl(tmp_path / "good.jsonl", synthetic_records(40))
    if problem == "model":
        model = tmp_path / "empty-model"
        model.mkdir()
        message = message.format(model=model)
    config = write_config(tmp_path, model, str(tmp_path / "store"), data=data)
    if problem == "storage":  # the storage of this run id holds another spec's run: never reused
        settings = yaml.safe_load(config.read_text())
        settings["run"]["specFingerprint"] = "new-spec"
        config.write_text(yaml.safe_dump(settings))
        open_storage(str(tmp_path / "store")).write_bytes(
            f"{RUN.run_prefix}/run.json", b'{"specFingerprint": "old-spec"}'
        )
    termination = tmp_path / "termination-log"
    result = run_trainer(config, nproc=2, EMBEDTUNE_TERMINATION_LOG=str(termination))
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr
    expected_reason = "ModelNotLoadable" if problem == "model" else "InputError"
    assert json.loads(termination.read_text())["reason"] == expected_reason
    assert not (tmp_path / "store" / RUN.checkpoints_prefix).exists()


@pytest.mark.parametrize(
    "logging_steps,reason",
    [
        (1, "training diverged: loss nan and gradient norm nan at step 2 (last finite loss "),
        # no log sees it before the checkpoint is due: its weights are checked before the upload
        (100, "training diverged: checkpoint 2 has non-finite weights (embeddings.LayerNorm.bias, "),
    ],
)
def test_a_diverged_run_exits_2_naming_its_settings_and_stores_nothing(tiny_model, tmp_path, logging_steps, reason):
    # issue 10: weightDecay .inf "succeeded" with a model of NaN weights and a reported loss of 0.0
    training = {"maxSteps": 6, "weightDecay": 1e30, "warmupRatio": 0, "loggingSteps": logging_steps}
    config = write_config(tmp_path, tiny_model, str(tmp_path / "store"), training=training)
    termination = tmp_path / "termination-log"
    result = run_trainer(config, nproc=1, EMBEDTUNE_TERMINATION_LOG=str(termination))
    assert result.returncode == 2, result.stderr[-3000:]
    message = json.loads(termination.read_text())
    assert message["reason"] == "TrainingDiverged" and message["message"].startswith(reason), message
    assert "training.weightDecay: 1e+30; AdamW's is usually 0 to 0.1" in message["problems"]
    storage = open_storage(str(tmp_path / "store"))
    assert not storage.exists(f"{RUN.model_prefix}/{COMPLETE_MARKER}")
    assert CheckpointStore(storage, RUN).complete_steps() == []
    # the status shows the last real loss or none, never a made-up one (HF's NaN filter reported 0.0)
    progress = tmp_path / "work" / "progress.json"
    if progress.exists():
        reported = json.loads(progress.read_text())["training"]
        assert reported["step"] == 1 and reported["loss"] > 1, reported


def test_a_batch_larger_than_the_data_is_warned_about_and_progress_counts_what_was_processed(tiny_model, tmp_path):
    # issue 10: batchSizePerDevice beyond the data reported 4.3e9 samples/s
    records = synthetic_records(40, negatives=0)
    for index, record in enumerate(records):  # lengths vary, so batches carry padding
        record["query"] = " ".join(record["query"].split()[: 3 + index % 3])
        record["pos"] = [" ".join(record["pos"][0].split()[: 2 + index % 5])]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    training = {"maxSteps": 2, "batchSizePerDevice": 4096, "groupSize": 1}
    config = write_config(tmp_path, tiny_model, str(tmp_path / "store"), data=data, training=training)
    result = run_trainer(config, nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]

    train = [json.loads(line) for line in (tmp_path / "work" / "data" / "train.jsonl").read_text().splitlines()]
    assert (
        "training.batchSizePerDevice 4096: a step would take 4096 queries (1 process(es), 1 accumulation step(s)) "
        f"but the training data has {len(train)} records"
    ) in result.stderr
    # every step is the whole (held-out-less) data: its queries and their positives, each tokenized alone
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = [record["query"] for record in train] + [record["pos"][0] for record in train]
    tokens = sum(len(ids) for ids in tokenizer(texts, max_length=16, truncation=True)["input_ids"])
    logs = training_logs(open_storage(str(tmp_path / "store")), 2)
    assert [(entry["queries"], entry["tokens"]) for entry in logs] == [(len(train), tokens)] * 2
    assert all(entry["padded_tokens"] > entry["tokens"] for entry in logs)


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_deepspeed_zero_on_cpu_trains_checkpoints_and_resumes(tiny_model, tmp_path, zero_stage):
    store_uri = str(tmp_path / "store")
    config = write_config(
        tmp_path, tiny_model, store_uri, training={"maxSteps": 6, "deepspeed": {"zeroStage": zero_stage}}
    )
    first = run_trainer(config)
    assert first.returncode == 0, first.stderr[-3000:]
    storage = open_storage(store_uri)
    shards = [o.key.rsplit("/", 1)[1] for o in storage.list(f"{RUN.checkpoint_prefix(6)}/global_step6")]
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(shards)
    if zero_stage == 3:  # the parameters too are sharded, one part per rank; the export gathers them whole
        assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= set(shards)
    expected = losses(storage, 6)

    # as if the pod had died after checkpoint 4: checkpoint 6 and the model were never stored
    storage.delete([o.key for o in storage.list(RUN.model_prefix) + storage.list(RUN.checkpoint_prefix(6))])
    again = run_trainer(config)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from checkpoint 4" in again.stderr  # the DeepSpeed engine state, not just weights
    actual = losses(storage, 6)
    assert set(actual) == {1, 2, 3, 4, 5, 6}
    for step in (5, 6):
        # DeepSpeed's restored engine is not bit-identical on CPU (3e-4 relative seen here);
        # the plain-DDP resume above is held to 1e-4
        assert actual[step] == pytest.approx(expected[step], rel=2e-3)


def test_deepspeed_resumes_batches_from_one_file_each_at_its_batch(tmp_path):
    """Under DeepSpeed, HF loads the checkpoint into the engine without _load_from_checkpoint:
    FlagEmbedding's same-dataset batches must still resume at the checkpoint's batch (a resumed
    run that served the epoch's first batches again trained on other data)."""
    base = build_tiny_bert(tmp_path / "bert", dropout=0.0)
    records = synthetic_records(96, negatives=2)
    write_jsonl(tmp_path / "sources" / "a.jsonl", records[:48])
    write_jsonl(tmp_path / "sources" / "b.jsonl", records[48:])
    store_uri = str(tmp_path / "store")
    config = write_config(
        tmp_path,
        base,
        store_uri,
        data=tmp_path / "sources",
        data_settings={"sameDatasetWithinBatch": True},
        # as in the kill-and-resume test above: batches must tell apart in the losses
        model={"pooling": "mean"},
        training={"learningRate": 1e-3, "maxSteps": 8, "deepspeed": {"zeroStage": 2}},
        checkpoint={"everySteps": 4, "keep": 2},
    )
    first = run_trainer(config)
    assert first.returncode == 0, first.stderr[-3000:]
    storage = open_storage(store_uri)
    expected = losses(storage, 8)
    storage.delete([o.key for o in storage.list(RUN.model_prefix) + storage.list(RUN.checkpoint_prefix(8))])
    again = run_trainer(config)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from checkpoint 4" in again.stderr
    actual = losses(storage, 8)
    for step in range(5, 9):
        assert actual[step] == pytest.approx(expected[step], rel=2e-3), step


def test_a_run_lost_after_its_final_checkpoint_exports_without_training_again(tiny_model, tmp_path):
    store_uri = str(tmp_path / "store")
    config = write_config(
        tmp_path,
        tiny_model,
        store_uri,
        training={"maxSteps": 4, "matryoshkaDims": [32, 8]},
        model={"pooling": "mean", "queryInstruction": "query: "},
    )
    first = run_trainer(config, nproc=1)
    assert first.returncode == 0, first.stderr[-3000:]
    storage = open_storage(store_uri)
    storage.delete([o.key for o in storage.list(RUN.model_prefix)])  # lost before the model was stored

    again = run_trainer(config, nproc=1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from checkpoint 4" in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["step"] == 4
    assert CheckpointStore(storage, RUN).complete_steps() == [4, 2]  # no step 5: nothing trained twice
    assert storage.exists(f"{RUN.model_prefix}/{COMPLETE_MARKER}")

    done = run_trainer(config, nproc=1)  # a pod restarted after the run had finished
    assert done.returncode == 0 and "is already complete" in done.stderr


# no pooling: the family (decoder) and its pooling (last token) come from the model's config.json
LORA = {"pooling": None, "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}, "queryInstruction": "Query: "}


def test_a_decoder_with_lora_trains_on_two_ranks_stores_adapters_and_resumes_its_loss_curve(
    tiny_decoder, tmp_path, s3_bucket, s3_endpoint
):
    from sentence_transformers import SentenceTransformer

    steps = {"training": {"maxSteps": 30, "learningRate": 1e-3}, "checkpoint": {"everySteps": 10, "keep": 3}}
    reference = write_config(tmp_path, tiny_decoder, str(tmp_path / "ref-store"), work="ref", model=LORA, **steps)
    finished = run_trainer(reference)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "negatives: world size 2, each of 8 queries scored against 32 passages (cross-device on)" in finished.stderr
    ref_storage = open_storage(str(tmp_path / "ref-store"))
    expected = losses(ref_storage, 30)
    assert expected[30] < expected[1] - 0.5  # it learns (a model pooling the shared query prefix would not)
    # checkpoints hold the adapters and their optimizer state, not the base weights
    stored = {Path(item.key).name for item in ref_storage.list(RUN.checkpoint_prefix(10))}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= stored
    assert not stored & {"model.safetensors", "pytorch_model.bin"}
    model_dir = tmp_path / "exported"
    ref_storage.download_dir(RUN.model_prefix, model_dir)
    assert (model_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((model_dir / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "lasttoken"
    assert SentenceTransformer(str(model_dir), device="cpu").prompts["query"] == "Query: "

    # killed after its first complete checkpoint, then resumed: the same loss curve
    config = write_config(tmp_path, tiny_decoder, s3_bucket, s3_endpoint, model=LORA, **steps)
    store = CheckpointStore(open_storage(s3_bucket, StorageAccess(endpoint=s3_endpoint)), RUN)
    victim = subprocess.Popen(
        trainer_command(config, 2), env=trainer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not store.complete_steps() and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.05)
    kill_process_tree(victim)
    complete = store.complete_steps()
    assert complete and complete[0] < 30
    resumed = run_trainer(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoint {complete[0]}" in resumed.stderr
    actual = losses(store.storage, 30)
    for step in range(complete[0] + 1, 31):
        assert actual[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), step


@pytest.mark.parametrize("deepspeed", [None, {"zeroStage": 1}, {"zeroStage": 2}], ids=["ddp", "zero1", "zero2"])
def test_grad_cache_trains_the_loss_curve_of_the_plain_step(tmp_path, deepspeed):
    """Two ranks with cross-device negatives, under DDP or DeepSpeed: the same losses step by step
    (so the same updates) with the batch encoded in mini-batches of one query. Without dropout:
    GradCache draws its masks per mini-batch, the plain step per batch."""
    model = build_tiny_bert(tmp_path / "model", dropout=0.0)
    curves = []
    for grad_cache in (None, {"miniBatchSize": 1}):
        store_uri = str(tmp_path / f"store-{grad_cache is not None}")
        training = {"maxSteps": 3, "deepspeed": deepspeed, "gradCache": grad_cache}
        config = write_config(
            tmp_path, model, store_uri, training={k: v for k, v in training.items() if v}, checkpoint={"everySteps": 3}
        )
        result = run_trainer(config)
        assert result.returncode == 0, result.stderr[-3000:]
        curves.append(losses(open_storage(store_uri), 3))
    plain, cached = curves
    assert set(plain) == {1, 2, 3}
    assert cached == pytest.approx(plain, abs=2e-4)  # the Trainer logs losses rounded to 4 decimals


def test_dataloader_workers_change_neither_the_batches_nor_the_losses(tiny_model, tmp_path):
    # 24 records, 2 held out: 6 steps an epoch, so the second epoch picks negatives anew
    records = synthetic_records(24, negatives=5)
    for index, record in enumerate(records):  # lengths vary, so batches carry padding
        record["pos"] = [" ".join(record["pos"][0].split()[: 2 + index % 5])]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    curves = []
    for workers in (0, 2):
        training = {"epochs": 2, "groupSize": 3, "dataloaderWorkers": workers}
        store = tmp_path / f"store-{workers}"
        config = write_config(tmp_path, tiny_model, str(store), data=data, work=f"work-{workers}", training=training)
        result = run_trainer(config, nproc=1)
        assert result.returncode == 0, result.stderr[-3000:]
        logs = training_logs(open_storage(str(store)), 12)
        curves.append([(entry["step"], entry["loss"], entry["tokens"]) for entry in logs])
    assert len(curves[0]) == 12
    assert curves[0] == curves[1]
    # what the steps cost is reported: real tokens/s and the padding share, in progress and the log
    reported = json.loads((tmp_path / "work-0" / "progress.json").read_text())["training"]
    assert reported["tokensPerSecond"] > 0 and 0 < reported["paddingShare"] < 1, reported
    assert " tokens/s " in result.stderr and " padding " in result.stderr


def test_padding_free_training_follows_the_padded_loss_curve_with_cross_device_negatives(tiny_model, tmp_path):
    # dropout draws other random numbers for other tensor shapes: compare the computation without it
    model = tmp_path / "no-dropout"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(
        json.dumps(config | {"hidden_dropout_prob": 0, "attention_probs_dropout_prob": 0})
    )
    records = synthetic_records(96, negatives=3)
    for index, record in enumerate(records):  # lengths vary, so padded batches carry padding
        record["pos"] = [" ".join(record["pos"][0].split()[: 2 + index % 5])]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    curves, stderr = {}, {}
    for padding_free in (False, True):
        store = tmp_path / f"store-{padding_free}"
        training = {"maxSteps": 20, "paddingFree": padding_free}
        config = write_config(
            tmp_path,
            model,
            str(store),
            data=data,
            work=f"work-{padding_free}",
            training=training,
            checkpoint={"everySteps": 20, "keep": 1},
        )
        result = run_trainer(config, nproc=2)
        assert result.returncode == 0, result.stderr[-3000:]
        curves[padding_free] = losses(open_storage(str(store)), 20)
        stderr[padding_free] = result.stderr
    assert len(curves[True]) == 20
    assert curves[True] == pytest.approx(curves[False], rel=1e-4)
    assert "padding-free: queries and passages run as flattened sequences" in stderr[True]
    # the gather across the two ranks sees every passage either way
    for text in stderr.values():
        assert "each of 8 queries scored against 32 passages (cross-device on)" in text
    assert " padding 0% " in stderr[True] and " padding 0% " not in stderr[False]
