"""A p_L sweep over depths as separate, resumable runs, and the paper's figures from them.

Each (depth, p_L) pair is an ordinary training run in its own workdir,
``<root>/depth<d>_pL<p>`` (e.g. ``depth20_pL0.5``), so a sweep resumes like a single run: a
finished run (its ``summary.json`` records every step of its config) is not trained again
(run again only where an earlier version left its best without a test error, which that
measures), an interrupted one continues from its newest checkpoint through
``train_and_evaluate``. A run
recorded with a different config is refused (:func:`check_same_config`), except a longer
``num_epochs``/``max_steps``, which extends it. A run whose loss or parameters become
non-finite is recorded as diverged (``diverged.json`` in its workdir) and the sweep goes on
with the next run; a rerun skips it, and :func:`check_diverged` names such runs at the end.
Only the block-wise ResNets are swept (:func:`require_sweepable`): the ViT and ConvNeXt have
no p_L.
:func:`collect` reads the runs' own records and :func:`write_figures` draws Fig. 8, Fig. 7
and the training-time table into ``<root>/figures``.

The library does not load configs by name (``configs/`` is the scripts'); ``sweep.py`` at the
repository root builds one config per run and calls :func:`run_sweep`.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import ml_collections

from stochastic_depth_jax import errors, logs
from stochastic_depth_jax.training import compilation
from stochastic_depth_jax.training import config as config_lib
from stochastic_depth_jax.training import evaluate as evaluate_lib
from stochastic_depth_jax.training import figures
from stochastic_depth_jax.training import implementation as implementation_lib
from stochastic_depth_jax.training import loop as loop_lib
from stochastic_depth_jax.training import metrics as metrics_lib
from stochastic_depth_jax.training import plots
from stochastic_depth_jax.training import progress as progress_lib
from stochastic_depth_jax.training import setup as setup_lib
from stochastic_depth_jax.training import stopping
from stochastic_depth_jax.training import workdir as workdir_lib

__all__ = [
    "run_name",
    "plan",
    "check_overrides",
    "is_finished",
    "require_sweepable",
    "check_same_config",
    "run_sweep",
    "check_diverged",
    "collect",
    "label_series",
    "describe_data",
    "write_figures",
    "FIGURES_DIR",
]

FIGURES_DIR = "figures"
SUMMARY_FILE = loop_lib.SUMMARY_FILE
# Written into a run's workdir when its training diverged (loop.NonFiniteLossError): where,
# the checkpoint kept, and the error. A rerun skips the run instead of diverging again.
DIVERGED_FILE = loop_lib.DIVERGED_FILE


def run_name(depth: int, p_last: float) -> str:
    """The workdir name of one run: ``depth<d>_pL<p>`` (``p`` as ``%g``: 0.5, 1)."""
    return f"depth{int(depth)}_pL{float(p_last):g}"


# The config fields each run's overrides set, and the sweep flag that chooses them.
SWEPT_FIELDS = {"model.depth": "--depths", "model.final_survival_prob": "--p-last"}


def check_overrides(overrides: Sequence[str]) -> None:
    """Refuses a ``--config.`` override of a field the sweep sets per run.

    :func:`plan` appends each run's ``model.depth`` and ``model.final_survival_prob`` after
    the user's overrides, so an override of either would be silently replaced.

    Raises:
      errors.ConfigError: naming the field and the sweep flag that chooses it, or an
        override without a value (read as :func:`config_lib.apply_overrides` reads it).
    """
    for item in overrides:
        field, _ = config_lib.split_override(item)
        if field in SWEPT_FIELDS:
            raise errors.ConfigError(
                f"{item!r} would be replaced in every run: the sweep sets {field} from "
                f"{SWEPT_FIELDS[field]}; drop the override and list the values in "
                f"{SWEPT_FIELDS[field]}.")


def plan(depths: Sequence[int], p_lasts: Sequence[float]) -> list[tuple[str, list[str]]]:
    """``(name, config overrides)`` for every (depth, p_L) pair, depths outermost.

    Raises:
      errors.ConfigError: an empty list, a p_L outside (0, 1], or two pairs that would share
        a run directory (a value listed twice, or p_L values equal to 6 significant digits):
        the second would be reported finished with the first one's results.
    """
    for flag, values in (("--depths", depths), ("--p-last", p_lasts)):
        if not values:
            raise errors.ConfigError(f"{flag} lists no values; give at least one, e.g. "
                                     f"{flag} {'20,32' if flag == '--depths' else '0.5,1.0'}.")
    for p in p_lasts:
        if not 0.0 < float(p) <= 1.0:
            raise errors.ConfigError(f"p_L must be in (0, 1] (1.0 = constant depth), got {p!r}.")
    runs, seen = [], {}
    for d in depths:
        for p in p_lasts:
            name = run_name(d, p)
            if name in seen:
                twice = (f"depth {d}, p_L {p} is listed twice" if seen[name] == (d, p) else
                         f"(depth, p_L) {seen[name]} and {(d, p)} would share the run {name}")
                raise errors.ConfigError(
                    f"{twice}; list each depth and each p_L once (p_L values must differ in "
                    "their first 6 significant digits).")
            seen[name] = (d, p)
            runs.append((name, [f"--config.model.depth={int(d)}",
                                f"--config.model.final_survival_prob={float(p)!r}"]))
    return runs


def require_sweepable(config: ml_collections.ConfigDict, train: str = "train.py") -> None:
    """Refuses a config whose model has no depth / p_L to sweep (e.g. the ViT), advising
    ``train``, the command that trains it (``sweep.py`` gives the config and overrides).

    Raises:
      errors.ConfigError: ``model.name`` is not a block-wise ResNet (``config_lib.MODELS``).
    """
    name = config.model.get("name", "cifar_resnet")
    if name not in config_lib.MODELS:
        raise errors.ConfigError(
            f"The sweep is over model.depth and p_L (model.final_survival_prob) of the block-wise "
            f"ResNets {sorted(config_lib.MODELS)}; this config's model is {name!r}. Train it "
            f"with {train}, its drop path set by --config.model.drop_path_rate.")


# Fields that change neither the training nor its results: a run may be continued with
# other values. Any other difference (a hyper-parameter, the data, the model) is refused.
_OPERATIONAL_FIELDS = frozenset({
    "data_dir", "download", "checkpoint_every_epochs", "checkpoint_every_steps",
    "keep_checkpoints", "async_checkpointing", "compilation_cache_dir", "log_every_steps",
    "progress_bar", "write_tensorboard", "write_plots",
})


def _not_shorter(field: str, old: Any, new: Any) -> bool:
    """True if ``new`` asks for at least as much training as ``old`` (0 = no step cap)."""
    if field == "num_epochs":
        return isinstance(old, int) and new >= old
    return new == 0 or (old != 0 and new >= old)  # max_steps


def check_same_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses to reuse ``workdir`` if its ``run.json`` records a different config.

    Allowed: the fields of ``_OPERATIONAL_FIELDS`` (logging, checkpoint cadence) and a
    longer ``num_epochs`` or ``max_steps`` (the run is resumed and extended, as ``train.py``
    does). Nothing is checked where no ``run.json`` exists yet.

    Raises:
      errors.ConfigError: naming the differing fields, the run directory and the fix.
    """
    changes = config_differences(workdir, config)
    if changes:
        # A sweep recorded before 'A-avg' became the default: the same command changes it.
        continued = (" (recorded before 'A-avg' became the default: add "
                     "--config.model.shortcut=A to continue it)"
                     if "model.shortcut: 'A' -> 'A-avg'" in changes else "")
        raise errors.ConfigError(
            f"{workdir} holds a run trained with a different config ({'; '.join(changes)})"
            f"{continued}; use a new --root for this config, or remove {workdir} to retrain it.")


