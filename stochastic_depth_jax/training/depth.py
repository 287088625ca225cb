"""Depth on demand for a training run: the pruning curve, exporting a pruned model,
Monte-Carlo depth evaluation (``evaluate.py --depth-curve / --export / --mc-samples``).

  from stochastic_depth_jax.training import depth
  depth.depth_curve_run('/tmp/run', order='survival')        # writes depth_curve_survival.{json,png}
  depth.export_pruned_run('/tmp/run', '/tmp/pruned', remove=3)
  depth.mc_evaluate_run('/tmp/run', samples=10)

The model logic lives in :mod:`stochastic_depth_jax.pruning`; this module restores a run's
checkpoint and data and writes the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from stochastic_depth_jax import errors
from stochastic_depth_jax import data as data_lib
from stochastic_depth_jax import pruning
from stochastic_depth_jax.training import config as config_lib
from stochastic_depth_jax.training import evaluate as evaluate_lib
from stochastic_depth_jax.training import figures, plots

__all__ = [
    "depth_curve_run",
    "curve_table",
    "curve_header",
    "curve_row",
    "curve_footer",
    "percent",
    "export_pruned_run",
    "mc_evaluate_run",
    "require_blockwise_run",
    "add_arguments",
    "check_arguments",
    "run_from_args",
]


def require_blockwise_run(workdir: str) -> None:
    """Refuses a run whose model has no block-wise stochastic depth (e.g. the ViT).

    Depth on demand removes and samples whole residual blocks with their survival
    probabilities p_l: the CIFAR ResNet and the WideResNet (``config_lib.MODELS``).
    Checked from ``run.json`` before any checkpoint is restored.

    Raises:
      errors.ConfigError: the run's ``model.name`` is not one of those.
    """
    config, _ = evaluate_lib.load_run_config(workdir)
    name = config.model.get("name", "cifar_resnet")
    if name not in config_lib.MODELS:
        need = (f"a run of a CIFAR ResNet or WideResNet (block-wise stochastic depth; "
                f"model.name in {sorted(config_lib.MODELS)}); the run in {workdir} has model "
                f"{name!r}.")
        raise errors.ConfigError(
            f"depth_curve_run, export_pruned_run and mc_evaluate_run need {need} Evaluate it "
            "with evaluate.evaluate_checkpoint instead.",
            command_line=f"--depth-curve, --export and --mc-samples need {need} Evaluate it "
                         "without these flags.")


def _variables(run: evaluate_lib.RestoredRun) -> dict[str, Any]:
    return {"params": run.state.params, "batch_stats": run.state.batch_stats}


def _batches(run: evaluate_lib.RestoredRun, split: str) -> pruning.Batches:
    dev = run.device_split(split)
    size = run.config.eval_batch_size
    return lambda: data_lib.eval_batches(dev, batch_size=size, mean=run.mean, std=run.std)


def _evaluators(run: evaluate_lib.RestoredRun) -> dict[str, pruning.SubNetworkEvaluator]:
    model, variables = run.setup.model, _variables(run)
    names = ["validation", "test"] if run.ds.validation is not None else ["test"]
    return {n: pruning.SubNetworkEvaluator(model, variables, _batches(run, n)) for n in names}


def _order(run, evaluators, order: str, blocks: Sequence[int] | None,
           progress: Callable[[str], None] | None = None,
           max_removed: int | None = None) -> list[int]:
    if order == "greedy" and "validation" not in evaluators:
        problem = "order 'greedy' needs a validation split; this run has none (validation_size=0)"
        raise errors.ConfigError(
            f"{problem}. Use order='survival' or order='list'.",
            command_line=f"{problem}. Use --order survival or --order list.")
    error_of = evaluators["validation"].error if "validation" in evaluators else None
    on_step = None
    if progress is not None and order == "greedy":
        total = run.setup.model.num_blocks() if max_removed is None else max_removed
        on_step = _greedy_progress(progress, total)
    return pruning.removal_order(order, run.setup.model, blocks=blocks, error_of=error_of,
                                 on_step=on_step, max_removed=max_removed)


def _greedy_progress(progress: Callable[[str], None],
                     total: int) -> Callable[[list[int], float], None]:
    """``on_step`` for :func:`pruning.greedy_order`: one line per removal (the search
    evaluates about L^2 / 2 sub-networks before the first row of the curve)."""
    def on_step(removed: list[int], error: float) -> None:
        progress(f"greedy order: removed block {removed[-1]} ({len(removed)} of {total}), "
                 f"validation error {percent(error)}")
    return on_step


def _label(run: evaluate_lib.RestoredRun, checkpoint: str | int) -> str:
    """``'best'``, ``'latest'`` or ``'step<N>'``, as :func:`evaluate_lib.result_label`."""
    result = {"evaluated_step": int(run.meta["step"]),
              **({} if run.note is None else {"note": run.note})}
    return evaluate_lib.result_label(checkpoint, result)


def _checkpoint(run: evaluate_lib.RestoredRun, checkpoint: str | int) -> str:
    """Which checkpoint was evaluated: ``'checkpoint best, step 4, epoch 1'``, or
    ``'step 4, epoch 1'`` (never 'best' or 'latest') for a step number requested (the
    latest may be later) or an older one evaluated because the requested one is
    unreadable."""
    label = _label(run, checkpoint)
    label = "" if label.startswith("step") else f"checkpoint {label}, "
    epoch = run.meta.get("epoch")
    return (f"{label}step {int(run.meta['step'])}"
            + ("" if epoch is None else f", epoch {evaluate_lib.epoch_text(epoch)}"))


def _source(run: evaluate_lib.RestoredRun, workdir: str, checkpoint: str | int) -> str:
    source = f"{workdir} ({_checkpoint(run, checkpoint)})"
    return source if run.note is None else f"{source}; {run.note}"


def percent(value: Any) -> str:
    """An error rate as the tables print it (``12.34%``); ``-`` where there is none."""
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "-"


def curve_header(order_rule: str, source: str, device: str) -> list[str]:
    """The first lines of :func:`curve_table`: what the curve is of, and the columns."""
    return [f"Depth curve, order '{order_rule}', {source}, measured on {device}:",
            "| blocks kept | block removed (0-based) | validation error | test error | "
            "images/s | parameters |",
            "|---:|---:|---:|---:|---:|---:|"]


def curve_row(point: dict[str, Any]) -> str:
    """One point of a depth curve as a row of :func:`curve_table` ('-' where the point was
    not measured: ``measure_every`` > 1 measures speed and size every few points)."""
    speed, params = point.get("images_per_s"), point.get("num_params")
    return (f"| {point['blocks_kept']} | "
            f"{point['removed'][-1] if point['removed'] else '-'} | "
            f"{percent(point.get('validation_error'))} | {percent(point.get('test_error'))} | "
            f"{f'{speed:.0f}' if speed else '-'} | "
            f"{'-' if params is None else f'{params:,}'} |")


def curve_footer(result: dict[str, Any]) -> str:
    """The last line of :func:`curve_table`: where the curve was written."""
    return f"Written: {result['json']} (every number) and {result['png']}."


def curve_table(result: dict[str, Any]) -> str:
    """A depth curve (:func:`depth_curve_run`'s result) as the lines a person reads: one row
    per point (blocks kept, the block removed last, errors, measured images/s, parameters)
    and where the JSON and PNG were written. The command line prints this (the rows as they
    are computed), not the JSON, which has several lines per point (a ResNet-110's 55
    points: ~900 lines)."""
    lines = curve_header(result["order_rule"], result["sources"][0], result["device"])
    lines += [curve_row(p) for p in result["points"]]
    return "\n".join(lines + [curve_footer(result)])


def depth_curve_run(workdir: str, *, checkpoint: str | int = "best",
                    data_dir: str | None = None, order: str = "survival",
                    blocks: Sequence[int] | None = None, output_dir: str | None = None,
                    throughput_batch: int = 128, repeats: int = 5, measure_every: int = 1,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Removes a run's blocks one by one in ``order``; writes the curve as JSON and PNG.

    Writes ``depth_curve_<order>.json`` (points, order, source) and
    ``depth_curve_<order>.png`` (with its sidecar ``.json`` beside it; the sidecar is the
    same file) to ``output_dir`` (default: the workdir); of a checkpoint other than 'best',
    ``depth_curve_<order>_<latest|step<N>>``. A curve of another ``blocks`` order in the
    same file is refused, not replaced. Errors are on the validation (if any) and test
    splits; throughput is of each exported pruned model on one device. ``progress``, if
    given (e.g. ``print``), receives lines as the work goes: each greedy removal, then
    :func:`curve_table`'s lines but the last, a row per point as it is done.

    Returns:
      ``{'figure', 'sources', 'order_rule', 'order', 'device', 'points', 'png', 'json'}``
      (also the content of the JSON file).
    """
    workdir = os.path.expanduser(workdir)  # '~/runs/x' from Python, as on the command line
    output_dir = output_dir and os.path.expanduser(output_dir)
    require_blockwise_run(workdir)
    _require_matplotlib(order)
    run = evaluate_lib.restore_run(workdir, checkpoint, data_dir)
    evaluators = _evaluators(run)
    png = _curve_path(run, checkpoint, order, output_dir or workdir)
    removal = _order(run, evaluators, order, blocks, progress)
    if order == "list":  # the others follow from the checkpoint, which the name gives
        _check_replaceable(png, removal)
    source, device = _source(run, workdir, checkpoint), jax.devices()[0].device_kind
    if progress is not None:
        for line in curve_header(order, source, device):
            progress(line)
    points = pruning.depth_curve(
        run.setup.model, _variables(run), removal, evaluators=evaluators,
        image_shape=run.ds.image_shape, throughput_batch=throughput_batch, repeats=repeats,
        measure_every=measure_every,
        on_point=None if progress is None else lambda p: progress(curve_row(p)))
    result = {"figure": os.path.basename(png), "sources": [source], "order_rule": order,
              "order": removal, "device": device, "points": points,
              "png": png, "json": figures.sidecar_path(png)}
    if jax.process_index() == 0:  # one writer in a multi-process job
        # The result is the figure's sidecar: written once, with the figure.
        title = f"{plots.run_title(run.config)}; order '{order}', {_checkpoint(run, checkpoint)}"
        figures.plot_depth_curve(points, png, [source], sidecar=result, title=title,
                                 chosen_on="validation" if order == "greedy" else None)
    return result


def _require_matplotlib(order: str) -> None:
    """Refuses a depth curve before its minutes of work where its figure cannot be drawn:
    the curve's numbers are written with it (the PNG's sidecar), so they were lost after a
    traceback.

    Raises:
      errors.Error: matplotlib cannot be imported (:func:`plots.matplotlib_problem`); one
        line naming the fix.
    """
    problem = plots.matplotlib_problem()
    if problem is not None:
        what = f"draws depth_curve_{order}.png, but {problem} and run again. Nothing was " \
               "computed."
        raise errors.Error(f"depth_curve_run {what}", command_line=f"--depth-curve {what}")


def _curve_path(run: evaluate_lib.RestoredRun, checkpoint: str | int, order: str,
                directory: str) -> str:
    """``<directory>/depth_curve_<order>.png`` for the best checkpoint, else
    ``depth_curve_<order>_<latest|step<N>>.png``: a curve of another checkpoint never
    replaces the best one's (the label as :func:`evaluate_lib.result_label` gives it)."""
    label = _label(run, checkpoint)
    return os.path.join(directory, f"depth_curve_{order}"
                        + ("" if label == "best" else f"_{label}") + ".png")


def _check_replaceable(png: str, removal: list[int]) -> None:
    """Refuses to replace a curve of another ``--blocks`` order (order 'list') of the same
    file name: that result would be lost. The same order again (a rerun) replaces it.

    Raises:
      errors.WorkdirError: naming the file, its order and what to do.
    """
    path = figures.sidecar_path(png)
    try:
        with open(path) as f:
            recorded = json.load(f).get("order")
    except (OSError, ValueError, AttributeError):
        return  # none (or not a curve we wrote): nothing of ours to lose
    if recorded is not None and [int(b) for b in recorded] != list(removal):
        raise errors.WorkdirError(
            f"{path} holds the depth curve of another removal order ({recorded}); rename it "
            f"and {os.path.basename(png)} to keep them, or delete them, then run again. "
            "Nothing was computed.")


def export_pruned_run(workdir: str, output: str, *, checkpoint: str | int = "best",
                      data_dir: str | None = None,
                      order: str = "survival", blocks: Sequence[int] | None = None,
                      remove: int | None = None, throughput_batch: int = 128,
                      repeats: int = 5,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Saves the run's model with ``remove`` blocks deleted (the first ones of ``order``;
    all of ``blocks`` for order 'list') to ``output`` (see :func:`pruning.save_pruned`).
    The greedy order is searched for those ``remove`` blocks only, each removal reported
    to ``progress`` (e.g. ``print``) where given.

    ``output`` must be new or empty (checked first: nothing is overwritten). The input
    normalisation (the run's mean/std) is saved with the model, so
    ``pruning.load_pruned(output)`` runs without the source run.

    Returns the record also stored as the saved model's metadata: removed blocks, parameter
    counts, validation/test error and measured images/s of the full and pruned models.
    """
    # '~/runs/x' from Python, as on the command line
    workdir, output = os.path.expanduser(workdir), os.path.expanduser(output)
    evaluate_lib.refuse_a_run_s_folder(
        output, f"Export directory {output}", "it would take the export for a damaged "
        "checkpoint and move it aside, or delete it", "choose a directory outside it. Nothing "
        "was written.")
    pruning.check_export_directory(output)
    require_blockwise_run(workdir)
    with _export_directory(output):  # created before minutes of work: can it be written?
        return _export(workdir, output, checkpoint=checkpoint, data_dir=data_dir, order=order,
                       blocks=blocks, remove=remove, throughput_batch=throughput_batch,
                       repeats=repeats, progress=progress)


def _export(workdir: str, output: str, *, checkpoint: str | int, data_dir: str | None,
            order: str, blocks: Sequence[int] | None, remove: int | None,
            throughput_batch: int, repeats: int,
            progress: Callable[[str], None] | None) -> dict[str, Any]:
    """:func:`export_pruned_run` once ``output`` exists (empty)."""
    run = evaluate_lib.restore_run(workdir, checkpoint, data_dir)
    evaluators = _evaluators(run)
    present = int(run.setup.model.kept_blocks().sum())
    if order != "list":  # checked before the greedy search (L^2 / 2 evaluations), not after
        _check_remove(remove, present, present, order)
    # Greedy: only the removals exported (ResNet-110, --remove 5: 260 evaluations, not 1485).
    removal = _order(run, evaluators, order, blocks, progress,
                     max_removed=remove if order == "greedy" else None)
    if order == "list":
        _check_remove(remove, len(removal), present, order)
        remove = len(removal) if remove is None else remove
    model, variables = run.setup.model, _variables(run)
    keep = pruning.keep_mask(model.num_blocks(), removal[:remove])
    pruned, pvars = pruning.prune(model, variables, keep)
    shape = run.ds.image_shape
    record = {
        "source": _source(run, os.path.abspath(workdir), checkpoint),  # the export may move
        "order_rule": order,
        "removed": [int(b) for b in removal[:remove]],
        "blocks_kept": int(keep.sum()),
        "num_params": {"full": pruning.param_count(variables),
                       "pruned": pruning.param_count(pvars)},
        "error": {name: {"full": ev(np.ones_like(keep))["error"], "pruned": ev(keep)["error"]}
                  for name, ev in evaluators.items()},
        "images_per_s": {
            "full": pruning.throughput(model, variables, shape, batch_size=throughput_batch,
                                       repeats=repeats)["images_per_s"],
            "pruned": pruning.throughput(pruned, pvars, shape, batch_size=throughput_batch,
                                         repeats=repeats)["images_per_s"],
            "device": jax.devices()[0].device_kind,
        },
        **evaluate_lib.fake_data_fields(run.config),
    }
    pruning.save_pruned(output, pruned, jax.device_get(pvars), record, mean=run.mean,
                        std=run.std)
    return {"output": output, **record}


def _check_remove(remove: int | None, listed: int, present: int, order: str) -> None:
    """Refuses a ``remove`` that is not a number of blocks in ``[0, most]``: at most the
    ``listed`` blocks of the order, and fewer than the ``present`` blocks of the model. An
    export with every block removed is the stem, the stages' shortcuts and the classifier,
    no residual block, which was saved and measured as a pruned network. ``remove`` None
    with order 'list': all of ``listed``, the blocks given."""
    most = min(listed, present - 1)
    if order == "list" and remove is None:
        if listed <= most:
            return
        problem = (f"names all {present} blocks of the model; an export keeps at least one "
                   f"(it would be the stem and classifier alone): name at most {most}")
        raise errors.ConfigError(f"blocks {problem}, or pass remove={most}.",
                                 command_line=f"--blocks {problem}, or add --remove {most}.")
    if remove is None or isinstance(remove, bool) or not 0 <= remove <= most:
        why = (f"; removing all {present} would leave no residual block, only the stem and "
               "classifier" if remove == present else "")
        problem = (f"must be a number of blocks in [0, {most}], got {remove!r} (order "
                   f"{order!r}){why}.")
        raise errors.ConfigError(f"remove {problem}", command_line=f"--remove {problem}")


@contextlib.contextmanager
def _export_directory(output: str) -> Iterator[None]:
    """Creates the (new or empty) export directory before the work, or says in one line why
    it cannot be (the OS error's generic fix would name --workdir); removes it again if it
    was created here and the export failed before writing anything into it."""
    created = not os.path.lexists(output)
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        raise errors.WorkdirError(
            f"Cannot create the export directory {output} ({e.strerror or e}); choose another "
            "one (--export DIR). Nothing was written.") from e
    try:
        yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(output)  # only if still empty: a partial export is left to see
        raise


def mc_evaluate_run(workdir: str, *, checkpoint: str | int = "best",
                    data_dir: str | None = None, split: str = "test",
                    samples: int = 10, seed: int = 0) -> dict[str, Any]:
    """Monte-Carlo depth (softmax averaged over ``samples`` sampled sub-networks) vs the
    deterministic scaled network, on ``split`` of a run (:func:`pruning.mc_evaluate`); of
    the best checkpoint, what chose it (:func:`evaluate_lib.selection_fields`)."""
    if samples < 1:
        raise errors.ConfigError(
            f"samples must be >= 1 (sampled sub-networks), got {samples}.",
            command_line=f"--mc-samples must be >= 1 (sampled sub-networks), got {samples}.")
    workdir = os.path.expanduser(workdir)  # '~/runs/x' from Python, as on the command line
    require_blockwise_run(workdir)
    run = evaluate_lib.restore_run(workdir, checkpoint, data_dir)
    result = pruning.mc_evaluate(run.setup.model, _variables(run), _batches(run, split),
                                 samples=samples, key=jax.random.key(seed))
    out = {"source": _source(run, workdir, checkpoint), "split": split, "seed": seed,
           "evaluated_step": int(run.meta["step"]), **result,
           **evaluate_lib.selection_fields(checkpoint, run.kind, run.meta, split),
           **evaluate_lib.fake_data_fields(run.config)}
    return out if run.note is None else {**out, "note": run.note}


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated block indices like 8,7,6, got {text!r}") from None


# Each option -> the analyses it applies to ('plain': evaluate.py without a depth flag).
# Options given (not None) for another analysis are refused rather than silently ignored.
_APPLIES_TO = {
    "order": ("depth_curve", "export"),
    "blocks": ("depth_curve", "export"),
    "remove": ("export",),
    "seed": ("mc_samples",),
    "throughput_batch": ("depth_curve", "export"),
    "repeats": ("depth_curve", "export"),
    "measure_every": ("depth_curve",),
    "split": ("plain", "mc_samples"),
}
_DEFAULTS = {"seed": 0, "throughput_batch": 128, "repeats": 5, "measure_every": 1,
             "split": "test"}


def _flag(name: str) -> str:
    return "a plain evaluation" if name == "plain" else "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the depth-on-demand flags to ``evaluate.py``'s parser (defaults in
    :func:`check_arguments`, so that an option given where it does nothing is refused)."""
    g = parser.add_argument_group("depth on demand (remove blocks at test time; CIFAR "
                                  "ResNet / WideResNet runs; one of the first three)")
    g.add_argument("--depth-curve", action="store_true",
                   help="error and throughput as blocks are removed one by one (JSON + PNG)")
    g.add_argument("--export", metavar="DIR", default=None, type=os.path.expanduser,
                   help="save the model with --remove blocks deleted to DIR (new or empty)")
    g.add_argument("--mc-samples", type=int, default=None, metavar="K",
                   help="Monte-Carlo depth: average the softmax of K >= 1 sampled sub-networks")
    g.add_argument("--order", choices=pruning.ORDERS, default=None,
                   help="removal order: lowest survival probability first (default), greedy "
                        "by validation error, or list (--blocks)")
    g.add_argument("--blocks", type=_ints, default=None,
                   help="0-based block indices to remove, in order (implies --order list)")
    g.add_argument("--remove", type=int, default=None,
                   help="blocks to remove for --export (default with --blocks: all of them)")
    g.add_argument("--seed", type=int, default=None,
                   help="gate key for --mc-samples (0; another seed's result is "
                        "eval_mc<K>_seed<S>_...json)")
    g.add_argument("--throughput-batch", type=int, default=None, help="(128)")
    g.add_argument("--repeats", type=int, default=None, help="timed batches per throughput (5)")
    g.add_argument("--measure-every", type=int, default=None,
                   help="measure throughput every this many points of the curve (1)")


def _recorded_blockwise(workdir: str | None) -> bool:
    """False only for a workdir whose run.json records a model without block-wise
    stochastic depth (a ViT, a ConvNeXt): there, adding a depth flag is no fix (it is
    refused too). Unreadable or absent: True (the later checks say why)."""
    try:
        meta = evaluate_lib.read_run_json(workdir) if workdir else None
    except (OSError, errors.Error):
        return True
    model = (meta or {}).get("config", {}).get("model")
    return not isinstance(model, dict) or model.get("name", "cifar_resnet") in config_lib.MODELS


def check_arguments(args: argparse.Namespace) -> None:
    """Refuses flag combinations that would be ignored or contradict each other, then fills
    in the defaults (``args.order``, ``args.split``, ...) in place.

    Raises:
      errors.ConfigError: one line naming the flags and the fix.
    """
    chosen = [a for a in ("depth_curve", "export", "mc_samples")
              if getattr(args, a) not in (None, False)]
    if len(chosen) > 1:
        raise errors.ConfigError(
            f"{' and '.join(map(_flag, chosen))} are separate analyses; give one per command.")
    analysis = chosen[0] if chosen else "plain"
    if args.export == "":
        raise errors.ConfigError("--export needs a directory (new or empty), got ''.")
    for name, applies in _APPLIES_TO.items():
        if getattr(args, name, None) is not None and analysis not in applies:
            add = analysis == "plain" and _recorded_blockwise(getattr(args, "workdir", None))
            raise errors.ConfigError(
                f"{_flag(name)} applies only to {' or '.join(map(_flag, applies))}, not to "
                f"{_flag(analysis)}; drop {_flag(name)}"
                + (f" or add {_flag(applies[0])}." if add else "."))
    if args.mc_samples is not None and args.mc_samples < 1:
        raise errors.ConfigError(
            f"--mc-samples must be >= 1 (sampled sub-networks), got {args.mc_samples}.")
    if args.blocks is not None and args.order not in (None, "list"):
        raise errors.ConfigError(f"--blocks is the removal order itself (--order list); drop "
                                 f"--order {args.order} or --blocks.")
    if args.order == "list" and not args.blocks:
        raise errors.ConfigError("--order list needs --blocks, e.g. --blocks 8,7,6 (0-based).")
    if analysis == "export" and args.remove is None and args.blocks is None:
        raise errors.ConfigError("--export needs --remove N (blocks to remove, in --order) "
                                 "or --blocks.")
    for name, value in (("throughput_batch", args.throughput_batch), ("repeats", args.repeats),
                        ("measure_every", args.measure_every)):
        if value is not None and value < 1:
            raise errors.ConfigError(f"{_flag(name)} must be >= 1, got {value}.")
    args.order = "list" if args.blocks is not None else (args.order or "survival")
    for name, value in _DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def _print_line(line: str) -> None:
    print(line, flush=True)  # flushed: a log shows each point as it is done


def _print_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], str] | None:
    """Runs what the depth flags ask for; returns ``(result, default JSON path)`` (the path
    None where the analysis wrote its JSON itself: the depth curve's), or None when no depth
    flag was given (plain evaluation). Call :func:`check_arguments` first. A depth curve
    prints its table a row at a time as it is computed (the caller prints
    :func:`curve_footer`)."""
    common = {"checkpoint": args.checkpoint, "data_dir": getattr(args, "data_dir", None)}
    if args.depth_curve:
        result = depth_curve_run(args.workdir, order=args.order, blocks=args.blocks,
                                 throughput_batch=args.throughput_batch, repeats=args.repeats,
                                 measure_every=args.measure_every,
                                 progress=_print_line if jax.process_index() == 0 else None,
                                 **common)
        return result, None  # written by depth_curve_run
    if args.export:
        # The greedy search's lines on stderr: stdout is the export's JSON alone (| jq).
        result = export_pruned_run(args.workdir, args.export, order=args.order,
                                   blocks=args.blocks, remove=args.remove,
                                   throughput_batch=args.throughput_batch,
                                   repeats=args.repeats, **common,
                                   progress=_print_stderr if jax.process_index() == 0 else None)
        return result, os.path.join(args.export, "export.json")
    if args.mc_samples:
        result = mc_evaluate_run(args.workdir, split=args.split, samples=args.mc_samples,
                                 seed=args.seed, **common)
        return result, os.path.join(args.workdir, _mc_file_name(args.checkpoint, result))
    return None


def _mc_file_name(checkpoint: str | int, result: dict[str, Any]) -> str:
    """``eval_mc<K>_<checkpoint>_<split>.json`` for :func:`mc_evaluate_run`'s ``result``,
    with ``_seed<S>`` after ``<K>`` for a seed other than 0: another seed samples other
    sub-networks, so its numbers differ and must not replace the first seed's."""
    label = evaluate_lib.result_label(checkpoint, result)
    seed = "" if result["seed"] == 0 else f"_seed{result['seed']}"
    return f"eval_mc{result['samples']}{seed}_{label}_{result['split']}.json"
