"""What a command-line script does before it imports JAX: :func:`start`.

``train.py``, ``evaluate.py`` and ``sweep.py`` run this file by its path
(``runpy.run_path``) and wrap their imports of the package in what :func:`start` returns:
importing this module would import the package, whose ``__init__`` imports JAX, the very
imports a Ctrl-C would interrupt and huge pages must come before. They find this file with
``importlib.util.find_spec('stochastic_depth_jax')``, which imports nothing of the package
(so also when run without ``__file__``, by ``exec``); without it they import as usual.

Importable without JAX, NumPy or the rest of the package: standard library only.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import signal
import sys
from typing import ContextManager, Iterator


def start(script: str | None) -> ContextManager[None]:
    """Starts the command ``script`` (its ``__file__``) again with huge pages for its
    allocator where that helps (``hugepages.py``, beside this file; not without a file:
    ``exec(open(...).read())``), then returns :func:`interrupt_reported` for its imports."""
    if script is not None:
        here = os.path.dirname(os.path.abspath(__file__))
        runpy.run_path(os.path.join(here, "hugepages.py"))["restart_with_huge_pages"](script)
    return interrupt_reported()


@contextlib.contextmanager
def interrupt_reported() -> Iterator[None]:
    """Ctrl-C while the block (the imports of JAX and the package, seconds) runs: once they
    are done, the one line and exit status 130 of a Ctrl-C later on
    (``cli.run_reporting_errors``). A KeyboardInterrupt raised inside the imports was lost
    or disguised: JAX's garbage-collection callback swallows it (the run went on), an
    extension module interrupted while loading raised ImportError ("numpy._core.multiarray
    failed to import", a traceback) or crashed. A second Ctrl-C raises at once. Not where
    SIGINT is not Python's own (ignored, as in a background job)."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    noted = []

    def note(signum, frame):
        noted.append(signum)
        if len(noted) > 1:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    try:
        yield
    except BaseException:
        if not noted:
            raise
    finally:
        if signal.getsignal(signal.SIGINT) is note:  # not one an import installed since
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if noted:
        print("interrupted (Ctrl-C).", file=sys.stderr, flush=True)
        sys.exit(130)
