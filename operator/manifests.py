"""Reading EmbeddingFinetune manifests from files, bounded before anything else reads them.

A manifest is small (the API server stores at most about 1.5 MiB per object). A YAML file can
still be made to expand without bound (an alias bomb: a few hundred bytes of anchors that
become gigabytes once serialized), nest deeper than Python recurses, or not be text at all;
each of those is refused here with the file named, so no later step ever sees it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from embedtune.trainer.errors import InputError

MAX_MANIFEST_BYTES = 1024 * 1024
# Values in a document, counting each use of an alias anew: what serializing it would write.
MAX_VALUES = 100_000
MAX_DEPTH = 64


def read_manifests(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of `path` (empty ones skipped); InputError for anything that is not
    a bounded list of mappings."""
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise InputError(f"{path}: {size} bytes; a manifest file is at most {MAX_MANIFEST_BYTES} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); a manifest is a YAML file") from exc
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise InputError(f"{path}: nested too deeply to be a manifest") from exc
    for number, document in enumerate(documents, start=1):
        where = f"{path}: document {number}" if len(documents) > 1 else str(path)
        if not isinstance(document, dict):
            raise InputError(
                f"{where}: expected a mapping (apiVersion, kind, metadata, spec), got {_kind_of(document)}"
            )
        _check_bounds(document, where)
    return documents


def _check_bounds(document: Any, where: str) -> None:
    """Walk the document as serializing it would (aliases expanded), without recursion."""
    pending = [(document, 1)]
    values = 0
    while pending:
        value, depth = pending.pop()
        values += 1
        if values > MAX_VALUES:
            raise InputError(
                f"{where}: expands to more than {MAX_VALUES} values (YAML aliases repeated over and over?); "
                "a manifest is much smaller"
            )
        if depth > MAX_DEPTH:
            raise InputError(f"{where}: nested more than {MAX_DEPTH} levels deep; a manifest is much flatter")
        if isinstance(value, dict):
            pending.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, list):
            pending.extend((item, depth + 1) for item in value)


def _kind_of(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )
