"""Broken input, as a user or an attacker would give it, to every command that reads files:
each ends in exit 2 with the file, line or field named, no traceback, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from embedtune.operator.cli import main
from support.finetunes import minimal_manifest
from support.tiny import synthetic_records, write_jsonl


def manifest_text(**changes) -> str:
    manifest = minimal_manifest("broken")
    for path, value in changes.items():
        target = manifest
        *parents, leaf = path.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return yaml.safe_dump(manifest)


ALIAS_BOMB = """apiVersion: embedtune.io/v1alpha1
kind: EmbeddingFinetune
metadata: {name: bomb}
spec:
  model: {base: m}
  data: {train: [s3://d/t.jsonl], heldOutFraction: 0.1}
  storage: {uri: s3://m/x}
  training:
    deepspeed:
      config:
        a: &a [x, x, x, x, x, x, x, x, x, x]
        b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
        c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
        d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
        e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
        f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
        g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
        h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
"""

# (what, the manifest file's bytes, a problem that must be named)
BROKEN_MANIFESTS = [
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not UTF-8 text"),
    ("a YAML list", b"- apiVersion: embedtune.io/v1alpha1\n- kind: EmbeddingFinetune\n", "got a list"),
    ("a scalar", b"hello\n", "got a string"),
    ("not YAML", b"metadata: {name: [unclosed\n", "not valid YAML"),
    ("a numeric name", manifest_text(**{"metadata.name": 12345}).encode(), "metadata.name: must be a DNS label"),
    ("metadata a list", manifest_text(metadata=["x"]).encode(), "metadata: expected a mapping"),
    ("a numeric namespace", manifest_text(**{"metadata.namespace": 5}).encode(), "metadata.namespace: must be a DNS"),
    ("a namespace leaving storage", manifest_text(**{"metadata.namespace": "../../escaped"}).encode(), "namespace"),
    ("an alias bomb", ALIAS_BOMB.encode(), "expands to more than"),
    ("nested 3,000 deep", ("[" * 3000 + "]" * 3000).encode(), "nested"),
    ("2 MiB", b"# padding\n" * 200_000, "a manifest file is at most"),
    ("an infinite float", manifest_text(**{"spec.training.weightDecay": float("inf")}).encode(), "weightDecay"),
]


def run_command(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("command", ["validate", "render", "run"])
@pytest.mark.parametrize(("what", "content", "problem"), BROKEN_MANIFESTS, ids=[case[0] for case in BROKEN_MANIFESTS])
def test_a_broken_manifest_is_named_and_nothing_runs(tmp_path, capsys, command, what, content, problem):
    path = tmp_path / "manifest.yaml"
    path.write_bytes(content)
    extra = ["--storage", str(tmp_path / "runs")] if command == "run" else []
    code, output = run_command(capsys, command, str(path), *extra)
    assert code == 2, output
    assert problem in output and "Traceback" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.yaml"]  # nothing written


@pytest.mark.parametrize("command", ["validate", "render", "run"])
@pytest.mark.parametrize(
    ("what", "path", "problem"),
    [("missing", "nowhere.yaml", "cannot read"), ("a directory", ".", "cannot read")],
)
def test_an_unreadable_manifest_path_is_named(tmp_path, capsys, command, what, path, problem):
    code, output = run_command(capsys, command, str(tmp_path / path))
    assert code == 2 and problem in output and "Traceback" not in output


BROKEN_DATA_LINES = [
    ("binary", b"\x00\x01\x02\xff" * 100, "not a text file"),
    ("a JSON array", json.dumps(synthetic_records(2)).encode() + b"\n", "got an array of 2 objects"),
    ("nested 3,000 deep", b'{"query": ' + b"[" * 3000 + b"]" * 3000 + b', "pos": ["p"]}\n', "nested too deeply"),
    ("a lone surrogate", b'{"query": "\\ud800", "pos": ["p"]}\n', "lone surrogate"),
    ("a negative that is its positive", b'{"query": "q", "pos": ["p"], "neg": ["p"]}\n', "same text as pos[0]"),
    ("a NaN teacher score", b'{"query": "q", "pos": ["p"], "pos_scores": [NaN]}\n', "expected a finite number"),
    ("not UTF-8", b'{"query": "caf\xe9", "pos": ["p"]}\n', "not UTF-8"),
]


@pytest.mark.parametrize(("what", "content", "problem"), BROKEN_DATA_LINES, ids=[case[0] for case in BROKEN_DATA_LINES])
def test_broken_training_data_is_named_by_check_data_and_by_run(tiny_model, tmp_path, capsys, what, content, problem):
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    data.write_bytes(content)
    code, output = run_command(capsys, "check-data", str(data))
    assert code == 2 and problem in output and str(data) in output and "Traceback" not in output

    manifest = minimal_manifest("broken", data={"train": "data/train.jsonl", "heldOutFraction": 0.1})
    manifest["spec"]["model"] = {"base": str(tiny_model), "pooling": "mean"}
    del manifest["spec"]["storage"], manifest["spec"]["resources"]
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    code, output = run_command(capsys, "run", str(tmp_path / "manifest.yaml"), "--storage", str(tmp_path / "runs"))
    assert code == 2 and problem in output and "Traceback" not in output
    assert not (tmp_path / "runs").exists()


def eval_set(folder: Path, queries=None, corpus=None, qrels=None) -> Path:
    write_jsonl(folder / "queries.jsonl", queries or [{"id": "q1", "text": "what is w1"}])
    write_jsonl(folder / "corpus.jsonl", corpus or [{"id": "d1", "text": "w1 w2"}])
    write_jsonl(folder / "qrels.jsonl", qrels or [{"qid": "q1", "docid": "d1", "relevance": 1}])
    return folder


@pytest.mark.parametrize(
    ("what", "arguments", "problem"),
    [
        ("a missing file of the set", lambda d: ["--eval-set", str(d / "nowhere")], "queries.jsonl: missing"),
        (
            "a judgment of an unknown passage",
            lambda d: ["--eval-set", str(eval_set(d / "s", qrels=[{"qid": "q1", "docid": "d9", "relevance": 1}]))],
            "docid: 'd9' is not an id in corpus.jsonl",
        ),
        (
            "a corpus line nested 3,000 deep",
            lambda d: ["--eval-set", str(eval_set(d / "s", corpus=["[" * 3000 + "]" * 3000]))],
            "nested too deeply",
        ),
        ("cutoffs that are no numbers", lambda d: ["--eval-set", str(eval_set(d / "s")), "--k", "ten"], "--k ten"),
    ],
)
def test_a_broken_evaluation_is_named(tiny_model, tmp_path, capsys, what, arguments, problem):
    code, output = run_command(capsys, "evaluate", "--model", str(tiny_model), *arguments(tmp_path))
    assert code == 2 and problem in output and "Traceback" not in output


@pytest.mark.parametrize(
    ("what", "content", "problem"),
    [
        ("binary", b"\xff\xfe\x00\x01", "cannot read"),
        ("a list", b"- model: x\n", "invalid EvaluationConfig"),
        ("an unknown field", b"model: m\nevalSet: e\nkvalues: [1]\n", "config.kvalues: unknown field"),
        ("nested 3,000 deep", ("[" * 3000 + "]" * 3000).encode(), "not valid YAML"),
    ],
)
def test_a_broken_evaluation_config_is_named(tmp_path, capsys, what, content, problem):
    (tmp_path / "evaluation.yaml").write_bytes(content)
    code, output = run_command(capsys, "evaluate", "--config", str(tmp_path / "evaluation.yaml"))
    assert code == 2 and problem in output and "Traceback" not in output
