"""Files replaced whole, safely: :func:`atomic_write` (a crash or an error mid-write never
leaves a truncated file), and the removal of the temporary files that writers killed
mid-write left (:func:`remove_stale_temporaries` for a directory one writer owns,
:func:`remove_abandoned_temporaries` where several may write).

Used by the trainer, evaluation, sweeps and the data package's decoded-data cache; it
depends on nothing else in this package.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import time
import uuid
from typing import IO, Any, Callable, Iterable, Iterator

__all__ = [
    "ABANDONED_AFTER_S",
    "atomic_write",
    "naming",
    "remove_abandoned_temporaries",
    "remove_stale_temporaries",
]

# atomic_write's temporary files are '<path>.tmp-<this many hexadecimal digits>'.
_TEMPORARY_DIGITS = 12
_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{%d}" % _TEMPORARY_DIGITS)


def remove_stale_temporaries(directory: str, names: Iterable[str]) -> list[str]:
    """Removes the temporary files that :func:`atomic_write` calls for ``names`` in
    ``directory`` left when killed mid-write (``<name>.tmp-<12 hex digits>``: a whole file
    or part of one, never used; each kill left one more). Only for files that one writer
    owns, such as a training run holding the workdir's lock: another process's temporary
    file, still being written, would be lost. Returns the paths removed; never raises (a
    leftover must not stop a run)."""
    removed = []
    for path in _temporaries(directory, set(names).__contains__):
        with contextlib.suppress(OSError):
            if os.path.isfile(path) and not os.path.islink(path):
                os.remove(path)
                removed.append(path)
    return removed


def _temporaries(directory: str, is_name: Callable[[str], bool]) -> list[str]:
    """The paths in ``directory`` named as :func:`atomic_write`'s temporary files of the
    names ``is_name`` accepts (``<name>.tmp-<12 hex digits>``), sorted; none if it cannot
    be listed."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    paths = []
    for entry in sorted(entries):
        name, dot, suffix = entry.rpartition(".tmp-")
        if dot and _TEMPORARY.fullmatch(dot + suffix) and is_name(name):
            paths.append(os.path.join(directory, entry))
    return paths


# A temporary file of atomic_write's older than this, that no process holds, was left by a
# writer killed mid-write (remove_abandoned_temporaries); a live one holds it the while.
ABANDONED_AFTER_S = 60.0


def remove_abandoned_temporaries(directory: str, is_name: Callable[[str], bool],
                                 now: float | None = None) -> list[str]:
    """Removes the temporary files of :func:`atomic_write` in ``directory`` for the names
    ``is_name`` accepts (``<name>.tmp-<12 hex digits>``) that a writer killed mid-write left
    (each kill left one more): those no process holds (a live writer holds an ``flock`` on
    its file until it is renamed) and not written to for :data:`ABANDONED_AFTER_S` (a
    writer may have created its file and not locked it yet). Safe where other processes
    write the same names (evaluations of one run); a file that cannot be locked (no
    ``flock`` on this filesystem) is left. Returns the paths removed; never raises."""
    now = time.time() if now is None else now
    removed = []
    for path in _temporaries(directory, is_name):
        with contextlib.suppress(OSError):
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode) or now - info.st_mtime < ABANDONED_AFTER_S:
                continue
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                # Shared: on NFS, flock is a POSIX lock, whose exclusive kind needs a file
                # open for writing (EBADF here, so nothing was ever removed there). Either
                # kind fails while a live writer holds its exclusive one.
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                os.remove(path)
                removed.append(path)
            finally:
                os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[IO[Any]]:
    """A file (opened with ``mode``: ``"w"`` or ``"wb"``) whose content replaces ``path``
    only once all of it is written and on disk: it is written beside ``path`` and renamed
    onto it, so a crash or an error mid-write leaves the earlier ``path`` (or none), never a
    truncated one; the partial file is removed on an error. Its name is unique, so
    processes writing the same path (a shared filesystem) each rename a whole file. The
    writer holds an ``flock`` on it until it is renamed: one a kill left is told from one
    being written (:func:`remove_abandoned_temporaries`)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:_TEMPORARY_DIGITS]}"
    try:
        with naming(path), open(tmp, mode) as f:
            with contextlib.suppress(OSError):  # a filesystem without flock: written all the same
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # still open, so still held
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
    """Raises an ``OSError`` that names no file (a write, flush or fsync on a full disk) as
    one naming ``path``: the one-line error said 'Cannot write a file'."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, path) from e
