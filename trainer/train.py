"""The trainer entrypoint that torchrun starts on every rank:

    torchrun --nnodes N --nproc-per-node G ... -m embedtune.trainer --config trainer.yaml

Data is validated and prepared before any training; the newest complete checkpoint in
storage is resumed; checkpoints upload in the background; the final model is exported in
sentence-transformers layout and stored with a completion marker.

Exit codes: 0 done, 2 the user's input is wrong (bad data, config, model id, storage bucket or
credentials; retrying cannot help), 75 storage stayed unreachable for `storage.retrySeconds`,
1 anything else (75 and 1 are retried by the operator from the last checkpoint).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .contract import FailureClass, TerminationMessage, TrainerConfig, load_config
from .errors import (
    EXIT_FAILURE,
    EXIT_INPUT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STORAGE_UNAVAILABLE,
    InputError,
    StorageUnavailable,
)
from .layout import RUN_RECORD, RunLayout, checkpoint_dir_name, join
from .progress import JsonFileReporter, LogReporter, ProgressReporter, ThrottledReporter
from .storage import fetch_to_local, open_storage

logger = logging.getLogger("embedtune.trainer")


class TrainingStopped(Exception):
    """Training ended early on a signal, with a checkpoint at the step it reached unless
    storage failed; `outcome` says which checkpoint running again resumes from."""

    def __init__(self, step: int, signal_name: str, outcome: str):
        self.step, self.signal_name = step, signal_name
        super().__init__(f"{signal_name}: stopped at step {step} {outcome}")

    @property
    def exit_code(self) -> int:
        return 128 + signal.Signals[self.signal_name].value  # what the shell reports for a signal


@dataclass(frozen=True)
class TrainResult:
    model_uri: str | None
    eval_uri: str | None
    final_step: int


def _rank() -> tuple[int, int, int, int]:
    """(global rank, local rank, node rank, number of nodes) as torchrun sets them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("GROUP_RANK", "0")),
        max(1, world // max(1, local_world)),
    )


def broadcast_from_rank0(value):
    import torch.distributed as dist

    from .runner import several_processes  # imported by train() before this is called

    if several_processes():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def train(config: TrainerConfig, reporters: list[ProgressReporter] | None = None) -> TrainResult:
    from .checkpoints import CheckpointStore, is_published, publish_dir
    from .data import prepare_training_data
    from .model_loading import model_type_of

    rank, local_rank, _, _ = _rank()
    work = Path(config.work_dir)
    output_dir = work / "checkpoints"
    storage = open_storage(config.storage.uri, config.storage)
    layout = RunLayout(config.run.namespace, config.run.name, config.run.run_id)
    store = CheckpointStore(storage, layout)

    training_args = _family(config).build_training_arguments(config, output_dir)
    _ = training_args.device  # joins the process group (gloo on CPU) before the collectives below

    _claim_run_storage(storage, layout, config.run.spec_fingerprint, write=rank == 0)
    if is_published(storage, layout.model_prefix):  # a pod restarted after the run had finished
        logger.info("run %s is already complete: %s", layout.run_prefix, storage.uri_for(layout.model_prefix))
        return TrainResult(storage.uri_for(layout.model_prefix), None, -1)

    resumed: tuple[int, bool] | None = None  # (step, training finished at that step)
    with training_args.main_process_first(local=True, desc="prepare data and checkpoint"):
        model_path = str(
            fetch_to_local(config.model.base, work / "base-model", config.storage, download=local_rank == 0)
        )
        # decoder or encoder, and the pooling that follows, from the model's own config.json
        config = config.model_copy(update={"model": config.model.resolved(model_type_of(model_path))})
        training_args.sentence_pooling_method = config.model.flagembedding_pooling
        prepared = prepare_training_data(
            config.data,
            config.training.group_size,
            config.training.seed,
            work / "data",
            config.storage,
            model=config.model,
            model_path=model_path,
            reuse=local_rank != 0,
            distillation=config.training.distills,
        )
        if local_rank == 0:
            resumed = _restore_latest_checkpoint(store, output_dir, config.training.max_steps)
    # rank 0's choice holds everywhere, so every node resumes the same step
    resumed = broadcast_from_rank0(resumed)

    train_file = prepared.train_file
    if config.data.teacher is not None:  # after mining and filling: the teacher scores every passage
        from .teacher import teacher_scored_data

        train_file = teacher_scored_data(
            train_file,
            config.data.teacher,
            storage,
            layout,
            work / "teacher",
            config.storage,
            rank=rank,
            local_rank=local_rank,
        )

    eval_uri = None
    if prepared.eval_dir is not None:
        eval_uri = storage.uri_for(layout.eval_prefix)
        if rank == 0 and not is_published(storage, layout.eval_prefix):
            publish_dir(storage, prepared.eval_dir, layout.eval_prefix, desc="upload held-out evaluation set")

    if resumed is not None:
        logger.info("resuming from checkpoint %d (%s)", resumed[0], store.uri(resumed[0]))
        training_args.resume_from_checkpoint = str(output_dir / checkpoint_dir_name(resumed[0]))
    if resumed is not None and resumed[1]:
        # killed after the last checkpoint: resuming would make HF train one step too many
        final_step, final_loss = resumed[0], None
    else:
        final_step, final_loss = _run_training(
            config, training_args, store, model_path, train_file, reporters or [], resumed
        )

    model_uri = None
    if rank == 0:
        # the export loads the final checkpoint on this process alone: not partitioned over the
        # ranks by ZeRO-3's zero.Init, which would wait for the others forever (they are done)
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            model_uri = _publish_model(
                config,
                storage,
                layout,
                model_path,
                output_dir / checkpoint_dir_name(final_step),
                prepared.train_file,
                {
                    "step": final_step,
                    "finalLoss": final_loss,
                    "trainRecords": prepared.train_records,
                    "data": config.data.to_dict(),
                    "settings": config.training.to_dict(),
                },
            )
        except StorageUnavailable as exc:  # the final checkpoint is stored: a new attempt only exports
            raise StorageUnavailable(f"the model was not stored: {exc}; {store.resume_hint(final_step)}") from exc
    return TrainResult(model_uri, eval_uri, final_step)


