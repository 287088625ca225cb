"""What the user sees besides results: our warnings' category, and silencing known-misleading
log lines of dependencies for one block of code at a time."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import threading
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


def _failed_naming(future: Any, about: str) -> bool:
    """Whether ``future`` (any object) is an asyncio future failed with an error naming
    ``about``, retrieved or not."""
    error = getattr(future, "_exception", None) if isinstance(future, asyncio.Future) else None
    return error is not None and about in str(error)


def _nothing(*args: Any, **kwargs: Any) -> None:
    """Stands for a closed event loop's ``call_soon_threadsafe``: see :func:`_silence`."""
    return None


def _silence(loop: asyncio.AbstractEventLoop) -> None:
    """Makes callbacks scheduled on the closed ``loop`` do nothing, as they would anyway.

    TensorStore schedules each finished read's result on the loop that awaited it; reads
    still in flight when Orbax closed that loop finish later (after the restore returned,
    on a large checkpoint) and their callbacks fail ("Event loop is closed"), printed as
    unraisable errors from TensorStore's threads. Only this loop, which nothing runs
    again, is changed (an instance attribute); a loop that takes none (uvloop's) keeps
    its reports."""
    try:
        loop.call_soon_threadsafe = _nothing  # type: ignore[method-assign]
    except (AttributeError, TypeError):
        pass


def _closed_loop_of(unraisable: Any) -> asyncio.AbstractEventLoop | None:
    """The closed event loop whose ``call_soon_threadsafe`` failed, where ``unraisable`` is
    such a failure (``RuntimeError: Event loop is closed``), else None."""
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        return None
    tb = unraisable.exc_traceback
    while tb is not None:
        loop = tb.tb_frame.f_locals.get("self")
        if isinstance(loop, asyncio.AbstractEventLoop) and loop.is_closed():
            return loop
        tb = tb.tb_next
    return None


class _Holder:
    """``sys.unraisablehook`` while a :func:`lost_task_errors_dropped` block runs: holds back
    the reports of callbacks failing on a closed event loop (till the block has said which
    loops are dead) and passes every other report to the hook it replaced.

    Blocks in several threads, or a hook installed by others meanwhile, can end out of the
    order they began, so one finished may still be called from another's chain: from then
    on it holds nothing back (pure pass-through), and whoever restores a hook skips it."""

    def __init__(self, previous: Callable[[Any], Any]):
        self.previous = previous
        self.held: list[Any] = []
        self.done = False
        self._lock = threading.Lock()

    def __call__(self, unraisable: Any) -> None:
        if _closed_loop_of(unraisable) is not None:
            with self._lock:
                if not self.done:
                    self.held.append(unraisable)
                    return
        self.previous(unraisable)

    def finish(self) -> list[Any]:
        """Ends the holding: restores the hook it replaced where it is still the one
        installed (skipping finished holders) and returns the reports it held."""
        with self._lock:
            self.done = True
            held, self.held = self.held, []
        if sys.unraisablehook is self:  # Not if someone installed their own meanwhile.
            sys.unraisablehook = _live(self.previous)
        return held


def _live(hook: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``hook``, or the first hook it passes reports to that is not a finished
    :class:`_Holder` (one a block ended out of order left in the chain)."""
    while isinstance(hook, _Holder) and hook.done:
        hook = hook.previous
    return hook


@contextlib.contextmanager
def lost_task_errors_dropped(about: str) -> Iterator[None]:
    """Drops asyncio's reports of task errors never retrieved whose error names ``about``
    (a checkpoint's path), made in the block or by tasks it leaves behind, and TensorStore's
    reports of reads finishing after their event loop was closed.

    Orbax reads a checkpoint's arrays in concurrent tasks and raises the first failure; the
    others fail too where the files are damaged, and asyncio logs each one with its
    traceback when it is collected (often at exit, after the run's results), though the
    failure is reported in one line. Those collected in the block are dropped; where it
    raises, the errors of those still held (their event loop closed: nothing of theirs runs
    again) are retrieved, so that nothing is logged whenever they are collected.

    The reads still in flight when Orbax closed its loop finish on TensorStore's threads,
    in the block or after it, and fail to hand their result to the closed loop (printed as
    "Exception ignored ... Event loop is closed"). Where the block raises, the loops of the
    tasks failed naming ``about`` are found and their callbacks made to do nothing
    (:func:`_silence`); such reports made in the block are held till then, and printed
    after all unless their loop is one of those. Nothing is left installed: the logging
    configuration and ``sys.unraisablehook`` are the caller's again after the block (where
    blocks end out of order, the hook of one ended passes every report on)."""
    previous = sys.unraisablehook
    holder = _Holder(previous)
    dead: set[asyncio.AbstractEventLoop] = set()
    sys.unraisablehook = holder
    try:
        with drop_library_records(
                lambda record: bool(record.exc_info) and "exception was never retrieved"
                in record.getMessage() and about in str(record.exc_info[1]), ("asyncio",)):
            yield
    except BaseException:
        for task in [o for o in gc.get_objects() if _failed_naming(o, about)]:
            if task.get_loop().is_closed():
                dead.add(task.get_loop())
            if _lost_error(task, about):
                task.exception()  # retrieved: not reported when collected
        for loop in dead:
            _silence(loop)
        raise
    finally:
        for unraisable in holder.finish():
            if _closed_loop_of(unraisable) not in dead:
                previous(unraisable)
