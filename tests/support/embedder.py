"""Embedtune's FlagEmbedding model, dataset and collator on a tiny model, without a Trainer:
loss and gradients of one batch, on one rank or several (see support.ranks)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

MAX_LENGTH = 16


def load_embedder(
    model_path: Path,
    *,
    family: str = "encoder",
    negatives_cross_device: bool = False,
    temperature: float = 0.05,
    dropout: bool = False,
):
    """The training model of a runner family ("encoder", "m3": dense + sparse + ColBERT with
    self-distillation from the first step, "decoder"); without dropout (the default) a batch's
    loss is a function of the batch."""
    from embedtune.trainer.model_loading import load_tokenizer_and_encoder

    torch.manual_seed(0)
    arguments = {
        "negatives_cross_device": negatives_cross_device,
        "temperature": temperature,
        "normalize_embeddings": True,
    }
    if family == "m3":
        from FlagEmbedding.finetune.embedder.encoder_only.m3 import EncoderOnlyEmbedderM3Runner

        from embedtune.trainer.m3 import EmbedtuneM3Model
        from embedtune.trainer.model_loading import load_tokenizer

        model = EmbedtuneM3Model(
            EncoderOnlyEmbedderM3Runner.get_model(str(model_path), colbert_dim=16),
            tokenizer=load_tokenizer(str(model_path)),
            sentence_pooling_method="cls",
            unified_finetuning=True,
            use_self_distill=True,
            self_distill_start_step=-1,
            **arguments,
        )
    else:
        from embedtune.trainer.decoder import EmbedtuneDecoderModel
        from embedtune.trainer.runner import EmbedtuneEmbedderModel

        decoder = family == "decoder"
        tokenizer, encoder = load_tokenizer_and_encoder(str(model_path), decoder=decoder)
        model = (EmbedtuneDecoderModel if decoder else EmbedtuneEmbedderModel)(
            encoder, tokenizer=tokenizer, sentence_pooling_method="last_token" if decoder else "cls", **arguments
        )
    for module in model.modules() if not dropout else ():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train()


def hashed_batch(model, train_file: Path, indices: list[int], *, group_size: int = 2, hashes: bool = True) -> dict:
    """The collated batch of the records at `indices` (in that order), with or without the
    passage hashes that mask false negatives."""
    from embedtune.trainer.false_negatives import PassageHashingCollator, PositiveHashingDataset
    from embedtune.trainer.runner import EmbedtuneDataArguments

    args = EmbedtuneDataArguments(
        train_data=[str(train_file)], train_group_size=group_size, query_max_len=MAX_LENGTH, passage_max_len=MAX_LENGTH
    )
    dataset = PositiveHashingDataset(seed=42, args=args, tokenizer=model.tokenizer)
    collator = PassageHashingCollator(
        tokenizer=model.tokenizer,
        query_max_len=MAX_LENGTH,
        passage_max_len=MAX_LENGTH,
        padding=True,
        return_tensors="pt",
    )
    batch = collator([dataset[i] for i in indices])
    if not hashes:
        del batch["passage_hashes"], batch["positive_hashes"]
    return batch


def loss_on_rank(
    rank: int, world_size: int, model_path: Path, train_file: Path, order: list[int], family: str = "encoder"
) -> float:
    """This rank's loss with cross-device negatives, on its share of `order`."""
    model = load_embedder(model_path, family=family, negatives_cross_device=True)
    share = len(order) // world_size
    return model(**hashed_batch(model, train_file, order[rank * share : (rank + 1) * share])).loss.item()


