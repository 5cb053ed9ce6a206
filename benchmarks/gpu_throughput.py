"""Training throughput on one GPU: embedtune vs stock FlagEmbedding vs a plain PyTorch loop.

    python benchmarks/gpu_throughput.py                 # bert-base, 32 x 8, 60 steps (one GPU, < 8 min)
    python benchmarks/gpu_throughput.py --size tiny     # a 2-layer model, a few steps (CPU, the test suite)

Nothing is downloaded: the model is a random-init BERT, the tokenizer a WordPiece vocabulary
generated here, the training data generated text with realistic, varied passage lengths
(lognormal words per passage, median 110; queries median 10 words). Every variant trains the
same model, data, batch and seed, each in its own process:

    embedtune           today's embedtune with its defaults on a GPU (padding-free, DataLoader workers)
    embedtune-padded    embedtune as before issue 13: padded batches, tokenized in the training process
    embedtune-compile   embedtune with training.compile (GPU only)
    stock-w0 / stock-w4 `python -m FlagEmbedding.finetune.embedder.encoder_only.base`,
                        dataloader_num_workers 0 (its default) and 4
    plain-padded        a plain PyTorch loop on batches tokenized beforehand, padded

Per variant: steady-state seconds per step (median after the first 10 steps), real tokens/s,
computed token slots/s (padding included), MFU (model FLOPs of the real tokens over the GPU's
peak), peak GPU memory, loss at steps 10/30/60, and the start timeline (seconds from process
start to the trainer's first and tenth step). Raw JSON goes to benchmarks/results/; one table
is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {
    # layers, hidden, heads, steps, batch, group, query max, passage max, vocabulary
    "base": {"layers": 12, "hidden": 768, "heads": 12, "steps": 60, "batch": 32, "group": 8, "qlen": 64, "plen": 512,
             "vocab": 30522},
    "tiny": {"layers": 2, "hidden": 64, "heads": 2, "steps": 12, "batch": 4, "group": 4, "qlen": 16, "plen": 64,
             "vocab": 2000},
}  # fmt: skip
LOSS_STEPS = (10, 30, 60)
WARMUP_STEPS = 10
# bf16 dense peak of one H200 (NVIDIA's datasheet, without sparsity); other GPUs: --peak-tflops
H200_PEAK_TFLOPS = 989.0
RECORD_ENV = "GPU_THROUGHPUT_RECORD"


# --- inputs: a tokenizer, a model and data, all generated ------------------------------------


def make_words(count: int, seed: int = 0) -> list[str]:
    """Distinct lowercase pseudo-words of 2 to 10 letters (English-like lengths)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words: dict[str, None] = {}
    while len(words) < count:
        length = int(np.clip(rng.poisson(5), 2, 10))
        words["".join(rng.choice(letters, length))] = None
    return list(words)


def build_model(directory: Path, size: dict, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocabulary = specials + make_words(size["vocab"] - len(specials), seed)
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocabulary)}).save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        intermediate_size=size["hidden"] * 4,
        max_position_embeddings=512,
        # no dropout: its random masks differ between padded and packed tensors, and the variants'
        # loss curves are compared step by step
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(config).save_pretrained(directory)
    return directory


def make_records(count: int, group: int, words: list[str], seed: int = 0) -> list[dict]:
    """Records of one query, one positive and group-1 negatives; passage lengths lognormal (median
    110 words, sigma 0.95: a long tail, so a padded batch is mostly padding), queries median 10."""
    rng = np.random.default_rng(seed)
    vocabulary = np.array(words)

    def text(median: float, sigma: float) -> str:
        length = int(np.clip(rng.lognormal(np.log(median), sigma), 2, 2000))
        return " ".join(rng.choice(vocabulary, length))

    return [
        {"query": text(10, 0.4), "pos": [text(110, 0.95)], "neg": [text(110, 0.95) for _ in range(group - 1)]}
        for _ in range(count)
    ]


# --- the variants, each in its own process ---------------------------------------------------


