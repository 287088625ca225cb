"""What the command-line tools share: anticipated errors as one message, not a traceback.

``run_reporting_errors(main)`` runs ``main()``; an :class:`errors.Error` (bad config,
data, workdir, checkpoint, diverged run, missing processes) or an ``OSError`` from a full,
read-only or otherwise unwritable disk is printed as ``error: <message>`` on stderr and the
process exits with status 1. ``--debug`` or the environment variable ``SDJ_DEBUG=1``
re-raises instead, with the full traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any, Callable

from stochastic_depth_jax import errors
from stochastic_depth_jax.training import workdir as workdir_lib

__all__ = ["DEBUG_ENV", "debug_requested", "run_reporting_errors"]

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


def run_reporting_errors(main: Callable[[], Any], debug: bool) -> Any:
    """Runs ``main()``; anticipated errors exit with one ``error:`` message (status 1)."""
    try:
        return main()
    except Exception as e:  # noqa: BLE001  Filtered below: bugs are re-raised.
        message = _message(e)
        if message is None or debug:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
