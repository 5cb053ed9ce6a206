"""`torchrun` that keeps the trainer's exit code.

torchrun reports any worker failure as exit code 1, which would hide the trainer's
"your input is wrong" code (2) from the operator. This takes torchrun's arguments
unchanged and exits 2 when any worker did, else with the first failure's code.

    python -m embedtune.trainer.launch --nnodes 2 --nproc-per-node 8 ... -m embedtune.trainer --config c.yaml
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ChildExit:
    exit_code: int
    signal: int | None  # SIGINT or SIGTERM that this process received while the child ran


def run_child(
    command: list[str], env: dict[str, str] | None = None, timeout: float | None = None, stdout=None
) -> ChildExit:
    """Run a trainer or evaluator process to its end.

    Ctrl-C reaches the child with the terminal's process group (the trainer then stores a
    checkpoint and stops), so here it only must not kill this waiting process; a SIGTERM sent
    to this process is passed on. Either is reported, so the caller can stop as well. After
    `timeout` seconds the child gets SIGTERM, as a Job past its deadline would. If this
    process dies (even by SIGKILL), the child gets SIGTERM and stops the same way."""
    received: list[int] = []

    def on_interrupt(signum, _frame):
        received.append(signum)

    def on_terminate(signum, _frame):
        received.append(signum)
        child.send_signal(signum)

    child = subprocess.Popen(command, env=env, stdout=stdout, preexec_fn=_terminate_with_parent)
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, on_interrupt),
        signal.SIGTERM: signal.signal(signal.SIGTERM, on_terminate),
    }
    try:
        try:
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGTERM)
            code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return ChildExit(code, received[0] if received else None)


def _terminate_with_parent() -> None:
    """In the child, before it starts: SIGTERM when the parent dies (Linux), so a trainer never
    runs on, and publishes a model, for a command that is gone."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (AttributeError, OSError):  # not Linux: the child outlives a killed parent
        pass


_PR_SET_PDEATHSIG = 1


if __name__ == "__main__":
    sys.exit(main())
