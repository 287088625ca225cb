"""What the benchmark scripts share on the command line: one-line errors, where a table goes.

A script's ``main(argv)`` raises :class:`stochastic_depth_jax.errors.ConfigError` for a bad
flag; :func:`run` (its ``__main__``) prints that as the trainer does, ``error: <message>``
and exit status 1 (``--debug`` or ``SDJ_DEBUG=1``: the traceback). Ctrl-C or SIGTERM during
a script's timed rounds (:func:`rounds`) stops it after the current round: the table of the
rounds completed is appended, its heading saying "interrupted after N of M rounds", and the
script exits 130 / 143; likewise during measurements after the rounds (:func:`after_rounds`:
``bench_step.py``'s compile times). A second signal, or one at any other time, stops at once
with one line saying that nothing was written, also while the script is still importing
JAX (each script imports this module first). A table is only ever appended whole, so the
tables already in a results file are never touched; a ``--json`` file of its medians is
written with it (:func:`append_table`), unless rounds are missing from it. An output whose
reader exits (``| head``) stops a script with one line and exit status 141, as a pipe's
writer killed by SIGPIPE. A Ctrl-Z stops a script that runs a child in a session of its own
(``compare_torch.py``, ``gpu_suite.py``) with that child (:class:`StopsWithThis`).
``--out ''`` prints the table only, in every script (:func:`results_path`). Every script
takes its flags by their full names only (:func:`argument_parser`).

``bench_torch.py`` runs in any environment with PyTorch, which may lack JAX and this package:
there the same lines are printed by :func:`run` itself (:class:`FlagError`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
from typing import Callable, Iterator, Sequence

import provenance  # next to this file; standard library only

HERE = os.path.dirname(os.path.abspath(__file__))
NOTHING_WRITTEN = "no table was written; the results files are as they were."


def signal_name(signum: int) -> str:
    """How the lines an interruption ends with name ``signum``: 'SIGTERM' or 'Ctrl-C'."""
    return "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"


def _stopped_while_starting(signum, frame):
    """Ctrl-C or SIGTERM while a benchmark imports its libraries (before :func:`run`): one
    line and exit 130 / 143 at once, not a traceback from inside an import (nor an
    interruption lost in a library's garbage-collection callback, which drops what it
    raises). Nothing is measured yet, so nothing is lost."""
    try:  # not print(): this may run in the middle of another write to stderr
        os.write(2, f"interrupted ({signal_name(signum)}): {NOTHING_WRITTEN}\n".encode())
    except OSError:  # no reader (`2>&1 | head`): the status still says it
        pass
    os._exit(128 + signum)


def _started_as_a_benchmark() -> dict:
    """In a benchmark run as a command (``python benchmarks/<script>.py``, not a module
    imported by a test), Ctrl-C and SIGTERM stop it with :func:`_stopped_while_starting`
    until :func:`run` takes over; returns the handlers replaced. A signal ignored (a job
    started in the background by a script) stays ignored."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if (not main or os.path.dirname(os.path.abspath(main)) != HERE
            or os.path.abspath(sys.argv[0]) != os.path.abspath(main)
            or threading.current_thread() is not threading.main_thread()):
        return {}
    return {s: signal.signal(s, _stopped_while_starting)
            for s in (signal.SIGINT, signal.SIGTERM)
            if signal.getsignal(s) not in (signal.SIG_IGN, None)}