def config_differences(workdir: str, config: ml_collections.ConfigDict,
                       fix: str | None = None) -> list[str]:
    """The differences (``'learning_rate: 0.1 -> 0.05'``) between the config ``workdir``'s
    ``run.json`` records and ``config`` that :func:`check_same_config` refuses; none where
    there is no ``run.json`` yet. ``fix``: what to do about a damaged ``run.json``."""
    if not os.path.exists(os.path.join(workdir, evaluate_lib.RUN_FILE)):
        return []
    old_config, _ = evaluate_lib.load_run_config(
        workdir, fix=fix or f"restore it from a copy, or remove {workdir} to retrain it")
    # The new config as training records it (an image folder's relative path or file://
    # URL made the absolute path), else the same command would be refused the second time.
    config = setup_lib.absolute_data_paths(config)
    # Both through JSON, as run.json stores them (tuples become lists); a field added since
    # the run was recorded is what it was trained with.
    old, new = (config_lib.with_absent_defaults(json.loads(c.to_json()))
                for c in (old_config, config))
    changes = []
    for field, change in config_lib.config_changes(old, new).items():
        a, b = change["old"], change["new"]
        if field in _OPERATIONAL_FIELDS:
            continue
        if field in ("num_epochs", "max_steps"):
            if _not_shorter(field, a, b):
                continue
            changes.append(f"{field}: {a!r} -> {b!r} (shorter; a longer one extends the run)")
            continue
        changes.append(f"{field}: {a!r} -> {b!r}")
    return changes