@dataclass(frozen=True)
class RunnerFamily:
    """What train() takes from a runner family: its runner and its argument builders."""

    runner: type
    build_model_and_data_arguments: Callable
    build_training_arguments: Callable


def _family(config: TrainerConfig) -> RunnerFamily:
    from .runner import runner_family

    if runner_family(config) == "m3":
        from .m3 import EmbedtuneM3Runner, build_m3_model_and_data_arguments, build_m3_training_arguments

        return RunnerFamily(EmbedtuneM3Runner, build_m3_model_and_data_arguments, build_m3_training_arguments)
    from .runner import EmbedtuneRunner, build_model_and_data_arguments, build_training_arguments

    if runner_family(config) == "decoder":
        from .decoder import EmbedtuneDecoderRunner, build_decoder_model_and_data_arguments

        return RunnerFamily(EmbedtuneDecoderRunner, build_decoder_model_and_data_arguments, build_training_arguments)
    return RunnerFamily(EmbedtuneRunner, build_model_and_data_arguments, build_training_arguments)


def _claim_run_storage(storage, layout: RunLayout, spec_fingerprint: str | None, *, write: bool) -> None:
    """A run's storage belongs to the spec that started it: checkpoints or a model stored there
    for another spec are never resumed from or reported."""
    if spec_fingerprint is None:  # a trainer config written by hand names no spec
        return
    key = join(layout.run_prefix, RUN_RECORD)
    stored = storage.read_bytes(key)
    if stored is None:
        if write:
            storage.write_bytes(key, json.dumps({"specFingerprint": spec_fingerprint}).encode())
        return
    try:
        found = json.loads(stored).get("specFingerprint")
    except (ValueError, AttributeError):
        found = "(unreadable)"
    if found != spec_fingerprint:
        raise InputError(
            f"run.runId: {storage.uri_for(layout.run_prefix)} holds run {layout.run_id} of another spec "
            f"(fingerprint {found}, this config's {spec_fingerprint}); give this run its own runId"
        )


