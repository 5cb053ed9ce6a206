import pytest

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