def _restart_with_huge_pages() -> None:
    """A benchmark run as a command starts again at once with huge pages for its
    allocator, as ``train.py`` does (``stochastic_depth_jax/hugepages.py``), so that it
    measures what training gets; its tables say which (:func:`provenance.run_label`)."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main and os.path.dirname(os.path.abspath(main)) == HERE:
        provenance.hugepages()["restart_with_huge_pages"](main)


# Before the imports below (JAX's): each script imports this module first.
_restart_with_huge_pages()
_BEFORE_START = _started_as_a_benchmark()

try:
    from stochastic_depth_jax import errors
    from stochastic_depth_jax.training import cli, compilation, stopping
except ImportError:  # an environment with PyTorch only (bench_torch.py)
    errors = cli = compilation = stopping = None

RESULTS = os.path.join(HERE, "results")
TORCH_MISSING = ("PyTorch is not installed in this Python. It is optional (only "
                 "bench_torch.py and compare_torch.py's Torch side use it; stochastic_depth_jax "
                 "does not need it): install it with `pip install torch`, ideally in an "
                 "environment of its own, and give that environment's python to "
                 "compare_torch.py --torch-python.")
OUT_HELP = ("append the table to this file (its directory must exist; default: "
            "benchmarks/results/{}); nothing already there is changed; '' to print it only, "
            "writing no file")


class FlagError(*((errors.ConfigError,) if errors else (ValueError,))):
    """A flag a user gave wrong; its message names the flag, the value and the fix."""


class Interrupted(BaseException):
    """Ctrl-C, SIGTERM or a closed output during a benchmark (a ``BaseException``: not an
    error to report)."""

    def __init__(self, how: str, status: int, note: str = ""):
        super().__init__(how)
        self.how, self.status = how, status
        self.note = note or NOTHING_WRITTEN


# What stops a benchmark, and how :func:`stopped` names each.
STOPS = (Interrupted, KeyboardInterrupt, BrokenPipeError)
CLOSED_OUTPUT = "its output's reader exited, e.g. `| head`"
SIGPIPE_STATUS = 128 + 13  # a pipe's writer killed by SIGPIPE, as the shell reports it


def stopped(error: BaseException, note: str = "") -> Interrupted:
    """The :class:`Interrupted` that ends a command stopped by ``error`` (one of
    :data:`STOPS`); ``note``: what was written (default: ``error``'s, or nothing). A
    closed output (``BrokenPipeError``: ``| head`` read what it wanted) exits 141, as a
    pipe's writer killed by SIGPIPE does."""
    if isinstance(error, Interrupted):
        return Interrupted(error.how, error.status, note or error.note)
    if isinstance(error, KeyboardInterrupt):
        return Interrupted("Ctrl-C", 130, note)
    return Interrupted(CLOSED_OUTPUT, SIGPIPE_STATUS, note)


def _terminated(signum, frame):
    raise Interrupted("SIGTERM", 128 + signum)


@dataclasses.dataclass(frozen=True)
class _Cut:
    """A signal's cut in a script's measurements, for the table :func:`append_table` writes
    next."""

    how: str  # 'Ctrl-C' or 'SIGTERM'
    status: int  # the exit status
    mark: str  # added to the table's heading ('': nothing is missing from the table)
    missing: str  # the line under the heading: what the table lacks
    held: str  # what was written, as the exit line says it
    rounds_whole: bool  # every timed round ran (a --json file of their medians is true)


# Set by rounds() or after_rounds() when a signal cut them short; append_table writes the
# table as it says, then raises the interruption.
_cut_short: _Cut | None = None


def _stoppable(items: Sequence, at_once: Callable[[int], bool], then: str):
    """Yields ``items``; a Ctrl-C or SIGTERM ends them after the current one, unless
    ``at_once(started)`` (items started, the current one included) or it is the second:
    then it stops at once (:class:`Interrupted`). Returns (the signal caught or None, items
    started)."""
    caught: list[int] = []
    started = 0

    def finish_current(signum, frame):
        if caught or at_once(started):
            raise Interrupted(signal_name(signum), 128 + signum)
        caught.append(signum)
        outputs_survive_their_reader()
        print(f"{signal_name(signum)}: stopping after this {then} (again: stop at once, "
              f"nothing written)", file=sys.stderr, flush=True)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = ({s: signal.signal(s, finish_current) for s in (signal.SIGINT, signal.SIGTERM)}
                if main_thread else {})
    try:
        for item in items:
            started += 1
            yield item
            if caught:
                break
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return (caught[0] if caught else None), started


def rounds(total: int, warmup: int = 0) -> Iterator[int]:
    """The round indices ``0 .. total - 1`` of a benchmark's loop, the first ``warmup``
    untimed. A Ctrl-C or SIGTERM during them ends the loop after the current round: the
    table :func:`append_table` writes next is labelled with the rounds completed, and the
    script then exits 130 / 143. A second signal, or one during the warm-up (nothing timed
    to tabulate), stops at once, with nothing written."""
    global _cut_short
    _cut_short = None
    signum, started = yield from _stoppable(
        range(total), lambda started: started <= warmup,
        "round, then writing the table of the rounds completed")
    if signum is not None:
        timed, asked = started - warmup, total - warmup
        _cut_short = _Cut(
            signal_name(signum), 128 + signum,
            f"interrupted after {timed} of {asked} rounds" if timed < asked else "",
            "medians of the rounds completed, not a full run; the round count below is the "
            "one asked for.",
            f"the table of the {timed} of {asked} timed rounds completed" if timed < asked
            else "every round had completed; the table", timed == asked)


def round_line(i: int, warmup: int, times: Sequence[str]) -> str:
    """The line a round of :func:`rounds` prints as it ends: ``round 3: <times>``, or
    ``warm-up round 0: <times>`` for an untimed one, ``times`` the times it took (formatted),
    one per variant. A warm-up round's own: they printed 0.000 (nothing timed yet)."""
    return f"{'warm-up round' if i < warmup else 'round'} {i}: " + ", ".join(times)


def per_round(times: Sequence[float], base: Sequence[float]) -> float:
    """The median over rounds of ``times[i] / base[i]``: a variant's time over its
    baseline's in the same round. Variants run back to back within a round, so this cancels
    what drifts between rounds on a noisy machine (a load that comes and goes), which the
    ratio of the two medians does not."""
    return statistics.median(t / b for t, b in zip(times, base))


def after_rounds(items: Sequence, what: str) -> Iterator:
    """Yields ``items``, measurements made after the timed rounds (``what`` names them:
    'compile depths'); none if a signal cut the rounds short. A Ctrl-C or SIGTERM ends them
    after the current one: the table, its rounds whole, is appended without the rest, its
    heading saying so, and the script exits 130 / 143; a second signal stops at once, with
    nothing written."""
    global _cut_short
    if _cut_short is not None:
        if items and not _cut_short.mark:  # caught in the last round: none of these measured
            _cut_short = dataclasses.replace(
                _cut_short, mark=f"interrupted before the {what}",
                missing=f"the timed rounds are whole; the {what} were not measured.",
                held=f"the table, without the {what},")
        return
    signum, started = yield from _stoppable(
        items, lambda started: False, f"one, then writing the table without the other {what}")
    if signum is not None:
        partial = started < len(items)
        _cut_short = _Cut(
            signal_name(signum), 128 + signum,
            f"interrupted after {started} of {len(items)} {what}" if partial else "",
            f"the timed rounds are whole; the {what} not measured are left out.",
            f"the table, with {started} of {len(items)} {what}," if partial
            else f"every one of the {what} was measured; the table", True)


def cut_before(status: int, what: str) -> None:
    """Marks the table :func:`append_table` writes next as cut short, by the signal of exit
    ``status``, before ``what`` finished ('the variant lengths-3'): its heading says so, and
    the interruption is raised once it is appended. For measurements that are not rounds:
    ``bench_train.py``'s whole epochs, whose trainer stops on a signal after a checkpoint,
    keep the variants that finished (``gpu_suite.py``'s budget sends SIGTERM first)."""
    global _cut_short
    _cut_short = _Cut(signal_name(status - 128), status, f"interrupted before {what} finished",
                      f"{what} was stopped; the rows are of those that finished.",
                      "the table of those that finished", True)


def cut_after_the_last(status: int, what: str) -> None:
    """A signal (exit ``status``) that came after the last of ``what`` ('variants') had
    finished, before the table was appended (:func:`cut_before`'s measurements): the table
    is appended whole, and the interruption raised once it is."""
    global _cut_short
    _cut_short = _Cut(signal_name(status - 128), status, "", "",
                      f"every one of the {what} had finished; the table", True)


class _ReaderMayBeGone:
    """``sys.stdout`` or ``sys.stderr`` once a Ctrl-C asked for the table of the rounds done:
    the same Ctrl-C stops a reader in the terminal's process group (``| tee log``), and a
    write to its closed pipe then sends the stream to /dev/null instead of raising
    ``BrokenPipeError``, which stopped the script before its table was appended."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            _to_devnull(self.stream)
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            _to_devnull(self.stream)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _to_devnull(stream) -> None:
    """Points ``stream``'s file descriptor at /dev/null (its pipe's reader is gone)."""
    if cli is not None:
        return cli.to_devnull(stream)
    try:  # without this package (bench_torch.py): as it does
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    except (OSError, ValueError):  # not a real file: nothing to point
        pass


def outputs_survive_their_reader() -> None:
    """Wraps ``sys.stdout`` and ``sys.stderr`` in :class:`_ReaderMayBeGone` (until
    :func:`run` returns): at a stop's first signal, whose lines must not keep the table from
    being appended (a Ctrl-C that also stopped ``| tee``; ``gpu_suite.py`` killed, its part
    sent SIGTERM with no one reading its output)."""
    for name in ("stdout", "stderr"):
        if not isinstance(getattr(sys, name), _ReaderMayBeGone):
            setattr(sys, name, _ReaderMayBeGone(getattr(sys, name)))


def _outputs_restored() -> None:
    """Undoes :func:`outputs_survive_their_reader`."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, _ReaderMayBeGone):
            setattr(sys, name, stream.stream)


