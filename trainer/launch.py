"""`torchrun` that keeps the trainer's exit code.

torchrun reports any worker failure as exit code 1, which would hide the trainer's
"your input is wrong" code (2) from the operator. This takes torchrun's arguments
unchanged and exits 2 when any worker did, else with the first failure's code.

    python -m embedtune.trainer.launch --nnodes 2 --nproc-per-node 8 ... -m embedtune.trainer --config c.yaml
"""

from __future__ import annotations

import sys

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


if __name__ == "__main__":
    sys.exit(main())
