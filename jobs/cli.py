"""One way every `jobs/*` entrypoint ends on bad input: the message, and exit code 2.

    @entrypoint
    def main(argv: list[str] | None = None) -> int: ...

A `nanochat.errors.NanochatError` (config, storage, placement, checkpoint, data, pipeline errors
all subclass it) is a problem the user can fix: its message goes to stderr as `error: ...` and
`main` returns 2. Anything else is a bug: it keeps its traceback and the process exits 1. Tests call
`main([...])` and get the same exit codes as the command line.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence

from nanochat.errors import NanochatError

USER_ERROR = 2


def entrypoint(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a `main(argv) -> int` so that a NanochatError prints `error: <message>` and returns 2."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except NanochatError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return USER_ERROR

    return run
