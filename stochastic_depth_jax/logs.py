"""What the user sees besides results: our warnings' category, and silencing known-misleading
log lines of dependencies for one block of code at a time."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from typing import Any, Callable, Iterator

__all__ = ["RunWarning", "drop_absl_messages", "drop_library_records",
           "lost_task_errors_dropped"]


class RunWarning(UserWarning):
    """A condition the user of a run should know about, though the run goes on (a lock taken
    over from a killed run, metric records dropped on resume, a checkpoint skipped, a config
    changed on resume).

    The command-line tools print it as one ``warning: <message>`` line, without the source
    location Python adds (``training/cli.py``); code catching ``UserWarning`` still sees it.
    """


class _Drop(logging.Filter):
    def __init__(self, drop: Callable[[logging.LogRecord], bool]):
        super().__init__()
        self._drop = drop

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._drop(record)


@contextlib.contextmanager
def drop_library_records(
    drop: Callable[[logging.LogRecord], bool], loggers: tuple[str, ...] = ("absl", "asyncio")
) -> Iterator[None]:
    """Drops the records of ``loggers`` for which ``drop(record)`` is true while the block
    runs (Orbax logs through absl; asyncio reports its tasks' lost exceptions); every other
    record passes."""
    dropping = _Drop(drop)
    for name in loggers:
        logging.getLogger(name).addFilter(dropping)
    try:
        yield
    finally:
        for name in loggers:
            logging.getLogger(name).removeFilter(dropping)


def drop_absl_messages(*substrings: str) -> contextlib.AbstractContextManager[None]:
    """Drops absl log records containing any of ``substrings`` while the block runs.

    For messages that mislead in our use (e.g. Orbax warning that an evaluation opens its
    checkpoints read-only); every other record passes.
    """
    return drop_library_records(
        lambda record: any(s in record.getMessage() for s in substrings), ("absl",)
    )



def _lost_error(future: Any, about: str) -> bool:
    """Whether ``future`` (any object) is an asyncio future failed with an error naming
    ``about`` whose error was never retrieved (asyncio reports it when it is collected)."""
    error = getattr(future, "_exception", None) if isinstance(future, asyncio.Future) else None
    return (error is not None and getattr(future, "_log_traceback", False)
            and about in str(error))


@contextlib.contextmanager
def lost_task_errors_dropped(about: str) -> Iterator[None]:
    """Drops asyncio's reports of task errors never retrieved whose error names ``about``
    (a checkpoint's path), made in the block or by tasks it leaves behind.

    Orbax reads a checkpoint's arrays in concurrent tasks and raises the first failure; the
    others fail too where the files are damaged, and asyncio logs each one with its
    traceback when it is collected (often at exit, after the run's results), though the
    failure is reported in one line. Those collected in the block are dropped; where it
    raises, the errors of those still held (their event loop closed: nothing of theirs runs
    again) are retrieved, so that nothing is logged whenever they are collected. Nothing is
    left installed: the logging configuration is the caller's again after the block."""
    try:
        with drop_library_records(
                lambda record: bool(record.exc_info) and "exception was never retrieved"
                in record.getMessage() and about in str(record.exc_info[1]), ("asyncio",)):
            yield
    except BaseException:
        for lost in [o for o in gc.get_objects() if _lost_error(o, about)]:
            lost.exception()  # retrieved: not reported when collected
        raise
