"""``train_and_evaluate(config, workdir)``: the paper's training run, resumable exactly.

Per epoch: train (progress bar, or one line per epoch without it), evaluate validation and
test with every block active, write a metrics record, keep the best-by-validation
checkpoint, save the latest one. With ``eval_every_steps``, the validation split is also
evaluated every that many steps (mid-epoch included, recorded in validation.jsonl), and the
test split and the best checkpoint where it improves (the paper's SVHN protocol).
A restart with the same workdir continues from the newest readable checkpoint and
reproduces the uninterrupted run's metrics (all randomness is keyed by the step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import time
import warnings
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from stochastic_depth_jax import data as data_lib
from stochastic_depth_jax import errors, hugepages, logs, pruning
from stochastic_depth_jax.training import checkpoint as checkpoint_lib
from stochastic_depth_jax.training import compilation
from stochastic_depth_jax.training import config as config_lib
from stochastic_depth_jax.training import evaluate as evaluate_lib
from stochastic_depth_jax.training import implementation as implementation_lib
from stochastic_depth_jax.training import metrics as metrics_lib
from stochastic_depth_jax.training import distributed, plots, progress
from stochastic_depth_jax.training import setup as setup_lib
from stochastic_depth_jax.training import state as state_lib
from stochastic_depth_jax.training import step as step_lib
from stochastic_depth_jax.training import stopping
from stochastic_depth_jax.training import workdir as workdir_lib

__all__ = ["OWN_FILES", "DIVERGED_FILE", "train_and_evaluate", "NonFiniteLossError"]

SUMMARY_FILE = "summary.json"
# The files a training run replaces whole (workdir.atomic_write): a kill mid-write left a
# temporary file beside one, which the next run removes (evaluate.py's, written while a
# run may train, are left alone); evaluate.py --output may not name one.
OWN_FILES = (evaluate_lib.RUN_FILE, SUMMARY_FILE, metrics_lib.METRICS_FILE,
              metrics_lib.VALIDATION_FILE, *plots.CURVE_FILES)
# A sweep's record, in a run's workdir, that the run diverged there (training.sweep): where,
# the checkpoint kept, and the error. A sweep's rerun skips the run instead of diverging again;
# evaluating a run that diverged before any checkpoint says so.
DIVERGED_FILE = evaluate_lib.DIVERGED_FILE


class NonFiniteLossError(errors.Error, FloatingPointError):
    """The training loss became NaN or infinite; the broken state was not saved.

    ``step`` (the step its message names) and ``epoch`` (1-based: the epoch in which the
    loss or the parameters became non-finite) say where, for a caller that records it (a
    sweep goes on with its next run); None where unknown."""

    step: int | None = None
    epoch: int | None = None


def _diverged(message: str, step: int, epoch: int) -> NonFiniteLossError:
    """A :class:`NonFiniteLossError`, its ``step`` and ``epoch`` set."""
    error = NonFiniteLossError(message)
    error.step, error.epoch = step, epoch
    return error


def write_divergence(workdir: str, error: NonFiniteLossError) -> dict[str, Any]:
    """Writes :data:`DIVERGED_FILE` in ``workdir`` for ``error`` (process 0; every process
    returns the record): the step and epoch where training diverged, the newest committed
    checkpoint (``kept_step``, 0 if none) and the error."""
    directory = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(
        directory) else []
    record = {"step": error.step, "epoch": error.epoch, "kept_step": max(steps, default=0),
              "error": str(error)}
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)  # a sweep's caller's train= may not have made it
        with workdir_lib.atomic_write(os.path.join(workdir, DIVERGED_FILE)) as f:
            json.dump(record, f, indent=2)
    return record


def _host(tree: Any) -> Any:
    """Replicated device values -> numpy (works when arrays span several processes)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _write_json(path: str, obj: Any) -> None:
    if jax.process_index() == 0:
        with workdir_lib.atomic_write(path) as f:  # a reader never sees half a file
            json.dump(obj, f, indent=2)


@dataclasses.dataclass
class _Run:
    """A run in progress: what the epoch loop reads and updates."""

    config: ml_collections.ConfigDict
    workdir: str
    setup: setup_lib.Setup
    splits: dict[str, data_lib.DeviceSplit]
    mean: np.ndarray
    std: np.ndarray
    ckpts: checkpoint_lib.Checkpoints
    writer: metrics_lib.MetricWriter
    state: Any
    best: dict[str, Any] | None = None
    # eval_every_steps: validation.jsonl's writer, and the seconds evaluating in this epoch
    # (kept out of its epoch_time_s, reported in its eval_time_s).
    validation_writer: metrics_lib.MetricWriter | None = None
    eval_time: float = 0.0
    # Compact mode: the seconds compiling the programs of bucket tuples first drawn in this
    # epoch's steps (kept out of its epoch_time_s, reported in its compile_time_s).
    compile_time: float = 0.0
    # The 'best' checkpoints an earlier session saved after the restored step (killed before
    # its next 'latest'): evaluated again when reached, whatever the cadence now, so that the
    # best names them as the uninterrupted run did (else, resumed with eval_every_steps
    # changed, the best was an older step while evaluate.py's 'best' was the newest of them).
    # Those this session's trajectory does not reproduce are set aside (_supersede_best).
    earlier_best: frozenset[int] = frozenset()
    resumed_at: int = 0  # the restored step
    # That session's evaluations after the restored step, by step (metrics.jsonl and
    # validation.jsonl, read before their writers drop them): see _keep_best.
    earlier_records: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    config_changes: tuple[str, ...] = ()  # the fields this session changed (run.json)
    title: str | None = None  # the curves' title, of every session (plots.curve_title)
    stop: stopping.StopSignals | None = None  # SIGTERM/SIGINT: checkpoint, then stop
    plotted_at: float | None = None  # perf_counter() of the last drawing of the curves
    plot_failed: bool = False  # a drawing failed (and was warned about)

    @property
    def step(self) -> int:
        return int(_host(self.state.step))


def _kept_checkpoint(run: _Run) -> str:
    """Which checkpoint a restart resumes from: the newest committed one, once the saves in
    flight have committed (a save only started is not one; one that fails raises here)."""
    run.ckpts.wait()
    committed = run.ckpts.steps("latest")
    if not committed:
        return "no checkpoint had been saved yet"
    return (f"the last good checkpoint (step {committed[-1]}) in {run.workdir}/checkpoints "
            "is kept")


def _check_finite(run: _Run) -> None:
    bad = int(_host(run.state.sums["nonfinite_step"]))
    if bad >= 0:
        where = _kept_checkpoint(run)
        epoch = bad // run.setup.steps_per_epoch + 1
        raise _diverged(
            f"Non-finite training loss at step {bad} (epoch {epoch}); stopping without saving "
            f"the broken state; {where}. Try a lower --config.learning_rate or another "
            "--config.seed.", bad, epoch)


