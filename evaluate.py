"""Evaluate a checkpoint on the full test set: ``python evaluate.py --workdir W``.

  python evaluate.py --workdir ./workdir/cifar10                       # best-by-validation
  python evaluate.py --workdir ./workdir/cifar10 --checkpoint latest
  python evaluate.py --workdir ./workdir/cifar10 --checkpoint 17550 --split validation
  python evaluate.py --workdir W --depth-curve --order survival    # prune: error vs speed
  python evaluate.py --workdir W --export /tmp/pruned --remove 20  # save a pruned model
  python evaluate.py --workdir W --mc-samples 10                   # Monte-Carlo depth
  python evaluate.py --workdir W --data-dir /new/place/of/the/data  # the data moved

Every block is active and its residual scaled (train=False); the result is printed (a
depth curve as a table, a row as each point is done) and written to
<workdir>/eval_<checkpoint>_<split>.json (<checkpoint>: best, latest or step<N>; a depth
curve: depth_curve_<order>.{json,png} for best, else depth_curve_<order>_<checkpoint>).
The same checkpoint always gives bit-identical numbers. If the requested checkpoint is
unreadable, the next one (for 'best': the next best by the selection metric)
is evaluated, the output says so in "note", and the file is named by the step evaluated,
never 'best' or 'latest'. --data-dir reads a moved dataset, which must match what the run
recorded in run.json (sizes, shape, classes, channel statistics). The depth flags need a
CIFAR ResNet / WideResNet run, one of them per command; --export needs a new or empty DIR.
Multi-host: --multihost (TPU pods, SLURM), with --init_timeout and --heartbeat_timeout as
in train.py. Mistakes (no such run or step, unwritable output, flags that would be
ignored, other data) are reported in one line; --debug (or SDJ_DEBUG=1) shows the
traceback.
"""

import contextlib
import importlib.util
import os
import runpy
import sys

# Before JAX: huge pages and the Ctrl-C guard of the imports (stochastic_depth_jax/startup.py).
if __name__ == "__main__" and (_SPEC := importlib.util.find_spec("stochastic_depth_jax")):
    _imports = runpy.run_path(os.path.join(_SPEC.submodule_search_locations[0], "startup.py"))[
        "start"](globals().get("__file__"))
else:  # not a command, or no package to find: the import below says so
    _imports = contextlib.nullcontext()

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402

with _imports:
    from stochastic_depth_jax import errors, pruning
    from stochastic_depth_jax.training import cli, compilation, depth, distributed, figures
    from stochastic_depth_jax.training import evaluate as evaluate_lib
    from stochastic_depth_jax.training import loop
    from stochastic_depth_jax.training import workdir as workdir_lib


def parse_args(argv):
    parser = distributed.ArgumentParser(  # a usage error reaches a job's others
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # type: '--workdir=~/runs/x' reaches us unexpanded (the shell leaves it), as may the others
    parser.add_argument("--workdir", required=True, type=os.path.expanduser,
                        help="the training run directory")
    parser.add_argument("--checkpoint", default="best", help="'best', 'latest' or a step")
    parser.add_argument("--split", default=None, choices=("test", "validation"),
                        help="(default: test)")
    parser.add_argument("--output", default=None, type=os.path.expanduser,
                        help="JSON path (default in the workdir)")
    parser.add_argument("--data-dir", default=None, metavar="DIR", type=os.path.expanduser,
                        help="where the run's dataset is now, if it moved (tfds data_dir, or "
                             "the root of an image_folder dataset); it must be the same data")
    distributed.add_arguments(parser, manual=False)
    depth.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="tracebacks for every error")
    return parser.parse_args(argv)


def _write(path: str, text: str) -> None:
    try:
        with workdir_lib.atomic_write(path) as f:
            f.write(text + "\n")
    except OSError as e:
        # Not train.py's fix ('resume the run there, or use another --workdir'): another
        # workdir is another run.
        raise errors.WorkdirError(
            f"The result is printed above but not saved: Cannot write {path} "
            f"({e.strerror or e}): {workdir_lib.fix_in_place(e)}, or pass --output PATH."
        ) from e


