"""Distillation from teacher scores: the scores travel from the data to FlagEmbedding's loss."""

from __future__ import annotations

import json

import pytest
import torch

from embedtune.operator.cli import main as cli
from embedtune.trainer.config import DataSpec, HuggingFaceSource
from embedtune.trainer.contract import TrainerConfig
from embedtune.trainer.data import iter_jsonl, load_hugging_face, prepare_training_data
from embedtune.trainer.errors import InputError
from embedtune.trainer.runner import EmbedtuneRunner, build_model_and_data_arguments, build_training_arguments
from support.tiny import synthetic_records, write_jsonl


def scored_records(count: int, negatives: int = 3) -> list[dict]:
    rows = synthetic_records(count, negatives=negatives)
    for i, row in enumerate(rows):
        # a teacher that disagrees with the contrastive labels, so distillation visibly changes the loss
        row["pos_scores"] = [0.0]
        row["neg_scores"] = [float(2 + (i + j) % 3) for j in range(len(row["neg"]))]
    return rows


def test_scores_reach_the_prepared_file_with_distillation_and_are_dropped_without(tmp_path, caplog):
    data = write_jsonl(tmp_path / "train.jsonl", scored_records(6))
    prepared = prepare_training_data(
        DataSpec(train=[str(data)]), group_size=4, seed=0, out_dir=tmp_path / "on", distillation=True
    )
    rows = list(iter_jsonl(prepared.train_file))
    assert [(r["pos_scores"], r["neg_scores"]) for r in rows] == [
        (r["pos_scores"], r["neg_scores"]) for r in scored_records(6)
    ]
    caplog.clear()  # the INFO lines above reach it when an earlier test set the root logger to INFO
    with caplog.at_level("WARNING", logger="embedtune.trainer.data"):
        prepared = prepare_training_data(DataSpec(train=[str(data)]), group_size=4, seed=0, out_dir=tmp_path / "off")
    assert not any("pos_scores" in r for r in iter_jsonl(prepared.train_file))
    assert [record.getMessage() for record in caplog.records if record.levelname == "WARNING"] == [
        f"training data: 6 records carry pos_scores/neg_scores ({data}:1, {data}:2, {data}:3, ...); "
        "they are ignored unless training.distillation is on"
    ]


def test_distillation_names_every_record_without_scores_and_refuses_filling_unscored_negatives(tmp_path):
    rows = scored_records(4)
    del rows[1]["pos_scores"]
    del rows[3]["neg_scores"]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(InputError) as caught:
        prepare_training_data(
            DataSpec(train=[str(data)]), group_size=4, seed=0, out_dir=tmp_path / "a", distillation=True
        )
    assert caught.value.problems == [
        f"{data}:2: pos_scores: missing (training.distillation is on: every record needs a teacher score for "
        "each of its passages, or set data.teacher to score them)",
        f"{data}:4: neg_scores: missing (training.distillation is on: every record needs a teacher score for "
        "each of its passages, or set data.teacher to score them)",
    ]
    data = write_jsonl(tmp_path / "short.jsonl", scored_records(3, negatives=2))
    with pytest.raises(InputError, match="negatives filled at random have no teacher scores") as caught:
        prepare_training_data(
            DataSpec(train=[str(data)]), group_size=4, seed=0, out_dir=tmp_path / "b", distillation=True
        )
    assert caught.value.problems[0] == f"{data}:1: neg: 2 scored negatives, training.groupSize 4 needs 3"
    spec = DataSpec(train=[str(data)], hard_negatives={"mine": True})
    with pytest.raises(InputError, match="data.hardNegatives.mine: mined negatives have no teacher scores"):
        prepare_training_data(spec, group_size=3, seed=0, out_dir=tmp_path / "c", distillation=True)


def test_check_data_reports_unscored_records_with_distillation_and_ignored_scores_without(tmp_path, capsys):
    rows = scored_records(2)
    del rows[1]["pos_scores"]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    assert cli(["check-data", str(data), "--distillation"]) == 2
    assert capsys.readouterr().out.splitlines() == [
        f"{data}:2: pos_scores: missing (training.distillation is on: every record needs a teacher score for "
        "each of its passages, or set data.teacher to score them)"
    ]
    assert cli(["check-data", str(data)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"warning: 2 records carry pos_scores/neg_scores ({data}:1, {data}:2); they are ignored unless "
        "training.distillation is on (check-data --distillation checks them)",
        "ok: 2 records",
    ]


@pytest.mark.parametrize("loss_type", ["klDiv", "m3KdLoss"])
def test_flagembedding_trains_on_the_scores_with_distillation(tiny_model, tmp_path, loss_type):
    data = write_jsonl(tmp_path / "train.jsonl", scored_records(8))
    config = TrainerConfig.model_validate(
        {
            "model": {"base": str(tiny_model), "queryMaxLength": 16, "passageMaxLength": 16},
            "data": {"train": str(data)},
            "training": {"batchSizePerDevice": 4, "groupSize": 4, "distillation": {"lossType": loss_type}},
            "storage": {"uri": str(tmp_path / "storage")},
        }
    )
    prepared = prepare_training_data(config.data, 4, 0, tmp_path / "data", distillation=True)
    training_args = build_training_arguments(config, tmp_path / "out")
    assert training_args.kd_loss_type == config.training.distillation.flagembedding_loss
    runner = EmbedtuneRunner(
        *build_model_and_data_arguments(config, str(tiny_model), prepared.train_file), training_args, callbacks=[]
    )
    items = [runner.train_dataset[i] for i in range(4)]
    teacher = {json.dumps(r["query"]): r for r in scored_records(8)}
    for query, passages, scores, _ in items:  # the scores of the passages sampled, in their order
        record = teacher[json.dumps(query)]
        by_text = dict(zip(record["pos"] + record["neg"], record["pos_scores"] + record["neg_scores"]))
        assert scores == [by_text[p] for p in passages]
    batch = runner.data_collator(items)
    assert batch["passage_hashes"].shape == (16,)  # false negatives are masked by default
    runner.model.train()
    with torch.no_grad():
        distilled = runner.model(**batch).loss
        plain = runner.model(**(batch | {"teacher_scores": None})).loss
    assert torch.isfinite(distilled) and abs(distilled.item() - plain.item()) > 1e-3


def test_scores_are_read_from_a_hugging_face_dataset_through_the_column_mapping(tmp_path):
    import datasets

    rows = scored_records(3)
    datasets.Dataset.from_list(
        [
            {
                "question": r["query"],
                "pos": r["pos"],
                "neg": r["neg"],
                "teacher_neg": r["neg_scores"],
                "pos_scores": [1.0],
            }
            for r in rows
        ]
    ).save_to_disk(str(tmp_path / "hf"))
    loaded = load_hugging_face(
        HuggingFaceSource(path=str(tmp_path / "hf"), columns={"query": "question", "neg_scores": "teacher_neg"})
    )
    assert not loaded.problems
    assert [(r.pos_scores, r.neg_scores) for r in loaded.records] == [([1.0], r["neg_scores"]) for r in rows]
