"""The run directory: created and checked up front, and held by one writer at a time.

``WorkdirLock`` holds an exclusive ``fcntl.flock`` on ``<workdir>/run.lock`` for the life
of a run. The kernel releases the lock when the process exits in any way (SIGKILL
included), so a lock left by a killed run is free: the next run takes it over and says
whose it was (pid and host, recorded in the file). A second run on a busy workdir stops at
once, naming the holder. In a multi-process job only process 0 takes the lock; the others
learn the outcome from it, and each checks that it reads the lock file process 0 wrote (a
workdir that is not one folder shared by every host is refused at start-up). On a
filesystem shared by several hosts the lock is as good as the filesystem's ``flock`` (NFS
v4 and Lustre provide it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import warnings
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from stochastic_depth_jax import errors, logs
# Files replaced whole and their temporaries: their own module (the data package uses it
# too), named here as well for the trainer's modules.
from stochastic_depth_jax.files import (ABANDONED_AFTER_S, atomic_write, naming,
                                        remove_abandoned_temporaries, remove_stale_temporaries)

__all__ = [
    "LOCK_FILE",
    "WorkdirLock",
    "training_holder",
    "prepare_workdir",
    "remove_unused",
    "atomic_write",
    "remove_stale_temporaries",
    "remove_abandoned_temporaries",
    "naming",
    "ABANDONED_AFTER_S",
    "describe_os_error",
    "fix_in_place",
    "dangling_link",
    "anticipated_os_error",
    "describe_read_error",
    "read_os_error",
]

LOCK_FILE = "run.lock"

# Disk and permission failures a user fixes by freeing space or choosing another path.
_FIXES = {
    errno.ENOSPC: "free some space or use another --workdir",
    errno.EDQUOT: "free some space or use another --workdir",
    # A new --workdir would start the run afresh: a run already there resumes once writable.
    errno.EACCES: "no permission to write there; give this user write access to resume the "
                  "run there (chmod/chown), or use another --workdir",
    errno.EPERM: "no permission to write there; give this user write access to resume the "
                 "run there (chmod/chown), or use another --workdir",
    errno.EROFS: "the filesystem is read-only; remount it writable to resume the run there, "
                 "or use another --workdir",
    errno.ENOTDIR: "a file is in the way of the directory; use another --workdir",
    errno.EEXIST: "a file is in the way of the directory; use another --workdir",
}
# TensorStore, which writes Orbax's arrays, raises a ValueError whose message ends with the
# OS error's number: "... No space left on device [os_error_code='28']".
_OS_ERROR_CODE = re.compile(r"\[os_error_code='(\d+)'\]")


# The same failures where a file is written beside runs that the command does not train (an
# evaluation's result, a sweep's figures): no run resumes, and another --workdir would be
# another run, or none.
_FIXES_IN_PLACE = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space",
    errno.EACCES: "give this user write access there (chmod/chown)",
    errno.EPERM: "give this user write access there (chmod/chown)",
    errno.EROFS: "remount the filesystem writable",
    errno.ENOTDIR: "move the file in the way",
    errno.EEXIST: "move the file in the way",
}


def fix_in_place(error: OSError) -> str:
    """What to do about a failed write of a file beside runs the command does not train:
    ``describe_os_error``'s fix without 'resume the run there' or 'another --workdir'."""
    return _FIXES_IN_PLACE.get(error.errno, "check the path and the disk")


def describe_os_error(error: OSError, path: str) -> str:
    """One line for a failed write: what happened where, and what to do."""
    fix = _FIXES.get(error.errno, "check the path and the disk")
    return f"Cannot write {path} ({error.strerror or error}): {fix}."


def anticipated_os_error(error: BaseException) -> OSError | None:
    """The disk or permission failure (full disk, read-only, ...) that ``error`` is or was
    raised from (``raise ... from``), as an ``OSError``; None for any other error.

    Also recognises TensorStore's errors, which carry the OS error's number in their text.
    """
    return _os_error_in(error, lambda code: code in _FIXES, follow_context=False)


