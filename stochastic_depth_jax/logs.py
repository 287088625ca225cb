"""What the user sees besides results: our warnings' category, and silencing known-misleading
log lines of dependencies for one block of code at a time."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

__all__ = ["RunWarning", "drop_absl_messages"]


class RunWarning(UserWarning):
    """A condition the user of a run should know about, though the run goes on (a lock taken
    over from a killed run, metric records dropped on resume, a checkpoint skipped, a config
    changed on resume).

    The command-line tools print it as one ``warning: <message>`` line, without the source
    location Python adds (``training/cli.py``); code catching ``UserWarning`` still sees it.
    """


class _Drop(logging.Filter):
    def __init__(self, substrings: tuple[str, ...]):
        super().__init__()
        self._substrings = substrings

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(s in message for s in self._substrings)


@contextlib.contextmanager
def drop_absl_messages(*substrings: str) -> Iterator[None]:
    """Drops absl log records containing any of ``substrings`` while the block runs.

    For messages that mislead in our use (e.g. Orbax warning that an evaluation opens its
    checkpoints read-only); every other record passes.
    """
    logger, drop = logging.getLogger("absl"), _Drop(substrings)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
