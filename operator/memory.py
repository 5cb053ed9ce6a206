"""Memory per GPU of a spec, estimated before any GPU is taken.

    weights       every parameter, in the precision it is held (fp32 under HF's mixed precision,
                  16-bit under DeepSpeed), divided over the ranks by ZeRO-3
    gradients     of the trainable parameters (all, or only LoRA's), divided by ZeRO-2/3
    optimizer     AdamW's two moments, plus DeepSpeed's fp32 master copy, divided by ZeRO-1/2/3
    activations   what the forward pass keeps for the backward pass, for the batch's tokens
                  (queries x queryMaxLength + passages x passageMaxLength, padded to the limits);
                  with gradient checkpointing only each layer's input plus one layer recomputed
    overhead      CUDA context, allocator fragmentation and communication buffers

The model's shape comes from its config.json where it can be read (a local path, package://)
and otherwise from a table of the well-known embedders; an unknown model cannot be estimated.
The activation terms count the tensors autograd saves in a transformer layer (Korthikanti et
al. 2022, "Reducing Activation Recomputation in Large Transformer Models", adapted to gated
MLPs and grouped-query attention); tests/operator/test_memory.py checks the whole estimate
against the measured peak of tiny models on CPU.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from embedtune.trainer.config import DECODER_MODEL_TYPES
from embedtune.trainer.errors import InputError
from embedtune.trainer.storage import PACKAGE_SCHEME, package_path

from .spec import EmbeddingFinetuneSpec

GIB = 1024**3
# What CUDA, NCCL and the allocator take besides the tensors (measured typical: 1-2 GiB).
GPU_OVERHEAD_BYTES = int(1.5 * GIB)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a model's config.json."""

    model_type: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    positions: int = 0  # learned position embeddings (BERT); 0 for rotary
    token_types: int = 0

    @property
    def decoder(self) -> bool:
        return self.model_type in DECODER_MODEL_TYPES

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        model_type = config.get("model_type", "bert")
        decoder = model_type in DECODER_MODEL_TYPES
        return cls(
            model_type=model_type,
            hidden=hidden,
            layers=config["num_hidden_layers"],
            intermediate=config["intermediate_size"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            vocab=config["vocab_size"],
            positions=0 if decoder else config.get("max_position_embeddings", 0),
            token_types=0 if decoder else config.get("type_vocab_size", 0),
        )

    def linear_shapes(self) -> dict[str, list[tuple[int, int]]]:
        """(in, out) of each layer's linear modules, by the name suffix LoRA targets them with."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        if self.decoder:
            return {
                "q_proj": [(h, q)],
                "k_proj": [(h, kv)],
                "v_proj": [(h, kv)],
                "o_proj": [(q, h)],
                "gate_proj": [(h, i)],
                "up_proj": [(h, i)],
                "down_proj": [(i, h)],
            }
        # BERT: `dense` names the attention output, intermediate and output projections alike
        return {"query": [(h, h)], "key": [(h, h)], "value": [(h, h)], "dense": [(h, h), (h, i), (i, h)]}

    def parameters(self) -> int:
        h = self.hidden
        per_layer = sum(a * b + b for shapes in self.linear_shapes().values() for a, b in shapes) + 4 * h
        return self.layers * per_layer + (self.vocab + self.positions + self.token_types) * h + 2 * h

    def lora_parameters(self, rank: int, targets: list[str]) -> int:
        shapes = self.linear_shapes()
        return self.layers * sum(rank * (a + b) for name in targets for a, b in shapes.get(name, []))

    def default_lora_targets(self) -> list[str]:
        return list(self.linear_shapes())

    def activation_values_per_token(self, attention_length: int) -> int:
        """Values one layer keeps per token for the backward pass: layer norms' inputs and
        outputs, the projections' inputs and outputs, the MLP's intermediate states and (for
        eager attention) the score and probability matrices."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        if self.decoder:  # SDPA keeps no score matrix; rotary embedding copies q and k
            return 4 * h + 3 * q + 3 * kv + 4 * i
        return 9 * h + 2 * i + 3 * self.heads * attention_length


# Published config.json values of well-known embedders (huggingface.co/<id>/blob/main/config.json,
# read 2025-06), so `validate` estimates them without a network.
KNOWN_SHAPES: dict[str, ModelShape] = {
    "qwen/qwen3-embedding-0.6b": ModelShape("qwen3", 1024, 28, 3072, 16, 8, 128, 151669),
    "qwen/qwen3-embedding-4b": ModelShape("qwen3", 2560, 36, 9728, 32, 8, 128, 151665),
    "qwen/qwen3-embedding-8b": ModelShape("qwen3", 4096, 36, 12288, 32, 8, 128, 151665),
    "intfloat/e5-mistral-7b-instruct": ModelShape("mistral", 4096, 32, 14336, 32, 8, 128, 32000),
    "baai/bge-m3": ModelShape("xlm-roberta", 1024, 24, 4096, 16, 16, 64, 250002, 8194, 1),
    "baai/bge-large-en-v1.5": ModelShape("bert", 1024, 24, 4096, 16, 16, 64, 30522, 512, 2),
    "baai/bge-base-en-v1.5": ModelShape("bert", 768, 12, 3072, 12, 12, 64, 30522, 512, 2),
    "sentence-transformers/all-minilm-l6-v2": ModelShape("bert", 384, 6, 1536, 12, 12, 32, 30522, 512, 2),
}


def model_shape(base: str) -> ModelShape | None:
    """The shape from the model's config.json where it can be read here, else from the table
    (matched by hub id, or by the last path component); None when neither knows it."""
    parsed = urlparse(base)
    directory: Path | None = None
    if parsed.scheme == PACKAGE_SCHEME:
        try:
            directory = package_path(base)
        except InputError:
            directory = None
    elif parsed.scheme in ("", "file"):
        directory = Path(parsed.path if parsed.scheme else base)
    if directory is not None and (directory / "config.json").is_file():
        try:
            return ModelShape.from_config(json.loads((directory / "config.json").read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    key = base.lower().rstrip("/")
    if key in KNOWN_SHAPES:
        return KNOWN_SHAPES[key]
    name = key.rsplit("/", 1)[-1]
    return next((shape for known, shape in KNOWN_SHAPES.items() if known.rsplit("/", 1)[-1] == name), None)


@dataclass(frozen=True)
class Settings:
    """The spec's settings the estimate depends on (and which a suggestion may change)."""

    world_size: int
    zero_stage: int  # 0: plain DDP (or DeepSpeed without sharding)
    deepspeed: bool
    precision: str
    lora_rank: int | None
    lora_targets: list[str]
    batch: int
    group_size: int
    query_length: int
    passage_length: int
    gradient_checkpointing: bool
    on_gpu: bool = True

    @classmethod
    def of(cls, spec: EmbeddingFinetuneSpec, shape: ModelShape) -> Settings:
        t, m, r = spec.training, spec.model, spec.resources
        lora = m.lora
        return cls(
            world_size=max(1, r.nodes * max(1, r.gpus_per_node)),
            zero_stage=t.deepspeed.zero_stage if t.deepspeed else 0,
            deepspeed=t.deepspeed is not None,
            precision=t.precision if r.gpus_per_node > 0 else "fp32",
            lora_rank=lora.rank if lora else None,
            lora_targets=(lora.target_modules or shape.default_lora_targets()) if lora else [],
            batch=t.batch_size_per_device,
            group_size=t.group_size,
            query_length=m.query_max_length,
            passage_length=m.passage_max_length,
            gradient_checkpointing=t.gradient_checkpointing,
            on_gpu=r.gpus_per_node > 0,
        )

    def describe(self) -> str:
        parts = [
            f"ZeRO-{self.zero_stage}" if self.deepspeed else "DDP",
            f"LoRA r={self.lora_rank}" if self.lora_rank else "full fine-tuning",
            f"batch {self.batch}x(1+{self.group_size})",
            f"lengths {self.query_length}/{self.passage_length}",
            "gradient checkpointing" if self.gradient_checkpointing else "no gradient checkpointing",
        ]
        return ", ".join(parts)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, by part."""

    weights: int
    gradients: int
    optimizer: int
    lora: int
    activations: int
    overhead: int
    parameters: int
    trainable: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.lora + self.activations + self.overhead

    def describe(self) -> str:
        parts = ", ".join(
            f"{name} {gib(value)}"
            for name, value in (
                ("weights", self.weights),
                ("gradients", self.gradients),
                ("optimizer", self.optimizer),
                ("LoRA", self.lora),
                ("activations", self.activations),
                ("overhead", self.overhead),
            )
            if value
        )
        return (
            f"{gib(self.total)} per GPU ({parts}); {self.parameters / 1e9:.3g}B parameters, "
            f"{self.trainable / 1e6:.4g}M trainable"
        )


def gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB" if value >= 0.1 * GIB else f"{value / 1024**2:.1f} MiB"


def estimate(shape: ModelShape, s: Settings) -> MemoryEstimate:
    params = shape.parameters()
    lora_params = shape.lora_parameters(s.lora_rank, s.lora_targets) if s.lora_rank else 0
    trainable = lora_params or params
    half = s.precision in ("bf16", "fp16")
    # HF's mixed precision keeps fp32 weights and gradients and computes in 16 bit; DeepSpeed
    # holds 16-bit weights and gradients and an fp32 master copy in the optimizer state.
    sixteen_bit_weights = half and s.deepspeed
    weight_bytes = 2 if sixteen_bit_weights else 4
    optimizer_bytes = 12 if sixteen_bit_weights else 8
    ranks = s.world_size if s.deepspeed else 1
    shard = {  # divisor of (weights, gradients, optimizer state) by ZeRO stage
        0: (1, 1, 1),
        1: (1, 1, ranks),
        2: (1, ranks, ranks),
        3: (ranks, ranks, ranks),
    }[s.zero_stage if s.deepspeed else 0]
    # LoRA's base weights are frozen: only the adapters have gradients and optimizer state,
    # and the adapters themselves are trained (kept) in fp32 by peft
    frozen = bool(lora_params)
    weights = params * weight_bytes // shard[0]
    lora = lora_params * 4 // shard[0] if frozen else 0
    gradients = trainable * (4 if frozen else weight_bytes) // shard[1]
    optimizer = trainable * (8 if frozen else optimizer_bytes) // shard[2]
    activations = activation_bytes(shape, s)
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        lora=lora,
        activations=activations,
        overhead=GPU_OVERHEAD_BYTES if s.on_gpu else 0,
        parameters=params + lora_params,
        trainable=trainable,
    )


def activation_bytes(shape: ModelShape, s: Settings) -> int:
    value_bytes = 2 if s.precision in ("bf16", "fp16") else 4
    sides = [(s.batch, s.query_length), (s.batch * s.group_size, s.passage_length)]
    tokens = sum(texts * length for texts, length in sides)
    per_layer = sum(texts * length * shape.activation_values_per_token(length) for texts, length in sides)
    if s.lora_rank:  # each adapter keeps its dropped-out input and its rank-r hidden state
        per_layer += tokens * sum(a + s.lora_rank for name in s.lora_targets for a, _ in shape.linear_shapes()[name])
    embeddings = tokens * shape.hidden * 2  # the embedding output and its normalized copy
    if s.gradient_checkpointing:  # each layer's input kept, one layer's activations recomputed at a time
        return value_bytes * (embeddings + shape.layers * tokens * shape.hidden + per_layer)
    return value_bytes * (embeddings + shape.layers * per_layer)


# GPU memory by the product name the NVIDIA GPU feature discovery puts in nvidia.com/gpu.product
# (names without their memory size in them; others say it, e.g. NVIDIA-A100-SXM4-80GB).
GPU_PRODUCT_KEY = "nvidia.com/gpu.product"
GPU_MEMORY_BY_PRODUCT = {
    "NVIDIA-H200": 141,
    "NVIDIA-H100-PCIe": 80,
    "NVIDIA-H100-SXM5": 80,
    "NVIDIA-B200": 180,
    "NVIDIA-L40S": 48,
    "NVIDIA-L40": 48,
    "NVIDIA-L4": 24,
    "NVIDIA-A10G": 24,
    "NVIDIA-A10": 24,
    "Tesla-T4": 16,
    "Tesla-V100-SXM2-16GB": 16,
}
_QUANTITY_UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def gpu_memory(spec: EmbeddingFinetuneSpec) -> tuple[int, str] | None:
    """Bytes of one GPU and where that came from, if the spec says."""
    resources = spec.resources
    if resources.gpu_memory is not None:
        match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", resources.gpu_memory)
        if match and match.group(2) in _QUANTITY_UNITS:
            return int(float(match.group(1)) * _QUANTITY_UNITS[match.group(2)]), "spec.resources.gpuMemory"
    product = resources.node_selector.get(GPU_PRODUCT_KEY)
    if product is None:
        return None
    source = f"spec.resources.nodeSelector[{GPU_PRODUCT_KEY}]"
    if (size := re.search(r"(\d+)GB", product)) is not None:
        return int(size.group(1)) * 10**9, source
    if product in GPU_MEMORY_BY_PRODUCT:
        return GPU_MEMORY_BY_PRODUCT[product] * 10**9, source
    return None


@dataclass(frozen=True)
class MemoryPlan:
    shape: ModelShape | None
    settings: Settings | None
    estimate: MemoryEstimate | None
    capacity: tuple[int, str] | None
    suggestions: list[str]

    @property
    def fits(self) -> bool:
        return self.estimate is None or self.capacity is None or self.estimate.total <= self.capacity[0]

    def describe(self, base: str) -> str:
        if self.estimate is None:
            return (
                f"memory: cannot estimate: no config.json readable for spec.model.base {base!r} and not a known model"
            )
        line = f"memory: {self.estimate.describe()} [{self.settings.describe()}]"
        if self.capacity is not None:
            line += f"; GPU {gib(self.capacity[0])} ({self.capacity[1]})"
        return line

    def problem(self) -> str | None:
        """The refusal, with the numbers and the settings that would fit; None if it fits."""
        if self.fits:
            return None
        capacity, source = self.capacity
        text = (
            f"spec.training: needs an estimated {gib(self.estimate.total)} per GPU but {source} is "
            f"{gib(capacity)} ({self.estimate.describe()})"
        )
        if self.suggestions:
            return text + "; it would fit with " + ", ".join(self.suggestions)
        return text + "; not even gradient checkpointing, ZeRO-3, LoRA and a batch of 1 together fit: more GPUs"


def plan_memory(spec: EmbeddingFinetuneSpec) -> MemoryPlan:
    shape = model_shape(spec.model.base)
    if shape is None:
        return MemoryPlan(None, None, None, gpu_memory(spec), [])
    settings = Settings.of(spec, shape)
    found = estimate(shape, settings)
    capacity = gpu_memory(spec)
    suggestions = []
    if capacity is not None and found.total > capacity[0]:
        suggestions = _fitting_changes(shape, settings, capacity[0])
    return MemoryPlan(shape, settings, found, capacity, suggestions)


def _fitting_changes(shape: ModelShape, s: Settings, capacity: int) -> list[str]:
    """The fewest changes along a ladder (cheapest in speed or quality first) that bring the
    estimate under `capacity`: climb until it fits, then drop the rungs it fits without."""
    ladder: list[tuple[str, dict[str, Any]]] = []  # (the change as the user writes it, fields it sets)
    if not s.gradient_checkpointing:
        ladder.append(("training.gradientCheckpointing: true", {"gradient_checkpointing": True}))
    if s.world_size > 1 and (not s.deepspeed or s.zero_stage < 3):
        # a later rung of the same setting replaces an earlier one: ZeRO-3 over ZeRO-2
        stages = [stage for stage in (2, 3) if not s.deepspeed or s.zero_stage < stage]
        ladder += [(f"training.deepspeed.zeroStage: {n}", {"deepspeed": True, "zero_stage": n}) for n in stages]
    if s.lora_rank is None:
        ladder.append(("model.lora: {rank: 16}", {"lora_rank": 16, "lora_targets": shape.default_lora_targets()}))
    batch = s.batch
    while batch > 1:
        batch //= 2
        ladder.append(
            (
                f"training.batchSizePerDevice: {batch} with gradientAccumulationSteps: {s.batch // batch}",
                {"batch": batch},
            )
        )

    def fits(changes: dict[str, tuple[str, dict[str, Any]]]) -> bool:
        settings = s
        for _, fields in changes.values():
            settings = replace(settings, **fields)
        return estimate(shape, settings).total <= capacity

    needed: dict[str, tuple[str, dict[str, Any]]] = {}  # setting -> its latest rung
    for change, fields in ladder:
        needed[change.split(":")[0]] = (change, fields)
        if fits(needed):
            break
    else:
        return []
    for setting in list(needed)[:-1]:
        if fits(trial := {key: rung for key, rung in needed.items() if key != setting}):
            needed = trial
    return [change for change, _ in needed.values()]
