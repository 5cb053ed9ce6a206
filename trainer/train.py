"""The trainer entrypoint that torchrun starts on every rank:

    torchrun --nnodes N --nproc-per-node G ... -m embedtune.trainer --config trainer.yaml

Data is validated and prepared before any training; the newest complete checkpoint in
storage is resumed; checkpoints upload in the background; the final model is exported in
sentence-transformers layout and stored with a completion marker.

Exit codes: 0 done, 2 the user's input is wrong (bad data, config or model id; retrying
cannot help), 1 anything else (retried by the operator from the last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import TrainerConfig, load_trainer_config
from .errors import EXIT_FAILURE, EXIT_INPUT_ERROR, EXIT_OK, InputError, write_termination_message
from .layout import RunLayout
from .progress import JsonFileReporter, LogReporter, ProgressReporter, ThrottledReporter
from .storage import fetch_to_local, open_storage

logger = logging.getLogger("embedtune.trainer")


@dataclass(frozen=True)
class TrainResult:
    model_uri: str | None
    eval_uri: str | None
    resumed_from_step: int | None
    final_step: int


def _rank() -> tuple[int, int, int, int]:
    """(global rank, local rank, node rank, number of nodes) as torchrun sets them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("GROUP_RANK", "0")), max(1, world // max(1, local_world)))


def _broadcast_from_rank0(value):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def train(config: TrainerConfig, reporters: list[ProgressReporter] | None = None) -> TrainResult:
    from .checkpoints import CheckpointStore, CheckpointUploader, is_published, publish_dir
    from .data import prepare_training_data
    from .export import export_sentence_transformers
    from .runner import (CheckpointCallback, EmbedtuneRunner, ProgressCallback, build_model_and_data_arguments,
                         build_training_arguments)

    rank, local_rank, node_rank, num_nodes = _rank()
    work = Path(config.work_dir)
    output_dir = work / "checkpoints"
    storage = open_storage(config.storage.uri, endpoint=config.storage.endpoint, region=config.storage.region)
    layout = RunLayout(config.run.namespace, config.run.name, config.run.run_id)
    store = CheckpointStore(storage, layout)

    training_args = build_training_arguments(config, output_dir)
    _ = training_args.device  # joins the process group (gloo on CPU) before the collectives below

    # Newest complete checkpoint: chosen once, by rank 0, so every node resumes the same one.
    steps = store.complete_steps() if rank == 0 else None
    steps = _broadcast_from_rank0(steps)
    resumed_step: int | None = None
    with training_args.main_process_first(local=True, desc="prepare data and checkpoint"):
        model_path = str(fetch_to_local(config.model.base, work / "base-model", endpoint=config.storage.endpoint,
                                        region=config.storage.region, download=local_rank == 0))
        prepared = prepare_training_data(config.data, config.training.group_size, config.training.seed,
                                         work / "data", config.storage, model=config.model, model_path=model_path)
        if local_rank == 0:
            if output_dir.exists():
                shutil.rmtree(output_dir)  # local leftovers are never trusted; storage is the record
            if steps and (found := store.download_latest(output_dir)):
                resumed_step = found[0]
    resumed_step = _broadcast_from_rank0(resumed_step)
    if resumed_step is not None:
        training_args.resume_from_checkpoint = str(output_dir / f"checkpoint-{resumed_step}")
        logger.info("resuming from checkpoint %d (%s)", resumed_step, store.uri(resumed_step))

    eval_uri = None
    if prepared.eval_dir is not None:
        eval_uri = storage.uri_for(layout.eval_prefix)
        if rank == 0 and not is_published(storage, layout.eval_prefix):
            publish_dir(storage, prepared.eval_dir, layout.eval_prefix, desc="upload held-out evaluation set")

    reporter = ThrottledReporter([LogReporter(), JsonFileReporter(work / "progress.json"), *(reporters or [])],
                                 config.progress_interval_seconds)
    uploader = None
    if local_rank == 0:
        uploader = CheckpointUploader(store, work / "upload-staging", node_rank=node_rank, num_nodes=num_nodes,
                                      keep=config.checkpoint.keep,
                                      on_complete=reporter.checkpoint_stored if rank == 0 else None)
    model_args, data_args = build_model_and_data_arguments(config, model_path, prepared.train_file)
    checkpoint_callback = CheckpointCallback(uploader)
    runner = EmbedtuneRunner(model_args, data_args, training_args, callbacks=[checkpoint_callback])
    runner.trainer.add_callback(ProgressCallback(reporter, runner.model))
    try:
        runner.trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finally:
        if uploader is not None:
            uploader.close()  # a finished checkpoint is never abandoned mid-upload

    runner.trainer.save_model(str(work / "final"))  # every rank: DeepSpeed gathers the weights
    model_uri = None
    if rank == 0:
        state = runner.trainer.state
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        summary = {"baseModel": config.model.base, "run": config.run.to_dict(), "step": state.global_step,
                   "finalLoss": losses[-1] if losses else None, "trainRecords": prepared.train_records}
        export_dir = export_sentence_transformers(work / "final", work / "model", config.model, extra={"training": summary})
        model_uri = publish_dir(storage, export_dir, layout.model_prefix, desc="upload model", extra=summary)
        logger.info("model stored at %s", model_uri)
    return TrainResult(model_uri, eval_uri, resumed_step, runner.trainer.state.global_step)


def _cluster_reporters(config: TrainerConfig) -> list[ProgressReporter]:
    rank, *_ = _rank()
    if not config.run.report_status or rank != 0:
        return []
    from .status import KubernetesStatusReporter

    return [KubernetesStatusReporter(config.run.namespace, config.run.name, config.run.run_id)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedtune.trainer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="trainer config file (YAML or JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_trainer_config(args.config)
        result = train(config, reporters=_cluster_reporters(config))
    except InputError as exc:
        logger.error("%s", exc.report(limit=50))
        write_termination_message(json.dumps({"reason": "InputError", "message": exc.report(limit=20)}))
        return EXIT_INPUT_ERROR
    except Exception as exc:
        logger.exception("training failed")
        write_termination_message(json.dumps({"reason": type(exc).__name__, "message": str(exc)[:2000]}))
        return EXIT_FAILURE
    if result.model_uri:
        print(json.dumps({"model": result.model_uri, "eval": result.eval_uri, "step": result.final_step}))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
