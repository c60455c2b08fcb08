"""The project's error base class: bad input that a user can fix, as opposed to a bug.

Every error that names a problem in what the user gave (a config, a run directory, a data source,
a checkpoint, a cluster that cannot place a stage) subclasses `NanochatError`. Entrypoints under
`jobs/` print such an error's message and exit 2 (`jobs/cli.py`); anything else is a bug and keeps
its traceback and exit 1. Subclasses may also derive from a builtin (ValueError, ConnectionError)
where callers already catch that.
"""

from __future__ import annotations


class NanochatError(Exception):
    """A problem with the user's input or environment; the message says what is wrong and what to do."""


class ConfigError(NanochatError, ValueError):
    """A setting that cannot work (a value out of range, an unknown name, a combination that does not fit)."""


class NotFoundError(NanochatError, FileNotFoundError):
    """An input that should exist does not (a model, a tokenizer, a data split): the message says how to make it."""
