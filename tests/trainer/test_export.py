import pytest
import torch

from embedtune.trainer.config import ModelSpec
from embedtune.trainer.export import export_sentence_transformers
from embedtune.trainer.runner import EmbedtuneEmbedderModel

QUERIES = ["what is w1 w2 w3", "what is w10 w200", "about w5"]
PASSAGES = ["w1 w2 w3 w7 w8 w9", "w10 w11 w200 w12", "w5", "w6 w5 w4 w3 w2 w1 w0 w1 w2"]


def trainer_embeddings(model_dir, spec: ModelSpec, texts, instruction, max_length):
    """Embeddings exactly as FlagEmbedding computes them while training."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = EmbedtuneEmbedderModel(
        AutoModel.from_pretrained(model_dir),
        tokenizer=tokenizer,
        sentence_pooling_method=spec.flagembedding_pooling,
        normalize_embeddings=spec.normalize,
    ).eval()
    if instruction:
        texts = [f"{instruction}{t}" for t in texts]
    features = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return model.encode(dict(features))


@pytest.mark.parametrize(
    "pooling,normalize,instruction",
    [
        ("cls", True, "Represent this sentence for searching relevant passages: "),
        ("mean", True, None),
        ("mean", False, "query: "),
    ],
)
def test_sentence_transformers_reproduces_the_trainer_embeddings(tiny_model, tmp_path, pooling, normalize, instruction):
    from sentence_transformers import SentenceTransformer

    spec = ModelSpec(
        base=str(tiny_model),
        pooling=pooling,
        normalize=normalize,
        query_instruction=instruction,
        query_max_length=8,
        passage_max_length=16,
    )
    out = export_sentence_transformers(tiny_model, tmp_path / "st", spec)
    loaded = SentenceTransformer(str(out), device="cpu")

    for texts, encode, own_instruction, length in (
        (QUERIES, loaded.encode_query, instruction, spec.query_max_length),
        (PASSAGES, loaded.encode_document, None, spec.passage_max_length),
    ):
        expected = trainer_embeddings(tiny_model, spec, texts, own_instruction, length)
        actual = torch.tensor(encode(texts))
        cosine = torch.nn.functional.cosine_similarity(actual, expected, dim=-1)
        assert cosine.min() >= 0.9999, cosine
        if normalize:
            assert torch.allclose(actual.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)
        else:
            assert torch.allclose(actual, expected, atol=1e-4)
