import json

import numpy as np
import pytest

from embedtune.operator.cli import main as cli
from embedtune.trainer.config import DataSpec, HardNegativesSpec, ModelSpec
from embedtune.trainer.data import Record, iter_jsonl, prepare_training_data
from embedtune.trainer.encoding import load_encoder
from embedtune.trainer.errors import InputError
from embedtune.trainer.mining import load_candidates, mine_hard_negatives
from support.tiny import synthetic_records, write_jsonl

# mean pooling: a random tiny BERT's CLS vectors are nearly identical
OVERRIDES = {"pooling": "mean", "normalize": True}


@pytest.fixture(scope="module")
def encoder(tiny_model):
    return load_encoder(tiny_model, OVERRIDES)


def _records(count=40, seed=5):
    records = [Record(query=r["query"], pos=r["pos"], neg=r["neg"][:1]) for r in synthetic_records(count, seed=seed)]
    # a second record for the first query, with another positive: that one is a positive of the query too
    records.append(Record(query=records[0].query, pos=[records[1].pos[0]]))
    return records


def _rank_and_scores(encoder, query, corpus):
    """Independently: the 1-based rank and score of every corpus text for one query."""
    q = encoder.encode_query([query])[0]
    scores = encoder.encode_document(corpus) @ q
    order = np.argsort(-scores, kind="stable")
    return {corpus[j]: (rank, float(scores[j])) for rank, j in enumerate(order, start=1)}


def test_never_a_positive_the_query_or_a_duplicate(encoder):
    records = _records()
    queries = [r.query for r in records]
    positives = {}
    for r in records:
        positives.setdefault(r.query, set()).update(r.pos)
    pool = list(dict.fromkeys([p for r in records for p in (*r.pos, *r.neg)] + queries))  # query texts as passages
    before = [list(r.neg) for r in records]
    spec = HardNegativesSpec(range="0-500", count=500)  # takes every eligible candidate
    summary = mine_hard_negatives(records, encoder, spec, seed=1, candidates=pool)
    assert summary.mined == sum(len(r.neg) - len(b) for r, b in zip(records, before)) > 0
    for record, old in zip(records, before):
        mined = record.neg[len(old) :]
        assert record.neg[: len(old)] == old  # the record's own negatives are kept
        assert len(set(record.neg)) == len(record.neg)  # no duplicate, none of its own repeated
        assert not set(mined) & positives[record.query], "a positive was mined"
        assert record.query not in mined
    assert records[0].pos[0] not in records[-1].neg and records[1].pos[0] not in records[0].neg


def test_window_respected(encoder):
    records = _records()
    corpus = list(dict.fromkeys(p for r in records for p in (*r.pos, *r.neg)))
    before = [len(r.neg) for r in records]
    mine_hard_negatives(records, encoder, HardNegativesSpec(range="5-15", count=4), seed=0)
    for record, old in zip(records, before):
        ranks = _rank_and_scores(encoder, record.query, corpus)
        mined = record.neg[old:]
        assert len(mined) == 4
        assert all(5 < ranks[text][0] <= 15 for text in mined), [ranks[text][0] for text in mined]


def test_deterministic_for_a_seed(encoder):
    def mined(seed):
        records = _records()
        mine_hard_negatives(records, encoder, HardNegativesSpec(range="2-30", count=5), seed=seed)
        return [r.neg for r in records]

    assert mined(3) == mined(3)
    assert mined(3) != mined(4)


def test_false_negative_guard_skips_candidates_scoring_near_the_positive(encoder):
    records = _records()
    corpus = list(dict.fromkeys(p for r in records for p in (*r.pos, *r.neg)))
    before = [len(r.neg) for r in records]
    ratio = 0.9
    summary = mine_hard_negatives(
        records, encoder, HardNegativesSpec(range="0-40", count=40, max_score_ratio=ratio), seed=0
    )
    assert summary.guarded > 0
    positives = {}
    for r in records:
        positives.setdefault(r.query, set()).update(r.pos)
    for record, old in zip(records, before):
        scores = _rank_and_scores(encoder, record.query, corpus)
        lowest = min(scores[p][1] for p in positives[record.query])
        assert all(scores[text][1] <= ratio * lowest + 1e-5 for text in record.neg[old:])
    unguarded = _records()
    mine_hard_negatives(unguarded, encoder, HardNegativesSpec(range="0-40", count=40), seed=0)
    assert sum(map(len, (r.neg for r in unguarded))) > sum(map(len, (r.neg for r in records)))


