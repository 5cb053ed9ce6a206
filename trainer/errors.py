"""Exit codes of the trainer process, and the error that maps to the "your input" code.

The operator classifies a failed training pod by its exit code: 2 means the user's input
(data, config, model id) is wrong and retrying cannot help; any other non-zero code is
treated as infrastructure and retried from the last checkpoint.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


class InputError(Exception):
    """The user's input is wrong; every problem is listed, each naming what to fix."""

    def __init__(self, summary: str, problems: list[str] | None = None):
        self.summary = summary
        self.problems = list(problems or [])
        super().__init__(self.report())

    def report(self, limit: int | None = None) -> str:
        shown = self.problems if limit is None else self.problems[:limit]
        lines = [self.summary, *shown]
        if limit is not None and len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more problems")
        return "\n".join(lines)
