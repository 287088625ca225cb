"""Inference throughput of exported pruned models vs the full model (depth on demand).

Builds a CIFAR ResNet (random weights: speed does not depend on them), removes the first
k blocks of the 'survival' order (the deepest first under linear decay) for each requested
fraction, exports each pruned model (blocks deleted, smaller parameter tree) and times
``model.apply(variables, x, train=False)`` on one device, compilation excluded, the models
interleaved round by round so that machine noise hits all of them alike.

Run by hand (not in CI)::

    python benchmarks/bench_prune.py                              # ResNet-110, batch 128
    python benchmarks/bench_prune.py --depth 20 --batch 32 --rounds 3

Prints a table and appends it, with machine, versions, date, code and command line, to
``benchmarks/results/prune_<backend>.md`` (``--out``: elsewhere; ``--out ''`` or
``--no-write``: nowhere, so not ``--no-write`` with ``--out FILE``); a run at other sizes
than the defaults says so in its table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cli  # noqa: E402  (next to this file; first: Ctrl-C in JAX's import)

import jax

from stochastic_depth_jax import CifarResNet, pruning
from stochastic_depth_jax.training import compilation

from provenance import run_label, size_changes  # noqa: E402

SIZES = ("depth", "batch")  # not --rounds: how often, not what (provenance.REPEATS)
TITLE = "# Pruned-model inference benchmark (benchmarks/bench_prune.py)"


def parse_args(argv) -> argparse.Namespace:
    """The flags, checked before anything is measured; ``args.label``: the provenance line."""
    parser = bench_cli.argument_parser(description=__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=110, help="CIFAR ResNet depth (6n+2)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--fractions", default="0,0.25,0.5,0.75",
                        help="fractions of the blocks to remove, in [0, 1) (the full model, "
                             "0, is always measured: the baseline)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    parser.add_argument("--out", default=None,
                        help=bench_cli.OUT_HELP.format("prune_<backend>.md"))
    parser.add_argument("--no-write", action="store_true", help="print the table only "
                        "(as --out ''; not with another --out)")
    args = parser.parse_args(argv)
    if args.no_write and args.out:
        raise bench_cli.bad_flag(f"--no-write with --out {args.out}: --no-write prints the "
                                 f"table only, so nothing would be written there. Drop one of "
                                 f"the two flags.")
    args.label = run_label("bench_prune.py", argv, size_changes(parser, args, SIZES))
    bench_cli.at_least(args, 1, "batch", "rounds")
    bench_cli.cifar_depth(args.depth)
    args.fractions = bench_cli.numbers(args.fractions, "--fractions")
    if not all(0 <= f < 1 for f in args.fractions):
        raise bench_cli.bad_flag(f"--fractions {args.fractions}: each in [0, 1) (1 would "
                                 f"remove every block).")
    args.out = bench_cli.results_path("" if args.no_write else args.out,
                                      f"prune_{jax.default_backend()}.md")
    return args


def main(argv=None):
    """Times the pruned models' inference and appends the table (see the module's doc)."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    with bench_cli.jax_cache():  # JAX_COMPILATION_CACHE_DIR, checked as train.py's cache
        return _measure(args)


def _measure(args):
    """:func:`main`'s work, once its flags are checked."""
    model = CifarResNet(depth=args.depth, num_classes=10)
    x = jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3))
    variables = model.init({"params": jax.random.key(1)}, x[:1], train=False)
    order = pruning.survival_order(model)
    L = model.num_blocks()
    variants = {}
    # The full model always: each row's 'time / full' is relative to it (without fraction 0
    # the least pruned model was called full).
    for k in sorted({0} | {int(round(f * L)) for f in args.fractions}):
        pruned, pvars = pruning.prune(model, variables, pruning.keep_mask(L, order[:k]))
        fn = jax.jit(lambda v, x, m=pruned: m.apply(v, x, train=False))
        # The first call's column is a compile: under JAX_COMPILATION_CACHE_DIR a second
        # run timed loading the program from the persistent cache instead.
        with compilation.cache_dir_in_use(""):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(pvars, x))
            variants[k] = (fn, pvars, time.perf_counter() - t0, pruning.param_count(pvars))
    times = {k: [] for k in variants}
    for _ in bench_cli.rounds(args.rounds):
        for k, (fn, pvars, _, _) in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(pvars, x))
            times[k].append(time.perf_counter() - t0)
    full = statistics.median(times[0])
    rows = ["| blocks removed | blocks kept | parameters | median ms (min-max) | images/s | "
            "time / full | first call (compile) s |", "|---|---|---|---|---|---|---|"]
    for k, (_, _, first, params) in variants.items():
        med = statistics.median(times[k])
        rows.append(f"| {k} | {L - k} | {params:,} | {1e3 * med:.0f} ({1e3 * min(times[k]):.0f}-"
                    f"{1e3 * max(times[k]):.0f}) | {args.batch / med:.0f} | {med / full:.2f} | "
                    f"{first:.1f} |")
    device = jax.devices()[0]
    header = (f"## ResNet-{args.depth}, batch "
              f"{args.batch}, order 'survival'\n\nMachine: {platform.machine()}, "
              f"{os.cpu_count()} CPU cores, device: {device.device_kind} ({device.platform}). "
              f"jax {jax.__version__}, Python {sys.version.split()[0]}.\n\n{args.label}\n\n")
    text = header + "\n".join(rows) + "\n"
    bench_cli.append_table(text, args.out, title=TITLE)


if __name__ == "__main__":
    bench_cli.run(main)
