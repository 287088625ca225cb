"""PNG plots of the error and loss curves from ``metrics.jsonl`` (matplotlib, Agg).

Figures are made outside pyplot (:func:`new_figure`), so drawing them from a notebook or
any session leaves its matplotlib backend and open figures as they were."""

from __future__ import annotations

import os
from typing import Any, Sequence

__all__ = ["new_figure", "plot_curves"]


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib ``Figure`` that pyplot does not manage: ``savefig`` renders it with Agg,
    and nothing global changes (``matplotlib.use`` would switch a notebook's inline backend
    for the rest of the session). Nothing to close: it is freed like any object."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _plot(
    records: Sequence[dict[str, Any]], keys: Sequence[str], ylabel: str, path: str, percent: bool
) -> None:
    fig = new_figure((7, 4.5))
    ax = fig.subplots()
    for key in keys:
        points = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            x, y = zip(*points)
            ax.plot(x, [100 * v for v in y] if percent else y, label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_curves(records: Sequence[dict[str, Any]], out_dir: str) -> list[str]:
    """Writes ``error.png`` and ``loss.png`` (train/val/test per epoch) to ``out_dir``.

    Returns:
      The paths written.
    """
    paths = [os.path.join(out_dir, "error.png"), os.path.join(out_dir, "loss.png")]
    _plot(records, ("train_error", "val_error", "test_error"), "error (%)", paths[0], True)
    _plot(records, ("train_loss", "val_loss", "test_loss"), "cross-entropy loss", paths[1], False)
    return paths