def interrupted() -> bool:
    """Whether a signal cut the last :func:`rounds` short: the table lacks rounds (draw no
    figure, which could not say so; :func:`append_table` leaves out the ``--json`` file)."""
    return _cut_short is not None and not _cut_short.rounds_whole


def run(main, argv=None):
    """Runs ``main(argv)`` as a command: anticipated errors as one ``error:`` line (exit 1),
    an interruption as one line (exit 130 or 143); ``--debug`` is taken out of ``argv``."""
    global _cut_short
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = cli.debug_requested(argv) if cli else "--debug" in argv
    argv = [a for a in argv if a != "--debug"]

    def body():
        try:
            return main(argv)
        except (KeyboardInterrupt, BrokenPipeError) as e:  # not the trainer's broken pipe,
            raise stopped(e) from None  # which speaks of checkpoints
        except Exception as e:  # noqa: BLE001  Only the trainer's stop is taken here.
            # The trainer inside bench_train.py stops on a signal after a checkpoint and says
            # how to resume it; its workdir is temporary, so that would mislead.
            if stopping is None or not isinstance(e, stopping.Stopped):
                raise
            how = signal_name(e.exit_status - 128)
            raise Interrupted(how, e.exit_status) from None

    main_thread = threading.current_thread() is threading.main_thread()
    while _BEFORE_START and main_thread:  # imported: a signal now stops as the doc says
        signal.signal(*_BEFORE_START.popitem())
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        if cli is not None:
            return cli.run_reporting_errors(body, debug)
        try:  # without this package: its convention, for the errors raised here
            return body()
        except FlagError as e:
            if debug:
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
    except Interrupted as e:
        _say_last(f"interrupted ({e.how}): {e.note}", closed=e.status == SIGPIPE_STATUS)
        sys.exit(e.status)
    finally:
        _cut_short = None  # a script that failed before its table: not the next one's
        _outputs_restored()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def child_backend() -> str:
    """JAX's backend on this machine, asked of a child process: for a script that runs the
    benchmarks as children, as JAX started in it would take the GPU's memory from them."""
    found = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                           capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else "unknown (JAX did not start)"