def _restore_latest_checkpoint(store, output_dir: Path, max_steps: int | None) -> tuple[int, bool] | None:
    """Download the newest complete checkpoint into output_dir (local leftovers are never
    trusted: storage is the record); also tell whether training had finished there."""
    if output_dir.exists():
        shutil.rmtree(output_dir)
    found = store.download_latest(output_dir)
    if found is None:
        return None
    step, path = found
    state = json.loads((path / "trainer_state.json").read_text())
    return step, state["global_step"] >= (max_steps or state["max_steps"])


def _run_training(
    config: TrainerConfig,
    training_args,
    store,
    model_path: str,
    train_file: Path,
    reporters: list[ProgressReporter],
    resumed: tuple[int, bool] | None,
) -> tuple[int, float | None]:
    from .checkpoints import CheckpointUploader
    from .divergence import DivergenceGuard
    from .runner import CheckpointCallback, ProgressCallback, StopOnSignal, padding_free_wanted
    from .tracking import TRAINING_LOGS, FolderMirror, tensorboard_callback

    rank, local_rank, node_rank, num_nodes = _rank()
    work = Path(config.work_dir)
    reporter = ThrottledReporter(
        [LogReporter(), JsonFileReporter(work / "progress.json"), *reporters], config.progress_interval_seconds
    )
    uploader = None
    if local_rank == 0:
        uploader = CheckpointUploader(
            store,
            work / "upload-staging",
            node_rank=node_rank,
            num_nodes=num_nodes,
            keep=config.checkpoint.keep,
            stored_step=resumed[0] if resumed else None,
            on_complete=reporter.checkpoint_stored if rank == 0 else None,
        )
    family = _family(config)
    model_args, data_args = family.build_model_and_data_arguments(config, model_path, train_file)
    stop = StopOnSignal()
    # rank 0 writes the curves; the upload thread stores them as training goes
    curves = FolderMirror(store.storage, work / "tensorboard", store.layout.tensorboard_prefix)
    upload_curves = functools.partial(uploader.run_later, curves.sync) if rank == 0 and uploader else None
    # the guard first: a checkpoint it refuses never reaches the uploader
    callbacks = [DivergenceGuard(config.training), CheckpointCallback(uploader), stop]
    if tensorboard := tensorboard_callback(
        curves.local_dir / TRAINING_LOGS, upload_curves, config.progress_interval_seconds
    ):
        callbacks.append(tensorboard)
    runner = family.runner(
        model_args,
        data_args,
        training_args,
        callbacks=callbacks,
        lora=config.model.lora,
        padding_free=padding_free_wanted(config.training),
    )
    runner.trainer.add_callback(ProgressCallback(reporter, runner.model))
    try:
        try:
            output = runner.trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        finally:
            if uploader is not None:
                uploader.close()  # a finished checkpoint is never abandoned mid-upload
    except StorageUnavailable as exc:
        if stop.signal_name is None:
            raise
        raise TrainingStopped(runner.trainer.state.global_step, stop.signal_name, f"but {exc}") from exc
    state = runner.trainer.state
    if stop.signal_name is not None and state.global_step < state.max_steps:
        # the first process of each node uploads, so it is the one that can tell what is stored
        if uploader is not None:
            outcome = "with a checkpoint there; running again resumes from it"
        else:
            outcome = "(the first process of its node stores the checkpoint)"
        raise TrainingStopped(state.global_step, stop.signal_name, outcome)
    if rank == 0:
        logger.info(
            "training finished at step %d; train_runtime %.3fs", state.global_step, output.metrics["train_runtime"]
        )
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    return state.global_step, (losses[-1] if losses else None)


