"""Turning queries and passages into vectors the way the model was trained to.

A model in sentence-transformers layout (what the trainer exports) carries its own
pooling, normalization, prompts and per-task max lengths; a plain Hugging Face checkpoint
gets them from a ModelSpec (`--pooling`, `--query-instruction` ...). Settings given
explicitly override a sentence-transformers model's own, so a base model can be encoded
exactly as training saw it.

Passages are encoded in length-sorted chunks: sentence-transformers sorts by length inside
one call; sorting the whole corpus first keeps every chunk's batches evenly padded too,
and chunking keeps only one chunk of vectors in memory (search.py merges the results).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .config import ModelSpec
from .contract import EncodePrecision
from .errors import InputError
from .export import build_sentence_transformer
from .model_loading import check_tokenizer, loading_model

# sentence-transformers' pooling names -> ours (ModelSpec.pooling)
_SPEC_POOLING = {"cls": "cls", "mean": "mean", "lasttoken": "lastToken"}


def load_encoder(
    path: Path | str,
    overrides: dict[str, Any] | None = None,
    *,
    device: str | None = None,
    precision: EncodePrecision = "auto",
    field: str = "model",
):
    """A SentenceTransformer for a local model directory or a hub id.

    `overrides` holds ModelSpec fields (snake_case) given explicitly; they replace the
    model's own settings. `field` is the setting that named the model, for its errors."""
    from sentence_transformers import SentenceTransformer

    overrides = overrides or {}
    with loading_model(path, field):
        if (Path(path) / "modules.json").is_file():
            model = SentenceTransformer(str(path), device=device)
            if overrides:
                spec = ModelSpec.model_validate(model_settings(model, str(path)).model_dump() | overrides)
                model = build_sentence_transformer(path, spec, device=str(model.device))
        else:
            model = build_sentence_transformer(path, ModelSpec(base=str(path), **overrides), device=device or _device())
        check_tokenizer(model.tokenizer)
    dtype = _dtype(precision, model.device.type)
    if dtype is not None:
        model.to(dtype)
    return model


def model_settings(model, base: str) -> ModelSpec:
    """The encoding settings a sentence-transformers model carries, as a ModelSpec."""
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    transformer = model[0]
    pooling = next(module for module in model if isinstance(module, Pooling)).pooling_mode
    if pooling not in _SPEC_POOLING:
        raise InputError(
            f"model {base}: pools with {pooling!r}; overriding its settings needs one of cls, mean, "
            "lasttoken pooling (drop the --pooling/--normalize/--*-instruction/--*-max-length flags)"
        )
    return ModelSpec(
        base=base,
        pooling=_SPEC_POOLING[pooling],
        normalize=any(isinstance(module, Normalize) for module in model),
        query_instruction=model.prompts.get("query") or None,
        passage_instruction=model.prompts.get("document") or None,
        query_max_length=getattr(transformer, "query_length", None) or transformer.max_seq_length,
        passage_max_length=getattr(transformer, "document_length", None) or transformer.max_seq_length,
    )


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(precision: EncodePrecision, device_type: str):
    """Half precision on a GPU (bf16 where supported); fp32 on CPU, where half is slower."""
    import torch

    if precision == "fp16" or (precision == "auto" and device_type == "cuda" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    if precision == "bf16" or (precision == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return None


def encode_queries(model, texts: list[str], *, batch_size: int = 64) -> np.ndarray:
    vectors = model.encode_query(texts, batch_size=batch_size, show_progress_bar=True, convert_to_numpy=True)
    return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)


def encode_passages(
    model, texts: list[str], *, batch_size: int = 64, chunk_size: int = 16384
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(corpus positions, vectors) for successive chunks of passages, shortest first."""
    by_length = np.argsort([len(text) for text in texts], kind="stable")
    step = batch_size * 16  # the progress bar moves every 16 batches, not once per chunk
    with tqdm(total=len(texts), desc="encode passages", unit="passage", mininterval=2.0) as progress:
        for start in range(0, len(texts), chunk_size):
            positions = by_length[start : start + chunk_size]
            parts = []
            for part in range(0, len(positions), step):
                part_texts = [texts[i] for i in positions[part : part + step]]
                vectors = model.encode_document(
                    part_texts, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True
                )
                parts.append(np.asarray(vectors, dtype=np.float32).reshape(len(part_texts), -1))
                progress.update(len(part_texts))
            yield positions, np.concatenate(parts)


def has_m3_heads(path: Path | str) -> bool:
    """Whether a model folder carries bge-m3's sparse and ColBERT heads."""
    from .export import M3_HEAD_FILES

    return all((Path(path) / name).is_file() for name in M3_HEAD_FILES)


def load_m3_encoder(path: Path | str, spec: ModelSpec, *, precision: EncodePrecision = "auto", field: str = "model"):
    """FlagEmbedding's BGEM3FlagModel over a model folder with bge-m3's heads, encoding as `spec` says."""
    import torch
    from FlagEmbedding import BGEM3FlagModel

    device = _device()
    dtype = _dtype(precision, device)
    with loading_model(path, field):
        # the ColBERT head's width is whatever it was trained with (model.colbertDim)
        colbert_dim = torch.load(Path(path) / "colbert_linear.pt", map_location="cpu", weights_only=True)["weight"]
        return BGEM3FlagModel(
            str(path),
            pooling_method=spec.flagembedding_pooling,
            normalize_embeddings=spec.normalize,
            use_fp16=dtype == torch.float16,
            use_bf16=dtype == torch.bfloat16,
            query_instruction_for_retrieval=spec.query_instruction,
            passage_instruction_for_retrieval=spec.passage_instruction,
            query_max_length=spec.query_max_length,
            passage_max_length=spec.passage_max_length,
            colbert_dim=colbert_dim.shape[0],
            devices=device,
            trust_remote_code=spec.trust_remote_code,
        )
