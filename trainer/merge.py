"""Model merging after training (LM-Cocktail, Xiao et al. 2023): the merged model's every weight
is a weighted sum of the fine-tuned model's and other models' (the base by default), which keeps
much of the general ability fine-tuning narrows while keeping most of the domain gain.

Weights are fixed (merge.weights) or fitted on a sample of the training data as LM-Cocktail
does: softmax(-loss_i / temperature) over each model's contrastive loss on the sample. PyPI
`lm-cocktail` is not used: its embedder loss always pools the first token ([CLS]; wrong for
last-token and mean-pooled models), its decoder mode scores language modelling rather than
retrieval, and it loads every model with trust_remote_code=True whatever the spec says. The
arithmetic is a few lines of torch, here."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from .config import MergeSpec, ModelSpec

logger = logging.getLogger(__name__)


def merge_state_dicts(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i weights[i] * states[i] for every floating-point tensor (computed in fp32, stored in
    the first model's dtype); integer buffers (position ids) are taken from the first model."""
    keys = states[0].keys()
    for index, state in enumerate(states[1:], start=1):
        if state.keys() != keys:
            missing = sorted(set(keys) ^ set(state.keys()))[:5]
            raise ValueError(f"model {index} has other weights than the fine-tuned model ({missing} ...)")
    merged = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            merged[key] = first.clone()
            continue
        total = torch.zeros_like(first, dtype=torch.float32)
        for weight, state in zip(weights, states):
            total += weight * state[key].to(torch.float32)
        merged[key] = total.to(first.dtype)
    return merged


def contrastive_loss(model_dir: Path, spec: ModelSpec, records: list[dict], temperature: float) -> float:
    """The training loss (InfoNCE, in-sample negatives) of the model at `model_dir`, encoded as
    the trainer encodes (pooling, normalization, instructions), on `records`."""
    from .export import build_sentence_transformer

    encoder = build_sentence_transformer(model_dir, spec)
    passages, targets = [], []
    for record in records:
        targets.append(len(passages))
        passages += [record["pos"][0], *record.get("neg", [])]
    with torch.no_grad():
        queries = torch.tensor(encoder.encode_query([r["query"] for r in records], batch_size=32))
        passage_vectors = torch.tensor(encoder.encode_document(passages, batch_size=32))
        scores = queries @ passage_vectors.T / temperature
        return float(torch.nn.functional.cross_entropy(scores, torch.tensor(targets)))


def fit_weights(
    candidates: list[Path], spec: ModelSpec, train_file: Path, merge: MergeSpec, *, temperature: float, seed: int
) -> list[float]:
    """LM-Cocktail's weights: softmax(-loss_i / merge.fitTemperature) over the candidates' losses
    on `merge.fitSamples` records drawn (seeded) from the training data."""
    records = [json.loads(line) for line in train_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    sample = random.Random(seed).sample(records, min(merge.fit_samples, len(records)))
    losses = [contrastive_loss(path, spec, sample, temperature) for path in candidates]
    weights = torch.softmax(-torch.tensor(losses) / merge.fit_temperature, dim=0).tolist()
    logger.info(
        "merge weights fitted on %d records: %s",
        len(sample),
        ", ".join(
            f"{path.name} loss {loss:.4f} -> {weight:.4f}" for path, loss, weight in zip(candidates, losses, weights)
        ),
    )
    return weights


def merge_models(candidates: list[Path], weights: list[float], out_dir: Path, *, trust_remote_code: bool) -> Path:
    """The weighted sum of the candidates (Hugging Face checkpoints, the fine-tuned one first),
    saved with the first one's config and tokenizer in `out_dir`."""
    from transformers import AutoModel, AutoTokenizer

    models = [AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code) for path in candidates]
    merged = merge_state_dicts([model.state_dict() for model in models], weights)
    models[0].load_state_dict(merged)
    models[0].save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(candidates[0], trust_remote_code=trust_remote_code).save_pretrained(out_dir)
    logger.info("merged %s with weights %s into %s", [str(p) for p in candidates], weights, out_dir)
    return out_dir