def test_training_data_preparation_mines_with_the_base_model(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [r | {"neg": []} for r in synthetic_records(30, seed=2)])
    spec = DataSpec(
        train=[str(data)], held_out_fraction=0.2, hard_negatives=HardNegativesSpec(mine=True, range="1-10", count=3)
    )
    model = ModelSpec(base=str(tiny_model), pooling="mean")
    prepared = prepare_training_data(
        spec, group_size=4, seed=0, out_dir=tmp_path / "out", model=model, model_path=tiny_model
    )
    rows = list(iter_jsonl(prepared.train_file))
    assert len(rows) == 24 and prepared.negatives_added == 0  # mining gave every record its 3 negatives
    held_out = {q["text"] for q in iter_jsonl(prepared.eval_dir / "queries.jsonl")}
    assert all(len(row["neg"]) == 3 and row["query"] not in held_out for row in rows)
    # the mined passages come from the training records only (the held-out split happened first)
    train_passages = {p for row in rows for p in row["pos"]}
    assert all(set(row["neg"]) <= train_passages for row in rows)


def test_mine_cli(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", synthetic_records(20, seed=4))
    output = tmp_path / "mined.jsonl"
    assert (
        cli(
            [
                "mine",
                str(data),
                "--model",
                str(tiny_model),
                "--output",
                str(output),
                "--range",
                "2-12",
                "--count",
                "2",
                "--pooling",
                "mean",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 20 and all(len(row["neg"]) == 3 + 2 for row in rows)
    assert "mined 40 negatives for 20 records" in capsys.readouterr().err


def test_mine_cli_input_errors_exit_2(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [{"query": "q", "pos": []}])
    assert cli(["mine", str(data), "--model", str(tiny_model), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert f"{data}:1: pos: empty list" in capsys.readouterr().err
    assert (
        cli(
            [
                "mine",
                str(data),
                "--model",
                str(tiny_model),
                "--output",
                str(tmp_path / "o.jsonl"),
                "--range",
                "20-10",
                "--count",
                "0",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--range: '20-10': expected FIRST-LAST with FIRST < LAST" in err
    assert "--count: Input should be greater than or equal to 1" in err


def test_hard_negatives_config_is_validated_by_field_path(tmp_path):
    from embedtune.trainer.contract import TrainerConfig, load_config
    from embedtune.trainer.errors import InputError

    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {base: m}\nstorage: {uri: /s}\n"
        "data: {train: t.jsonl, hardNegatives: {mine: true, range: '10-100', count: 5, maxScoreRatio: 0.9}}\n"
    )
    mining = load_config(path, TrainerConfig).data.hard_negatives
    assert (mining.mine, mining.rank_range, mining.count, mining.max_score_ratio) == (True, "10-100", 5, 0.9)
    path.write_text(
        "model: {base: m}\nstorage: {uri: /s}\n"
        "data: {train: t.jsonl, hardNegatives: {range: '100-10', count: 0, maxScoreRatio: 2}}\n"
    )
    with pytest.raises(InputError) as caught:
        load_config(path, TrainerConfig)
    assert caught.value.problems == [
        "config.data.hardNegatives.range: '100-10': expected FIRST-LAST with FIRST < LAST, e.g. 10-100",
        "config.data.hardNegatives.count: Input should be greater than or equal to 1",
        "config.data.hardNegatives.maxScoreRatio: Input should be less than or equal to 1",
    ]


def test_candidate_pool_problems_name_their_lines(tmp_path):
    path = write_jsonl(
        tmp_path / "pool.jsonl",
        [
            {"text": "a"},
            "",
            "{bad",
            {"text": " "},
            {"passage": "b"},
            '{"text": "\\ud800"}',
            '{"text": ' + "[" * 3000 + "]" * 3000 + "}",
            '"text"',
        ],
    )
    with pytest.raises(InputError) as caught:
        load_candidates(path)
    assert caught.value.problems == [
        f"{path}:3: json: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{path}:4: text: empty string",
        f"{path}:5: text: missing",
        f"{path}:6: text: not valid Unicode: lone surrogate \\ud800 at character 1 (a \\u escape without its pair)",
        f"{path}:7: json: nested too deeply to read (a record is an object of strings, numbers and lists)",
        f"{path}:8: record: expected a JSON object, got str",
    ]
