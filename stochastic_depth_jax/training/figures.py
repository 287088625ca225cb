"""The paper's figures from runs' own records, each file stating the runs it came from.

* :func:`plot_depth_curve`: blocks kept vs error vs inference throughput (pruning);
* :func:`plot_error_vs_p_last`: test error vs p_L, one line per depth (paper Fig. 8);
* :func:`plot_first_conv_grad`: mean |gradient| at the first convolution per epoch,
  constant vs stochastic depth (paper Fig. 7);
* :func:`plot_error_curves`: test error and training loss per epoch, constant vs
  stochastic depth (paper Fig. 3);
* :func:`training_time_table`: epoch times, constant vs stochastic depth (markdown).

Every PNG carries its sources in its text metadata (``Source``, readable with
``PIL.Image.open(p).text``) and as a footnote, and beside it a sidecar ``<name>.json`` holds
the sources and the plotted numbers. Runs of different configs (``run['series']``, set by
:func:`stochastic_depth_jax.training.sweep.label_series`) are drawn as separate lines.
Figures are drawn with Agg outside pyplot (:func:`plots.new_figure`): the session's
matplotlib backend (a notebook's) is left alone.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from typing import Any, Iterable, Sequence

from stochastic_depth_jax.training import metrics as metrics_lib
from stochastic_depth_jax.training import workdir as workdir_lib
from stochastic_depth_jax.training.plots import (drawn_as_ours, epoch_axis, figure_title,
                                                 is_number, mark_non_finite, new_figure,
                                                 non_finite, per_epoch)

__all__ = [
    "save_figure",
    "sidecar_path",
    "read_sources",
    "plot_depth_curve",
    "plot_error_vs_p_last",
    "plot_first_conv_grad",
    "plot_error_curves",
    "training_time_table",
    "diverged_label",
]


_FOOTNOTE_WIDTH = 150  # characters of fontsize 6 that fit a 6.5-inch figure
_FOOTNOTE_SPACE = 0.06  # of the figure's height, kept free below the axes for the footnote


def _footnote(sources: Sequence[str]) -> str:
    """The sources as a footnote of about two lines: their common directory once, then the
    names in it; past two lines, how many more there are (all are in the PNG's metadata
    and the sidecar)."""
    parent = os.path.dirname(sources[0]) if sources else ""
    if parent and all(os.path.dirname(s) == parent for s in sources):
        head, names = f"sources (in {parent}): ", [os.path.basename(s) for s in sources]
    else:
        head, names = "sources: ", list(sources)
    shown = len(names)
    more = ""
    while shown > 1 and len(head + ", ".join(names[:shown]) + more) > 2 * _FOOTNOTE_WIDTH:
        shown -= 1
        more = f", and {len(names) - shown} more (listed in the sidecar .json)"
    return "\n".join(textwrap.wrap(head + ", ".join(names[:shown]) + more, _FOOTNOTE_WIDTH,
                                   break_on_hyphens=False))


def sidecar_path(path: str) -> str:
    """The sidecar JSON of the figure ``path``: ``<name>.json`` beside ``<name>.png``."""
    return os.path.splitext(path)[0] + ".json"


def save_figure(fig: Any, path: str, sources: Sequence[str], data: Any,
                title: str = "", extra: dict[str, Any] | None = None,
                sidecar: dict[str, Any] | None = None) -> tuple[str, str]:
    """Writes ``fig`` to ``path`` (PNG) with its sources, and the sidecar JSON, each once and
    atomically (``workdir_lib.atomic_write``: a failure mid-write leaves the earlier pair).

    Args:
      fig: a matplotlib figure (closed afterwards), the bottom ``_FOOTNOTE_SPACE`` of its
        height left free for the sources.
      path: the ``.png`` to write.
      sources: the runs (workdirs, checkpoints) the figure was drawn from.
      data: the plotted numbers (JSON-able), stored in the sidecar.
      title: a one-line description (PNG ``Title`` and sidecar ``title``).
      extra: more JSON-able fields for the sidecar (e.g. the runs left out and why).
      sidecar: the sidecar's whole content instead (``figure``, ``title``, ``sources``,
        ``extra`` and ``data``), for a caller whose record of the figure has its own form.

    Returns:
      ``(png_path, json_path)``.
    """
    sources = [str(s) for s in sources]
    fig.text(0.01, 0.005, _footnote(sources), fontsize=6, color="0.4", va="bottom")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if sidecar is None:
        sidecar = {"figure": os.path.basename(path), "title": title, "sources": sources,
                   **(extra or {}), "data": data}
    json_path = sidecar_path(path)
    # Both written in full before either is renamed into place (the PNG, then the JSON): a
    # failure while drawing or writing leaves the earlier pair, not a new figure beside the
    # old one's sidecar; only a failed rename in between could part them.
    with workdir_lib.atomic_write(json_path) as js, workdir_lib.atomic_write(path, "wb") as png:
        fig.savefig(png, format="png", dpi=100,
                    metadata={"Title": title, "Source": json.dumps(sources),
                              "Software": "stochastic_depth_jax"})
        json.dump(sidecar, js, indent=2)
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:  # A caller's pyplot figure is closed; ours are not pyplot's.
        pyplot.close(fig)
    return path, json_path


def read_sources(png_path: str) -> list[str]:
    """The sources recorded in a PNG written by :func:`save_figure`."""
    from PIL import Image

    with Image.open(png_path) as image:
        return json.loads(image.text["Source"])


@drawn_as_ours
def plot_depth_curve(points: Sequence[dict[str, Any]], path: str, sources: Sequence[str],
                     title: str = "", sidecar: dict[str, Any] | None = None,
                     chosen_on: str | None = None) -> tuple[str, str]:
    """Error vs blocks kept (left) and error vs measured images/s (right).

    ``points`` as returned by :func:`stochastic_depth_jax.pruning.depth_curve`;
    ``sidecar``: as in :func:`save_figure`; ``chosen_on``: the split the removal order was
    chosen on (``'validation'`` for the greedy order), so labelled: its curve is optimistic,
    the other split's is the fair one.
    """
    fig = new_figure((10, 4.2))
    left, right = fig.subplots(1, 2)
    splits = [k[:-6] for k in points[0] if k.endswith("_error")]
    for split in splits:
        label = split + (" (the order was chosen on it)" if split == chosen_on else "")
        kept = [p["blocks_kept"] for p in points]
        err = [100 * p[f"{split}_error"] for p in points]
        left.plot(kept, err, "o-", ms=3, label=label)
        fast = [(p["images_per_s"], 100 * p[f"{split}_error"]) for p in points
                if "images_per_s" in p]
        if fast:
            # Markers alone: images/s is measured, so its noise made a line joining the
            # points in removal order turn back on itself.
            right.plot(*zip(*fast), "o", ms=3, label=label)
    left.set_xlabel("residual blocks kept")
    left.invert_xaxis()
    left.xaxis.get_major_locator().set_params(integer=True)
    right.set_xlabel("inference images/s (pruned model, measured)")
    for ax in (left, right):
        ax.set_ylabel("error (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)  # as the other figures: the default hid points
    figure_title(fig, title or "Removing blocks at test time")
    fig.tight_layout(rect=(0, _FOOTNOTE_SPACE, 1, 1))
    return save_figure(fig, path, sources, list(points), title or "depth curve",
                       sidecar=sidecar)


def _series_label(series: str) -> str:
    """``", <series>"`` for a legend entry; empty where every run is of one config."""
    return f", {series}" if series else ""


def _title(ax: Any, title: str, subtitle: str, note: str = "") -> None:
    """The figure's subject, below it what it was trained on, and ``note`` (what is missing
    from it), each wrapped to the width."""
    ax.set_title("\n".join([title] + textwrap.wrap(subtitle, 75) + textwrap.wrap(note, 75)),
                 fontsize=9)


def _legend(fig: Any, ax: Any, right_axis: Any = None) -> None:
    """The legend inside the axes for a few entries (the labelled lines, NaN markers
    included); beside them (the figure widened) for more, where it would hide the lines:
    past ``right_axis``'s tick labels and label (a twin axis on the right, Fig. 3's), which
    it covered."""
    if len(ax.get_legend_handles_labels()[1]) <= _LEGEND_INSIDE:
        ax.legend(fontsize=8)
        return
    width, height = fig.get_size_inches()
    fig.set_size_inches(width + 3, height)
    transform = ax.transAxes
    if right_axis is not None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.transforms import offset_copy

        renderer = FigureCanvasAgg(fig).get_renderer()
        # Pixels from the axes' right edge to the end of its labels: fixed by their text,
        # whatever width the layout gives the axes.
        past = (right_axis.get_tightbbox(renderer).x1
                - right_axis.get_window_extent(renderer).x1)
        transform = offset_copy(ax.transAxes, fig=fig, x=past * 72 / fig.dpi, units="points")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), bbox_transform=transform,
              borderaxespad=0)


_LEGEND_INSIDE = 5  # lines whose legend fits inside the axes


@drawn_as_ours
def plot_error_vs_p_last(runs: Sequence[dict[str, Any]], path: str,
                         metric: str = "test_error", subtitle: str = "",
                         ylabel: str = "", extra: dict[str, Any] | None = None,
                         note: str = "") -> tuple[str, str]:
    """Fig. 8: ``metric`` (default the best-by-validation epoch's test error) vs p_L, one
    line per depth and series (``run['series']``, where runs of several configs are drawn).

    Args:
      runs: as from :func:`stochastic_depth_jax.training.sweep.collect`; every one is drawn
        (a run without ``metric`` is left out of the lines, not of the sources).
      subtitle: what the runs were trained on (data, epochs), under the title.
      ylabel: the axis label (default: ``metric`` in percent).
      extra: more fields for the sidecar (:func:`save_figure`).
      note: a last line of the title, e.g. the unfinished runs of a sweep in progress not
        drawn (a figure that looked whole, its sidecar alone naming them).
    """
    fig = new_figure((6.5, 4.8))
    ax = fig.subplots()
    data = {}
    depths = sorted({r["depth"] for r in runs})
    series = sorted({r.get("series", "") for r in runs})
    colors = {d: f"C{i % 10}" for i, d in enumerate(depths)}
    for label in series:
        for depth in depths:
            rows = sorted((r["p_last"], r[metric]) for r in runs if r["depth"] == depth
                          and r.get("series", "") == label and r.get(metric) is not None)
            if rows:
                key = f"{depth}" + (f" ({label})" if label else "")
                data[key] = rows
                style = series.index(label) % len(_LINESTYLES)  # a series' line and marker
                ax.plot([p for p, _ in rows], [100 * e for _, e in rows], _LINESTYLES[style],
                        marker=_MARKERS[style], color=colors[depth],
                        label=f"{depth} layers{_series_label(label)}")
    swept = sorted({r["p_last"] for r in runs})
    if len(swept) <= 12:  # the swept values, not matplotlib's 0.1 steps between them
        ax.set_xticks(swept, [f"{p:g}" for p in swept])
    ax.set_xlabel("$p_L$ (survival probability of the last block; 1 = constant depth)")
    ax.set_ylabel(ylabel or f"{metric.replace('_', ' ')} (%)")
    ax.grid(alpha=0.3)
    _title(ax, "Error vs $p_L$ per depth (cf. Huang et al. 2016, Fig. 8)", subtitle, note)
    if data:  # No finished run yet: an empty legend only warns.
        _legend(fig, ax)
    fig.tight_layout(rect=(0, _FOOTNOTE_SPACE, 1, 1))
    return save_figure(fig, path, [r["workdir"] for r in runs], data,
                       f"{metric} vs p_L per depth (Huang et al. 2016, Fig. 8)", extra)


_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D")


def diverged_label(r: dict[str, Any]) -> str:
    """``'diverged at epoch N'`` for a run whose training diverged (``r['diverged']``, as
    :func:`stochastic_depth_jax.training.sweep.collect` reads it; ``'diverged'`` where the
    epoch is unknown), ``''`` for any other run."""
    diverged = r.get("diverged")
    if not diverged:
        return ""
    epoch = diverged.get("epoch") if isinstance(diverged, dict) else None
    return "diverged" + (f" at epoch {epoch}" if isinstance(epoch, int) else "")


def _run_label(r: dict[str, Any]) -> str:
    """A run's legend entry: depth, constant or stochastic depth, series, unfinished or
    diverged."""
    return (f"{r['depth']} layers, " + ("constant depth" if r["p_last"] == 1.0 else
                                         f"stochastic, $p_L$={r['p_last']:g}")
            + _series_label(r.get("series", ""))
            + ("" if r.get("finished", True) else f" ({diverged_label(r) or 'unfinished'})"))


def _per_epoch(r: dict[str, Any], key: str, scale: float = 1.0) -> list[tuple[Any, float]]:
    """``(epoch, scale * value)`` of a run's records that have ``key`` (:func:`plots.per_epoch`)."""
    return per_epoch(r["records"], key, scale)


def _by_run(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs in legend order: series, depth, then constant depth first."""
    return sorted(runs, key=lambda r: (r.get("series", ""), r["depth"], -r["p_last"]))


def _epochs(lines: Iterable[Sequence[tuple[Any, float]]]) -> list[float]:
    """The epochs of the ``(epoch, value)`` points of ``lines``."""
    return [epoch for points in lines for epoch, _ in points]


@drawn_as_ours
def plot_first_conv_grad(runs: Sequence[dict[str, Any]], path: str,
                         key: str = "grad_first_conv_mean_abs", subtitle: str = "",
                         extra: dict[str, Any] | None = None) -> tuple[str, str]:
    """Fig. 7: the first convolution's mean |gradient| per epoch, one line per run
    (constant depth dashed; an unfinished or diverged run says so in the legend). ``runs``
    as from :func:`sweep.collect`, with ``records``; ``subtitle`` and ``extra`` as in
    :func:`plot_error_vs_p_last`."""
    from matplotlib import ticker

    fig = new_figure((6.5, 4.8))
    ax = fig.subplots()
    drawn_runs = [(r, _per_epoch(r, key), non_finite(r["records"], key)) for r in _by_run(runs)]
    drawn_runs = [(r, points, bad) for r, points, bad in drawn_runs if points or bad]
    data = {r["name"]: points for r, points, _ in drawn_runs}
    values = [v for points in data.values() for _, v in points if v > 0]
    # A log axis, but not where no value drawn is positive (all NaN, infinite or 0):
    # matplotlib refuses to draw one ('Data cannot be log-scaled').
    log = bool(values) or not data
    shown = []
    for r, points, bad in drawn_runs:
        # A gap in the line where the gradient was not finite, marked at the top; and on a
        # log axis where it was 0, marked at the bottom (the log axis drew no point there).
        zero = [epoch for epoch, v in points if v <= 0] if log else []
        line = sorted([p for p in points if p[0] not in zero]
                      + [(epoch, float("nan")) for epoch in bad + zero])
        [drawn] = ax.plot(*zip(*line), "--" if r["p_last"] == 1.0 else "-",
                          marker="." if len(points) < 20 else None, label=_run_label(r))
        mark_non_finite(ax, bad, drawn.get_color(), r["name"])
        _mark_zero(ax, zero, drawn.get_color(), r["name"])
        shown += [epoch for epoch, _ in line]
    epoch_axis(ax, shown)  # whole epochs, also for a run of one
    ax.set_ylabel("mean |gradient| of the first conv's weights\n(average over the epoch's "
                  "steps)")
    if log:
        ax.set_yscale("log")
    if values and max(values) < 10 * min(values):
        # Within a decade the ticks are minor ones: plain numbers (0.024, not 2x10^-2).
        plain = ticker.FuncFormatter(lambda v, _: f"{v:.3g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.grid(alpha=0.3, which="both")
    _title(ax, "First-conv gradient magnitude (cf. Huang et al. 2016, Fig. 7)", subtitle)
    if data:  # No run has logged the gradient yet: an empty legend only warns.
        _legend(fig, ax)
    fig.tight_layout(rect=(0, _FOOTNOTE_SPACE, 1, 1))
    return save_figure(fig, path, [r["workdir"] for r in runs], data,
                       "first-conv gradient magnitude (Huang et al. 2016, Fig. 7)", extra)


def _mark_zero(ax: Any, epochs: Sequence[Any], color: Any, name: str) -> None:
    """A ``v`` at the bottom of ``ax`` at each of ``epochs`` where ``name``'s gradient was 0,
    labelled as such: a log axis has no place for it (the line fell off the bottom)."""
    if epochs:
        ax.plot(epochs, [0.0] * len(epochs), "v", color=color, markersize=7, clip_on=False,
                transform=ax.get_xaxis_transform(), label=f"{name}: 0 (below the log axis)")


@drawn_as_ours
def plot_error_curves(runs: Sequence[dict[str, Any]], path: str, subtitle: str = "",
                      extra: dict[str, Any] | None = None) -> tuple[str, str]:
    """Fig. 3: test error (solid, left axis) and training loss (dashed, right axis) per
    epoch, one colour per run, constant depth beside stochastic depth. ``runs`` as from
    :func:`sweep.collect`, with ``records``; ``subtitle`` and ``extra`` as in
    :func:`plot_error_vs_p_last`."""
    fig = new_figure((6.5, 4.8))
    ax = fig.subplots()
    loss_ax = ax.twinx()
    data = {}
    for i, r in enumerate(_by_run(runs)):
        error, loss = _per_epoch(r, "test_error", 100), _per_epoch(r, "train_loss")
        if not (error or loss):
            continue
        data[r["name"]] = {"test_error_percent": error, "train_loss": loss}
        color, marker = f"C{i % 10}", "." if len(error) < 20 else None
        ax.plot(*zip(*error) if error else ([], []), "-", color=color, marker=marker,
                label=_run_label(r))
        if loss:  # marked: one epoch's loss is a point (no dashed line), a hollow square
            # where a single point of each sits mid-axis, on the error's dot (not an x: the
            # other figures' mark of a NaN)
            loss_ax.plot(*zip(*loss), "--", color=color, alpha=0.6, fillstyle="none",
                         marker="s" if len(loss) < 20 else None, markersize=4)
    epoch_axis(ax, _epochs(p for d in data.values() for p in d.values()))
    ax.set_ylabel("test error (%), solid")
    loss_ax.set_ylabel("training loss, dashed")
    ax.grid(alpha=0.3)
    _title(ax, "Test error and training loss per epoch (cf. Huang et al. 2016, Fig. 3)",
           subtitle)
    if data:  # No run has an epoch yet: an empty legend only warns.
        _legend(fig, ax, right_axis=loss_ax)
    fig.tight_layout(rect=(0, _FOOTNOTE_SPACE, 1, 1))
    return save_figure(fig, path, [r["workdir"] for r in runs], data,
                       "test error and training loss per epoch (Huang et al. 2016, Fig. 3)",
                       extra)


def training_time_table(runs: Sequence[dict[str, Any]]) -> str:
    """Markdown: per run, epochs, mean epoch time, images/s, and the ratio to the
    constant-depth run of the same depth and series (paper Sec. 4: 25% less time at
    p_L = 0.5). A ``series`` column appears where runs of several configs are listed.

    Epoch times exclude compilation and evaluation; the first epoch is left out when there
    are several (it includes warm-up). The mean epoch time is the time per step of the
    timed steps times the steps of a whole epoch, so an epoch resumed midway (its session
    timed only the steps it ran) or cut short counts for what it timed, not as a whole
    epoch; images/s is over the same steps.
    """
    several = len({r.get("series", "") for r in runs}) > 1
    lines = ["| run |" + (" series |" if several else "") + " depth | p_L | epochs | "
             "mean epoch time (s) | images/s | vs constant depth |",
             "|---" * (7 + several) + "|"]
    timing = {r["name"]: _epoch_timing(r) for r in runs}
    for r in sorted(runs, key=lambda r: (r.get("series", ""), r["depth"], -r["p_last"])):
        mean, speed = timing[r["name"]]
        base = [timing[o["name"]][0] for o in runs if o["depth"] == r["depth"]
                and o["p_last"] == 1.0 and o.get("series", "") == r.get("series", "")]
        ratio = f"{mean / base[0]:.2f}" if mean and base and base[0] else "n/a"
        epochs = _epochs_trained(r["records"])
        lines.append(
            f"| {r['name']} |" + (f" {r.get('series', '')} |" if several else "")
            + f" {r['depth']} | {r['p_last']:g} | {epochs} | "
            + (f"{mean:.3f}" if mean else "n/a") + " | "
            + (f"{speed:.0f}" if speed else "n/a") + f" | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def _epochs_trained(records: Sequence[dict[str, Any]]) -> str:
    """The epoch a run's records reach (``'2'``, ``'1.5'`` for one stopped mid-epoch), not
    how many records it has: a session stopped mid-epoch and resumed leaves a record at
    its stop (epoch 0.5) before the whole epochs, which counted as one more epoch."""
    epochs = [epoch for epoch, _ in per_epoch(records, "epoch")]
    return metrics_lib.epoch_text(max(epochs)) if epochs else "0"


def _epoch_timing(run: dict[str, Any]) -> tuple[float | None, float | None]:
    """(mean whole-epoch time in s, images/s) of a collected run's epoch records: the timed
    images of a record are its ``images_per_s * epoch_time_s``, a whole epoch's are
    ``batch_size * step / epoch`` of a record at a whole epoch."""
    records = [r for r in run["records"] if is_number(r.get("epoch"))
               and is_number(r.get("epoch_time_s")) and is_number(r.get("images_per_s"))]
    records = records[1:] if len(records) > 1 else records
    seconds = sum(r["epoch_time_s"] for r in records)
    images = sum(r["images_per_s"] * r["epoch_time_s"] for r in records)
    if not seconds or not images:
        return None, None
    batch = (run.get("config") or {}).get("batch_size")
    whole = [r["step"] / r["epoch"] for r in run["records"] if is_number(r.get("epoch"))
             and is_number(r.get("step")) and r["epoch"] > 0 and float(r["epoch"]).is_integer()]
    mean = whole[0] * batch * seconds / images if whole and is_number(batch) else None
    return mean, images / seconds
