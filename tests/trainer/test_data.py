import json
from pathlib import Path

import pytest

from embedtune.operator.cli import main as cli
from embedtune.trainer.config import DataSpec, HuggingFaceSource
from embedtune.trainer.data import (
    Record,
    data_warnings,
    fill_negatives,
    iter_jsonl,
    load_hugging_face,
    load_jsonl,
    prepare_training_data,
    split_held_out,
)
from embedtune.trainer.errors import InputError
from support.tiny import synthetic_records, write_jsonl

GOOD = {"query": "q", "pos": ["p"], "neg": ["n1", "n2"]}

BAD_LINES = [
    ('{"query": "q", "pos": ["p"]', "json: invalid JSON"),
    ('["not", "an", "object"]', "record: expected a JSON object, got list"),
    ('{"pos": ["p"]}', "query: missing"),
    ('{"query": 7, "pos": ["p"]}', "query: expected a string, got int"),
    ('{"query": "  ", "pos": ["p"]}', "query: empty string"),
    ('{"query": "q"}', "pos: missing (need at least one positive passage)"),
    ('{"query": "q", "pos": []}', "pos: empty list (need at least one positive passage)"),
    ('{"query": "q", "pos": "p"}', "pos: expected a list of strings, got str"),
    ('{"query": "q", "pos": ["p", null]}', "pos[1]: expected a string, got null"),
    ('{"query": "q", "pos": ["p"], "neg": [""]}', "neg[0]: empty string"),
    ('{"query": "q", "pos": ["p"], "pos_scores": [1, 2]}', "pos_scores: 2 scores for 1 pos passages"),
    ('{"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": ["x"]}', "neg_scores: expected a list of numbers"),
    ('{"query": "q", "pos": ["p"], "prompt": 3}', "prompt: expected a string, got int"),
    ('{"query": "q", "pos": ' + "[" * 3000 + "]" * 3000 + "}", "json: nested too deeply to read"),
    ('{"query": "q\\ud800", "pos": ["p"]}', "query: not valid Unicode: lone surrogate \\ud800 at character 2"),
    ('{"query": "q", "pos": ["p", "\\udc00"]}', "pos[1]: not valid Unicode: lone surrogate \\udc00"),
    ('{"query": "q", "pos": ["p"], "neg": ["n", "x\\ud83d"]}', "neg[1]: not valid Unicode: lone surrogate \\ud83d"),
    ('{"query": "q", "pos": ["p"], "prompt": "\\ud800"}', "prompt: not valid Unicode: lone surrogate \\ud800"),
    ('{"query": "q", "pos": ["p", "o"], "neg": ["n", " o"]}', "neg[1]: same text as pos[1] (a passage cannot be both"),
    ('{"query": "q", "pos": ["p"], "pos_scores": [NaN]}', "pos_scores[0]: expected a finite number, got nan"),
    (
        '{"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": [-Infinity]}',
        "neg_scores[0]: expected a finite number",
    ),
    ('{"query": "q", "pos": ["p"], "pos_scores": [1e999]}', "pos_scores[0]: expected a finite number, got inf"),
    ('{"query": "q", "pos": ["p"], "pos_scores": [1' + "0" * 400 + "]}", "pos_scores[0]: expected a finite number"),
]


def test_every_bad_record_is_reported_with_file_line_and_field(tmp_path):
    lines = [json.dumps(GOOD)] + [line for line, _ in BAD_LINES] + ["", json.dumps(GOOD)]
    data = write_jsonl(tmp_path / "train.jsonl", lines)
    result = load_jsonl([data])
    assert len(result.records) == 2  # only the valid ones, and nothing silently dropped:
    assert len(result.problems) == len(BAD_LINES)
    for index, ((_, reason), problem) in enumerate(zip(BAD_LINES, result.problems), start=2):
        assert problem.startswith(f"{data}:{index}: {reason}"), problem


def test_directory_of_files_and_missing_paths(tmp_path):
    write_jsonl(tmp_path / "d" / "a.jsonl", [GOOD])
    write_jsonl(tmp_path / "d" / "sub" / "b.json", [GOOD, GOOD])
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    write_jsonl(tmp_path / "empty.jsonl", [])
    result = load_jsonl([tmp_path / "d", tmp_path / "missing.jsonl", tmp_path / "empty.jsonl"])
    assert len(result.records) == 3
    assert result.problems == [
        f"{tmp_path / 'missing.jsonl'}: no such file or directory",
        f"{tmp_path / 'empty.jsonl'}: no records",
    ]