def _check_savable(run: _Run) -> None:
    """Raises :class:`NonFiniteLossError` where the current state may not be saved (its loss
    or its parameters non-finite)."""
    _check_finite(run)
    step = run.step
    if not state_lib.all_finite(run.state):
        raise _diverged(  # by the epoch of the last step done (steps counted from 1)
            f"The parameters became non-finite by step {step} (the loss was still finite); "
            f"stopping without saving them; {_kept_checkpoint(run)}. Try a lower "
            "--config.learning_rate.", step, max(step - 1, 0) // run.setup.steps_per_epoch + 1)


def _save(run: _Run, kind: str, extra: dict[str, Any] | None = None) -> None:
    """Saves the current state as ``kind`` (after checking it is finite)."""
    _check_savable(run)
    meta = {"epoch": run.step / run.setup.steps_per_epoch, "best": run.best, **(extra or {})}
    run.ckpts.save(kind, run.step, run.state, meta)


def _epoch_sums(run: _Run) -> dict[str, float]:
    s = _host(run.state.sums)
    steps, examples = max(float(s["steps"]), 1.0), max(float(s["examples"]), 1.0)
    return {
        "train_loss": float(s["loss"]) / steps,
        "train_error": float(s["errors"]) / examples,
        "grad_first_conv_l2": float(s["grad_l2"]) / steps,
        "grad_first_conv_mean_abs": float(s["grad_mean_abs"]) / steps,
    }


def _train_epoch(run: _Run, compiled: Any, epoch: int, end: int) -> float:
    """Runs the steps until ``end`` updates are done, with the ``eval_every_steps``
    evaluations before ``end`` (``_end_of_epoch`` evaluates there); returns the wall time
    of the training steps, without those evaluations (``run.eval_time``), without
    compiling the programs compact mode meets in them (``run.compile_time``) and without
    the ``checkpoint_every_steps`` saves in the epoch (their wait, all of a synchronous
    save's writing)."""
    c, spe = run.config, run.setup.steps_per_epoch
    start = run.step
    bar = progress.EpochProgress(
        epoch,
        c.num_epochs,
        total=end - (epoch - 1) * spe,
        start=start - (epoch - 1) * spe,
        batch_size=c.batch_size,
        enabled=c.progress_bar,
    )
    run.eval_time = run.compile_time = saving = 0.0
    t0 = time.perf_counter()
    try:
        for step in range(start + 1, end + 1):  # ``step`` = updates done after this one.
            compiling = getattr(compiled, "compile_s", 0.0)  # compact mode's, else none
            run.state = compiled(run.state, run.splits["train"], step - 1)
            if compiling := getattr(compiled, "compile_s", 0.0) - compiling:
                run.compile_time += compiling
                bar.exclude(compiling)  # a new bucket tuple's program: no training time
            if step in run.earlier_best:  # Before its evaluation may save 'best' here.
                _check_earlier_best(run)
            # Before a stop or a save at this step: a restart resumes after it. The epoch's
            # end is evaluated by _end_of_epoch.
            if (_evaluates_at(c, step) or step in run.earlier_best) and step < end:
                before = run.eval_time
                _evaluate_at_step(run)
                bar.exclude(run.eval_time - before)  # not in the bar's images/s either
            if step % c.log_every_steps == 0 or step == end:
                _check_finite(run)
                sums = _epoch_sums(run)
                bar.update(step - (epoch - 1) * spe, sums["train_loss"], sums["train_error"])
                if step < end:  # at the epoch's end, after its evaluation (see _train)
                    _stop_if_requested(run, step)
            if c.checkpoint_every_steps and step % c.checkpoint_every_steps == 0 and step < end:
                _check_finite(run)  # Waits for the steps dispatched: their time is training.
                before = time.perf_counter()  # a synchronous save writes here: no training
                _save(run, "latest")
                saving += (took := time.perf_counter() - before)
                bar.exclude(took)
        jax.block_until_ready(run.state)
    finally:
        bar.close()
    return time.perf_counter() - t0 - run.eval_time - run.compile_time - saving


# The curves are redrawn during training at most this often (a drawing takes ~0.3 s on
# process 0), so a long run's error.png shows its progress; and at the end or a stop.
PLOT_EVERY_S = 300.0
# How long the other processes of a job that diverged wait for process 0's last drawing
# before they report the divergence, which ends it (a first drawing imports matplotlib).
DRAWING_WAIT_S = 120.0


def _draw_plots(run: _Run, force: bool, ending: bool = False,
                diverged: NonFiniteLossError | None = None) -> None:
    """Redraws error.png and loss.png from metrics.jsonl (process 0, ``write_plots``);
    ``ending``: the run's last drawing (its end, a stop, a divergence), whose failure does
    not say that training goes on; ``diverged``: the divergence that ended it, marked."""
    if not run.config.write_plots or jax.process_index() != 0:
        return
    now = time.perf_counter()
    if not force and run.plotted_at is not None and now - run.plotted_at < PLOT_EVERY_S:
        return
    run.plotted_at = now
    try:
        plots.plot_curves(metrics_lib.read_metrics(run.workdir), run.workdir,
                          title=run.title or plots.run_title(run.config), best=run.best,
                          lr_drops=run.config.lr_schedule == "step",
                          validation=_validation_records(run),
                          diverged=_divergence_mark(run, diverged))
    except Exception as e:  # noqa: BLE001  A picture must not end a run: said once.
        if not run.plot_failed:
            # A matplotlib that cannot be imported is named with its fix (install it, or
            # unset a wrong MPLBACKEND), not as the bare error of its import.
            problem = plots.matplotlib_problem()
            why = f": {problem};" if problem else f" ({type(e).__name__}: {e});"
            where = "metrics.jsonl" + (" and tensorboard/" if run.config.write_tensorboard
                                       else "")
            warnings.warn(
                f"Could not draw error.png/loss.png in {run.workdir}{why} "
                + (f"the numbers are in {where}" if ending else
                   f"training goes on (the numbers are in {where})")
                + "; --config.write_plots=false turns the drawing off.", logs.RunWarning)
        run.plot_failed = True  # Said once; tried again at the next drawing.


def _divergence_mark(run: _Run, error: NonFiniteLossError | None) -> tuple[float, str] | None:
    """``(epoch, label)`` of where ``error`` stopped the run, as the curves mark it."""
    if error is None or error.step is None:
        return None
    return (error.step / run.setup.steps_per_epoch,
            f"diverged at step {error.step}" + (f" (epoch {error.epoch})" if error.epoch else ""))


def _validation_records(run: _Run) -> list[dict[str, Any]]:
    """validation.jsonl's records ([] where no session evaluated every ``eval_every_steps``):
    also where this session does not, as an earlier one's mid-epoch evaluations (and a best
    among them, starred) stay on the curves. The file is rewritten to the restored step at
    every start where it exists (:func:`_validation_writer`), so none is of a lost run."""
    return metrics_lib.read_metrics(run.workdir, metrics_lib.VALIDATION_FILE)


def _stop_if_requested(run: _Run, step: int) -> None:
    """On an agreed stop request: save 'latest' at ``step``, wait for it, raise Stopped."""
    signum = run.stop.agreed() if run.stop is not None else None
    if signum is None:
        return
    _save(run, "latest")  # Not twice: a step saved already (at the epoch's end) is skipped.
    _draw_plots(run, force=True, ending=True)  # While the checkpoint is written, not before.
    run.ckpts.wait()
    spe = run.setup.steps_per_epoch
    raise stopping.Stopped(
        f"stopped by {stopping.StopSignals.name(signum)} at step {step} (epoch "
        f"{(step - 1) // spe + 1}, step {(step - 1) % spe + 1} of {spe}); its checkpoint is "
        f"saved in {run.workdir}/checkpoints", signum)


def _evaluate(run: _Run, names: tuple[str, ...] = ("validation", "test")) -> dict[str, float]:
    """``{'val_loss', 'val_error', 'test_loss', 'test_error'}`` of the splits ``names``."""
    record = {}
    for name, key in (("validation", "val"), ("test", "test")):
        if name in run.splits and name in names:
            result = evaluate_lib.evaluate_split(
                run.setup.eval_step,
                run.state,
                run.splits[name],
                batch_size=run.config.eval_batch_size,
                mean=run.mean,
                std=run.std,
            )
            record[f"{key}_loss"], record[f"{key}_error"] = result["loss"], result["error"]
    return record


def _evaluates_at(config: ml_collections.ConfigDict, step: int) -> bool:
    """Whether ``eval_every_steps`` evaluates the validation split at ``step``: a multiple,
    so every process of a job evaluates at the same steps, and a resumed run as the
    uninterrupted one."""
    n = config.get("eval_every_steps", 0)
    return bool(n) and step % n == 0


def _improves(run: _Run, record: dict[str, Any]) -> bool:
    """Whether ``record`` holds the selection metric and it is below the best so far."""
    metric = config_lib.SELECT_BEST_BY[run.config.select_best_by]
    return metric in record and (run.best is None or record[metric] < run.best["value"])


def _keep_best(run: _Run, record: dict[str, Any], epoch: float) -> None:
    """Makes ``record`` (evaluated at the current step, ``epoch``: whole at an epoch's end,
    else fractional) the run's best and saves the 'best' checkpoint."""
    metric = config_lib.SELECT_BEST_BY[run.config.select_best_by]
    later = sorted(s for s in run.earlier_best if s > run.step)
    # Weights that diverged are no best and are not saved: checked before the earlier
    # session's later bests are set aside for them, which else left the run with neither
    # (and a restart with the earlier config, which may reproduce them, without them).
    _check_savable(run)
    if later and run.step not in run.earlier_best and not first_process_decides(
            _as_before(run, record) and not run.config_changes):
        # Orbax saves no step below its newest: those would hide this one, and 'best' would
        # name weights that this session's records do not describe. Evaluated as before
        # with the config unchanged, the trajectory is the earlier one and so are they;
        # changed, they may not be (lr_boundaries_epochs moved past this step), and this
        # step's weights are saved now or never.
        _supersede_best(run, later, _new_best_why(run, record))
    earlier, run.best = run.best, {
        "metric": metric,
        "value": record[metric],
        "epoch": epoch,
        "step": run.step,
        **{k: record[k] for k in ("val_error", "test_error") if k in record},
    }
    try:
        _save(run, "best", {"record": record})
    except NonFiniteLossError:
        # Not saved: weights that diverged are no best (measured on them, their errors
        # were drawn as the run's best, starred on its curves, with no checkpoint of it).
        run.best = earlier
        raise


# An earlier session's 'best' checkpoint at a step S after the restored one is kept only if
# this session's state at S is bit for bit the one it holds (the checksum saved with it):
# the one exact test. A config change does not tell: many change nothing the weights see
# (eval_every_steps, keep_checkpoints, plots), and the weights may change without one (the
# restored step older than the newest 'best' because the newest 'latest' was damaged, and
# the code or devices changed). Unchanged, the recomputed state is identical: nothing moves.
def _check_earlier_best(run: _Run) -> None:
    """At a step where an earlier session saved 'best': sets it and the later ones aside
    unless this session's state is the one it holds."""
    step = run.step
    try:
        saved = run.ckpts.read_meta("best", step).get("checksum")
    except Exception:  # noqa: BLE001  Damaged: evaluate.py skips it, as any damaged one.
        return
    if saved is not None and int(saved) == state_lib.checksum(run.state):
        return
    _supersede_best(run, sorted(s for s in run.earlier_best if s >= step),
                    f"this session's weights at step {step} differ from the ones saved there")


def _as_before(run: _Run, record: dict[str, Any]) -> bool:
    """Whether the earlier session evaluated the current step as ``record`` does (a 'best'
    it saved here was rotated away by later ones): compared exactly, as a recomputed
    trajectory evaluates."""
    old = run.earlier_records.get(run.step, {})
    keys = [k for k in ("val_loss", "val_error", "test_loss", "test_error", "train_loss",
                        "train_error") if k in old and k in record]
    return bool(keys) and all(float(old[k]) == float(record[k]) for k in keys)


def _new_best_why(run: _Run, record: dict[str, Any]) -> str:
    """Why a new best at the current step sets the earlier session's later bests aside."""
    if _as_before(run, record):
        return f"this session, with a changed config, has a new best at step {run.step}"
    if run.step not in run.earlier_records:  # Dropped by a session resumed in between.
        return f"that session's evaluation at step {run.step} is not recorded any more"
    return f"this session's evaluation at step {run.step} differs from that session's"


def first_process_decides(flag: bool) -> bool:
    """Process 0's ``flag`` on every process: a decision that only process 0's reading of
    files supports (e.g. the records, :func:`_records_after`), taken alike by all, which
    then run the same collectives (``set_aside``, a sweep's measuring)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.bool_(flag)))


def _supersede_best(run: _Run, steps: list[int], why: str) -> None:
    """Moves the earlier session's 'best' checkpoints ``steps`` to checkpoints_superseded/
    (none is lost), saying so in one line: this session's records describe its own weights,
    which 'best' must name."""
    targets = run.ckpts.set_aside("best", steps, checkpoint_lib.SUPERSEDED_DIR)
    run.earlier_best = run.earlier_best.difference(steps)
    if jax.process_index() != 0:
        return
    changed = (f" (changed: {', '.join(run.config_changes)})" if run.config_changes else "")
    listed = ", ".join(map(str, steps))
    where = ", ".join(os.path.basename(t) for t in targets)
    warnings.warn(
        f"The 'best' checkpoint{'s' * (len(steps) > 1)} of step{'s' * (len(steps) > 1)} "
        f"{listed}, saved by an earlier session after step {run.resumed_at} where this "
        f"session resumed{changed}, moved to "
        f"{os.path.join(run.workdir, checkpoint_lib.SUPERSEDED_DIR)}/ ({where}): {why}, "
        "and 'best' names the weights that this session's records and summary.json describe.",
        logs.RunWarning)


def _evaluate_at_step(run: _Run) -> None:
    """``eval_every_steps`` mid-epoch: the validation split; where its error is the best so
    far (``select_best_by='validation'``), the test split too and the 'best' checkpoint
    (Huang et al., SVHN). One line of validation.jsonl; its time goes to ``run.eval_time``."""
    _check_finite(run)  # Also waits for the steps dispatched: their time is training time.
    t0 = time.perf_counter()
    step = run.step
    record = {"step": step, "epoch": step / run.setup.steps_per_epoch,
              **_evaluate(run, ("validation",))}
    if run.config.select_best_by == "validation" and _improves(run, record):
        record.update(_evaluate(run, ("test",)))
        _keep_best(run, record, record["epoch"])
    record["eval_time_s"] = time.perf_counter() - t0
    run.eval_time += record["eval_time_s"]
    if run.validation_writer is not None:  # None: an earlier best, no eval_every_steps
        run.validation_writer.write(record)
    # On the epochs' TensorBoard curves too, at this step (the epoch ends are already there).
    run.writer.add_scalars(record, ("val_loss", "val_error", "test_loss", "test_error"))


def _end_of_epoch(run: _Run, epoch: int, train_time: float, timed_steps: int,
                  is_last: bool) -> dict[str, Any]:
    """Evaluates, records, updates the best checkpoint and saves the latest one.

    ``train_time``: seconds of the ``timed_steps`` steps this session ran in the epoch (a
    session resumed mid-epoch times only its part; images/s are of those steps), without
    the evaluations; ``eval_time_s``: theirs and the epoch end's. With no step timed (the
    end of a run that stopped there untimed) the record has neither time nor images/s."""
    c, step, spe = run.config, run.step, run.setup.steps_per_epoch
    # A run stopped mid-epoch (max_steps) records the fraction it reached, like its checkpoint.
    label = _epoch_reached(step, spe)
    record = {
        "epoch": label,
        "step": step,
        "lr": float(run.setup.lr_schedule(step - 1)),
        **_epoch_sums(run),
    }
    if timed_steps:  # none where the steps were trained in an earlier, untimed session
        record.update(epoch_time_s=train_time,
                      images_per_s=timed_steps * c.batch_size / max(train_time, 1e-9))
        if run.compile_time:  # compact mode's programs first drawn in the epoch's steps
            record["compile_time_s"] = run.compile_time
    evaluates = (epoch % c.eval_every_epochs == 0 or is_last or _evaluates_at(c, step)
                 or step in run.earlier_best)
    if evaluates:
        t0 = time.perf_counter()
        evaluated = _evaluate(run)
        record.update(evaluated)
        took = time.perf_counter() - t0
        if c.get("eval_every_steps", 0):  # The curve every N steps has the epoch ends too.
            run.validation_writer.write({"step": step, "epoch": label, **evaluated,
                                         "eval_time_s": took})
        run.eval_time += took
    if run.eval_time:  # This epoch's evaluations: mid-epoch (eval_every_steps) and its end.
        record["eval_time_s"] = run.eval_time
    # Among the evaluated epochs only: select_best_by='train' has a training error at every
    # epoch, and a best between evaluations (eval_every_epochs > 1) would have no test error.
    if evaluates and _improves(run, record):
        _keep_best(run, record, label)
    run.writer.write(record)
    if progress.prints_epoch_lines(c.progress_bar):
        print(progress.epoch_line(record, c.num_epochs), flush=True)
    periodic = (c.checkpoint_every_epochs and epoch % c.checkpoint_every_epochs == 0) or (
        c.checkpoint_every_steps and step % c.checkpoint_every_steps == 0
    )
    if periodic or is_last:
        _save(run, "latest", {"record": record})
    # After the save (asynchronous): a drawing that fails never costs the epoch's checkpoint.
    if not is_last:  # The last is drawn once the run's summary is known.
        _draw_plots(run, force=run.plotted_at is None)  # The first epoch's, then periodically.
    return record


def _describe(config: ml_collections.ConfigDict, params: Any, ds: data_lib.Dataset) -> str:
    """The start-up line saying what trains: the model as the figures' titles name it
    (:func:`plots.run_title`), its parameter count and the data's split sizes, e.g.
    ``Training cifar10, WRN-28-10, ..., float32: 36,479,194 parameters; 45,000 training,
    5,000 validation, 10,000 test images.``"""
    splits = [("training", ds.train), ("validation", ds.validation), ("test", ds.test)]
    sizes = ", ".join(f"{len(split):,} {name}" for name, split in splits if split is not None)
    return (f"Training {plots.run_title(config)}: {pruning.param_count(params):,} parameters; "
            f"{sizes} images.")


def _resume_or_init(run: _Run, image_shape: tuple[int, int, int]) -> None:
    """Restores the newest good 'latest' checkpoint, or initialises a fresh state."""
    if not run.ckpts.steps("latest"):
        run.state = run.setup.init_state(image_shape)
        _note_earlier_best(run)  # Killed after a 'best' save, before the first 'latest'.
        return
    try:
        state, meta = run.ckpts.restore("latest", setup_lib.abstract_state(run.setup, image_shape))
    except checkpoint_lib.IncompatibleCheckpointError as e:
        changed = _changes_since_run_json(run)
        if not changed:
            raise
        raise checkpoint_lib.IncompatibleCheckpointError(
            f"{e} This config differs from the one run.json records: {changed}.") from None
    except checkpoint_lib.NoCheckpointError:
        if jax.process_index() == 0:  # one line for the job
            warnings.warn(f"No readable checkpoint in {run.workdir}/checkpoints; starting "
                          "afresh.", logs.RunWarning)
        run.state = run.setup.init_state(image_shape)
        _note_earlier_best(run)
        return
    _check_steps_per_epoch(run, meta)
    _check_same_shortcut(run)
    _check_same_initialization(run)
    _check_same_layer_scale(run)
    _check_same_selection(run, meta.get("best"))
    run.state, run.best = state, meta.get("best")
    _note_earlier_best(run)
    if jax.process_index() == 0:
        print(
            f"Resuming from step {int(meta['step'])} (epoch {meta['epoch']:.2f}) in {run.workdir}",
            flush=True,
        )


def _measure_unevaluated_best(run: _Run, image_shape: tuple[int, int, int]) -> None:
    """Evaluates the restored best where it has no test error: an earlier version chose
    ``select_best_by='train'``'s best among every epoch, also those no evaluation measured
    (``eval_every_epochs`` > 1), and that best, kept until a lower training error came,
    ended the run as 'Best by training error: epoch 1' with no test error. Its 'best'
    checkpoint is evaluated now, so the best reported is always an evaluated one; where that
    checkpoint is gone or unreadable, the best is chosen afresh from the next evaluation."""
    best = run.best
    if not _unevaluated(run, best):
        return
    where = _best_where(best)
    run.best = _measured_best(run, best, image_shape)
    if run.best is None:  # on every process: each chooses the same best from here on
        if jax.process_index() == 0:  # one line for the job
            warnings.warn(
                f"The restored best ({where}) was chosen by an earlier version among epochs "
                "that no evaluation measured, and its 'best' checkpoint cannot be read to "
                "measure it; the best is chosen again from this session's evaluations.",
                logs.RunWarning)
        return
    if jax.process_index() == 0:
        print(f"The restored best ({where}), chosen by an earlier version among epochs no "
              "evaluation measured, has been evaluated now: test error "
              f"{100 * run.best['test_error']:.2f}%.", flush=True)


def best_unmeasured(best: Any) -> bool:
    """Whether ``best`` (a run's, as its checkpoints and summary.json record it) is an
    earlier version's best that no evaluation measured: it has no test error. A sweep runs
    such a finished run again, which measures it (:func:`_finished_best_measured`)."""
    return isinstance(best, dict) and "test_error" not in best


def _unevaluated(run: _Run, best: Any) -> bool:
    """Whether ``best`` is an earlier version's best that no evaluation measured
    (:func:`best_unmeasured`), where this run has a test split to measure it on."""
    return best_unmeasured(best) and "test" in run.splits


def _best_where(best: dict[str, Any]) -> str:
    return f"epoch {best.get('epoch')}, step {best.get('step')}"


def _measured_best(run: _Run, best: dict[str, Any],
                   image_shape: tuple[int, int, int]) -> dict[str, Any] | None:
    """``best`` with the validation and test errors of its 'best' checkpoint, evaluated now;
    None (on every process alike) where that checkpoint is gone or unreadable."""
    try:
        saved, _ = run.ckpts.restore("best", setup_lib.abstract_state(run.setup, image_shape),
                                     step=int(best["step"]))
    except (checkpoint_lib.NoCheckpointError, KeyError, TypeError, ValueError):
        saved = None
    _check_same_best(run, saved is not None, _best_where(best))
    if saved is None:
        return None
    restored, run.state = run.state, saved
    try:
        measured = _evaluate(run)
    finally:
        run.state = restored
    return {**best, **{k: measured[k] for k in ("val_error", "test_error") if k in measured}}


def _finished_best_measured(run: _Run, summary: dict[str, Any],
                            ds: data_lib.Dataset) -> dict[str, Any] | None:
    """A finished run's summary with its best measured, where an earlier version chose
    that best among epochs no evaluation measured (as :func:`_measure_unevaluated_best`
    does for a run that trains on): run again, it went on reporting 'Best by training
    error: epoch 1' with no test error, in its summary.json and a sweep's tables. The
    summary.json is rewritten with the errors added (nothing else changes); None where
    there is nothing to measure, or (a warning) its 'best' checkpoint cannot be read, or
    this config is not the one run.json records (:func:`_unmeasurable_why`). Process 0's
    readings decide for all: the evaluation is collective, and a host whose view of the
    shared workdir lags must not stay out of it."""
    best = summary.get("best")
    unevaluated = _unevaluated(run, best)
    if not first_process_decides(unevaluated):
        return None
    why = _unmeasurable_why(run, ds) if unevaluated else None
    measured = (_measured_best(run, best, ds.image_shape)
                if first_process_decides(why is None) else None)
    if measured is None:
        why = why or "its 'best' checkpoint cannot be read to measure it"
        if jax.process_index() == 0:
            warnings.warn(
                f"The best in summary.json ({_best_where(best)}) was chosen by an earlier "
                f"version among epochs that no evaluation measured, and {why}: it stays "
                "without a test error.", logs.RunWarning)
        return None
    summary = {**summary, "best": measured}
    _write_json(os.path.join(run.workdir, SUMMARY_FILE), summary)
    if jax.process_index() == 0:
        print(f"The best in summary.json ({_best_where(best)}), chosen by an earlier version "
              "among epochs no evaluation measured, has been evaluated now and its errors "
              f"added there: test error {100 * measured['test_error']:.2f}%.", flush=True)
    return summary


def _unmeasurable_why(run: _Run, ds: data_lib.Dataset) -> str | None:
    """Why a finished run's best cannot be measured with this config; None where it can:
    its data and splits (``ds``) and its model must be those run.json records. Measured on
    other images, or by another network (another final_survival_prob scales the blocks
    otherwise at test time), its errors would be written in summary.json beside the
    run.json that a finished run leaves as it trained, mislabelling the run."""
    again = "run it again with the config it trained with to measure it"
    try:
        recorded = evaluate_lib.read_run_json(run.workdir) or {}
        if not isinstance(recorded.get("data"), dict):
            raise errors.DataError("run.json records no data")
        evaluate_lib.check_same_data(recorded["data"], ds, run.config, run.workdir)
    except (OSError, errors.Error):
        return f"this config's data or splits are not those run.json records ({again})"
    old, new = recorded.get("config"), json.loads(run.config.to_json())
    if not isinstance(old, dict) or not isinstance(old.get("model"), dict):
        old = {}
    # A field that only one of them has was added to (or dropped from) the code since.
    changed = [f"{k}: {v['old']!r} -> {v['new']!r}" for k, v in config_lib.config_changes(
        old.get("model", {}), new["model"], "model.").items()
        if _has_field(old, k) and _has_field(new, k)]
    if changed or not old:
        listed = "".join(f"{c}; " for c in changed[:4]) + "...; " * (len(changed) > 4)
        return f"this config's model is not the one run.json records ({listed}{again})"
    return None


def _check_same_best(run: _Run, read: bool, where: str) -> None:
    """Raises ``errors.DistributedError`` on every process alike where some read the
    restored best's 'best' checkpoint (``where``) and others did not (a host whose view of
    the shared workdir lags lists no such step): the first evaluated it in collectives the
    others never entered, as those went on to train, and their bests then differed."""
    unread = _not_read_by_all(read)
    if unread:
        raise errors.DistributedError(
            f"The processes of this job do not all read the restored best's 'best' checkpoint "
            f"({where}): {unread} could not; the hosts list different checkpoints in "
            f"{os.path.join(run.workdir, 'checkpoints_best')} (a shared filesystem whose "
            "caches lag); start the job again once every host sees the same files.")


def _check_same_summary(run: _Run, read: bool) -> None:
    """Raises ``errors.DistributedError`` on every process alike where some read the
    summary.json of the step the run reached (a finished run: nothing to train) and others
    did not (a host whose view of the shared workdir lags): the first returned it, the
    others went on to evaluate that step in collectives the first never entered."""
    unread = _not_read_by_all(read)
    if unread:
        raise errors.DistributedError(
            f"The processes of this job do not all read "
            f"{os.path.join(run.workdir, SUMMARY_FILE)} of step {run.step}, which the run "
            f"reached: {unread} could not (a shared filesystem whose caches lag); start the "
            "job again once every host sees the same files.")


def _not_read_by_all(read: bool) -> str:
    """``'processes 1, 3'``: those of the job that did not ``read`` a file where others did;
    '' where all did or none did (one process: '')."""
    if jax.process_count() == 1:
        return ""
    reads = [bool(r) for r in np.ravel(multihost_utils.process_allgather(np.int32(read)))]
    if all(reads) or not any(reads):
        return ""
    unread = [p for p, r in enumerate(reads) if not r]
    return (f"process{'es' * (len(unread) > 1)} " + ", ".join(map(str, unread[:4]))
            + ", ..." * (len(unread) > 4))


def _check_same_start(run: _Run) -> None:
    """Raises ``errors.DistributedError`` on every process alike where the processes start
    from different steps. Each restores the newest checkpoint it lists, and a host whose
    view of the shared workdir lags (a filesystem's cache) lists fewer: the processes then
    trained on different weights from different steps, out of step in every collective.
    Every process learns every step: compared with process 0's alone, a process 0 that was
    behind went on, set the run's later records aside and rewrote run.json before it
    heard of the failure."""
    if jax.process_count() == 1:
        return
    steps = np.ravel(multihost_utils.process_allgather(np.int32(run.step)))
    different = _different_starts([int(s) for s in steps],
                                  os.path.join(run.workdir, "checkpoints"))
    if different:
        raise errors.DistributedError(different)


def _different_starts(steps: list[int], directory: str) -> str | None:
    """The error for processes starting from different ``steps`` (each process's, in order),
    naming those behind the newest (up to 4); None where all agree."""
    newest = max(steps)
    behind = [(p, s) for p, s in enumerate(steps) if s != newest]
    if not behind:
        return None
    listed = ", ".join(f"process {p}: step {s}" for p, s in behind[:4])
    return (f"The processes of this job start from different steps ({listed}"
            f"{', ...' * (len(behind) > 4)}; the others: step {newest}): the hosts list "
            f"different checkpoints in {directory} (a shared filesystem whose caches lag); "
            "start the job again once every host sees the same files.")


def _note_earlier_best(run: _Run) -> None:
    """Notes the 'best' checkpoints an earlier session saved after the step this one starts
    from (restored, or 0: a fresh state), and that session's records after it."""
    run.earlier_best = frozenset(s for s in run.ckpts.steps("best") if s > run.step)
    run.resumed_at = run.step
    if run.earlier_best and jax.process_index() == 0:
        # Process 0 only: it drops these records later (MetricWriter), perhaps before
        # another process read them; its reading decides for all
        # (first_process_decides).
        run.earlier_records = _records_after(run.workdir, run.step)


def _records_after(workdir: str, step: int) -> dict[int, dict[str, Any]]:
    """The evaluations recorded after ``step`` (metrics.jsonl, validation.jsonl), by step;
    the newest of each step."""
    records = {}
    for name in (metrics_lib.METRICS_FILE, metrics_lib.VALIDATION_FILE):
        for record in metrics_lib.read_metrics(workdir, name):
            at = record.get("step")
            if isinstance(at, int) and at > step:
                records[at] = {**records.get(at, {}), **record}
    return records


def _check_steps_per_epoch(run: _Run, meta: dict[str, Any]) -> None:
    """Refuses a checkpoint saved with another number of steps per epoch (another batch size
    or training-set size): the step it reached would be read as another epoch, and the
    learning-rate schedule and the metrics records would not line up with what it trained."""
    step, epoch, spe = int(meta["step"]), float(meta.get("epoch") or 0), run.setup.steps_per_epoch
    if epoch <= 0 or abs(step / epoch - spe) < 0.5:
        return
    changed = _changes_since_run_json(run)
    raise errors.ConfigError(
        f"The checkpoint at step {step} in {run.workdir}/checkpoints was saved at epoch "
        f"{epoch:g}, {round(step / epoch)} steps per epoch; this config makes {spe} steps per "
        "epoch" + (f" ({changed})" if changed else "") + ", so its epochs, learning-rate "
        "schedule and metrics would not line up. Resume with the batch size and data it was "
        "trained with, or train in a fresh --workdir.")


def _recorded_model(run: _Run) -> dict[str, Any]:
    """run.json's ``config.model`` ({} where there is none or it is unreadable:
    _write_run_json refuses an unreadable one)."""
    try:
        old = (evaluate_lib.read_run_json(run.workdir) or {}).get("config", {})
    except (OSError, errors.Error):
        return {}
    model = old.get("model") if isinstance(old, dict) else None
    return model if isinstance(model, dict) else {}


def _check_same_shortcut(run: _Run) -> None:
    """Refuses to resume with another ``model.shortcut`` than run.json records: the
    option-A shortcuts have no parameters, so the checkpoint restores, but the rest of the
    run would train another network. A run recorded before 'A-avg' became the default
    records 'A' (subsampling), and the same command now gives 'A-avg'."""
    recorded = _recorded_model(run).get("shortcut")
    new = run.config.model.get("shortcut")
    if recorded is None or new is None or recorded == new:
        return
    why = (" ('A-avg' is the default now; runs recorded before it have 'A')"
           if (recorded, new) == ("A", "A-avg") else "")
    raise errors.ConfigError(
        f"The run in {run.workdir} was trained with model.shortcut={recorded!r} (run.json) "
        f"and this config has {new!r}{why}: the rest of the run would train another network. "
        f"Resume it as trained with --config.model.shortcut={recorded}, or train in a fresh "
        "--workdir.")


def _check_same_initialization(run: _Run) -> None:
    """Refuses to resume with another ``model.initialization`` than run.json records (a run
    recorded before the field: 'ours'): the restored parameters keep the one they were
    drawn with, and run.json, which would record the new one (unwarned for a run that
    predates the field), would mislabel the run."""
    model, new = _recorded_model(run), run.config.model.get("initialization")
    if not model or new is None:
        return
    recorded = config_lib.with_absent_defaults({"model": model})["model"]["initialization"]
    source = "run.json" if "initialization" in model else "run.json, from before the field"
    if recorded != new:
        raise errors.ConfigError(
            f"The run in {run.workdir} was initialised with model.initialization={recorded!r} "
            f"({source}) and this config has {new!r}: its parameters are restored as trained, "
            f"so the new one would only mislabel the run. Resume it with "
            f"--config.model.initialization={recorded}, or train in a fresh --workdir.")


# A ViT's or ConvNeXt's layer_scale_init where run.json lacks the field (a ViT recorded
# before it had none; the ConvNeXt has always recorded its own).
_ABSENT_LAYER_SCALE = {"vit": None, "convnext": 1e-6}


def _check_same_layer_scale(run: _Run) -> None:
    """Refuses to resume a ViT or ConvNeXt with another ``model.layer_scale_init`` than
    run.json records. It only starts the gammas, which are restored as trained: the
    checkpoint restores (one start for another), and run.json and the curves' title
    ('layer scale 0.1 then layer scale 0.5 from epoch 2') would say the run changed
    network. Adding or removing the layer scale changes the parameters and fails to
    restore first; None and 0 are the same (none)."""
    model, m = _recorded_model(run), run.config.model
    name = m.get("name")
    if not model or name not in _ABSENT_LAYER_SCALE or model.get("name") != name:
        return
    recorded = model.get("layer_scale_init", _ABSENT_LAYER_SCALE[name])
    new = m.get("layer_scale_init")
    if (recorded or 0) == (new or 0):
        return
    raise errors.ConfigError(
        f"The run in {run.workdir} started its layer scales at model.layer_scale_init="
        f"{recorded!r} (run.json) and this config has {new!r}: its gammas are restored as "
        f"trained, so the new value would only mislabel the run. Resume it with "
        f"--config.model.layer_scale_init={recorded}, or train in a fresh --workdir.")


def _check_same_selection(run: _Run, best: dict[str, Any] | None) -> None:
    """Refuses to resume with another ``select_best_by`` than the restored best was chosen
    by: each evaluation would be compared with a number of the other metric (a training
    error with the best validation error), and 'best' would hold checkpoints of both."""
    metric = config_lib.SELECT_BEST_BY[run.config.select_best_by]
    if not isinstance(best, dict) or best.get("metric") in (None, metric):
        return
    by = {m: name for name, m in config_lib.SELECT_BEST_BY.items()}.get(best["metric"])
    if by is None:  # A metric this version does not know: nothing to compare with.
        return
    raise errors.ConfigError(
        f"The run in {run.workdir} chose its best checkpoint (step {best.get('step')}) with "
        f"select_best_by={by!r} and this config has {run.config.select_best_by!r}: its "
        f"evaluations would be compared with the best {best['metric']}. Resume it with "
        f"--config.select_best_by={by}, or train in a fresh --workdir.")


def _changes_since_run_json(run: _Run, most: int = 8) -> str:
    """``'dataset: 'cifar10' -> 'cifar100'; model.depth: 8 -> 14'``: the fields of
    ``run.config`` that differ from the workdir's run.json ('' if none or unreadable)."""
    try:
        old = (evaluate_lib.read_run_json(run.workdir) or {}).get("config", {})
    except (OSError, errors.Error):  # Unreadable: the message it completes stands alone.
        return ""
    changes = config_lib.config_changes(old, json.loads(run.config.to_json()))
    listed = [f"{k}: {v['old']!r} -> {v['new']!r}" for k, v in changes.items()
              if _has_field(old, k)]
    more = f"; and {len(listed) - most} more" if len(listed) > most else ""
    return "; ".join(listed[:most]) + more


# The config fields that choose the data: changing one on resume changes the data on purpose
# (and is warned about); otherwise (the data_dir or an image folder's path may change) a
# resumed run must find the data it trained on.
_DATA_FIELDS = ("dataset", "label", "fake_data")


def _data_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """:data:`_DATA_FIELDS`, and ``seed`` where the data is fake: its pixels and labels are
    drawn from the seed (written anew for another one), so another seed is other data on
    purpose, as another fake_data size is, and not another split of the same images (with
    train_on_all, which holds none out, it was refused as one)."""
    return _DATA_FIELDS + ("seed",) * bool(config_lib.fake_train_size(config))


# The fields that choose how the same data is split into training and validation images:
# a change that moves images between the splits is refused (_check_same_data).
_SPLIT_FIELDS = ("validation_size", "seed", "train_on_all")


# What run.json keeps of each earlier session in 'history'; 'implementation' too, as what
# 'auto' resolved to depends on the platform: a session resumed on another ran another.
_SESSION_FIELDS = ("started_at", "start_step", "config_changes", "code_version", "devices",
                   "implementation")


def _has_field(config: dict[str, Any], dotted: str) -> bool:
    """Whether the nested dict ``config`` has the field ``'a.b.c'``."""
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return False
        config = config[part]
    return True


def _write_run_json(run: _Run, ds: data_lib.Dataset) -> None:
    """Writes run.json: the current session's config and metadata at the top level, and in
    ``history`` one entry per earlier session (``_SESSION_FIELDS``). ``config_changes`` (top
    level and in each entry) lists the fields that session changed relative to the one
    before it, as ``{'field': {'old': ..., 'new': ...}}``, so the config every checkpoint
    was trained with can be recovered."""
    path = os.path.join(run.workdir, evaluate_lib.RUN_FILE)
    meta = setup_lib.run_metadata(run.config, ds, run.setup.mesh, run.setup.implementation)
    changes: dict[str, Any] = {}
    old = evaluate_lib.read_run_json(run.workdir, fix=_RUN_JSON_FIX)
    if old is None and run.step > 0 and jax.process_index() == 0:
        warnings.warn(_missing_run_json(path, run.step, run.config.dataset), logs.RunWarning)
    if old is not None:
        changes = config_lib.config_changes(old.get("config", {}), meta["config"])
        data_changed = any(k.split(".")[0] in _data_fields(run.config)
                           and not config_lib.moved_folder(v)
                           for k, v in changes.items())
        if run.step > 0 and "data" in old and not data_changed:
            _check_same_data(run, old["data"], ds, changes)
        # A field the old run.json lacks was added to the code since, and a relative data
        # path is now recorded absolute: recorded, not warned.
        known = {k: v for k, v in changes.items() if _has_field(old.get("config", {}), k)
                 and setup_lib.absolute_data_path(k, v["old"]) != v["new"]}
        run.config_changes = tuple(known)
        if known and run.step > 0 and jax.process_index() == 0:
            listed = "; ".join(f"{k}: {v['old']!r} -> {v['new']!r}" for k, v in known.items())
            warnings.warn(
                f"Resuming at step {run.step} with a changed config: {listed} (run.json records "
                "each session's changes in 'history').",
                logs.RunWarning,
            )
        meta["history"] = old.get("history", []) + [{k: old.get(k) for k in _SESSION_FIELDS}]
    meta.update(started_at=time.time(), start_step=run.step, config_changes=changes)
    _write_json(path, meta)
    try:
        run.title = plots.curve_title(meta, run.setup.steps_per_epoch)
    except Exception:  # noqa: BLE001  An odd history (edited by hand, an old version's) must
        run.title = None  # not stop a run over a title: this session's config names it.


def _check_same_data(run: _Run, recorded: dict[str, Any], ds: data_lib.Dataset,
                     changes: dict[str, Any]) -> None:
    """Refuses data other than the run trained on (``recorded``: run.json's ``data``), and
    a change of :data:`_SPLIT_FIELDS` that moves images between its training and
    validation splits: images validated on would have been trained on, or the reverse, and
    the run's validation figures (and the best chosen by them) would be mislabelled. One
    that moves none (with ``train_on_all``, which holds none out) is only warned about."""
    split = {k: v for k, v in changes.items() if k in _SPLIT_FIELDS}
    try:
        evaluate_lib.check_same_data(
            recorded, ds, run.config, run.workdir,
            fix="restore the data this run trained on to resume it, or train in a new "
                "--workdir")
    except errors.DataError:
        if not split:
            raise
        listed = "; ".join(f"{k}: {v['old']!r} -> {v['new']!r}" for k, v in split.items())
        flags = " ".join(f"--config.{k}={v['old']}" for k, v in split.items())
        raise errors.ConfigError(
            f"The run in {run.workdir} was split into training and validation images by "
            f"another config than this one ({listed}): resumed, it would validate on images "
            "it trained on, or train on ones it validated on, mislabelling its validation "
            f"errors. Resume it as it trained with {flags}, or train in a fresh --workdir."
        ) from None


def _missing_run_json(path: str, step: int, dataset: str) -> str:
    """The warning for a run.json missing beside checkpoints that reach ``step``: what was
    not checked, and that the validation split is held out anew by this config (per class
    for an image folder, whose earlier runs may have held it out at random)."""
    how = (" per class" if dataset.startswith(data_lib.IMAGE_FOLDER_PREFIX) else "")
    return (f"{path} is missing although the checkpoints reach step {step}: written anew "
            "from this command's config; the config and data of the earlier sessions are "
            "unknown, so they were not checked against it, and the validation split is held "
            f"out anew{how} by this config's seed and validation_size (if the earlier sessions "
            "held out others, some validation images were trained on).")


# What to do about a damaged run.json (read when resuming, and before writing it anew).
_RUN_JSON_FIX = ("it records the config and data of this run's checkpoints: restore it from a "
                 "copy, or move it aside to resume with this command's config (unchecked)")


def _recorded_data(workdir: str) -> dict[str, Any] | None:
    """The ``data`` record of the workdir's run.json: a resumed run rebuilds its validation
    split as recorded. None for a new run.

    Raises:
      errors.CheckpointError: run.json is damaged (before any data is loaded).
    """
    return (evaluate_lib.read_run_json(workdir, fix=_RUN_JSON_FIX) or {}).get("data")


def _split_sizes(ds: data_lib.Dataset) -> str:
    """``'40 training, 8 validation, 8 test images'``."""
    held = 0 if ds.validation is None else len(ds.validation)
    return f"{len(ds.train)} training, {held} validation, {len(ds.test)} test images"


def _prepare(config: ml_collections.ConfigDict, workdir: str) -> tuple[_Run, data_lib.Dataset]:
    ds = setup_lib.load_data(config, workdir, _recorded_data(workdir))
    if jax.process_count() > 1:  # each host read its own copy: the same examples?
        distributed.check_same_data(data_lib.fingerprint(ds), _split_sizes(ds))
    if config.select_best_by == "validation" and ds.validation is None:
        raise errors.ConfigError(
            "The dataset has no validation split (validation_size=0?); set "
            "--config.select_best_by=test or train."
        )
    setup = setup_lib.build_for_dataset(config, ds)
    if jax.process_index() == 0:
        r = setup.implementation
        how = implementation_lib.describe(r, config.model)
        why = "" if implementation_lib.is_constant_depth(config.model) else f"; {r.reason}"
        print(f"Skipping implementation ({r.requested} on {r.platform}): {how}{why}", flush=True)
        if r.platform == "cpu" and (line := hugepages.hint()):
            print(line, flush=True)
    splits = {
        "train": data_lib.put_on_devices(ds.train, setup.mesh),
        "test": data_lib.put_on_devices(ds.test, setup.mesh),
    }
    if ds.validation is not None:
        splits["validation"] = data_lib.put_on_devices(ds.validation, setup.mesh)
    ckpts = checkpoint_lib.Checkpoints(
        workdir, keep=config.keep_checkpoints, async_save=config.async_checkpointing
    )
    run = _Run(
        config,
        workdir,
        setup,
        splits,
        np.float32(ds.mean),
        np.float32(ds.std),
        ckpts,
        writer=None,
        state=None,
    )
    return run, ds


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints).

    Writes ``run.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints*/``,
    ``summary.json`` and ``error.png``/``loss.png``.

    Returns:
      The summary: the final epoch's record, the best-by-validation epoch with its test
      error (the number the paper reports), ``train_step_compile_s`` (tracing, lowering
      and compiling the train step ahead of the first epoch), training time, and
      ``compilation``: every program compiled (or loaded from the persistent cache) this
      session, the backend seconds spent on them (``compile_s``), cache hits and the cache
      directory.

    Raises:
      NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    """
    config = setup_lib.absolute_data_paths(config_lib.validate(config))
    if not str(workdir).strip():  # abspath('') is the current directory: trained into it
        raise errors.WorkdirError(f"The workdir is empty ({workdir!r}); give the directory "
                                  "the run writes its checkpoints, metrics and plots to.")
    workdir = os.path.abspath(os.path.expanduser(workdir))  # '~/runs/x': not a './~' folder
    _refuse_a_sweep_root(workdir)
    _refuse_a_run_s_folder(workdir)
    _refuse_to_leave_its_sweep(config, workdir)
    created = workdir_lib.prepare_workdir(workdir) if jax.process_index() == 0 else False
    lock = workdir_lib.WorkdirLock(workdir)

    def remove_unused() -> None:
        """A run that failed before writing anything but its fake data leaves no workdir.
        Only while it holds the lock: a run that locked the new workdir first uses it, and
        one may start there once it is released."""
        if created and lock.held:
            workdir_lib.remove_unused(workdir, disposable=(setup_lib.FAKE_DATA_DIR,))

    def stopped() -> None:  # Ended at once because another process failed: no finally runs.
        remove_unused()
        lock.release()

    # Registered until the lock is released, which a failure may leave to leave_job: a
    # process ended at once before that (the peer watch) releases it all the same.
    registered = contextlib.ExitStack()
    registered.enter_context(distributed.cleanup_if_stopped(stopped))

    def release() -> None:
        lock.release()
        registered.close()

    try:
        lock.acquire()
        return _run_locked(config, workdir)
    except BaseException as e:
        if (isinstance(e, NonFiniteLossError)  # a sweep's diverged run, resumed by hand
                and os.path.exists(os.path.join(workdir, DIVERGED_FILE))):
            with contextlib.suppress(OSError):  # its error says what matters
                write_divergence(workdir, e)  # where it diverged now: not a stale record
        if not distributed.closes_pending():  # else: a save still writes there
            remove_unused()
        raise
    finally:
        # A failed run's save that finishes after the failure is reported
        # (distributed.close_after_reporting) keeps the workdir until it is committed:
        # a run started meanwhile would set it aside as an unfinished save.
        if not (distributed.closes_pending() and distributed.close_after_reporting(release)):
            release()


def _refuse_a_sweep_root(workdir: str) -> None:
    """Refuses to start a run in a directory that holds runs in its subdirectories (a
    sweep's root, ``train.py --workdir runs/pL`` meant to add one run to it): the run's
    files went in among the sweep's runs, and ``sweep.py`` then refused that root as one
    run's workdir. A run already there (its ``run.json``, or its checkpoints: a damaged
    ``run.json`` moved aside into a subdirectory) resumes as before."""
    if any(os.path.exists(os.path.join(workdir, name))
           for name in (evaluate_lib.RUN_FILE, "checkpoints")):
        return
    runs = evaluate_lib.runs_inside(workdir)
    if runs:
        names = ", ".join(os.path.basename(r) for r in runs[:3]) + (
            f" and {len(runs) - 3} more" if len(runs) > 3 else "")
        raise errors.WorkdirError(
            f"The workdir {workdir} holds runs in its subdirectories ({names}; a sweep's "
            "root?), not one run: a run there would mix its files with theirs, and the sweep "
            "could not be continued; give this run a directory of its own (e.g. "
            f"{os.path.join(workdir, '<name>')}).")


def _refuse_a_run_s_folder(workdir: str) -> None:
    """Refuses a workdir in a folder another run manages (``runs/a/checkpoints/b``): that
    run took the new run's directory for a damaged checkpoint ('Skipping the latest
    checkpoint at step 99 ... moved to checkpoints_corrupt/'), or deleted it."""
    evaluate_lib.refuse_a_run_s_folder(
        workdir, f"The workdir {workdir}", "it would take this run for a damaged checkpoint "
        "and move it aside, or delete it", "give this run a directory outside it.")


def _refuse_to_leave_its_sweep(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses to resume a sweep's run that diverged (its :data:`DIVERGED_FILE`) with a
    config its sweep would refuse (``--config.learning_rate`` lowered, as the divergence's
    error suggests): trained on in place, the run no longer matched its sweep, whose every
    later command then stopped on it (and its record said where it diverged before). The
    line says to train a copy. The same config resumes, as in the sweep."""
    if not os.path.exists(os.path.join(workdir, DIVERGED_FILE)):
        return
    from stochastic_depth_jax.training import sweep as sweep_lib  # it imports this module

    try:
        changes = sweep_lib.config_differences(workdir, config)
    except errors.Error:  # a damaged or refused run.json: said below, as for any run
        return
    if changes:
        copy = _outside_its_sweep(workdir)
        raise errors.ConfigError(
            f"{workdir} is a sweep's run that diverged ({DIVERGED_FILE}); resumed with another "
            f"config ({'; '.join(changes)}) it would no longer match its sweep, which would "
            f"then refuse its --root. Train a copy outside the sweep instead (cp -r "
            f"{shlex.quote(workdir)} {shlex.quote(copy)} && rm "
            f"{shlex.quote(os.path.join(copy, DIVERGED_FILE))}, then --workdir "
            f"{shlex.quote(copy)}), or sweep this config in a new --root.")


def _outside_its_sweep(workdir: str) -> str:
    """Where a copy of a sweep's run goes to be trained on its own: beside the sweep's root
    (a directory in the root is one of its runs, collected into its figures), named after
    both ('<root>_<run>_retry', or '_retry2', ... where an earlier retry has that name:
    ``cp -r`` would copy the run into it)."""
    run_dir = os.path.abspath(workdir)
    root = os.path.dirname(run_dir)
    stem = os.path.join(os.path.dirname(root),
                        f"{os.path.basename(root)}_{os.path.basename(run_dir)}_retry")
    copy, n = stem, 1
    while os.path.lexists(copy):
        n += 1
        copy = f"{stem}{n}"
    return copy


def _run_locked(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    if jax.process_index() == 0:  # The lock's holder: no other process writes these.
        workdir_lib.remove_stale_temporaries(workdir, OWN_FILES)
    mesh = distributed.make_mesh()  # Fail fast, before any data is prepared.
    distributed.check_batch_size(config.batch_size, mesh)
    distributed.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    setup_lib.check_groups(config, mesh)
    cache = compilation.choose(config.compilation_cache_dir)
    with cache.in_use(), compilation.CompileStats() as stats:
        summary, trained = _train_and_evaluate(config, workdir, cache.announce)
    if not trained:  # A finished run: its summary stays as its training sessions wrote it.
        return summary
    summary["compilation"] = {**stats.to_json(), **cache.to_json()}
    _write_json(os.path.join(workdir, SUMMARY_FILE), summary)
    if jax.process_index() == 0:
        print(f"Compiled {stats.programs} programs in {stats.compile_s:.1f}s "
              f"({stats.cache_hits} loaded from the "
              f"{'read-only ' * bool(cache.read_only_because)}persistent cache"
              f"{' at ' + cache.path if cache.path else ', which is off'}); "
              f"tracing and lowering {stats.trace_and_lower_s:.1f}s.", flush=True)
    return summary


def _total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """The step the run ends at: ``num_epochs`` epochs, or ``max_steps`` if that is fewer."""
    total = config.num_epochs * steps_per_epoch
    return min(total, config.max_steps) if config.max_steps else total


def _saved_summary(workdir: str, step: int) -> dict[str, Any] | None:
    """The run's summary.json if it is that of the session that ended at ``step`` (the
    restored checkpoint's); None where it has none, it is damaged (cut short, or JSON but
    not an object) or it is an earlier session's (a finished run extended, stopped, then
    given an end at the step it reached: its summary named the earlier end, for good): the
    run then counts as unfinished and writes it anew."""
    try:
        with open(os.path.join(workdir, SUMMARY_FILE)) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("steps") == step else None


def _nothing_to_train(run: _Run, summary: dict[str, Any],
                      best_measured: bool = False) -> dict[str, Any]:
    """A restart of a run that already reached this config's end: says so and returns the
    saved summary, leaving summary.json (but for ``best_measured``: its best's errors, added
    by :func:`_finished_best_measured`) and run.json (its recorded config) as they are."""
    c, spe, step = run.config, run.setup.steps_per_epoch, run.step
    if jax.process_index() == 0:
        end = f"num_epochs={c.num_epochs}" + (f", max_steps={c.max_steps}" if c.max_steps else "")
        kept = ("its run.json, and its summary.json but for its best's errors, are"
                if best_measured else "its summary.json and run.json are")
        print(
            f"Nothing to train: the run in {run.workdir} already reached step {step} (epoch "
            f"{step / spe:g}) and {end} ends at step {_total_steps(c, spe)}; {kept} left as "
            "they are. To train further, raise --config.num_epochs"
            + (" and --config.max_steps." if c.max_steps else "."),
            flush=True,
        )
    return summary


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        announce: Callable[[], None] = lambda: None
                        ) -> tuple[dict[str, Any], bool]:
    """``(summary, trained)``; ``trained`` is False for a run that had already finished.
    ``announce()`` (the compilation cache's notices) is called once the run is known to
    train, before its description: a finished run does not warn about a cache it does not
    use."""
    run, ds = _prepare(config, workdir)
    failed = False
    try:
        _resume_or_init(run, ds.image_shape)
        _check_same_start(run)
        if run.step >= _total_steps(config, run.setup.steps_per_epoch):
            saved = _saved_summary(workdir, run.step)  # None: written below
            _check_same_summary(run, saved is not None)
            if saved is not None:
                measured = _finished_best_measured(run, saved, ds)
                return _nothing_to_train(run, measured or saved, measured is not None), False
        announce()
        _measure_unevaluated_best(run, ds.image_shape)
        _write_run_json(run, ds)
        if jax.process_index() == 0:
            print(_describe(run.config, run.state.params, ds), flush=True)
            if late := config_lib.unreached_lr_drops(run.config):
                warnings.warn(late, logs.RunWarning)
        # The host copy of every split: training reads the device copies (run.splits) from
        # here on, so it is not kept for the whole run (on a CPU, a second copy of the data
        # in the same memory).
        del ds
        spe = run.setup.steps_per_epoch
        run.writer = metrics_lib.MetricWriter(
            workdir,
            tensorboard=config.write_tensorboard,
            resume_epoch=_epoch_reached(run.step, spe),
            resume_step=run.step,
        )
        run.validation_writer = _validation_writer(run)
        with stopping.StopSignals() as run.stop:
            return _train(run), True
    except stopping.Stopped:  # An agreed stop: every process saved and waited.
        raise
    except BaseException:
        failed = True
        raise
    finally:
        try:
            _close_writers(run, quiet=failed)
        finally:
            # Waits for pending saves: the last good checkpoint is committed. After a failure
            # in a multi-process job, once the other processes were told (they take part).
            if not (failed and distributed.close_after_reporting(run.ckpts.close)):
                run.ckpts.close()


def _close_writers(run: _Run, quiet: bool) -> None:
    """Closes the metrics writers, each one even where another fails. ``quiet``: an error
    is on its way up, the one to report; a writer's ``OSError`` (a full disk fails
    TensorBoard's last flush as it failed its first) is dropped rather than put in its
    place, as it was, and with the saves in flight left unwaited for."""
    failure = None
    for writer in (run.writer, run.validation_writer):
        if writer is not None:
            try:
                writer.close()
            except OSError as e:
                failure = failure or e
    if failure is not None and not quiet:
        raise failure


def _epoch_reached(step: int, steps_per_epoch: int) -> int | float:
    """The epoch ``step`` reached as metrics.jsonl labels it: whole at an epoch's end, else
    the fraction (a run cut short by ``max_steps``). A resumed run keeps the records up to
    it: the record of a ``max_steps`` end is the restored checkpoint's own (dropping it when
    the run is extended left a 'best' of that step that no record described)."""
    return step // steps_per_epoch if step % steps_per_epoch == 0 else step / steps_per_epoch


def _validation_writer(run: _Run) -> metrics_lib.MetricWriter | None:
    """validation.jsonl's writer with ``eval_every_steps``; also without, where an earlier
    session wrote one: its records after the restored step are dropped all the same."""
    path = os.path.join(run.workdir, metrics_lib.VALIDATION_FILE)
    if not (run.config.get("eval_every_steps", 0) or os.path.exists(path)):
        return None
    return metrics_lib.MetricWriter(run.workdir, tensorboard=False, resume_step=run.step,
                                    filename=metrics_lib.VALIDATION_FILE)


def _compile_train_step(run: _Run) -> Callable[..., Any]:
    """``(state, split, step) -> state``; compiled ahead of time unless in compact mode.

    Compact mode compiles one program per bucket tuple as the tuples appear.
    """
    step_fn = run.setup.train_step
    if isinstance(step_fn, step_lib.CompactTrainStep):
        return step_fn
    compiled = step_fn.lower(run.state, run.splits["train"]).compile()
    return lambda state, split, step: compiled(state, split)


def _record_of_the_end(run: _Run) -> dict[str, Any] | None:
    """The record of the step a run with nothing to train ends at: metrics.jsonl's last, or,
    where that is of an earlier step (a run stopped mid-epoch, then given an end at or
    before the step it reached), that step evaluated and recorded as a run ending there
    does, rather than 'Finished epoch 3 (14 steps)' with epoch 3's record (step 12). Process
    0's reading decides for all: the evaluation is collective."""
    # The last epoch's record: a line without a step (a note added by hand) is none.
    last = next((r for r in reversed(metrics_lib.read_metrics(run.workdir)) if "step" in r),
                None)
    if not first_process_decides(last is None or last["step"] != run.step):
        return last
    spe = run.setup.steps_per_epoch
    return _end_of_epoch(run, -(-run.step // spe), 0.0, 0, is_last=True)


def _train(run: _Run) -> dict[str, Any]:
    c, spe = run.config, run.setup.steps_per_epoch
    total = _total_steps(c, spe)
    t0 = time.perf_counter()
    compiled = _compile_train_step(run) if run.step < total else None
    compile_time, train_time, record = time.perf_counter() - t0, 0.0, None
    try:
        while run.step < total:
            epoch = run.step // spe + 1
            end = min(epoch * spe, total)
            timed = end - run.step  # Fewer than the epoch's steps where it resumes mid-epoch.
            epoch_time = _train_epoch(run, compiled, epoch, end)
            train_time += epoch_time
            record = _end_of_epoch(run, epoch, epoch_time, timed, is_last=end == total)
            if end < total:
                _stop_if_requested(run, end)
    except NonFiniteLossError as e:
        # The run ends here: its curves show every epoch before it, not those drawn up to
        # PLOT_EVERY_S earlier (dozens of a fast GPU's epochs), and where it diverged.
        _draw_plots(run, force=True, ending=True, diverged=e)
        # Every process raises this at the same step, and the first to report it ends
        # the others: process 0 was ended in the middle of drawing them. Waited for up to
        # DRAWING_WAIT_S: a drawing that hangs leaves the others to report the divergence
        # (a device collective here waited for good: the job hung silent).
        distributed.wait_for_all("diverged_curves_drawn", DRAWING_WAIT_S)
        raise
    beyond = sorted(s for s in run.earlier_best if s > run.step)
    if beyond:  # This run ends before them: the best it reports is another checkpoint.
        _supersede_best(run, beyond, f"they lie after this run's end (step {run.step})")
    if record is None:  # Nothing left to do: the workdir holds a run at (or past) its end.
        record = _record_of_the_end(run)
    run.ckpts.wait()
    summary = {
        "final": record,
        "best": run.best,
        "steps": run.step,
        "steps_per_epoch": spe,
        # Wall seconds to trace, lower and compile the train step before the first epoch
        # (0 in compact mode, whose programs compile as bucket tuples appear); every program
        # of the session (evaluation, initialisation, ...) is in 'compilation.compile_s'.
        "train_step_compile_s": compile_time,
        "train_time_s_this_session": train_time,
    }  # Written once, with the compile counts, by _run_locked.
    _draw_plots(run, force=True, ending=True)
    return summary
