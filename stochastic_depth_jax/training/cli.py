"""What the command-line tools share: anticipated errors as one message, not a traceback.

``run_reporting_errors(main)`` runs ``main()``; an :class:`errors.Error` (bad config,
data, workdir, checkpoint, diverged run, missing processes) or an ``OSError`` from a full,
read-only or otherwise unwritable disk is printed as ``error: <message>`` on stderr and the
process exits with status 1. ``--debug`` or the environment variable ``SDJ_DEBUG=1``
re-raises instead, with the full traceback. Anything else is a bug and keeps its traceback.
A stop on SIGTERM/SIGINT after a checkpoint (:class:`stopping.Stopped`) prints its one line
and exits with ``128 + signal``; a plain Ctrl-C elsewhere prints one line and exits 130.
In a job of several processes, a process that fails or is interrupted tells the others
(:func:`distributed.leave_job`), which stop with one line naming it, and exits at once
instead of waiting in JAX's exit barrier for processes that never arrive (unless all the
others have finished and wait there: then all exit through it).

While ``main()`` runs, the project's own warnings (:class:`logs.RunWarning`, or a plain
``UserWarning`` raised from this package's code) print as one ``warning: <message>`` line,
without Python's source location; other libraries' warnings keep their usual form. A
warning raised from an exception (a skipped checkpoint) adds that exception's traceback
under ``--debug``. Libraries' log records of an exception reported here in one line (Orbax
logging a full disk from its background save threads before the save raises it to the
trainer) are dropped unless ``--debug``, and so are the errors of the reads that a
damaged checkpoint's failed restore abandoned in flight (:func:`_abandoned`).

Called in a process that goes on after the ``SystemExit`` (IPython's ``%run train.py``, a
test calling ``main``), nothing stays in effect: warnings print as before and libraries'
reports of later errors are not dropped; only the echoes of a failed save are still dropped,
at the exit of the process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import sys
import threading
import traceback
import types
import warnings
from typing import Any, Callable, Iterator

import stochastic_depth_jax
from stochastic_depth_jax import errors, logs
from stochastic_depth_jax.training import distributed, stopping
from stochastic_depth_jax.training import workdir as workdir_lib

__all__ = ["DEBUG_ENV", "debug_requested", "one_line_warnings", "run_reporting_errors",
           "to_devnull"]

DEBUG_ENV = "SDJ_DEBUG"
# What stays quiet at the exit of the process (see run_reporting_errors): one at most, with
# what it saw.
_QUIET_AT_EXIT: list[tuple[contextlib.ExitStack, "_Reports"]] = []


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` on the command line or ``SDJ_DEBUG`` set to a true value."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


_CLOSED_PIPE = ("The output's reader exited (a broken pipe, e.g. `| head`): stopped. Checkpoints "
                "saved before are kept; run the same command again to resume, with its output "
                "to a file or `| tee` to keep every line.")


def _message(error: BaseException) -> str | None:
    """The one line for an anticipated error that reaches the top: ours, a disk or
    permission ``OSError`` (a checkpoint save's wrapped failures arrive as ``WorkdirError``),
    a collective that failed because another process of the job vanished, or an output
    pipe without a reader."""
    if isinstance(error, errors.Error):
        return error.command_line  # str(error) speaks to a Python caller
    lost = distributed.lost_peer(error)
    if lost is not None:
        return lost
    if isinstance(error, BrokenPipeError):
        return _CLOSED_PIPE
    if isinstance(error, OSError):
        os_error = workdir_lib.anticipated_os_error(error)
        if os_error is not None:
            return workdir_lib.describe_os_error(os_error, os_error.filename or "a file")
    return None


def _reported_kind(error: BaseException) -> bool:
    """Whether a library's report of ``error`` is of a kind reported here in one line: ours,
    a disk or permission failure, also wrapped (TensorStore's errors carry its code), or a
    Ctrl-C (a second one while a save commits: Orbax logs its 'Save Finalize thread
    failed' with the traceback)."""
    return (isinstance(error, (errors.Error, KeyboardInterrupt))
            or workdir_lib.anticipated_os_error(error) is not None)


def _exiting() -> bool:
    """Whether the process is exiting: its main thread has finished (the other threads are
    being joined) or the interpreter is finalising."""
    return sys.is_finalizing() or not threading.main_thread().is_alive()


@dataclasses.dataclass
class _Reports:
    """What :func:`_library_reports_dropped` saw, and whether it now acts only at exit."""

    seen: list[BaseException] = dataclasses.field(default_factory=list)
    at_exit_only: bool = False

    def active(self) -> bool:
        return not self.at_exit_only or _exiting()


@contextlib.contextmanager
def _library_reports_dropped() -> Iterator[_Reports]:
    """Drops what libraries print of an error that is reported here in one line; yields
    what it saw: ``seen``, the list of such errors they reported (logged) meanwhile. Set
    ``at_exit_only`` to leave it installed past the block, dropping only at exit.

    A full disk fails one of the many writes of an asynchronous Orbax save. Orbax logs the
    failure from each background thread it passes through (absl) and closes the save's event
    loop with the other writes still in flight: asyncio reports each one's exception when it
    is garbage-collected, and TensorStore's callbacks into the closed loop fail ("Event loop
    is closed", unraisable). The failure itself reaches the trainer at its next save, wait or
    close, and is reported once. Log records of such an error are dropped, and so are
    unraisable errors of that kind once one was logged, and callbacks into a closed event
    loop: an event loop closed with work in flight is a failure that is itself reported, here
    or with its traceback.
    """
    reports = _Reports()
    seen = reports.seen

    def drop(record: logging.LogRecord) -> bool:
        if reports.active() and record.exc_info and _reported_kind(record.exc_info[1]):
            seen.append(record.exc_info[1])
            return True
        return False

    original = sys.unraisablehook

    def unraisable_hook(unraisable: Any) -> None:
        if not reports.active():
            original(unraisable)
            return
        error = unraisable.exc_value
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        # At exit, what the failed save abandoned is finalised too late to clean up.
        finalising = bool(seen) and sys.is_finalizing()
        # A disk failure's echoes are dropped only once a library has logged one.
        echo = bool(seen) and _reported_kind(error)
        if not echo and not closed_loop and not finalising and not _abandoned(unraisable):
            original(unraisable)

    sys.unraisablehook = unraisable_hook
    try:
        with logs.drop_library_records(drop):
            yield reports
    finally:
        sys.unraisablehook = original


def _abandoned(unraisable: Any) -> bool:
    """Whether ``unraisable`` is a coroutine's error raised as it was closed unfinished: a
    read of a damaged checkpoint fails, Orbax abandons the reads still in flight, and each
    one, closed when collected, wraps the ``GeneratorExit`` of its closing in an
    ``Exception`` that Python prints with TensorStore's spec, ~80 lines per array (thousands
    after the one-line warning that the checkpoint was skipped). Its work was abandoned
    because of a failure reported on its own (a warning or an error)."""
    error = unraisable.exc_value
    return (error is not None and isinstance(unraisable.object, types.CoroutineType)
            and isinstance(error.__cause__ or error.__context__, GeneratorExit))


_PACKAGE_DIR = os.path.dirname(os.path.abspath(stochastic_depth_jax.__file__)) + os.sep


def _ours(category: type, filename: str) -> bool:
    """Our category, or a plain ``UserWarning`` raised by this package's code (a library's
    deprecation warning pointing at our code keeps its location: it is for developers)."""
    if issubclass(category, logs.RunWarning):
        return True
    return category is UserWarning and os.path.abspath(filename).startswith(_PACKAGE_DIR)


@contextlib.contextmanager
def one_line_warnings(debug: bool = False) -> Iterator[None]:
    """Formats the project's warnings as ``warning: <message>`` while the block runs.

    Only the text changes (``warnings.formatwarning``, restored afterwards): filters still
    decide whether a warning is shown, ``catch_warnings(record=True)`` still records it, and
    other libraries' warnings keep Python's format with their source location. With
    ``debug``, a warning raised from an exception (its ``__cause__``) is followed by that
    exception's traceback.
    """
    original = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None):
        if _ours(category, filename):
            cause = getattr(message, "__cause__", None)
            details = "".join(traceback.format_exception(cause)) if debug and cause else ""
            return f"warning: {message}\n{details}"
        return original(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = original


def run_reporting_errors(main: Callable[[], Any], debug: bool) -> Any:
    """Runs ``main()``; anticipated errors exit with one ``error:`` message (status 1), and
    the project's warnings print as one ``warning:`` line each (:func:`one_line_warnings`).

    Unless ``debug``, what libraries print of the errors reported here is dropped
    (:func:`_library_reports_dropped`); after an error is reported, also at the exit of the
    process (the writes or reads a failed save or restore abandoned end then), but not while
    a process that caught the ``SystemExit`` goes on: nothing of a later run is hidden.
    """
    with contextlib.ExitStack() as quiet:
        reports = _Reports()
        try:
            with one_line_warnings(debug), distributed.reporting_failures():
                if not debug:
                    reports = quiet.enter_context(_library_reports_dropped())
                return main()
        except stopping.Stopped as e:  # a requested stop, not a failure
            if debug:
                raise
            print(e.command_line, file=sys.stderr, flush=True)  # str(e) speaks to Python
            sys.exit(e.exit_status)
        except KeyboardInterrupt:
            if debug and not distributed.in_job():
                raise
            print("interrupted (Ctrl-C).", file=sys.stderr, flush=True)
            # Not joining a job to say so (distributed.expect_job): Ctrl-C means stop now.
            distributed.leave_job("interrupted (Ctrl-C)", 130, join=False)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001  Filtered below: bugs are re-raised.
            if not distributed.report_first():  # The peer watch said why, and ends it.
                distributed.wait_until_ended()
                sys.exit(1)
            message = _message(e)
            if message is None or debug:
                if not distributed.in_job():
                    raise
                # Raising would end in JAX's exit barrier, waiting for the other processes.
                traceback.print_exc()
                message = "".join(traceback.format_exception_only(e)).strip()
            else:
                _print_error(message, closed=message is _CLOSED_PIPE)
            distributed.leave_job(message, 1)
            if reports.seen:
                gc.collect()  # Finalises what the failed save abandoned while imports work.
            # The rest of what a failed save or read abandoned (TensorStore's reads calling
            # back into Orbax's closed event loop) ends during the exit.
            _quiet_at_exit(quiet, reports, debug)
            sys.exit(1)


def _print_error(message: str, closed: bool) -> None:
    """Prints ``error: message`` on stderr. ``closed``: a pipe this process wrote to has no
    reader (stdout, or stderr too under ``2>&1 | head``); what is still written to it is
    sent to /dev/null, so neither this line nor the exit's flush ends in a traceback."""
    if closed:
        to_devnull(sys.stdout)
    try:
        print(f"error: {message}", file=sys.stderr, flush=True)
    except BrokenPipeError:
        to_devnull(sys.stderr)


def to_devnull(stream: Any) -> None:
    """Points ``stream``'s file descriptor at /dev/null (a closed pipe's reader is gone)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    except (OSError, ValueError):  # not a real file (a notebook's stream): nothing to point
        pass


def _quiet_at_exit(quiet: contextlib.ExitStack, reports: _Reports, debug: bool) -> None:
    """Leaves what ``quiet`` installed in place, acting only at the exit of the process.
    One at most: a process that catches several failures (a notebook) adds what a later
    one saw to the one installed and removes its own, so filters and hooks do not pile up."""
    if debug:
        return  # nothing was installed
    reports.at_exit_only = True
    if _QUIET_AT_EXIT:
        _QUIET_AT_EXIT[0][1].seen.extend(reports.seen)
        quiet.close()  # Restores the hook and filters that the installed one put in place.
    else:
        _QUIET_AT_EXIT.append((quiet.pop_all(), reports))
