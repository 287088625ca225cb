"""What the command-line tools share: anticipated errors as one message, not a traceback.

``run_reporting_errors(main)`` runs ``main()``; an :class:`errors.Error` (bad config,
data, workdir, checkpoint, diverged run, missing processes) or an ``OSError`` from a full,
read-only or otherwise unwritable disk is printed as ``error: <message>`` on stderr and the
process exits with status 1. ``--debug`` or the environment variable ``SDJ_DEBUG=1``
re-raises instead, with the full traceback. Anything else is a bug and keeps its traceback.
A stop on SIGTERM/SIGINT after a checkpoint (:class:`stopping.Stopped`) prints its one line
and exits with ``128 + signal``; a plain Ctrl-C elsewhere prints one line and exits 130.

While ``main()`` runs, the project's own warnings (:class:`logs.RunWarning`, or a plain
``UserWarning`` raised from this package's code) print as one ``warning: <message>`` line,
without Python's source location; other libraries' warnings keep their usual form.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import warnings
from typing import Any, Callable, Iterator

import stochastic_depth_jax
from stochastic_depth_jax import errors, logs
from stochastic_depth_jax.training import stopping
from stochastic_depth_jax.training import workdir as workdir_lib

__all__ = ["DEBUG_ENV", "debug_requested", "one_line_warnings", "run_reporting_errors"]

DEBUG_ENV = "SDJ_DEBUG"
# Disk and permission failures a user fixes by freeing space or choosing another path.
_ANTICIPATED_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EEXIST,
}


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` on the command line or ``SDJ_DEBUG`` set to a true value."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def _message(error: BaseException) -> str | None:
    if isinstance(error, errors.Error):
        return str(error)
    if isinstance(error, OSError) and error.errno in _ANTICIPATED_ERRNOS:
        return workdir_lib.describe_os_error(error, error.filename or "a file")
    return None


_PACKAGE_DIR = os.path.dirname(os.path.abspath(stochastic_depth_jax.__file__)) + os.sep


def _ours(category: type, filename: str) -> bool:
    """Our category, or a plain ``UserWarning`` raised by this package's code (a library's
    deprecation warning pointing at our code keeps its location: it is for developers)."""
    if issubclass(category, logs.RunWarning):
        return True
    return category is UserWarning and os.path.abspath(filename).startswith(_PACKAGE_DIR)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Formats the project's warnings as ``warning: <message>`` while the block runs.

    Only the text changes (``warnings.formatwarning``, restored afterwards): filters still
    decide whether a warning is shown, ``catch_warnings(record=True)`` still records it, and
    other libraries' warnings keep Python's format with their source location.
    """
    original = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None):
        if _ours(category, filename):
            return f"warning: {message}\n"
        return original(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = original


def run_reporting_errors(main: Callable[[], Any], debug: bool) -> Any:
    """Runs ``main()``; anticipated errors exit with one ``error:`` message (status 1), and
    the project's warnings print as one ``warning:`` line each (:func:`one_line_warnings`)."""
    try:
        with one_line_warnings():
            return main()
    except stopping.Stopped as e:  # a requested stop, not a failure
        if debug:
            raise
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(e.exit_status)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted (Ctrl-C).", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001  Filtered below: bugs are re-raised.
        message = _message(e)
        if message is None or debug:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
