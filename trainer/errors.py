"""Exit codes of the trainer and evaluator processes, and the errors that map to them.

The operator classifies a failed pod by its exit code:

- 2 (`InputError`): the user's input is wrong (data, config, model id, the storage bucket or
  credentials) and retrying cannot help: the run fails at once, with the reason.
- 75 (`StorageUnavailable`, EX_TEMPFAIL): storage stayed unreachable or kept failing for the
  whole retry window (`spec.storage.retrySeconds`): infrastructure, retried from the last
  stored checkpoint while `runPolicy.maxRestarts` allows.
- 130, 143: stopped by SIGINT / SIGTERM after storing what it could: retried likewise.
- any other non-zero code: infrastructure, retried likewise.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INPUT_ERROR = 2
EXIT_STORAGE_UNAVAILABLE = 75  # EX_TEMPFAIL of sysexits.h: a temporary failure, worth retrying
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


class InputError(Exception):
    """The user's input is wrong; every problem is listed, each naming what to fix. `reason`
    is a CamelCase word for what kind of input failed, as the status and Events show it."""

    def __init__(self, summary: str, problems: list[str] | None = None, *, reason: str = "InputError"):
        self.summary = summary
        self.problems = list(problems or [])
        self.reason = reason
        super().__init__(self.report())

    def report(self, limit: int | None = None) -> str:
        shown = self.problems if limit is None else self.problems[:limit]
        lines = [self.summary, *shown]
        if limit is not None and len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more problems")
        return "\n".join(lines)


class StorageUnavailable(Exception):
    """Storage was unreachable (or answered with server errors) for the whole retry window;
    the message says what was not stored and which checkpoint is."""
