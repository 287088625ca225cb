"""Orbax checkpoints: the last k for resuming, the best by validation error, and recovery.

Layout under the workdir::

  checkpoints/<step>/{state,meta}        last ``keep`` saves (resume from the newest good one)
  checkpoints_best/<step>/{state,meta}   the two most recent improvements of the best metric
  checkpoints_corrupt/<kind>-<step>-<t>[.n]  checkpoints found damaged, moved aside
  checkpoints_unfinished/<kind>-<step>-<t>  the newest save interrupted before its commit
  checkpoints_superseded/<kind>-<step>-<t>[.n]  'best' checkpoints of an earlier session
                                         that a resumed run's trajectory does not reproduce

Orbax writes each save into a temporary directory and renames it when complete, so an
interrupted save never appears as a step, and old steps are deleted only after the new one
is committed. A training run's start moves such leftovers (which Orbax would delete without
a word; one killed between writing and committing holds the whole state) to
``checkpoints_unfinished/`` with a warning saying where it went and which checkpoint the
run resumes from (from step 0 if none was committed); only the newest is kept per kind
(older ones are deleted, as the warning says), so repeated preemptions do not fill the disk. A committed checkpoint that fails
to restore, or whose restored bits do not match the checksum stored at save time, is
skipped with a warning and moved aside (under a name no other move takes); the previous
one is used instead. A read that fails for a reason outside the checkpoint (no permission,
an I/O or network filesystem error, too many open files, out of host or accelerator memory:
``workdir.read_os_error``) is not damage: it raises one
``CheckpointAccessError`` naming the path, the cause and the fix, and nothing is moved or
skipped (an older checkpoint would silently undo training).

An evaluation may read while training writes: steps are listed afresh on every look, and a
step deleted by the writer's rotation while being read (the step listing changed meanwhile,
whatever the error: ``ESTALE`` on NFS) is not taken for damage: the reader lists again and
reads the newest step that exists.

A training run refuses, at its start, a checkpoint directory it cannot create a step in,
or a step holding a directory it could not delete when the step rotates out (or linked
to another directory, whose files the deletion would take)
(``errors.WorkdirError``, one line). A save that fails for a full disk (or another disk or
permission failure), whether it surfaces at once or from a background save at the next
save, wait or close, raises one ``errors.WorkdirError``; the committed checkpoints are
untouched, and the failed save's temporary directory is removed (one process). With
several processes, a save failed on one of them fails there at once, without waiting for
the others at Orbax's barriers (:func:`_barrier_unless_failed`); the others stop, naming it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import itertools
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from stochastic_depth_jax import errors, logs
from stochastic_depth_jax.training import distributed
from stochastic_depth_jax.training import state as state_lib
from stochastic_depth_jax.training import workdir as workdir_lib

__all__ = [
    "Checkpoints",
    "CheckpointAccessError",
    "CheckpointCorruptWarning",
    "NoCheckpointError",
    "IncompatibleCheckpointError",
    "structure_signature",
]


class CheckpointCorruptWarning(logs.RunWarning):
    """A checkpoint could not be restored or failed verification and was skipped."""


class NoCheckpointError(errors.CheckpointError):
    """No readable checkpoint matches the request."""


class IncompatibleCheckpointError(errors.Error, ValueError):
    """A readable checkpoint holds a differently shaped state (another model/optimiser)."""


class CheckpointAccessError(errors.WorkdirError):
    """A checkpoint could not be read for a reason outside it (no permission, an I/O or
    network filesystem error, ...): it was left in place, and no older one was used."""


def _access_error(path: str, error: BaseException) -> CheckpointAccessError | None:
    """The error to raise if reading ``path`` failed with ``error`` for a reason outside the
    checkpoint (``workdir.read_os_error``); None if the checkpoint itself may be bad."""
    os_error = workdir_lib.read_os_error(error)
    if os_error is None:
        return None
    message, command_line = errors.run_again(
        workdir_lib.describe_read_error(os_error, path) + " Nothing was moved, and no older "
        "checkpoint was used in its place", "the same function", "again once it is fixed")
    return CheckpointAccessError(message, command_line=command_line)


def _check_listable(directory: str) -> None:
    """Raises ``CheckpointAccessError`` if ``directory`` exists but cannot be listed, before
    Orbax lists it (its manager also lists it in a background thread, which would log the
    failure with a traceback after the error line)."""
    try:
        if os.path.isdir(directory):
            os.listdir(directory)
    except OSError as e:
        access = _access_error(directory, e)
        if access is None:
            raise
        raise access from e


def _check_link(directory: str) -> None:
    """Raises ``CheckpointAccessError`` if ``directory`` is a symbolic link to nothing (the
    checkpoints kept on another disk, not mounted now), before a training run's Orbax
    manager creates it: that failed with 'File exists', which the trainer reported as a file
    in the way with the fix 'use another --workdir' (a fresh start)."""
    if os.path.islink(directory) and not os.path.exists(directory):
        raise CheckpointAccessError(workdir_lib.dangling_link(directory, "resume the run"))


def _check_writable(directory: str) -> None:
    """Raises ``errors.WorkdirError`` if a step directory cannot be created in the existing
    ``directory`` (its modes, a read-only mount), before training starts: the first save
    failed only after a whole epoch of training, and Orbax's other save threads then waited
    5 minutes for that directory before the process could exit, printing their tracebacks.
    Every process tries a name of its own, so the processes of a job agree. The name is new
    each time: one left by a run killed before removing it (neither a step nor a save to
    Orbax) is not in the way (its process index and pid, a container's next run's too, were
    refused as 'a file is in the way')."""
    if not os.path.isdir(directory):
        return  # Orbax creates it in the workdir, which prepare_workdir found writable.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".write-test-{jax.process_index()}-", dir=directory))
    except OSError as e:
        if workdir_lib.anticipated_os_error(e) is None:
            raise
        raise errors.WorkdirError(workdir_lib.describe_os_error(e, directory)) from e


def _check_steps_writable(directory: str) -> None:
    """Raises ``errors.WorkdirError`` if a committed step in ``directory`` holds a directory
    this user may not write in (a step copied read-only, or from another user), before
    training starts: training deletes old steps as it saves new ones (and moves 'best' ones
    aside), which failed only at the first rotation, after epochs of training, naming
    ``directory`` but not the step (a fixed ``directory`` failed again, one epoch later).
    Asked with ``os.access``: nothing is written into a checkpoint to find out. A step that
    is a symbolic link (to another run's checkpoint, to resume from it) is refused too:
    Orbax's rotation deleted the files of the directory it links to (its parallel deleter,
    used with 4 CPU cores or more), then failed on the link itself, in a traceback."""
    if not os.path.isdir(directory):
        return
    for step in sorted(ocp.utils.checkpoint_steps(directory)):
        step_dir = os.path.join(directory, str(step))
        if os.path.islink(step_dir):
            target = os.path.realpath(step_dir)
            raise errors.WorkdirError(
                f"{step_dir} is a symbolic link to {target}: training deletes old "
                "checkpoints as it saves new ones, which would delete the files there; "
                f"replace the link with a copy (rm {step_dir} && cp -r {target} {step_dir}), "
                "or use another --workdir.")
        for parent, _, _ in os.walk(step_dir, onerror=functools.partial(_unlisted, step_dir)):
            if not os.access(parent, os.R_OK):  # mode 0o300: it was never listed, yet
                raise _unreadable_step(parent, step_dir)  # restoring and deleting list it
            if os.access(parent, os.W_OK | os.X_OK):
                continue
            read_only = os.statvfs(parent).f_flag & os.ST_RDONLY
            code = errno.EROFS if read_only else errno.EACCES
            line = workdir_lib.describe_os_error(OSError(code, os.strerror(code)), parent)
            raise errors.WorkdirError(
                f"{line} Training deletes old checkpoints as it saves new ones, so every "
                f"directory in {step_dir} must be writable.")


def _unlisted(step_dir: str, error: OSError) -> None:
    """``os.walk``'s ``onerror``: a directory of ``step_dir`` it cannot list is not skipped
    in silence (a directory this user may not read: :func:`_unreadable_step`)."""
    if error.errno in (errno.EACCES, errno.EPERM) and error.filename:
        raise _unreadable_step(error.filename, step_dir) from error
    raise error


def _unreadable_step(directory: str, step_dir: str) -> errors.WorkdirError:
    """The error for a directory of a step this user may not list (write and enter, but not
    read: mode 0o300): the write check passed it, and the run failed only when it restored
    the step or its rotation deleted it."""
    line = workdir_lib.describe_read_error(
        OSError(errno.EACCES, os.strerror(errno.EACCES)), directory)
    return errors.WorkdirError(
        f"{line} Training restores its checkpoints and deletes old ones as it saves new ones, "
        f"so every directory in {step_dir} must be readable and writable.")


# Where a training run moves the newest save an earlier one left unfinished (one per kind).
UNFINISHED_DIR = "checkpoints_unfinished"
# Where damaged checkpoints go, and an earlier session's 'best' ones that a resumed run
# with another trajectory does not reproduce (training.loop): moved, never deleted.
CORRUPT_DIR = "checkpoints_corrupt"
SUPERSEDED_DIR = "checkpoints_superseded"


def _unfinished_saves(directory: str) -> list[str]:
    """The saves left unfinished in ``directory``: Orbax's temporary directories
    (``<step>.orbax-checkpoint-tmp-<t>``, not a symbolic link, as Orbax tells them)."""
    return sorted(
        n for n in _listdir(directory) if ocp.utils.TMP_DIR_SUFFIX in n
        and os.path.isdir(os.path.join(directory, n))
        and not os.path.islink(os.path.join(directory, n)))


def _step_order(name: str) -> int:
    """Sorts unfinished saves oldest first (by step; one without a step first)."""
    step = _unfinished_step(name)
    return int(step) if step.isdigit() else -1


def _listdir(directory: str) -> list[str]:
    """``directory``'s entries, sorted; none if it does not exist (or is not a directory:
    Orbax says so)."""
    try:
        return sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _unfinished_step(name: str) -> str:
    """The step an unfinished save's directory name gives ('unknown' if none)."""
    try:
        return str(ocp.utils.step_from_checkpoint_name(name))
    except ValueError:
        return "unknown"


