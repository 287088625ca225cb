"""PNG plots of the error and loss curves from ``metrics.jsonl`` (matplotlib, Agg).

Figures are made outside pyplot (:func:`new_figure`), so drawing them from a notebook or
any session leaves its matplotlib backend and open figures as they were; they are drawn
without LaTeX whatever a matplotlibrc says (:func:`drawn_as_ours`)."""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import json
import math
import os
import textwrap
from typing import Any, Callable, Sequence

from stochastic_depth_jax import data as data_lib
from stochastic_depth_jax.training import config as config_lib
from stochastic_depth_jax.training import workdir as workdir_lib

__all__ = ["CURVE_FILES", "augment_label", "curve_title", "curves_figure", "drawn_as_ours",
           "drawn_from", "epoch_axis", "figure_title", "is_number", "mark_non_finite",
           "matplotlib_problem", "new_figure", "non_finite", "per_epoch", "plot_curves",
           "records_digest", "run_title"]

# The curves plot_curves writes in a workdir.
CURVE_FILES = ("error.png", "loss.png")
_MODEL_NAMES = {"cifar_resnet": "ResNet", "vit": "ViT", "convnext": "ConvNeXt"}
# Characters of a title line at 9 pt per inch of figure (110 take about 7.2 of an 8.5-inch
# figure's width); a longer title is wrapped, not cut at the figure's edges.
_TITLE_CHARS_PER_INCH = 110 / 8.5


def figure_title(fig: Any, title: str) -> None:
    """``title`` over the whole figure at 9 pt, wrapped to its width: centred over an axes
    with a legend beside it, or at a larger size, a long title ran off the figure's edges."""
    width = int(_TITLE_CHARS_PER_INCH * fig.get_figwidth())
    fig.suptitle("\n".join(textwrap.wrap(title, width)), fontsize=9)


def matplotlib_problem() -> str | None:
    """Why matplotlib cannot draw here, with its fix, or None: ``'matplotlib cannot be
    imported (ModuleNotFoundError: ...); install it (pip install matplotlib)'``, or, where
    importing it fails otherwise (``MPLBACKEND`` naming no backend raises a ValueError),
    ``'matplotlib fails on import (ValueError: ...); unset MPLBACKEND or ...'``.

    Checked before work whose product includes a figure, so that a missing matplotlib is
    said in one line, not as a traceback after the work (a depth curve's minutes, a
    sweep's runs) with its numbers unwritten.
    """
    try:
        importlib.import_module("matplotlib.figure")
    except ImportError as e:
        return (f"matplotlib cannot be imported ({type(e).__name__}: {e}); install it (pip "
                "install matplotlib)")
    except Exception as e:  # noqa: BLE001  anything else its import raises: not a traceback
        fix = ("unset MPLBACKEND or set it to a backend matplotlib lists (the figures are "
               "drawn with Agg whatever it names)" if os.environ.get("MPLBACKEND") else
               "reinstall it (pip install --force-reinstall matplotlib)")
        return f"matplotlib fails on import ({type(e).__name__}: {e}); {fix}"
    return None


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib ``Figure`` that pyplot does not manage: ``savefig`` renders it with Agg,
    and nothing global changes (``matplotlib.use`` would switch a notebook's inline backend
    for the rest of the session). Nothing to close: it is freed like any object."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


# rcParams our figures are drawn with whatever a matplotlibrc says: under a user's
# 'text.usetex: True' every text went through LaTeX, where the labels' '_' and '%' are
# errors (and without LaTeX installed each drawing failed), so no figure was ever written;
# under 'figure.constrained_layout.use: True' each drawing warned 'The figure layout has
# changed to tight' (they are laid out with tight_layout, the footnote below the axes).
_OUR_RC = {"text.usetex": False, "figure.constrained_layout.use": False}


