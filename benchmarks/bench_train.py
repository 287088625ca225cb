"""Training-loop benchmark (run by hand): whole loop vs bare step, and checkpoint saves.

    python benchmarks/bench_train.py                       # ResNet-110, batch 128
    python benchmarks/bench_train.py --depth 20 --batch 64 --steps 10   # quick CPU run

(1) The whole training loop, ``train_and_evaluate`` on one epoch of random CIFAR-shaped
images (an image folder): batch drawn on device, step, progress bar, metric syncs every
``log_every_steps`` (20); its images/s is the epoch's record (compilation excluded; the
first call of the compiled step is inside; evaluation and checkpoints are outside).
(2) The bare jitted step on the same state, ``--steps`` calls after two warm-ups.
(3) Checkpoint saves of that state: the blocking part of an async save, until committed,
and a synchronous save. The table is appended, with machine, versions, date, code and
command line, to benchmarks/results/train.md (``--out``: elsewhere); a run at other sizes
than the defaults says so in its table.

``--implementation`` and ``--compact`` set ``model.implementation`` (default ``auto``: the
platform's choice) and ``model.compact_multiple``. ``--compact 4`` measures compact mode; its
programs (one per bucket tuple) compile on first use, inside the measured epoch and in some
bare steps, so use enough ``--steps`` that the median is a steady-state step.

``--whole-epochs constant,cond,compact-4,lengths-3,lengths-4`` instead times whole training
epochs of each variant, side by side in one process (compact-mode granularity: every bucket
tuple's compilation lands in the epoch it first appears in, as in a real run; ``compact-m``
rounds kept counts up to a multiple of m, ``lengths-c`` uses c lengths per stage fitted to
the schedule; ``benchmarks/compact_buckets.py`` counts each one's programs per epoch)::

    python benchmarks/bench_train.py --whole-epochs constant,cond,compact-4,lengths-3,lengths-4 \
        --epochs 3 --train-images 45000          # on a GPU: the paper's 45k training images

A SIGTERM or Ctrl-C stops the variant training at once in its steps, or while it loads data
or compiles before them, at its next metrics point in an evaluation, or before the next
variant starts; the table of the variants that finished is
appended, its heading saying which one was stopped (none finished: nothing is written; after
the last one finished: the table, whole, and exit status 130 / 143).
It reports what each variant ran as (``auto`` resolved, from its run.json), each epoch's
training time (evaluation excluded), the median of epochs >= 2 less the compiling inside them
(shown apart: a program first drawn in a later epoch stalls it), the ratio to constant depth,
and the programs the run compiled and the seconds spent. The
persistent compilation cache is off (``--cache-dir`` to use one) so every run compiles.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_cli  # noqa: E402  (next to this file; first: Ctrl-C in JAX's import)

import jax  # noqa: E402
import orbax.checkpoint  # noqa: E402

from configs import load_config  # noqa: E402
from stochastic_depth_jax import data, errors  # noqa: E402
from stochastic_depth_jax.training import checkpoint, compilation, loop, metrics  # noqa: E402
from stochastic_depth_jax.training import evaluate as evaluate_lib  # noqa: E402
from stochastic_depth_jax.training import implementation as implementation_lib  # noqa: E402
from stochastic_depth_jax.training import config as config_lib  # noqa: E402
from stochastic_depth_jax.training import setup as setup_lib  # noqa: E402
from stochastic_depth_jax.training import step as step_lib  # noqa: E402
from stochastic_depth_jax.training import stopping  # noqa: E402
from provenance import run_label, size_changes  # noqa: E402

SIZES = ("depth", "batch", "steps", "epochs", "train_images", "test_images", "eval_batch")
TITLE = "# Training-loop benchmark (benchmarks/bench_train.py)"


def _config(args, workdir, folder=None, epochs=1):
    """``epochs`` epochs of ``steps + 2`` batches of random 32x32 images in 10 classes (or the
    images in ``folder``), with the lr drops that many epochs reach (:func:`_reached_drops`).

    An image folder rather than a fake tfds dataset: no tensorflow-datasets needed.
    """
    # Validated once, untimed: 100 images, rounded up to divide by the devices (104 on 8).
    held_out = -(-100 // jax.device_count()) * jax.device_count()
    if folder is None:
        per_class = -(-(args.batch * (args.steps + 2) + held_out) // 10)
        folder = data.testing.make_image_folder(
            os.path.join(workdir, "images"), classes=10, per_class_train=per_class,
            per_class_test=10)
    return _reached_drops(load_config(
        args.config,
        [
            f"--config.dataset=image_folder:{folder}",
            "--config.fake_data.num_train=0",
            f"--config.model.depth={args.depth}",
            f"--config.batch_size={args.batch}",
            f"--config.model.final_survival_prob={args.p}",
            f"--config.validation_size={held_out}",
            f"--config.eval_batch_size={held_out}",
            f"--config.num_epochs={epochs}",
            "--config.write_plots=false",
            f"--config.progress_bar={args.progress_bar}",
            f"--config.model.compact_multiple={args.compact}",
            f"--config.model.implementation={args.implementation}",
            f"--config.model.dtype={args.dtype}",
            f"--config.compilation_cache_dir={args.cache_dir}",
        ],
    ))


def _reached_drops(config):
    """``config`` without the lr drops its ``num_epochs`` never reach (cifar10's after epochs
    250 and 375): the same schedule, and the trainer's warning that they never happen, with
    a --config flag this script does not take, is not printed at every benchmark run."""
    config.lr_boundaries_epochs = tuple(
        b for b in config.lr_boundaries_epochs if b < config.num_epochs)
    return config


# --whole-epochs variants: name -> config overrides.
EPOCH_VARIANTS = {
    "constant": ["--config.model.final_survival_prob=1.0"],
    "auto": [],
    "cond": ["--config.model.implementation=skip", "--config.model.compact_multiple=0"],
    "compact-1": ["--config.model.compact_multiple=1"],
    "compact-2": ["--config.model.compact_multiple=2"],
    "compact-4": ["--config.model.compact_multiple=4"],
    "lengths-3": ["--config.model.compact_lengths=3"],
    "lengths-4": ["--config.model.compact_lengths=4"],
    # Each scanned stage's kept blocks in one loop of dynamic length (one program, no padding).
    "loop": ["--config.model.implementation=loop"],
    # Scans inlined (no loop per block; see README, "Skipping implementation per backend").
    "constant-unrolled": ["--config.model.final_survival_prob=1.0",
                          "--config.model.scan_unroll=True"],
    "auto-unrolled": ["--config.model.scan_unroll=True"],
    "lengths-3-unrolled": ["--config.model.compact_lengths=3", "--config.model.scan_unroll=True"],
}


def _epoch_images(args, workdir) -> str:
    """The random image folder of ``--whole-epochs``: made in ``workdir``, or in (and reused
    from) ``--images-dir``, where a marker file records what was written."""
    per_class = -(-(args.train_images + 500) // 10)  # + the 500 validation images
    spec = f"10 classes, {per_class} train and {args.test_images // 10} test images each\n"
    root = os.path.normpath(os.path.abspath(args.images_dir or os.path.join(workdir, "images")))
    marker = os.path.join(root, "bench_train_images.txt")
    if args.images_dir and os.path.exists(marker):
        with open(marker) as f:
            if f.read() == spec:
                print(f"reusing the images in {root}", flush=True)
                return root
        raise bench_cli.bad_flag(
            f"--images-dir {root} holds other images than this run needs ({spec.strip()}); "
            "give another directory or delete it.")
    if args.images_dir and os.path.exists(root) and os.listdir(root):
        raise bench_cli.bad_flag(f"--images-dir {root} exists and is not a bench_train image "
                                 "folder; give another directory.")
    t0 = time.perf_counter()
    # Written beside root under a fresh name, renamed when complete: a killed run leaves no
    # half folder at root (only its own staging folder, named after root).
    os.makedirs(os.path.dirname(root), exist_ok=True)
    partial = tempfile.mkdtemp(dir=os.path.dirname(root),
                               prefix=os.path.basename(root) + ".partial-")
    try:
        data.testing.make_image_folder(partial, classes=10, per_class_train=per_class,
                                       per_class_test=args.test_images // 10)
        with open(os.path.join(partial, os.path.basename(marker)), "w") as f:
            f.write(spec)
        if os.path.isdir(root):
            os.rmdir(root)  # empty (checked above)
        os.replace(partial, root)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # left only by a failure; ours alone
    print(f"wrote the images in {time.perf_counter() - t0:.1f}s", flush=True)
    return root


class _EpochCompiles:
    """Seconds the main thread spent tracing, lowering and compiling inside each training
    epoch, by epoch (a context manager, for one ``train_and_evaluate``).

    Compact mode compiles a program the first time a bucket tuple is drawn, also after
    epoch 1 (multiple 4, ResNet-110, 351 steps: 7 new programs in epoch 2, 2 in epoch 3,
    ~4 s each on a GPU). The trainer keeps that stall out of the epoch's ``epoch_time_s``
    (recording it as ``compile_time_s``); the epochs are read here with it added back, so
    that what is subtracted is what this class measures, once. The trainer
    records no timestamps, so the epochs' windows are taken from its ``_train_epoch`` (the
    steps, without evaluations) and JAX's compile events are assigned to the window they
    end in; those of other threads (an async checkpoint's) stall no step and are left out.
    An ``eval_every_steps`` evaluation inside an epoch (``loop._evaluate_at_step``; the
    first compiles the evaluation programs) counts for no epoch: the trainer keeps its whole
    time, compiles included, out of ``epoch_time_s`` already (:meth:`_untimed`).

    A compile stalls the steps only by what outlasts the steps already dispatched (up to
    the 20 between the trainer's metric syncs, ~0.4 s on an H100), so the queue is drained
    before a new bucket tuple's program compiles (:meth:`_synced`): the seconds subtracted
    are then a stall, not the queued steps' time too. It fails loudly where the trainer's
    internals no longer match (no ``_train_epoch`` called, no ``_jitted`` to wrap).
    """

    EVENTS = (compilation._COMPILE, compilation._TRACE, compilation._LOWER)

    def __init__(self):
        self.seconds: dict[int, float] = {}
        self.programs: dict[int, int] = {}
        self.timed: list[int] = []  # the epochs whose _train_epoch ran wrapped
        self._epoch = None  # the epoch whose steps are running, else None
        self._drawn: set = set()  # the bucket tuples whose program exists

    def _on_duration(self, event, seconds, **_):
        if (self._epoch is None or event not in self.EVENTS
                or threading.current_thread() is not threading.main_thread()):
            return
        self.seconds[self._epoch] = self.seconds.get(self._epoch, 0.0) + seconds
        self.programs[self._epoch] = (self.programs.get(self._epoch, 0)
                                      + (event == compilation._COMPILE))

    def _timed(self, original):
        def train_epoch(run, compiled, epoch, end):
            self._epoch = epoch
            self.timed.append(epoch)
            try:
                return original(run, self._synced(compiled), epoch, end)
            finally:
                self._epoch = None
        return train_epoch

    def _untimed(self, original):
        """``loop._evaluate_at_step`` with the compiles inside it counted for no epoch:
        its time is not in the epoch's ``epoch_time_s`` (``run.eval_time``), so subtracting
        them from it took them off twice (SVHN's evaluations every 200 steps: the first
        one's programs, seconds each, off epoch 1; a one-epoch run's steady epoch went
        negative)."""
        def evaluate_at_step(run):
            epoch, self._epoch = self._epoch, None
            try:
                return original(run)
            finally:
                self._epoch = epoch
        return evaluate_at_step

    def _synced(self, compiled):
        """``compiled`` (the trainer's step), in compact mode a copy that waits for the
        steps dispatched before it wherever a bucket tuple is first drawn: its compile then
        stalls the device for all its seconds, as :meth:`of` counts (otherwise the queued
        steps ran meanwhile, and their time was subtracted with the compile). The other
        steps were compiled before the first epoch."""
        if not isinstance(compiled, step_lib.CompactTrainStep):
            return compiled
        jitted = compiled._jitted  # (state, split, gates, buckets), buckets static

        def drained_before_new_programs(state, split, gates, buckets):
            if buckets not in self._drawn:
                self._drawn.add(buckets)
                jax.block_until_ready(state)
            return jitted(state, split, gates, buckets)

        synced = copy.copy(compiled)
        synced._jitted = drained_before_new_programs
        return synced

    def _stops_in_the_steps(self, original):
        """The trainer's signal handler (``StopSignals._handle``), stopping the variant at
        once (``Stopped``) inside an epoch's steps: its next metrics point, up to 20 steps
        away, could be 30 s off in compact mode's first epoch (programs compiled as bucket
        tuples are first drawn), past gpu_suite's SIGKILL, which lost the rows of the
        variants that had finished; an unfinished variant's row is not written anyway. Out
        of the steps (an evaluation) it stops as the trainer does, soon."""
        def handle(stop, signum, frame):
            first = stop.signum is None
            bench_cli.outputs_survive_their_reader()  # its line must not stop the stop
            original(stop, signum, frame)
            if first and self._epoch is not None and type(stop) is stopping.StopSignals:
                print(f"bench_train: stopping the variant now, in epoch {self._epoch}'s "
                      f"steps (it is not timed whole)", flush=True)
                raise stopping.Stopped(f"stopped by {stopping.StopSignals.name(signum)} in "
                                       f"epoch {self._epoch}'s steps", signum)
        return handle

    def __enter__(self):
        self._original = loop._train_epoch
        self._evaluate = loop._evaluate_at_step
        self._handle = stopping.StopSignals._handle
        loop._train_epoch = self._timed(self._original)
        loop._evaluate_at_step = self._untimed(self._evaluate)
        stopping.StopSignals._handle = self._stops_in_the_steps(self._handle)
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        loop._train_epoch = self._original
        loop._evaluate_at_step = self._evaluate
        stopping.StopSignals._handle = self._handle

    def of(self, epochs: int) -> tuple[list[float], list[int]]:
        """The compile seconds and programs of epochs 1..``epochs``; an error where the
        trainer ran them without its ``loop._train_epoch`` (nothing would be subtracted)."""
        missing = sorted(set(range(1, epochs + 1)) - set(self.timed))
        if missing:
            raise RuntimeError(
                f"bench_train: epochs {missing} ran without loop._train_epoch, which "
                "--whole-epochs wraps to time their compiles; update _EpochCompiles to the "
                "trainer's loop.")
        return ([self.seconds.get(e, 0.0) for e in range(1, epochs + 1)],
                [self.programs.get(e, 0) for e in range(1, epochs + 1)])


def _ran_as(rec: dict, model) -> str:
    """What a run trained with, from its run.json's ``implementation`` ``rec`` (``'auto'``
    resolved): 'constant depth' (the plain network: the train step compacts nothing at
    p_L = 1), 'compact, multiple 4', 'compact, 3 lengths', 'lax.cond skip' or 'mask'; with
    the platform it was resolved for."""
    if implementation_lib.is_constant_depth(model):
        how = "constant depth"
    elif rec.get("compact_multiple"):
        how = f"compact, multiple {rec['compact_multiple']}"
    elif rec.get("compact_lengths"):
        how = f"compact, {rec['compact_lengths']} lengths"
    else:
        how = "lax.cond skip" if rec["implementation"] == "skip" else rec["implementation"]
    return f"{how} ({rec['platform']})"


@dataclasses.dataclass
class _EpochRun:
    """One variant's whole epochs: training seconds per epoch (evaluation excluded), the
    compile seconds and programs inside each, evaluation seconds, what it ran as, and the
    run's compile counts (``summary['compilation']``)."""

    epochs: list[float]
    compile_s: list[float]
    compile_programs: list[int]
    evals: list[float]
    ran_as: str
    compilation: dict
    num_train: int = 0  # the training images, validation held out (run.json)
    steps_per_epoch: int = 0  # the trainer's: the last partial batch dropped

    def steady(self) -> float:
        """The median epoch >= 2 (epoch 1 alone if it is the only one), less the compiles
        inside each: a steady-state epoch, as the table's projection needs."""
        net = [e - c for e, c in zip(self.epochs, self.compile_s)]
        return statistics.median(net[1:] or net)

    def later_compiles(self) -> str:
        """'programs, seconds' compiled inside epochs >= 2 (a real run's later stalls)."""
        return f"{sum(self.compile_programs[1:])}, {sum(self.compile_s[1:]):.1f}"

    def eval_s(self) -> float:
        """The median evaluation after epoch 1 (whose evaluation compiles), 0 if none."""
        return statistics.median(self.evals[1:] or self.evals) if self.evals else 0.0


def _whole_epochs(args, workdir):
    """Trains ``args.epochs`` epochs of each variant; returns the report's table rows, and
    the training images and steps per epoch of the last variant (the same for all)."""
    folder = _epoch_images(args, workdir)
    results = {}
    with _VariantStops() as signals:
        run = _variants(args, workdir, folder, results, signals)
    if signals.signum is not None and len(results) == len(args.whole_epochs):
        # After the last variant's last stop point: the table is whole; the exit says so.
        bench_cli.cut_after_the_last(128 + signals.signum, "variants")
    rows = [_epoch_row(name, run, results) for name, run in results.items()]
    return rows, run.num_train, run.steps_per_epoch


class _VariantStops(stopping.StopSignals):
    """SIGTERM and Ctrl-C outside the trainer's steps (inside them the trainer's own
    StopSignals, nested in this, stops the variant at once: :class:`_EpochCompiles`):
    while a variant's trainer loads its data, initialises or compiles before its steps,
    the variant stops at once (``Stopped``; waiting
    for its first metrics point could outlast gpu_suite's 30 s before SIGKILL); between
    variants, or after the trainer's last stop point (passed on by its StopSignals), the
    next variant is not started. Either way the rows of those that finished are appended;
    without this, the command ended at once and the table was lost."""

    def __init__(self):
        super().__init__("now; the rows of the variants that finished are appended")
        self.training = False  # inside a variant's train_and_evaluate

    def _handle(self, signum, frame):
        first = self.signum is None
        # Its line printed to no reader (gpu_suite.py died and sent this SIGTERM) must not
        # raise BrokenPipeError here, which ended the command without the finished rows.
        bench_cli.outputs_survive_their_reader()
        super()._handle(signum, frame)
        if first and self.training:
            raise stopping.Stopped(f"stopped by {self.name(signum)} before the variant's "
                                   "steps", signum)


def _variant_config(args, workdir, folder, name):
    """The validated config of ``--whole-epochs`` variant ``name`` on the images in
    ``folder``."""
    config = _config(args, workdir, folder, epochs=args.epochs)
    config_lib.apply_overrides(config, ["--config.validation_size=500",
                                        f"--config.eval_batch_size={args.eval_batch}",
                                        *EPOCH_VARIANTS[name]])
    return config_lib.validate(config)


def _check_configs(args) -> None:
    """A flag error for a config the trainer refuses at these flags (``loop`` at a depth
    whose stages are not scanned: ``--depth 20``): each ``--whole-epochs`` variant's, or the
    bare-step mode's, before any image is written. The trainer found a variant's only after
    the variants before it had trained, and the command ended without their table."""
    if args.whole_epochs:  # the image folder is not read here
        checks = [(f"--whole-epochs {name}: refused at these flags, leave it out or change them",
                   functools.partial(_variant_config, args, "", "images", name))
                  for name in args.whole_epochs]
    else:
        checks = [("refused at these flags",
                   lambda: config_lib.validate(_config(args, "", "images")))]
    for what, build in checks:
        try:
            build()
        except errors.ConfigError as e:  # the note only where the config's scan is why
            note = (" (this script sets no model.scan: --depth 56 and more scan every stage)"
                    if "model.scan" in str(e) else "")
            raise bench_cli.bad_flag(f"{what}{note}. {e}") from None


def _variants(args, workdir, folder, results, signals) -> _EpochRun:
    """Trains each variant into ``results`` until one is stopped by a signal (a table cut
    short: :func:`bench_cli.cut_before`); returns the last that finished."""
    run = None
    for name in args.whole_epochs:
        jax.clear_caches()  # each variant compiles everything it uses, as a fresh run does
        config = _variant_config(args, workdir, folder, name)
        if signals.signum is not None:  # since the last variant that finished
            if not results:
                raise stopping.Stopped(f"stopped by {stopping.StopSignals.name(signals.signum)}"
                                       " before any variant finished", signals.signum)
            bench_cli.cut_before(128 + signals.signum, f"the variant {name}")
            break
        try:
            signals.training = True
            with _EpochCompiles() as compiles:
                summary = loop.train_and_evaluate(config, os.path.join(workdir, name))
        except stopping.Stopped as e:  # a signal: the table of the variants that finished
            if not results:
                raise
            bench_cli.cut_before(e.exit_status, f"the variant {name}")
            break
        finally:
            signals.training = False
        records = metrics.read_metrics(os.path.join(workdir, name))
        # The epochs' wall time: the trainer's compile_time_s (compact mode's new programs)
        # added back, as _EpochCompiles subtracts the compiles it counts itself.
        epochs = [r["epoch_time_s"] + r.get("compile_time_s", 0.0) for r in records]
        evals = [r["eval_time_s"] for r in records if "eval_time_s" in r]
        meta = evaluate_lib.read_run_json(os.path.join(workdir, name))
        run = _EpochRun(epochs, *compiles.of(len(epochs)), evals,
                        _ran_as(meta["implementation"], config.model), summary["compilation"],
                        meta["data"]["num_train"], summary["steps_per_epoch"])
        results[name] = run
        print(f"{name} ({run.ran_as}): epochs {[round(e, 2) for e in epochs]} s, compiling "
              f"inside them {[round(c, 2) for c in run.compile_s]} s "
              f"({run.compile_programs} programs); evaluations "
              f"{[round(e, 2) for e in evals]} s; {summary['compilation']}", flush=True)
        # Its row's figures now: a kill before the table is appended leaves them in the log.
        ratio = _vs_constant(name, run, results)
        print(f"{name}: median epoch >= 2 {run.steady():.2f} s, compiles excluded"
              f"{'' if ratio == '-' else f', {ratio} x constant'}; 500 epochs (training + "
              f"evaluation each epoch): {_minutes_500(run):.1f} min", flush=True)
    return run


def _vs_constant(name: str, run: _EpochRun, results: dict[str, _EpochRun]) -> str:
    """Variant ``name``'s steady epoch over constant depth's in the same scan form (an
    unrolled variant: unrolled), both from this run, compiles excluded; '-' without one."""
    base = "constant-unrolled" if name.endswith("-unrolled") else "constant"
    return f"{run.steady() / results[base].steady():.3f}" if base in results else "-"


def _minutes_500(run: _EpochRun) -> float:
    """The paper's run: 500 epochs, each one training epoch and one evaluation."""
    return 500 * (run.steady() + run.eval_s()) / 60


def _epoch_row(name: str, run: _EpochRun, results: dict[str, _EpochRun]) -> str:
    """The table row of variant ``name``: its ratio to constant depth (:func:`_vs_constant`)
    and the 500-epoch projection (:func:`_minutes_500`)."""
    comp = run.compilation
    return (f"| {name} | {run.ran_as} | {run.epochs[0]:.1f} | {run.steady():.2f} | "
            f"{_vs_constant(name, run, results)} | {run.later_compiles()} | "
            f"{run.eval_s():.2f} | {_minutes_500(run):.1f} | {comp['programs']} | "
            f"{comp['compile_s']:.1f} |")


def _bare_step(config, workdir, steps):
    ds = setup_lib.load_data(config, workdir)
    setup = setup_lib.build_for_dataset(config, ds)
    split = data.put_on_devices(ds.train, setup.mesh)
    state = setup.init_state(ds.image_shape)
    if isinstance(setup.train_step, step_lib.CompactTrainStep):
        # Compact mode: one program per bucket tuple, compiled on first use; the warm-up
        # below and the timed steps draw the gates of steps 0, 1, 2, ...
        counter = iter(range(10**9))
        compiled = lambda st, sp: setup.train_step(st, sp, next(counter))  # noqa: E731
    else:
        compiled = setup.train_step.lower(state, split).compile()
    for _ in range(2):
        state = compiled(state, split)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state = jax.block_until_ready(compiled(state, split))
        times.append(time.perf_counter() - t0)
    return state, times


def _checkpoint_times(state, workdir, repeats=3):
    ckpts = checkpoint.Checkpoints(os.path.join(workdir, "async"), keep=2)
    blocking, total = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        ckpts.save("latest", 1000 + i, state, {})
        blocking.append(time.perf_counter() - t0)
        ckpts.wait()
        total.append(time.perf_counter() - t0)
    ckpts.close()
    sync = checkpoint.Checkpoints(os.path.join(workdir, "sync"), keep=2, async_save=False)
    t0 = time.perf_counter()
    sync.save("latest", 1, state, {})
    sync.close()
    return blocking, total, time.perf_counter() - t0


def _report(args, loop_ips, step_times, ckpt, state, devices):
    med = statistics.median(step_times)
    spread = f"{min(step_times) * 1e3:.0f}-{max(step_times) * 1e3:.0f}"
    blocking, total, sync = ckpt
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    return "\n".join(
        [
            f"## ResNet-{args.depth}, batch {args.batch}, p_L={args.p}",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, devices: {devices}. "
            f"jax {jax.__version__}, orbax-checkpoint {orbax.checkpoint.__version__}, "
            f"Python {platform.python_version()}.",
            "",
            args.label,
            "",
            "| measure | value |",
            "| --- | --- |",
            f"| whole loop (train_and_evaluate epoch, {args.steps + 2} steps) | {loop_ips:.1f} img/s |",
            f"| bare step, median of {len(step_times)} (min-max ms) | {args.batch / med:.1f} img/s "
            f"({med * 1e3:.0f} ms; {spread}) |",
            f"| loop / bare | {loop_ips / (args.batch / med):.2f} |",
            f"| checkpoint: blocking part of async save ({n_params / 1e6:.2f}M params + momentum) "
            f"| {statistics.median(blocking) * 1e3:.0f} ms |",
            f"| checkpoint: async save until committed | {statistics.median(total) * 1e3:.0f} ms |",
            f"| checkpoint: synchronous save | {sync * 1e3:.0f} ms |",
            "",
        ]
    )


def parse_args(argv) -> argparse.Namespace:
    """The flags, checked before anything is measured; ``args.label``: the provenance line."""
    parser = bench_cli.argument_parser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="cifar10")
    parser.add_argument("--depth", type=int, default=110)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--p", type=float, default=0.5, help="p_L; 1.0 = constant depth")
    parser.add_argument("--steps", type=int, default=20, help="timed bare steps")
    parser.add_argument("--compact", type=int, default=0,
                        help="model.compact_multiple (0: the platform's choice under 'auto')")
    parser.add_argument("--implementation", default="auto", help="model.implementation")
    parser.add_argument("--dtype", default="float32", help="model.dtype")
    parser.add_argument("--cache-dir", default="", help="compilation_cache_dir ('' = off)")
    parser.add_argument("--whole-epochs", default="",
                        help=f"time whole epochs of these variants: {','.join(EPOCH_VARIANTS)}")
    parser.add_argument("--epochs", type=int, default=2, help="--whole-epochs: epochs per run")
    parser.add_argument("--train-images", type=int, default=2560,
                        help="--whole-epochs: training images (45000 = the paper's CIFAR)")
    parser.add_argument("--test-images", type=int, default=10000,
                        help="--whole-epochs: test images evaluated after every epoch")
    parser.add_argument("--eval-batch", type=int, default=500,
                        help="--whole-epochs: evaluation batch (the configs' 500)")
    parser.add_argument("--images-dir", default="",
                        help="--whole-epochs: write the random images here once and reuse them "
                             "in later runs (default: a temporary directory per run)")
    parser.add_argument("--progress_bar", default="false")
    parser.add_argument("--out", default=None,
                        help=bench_cli.OUT_HELP.format("train.md"))
    args = parser.parse_args(argv)
    bench_cli.used_only(parser, args, "with --whole-epochs", bool(args.whole_epochs), "epochs",
                        "train_images", "test_images", "eval_batch", "images_dir")
    bench_cli.used_only(parser, args, "without --whole-epochs (the bare steps timed)",
                        not args.whole_epochs, "steps")
    args.label = run_label("bench_train.py", argv, size_changes(parser, args, SIZES))
    bench_cli.at_least(args, 1, "batch", "steps", "epochs", "train_images", "test_images",
                       "eval_batch")
    bench_cli.cifar_depth(args.depth)
    if args.whole_epochs:
        args.whole_epochs = bench_cli.names_from(args.whole_epochs, EPOCH_VARIANTS,
                                                 "--whole-epochs")
    _check_configs(args)
    batches = [("--batch", args.batch)] + [("--eval-batch", args.eval_batch)] * bool(
        args.whole_epochs)
    for flag, value in batches:  # the trainer's check, named by this script's flags
        if value % jax.device_count():
            raise bench_cli.bad_flag(f"{flag} {value} does not divide by the "
                                     f"{jax.device_count()} devices; use a multiple of "
                                     f"{jax.device_count()}.")
    args.out = bench_cli.results_path(args.out, "train.md")
    bench_cli.distinct_outputs(("--out", args.out), ("--images-dir", args.images_dir),
                               ("--cache-dir", args.cache_dir))
    return args


