"""Compact-mode granularity without a GPU: programs compiled vs padded blocks.

Compact mode (the GPU default) scans each stage over its kept blocks only, padded up to one
of a few static lengths: a multiple of m (``model.compact_multiple``, rows "multiple m") or
c lengths per stage fitted to the survival schedule (``model.compact_lengths``, rows
"lengths c"; :mod:`stochastic_depth_jax.buckets`). Each distinct tuple of per-stage lengths
is one compiled program. Finer lengths waste fewer blocks on padding but compile more
programs, and those compilations land in the epochs where each tuple first appears. Both
sides follow from the gates alone, so this counts them exactly, for the trainer's own gate
draws (``fold_in(gate_key, step)``, the model's ``compact_buckets``), with no model run::

    python benchmarks/compact_buckets.py                         # ResNet-110, 500 epochs
    python benchmarks/compact_buckets.py --depth 1202 --epochs 100 --multiples 1,4,8

Columns: blocks computed per step as a fraction of all blocks (stage-first blocks always run;
scanned stages run their padded length; constant depth is 1.0 and the expected kept fraction
is the compute floor), padding as a fraction of the kept blocks, and the number of distinct
programs compiled after 1, 3, 10, ... epochs (all of them compile in a fresh run; with the
persistent compilation cache a repeated or resumed run reuses them). Multiply by a measured
compile time per program (``bench_train.py --whole-epochs`` prints compiles and seconds) to
get the compile time each granularity costs. Appends the table, with date, code and command
line, to ``benchmarks/results/compact_buckets.md`` (``--out``: elsewhere); a run at other
sizes than the defaults says so in its table.
"""

from __future__ import annotations

import argparse
import functools
import sys

import bench_cli  # next to this file; first: Ctrl-C in JAX's import

import jax
import jax.numpy as jnp
import numpy as np

from stochastic_depth_jax import CifarResNet
from stochastic_depth_jax.training.step import StepKeys, step_gates
from provenance import run_label, size_changes

SIZES = ("depth", "final_survival", "epochs", "steps_per_epoch", "seed")


def parse_args(argv=None) -> argparse.Namespace:
    ap = bench_cli.argument_parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=110, help="CIFAR ResNet depth (6n+2)")
    ap.add_argument("--final-survival", type=float, default=0.5, help="p_L (linear decay)")
    ap.add_argument("--multiples", default="1,2,4,6", help="compact multiples to compare")
    ap.add_argument("--lengths", default="3,4,5",
                    help="lengths per stage (fitted to the schedule) to compare")
    ap.add_argument("--epochs", type=int, default=500, help="epochs to simulate")
    ap.add_argument("--steps-per-epoch", type=int, default=351,
                    help="45k training images / batch 128 (the paper's CIFAR split)")
    ap.add_argument("--seed", type=int, default=0, help="config.seed of the run")
    ap.add_argument("--out", default=None, help=bench_cli.OUT_HELP.format("compact_buckets.md"))
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    args.label = run_label("compact_buckets.py", argv, size_changes(ap, args, SIZES))
    for name in ("multiples", "lengths"):
        values = bench_cli.numbers(getattr(args, name), f"--{name}", int)
        if any(m < 1 for m in values):
            raise bench_cli.bad_flag(f"--{name} {getattr(args, name)}: each must be >= 1.")
        setattr(args, name, values)
    bench_cli.at_least(args, 1, "epochs", "steps_per_epoch")
    bench_cli.cifar_depth(args.depth)
    if not 0 < args.final_survival < 1:  # 1: constant depth, no gates drawn (a traceback)
        raise bench_cli.bad_flag(f"--final-survival {args.final_survival}: p_L in (0, 1) "
                                 f"(at 1, constant depth, no block is dropped: nothing to "
                                 f"bucket).")
    model = CifarResNet(depth=args.depth)
    if not any(model.compact_buckets(np.ones(model.num_blocks(), bool))):
        # Every block of an unscanned stage runs, masked: the rows counted its stage-first
        # blocks only (a third of ResNet-20's) and a negative padding.
        raise bench_cli.bad_flag(
            f"--depth {args.depth}: its stages ({model.stage_sizes_()[0]} blocks) are not "
            f"scanned, so compact mode has no scan lengths to choose (every block runs, "
            f"masked); give --depth 56 or more (stages of 9 blocks or more are scanned).")
    args.out = bench_cli.results_path(args.out, "compact_buckets.md")
    return args


