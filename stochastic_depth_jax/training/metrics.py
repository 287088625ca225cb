"""Metric records: JSON lines (``metrics.jsonl``, one per epoch; ``validation.jsonl``, one
per validation evaluation with ``eval_every_steps``) and TensorBoard events.

Only process 0 writes. Each record is appended whole (or fails) and flushed to disk, so
a crash leaves at most a torn last line. On (re)start the file is rewritten atomically to
the records that match the restored checkpoint: complete lines only, epochs (steps) up to
the restored one, one record per epoch (step) (a sequence that restarts at an earlier one
replaces the records it repeats). Anything dropped is reported in a warning and appended to
``metrics.jsonl.dropped`` (``validation.jsonl.dropped``), not lost. TensorBoard
events of steps after the restored checkpoint are purged, so a resumed run has no
duplicate points.
"""

from __future__ import annotations

import errno
import json
import math
import os
import warnings
from typing import Any, Sequence

import jax

from stochastic_depth_jax import logs
from stochastic_depth_jax.training import workdir as workdir_lib

__all__ = ["MetricWriter", "read_metrics", "consistent_records", "epoch_text", "METRICS_FILE",
           "VALIDATION_FILE"]

METRICS_FILE = "metrics.jsonl"
# eval_every_steps: every validation evaluation (mid-epoch and at an epoch's end), by step.
VALIDATION_FILE = "validation.jsonl"


def _parse_lines(path: str) -> tuple[list[dict[str, Any]], list[int]]:
    """The complete JSON records of ``path`` and the 1-based numbers of unreadable lines."""
    records, bad = [], []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:  # A torn line (crash while appending) or foreign bytes.
                bad.append(number)
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad.append(number)
    return records, bad


def read_metrics(workdir: str, filename: str = METRICS_FILE) -> list[dict[str, Any]]:
    """All complete records of ``<workdir>/metrics.jsonl`` (or of ``filename``, e.g.
    ``VALIDATION_FILE``) in order ([] if absent).

    Unreadable lines (e.g. a torn last line) are skipped with a warning naming the file.
    """
    path = os.path.join(workdir, filename)
    if not os.path.exists(path):
        return []
    records, bad = _parse_lines(path)
    if bad:
        warnings.warn(f"Skipping unreadable line(s) {bad} of {path} (torn by a crash?).",
                      logs.RunWarning)
    return records


def consistent_records(
    records: list[dict[str, Any]], resume_epoch: float, key: str = "epoch"
) -> list[dict[str, Any]]:
    """One record per epoch, epochs increasing, none after ``resume_epoch``.

    A record whose epoch is not after the previous one starts a new attempt (a restart
    that re-ran epochs); it replaces the records from its epoch on. A line without an epoch
    (a note added by hand or by another tool) is no epoch's record: it stays where it is.
    ``key='step'``: the same by step, none after the step ``resume_epoch`` (validation.jsonl).
    """
    kept: list[dict[str, Any]] = []
    for record in records:
        epoch = record.get(key)
        if not _is_epoch(epoch):
            kept.append(record)
            continue
        if epoch > resume_epoch:
            continue
        lines = []  # without an epoch, set aside while the records they follow are replaced
        while kept and not (_is_epoch(kept[-1].get(key)) and kept[-1][key] < epoch):
            if not _is_epoch(kept[-1].get(key)):
                lines.append(kept[-1])
            kept.pop()
        kept += reversed(lines)
        kept.append(record)
    return kept


def _is_epoch(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def epoch_text(epoch: Any) -> str:
    """A checkpoint's (a record's) epoch as a person reads it: ``'2'`` at an epoch's end,
    ``'1.33'`` within one (a float has 16 digits); ``''`` for None."""
    return "" if epoch is None else f"{round(float(epoch), 2):g}"


def _shown(epoch: Any) -> str:
    """An epoch as a warning names it: :func:`epoch_text` for a fraction of one (a step cut
    short by ``max_steps``), anything else (a hand-written line's) as it is."""
    return epoch_text(epoch) if isinstance(epoch, float) else str(epoch)


def _epoch_ranges(epochs: list[Any], max_parts: int = 8) -> str:
    """A short text for a list of epochs: ``[1, 2, 3, 5, 7, 8]`` -> ``'1-3, 5, 7-8'``.

    Runs of consecutive epochs become ``a-b`` (order kept, so a repeated sequence shows
    twice); past ``max_parts`` parts the rest is counted, not listed.
    """
    parts: list[list[Any]] = []
    for epoch in epochs:
        last = parts[-1] if parts else None
        if last and isinstance(epoch, int) and isinstance(last[1], int) and epoch == last[1] + 1:
            last[1] = epoch
        else:
            parts.append([epoch, epoch])
    text = [_shown(a) if a == b else f"{_shown(a)}-{_shown(b)}" for a, b in parts]
    if len(text) > max_parts:
        shown = sum(b - a + 1 if isinstance(a, int) else 1 for a, b in parts[:max_parts])
        text = text[:max_parts] + [f"... ({len(epochs) - shown} more)"]
    return ", ".join(text)


def _reset_file(path: str, resume_epoch: float, key: str = "epoch") -> None:
    """Rewrites ``path`` atomically to the records consistent with ``resume_epoch`` (the
    restored checkpoint's epoch, or its step for ``key='step'``)."""
    if os.path.exists(path):
        records, bad = _parse_lines(path)
    else:
        records, bad = [], []
    kept = consistent_records(records, resume_epoch, key)
    if bad or len(kept) != len(records):
        kept_ids = {id(r) for r in kept}
        aside = _set_aside(path, [r for r in records if id(r) not in kept_ids], bad)
        dropped = [r.get(key) for r in records if id(r) not in kept_ids]
        epochs = [r[key] for r in kept if _is_epoch(r.get(key))]
        kept_text = (f"kept the records of {key}s {_epoch_ranges(epochs)}" if epochs
                     else "kept no records")
        dropped_text = (f" ({key if len(dropped) == 1 else key + 's'} "
                        f"{_epoch_ranges(dropped)})" if dropped else "")
        # 0: nothing was restored (checkpoints deleted, or all unreadable), not a checkpoint.
        basis = (f" that match the restored checkpoint ({key} {resume_epoch})" if resume_epoch
                 else " (no checkpoint to resume from: training starts from step 0)")
        warnings.warn(
            f"{path}: {kept_text}{basis}; "
            f"dropped {len(dropped)} other record(s){dropped_text}"
            + (f" and unreadable line(s) {bad}" if bad else "")
            + f"; they are kept in {aside}.",
            logs.RunWarning,
        )
    with workdir_lib.atomic_write(path) as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)