def test_check_data_cli_prints_every_problem_and_exits_2(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [GOOD, '{"query": "q", "pos": []}', "{oops"])
    assert cli(["check-data", str(data)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{data}:2: pos: empty list (need at least one positive passage)",
        f"{data}:3: json: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
    ]


def test_check_data_cli_accepts_valid_data(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", synthetic_records(5))
    assert cli(["check-data", str(data)]) == 0
    assert "ok: 5 records" in capsys.readouterr().err


USELESS = [
    {"query": "a", "pos": ["b"], "neg": ["c"]},
    {"query": "a", "pos": ["b"], "neg": ["c"]},  # line 1 again
    {"query": "a", "pos": ["b"], "neg": ["c"], "prompt": "p: "},  # another prompt: not a repeat
    {"query": "same", "pos": ["x", " same"]},
    {"query": "self", "pos": ["x"], "neg": ["self"]},
    {"query": "d", "pos": ["x", "x"]},
    {"query": "d", "pos": ["y"], "neg": ["z", "z "]},
    {"query": " a", "pos": ["e"], "neg": ["b"]},  # "b" is a positive of "a" on line 1
    *[{"query": "a", "pos": ["b"], "neg": ["c"]}] * 3,
]


def test_useless_records_are_counted_by_kind_with_their_first_lines(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", USELESS)
    warnings = [
        f"4 records repeating an earlier record (the same query, pos, neg and prompt): {data}:2 (as {data}:1), "
        f"{data}:9 (as {data}:1), {data}:10 (as {data}:1), ...",
        f"1 record whose query is also one of its positives (an identical pair teaches nothing): {data}:4",
        f"1 record whose query is also one of its negatives: {data}:5",
        f"2 records with the same passage twice in pos or in neg: {data}:6, {data}:7",
        f"1 record with a negative that another record of the same query has as a positive (trained both ways): "
        f"{data}:8",
    ]
    assert data_warnings(load_jsonl([data])) == warnings
    assert cli(["check-data", str(data)]) == 0  # only warnings: still valid
    assert capsys.readouterr().err.splitlines() == [f"warning: {w}" for w in warnings] + ["ok: 11 records"]


def test_training_logs_the_warnings_at_the_start(tmp_path, caplog):
    data = write_jsonl(tmp_path / "train.jsonl", synthetic_records(5) + [{"query": "p", "pos": ["p"]}])
    with caplog.at_level("WARNING", logger="embedtune.trainer.data"):
        prepare_training_data(DataSpec(train=[str(data)]), group_size=2, seed=0, out_dir=tmp_path / "out")
    assert caplog.messages == [
        f"training data: 1 record whose query is also one of its positives (an identical pair teaches nothing): "
        f"{data}:6"
    ]


def test_check_data_checks_a_candidate_pool(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [GOOD])
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"text": "a"}, {"text": "b\udc00"}, {"txt": "c"}])
    assert cli(["check-data", str(data), "--candidates", str(pool)]) == 2
    assert capsys.readouterr().out.splitlines() == [
        f"{pool}:2: text: not valid Unicode: lone surrogate \\udc00 at character 2 (a \\u escape without its pair)",
        f"{pool}:3: text: missing",
    ]
    write_jsonl(pool, [{"text": "a"}, {"text": "b"}])
    assert cli(["check-data", "--candidates", str(pool)]) == 0
    assert "ok: 0 records, 2 candidates" in capsys.readouterr().err


def test_training_refuses_invalid_data_with_the_same_report(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [GOOD, '{"query": "q", "pos": []}'])
    with pytest.raises(InputError) as caught:
        prepare_training_data(DataSpec(train=[str(data)]), group_size=2, seed=0, out_dir=tmp_path / "out")
    assert caught.value.problems == [f"{data}:2: pos: empty list (need at least one positive passage)"]
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_missing_negatives_are_filled_from_other_records_never_own_positives():
    records = [
        Record(query=f"q{i}", pos=[f"p{i}", f"shared{i % 3}"], neg=[f"n{i}"] if i % 2 else []) for i in range(40)
    ]
    added = fill_negatives(records, group_size=6, seed=7)
    assert added == sum(5 - (1 if i % 2 else 0) for i in range(40))
    for record in records:
        assert len(record.neg) == 5
        assert len(set(record.neg)) == 5  # no duplicates
        assert not set(record.neg) & set(record.pos)
    again = [Record(query=f"q{i}", pos=[f"p{i}", f"shared{i % 3}"], neg=[f"n{i}"] if i % 2 else []) for i in range(40)]
    fill_negatives(again, group_size=6, seed=7)
    assert [r.neg for r in again] == [r.neg for r in records]  # seeded


