"""Export a trained encoder in sentence-transformers layout, with its real pooling,
normalization, instructions and max lengths, so `SentenceTransformer(path).encode`
reproduces the trainer's own embeddings (FlagEmbedding's saved model lacks this metadata,
and loaders then default to mean pooling)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .config import ModelSpec
from .lora import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS
from .model_card import MODEL_CARD, render_model_card
from .model_loading import model_type_of, prepare_decoder_tokenizer

# Written next to the sentence-transformers files: how the model was made (its settings, the
# run, the base model), for people and tools; loaders do not read it (the sentence-transformers
# config carries pooling, normalization, prompts and lengths).
TRAINING_RECORD = "embedtune.json"

_ST_POOLING = {"cls": "cls", "mean": "mean", "lastToken": "lasttoken"}

# bge-m3's sparse and ColBERT heads, next to the encoder: FlagEmbedding's BGEM3FlagModel loads
# them from the model folder (sentence-transformers ignores them and encodes the dense vector)
M3_HEAD_FILES = ("colbert_linear.pt", "sparse_linear.pt")


def export_sentence_transformers(
    hf_dir: Path, out_dir: Path, spec: ModelSpec, *, extra: dict | None = None, adapter_dir: Path | None = None
) -> Path:
    """`hf_dir` (a Hugging Face checkpoint) as a sentence-transformers model in `out_dir`; the
    LoRA adapters it was merged from, if any, kept beside it in `out_dir/adapter/`."""
    model = build_sentence_transformer(hf_dir, spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(str(out_dir))
    if spec.unified:
        for name in M3_HEAD_FILES:
            shutil.copyfile(hf_dir / name, out_dir / name)
    if adapter_dir is not None:
        (out_dir / ADAPTER_DIR).mkdir(exist_ok=True)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copy2(adapter_dir / name, out_dir / ADAPTER_DIR / name)
    record = {"model": spec.to_dict()} | (extra or {})
    (out_dir / TRAINING_RECORD).write_text(json.dumps(record, indent=2))
    # sentence-transformers wrote a generic card: ours says what this model is (not evaluated yet)
    (out_dir / MODEL_CARD).write_text(render_model_card(record, None))
    return out_dir


def build_sentence_transformer(hf_dir: Path | str, spec: ModelSpec, *, device: str = "cpu"):
    """A SentenceTransformer over a plain Hugging Face checkpoint that encodes as `spec` says."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    spec = spec.resolved(model_type_of(hf_dir))
    transformer = Transformer(
        str(hf_dir),
        max_seq_length=max(spec.query_max_length, spec.passage_max_length),
        query_length=spec.query_max_length,
        document_length=spec.passage_max_length,
        model_kwargs={"trust_remote_code": spec.trust_remote_code},
    )
    if spec.family == "decoder":  # tokenized as in training: EOS appended, padded on the left
        prepare_decoder_tokenizer(transformer.tokenizer)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=_ST_POOLING[spec.pooling])]
    if spec.normalize:
        modules.append(Normalize())
    prompts = {}
    if spec.query_instruction:
        prompts["query"] = spec.query_instruction
    if spec.passage_instruction:
        prompts["document"] = spec.passage_instruction
    return SentenceTransformer(modules=modules, prompts=prompts, device=device)