def embedtune_command(work: Path, model: Path, data: Path, size: dict, steps: int, on_gpu: bool, **training):
    import yaml

    config = {
        "model": {
            "base": str(model),
            "pooling": "cls",
            "queryMaxLength": size["qlen"],
            "passageMaxLength": size["plen"],
        },
        "data": {"train": str(data)},
        "training": {
            "maxSteps": steps,
            "batchSizePerDevice": size["batch"],
            "groupSize": size["group"],
            "learningRate": 1e-5,
            "temperature": 0.02,
            "precision": "bf16" if on_gpu else "fp32",
            "loggingSteps": 1,
            "seed": 42,
        }
        | training,
        "checkpoint": {"everySteps": steps * 10, "keep": 1},
        "storage": {"uri": str(work / "store")},
        "workDir": str(work / "work"),
    }
    path = work / "trainer.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["embedtune.trainer", "--config", str(path)]


def stock_command(work: Path, model: Path, data: Path, size: dict, steps: int, on_gpu: bool, workers: int):
    return [
        "FlagEmbedding.finetune.embedder.encoder_only.base",
        *("--model_name_or_path", str(model), "--train_data", str(data), "--output_dir", str(work / "out")),
        *("--max_steps", str(steps), "--per_device_train_batch_size", str(size["batch"])),
        *("--train_group_size", str(size["group"]), "--query_max_len", str(size["qlen"])),
        *("--passage_max_len", str(size["plen"]), "--learning_rate", "1e-5", "--temperature", "0.02"),
        *("--sentence_pooling_method", "cls", "--normalize_embeddings", "True", "--seed", "42"),
        *("--logging_steps", "1", "--save_steps", str(steps * 10), "--report_to", "none"),
        *("--dataloader_num_workers", str(workers)),
        *(("--bf16", "True") if on_gpu else ("--use_cpu", "True")),
    ]


def variants(size_name: str, on_gpu: bool) -> list[str]:
    names = ["embedtune", "embedtune-padded", "stock-w0", "stock-w4", "plain-padded"]
    if on_gpu:
        names.insert(2, "embedtune-compile")
    return names


