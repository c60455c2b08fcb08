"""The project's error base class: bad input that a user can fix, as opposed to a bug.

Every error that names a problem in what the user gave (a config, a run directory, a data source,
a checkpoint, a cluster that cannot place a stage) subclasses `NanochatError`. Every command line
(`jobs/*`, `cluster/local.py`, `cluster/resources.py`) wraps its `main(argv) -> int` in `@entrypoint`:
such an error prints `error: <message>` and returns 2; anything else is a bug and keeps its
traceback (exit 1). Tests call `main([...])` and get the same exit codes as the command line.
Subclasses may also derive from a builtin (ValueError, FileNotFoundError, ConnectionError) where
callers already catch that.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence

USER_ERROR = 2  # the exit code of a NanochatError


class NanochatError(Exception):
    """A problem with the user's input or environment; the message says what is wrong and what to do."""


class ConfigError(NanochatError, ValueError):
    """A setting that cannot work (a value out of range, an unknown name, a combination that does not fit)."""


class NotFoundError(NanochatError, FileNotFoundError):
    """An input that should exist does not (a model, a tokenizer, a data split): the message says how
    to make it."""


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