# The keys of results written before 'evaluated_step' existed: a plain evaluation's, and
# Monte-Carlo depth's (its first version, which had neither 'evaluated_step' nor 'checkpoint').
_EARLIER_RESULTS = ({"checkpoint", "step", "split", "error", "loss", "count"},
                    {"source", "split", "seed", "deterministic", "mc", "samples", "count"})


# The directories a run makes in its workdir and manages (rotates, moves, purges, remakes).
_RUN_DIRS = evaluate_lib.RUN_DIRS


def _check_output(path: str | None, workdir: str) -> None:
    """Refuses an ``--output`` that would replace something other than an earlier result of
    this script (``run.json``, ``summary.json``, any other file), that is in another run's
    workdir (its results there are that run's), that in the run's own workdir is not a
    ``.json`` name other than the run's (every other name there is the run's, written yet or
    not) or is inside one of its directories (``checkpoints/``, ...), or whose directory
    does not exist or may not be written in: checked before the work (a depth curve or
    Monte-Carlo depth of a deep model takes minutes)."""
    if path is None:
        return
    if not path.strip():  # an unset shell variable: the default path was written, unsaid
        raise errors.ConfigError("--output is empty (an unset shell variable?); give a JSON "
                                 "path, or leave the flag out for the default in the workdir.")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):  # found before the work, not once its result is printed
        raise errors.WorkdirError(
            f"--output {path}: its directory {directory} does not exist (or is not a "
            "directory); create it, or give another path. Nothing was evaluated.")
    if not os.access(directory, os.W_OK | os.X_OK):  # else found once the work is done
        raise errors.WorkdirError(
            f"--output {path}: this user may not write in its directory {directory}; give a "
            "path in a directory it can write in, or change that directory's permissions. "
            "Nothing was evaluated.")
    run_dir = _run_dir_holding(directory, workdir)
    if run_dir is not None:
        raise errors.WorkdirError(
            f"--output {path} is inside the run's {run_dir}/, whose contents "
            "the run manages (it deletes, moves and rewrites them); give a path in --workdir "
            f"{workdir} itself or outside it, or leave --output out. Nothing was evaluated.")
    evaluate_lib.refuse_a_run_s_folder(
        path, f"--output {path}", "it deletes, moves and rewrites them: a result named as a "
        "step is replaced by that step's save", "give a path outside it, or leave --output "
        "out. Nothing was evaluated.", folder_of=directory)
    name, in_the_run = os.path.basename(path), _same_directory(directory, workdir)
    if os.path.isfile(os.path.join(directory, evaluate_lib.RUN_FILE)) and not in_the_run:
        raise errors.WorkdirError(
            f"--output {path} is in the workdir of another run ({directory}), where a result "
            f"would pass for that run's; give a path outside it, or in --workdir {workdir}. "
            "Nothing was written.")
    if in_the_run and name.lower() in {n.lower() for n in (*loop.OWN_FILES, loop.DIVERGED_FILE)}:
        raise errors.WorkdirError(
            f"--output {path} is the name of one of the run's own files (it writes "
            f"{', '.join(loop.OWN_FILES)} there; a sweep, its {loop.DIVERGED_FILE}), which "
            "a result would replace or pass for; "
            "give another name, or leave --output out. Nothing was evaluated.")
    # The run's own files that are not JSON have names of their kind: the records it sets
    # aside, the temporary files of its writes, its lock and directories; none ends in .json.
    if in_the_run and not name.lower().endswith(".json"):
        raise errors.WorkdirError(
            f"--output {path}: in the run's workdir a name that does not end in .json is the "
            "run's, or may become one (its metrics.jsonl, the records it sets aside as "
            "<file>.dropped, the temporary files of its writes, <file>.tmp-<digits>, which its "
            f"next start removes, {workdir_lib.LOCK_FILE}, its directories); give a name "
            "ending in .json, or leave --output out. Nothing was evaluated.")
    if not os.path.lexists(path):
        return
    if os.path.isdir(path):
        raise errors.WorkdirError(f"--output {path} is a directory; give the path of a JSON "
                                  "file to write.")
    try:
        with open(path) as f:
            earlier = json.load(f)
        ours = isinstance(earlier, dict) and bool(
            {"evaluated_step", "order_rule"} & earlier.keys()
            or any(keys <= earlier.keys() for keys in _EARLIER_RESULTS))
    except (OSError, ValueError):
        ours = False
    whole = _part_of_a_whole(path, earlier) if ours else None
    if whole is not None:  # e.g. a depth curve's JSON: its numbers would be lost
        raise errors.WorkdirError(
            f"--output {path} is part of {whole}, which it would no longer match; give a new "
            "path, or leave --output out. Nothing was written.")
    if not ours:
        raise errors.WorkdirError(
            f"--output {path} exists and is not a result of evaluate.py (a run's own file "
            "such as run.json or summary.json?); give a new path, or leave --output out (the "
            "default is in the workdir, named by checkpoint and split). Nothing was written.")