def main(argv=None):
    """Times the training loop, bare steps and saves, or whole epochs; appends the table."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.whole_epochs:
        return _whole_epochs_main(args)
    with tempfile.TemporaryDirectory() as workdir:
        config = _config(args, workdir)
        summary = loop.train_and_evaluate(config, os.path.join(workdir, "run"))
        loop_ips = summary["final"]["images_per_s"]
        state, step_times = _bare_step(config, os.path.join(workdir, "run"), args.steps)
        ckpt = _checkpoint_times(state, workdir)
    devices = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    bench_cli.append_table(_report(args, loop_ips, step_times, ckpt, state, devices),
                           args.out, title=TITLE)


def _whole_epochs_main(args):
    with tempfile.TemporaryDirectory() as workdir:
        rows, num_train, steps = _whole_epochs(args, workdir)
    devices = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    text = "\n".join([
        f"## Whole epochs, ResNet-{args.depth} (config {args.config}), "
        f"batch {args.batch}, p_L={args.p}, {args.dtype}, {num_train} training images "
        f"({steps} steps, the last partial batch dropped)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, devices: {devices}. "
        f"jax {jax.__version__}, Python {platform.python_version()}.",
        "",
        args.label,
        "",
        f"Evaluation: {_evaluations(args)}, "
        f"timed apart from the epoch. The median epoch >= 2 excludes the tracing, lowering "
        f"and compiling inside each epoch (compact mode's programs first drawn after epoch 1; "
        f"in their own column). 500-epoch projection = 500 x (median epoch + median "
        f"evaluation), compilation excluded.",
        "",
        "| variant | ran as | epoch 1 s (with compiles) | median epoch >= 2 s, compiles "
        "excluded | / constant (same scan form) | compiled inside epochs >= 2: programs, s | "
        "median evaluation s | 500 epochs, min | programs compiled | compile s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
    ])
    bench_cli.append_table(text, args.out, title=TITLE)


def _evaluations(args) -> str:
    """The table's evaluations: after every epoch, and inside the epochs where the config
    evaluates every N steps (``eval_every_steps``: SVHN); an epoch's are summed."""
    every = load_config(args.config).get("eval_every_steps", 0)
    inside = (f", and the validation images (the test images too at a new best) every "
              f"{every} steps inside it (eval_every_steps; an epoch's evaluations summed)"
              ) if every else ""
    return (f"{args.test_images} test + 500 validation images after every epoch{inside} "
            f"(batch {args.eval_batch})")


if __name__ == "__main__":
    bench_cli.run(main)