def run_variant(name: str, work: Path, model: Path, data: Path, size: dict, steps: int, on_gpu: bool) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    if name == "embedtune":  # padding-free, workers from the CPUs: the GPU defaults (forced on CPU)
        module_args = embedtune_command(work, model, data, size, steps, on_gpu, paddingFree=True)
    elif name == "embedtune-padded":
        module_args = embedtune_command(work, model, data, size, steps, on_gpu, paddingFree=False, dataloaderWorkers=0)
    elif name == "embedtune-compile":
        module_args = embedtune_command(work, model, data, size, steps, on_gpu, paddingFree=True, compile=True)
    elif name.startswith("stock-w"):
        module_args = stock_command(work, model, data, size, steps, on_gpu, int(name.removeprefix("stock-w")))
    else:
        module_args = ["--plain", str(model), str(data), json.dumps(size), str(steps)]
    record = work / "record.json"
    command = [sys.executable, __file__, *(["--timed", *module_args] if name != "plain-padded" else module_args)]
    env = os.environ | {RECORD_ENV: str(record), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=work)
    if result.returncode != 0 or not record.exists():
        raise RuntimeError(f"{name} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(record.read_text()) | {"variant": name, "wall_seconds": time.monotonic() - started}


# --- inside a variant's process: what the steps did, and when ---------------------------------


def timed_module(module: str, args: list[str]) -> None:
    """Run `module` as `python -m` would, recording each optimizer step's time, tokens and loss
    through transformers' Trainer (both embedtune and stock FlagEmbedding train with it)."""
    import runpy

    import torch
    import transformers

    started = time.monotonic()
    steps: list[dict] = []
    counts = {"tokens": 0, "slots": 0, "squares": 0}
    record: dict = {"timeline": {}}

    class StepClock(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record["timeline"]["train_begin"] = time.monotonic() - started

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            steps.append({"step": state.global_step, "time": time.monotonic() - started, **counts})
            counts.update(tokens=0, slots=0, squares=0)
            if state.global_step in (1, 10):
                record["timeline"][f"step_{state.global_step}"] = time.monotonic() - started

    original_step = transformers.Trainer.training_step
    original_train = transformers.Trainer.train

    def training_step(self, model, inputs, *rest, **kwargs):
        for side in ("queries", "passages"):
            count_tokens(inputs[side], counts)
        return original_step(self, model, inputs, *rest, **kwargs)

    def train(self, *a, **kwargs):
        self.add_callback(StepClock())
        output = original_train(self, *a, **kwargs)
        record["losses"] = {e["step"]: e["loss"] for e in self.state.log_history if "loss" in e}
        return output

    transformers.Trainer.training_step = training_step
    transformers.Trainer.train = train
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    record["steps"] = steps
    record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    Path(os.environ[RECORD_ENV]).write_text(json.dumps(record))


def count_tokens(batch, counts: dict) -> None:
    if "cu_seq_lens_q" in batch:  # packed: every slot is a real token
        lengths = batch["cu_seq_lens_q"].diff().long()
        slots = int(batch["input_ids"].numel())
    else:
        lengths = batch["attention_mask"].sum(dim=1).long()
        slots = int(batch["attention_mask"].numel())
    counts["tokens"] += int(lengths.sum())
    counts["slots"] += slots
    counts["squares"] += int((lengths**2).sum())


def plain_loop(model_dir: str, data_file: str, size: dict, steps: int) -> None:
    """The padded compute itself: batches tokenized beforehand, a bare bi-encoder step."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    started = time.monotonic()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    torch.manual_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    records = [json.loads(line) for line in Path(data_file).read_text().splitlines()]
    batch, group = size["batch"], size["group"]
    batches = []
    for step in range(steps):
        chunk = records[(step * batch) % len(records) :][:batch]
        queries = tokenizer([r["query"] for r in chunk], padding=True, truncation=True, max_length=size["qlen"],
                            return_tensors="pt")  # fmt: skip
        passages = tokenizer([p for r in chunk for p in (r["pos"][:1] + r["neg"][: group - 1])], padding=True,
                             truncation=True, max_length=size["plen"], return_tensors="pt")  # fmt: skip
        batches.append((queries, passages))
    record: dict = {"timeline": {"train_begin": time.monotonic() - started}, "steps": [], "losses": {}}
    labels = torch.arange(batch, device=device) * group
    for step, (queries, passages) in enumerate(batches, start=1):
        counts = {"tokens": 0, "slots": 0, "squares": 0}
        count_tokens(queries, counts)
        count_tokens(passages, counts)
        queries, passages = queries.to(device), passages.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            q = F.normalize(model(**queries).last_hidden_state[:, 0], dim=-1)
            p = F.normalize(model(**passages).last_hidden_state[:, 0], dim=-1)
            loss = F.cross_entropy((q @ p.T).float() / 0.02, labels[: q.shape[0]])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record["losses"][step] = loss.item()  # a sync per step, as the Trainer's per-step log
        record["steps"].append({"step": step, "time": time.monotonic() - started, **counts})
        if step in (1, 10):
            record["timeline"][f"step_{step}"] = time.monotonic() - started
    record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    Path(os.environ[RECORD_ENV]).write_text(json.dumps(record))


# --- the summary -------------------------------------------------------------------------------


def summarize(record: dict, size: dict, parameters: int, peak_flops: float | None) -> dict:
    steps = record["steps"]
    warm = [b["time"] - a["time"] for a, b in zip(steps, steps[1:]) if b["step"] > min(WARMUP_STEPS, len(steps) // 2)]
    seconds = statistics.median(warm) if warm else None
    measured = [s for s in steps if s["step"] > min(WARMUP_STEPS, len(steps) // 2)]
    tokens = statistics.mean(s["tokens"] for s in measured) if measured else 0
    slots = statistics.mean(s["slots"] for s in measured) if measured else 0
    squares = statistics.mean(s["squares"] for s in measured) if measured else 0
    # training FLOPs of the real tokens: 3 x forward (2 per weight and token, plus attention's two
    # sequence-length products of 2 x hidden FLOPs per layer and token pair)
    flops = 3 * (2 * parameters * tokens + 4 * size["layers"] * size["hidden"] * squares)
    losses = {int(k): v for k, v in record["losses"].items()}
    return {
        "variant": record["variant"],
        "seconds_per_step": seconds,
        "real_tokens_per_second": tokens / seconds if seconds else None,
        "token_slots_per_second": slots / seconds if seconds else None,
        "padding_share": 1 - tokens / slots if slots else None,
        "mfu": flops / seconds / peak_flops if seconds and peak_flops else None,
        "peak_memory_gib": record.get("peak_memory_gib"),
        "loss": {step: losses.get(step) for step in LOSS_STEPS},
        "timeline": record["timeline"],
    }


def format_table(rows: list[dict]) -> str:
    def number(value, spec):
        return "-" if value is None else format(value, spec)

    lines = [
        "| variant | s/step | real tokens/s | slots/s | padding | MFU | peak GiB | loss@10 | loss@30 | loss@60 "
        "| to step 1 s | to step 10 s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        timeline = row["timeline"]
        lines.append(
            f"| {row['variant']} | {number(row['seconds_per_step'], '.3f')} "
            f"| {number(row['real_tokens_per_second'], ',.0f')} | {number(row['token_slots_per_second'], ',.0f')} "
            f"| {number(row['padding_share'], '.0%')} | {number(row['mfu'], '.1%')} "
            f"| {number(row['peak_memory_gib'], '.1f')} "
            + "".join(f"| {number(row['loss'][step], '.4f')} " for step in LOSS_STEPS)
            + f"| {number(timeline.get('step_1'), '.1f')} | {number(timeline.get('step_10'), '.1f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--steps", type=int, help="optimizer steps per variant (default: the size's)")
    parser.add_argument("--variants", help="comma-separated subset of the variants")
    parser.add_argument("--peak-tflops", type=float, help=f"the GPU's bf16 peak (default: H200, {H200_PEAK_TFLOPS})")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the raw JSON")
    args = parser.parse_args(argv)

    import torch

    size = SIZES[args.size]
    steps = args.steps or size["steps"]
    on_gpu = torch.cuda.is_available()
    names = args.variants.split(",") if args.variants else variants(args.size, on_gpu)
    with tempfile.TemporaryDirectory(prefix="gpu-throughput-") as scratch:
        root = Path(scratch)
        started = time.monotonic()
        model = build_model(root / "model", size)
        words = make_words(size["vocab"] - 5)
        data = root / "train.jsonl"
        records = make_records(steps * size["batch"], size["group"], words)
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"model, tokenizer and {len(records)} records in {time.monotonic() - started:.1f}s", flush=True)
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(model)
        parameters = sum(p.numel() for n, p in encoder.named_parameters() if "embeddings" not in n)
        raw = []
        for name in names:
            print(f"running {name} ...", flush=True)
            raw.append(run_variant(name, root / name, model, data, size, steps, on_gpu))
    peak = (args.peak_tflops or H200_PEAK_TFLOPS) * 1e12 if on_gpu else None
    rows = [summarize(record, size, parameters, peak) for record in raw]
    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()})"
    stamp = datetime.datetime.now(datetime.UTC)
    report = {
        "date": stamp.isoformat(timespec="seconds"),
        "device": device,
        "size": args.size,
        "steps": steps,
        "settings": size,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "rows": rows,
        "raw": raw,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"gpu_throughput-{args.size}-{'gpu' if on_gpu else 'cpu'}-{stamp:%Y%m%dT%H%M%S}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"{device}, {args.size}, {steps} steps, {stamp:%Y-%m-%d}; raw JSON: {out}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--timed":
        timed_module(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--plain":
        plain_loop(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(main())
