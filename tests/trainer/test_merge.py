"""Model merging: the arithmetic, the fitted weights, the spec's rules."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from embedtune.trainer.config import MergeSpec, ModelSpec
from embedtune.trainer.merge import fit_weights, merge_models, merge_state_dicts
from support.tiny import build_tiny_bert, synthetic_records, write_jsonl


def test_merged_weights_are_exactly_the_weighted_sum(tmp_path):
    first = build_tiny_bert(tmp_path / "a", seed=1)
    second = build_tiny_bert(tmp_path / "b", seed=2)
    third = build_tiny_bert(tmp_path / "c", seed=3)
    weights = [0.5, 0.3, 0.2]
    merged = merge_models([first, second, third], weights, tmp_path / "merged", trust_remote_code=False)
    states = [load_file(path / "model.safetensors") for path in (first, second, third, merged)]
    for key, value in states[3].items():
        if value.is_floating_point():
            expected = sum(w * s[key].to(torch.float32) for w, s in zip(weights, states[:3]))
            assert torch.equal(value, expected.to(value.dtype)), key
        else:
            assert torch.equal(value, states[0][key]), key
    assert (merged / "tokenizer.json").is_file() or (merged / "vocab.txt").is_file()


def test_merging_models_of_different_shapes_is_refused():
    with pytest.raises(ValueError, match="other weights"):
        merge_state_dicts([{"a": torch.ones(2)}, {"b": torch.ones(2)}], [0.5, 0.5])


def test_fitted_weights_prefer_the_model_with_the_lower_loss(tmp_path):
    records = synthetic_records(16, negatives=3)
    train_file = write_jsonl(tmp_path / "train.jsonl", records)
    model = build_tiny_bert(tmp_path / "m", seed=1)
    spec = ModelSpec(base=str(model), pooling="mean", query_max_length=16, passage_max_length=16)
    merge = MergeSpec(fit_samples=8, fit_temperature=0.01)
    same = fit_weights([model, model], spec, train_file, merge, temperature=0.05, seed=0)
    assert same == pytest.approx([0.5, 0.5])
    other = build_tiny_bert(tmp_path / "o", seed=2)
    weights = fit_weights([model, other], spec, train_file, merge, temperature=0.05, seed=0)
    assert sum(weights) == pytest.approx(1.0) and weights[0] != pytest.approx(0.5)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"weights": [0.5, 0.6]}, "sum to 1"),
        ({"weights": [0.5, 0.25, 0.25]}, "3 given, 2 needed"),
        ({"models": ["a", "b"], "weights": [0.5, 0.5]}, "2 given, 3 needed"),
    ],
)
def test_merge_weights_must_fit_the_models(settings, message):
    with pytest.raises(ValidationError, match=message):
        MergeSpec.model_validate(settings)