# Why a file that exists cannot be read, when the reason lies outside the file (its content
# may be intact): what the user does before running the same command again. Only these OS
# errors count as environmental; any other (EINVAL, EBADMSG, ENODATA, EILSEQ, ... which may
# mean damaged data; ENOENT, ENOTDIR, EISDIR: a file missing or of the wrong kind) does not.
# EIO is included although a failing disk can lose data for good: network and FUSE
# filesystems report their outages as EIO, and moving the newest checkpoint aside would
# silently undo training; the fix says how to use an older one by hand.
_NO_ACCESS = ("this user may not read it (a workdir copied from another user, or its modes "
              "changed): give it read access (chmod/chown) or work on a copy you own")
_NO_ANSWER = "the filesystem did not answer (a network mount?): check that it is mounted and up"
_BUSY = "the filesystem is busy: wait a moment"
_READ_FIXES = {
    errno.EACCES: _NO_ACCESS,
    errno.EPERM: _NO_ACCESS,
    errno.EIO: ("the disk or filesystem reported an I/O error: check it (dmesg, its mount); "
                "if the file is lost for good, move it aside by hand to use an older one"),
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.ENFILE: "too many open files: raise the limit (ulimit -n)",
    errno.ENOMEM: ("free some host or accelerator memory (another process on the same "
                   "machine or GPU?)"),
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is exhausted: free some space",
    errno.EAGAIN: _BUSY,
    errno.EBUSY: _BUSY,
    errno.EINTR: "the read was interrupted or cancelled: retry",
    **{code: _NO_ANSWER for code in (
        errno.ETIMEDOUT, errno.ESTALE, errno.ENOTCONN, errno.ECONNREFUSED, errno.ECONNRESET,
        errno.ECONNABORTED, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENETDOWN,
        errno.ENETUNREACH, errno.ENOLINK, errno.ENODEV, errno.ENXIO)},
}
# The status codes of TensorStore (Orbax's reads) and XLA (placing what was read on the
# device) that say the same without an OS error number in the text: (errno, what happened).
# XLA's 'RESOURCE_EXHAUSTED: Out of memory ...' comes from a busy accelerator, not the file;
# TensorStore's CANCELLED and ABORTED from an interrupted read or a concurrent writer.
_STATUS_ERRNO = {"PERMISSION_DENIED": (errno.EACCES, None),
                 "UNAUTHENTICATED": (errno.EACCES, None),
                 "DEADLINE_EXCEEDED": (errno.ETIMEDOUT, None),
                 "UNAVAILABLE": (errno.EAGAIN, None),
                 "RESOURCE_EXHAUSTED": (errno.ENOMEM, "out of memory"),
                 "CANCELLED": (errno.EINTR, "cancelled"),
                 "ABORTED": (errno.EAGAIN, "aborted")}
_STATUS = re.compile(r"^(%s):" % "|".join(_STATUS_ERRNO))


def read_os_error(error: BaseException) -> OSError | None:
    """The failure outside the file (no permission, an I/O or network filesystem error,
    too many open files, out of memory, ...: one of ``_READ_FIXES``) that a failed read
    ``error`` is or was raised from (``__cause__``), as an ``OSError``; None if nothing says
    so (a missing file or undecodable data: the file itself may be bad).

    Also recognises TensorStore's errors (as Orbax raises them): by the OS error's number
    in their text, or by their status (``PERMISSION_DENIED: ...``); XLA's out of memory and
    ``MemoryError``. An error raised while handling another (``__context__``: a library's
    clean-up failing after the read failed) counts only if that other is one of these
    ``OSError``s itself: a decoder's ``ValueError`` raised while handling any other error
    is damage.
    """
    for e in _chain(error, follow_context=False):
        found = _environmental(e)
        if found is not None:
            return found
    for e in _chain(error, follow_context=True):
        if isinstance(e, OSError) and e.errno in _READ_FIXES:
            return e
    return None


