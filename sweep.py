"""Sweep p_L over depths as separate resumable runs and draw the paper's figures.

  python sweep.py --config cifar10 --depths 20,32,44,56,110 --p-last 0.1,0.2,...,1.0 --root runs/pL
  python sweep.py --config cifar10:smoke --depths 8,14 --p-last 0.5,1.0 --root /tmp/sweep
  python sweep.py --root /tmp/sweep --collect          # only read the runs and draw

Each (depth, p_L) pair trains in <root>/depth<d>_pL<p> (p_L = 1 is constant depth) of a
CIFAR ResNet or WideResNet config (the ViT and ConvNeXt have no p_L). Rerunning the same
command skips finished runs (one whose best an earlier version never measured on the test
set is run again, which measures it, where its best and last checkpoints are kept) and
resumes interrupted ones; a run recorded with another config is refused (a larger
num_epochs or max_steps extends it). Figures go to
<root>/figures: fig8_error_vs_p_last.png (test error of the best-by-validation epoch vs p_L,
one line per depth), fig7_first_conv_grad.png (first-conv gradient magnitude per epoch,
constant vs stochastic depth), fig3_error_curves.png (test error and training loss per
epoch, constant vs stochastic depth) and training_time.md, drawn from every run under --root
(earlier commands' too; runs of different configs as separate series); each names the runs
it came from, and stderr says which runs each includes. stdout holds two JSON objects
alone (`| jq` reads them): each run's status, then the figures' paths.
A run whose loss becomes non-finite is recorded as diverged (<run>/diverged.json) and the
sweep goes on; Fig. 8 leaves it out, and the command ends with status 1 naming it (a rerun
skips it: remove its directory to train it again).
Any --config.<field>=<value> override applies to every run, except model.depth and
model.final_survival_prob, which --depths and --p-last set (overriding them is refused).
Mistakes (also flags that --collect would ignore) are reported in one line; --debug (or
SDJ_DEBUG=1) shows the traceback.
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
import shlex  # noqa: E402

with _imports:
    from configs import CONFIGS, config_for_model, load_config, parse_overrides
    from stochastic_depth_jax import errors
    from stochastic_depth_jax.training import cli


def _list(cast):
    def parse(text):
        try:
            return [cast(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return parse


def _sweepable_configs():
    """The registered configs of a block-wise ResNet (the ones with a p_L to sweep)."""
    from stochastic_depth_jax.training import config as config_lib

    return [n for n in sorted(CONFIGS)
            if load_config(n).model.get("name", "cifar_resnet") in config_lib.MODELS]


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help=f'{_sweepable_configs()} or a config file of a CIFAR '
                        'ResNet / WideResNet, optionally ":smoke" (cifar10, cifar100: also '
                        '":official", ":official_smoke")')
    parser.add_argument("--depths", type=_list(int), default=None, help="e.g. 20,32,44")
    parser.add_argument("--p-last", type=_list(float), default=None, help="e.g. 0.2,0.5,1.0")
    parser.add_argument("--root", required=True, type=os.path.expanduser,  # '--root=~/x'
                        help="the sweep directory")
    parser.add_argument("--collect", action="store_true",
                        help="do not train; draw every run under --root")
    parser.add_argument("--debug", action="store_true", help="tracebacks for every error")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(parser, rest)
    # A missing flag is a usage error (status 2, as argparse's own); flags that --collect
    # would ignore are refused in run(), in one line with status 1, as train.py and
    # evaluate.py refuse theirs. An empty list (--depths "") is given: plan() says it
    # lists nothing.
    if not args.root.strip():  # else the runs train in the current directory, silently
        parser.error("--root is empty (an unset shell variable?); give the sweep directory")
    if not args.collect and None in (args.config, args.depths, args.p_last):
        parser.error("training a sweep needs --config, --depths and --p-last (or use --collect)")
    return args, overrides


def check_arguments(args, overrides):
    """Refuses the training flags with --collect: they would be ignored, as every run under
    --root is drawn as it was trained."""
    given = [f for f, v in (("--config", args.config), ("--depths", args.depths),
                            ("--p-last", args.p_last)) if v is not None] + overrides
    if args.collect and given:
        raise errors.ConfigError(
            f"--collect draws every run under --root as it was trained; drop {', '.join(given)} "
            "(or drop --collect to train them).")


def check_model_override(spec, overrides):
    """Refuses ``--config.model.name=`` a model the sweep does not take before the config
    loads: a model without p_L (the ViT, ConvNeXt), which loading refused as not fitting the
    config's model block, advising that model's own config, which the sweep refuses as
    well; or no model at all, which validation answered with every model, those two
    included."""
    from stochastic_depth_jax.training import config as config_lib

    names = [text for key, text in map(config_lib.split_override, overrides)
             if key == "model.name"]
    if not names or names[-1] in config_lib.MODELS:
        return
    if names[-1] not in config_lib.MODEL_VALIDATORS:
        raise errors.ConfigError(
            f"Invalid config: model.name={names[-1]!r}; valid in a sweep: "
            f"{sorted(config_lib.MODELS)} (the block-wise ResNets, the models with a p_L).")
    raise errors.ConfigError(
        f"--config.model.name={names[-1]}: the sweep is over model.depth and p_L "
        f"(model.final_survival_prob) of the block-wise ResNets {sorted(config_lib.MODELS)}, "
        f"and {names[-1]!r} has no p_L. Train it with train.py "
        f"{config_for_model(spec, overrides, names[-1]) or '--config <a config file>'}, its "
        "drop path set by --config.model.drop_path_rate.")


def figures_error(error, root, directory):
    """``error``, a disk or permission failure while drawing into ``directory``, in the
    sweep's words: it said to 'use another --workdir' (sweep.py has no such flag, and
    another --root has none of the runs) and to 'resume the run there'. Another error is
    returned as it is, to be raised."""
    from stochastic_depth_jax.training import workdir as workdir_lib

    os_error = workdir_lib.anticipated_os_error(error)
    if os_error is None:
        return error
    fix = workdir_lib.fix_in_place(os_error)
    return errors.WorkdirError(
        f"Cannot write {os_error.filename or directory} ({os_error.strerror or os_error}): "
        f"the runs are kept; {fix}, then draw the figures with sweep.py --root "
        f"{shlex.quote(root)} --collect.")


def run(args, overrides):
    # stdout holds the two JSON objects alone (`sweep.py ... | jq`); every other line, the
    # runs' training and the figures' report, goes to stderr.
    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        _run(args, overrides, out)


def _run(args, overrides, out):
    from stochastic_depth_jax.training import sweep

    check_arguments(args, overrides)
    status = {}
    if not args.collect:
        sweep.check_overrides(overrides)
        check_model_override(args.config, overrides)
        train = " ".join(map(shlex.quote, ["train.py", "--config", args.config, *overrides]))
        sweep.require_sweepable(load_config(args.config, overrides), train)
        runs = [(name, load_config(args.config, overrides + extra))
                for name, extra in sweep.plan(args.depths, args.p_last)]
        status = sweep.run_sweep(runs, args.root)
        print(json.dumps(status, indent=2), file=out, flush=True)
    # Every run under --root, not only this command's: a rerun with fewer depths or p_L
    # values must not redraw the figures without the runs finished before.
    figures = os.path.join(args.root, sweep.FIGURES_DIR)
    try:
        outputs = sweep.write_figures(sweep.collect(args.root), figures)
    except OSError as e:
        raise figures_error(e, args.root, figures) from e
    print(json.dumps(outputs, indent=2), file=out, flush=True)
    sweep.check_diverged(status, args.root)  # the others' figures are drawn: exit 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_args(argv)
    # args.debug too: argparse takes an abbreviation ('--deb'), which the list does not show.
    debug = args.debug or cli.debug_requested(argv)
    cli.run_reporting_errors(lambda: run(args, overrides), debug)


if __name__ == "__main__":
    main()
