"""Peak memory of one training step against batch size, with and without GradCache
(`training.gradCache.miniBatchSize`); run `python benchmarks/grad_cache_memory.py`.

Each (batch size, mode) runs in a fresh process: one forward and backward of embedtune's
training model (a random 4-layer BERT of width 256, queries of 32 tokens,
passages of 64, groupSize 8) on random tokens. Peak memory is the growth of the process's peak
RSS over one step (CPU), or torch's peak allocated memory when a GPU is present. Prints a
markdown table and writes JSON next to it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

QUERY_TOKENS, PASSAGE_TOKENS, GROUP_SIZE = 32, 64, 8


def one_step(batch_size: int, mini_batch: int) -> dict:
    import torch
    from transformers import BertConfig, BertModel

    from embedtune.trainer.runner import EmbedtuneEmbedderModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = EmbedtuneEmbedderModel(BertModel(config), temperature=0.02, normalize_embeddings=True).to(device).train()
    model.grad_cache_queries = mini_batch

    def tokens(rows: int, length: int) -> dict:
        ids = torch.randint(5, config.vocab_size, (rows, length), device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    queries, passages = tokens(batch_size, QUERY_TOKENS), tokens(batch_size * GROUP_SIZE, PASSAGE_TOKENS)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    model(queries=queries, passages=passages).loss.backward()
    seconds = time.perf_counter() - started
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"batchSize": batch_size, "miniBatch": mini_batch, "peakMiB": peak / 2**20, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--mini-batch", type=int, default=4, help="GradCache mini-batch, in queries")
    parser.add_argument("--one", type=int, nargs=2, metavar=("BATCH", "MINI"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_step(*args.one)))
        return
    results = []
    for batch_size in args.batch_sizes:
        for mini_batch in (0, args.mini_batch):
            command = [sys.executable, __file__, "--one", str(batch_size), str(mini_batch)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
            print(results[-1], file=sys.stderr)
    print(f"\n{platform.processor() or platform.machine()}, batch = queries, {GROUP_SIZE} passages each\n")
    print(f"| batch | plain: peak MiB | plain: s/step | GradCache {args.mini_batch}: peak MiB | GradCache: s/step |")
    print("|---|---|---|---|---|")
    for plain, cached in zip(results[::2], results[1::2]):
        print(
            f"| {plain['batchSize']} | {plain['peakMiB']:.0f} | {plain['seconds']:.1f} | "
            f"{cached['peakMiB']:.0f} | {cached['seconds']:.1f} |"
        )
    out = Path(__file__).with_name("results") / "grad_cache_memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
