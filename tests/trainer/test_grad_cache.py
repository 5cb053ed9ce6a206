"""GradCache: encoding the batch in mini-batches changes the memory of a step, not its loss or
its gradients."""

from __future__ import annotations

import random

import pytest
import torch

from support.embedder import (
    deepspeed_grad_cache_differences_on_rank,
    grad_cache_differences,
    grad_cache_differences_on_rank,
    hashed_batch,
    load_embedder,
    loss_and_gradients,
)
from support.ranks import run_on_ranks
from support.tiny import synthetic_records, write_jsonl

TOLERANCE = 1e-5
# a gradient difference, relative to the largest gradient of the step
RELATIVE_TOLERANCE = 1e-3


@pytest.fixture
def train_file(tmp_path):
    records = synthetic_records(8, negatives=3)
    records[5]["pos"] = records[2]["pos"]  # a false negative to mask, in the same and in another mini-batch
    return write_jsonl(tmp_path / "train.jsonl", records)


# each runner family's model, by the fixture of its tiny base model
FAMILIES = {"encoder": "tiny_model", "m3": "tiny_xlm_roberta", "decoder": "tiny_decoder"}


@pytest.mark.parametrize(
    ("family", "mini_batch", "gradient_checkpointing"),
    [("encoder", 1, False), ("encoder", 3, False), ("encoder", 3, True), ("m3", 3, False), ("decoder", 3, False)],
)
def test_a_grad_cache_step_has_the_plain_steps_loss_and_gradients(
    request, train_file, family, mini_batch, gradient_checkpointing
):
    random.seed(0)  # FlagEmbedding samples the negatives
    model = load_embedder(request.getfixturevalue(FAMILIES[family]), family=family)
    if gradient_checkpointing:  # as the runner enables it: checkpoints inside each mini-batch
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    batch = hashed_batch(model, train_file, list(range(8)), group_size=4)
    loss_difference, gradient_difference = grad_cache_differences(model, batch, mini_batch)
    assert loss_difference < TOLERANCE and gradient_difference < TOLERANCE


def test_with_dropout_each_mini_batch_is_encoded_again_with_the_same_dropout(tiny_model, train_file):
    """FlagEmbedding's sub-batches (groupSize 1: the same rows as GradCache's mini-batches) keep
    the graph of every sub-batch; GradCache, encoding each again, must draw the same dropout."""
    model = load_embedder(tiny_model, dropout=True)
    batch = hashed_batch(model, train_file, list(range(8)), group_size=1)
    model.sub_batch_size = 3
    torch.manual_seed(5)
    kept_loss, kept = loss_and_gradients(model, batch)
    torch.manual_seed(6)
    assert abs(loss_and_gradients(model, batch)[0] - kept_loss) > 1e-4  # dropout is on
    model.sub_batch_size, model.grad_cache_queries = -1, 3
    torch.manual_seed(5)
    cached_loss, cached = loss_and_gradients(model, batch)
    assert abs(cached_loss - kept_loss) < TOLERANCE
    assert max((kept[n] - cached[n]).abs().max().item() for n in kept) < TOLERANCE


@pytest.mark.parametrize("family", ["encoder", "m3"])
def test_with_cross_device_negatives_on_two_ranks(request, train_file, family):
    model_path = request.getfixturevalue(FAMILIES[family])
    for loss_difference, gradient_difference in run_on_ranks(
        2, grad_cache_differences_on_rank, model_path, train_file, 4, 3, family
    ):
        assert loss_difference < TOLERANCE and gradient_difference < TOLERANCE


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_under_deepspeed_zero_with_cross_device_negatives_on_two_ranks(tiny_model, train_file, zero_stage):
    """The gradients DeepSpeed reduces and partitions (safe_get_full_grad after engine.backward,
    before the step): a GradCache step's equal the plain step's, whose equal the plain step's
    without DeepSpeed averaged over the ranks. ZeRO-2, and ZeRO-1 with overlap_comm (as the runner
    configures both), reduce each gradient from a hook as it is accumulated: GradCache must
    accumulate each parameter's gradient once per step (its checkpointed mini-batches feed one
    backward), not once per mini-batch (a backward of its own per mini-batch, as GradCache is
    often written, fails DeepSpeed's "has already been reduced" check)."""
    for rank, found in enumerate(
        run_on_ranks(
            2, deepspeed_grad_cache_differences_on_rank, tiny_model, train_file, zero_stage, [(1, False), (3, True)]
        )
    ):
        assert set(found) == {"deepspeed", "grad cache 1", "grad cache 3 checkpointed"}
        for variant, (loss_difference, gradient_difference, relative) in found.items():
            assert loss_difference < TOLERANCE and gradient_difference < TOLERANCE, (rank, variant)
            # the tiny model's gradients are at most ~1e-4, so 1e-5 alone would pass a gradient 10% off;
            # fp32's summation order leaves ~7e-5 of the largest gradient here
            assert relative < RELATIVE_TOLERANCE, (rank, variant, relative)


def test_the_backward_encodes_one_mini_batch_at_a_time(tiny_model, train_file):
    """What bounds the memory: each mini-batch's activations live from its recomputation to the
    end of its backward, before the next mini-batch is recomputed."""
    model = load_embedder(tiny_model)
    batch = hashed_batch(model, train_file, list(range(8)), group_size=4)
    model.grad_cache_queries = 2
    events = []
    model.model.register_forward_hook(lambda *_: events.append("encode"))
    model.model.encoder.layer[0].register_full_backward_hook(lambda *_: events.append("backward"))
    loss = model(**batch).loss
    assert events == ["encode"] * 8  # 4 mini-batches of queries, 4 of passages
    events.clear()
    loss.backward()
    assert events == ["encode", "backward"] * 8
