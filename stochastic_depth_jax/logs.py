"""Silencing known-misleading log lines of dependencies, for one block of code at a time."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

__all__ = ["drop_absl_messages"]


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
