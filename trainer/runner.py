"""FlagEmbedding's fine-tuning, extended the way FlagEmbedding intends: by subclassing its
concrete runners, models and trainers, and adding Trainer callbacks. The encoder-only (dense)
family is here, with the mixins every family shares (bge-m3 in m3.py, decoder-only in decoder.py).

What the subclasses change, and why:
- the model records the shape of its first score matrix, so the log states how many
  passages each query was scored against (proof that cross-device negatives are on);
- the model masks false negatives (false_negatives.py): the dataset and collator add text
  hashes to the batch, and the scores of passages equal to a query's own positives are
  masked before FlagEmbedding's loss;
- with GradCache (training.gradCache) the model encodes the batch in checkpointed
  mini-batches, so a batch larger than memory trains with the same loss and gradients;
- the dataset picks each record's passages from a stream of its own (batches.py);
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

import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
from FlagEmbedding.abc.finetune.embedder import (
    AbsEmbedderSameDatasetTrainDataset,
    EmbedderTrainerCallbackForDataRefresh,
)
from FlagEmbedding.finetune.embedder.encoder_only.base import (
    BiEncoderOnlyEmbedderModel,
    EncoderOnlyEmbedderDataArguments,
    EncoderOnlyEmbedderModelArguments,
    EncoderOnlyEmbedderRunner,
    EncoderOnlyEmbedderTrainer,
    EncoderOnlyEmbedderTrainingArguments,
)
from torch.utils.checkpoint import checkpoint
from transformers import TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import load_sharded_checkpoint
from transformers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    PaddingStrategy,
)

from .batches import PREFETCH_BATCHES, EpochOfPicks, SeededPickDataset, dataloader_workers
from .checkpoints import CheckpointUploader
from .config import LoraSpec
from .contract import TrainerConfig
from .false_negatives import (
    PassageHashingCollator,
    PassageHashingSameDatasetCollator,
    PositiveHashingDataset,
    PositiveHashingSameDatasetTrainDataset,
    false_negatives,
    gather_hashes,
)
from .lora import add_lora, is_adapter_checkpoint, load_adapter_weights
from .model_loading import load_tokenizer_and_encoder
from .padding_free import PackingCollator, PaddingFreeEncoding, enable_padding_free, is_packed
from .progress import Processed, ThrottledReporter, progress_from_log

logger = logging.getLogger(__name__)


def several_processes() -> bool:
    """Whether collectives have anyone to talk to. A single process under torchrun has a process
    group too, but a collective there only costs: the first one sets up NCCL's communicator (a
    one-time cost at start), and each one that reads a result synchronizes with the GPU."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ScoreShapeMixin:
    """Records the shape of the first training score matrix, so the log states how many
    passages each query was scored against (proof that cross-device negatives are on)."""

    # (queries, passages) of the first training score matrix
    first_scores_shape: tuple[int, int] | None = None

    def compute_score(self, q_reps, p_reps, *args, **kwargs):
        return self.record_scores_shape(super().compute_score(q_reps, p_reps, *args, **kwargs))

    def record_scores_shape(self, scores: torch.Tensor) -> torch.Tensor:
        if self.training and self.first_scores_shape is None:
            self.first_scores_shape = (scores.size(0), scores.size(1))
        return scores


@dataclass
class EmbedtuneDataArguments(EncoderOnlyEmbedderDataArguments):
    mask_false_negatives: bool = field(
        default=True, metadata={"help": "Mask the scores of passages equal to one of the query's positives."}
    )


@dataclass
class GradCacheArguments:
    """The training argument every family's model reads for GradCache (GradCacheEncoding)."""

    grad_cache_queries: int = field(
        default=0, metadata={"help": "Queries per GradCache mini-batch; 0 encodes the whole batch at once."}
    )


@dataclass
class EmbedtuneTrainingArguments(GradCacheArguments, EncoderOnlyEmbedderTrainingArguments):
    """The encoder (and decoder) families' training arguments."""