def _environmental(error: BaseException) -> OSError | None:
    """``error`` as one of ``_READ_FIXES``' ``OSError``s if it is one (itself, by the OS
    error's number in its text, its status, or as a ``MemoryError``), else None."""
    if isinstance(error, OSError) and error.errno in _READ_FIXES:
        return error
    if isinstance(error, MemoryError):
        return OSError(errno.ENOMEM, "out of memory")
    text = str(error)
    code = _OS_ERROR_CODE.search(text)
    if code:  # The OS error's number decides, whatever status TensorStore gave it.
        number = int(code.group(1))
        return OSError(number, os.strerror(number)) if number in _READ_FIXES else None
    status = _STATUS.match(text)
    if status or "Permission denied" in text:
        number, what = _STATUS_ERRNO[status.group(1)] if status else (errno.EACCES, None)
        return OSError(number, what or os.strerror(number))
    return None


def describe_read_error(error: OSError, path: str) -> str:
    """One line for a read that failed for a reason outside the file: what, where, the fix."""
    fix = _READ_FIXES.get(error.errno, "check the disk and its mount")
    return f"Cannot read {path} ({error.strerror or error}): {fix}."


def _chain(error: BaseException | None, follow_context: bool) -> list[BaseException]:
    """``error`` and the exceptions it was raised from (and, with ``follow_context``, while
    handling), innermost last; each once."""
    chain: list[BaseException] = []
    while error is not None and all(error is not e for e in chain):
        chain.append(error)
        implicit = follow_context and not error.__suppress_context__  # not `from None`
        error = error.__cause__ or (error.__context__ if implicit else None)
    return chain


def _os_error_in(error: BaseException, accept: Callable[[int], bool],
                 follow_context: bool) -> OSError | None:
    """The first ``OSError`` in ``error``'s chain whose number ``accept`` accepts, also as
    TensorStore writes it in its text (``[os_error_code='13']``); None if there is none."""
    for e in _chain(error, follow_context):
        if isinstance(e, OSError) and e.errno is not None and accept(e.errno):
            return e
        code = _OS_ERROR_CODE.search(str(e))
        if code and accept(int(code.group(1))):
            return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
    return None


def dangling_link(path: str, then: str, access: str = "write") -> str:
    """One line for ``path``, a symbolic link to nothing (the disk it points to not mounted):
    creating it fails with 'File exists', whose fix (another --workdir, i.e. a fresh start)
    would misdirect, and reading it finds nothing, as if the run had never saved there.
    ``then``: what mending the link lets the user do; ``access``: 'write' or 'read' (which
    another --workdir does not help)."""
    return (f"Cannot {access} {path}: it is a symbolic link to {os.readlink(path)}, which does "
            f"not exist (its filesystem not mounted, or moved?): mount it or mend the link to "
            f"{then}" + (", or use another --workdir." if access == "write" else "."))


