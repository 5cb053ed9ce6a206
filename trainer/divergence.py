"""A diverged run (a loss or weights gone inf/NaN) stops with the user's settings named, and
its weights are never stored: not as a complete checkpoint, not as the model.

Finiteness is checked where values reach the host anyway, so training gains no GPU sync:
- each log: HF accumulates the loss on the device between logs, so a NaN at any step since
  the last log shows in the logged loss (with `logging_nan_inf_filter` off: HF would replace
  it by an average, which is how a diverged run reported a loss of 0.0); the gradient norm is
  the one HF computes for clipping at that step;
- each checkpoint, before it is uploaded, and the final one before it is exported: the saved
  weights, read back from the files (the only place every DeepSpeed stage has them whole).

Divergence comes from the settings (learning rate, weight decay, temperature, precision),
so it is the user's input to fix: exit 2, which the operator does not retry.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import TrainerCallback

from .config import TrainingSpec
from .errors import InputError
from .train import broadcast_from_rank0

# weights named in a message; a diverged model usually has every tensor non-finite
_NAMED_TENSORS = 3
_LOGGED = {"loss": "loss", "grad_norm": "gradient norm"}


def non_finite_weights(checkpoint: Path) -> list[str]:
    """Names of the tensors with an inf or NaN in a checkpoint's safetensors files."""
    names = []
    for path in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(path, framework="pt") as weights:
            names += [name for name in weights.keys() if not torch.isfinite(weights.get_tensor(name)).all()]
    return names


def non_finite_log_values(logs: dict, *, loss_scaling: bool) -> dict[str, float]:
    """The loss and gradient norm of a training log that are inf or NaN. Under fp16 loss
    scaling an inf gradient norm is expected now and then: that step is skipped and the scale
    lowered, so only the loss counts there."""
    keys = ("loss",) if loss_scaling else ("loss", "grad_norm")
    return {key: logs[key] for key in keys if isinstance(logs.get(key), float) and not math.isfinite(logs[key])}


def diverged(what: str, training: TrainingSpec) -> InputError:
    return InputError(
        f"training diverged: {what}. Training stopped and stored no model. The settings that cause this:",
        [
            f"training.learningRate: {training.learning_rate:g}; a lower one (and warmupRatio > 0) steadies training",
            f"training.weightDecay: {training.weight_decay:g}; AdamW's is usually 0 to 0.1",
            f"training.temperature: {training.temperature:g}; a very low one makes the scores overflow",
            f"training.precision: {training.precision}; on a GPU, fp32 (or bf16 instead of fp16) overflows less",
        ],
        reason="TrainingDiverged",
    )


class DivergenceGuard(TrainerCallback):
    """Every rank raises at the same step: the logged loss is averaged over the ranks and the
    gradient norm is global; rank 0's verdict on the weights it saved is shared."""

    def __init__(self, training: TrainingSpec):
        self.training = training
        self._last_finite_log: tuple[int, float] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        if bad := non_finite_log_values(logs, loss_scaling=args.fp16):
            values = " and ".join(f"{_LOGGED[key]} {value}" for key, value in bad.items())
            since = (
                f" (last finite loss {self._last_finite_log[1]:.4f} at step {self._last_finite_log[0]})"
                if self._last_finite_log
                else ""
            )
            raise diverged(f"{values} at step {state.global_step}{since}", self.training)
        self._last_finite_log = (state.global_step, logs["loss"])

    def on_save(self, args, state, control, **kwargs):
        # runs before CheckpointCallback's on_save hands the checkpoint to the uploader
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        bad = broadcast_from_rank0(non_finite_weights(checkpoint) if state.is_world_process_zero else [])
        if bad:
            raise diverged(
                f"checkpoint {state.global_step} has non-finite weights ({describe_tensors(bad)})", self.training
            )


def describe_tensors(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMED_TENSORS])
    return f"{shown} and {len(names) - _NAMED_TENSORS} more tensors" if len(names) > _NAMED_TENSORS else shown