class FalseNegativeMasking:
    """Masks false negatives (false_negatives.py) in a FlagEmbedding bi-encoder: a passage whose
    text equals one of a query's positives scores the lowest value for that query. The batch's
    hashes give one mask for the local score matrix and, with cross-device negatives, one for the
    gathered one; each score matrix takes the mask of its shape (bge-m3 scores dense across
    devices, sparse and ColBERT within the batch)."""

    # the step's masks, by the shape of the score matrix they fit
    _false_negatives: dict[tuple[int, int], torch.Tensor] = {}

    def forward(
        self,
        queries=None,
        passages=None,
        teacher_scores=None,
        no_in_batch_neg_flag: bool = False,
        passage_hashes: torch.Tensor | None = None,
        positive_hashes: torch.Tensor | None = None,
    ):
        masks = {}
        if self.training and passage_hashes is not None:
            local = false_negatives(passage_hashes, positive_hashes)
            masks[tuple(local.shape)] = local
            if self.negatives_cross_device and not no_in_batch_neg_flag:
                gathered = false_negatives(*gather_hashes(passage_hashes, positive_hashes))
                masks[tuple(gathered.shape)] = gathered
        self._false_negatives = masks
        try:
            return super().forward(queries, passages, teacher_scores, no_in_batch_neg_flag)
        finally:
            self._false_negatives = {}

    def mask_false_negatives(self, scores: torch.Tensor) -> torch.Tensor:
        mask = self._false_negatives.get(tuple(scores.shape))
        return scores if mask is None else scores.masked_fill(mask, torch.finfo(scores.dtype).min)

    def compute_score(self, q_reps, p_reps, *args, **kwargs):
        return self.mask_false_negatives(super().compute_score(q_reps, p_reps, *args, **kwargs))


