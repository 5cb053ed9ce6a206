from collections.abc import Iterator
from typing import get_args

import pytest
from pydantic import BaseModel, ValidationError

from embedtune.trainer.contract import TrainerConfig, load_config
from embedtune.trainer.errors import InputError


def test_every_invalid_field_is_named_by_its_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("""
model: {base: x, pooling: max}
data: {train: a.jsonl, heldOutFraction: 1.5}
training: {groupSize: 0, learningRate: -1, batchSize: 3}
storage: {uri: /tmp/s}
""")
    with pytest.raises(InputError) as caught:
        load_config(path, TrainerConfig)
    problems = caught.value.problems
    assert "config.model.pooling: Input should be 'cls', 'mean' or 'lastToken'" in problems
    assert "config.data.heldOutFraction: Input should be less than 1" in problems
    assert "config.training.groupSize: Input should be greater than or equal to 1" in problems
    assert "config.training.learningRate: Input should be greater than 0" in problems
    assert "config.training.batchSize: unknown field" in problems
    assert len(problems) == 5


def test_exactly_one_data_source(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"model": {"base": "x"}, "data": {}, "storage": {"uri": "/s"}}')
    with pytest.raises(InputError) as caught:
        load_config(path, TrainerConfig)
    assert caught.value.problems == ["config.data: set exactly one of `train` or `huggingFace`"]


def test_defaults_and_single_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {base: m}\ndata: {train: s3://b/train.jsonl}\nstorage: {uri: s3://b/p}\n")
    config = load_config(path, TrainerConfig)
    assert config.data.train == ["s3://b/train.jsonl"]
    assert config.training.group_size == 8 and config.checkpoint.keep == 3
    assert config.model.flagembedding_pooling == "cls"


def _float_fields(model: type[BaseModel], path: str = "") -> Iterator[tuple[type[BaseModel], str, str]]:
    """(model, alias, dotted path) of every float field reachable from `model`."""
    for info in model.model_fields.values():
        alias = info.alias or ""
        for kind in get_args(info.annotation) or (info.annotation,):
            if kind is float:
                yield model, alias, f"{path}{alias}"
            elif isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from _float_fields(kind, f"{path}{alias}.")


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_every_float_setting_must_be_finite(value):
    from embedtune.operator.spec import EmbeddingFinetuneSpec

    fields = {*_float_fields(TrainerConfig), *_float_fields(EmbeddingFinetuneSpec)}
    assert {path for _, _, path in fields} >= {"training.weightDecay", "evaluation.gate.minImprovement"}
    for model, alias, path in fields:
        with pytest.raises(ValidationError) as caught:
            model.model_validate({alias: value})
        assert "finite_number" in {error["type"] for error in caught.value.errors() if error["loc"] == (alias,)}, path


def test_a_non_finite_number_in_a_deepspeed_config_is_refused_by_its_path(tmp_path):
    # the diverged run of issue 10: YAML reads .inf as a float, and it trained a model of NaN weights
    path = tmp_path / "c.yaml"
    path.write_text("""
model: {base: m}
data: {train: a.jsonl}
storage: {uri: /tmp/s}
training:
  weightDecay: .inf
  deepspeed: {config: {optimizer: {params: {lr: .nan, betas: [0.9, .inf]}}, gradient_clipping: 1.0}}
""")
    with pytest.raises(InputError) as caught:
        load_config(path, TrainerConfig)
    assert caught.value.problems == [
        "config.training.weightDecay: Input should be a finite number",
        "config.training.deepspeed.config: optimizer.params.lr (nan), optimizer.params.betas.1 (inf): "
        "must be a finite number",
    ]
