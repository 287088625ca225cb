"""What the user sees besides results: our warnings' category, and silencing known-misleading
log lines of dependencies for one block of code at a time."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

__all__ = ["RunWarning", "drop_absl_messages", "drop_library_records", "drop_lost_task_errors"]


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


# The texts (paths) whose lost asyncio task errors are dropped (drop_lost_task_errors).
_LOST_ABOUT: set[str] = set()
_LOST_FILTER: list[_Drop] = []


def _lost_task_error(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return (error is not None and "exception was never retrieved" in record.getMessage()
            and any(about in str(error) for about in _LOST_ABOUT))


def drop_lost_task_errors(about: str) -> None:
    """From now on, drops asyncio's reports of task errors that were never retrieved whose
    error message names ``about`` (a checkpoint's path).

    Orbax reads a checkpoint's arrays in concurrent tasks and raises the first failure; the
    others fail too where the files are damaged, and asyncio logs each one with its
    traceback whenever it is garbage-collected (often at exit, after the run's results),
    though the failure was reported in one line. For good, not for a block of code: when
    that collection happens cannot be known."""
    _LOST_ABOUT.add(about)
    if not _LOST_FILTER:
        _LOST_FILTER.append(_Drop(_lost_task_error))
        logging.getLogger("asyncio").addFilter(_LOST_FILTER[0])
