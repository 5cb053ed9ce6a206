"""JSON Lines input, as training data, evaluation sets and candidate pools are written: reading
files line by line, and the check every text field shares.

Whatever a file holds (binary data, another encoding, one JSON array, a line of gigabytes, a
value nested thousands of levels deep), reading it ends in `FILE[:LINE]: ...` problems, never an
exception; a record can then be checked field by field, each problem `field: reason`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# One record per line is small (a query and its passages); a longer line is almost always a
# whole JSON document written on one line, and reading it would hold all of it in memory.
MAX_LINE_BYTES = 16 * 2**20
_BINARY_SNIFF_BYTES = 8192
_SKIP_CHUNK_BYTES = 2**20
_UTF8_BOM = b"\xef\xbb\xbf"
_SHOWN_CHARS = 60


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def describe(value: Any) -> str:
    """A short, safe rendering of a value for a problem message: strings and numbers as written
    (cut short), anything else by its type (a nested value may be too deep to render)."""
    if isinstance(value, (str, int, float)) or value is None:
        shown = repr(value)
        return shown if len(shown) <= _SHOWN_CHARS else f"{shown[:_SHOWN_CHARS]}..."
    return f"a {type_name(value)}"


def text_problem(value: Any, *, allow_empty: bool = False) -> str | None:
    """Why `value` cannot be a text to encode, or None when it can: a string, not blank (unless
    `allow_empty`), and valid Unicode. JSON lets `\\ud800` through as a lone surrogate, which no
    file or tokenizer takes: training would fail on it, on every attempt."""
    if not isinstance(value, str):
        return f"expected a string, got {type_name(value)}"
    if not allow_empty and not value.strip():
        return "empty string"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"not valid Unicode: lone surrogate \\u{ord(value[exc.start]):04x} at character {exc.start + 1} "
            "(a \\u escape without its pair)"
        )
    return None


def read_json_lines(path: Path, problems: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of a JSON Lines file. A line that is not a
    JSON object becomes a `FILE:LINE: ...` problem instead; a file that is not JSON Lines at all
    (binary, one JSON document over many lines, unreadable) becomes one problem for the file."""
    try:
        with open(path, "rb") as f:
            if b"\0" in f.read(_BINARY_SNIFF_BYTES):
                problems.append(
                    f"{path}: not a text file (it holds NUL bytes: binary, compressed or UTF-16); "
                    "expected JSON Lines, UTF-8 text with one JSON object per line"
                )
                return
            f.seek(0)
            first_record = True
            for line_no, line in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
                if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                    _skip_rest_of_line(f)
                    problems.append(
                        f"{path}:{line_no}: json: line longer than {MAX_LINE_BYTES // 2**20} MiB; JSON Lines holds "
                        "one record per line (is the file one JSON document, such as an array, on one line?)"
                    )
                    continue
                if line_no == 1:
                    line = line.removeprefix(_UTF8_BOM)
                try:
                    text = line.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    problems.append(
                        f"{path}:{line_no}: encoding: not UTF-8 (byte 0x{line[exc.start]:02x} at byte {exc.start + 1} "
                        "of the line); save the file as UTF-8"
                    )
                    continue
                if not text.strip():
                    continue
                value, problem = _parse(text)
                if problem and first_record and text.strip() in ("[", "{"):
                    problems.append(f"{path}:{line_no}: json: {_spread_document(text.strip(), path)}")
                    return
                first_record = False
                if problem:
                    problems.append(f"{path}:{line_no}: {problem}")
                    continue
                yield line_no, value
    except OSError as exc:
        problems.append(f"{path}: cannot read it: {exc.strerror or exc}")


def _parse(text: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"json: invalid JSON ({exc.msg} at column {exc.colno})"
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        return None, f"json: unreadable value ({exc})"
    except RecursionError:
        return None, "json: nested too deeply to read (a record is an object of strings, numbers and lists)"
    if isinstance(value, dict):
        return value, None
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return None, (
            f"record: expected a JSON object, got an array of {len(value)} objects (JSON Lines holds one "
            "object per line: convert an array with jq -c '.[]')"
        )
    return None, f"record: expected a JSON object, got {type_name(value)}"


def _spread_document(first_line: str, path: Path) -> str:
    """Why a file whose first line opens a JSON document is not JSON Lines, and how to convert it."""
    if first_line == "[":
        return f"the file is a JSON array over many lines, not JSON Lines; convert it: jq -c '.[]' {path}"
    return f"the file holds JSON objects over many lines, not one per line; convert it: jq -c . {path}"


def _skip_rest_of_line(f) -> None:
    while (chunk := f.readline(_SKIP_CHUNK_BYTES)) and not chunk.endswith(b"\n"):
        pass
