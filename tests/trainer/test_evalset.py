import pytest

from embedtune.trainer.config import StorageAccess
from embedtune.trainer.errors import InputError
from embedtune.trainer.evalset import judgments, load_eval_set, passage_text
from support.tiny import write_jsonl

QUERIES = [{"id": "q1", "text": "what is a bond"}, {"id": "q2", "text": "what is equity"}]
CORPUS = [
    {"id": "d1", "text": "a bond is debt", "title": "Bonds"},
    {"id": "d2", "text": "equity is ownership"},
    {"id": "d3", "text": "unrelated"},
]
QRELS = [
    {"qid": "q1", "docid": "d1", "relevance": 2},
    {"qid": "q2", "docid": "d2", "relevance": 1},
    {"qid": "q2", "docid": "d3", "relevance": 0},
]


def _write(directory, queries=QUERIES, corpus=CORPUS, qrels=QRELS):
    write_jsonl(directory / "queries.jsonl", queries)
    write_jsonl(directory / "corpus.jsonl", corpus)
    write_jsonl(directory / "qrels.jsonl", qrels)
    return directory


def test_valid_set_loads_with_graded_judgments(tmp_path):
    eval_set = load_eval_set(str(_write(tmp_path)), tmp_path / "dl")
    assert [q["id"] for q in eval_set.queries] == ["q1", "q2"]
    assert judgments(eval_set) == {"q1": {"d1": 2}, "q2": {"d2": 1, "d3": 0}}
    assert passage_text(eval_set.corpus[0]) == "Bonds a bond is debt"
    assert passage_text(eval_set.corpus[1]) == "equity is ownership"


def test_every_problem_names_file_and_line(tmp_path):
    _write(
        tmp_path,
        queries=[
            *QUERIES,
            {"id": "q1", "text": "again"},
            {"id": "q3", "text": "never judged"},
            {"id": 4},
            '{"id": "q5", "text": "half a pair \\ud800"}',
            '{"id": "q6", "text": ' + "[" * 3000 + "]" * 3000 + "}",
        ],
        corpus=[
            *CORPUS,
            {"id": "d4", "text": ""},
            {"id": "d5", "text": "fine", "title": 3},
            '{"id": "d6", "text": "fine", "title": "\\udfff"}',
            '{"id": "d7", "text": "\\udfff"}',
        ],
        qrels=[
            *QRELS,
            {"qid": "q1", "docid": "d9", "relevance": 1},
            {"qid": "qx", "docid": "d1", "relevance": 1},
            {"qid": "q1", "docid": "d2", "relevance": "high"},
            {"qid": "q1", "docid": "d1", "relevance": 1},
        ],
    )
    with pytest.raises(InputError) as caught:
        load_eval_set(str(tmp_path), tmp_path / "dl")
    queries, corpus, qrels = (tmp_path / name for name in ("queries.jsonl", "corpus.jsonl", "qrels.jsonl"))
    assert caught.value.problems == [
        f"{queries}:7: json: nested too deeply to read (a record is an object of strings, numbers and lists)",
        f"{queries}:3: id: duplicate 'q1' (first on line 1)",
        f"{queries}:5: id: expected a string, got int",
        f"{queries}:5: text: missing",
        f"{queries}:6: text: not valid Unicode: lone surrogate \\ud800 at character 13 (a \\u escape without its pair)",
        f"{corpus}:4: text: empty string",
        f"{corpus}:5: title: expected a string, got int",
        f"{corpus}:6: title: not valid Unicode: lone surrogate \\udfff at character 1 (a \\u escape without its pair)",
        f"{corpus}:7: text: not valid Unicode: lone surrogate \\udfff at character 1 (a \\u escape without its pair)",
        f"{qrels}:4: docid: 'd9' is not an id in corpus.jsonl",
        f"{qrels}:5: qid: 'qx' is not an id in queries.jsonl",
        f"{qrels}:6: relevance: expected an integer >= 0 (0 = judged not relevant), got 'high'",
        f"{qrels}:7: docid: 'd1' judged twice for query 'q1' (first on line 1)",
    ]


def test_query_without_relevant_passage_is_an_error(tmp_path):
    _write(
        tmp_path,
        queries=[*QUERIES, {"id": "q3", "text": "never judged"}],
        qrels=[*QRELS, {"qid": "q1", "docid": "d3", "relevance": 0}],
    )
    with pytest.raises(InputError) as caught:
        load_eval_set(str(tmp_path), tmp_path / "dl")
    assert caught.value.problems == [
        f"{tmp_path / 'queries.jsonl'}:3: id: query 'q3' has no relevant passage in qrels.jsonl "
        "(add a qrels line with relevance > 0, or remove the query)"
    ]


def test_missing_files_and_bad_json(tmp_path):
    write_jsonl(tmp_path / "queries.jsonl", ['{"id": "q1"', "[1]"])
    write_jsonl(tmp_path / "corpus.jsonl", [])
    with pytest.raises(InputError) as caught:
        load_eval_set(str(tmp_path), tmp_path / "dl")
    queries = tmp_path / "queries.jsonl"
    assert caught.value.problems == [
        f"{queries}:1: json: invalid JSON (Expecting ',' delimiter at column 12)",
        f"{queries}:2: record: expected a JSON object, got list",
        f"{tmp_path / 'corpus.jsonl'}: no records",
        f"{tmp_path / 'qrels.jsonl'}: missing (an evaluation set holds queries.jsonl, corpus.jsonl, qrels.jsonl)",
    ]


def test_loads_from_s3(tmp_path, s3_bucket, s3_endpoint):
    from embedtune.trainer.storage import open_storage

    open_storage(f"{s3_bucket}/sets", StorageAccess(endpoint=s3_endpoint)).upload_dir(
        _write(tmp_path / "set"), "finance"
    )
    eval_set = load_eval_set(f"{s3_bucket}/sets/finance", tmp_path / "dl", StorageAccess(endpoint=s3_endpoint))
    assert len(eval_set.corpus) == 3 and len(eval_set.qrels) == 3
