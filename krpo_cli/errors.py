"""The one base class of every error a user can cause.

A bad recipe, a missing file, a model or dataset that cannot load, a run directory or
checkpoint that cannot be used: each module raises its own subclass of `KrpoError` with a
message that says what is wrong and what to do. The command line prints that message and
exits with code 2 (`krpo_cli.cli`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class KrpoError(Exception):
    """A mistake a user can make and fix; the message says which and how."""
