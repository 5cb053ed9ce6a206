"""Decoder-only LLM embedders (Qwen3-Embedding, e5-mistral, bge-en-icl ...) through
FlagEmbedding's `decoder_only.base` runner, with embedtune's saving, resuming, counting and
callbacks (the mixins of runner.py).

The model's tokenizer is prepared for last-token pooling (EOS appended, left padding:
model_loading.prepare_decoder_tokenizer); LoRA adapters (model.lora) are added as for
encoders, so checkpoints hold only them."""

from __future__ import annotations

from pathlib import Path

from FlagEmbedding.finetune.embedder.decoder_only.base import (
    BiDecoderOnlyEmbedderModel,
    DecoderOnlyEmbedderModelArguments,
    DecoderOnlyEmbedderRunner,
    DecoderOnlyEmbedderTrainer,
)

from .contract import TrainerConfig
from .lora import DECODER_TARGETS
from .runner import (
    EmbedtuneRunnerMixin,
    EmbedtuneTrainerMixin,
    FalseNegativeMasking,
    GradCacheEncoding,
    ScoreShapeMixin,
    build_model_and_data_arguments,
    load_embedder,
)


class EmbedtuneDecoderModel(ScoreShapeMixin, GradCacheEncoding, FalseNegativeMasking, BiDecoderOnlyEmbedderModel):
    """FlagEmbedding's decoder-only bi-encoder, recording its first score matrix's shape,
    encoding in GradCache mini-batches when asked and masking false negatives."""


class EmbedtuneDecoderTrainer(EmbedtuneTrainerMixin, DecoderOnlyEmbedderTrainer):
    """FlagEmbedding's decoder-only trainer with embedtune's saving, resuming and counting."""


class EmbedtuneDecoderRunner(EmbedtuneRunnerMixin, DecoderOnlyEmbedderRunner):
    """FlagEmbedding's decoder-only runner; the model loads as for encoders, as a decoder."""

    trainer_class = EmbedtuneDecoderTrainer

    def load_tokenizer_and_model(self):
        return load_embedder(self, EmbedtuneDecoderModel, decoder=True)


def build_decoder_model_and_data_arguments(config: TrainerConfig, model_path: str, train_file: Path):
    """FlagEmbedding's decoder model arguments, LoRA settings included (they describe the run;
    the adapters themselves are added by load_embedder), and the data arguments as for encoders."""
    _, data_args = build_model_and_data_arguments(config, model_path, train_file)
    m = config.model
    lora = m.lora
    model_args = DecoderOnlyEmbedderModelArguments(
        model_name_or_path=model_path,
        trust_remote_code=m.trust_remote_code,
        use_lora=lora is not None,
        **(
            {
                "lora_rank": lora.rank,
                "lora_alpha": lora.alpha,
                "lora_dropout": lora.dropout,
                "target_modules": lora.target_modules or DECODER_TARGETS,
            }
            if lora
            else {}
        ),
    )
    return model_args, data_args
