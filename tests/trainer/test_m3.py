"""bge-m3's unified fine-tuning: its export loads in FlagEmbedding's BGEM3FlagModel and its
dense part in sentence-transformers, each reproducing what the trainer's model computes."""

import io

import numpy as np
import pytest
import torch
from FlagEmbedding import BGEM3FlagModel
from FlagEmbedding.finetune.embedder.encoder_only.m3 import EncoderOnlyEmbedderM3Runner
from transformers import AutoTokenizer

from embedtune.trainer.config import ModelSpec
from embedtune.trainer.export import export_sentence_transformers
from embedtune.trainer.m3 import HEAD_FILES, EmbedtuneM3Model
from embedtune.trainer.storage import open_storage
from support.tiny import build_tiny_xlm_roberta
from support.trainer_runs import RUN, losses, run_trainer, write_config

TEXTS = ["what is w1 w2 w3", "w10 w11 w200 w12", "about w5", "w6 w5 w4 w3 w2 w1 w0 w1 w2"]
MAX_LENGTH = 32


@pytest.fixture
def trained_m3(tiny_xlm_roberta, tmp_path):
    """A checkpoint as the M3 trainer saves it: encoder, tokenizer, and random (not identity) heads."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_xlm_roberta)
    torch.manual_seed(3)
    model = EmbedtuneM3Model(
        EncoderOnlyEmbedderM3Runner.get_model(str(tiny_xlm_roberta), colbert_dim=24),
        tokenizer=tokenizer,
        sentence_pooling_method="cls",
        normalize_embeddings=True,
        unified_finetuning=True,
    ).eval()
    model.save(str(tmp_path / "checkpoint"))
    tokenizer.save_pretrained(tmp_path / "checkpoint")
    return model, tmp_path / "checkpoint"


def cosine(a, b) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a).float(), torch.as_tensor(b).float(), dim=-1)


def test_the_export_loads_in_bgem3flagmodel_and_sentence_transformers_with_the_trainers_outputs(trained_m3, tmp_path):
    from sentence_transformers import SentenceTransformer

    model, checkpoint = trained_m3
    spec = ModelSpec(base="x", outputs=["dense", "sparse", "colbert"], passage_max_length=MAX_LENGTH)
    exported = export_sentence_transformers(checkpoint, tmp_path / "model", spec)

    features = model.tokenizer(TEXTS, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        dense, sparse, colbert = model._encode(dict(features))

    m3 = BGEM3FlagModel(str(exported), use_fp16=False, devices="cpu", colbert_dim=24)
    out = m3.encode(TEXTS, max_length=MAX_LENGTH, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    assert cosine(out["dense_vecs"], dense).min() >= 0.9999
    for i, weights in enumerate(out["lexical_weights"]):
        assert weights, "every text has token weights"
        vector = torch.zeros(sparse.shape[1])
        for token_id, weight in weights.items():
            vector[int(token_id)] = float(weight)
        assert cosine(vector, sparse[i]) >= 0.9999
        tokens = int(features["attention_mask"][i].sum()) - 1  # ColBERT vectors skip the CLS token
        assert out["colbert_vecs"][i].shape == (tokens, 24)
        assert cosine(out["colbert_vecs"][i], colbert[i, :tokens]).min() >= 0.9999

    st = SentenceTransformer(str(exported), device="cpu")
    assert cosine(st.encode_document(TEXTS), dense).min() >= 0.9999


@pytest.fixture
def m3_eval_set(tmp_path):
    from embedtune.trainer.data import Record, split_held_out
    from embedtune.trainer.evalset import load_eval_set
    from support.tiny import synthetic_records

    records = [Record(query=r["query"], pos=r["pos"], neg=r["neg"]) for r in synthetic_records(40, seed=5)]
    _, eval_set = split_held_out(records, 0.5, seed=1)
    eval_set.write(tmp_path / "eval")
    return load_eval_set(str(tmp_path / "eval"), tmp_path / "work")


def test_each_mode_ranks_as_bgem3flagmodel_scores(trained_m3, m3_eval_set, tmp_path):
    """sparse searches the corpus; colbert and hybrid re-rank the dense top candidates by the
    scores FlagEmbedding's own compute_score gives each pair (hybrid: weighted 0.4/0.2/0.4)."""
    from embedtune.trainer.contract import HybridWeights
    from embedtune.trainer.encoding import encode_passages, encode_queries, load_encoder, load_m3_encoder
    from embedtune.trainer.evalset import passage_text
    from embedtune.trainer.evaluate import m3_rankings
    from embedtune.trainer.search import search

    _, checkpoint = trained_m3
    spec = ModelSpec(base="x", outputs=["dense", "sparse", "colbert"], query_max_length=16, passage_max_length=24)
    exported = export_sentence_transformers(checkpoint, tmp_path / "model", spec)
    encoder, m3 = load_encoder(exported), load_m3_encoder(exported, spec)
    queries = [q["text"] for q in m3_eval_set.queries]
    passages = [passage_text(p) for p in m3_eval_set.corpus]
    depth, k = 8, 5
    scores, positions = search(encode_queries(encoder, queries), encode_passages(encoder, passages), depth)
    found = m3_rankings(m3, m3_eval_set, ["sparse", "colbert", "hybrid"], scores, positions, k, HybridWeights())

    every_pair = m3.compute_score(
        [(q, p) for q in queries for p in passages], weights_for_different_modes=[0.4, 0.2, 0.4]
    )
    sparse = np.array(every_pair["sparse"]).reshape(len(queries), len(passages))
    for i in range(len(queries)):
        expected = sorted((p for p in range(len(passages)) if sparse[i, p] > 0), key=lambda p: (-sparse[i, p], p))[:k]
        assert list(found["sparse"][i][: len(expected)]) == expected
        for mode, key in (("colbert", "colbert"), ("hybrid", "colbert+sparse+dense")):
            pair = np.array(every_pair[key]).reshape(len(queries), len(passages))
            expected = sorted(positions[i], key=lambda p: (-pair[i, p], p))[:k]
            assert list(found[mode][i]) == expected, (mode, i)