def _set_aside(path: str, records: Sequence[dict[str, Any]], bad: Sequence[int]) -> str:
    """Appends the ``records`` a reset drops and the unreadable lines numbered ``bad`` (as
    they were) to ``<path>.dropped``, whose name it returns: a run whose checkpoints were
    deleted or lost starts again from step 0, and its history must not go with them.
    Lines the file holds already are not added again: a crash before ``path`` was rewritten
    sets the same records aside on the next start. After a line torn by a crash while
    appending, the new ones start on a line of their own (else the first would join it)."""
    aside = path + ".dropped"
    with open(path, "rb") as f:
        lines = f.readlines()
    added = [(json.dumps(r) + "\n").encode() for r in records] + [
        line if line.endswith(b"\n") else line + b"\n" for line in (lines[n - 1] for n in bad)]
    held: list[bytes] = []
    if os.path.exists(aside):
        with open(aside, "rb") as f:
            held = f.readlines()
    whole = {line if line.endswith(b"\n") else line + b"\n" for line in held}
    new = [line for line in added if line not in whole]
    if new and held and not held[-1].endswith(b"\n"):
        new.insert(0, b"\n")  # ends the torn line
    with workdir_lib.naming(aside), open(aside, "ab") as f:
        f.writelines(new)
        f.flush()
        os.fsync(f.fileno())
    return aside


def _jsonable(value: Any) -> Any:
    value = float(value) if hasattr(value, "dtype") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricWriter:
    """Appends epoch records to ``metrics.jsonl`` and (optionally) TensorBoard.

    Args:
      workdir: run directory.
      tensorboard: also write tensorboardX event files under ``<workdir>/tensorboard``.
      resume_epoch: keep only records with ``epoch <= resume_epoch`` (0: a fresh run); the
        restored checkpoint's epoch, a fraction where it ended an epoch cut short.
      resume_step: the restored checkpoint's step; TensorBoard points after it are purged.
      filename: ``VALIDATION_FILE`` writes the records of the validation evaluations
        instead, one per step: those with ``step <= resume_step`` are kept.
    """

    def __init__(
        self,
        workdir: str,
        *,
        tensorboard: bool = True,
        resume_epoch: float = 0,
        resume_step: int = 0,
        filename: str = METRICS_FILE,
    ):
        self._active = jax.process_index() == 0
        self._path = os.path.join(workdir, filename)
        self._tb = None
        self._tb_dir = os.path.join(workdir, "tensorboard")
        if not self._active:
            return
        os.makedirs(workdir, exist_ok=True)
        if filename == VALIDATION_FILE:
            _reset_file(self._path, resume_step, key="step")
        else:
            _reset_file(self._path, resume_epoch)
        if tensorboard:
            from tensorboardX import SummaryWriter  # Imported here: only process 0 needs it.

            self._tb = SummaryWriter(self._tb_dir, purge_step=resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Writes one record; numeric fields also go to TensorBoard at ``record['step']``."""
        if not self._active:
            return
        record = {k: _jsonable(v) for k, v in record.items()}
        line = memoryview((json.dumps(record) + "\n").encode())
        with workdir_lib.naming(self._path):  # 'Cannot write a file (No space ...)', it said
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:  # The whole line, then to disk: a crash tears at most this line.
                while line:  # A disk filling up writes part of it and fails only then:
                    written = os.write(fd, line)  # unchecked, the next line joined it.
                    if not written:  # no progress (not on a sane file system): not forever
                        raise OSError(errno.EIO, "write made no progress")
                    line = line[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
        self.add_scalars(record)

    def add_scalars(self, record: dict[str, Any], keys: Sequence[str] | None = None) -> None:
        """TensorBoard only: ``record``'s numbers (of ``keys``: all but the step and epoch)
        at ``record['step']``, e.g. a mid-epoch evaluation beside the epochs' curves."""
        if self._tb is None:
            return
        # A full disk fails the event file's flush with an OSError naming no file: 'Cannot
        # write a file (No space left on device)', it said.
        with workdir_lib.naming(self._tb_dir):
            for key, value in record.items():
                if (keys is None or key in keys) and key not in ("step", "epoch") and (
                        isinstance(value, (int, float)) and not isinstance(value, bool)):
                    self._tb.add_scalar(key, value, global_step=record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            with workdir_lib.naming(self._tb_dir):
                self._tb.close()
