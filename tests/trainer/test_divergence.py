"""The divergence checks on their own; test_training.py stops a really diverging run."""

from __future__ import annotations

import shutil

import pytest
import safetensors.torch

from embedtune.trainer.contract import TrainerConfig
from embedtune.trainer.divergence import non_finite_log_values, non_finite_weights
from embedtune.trainer.errors import InputError
from embedtune.trainer.layout import RunLayout
from embedtune.trainer.storage import open_storage
from embedtune.trainer.train import _publish_model


def test_a_non_finite_loss_always_counts_a_non_finite_gradient_norm_unless_fp16_scales_the_loss():
    logs = {"loss": 2.5, "grad_norm": float("inf"), "learning_rate": 1e-5}
    assert non_finite_log_values(logs, loss_scaling=False) == {"grad_norm": float("inf")}
    # fp16's dynamic loss scaling skips such a step and lowers the scale: not a divergence
    assert non_finite_log_values(logs, loss_scaling=True) == {}
    nan = non_finite_log_values({"loss": float("nan"), "grad_norm": 1.0}, loss_scaling=True)
    assert list(nan) == ["loss"]


def test_a_model_with_non_finite_weights_is_never_exported_or_stored(tiny_model, tmp_path):
    checkpoint = shutil.copytree(tiny_model, tmp_path / "checkpoint-4")
    weights = safetensors.torch.load_file(checkpoint / "model.safetensors")
    assert non_finite_weights(checkpoint) == []
    weights["encoder.layer.1.output.dense.bias"][3] = float("nan")
    safetensors.torch.save_file(weights, checkpoint / "model.safetensors")
    assert non_finite_weights(checkpoint) == ["encoder.layer.1.output.dense.bias"]

    config = TrainerConfig.model_validate(
        {
            "model": {"base": str(tiny_model)},
            "data": {"train": "unused.jsonl"},
            "storage": {"uri": str(tmp_path / "store")},
            "training": {"learningRate": 0.5},
            "workDir": str(tmp_path / "work"),
        }
    )
    storage = open_storage(config.storage.uri)
    with pytest.raises(InputError) as caught:
        _publish_model(
            config, storage, RunLayout("ml", "tiny", "1"), str(tiny_model), checkpoint, tmp_path / "unused.jsonl", {}
        )
    assert caught.value.summary.startswith(
        "training diverged: the final checkpoint (checkpoint-4) has non-finite weights "
        "(encoder.layer.1.output.dense.bias). Training stopped and stored no model."
    )
    assert "training.learningRate: 0.5; a lower one (and warmupRatio > 0) steadies training" in caught.value.problems
    assert storage.list("") == [] and not (tmp_path / "work" / "model").exists()
