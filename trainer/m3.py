"""bge-m3's unified fine-tuning (FlagEmbedding's `encoder_only.m3` runner): the dense vector,
the sparse token weights and the ColBERT token vectors are trained together, each
contrastively, plus their weighted sum, with self-distillation from the sum into each.

Built from runner.py's mixins like the dense family (GradCache, masked false negatives in each
score matrix); what M3 adds:
- the heads (colbert_linear.pt, sparse_linear.pt) are saved with every checkpoint, also
  under DeepSpeed (whose gathered state FlagEmbedding's save ignores), and resumed exactly;
- the model's micro-batch counter, which decides when self-distillation starts, resumes at the
  checkpoint's step instead of 0 (FlagEmbedding's restarts it, so a resumed run trains
  differently), with and without DeepSpeed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from FlagEmbedding.finetune.embedder.encoder_only.m3 import (
    EncoderOnlyEmbedderM3Model,
    EncoderOnlyEmbedderM3ModelArguments,
    EncoderOnlyEmbedderM3Runner,
    EncoderOnlyEmbedderM3Trainer,
    EncoderOnlyEmbedderM3TrainingArguments,
)
from transformers.integrations import is_deepspeed_zero3_enabled

from .config import UnifiedFinetuningSpec
from .contract import TrainerConfig
from .model_loading import load_tokenizer, loading_model
from .runner import (
    EmbedtuneRunnerMixin,
    EmbedtuneTrainerMixin,
    FalseNegativeMasking,
    GradCacheArguments,
    GradCacheEncoding,
    ScoreShapeMixin,
    bi_encoder_arguments,
    build_model_and_data_arguments,
    build_training_arguments,
    join_deepspeed_comm,
)

logger = logging.getLogger(__name__)

# The heads FlagEmbedding's M3 model saves next to the encoder, by attribute name; the files
# are what BGEM3FlagModel loads.
HEAD_FILES = {"colbert_linear": "colbert_linear.pt", "sparse_linear": "sparse_linear.pt"}


class EmbedtuneM3Model(ScoreShapeMixin, GradCacheEncoding, FalseNegativeMasking, EncoderOnlyEmbedderM3Model):
    """FlagEmbedding's M3 model, logging the shape of its dense (cross-device) score matrix,
    encoding in GradCache mini-batches when asked and masking false negatives in each of its
    score matrices: dense, sparse and ColBERT, so also in their weighted sum (-inf there, which
    the cross-entropy and the self-distillation's softmax take as a left-out passage)."""

    def compute_dense_score(self, q_reps, p_reps):
        return self.record_scores_shape(self.mask_false_negatives(super().compute_dense_score(q_reps, p_reps)))

    def compute_sparse_score(self, q_reps, p_reps):
        return self.mask_false_negatives(super().compute_sparse_score(q_reps, p_reps))

    def compute_colbert_score(self, q_reps, p_reps, q_mask: torch.Tensor | None = None):
        return self.mask_false_negatives(super().compute_colbert_score(q_reps, p_reps, q_mask=q_mask))


@dataclass
class EmbedtuneM3TrainingArguments(GradCacheArguments, EncoderOnlyEmbedderM3TrainingArguments):
    """FlagEmbedding's M3 training arguments, and GradCache's."""


class EmbedtuneM3Trainer(EmbedtuneTrainerMixin, EncoderOnlyEmbedderM3Trainer):
    """FlagEmbedding's M3 trainer with embedtune's saving, resuming and counting, heads included."""

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        if state_dict is not None and self.args.should_save:  # DeepSpeed's gathered weights: the heads too
            for name, file in HEAD_FILES.items():
                head = {k.removeprefix(f"{name}."): v for k, v in state_dict.items() if k.startswith(f"{name}.")}
                torch.save(head, os.path.join(output_dir or self.args.output_dir, file))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        m3 = self.accelerator.unwrap_model(model if model is not None else self.model)
        checkpoint = Path(resume_from_checkpoint)
        for name, file in HEAD_FILES.items():
            state = torch.load(checkpoint / file, map_location="cpu", weights_only=True)
            getattr(m3, name).load_state_dict(state, strict=True)

    def resume_progress(self, checkpoint: Path) -> None:
        super().resume_progress(checkpoint)
        # HF replays no forward pass for the skipped batches: the counter must jump to the step
        step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
        self.accelerator.unwrap_model(self.model).step = step * self.args.gradient_accumulation_steps


class EmbedtuneM3Runner(EmbedtuneRunnerMixin, EncoderOnlyEmbedderM3Runner):
    """FlagEmbedding's M3 runner; a base model that cannot be loaded is an input error."""

    trainer_class = EmbedtuneM3Trainer

    def load_tokenizer_and_model(self):
        path, args = self.model_args.model_name_or_path, self.training_args
        trust_remote_code = self.model_args.trust_remote_code
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        if is_deepspeed_zero3_enabled():
            join_deepspeed_comm()
        with loading_model(path, "model.base"):
            parts = self.get_model(path, trust_remote_code, self.model_args.colbert_dim)
        model = EmbedtuneM3Model(
            parts,
            tokenizer=tokenizer,
            **bi_encoder_arguments(args),
            unified_finetuning=args.unified_finetuning,
            use_self_distill=args.use_self_distill,
            self_distill_start_step=args.self_distill_start_step,
        )
        model.grad_cache_queries = args.grad_cache_queries
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        if args.fix_encoder:
            model.model.requires_grad_(False)
        return tokenizer, model


def build_m3_model_and_data_arguments(config: TrainerConfig, model_path: str, train_file: Path):
    return build_model_and_data_arguments(
        config,
        model_path,
        train_file,
        EncoderOnlyEmbedderM3ModelArguments,
        colbert_dim=config.model.colbert_dim or -1,
    )


def build_m3_training_arguments(config: TrainerConfig, output_dir: Path) -> EmbedtuneM3TrainingArguments:
    unified = config.training.unified or UnifiedFinetuningSpec()
    return build_training_arguments(
        config,
        output_dir,
        EmbedtuneM3TrainingArguments,
        unified_finetuning=True,
        use_self_distill=unified.self_distill,
        self_distill_start_step=unified.self_distill_start_step,
        fix_encoder=unified.freeze_encoder,
        # the loss FlagEmbedding's M3 recipe distills teacher scores with, unless training.distillation names one
        **(
            {}
            if config.training.distills and config.training.distillation.loss_type
            else {"kd_loss_type": "m3_kd_loss"}
        ),
    )
