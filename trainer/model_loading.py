"""Loading a model the user named: the base model to train or mine with, a model to evaluate.

A model that cannot be loaded (an empty folder, no weights, a corrupt weights file, no
tokenizer, a path that does not exist, a hub id that does not exist) is the user's input to
fix: an InputError (exit 2, which the operator does not retry) that names the path and why.
Only what a new attempt can cure passes through unchanged: a hub or network that cannot be
reached now, a full disk, memory running out.
"""

from __future__ import annotations

import errno
import json
import logging
import pickle
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed
from safetensors import SafetensorError

from .errors import InputError

# What loaders raise for a model that is missing or not whole: a missing or unreadable file,
# a bad config.json (OSError, ValueError), a corrupt safetensors or pickled (.bin) file, a
# truncated .bin archive (RuntimeError).
_MODEL_PROBLEMS = (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError)
# ... and what fails for a new attempt to cure; also RuntimeErrors, such as a GPU's or a
# collective's under DeepSpeed ZeRO-3 (which loads the weights across the ranks)
_TRANSIENT = (
    ConnectionError,
    TimeoutError,
    socket.gaierror,
    MemoryError,
    torch.OutOfMemoryError,
    torch.AcceleratorError,
    torch.distributed.DistError,
)
_TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO}
_WHAT_LOADS = (
    "give a Hugging Face model directory (config.json, the weights, the tokenizer files), a "
    "sentence-transformers directory, an s3:// URI of either, or a model id the hub has"
)


@contextmanager
def loading_model(name: str | Path, field: str = "model") -> Iterator[None]:
    """Around the code that loads the model at `name`; `field` is the setting that named it."""
    try:
        yield
    except _MODEL_PROBLEMS as exc:
        if worth_retrying(exc):
            raise
        raise InputError(
            f"{field}: cannot load {str(name)!r}: {_reason(Path(name), exc)}", [_WHAT_LOADS], reason="ModelNotLoadable"
        ) from exc


def check_tokenizer(tokenizer) -> None:
    """transformers builds a tokenizer that knows only its special tokens from a folder with no
    tokenizer files, and every word of every text then becomes [UNK]: a ValueError here."""
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise ValueError(
            f"it has no tokenizer files (tokenizer.json, vocab.txt, ...): its tokenizer knows only "
            f"{len(tokenizer)} special tokens"
        )


def load_tokenizer(name: str, field: str = "model.base", *, trust_remote_code: bool = False, decoder: bool = False):
    """A Hugging Face tokenizer that knows words (prepared for last-token pooling when the model
    is a decoder), or an InputError naming what is wrong with it."""
    from transformers import AutoTokenizer

    with loading_model(name, field):
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        check_tokenizer(tokenizer)
        if decoder:
            prepare_decoder_tokenizer(tokenizer)
    return tokenizer


def load_tokenizer_and_encoder(
    name: str, field: str = "model.base", *, trust_remote_code: bool = False, decoder: bool = False
):
    """A Hugging Face tokenizer and encoder, or an InputError naming what is wrong with them."""
    from transformers import AutoModel

    tokenizer = load_tokenizer(name, field, trust_remote_code=trust_remote_code, decoder=decoder)
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addFilter(_language_model_head_report)
    try:
        with loading_model(name, field):
            encoder = AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code)
    finally:
        report_logger.removeFilter(_language_model_head_report)
    return tokenizer, encoder


def _language_model_head_report(record: logging.LogRecord) -> bool:
    """False for transformers' load report when all it says is that a causal LM's head
    (lm_head.*) was not loaded: an embedder has no use for it, so there is nothing to act on."""
    message = record.getMessage()
    if "LOAD REPORT" not in message:
        return True
    rows = [line.split("|")[0].strip() for line in message.splitlines() if line.count("|") >= 2]
    keys = [key for key in rows if key and key != "Key" and not key.startswith("-")]
    return not keys or not all(key.startswith("lm_head.") for key in keys)


def model_type_of(path: str | Path) -> str | None:
    """`model_type` of a local model's config.json; None where there is none to read."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def prepare_decoder_tokenizer(tokenizer) -> None:
    """What last-token pooling needs of a causal LM's tokenizer, in the tokenizer itself so a
    saved copy (the exported model's) tokenizes the same: every text ends with the EOS token
    (its state sums up the text; Qwen3-Embedding's tokenizer appends it already), padding on
    the left (the last position is every text's last token), and a pad token."""
    from tokenizers.processors import TemplateProcessing

    if tokenizer.eos_token is None:
        raise ValueError("its tokenizer has no EOS token, which last-token pooling of a decoder appends to every text")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if tokenizer("a")["input_ids"][-1] != tokenizer.eos_token_id:
        eos = tokenizer.eos_token
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1", special_tokens=[(eos, tokenizer.eos_token_id)]
        )


def worth_retrying(exc: BaseException) -> bool:
    """Whether anything in the exception's chain is a failure a new attempt can cure."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, _TRANSIENT) or (isinstance(seen, OSError) and seen.errno in _TRANSIENT_ERRNOS):
            return True
        status = getattr(getattr(seen, "response", None), "status_code", None)
        if isinstance(status, int) and (status >= 500 or status == 429):  # the hub is down or busy
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _reason(path: Path, exc: BaseException) -> str:
    if path.is_dir() and not any(path.iterdir()):
        return "the folder is empty"
    if not path.exists() and (path.is_absolute() or str(path).startswith(".") or len(path.parts) > 2):
        return "no such file or directory"  # a hub id has at most one '/'
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = (lines[0] if lines else type(exc).__name__)[:300]
    return f"a .safetensors weights file is corrupt ({reason})" if isinstance(exc, SafetensorError) else reason
