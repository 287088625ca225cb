"""The project's exception types for anticipated mistakes and conditions.

Every error a user can cause or fix (a bad config value, missing or damaged data, a busy or
unwritable workdir, a missing checkpoint, a diverged run) derives from :class:`Error`. Its
message names what is wrong, the value and the fix, on one line; the command-line tools
print it as ``error: <message>`` and exit with status 1 (``--debug`` or ``SDJ_DEBUG=1``
shows the traceback). Anything else is a bug and keeps its traceback.

Each type also derives from the built-in exception it refines (``ValueError``,
``OSError``, ...), so code catching the built-in keeps working.
"""

from __future__ import annotations

__all__ = [
    "Error",
    "ConfigError",
    "DataError",
    "DataFileNotFoundError",
    "WorkdirError",
    "WorkdirBusyError",
    "CheckpointError",
    "DistributedError",
]


class Error(Exception):
    """Base of every anticipated error; its message is meant for the user as is."""


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
