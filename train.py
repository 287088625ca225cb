"""Train a stochastic-depth ResNet, ViT or ConvNeXt: ``python train.py --config cifar100``.

  python train.py --config cifar10                    # paper, CIFAR-10+, ResNet-110
  python train.py --config cifar10:smoke --workdir /tmp/smoke   # tiny CPU run, fake data
  python train.py --config configs/svhn.py --config.batch_size=256 --config.seed=1

Configs: the modules of configs/ (listed at the end of --help); any field can be overridden
with --config.<field>=<value>. Restarting with the same --workdir resumes.
Multi-host: --multihost (TPU pods, SLURM), or --coordinator_address/--num_processes/
--process_id on every process (--init_timeout: how long to wait for all of them;
--heartbeat_timeout: after how long a silent process is taken for dead). Every process
checks that its config is process 0's; a process that fails stops the others (one that
fails before joining, on a typo'd override, joins only to tell them).
One run at a time per workdir (a second one is refused, naming the first). Mistakes are
reported in one line ("error: ..."); --debug (or SDJ_DEBUG=1) shows the traceback.
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
    from configs import CONFIGS, load_config, parse_overrides
    from stochastic_depth_jax.training import cli, distributed


def parse_args(argv):
    parser = distributed.ArgumentParser(  # a usage error reaches a job's others
        description=__doc__,
        epilog="configs: " + ", ".join(CONFIGS),  # From the package: cannot drift.
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", required=True,
        help=f'{sorted(CONFIGS)} or a config file, optionally ":smoke" (cifar10, cifar100: '
             'also ":official", ":official_smoke")',
    )
    parser.add_argument(  # '--workdir=~/runs/x' reaches us unexpanded: the shell leaves it
        "--workdir", default=None, type=os.path.expanduser,
        help="outputs (default ./workdir/<config>[_<variant>])"
    )
    distributed.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="tracebacks for every error")
    args, rest = parser.parse_known_args(argv)
    if args.workdir is not None and not args.workdir.strip():  # else the default, silently
        parser.error("--workdir is empty (an unset shell variable?); give a directory, or "
                     "leave the flag out for ./workdir/<config>[_<variant>]")
    return args, parse_overrides(parser, rest)  # --config.a.b=v or --config.a.b v


def default_workdir(spec):
    """``./workdir/<config>[_<variant>]``: 'cifar10:smoke' -> ./workdir/cifar10_smoke, so a
    smoke run and the real run never share a workdir; a config file's path joins the name
    ('configs/svhn.py' -> ./workdir/configs_svhn), anything but letters, digits, '.', '-'
    and '_' replaced by '_'."""
    name, _, variant = spec.partition(":")
    name = "_".join(filter(None, (name.removesuffix(".py"), variant)))
    return "./workdir/" + (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run")


def run(args, overrides):
    job = distributed.job_arguments(args)
    distributed.expect_job(**job)  # A mistake in the config still reaches the others.
    config = load_config(args.config, overrides)
    distributed.initialize(**job)
    distributed.check_same_config(json.loads(config.to_json()))
    import jax  # After initialize, as what touches devices.

    from stochastic_depth_jax.training import loop, progress

    workdir = args.workdir or default_workdir(args.config)
    summary = loop.train_and_evaluate(config, workdir)
    if jax.process_index() == 0:  # The full results are in summary.json.
        print("\n".join(progress.summary_lines(summary, workdir, config.num_epochs)), flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_args(argv)
    # args.debug too: argparse takes an abbreviation ('--deb'), which the list does not show.
    debug = args.debug or cli.debug_requested(argv)
    cli.run_reporting_errors(lambda: run(args, overrides), debug)


if __name__ == "__main__":
    main()