class StopsWithThis:
    """Ctrl-Z for a script that runs a child in a session of its own (``compare_torch.py``'s
    benchmarks, ``gpu_suite.py``'s parts): a Ctrl-Z in the terminal (SIGTSTP to this
    script's process group) would stop this script only, and the child would run on,
    holding the machine. Its handlers (:meth:`handlers`, installed by
    :func:`child_stops_with_this`) stop the child's process group (SIGSTOP) and then this
    script; continuing this script (SIGCONT: ``fg``, ``bg``) continues the child. A Ctrl-Z
    that comes while the child is being started is held until :meth:`started` knows it,
    so that the child cannot run on behind a stopped script. A child that runs children of
    its own in other sessions (``compare_torch.py`` as a part of ``gpu_suite.py``) stops
    with them on Linux, where they are found in /proc (SIGSTOP runs no handler of the
    child's that could pass it on); elsewhere without them."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self._stop_held = False  # a Ctrl-Z came before the child was known

    def handlers(self) -> dict:
        """The signal handlers to install while the child runs (none on Windows)."""
        if not hasattr(signal, "SIGTSTP"):
            return {}
        return {signal.SIGTSTP: self._stop_too, signal.SIGCONT: self._continue_too}

    def started(self, proc: subprocess.Popen) -> subprocess.Popen:
        """Records the child ``proc`` just started (returned), and stops it with this script
        if a Ctrl-Z came while it was being started. A Ctrl-Z handled before ``proc`` is
        recorded is held; one after it stops both at once: none is lost."""
        self.proc = proc
        if self._stop_held:
            self._stop_too()
        return proc

    def _stop_too(self, signum=None, frame=None):
        if self.proc is None:  # being started: stopped with this script by started()
            self._stop_held = True
            return
        self._stop_held = False
        _signal_group(self.proc, signal.SIGSTOP)
        _stop_this_process()
        # Continued; or never stopped (an orphaned process group ignores SIGTSTP), when
        # nothing else would continue the child.
        _signal_group(self.proc, signal.SIGCONT)

    def _continue_too(self, signum=None, frame=None):
        self._stop_held = False  # stopped and continued before it was known: nothing to do
        _signal_group(self.proc, signal.SIGCONT)


@contextlib.contextmanager
def child_stops_with_this(handlers: dict | None = None) -> Iterator[StopsWithThis]:
    """Installs :class:`StopsWithThis`'s handlers, and ``handlers`` (signal: handler), for
    the block, in the main thread (elsewhere none can be); yields the holder, to be given
    the child (:meth:`StopsWithThis.started`). The previous handlers are put back after,
    also those of an install that a signal's exception cut short (a Ctrl-C before the
    SIGINT handler is in)."""
    job = StopsWithThis()
    wanted = {**job.handlers(), **(handlers or {})}
    main_thread = threading.current_thread() is threading.main_thread()
    previous = ({s: signal.getsignal(s) for s in wanted} if main_thread else {})
    try:
        for signum in previous:
            signal.signal(signum, wanted[signum])
        yield job
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _signal_group(proc: subprocess.Popen | None, signum: int) -> None:
    """Sends ``signum`` to the process group of ``proc`` (the child and any process it
    started; its session's), if it was started and is still running; then to the groups
    of the processes below it in groups of their own (:func:`_groups_below`), which would
    run on behind a stopped child (``compare_torch.py``'s benchmark, in ``gpu_suite.py``).
    The child's group first: stopped, it starts no more."""
    if proc is None or proc.poll() is not None:
        return
    _killpg_if_there(proc.pid, signum)
    for group in _groups_below(proc.pid):
        _killpg_if_there(group, signum)


# Asks for the signal argv[2] when the parent (argv[1]) dies (prctl(2) PR_SET_PDEATHSIG,
# kept across exec; a C library without prctl: no such guard), then runs the command
# (argv[3:]); if the parent already died, exits as that signal would have ended it.
_DIES_WITH_PARENT = """import os, signal, sys
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, int(sys.argv[2]))
except (ImportError, OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):  # it died before that
    os._exit(128 + int(sys.argv[2]))
os.execvp(sys.argv[3], sys.argv[3:])
"""


def dying_with_this(cmd: list[str], signum: int) -> list[str]:
    """``cmd``, run so that on Linux it gets ``signum`` when this process dies, even by
    SIGKILL: a child in a session of its own (``compare_torch.py``'s benchmark,
    ``gpu_suite.py``'s part) is in no process group that a kill of this one reaches, and
    ran on, on the GPU under the next command; elsewhere ``cmd`` as it is. A program that the
    child runs first (:data:`_DIES_WITH_PARENT`), not a ``preexec_fn``: this process may
    have threads (JAX's), and Python code run between fork and exec may deadlock on a lock
    one of them held."""
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-I", "-S", "-c", _DIES_WITH_PARENT, str(os.getpid()),
            str(int(signum)), *cmd]


def _killpg_if_there(group: int, signum: int) -> None:
    """Sends ``signum`` to the process group ``group``, unless it has ended since it was
    found (or is not this user's to signal)."""
    try:
        os.killpg(group, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _groups_below(pid: int) -> list[int]:
    """The process groups of the processes that ``pid`` started, and that they started,
    down the tree, other than ``pid``'s own and this process's: on Linux (read from
    /proc); elsewhere none."""
    table = _process_table()
    skip = {table.get(pid, (0, pid))[1], os.getpgrp()}
    groups: list[int] = []
    parents = [pid]
    while parents:
        parent = parents.pop()
        for child, (ppid, group) in table.items():
            if ppid == parent:
                parents.append(child)
                if group not in skip and group not in groups:
                    groups.append(group)
    return groups


def _process_table() -> dict[int, tuple[int, int]]:
    """Each process's parent and process group, ``{pid: (ppid, pgid)}``, from /proc; empty
    where there is none (not Linux)."""
    try:
        names = [n for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return {}
    table = {}
    for name in names:
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command's name
        except OSError:  # ended since
            continue
        table[int(name)] = (int(fields[1]), int(fields[2]))
    return table


def _stop_this_process() -> None:
    """Stops this process as SIGTSTP's default action does (a Ctrl-Z in a shell: the job is
    stopped); returns once it is continued. Raised in this thread, so that it is delivered
    before the handler is put back."""
    handler = signal.signal(signal.SIGTSTP, signal.SIG_DFL)
    try:
        signal.raise_signal(signal.SIGTSTP)
    finally:
        signal.signal(signal.SIGTSTP, handler)


def _say_last(line: str, closed: bool) -> None:
    """Prints the command's last ``line`` on stderr. ``closed``: stdout has no reader (what
    is left in its buffer would fail the exit's flush with a traceback: sent to /dev/null);
    stderr may have none either (``2>&1 | head``): then the line is dropped."""
    if closed:
        _to_devnull(sys.stdout)
    try:
        print(line, file=sys.stderr, flush=True)
    except BrokenPipeError:
        _to_devnull(sys.stderr)


def argument_parser(**kwargs) -> argparse.ArgumentParser:
    """``argparse.ArgumentParser(**kwargs)`` that takes each flag by its full name only: an
    abbreviation (``--js`` for ``--json``) is refused as an unknown argument. A table's
    command line writes a path portably (``provenance.command_line``) by its flag's full
    name, so an abbreviated path flag would record this machine's path."""
    return argparse.ArgumentParser(allow_abbrev=False, **kwargs)


@contextlib.contextmanager
def jax_cache() -> Iterator[None]:
    """Runs the block under JAX's own persistent compilation cache
    (``JAX_COMPILATION_CACHE_DIR``), checked as ``train.py`` and ``evaluate.py`` check theirs
    (``compilation.from_jax_setting``): one warning where it cannot be created or entered
    (then off) or written (read-only), instead of JAX's warning, with its source line, for
    every program. For the scripts that compile with JAX, once their flags are checked (it
    starts JAX's backend: not in ``compare_torch.py`` or ``gpu_suite.py``, whose children
    need the accelerator)."""
    cache = compilation.from_jax_setting()
    cache.announce()
    with cache.in_use():
        yield


def bad_flag(message: str) -> FlagError:
    """The error of a flag a user gave wrong (``message`` names the flag, value and fix)."""
    return FlagError(message)


def at_least(args, minimum: int, *names: str) -> None:
    """Raises unless each of ``args``' ``names`` (dests; ``None`` = the default) is >= ``minimum``."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            flag = "--" + name.replace("_", "-")
            raise bad_flag(f"{flag} {value}: must be at least {minimum}.")


def used_only(parser, args, when: str, used: bool, *names: str) -> None:
    """Raises if one of ``names`` (dests) is given another value than ``parser``'s default
    where the script does not use it (``used`` false; ``when`` says where it does: 'with
    --user-branch'): ignored, it was measured at what the script uses instead, while the
    table's command line and its "Not the default sizes" named the value given."""
    given = [n for n in names if getattr(args, n) != parser.get_default(n)]
    if given and not used:
        one = len(given) == 1
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise bad_flag(f"{flags} {'is' if one else 'are'} used only {when}, so here "
                       f"{'it' if one else 'they'} would be ignored; drop "
                       f"{'it' if one else 'them'}.")


def cifar_depth(depth: int, flag: str = "--depth") -> None:
    """Raises unless ``depth`` (given by ``flag``) is a CIFAR ResNet's (6n+2), naming the
    nearest valid ones."""
    if depth < 8 or (depth - 2) % 6:
        below = max(8, depth - (depth - 2) % 6)
        nearest = sorted({below, below + 6} if depth > 8 else {8})
        raise bad_flag(f"{flag} {depth}: a CIFAR ResNet's depth is 6n+2 with n >= 1 (20, 32, "
                       f"44, 56, 110, 1202, ...); nearest: {' or '.join(map(str, nearest))}.")


def names_from(text: str, valid, flag: str, known=None, also: str = "") -> list[str]:
    """The comma-separated names of ``text`` (at least one), each in ``valid`` (or passing
    ``known``); the error lists ``valid`` and ``also`` (what else is accepted)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    listed = f"; valid: {', '.join(valid)}{also}"
    if not names:
        raise bad_flag(f"{flag} is empty: give one or more names, comma-separated{listed}.")
    unknown = [n for n in names if not (known(n) if known else n in valid)]
    if unknown:
        raise bad_flag(f"{flag}: unknown {', '.join(unknown)}{listed}.")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # Its rows would share a name (and a whole-epochs run, its workdir).
        raise bad_flag(f"{flag}: {', '.join(twice)} given more than once; give each name once.")
    return names


def integer(text: str, flag: str) -> int:
    """``int(text)``, or the error naming ``flag``."""
    try:
        return int(text)
    except ValueError:
        raise bad_flag(f"{flag}: {text.strip()!r} is not an integer.") from None


def numbers(text: str, flag: str, kind=float) -> list:
    """The comma-separated numbers of ``text`` (at least one), or the error naming ``flag``."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise bad_flag(f"{flag} {text!r}: give comma-separated numbers.") from None
    if not values:
        raise bad_flag(f"{flag} is empty: give one or more numbers, comma-separated.")
    return values


def results_path(out: str | None, default_name: str, flag: str = "--out") -> str | None:
    """Where the table goes: ``out``, ``benchmarks/results/<default_name>`` if ``out`` is
    None (the flag not given), or None if it is ``''`` (print it only: a smoke run asked
    for no file, so no committed table is appended to; see :data:`OUT_HELP`). Checked now,
    before minutes of measuring, by opening it for appending (an existing file is untouched;
    one made for the check is removed)."""
    if out == "":
        return None
    path = os.path.abspath(out) if out else os.path.join(RESULTS, default_name)
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise bad_flag(f"{flag} {out}: is a directory; give a file in it, e.g. "
                       f"{os.path.join(out, default_name)}.")
    if not os.path.isdir(folder):
        raise bad_flag(f"{flag} {out}: the directory {folder} does not exist; create it or "
                       f"give another path.")
    existed = os.path.exists(path)
    try:
        open(path, "a").close()
    except OSError as e:
        raise bad_flag(f"{flag} {out or path}: cannot write there ({e.strerror}); give a "
                       f"writable path.") from None
    if not existed:
        os.remove(path)
    return path


def distinct_outputs(*outputs: tuple[str, str | None]) -> None:
    """Refuses two of a script's outputs, ``(flag, path)`` (``None`` or ``''``: none), that
    name the same file or directory: a table appended where the ``--json`` medians are then
    written new failed after the rounds ("a file is in the way"), losing the medians; a
    drawing or a directory made there replaced or blocked the table. Checked before
    anything is measured."""
    seen: dict[str, str] = {}
    for flag, path in outputs:
        if not path:
            continue
        same = seen.setdefault(os.path.realpath(os.path.expanduser(path)), flag)
        if same != flag:
            raise bad_flag(f"{same} and {flag} both name {path}; give each its own path (one "
                           f"would replace or block the other after the measuring).")


def new_file(path: str, flag: str) -> str:
    """``path`` (absolute; ``''`` stays ``''``) for a file written whole: refused if it exists
    (an earlier result is never overwritten) or its directory does not."""
    if not path:
        return ""
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise bad_flag(f"{flag} {path}: exists; give a new file (it is written whole, so an "
                       f"earlier result there would be lost).")
    if not os.path.isdir(os.path.dirname(path)):
        raise bad_flag(f"{flag} {path}: the directory {os.path.dirname(path)} does not exist; "
                       f"create it or give another path.")
    return path


def fresh_file(path: str, flag: str) -> str:
    """``path`` (absolute; ``''`` stays ``''``), or, if it exists, the first free
    ``<stem>-1<ext>``, ``<stem>-2<ext>``, ...: a drawing is never drawn over an earlier one."""
    if not path:
        return ""
    path = os.path.abspath(path)
    if not os.path.isdir(os.path.dirname(path)):
        raise bad_flag(f"{flag} {path}: the directory {os.path.dirname(path)} does not exist; "
                       f"create it or give another path.")
    stem, ext = os.path.splitext(path)
    fresh, n = path, 0
    while os.path.exists(fresh):
        n += 1
        fresh = f"{stem}-{n}{ext}"
    if fresh != path:
        print(f"{flag}: {path} exists; drawing to {fresh} instead", flush=True)
    return fresh


def append_table(text: str, path: str | None, title: str = "", medians=None) -> None:
    """Prints ``text`` and appends it to ``path`` (``None``: print only) in one write
    (``title``: a new file's first line); says where it went. ``medians``: ``(json path,
    data)``, a ``--json`` file (``''``: none) written whole, new, with the table, unless
    its rounds are not whole (a file of medians cannot say it is partial). After
    :func:`rounds` or :func:`after_rounds` were cut short by a signal, the table's first
    line says so, and the interruption is raised once both are written (:func:`run` exits
    130 / 143); a signal in the last round leaves both whole."""
    global _cut_short
    cut, stop, _cut_short = _cut_short, None, None
    if cut is not None:
        if cut.mark:
            text = _marked_interrupted(text, cut)
        done = "appended" if path is not None else "printed only (written nowhere)"
        stop = Interrupted(cut.how, cut.status, f"{cut.held} was {done}" + (
            ", marked as interrupted." if cut.mark else " whole."))
    if path is not None:  # before printing it: a closed output cannot lose the table
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        with open(path, "a") as f:
            f.write((f"{title}\n\n" if new and title else "") + text.rstrip("\n") + "\n\n")
    if medians and medians[0] and (cut is None or cut.rounds_whole):
        with open(medians[0], "x") as f:  # new: checked by new_file before the rounds
            json.dump(medians[1], f, indent=2)
    try:
        print("\n" + text, flush=True)
        if path is not None:
            print(f"appended to {path}", flush=True)
    except BrokenPipeError:  # the reader exited (`| head`): the table is lost if not written
        if path is None:
            raise
        _to_devnull(sys.stdout)
    if stop is not None:
        raise stop


def _marked_interrupted(text: str, cut: _Cut) -> str:
    """``text`` with its heading (first line) saying what ``cut`` left out of it."""
    heading, _, rest = text.partition("\n")
    return (f"{heading} ({cut.mark})\n\n"
            f"**{cut.mark[:1].upper() + cut.mark[1:]}** ({cut.how}): {cut.missing}\n"
            f"{rest}")


def interruption_mark(table: str) -> str:
    """What the heading of ``table`` (as :func:`append_table` wrote it) says an
    interruption left out of it ('interrupted after 2 of 6 rounds'); '' for a whole one."""
    heading = table.lstrip("\n").partition("\n")[0]
    mark = re.search(r" \((interrupted [^()]*)\)$", heading)
    return mark.group(1) if mark else ""