def drawn_as_ours(draw: Callable[..., Any]) -> Callable[..., Any]:
    """``draw`` (a function that makes and saves a figure) run under :data:`_OUR_RC`, and
    nothing else of the session's matplotlib settings changed. Texts read ``text.usetex``
    as they are made, tick labels as the figure is saved: both happen inside."""
    @functools.wraps(draw)
    def drawn(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context(_OUR_RC):
            return draw(*args, **kwargs)

    return drawn


def run_title(config: Any) -> str:
    """One line naming what a run trained, e.g. ``cifar10, ResNet-110, stochastic depth
    p_L=0.5 (linear, batch), float32``, ``..., constant depth, ...`` or ``cifar10, ViT-S/4,
    drop path 0.1 (linear, sample), float32``, with ``FAKE data`` after the dataset of a
    random-label smoke run: a figure's title, so a PNG copied out of its workdir still says
    what it shows. ``config``: the run's ConfigDict, or run.json's ``"config"`` dict."""
    return _joined(_title_parts(config), augment_label(config) is not None)


def _joined(parts: Sequence[str], augment: bool) -> str:
    """:func:`_title_parts` (each maybe with its changes) as a title: the augmentation in
    brackets after the dataset where ``augment`` (it is not the dataset's own, or changed)."""
    dataset, augmentation, *rest = parts
    return ", ".join([dataset + (f" ({augmentation})" if augment else ""), *rest])


def _title_parts(config: Any) -> list[str]:
    """:func:`run_title`'s parts: dataset, augmentation (as trained: 'auto' named as its
    dataset's), model, depth rule, dtype."""
    m = config["model"]
    name = m.get("name", "cifar_resnet")
    if name == "wide_resnet":  # WRN-d-k names its depth and widening, not the base width.
        model = f"WRN-{m['depth']}-{m['widen_factor']}" + _width(m)
    elif name == "vit":  # DeiT's names, ViT-S/16: size/patch; a smoke run's dimensions differ.
        model = f"ViT-{str(m['size']).capitalize()}/{m['patch_size']}" + _set_dims(
            m, "depth", "width", "num_heads")
    elif name == "convnext":
        model = f"ConvNeXt-{m['size']}" + _set_dims(m, "depths", "dims")
    else:
        model = f"{_MODEL_NAMES.get(name, name)}-{m['depth']}" + _width(m)
    model += _layer_scale(name, m)
    if m.get("dropout_rate"):  # WRN paper's option; a run with it is not the same net's curve.
        model += f" dropout {m['dropout_rate']:g}"
    if m.get("initialization", "ours") != "ours":  # the official code's: another start
        model += f" {m['initialization']} init"
    if "drop_path_rate" in m and not m["drop_path_rate"]:
        depth = "no drop path"  # every block runs: rule and mode do nothing
    elif "drop_path_rate" in m:
        depth = f"drop path {m['drop_path_rate']:g} ({m['drop_path_rule']}, {m['mode']})"
    elif m["final_survival_prob"] >= 1:
        depth = "constant depth"
    else:
        depth = (f"stochastic depth p_L={m['final_survival_prob']:g} ({m['survival_rule']}, "
                 f"{m['mode']})")
    dataset = str(config["dataset"])
    if dataset.startswith("image_folder:"):  # A local path: its last part names it enough.
        folder = dataset.removeprefix("image_folder:").rstrip("/")
        dataset = "image_folder:" + (os.path.basename(folder) or folder)
    elif config_lib.fake_train_size(config):
        dataset += " (FAKE random-label data)"
    augment = config_lib.resolved_augment(config)
    return [dataset, _AUGMENT_NAMES.get(augment, augment), model, depth,
            str(m.get("dtype", "float32"))]


def augment_label(config: Any) -> str | None:
    """How a title names ``config``'s augmentation where it is not its dataset's own
    (``'no augmentation'``: CIFAR without it is CIFAR-10, not the paper's CIFAR-10+); None
    where it is. ``config``: a ConfigDict, or run.json's config dict."""
    augment = config.get("augment", "auto")  # absent: recorded before the field, 'auto'
    if augment in ("auto", data_lib.default_augment(str(config["dataset"]))):
        return None
    return _AUGMENT_NAMES.get(augment, augment)


# How a title names an augmentation other than the dataset's (CIFAR without it is CIFAR-10,
# not the paper's CIFAR-10+).
_AUGMENT_NAMES = {"none": "no augmentation", "translate": "translate only",
                  "flip_translate": "flip + translate"}


def curve_title(run_json: dict[str, Any], steps_per_epoch: int) -> str:
    """The title of a run's curves, true for all its sessions (run.json: the current config,
    and each session's ``start_step`` and ``config_changes``): :func:`run_title`, where each
    part a resumed session changed reads e.g. ``float32 then bfloat16 from epoch 12``. A
    session that trained nothing (the next one started at the same step) is left out; a
    run never changed gets ``run_title(config)``."""
    configs = _session_configs(run_json)
    sessions = [(start, _title_parts(config), config) for start, config in configs]
    trained = [s for s, after in zip(sessions, sessions[1:] + [(math.inf, None, None)])
               if after[0] > s[0]]
    parts = []
    for i, first in enumerate(trained[0][1]):
        text, value = first, first
        for start, later, _ in trained[1:]:
            if later[i] != value:
                value = later[i]
                text += f" then {value} from {_from(start, steps_per_epoch)}"
        parts.append(text)
    # The augmentation is named where one session's is not its dataset's own, or it changed.
    augment = " then " in parts[1] or any(augment_label(c) for _, _, c in trained)
    return _joined(parts, augment)


def _from(step: int, steps_per_epoch: int) -> str:
    """Where a session starting after ``step`` updates begins on the curves' epoch axis."""
    if step % steps_per_epoch == 0:
        return f"epoch {step // steps_per_epoch + 1}"
    return f"step {step} (epoch {step / steps_per_epoch:.2f})"


def _session_configs(run_json: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """``[(start_step, config)]`` of each session, oldest first: run.json's config with the
    later sessions' ``config_changes`` undone (a field a change added is removed)."""
    config = copy.deepcopy(run_json["config"])
    sessions = [(int(run_json.get("start_step") or 0), config)]
    changes = run_json.get("config_changes") or {}
    for entry in reversed(run_json.get("history") or []):
        config = _undone(config, changes)
        sessions.insert(0, (int(entry.get("start_step") or 0), config))
        changes = entry.get("config_changes") or {}
    return sessions


def _undone(config: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with ``changes`` (``{'a.b': {'old': x, 'new': y}}``, as
    ``config.config_changes`` gives them) undone."""
    config = copy.deepcopy(config)
    for field, change in changes.items():
        if field == "dataset" and config_lib.moved_folder(change):
            continue  # The same images elsewhere (a resumed run checks them): named as now.
        *parents, name = field.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        if change.get("old") is None:
            node.pop(name, None)
        else:
            node[name] = change["old"]
    return config


# The layer scale a model's own recipe starts at (the ViT: none, as DeiT; the ConvNeXt:
# 1e-6, as its paper): another one (LayerScale on a ViT, none on a ConvNeXt) is another
# network, which the title names.
_USUAL_LAYER_SCALE = {"vit": 0.0, "convnext": 1e-6}


def _layer_scale(name: str, model: Any) -> str:
    """``' layer scale 1e-05'`` or ``' no layer scale'`` where a ViT's or ConvNeXt's
    ``layer_scale_init`` is not its recipe's (absent from an older run.json: the recipe's)."""
    if name not in _USUAL_LAYER_SCALE:
        return ""
    value = model.get("layer_scale_init", _USUAL_LAYER_SCALE[name]) or 0.0
    if value == _USUAL_LAYER_SCALE[name]:
        return ""
    return f" layer scale {value:g}" if value else " no layer scale"


def _width(model: Any) -> str:
    """``' width 4'`` where a CIFAR ResNet's or WRN's base width is not the papers' 16."""
    return f" width {model['width']}" if model.get("width", 16) != 16 else ""


def is_number(value: Any) -> bool:
    """A number (not a bool): what a metrics record holds at a key it measured."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def per_epoch(records: Sequence[dict[str, Any]], key: str,
              scale: float = 1.0) -> list[tuple[Any, float]]:
    """``(epoch, scale * value)`` of the ``metrics.jsonl`` records with a finite number at
    ``key`` (an epoch that was not evaluated has no ``test_error``; a non-finite one is
    :func:`non_finite`'s) and an ``epoch`` (a line appended by hand or by another tool may
    have none: it has no place on an epoch axis)."""
    return [(r["epoch"], scale * r[key]) for r in records
            if is_number(r.get(key)) and math.isfinite(r[key]) and is_number(r.get("epoch"))]


# How metrics.jsonl records NaN and infinities (metrics._jsonable: JSON has no number for them).
_NON_FINITE = ("nan", "inf", "-inf")


def non_finite(records: Sequence[dict[str, Any]], key: str) -> list[Any]:
    """The epochs of the records whose ``key`` is NaN or infinite (``'nan'``, ``'inf'`` as
    ``metrics.jsonl`` writes them, or a float read from a ``NaN`` token): no point on a
    curve, so :func:`mark_non_finite` marks them."""
    return [r["epoch"] for r in records if is_number(r.get("epoch")) and (
        r.get(key) in _NON_FINITE or (is_number(r.get(key)) and not math.isfinite(r[key])))]


def mark_non_finite(ax: Any, epochs: Sequence[Any], color: Any, name: str) -> None:
    """An ``x`` at the top of ``ax`` at each of ``epochs`` where ``name`` was NaN or infinite,
    labelled as such: dropped silently, the curve went on through the neighbouring epochs
    as if the run had been fine there."""
    if epochs:
        ax.plot(epochs, [1.0] * len(epochs), "x", color=color, markersize=8, clip_on=False,
                transform=ax.get_xaxis_transform(), label=f"{name}: NaN or infinite")


def _set_dims(model: Any, *fields: str) -> str:
    """``' depth 2 width 32'``: the ``fields`` set instead of taken from ``model.size`` (a
    model so set is not the size its name says)."""
    return "".join(f" {f} " + ("-".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
                   for f in fields if (v := model.get(f)) is not None)


def _lr_changes(records: Sequence[dict[str, Any]]) -> list[tuple[Any, float]]:
    """``(epoch, new lr)`` wherever the learning rate changed between two records. A record's
    ``lr`` is its epoch's last, so a change is at the end of the epoch before it. Meant for a
    piecewise-constant (step) schedule: a cosine one changes every epoch."""
    changes, previous, previous_epoch = [], None, None
    for r in records:
        lr = r.get("lr")
        if not isinstance(lr, (int, float)):
            continue
        if previous is not None and abs(lr - previous) > 1e-6 * abs(previous):
            changes.append((previous_epoch, lr))
        previous, previous_epoch = lr, r["epoch"]
    return changes


def _best_label(best: dict[str, Any]) -> str:
    """``'best val_error: epoch 5, test error 66.00%'``; a best chosen mid-epoch
    (``eval_every_steps``) names its step: ``'epoch 12.34 (step 57700)'``."""
    epoch = best["epoch"]
    where = (f"epoch {epoch:g}" if float(epoch).is_integer() or not is_number(best.get("step"))
             else f"epoch {epoch:.2f} (step {best['step']})")
    test = best.get("test_error")
    return f"best {best['metric']}: {where}" + (
        f", test error {100 * test:.2f}%" if is_number(test) else "")


def epoch_axis(ax: Any, epochs: Sequence[float]) -> None:
    """An x axis of whole epochs, labelled ``epoch``, for curves at ``epochs``.

    Integer ticks need two whole epochs in view; else (a run of one epoch, or half of one)
    matplotlib's locator falls back to ticks such as 0.96, 0.98, 1.0: the view then spans
    the whole epoch the points end in and the one before it (epochs 0 to 1 for a run of
    one, or one diverged at its first step: epoch 0).
    """
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if epochs and max(epochs) - min(epochs) < 1:
        # The epoch the points end, and the one before: a one-epoch run is shown from its
        # start (epoch 0) to its end, not up to an epoch 2 it never reached.
        last = max(math.ceil(max(epochs)), 1)  # 1: a divergence at step 0 is at epoch 0
        ax.set_xlim(min(math.floor(min(epochs)), last - 1) - 0.25, last + 0.25)
    ax.set_xlabel("epoch")


@drawn_as_ours
def curves_figure(records: Sequence[dict[str, Any]], keys: Sequence[str], ylabel: str,
                  percent: bool, title: str | None = None,
                  best: dict[str, Any] | None = None, lr_drops: bool = False,
                  validation: Sequence[dict[str, Any]] = (),
                  diverged: tuple[float, str] | None = None) -> Any:
    """The ``Figure`` of ``keys`` per epoch (:func:`plot_curves` saves two of them);
    ``validation``'s records (validation.jsonl) give the ``val_*`` curves where they hold
    them, at their fractional epochs; ``diverged``: ``(epoch, label)``, a vertical line
    where training diverged. Without a point to draw, the axes say so in words (a blank
    plot read as a drawing that failed). Made, and laid out, with our rcParams
    (:func:`drawn_as_ours`), as the other figures."""
    records = [r for r in records if is_number(r.get("epoch"))]  # as in per_epoch
    fig = new_figure((8.5, 4.5))
    ax = fig.subplots()
    scale = 100 if percent else 1
    shown = [r["epoch"] for r in records]  # the epochs in view
    for key in keys:
        points = per_epoch(records, key, scale)
        finer = per_epoch(validation, key, scale) if key.startswith("val_") else []
        # validation.jsonl holds the epoch ends' evaluations too, but only of the sessions
        # run with eval_every_steps (a run may turn it on when resumed): the others' epochs
        # come from metrics.jsonl.
        bad = non_finite(records, key) + (non_finite(validation, key)
                                          if key.startswith("val_") else [])
        # A gap in the line where the value was not finite, marked at the top.
        points = sorted({**dict(points), **dict(finer), **dict.fromkeys(bad, math.nan)}.items())
        shown += [x for x, _ in points]
        if points:
            x, y = zip(*points)
            [line] = ax.plot(x, y, label=key, marker="." if len(x) < 30 else None)
            mark_non_finite(ax, sorted(set(bad)), line.get_color(), key)
    labelled, before = set(), next((r["lr"] for r in records if is_number(r.get("lr"))), None)
    for epoch, lr in _lr_changes(records) if lr_drops else ():
        # A step schedule's warm-up (ResNet-1202: 0.01, then 0.1) ends with a rise.
        kind = "learning-rate drop" if lr < before else "learning-rate rise (warm-up ends)"
        ax.axvline(epoch, color="0.6", linestyle=":", linewidth=1,
                   label=None if kind in labelled else kind)
        labelled.add(kind)
        before = lr
        ax.annotate(f"lr {lr:g}", (epoch, 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize=7, color="0.4")
    metric = best.get("metric") if best else None
    if metric in keys and is_number(best.get("value")) and is_number(best.get("epoch")):
        ax.plot([best["epoch"]], [scale * best["value"]], "k*", markersize=10,
                label=_best_label(best))
        shown.append(best["epoch"])  # a mid-epoch best (eval_every_steps) may come first
    if diverged is not None:
        ax.axvline(diverged[0], color="red", linestyle="--", linewidth=1, label=diverged[1])
        shown.append(diverged[0])
    if not any(line.get_label() in keys for line in ax.get_lines()):
        _nothing_drawn(ax, diverged is not None)
    epoch_axis(ax, shown)
    ax.set_ylabel(ylabel)
    if title:
        figure_title(fig, title)
    ax.grid(alpha=0.3)
    # Beside the axes: inside, it would hide a curve or a learning-rate label somewhere. None
    # without a curve (a run stopped before its first epoch's end): matplotlib would warn.
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    return fig


def _nothing_drawn(ax: Any, diverged: bool) -> None:
    """Says in ``ax`` that it has no point (no epoch finished: a Ctrl-C or a divergence in
    the first), its meaningless value ticks removed."""
    ax.text(0.5, 0.5, "no epoch finished before training diverged: no numbers to draw"
            if diverged else "no epoch has finished yet: nothing to draw",
            transform=ax.transAxes, ha="center", va="center", color="0.3",
            bbox={"facecolor": "white", "edgecolor": "none"})
    ax.set_yticks([])


# The PNG text key and value plot_curves writes in a figure with no curve (no epoch yet): a
# later drawing of no curve replaces only such a figure (or none), never an earlier curve.
_EMPTY_KEY, _EMPTY_VALUE = "Description", "no epoch to draw"
# The labels of the curves plot_curves draws (a figure without one has no epoch to show).
_CURVE_KEYS = frozenset(f"{split}_{what}" for split in ("train", "val", "test")
                        for what in ("error", "loss"))


def _holds_curves(path: str) -> bool:
    """Whether ``path`` is a PNG other than one :func:`plot_curves` wrote without a curve."""
    if not os.path.exists(path):
        return False
    try:
        from PIL import Image

        with Image.open(path) as image:
            return image.text.get(_EMPTY_KEY) != _EMPTY_VALUE
    except Exception:  # noqa: BLE001  unreadable (cut short): nothing worth keeping
        return False


# The PNG text key where plot_curves records which records it drew (records_digest): a PNG
# an earlier session drew is told by it, not by its mtime, which a copy of the workdir
# (rsync -r, cp -r, a download) sets in the order the files were copied.
_RECORDS_KEY = "Records"


def records_digest(records: Sequence[dict[str, Any]]) -> str:
    """``'<n> epoch records, sha256 <16 hex digits>'``: of ``records``' (``metrics.jsonl``'s)
    records with an epoch, those :func:`plot_curves` draws; what it writes in each PNG."""
    drawn = [r for r in records if is_number(r.get("epoch"))]
    text = json.dumps(drawn, sort_keys=True, default=str)
    return f"{len(drawn)} epoch records, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}"


def drawn_from(path: str) -> str | None:
    """The :func:`records_digest` of the records the PNG ``path`` was drawn from, None where
    it records none (absent, unreadable, drawn by an earlier version or by something else)."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            return image.text.get(_RECORDS_KEY)
    except Exception:  # noqa: BLE001  absent or unreadable: nothing to tell
        return None


@drawn_as_ours
def plot_curves(records: Sequence[dict[str, Any]], out_dir: str, title: str | None = None,
                best: dict[str, Any] | None = None, lr_drops: bool = False,
                validation: Sequence[dict[str, Any]] = (),
                diverged: tuple[float, str] | None = None) -> list[str]:
    """Writes ``error.png`` and ``loss.png`` (train/val/test per epoch) to ``out_dir``.

    Args:
      records: ``metrics.jsonl``'s records (``metrics.read_metrics``).
      out_dir: where the PNGs go (the workdir).
      title: above the axes, wrapped to the figure's width (:func:`run_title`).
      best: the run's best record (``summary.json``'s ``"best"``: ``metric``, ``value``,
        ``epoch``, ``test_error``), starred on the error curve it was selected by.
      lr_drops: mark each change of the records' ``lr`` with a dotted vertical line (for
        ``lr_schedule='step'``).
      validation: ``validation.jsonl``'s records (``eval_every_steps``): the validation
        curves are drawn from them, every N steps.
      diverged: ``(epoch, label)`` of a run whose training diverged (at a fractional
        epoch): a dashed red line there, with ``label`` in the legend.

    Returns:
      The paths written, each atomically (a second Ctrl-C, which stops training at once,
      or an error mid-write leaves the earlier PNG, never a truncated one). Where the
      records hold no epoch yet, the figures say so in words; they replace no earlier PNG
      with curves (of records a restart from step 0 set aside), which is left, and not
      returned. Each PNG records the :func:`records_digest` of ``records`` in its text
      metadata (:func:`drawn_from`).
    """
    paths = [os.path.join(out_dir, name) for name in CURVE_FILES]
    figures = [
        curves_figure(records, ("train_error", "val_error", "test_error"), "error (%)", True,
                      title, best, lr_drops, validation, diverged),
        curves_figure(records, ("train_loss", "val_loss", "test_loss"), "cross-entropy loss",
                      False, title, None, lr_drops, validation, diverged)]
    written = []
    for fig, path in zip(figures, paths):
        empty = not any(line.get_label() in _CURVE_KEYS for line in fig.axes[0].get_lines())
        if empty and _holds_curves(path):
            continue
        metadata = {_RECORDS_KEY: records_digest(records),
                    **({_EMPTY_KEY: _EMPTY_VALUE} if empty else {})}
        with workdir_lib.atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=120, metadata=metadata)
        written.append(path)
    return written