def test_filling_negatives_fails_clearly_when_data_is_too_small():
    records = [Record(query="a", pos=["x"]), Record(query="b", pos=["y"])]
    with pytest.raises(InputError, match="training.groupSize: 8 needs 7 negatives per query"):
        fill_negatives(records, group_size=8, seed=0)


def test_held_out_split_never_trains_on_a_held_out_query():
    records = [Record(query=f"query {i % 50}", pos=[f"passage {i}", "common"]) for i in range(120)]
    train, eval_set = split_held_out(records, fraction=0.2, seed=3)
    held = {q["text"] for q in eval_set.queries}
    assert len(held) == 10
    assert not held & {r.query for r in train}
    assert len(train) + sum(1 for r in records if r.query in held) == len(records)
    # corpus: every positive of the whole dataset, deduplicated
    assert sorted(d["text"] for d in eval_set.corpus) == sorted({p for r in records for p in r.pos})
    ids = {d["id"] for d in eval_set.corpus}
    qids = {q["id"] for q in eval_set.queries}
    assert {q["qid"] for q in eval_set.qrels} == qids
    assert all(q["docid"] in ids and q["relevance"] == 1 for q in eval_set.qrels)
    by_text = {d["id"]: d["text"] for d in eval_set.corpus}
    query_text = {q["id"]: q["text"] for q in eval_set.queries}
    for rel in eval_set.qrels:  # each qrel points at a positive of that query
        assert any(r.query == query_text[rel["qid"]] and by_text[rel["docid"]] in r.pos for r in records)
    assert split_held_out(records, 0.2, 3)[1] == eval_set
    assert split_held_out(records, 0.2, 4)[1].queries != eval_set.queries


def test_prepare_writes_train_and_eval_files(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", synthetic_records(30, negatives=1))
    prepared = prepare_training_data(
        DataSpec(train=[str(data)], held_out_fraction=0.1), group_size=4, seed=1, out_dir=tmp_path / "out"
    )
    assert prepared.eval_queries == 3 and prepared.train_records == 27
    rows = list(iter_jsonl(prepared.train_file))
    assert len(rows) == 27 and all(len(r["neg"]) == 3 for r in rows)
    assert {p.name for p in prepared.eval_dir.iterdir()} == {"queries.jsonl", "corpus.jsonl", "qrels.jsonl"}


def _save_hf(tmp_path: Path, rows: dict) -> Path:
    import datasets

    path = tmp_path / "hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(path))
    return path


def test_hugging_face_dataset_with_column_mapping(tmp_path, capsys):
    path = _save_hf(
        tmp_path,
        {"question": ["what is a bond?", "what is equity?"], "context": ["A bond is debt.", "Equity is ownership."]},
    )
    result = load_hugging_face(HuggingFaceSource(path=str(path), columns={"query": "question", "pos": "context"}))
    assert result.problems == []
    assert [(r.query, r.pos, r.neg) for r in result.records] == [
        ("what is a bond?", ["A bond is debt."], []),
        ("what is equity?", ["Equity is ownership."], []),
    ]
    assert cli(["check-data", str(path), "--column", "query=question", "--column", "pos=context"]) == 0


def test_hugging_face_problems_name_the_row_and_bad_mappings_the_field(tmp_path):
    path = _save_hf(tmp_path, {"question": ["ok", ""], "context": ["fine", "text"]})
    result = load_hugging_face(HuggingFaceSource(path=str(path), columns={"query": "question", "pos": "context"}))
    assert result.problems == [f"{path}[train]:2: query: empty string"]
    with pytest.raises(InputError) as caught:
        load_hugging_face(HuggingFaceSource(path=str(path), columns={"query": "title", "pos": "context"}))
    assert caught.value.problems == [
        "data.huggingFace.columns.query: column 'title' not in dataset (has: question, context)"
    ]
