import json

import numpy as np
import pytest

from embedtune.operator.cli import main as cli
from embedtune.trainer.config import ModelSpec, StorageAccess
from embedtune.trainer.data import Record, split_held_out
from embedtune.trainer.encoding import load_encoder, model_settings
from embedtune.trainer.evalset import load_eval_set, passage_text
from embedtune.trainer.evaluate import evaluate_model
from embedtune.trainer.export import export_sentence_transformers
from support.reference import reference_metrics
from support.tiny import synthetic_records, write_jsonl

# mean pooling: a random tiny BERT's CLS vectors are nearly identical, so rankings would be float noise
SPEC = ModelSpec(
    base="tiny",
    pooling="mean",
    normalize=True,
    query_instruction="what: ",
    passage_instruction="doc: ",
    query_max_length=16,
    passage_max_length=24,
)


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    records = [Record(query=r["query"], pos=r["pos"], neg=r["neg"]) for r in synthetic_records(60, seed=3)]
    _, eval_set = split_held_out(records, 0.5, seed=1)
    directory = tmp_path_factory.mktemp("eval")
    eval_set.write(directory)
    return directory


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    return export_sentence_transformers(tiny_model, tmp_path_factory.mktemp("st") / "model", SPEC)


def test_exported_settings_round_trip_and_flags_override_them(exported):
    model = load_encoder(exported)
    assert model_settings(model, "tiny") == SPEC
    overridden = load_encoder(exported, {"query_instruction": "find: ", "pooling": "cls"})
    assert model_settings(overridden, "tiny") == SPEC.model_copy(
        update={"query_instruction": "find: ", "pooling": "cls"}
    )


@pytest.mark.parametrize("padding_free", [False, True])
def test_metrics_match_an_independent_computation(exported, eval_dir, tmp_path, padding_free):
    eval_set = load_eval_set(str(eval_dir), tmp_path)
    model = load_encoder(exported)
    ks = (1, 3, 10)
    ours = evaluate_model(model, eval_set, ks, chunk_size=7, padding_free=padding_free)["dense"]
    # by hand: the instruction prefixed as text, the model's plain encode, numpy ranking
    queries = model.encode(["what: " + q["text"] for q in eval_set.queries], task="query")
    passages = model.encode(["doc: " + passage_text(p) for p in eval_set.corpus], task="document")
    assert ours == pytest.approx(reference_metrics(queries, passages, eval_set, ks), abs=1e-6)


def test_cli_compares_with_baseline_and_writes_metrics(exported, tiny_model, eval_dir, tmp_path, capsys):
    output = tmp_path / "out" / "metrics.json"
    code = cli(
        [
            "evaluate",
            "--model",
            str(exported),
            "--baseline",
            str(tiny_model),
            "--eval-set",
            str(eval_dir),
            "--k",
            "10,1",
            "--output",
            str(output),
            "--pooling",
            "mean",
            "--query-instruction",
            "what: ",
        ]
    )
    assert code == 0
    report = json.loads(output.read_text())
    assert report["queries"] == 30 and report["corpus"] == 60
    assert list(report["finetuned"]) == [
        "ndcg@1",
        "ndcg@10",
        "recall@1",
        "recall@10",
        "mrr@1",
        "mrr@10",
        "map@1",
        "map@10",
        "precision@1",
        "precision@10",
    ]
    for key, value in report["delta"].items():
        assert value == pytest.approx(report["finetuned"][key] - report["baseline"][key])
    table = capsys.readouterr().out
    assert "baseline" in table and "delta" in table
    assert f"{report['finetuned']['ndcg@10']:.4f}" in table


def test_cli_reads_and_writes_storage_and_patches_status(exported, eval_dir, s3_bucket, s3_endpoint, monkeypatch):
    from embedtune.trainer import status
    from embedtune.trainer.storage import open_storage

    storage = open_storage(s3_bucket, StorageAccess(endpoint=s3_endpoint))
    storage.upload_dir(eval_dir, "run-1/eval")
    storage.upload_dir(exported, "run-1/model")
    patches = []

    class FakeApi:
        def patch_namespaced_custom_object_status(self, *args):
            patches.append(args)

    monkeypatch.setattr(status, "_custom_objects_api", FakeApi)
    code = cli(
        [
            "evaluate",
            "--model",
            f"{s3_bucket}/run-1/model",
            "--eval-set",
            f"{s3_bucket}/run-1/eval",
            "--output",
            f"{s3_bucket}/run-1/metrics.json",
            "--patch-status",
            "ml/finance",
            "--storage-endpoint",
            s3_endpoint,
            "--k",
            "10",
        ]
    )
    assert code == 0
    report = json.loads(storage.read_bytes("run-1/metrics.json"))
    assert report["baseline"] is None and report["delta"] is None and report["finetuned"]["ndcg@10"] > 0
    ((group, version, namespace, plural, name, body),) = patches
    assert (group, version, namespace, plural, name) == (
        "embedtune.io",
        "v1alpha1",
        "ml",
        "embeddingfinetunes",
        "finance",
    )
    # the status shows 4 significant digits; metrics.json keeps the exact values
    finetuned = {key: float(f"{value:.4g}") for key, value in report["finetuned"].items()}
    unset = dict.fromkeys(
        ["baseline", "delta", "deltaInterval", "modes", "merged", "mergedDelta", "mergedDeltaInterval", "retention"]
    )
    assert body == {"status": {"metrics": unset | {"finetuned": finetuned}}}
    assert finetuned != report["finetuned"]