def _same_directory(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are one directory, by identity as well as by name: on a
    case-insensitive file system (macOS's, Windows') ``Run/`` opens ``run/``. The same
    real path is one directory whatever the file ids say: some file systems (sshfs-win,
    WebDAV and other network drives) give every file the id 0, which made every directory
    the run's checkpoints/, or an id that changes between calls, which made the workdir
    another run's."""
    try:
        first, second = os.stat(a), os.stat(b)
    except OSError:
        return False
    if os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b)):
        return True
    return bool(first.st_ino and second.st_ino) and os.path.samestat(first, second)


def _run_dir_holding(directory: str, workdir: str) -> str | None:
    """The directory of the run's (``_RUN_DIRS``) that ``directory`` is or lies in, if any,
    however it is named (a link, or ``Checkpoints/`` on a case-insensitive file system)."""
    own = {d: os.path.join(workdir, d) for d in sorted(_RUN_DIRS)}
    own = {d: p for d, p in own.items() if os.path.isdir(p)}
    path = os.path.realpath(directory)
    while True:
        for d, p in own.items():
            if _same_directory(path, p):
                return d
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


# The files evaluate.py writes in a run's workdir: results and depth curves (with sidecars).
_RESULT_NAME = re.compile(r"eval_[A-Za-z0-9_]+\.json|depth_curve_[A-Za-z0-9_]+\.(json|png)")


def _remove_abandoned(workdir: str, output: str | None) -> None:
    """Removes the temporary files (``eval_best_test.json.tmp-<12 hex digits>``, ...) that
    evaluations killed while writing left in ``workdir`` (and beside ``output``): a run's
    start leaves them (another evaluation may be writing), so each kill left one more. Only
    those of this script's names that no live process is writing."""
    workdir_lib.remove_abandoned_temporaries(workdir, _RESULT_NAME.fullmatch)
    if output:
        name = os.path.basename(output)
        workdir_lib.remove_abandoned_temporaries(os.path.dirname(os.path.abspath(output)),
                                                 lambda n: n == name)


def _part_of_a_whole(path: str, earlier: dict) -> str | None:
    """What an earlier result of this script at ``path`` belongs to, if it is not a copy of
    its own: a figure's sidecar JSON (a depth curve's, beside its PNG) or an export's
    ``export.json`` (beside its ``model.json``); None for a result that stands alone."""
    directory = os.path.dirname(os.path.abspath(path))
    figure = earlier.get("figure")
    if isinstance(figure, str) and os.path.isfile(os.path.join(directory, figure)) and (
            figures.sidecar_path(figure) == os.path.basename(path)):
        return f"the figure {os.path.join(os.path.dirname(path), figure)} (its sidecar)"
    if "output" in earlier and os.path.isfile(os.path.join(directory, pruning.MODEL_FILE)):
        return f"the export {os.path.dirname(path) or '.'} (its record)"
    return None


def run(args) -> dict:
    job = distributed.job_arguments(args)
    distributed.expect_job(**job)  # A mistake in the flags still reaches the others.
    depth.check_arguments(args)  # before any work: refuses ignored or clashing flags
    _check_output(args.output, args.workdir)
    if not os.path.isdir(args.workdir):
        raise errors.CheckpointError(f"--workdir {args.workdir!r} is not a directory.")
    distributed.initialize(**job)
    if distributed.is_primary():
        _remove_abandoned(args.workdir, args.output)
    # The cache the run used (its recorded compilation_cache_dir), so that the programs
    # load instead of compiling again on every call: off for a job that must not use it or
    # where it cannot be used, read-only said once; on stderr, as stdout is the JSON alone
    # (evaluate.py ... | jq).
    cache = compilation.for_recorded_run(_recorded_cache_setting(args.workdir))
    cache.announce(sys.stderr)
    with cache.in_use():
        return _evaluate(args)