def loss_and_gradients(model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """One training step's loss and the gradient of every parameter."""
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def grad_cache_differences(model, batch: dict, mini_batch: int) -> tuple[float, float]:
    """|loss difference| and the largest |gradient difference| of a GradCache step against the plain step."""
    model.grad_cache_queries = 0
    plain_loss, plain = loss_and_gradients(model, batch)
    model.grad_cache_queries = mini_batch
    calls = []
    hook = model.model.register_forward_hook(lambda *_: calls.append(1))
    cached_loss, cached = loss_and_gradients(model, batch)
    hook.remove()
    # queries and passages: each mini-batch encoded, then encoded again in the backward
    assert len(calls) == 2 * 2 * math.ceil(batch["queries"]["input_ids"].size(0) / mini_batch)
    assert plain.keys() == cached.keys() and len(plain) > 0
    return abs(plain_loss - cached_loss), max((plain[n] - cached[n]).abs().max().item() for n in plain)


def grad_cache_differences_on_rank(
    rank: int,
    world_size: int,
    model_path: Path,
    train_file: Path,
    group_size: int,
    mini_batch: int,
    family: str = "encoder",
) -> tuple[float, float]:
    """grad_cache_differences with cross-device negatives, on this rank's half of the data."""
    model = load_embedder(model_path, family=family, negatives_cross_device=True)
    rows = list(range(rank * 4, rank * 4 + 4))
    batch = hashed_batch(model, train_file, rows, group_size=group_size)
    return grad_cache_differences(model, batch, mini_batch)


def m3_losses(model, batch: dict, left_out: list[tuple[int, int]]) -> dict[str, float]:
    """bge-m3's loss on `batch`: "masked" (by its hashes), "unmasked" (without them) and
    "reference": FlagEmbedding's own M3 model over the same weights, unhashed, with the scores at
    `left_out` (query, passage) positions of the whole batch (of every rank) set to the lowest value
    in every score matrix of that size, at positions the test knows rather than from hashes."""
    from FlagEmbedding.finetune.embedder.encoder_only.m3 import EncoderOnlyEmbedderM3Model

    world_size = dist.get_world_size() if model.negatives_cross_device else 1
    whole = (batch["positive_hashes"].size(0) * world_size, batch["passage_hashes"].size(0) * world_size)

    class PositionsLeftOut(EncoderOnlyEmbedderM3Model):
        def leave_out(self, scores):
            if tuple(scores.shape) != whole:
                return scores
            scores = scores.clone()
            for row, column in left_out:
                scores[row, column] = torch.finfo(scores.dtype).min
            return scores

        def compute_dense_score(self, q_reps, p_reps):
            return self.leave_out(super().compute_dense_score(q_reps, p_reps))

        def compute_sparse_score(self, q_reps, p_reps):
            return self.leave_out(super().compute_sparse_score(q_reps, p_reps))

        def compute_colbert_score(self, q_reps, p_reps, q_mask=None):
            return self.leave_out(super().compute_colbert_score(q_reps, p_reps, q_mask=q_mask))

        def ensemble_score(self, q_reps, p_reps, dense_scores=None, sparse_scores=None, colbert_scores=None):
            return self.leave_out(super().ensemble_score(q_reps, p_reps, dense_scores, sparse_scores, colbert_scores))

    reference = PositionsLeftOut(
        {"model": model.model, "colbert_linear": model.colbert_linear, "sparse_linear": model.sparse_linear},
        tokenizer=model.tokenizer,
        negatives_cross_device=model.negatives_cross_device,
        temperature=model.temperature,
        sentence_pooling_method=model.sentence_pooling_method,
        normalize_embeddings=model.normalize_embeddings,
        unified_finetuning=True,
        use_self_distill=model.use_self_distill,
        self_distill_start_step=model.self_distill_start_step,
    ).train()
    unhashed = {key: value for key, value in batch.items() if not key.endswith("_hashes")}
    with torch.no_grad():
        return {
            "masked": model(**batch).loss.item(),
            "unmasked": model(**unhashed).loss.item(),
            "reference": reference(**unhashed).loss.item(),
        }


def m3_losses_on_rank(
    rank: int, world_size: int, model_path: Path, train_file: Path, order: list[int], left_out: list[tuple[int, int]]
) -> dict[str, float]:
    """m3_losses with cross-device negatives, on this rank's share of `order`."""
    model = load_embedder(model_path, family="m3", negatives_cross_device=True)
    share = len(order) // world_size
    return m3_losses(model, hashed_batch(model, train_file, order[rank * share : (rank + 1) * share]), left_out)


def deepspeed_config(zero_stage: int, micro_batch: int, world_size: int) -> dict:
    """fp32 ZeRO stage `zero_stage` as the runner configures it (runner.deepspeed_config), with
    HF's "auto" values filled in for one step of `micro_batch` queries per rank."""
    return {
        "zero_optimization": {"stage": zero_stage, "overlap_comm": True, "contiguous_gradients": True},
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        # a plain torch optimizer, as HF hands over its own: no compiled DeepSpeed ops
        "zero_allow_untested_optimizer": True,
    }


def deepspeed_loss_and_gradients(model, batch: dict, zero_stage: int) -> tuple[float, dict[str, torch.Tensor]]:
    """One step's loss and every parameter's full gradient as a fresh DeepSpeed engine holds it
    after `engine.backward` (reduced and averaged over the ranks), before the optimizer step."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    queries = batch["queries"]["input_ids"].size(0)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        config=deepspeed_config(zero_stage, queries, dist.get_world_size()),
    )
    loss = engine(**batch).loss
    engine.backward(loss)
    # a collective under ZeRO-1/2: every rank asks for every parameter, in the same order
    gradients = {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()}
    engine.destroy()
    return loss.item(), gradients


def deepspeed_grad_cache_differences_on_rank(
    rank: int, world_size: int, model_path: Path, train_file: Path, zero_stage: int, variants: list[tuple[int, bool]]
) -> dict[str, tuple[float, float, float]]:
    """Under DeepSpeed ZeRO `zero_stage`, with cross-device negatives on this rank's half of the
    data: for the plain DeepSpeed step against the plain step without DeepSpeed (its gradients
    averaged over the ranks, as data parallelism does), and for each (GradCache mini-batch,
    gradient checkpointing) of `variants` against the plain DeepSpeed step: |loss difference|,
    the largest |gradient difference|, and that relative to the largest |gradient|."""
    from embedtune.trainer.runner import join_deepspeed_comm

    os.environ["LOCAL_RANK"] = str(rank)  # what torchrun sets, and DeepSpeed's engine asks for
    join_deepspeed_comm()  # DeepSpeed's comm over the gloo group torch has, as the runner does

    def fresh_model_and_batch(mini_batch: int = 0, gradient_checkpointing: bool = False):
        model = load_embedder(model_path, negatives_cross_device=True)
        if gradient_checkpointing:  # as the runner enables it: checkpoints inside each mini-batch
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model.grad_cache_queries = mini_batch
        return model, hashed_batch(model, train_file, list(range(rank * 4, rank * 4 + 4)), group_size=4)

    model, batch = fresh_model_and_batch()
    reference_loss, reference = loss_and_gradients(model, batch)
    reference = {name: reference.get(name, torch.zeros_like(p)) for name, p in model.named_parameters()}
    for gradient in reference.values():
        dist.all_reduce(gradient)
        gradient /= world_size

    def differences(loss: float, gradients: dict[str, torch.Tensor], against: dict[str, torch.Tensor]):
        assert gradients.keys() == against.keys() == reference.keys()
        largest = max(g.abs().max().item() for g in against.values())
        difference = max((gradients[n] - against[n]).abs().max().item() for n in against)
        return abs(loss - reference_loss), difference, difference / largest

    plain_loss, plain = deepspeed_loss_and_gradients(*fresh_model_and_batch(), zero_stage)
    found = {"deepspeed": differences(plain_loss, plain, reference)}
    for mini_batch, gradient_checkpointing in variants:
        model, batch = fresh_model_and_batch(mini_batch, gradient_checkpointing)
        calls = []
        hook = model.model.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        cached_loss, cached = deepspeed_loss_and_gradients(model, batch, zero_stage)
        hook.remove()
        # queries and passages: each mini-batch encoded, then encoded again in the backward
        assert len(calls) == 2 * 2 * math.ceil(batch["queries"]["input_ids"].size(0) / mini_batch)
        name = f"grad cache {mini_batch}" + (" checkpointed" if gradient_checkpointing else "")
        found[name] = differences(cached_loss, cached, plain)
    return found
