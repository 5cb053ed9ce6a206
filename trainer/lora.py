"""LoRA adapters on an encoder or decoder, with peft (what FlagEmbedding's decoder runner uses).

Only the adapters train: checkpoints hold them and their optimizer state, a few MB; the export
merges them into the base weights (and keeps them beside the merged model)."""

from __future__ import annotations

from pathlib import Path

from .config import LoraSpec
from .errors import InputError

# peft's adapter files in a checkpoint (save_pretrained of a PeftModel)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The adapter alone, beside the merged model, for those who serve base + adapter.
ADAPTER_DIR = "adapter"

# FlagEmbedding's decoder defaults (decoder_only.base.arguments.default_target_modules);
# BERT's attention and MLP projections
DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENCODER_TARGETS = ["query", "key", "value", "dense"]


def add_lora(encoder, spec: LoraSpec, *, decoder: bool):
    """`encoder` wrapped with trainable adapters; its own weights frozen."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = spec.target_modules or (DECODER_TARGETS if decoder else ENCODER_TARGETS)
    config = LoraConfig(
        task_type=TaskType.FEATURE_EXTRACTION,
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
    )
    try:
        return get_peft_model(encoder, config)
    except ValueError as exc:  # no module of the model matches the targets
        raise InputError(f"model.lora.targetModules: {targets} do not fit the model: {exc}") from exc


def is_adapter_checkpoint(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def load_adapter_weights(peft_model, checkpoint: Path) -> None:
    """Resume the adapters saved in `checkpoint` into `peft_model`; every adapter must match."""
    import safetensors.torch
    from peft import set_peft_model_state_dict

    state = safetensors.torch.load_file(checkpoint / ADAPTER_WEIGHTS, device="cpu")
    result = set_peft_model_state_dict(peft_model, state)
    missing = [key for key in result.missing_keys if "lora_" in key]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{checkpoint}: adapters do not fit the model "
            f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, *, trust_remote_code: bool = False) -> Path:
    """The base model with the adapters of `adapter_dir` merged into its weights, saved (with
    the adapter's tokenizer) as a plain Hugging Face checkpoint in `out_dir`."""
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    base = AutoModel.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code).save_pretrained(out_dir)
    return out_dir