def draw_all(model: CifarResNet, seed: int, steps: int, chunk: int = 8192) -> np.ndarray:
    """The run's gates for steps 1..``steps``, bool ``[steps, L]``, as the trainer draws them."""
    key = StepKeys.from_seed(seed).gates
    draw = jax.jit(jax.vmap(lambda s: step_gates(model, key, s, batch_size=1)))
    out = [np.asarray(draw(jnp.arange(a, min(a + chunk, steps + 1), dtype=jnp.int32)))
           for a in range(1, steps + 1, chunk)]
    return np.concatenate(out)


def checkpoints(epochs: int) -> list[int]:
    """Epoch counts at which the program count is reported: 1, 3, 10, 30, 100, ... epochs."""
    marks = [e for e in (1, 3, 10, 30, 100, 300, 500, 1000) if e < epochs]
    return marks + [epochs]


def granularity_row(model, gates: np.ndarray, label: str, bucketing, steps_per_epoch: int,
                    marks: list[int]) -> dict:
    """Block-compute fraction, padding and programs-compiled-by-epoch for one bucketing
    (host gates ``[L]`` -> per-stage scan lengths)."""
    sizes = model.stage_sizes_()
    first_blocks = len(sizes)
    seen: set[tuple[int, ...]] = set()
    new_at = []  # step index of each program's first use
    computed = 0
    for i, g in enumerate(gates):
        buckets = bucketing(g)
        computed += first_blocks + sum(buckets)
        if buckets not in seen:
            seen.add(buckets)
            new_at.append(i)
    new_at = np.asarray(new_at)
    total = gates.shape[0] * gates.shape[1]
    kept_rest = computed - first_blocks * gates.shape[0]
    scanned_kept = sum(int(gates[:, s + 1:s + n].sum())
                       for s, n in zip(np.cumsum([0, *sizes[:-1]]), sizes))
    return {
        "label": label,
        "computed": computed / total,
        "padding": (kept_rest - scanned_kept) / max(int(gates.sum()), 1),
        "programs": [int((new_at < e * steps_per_epoch).sum()) for e in marks],
    }


def table(args, model, gates, rows, marks) -> str:
    kept = gates.mean()
    head = " | ".join(f"{e} ep" for e in marks)
    lines = [
        f"\n## Compact-mode granularity, ResNet-{args.depth}, p_L {args.final_survival}, "
        f"{args.steps_per_epoch} steps/epoch, seed {args.seed}\n",
        f"{args.label}\n",
        "Exact counts from "
        f"the trainer's gate draws; no model run. Kept blocks (the compute floor): "
        f"{kept:.4f} of {gates.shape[1]}.\n",
        f"| scan lengths | blocks computed / all | padding / kept | programs after {head} |",
        "|---|---|---|" + "---|" * len(marks),
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['computed']:.4f} | {r['padding']:.4f} | "
                     + " | ".join(str(p) for p in r["programs"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    """Counts each granularity's programs and padding; appends the table."""
    args = parse_args(argv)
    with bench_cli.jax_cache():  # JAX_COMPILATION_CACHE_DIR, checked as train.py's cache
        return _measure(args)


def _measure(args) -> None:
    """:func:`main`'s work, once its flags are checked."""
    model = CifarResNet(depth=args.depth, num_classes=10, final_survival_prob=args.final_survival)
    marks = checkpoints(args.epochs)
    gates = draw_all(model, args.seed, args.epochs * args.steps_per_epoch)
    ways = [(f"multiple {m}", functools.partial(model.compact_buckets, multiple=m))
            for m in args.multiples]
    for c in args.lengths:
        lengths = model.compact_lengths(c)
        ways.append((f"lengths {c}: {' / '.join(','.join(map(str, ls)) for ls in lengths)}",
                     functools.partial(model.compact_buckets, lengths=lengths)))
    rows = [granularity_row(model, gates, label, fn, args.steps_per_epoch, marks)
            for label, fn in ways]
    bench_cli.append_table(table(args, model, gates, rows, marks), args.out)


if __name__ == "__main__":
    bench_cli.run(main)