def test_evaluate_reports_a_column_set_per_mode_base_vs_fine_tuned(trained_m3, tiny_xlm_roberta, tmp_path, capsys):
    import json

    from embedtune.operator.cli import main as cli
    from embedtune.trainer.data import Record, split_held_out
    from support.tiny import synthetic_records

    _, checkpoint = trained_m3
    exported = export_sentence_transformers(
        checkpoint, tmp_path / "model", ModelSpec(base="x", outputs=["dense", "sparse", "colbert"])
    )
    records = [Record(query=r["query"], pos=r["pos"], neg=r["neg"]) for r in synthetic_records(20, seed=5)]
    split_held_out(records, 0.5, seed=1)[1].write(tmp_path / "eval")
    arguments = ["--eval-set", str(tmp_path / "eval"), "--k", "1,10", "--output", str(tmp_path / "metrics.json")]
    # the base model has no heads: its sparse, colbert and hybrid columns are left out
    code = cli(
        [
            "evaluate",
            "--model",
            str(exported),
            "--baseline",
            str(tiny_xlm_roberta),
            *arguments,
            "--modes",
            "sparse,colbert,hybrid",
            "--dimensions",
            "8",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert set(report["modes"]) == {"sparse", "colbert", "hybrid", "dense-8"}
    assert report["modes"]["dense-8"]["baseline"] is not None and report["modes"]["hybrid"]["baseline"] is None
    assert all(0 <= scores["finetuned"]["ndcg@10"] <= 1 for scores in report["modes"].values())
    table = capsys.readouterr().out
    assert all(f"\n{mode} " in table for mode in ("dense", "sparse", "colbert", "hybrid", "dense-8"))


def stored_tensors(storage, key: str) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(storage.read_bytes(key)), map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_under_deepspeed_every_checkpoint_holds_the_steps_heads_and_a_resume_continues_the_loss_curve(
    tmp_path, zero_stage
):
    """On 2 CPU ranks: each checkpoint's colbert_linear.pt and sparse_linear.pt hold the heads of
    DeepSpeed's own checkpoint of that step (its fp32 weights, rebuilt from the ranks' shards),
    the export holds the last step's, and a run resumed from a middle checkpoint continues the
    loss curve, self-distillation included: it starts after micro-batch 3, between the
    checkpoint resumed from and the end (a counter restarted at 0 would start it later)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    base = build_tiny_xlm_roberta(tmp_path / "xlm-roberta", dropout=0.0)  # without dropout: see test_training
    store_uri = str(tmp_path / "store")
    config = write_config(
        tmp_path,
        base,
        store_uri,
        model={"outputs": ["dense", "sparse", "colbert"]},
        training={
            "maxSteps": 6,
            "deepspeed": {"zeroStage": zero_stage},
            "unified": {"selfDistill": True, "selfDistillStartStep": 3},
        },
        checkpoint={"everySteps": 2, "keep": 3},
    )
    first = run_trainer(config)
    assert first.returncode == 0, first.stderr[-3000:]
    storage = open_storage(store_uri)
    expected = losses(storage, 6)

    heads = {}
    for step in (2, 4, 6):
        checkpoint = tmp_path / f"checkpoint-{step}"
        storage.download_dir(RUN.checkpoint_prefix(step), checkpoint)
        engine = get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag=f"global_step{step}")
        heads[step] = {}
        for name, file in HEAD_FILES.items():
            head = torch.load(checkpoint / file, map_location="cpu", weights_only=True)
            assert set(head) == {"weight", "bias"}, (step, file)
            for key, tensor in head.items():
                assert torch.equal(tensor, engine[f"{name}.{key}"]), (step, file, key)
                heads[step][f"{name}.{key}"] = tensor
    for key in heads[6]:  # the heads train: a checkpoint holding stale heads would not pass
        assert not torch.equal(heads[2][key], heads[4][key]) and not torch.equal(heads[4][key], heads[6][key]), key
    for name, file in HEAD_FILES.items():
        exported = stored_tensors(storage, f"{RUN.model_prefix}/{file}")
        assert exported.keys() == {"weight", "bias"}, file
        assert all(torch.equal(tensor, heads[6][f"{name}.{key}"]) for key, tensor in exported.items()), file

    # as if the pod had died after checkpoint 4: checkpoint 6 and the model were never stored
    storage.delete([o.key for o in storage.list(RUN.model_prefix) + storage.list(RUN.checkpoint_prefix(6))])
    again = run_trainer(config)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from checkpoint 4" in again.stderr
    actual = losses(storage, 6)
    assert set(actual) == {1, 2, 3, 4, 5, 6}
    for step in (5, 6):  # DeepSpeed on CPU resumes to about 3e-4 (test_training's ZeRO test)
        assert actual[step] == pytest.approx(expected[step], rel=2e-3), step