class GradCacheEncoding:
    """GradCache for a FlagEmbedding bi-encoder: with `grad_cache_queries` set, a training batch
    is encoded in mini-batches of that many queries (and their passages), each under
    (non-reentrant) activation checkpointing. The forward keeps only each mini-batch's
    embeddings; the backward, after the loss over the whole batch, encodes each mini-batch again
    (RNG state restored, so dropout matches) with its embeddings' gradients, one at a time."""

    # queries per mini-batch (0: off), and the queries of the step being encoded
    grad_cache_queries: int = 0
    _batch_queries: int = 0

    def forward(self, queries=None, *args, **kwargs):
        if self.grad_cache_queries and isinstance(queries, Mapping):  # a list when FlagEmbedding made sub-batches
            self._batch_queries = queries["attention_mask"].size(0)
        return super().forward(queries, *args, **kwargs)

    def encode(self, features):
        if not (
            self.grad_cache_queries and self.training and torch.is_grad_enabled() and isinstance(features, Mapping)
        ):
            return super().encode(features)
        rows = features["attention_mask"].size(0)
        step = self.grad_cache_queries * (rows // self._batch_queries)  # passages: groupSize rows per query
        encode_all = super().encode
        chunks = [
            checkpoint(
                encode_all, {key: value[start : start + step] for key, value in features.items()}, use_reentrant=False
            )
            for start in range(0, rows, step)
        ]
        return concatenate_embeddings(chunks)


def concatenate_embeddings(chunks: list):
    """The embeddings of consecutive mini-batches as one batch's: a tensor, a list per Matryoshka
    dimension, or bge-m3's (dense, sparse, ColBERT) tuple, whose parts may be None."""
    if isinstance(chunks[0], torch.Tensor):
        return torch.cat(chunks)
    parts = [None if part[0] is None else torch.cat(part) for part in zip(*chunks)]
    return tuple(parts) if isinstance(chunks[0], tuple) else parts


class EmbedtuneEmbedderModel(
    ScoreShapeMixin, GradCacheEncoding, FalseNegativeMasking, PaddingFreeEncoding, BiEncoderOnlyEmbedderModel
):
    """FlagEmbedding's dense bi-encoder: logs its score shape, encodes in GradCache mini-batches
    when asked, masks false negatives, and runs padding-free (packed features)."""


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
            for batch in batches:
                if is_packed(batch):  # every slot is a real token
                    slots, sequences = batch["input_ids"].numel(), len(batch["cu_seq_lens_q"]) - 1
                    self._tokens += slots
                else:
                    slots, sequences = batch["attention_mask"].numel(), batch["attention_mask"].shape[0]
                    self._tokens += batch["attention_mask"].sum()
                self._padded_tokens += slots
                if side == "queries":
                    self._queries += sequences

    def take(self) -> dict[str, float]:
        """The counts since the last call, over every rank, and their rates (all ranks must
        call it together)."""
        counts = torch.tensor([self._queries, 0, self._padded_tokens], device=self.device)
        counts[1] += self._tokens
        if several_processes():
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


class EmbedtuneTrainerMixin:
    """What every runner family's trainer adds to FlagEmbedding's: counting, saving on the
    right process, resuming into the inner encoder."""

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

    def train(self, resume_from_checkpoint: str | None = None, *args, **kwargs):
        if isinstance(resume_from_checkpoint, str | os.PathLike):  # train.py names the checkpoint
            self.resume_progress(Path(resume_from_checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def resume_progress(self, checkpoint: Path) -> None:
        """What HF's resume does not restore, here because it must be restored with and without
        DeepSpeed: under DeepSpeed HF loads the weights into the engine and never calls
        `_load_from_checkpoint`. FlagEmbedding's same-dataset batches resume at the checkpoint's."""
        if isinstance(self.train_dataset, AbsEmbedderSameDatasetTrainDataset):
            resume_batches(self.train_dataset, checkpoint, self.args)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        encoder = self.accelerator.unwrap_model(model if model is not None else self.model).model
        load_encoder_weights(encoder, Path(resume_from_checkpoint))
        logger.info("resumed encoder weights from %s", resume_from_checkpoint)


class EmbedtuneTrainer(EmbedtuneTrainerMixin, EncoderOnlyEmbedderTrainer):
    """FlagEmbedding's encoder-only trainer with embedtune's saving, resuming and counting."""


def resume_batches(dataset: AbsEmbedderSameDatasetTrainDataset, checkpoint: Path, args) -> None:
    """FlagEmbedding's same-dataset batches are drawn per epoch and served by a counter that
    HF's resume does not advance (it skips batches without fetching them): draw the epochs
    already trained and move the counter to the checkpoint's batch, as HF counts them."""
    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    batches = len(dataset.batch_datas)  # per rank and epoch
    updates_per_epoch = max(-(-batches // args.gradient_accumulation_steps), 1)  # the last may be short
    for _ in range(step // updates_per_epoch):
        dataset.refresh_epoch()
    dataset.step = (step % updates_per_epoch) * args.gradient_accumulation_steps


def load_encoder_weights(encoder: torch.nn.Module, checkpoint: Path) -> None:
    """Load a checkpoint written by `save_pretrained` into `encoder`; every key must match.
    A LoRA checkpoint holds only the adapters."""
    if is_adapter_checkpoint(checkpoint):
        load_adapter_weights(encoder, checkpoint)
        return
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


class EmbedtuneRunnerMixin:
    """What every family's runner adds: our callbacks, and the family's trainer class."""

    trainer_class: type

    def __init__(
        self,
        model_args,
        data_args,
        training_args,
        *,
        callbacks: list[TrainerCallback],
        lora: LoraSpec | None = None,
        padding_free: bool = False,
    ):
        self.callbacks = callbacks
        self.lora = lora
        self.padding_free = padding_free  # where the family supports it (the encoder family)
        self.packing = None  # set when the model runs padding-free
        super().__init__(model_args=model_args, data_args=data_args, training_args=training_args)

    @property
    def masks_false_negatives(self) -> bool:
        return self.data_args.mask_false_negatives

    def load_train_dataset(self):
        """The families' datasets: seeded picks (batches.py), hashing positives where false
        negatives are masked; FlagEmbedding's same-dataset batches with data.sameDatasetWithinBatch."""
        if self.data_args.same_dataset_within_batch:
            if not self.masks_false_negatives:
                return super().load_train_dataset()
            dataset = PositiveHashingSameDatasetTrainDataset(
                args=self.data_args,
                default_batch_size=self.training_args.per_device_train_batch_size,
                seed=self.training_args.seed,
                tokenizer=self.tokenizer,
                process_index=self.training_args.process_index,
                num_processes=self.training_args.world_size,
            )
            # what FlagEmbedding's runner sets for these batches: the dataset serves whole batches, in order
            self.training_args.per_device_train_batch_size = 1
            self.training_args.dataloader_num_workers = 0
            return dataset
        dataset_class = PositiveHashingDataset if self.masks_false_negatives else SeededPickDataset
        return dataset_class(seed=self.training_args.seed, args=self.data_args, tokenizer=self.tokenizer)

    def load_data_collator(self):
        collator = super().load_data_collator()
        # FlagEmbedding's `padding=True`, by its name: the tokenizer then does not warn on every
        # batch that max_length is ignored (the texts are already truncated to it)
        collator.padding = PaddingStrategy.LONGEST
        if not self.masks_false_negatives:
            return collator
        hashing = (
            PassageHashingSameDatasetCollator if self.data_args.same_dataset_within_batch else PassageHashingCollator
        )
        return hashing(**{f.name: getattr(collator, f.name) for f in dataclasses.fields(collator)})

    def load_trainer(self):
        args, records = self.training_args, len(self.train_dataset)
        seeded = isinstance(self.train_dataset, SeededPickDataset)
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
        trainer = self.trainer_class(
            model=self.model,
            args=self.training_args,
            train_dataset=self.train_dataset,
            data_collator=self.data_collator,
            processing_class=self.tokenizer,
            # each epoch picks other negatives (batches.py); same-dataset batches are drawn per epoch instead
            callbacks=[*self.callbacks, *([EpochOfPicks(self.train_dataset)] if seeded else [])],
        )
        if self.data_args.same_dataset_within_batch:  # each epoch draws new batches
            trainer.add_callback(EmbedderTrainerCallbackForDataRefresh(self.train_dataset))
        return trainer


class EmbedtuneRunner(EmbedtuneRunnerMixin, EncoderOnlyEmbedderRunner):
    """FlagEmbedding's encoder-only runner: the model loads as an input error if it cannot."""

    trainer_class = EmbedtuneTrainer

    def load_tokenizer_and_model(self):
        tokenizer, model = load_embedder(self, EmbedtuneEmbedderModel, decoder=False)
        args = self.training_args
        if self.padding_free:
            if (args.sub_batch_size or 0) > 0 or args.grad_cache_queries:
                # both split the padded batch by rows; a packed batch has none
                logger.info("padding-free: off with sub-batches or GradCache; training with padding")
            else:
                self.packing = enable_padding_free(model.model)
        return tokenizer, model

    def load_data_collator(self):
        collator = super().load_data_collator()
        # packing last: it packs the padded batch and passes the hashes on
        return collator if self.packing is None else PackingCollator(collator, self.packing)


def load_embedder(runner: EmbedtuneRunnerMixin, model_class: type, *, decoder: bool):
    """The tokenizer and FlagEmbedding's bi-encoder of `model_class` over the runner's base
    model (an input error if it cannot be loaded), with LoRA adapters where configured."""
    if is_deepspeed_zero3_enabled():
        join_deepspeed_comm()
    tokenizer, encoder = load_tokenizer_and_encoder(
        runner.model_args.model_name_or_path, trust_remote_code=runner.model_args.trust_remote_code, decoder=decoder
    )
    if runner.lora is not None:
        encoder = add_lora(encoder, runner.lora, decoder=decoder)
    args = runner.training_args
    model = model_class(
        encoder, tokenizer=tokenizer, use_mrl=args.use_mrl, mrl_dims=args.mrl_dims, **bi_encoder_arguments(args)
    )
    model.grad_cache_queries = args.grad_cache_queries
    if args.gradient_checkpointing:
        model.enable_input_require_grads()
    return tokenizer, model


def bi_encoder_arguments(args) -> dict:
    """What every FlagEmbedding bi-encoder model is built with, from its training arguments."""
    return {
        "negatives_cross_device": args.negatives_cross_device,
        "temperature": args.temperature,
        "sub_batch_size": args.sub_batch_size,
        "kd_loss_type": args.kd_loss_type,
        "sentence_pooling_method": args.sentence_pooling_method,
        "normalize_embeddings": args.normalize_embeddings,
    }


def join_deepspeed_comm() -> None:
    """ZeRO-3 partitions the weights while they load (deepspeed.zero.Init), over DeepSpeed's own
    comm layer. On CPU nothing has initialized it yet (accelerate joins gloo through torch only),
    and zero.Init then sees a world of 1 process and refuses the batch size: join it to the
    process group torch already has."""
    import deepspeed.comm

    if dist.is_available() and dist.is_initialized() and not deepspeed.comm.is_initialized():
        deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


def runner_family(config: TrainerConfig) -> str:
    """Which FlagEmbedding runner trains this config: "decoder" (model.family, resolved from the
    model's config), "m3" (dense + sparse + ColBERT) or "encoder" (dense)."""
    if config.model.family == "decoder":
        return "decoder"
    return "m3" if config.model.unified else "encoder"


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


def build_model_and_data_arguments(
    config: TrainerConfig,
    model_path: str,
    train_file: Path,
    arguments_class: type[EncoderOnlyEmbedderModelArguments] = EncoderOnlyEmbedderModelArguments,
    **family_arguments,
):
    """FlagEmbedding's model arguments (`arguments_class`, with a runner family's own
    `family_arguments`) and data arguments; the data must exist (they check)."""
    t, m = config.training, config.model
    model_args = arguments_class(
        model_name_or_path=model_path, trust_remote_code=m.trust_remote_code, **family_arguments
    )
    same_dataset = config.data.same_dataset_within_batch
    data_args = EmbedtuneDataArguments(
        train_data=[str(train_file)],
        train_group_size=t.group_size,
        query_max_len=m.query_max_length,
        passage_max_len=m.passage_max_length,
        # FlagEmbedding's same-dataset batches prefix queries with the instruction unchecked: "None" for none
        query_instruction_for_retrieval=(m.query_instruction or "") if same_dataset else m.query_instruction,
        passage_instruction_for_retrieval=m.passage_instruction,
        knowledge_distillation=t.distills,
        mask_false_negatives=t.mask_false_negatives,
        same_dataset_within_batch=same_dataset,
    )
    return model_args, data_args


def build_training_arguments(
    config: TrainerConfig,
    output_dir: Path,
    arguments_class: type[EncoderOnlyEmbedderTrainingArguments] = EmbedtuneTrainingArguments,
    **family_arguments,
) -> EncoderOnlyEmbedderTrainingArguments:
    """FlagEmbedding's training arguments (`arguments_class`, with a runner family's own
    `family_arguments`); creating them joins the process group."""
    t, m = config.training, config.model
    on_cpu = not torch.cuda.is_available()
    precision = t.precision
    if on_cpu and precision != "fp32":
        logger.warning("training.precision %s: no GPU here, training in fp32", precision)
        precision = "fp32"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    workers = dataloader_workers(t.dataloader_workers, on_gpu=not on_cpu)
    return arguments_class(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        per_device_train_batch_size=t.batch_size_per_device,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        temperature=t.temperature,
        grad_cache_queries=t.grad_cache.mini_batch_size if t.grad_cache else 0,
        # FlagEmbedding's default is kl_div; a runner family may set its own in family_arguments
        **({"kd_loss_type": t.distillation.flagembedding_loss} if t.distills and t.distillation.loss_type else {}),
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
        torch_compile=t.compile,
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
        dataloader_num_workers=workers,
        dataloader_prefetch_factor=PREFETCH_BATCHES if workers else None,
        # pinned host memory lets the copy to the GPU run beside the step
        dataloader_pin_memory=not on_cpu,
        log_level="info",
        log_level_replica="warning",
        **family_arguments,
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
        self._processed = Processed()  # by this attempt, over all ranks
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
        self._processed.add(logs)
        self.reporter.training_progress(
            progress_from_log(
                state.global_step,
                state.max_steps,
                state.epoch or 0.0,
                logs,
                steps_done=state.global_step - started_step,
                elapsed=time.monotonic() - started_at,
                processed=self._processed,
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
        if several_processes():
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
        if several_processes():
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


def padding_free_wanted(training) -> bool:
    """training.paddingFree; unset, on where a GPU trains (docs/benchmarks.md has the CPU numbers)."""
    return training.padding_free if training.padding_free is not None else torch.cuda.is_available()