def prepare_workdir(path: str) -> bool:
    """Creates ``path`` if needed and checks it is a writable directory.

    Returns:
      Whether the directory was created by this call.

    Raises:
      errors.WorkdirError: it is a file, read-only, on a full disk, ...
    """
    created = not os.path.exists(path)
    if created and os.path.islink(path):
        raise errors.WorkdirError(dangling_link(path, "resume the run there"))
    if not created:  # a run killed during this check left its probe: nothing else
        created = _remove_probes(path)
    probe = os.path.join(path, f"{_PROBE_PREFIX}{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        with contextlib.suppress(FileNotFoundError):  # a run starting beside it removed it
            os.remove(probe)
    except OSError as e:
        raise errors.WorkdirError(describe_os_error(e, path)) from e
    return created


# prepare_workdir's probe: '.write-test-<pid>'.
_PROBE_PREFIX = ".write-test-"
_PROBE = re.compile(re.escape(_PROBE_PREFIX) + r"[0-9]+")


def _running(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host: its probe may be in use (a run starting
    beside this one, whose checks then fail in their own way), so it is left."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # another user's process
        return True
    return True


def _remove_probes(path: str) -> bool:
    """Removes the probes (regular files named ``.write-test-<pid>``, ``pid`` not running
    here) that runs killed while :func:`prepare_workdir` checked ``path`` left; True if
    ``path`` held nothing else (made by such a run, or empty before it): the run now
    starting takes it as new, and removes it if it fails having written nothing (a probe
    kept it, as if it held results). Never raises: a leftover must not stop a run."""
    try:
        entries = os.listdir(path)
    except OSError:
        return False
    probes = [e for e in entries if _PROBE.fullmatch(e)
              and os.path.isfile(os.path.join(path, e))
              and not os.path.islink(os.path.join(path, e))
              and not _running(int(e[len(_PROBE_PREFIX):]))]
    for entry in probes:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(path, entry))
    return bool(probes) and len(probes) == len(entries)


def remove_unused(workdir: str, disposable: tuple[str, ...] = ()) -> None:
    """Removes ``workdir``, which the failed run created, if it holds nothing worth keeping:
    only the lock file and the ``disposable`` entries (what the run generated and the next
    one makes again, such as fake data). Anything else (a checkpoint, a metrics file) keeps
    all of it. Never raises: a failure here must not hide the run's own error.
    """
    try:
        entries = set(os.listdir(workdir))
        if entries - {LOCK_FILE, *disposable}:
            return
        for name in entries & set(disposable):
            path = os.path.join(workdir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        if LOCK_FILE in entries:
            os.remove(os.path.join(workdir, LOCK_FILE))
        os.rmdir(workdir)  # Fails if anything was written meanwhile: then it stays.
    except OSError:
        pass  # Best effort: left as a killed run would leave it.


def _holder_text(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unknown process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started_at", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')!r} (started {started})"


def training_holder(workdir: str) -> str | None:
    """Who holds ``workdir``'s lock now, i.e. a run still training there, as the busy
    message names it (``pid 12 on host 'gpu1' (started ...)``); None if no live run holds
    it (finished, killed, or never a run). For readers (evaluation): it tests the lock with
    a shared one taken and dropped at once, never blocking and never writing."""
    try:
        fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return None  # no lock file: no run ever held it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_text(WorkdirLock(workdir)._read_holder())
    except OSError:
        return None  # a filesystem without flock: as the trainer, nothing to tell
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# An evaluation tests the lock with a shared one held for microseconds (training_holder):
# a run starting at that moment retries rather than calling the workdir busy.
_LOCK_TRIES, _LOCK_RETRY_S = 20, 0.025
# How long a process of a job looks for process 0's lock record before it calls the workdir
# not shared: another host may see the write late (NFS caches a directory's attributes, a
# file's absence included, for up to 60 s by default). The environment variable
# SDJ_SHARED_WAIT_S overrides it (a slower filesystem; tests).
SHARED_WAIT_S = 90.0
# After this long the waiting process says what it waits for.
SHARED_NOTE_S = 5.0


def shared_wait_s() -> float:
    """:data:`SHARED_WAIT_S`, or ``$SDJ_SHARED_WAIT_S`` where set to a number of seconds."""
    text = os.environ.get("SDJ_SHARED_WAIT_S", "").strip()
    if not text:
        return SHARED_WAIT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 0:  # 'nan' would wait for good, a typo or '-5' not at all
        raise errors.ConfigError(
            f"SDJ_SHARED_WAIT_S={text!r} is not a number of seconds (0 or more); unset it or "
            f"give one (default {SHARED_WAIT_S:g}).")
    return seconds


def _flock_soon(fd: int) -> bool:
    """Takes the exclusive lock on ``fd`` without blocking, retrying a few times within
    ~0.5 s; False if another run holds it."""
    for attempt in range(_LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < _LOCK_TRIES:
                time.sleep(_LOCK_RETRY_S)
    return False


# How a busy workdir's message ends (a sweep, whose runs' workdirs it chooses, says its own).
BUSY_FIX = "Wait for it to finish, stop it, or use another --workdir."


class WorkdirLock:
    """Exclusive ownership of a workdir by one run (see the module docstring).

    Use as a context manager or call ``acquire``/``release``. ``acquire`` raises
    ``errors.WorkdirBusyError`` naming the holder if another live run holds it.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None
        # Written in the lock file by process 0; the others of a job must read it there.
        self._token = 1 + int.from_bytes(os.urandom(4), "little") % (2**31 - 2)
        # release() may run in two threads at once: the main thread's failure and the thread
        # that ends this process because another process of the job failed.
        self._releasing = threading.Lock()

    def _read_holder(self) -> dict[str, Any]:
        try:
            with open(self.path) as f:
                return json.loads(f.read() or "{}")
        except (OSError, ValueError):
            return {}

    def _try_lock(self) -> str | None:
        """Takes the lock on process 0; returns None or the reason it is busy."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _flock_soon(fd):
            os.close(fd)
            return (
                f"The workdir {os.path.dirname(self.path)} is in use by another run: "
                f"{_holder_text(self._read_holder())}. {BUSY_FIX}"
            )
        stale = self._read_holder()
        if stale:  # The previous holder exited without releasing: killed or crashed.
            warnings.warn(
                f"Taking over the lock of {_holder_text(stale)} on "
                f"{os.path.dirname(self.path)}: that process is gone.",
                logs.RunWarning,
            )
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": time.time(),
            "argv": sys.argv,
            "token": self._token,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)  # For the other hosts of a job (_check_shared), over NFS too.
        self._fd = fd
        return None

    def acquire(self) -> "WorkdirLock":
        """Takes the lock (process 0); in a multi-process job, every other process then
        checks that it sees the lock file process 0 wrote (:meth:`_check_shared`)."""
        if jax.process_count() > 1:
            shared_wait_s()  # a bad $SDJ_SHARED_WAIT_S refused by every process, before all
        busy = self._try_lock() if jax.process_index() == 0 else None
        if jax.process_count() > 1:
            token = int(multihost_utils.broadcast_one_to_all(
                np.int32(self._token if busy is None else 0)))
            if not token:
                busy = busy or "The workdir is in use by another run (reported by process 0)."
            else:
                if jax.process_index() != 0:
                    self._check_shared(token)
                # Process 0 writes nothing more there until all have seen it: a workdir it
                # created is then removed whole when the job stops.
                multihost_utils.sync_global_devices("workdir_shared")
        if busy:
            raise errors.WorkdirBusyError(busy)
        return self

    def _check_shared(self, token: int) -> None:
        """Raises ``errors.WorkdirError`` unless this process reads process 0's ``token`` in
        the lock file: a workdir that is not one shared folder (each host's local disk, or
        another --workdir per process) otherwise hung in the first checkpoint save for 10
        minutes (Orbax waiting for process 0's folders), then failed with its traceback.
        Retries for :func:`shared_wait_s`: another host may see process 0's write late."""
        wait = shared_wait_s()
        started = time.monotonic()
        noted = False
        while self._read_holder().get("token") != token:
            waited = time.monotonic() - started
            if waited >= wait:
                state = ("missing there" if not os.path.exists(self.path) else
                         "not the one there, which another run wrote")
                # The path is this process's --workdir: process 0's may be another one.
                raise errors.WorkdirError(
                    f"Process {jax.process_index()} does not see process 0's workdir in its "
                    f"own --workdir {os.path.dirname(self.path)} (the {LOCK_FILE} process 0 "
                    f"took is {state}): "
                    "every process needs the same --workdir, on a filesystem all hosts share "
                    "(not each host's local disk).")
            if not noted and waited >= SHARED_NOTE_S and wait > SHARED_NOTE_S:
                noted = True  # A silent wait of a minute or more would look like a hang.
                print(f"Process {jax.process_index()}: waiting up to {wait:g} s to see the "
                      f"{LOCK_FILE} process 0 wrote in {os.path.dirname(self.path)} (a shared "
                      "filesystem may show it late).", flush=True)
            time.sleep(0.2)

    @property
    def held(self) -> bool:
        """Whether this process holds the lock: acquired (on process 0), not yet released."""
        return self._fd is not None

    def release(self) -> None:
        """Clears the holder record and unlocks (the file stays: deleting it would race).
        Safe to call more than once, from any thread."""
        with self._releasing:
            if self._fd is None:
                return
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass  # A full disk cannot stop the unlock below.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