def _total_steps(summary: dict[str, Any], config: ml_collections.ConfigDict) -> int:
    total = config.num_epochs * summary["steps_per_epoch"]
    return min(total, config.max_steps) if config.max_steps else total


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_summary(workdir: str) -> dict[str, Any] | None:
    """The run's ``summary.json``; None if it has none, or (with a warning naming it) if it
    is damaged: the run then counts as unfinished, as training counts it (a rerun of the
    sweep resumes it at its last step and writes the summary anew)."""
    path = os.path.join(workdir, SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            summary = json.load(f)
        if not isinstance(summary, dict):
            raise ValueError("it holds no JSON object")
        wrong = [k for k in ("steps", "steps_per_epoch") if not _is_count(summary.get(k))]
        if wrong:
            raise ValueError(f"no whole number for {' or '.join(map(repr, wrong))}")
    except (OSError, ValueError) as e:
        warnings.warn(f"{path} is damaged ({type(e).__name__}: {e}): the run counts as "
                      "unfinished; rerun the sweep's command to rewrite it (the run resumes "
                      "at its last step).", logs.RunWarning)
        return None
    return summary


def _finished(summary: dict[str, Any] | None, config: ml_collections.ConfigDict) -> bool:
    """Whether ``summary`` (:func:`_read_summary`'s) records every step ``config`` asks for."""
    return summary is not None and summary["steps"] >= _total_steps(summary, config)


def is_finished(workdir: str, config: ml_collections.ConfigDict) -> bool:
    """True if ``workdir`` holds a run that completed every step ``config`` asks for (a
    damaged ``summary.json`` is warned about and counts as unfinished)."""
    return _finished(_read_summary(workdir), config)


def _saved_steps(workdir: str) -> list[int]:
    """The steps of the run's committed checkpoints (``checkpoints/<step>``), in order."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _divergence(workdir: str) -> dict[str, Any] | None:
    """The run's record of its divergence (:data:`DIVERGED_FILE`): None where it has none, or
    where the run has a checkpoint newer than the one kept when it diverged (it was trained
    past that point since, e.g. by ``train.py``). A damaged record is warned about and counts
    as none: the run is trained again (and recorded again if it diverges again)."""
    path = os.path.join(workdir, DIVERGED_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        if not isinstance(record, dict) or not _is_count(record.get("kept_step")):
            raise ValueError("no whole number for 'kept_step'")
    except (OSError, ValueError) as e:
        warnings.warn(f"{path} is damaged ({type(e).__name__}: {e}): the run is trained "
                      "again by the sweep's command (remove the file to silence this).",
                      logs.RunWarning)
        return None
    if max(_saved_steps(workdir), default=0) > record["kept_step"]:
        return None
    return record


def _record_divergence(name: str, workdir: str, error: loop_lib.NonFiniteLossError) -> str:
    """Writes :data:`DIVERGED_FILE` for the run ``name`` that raised ``error`` and warns
    that the sweep goes on; returns the run's status (``'diverged at epoch N'``)."""
    record = loop_lib.write_divergence(workdir, error)
    path = os.path.join(workdir, DIVERGED_FILE)
    status = figures.diverged_label({"diverged": record})
    if jax.process_index() == 0:  # one line for the job, as the run's own error
        warnings.warn(f"{name} {status}: its training loss or parameters became non-finite "
                      f"(recorded in {path}); the sweep goes on with its next run.",
                      logs.RunWarning)
    return status


def _is_diverged(status: str) -> bool:
    """Whether a :func:`run_sweep` status says the run diverged (now or before)."""
    return status.startswith(("diverged", "skipped (diverged"))


# The fixes a run's own errors give that name train.py's --workdir: in a sweep the workdir
# is <root>/<run>, chosen by the sweep. A test reads every text of the package that names
# --workdir and fails on one this table does not reword: add its phrase here.
_SWEEP_WORDS = (
    ("use another --workdir", "give the sweep another --root"),
    ("train in a fresh --workdir", "give the sweep a new --root"),
    ("train in a new --workdir", "give the sweep a new --root"),
    ("or a fresh --workdir", "or give the sweep a new --root"),
    ("the same --workdir", "the same --root"),
    ("own --workdir", "own workdir"),
)


def _in_sweep_words(name: str, text: str) -> str:
    """``text``, an error raised while the sweep trained ``name``, named with the run (the
    ``sweep: starting`` line may be far above it) and in the sweep's words."""
    for old, new in _SWEEP_WORDS:
        text = text.replace(old, new)
    return f"{name}: {text}"


def _named(name: str, error: errors.Error) -> errors.Error:
    """``error`` raised while training ``name``, reworded by :func:`_in_sweep_words`."""
    error.reword(lambda text: _in_sweep_words(name, text))
    return error


def run_sweep(runs: Sequence[tuple[str, ml_collections.ConfigDict]], root: str,
              train: Callable[[ml_collections.ConfigDict, str], Any] | None = None
              ) -> dict[str, str]:
    """Trains each ``(name, config)`` in ``<root>/<name>``, skipping finished runs.

    A run that diverges (``loop.NonFiniteLossError``) is recorded in its workdir
    (:data:`DIVERGED_FILE`), named in a warning, and the sweep goes on with the next run;
    a later call skips it. :func:`check_diverged` raises for such runs once the figures of
    the others are drawn.

    Args:
      runs: e.g. from :func:`plan`, with the configs built by the caller.
      root: the sweep directory.
      train: ``train(config, workdir)``; default
        :func:`stochastic_depth_jax.training.train_and_evaluate` (which resumes).

    Returns:
      name -> ``'skipped (finished)'`` (``'skipped (finished; its best measured now)'`` or
      ``'... could not be measured)'``: :func:`_finished_status`), ``'resumed'`` or
      ``'started'`` (trained to its end by this call), ``'diverged at epoch N'`` (by this
      call) or ``'skipped (diverged at epoch N)'`` (recorded by an earlier call).

    Raises:
      stopping.Stopped: on SIGTERM/SIGINT, inside a run (after its checkpoint) or between
        runs (the next is not started); call again to go on.
      errors.ConfigError: ``root`` is a file or one run's workdir, or a run's directory
        holds a run of a different config (:func:`check_same_config`; every run is checked
        before any trains).
      errors.Error: any other anticipated error of a run's training (a full disk, ...),
        its message starting with the run's name.
    """
    if train is None:
        train = loop_lib.train_and_evaluate
    root = os.path.expanduser(root)  # '~/sweep' from Python, as on the command line
    if os.path.exists(root) and not os.path.isdir(root):
        raise errors.ConfigError(f"--root {root!r} is a file, not a directory: give the sweep "
                                 "a directory (new or of an earlier sweep).")
    if _is_a_run(root):  # before any run trains, not once all have (collect refused it)
        if evaluate_lib.runs_inside(root):  # a run trained into the root of a sweep
            raise errors.ConfigError(
                f"--root {root!r} holds the files of a run trained there ("
                f"{evaluate_lib.RUN_FILE}, checkpoints, ...) besides the sweep's runs: move "
                "them into a directory of their own to continue the sweep.")
        raise errors.ConfigError(
            f"--root {root!r} is one run's workdir (it holds {evaluate_lib.RUN_FILE}), not a "
            "sweep's root: the sweep would train its runs inside that run's directory; give "
            "the sweep a directory of its own (new or of an earlier sweep).")
    for name, config in runs:
        require_sweepable(config)
        check_same_config(os.path.join(root, name), config)
    status: dict[str, str] = {}
    to_train = _runs_to_train(runs, root)  # for the time left: what the loop will train
    # The blocks a step of each is expected to compute (a fitted compact mode's lengths take
    # ResNet-1202 a quarter of a second: once a run, not once a line).
    blocks = {name: _step_blocks(config) for name, config in runs}
    # (training seconds, block-steps, evaluating seconds, evaluated blocks, other seconds)
    # of the runs this call trained to their end, and the steps in an epoch they recorded
    # (the same for every run of a sweep: one data set, one batch).
    timed: list[tuple[float, float, float, float, float]] = []
    steps_per_epoch: list[int] = []
    # A signal between two runs, or during a run's last evaluation (after its last stop
    # point), reaches this object: the sweep stops before the next run instead of
    # starting it (a scheduler's grace period would end inside it).
    # The runs share one compilation cache: a warning about it (read-only, off) is said once.
    with stopping.StopSignals(when=_BETWEEN_RUNS) as stop, compilation.said_once():
        for position, (name, config) in enumerate(runs, 1):
            _stop_between_runs(stop, status, len(runs), root)
            workdir = os.path.join(root, name)
            if jax.process_index() == 0:  # a record's write a kill cut short (each kill one)
                workdir_lib.remove_abandoned_temporaries(workdir, {DIVERGED_FILE}.__contains__)
            if is_finished(workdir, config):
                status[name] = _finished_status(train, name, config, workdir,
                                                f"{position} of {len(runs)}")
                continue
            diverged = _divergence(workdir)
            if diverged is not None:  # trained again, it would diverge again
                status[name] = f"skipped ({figures.diverged_label({'diverged': diverged})})"
                continue
            start = _start_step(workdir)
            resumed = bool(_saved_steps(workdir))
            left = [_work_left(config, steps_per_epoch[-1:], start, blocks[name])] + [
                _work_left(c, steps_per_epoch[-1:], _start_step(os.path.join(root, n)),
                           blocks[n])
                for n, c in runs[position:] if n in to_train]
            if jax.process_index() == 0:  # one line for the job, as a run's own lines
                print(_starting_line(name, resumed, position, len(runs), left, timed),
                      flush=True)
            # Until the run's own handler is installed (it loads data and compiles first), a
            # signal is pending for it: it stops at its first stop point, with a checkpoint.
            stop.when = (f"{name} once it has set up and saved a checkpoint at its first "
                         "stop point (see --config.log_every_steps); the sweep stops then")
            started_at = _now()
            diverged_now = _train_run(train, name, config, workdir)
            status[name] = diverged_now or ("resumed" if resumed else "started")
            seconds, summary = _now() - started_at, _quiet_summary(workdir)
            if diverged_now is None and summary is not None:  # the steps this call trained
                steps_per_epoch.append(summary["steps_per_epoch"])
                trained = summary["steps"] - start
                if trained > 0:
                    training = _training_seconds(summary, seconds)
                    evaluating = min(_evaluating_seconds(workdir, start), seconds - training)
                    evaluated = _evaluations(config, steps_per_epoch[-1], start) * (
                        implementation_lib.total_blocks(config.model))
                    timed.append((training, trained * blocks[name], evaluating, evaluated,
                                  seconds - training - evaluating))
            stop.when = _BETWEEN_RUNS
    return status


_now = time.monotonic  # the runs' timer (a test's clock replaces it)


def _best_unmeasured(summary: dict[str, Any] | None) -> bool:
    """Whether a run's ``summary`` names a best without a test error: an earlier version
    chose ``select_best_by='train'``'s best among epochs no evaluation measured
    (``eval_every_epochs`` > 1), and a finished run keeps it until run again."""
    return loop_lib.best_unmeasured((summary or {}).get("best"))


def _finished_status(train: Callable[[ml_collections.ConfigDict, str], Any], name: str,
                     config: ml_collections.ConfigDict, workdir: str, place: str) -> str:
    """The status of a finished run: ``'skipped (finished)'``; where its best has no test
    error (:func:`_best_unmeasured`), the run is run again, which measures its 'best'
    checkpoint and adds the errors to its summary.json ('Nothing to train'), so that Fig. 8
    draws it: ``'skipped (finished; its best measured now)'``, or ``'skipped (finished;
    its best could not be measured)'`` where training warned why (its 'best' checkpoint
    gone) or :func:`_unmeasurable_why` says why it is not run. Skipped, it stayed out of
    Fig. 8 until train.py was run on it by hand. ``place``: ``'k of N'``, its line's."""
    summary = _quiet_summary(workdir)
    # Process 0's readings decide for every process (a host whose view of the shared
    # root lags must not stay out of the measuring's collectives).
    if not loop_lib.first_process_decides(_best_unmeasured(summary)):
        return "skipped (finished)"
    why = _unmeasurable_why(workdir, summary)
    if loop_lib.first_process_decides(why is not None):
        if jax.process_index() == 0:
            warnings.warn(f"{name}: its best was never measured on the test set (an earlier "
                          f"version's) and is not measured now: {why}.", logs.RunWarning)
        return "skipped (finished; its best could not be measured)"
    if jax.process_index() == 0:  # the run's own lines follow: say why it runs
        print(f"sweep: measuring {name}'s best on the test set ({place}; finished, its best "
              "never measured by an earlier version)", flush=True)
    _train_run(train, name, config, workdir)
    if _best_unmeasured(_quiet_summary(workdir)):
        return "skipped (finished; its best could not be measured)"
    return "skipped (finished; its best measured now)"


def _unmeasurable_why(workdir: str, summary: dict[str, Any]) -> str | None:
    """Why a finished run is not run again to measure its best (``summary``'s); None where
    it may be. Without its 'best' checkpoint there is nothing to measure. Run again
    without its last checkpoint (``checkpoints/`` removed to save space), training
    started afresh from step 0 and replaced the finished run's records; with a checkpoint
    newer than its summary, or while another process trains it (extending it), it trained
    on, or stopped the sweep as busy."""
    saved, steps = _start_step(workdir), summary["steps"]
    if saved != steps:
        directory = os.path.join(workdir, "checkpoints")
        found = f"its newest: step {saved}" if saved else "it has none"
        return (f"its last checkpoint (step {steps}) is not in {directory} ({found}), and run "
                "again without it the run would train instead; python evaluate.py --workdir "
                f"{shlex.quote(workdir)} measures its 'best' checkpoint")
    step = summary["best"].get("step") if isinstance(summary.get("best"), dict) else None
    best = os.path.join(workdir, "checkpoints_best")
    if not _is_count(step) or not os.path.isdir(os.path.join(best, str(step))):
        return f"its 'best' checkpoint (step {step}) is not in {best}"
    holder = workdir_lib.training_holder(workdir)
    if holder is not None:
        return f"{holder} is training it; run the sweep's command again once that is done"
    return None


def _runs_to_train(runs: Sequence[tuple[str, ml_collections.ConfigDict]],
                   root: str) -> set[str]:
    """The names of ``runs`` that :func:`run_sweep` will train: neither finished nor
    diverged. Read quietly: the sweep warns about a damaged record as it reaches the run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name for name, config in runs
                if not is_finished(os.path.join(root, name), config)
                and _divergence(os.path.join(root, name)) is None}


def _training_seconds(summary: dict[str, Any], seconds: float) -> float:
    """The seconds of a run's ``seconds`` (its call's, set-up to end) that trained steps:
    its summary's ``train_time_s_this_session`` (no compilation, evaluation or saving), or
    all of them where it records none."""
    training = summary.get("train_time_s_this_session")
    if not plots.is_number(training) or not 0 <= training <= seconds:
        return seconds
    return float(training)


def _evaluating_seconds(workdir: str, start: int) -> float:
    """The seconds a run spent evaluating after step ``start`` (the session that resumed
    there): the ``eval_time_s`` of its metrics.jsonl records after it; 0 where it has none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = metrics_lib.read_metrics(workdir)
    return float(sum(r["eval_time_s"] for r in records
                     if isinstance(r, dict) and plots.is_number(r.get("step"))
                     and r["step"] > start and plots.is_number(r.get("eval_time_s"))
                     and r["eval_time_s"] >= 0))


