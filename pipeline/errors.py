"""The two kinds of failure a user sees, and how a stage's own error is found again.

- :class:`UserError` (exit 2): a setup mistake found before any work starts (a missing input,
  an unwritable output, a bad option value). Every error class of ``pipeline.io`` is one.
- :class:`RunFailed` (exit 3): the run started and then failed (a stage raised, an actor
  died, storage failed, too many rows rejected); the same command resumes it.

``pipeline/cli.py`` maps them (and the model's and tokenizer's own errors) to exit codes.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the inputs, outputs or options, found before any work starts (exit 2)."""


class RunFailed(RuntimeError):
    """The run started and then failed (a stage raised, an actor died, storage failed, too
    many rows rejected); exit 3. Rerunning the same command resumes it."""


def root_cause(err: BaseException) -> BaseException:
    """The error a stage raised, unwrapped from Ray's task errors (their text is a traceback)."""
    seen, said = set(), err
    while id(err) not in seen:
        seen.add(id(err))
        if str(err).strip():
            said = err  # the innermost error with something to say
        inner = getattr(err, "cause", None) or err.__cause__
        if not isinstance(inner, BaseException):
            break
        err = inner
    return err if str(err).strip() else said
