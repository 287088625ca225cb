"""Per-epoch metric records: JSON lines (``metrics.jsonl``) and TensorBoard events.

Only process 0 writes. On resume, records after the restored epoch are dropped from
``metrics.jsonl`` so the file always describes one consistent run.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax

__all__ = ["MetricWriter", "read_metrics"]

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of ``<workdir>/metrics.jsonl`` in order ([] if absent)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
      resume_epoch: keep only records with ``epoch <= resume_epoch`` (None: start afresh if
        the file exists from an older run without checkpoints, i.e. keep nothing).
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True, resume_epoch: int = 0):
        self._active = jax.process_index() == 0
        self._path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if not self._active:
            return
        os.makedirs(workdir, exist_ok=True)
        kept = [r for r in read_metrics(workdir) if r.get("epoch", 0) <= resume_epoch]
        with open(self._path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        if tensorboard:
            from tensorboardX import SummaryWriter  # Imported here: only process 0 needs it.

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        """Writes one record; numeric fields also go to TensorBoard at ``record['step']``."""
        if not self._active:
            return
        record = {k: _jsonable(v) for k, v in record.items()}
        with open(self._path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self._tb.add_scalar(key, value, global_step=record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
