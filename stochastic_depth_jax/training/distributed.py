"""Multi-host start-up (``jax.distributed.initialize``) and the data-parallel mesh.

Every process runs the same program over a global mesh of all devices; the global batch
is split along the mesh axis ``'data'`` and parameters are replicated.

* TPU pods and SLURM / Open MPI clusters: ``initialize(auto=True)`` lets JAX detect the
  coordinator, process count and id from the environment.
* Anything else (several GPU hosts by hand, local tests): pass ``coordinator_address``
  (``host:port`` of process 0), ``num_processes`` and ``process_id`` on every process.

When one process goes wrong the others must not wait for it forever:

* :func:`check_same_config`: every process compares its config with process 0's before
  training (different configs train garbage or deadlock in a collective), and
  :func:`check_same_data` the dataset it loaded from its own disk;
  :func:`initialize` refuses processes with unequal device counts
  (:func:`check_device_counts`).
* :func:`leave_job`: a process that fails tells the others through the job's key-value
  store; a thread in every process (started by :func:`initialize`) polls it every
  :func:`poll_interval` seconds and ends its own process with one line naming the failed
  one (first running what :func:`cleanup_if_stopped` registered: the run releases its
  workdir lock, and removes a workdir it created with nothing worth keeping in it). A
  process that failed after all the others finished ends through JAX's normal shutdown,
  with them (they exit 0); one that finished stops too (a thread watches while it waits
  in JAX's shutdown barrier) once another one exits at once. A checkpoint save in flight
  is completed after the others were told (:func:`close_after_reporting`); they wait for
  it before exiting.
* A process that fails before joining (a typo in its config): it joins anyway, only to
  report its failure (:func:`expect_job`), instead of leaving the others to wait for it
  until the start-up timeout.
* A process that dies or hangs without a word (SIGKILL, a crash, a lost host): the same
  thread in process 0 reports it once it has shown no sign of life for
  ``heartbeat_timeout_s``; JAX's runtime, which would abort every process with a C++ stack
  trace, waits longer (see :func:`_join`). Process 0 hanging (or its host unreachable):
  the others stop once its service has answered nothing for ``heartbeat_timeout_s``.
* Process 0 itself dying ends the others inside JAX's runtime at once, with its message
  ("Terminating process because the JAX distributed service detected fatal errors") and
  a C++ stack trace: nothing here can replace that. (The runtime's client takes a
  ``missed_heartbeat_callback`` in place of that abort, but jaxlib 0.10 cannot pass its
  argument, a C++ status, to a Python function: ``std::bad_cast``, then
  ``std::terminate``.)
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import errno
import itertools
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from stochastic_depth_jax import errors
from stochastic_depth_jax.training import config as config_lib

__all__ = [
    "ArgumentParser",
    "add_arguments",
    "job_arguments",
    "initialize",
    "expect_job",
    "poll_interval",
    "check_same_config",
    "check_same_data",
    "check_device_counts",
    "leave_job",
    "close_after_reporting",
    "reporting_failures",
    "in_job",
    "lost_peer",
    "report_first",
    "closes_pending",
    "cleanup_if_stopped",
    "wait_until_ended",
    "make_mesh",
    "replicated",
    "batch_sharded",
    "check_batch_size",
    "DATA_AXIS",
    "is_primary",
]

DATA_AXIS = "data"
# The longest process 0 (which hosts the job's coordination service) waits, after failing,
# for the others to leave: when it exits first, JAX's runtime aborts them with a C++ trace.
LEAVE_WAIT_S = 5.0
EXIT_GRACE_S = 1.0  # process 0's wait for the others' exit once they said they leave
# The longest a process that ends at once (os._exit) waits for its clean-up (releasing the
# workdir lock, removing a workdir it created): a hung filesystem must not keep it running.
CLEANUP_WAIT_S = 5.0
# JAX's own heartbeat timeout is twice (the one asked for + this): see _join.
RUNTIME_MARGIN_S = 30
_KEY = "stochastic_depth_jax"  # prefix of this package's keys in the job's key-value store
# What a process that left the job records under left/: it waits in JAX's shutdown barrier
# (finished, or failed after all the others finished), or it exits at once (os._exit).
_DONE, _STOPPED = "done", "stopped"
# --heartbeat_timeout must span this many polls: polls are not synchronised, so a healthy
# process's counter may look still for up to two intervals.
_POLLS_PER_TIMEOUT = 3


def poll_interval(num_processes: int) -> float:
    """Seconds between two looks at the job's key-value store, in a job of ``num_processes``.

    Each look is one write (this process's counter) and one read (the failures); process 0
    reads two directories more. All go to the one coordination service: 1 s up to 50
    processes, then ``num_processes / 50`` s, so that it answers about 100 of these calls a
    second at most, up to 10 s from 500 processes on (then two calls per process every
    10 s, beside JAX's own heartbeat of one). Polling a few keys was kept over blocking
    reads: the counters must be written anyway, and a failure is seen within one poll.
    """
    return min(10.0, max(1.0, num_processes / 50))


def add_arguments(parser: argparse.ArgumentParser, manual: bool = True) -> None:
    """Adds the command-line flags of :func:`initialize` to ``parser``: ``--multihost``,
    ``--init_timeout``, ``--heartbeat_timeout`` and, with ``manual``, those of a launch by
    hand (``--coordinator_address``, ``--num_processes``, ``--process_id``, ...)."""
    parser.add_argument(
        "--multihost",
        action="store_true",
        help="jax.distributed.initialize() from the environment (TPU pod, SLURM)",
    )
    if manual:
        parser.add_argument("--coordinator_address", default=None,
                            help="host:port of process 0")
        parser.add_argument("--coordinator_bind_address", default=None)
        parser.add_argument("--num_processes", type=int, default=None)
        parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument(
        "--init_timeout", type=int, default=300, help="seconds to wait for all processes"
    )
    parser.add_argument(
        "--heartbeat_timeout",
        type=int,
        default=100,
        help="seconds without a sign of life after which a process is taken for dead and "
        "the others stop; at least 3 polls (3 s up to 50 processes, 30 s from 500)",
    )


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` for a command with :func:`add_arguments`' flags, whose
    usage errors reach the job: a process launched by hand with a mistake on its command
    line (a misspelt flag) prints argparse's usage error and exits 2 as usual, but first
    joins the job its flags name, only to tell the other processes (:func:`leave_job`),
    which then stop at once instead of waiting ``--init_timeout`` for it (not under
    ``--debug``, as for any other error)."""

    _argv: list[str] | None = None

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)  # for error()
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        try:
            super().error(message)  # prints the usage and the error, raises SystemExit(2)
        except SystemExit as e:
            from stochastic_depth_jax.training import cli  # which imports this module

            # Only the job flags this command has (evaluate.py: --multihost alone).
            manual = "--coordinator_address" in self._option_string_actions
            job = _job_flags(self._argv or [], manual)
            # --debug: no joining to report a failure, as for any other error (cli).
            if job is not None and not cli.debug_requested(self._argv or []):
                expect_job(**job)
                leave_job(f"a mistake on its command line ({self.prog}: {message})", e.code)
            raise


class _FlagError(Exception):
    pass


class _QuietParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise _FlagError(message)


def _job_flags(argv: list[str], manual: bool) -> dict[str, Any] | None:
    """The arguments of :func:`initialize` that ``argv`` gives, read from its job flags
    alone (those of ``add_arguments(parser, manual)``: a mistake elsewhere on the line
    leaves them readable); None if they are wrong."""
    parser = _QuietParser(add_help=False)
    add_arguments(parser, manual)
    try:
        return job_arguments(parser.parse_known_args(argv)[0])
    except _FlagError:
        return None


def job_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`initialize` (and :func:`expect_job`) from the flags
    of :func:`add_arguments`."""
    return dict(auto=args.multihost,
                coordinator_address=getattr(args, "coordinator_address", None),
                num_processes=getattr(args, "num_processes", None),
                process_id=getattr(args, "process_id", None),
                coordinator_bind_address=getattr(args, "coordinator_bind_address", None),
                timeout_s=args.init_timeout, heartbeat_timeout_s=args.heartbeat_timeout)


def initialize(
    *,
    auto: bool = False,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    coordinator_bind_address: str | None = None,
    timeout_s: int = 300,
    heartbeat_timeout_s: int = 100,
) -> None:
    """Joins a multi-process JAX job; does nothing for a single-process run.

    Args:
      auto: detect the cluster (TPU pod, SLURM, Open MPI) from the environment.
      coordinator_address: ``'host:port'`` of process 0 (manual launch).
      num_processes: total processes (manual launch).
      process_id: this process's index in ``[0, num_processes)`` (manual launch).
      coordinator_bind_address: address process 0 listens on (default: all interfaces);
        ``'127.0.0.1:port'`` keeps a local test off the network.
      timeout_s: how long to wait for every process to join before giving up.
      heartbeat_timeout_s: after how long without a sign of life a process is taken for
        dead and the others stop (JAX's default, 100 s; JAX's runtime itself gets twice
        (this + ``RUNTIME_MARGIN_S``), see :func:`_join`); at least three
        :func:`poll_interval`.

    Must run before anything touches a JAX device. In a job of several processes, starts
    the thread that ends this process when another one fails (:func:`leave_job`), then
    the backend (to compare the processes' device counts).

    Raises:
      errors.ConfigError: ``heartbeat_timeout_s`` shorter than three polls.
      errors.DistributedError: incomplete arguments, the coordinator's port is in use, the
        processes did not all join within ``timeout_s`` (the message says which address
        and how many were expected), they have unequal device counts, or this process was
        given another ``num_processes`` than process 0.
    """
    global _expected
    _expected = None  # Joining now: a failure from here on is reported from within the job.
    manual = (coordinator_address, num_processes, process_id)
    job = dict(auto=auto, coordinator_address=coordinator_address,
               num_processes=num_processes, process_id=process_id,
               coordinator_bind_address=coordinator_bind_address, timeout_s=timeout_s,
               heartbeat_timeout_s=heartbeat_timeout_s)
    if any(v is not None for v in manual):
        if any(v is None for v in manual):
            raise errors.DistributedError(
                "A manual multi-process launch needs all of --coordinator_address, "
                f"--num_processes and --process_id; got {manual}."
            )
        _check_heartbeat(heartbeat_timeout_s, num_processes)  # Before joining: at once.
    _join(job, f"Process {process_id} of {num_processes}: joining the job at "
          f"{coordinator_address} (waiting up to {timeout_s} s for all processes)."
          if coordinator_address is not None else None,
          f"error: multi-process start failed: {_missing(job)} within {timeout_s} s. Most "
          "likely a process was not started, or stopped before joining (a mistake in its job "
          "flags): its own output says why. Otherwise start every process with the same "
          "coordinator address and --num_processes, each with its own --process_id, or raise "
          "--init_timeout.")
    if in_job():
        _check_heartbeat(heartbeat_timeout_s, _count())  # Watching before any backend starts.
        _watch_peers(heartbeat_timeout_s)
        check_device_counts([d.process_index for d in jax.devices()])
        _check_process_count()


def _check_process_count() -> None:
    """Raises ``errors.DistributedError`` on a process given another ``--num_processes``
    than process 0 (the job has process 0's count): it joined, and watched for processes
    that do not exist."""
    if jax.process_count() != _count():
        raise errors.DistributedError(
            f"Process {_me()} was given --num_processes {_count()}, but the job process 0 "
            f"started has {jax.process_count()} processes; give every process the same "
            "--num_processes.")


def check_device_counts(owners: list[int]) -> None:
    """Raises ``errors.DistributedError`` unless every process of the job has as many devices
    as the others; ``owners``: the process of each device of the job (every process sees
    them all, so all raise alike, before any collective). With uneven counts the data-
    parallel mesh, JAX's multi-host utilities and Orbax fail later with a traceback
    (``cannot reshape array of size 3 into shape (2,2)``)."""
    counts = collections.Counter(owners)  # process -> its devices
    # The count most processes have (on a tie, process 0's: the devices come in order).
    usual = collections.Counter(counts.values()).most_common(1)[0][0]
    odd = sorted(p for p, n in counts.items() if n != usual)
    if odd:
        listed = ", ".join(f"process {p}: {counts[p]}" for p in odd[:4])
        raise errors.DistributedError(
            f"The processes of this job do not all have the same number of devices "
            f"({listed}{', ...' * (len(odd) > 4)}; the others: {usual}); give every process "
            "as many (the same CUDA_VISIBLE_DEVICES count, or the launcher's GPUs per task).")


def _missing(job: dict[str, Any]) -> str:
    """Who did not join, for a message: the expected count and address if known."""
    if job["coordinator_address"] is None:
        return "the cluster's processes did not all join"
    return (f"the {job['num_processes']} processes did not all join at "
            f"{job['coordinator_address']}")


def _join(job: dict[str, Any], announce: str | None, timeout_message: str) -> None:
    """``jax.distributed.initialize`` with ``job``'s arguments (those of :func:`initialize`);
    nothing for a single-process run. ``announce``: printed, if given, as it starts
    waiting; ``timeout_message``: printed if not every process joins within
    ``job['timeout_s']``.

    Raises:
      errors.DistributedError: the coordinator's port is in use, or the start failed.
    """
    # JAX's runtime aborts every process with a C++ stack trace once one was silent for
    # its heartbeat timeout, and a process whose heartbeat calls to the service (process 0)
    # time out, after half of it: the peer watch reports either first, in one line.
    timeouts = dict(initialization_timeout=job["timeout_s"],
                    heartbeat_timeout_seconds=2 * (job["heartbeat_timeout_s"]
                                                   + RUNTIME_MARGIN_S))
    address = job["coordinator_address"]
    if address is not None:
        if job["process_id"] == 0:  # Where JAX will listen: by default, every interface.
            port = address.rsplit(":", 1)[-1]
            _check_port_free(job["coordinator_bind_address"]
                             or os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", f"[::]:{port}"))
        where = dict(coordinator_address=address, num_processes=job["num_processes"],
                     process_id=job["process_id"],
                     coordinator_bind_address=job["coordinator_bind_address"])
    elif job["auto"]:
        where = {}
    else:
        return
    if announce is not None:
        _say(announce)
    _initialize(timeout_message, **where, **timeouts)


_expected: dict[str, Any] | None = None  # How this process will join its job (expect_job).


def expect_job(**job: Any) -> None:
    """Takes the arguments :func:`initialize` will get (all of them, as
    :func:`job_arguments` gives them), before the work that comes first (reading the
    config): a process that fails there still joins its job, only to report its failure
    (:func:`leave_job`), so that the others stop at once instead of waiting for it until
    ``timeout_s``. Does nothing for a single-process run.
    """
    global _expected
    manual = [job[k] for k in ("coordinator_address", "num_processes", "process_id")]
    joins = job["auto"] or all(v is not None for v in manual)
    _expected = job if joins else None


def _join_to_report() -> Any:
    """Joins the job of :func:`expect_job` (if any, and not joined yet) after this process
    failed, only to report it; returns the job's client, or ``None`` (no job expected, or
    the others did not all join within its timeout: this process then exits with status 1).
    """
    global _expected
    job, _expected = _expected, None
    if job is None or in_job():
        return _client()
    # The main thread waits inside XLA, which a Python handler cannot interrupt: a Ctrl-C
    # ends the process at once (its error is printed already).
    main = threading.current_thread() is threading.main_thread()
    handler = signal.signal(signal.SIGINT, signal.SIG_DFL) if main else None
    # Said for a launch by hand only: a cluster's launcher starts every process at once, and
    # outside a cluster the join fails at once (--multihost by mistake).
    announce = ("Joining the job only to tell the other processes of this failure (waiting "
                f"up to {job['timeout_s']} s for them all; Ctrl-C stops)."
                if job["coordinator_address"] is not None else None)
    try:
        _join(job, announce, f"Not every process joined within {job['timeout_s']} s: "
              "the others were not told of this failure.")
    except errors.Error:
        return None  # The port in use, or the start failed: nothing to tell anyone through.
    finally:
        if main:
            signal.signal(signal.SIGINT, handler)
    return _client()


def _check_heartbeat(heartbeat_timeout_s: float, num_processes: int) -> None:
    """Raises ``errors.ConfigError`` if ``--heartbeat_timeout`` is too short to tell a silent
    process from one whose last polls fell far apart (a false "no sign of life")."""
    least = _POLLS_PER_TIMEOUT * poll_interval(num_processes)
    if num_processes > 1 and heartbeat_timeout_s < least:
        raise errors.ConfigError(
            f"--heartbeat_timeout {heartbeat_timeout_s:g} is too short for {num_processes} "
            f"processes, which look for failed ones every {poll_interval(num_processes):g} s; "
            f"use at least --heartbeat_timeout {least:.0f}."
        )


def _check_port_free(bind_address: str) -> None:
    """Raises ``errors.DistributedError`` if the coordinator's port is taken on this host
    (JAX's runtime would crash with a segmentation fault); other bind failures (no IPv6)
    are left to JAX."""
    host, _, port = bind_address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        # As gRPC does: a port left in TIME_WAIT by an earlier run is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return
            raise errors.DistributedError(
                f"The coordinator's port {port} is already in use on this host (binding "
                f"{bind_address}): another job, or an earlier run of this one, listens there; "
                "stop it or give every process another port in --coordinator_address."
            ) from e


def _initialize(message: str, **kwargs) -> None:
    """``jax.distributed.initialize`` with a watchdog that ends a stuck start with
    ``message``.

    When processes are missing, XLA aborts the process with a C++ stack trace after its own
    timeout; the watchdog fires first (XLA's timeout is set later) and exits with one line.
    """
    timeout = kwargs["initialization_timeout"]
    done = threading.Event()

    def watchdog():
        if not done.wait(timeout):
            print(message, file=sys.stderr, flush=True)
            os._exit(1)  # The main thread is blocked inside XLA: nothing else can stop it.

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        jax.distributed.initialize(**dict(kwargs, initialization_timeout=timeout + 60))
    except Exception as e:  # noqa: BLE001  XLA raises plain RuntimeError/XlaRuntimeError.
        raise errors.DistributedError(message.removeprefix("error: ") + f" ({e})") from e
    finally:
        done.set()


def _client() -> Any:
    """The job's distributed-runtime client (``None`` outside a multi-process job); touches
    no device (an error before the backend started must not start it)."""
    from jax._src import distributed as jax_distributed  # No public accessor.

    state = jax_distributed.global_state
    return state.client if state.client is not None and state.num_processes > 1 else None


def _me() -> int:
    """This process's index in the job. Unlike ``jax.process_index()``, starts no backend:
    a backend's start waits for every process's (one that joined only to report its failure
    starts none), and fails at exit, with JAX's client shutting down."""
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.process_id


def _count() -> int:
    """How many processes the job has (as :func:`_me`, without starting a backend)."""
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.num_processes


def in_job() -> bool:
    """Whether this process is one of several of a multi-process JAX job."""
    return _client() is not None


def _failed(client: Any) -> dict[int, str]:
    """``{process: message}`` of the processes that reported a failure (:func:`leave_job`)."""
    return {int(key.rsplit("/", 1)[1]): message
            for key, message in client.key_value_dir_get(f"{_KEY}/failed/")}


class _PeerWatch:
    """A thread that ends this process, with one line, once another process has failed or
    (seen from process 0) has shown no sign of life for ``silence_s`` seconds.

    Every process bumps its own counter in the job's key-value store each poll and reads
    the failures reported (:func:`leave_job`); process 0 also reads the counters and
    reports a process whose counter stood still as failed, for the others to read.
    """

    def __init__(self, client: Any, silence_s: float) -> None:
        self.client, self.me, self.count = client, _me(), _count()
        self.silence_s, self.poll_s = silence_s, poll_interval(self.count)
        self.heard: dict[int, tuple[str | None, float]] = {}  # process -> (counter, since)
        self.stop = threading.Event()
        self.unanswered_since: float | None = None  # Since when the service answers nothing.
        self.thread = threading.Thread(target=self._watch, name="peer-watch", daemon=True)
        self.thread.start()
        if self.me != 0:  # Process 0 hosts the service.
            threading.Thread(target=self._watch_service, name="service-watch",
                             daemon=True).start()
        # Started now, as Python 3.12 before 3.12.3 refuses to start a thread in an atexit
        # callback ("can't create new thread at interpreter shutdown"); it waits for close.
        self.exiting = threading.Event()
        threading.Thread(target=self._watch_exit, name="exit-watch", daemon=True).start()
        # Before JAX's own exit handler (atexit runs in reverse) shuts the client down.
        atexit.register(self.close, at_exit=True)

    def close(self, at_exit: bool = False) -> None:
        """Stops watching: when this process fails itself (:func:`leave_job`), or at its exit
        (``at_exit``), which it records as "done" (waiting in JAX's shutdown barrier) so that
        process 0 does not report the silence that follows as a failure."""
        self.stop.set()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=2 * self.poll_s)
        if at_exit:
            try:
                self.client.key_value_set(f"{_KEY}/left/{self.me}", _DONE, allow_overwrite=True)
                if _stop_if_one_exited(self.client):
                    return
            except Exception:  # noqa: BLE001  The service is gone: nobody is watching.
                return
            # Another process may yet fail and exit at once while this one waits in JAX's
            # shutdown barrier (with 3 or more processes: one fails after this one finished,
            # as a third still trains): looked for while it waits.
            self.exiting.set()

    def _watch_exit(self) -> None:
        """Once this process is exiting (:meth:`close` at exit): :func:`_stop_if_one_exited`
        every poll until this process ends, or the barrier completes and the client is shut
        down (its calls fail)."""
        self.exiting.wait()
        stopped = False
        while not stopped:
            time.sleep(self.poll_s)
            try:
                stopped = _stop_if_one_exited(self.client)
            except Exception:  # noqa: BLE001  Shut down, or the service is gone.
                return

    def _watch(self) -> None:
        beats = 0
        while not self.stop.wait(self.poll_s):
            beats += 1
            self.unanswered_since = self.unanswered_since or time.monotonic()
            try:
                self.client.key_value_set(f"{_KEY}/beat/{self.me}", str(beats),
                                          allow_overwrite=True)
                failed = _failed(self.client)
                if self.me == 0 and not failed:
                    failed = self._silent()
            except Exception:  # noqa: BLE001  XLA raises plain runtime errors.
                # One failed call (a network blip, a busy service) must not stop this
                # process's counter: process 0 would take it for dead. A service that
                # answers nothing for the silence timeout is gone (_watch_service).
                continue
            self.unanswered_since = None
            others = sorted(p for p in failed if p != self.me)
            if others and not self.stop.is_set():
                _stop_because(self.client, others[0], failed[others[0]], self.silence_s)

    def _watch_service(self) -> None:
        """Ends this process, with one line, once the job's service has answered none of the
        peer watch's calls for ``silence_s``: process 0, which hosts it, hangs or its host
        is unreachable (the calls then block, or fail). JAX's runtime would abort it later
        with a C++ trace (its heartbeat calls time out after ``heartbeat_timeout_s +
        RUNTIME_MARGIN_S``: see :func:`_join`). Process 0 killed outright ends it at once,
        inside the runtime (see the module docstring)."""
        while not self.stop.wait(self.poll_s):
            since = self.unanswered_since
            if since is None or time.monotonic() - since <= self.silence_s:
                continue
            if not self.stop.is_set() and report_first():  # Else its own failure is said.
                _say("error: " + _stops_too(
                    0, f"no answer from the job's coordination service, which it hosts, for "
                       f"{self.silence_s:.0f} s (hung or its host unreachable; "
                       "--heartbeat_timeout)"))
                _exit_now(1)
            return

    def _silent(self) -> dict[int, str]:
        """Reports (and returns) the first process whose counter stood still too long."""
        now = time.monotonic()
        counters = {int(k.rsplit("/", 1)[1]): v
                    for k, v in self.client.key_value_dir_get(f"{_KEY}/beat/")}
        for p in sorted(set(range(self.count)) - set(_left(self.client))):
            counter = counters.get(p)
            if self.heard.get(p, (None,))[0] != counter or p not in self.heard:
                self.heard[p] = (counter, now)  # Not heard of yet: counted from now.
            elif p != self.me and now - self.heard[p][1] > self.silence_s:
                message = (f"no sign of life for {self.silence_s:.0f} s (killed, crashed, hung "
                           "or its host unreachable; --heartbeat_timeout)")
                self.client.key_value_set(f"{_KEY}/failed/{p}", message, allow_overwrite=True)
                self.client.key_value_set(f"{_KEY}/closed/{p}", "", allow_overwrite=True)
                return {p: message}
        return {}


_watcher: _PeerWatch | None = None


def _watch_peers(silence_s: float) -> None:
    global _watcher
    if _watcher is None:
        _watcher = _PeerWatch(_client(), silence_s)


def _stops_too(who: int, message: str) -> str:
    """The line of a process that stops because process ``who`` failed with ``message``."""
    return (f"process {who} of {_count()} failed, so process {_me()} "
            f"stops too (see process {who}'s output); its error: {message}")


def _say(line: str) -> None:
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)


# Taken by whichever reports first why this process ends: the peer watch (another process
# failed) or the main thread's own error (which may be the same failure, seen as a broken
# collective a moment later): one line, not two.
_ending = threading.Lock()


def report_first() -> bool:
    """Whether the caller is the first to report why this process ends (then it reports);
    False once the peer watch has said so, and is ending the process: see
    :func:`wait_until_ended`. Always True outside a multi-process job."""
    return not in_job() or _ending.acquire(blocking=False)


def wait_until_ended() -> None:
    """Waits while the peer watch, which reported first, ends this process."""
    if _watcher is not None and threading.current_thread() is not _watcher.thread:
        _watcher.thread.join()


def _stop_because(client: Any, who: int, message: str, wait_s: float = 0) -> None:
    """Ends this process (status 1) because process ``who`` failed with ``message``: the
    main thread may be blocked in a collective for good. Says so at once, then waits up to
    ``wait_s`` for ``who`` to finish what it was writing (a checkpoint, whose every process
    must take part in the save: this one's part goes on in a background thread). Returns
    without a word if this process is reporting its own error already."""
    if not report_first():  # Said already: by the peer watch (which ends the process) or
        wait_until_ended()  # by the main thread's own error (the watch was closed for it).
        return
    _say(f"error: {_stops_too(who, message)}")
    try:
        if wait_s > 0:
            client.blocking_key_value_get(f"{_KEY}/closed/{who}", int(wait_s * 1000))
    except Exception:  # noqa: BLE001  Not within wait_s, or the service is gone: stops now.
        pass
    try:
        client.key_value_set(f"{_KEY}/left/{_me()}", _STOPPED,
                             allow_overwrite=True)
        if _me() == 0:  # Its exit ends the service: the others leave first.
            _wait_until_left(client, set(range(_count())) - {0})
    except Exception:  # noqa: BLE001  The service gone with process 0: this one ends too.
        pass
    _exit_now(1)


def _stop_if_one_exited(client: Any) -> bool:
    """At the exit of a process that finished: if another one exits at once (it failed, or
    stopped because one did), JAX's shutdown barrier would wait for it until JAX's runtime
    aborts this process (C++ trace); stops now instead, naming the failed one. (A failed
    one decides after reading the "done" of this one, recorded before: one of the two
    sees the other.) Returns whether it stopped this process: it returns then only if
    ``os._exit`` does (a test), or if this process's own failure is being reported."""
    me = _me()
    failed = {p: m for p, m in _failed(client).items() if p != me}
    left = _left(client)
    if failed and _STOPPED not in _others(left):  # Else decided. Until then, or until one
        # stops: a failed process 0 waits for this one to stop, and exits (ending the
        # service) at once if it does not within LEAVE_WAIT_S.
        left = _wait_until_left(client, set(failed), or_one_stops=True)
    gone = sorted(p for p, how in left.items() if how == _STOPPED and p != me)
    if gone:
        who = min(failed, default=gone[0])  # A stopped one names the failed one, if known.
        _stop_because(client, who, failed.get(who, "it stopped (see its output)"))
    return bool(gone)


def check_same_config(config: dict[str, Any], ignored: tuple[str, ...] = ("data_dir",)) -> None:
    """Raises ``errors.ConfigError`` on a process whose config differs from process 0's.

    ``config`` is the resolved config as JSON types (``json.loads(config.to_json())``);
    the fields named in ``ignored``, and the folder of an ``image_folder:<path>`` dataset,
    may differ (each host may keep its data elsewhere). Every process waits here until all
    have compared, so none writes or trains before a disagreement ends the job (the process
    that differs fails; :func:`leave_job` stops the others). Does nothing outside a
    multi-process job; may be called more than once in a job (by every process alike).
    """
    client = _client()
    if client is None:
        return
    call = next(_config_checks)  # Keys of their own: a key-value pair is set only once.
    mine = _comparable(config, ignored)
    if jax.process_index() == 0:
        client.key_value_set(f"{_KEY}/config/{call}", json.dumps(mine, sort_keys=True))
    else:
        theirs = json.loads(_agreed(client.blocking_key_value_get, f"{_KEY}/config/{call}"))
        changes = config_lib.config_changes(theirs, mine)
        if changes:
            listed = "; ".join(f"{k}: {v['new']!r} here, {v['old']!r} on process 0"
                               for k, v in changes.items())
            raise errors.ConfigError(
                f"Process {jax.process_index()}'s config differs from process 0's ({listed}); "
                "start every process with the same --config and --config.* overrides."
            )
    _agreed(client.wait_at_barrier, f"{_KEY}/config_checked/{call}")


_config_checks = itertools.count()
_IMAGE_FOLDER = "image_folder:"


def _comparable(config: dict[str, Any], ignored: tuple[str, ...]) -> dict[str, Any]:
    """``config`` without what may differ per host: the ``ignored`` fields and the folder of
    an image-folder dataset (that it is one is compared)."""
    mine = {k: v for k, v in config.items() if k not in ignored}
    dataset = mine.get("dataset")
    if isinstance(dataset, str) and dataset.startswith(_IMAGE_FOLDER):
        mine["dataset"] = _IMAGE_FOLDER + "<a folder on each host>"
    return mine


def check_same_data(fingerprint: str, sizes: str) -> None:
    """Raises ``errors.DataError`` on a process whose loaded dataset differs from process 0's.

    Each process reads the data from its own disk (``data_dir`` and an image folder's path
    may differ per host: :func:`check_same_config`) and supplies its devices' share of every
    split from that copy. Copies that differ (an image changed or missing, a dataset
    prepared by another tfds version in another record order, so another validation split)
    trained each host on other examples under the same indices, silently, or failed in a
    collective. ``fingerprint``: ``data.fingerprint`` of the dataset as loaded; ``sizes``:
    its split sizes, named where they differ. Every process waits here until all have
    compared, as in :func:`check_same_config`, for up to :data:`DATA_WAIT_S`: their loads
    may end minutes apart. Does nothing outside a multi-process job.
    """
    client = _client()
    if client is None:
        return
    call = next(_data_checks)
    mine = {"sha256": fingerprint, "sizes": sizes}
    if jax.process_index() == 0:
        client.key_value_set(f"{_KEY}/data/{call}", json.dumps(mine))
    else:
        theirs = json.loads(_agreed(client.blocking_key_value_get, f"{_KEY}/data/{call}",
                                    DATA_WAIT_S, what="datasets"))
        if theirs != mine:
            how = (f"{sizes} here, {theirs['sizes']} on process 0" if theirs["sizes"] != sizes
                   else f"{sizes} on both, but other pixels or labels")
            raise errors.DataError(
                f"Process {jax.process_index()}'s dataset differs from process 0's ({how}); "
                "every process must load the same data: copy process 0's data_dir (or image "
                "folder) to this host.")
    _agreed(client.wait_at_barrier, f"{_KEY}/data_checked/{call}", DATA_WAIT_S,
            what="datasets")


_data_checks = itertools.count()
# How long :func:`check_same_data` waits for the other processes to load their data. Not
# the 300 s of the config check, which all reach within seconds of joining: loads end
# minutes apart where one host prepares the dataset for the first time (SVHN's download
# and decoding) or reads a large image folder from a cold disk, and such jobs, which waited
# for that host in their first collective, were stopped. A process that fails or dies on
# the way ends the wait sooner (:func:`leave_job`, the heartbeats).
DATA_WAIT_S = 24 * 3600


def _agreed(call: Any, key: str, timeout_s: int = 300, what: str = "configs") -> Any:
    """``call(key, timeout in ms)``; a timeout (a process stuck before comparing its
    ``what``) is an ``errors.DistributedError``."""
    try:
        return call(key, timeout_s * 1000)
    except Exception as e:  # noqa: BLE001  XLA raises plain runtime errors.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise errors.DistributedError(
            f"The processes did not all compare their {what} within {timeout_s} s ({first})."
        ) from e


def wait_for_all(name: str, timeout_s: float) -> bool:
    """Waits until every process of the job has called this with ``name``, for at most
    ``timeout_s`` seconds; returns whether they all did (True outside a multi-process job).
    Bounded, unlike a device collective (``sync_global_devices``), which waits for good
    for a process that never gets there: for a wait that may give up and go on, as that of
    processes letting another finish its last drawing before they report their failure,
    which ends it."""
    client = _client()
    if client is None:
        return True
    try:
        client.wait_at_barrier(f"{_KEY}/{name}/{next(_waits)}", int(timeout_s * 1000))
    except Exception:  # noqa: BLE001  XLA raises plain runtime errors (DEADLINE_EXCEEDED).
        return False
    return True


_waits = itertools.count()  # Keys of their own: a barrier's key is used once in a job.


def lost_peer(error: BaseException) -> str | None:
    """The one line for a collective that failed because another process vanished (Gloo, on
    CPU, sees the connection reset at once), or ``None`` for any other error. A process that
    reported its failure before it left (:func:`leave_job`) is named, with its error."""
    text = str(error)
    if not (isinstance(error, jax.errors.JaxRuntimeError) and "Gloo" in text
            and "by peer" in text):  # "Connection reset by peer", "Connection closed by peer"
        return None
    try:
        failed = {p: m for p, m in _failed(_client()).items() if p != _me()}
    except Exception:  # noqa: BLE001  No job, or its service is gone: nothing to read.
        failed = {}
    if failed:
        return _stops_too(min(failed), failed[min(failed)])
    first = text.strip().splitlines()[0]
    return (f"A collective with the other processes failed ({first}): another process died "
            "or was killed; its output says why.")


_closing: list[Callable[[], None]] = []  # What leave_job finishes once the others know.
_reporting = False  # Whether a failure now reaches leave_job (reporting_failures).


@contextlib.contextmanager
def reporting_failures() -> Iterator[None]:
    """Marks the block as one whose failures :func:`leave_job` reports (the command-line
    tools' error handler): only there does :func:`close_after_reporting` defer a close."""
    global _reporting
    previous, _reporting = _reporting, True
    try:
        yield
    finally:
        _reporting = previous


def close_after_reporting(close: Callable[[], None]) -> bool:
    """In a multi-process job whose failures :func:`leave_job` reports
    (:func:`reporting_failures`), has it call ``close`` (which waits for a checkpoint save
    in flight) only after it has told the others of this process's failure, so that they
    hear of it at once, not one save later; returns whether it will. Otherwise returns
    False: the caller closes now (a Python caller's failure is not reported, and a close
    left to the interpreter's exit fails: its thread pools are shut down by then). Called
    at exit if no failure was reported after all.
    """
    if not (_reporting and in_job()):
        return False
    _closing.append(close)
    return True


def closes_pending() -> bool:
    """Whether :func:`close_after_reporting` holds a close that :func:`leave_job` has yet to
    run (a failed run's checkpoint save still in flight)."""
    return bool(_closing)


def _close_all() -> None:
    """Runs what :func:`close_after_reporting` was given; a failure there is one warning
    line (this process is failing already, and its own error was printed)."""
    while _closing:
        close = _closing.pop(0)
        try:
            close()
        except Exception as e:  # noqa: BLE001  Anything: the failure is reported already.
            first = " ".join(str(e).split()) or type(e).__name__
            _say(f"warning: the checkpoint being saved at this failure was not completed "
                 f"({first}); the run resumes from the last one committed.")


atexit.register(_close_all)


def leave_job(message: str, status: int, join: bool = True) -> None:
    """After a failure reported as ``message``, leaves a multi-process job, telling the
    others first so that they stop too (they print ``message``); the caller then exits
    with ``status``. Returns at once outside a multi-process job. With ``join``, a process
    that failed before joining the job of :func:`expect_job` joins it first, to tell them.

    When every other process has finished (it waits in JAX's shutdown barrier), returns,
    and the caller's ``sys.exit`` ends this process through that barrier with them (they
    exit 0). Otherwise ends this process now with ``status``, skipping JAX's exit handler,
    whose shutdown barrier would wait ``shutdown_timeout`` (300 s) for processes that never
    arrive. Process 0 hosts the job's coordination service and first waits up to
    ``LEAVE_WAIT_S`` for the others to leave.
    """
    client = _join_to_report() if join else _client()
    if client is None:
        return
    if _watcher is not None:
        _watcher.close()
    try:  # Whatever happens here (the service gone with process 0), this process ends.
        me = _me()
        client.key_value_set(f"{_KEY}/failed/{me}", " ".join(message.split()),
                             allow_overwrite=True)
        closing = bool(_closing)
        try:
            _close_all()  # The others stop once it is done (_stop_because): the save completes.
        finally:  # Even on a Ctrl-C meanwhile: they would wait for it.
            client.key_value_set(f"{_KEY}/closed/{me}", "", allow_overwrite=True)
        others = set(range(_count())) - {me}
        # Process 0's exit ends the service; a process that kept the others waiting would
        # end their collectives first (a second line, from Gloo): both let them leave first.
        left = (_wait_until_left(client, others, failing=True) if me == 0 or closing
                else _left(client))
        done = all(left.get(p) == _DONE for p in others)
        # Recorded after reading theirs: a process finishing meanwhile reads it at its exit.
        client.key_value_set(f"{_KEY}/left/{me}", _DONE if done else _STOPPED,
                             allow_overwrite=True)
        if done:
            return
    except BaseException:  # noqa: BLE001  Ends below, whatever the error.
        pass
    _exit_now(status)


_cleanups: list[Callable[[], None]] = []  # What _exit_now runs first (cleanup_if_stopped).


@contextlib.contextmanager
def cleanup_if_stopped(cleanup: Callable[[], None]) -> Iterator[None]:
    """While the block runs, has ``cleanup`` run if this process is ended at once (because
    another process of the job failed, or after its own failure was reported), which skips
    ``finally`` blocks and exit handlers: the main thread may be blocked in a collective
    for good. ``cleanup`` may then run in another thread, also while the main thread runs
    its own (it must be safe to run twice), and is given ``CLEANUP_WAIT_S`` at most."""
    _cleanups.append(cleanup)
    try:
        yield
    finally:
        _cleanups[:] = [c for c in _cleanups if c is not cleanup]


def _exit_now(status: int) -> None:
    """Runs the clean-ups of :func:`cleanup_if_stopped` (newest first; each may fail, and
    all together get ``CLEANUP_WAIT_S``), then ends this process with ``status`` without
    running exit handlers (JAX's would wait in its shutdown barrier)."""
    def run_all(cleanups: list[Callable[[], None]]) -> None:
        for cleanup in cleanups:
            try:
                cleanup()
            except Exception:  # noqa: BLE001  Left as a killed process leaves it.
                pass

    if _cleanups:
        # In a thread of its own: a call blocked on a hung filesystem is abandoned.
        worker = threading.Thread(target=run_all, args=(_cleanups[::-1],), daemon=True)
        worker.start()
        worker.join(CLEANUP_WAIT_S)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _left(client: Any) -> dict[int, str]:
    """``{process: _DONE or _STOPPED}`` of the processes that left the job."""
    return {int(key.rsplit("/", 1)[1]): how
            for key, how in client.key_value_dir_get(f"{_KEY}/left/")}


def _wait_until_left(client: Any, processes: set[int], or_one_stops: bool = False,
                     failing: bool = False) -> dict[int, str]:
    """Waits up to ``LEAVE_WAIT_S`` for ``processes`` to leave the job (with
    ``or_one_stops``, only until another process records that it exits at once; where this
    process is ``failing`` (:func:`leave_job`), not for a process 0 that failed too:
    :func:`_leaving_last`); returns :func:`_left`.

    On process 0, whose exit ends the job's service (and the runtime aborts a process still
    connected to it, with a C++ trace): when some of them recorded that they exit at once,
    the others cannot end in JAX's shutdown barrier, so it also waits for those that wait
    there to stop too (:func:`_stop_if_one_exited`), then ``EXIT_GRACE_S`` more: between
    recording it and exiting, a process on a busy machine may wait for the interpreter
    lock."""
    deadline = time.monotonic() + LEAVE_WAIT_S
    primary = _me() == 0
    left = _left(client)
    while time.monotonic() < deadline and not (
            (processes - (_leaving_last(client) if failing else set()) <= set(left)
             or (or_one_stops and _STOPPED in _others(left)))
            and not (primary and _STOPPED in left.values() and _DONE in _others(left))):
        time.sleep(0.1)
        left = _left(client)
    if primary and any(left.get(p) == _STOPPED for p in processes):
        time.sleep(EXIT_GRACE_S)
    return left


def _leaving_last(client: Any) -> set[int]:
    """``{0}`` where this is another process and process 0 failed too: process 0 then waits
    in :func:`leave_job` for this one to leave (its exit ends the job's service), so this one
    must not wait for it. Both waited, each for the other, until one gave up: process 0
    first, and its exit aborted this one with a C++ trace (every process failing at once,
    as on processes that restored different steps)."""
    if _me() == 0:
        return set()
    try:
        return {0} & set(_failed(client))
    except Exception:  # noqa: BLE001  The service is gone: nothing to wait for anyway.
        return set()


def _others(left: dict[int, str]) -> list[str]:
    """How the processes other than this one left, of :func:`_left`'s ``left``."""
    return [how for p, how in left.items() if p != _me()]


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh ``('data',)`` over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.sharding.Mesh(
        np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimiser state)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``'data'``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, name: str = "batch_size") -> None:
    """Raises ``errors.ConfigError`` unless ``batch_size`` divides evenly over the mesh's devices."""
    if batch_size % mesh.size:
        raise errors.ConfigError(
            f"{name}={batch_size} does not divide by the {mesh.size} devices of the mesh "
            f"({jax.process_count()} process(es)); use a multiple of {mesh.size}, e.g. "
            f"--config.{name}={max(mesh.size, batch_size // mesh.size * mesh.size)}."
        )


def is_primary() -> bool:
    """True on process 0, the one that writes logs, JSON and plots."""
    return jax.process_index() == 0