def _move_aside(source: str, parent: str, name: str) -> str:
    """Moves the directory ``source`` to ``parent/name``, or ``parent/name.1``, ``.2``, ...:
    the first name free (reserved with ``os.mkdir``, atomic: two moves in the same second,
    even by two processes, never share a name or nest one in another). Returns the target.
    """
    os.makedirs(parent, exist_ok=True)
    for n in itertools.count():
        target = os.path.join(parent, name if n == 0 else f"{name}.{n}")
        try:
            os.mkdir(target)
            break
        except FileExistsError:
            continue
    try:
        os.rename(source, target)  # Replaces the empty directory reserved above.
    except OSError as e:
        if e.errno != errno.EXDEV:
            os.rmdir(target)
            raise
        # checkpoints/ on another filesystem (a symbolic link): copy, then delete.
        shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
        shutil.rmtree(source)
    return target


# How many times a reader lists the steps again when the one it read was deleted meanwhile.
RELISTS = 10
_GONE = object()  # _try_restore's outcome for a step that vanished while being read.


def _summary(error: BaseException, most: int = 300) -> str:
    """``Type: message`` of the exception ``error`` was raised from (the innermost
    ``__cause__``: TensorStore's reason rather than Orbax's wrapper), on one line."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    text = text if len(text) <= most else text[: most - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def structure_signature(tree: Any) -> str:
    """A short hash of the paths, shapes and dtypes of ``tree``'s leaves."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    text = ";".join(f"{jax.tree_util.keystr(p)}:{tuple(x.shape)}:{x.dtype}" for p, x in leaves)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _unfinished_message(kind: str, step: str, directory: str, target: str,
                        dropped: int = 0) -> str:
    """The warning for an unfinished save of ``kind`` moved from ``directory`` to
    ``target``: what it was, where it went (and how many older unfinished saves it
    replaced), and what the run uses instead."""
    committed = sorted(ocp.utils.checkpoint_steps(directory))
    if kind == "best":
        instead = "it is not used"
    elif committed:
        instead = f"the newest committed checkpoint (step {committed[-1]}) is used instead"
    else:
        instead = "no checkpoint was committed before it, so training starts from step 0"
    replaced = (f", replacing {dropped} older unfinished save{'s' * (dropped > 1)} (deleted: "
                "only the newest is kept)") if dropped else ""
    return (f"An unfinished save of step {step} in {directory} (interrupted before it was "
            f"committed) was moved to {target}{replaced}; {instead}.")