def test_cli_input_errors_exit_2(exported, eval_dir, tmp_path, capsys):
    write_jsonl(tmp_path / "bad" / "queries.jsonl", [{"id": "q1", "text": "x"}, {"id": "q1", "text": "y"}])
    write_jsonl(tmp_path / "bad" / "corpus.jsonl", [{"id": "d1", "text": "x"}])
    write_jsonl(tmp_path / "bad" / "qrels.jsonl", [{"qid": "q1", "docid": "d2", "relevance": 1}])
    assert cli(["evaluate", "--model", str(exported), "--eval-set", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bad' / 'queries.jsonl'}:2: id: duplicate 'q1'" in err
    assert f"{tmp_path / 'bad' / 'qrels.jsonl'}:1: docid: 'd2' is not an id in corpus.jsonl" in err

    assert cli(["evaluate", "--model", str(exported), "--eval-set", str(eval_dir), "--k", "0,10"]) == 2
    assert "--k 0,10: expected positive integers" in capsys.readouterr().err
    assert cli(["evaluate", "--model", str(tmp_path / "nowhere"), "--eval-set", str(eval_dir)]) == 2
    assert f"model: cannot load '{tmp_path / 'nowhere'}': no such file or directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as parse_error:  # argparse's own exit code for a bad flag is 2 too
        cli(["evaluate", "--model", str(exported), "--eval-set", str(eval_dir), "--batch-size", "0"])
    assert parse_error.value.code == 2
    assert "--batch-size: '0': expected a positive integer" in capsys.readouterr().err


def test_half_precision_encodes_close_to_fp32(exported):
    import torch

    from embedtune.trainer.encoding import encode_queries

    texts = ["what is w1 w2 w3", "w4 w5"]
    full = encode_queries(load_encoder(exported, precision="auto"), texts)  # fp32 on CPU
    half_model = load_encoder(exported, precision="bf16")
    assert next(half_model.parameters()).dtype == torch.bfloat16
    half = encode_queries(half_model, texts)
    assert half.dtype == np.float32 and np.allclose(half, full, atol=3e-2) and not np.array_equal(half, full)


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_index_on_a_small_corpus_matches_exact(exported, eval_dir, tmp_path, index):
    eval_set = load_eval_set(str(eval_dir), tmp_path)
    model = load_encoder(exported)
    exact = evaluate_model(model, eval_set, (1, 10))["dense"]
    # 60 passages: one IVF list, and an HNSW search wider than the graph; both see everything
    assert evaluate_model(model, eval_set, (1, 10), index=index)["dense"] == pytest.approx(exact)


def test_matryoshka_dimensions_are_each_a_column_set(exported, eval_dir, tmp_path):
    from embedtune.trainer.evaluate import format_table, metrics_report, score_queries

    eval_set = load_eval_set(str(eval_dir), tmp_path)
    model = load_encoder(exported)
    ks = (1, 10)
    scores = evaluate_model(model, eval_set, ks, dimensions=[32, 4])
    assert list(scores) == ["dense", "dense-32", "dense-4"]
    assert scores["dense-32"] == pytest.approx(scores["dense"])  # the whole vector
    assert scores["dense-4"] != pytest.approx(scores["dense"])
    # by hand: the first 4 values, re-normalized, ranked with numpy
    queries = model.encode(["what: " + q["text"] for q in eval_set.queries], task="query")[:, :4]
    passages = model.encode(["doc: " + passage_text(p) for p in eval_set.corpus], task="document")[:, :4]
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    passages /= np.linalg.norm(passages, axis=1, keepdims=True)
    assert scores["dense-4"] == pytest.approx(reference_metrics(queries, passages, eval_set, ks), abs=1e-6)

    per_query = score_queries(model, eval_set, ks, dimensions=[32, 4])
    report = metrics_report({"baseline": per_query, "finetuned": per_query}, eval_set)
    assert report.finetuned == scores["dense"] and set(report.modes) == {"dense-32", "dense-4"}
    assert report.modes["dense-4"].delta["ndcg@10"] == 0.0
    assert "dense-4" in format_table(report, ks)


def test_base_finetuned_and_merged_are_scored_on_the_evaluation_and_retention_sets(
    exported, tiny_model, eval_dir, tmp_path
):
    from embedtune.trainer.contract import EvaluationConfig
    from embedtune.trainer.evaluate import format_table, run_evaluation
    from embedtune.trainer.merge import merge_models
    from support.tiny import build_tiny_bert

    other = build_tiny_bert(tmp_path / "other", seed=5)
    merged_hf = merge_models([tiny_model, other], [0.5, 0.5], tmp_path / "merged-hf", trust_remote_code=False)
    merged = export_sentence_transformers(merged_hf, tmp_path / "merged", SPEC)
    retention = tmp_path / "retention"
    records = [Record(query=r["query"], pos=r["pos"], neg=r["neg"]) for r in synthetic_records(20, seed=9)]
    split_held_out(records, 0.5, seed=2)[1].write(retention)
    config = EvaluationConfig(
        model=str(exported),
        baseline=str(tiny_model),
        merged=str(merged),
        eval_set=str(eval_dir),
        retention_set=str(retention),
        k_values=[1, 10],
        encoding={"pooling": SPEC.pooling},
    )
    report = run_evaluation(config)
    assert report.merged is not None and report.retention is not None
    assert report.retention.merged is not None and report.retention.baseline is not None
    for key in report.finetuned:
        assert report.merged_delta[key] == pytest.approx(report.merged[key] - report.baseline[key])
    # the merged model is another model: its scores are its own, not a copy of either column
    assert report.merged != report.finetuned or report.retention.merged != report.retention.finetuned
    table = format_table(report, [1, 10])
    assert "baseline   finetuned      merged       delta mergedDelta" in table
    assert "\nretention " in table
    assert report.merged_delta_interval is not None  # every delta comes with its interval
