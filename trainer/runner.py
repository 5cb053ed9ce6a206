"""FlagEmbedding's encoder-only fine-tuning, extended the way FlagEmbedding intends: by
subclassing its concrete runner, model and trainer, and adding Trainer callbacks.

What the subclasses change, and why:
- the model records the shape of its first score matrix, so the log states how many
  passages each query was scored against (proof that cross-device negatives are on);
- the trainer saves only on the process that should (FlagEmbedding writes on every rank
  without DeepSpeed) and resumes the weights into the inner encoder (FlagEmbedding's
  checkpoints hold the inner model, which HF's loader cannot put into the wrapper: it
  crashes, and the naive fix silently restarts from the base weights); it also counts the
  queries and tokens the steps process, so progress reports what was trained rather than
  the configured batch;
- the runner loads the model so that one that cannot be loaded is an input error, and wires
  our callbacks in.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
from FlagEmbedding.finetune.embedder.encoder_only.base import (
    BiEncoderOnlyEmbedderModel,
    EncoderOnlyEmbedderDataArguments,
    EncoderOnlyEmbedderModelArguments,
    EncoderOnlyEmbedderRunner,
    EncoderOnlyEmbedderTrainer,
    EncoderOnlyEmbedderTrainingArguments,
)
from transformers import TrainerCallback
from transformers.trainer_utils import load_sharded_checkpoint
from transformers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    PaddingStrategy,
)

from .checkpoints import CheckpointUploader
from .contract import TrainerConfig
from .model_loading import load_tokenizer_and_encoder
from .progress import ThrottledReporter, progress_from_log

logger = logging.getLogger(__name__)


class EmbedtuneEmbedderModel(BiEncoderOnlyEmbedderModel):
    # (queries, passages) of the first training score matrix
    first_scores_shape: tuple[int, int] | None = None

    def compute_score(self, q_reps, p_reps):
        scores = super().compute_score(q_reps, p_reps)
        if self.training and self.first_scores_shape is None:
            self.first_scores_shape = (scores.size(0), scores.size(1))
        return scores


class ProcessedCounter:
    """Queries and tokens the training steps processed since the last log, summed over ranks.

    Counting adds no GPU sync: queries and padded tokens come from tensor shapes, and the real
    (non-padding) tokens are summed on the device until a log reads them (where HF syncs
    anyway), with one small all-reduce."""

    def __init__(self, device: torch.device):
        self.device = device
        self._queries = self._padded_tokens = 0
        self._tokens = torch.zeros((), dtype=torch.int64, device=device)
        self._since: float | None = None  # from the first step on: setup time is no training time

    def count(self, inputs: dict) -> None:
        if self._since is None:
            self._since = time.monotonic()
        for side in ("queries", "passages"):
            # FlagEmbedding's collator hands over a list of sub-batches when sub_batch_size is set
            batches = inputs[side] if isinstance(inputs[side], list) else [inputs[side]]
            for mask in (batch["attention_mask"] for batch in batches):
                self._padded_tokens += mask.numel()
                self._tokens += mask.sum()
                if side == "queries":
                    self._queries += mask.shape[0]

    def take(self) -> dict[str, float]:
        """The counts since the last call, over every rank, and their rates (all ranks must
        call it together)."""
        counts = torch.tensor([self._queries, 0, self._padded_tokens], device=self.device)
        counts[1] += self._tokens
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        queries, tokens, padded_tokens = counts.tolist()
        self._queries = self._padded_tokens = 0
        self._tokens.zero_()
        now = time.monotonic()
        elapsed, self._since = now - (self._since or now), now
        taken = {"queries": queries, "tokens": tokens, "padded_tokens": padded_tokens}
        if elapsed > 0:
            taken |= {"samples_per_second": queries / elapsed, "tokens_per_second": tokens / elapsed}
        return taken


class EmbedtuneTrainer(EncoderOnlyEmbedderTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.processed = ProcessedCounter(self.args.device)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.processed.count(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log, on every rank (the final summary has train_loss instead)
            logs.update(self.processed.take())
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict=None):
        if not self.args.should_save:
            return
        if state_dict is None:
            super()._save(output_dir)
            return
        # DeepSpeed hands over the wrapper's gathered weights; FlagEmbedding's save ignores
        # them and saves the local (under ZeRO-3: empty) parameters instead.
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        encoder_state = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
        self.model.model.save_pretrained(output_dir, state_dict=encoder_state)
        self._save_processing_class(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        encoder = self.accelerator.unwrap_model(model if model is not None else self.model).model
        load_encoder_weights(encoder, Path(resume_from_checkpoint))
        logger.info("resumed encoder weights from %s", resume_from_checkpoint)


def load_encoder_weights(encoder: torch.nn.Module, checkpoint: Path) -> None:
    """Load a checkpoint written by `save_pretrained` into `encoder`; every key must match."""
    if (checkpoint / SAFE_WEIGHTS_INDEX_NAME).exists() or (checkpoint / WEIGHTS_INDEX_NAME).exists():
        load_sharded_checkpoint(encoder, checkpoint, strict=True)
        return
    if (checkpoint / SAFE_WEIGHTS_NAME).exists():
        state = safetensors.torch.load_file(checkpoint / SAFE_WEIGHTS_NAME, device="cpu")
    elif (checkpoint / WEIGHTS_NAME).exists():
        state = torch.load(checkpoint / WEIGHTS_NAME, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{checkpoint}: no model weights to resume from")
    result = encoder.load_state_dict(state, strict=False)
    tied = set(getattr(encoder, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{checkpoint}: weights do not fit the model (missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )


class EmbedtuneRunner(EncoderOnlyEmbedderRunner):
    def __init__(self, model_args, data_args, training_args, *, callbacks: list[TrainerCallback]):
        self.callbacks = callbacks
        super().__init__(model_args=model_args, data_args=data_args, training_args=training_args)

    def load_tokenizer_and_model(self):
        tokenizer, encoder = load_tokenizer_and_encoder(
            self.model_args.model_name_or_path, trust_remote_code=self.model_args.trust_remote_code
        )
        args = self.training_args
        model = EmbedtuneEmbedderModel(
            encoder,
            tokenizer=tokenizer,
            negatives_cross_device=args.negatives_cross_device,
            temperature=args.temperature,
            sub_batch_size=args.sub_batch_size,
            kd_loss_type=args.kd_loss_type,
            use_mrl=args.use_mrl,
            mrl_dims=args.mrl_dims,
            sentence_pooling_method=args.sentence_pooling_method,
            normalize_embeddings=args.normalize_embeddings,
        )
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        return tokenizer, model

    def load_data_collator(self):
        collator = super().load_data_collator()
        # FlagEmbedding's `padding=True`, by its name: the tokenizer then does not warn on every
        # batch that max_length is ignored (the texts are already truncated to it)
        collator.padding = PaddingStrategy.LONGEST
        return collator

    def load_trainer(self) -> EmbedtuneTrainer:
        args, records = self.training_args, len(self.train_dataset)
        if args.should_log and samples_per_step(args) > records:
            logger.warning(
                "training.batchSizePerDevice %d: a step would take %d queries (%d process(es), %d accumulation "
                "step(s)) but the training data has %d records, so every step trains on all of them, in a smaller "
                "batch than configured",
                args.per_device_train_batch_size,
                samples_per_step(args),
                args.world_size,
                args.gradient_accumulation_steps,
                records,
            )
        return EmbedtuneTrainer(
            model=self.model,
            args=self.training_args,
            train_dataset=self.train_dataset,
            data_collator=self.data_collator,
            processing_class=self.tokenizer,
            callbacks=self.callbacks,
        )


def deepspeed_config(config: TrainerConfig) -> dict | None:
    """A DeepSpeed config from `zeroStage`; HF's integration fills the "auto" values from
    the training arguments, so batch sizes and precision stay in one place."""
    spec = config.training.deepspeed
    if spec is None:
        return None
    if spec.config is not None:
        return spec.config
    return {
        "zero_optimization": {
            "stage": spec.zero_stage,
            "overlap_comm": True,
            "contiguous_gradients": True,
            # the final model must be gathered whole to be exported
            **({"stage3_gather_16bit_weights_on_model_save": True} if spec.zero_stage == 3 else {}),
        },
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        # no optimizer/scheduler sections: the Trainer's own (torch AdamW, linear warmup) are
        # wrapped by DeepSpeed, so they match the non-DeepSpeed path and need no compiled ops
    }


def build_model_and_data_arguments(config: TrainerConfig, model_path: str, train_file: Path):
    """FlagEmbedding's model and data arguments; the data must exist (they check)."""
    t, m = config.training, config.model
    model_args = EncoderOnlyEmbedderModelArguments(model_name_or_path=model_path, trust_remote_code=m.trust_remote_code)
    data_args = EncoderOnlyEmbedderDataArguments(
        train_data=[str(train_file)],
        train_group_size=t.group_size,
        query_max_len=m.query_max_length,
        passage_max_len=m.passage_max_length,
        query_instruction_for_retrieval=m.query_instruction,
        passage_instruction_for_retrieval=m.passage_instruction,
    )
    return model_args, data_args


