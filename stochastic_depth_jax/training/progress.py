"""Training progress (process 0 only): one line per finished epoch, and while an epoch runs
a tqdm bar showing loss, error, images/s and ETA on a terminal or in a notebook. Where
every redraw would be kept (a file or pipe, a log, a scheduler's output) no bar is drawn;
an epoch longer than :data:`LINE_EVERY_S` prints a line with the same figures that often
instead, so a log shows a run is alive (ResNet-110's epoch takes ~15 min on a 2-core CPU).
``progress_bar=False`` turns both off. The
data's one-time decoding (``data.sources``) decides between its bar and lines here too."""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any

import jax
from tqdm.auto import tqdm

from stochastic_depth_jax.training import metrics as metrics_lib
from stochastic_depth_jax.training import plots

__all__ = ["LINE_EVERY_S", "EpochProgress", "draws_bar", "epoch_line", "interactive",
           "prints_epoch_lines", "prints_task_lines", "summary_lines"]


def interactive(stream: Any) -> bool:
    """Whether ``stream`` redraws a line in place: a terminal, or a Jupyter kernel's output
    (notebooks, JupyterLab, VS Code, Colab). A pipe or a file keeps every redraw of a bar."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # None, or closed
        return False
    return type(stream).__module__.startswith("ipykernel")


def draws_bar(enabled: bool) -> bool:
    """Whether the epoch bar is drawn: ``progress_bar`` on, process 0, and stderr (tqdm's
    stream) a terminal or a notebook."""
    return bool(enabled) and jax.process_index() == 0 and interactive(sys.stderr)


def prints_task_lines(progress_bar: bool) -> bool:
    """Whether a one-off task's progress (the data's first decoding) prints a start and a
    finish line on stdout (process 0): where no bar is drawn, and where stdout goes to a
    file or pipe (``train.py | tee log``), which keeps no bar."""
    return jax.process_index() == 0 and (
        not draws_bar(progress_bar) or not interactive(sys.stdout))


def prints_epoch_lines(progress_bar: bool) -> bool:
    """Whether each finished epoch prints :func:`epoch_line` on stdout: on process 0, always.
    A bar shows only the epoch in progress and is cleared when it ends (its training loss
    and error are in the line, which adds the validation and test errors evaluated after
    it), so a terminal keeps one line per epoch, as a log does. ``progress_bar`` is taken
    for the callers that decide on it and may again."""
    del progress_bar
    return jax.process_index() == 0


def epoch_line(record: dict[str, Any], num_epochs: int) -> str:
    """One line summing up a finished epoch's metrics record (``metrics.jsonl``'s fields).

    E.g. ``epoch 3/49: train loss 2.3123, error 93.75%; val error 90.62%; test error
    87.50%; 0.3 s (410 img/s)``; the validation and test parts appear in epochs that
    evaluated them. An epoch cut short (``max_steps``) shows its fraction to 2 decimals.
    In compact mode an epoch that compiled programs for new bucket tuples ends with their
    seconds (``; 4.2 s compiling new programs``), which its time and img/s leave out.
    """
    # An epoch cut short by max_steps is a fraction (2 of SVHN's 7 steps: 0.2857142857142857).
    parts = [
        f"epoch {round(record['epoch'], 2):g}/{num_epochs}: train loss {record['train_loss']:.4f}, "
        f"error {100 * record['train_error']:.2f}%"
    ]
    for key, name in (("val_error", "val"), ("test_error", "test")):
        if key in record:
            parts.append(f"{name} error {100 * record[key]:.2f}%")
    if "epoch_time_s" in record:  # none for steps trained untimed, in an earlier session
        parts.append(f"{record['epoch_time_s']:.1f} s ({record['images_per_s']:.0f} img/s)")
    if record.get("compile_time_s"):  # compact mode: new programs, out of the time above
        parts.append(f"{record['compile_time_s']:.1f} s compiling new programs")
    return "; ".join(parts)


_METRIC_NAMES = {"val_error": "validation error", "test_error": "test error",
                 "train_error": "training error"}


def summary_lines(summary: dict[str, Any], workdir: str, num_epochs: int) -> list[str]:
    """What a finished (or already finished) run prints last: where it ended, the model it
    selected with its test error (the paper's number: the test error at the epoch of lowest
    validation error), and where the full results are, e.g.::

        Finished epoch 2/2 (8 steps); last epoch: val error 96.88%, test error 92.19%.
        Best by validation error: epoch 1, test error 95.31% (val error 90.62%); in checkpoints_best/.
        Results in runs/c10: summary.json, metrics.jsonl, error.png, loss.png.

    A PNG drawn from other records than metrics.jsonl's (by an earlier session:
    ``write_plots=false``, or a drawing failed) is named apart, as drawn before the last
    records.
    """
    final, best = summary.get("final") or {}, summary.get("best") or {}
    lines = []
    if final.get("epoch") is not None:
        errors_ = [f"{name} error {100 * final[key]:.2f}%"
                   for key, name in (("val_error", "val"), ("test_error", "test")) if key in final]
        # A finished run rerun with fewer num_epochs ('Nothing to train') ended past them.
        of = f"/{num_epochs}" if final["epoch"] <= num_epochs else ""
        steps = summary.get("steps", final.get("step"))
        lines.append(f"Finished epoch {round(final['epoch'], 2):g}{of} "
                     f"({steps} step{'' if steps == 1 else 's'})"
                     + (f"; last epoch: {', '.join(errors_)}." if errors_ else "."))
    if best.get("metric") in _METRIC_NAMES:
        shown = [f"{name} {100 * best[key]:.2f}%" for key, name in
                 (("test_error", "test error"), ("val_error", "val error")) if key in best]
        first, rest = (shown[0], shown[1:]) if shown else ("", [])
        # Within an epoch (eval_every_steps) the rounded epoch does not name the checkpoint.
        step = (f" (step {best['step']})" if best.get("step") is not None
                and float(best["epoch"]) != int(best["epoch"]) else "")
        lines.append(f"Best by {_METRIC_NAMES[best['metric']]}: epoch {round(best['epoch'], 2):g}"
                     + step + (f", {first}" if first else "")
                     + (f" ({', '.join(rest)})" if rest else "") + "; in checkpoints_best/.")
    files = ["summary.json", "metrics.jsonl", "validation.jsonl", "error.png", "loss.png"]
    found = [f for f in files if f in files[:2] or os.path.exists(os.path.join(workdir, f))]
    older = [f for f in found if f.endswith(".png") and _drawn_before(workdir, f)]
    lines.append(f"Results in {workdir}: {', '.join(f for f in found if f not in older)}"
                 + (f"; drawn before metrics.jsonl's last records (write_plots was off, or "
                    f"a drawing failed): {', '.join(older)}" if older else "") + ".")
    return lines


def _drawn_before(workdir: str, name: str) -> bool:
    """Whether ``workdir``'s curve PNG ``name`` was drawn before metrics.jsonl's last records
    (by an earlier session: this one's epochs are missing from it). Told by the records it
    was drawn from (:func:`plots.drawn_from`): the files' mtimes are those of a copy where
    the workdir was copied (``rsync -r``, ``cp -r``, a download: metrics.jsonl after the
    PNGs, in name order); by the mtimes for a PNG that records none (an earlier version's)."""
    path = os.path.join(workdir, name)
    drawn = plots.drawn_from(path)
    if drawn is not None:
        with warnings.catch_warnings():  # a torn line: said where training read the file
            warnings.simplefilter("ignore")
            return drawn != plots.records_digest(metrics_lib.read_metrics(workdir))
    try:
        return (os.stat(path).st_mtime_ns
                < os.stat(os.path.join(workdir, metrics_lib.METRICS_FILE)).st_mtime_ns)
    except OSError:
        return False


# Where no bar is drawn, a line within an epoch at most this often (at a metrics point).
LINE_EVERY_S = 300.0


def duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``2.5 h``: a time left, to the precision an estimate has."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class EpochProgress:
    """Progress over the steps of one epoch: a bar where one can be drawn, else a line at
    most every :data:`LINE_EVERY_S` (``epoch 3/500: step 120/351, train loss 2.3123, error
    80.12% so far; 66 img/s, ~7 min left in the epoch``).

    Args:
      epoch: 1-based epoch number shown in the description.
      num_epochs: total epochs.
      total: steps in this epoch; start: steps already done (resumed mid-epoch).
      batch_size: global batch size, for images/s.
      enabled: ``progress_bar``; off or not process 0 makes every method a no-op.
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
        if draws_bar(enabled):
            self._bar = tqdm(
                total=total,
                initial=start,
                desc=f"epoch {epoch}/{num_epochs}",
                unit="step",
                dynamic_ncols=True,
                leave=False,  # the epoch's line (prints_epoch_lines) takes its place
            )
        self._last_time = None
        self._last_n = start
        # Lines instead of the bar: the epoch's description and length, when the last line
        # (or the epoch) started, and the first update's time and step, which start the
        # images/s after compilation.
        self._lines = self._bar is None and bool(enabled) and jax.process_index() == 0
        self._desc, self._total = f"epoch {epoch}/{num_epochs}", total
        self._line_time = time.perf_counter() if self._lines else 0.0
        self._first: tuple[float, int] | None = None

    def update(self, n: int, loss: float | None = None, error: float | None = None) -> None:
        """Advances to ``n`` steps done; loss/error are epoch means so far."""
        if self._lines:
            self._line(n, loss, error)
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

    def _line(self, n: int, loss: float | None, error: float | None) -> None:
        """Prints the line standing for the bar if :data:`LINE_EVERY_S` has passed since
        the last one (or the epoch's start) and the epoch goes on (its end has its line)."""
        now = time.perf_counter()
        if self._first is None:
            self._first = (now, n)
        if n >= self._total or now - self._line_time < LINE_EVERY_S:
            return
        self._line_time = now
        parts = [f"{self._desc}: step {n}/{self._total}"]
        if loss is not None:
            parts[0] += f", train loss {loss:.4f}, error {100 * error:.2f}% so far"
        (t1, n1) = self._first
        if n > n1 and now > t1:
            rate = (n - n1) / (now - t1)  # steps per second, after the first update
            parts.append(f"{rate * self._batch_size:.0f} img/s, "
                         f"~{duration((self._total - n) / rate)} left in the epoch")
        print("; ".join(parts), flush=True)

    def exclude(self, seconds: float) -> None:
        """Leaves ``seconds`` spent on something else (an evaluation mid-epoch) out of the
        next images/s."""
        if self._last_time is not None:
            self._last_time += seconds
        if self._first is not None:
            self._first = (self._first[0] + seconds, self._first[1])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