def _publish_model(
    config: TrainerConfig,
    storage,
    layout: RunLayout,
    model_path: str,
    final_checkpoint: Path,
    train_file: Path,
    summary: dict,
) -> str:
    """Export the last checkpoint (HF saves one at the final step) in sentence-transformers
    layout and store it, completion marker last. A LoRA checkpoint's adapters are merged into
    the base model first, and kept beside it."""
    from .checkpoints import publish_dir
    from .divergence import describe_tensors, diverged, non_finite_weights
    from .export import export_sentence_transformers
    from .lora import is_adapter_checkpoint, merge_adapter

    if bad := non_finite_weights(final_checkpoint):  # one resumed from an earlier attempt, too
        raise diverged(
            f"the final checkpoint ({final_checkpoint.name}) has non-finite weights ({describe_tensors(bad)})",
            config.training,
        )
    summary = {"baseModel": config.model.base, "run": config.run.to_dict()} | summary
    work = Path(config.work_dir)
    finetuned, adapter = final_checkpoint, None
    if is_adapter_checkpoint(final_checkpoint):
        finetuned, adapter = merge_adapter(Path(model_path), final_checkpoint, work / "finetuned-hf"), final_checkpoint
    export_dir = export_sentence_transformers(
        finetuned, work / "model", config.model, extra={"training": summary}, adapter_dir=adapter
    )
    if config.merge is not None:  # first: the fine-tuned model's marker marks the whole run complete
        _publish_merged_model(config, storage, layout, model_path, finetuned, train_file, summary)
    model_uri = publish_dir(storage, export_dir, layout.model_prefix, desc="upload model", extra=summary)
    logger.info("model stored at %s", model_uri)
    return model_uri


def _publish_merged_model(
    config: TrainerConfig, storage, layout: RunLayout, model_path: str, finetuned: Path, train_file: Path, summary: dict
) -> str:
    """The fine-tuned model merged with merge.models (the base by default), exported and stored
    beside the fine-tuned one."""
    from .checkpoints import publish_dir
    from .export import export_sentence_transformers
    from .merge import fit_weights, merge_models

    merge, work = config.merge, Path(config.work_dir)
    others = [
        fetch_to_local(uri, work / "merge-models" / str(index), config.storage)
        for index, uri in enumerate(merge.models)
    ] or [Path(model_path)]
    candidates = [finetuned, *others]
    weights = merge.weights or fit_weights(
        candidates,
        config.model,
        train_file,
        merge,
        temperature=config.training.temperature,
        seed=config.training.seed,
    )
    merged = merge_models(candidates, weights, work / "merged-hf", trust_remote_code=config.model.trust_remote_code)
    summary = summary | {"merge": {"models": merge.models or [config.model.base], "weights": weights}}
    export_dir = export_sentence_transformers(merged, work / "merged-model", config.model, extra={"training": summary})
    uri = publish_dir(storage, export_dir, layout.merged_model_prefix, desc="upload merged model", extra=summary)
    logger.info("merged model (weights %s) stored at %s", [round(w, 4) for w in weights], uri)
    return uri


def _cluster_reporters(config: TrainerConfig) -> list[ProgressReporter]:
    rank, *_ = _rank()
    if not config.run.report_status or rank != 0:
        return []
    from .status import KubernetesStatusReporter

    return [KubernetesStatusReporter(config.run)]


def _quiet_library_chatter() -> None:
    """Silence, at their source, library messages nobody can act on. Without a GPU, DeepSpeed
    is told it runs on the CPU (detecting it, it warns that it may have missed a GPU); the
    FlagEmbedding runner logs its 150 arguments and the process layout as a warning (the
    trainer config is the record of the settings, and our log states the process layout)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("FlagEmbedding.abc.finetune.embedder.AbsRunner").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedtune.trainer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="trainer config file (YAML or JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_library_chatter()
    try:
        config = load_config(args.config, TrainerConfig)
        result = train(config, reporters=_cluster_reporters(config))
    except InputError as exc:
        logger.error("%s", exc.report(limit=50))
        TerminationMessage.of_input_error(exc).write()
        return EXIT_INPUT_ERROR
    except TrainingStopped as exc:
        logger.warning("%s", exc)
        TerminationMessage(reason="Stopped", failure=FailureClass.STOPPED, message=str(exc)).write()
        return exc.exit_code
    except StorageUnavailable as exc:
        logger.error("%s", exc)
        TerminationMessage.of_storage_unavailable(exc).write()
        return EXIT_STORAGE_UNAVAILABLE
    except KeyboardInterrupt:
        logger.warning("interrupted before training started; nothing to save")
        return EXIT_INTERRUPTED
    except Exception as exc:
        logger.exception("training failed")
        TerminationMessage(
            reason=type(exc).__name__, failure=FailureClass.INFRASTRUCTURE, message=str(exc)[:2000]
        ).write()
        return EXIT_FAILURE
    if result.model_uri:
        print(json.dumps({"model": result.model_uri, "eval": result.eval_uri, "step": result.final_step}))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
