"""The paper's figures from runs' own records, each file stating the runs it came from.

* :func:`plot_depth_curve`: blocks kept vs error vs inference throughput (pruning);
* :func:`plot_error_vs_p_last`: test error vs p_L, one line per depth (paper Fig. 8);
* :func:`plot_first_conv_grad`: mean |gradient| at the first convolution per epoch,
  constant vs stochastic depth (paper Fig. 7);
* :func:`training_time_table`: epoch times, constant vs stochastic depth (markdown).

Every PNG carries its sources in its text metadata (``Source``, readable with
``PIL.Image.open(p).text``) and as a footnote, and beside it a sidecar ``<name>.json`` holds
the sources and the plotted numbers. Figures are drawn with Agg outside pyplot
(:func:`plots.new_figure`): the session's matplotlib backend (a notebook's) is left alone.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

from stochastic_depth_jax.training.plots import new_figure

__all__ = [
    "save_figure",
    "read_sources",
    "plot_depth_curve",
    "plot_error_vs_p_last",
    "plot_first_conv_grad",
    "training_time_table",
]


def save_figure(fig: Any, path: str, sources: Sequence[str], data: Any,
                title: str = "") -> tuple[str, str]:
    """Writes ``fig`` to ``path`` (PNG) with its sources, and the sidecar JSON.

    Args:
      fig: a matplotlib figure (closed afterwards).
      path: the ``.png`` to write.
      sources: the runs (workdirs, checkpoints) the figure was drawn from.
      data: the plotted numbers (JSON-able), stored in the sidecar.
      title: a one-line description (PNG ``Title`` and sidecar ``title``).

    Returns:
      ``(png_path, json_path)``.
    """
    sources = [str(s) for s in sources]
    note = "sources: " + ", ".join(sources)
    fig.text(0.01, 0.005, note if len(note) < 180 else note[:177] + "...", fontsize=6,
             color="0.4", va="bottom")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Title": title, "Source": json.dumps(sources),
                                         "Software": "stochastic_depth_jax"})
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:  # A caller's pyplot figure is closed; ours are not pyplot's.
        pyplot.close(fig)
    sidecar = os.path.splitext(path)[0] + ".json"
    with open(sidecar, "w") as f:
        json.dump({"figure": os.path.basename(path), "title": title, "sources": sources,
                   "data": data}, f, indent=2)
    return path, sidecar


def read_sources(png_path: str) -> list[str]:
    """The sources recorded in a PNG written by :func:`save_figure`."""
    from PIL import Image

    with Image.open(png_path) as image:
        return json.loads(image.text["Source"])


def plot_depth_curve(points: Sequence[dict[str, Any]], path: str, sources: Sequence[str],
                     title: str = "") -> tuple[str, str]:
    """Error vs blocks kept (left) and error vs measured images/s (right).

    ``points`` as returned by :func:`stochastic_depth_jax.pruning.depth_curve`.
    """
    fig = new_figure((10, 4.2))
    left, right = fig.subplots(1, 2)
    splits = [k[:-6] for k in points[0] if k.endswith("_error")]
    for split in splits:
        kept = [p["blocks_kept"] for p in points]
        err = [100 * p[f"{split}_error"] for p in points]
        left.plot(kept, err, "o-", ms=3, label=split)
        fast = [(p["images_per_s"], 100 * p[f"{split}_error"]) for p in points
                if "images_per_s" in p]
        if fast:
            right.plot(*zip(*fast), "o-", ms=3, label=split)
    left.set_xlabel("residual blocks kept")
    left.invert_xaxis()
    left.xaxis.get_major_locator().set_params(integer=True)
    right.set_xlabel("inference images/s (pruned model, measured)")
    for ax in (left, right):
        ax.set_ylabel("error (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "Removing blocks at test time")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return save_figure(fig, path, sources, list(points), title or "depth curve")


def plot_error_vs_p_last(runs: Sequence[dict[str, Any]], path: str,
                         metric: str = "test_error") -> tuple[str, str]:
    """Fig. 8: ``metric`` (default the best-by-validation epoch's test error) vs p_L,
    one line per depth. ``runs`` as from :func:`stochastic_depth_jax.training.sweep.collect`.
    """
    fig = new_figure((6.5, 4.5))
    ax = fig.subplots()
    data = {}
    for depth in sorted({r["depth"] for r in runs}):
        rows = sorted((r["p_last"], r[metric]) for r in runs
                      if r["depth"] == depth and r.get(metric) is not None)
        if rows:
            data[str(depth)] = rows
            ax.plot([p for p, _ in rows], [100 * e for _, e in rows], "o-",
                    label=f"{depth} layers")
    ax.set_xlabel("$p_L$ (survival probability of the last block)")
    ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
    ax.grid(alpha=0.3)
    if data:  # No finished run yet: an empty legend only warns.
        ax.legend()
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return save_figure(fig, path, [r["workdir"] for r in runs], data,
                       f"{metric} vs p_L per depth (Huang et al. 2016, Fig. 8)")


def plot_first_conv_grad(runs: Sequence[dict[str, Any]], path: str,
                         key: str = "grad_first_conv_mean_abs") -> tuple[str, str]:
    """Fig. 7: the first convolution's mean |gradient| per epoch, one line per run
    (constant depth dashed). ``runs`` as from :func:`sweep.collect`, with ``records``."""
    fig = new_figure((6.5, 4.5))
    ax = fig.subplots()
    data = {}
    for r in sorted(runs, key=lambda r: (r["depth"], -r["p_last"])):
        points = [(m["epoch"], m[key]) for m in r["records"] if key in m]
        if not points:
            continue
        data[r["name"]] = points
        constant = r["p_last"] == 1.0
        label = f"{r['depth']} layers, " + ("constant depth" if constant else
                                             f"stochastic, $p_L$={r['p_last']:g}")
        ax.plot(*zip(*points), "--" if constant else "-", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean |gradient| of the first conv")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if data:  # No run has logged the gradient yet: an empty legend only warns.
        ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return save_figure(fig, path, [r["workdir"] for r in runs], data,
                       "first-conv gradient magnitude (Huang et al. 2016, Fig. 7)")


def training_time_table(runs: Sequence[dict[str, Any]]) -> str:
    """Markdown: per run, epochs, mean epoch time, images/s, and the ratio to the
    constant-depth run of the same depth (paper Sec. 4: 25% less time at p_L = 0.5).

    Epoch times exclude compilation and evaluation; the first epoch is left out of the
    mean when there are several (it includes warm-up).
    """
    lines = ["| run | depth | p_L | epochs | mean epoch time (s) | images/s | vs constant depth |",
             "|---|---|---|---|---|---|---|"]
    means = {}
    for r in runs:
        times = [m["epoch_time_s"] for m in r["records"] if "epoch_time_s" in m]
        times = times[1:] if len(times) > 1 else times
        means[r["name"]] = sum(times) / len(times) if times else None
    for r in sorted(runs, key=lambda r: (r["depth"], -r["p_last"])):
        mean = means[r["name"]]
        base = [means[o["name"]] for o in runs if o["depth"] == r["depth"] and o["p_last"] == 1.0]
        ratio = f"{mean / base[0]:.2f}" if mean and base and base[0] else "n/a"
        speed = [m["images_per_s"] for m in r["records"][1:] or r["records"]
                 if "images_per_s" in m]
        lines.append(
            f"| {r['name']} | {r['depth']} | {r['p_last']:g} | {len(r['records'])} | "
            + (f"{mean:.3f}" if mean else "n/a") + " | "
            + (f"{sum(speed) / len(speed):.0f}" if speed else "n/a") + f" | {ratio} |"
        )
    return "\n".join(lines) + "\n"
