"""Teacher scoring: a cross-encoder (or an embedder) scores every passage once, and the scores
are published to storage and reused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from embedtune.trainer.config import DataSpec, TeacherSpec
from embedtune.trainer.data import iter_jsonl, prepare_training_data
from embedtune.trainer.errors import InputError
from embedtune.trainer.layout import RunLayout
from embedtune.trainer.storage import open_storage
from embedtune.trainer.teacher import score_records, teacher_scored_data
from support.tiny import build_tiny_bert, synthetic_records, write_jsonl


@pytest.fixture(scope="module")
def tiny_reranker(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-reranker"), seed=3, cross_encoder=True)


def test_a_cross_encoder_scores_every_passage_of_every_record(tiny_reranker):
    records = synthetic_records(5, negatives=3)
    records[0]["pos"].append("w1 w2 w3")
    score_records(records, TeacherSpec(model=str(tiny_reranker), batch_size=4), tiny_reranker)
    tokenizer = AutoTokenizer.from_pretrained(tiny_reranker)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reranker).eval()
    for record in records:
        passages = record["pos"] + record["neg"]
        with torch.no_grad():
            inputs = tokenizer([record["query"]] * len(passages), passages, padding=True, return_tensors="pt")
            expected = model(**inputs).logits[:, 0].tolist()
        assert len(record["pos_scores"]) == len(record["pos"]) and len(record["neg_scores"]) == len(record["neg"])
        np.testing.assert_allclose(record["pos_scores"] + record["neg_scores"], expected, atol=1e-5)


def test_an_embedder_teacher_scores_by_the_similarity_of_its_vectors(tiny_model):
    records = synthetic_records(4, negatives=2)
    score_records(records, TeacherSpec(model=str(tiny_model), kind="embedder"), tiny_model)
    scores = [s for r in records for s in r["pos_scores"] + r["neg_scores"]]
    assert len(scores) == 12 and all(-1.0001 <= s <= 1.0001 for s in scores)  # cosine: it normalizes
    assert len(set(scores)) == 12


def test_an_embedding_model_is_refused_as_a_cross_encoder(tiny_model):
    with pytest.raises(InputError, match="is no cross-encoder: it lacks the weights classifier.bias"):
        score_records(synthetic_records(1), TeacherSpec(model=str(tiny_model)), tiny_model)


def test_scores_are_published_once_and_reused_by_a_rerun_of_the_same_data_and_teacher(tiny_reranker, tmp_path):
    teacher_dir = shutil.copytree(tiny_reranker, tmp_path / "teacher")
    teacher = TeacherSpec(model=str(teacher_dir))
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_records(6, negatives=2))
    storage = open_storage(str(tmp_path / "storage"))
    layout = RunLayout("ml", "tiny", "1")
    scored = list(iter_jsonl(teacher_scored_data(train, teacher, storage, layout, tmp_path / "work1")))
    assert all(len(r["neg_scores"]) == 2 for r in scored)
    shutil.rmtree(teacher_dir)  # a rerun that scored again would fail now
    rerun = RunLayout("ml", "tiny", "2")
    assert list(iter_jsonl(teacher_scored_data(train, teacher, storage, rerun, tmp_path / "work2"))) == scored
    write_jsonl(train, synthetic_records(7, negatives=2))  # other data: scored again (and the teacher is gone)
    with pytest.raises(InputError, match="data.teacher.model"):
        teacher_scored_data(train, teacher, storage, layout, tmp_path / "work1")


def test_with_a_teacher_distillation_takes_filled_and_mined_negatives_and_without_distillation_refuses(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", synthetic_records(6, negatives=1))
    spec = DataSpec(train=[str(data)], teacher=TeacherSpec(model="unused"))
    prepared = prepare_training_data(spec, group_size=4, seed=0, out_dir=tmp_path / "a", distillation=True)
    assert prepared.negatives_added == 12
    with pytest.raises(InputError, match="data.teacher: its scores train only with training.distillation on"):
        prepare_training_data(spec, group_size=4, seed=0, out_dir=tmp_path / "b")


@pytest.mark.slow
def test_two_ranks_mine_score_once_and_distill(tiny_model, tiny_reranker, tmp_path):
    """BGE's whole recipe on 2 CPU ranks: mine -> score (rank 0, published) -> distill; a rerun
    of the same data and teacher reuses the stored scores."""
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_records(40, negatives=1))
    storage_dir = tmp_path / "storage"

    def config(run_id: str):
        path = tmp_path / f"trainer-{run_id}.yaml"
        settings = {
            "model": {"base": str(tiny_model), "queryMaxLength": 16, "passageMaxLength": 16},
            "data": {
                "train": str(train),
                "hardNegatives": {"mine": True, "range": "2-20", "count": 2},
                "teacher": {"model": str(tiny_reranker), "batchSize": 16},
            },
            "training": {"maxSteps": 2, "batchSizePerDevice": 4, "groupSize": 4, "distillation": {}},
            "checkpoint": {"everySteps": 2},
            "storage": {"uri": str(storage_dir)},
            "run": {"namespace": "ml", "name": "tiny", "runId": run_id},
            "workDir": str(tmp_path / f"work-{run_id}"),
        }
        path.write_text(yaml.safe_dump(settings))
        return path

    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "embedtune.trainer.launch", "--standalone", "--nproc-per-node=2"]
    for run_id, log in (("1", "teacher scores of 40 records stored"), ("2", "teacher scores reused")):
        command = [*launch, "-m", "embedtune.trainer", "--config", str(config(run_id))]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert log in result.stderr
    (scored,) = (storage_dir / "ml" / "tiny" / "teacher-scores").glob("*/train.jsonl")
    records = list(iter_jsonl(scored))
    assert len(records) == 40 and all(len(r["neg"]) == len(r["neg_scores"]) == 3 for r in records)
