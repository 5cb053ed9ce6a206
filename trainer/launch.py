"""`torchrun` that keeps the trainer's exit code.

torchrun reports any worker failure as exit code 1, which would hide the trainer's
"your input is wrong" code (2) from the operator. This takes torchrun's arguments
unchanged and exits 2 when any worker did, else with the first failure's code.

    python -m embedtune.trainer.launch --nnodes 2 --nproc-per-node 8 ... -m embedtune.trainer --config c.yaml
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from .errors import EXIT_FAILURE, EXIT_INPUT_ERROR, EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as exc:
        codes = [failure.exitcode for failure in exc.failures.values()]
        if EXIT_INPUT_ERROR in codes:
            return EXIT_INPUT_ERROR
        return next((code for code in codes if code > 0), EXIT_FAILURE)
    except SignalException as exc:
        # torchrun has passed the signal on to the workers and waited for them (they store a
        # checkpoint and stop); exit as a process killed by it would
        return 128 + int(exc.sigval)
    return EXIT_OK


def local_processes() -> int:
    """One trainer process per local GPU, or one on CPU (it uses every core)."""
    import torch

    return max(1, torch.cuda.device_count())


def local_trainer_command(config: Path, nproc: int) -> list[str]:
    """The trainer on this machine: `nproc` processes under torchrun, or one without it
    (a single process needs no process group, and torchrun's would only slow it down)."""
    if nproc == 1:
        return [sys.executable, "-m", "embedtune.trainer", "--config", str(config)]
    return [
        sys.executable,
        "-m",
        "embedtune.trainer.launch",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "embedtune.trainer",
        "--config",
        str(config),
    ]


def run_child(command: list[str], env: dict[str, str] | None = None, timeout: float | None = None, stdout=None) -> int:
    """Run a trainer or evaluator process to its end and return its exit code.

    Ctrl-C reaches the child with the terminal's process group (the trainer then stores a
    checkpoint and stops), so here it only must not kill this waiting process; a SIGTERM sent
    to this process is passed on. After `timeout` seconds the child gets SIGTERM, as a Job
    past its deadline would."""
    child = subprocess.Popen(command, env=env, stdout=stdout)
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: None),
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, _: child.send_signal(signum)),
    }
    try:
        try:
            return child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGTERM)
            return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