def _evaluations(config: ml_collections.ConfigDict, steps_per_epoch: int, start: int) -> int:
    """The evaluations a run of ``config`` makes after step ``start``: at every
    ``eval_every_epochs``-th epoch's end, every ``eval_every_steps`` steps and at its last
    step, each step once."""
    total = _total_steps({"steps_per_epoch": steps_per_epoch}, config)
    every = steps_per_epoch * config.eval_every_epochs
    steps = set(range(every * (start // every + 1), total + 1, every))
    n = config.get("eval_every_steps", 0)
    if n:
        steps.update(range(n * (start // n + 1), total + 1, n))
    return len(steps | ({total} if total > start else set()))


def _start_step(workdir: str) -> int:
    """The step a run resumes from (its newest checkpoint's), 0 for one not started."""
    return max(_saved_steps(workdir), default=0)


def _quiet_summary(workdir: str) -> dict[str, Any] | None:
    """:func:`_read_summary` without its warning (the run's own training says a problem)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _read_summary(workdir)


def _step_blocks(config: ml_collections.ConfigDict) -> float:
    """The residual blocks a training step of ``config`` is expected to compute on this
    platform (:func:`stochastic_depth_jax.training.implementation.expected_blocks`: fewer at
    a lower p_L where dropped blocks are skipped; compact mode's padding counted). The rest
    of a step (stem, classifier, update) is left out: ResNet-110's skipping step measured
    0.75-0.78 of the constant-depth one on a CPU."""
    model = config.model
    resolved = implementation_lib.resolve(model, jax.devices()[0].platform)
    return implementation_lib.expected_blocks(model, resolved)


def _work_left(config: ml_collections.ConfigDict, steps_per_epoch: Sequence[int],
               start: int, blocks: float) -> tuple[float, float] | None:
    """What a run of ``config`` has left from step ``start``: its block-steps
    (:func:`_step_blocks` per step) and the blocks its evaluations compute (every block,
    each evaluation); None before a run has said how many steps an epoch has."""
    if not steps_per_epoch:
        return None
    total = _total_steps({"steps_per_epoch": steps_per_epoch[0]}, config)
    return (max(total - start, 0) * blocks,
            _evaluations(config, steps_per_epoch[0], start)
            * implementation_lib.total_blocks(config.model))


def _starting_line(name: str, resumed: bool, position: int, total: int,
                   left: Sequence[tuple[float, float] | None],
                   timed: Sequence[tuple[float, float, float, float, float]]) -> str:
    """``sweep: starting <run> (k of N)``, its place in the sweep's runs; once this call has
    trained a run to its end (``timed``: its training seconds, block-steps, evaluating
    seconds, evaluated blocks and other seconds), the time left for the runs still to train
    (``left``: their block-steps and evaluated blocks left, this one's included): the steps
    each run has left (a resumed run's from its checkpoint) times the blocks a step is
    expected to compute (:func:`_step_blocks`; fewer at a lower p_L), at the timed runs'
    training seconds per block-step; the evaluations each has left times its blocks (all of
    them: an evaluation drops none), at the timed runs' evaluating seconds per evaluated
    block; plus, for each run, the timed runs' mean other seconds (set-up, compilation,
    saving): a short resumed run's set-up is not taken for training, nor a whole run's
    evaluations for the one evaluation a resumed run has left. A diverged run's time is not
    counted."""
    line = f"sweep: {'resuming' if resumed else 'starting'} {name} ({position} of {total})"
    if not timed or None in left:
        return line
    per_block_step = sum(t[0] for t in timed) / sum(t[1] for t in timed)
    evaluated = sum(t[3] for t in timed)
    per_evaluated_block = sum(t[2] for t in timed) / evaluated if evaluated else 0.0
    per_run = sum(t[4] for t in timed) / len(timed)
    seconds = (per_block_step * sum(w[0] for w in left)
               + per_evaluated_block * sum(w[1] for w in left) + per_run * len(left))
    runs = lambda n: f"{n} run{'s' * (n != 1)}"
    return (f"{line}; about {progress_lib.duration(seconds)} left for the "
            f"{runs(len(left))} to train, this one included (estimated from the "
            f"{runs(len(timed))} trained so far, by the steps left and the blocks a step is "
            f"expected to compute, the evaluations left and the model's blocks, plus each "
            f"run's set-up)")


def _train_run(train: Callable[[ml_collections.ConfigDict, str], Any], name: str,
               config: ml_collections.ConfigDict, workdir: str) -> str | None:
    """Trains one run of the sweep: None once it has finished, ``'diverged at epoch N'`` if
    it diverged (recorded); raises its other errors named and in the sweep's words."""
    try:
        train(config, workdir)
    except stopping.Stopped as e:  # say how to resume the sweep, not the run
        raise stopping.Stopped(e.stopped, e.exit_status - 128,
                               call_again=_CALL_AGAIN) from None
    except loop_lib.NonFiniteLossError as e:
        try:
            return _record_divergence(name, workdir, e)
        except OSError as write_error:  # e.g. a full disk: the divergence is said, too
            if workdir_lib.anticipated_os_error(write_error) is None:
                raise
            raise _named(name, errors.WorkdirError(
                f"{e} Recording it in {DIVERGED_FILE} failed: "
                f"{_os_problem(write_error)}")) from write_error
    except errors.WorkdirBusyError as e:  # the sweep chose the workdir: not '--workdir'
        raise _named(name, errors.WorkdirBusyError(
            str(e).removesuffix(workdir_lib.BUSY_FIX).rstrip().removesuffix(".")
            + " (another sweep of this --root?). Wait for it to finish or stop it, "
            "then run this sweep again (it skips the finished runs), or give it "
            "another --root.")) from None
    except errors.Error as e:
        raise _named(name, e)
    except Exception as e:  # a full or read-only disk (an OSError, or TensorStore's error
        # carrying one): as the command line says it, named
        os_error = workdir_lib.anticipated_os_error(e)
        if os_error is None:
            raise
        raise _named(name, errors.WorkdirError(_os_problem(os_error))) from e
    return None


def _os_problem(error: OSError) -> str:
    """A disk or permission failure as one line (``workdir.describe_os_error``)."""
    os_error = workdir_lib.anticipated_os_error(error) or error
    return workdir_lib.describe_os_error(os_error, os_error.filename or "a file")


def check_diverged(status: dict[str, str], root: str) -> None:
    """Raises ``loop.NonFiniteLossError`` naming the runs of ``status`` (:func:`run_sweep`'s)
    that diverged, now or before, and how to train them again; returns if none did.
    Called once the other runs' figures are drawn: the sweep's results are incomplete."""
    diverged = [n for n, s in status.items() if _is_diverged(s)]
    if not diverged:
        return
    root = os.path.expanduser(root)
    # 'depth8_pL0.5 at epoch 2', from 'diverged at epoch 2' or 'skipped (diverged at ...)'.
    runs = ", ".join(n + status[n].removeprefix("skipped (").removesuffix(")")
                     .removeprefix("diverged") for n in diverged)
    problem = (f"{len(diverged)} of {len(status)} runs diverged (non-finite loss): {runs}; "
               "Fig. 8 leaves them out, the other figures and the table mark them, and a "
               "rerun skips them. To train one again, remove its directory (e.g. rm -r "
               f"{shlex.quote(os.path.join(root, diverged[0]))})")
    retry = ("(the same config may diverge again: a sweep with a lower "
             "--config.learning_rate or another --config.seed needs a new --root)")
    raise loop_lib.NonFiniteLossError(
        f"{problem}, then call run_sweep again with the same runs and root {retry}.",
        command_line=f"{problem}, then run the same command {retry}.")


_CALL_AGAIN = "run_sweep again with the same runs and root"
_BETWEEN_RUNS = "before the next run of the sweep starts"


def _stop_between_runs(stop: stopping.StopSignals, status: dict[str, str], total: int,
                       root: str) -> None:
    """Raises Stopped on an agreed stop request (every process calls this before each run)."""
    signum = stop.agreed()
    if signum is None:
        return
    diverged = sum(_is_diverged(s) for s in status.values())
    raise stopping.Stopped(
        f"sweep stopped by {stopping.StopSignals.name(signum)} with {len(status) - diverged} "
        f"of {total} runs finished" + (f" and {diverged} diverged" if diverged else "")
        + f"; the rest have not started (runs in {root})", signum,
        call_again=_CALL_AGAIN)


def _is_a_run(root: str) -> bool:
    """Whether ``root`` is one run's workdir (it holds a ``run.json``): a sweep's root holds
    its runs in subdirectories."""
    return os.path.exists(os.path.join(root, evaluate_lib.RUN_FILE))


def collect(root: str, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Reads the runs under ``root`` (all subdirectories with a ``run.json``, or ``names``).

    Returns:
      per run: ``name``, ``workdir``, ``depth``, ``p_last``, ``finished`` (a summary
      records every step; a damaged one is warned about), ``diverged`` (an unfinished
      run's :data:`DIVERGED_FILE` record: ``step``, ``epoch``, ...; else None),
      ``test_error``/``val_error`` of the best-by-validation epoch (the paper's number),
      ``final_test_error``, ``code_version``, ``config`` (``run.json``'s, as JSON, with
      the fields it predates: ``config_lib.with_absent_defaults``), ``num_train`` and
      ``num_validation`` (the images it trained on and held out: run.json's data record;
      None where it has none) and ``records`` (``metrics.jsonl``).

    A run of a model without p_L (a ViT trained into the root), or whose run.json is damaged
    or records a config this version refuses, is left out with a warning naming it.

    Raises:
      errors.CheckpointError: ``root`` is not a directory, is one run's workdir with no
        runs below it (not a sweep's root), or a run has no ``run.json``.
    """
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise errors.CheckpointError(
            f"--root {root!r} is not a directory: pass the --root of an existing sweep (or "
            "train one: drop --collect and give --config, --depths and --p-last).")
    if names is None:
        names = [n for n in os.listdir(root)
                 if os.path.exists(os.path.join(root, n, evaluate_lib.RUN_FILE))]
        # Only where no run is below it: a sweep trained inside a run's workdir has its runs.
        if not names and _is_a_run(root):
            parent = os.path.dirname(os.path.abspath(root))
            raise errors.CheckpointError(
                f"--root {root!r} is one run's workdir (it holds {evaluate_lib.RUN_FILE}), not "
                f"a sweep's root, whose runs are its subdirectories: pass the directory that "
                f"holds the runs (here perhaps {parent}); 'python evaluate.py --workdir "
                f"{root}' evaluates this run.")
    runs = []
    for name in names:
        workdir = os.path.join(root, name)
        try:
            config, meta = evaluate_lib.load_run_config(
                workdir, fix="it is left out of the sweep's figures (restore it from a copy, "
                             "or remove the run to retrain it)")
        except errors.ConfigError as e:  # not this command's: it would be blamed otherwise
            warnings.warn(f"{os.path.join(workdir, evaluate_lib.RUN_FILE)} records a config "
                          f"this version refuses ({e}): left out of the sweep's figures.",
                          logs.RunWarning)
            continue
        except errors.CheckpointError as e:  # damaged: one run's, not every run's figures
            if not os.path.exists(os.path.join(workdir, evaluate_lib.RUN_FILE)):
                raise  # a name given without a run.json
            warnings.warn(str(e), logs.RunWarning)
            continue
        model = config.model.get("name", "cifar_resnet")
        if model not in config_lib.MODELS:  # e.g. a ViT run of train.py put in the root
            warnings.warn(f"{workdir} is a {model!r} run, which has no p_L: left out of the "
                          "sweep's figures.", logs.RunWarning)
            continue
        summary = _read_summary(workdir)  # read once: a damaged one is warned about once
        best, final = (summary or {}).get("best") or {}, (summary or {}).get("final") or {}
        data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
        finished = _finished(summary, config)
        runs.append({
            "name": name,
            "workdir": workdir,
            "depth": int(config.model.depth),
            "p_last": float(config.model.final_survival_prob),
            "finished": finished,
            "diverged": None if finished else _divergence(workdir),
            "test_error": best.get("test_error"),
            "val_error": best.get("val_error"),
            "final_test_error": final.get("test_error"),
            "code_version": meta.get("code_version"),
            "config": config_lib.with_absent_defaults(json.loads(config.to_json())),
            "num_train": data.get("num_train"),
            "num_validation": data.get("num_validation"),
            "records": metrics_lib.read_metrics(workdir),
        })
    return sorted(runs, key=lambda r: (r["depth"], r["p_last"], r["name"]))


# What runs drawn as one series may differ in: the swept fields, and those that change
# neither the training nor its results.
_NOT_COMPARED = frozenset(SWEPT_FIELDS) | _OPERATIONAL_FIELDS
# Named first in a series' label when they differ: what a reader compares runs by.
_LABEL_FIRST = ("dataset", "model.name", "num_epochs", "max_steps", "fake_data.num_train")


def _compared(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``config`` (as JSON) flattened to ``{'a.b': json text}``, without ``_NOT_COMPARED``;
    ``augment`` as trained ('auto' and the dataset's own named are one series)."""
    if not prefix:
        config = {**config, "augment": config_lib.resolved_augment(config)}
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_compared(value, prefix + key + "."))
        elif prefix + key not in _NOT_COMPARED:
            flat[prefix + key] = json.dumps(value)
    return flat


def label_series(runs: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Run name -> the label of its series: runs of one config (apart from depth, p_L and
    the logging/checkpoint fields) share a series. The label names the fields that tell
    the series apart (``'num_epochs=4'``), dataset and epochs first; ``''`` for every run
    where all share one config.

    A sweep's root may hold runs of other configs (a later command with another dataset,
    or more epochs for some depths): their numbers are drawn as separate series, never
    as points of one curve.
    """
    flats = {r["name"]: _compared(r["config"]) for r in runs}
    fields = sorted({k for f in flats.values() for k in f},
                    key=lambda k: (_LABEL_FIRST.index(k) if k in _LABEL_FIRST else 99, k))
    differing = [k for k in fields if len({f.get(k) for f in flats.values()}) > 1]
    configs = len({tuple(f.get(k) for k in differing) for f in flats.values()})
    chosen: list[str] = []
    for field in differing:  # the fewest fields, in that order, that tell every config apart
        count = len({tuple(f.get(k) for k in chosen + [field]) for f in flats.values()})
        if count > len({tuple(f.get(k) for k in chosen) for f in flats.values()}):
            chosen.append(field)
        if count == configs:
            break
    return {name: ", ".join(f"{k}={_text(f.get(k))}" for k in chosen)
            for name, f in flats.items()}


def _text(value: str | None) -> str:
    """A config value (JSON text) as a label shows it: strings without quotes."""
    if value is None:
        return "(absent)"
    loaded = json.loads(value)
    return loaded if isinstance(loaded, str) else value


def describe_data(runs: Sequence[dict[str, Any]]) -> str:
    """What the runs were trained on, as a figure's subtitle: the dataset (its augmentation
    where it is not the dataset's own, as a run's curves name it, and whether it was random
    fake data), model and epochs, where all runs agree on them."""
    configs = [r["config"] for r in runs if r.get("config")]
    if not configs:
        return ""

    def shared(get: Callable[[dict[str, Any]], Any]) -> Any:
        values = {json.dumps(get(c)) for c in configs}
        return get(configs[0]) if len(values) == 1 else None

    parts = []
    dataset = shared(lambda c: c["dataset"])
    if dataset and (augment := shared(plots.augment_label)):  # not the dataset's own
        dataset += f" ({augment})"
    fakes = [config_lib.fake_train_size(c) for c in configs]
    if dataset and all(fakes):  # fake data of one size, or of several (the sizes differ)
        parts.append(f"{dataset}, FAKE random-label data "
                     f"({_fake_images(runs, shared(config_lib.fake_train_size))}; "
                     "errors at chance)")
    elif dataset:
        parts.append(dataset + (", some runs on FAKE random-label data" if any(fakes) else ""))
    model = shared(lambda c: (c["model"].get("name", "cifar_resnet"), c["model"].get("width"),
                              c["model"].get("widen_factor")))
    if model:
        name, width, k = model
        parts.append(f"{name}, width {width}" + (f", k={k}" if name == "wide_resnet" else ""))
    epochs = shared(lambda c: (c["num_epochs"], c.get("max_steps", 0)))
    if epochs:
        parts.append(f"{epochs[0]} epoch{'s' * (epochs[0] != 1)}"
                     + (f" (at most {epochs[1]} steps)" if epochs[1] else ""))
    return "; ".join(parts)


def _fake_images(runs: Sequence[dict[str, Any]], generated: int) -> str:
    """The fake images the runs trained on and held out for validation, as recorded (the
    ``generated`` ``config_lib.fake_train_size``, SVHN's extra images included, less
    ``validation_size``: a smoke run's 160 are 128 and 32), where all agree; else how many
    were generated (validation included), or that the runs generated different numbers
    (``generated`` None)."""
    sizes = {(r.get("num_train"), r.get("num_validation")) for r in runs if r.get("config")}
    if len(sizes) == 1:
        [(train, held)] = sizes
        if train is not None:
            return f"{train} training images" + (f", {held} held out for validation"
                                                 if held else "")
    if generated is None:
        sizes = sorted({config_lib.fake_train_size(r["config"]) for r in runs if r.get("config")})
        return f"{', '.join(map(str, sizes))} images generated, by run"
    return f"{generated} images generated"


def write_figures(runs: Sequence[dict[str, Any]], out_dir: str,
                  report: Callable[[str], Any] | None = print) -> dict[str, str]:
    """Fig. 8, Fig. 7, Fig. 3 and the training-time table of ``runs`` (from :func:`collect`).

    Fig. 8 draws the finished runs (an unfinished run's summary, if any, is of an earlier,
    shorter session) and names under its title the unfinished and diverged ones and those
    whose best has no test error (:data:`UNMEASURED_BEST`); Figs. 7
    and 3 the deepest depth of each series that has a finished epoch (:func:`_deepest_runs`;
    Fig. 3 only p_L 1 and 0.5 of it where there are others too, :func:`_papers_pair`),
    unfinished and diverged runs marked; the table lists every run and names the
    unfinished and diverged ones. Runs
    of different configs are separate series (:func:`label_series`). Each file names the
    runs it came from, and its sidecar the runs left out and why; ``report`` (default
    ``print``) gets one line per file saying the same. Returns name -> path. Where
    matplotlib cannot be imported, only the table is written, with a warning naming the
    figures not drawn. In a multi-process job, process 0 alone draws and reports (the
    others return the same paths, drawing nothing: every process writing the same files
    drew them once a process, each report repeated).
    """
    if not runs:
        raise errors.ConfigError("No runs to plot: the sweep directory holds no run.json of "
                                 "a CIFAR ResNet / WideResNet run.")
    out_dir = os.path.expanduser(out_dir)
    if jax.process_index() != 0:  # process 0 draws: the paths it writes
        table = {"training_time": os.path.join(out_dir, "training_time.md")}
        return table if plots.matplotlib_problem() is not None else {
            **{name: os.path.join(out_dir, file) for name, file in
               zip(("fig8", "fig7", "fig3"), _FIGURES)}, **table}
    os.makedirs(out_dir, exist_ok=True)
    # What a drawing killed mid-write left (each kill one more); another sweep's, still
    # being written, is held and stays.
    workdir_lib.remove_abandoned_temporaries(out_dir, _FIGURE_FILES.__contains__)
    series = label_series(runs) if all("config" in r for r in runs) else {}
    runs = [{**r, "series": series.get(r["name"], "")} for r in runs]
    left8 = {r["name"]: figures.diverged_label(r) or "unfinished"
             for r in runs if not r["finished"]}
    left8.update((r["name"], why) for r in runs if r["finished"]
                 and (why := _no_test_error_why(r)))
    drawn8 = [r for r in runs if r["name"] not in left8]
    drawn7, left7 = _deepest_runs(runs)
    problem = plots.matplotlib_problem()
    if problem is not None:  # The table needs no drawing: written, the figures named.
        return _table_only(runs, out_dir, problem, report)
    # First: a drawing that fails (a bug, an odd matplotlib) must not cost the table.
    table = _write_table(runs, os.path.join(out_dir, "training_time.md"))
    select = {r["config"].get("select_best_by") for r in drawn8 if "config" in r}
    fig8, _ = figures.plot_error_vs_p_last(
        drawn8, os.path.join(out_dir, "fig8_error_vs_p_last.png"),
        subtitle=describe_data(drawn8), extra=_extra(drawn8, left8, series),
        note=("not drawn, " + "; ".join(
            f"{why}: {_grid([r for r in runs if left8.get(r['name']) == why])}"
            for why in dict.fromkeys(left8.values())) if left8 else ""),
        ylabel=_fig8_ylabel(select))
    fig7, _ = figures.plot_first_conv_grad(
        drawn7, os.path.join(out_dir, "fig7_first_conv_grad.png"),
        subtitle=describe_data(drawn7), extra=_extra(drawn7, left7, series))
    drawn3, left3 = _papers_pair(drawn7, left7)
    fig3, _ = figures.plot_error_curves(
        drawn3, os.path.join(out_dir, "fig3_error_curves.png"),
        subtitle=describe_data(drawn3), extra=_extra(drawn3, left3, series))
    if report is not None:
        for path, left in ((fig8, left8), (fig7, left7), (fig3, left3), (table, {})):
            report(_drawn_line(path, runs, left))
        labels = sorted(set(series.values()))
        if len(labels) > 1:
            report("figures: runs of different configs are drawn as separate series: " + " | ".join(
                f"{label}: {_grid([r for r in runs if r['series'] == label])}" for label in labels))
    return {"fig8": fig8, "fig7": fig7, "fig3": fig3, "training_time": table}


def _fig8_ylabel(select: set[Any]) -> str:
    """Fig. 8's axis label for runs of the ``select_best_by`` values ``select``: the test
    error at the best-validation epoch (the paper's figure), or the lowest test error of
    the evaluated epochs where the runs chose their best on the test set itself (labelled
    'at the best-test epoch', it read as a held-out figure)."""
    if len(select) != 1:
        return "test error of the selected epoch (%)"
    [by] = select
    if by == "test":
        return "lowest test error of the evaluated epochs (%; chosen on the test set)"
    return f"test error at the best-{by} epoch (%)"


# Why Fig. 8 leaves out a finished run whose best has no test error (_best_unmeasured).
UNMEASURED_BEST = ("best never measured on the test set (an earlier version's): the "
                   "sweep's command without --collect measures it if its last and 'best' "
                   "checkpoints are readable")


def _no_test_error_why(run: dict[str, Any]) -> str:
    """Why Fig. 8 cannot draw a finished run's point: its best has no test error (drawn
    before, the figure counted it among its runs and showed no point for it) or one that
    is not a finite number; '' where it has one."""
    value = run.get("test_error")
    if value is None:
        return UNMEASURED_BEST
    if not plots.is_number(value) or not math.isfinite(value):
        return f"the test error of its best is {value!r} in its summary.json"
    return ""


_FIGURES = ("fig8_error_vs_p_last.png", "fig7_first_conv_grad.png", "fig3_error_curves.png")
# The files write_figures writes: the figures, their sidecars, the table.
_FIGURE_FILES = frozenset((*_FIGURES, *map(figures.sidecar_path, _FIGURES), "training_time.md"))


def _has_epoch(run: dict[str, Any]) -> bool:
    """Whether ``run`` has a finished epoch (a point of a curve per epoch)."""
    return bool(plots.per_epoch(run["records"], "epoch"))


def _deepest_runs(runs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]],
                                                           dict[str, str]]:
    """The runs Figs. 7 and 3 draw (each series' deepest depth that has a finished epoch,
    else its deepest), and ``{name: why}`` of the others. A deeper run that has not
    finished its first epoch (the next depth of a sweep in progress) has no curve yet:
    chosen, it left both figures empty, overwriting the ones drawn before."""
    deepest: dict[str, int] = {}
    for label in {r["series"] for r in runs}:
        mine = [r for r in runs if r["series"] == label]
        deepest[label] = max([r["depth"] for r in mine if _has_epoch(r)]
                             or [r["depth"] for r in mine])
    drawn = [r for r in runs if r["depth"] == deepest[r["series"]]]
    left = {r["name"]: (_no_epoch_why(r) if r["depth"] > deepest[r["series"]] else
                        "not the deepest depth" + (" of its series" if r["series"] else ""))
            for r in runs if r["depth"] != deepest[r["series"]]}
    return drawn, left


PAPERS_PAIR = (1.0, 0.5)  # Fig. 3 of the paper: constant depth beside p_L = 0.5
_NOT_THE_PAIR = "Fig. 3 compares constant depth with p_L 0.5, as the paper's"


def _papers_pair(drawn: Sequence[dict[str, Any]], left_out: dict[str, str]
                 ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The runs Fig. 3 draws: of Fig. 7's, where a series has runs at both p_L 1 and 0.5
    with a finished epoch each and at other values too, those two only (a sweep of the
    paper's ten p_L values drew twenty overlapping curves; Fig. 8 shows every p_L); else
    all of them (an interrupted constant-depth run with no epoch yet left p_L 0.5 alone).
    Returns them and ``left_out`` with the others added."""
    left = dict(left_out)
    for label in dict.fromkeys(r["series"] for r in drawn):
        mine = [r for r in drawn if r["series"] == label]
        curves = {r["p_last"] for r in mine if _has_epoch(r)}
        if set(PAPERS_PAIR) <= curves and set(PAPERS_PAIR) < {r["p_last"] for r in mine}:
            left.update((r["name"], _NOT_THE_PAIR) for r in mine
                        if r["p_last"] not in PAPERS_PAIR)
    return [r for r in drawn if r["name"] not in left], left


def _no_epoch_why(run: dict[str, Any]) -> str:
    """Why a deeper run without a finished epoch is not drawn: it diverged in its first
    epoch (``'diverged at epoch 1'``; 'no finished epoch yet' read as a run in progress,
    which a rerun of the sweep would finish), or it has not finished one yet."""
    return figures.diverged_label(run) or "no finished epoch yet"


def _table_only(runs: Sequence[dict[str, Any]], out_dir: str, problem: str,
                report: Callable[[str], Any] | None) -> dict[str, str]:
    """:func:`write_figures` where matplotlib cannot draw: the runs trained (or were
    collected) and their table is written; a warning, one line, names the figures not
    drawn and the command that draws them once matplotlib is installed."""
    table = _write_table(runs, os.path.join(out_dir, "training_time.md"))
    warnings.warn(
        f"fig8_error_vs_p_last.png, fig7_first_conv_grad.png and fig3_error_curves.png not "
        f"drawn: {problem}, then {_redraw(runs, out_dir)} draws them.", logs.RunWarning)
    if report is not None:
        report(_drawn_line(table, runs, {}))
    return {"training_time": table}


def _redraw(runs: Sequence[dict[str, Any]], out_dir: str) -> str:
    """The command that draws the figures into ``out_dir``: ``sweep.py --collect`` where
    ``out_dir`` is the runs' root's ``figures`` (it draws there), else calling
    :func:`write_figures` again (a Python caller's own directory)."""
    roots = {os.path.dirname(os.path.normpath(r["workdir"])) for r in runs if r.get("workdir")}
    if len(roots) == 1:
        [root] = roots
        if os.path.normpath(out_dir) == os.path.join(root, FIGURES_DIR):
            return f"'python sweep.py --root {root or '.'} --collect'"
    return f"sweep.write_figures(..., {out_dir!r}) called again"


def _extra(drawn: Sequence[dict[str, Any]], left_out: dict[str, str],
           series: dict[str, str]) -> dict[str, Any]:
    """The sidecar's record of what the runs were trained on (the figure's subtitle), the
    runs not drawn (and why) and each run's series, where there are several."""
    return {"trained_on": describe_data(drawn), "left_out": left_out,
            **({"series": series} if len(set(series.values())) > 1 else {})}


def _grid(runs: Sequence[dict[str, Any]]) -> str:
    """The runs as the grid a reader knows them by: ``depths 8, 14 x p_L 0.5, 1`` (depths
    sharing their p_L values together), not one name per run. A point with several runs
    (of several series: another seed trained into the root) is named once: ``p_L 0.5,
    0.5, 1, 1`` read as a grid of four values."""
    p_lasts: dict[int, list[float]] = {}
    for r in sorted(runs, key=lambda r: (r["depth"], r["p_last"])):
        if r["p_last"] not in (ps := p_lasts.setdefault(r["depth"], [])):
            ps.append(r["p_last"])
    rows: dict[tuple[float, ...], list[int]] = {}
    for depth, ps in p_lasts.items():
        rows.setdefault(tuple(ps), []).append(depth)
    return "; ".join(f"depth{'s' if len(ds) > 1 else ''} {', '.join(map(str, ds))} x p_L "
                     + ", ".join(f"{p:g}" for p in ps) for ps, ds in rows.items()) or "none"


def _drawn_line(path: str, runs: Sequence[dict[str, Any]], left: dict[str, str]) -> str:
    """``figures: <file>: <n> runs (<grid>); left out (<why>): <grid>``."""
    drawn = [r for r in runs if r["name"] not in left]
    line = (f"figures: {os.path.basename(path)}: {len(drawn)} run{'s' * (len(drawn) != 1)} "
            f"({_grid(drawn)})")
    for why in dict.fromkeys(left.values()):  # one clause per reason, in order
        line += f"; left out ({why}): " + _grid([r for r in runs if left.get(r["name"]) == why])
    return line


def _write_table(runs: Sequence[dict[str, Any]], table: str) -> str:
    """training_time.md: what the runs were trained on, the table, the unfinished and
    diverged runs and the sources; written atomically, as the figures are, so a Ctrl-C or
    an error while it is made leaves the earlier table, never an empty or half one."""
    unfinished = [r["name"] for r in runs if not r["finished"] and not r.get("diverged")]
    diverged = [r["name"] + figures.diverged_label(r).removeprefix("diverged")
                for r in runs if not r["finished"] and r.get("diverged")]
    # An interrupted run (drawn by --collect) is not told from a finished one by its row.
    note = (f"\nUnfinished (interrupted, or extended and not done yet; their rows count the "
            f"epochs so far): {', '.join(unfinished)}.\n" if unfinished else "")
    note += (f"\nDiverged (non-finite training loss or parameters; their rows count the "
             f"epochs before it): {', '.join(diverged)}.\n" if diverged else "")
    trained_on = describe_data(runs)
    with workdir_lib.atomic_write(table) as f:
        f.write("Training time per epoch (compilation and evaluation excluded; the first "
                "epoch, which includes warm-up, left out of the mean where there are "
                "several), from each run's metrics.jsonl."
                + (f" Trained on: {trained_on}." if trained_on else "") + "\n\n"
                + figures.training_time_table(runs) + note
                + "\nSources: " + ", ".join(r["workdir"] for r in runs) + "\n")
    return table
