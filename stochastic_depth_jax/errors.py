"""The project's exception types for anticipated mistakes and conditions.

Every error a user can cause or fix (a bad config value, missing or damaged data, a busy or
unwritable workdir, a missing checkpoint, a diverged run) derives from :class:`Error`. Its
message names what is wrong, the value and the fix, on one line; the command-line tools
print it as ``error: <message>`` and exit with status 1 (``--debug`` or ``SDJ_DEBUG=1``
shows the traceback). Anything else is a bug and keeps its traceback.

Each type also derives from the built-in exception it refines (``ValueError``,
``OSError``, ...), so code catching the built-in keeps working.

Where the fix is to run again (resume a stopped or failed run, retry a read), the words
differ between a Python caller and a shell: ``str(error)`` says "call ... again" and
``error.command_line``, the line the command-line tools print, says "run the same command"
(:func:`run_again`).
"""

from __future__ import annotations

from typing import Callable

__all__ = [
    "Error",
    "ConfigError",
    "DataError",
    "DataFileNotFoundError",
    "WorkdirError",
    "WorkdirBusyError",
    "CheckpointError",
    "DistributedError",
    "run_again",
]


class Error(Exception):
    """Base of every anticipated error; its message is meant for the user as is.

    Args:
      *args: as any exception's; ``str()`` is the message for a Python caller.
      command_line: the message as the command-line tools print it, where it differs
        (:func:`run_again`); ``command_line`` is ``str()`` otherwise.
    """

    _command_line: str | None = None  # also for an instance made without __init__

    def __init__(self, *args: object, command_line: str | None = None):
        super().__init__(*args)
        self._command_line = command_line

    @property
    def command_line(self) -> str:
        """The line the command-line tools print (after ``error: ``, for a failure)."""
        return str(self) if self._command_line is None else self._command_line

    def reword(self, change: Callable[[str], str]) -> None:
        """Rewrites the message and the command line alike with ``change``: a caller adds
        what it knows (e.g. the run of a sweep the error comes from), and the error keeps its
        type, attributes and traceback."""
        self.args = (change(str(self)),)
        if self._command_line is not None:
            self._command_line = change(self._command_line)


class ConfigError(Error, ValueError):
    """A config field holds an invalid value, or values that do not fit together."""


class DataError(Error, ValueError):
    """The dataset cannot be used as configured (bad folder, label, split sizes, ...)."""


class WorkdirError(Error, OSError):
    """The workdir cannot be created or written (read-only, a file, disk full, ...)."""


class WorkdirBusyError(WorkdirError):
    """Another live process is training in the same workdir."""


class CheckpointError(Error, FileNotFoundError):
    """No checkpoint (or no training run) matches the request."""


class DistributedError(Error, RuntimeError):
    """A multi-process job could not start (processes missing, coordinator unreachable)."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A dataset path (image folder, split directory) does not exist."""


def run_again(problem: str, call: str, then: str) -> tuple[str, str]:
    """``(message, command_line)`` of an error whose fix is to run again:
    ``"<problem>: call <call> <then>."`` for a Python caller and ``"<problem>: run the same
    command <then>."`` for the command-line tools, e.g.::

        message, line = run_again("The disk is full", "train_and_evaluate again", "to resume")
        raise WorkdirError(message, command_line=line)
    """
    return (f"{problem}: call {call} {then}.", f"{problem}: run the same command {then}.")