def _lost_peer(error: BaseException) -> bool:
    """Whether ``error`` (or the error it was raised from) is a collective that failed
    because another process of the job left it (:func:`distributed.lost_peer`): Orbax's
    restore waits for every process (``sync_global_processes``), and a process that fails
    instead of restoring breaks it on the others, whose checkpoint is intact."""
    return any(e is not None and distributed.lost_peer(e) is not None
               for e in (error, error.__cause__))


# How long a failed save's writes still in flight are waited for, at most, before its
# temporary directory is removed.
SETTLE_S = 60.0


def _settle(manager: ocp.CheckpointManager) -> None:
    """Waits (up to :data:`SETTLE_S`) for the writes of ``manager``'s last save that are
    still in flight: Orbax raises a save's first failure without waiting for its other
    writes, which go on in its temporary directory (and create it again if it is removed
    meanwhile). Their own failures are not raised: the first one is. Orbax keeps them in a
    private attribute: where a later version has none, nothing is waited for."""
    checkpointer = getattr(manager, "_checkpointer", None)
    futures = getattr(getattr(checkpointer, "_async_manager", None), "_commit_futures", None)
    deadline = time.monotonic() + SETTLE_S
    for write in futures or ():
        try:
            write.result(timeout=max(0.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001  Its failure (or a timeout): already reported.
            pass


def _barrier_unless_failed(barrier: Any) -> Any:
    """Orbax's barrier ``barrier`` (``(*, key, timeout_ms)``), which a thread whose save
    failed does not enter: it raises that failure instead. Orbax's save thread syncs with
    the other processes in a ``finally`` also after its own writes failed (a full disk on
    one host), while the others wait for it at the barrier after their writes: each
    waited for the other (20 minutes, Orbax's timeout), the job silent. Now the failed
    process's error surfaces at once; it reports it, and the others stop naming it
    (``distributed.leave_job``). The thread that makes the managers (the caller's, which
    saves: not always the main thread, e.g. a trainer run in a worker thread) syncs
    whatever error it may be handling."""
    caller = threading.current_thread()

    def sync(*, key: str, timeout_ms: int) -> None:
        failure = sys.exc_info()[1]  # In a ``finally``: the exception on its way out.
        # Orbax's save threads only: the caller may save while handling an error.
        if isinstance(failure, Exception) and threading.current_thread() is not caller:
            raise failure
        barrier(key=key, timeout_ms=timeout_ms)

    return sync


def _failed_alike(kind: str, step: int, outcome: Any, directory: str) -> bool:
    """Whether reading ``step`` failed (``outcome`` an exception), on every process alike;
    raises ``errors.DistributedError`` on every process of a job where some read it and
    others failed to (each host's copy of the files, or its cache of a shared one, differs):
    those set it aside and fell back to an older step, the others trained from it, and the
    job split in its next collective (a traceback: 'name mismatch'). Nothing is moved.
    Called by every process after each read. A barrier named by the outcome: one that meets
    the others still in a collective of their read (Orbax's) fails that too; their read
    fails, and their barrier after it raises this error there."""
    failure = outcome if isinstance(outcome, Exception) else None
    if jax.process_count() == 1:
        return failure is not None
    here = "unreadable" if failure is not None else "read"
    try:
        # Not named by the step: processes listing different steps (a lagging cache) that
        # all read theirs are told so by the caller (loop._check_same_start).
        multihost_utils.sync_global_devices(f"checkpoint_{here}_{kind}")
    except AssertionError as e:  # 'name mismatch': another process's outcome differs.
        where = (f"unreadable on process {jax.process_index()} ({_summary(failure)}) but read "
                 "by another" if failure is not None else
                 f"read by process {jax.process_index()} but unreadable on another")
        raise errors.DistributedError(
            f"The {kind} checkpoint at step {step} in {directory} is {where}: the hosts see "
            "different files (a shared filesystem whose caches lag, or copies that differ); "
            "nothing was moved. Start the job again once every host sees the same files, or "
            f"move {os.path.join(directory, str(step))} aside to resume from the step before "
            "it.") from e
    return failure is not None


class Checkpoints:
    """The 'latest' and 'best' checkpoint managers of one workdir.

    Args:
      workdir: run directory.
      keep: number of recent checkpoints kept for resuming.
      async_save: save in a background thread (training continues while writing).
      read_only: open for evaluation only (no clean-up, no saving).
    """

    def __init__(
        self, workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False
    ):
        self.workdir = os.path.abspath(workdir)
        self._read_only = read_only
        self._failed_kinds: set[str] = set()  # the kinds whose save failed (_writing)
        for name in ("checkpoints", "checkpoints_best"):
            if not read_only:
                _check_link(os.path.join(self.workdir, name))
            _check_listable(os.path.join(self.workdir, name))
            if not read_only:
                _check_writable(os.path.join(self.workdir, name))
                _check_steps_writable(os.path.join(self.workdir, name))
        if not read_only:
            self._set_aside_unfinished()
        self._managers = {
            "latest": self._manager("checkpoints", keep, async_save),
            "best": self._manager("checkpoints_best", 2, async_save),
        }

    def _set_aside_unfinished(self) -> None:
        """Moves the newest save an earlier run left unfinished to
        ``checkpoints_unfinished/``, per kind, with one warning (where it went; which
        checkpoint is used), before Orbax's start-up would delete it. Only the newest is
        kept: a run preempted during many saves would otherwise pile up a state's worth of
        disk each time; older ones (and the one kept from an earlier interruption) are
        deleted, which the warning says. Process 0 moves them, as Orbax deletes them from
        process 0 alone: the others list only committed steps, so they need not wait."""
        if jax.process_index() != 0:
            return
        parent = os.path.join(self.workdir, UNFINISHED_DIR)
        for name, kind in (("checkpoints", "latest"), ("checkpoints_best", "best")):
            directory = os.path.join(self.workdir, name)
            entries = sorted(_unfinished_saves(directory), key=_step_order)
            if not entries:
                continue
            kept = [os.path.join(parent, n) for n in _listdir(parent) if n.startswith(kind + "-")]
            *older, newest = entries
            step = _unfinished_step(newest)
            target = _move_aside(os.path.join(directory, newest), parent,
                                 f"{kind}-{step}-{int(time.time())}")
            dropped = kept + [os.path.join(directory, n) for n in older]
            for path in dropped:
                shutil.rmtree(path, ignore_errors=True)
            warnings.warn(_unfinished_message(kind, step, directory, target, len(dropped)),
                          logs.RunWarning, stacklevel=3)  # the Checkpoints(...) call

    def _manager(self, name: str, keep: int, async_save: bool) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            # Read-only managers neither keep nor save; Orbax warns about any other value.
            max_to_keep=None if self._read_only else keep,
            save_interval_steps=0 if self._read_only else 1,
            enable_async_checkpointing=async_save,
            # The step's directory is created in save(), not by a background thread: where
            # that failed (write permission lost mid-run, a filesystem gone read-only), the
            # save's other threads waited 5 minutes for it, printing tracebacks, before the
            # process could exit; now save() raises at once.
            async_options=ocp.options.AsyncOptions(
                create_directories_asynchronously=False,
                barrier_sync_fn=_barrier_unless_failed(ocp.multihost.get_barrier_sync_fn())),
            create=not self._read_only,
            cleanup_tmp_directories=not self._read_only,
            read_only=self._read_only,
            # A reader lists steps itself (``steps``); reading each step's metadata at start-up
            # fails if a training run deletes a step meanwhile.
            lightweight_initialize=self._read_only,
            # Each manager's multi-host barriers get their own keys: with the default keys a
            # 'best' and a 'latest' save of the same step both wait on
            # '_async_write_complete.<step>' and deadlock.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=name
            ),
        )
        # Orbax warns about every manager opened read-only, as every evaluation does.
        quiet = ("Given directory is read only",) if self._read_only else ()
        with logs.drop_absl_messages(*quiet):
            manager = ocp.CheckpointManager(os.path.join(self.workdir, name), options=options)
        # Orbax removes earlier temporary directories in a background thread that only its
        # next save waits for: one left running by a manager closed before saving deleted the
        # temporary directory of whatever wrote there next. Waited for here (a listing: the
        # unfinished saves were moved aside before the managers were made).
        wait = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
        if wait is not None:
            wait()
        return manager

    def steps(self, kind: str = "latest") -> list[int]:
        """Committed steps of ``kind`` ('latest' or 'best'), oldest first, as on disk now.

        Listed afresh on every call (a training run may be saving and deleting steps while
        an evaluation reads them); a save still being written is not listed.
        """
        return sorted(ocp.utils.checkpoint_steps(self._managers[kind].directory))

    def save(
        self, kind: str, step: int, train_state: state_lib.TrainState, meta: dict[str, Any]
    ) -> bool:
        """Starts saving ``train_state`` and JSON ``meta`` as ``step`` of ``kind``.

        A step that already exists is left untouched: a resumed run reaching it again
        recomputes identical values (where it does not, the training loop first sets an
        earlier 'best' aside: ``set_aside``). Returns whether a save was started. The JSON gets the
        state's checksum, verified on restore.
        """
        manager = self._managers[kind]
        if step in manager.all_steps():
            return False
        meta = dict(
            meta,
            step=int(step),
            checksum=state_lib.checksum(train_state),
            structure=structure_signature(train_state),
            saved_at=time.time(),
        )
        if jax.process_count() > 1:
            # Serialise saves across managers too: one multi-host write in flight at a time.
            for other, m in self._managers.items():
                if other != kind:
                    with self._writing(other):
                        m.wait_until_finished()
        with self._writing(kind):  # Also raises an earlier background save's failure.
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(train_state), meta=ocp.args.JsonSave(meta)
                ),
            )
        return True

    @contextlib.contextmanager
    def _writing(self, kind: str) -> Iterator[None]:
        """Raises a disk or permission failure of a save of ``kind`` as one
        ``errors.WorkdirError`` (Orbax raises its background saves' TensorStore errors as
        ``ValueError``); any other error passes unchanged."""
        try:
            yield
        except Exception as e:  # noqa: BLE001  Filtered below: others are re-raised.
            os_error = workdir_lib.anticipated_os_error(e)
            if os_error is None:
                raise
            self._failed_kinds.add(kind)
            where = str(self._managers[kind].directory)
            message, command_line = errors.run_again(
                workdir_lib.describe_os_error(os_error, where) + " The checkpoints saved "
                f"before are kept{self._discard_failed(kind)}",
                "the function with the same arguments", "again to resume from the newest")
            raise errors.WorkdirError(message, command_line=command_line) from e

    def _discard_failed(self, kind: str) -> str:
        """Removes what the failed saves of ``kind`` left (Orbax's temporary directories,
        part of a state that nothing can use, on a disk that ran out of space: the next run
        moved them to ``checkpoints_unfinished/``, where they kept the space, saying they
        were interrupted) and returns the words the error adds about them. Every one there
        is this run's: its start moved the earlier ones aside, and the workdir's lock keeps
        other runs out; its writes still in flight end first (``_settle``). A committed
        step's name is never one of them. With several processes, another may still write
        there: left for the next run to set aside."""
        directory = str(self._managers[kind].directory)
        if jax.process_count() > 1:
            return ""
        _settle(self._managers[kind])
        removed, left = [], []
        try:
            for name in _unfinished_saves(directory):
                path = os.path.join(directory, name)
                shutil.rmtree(path, ignore_errors=True)
                (left if os.path.lexists(path) else removed).append(_unfinished_step(name))
        except OSError:
            pass  # Not even listed: the error it comes with says why.

        def saves(steps: list[str], what: str) -> str:
            many = len(steps) > 1
            return (f"the failed save{'s' * many} of step{'s' * many} {', '.join(steps)} "
                    f"{'were' if many else 'was'} {what}")

        words = [saves(removed, "removed")] if removed else []
        if left:  # A read-only filesystem: the next start moves them aside, with a warning.
            words.append(saves(left, f"left in {directory}"))
        return "; " + " and ".join(words) if words else ""

    def restore(
        self, kind: str, abstract_state: Any, step: int | None = None
    ) -> tuple[state_lib.TrainState, dict[str, Any]]:
        """Restores the newest good checkpoint of ``kind`` (or exactly ``step``).

        While a training run saves into the same workdir, steps come and go: a step deleted
        by the writer's rotation while being read is not damage; the steps are listed again
        and the newest one that still exists is read (up to :data:`RELISTS` times).

        Args:
          kind: 'latest' or 'best'.
          abstract_state: pytree of ``jax.ShapeDtypeStruct`` with shardings, the target layout.
          step: a specific step, or None for the newest readable one.

        Returns:
          ``(train_state, meta)``.

        Raises:
          NoCheckpointError: nothing readable (a specific ``step`` that is corrupt included).
          CheckpointAccessError: a checkpoint could not be read for a reason outside it (no
            permission, ...); nothing was moved and no older checkpoint restored.
        """
        manager = self._managers[kind]
        if step is not None:
            if step not in self.steps(kind):
                raise NoCheckpointError(
                    f"No {kind} checkpoint at step {step} in {manager.directory}; "
                    f"available: {self.steps(kind)}"
                )
            restored = self._try_restore(
                kind, step, abstract_state, self.steps(kind), fallback=False
            )
            if isinstance(restored, tuple):
                return restored
            raise NoCheckpointError(
                f"The {kind} checkpoint at step {step} in {manager.directory} "
                + ("was deleted while being read (training rotated it away)."
                   if restored is _GONE else "is unreadable.")
            )
        damaged: set[int] = set()
        for _ in range(RELISTS + 1):
            listing = self.steps(kind)
            outcome = None
            for s in reversed(listing):
                if s in damaged:
                    continue
                older = any(t < s and t not in damaged for t in listing)
                outcome = self._try_restore(kind, s, abstract_state, listing, fallback=older)
                if isinstance(outcome, tuple):
                    return outcome
                if outcome is _GONE:
                    break  # List again: the writer has saved newer steps.
                damaged.add(s)
            if outcome is not _GONE:
                break
        else:
            raise NoCheckpointError(
                f"No {kind} checkpoint in {manager.directory} could be read before training "
                f"deleted it ({RELISTS + 1} tries): it saves faster than they can be read. "
                "Retry, or raise --config.keep_checkpoints."
            )
        raise NoCheckpointError(f"No readable {kind} checkpoint in {manager.directory}.")

    def _try_restore(
        self, kind: str, step: int, abstract_state: Any, listing: list[int], fallback: bool
    ) -> tuple[state_lib.TrainState, dict[str, Any]] | object | None:
        """Restores one step of ``listing`` (the steps listed before reading it); ``fallback``:
        whether the caller goes on to older steps if it is damaged (the warning says so).

        Returns ``(state, meta)``; ``_GONE`` if reading failed because the steps changed on
        disk meanwhile (a writer's rotation: not damage, nothing is reported); or None after
        a warning if its files are damaged. Only failures of reading the files and checksum
        mismatches count as damage; a state of another shape raises
        ``IncompatibleCheckpointError`` and a read failing for a reason outside the files
        ``CheckpointAccessError``, and both move nothing.
        """
        manager = self._managers[kind]
        # Each read is agreed on by every process (_failed_alike) before the next one,
        # whose collectives (Orbax's restore) a process that skips it would leave unmatched.
        directory = str(manager.directory)
        try:
            meta = self.read_meta(kind, step)
        except Exception as e:  # Orbax raises many types for damaged files.
            if _lost_peer(e):  # Not damage, and the others are gone: no agreement.
                raise
            meta = e
        if _failed_alike(kind, step, meta, directory):
            return self._failed(kind, step, meta, listing, fallback)
        restored = self._read(kind, step, abstract_state, meta)
        if _failed_alike(kind, step, restored, directory):
            return self._failed(kind, step, restored, listing, fallback)
        return restored

    def _read(self, kind: str, step: int, abstract_state: Any, meta: dict[str, Any]
              ) -> tuple[state_lib.TrainState, dict[str, Any]] | Exception:
        """``(state, meta)`` of one step whose metadata ``meta`` was read, or the failure of
        reading its arrays (damage, or a read failing for a reason outside the files):
        :meth:`_failed` says which."""
        manager = self._managers[kind]
        if meta.get("structure") != structure_signature(abstract_state):
            raise IncompatibleCheckpointError(
                f"The {kind} checkpoint at step {step} in {manager.directory} holds a state of "
                "another structure (different model or optimiser config?). Use the config it was "
                "trained with (run.json in the workdir) or a fresh --workdir."
            )
        try:
            # The reads failed beside the one raised print nothing: it is reported here.
            with logs.lost_task_errors_dropped(os.path.join(str(manager.directory), str(step),
                                                            "")):
                restored = manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        meta=ocp.args.JsonRestore()),
                )
        except Exception as e:  # TensorStore raises plain Exception for damaged chunks.
            if _lost_peer(e):
                raise
            return e
        actual = state_lib.checksum(restored.state)
        if int(meta.get("checksum", -1)) != actual:
            return ValueError(
                f"checksum mismatch: saved {meta.get('checksum')}, restored bits give {actual}")
        return restored.state, meta

    def _failed(
        self, kind: str, step: int, error: Exception, listing: list[int], fallback: bool
    ) -> Any:
        """``_GONE`` if the steps on disk changed since ``listing`` (the step was rotated
        away, or is being deleted); else raises ``CheckpointAccessError`` if reading failed
        for a reason outside the checkpoint, or skips the damaged step (``_skip``).

        The listing is checked first: a file deleted while being read fails in many ways,
        some of which look environmental (``ESTALE`` on NFS). Before it, a collective of the
        restore broken by another process leaving the job is raised as it is: not damage."""
        if _lost_peer(error):
            raise error
        try:
            if self.steps(kind) != listing:
                return _GONE
        except OSError:
            pass  # Not even the directory can be listed now: the error below says why.
        access = _access_error(os.path.join(str(self._managers[kind].directory), str(step)),
                               error)
        if access is not None:
            raise access from error
        return self._skip(kind, step, error, fallback)

    def _skip(self, kind: str, step: int, error: Exception, fallback: bool) -> None:
        """Warns about a bad checkpoint in one line and (unless read-only) moves it aside."""
        manager = self._managers[kind]
        where = os.path.join(str(manager.directory), str(step))
        message = (
            f"Skipping the {kind} checkpoint at step {step} ({where}): it is unreadable or "
            f"corrupt ({_summary(error)})"
        )
        if not self._read_only:
            # Process 0 says where; the others, that it went.
            [target] = self.set_aside(kind, [step], CORRUPT_DIR) or [
                os.path.join(self.workdir, CORRUPT_DIR)]
            message += f"; moved to {target}"
        warning = CheckpointCorruptWarning(
            message + ("; falling back to the previous checkpoint." if fallback else ".")
        )
        warning.__cause__ = error  # Its traceback shows under --debug (cli.one_line_warnings).
        warnings.warn(warning, stacklevel=5)
        return None

    def set_aside(self, kind: str, steps: list[int], directory: str) -> list[str]:
        """Moves the committed ``steps`` of ``kind`` to ``<workdir>/<directory>/`` as
        ``<kind>-<step>-<t>`` (a name no other move takes), once the saves in flight have
        committed. Process 0 moves them, the other processes wait for it (every process
        calls this), and every manager then lists the steps left. Returns the targets on
        process 0, [] on the others."""
        manager = self._managers[kind]
        with self._writing(kind):
            manager.wait_until_finished()
        name = f"{directory}_{kind}_{'_'.join(map(str, steps))}"
        # Moved once every process is here: a damaged step that another process was still
        # failing to read, moved away meanwhile, read there as rotated away (not damage),
        # and that process went on without this call's barrier, out of step with the job.
        multihost_utils.sync_global_devices(f"checkpoint_before_set_aside_{name}")
        targets = []
        if jax.process_index() == 0:
            for step in steps:
                source = os.path.join(str(manager.directory), str(step))
                if os.path.exists(source):
                    targets.append(_move_aside(source, os.path.join(self.workdir, directory),
                                               f"{kind}-{step}-{int(time.time())}"))
        multihost_utils.sync_global_devices(f"checkpoint_set_aside_{name}")
        manager.reload()
        return targets

    def read_meta(self, kind: str, step: int) -> dict[str, Any]:
        """The JSON metadata of one checkpoint, without restoring arrays."""
        restored = self._managers[kind].restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )
        return restored.meta

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is committed."""
        for kind, manager in self._managers.items():
            with self._writing(kind):
                manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the managers; every manager is closed even
        if a save failed, and the first failure is raised. A disk failure of a kind whose
        save failed so already is not raised again: the same save's other writes met the
        same full disk, and Orbax keeps their error until the close (with several
        processes, a second line after the first said it all)."""
        failure = None
        for kind, manager in self._managers.items():
            failed = kind in self._failed_kinds
            try:
                with self._writing(kind):
                    manager.close()
            except errors.WorkdirError as e:
                failure = failure or (None if failed else e)
            except Exception as e:  # noqa: BLE001  Raised below, once all are closed.
                failure = failure or e
        if failure is not None:
            raise failure
