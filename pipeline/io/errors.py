"""The I/O layer's errors: each a :class:`~pipeline.errors.UserError` (exit 2) when the
pre-flight raises it; raised inside a running stage it fails the run (exit 3)."""

from __future__ import annotations

from ..errors import UserError


class InputError(UserError, ValueError):
    """The input is missing, in an unknown format, or lacks a needed column."""


class StorageError(UserError, RuntimeError):
    """A filesystem could not be reached or refused an operation."""


class OutputError(UserError, RuntimeError):
    """The output location cannot be written, or holds an earlier run's files."""