def _recorded_cache_setting(workdir: str) -> str | None:
    """The ``compilation_cache_dir`` that ``workdir``'s run.json records; None where it
    records none or cannot be read (the evaluation then says what is wrong with it)."""
    try:
        meta = evaluate_lib.read_run_json(workdir)
    except errors.Error:
        return None
    setting = (meta or {}).get("config", {}).get("compilation_cache_dir")
    return setting if isinstance(setting, str) else None


def _evaluate(args) -> dict:
    from stochastic_depth_jax.training import evaluate  # After initialize: touches devices.

    analysis = depth.run_from_args(args)  # --depth-curve / --export / --mc-samples
    if analysis is None:
        result = evaluate.evaluate_checkpoint(args.workdir, args.checkpoint, args.split,
                                              data_dir=args.data_dir)
        label = evaluate.result_label(args.checkpoint, result)
        default = os.path.join(args.workdir, f"eval_{label}_{args.split}.json")
    else:
        result, default = analysis
    text = json.dumps(result, indent=2)
    if not distributed.is_primary():  # every process has the result; one prints it
        return result
    # A depth curve's JSON has ~16 lines per point: its table was printed a row at a time
    # as it was computed (the JSON is written).
    print(depth.curve_footer(result) if args.depth_curve else text, flush=True)
    if "note" in result:
        print(f"warning: {result['note']}", file=sys.stderr, flush=True)
    # None: the analysis wrote its JSON (the depth curve). An export's record also stays
    # beside its model (export.json) when --output names another copy.
    outputs = [args.output or default] if args.output or default else []
    if args.export and args.output and os.path.abspath(args.output) != os.path.abspath(default):
        outputs.insert(0, default)
    for output in outputs:
        _write(output, text)
    if outputs:  # On stderr: stdout stays the JSON alone, for a pipe (evaluate.py ... | jq).
        print(f"{summary_line(result)}Written: {' and '.join(outputs)}", file=sys.stderr,
              flush=True)
    return result


def summary_line(result: dict) -> str:
    """The numbers a person looks for in ``result`` (a plain evaluation's, Monte-Carlo
    depth's or an export's JSON), as a sentence ending in a space; '' for another."""
    images = "FAKE random-label images" if result.get("fake_data") else "images"
    if "mc" in result:
        return (f"Monte-Carlo depth, {result['samples']} sub-networks: {result['split']} error "
                f"{depth.percent(result['mc']['error'])} (deterministic network "
                f"{depth.percent(result['deterministic']['error'])}, members' mean "
                f"{depth.percent(result['member_mean_error'])}) on {result['count']:,} "
                f"{images}{evaluate_lib.selection_text(result)}. ")
    if "output" in result:
        kept, test = result["blocks_kept"], result["error"].get("test", {})
        fake = ", FAKE random-label data" if result.get("fake_data") else ""
        return (f"{kept} of {kept + len(result['removed'])} blocks kept "
                f"({result['num_params']['pruned']:,} of {result['num_params']['full']:,} "
                f"parameters), test error {depth.percent(test['pruned'])} (all blocks: "
                f"{depth.percent(test['full'])}{fake}). " if test else "")
    if "error" in result and "evaluated_step" in result:
        label = evaluate_lib.result_label(result["requested"], result)  # never a step's kind
        # A best chosen by this split's own error (select_best_by='test'): said beside it.
        chosen = evaluate_lib.selection_text(result)
        step = label.startswith("step")
        which = "" if step else f"checkpoint {label}{chosen}, "
        epoch = evaluate_lib.epoch_text(result.get("epoch"))
        epoch = epoch and f", epoch {epoch}"
        return (f"{result['split'].capitalize()} error {depth.percent(result['error'])} (loss "
                f"{result['loss']:.4f}) on {result['count']:,} {images}, {which}step "
                f"{result['evaluated_step']}{epoch}{chosen if step else ''}. ")
    return ""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # args.debug too: argparse takes an abbreviation ('--deb'), which the list does not show.
    cli.run_reporting_errors(lambda: run(args), args.debug or cli.debug_requested(argv))


if __name__ == "__main__":
    main()
