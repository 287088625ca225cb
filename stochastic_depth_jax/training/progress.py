"""Training progress on the terminal (process 0 only): a per-epoch tqdm bar showing loss,
error, images/s and ETA, or, with the bar off, one line per finished epoch."""

from __future__ import annotations

import time
from typing import Any

import jax
from tqdm.auto import tqdm

__all__ = ["EpochProgress", "epoch_line"]


def epoch_line(record: dict[str, Any], num_epochs: int) -> str:
    """One line summing up a finished epoch's metrics record (``metrics.jsonl``'s fields).

    E.g. ``epoch 3/49: train loss 2.3123, error 93.75%; val error 90.62%; test error
    87.50%; 0.3 s (410 img/s)``; the validation and test parts appear in epochs that
    evaluated them.
    """
    parts = [
        f"epoch {record['epoch']}/{num_epochs}: train loss {record['train_loss']:.4f}, "
        f"error {100 * record['train_error']:.2f}%"
    ]
    for key, name in (("val_error", "val"), ("test_error", "test")):
        if key in record:
            parts.append(f"{name} error {100 * record[key]:.2f}%")
    parts.append(f"{record['epoch_time_s']:.1f} s ({record['images_per_s']:.0f} img/s)")
    return "; ".join(parts)



class EpochProgress:
    """Progress over the steps of one epoch.

    Args:
      epoch: 1-based epoch number shown in the description.
      num_epochs: total epochs.
      total: steps in this epoch; start: steps already done (resumed mid-epoch).
      batch_size: global batch size, for images/s.
      enabled: False (or not process 0) makes every method a no-op.
    """

    def __init__(
        self,
        epoch: int,
        num_epochs: int,
        total: int,
        start: int,
        batch_size: int,
        enabled: bool = True,
    ):
        self._bar = None
        self._batch_size = batch_size
        if enabled and jax.process_index() == 0:
            self._bar = tqdm(
                total=total,
                initial=start,
                desc=f"epoch {epoch}/{num_epochs}",
                unit="step",
                dynamic_ncols=True,
                leave=True,
            )
        self._last_time = None
        self._last_n = start

    def update(self, n: int, loss: float | None = None, error: float | None = None) -> None:
        """Advances to ``n`` steps done; loss/error are epoch means so far."""
        if self._bar is None:
            return
        now = time.perf_counter()
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
            postfix["err"] = f"{100 * error:.2f}%"
        if self._last_time is not None and n > self._last_n:
            postfix["img/s"] = (
                f"{(n - self._last_n) * self._batch_size / (now - self._last_time):.0f}"
            )
        # The first interval includes compilation; images/s starts after it.
        self._last_time, self._last_n = now, n
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(n - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
