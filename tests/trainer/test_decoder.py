"""Decoder-only embedders and LoRA: the family from the model's config, the tokenizer made fit
for last-token pooling, adapters on decoders and encoders, and the merged export."""

from __future__ import annotations

import pytest
import torch

from embedtune.trainer.config import LoraSpec, ModelSpec
from embedtune.trainer.decoder import EmbedtuneDecoderModel
from embedtune.trainer.errors import InputError
from embedtune.trainer.export import export_sentence_transformers
from embedtune.trainer.lora import add_lora, merge_adapter
from embedtune.trainer.model_loading import load_tokenizer_and_encoder, model_type_of
from embedtune.trainer.runner import load_encoder_weights

QUERIES = ["what is w1 w2 w3", "what is w10 w200", "about w5"]
PASSAGES = ["w1 w2 w3 w7 w8 w9", "w10 w11 w200 w12", "w5", "w6 w5 w4 w3 w2 w1 w0 w1 w2 w7 w8 w9 w10 w11"]


def test_family_and_pooling_follow_the_models_config_unless_set(tiny_decoder, tiny_model):
    decoder = ModelSpec(base=str(tiny_decoder)).resolved(model_type_of(tiny_decoder))
    assert (decoder.family, decoder.pooling, decoder.flagembedding_pooling) == ("decoder", "lastToken", "last_token")
    encoder = ModelSpec(base=str(tiny_model)).resolved(model_type_of(tiny_model))
    assert (encoder.family, encoder.pooling) == ("encoder", "cls")
    explicit = ModelSpec(base="x", family="encoder", pooling="mean").resolved("qwen3")
    assert (explicit.family, explicit.pooling) == ("encoder", "mean")


def test_a_decoders_tokenizer_appends_eos_and_pads_on_the_left(tiny_decoder):
    tokenizer, _ = load_tokenizer_and_encoder(str(tiny_decoder), decoder=True)
    batch = tokenizer(["w1", "what is w1 w2 w3"], padding=True)
    assert [ids[-1] for ids in batch["input_ids"]] == [tokenizer.eos_token_id] * 2
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][0][-1] == 1
    truncated = tokenizer(["w1 w2 w3 w4 w5 w6 w7"], truncation=True, max_length=4)["input_ids"][0]
    assert len(truncated) == 4 and truncated[-1] == tokenizer.eos_token_id  # EOS survives truncation


@pytest.mark.parametrize("decoder", [True, False], ids=["decoder", "encoder"])
def test_lora_trains_only_the_adapters_and_resumes_them_exactly(tiny_decoder, tiny_model, tmp_path, decoder):
    path = tiny_decoder if decoder else tiny_model
    _, encoder = load_tokenizer_and_encoder(str(path), decoder=decoder)
    model = add_lora(encoder, LoraSpec(rank=4), decoder=decoder)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    targets = {"q_proj", "down_proj"} if decoder else {"query", "dense"}
    assert targets <= {name.split(".")[-4] for name in trainable}
    _randomize_adapters(model)
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}

    _, fresh = load_tokenizer_and_encoder(str(path), decoder=decoder)
    resumed = add_lora(fresh, LoraSpec(rank=4), decoder=decoder)
    load_encoder_weights(resumed, tmp_path)
    for (name, before), (_, after) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(before, after), name


def test_lora_targets_that_match_nothing_are_an_input_error(tiny_decoder):
    _, encoder = load_tokenizer_and_encoder(str(tiny_decoder), decoder=True)
    with pytest.raises(InputError, match="model.lora.targetModules"):
        add_lora(encoder, LoraSpec(target_modules=["no_such_proj"]), decoder=True)


def _randomize_adapters(model) -> None:
    """Adapters as if trained (peft starts B at zero, so merging would change nothing)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def test_the_merged_export_reproduces_the_trainer_embeddings_and_keeps_the_adapter(tiny_decoder, tmp_path):
    from sentence_transformers import SentenceTransformer

    tokenizer, encoder = load_tokenizer_and_encoder(str(tiny_decoder), decoder=True)
    adapted = add_lora(encoder, LoraSpec(rank=4, dropout=0.0), decoder=True)
    _randomize_adapters(adapted)
    checkpoint = tmp_path / "checkpoint-3"  # what the trainer saves: adapters and tokenizer
    adapted.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    spec = ModelSpec(
        base=str(tiny_decoder), query_instruction="Instruct: find\nQuery: ", query_max_length=8, passage_max_length=12
    ).resolved(model_type_of(tiny_decoder))
    merged = merge_adapter(tiny_decoder, checkpoint, tmp_path / "merged")
    out = export_sentence_transformers(merged, tmp_path / "st", spec, adapter_dir=checkpoint)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    trainer_model = EmbedtuneDecoderModel(
        adapted, tokenizer=tokenizer, sentence_pooling_method="last_token", normalize_embeddings=True
    ).eval()
    loaded = SentenceTransformer(str(out), device="cpu")
    for texts, encode, instruction, length in (
        (QUERIES, loaded.encode_query, spec.query_instruction, spec.query_max_length),
        (PASSAGES, loaded.encode_document, "", spec.passage_max_length),
    ):
        features = tokenizer(
            [instruction + t for t in texts], padding=True, truncation=True, max_length=length, return_tensors="pt"
        )
        with torch.no_grad():
            expected = trainer_model.encode(dict(features))
        actual = torch.tensor(encode(texts))
        cosine = torch.nn.functional.cosine_similarity(actual, expected, dim=-1)
        assert cosine.min() >= 0.9999, cosine
