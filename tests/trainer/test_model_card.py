"""The exported model's card: written at export, rewritten with the evaluation's metrics."""

from __future__ import annotations

import hashlib
import json

from embedtune.trainer.checkpoints import publish_dir
from embedtune.trainer.config import ModelSpec
from embedtune.trainer.contract import ConfidenceInterval, MetricsReport
from embedtune.trainer.export import export_sentence_transformers
from embedtune.trainer.model_card import update_model_card
from embedtune.trainer.storage import open_storage

SPEC = ModelSpec(base="BAAI/bge-small-en-v1.5", pooling="cls", queryInstruction="Find: ")
RECORD = {
    "training": {
        "run": {"namespace": "ml", "name": "finance", "runId": "3-abc123"},
        "step": 120,
        "finalLoss": 0.4321,
        "trainRecords": 9000,
        "data": {"train": ["s3://data/finance/train.jsonl"], "heldOutFraction": 0.1},
        "settings": {"epochs": 2, "learningRate": 1e-5, "batchSizePerDevice": 32, "groupSize": 8, "seed": 42},
    }
}
REPORT = MetricsReport(
    baseline={"ndcg@10": 0.5, "recall@10": 0.7},
    finetuned={"ndcg@10": 0.56, "recall@10": 0.75},
    delta={"ndcg@10": 0.06, "recall@10": 0.05},
    deltaInterval={
        "ndcg@10": ConfidenceInterval(low=0.021, high=0.099),
        "recall@10": ConfidenceInterval(low=-0.01, high=0.11),
    },
    queries=1200,
    corpus=48000,
    bootstrapResamples=1000,
)


def test_the_card_says_what_the_model_is_then_how_good_it_got(tiny_model, tmp_path):
    exported = export_sentence_transformers(tiny_model, tmp_path / "model", SPEC, extra=RECORD)
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers\n")
    assert "base_model: BAAI/bge-small-en-v1.5" in card
    assert "Not evaluated yet" in card
    assert "`s3://data/finance/train.jsonl`, 9000 training records" in card
    assert "learningRate 1e-05" in card and "groupSize 8" in card and "Trained 120 steps, final loss 0.4321" in card
    assert "EmbeddingFinetune `ml/finance`, run `3-abc123`" in card
    assert 'SentenceTransformer("path/to/this/folder")' in card
    assert (
        'FlagModel("path/to/this/folder", pooling_method="cls", normalize_embeddings=True, '
        "query_instruction_for_retrieval='Find: ')" in card
    )

    storage = open_storage(str(tmp_path / "stored"))
    model_uri = publish_dir(storage, exported, "run-3/model", desc="upload model")
    assert update_model_card(model_uri, REPORT, [10], None)
    card = storage.read_bytes("run-3/model/README.md").decode()
    assert "Not evaluated yet" not in card
    assert "| ndcg@10 | 0.5000 | 0.5600 | +0.0600 | [+0.0210, +0.0990] |" in card
    assert "| recall@10 | 0.7000 | 0.7500 | +0.0500 | [-0.0100, +0.1100] |" in card
    assert "On 1200 evaluation queries searched among 48000 passages" in card
    # the folder's completion marker describes the new card
    marker = json.loads(storage.read_bytes("run-3/model/_COMPLETE.json"))
    (entry,) = [f for f in marker["files"] if f["path"] == "README.md"]
    assert entry["sha256"] == hashlib.sha256(card.encode()).hexdigest() and entry["size"] == len(card.encode())


def test_a_model_embedtune_did_not_store_keeps_its_card(tiny_model, tmp_path):
    assert not update_model_card("BAAI/bge-small-en-v1.5", REPORT, [10], None)
    assert not update_model_card(str(tiny_model), REPORT, [10], None)  # no embedtune.json, no marker