def build_training_arguments(config: TrainerConfig, output_dir: Path) -> EncoderOnlyEmbedderTrainingArguments:
    """FlagEmbedding's training arguments; creating them joins the process group."""
    t, m = config.training, config.model
    on_cpu = not torch.cuda.is_available()
    precision = t.precision
    if on_cpu and precision != "fp32":
        logger.warning("training.precision %s: no GPU here, training in fp32", precision)
        precision = "fp32"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return EncoderOnlyEmbedderTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        per_device_train_batch_size=t.batch_size_per_device,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        temperature=t.temperature,
        # FlagEmbedding refuses cross-device negatives without a process group
        negatives_cross_device=t.negatives_cross_device and world_size > 1,
        sentence_pooling_method=m.flagembedding_pooling,
        normalize_embeddings=m.normalize,
        use_mrl=bool(t.matryoshka_dims),
        mrl_dims=list(t.matryoshka_dims),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # on CPU, HF only sets up a gloo process group with use_cpu; without it every rank
        # trains alone and the cross-device gather silently sees one rank
        use_cpu=on_cpu,
        activation_checkpointing=t.gradient_checkpointing,  # the name transformers asks for
        deepspeed=deepspeed_config(config),
        seed=t.seed,
        logging_steps=t.logging_steps,
        # a NaN/inf loss must reach the log, where DivergenceGuard stops training; HF's filter
        # would log an average instead (a diverged run reported a loss of 0.0)
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=config.checkpoint.every_steps,
        save_total_limit=config.checkpoint.keep,
        # TensorBoard is always written (tracking.tensorboard_callback, into the run's storage)
        report_to=list(t.trackers) or "none",
        dataloader_num_workers=0,
        log_level="info",
        log_level_replica="warning",
    )


