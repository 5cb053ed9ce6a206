"""Reading JSON Lines: whatever a file holds ends in `FILE[:LINE]: ...` problems, never a
traceback; and the one text check every field shares."""

import pytest

from embedtune.operator.cli import main as cli
from embedtune.trainer.jsonl import MAX_LINE_BYTES, text_problem

RECORD = b'{"query": "q", "pos": ["p"]}\n'

# (file content, the start of each problem check-data prints; FILE is the file's path)
BAD_FILES = {
    "nested 3000 deep": (
        b'{"query": "q", "pos": ' + b"[" * 3000 + b"]" * 3000 + b"}\n" + RECORD,
        ["FILE:1: json: nested too deeply to read"],
    ),
    "gzip": (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + bytes(range(256)), ["FILE: not a text file (it holds NUL"]),
    "UTF-16": (b"\xff\xfe{\x00}\x00\n\x00", ["FILE: not a text file"]),
    "JSON array": (
        b'[\n  {"query": "q",\n   "pos": ["p"]}\n]\n',
        ["FILE:1: json: the file is a JSON array over many lines, not JSON Lines; convert it: jq -c '.[]' FILE"],
    ),
    "indented objects": (
        b'\n{\n  "query": "q",\n  "pos": ["p"]\n}\n',
        ["FILE:2: json: the file holds JSON objects over many lines, not one per line; convert it: jq -c . FILE"],
    ),
    "JSON array on one line": (
        b'[{"query": "q", "pos": ["p"]}, {"query": "r", "pos": ["s"]}]\n',
        ["FILE:1: record: expected a JSON object, got an array of 2 objects"],
    ),
    "huge line": (
        b'{"query": "x", "pos": ["' + b"x" * MAX_LINE_BYTES + b'"]}\n' + RECORD + b"{oops\n",
        ["FILE:1: json: line longer than 16 MiB", "FILE:3: json: invalid JSON"],  # and line 2 is read
    ),
    "Latin-1": (
        RECORD + b'{"query": "caf\xe9", "pos": ["p"]}\n',
        ["FILE:2: encoding: not UTF-8 (byte 0xe9 at byte 15 of the line); save the file as UTF-8"],
    ),
    "5000 digits": (
        b'{"query": "q", "pos": ["p"], "pos_scores": [1' + b"0" * 5000 + b"]}\n",
        ["FILE:1: json: unreadable value (Exceeds the limit"],
    ),
}


@pytest.mark.parametrize("content, expected", BAD_FILES.values(), ids=BAD_FILES)
def test_a_file_that_is_not_json_lines_is_a_problem_never_a_traceback(tmp_path, capsys, content, expected):
    data = tmp_path / "train.jsonl"
    data.write_bytes(content)
    assert cli(["check-data", str(data)]) == 2
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(expected), printed
    for line, start in zip(printed, expected):
        assert line.startswith(start.replace("FILE", str(data))), line


def test_a_utf8_byte_order_mark_and_windows_line_ends_are_read(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + RECORD.replace(b"\n", b"\r\n") * 2)
    assert cli(["check-data", str(data)]) == 0
    assert "ok: 2 records" in capsys.readouterr().err


def test_an_unreadable_path_is_a_problem(tmp_path, capsys):
    assert cli(["check-data", "--candidates", str(tmp_path)]) == 2
    assert capsys.readouterr().out.startswith(f"{tmp_path}: cannot read it: Is a directory")


SURROGATE = "not valid Unicode: lone surrogate \\u{} at character {} (a \\u escape without its pair)"
TEXTS = [
    ("a text", {}, None),
    (3, {}, "expected a string, got int"),
    (None, {}, "expected a string, got null"),
    (" \n", {}, "empty string"),
    ("", {"allow_empty": True}, None),
    ("half \ud800 a pair", {}, SURROGATE.format("d800", 6)),
    ("\udfff", {"allow_empty": True}, SURROGATE.format("dfff", 1)),
    ("a real pair \U0001f600", {}, None),
]


@pytest.mark.parametrize("value, options, expected", TEXTS)
def test_text_problem(value, options, expected):
    assert text_problem(value, **options) == expected
