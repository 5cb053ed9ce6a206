"""Padding-free forward passes: each group of sequences (a step's queries; its passages) runs as
one flattened sequence with cumulative lengths, and attention is computed per sequence, so no
compute is spent on padding (a third or more of the token slots with realistic passages).

It works inside FlagEmbedding's and transformers' own classes:
- the collator packs FlagEmbedding's padded batches: the real tokens of every sequence, one
  after the other, with per-sequence position ids and `cu_seq_lens_q/k` / `max_length_q/k`
  (transformers' names for packed sequences, which its models hand to the attention function);
- the attention is registered in transformers' attention-implementation registry: packed input
  takes varlen attention (flash-attn where installed, else PyTorch's varlen kernel on CUDA, else
  a per-sequence reference implementation that runs anywhere); padded input (evaluation,
  export) takes SDPA as before;
- the model mixin pools (cls, mean, last token) on the flattened layout.

Models whose position ids and attention this handles: BERT, RoBERTa/XLM-R, ModernBERT. Any other
model trains with padding, and the log says so.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

logger = logging.getLogger(__name__)

ATTENTION = "embedtune_varlen"

# model_type -> where position ids start: RoBERTa-style embeddings count from padding_idx + 1
_POSITIONS_AFTER_PADDING_IDX = {"roberta", "xlm-roberta", "camembert"}
SUPPORTED_MODEL_TYPES = {"bert", "modernbert", *_POSITIONS_AFTER_PADDING_IDX}

_warned_attention_dropout = False


@dataclass(frozen=True)
class Packing:
    """How a model numbers the positions of a packed sequence."""

    first_position: int = 0


def enable_padding_free(encoder: torch.nn.Module) -> Packing | None:
    """Switch `encoder` to the varlen attention; None (and a log line) if it cannot run packed."""
    config = encoder.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not getattr(encoder, "_supports_attention_backend", False):
        logger.info(
            "padding-free: not available for model type %s (supported: %s); training with padding",
            model_type,
            ", ".join(sorted(SUPPORTED_MODEL_TYPES)),
        )
        return None
    register_attention()
    encoder.set_attn_implementation(ATTENTION)
    first = config.pad_token_id + 1 if model_type in _POSITIONS_AFTER_PADDING_IDX else 0
    logger.info("padding-free: queries and passages run as flattened sequences (%s attention)", varlen_backend())
    return Packing(first_position=first)


def register_attention() -> None:
    AttentionInterface.register(ATTENTION, varlen_attention)
    AttentionMaskInterface.register(ATTENTION, padded_input_mask)


def padded_input_mask(*, attention_mask: torch.Tensor | None = None, **kwargs):
    """Padded input (evaluation, export) keeps SDPA's masks. Packed input comes without a mask:
    the cumulative lengths bound its sequences, and a (tokens x tokens) sliding-window mask
    (ModernBERT's local layers) would take gigabytes; the window is applied in the kernel."""
    if attention_mask is None:
        return None
    return sdpa_mask(attention_mask=attention_mask, **kwargs)


def varlen_backend(device_type: str = "cuda" if torch.cuda.is_available() else "cpu") -> str:
    if device_type == "cuda":
        if _flash_attn_varlen() is not None:
            return "flash-attn varlen"
        return "PyTorch varlen"
    return "per-sequence reference"


def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query/key/value (1, heads, tokens, dim) of a
    packed sequence -> (1, tokens, heads, dim). `sliding_window` is transformers' flash-attention
    convention (ModernBERT's local layers): tokens attend within sliding_window - 1 positions."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError(f"packed attention takes one flattened sequence, got a batch of {query.shape[0]}")
    q, k, v = (tensor[0].transpose(0, 1) for tensor in (query, key, value))  # (tokens, heads, dim)
    window = sliding_window - 1 if sliding_window is not None else -1
    out = _attend(q, k, v, cu_seq_lens_q, max_length_q, scaling, dropout, window)
    return out.unsqueeze(0), None


def _attend(q, k, v, cu_seq_lens, max_length, scaling, dropout, window) -> torch.Tensor:
    if q.is_cuda and (flash := _flash_attn_varlen()) is not None:
        return flash(
            q,
            k,
            v,
            cu_seq_lens,
            cu_seq_lens,
            max_length,
            max_length,
            dropout_p=dropout,
            softmax_scale=scaling,
            window_size=(window, window),
        )
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention.varlen import varlen_attn

        _warn_attention_dropout(dropout)
        return varlen_attn(
            q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, scale=scaling, window_size=(window, window)
        )
    return reference_varlen_attention(q, k, v, cu_seq_lens, scaling, dropout, window)


def _warn_attention_dropout(dropout: float) -> None:
    global _warned_attention_dropout
    if dropout > 0 and not _warned_attention_dropout:
        _warned_attention_dropout = True
        logger.warning(
            "padding-free: PyTorch's varlen attention has no dropout, so attention dropout (p=%.2f) is not "
            "applied (hidden-state dropout is); install flash-attn to keep it",
            dropout,
        )


def reference_varlen_attention(q, k, v, cu_seq_lens, scaling, dropout, window: int = -1) -> torch.Tensor:
    """Attention within each sequence of a packed (tokens, heads, dim) input, one SDPA call per
    sequence: exact, and runs on any device (the CPU path and the tests' reference). A window
    >= 0 lets tokens attend only within that distance."""
    bounds = cu_seq_lens.tolist()
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        band = None
        if 0 <= window < end - start:
            positions = torch.arange(end - start, device=q.device)
            band = (positions[:, None] - positions[None, :]).abs() <= window
        # (1, heads, length, dim): SDPA's CPU kernels take 4-d input (3-d falls to a path ~8x slower)
        q_seq, k_seq, v_seq = (tensor[start:end].transpose(0, 1)[None] for tensor in (q, k, v))
        out = F.scaled_dot_product_attention(q_seq, k_seq, v_seq, attn_mask=band, dropout_p=dropout, scale=scaling)
        parts.append(out[0].transpose(0, 1))
    return torch.cat(parts)


def pack(batch: Mapping[str, torch.Tensor], packing: Packing) -> dict:
    """A padded tokenizer batch -> one flattened sequence of its real tokens (any padding side)."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(dim=1)
    cu_seq_lens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    max_length = int(lengths.max())
    packed = {name: tensor[mask].unsqueeze(0) for name, tensor in batch.items() if name != "attention_mask"}
    packed["position_ids"] = ((mask.cumsum(dim=1) - 1)[mask] + packing.first_position).unsqueeze(0)
    return packed | {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max_length,
        "max_length_k": max_length,
        # FlagEmbedding reads the key; no mask: the cumulative lengths bound the sequences
        "attention_mask": None,
    }


def is_packed(features) -> bool:
    return isinstance(features, Mapping) and "cu_seq_lens_q" in features


def pool_packed(hidden: torch.Tensor, cu_seq_lens: torch.Tensor, method: str) -> torch.Tensor:
    """FlagEmbedding's poolings (cls, mean, last_token) of a packed (tokens, hidden) output."""
    starts, ends = cu_seq_lens[:-1].long(), cu_seq_lens[1:].long()
    if method == "cls":
        return hidden[starts]
    if method == "last_token":
        return hidden[ends - 1]
    if method == "mean":
        lengths = ends - starts
        sequence = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
        sums = torch.zeros(len(lengths), hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        return sums.index_add_(0, sequence, hidden) / lengths.unsqueeze(-1).to(hidden.dtype)
    raise NotImplementedError(f"pooling method {method} not implemented")


class PaddingFreeEncoding:
    """Mixin for FlagEmbedding's bi-encoder model: packed features pool on the flattened layout.

    FlagEmbedding's `encode` runs the encoder on the features and hands the output with
    `features["attention_mask"]` to `_sentence_embedding`; a packed batch has no mask, so
    `encode` keeps its cumulative lengths for the pooling of that call."""

    _cu_seq_lens: torch.Tensor | None = None

    def encode(self, features):
        if not is_packed(features):
            return super().encode(features)
        self._cu_seq_lens = features["cu_seq_lens_q"]
        try:
            return super().encode(features)
        finally:
            self._cu_seq_lens = None

    def _sentence_embedding(self, last_hidden_state, attention_mask):
        if self._cu_seq_lens is None:
            return super()._sentence_embedding(last_hidden_state, attention_mask)
        return pool_packed(last_hidden_state[0], self._cu_seq_lens, self.sentence_pooling_method)


class PackingCollator:
    """Wraps FlagEmbedding's collator: its padded query and passage batches, packed. Runs in the
    DataLoader workers, like the tokenization."""

    def __init__(self, collator, packing: Packing):
        self.collator = collator
        self.packing = packing

    def __call__(self, features):
        batch = self.collator(features)
        for side in ("queries", "passages"):
            if isinstance(batch[side], Mapping):  # a BatchEncoding; sub-batches (a list) stay padded
                batch[side] = pack(batch[side], self.packing)
        return batch