def samples_per_step(args) -> int:
    """Queries an optimizer step takes over all ranks, as configured (fewer when the data runs out)."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


class ProgressCallback(TrainerCallback):
    """Rank 0 turns Trainer logs into progress reports."""

    def __init__(self, reporter: ThrottledReporter, model: EmbedtuneEmbedderModel):
        self.reporter = reporter
        self.model = model
        self._started: tuple[float, int] | None = None
        self._queries = 0  # processed by this attempt, over all ranks
        self._announced = False

    def on_train_begin(self, args, state, control, **kwargs):
        # global_step is already the resumed step here, so rates count this attempt only
        self._started = (time.monotonic(), state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if not self._announced and self.model.first_scores_shape is not None and state.is_world_process_zero:
            self._announced = True
            queries, passages = self.model.first_scores_shape
            logger.info(
                "negatives: world size %d, each of %d queries scored against %d passages (cross-device %s)",
                args.world_size,
                queries,
                passages,
                "on" if self.model.negatives_cross_device else "off",
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs or self._started is None:
            return
        started_at, started_step = self._started
        self._queries += logs["queries"]
        self.reporter.training_progress(
            progress_from_log(
                state.global_step,
                state.max_steps,
                state.epoch or 0.0,
                logs,
                steps_done=state.global_step - started_step,
                elapsed=time.monotonic() - started_at,
                samples_done=self._queries,
            )
        )

    def on_train_end(self, args, state, control, **kwargs):
        self.reporter.flush()


class CheckpointCallback(TrainerCallback):
    """After each save, the first process of every node hands its node's files to the
    uploader; training goes on while they upload."""

    def __init__(self, uploader: CheckpointUploader | None):
        self.uploader = uploader

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank of this node has finished writing its files
        if self.uploader is not None:
            self.uploader.submit(state.global_step, Path(args.output_dir) / f"checkpoint-{state.global_step}")


class StopOnSignal(TrainerCallback):
    """SIGINT (Ctrl-C) or SIGTERM (preemption, a pod being deleted) ends training at the next
    step with a checkpoint there, so no finished step is lost and the next run resumes.

    Every rank must stop at the same step, and signals reach ranks at slightly different
    times: the ranks agree on "stop now" with one tiny all-reduce per step."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous_handlers: dict[int, object] = {}

    def _request_stop(self, signum, frame) -> None:
        if self.signal_name is None:
            logger.warning(
                "%s received: saving a checkpoint at the end of this step, then stopping", signal.Signals(signum).name
            )
        self.signal_name = signal.Signals(signum).name

    def on_train_begin(self, args, state, control, **kwargs):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[signum] = signal.signal(signum, self._request_stop)

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.signal_name is not None
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([int(requested)], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
            if requested and self.signal_name is None:
                self.signal_name = "SIGTERM"  # another rank was signalled; this one stops with it
        if requested and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()
