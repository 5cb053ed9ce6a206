"""Turning queries and passages into vectors the way the model was trained to.

A model in sentence-transformers layout (what the trainer exports) carries its own
pooling, normalization, prompts and per-task max lengths; a plain Hugging Face checkpoint
gets them from a ModelSpec (`--pooling`, `--query-instruction` ...). Settings given
explicitly override a sentence-transformers model's own, so a base model can be encoded
exactly as training saw it.

Passages are encoded in length-sorted chunks: sentence-transformers sorts by length inside
one call; sorting the whole corpus first keeps every chunk's batches evenly padded too,
and chunking keeps only one chunk of vectors in memory (search.py merges the results).

Padding-free (on with a GPU): the model's own preprocessing runs in DataLoader workers, and
the transformer runs on flattened sequences bounded by a token budget (padding_free.py), so
neither the tokenizer nor padding holds the GPU back. Models it cannot run packed encode
through sentence-transformers as before.
"""

from __future__ import annotations

import inspect
import logging
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

logger = logging.getLogger(__name__)

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


# Real tokens per forward pass when encoding padding-free (the batch is bounded by tokens, not
# texts, so long and short texts fill the GPU alike); texts tokenized together in one worker.
TOKENS_PER_FORWARD = 32768
TEXTS_PER_TOKENIZATION = 512
# sentence-transformers' prompt names per task, in the order its encode_query/encode_document try them
_PROMPT_NAMES = {"query": ("query",), "document": ("document", "passage", "corpus")}


def encode_queries(model, texts: list[str], *, batch_size: int = 64, padding_free: bool | None = None) -> np.ndarray:
    plan = packed_plan(model, padding_free)
    if plan is None:
        vectors = model.encode_query(texts, batch_size=batch_size, show_progress_bar=True, convert_to_numpy=True)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)
    with tqdm(total=len(texts), desc="encode queries", unit="query", mininterval=2.0) as progress:
        return plan.encode(texts, "query", progress)


def encode_passages(
    model, texts: list[str], *, batch_size: int = 64, chunk_size: int = 16384, padding_free: bool | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(corpus positions, vectors) for successive chunks of passages, shortest first."""
    plan = packed_plan(model, padding_free)
    by_length = np.argsort([len(text) for text in texts], kind="stable")
    step = batch_size * 16  # the progress bar moves every 16 batches, not once per chunk
    with tqdm(total=len(texts), desc="encode passages", unit="passage", mininterval=2.0) as progress:
        for start in range(0, len(texts), chunk_size):
            positions = by_length[start : start + chunk_size]
            if plan is not None:
                yield positions, plan.encode([texts[i] for i in positions], "document", progress)
                continue
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


def packed_plan(model, padding_free: bool | None = None) -> PackedEncoding | None:
    """How `model` encodes padding-free, or None where it encodes with padding through
    sentence-transformers: padding-free was not asked for (unset: on with a GPU), or the model
    is not a plain transformer + pooling (+ normalization) that padding_free.py can run packed."""
    if padding_free is None:
        padding_free = model.device.type == "cuda"
    if not padding_free:
        return None
    cached = getattr(model, "_embedtune_packed_plan", False)
    if cached is not False:
        return cached
    plan = PackedEncoding.of(model)
    model._embedtune_packed_plan = plan
    return plan


class PackedEncoding:
    """Encodes like the sentence-transformers model it wraps, padding-free: its own
    preprocessing (prompts, per-task lengths) runs in DataLoader workers; the transformer runs
    on flattened sequences of up to TOKENS_PER_FORWARD tokens; pooling and normalization are
    computed on the flattened layout as the model's modules would."""

    def __init__(self, model, pooling: str, normalize: bool, packing):
        self.model, self.pooling, self.normalize, self.packing = model, pooling, normalize, packing
        self.tokens_per_forward = TOKENS_PER_FORWARD
        forward = inspect.signature(model[0].auto_model.forward).parameters
        self.input_names = [name for name in ("input_ids", "token_type_ids") if name in forward]

    @classmethod
    def of(cls, model) -> PackedEncoding | None:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

        from .padding_free import enable_padding_free

        modules = list(model)
        if (
            len(modules) < 2
            or not isinstance(modules[0], Transformer)
            or not isinstance(modules[1], Pooling)
            or modules[1].pooling_mode not in _SPEC_POOLING
            or not modules[1].include_prompt
            or not all(isinstance(module, Normalize) for module in modules[2:])
        ):
            logger.info("padding-free encoding: not available for modules %s; encoding with padding", modules)
            return None
        packing = enable_padding_free(modules[0].auto_model)
        if packing is None:
            return None
        pooling = {"lasttoken": "last_token"}.get(modules[1].pooling_mode, modules[1].pooling_mode)
        return cls(model, pooling, len(modules) > 2, packing)

    def encode(self, texts: list[str], task: str, progress) -> np.ndarray:
        import torch
        from torch.utils.data import DataLoader

        from .batches import dataloader_workers

        prompt = next((self.model.prompts[n] for n in _PROMPT_NAMES[task] if self.model.prompts.get(n)), None)
        longest_first = np.argsort([-len(text) for text in texts], kind="stable")
        groups = [longest_first[i : i + TEXTS_PER_TOKENIZATION] for i in range(0, len(texts), TEXTS_PER_TOKENIZATION)]
        device = self.model.device
        workers = dataloader_workers(None, on_gpu=device.type == "cuda")
        loader = DataLoader(
            _Preprocessed(self.model, texts, groups, prompt, task),
            batch_size=None,
            collate_fn=_as_is,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )
        vectors = None
        with torch.inference_mode():
            for positions, features in loader:
                lengths = features["attention_mask"].sum(dim=1).tolist()
                for rows in _token_budget_slices(lengths, self.tokens_per_forward):
                    reps = self._forward({name: features[name][rows] for name in [*self.input_names, "attention_mask"]})
                    if vectors is None:
                        vectors = np.empty((len(texts), reps.shape[1]), dtype=np.float32)
                    vectors[positions[rows]] = reps
                progress.update(len(positions))
        return vectors if vectors is not None else np.empty((0, 0), dtype=np.float32)

    def _forward(self, padded) -> np.ndarray:
        import torch

        from .padding_free import pack, pool_packed

        packed = pack(padded, self.packing)
        device = self.model.device
        inputs = {
            name: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for name, value in packed.items()
        }
        hidden = self.model[0].auto_model(**inputs).last_hidden_state[0]
        reps = pool_packed(hidden, inputs["cu_seq_lens_q"], self.pooling)
        if self.normalize:
            reps = torch.nn.functional.normalize(reps, p=2, dim=1)
        return reps.float().cpu().numpy()


class _Preprocessed:
    """Groups of texts, each preprocessed by the sentence-transformers model (in a worker)."""

    def __init__(self, model, texts, groups, prompt, task):
        self.model, self.texts, self.groups, self.prompt, self.task = model, texts, groups, prompt, task

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, index):
        positions = self.groups[index]
        texts = [self.texts[i] for i in positions]
        return positions, self.model.preprocess(texts, prompt=self.prompt, task=self.task)


def _as_is(item):
    return item


def _token_budget_slices(lengths: list[int], budget: int) -> Iterator[slice]:
    """Consecutive rows whose real tokens add up to at most `budget` (at least one row each)."""
    start, total = 0, 0
    for row, length in enumerate(lengths):
        if row > start and total + length > budget:
            yield slice(start, row)
            start, total = row, 0
        total += length
    if start < len(lengths):
        yield slice(start, len(lengths))
