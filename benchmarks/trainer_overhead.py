"""Trainer overhead benchmarks (CPU-only here; run `python benchmarks/trainer_overhead.py`).

1. Our trainer vs stock `python -m FlagEmbedding.finetune.embedder.encoder_only.base` on the
   same model, data and arguments: ratio of HF's train_runtime (startup excluded).
2. Our trainer with checkpoints uploaded to an S3 server (moto on 127.0.0.1) every N steps
   vs with no checkpoint inside the measured steps.

Runs alternate A/B and report medians. Prints a markdown table and writes JSON next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.tiny import build_tiny_bert, synthetic_records, write_jsonl  # noqa: E402

STOCK_RUNTIME = re.compile(r"'train_runtime': '?([\d.]+)")
OUR_RUNTIME = re.compile(r"train_runtime ([\d.]+)s")


def run(command: list[str], env: dict, pattern: re.Pattern) -> float:
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    found = pattern.findall(result.stdout + result.stderr)
    if result.returncode != 0 or not found:
        raise RuntimeError(f"{command[:4]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return float(found[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=256, help="model width (768 with --layers 12: bert-base)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="queries per device and step")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 needs a GPU")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/trainer_overhead.json"))
    args = parser.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    tmp = Path(tempfile.mkdtemp(prefix="embedtune-bench-"))
    # randomly initialised; by default 4 layers, 256 wide (FFN 512), big enough that steps are
    # dominated by the model, as they are with real ones
    model = build_tiny_bert(tmp / "model", hidden=args.hidden, layers=args.layers, heads=args.heads)
    import torch

    on_gpu = torch.cuda.is_available()
    data = write_jsonl(tmp / "train.jsonl", synthetic_records(4000, negatives=7))
    env = os.environ | {
        "OMP_NUM_THREADS": str(os.cpu_count()),
        "HF_HUB_OFFLINE": "1",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=5757, verbose=False)
    server.start()
    boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:5757",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    ).create_bucket(Bucket="bench")

    common = {"batch": args.batch, "group": 8, "qlen": 32, "plen": 64, "lr": 1e-5}
    # padded token slots one step encodes: queries plus groupSize passages per query
    tokens_per_step = common["batch"] * (common["qlen"] + common["group"] * common["plen"])

    def ours(name: str, storage: str, every: int) -> list[str]:
        config = {
            "model": {
                "base": str(model),
                "pooling": "cls",
                "queryMaxLength": common["qlen"],
                "passageMaxLength": common["plen"],
            },
            "data": {"train": str(data)},
            "training": {
                "maxSteps": args.steps,
                "batchSizePerDevice": common["batch"],
                "groupSize": common["group"],
                "learningRate": common["lr"],
                "temperature": 0.02,
                "warmupRatio": 0.0,
                "loggingSteps": 10,
                "negativesCrossDevice": False,
                "precision": args.precision,
            },
            "checkpoint": {"everySteps": every, "keep": 2},
            "storage": {"uri": storage} | ({"endpoint": "http://127.0.0.1:5757"} if storage.startswith("s3") else {}),
            "run": {"runId": name},
            "workDir": str(tmp / f"work-{name}"),
        }
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return [
            sys.executable,
            "-m",
            "embedtune.trainer.launch",
            "--standalone",
            "--nproc-per-node=1",
            "-m",
            "embedtune.trainer",
            "--config",
            str(path),
        ]

    def stock(name: str) -> list[str]:
        # our trainer fills negatives up front; give stock FlagEmbedding the same prepared file,
        # and the same launcher (torchrun), as a cluster job would run it
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=1",
            "-m",
            "FlagEmbedding.finetune.embedder.encoder_only.base",
            "--model_name_or_path",
            str(model),
            "--train_data",
            str(tmp / "work-prep" / "data" / "train.jsonl"),
            "--output_dir",
            str(tmp / f"stock-{name}"),
            "--max_steps",
            str(args.steps),
            "--per_device_train_batch_size",
            str(common["batch"]),
            "--train_group_size",
            str(common["group"]),
            "--query_max_len",
            str(common["qlen"]),
            "--passage_max_len",
            str(common["plen"]),
            "--learning_rate",
            str(common["lr"]),
            "--temperature",
            "0.02",
            "--logging_steps",
            "10",
            "--save_steps",
            str(args.steps),
            "--sentence_pooling_method",
            "cls",
            "--normalize_embeddings",
            "True",
            "--report_to",
            "none",
            "--dataloader_num_workers",
            "0",
            "--seed",
            "42",
            *(["--bf16", "True"] if args.precision == "bf16" else []),
            *([] if on_gpu else ["--use_cpu", "True"]),
        ]

    run(ours("prep", str(tmp / "store-prep"), args.steps), env, OUR_RUNTIME)  # prepares the shared data file
    # "final checkpoint only" matches stock (HF always saves the last step); the other two save
    # every N steps and differ only in where checkpoints go: a local folder, or the S3 server
    results = {"stock": [], "ours": [], "ours_checkpoints_local": [], "ours_checkpoints_s3": []}
    # the S3 server (moto) runs in this process, which otherwise only waits: its CPU time is
    # what the server takes from training on the same cores
    server_cpu_seconds = []
    for repeat in range(args.repeats):
        results["stock"].append(run(stock(str(repeat)), env, STOCK_RUNTIME))
        results["ours"].append(run(ours(f"a{repeat}", str(tmp / "store"), args.steps), env, OUR_RUNTIME))
        results["ours_checkpoints_local"].append(
            run(ours(f"b{repeat}", str(tmp / "store"), args.checkpoint_every), env, OUR_RUNTIME)
        )
        before = _cpu_seconds()
        results["ours_checkpoints_s3"].append(
            run(ours(f"c{repeat}", "s3://bench/x", args.checkpoint_every), env, OUR_RUNTIME)
        )
        server_cpu_seconds.append(_cpu_seconds() - before)
        print(f"repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in results.items()), flush=True)
    server.stop()

    median = {k: statistics.median(v) for k, v in results.items()}
    ckpt_size = sum(
        p.stat().st_size for p in (tmp / "work-c0" / "checkpoints").glob(f"checkpoint-{args.steps}/*") if p.is_file()
    )
    summary = {
        "machine": (
            torch.cuda.get_device_name()
            if on_gpu
            else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        ),
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads},
        "precision": args.precision,
        "tokensPerStep": tokens_per_step,
        "date": time.strftime("%Y-%m-%d"),
        "steps": args.steps,
        "repeats": args.repeats,
        "checkpointEvery": args.checkpoint_every,
        "checkpointBytes": ckpt_size,
        "runtimes": results,
        "median": median,
        "overheadVsStock": median["ours"] / median["stock"] - 1,
        "checkpointingCost": median["ours_checkpoints_s3"] / median["ours"] - 1,
        "s3UploadCost": median["ours_checkpoints_s3"] / median["ours_checkpoints_local"] - 1,
        "s3ServerCpuSeconds": server_cpu_seconds,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2))
    print(f"\n| run | median train_runtime ({args.steps} steps) | tokens/s |\n|---|---|---|")
    for key, value in median.items():
        print(
            f"| {key} | {value:.2f} s ({value / args.steps * 1000:.0f} ms/step) | "
            f"{tokens_per_step * args.steps / value:,.0f} |"
        )
    print(f"\noverhead vs stock FlagEmbedding: {summary['overheadVsStock'] * 100:+.1f}%")
    print(
        f"checkpoints every {args.checkpoint_every} steps ({ckpt_size / 1e6:.0f} MB each) uploaded to S3, "
        f"vs only the final one: {summary['checkpointingCost'] * 100:+.1f}% on the run"
    )
    print(f"the same checkpoints uploaded to S3 vs copied to a local folder: {summary['s3UploadCost'] * 100:+.1f}%")
    print(
        f"CPU time of the S3 server per run with uploads: {statistics.median(server_cpu_seconds):.2f} s "
        f"(startup included)"
    )


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
