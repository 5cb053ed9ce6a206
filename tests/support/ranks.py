"""Run a function on several CPU ranks joined in a gloo process group, in fresh processes."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from collections.abc import Callable
from typing import Any


def run_on_ranks(world_size: int, function: Callable[..., Any], *args: Any, timeout: float = 120) -> list[Any]:
    """`function(rank, world_size, *args)` on every rank; their return values in rank order.
    `function` must be importable (defined in a module, not in a test file)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as rendezvous:
        init = f"file://{os.path.join(rendezvous, 'store')}"
        processes = [
            context.Process(target=_rank_main, args=(rank, world_size, init, results, function, args))
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        collected = dict(results.get(timeout=timeout) for _ in processes)
        for process in processes:
            process.join(timeout)
    failures = {rank: value for rank, value in collected.items() if isinstance(value, BaseException)}
    if failures:
        raise RuntimeError(f"ranks failed: {failures}")
    return [collected[rank] for rank in range(world_size)]


def _rank_main(rank, world_size, init, results, function, args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    try:
        results.put((rank, function(rank, world_size, *args)))
    except BaseException as exc:  # reported to the test, which names the rank
        results.put((rank, RuntimeError(repr(exc))))
    finally:
        dist.destroy_process_group()
