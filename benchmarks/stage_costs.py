"""Where a skipping step's time goes: per-stage block costs, the real floor, padding, overhead.

The issue's floor for ResNet-110 (0.745 of the constant-depth step) counts blocks: it holds
if every block costs the same. Every stage has the same FLOPs per block (stage s halves the
resolution and doubles the width), so where convolutions are FLOP-bound costs are close
(the 2-core CPU: within 26%). On a GPU the blocks of a stage need not cost the same as
those of another: the first stage moves 4x the activation bytes of the third, and its
16-channel convolutions use the tensor cores worst. Under the paper's linear rule the first
stage is also the one dropped least (p_l 0.99 to 0.83; the third's 0.66 to 0.5), so what
skipping can save depends on where the time is.

This benchmark measures it, side by side in one process (rounds interleaved):

* ``full``: the constant-depth train step (every block, no gates);
* ``no-stage-s``: the same with all blocks of stage s removed (a pruned model:
  ``CifarResNet(keep=...)``, the stage's blocks deleted, its shortcut kept), so
  ``full - no-stage-s`` is what that stage's blocks cost, forward and backward, and one
  block of stage s costs that over the stage's block count;
* ``no-blocks``: every block removed (stem, shortcuts, head, loss, optimiser): the fixed
  cost; ``full - no-blocks`` is the blocks' time, which the three removals sum to if costs
  add up (the per-block costs used are the removals' shares of it);
* the skipping variants of ``bench_step.py`` (default ``skip,compact,lengths-3``) on the
  same per-round gates.

From the per-block costs and the schedule it derives, per skipping variant, the step time
it would take if each block cost what it costs in the constant-depth network: ``floor``
(every dropped block free; the true compute floor), and for compact mode the blocks it
really runs (each stage's first block always, masked; its kept count rounded up to the
bucket length; every block of a stage too short to scan, masked). The gap between that prediction and the measured time is the variant's
own overhead (conditionals; gathers, scatters and program switches). Each timed round is
predicted from its own gates and the overhead is the median of the rounds' gaps (the
expectation under the schedule is printed beside them).

    python benchmarks/stage_costs.py                      # ResNet-110, batch 128, fp32
    python benchmarks/stage_costs.py --depth 20 --batch 32 --rounds 3     # a quick CPU run

Appends its table to ``benchmarks/results/stage_costs_<backend>.md`` (``--out``: elsewhere),
with machine, versions, date, code and command line; a run at other sizes than the defaults
says so in its table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cli  # noqa: E402  (next to this file; first: Ctrl-C in JAX's import)

import jax
import jax.numpy as jnp
import numpy as np

from stochastic_depth_jax import CifarResNet
from stochastic_depth_jax import buckets as buckets_lib

import bench_step  # noqa: E402  (next to this file)
from provenance import machine_line, run_label, size_changes  # noqa: E402

DEFAULT_VARIANTS = "skip,compact,lengths-3"
SIZES = ("depth", "batch")  # not --rounds or --warmup: how often, not what (provenance.REPEATS)


def pruned_runners(depth, batch, scan, dtype, key, x, y):
    """``full``, ``no-stage-1..3`` and ``no-blocks``: constant-depth steps, some stages cut."""
    model = CifarResNet(depth=depth)
    n, stages = model.blocks_per_stage(), len(model.stage_sizes_())
    keeps = {"full": None}
    for s in range(stages):
        keep = np.ones(stages * n, bool)
        keep[s * n:(s + 1) * n] = False
        keeps[f"no-stage-{s + 1}"] = tuple(keep)
    keeps["no-blocks"] = (False,) * (stages * n)
    return [bench_step.make_runner("constant", depth, batch, scan, dtype, key, x, y,
                                   keep=keep, label=label) for label, keep in keeps.items()]


def _scanned(model: CifarResNet) -> list[bool]:
    """Per stage: are its blocks after the first scanned (compact mode gathers only those)?"""
    return [b > 0 for b in model.compact_buckets(np.ones(model.num_blocks(), bool))]


def blocks_run(name: str, model: CifarResNet, gates: np.ndarray) -> np.ndarray:
    """Per stage, the blocks variant ``name`` computes on ``gates`` (bool ``[L]``)."""
    sizes = model.stage_sizes_()
    starts = np.cumsum((0,) + tuple(sizes))[:-1]
    kept = np.array([gates[a:a + n].sum() for a, n in zip(starts, sizes)], float)
    impl = bench_step.VARIANTS[name.removesuffix(bench_step.UNROLLED)][1]
    if impl == "skip":  # lax.cond: exactly the kept blocks
        return kept
    if impl == "mask":
        return np.asarray(sizes, float)
    if impl.startswith("compact"):
        lengths = model.compact_buckets(gates, int(impl[len("compact"):]))
    else:
        lengths = model.compact_buckets(gates, lengths=model.compact_lengths(
            int(impl[len("lengths"):])))
    # Compact mode: a stage's first block always runs (masked), then its bucket of
    # gathered blocks; an unscanned stage (bucket 0) is masked whole: all its blocks run.
    return np.array([1 + b if b else n for b, n in zip(lengths, sizes)], float)


def expected_blocks_run(name: str, model: CifarResNet) -> np.ndarray:
    """:func:`blocks_run` in expectation under the schedule (exact, Poisson-binomial)."""
    probs, sizes = model.survival_probs(), model.stage_sizes_()
    starts = np.cumsum((0,) + tuple(sizes))[:-1]
    impl = bench_step.VARIANTS[name.removesuffix(bench_step.UNROLLED)][1]
    if impl == "skip":
        return np.array([probs[a:a + n].sum() for a, n in zip(starts, sizes)])
    if impl == "mask":
        return np.asarray(sizes, float)
    if impl.startswith("compact"):
        m = int(impl[len("compact"):])
        per_stage = [lambda k, n=n: buckets_lib.round_to_multiple(k, m, n - 1) for n in sizes]
    else:
        per_stage = [lambda k, lengths=lengths: buckets_lib.round_up(k, lengths)
                     for lengths in model.compact_lengths(int(impl[len("lengths"):]))]
    out = []
    for a, n, length, scanned in zip(starts, sizes, per_stage, _scanned(model)):
        if not scanned:  # masked whole in compact mode: every block runs
            out.append(float(n))
            continue
        pmf = buckets_lib.kept_count_pmf(probs[a + 1:a + n])
        out.append(1 + sum(p * length(int(k)) for k, p in enumerate(pmf)))
    return np.array(out)


def analyse(times: dict[str, float], model: CifarResNet, variants, gates_timed,
            round_times: dict[str, list[float]]) -> dict:
    """Per-stage costs, floors and predictions (seconds).

    Args:
      times: median step time of every runner (``full``, ``no-stage-s``, ``no-blocks`` and
        the variants).
      gates_timed: the timed rounds' gates, in order; ``round_times[name][i]`` is variant
        ``name``'s time on ``gates_timed[i]``.

    Removing a stage measures its marginal cost at full depth; where costs do not add up,
    the three removals sum to more (or less) than ``full - no-blocks``. The per-block costs
    used below are the removals' shares of ``full - no-blocks`` (they agree with both ends:
    every block, and none), and each round is predicted from its own gates.
    """
    sizes = np.asarray(model.stage_sizes_(), float)
    probs = model.survival_probs()
    full, fixed = times["full"], times["no-blocks"]
    removal = np.array([full - times[f"no-stage-{s + 1}"] for s in range(len(sizes))])
    stage_cost = removal / removal.sum() * (full - fixed)  # normalised to the block time
    per_block = stage_cost / sizes
    starts = np.cumsum((0,) + tuple(model.stage_sizes_()))[:-1]
    p_stage = np.array([probs[a:a + n].sum() for a, n in zip(starts, model.stage_sizes_())])
    floor = full - per_block @ (sizes - p_stage)
    equal = full - (full - fixed) / sizes.sum() * (sizes.sum() - probs.sum())
    rows = []
    for name in variants:
        ran = np.array([blocks_run(name, model, np.asarray(g, bool)) for g in gates_timed])
        predicted = full - (sizes - ran) @ per_block  # one per round
        over = np.asarray(round_times[name]) - predicted
        expected = full - per_block @ (sizes - expected_blocks_run(name, model))
        rows.append({"variant": name, "blocks_run": ran.mean(0),
                     "predicted": float(np.median(predicted)), "overhead": float(np.median(over)),
                     "expected": expected, "measured": times[name]})
    return {"sizes": sizes, "full": full, "fixed": fixed, "removal": removal,
            "stage_cost": stage_cost, "per_block": per_block, "floor": floor,
            "floor_blocks": p_stage,
            "equal_cost_floor": equal, "rows": rows}


def report(a: dict, args, rounds: int, kept_fraction: float) -> str:
    full = a["full"]
    ms = lambda s: f"{s * 1e3:.2f}"  # noqa: E731
    gap = a["removal"].sum() - (full - a["fixed"])
    lines = [
        f"## Where the step's time goes: CifarResNet-{args.depth}, batch {args.batch}, "
        f"{args.dtype}",
        "",
        f"{machine_line()}; {rounds} interleaved rounds after {args.warmup} warm-up; compile "
        f"excluded; XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(none)'}.",
        "",
        args.label,
        "",
        "| stage | blocks | removing the stage saves, ms/step | its share | ms per block "
        "(share of the block time) |",
        "|---|---|---|---|---|",
    ]
    for s, (n, rem, pb) in enumerate(zip(a["sizes"], a["removal"], a["per_block"])):
        lines.append(f"| {s + 1} | {int(n)} | {ms(rem)} | {rem / a['removal'].sum():.2f} | "
                     f"{ms(pb)} |")
    lines += [
        "",
        f"Constant-depth step {ms(full)} ms; with every block removed {ms(a['fixed'])} ms, so "
        f"the blocks take {ms(full - a['fixed'])} ms. The three removals add up to "
        f"{ms(a['removal'].sum())} ms: {gap / full:+.1%} of the step "
        f"{'more' if gap >= 0 else 'less'} than the blocks' time (costs are not quite "
        f"additive), which bounds how far the predictions below can be trusted. Per-block "
        f"costs are the removals' shares of the blocks' time.",
        "",
        f"Floor under the schedule (each block dropped with probability 1 - p_l and then "
        f"free): **{a['floor'] / full:.3f}** of constant depth "
        f"({ms(a['floor'])} ms). Were every block equally costly it would be "
        f"{a['equal_cost_floor'] / full:.3f}.",
        "",
        "| variant | blocks run per stage (mean of timed rounds) | predicted ms (blocks at "
        "their cost; median over rounds) | measured ms (median) | overhead ms (median over "
        "rounds of measured - predicted) | predicted / constant | measured / constant | "
        "expected / constant (schedule) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in a["rows"]:
        ran = ", ".join(f"{b:.1f}" for b in r["blocks_run"])
        lines.append(f"| {r['variant']} | {ran} | {ms(r['predicted'])} | {ms(r['measured'])} | "
                     f"{ms(r['overhead'])} | {r['predicted'] / full:.3f} | "
                     f"{r['measured'] / full:.3f} | {r['expected'] / full:.3f} |")
    lines += [
        "",
        f"Mean fraction of blocks kept by the timed rounds' gates: {kept_fraction:.3f}. "
        "Compact mode runs each stage's first block (masked) and its kept count rounded up "
        "to the bucket length (every block of a stage too short to scan, masked); `skip` "
        "runs exactly the kept blocks.",
    ]
    return "\n".join(lines) + "\n"


def plot(a: dict, path: str, title: str) -> None:
    """A PNG of where the time goes: per bar, the fixed cost and each stage's blocks (at their
    measured cost; a variant's mean blocks run), the rest of its measured median hatched as
    overhead, and the measured median as a diamond."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    full = a["full"]
    bars = [("constant depth", a["sizes"], 0.0, full), ("floor (schedule)", a["floor_blocks"],
                                                         0.0, None)]
    bars += [(r["variant"], r["blocks_run"], r["overhead"], r["measured"]) for r in a["rows"]]
    colors = ["#9e9e9e", "#08519c", "#3182bd", "#9ecae1"]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(bars) + 2.4))
    hatched = False  # the legend's "overhead" goes with the first hatched bar
    for i, (label, blocks, over, measured) in enumerate(reversed(bars)):
        left = 0.0
        parts = [a["fixed"]] + list(np.asarray(blocks) * a["per_block"])
        for j, width in enumerate(parts):
            ax.barh(i, width * 1e3, left=left * 1e3, color=colors[j % len(colors)],
                    label=(["fixed (stem, head, loss, optimizer)"] +
                           [f"stage {s + 1} blocks" for s in range(len(parts) - 1)])[j]
                    if i == len(bars) - 1 else None)
            left += width
        # The hatched part runs from the blocks' predicted time to the measured median (the
        # table's overhead is the median of the per-round gaps instead: close, not equal).
        gap = (measured - left) if measured is not None and over else 0.0
        if gap > 0:
            ax.barh(i, gap * 1e3, left=left * 1e3, color="none", edgecolor="#cb181d",
                    hatch="///", label=None if hatched else "overhead")
            hatched = True
        if measured is not None:
            ax.plot(measured * 1e3, i, "kD", ms=6,
                    label="measured (median)" if label == bars[0][0] else None)
        end = max(left, measured or 0.0)
        ax.text(end * 1e3, i, f"  {(measured or left) / full:.3f}", va="center", fontsize=9)
    ax.set_yticks(range(len(bars)), [b[0] for b in reversed(bars)])
    ax.set_xlabel("ms per train step (ratio to constant depth at the bar's end)")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, full * 1e3 * 1.25)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3,
              frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv) -> argparse.Namespace:
    """The flags, checked before anything is measured; ``args.label``: the provenance line."""
    ap = bench_cli.argument_parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=110, help="CIFAR ResNet depth (6n+2)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 20 GPU, 4 CPU)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds before them")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="bench_step.py skipping variants, comma-separated")
    ap.add_argument("--out", default=None,
                    help=bench_cli.OUT_HELP.format("stage_costs_<backend>.md"))
    ap.add_argument("--plot", default="",
                    help="also draw the breakdown to this PNG (if it exists: to NAME-1.png, ...)")
    args = ap.parse_args(argv)
    args.label = run_label("stage_costs.py", argv, size_changes(ap, args, SIZES))
    skipping = [v for v, spec in bench_step.VARIANTS.items() if spec[0] < 1.0]
    args.variants = bench_cli.names_from(
        args.variants, skipping, "--variants",
        lambda v: v.removesuffix(bench_step.UNROLLED) in skipping,
        f" (bench_step.py's skipping variants), each also with '{bench_step.UNROLLED}' appended")
    bench_cli.at_least(args, 1, "batch", "rounds")
    bench_cli.at_least(args, 0, "warmup")
    bench_cli.cifar_depth(args.depth)
    args.out = bench_cli.results_path(args.out, f"stage_costs_{jax.default_backend()}.md")
    args.plot = bench_cli.fresh_file(drawing_path(args.plot), "--plot")
    bench_cli.distinct_outputs(("--out", args.out), ("--plot", args.plot))
    return args


def drawing_path(path: str) -> str:
    """``--plot``'s file as matplotlib writes it: a name without an extension gets
    ``.png``, as matplotlib adds it (the check for an earlier drawing looked at the name
    given, and the drawing went over the ``.png`` beside it); a format matplotlib cannot
    write is refused now, not after the rounds (its error there lost their table)."""
    if not path or not os.path.splitext(path)[1]:
        return path and path + ".png"
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = sorted(FigureCanvasAgg.get_supported_filetypes())
    ext = os.path.splitext(path)[1]
    if ext[1:].lower() not in formats:
        raise bench_cli.bad_flag(f"--plot {path}: matplotlib draws no '{ext}' file; give a "
                                 f"name ending in .png (or .{', .'.join(formats)}).")
    return path


def main(argv=None) -> None:
    """Times the constant-depth step, its stage removals and the skipping variants, and
    appends the analysis (see the module's doc)."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    with bench_cli.jax_cache():  # JAX_COMPILATION_CACHE_DIR, checked as train.py's cache
        return _measure(args)


def _measure(args) -> None:
    """:func:`main`'s work, once its flags are checked."""
    variants = args.variants
    rounds = args.rounds or (20 if jax.default_backend() != "cpu" else 4)
    dtype = None if args.dtype == "float32" else jnp.bfloat16
    x, y, kp = bench_step.random_batch(args.batch)
    runners = pruned_runners(args.depth, args.batch, None, dtype, kp, x, y)
    runners += [bench_step.make_runner(v, args.depth, args.batch, None, dtype, kp, x, y)
                for v in variants]
    model = CifarResNet(depth=args.depth)
    first, all_gates = bench_step.round_gates(args.depth, args.warmup + rounds)
    bench_step.compile_all(runners, first, all_gates)
    bench_step.time_rounds(runners, all_gates, args.warmup)
    times = {r.name: statistics.median(r.times) for r in runners}
    done = len(runners[0].times)  # fewer than asked if a signal cut the rounds short
    timed = [np.asarray(g) for g in all_gates[args.warmup:args.warmup + done]]
    result = analyse(times, model, variants, timed, {r.name: r.times for r in runners})
    text = report(result, args, rounds, float(np.mean(timed)))
    # The table first: a drawing that fails (a full disk) cannot lose the rounds. A run
    # stopped by a signal is not drawn (a drawing cannot say it is partial).
    bench_cli.append_table(text, args.out)
    if args.plot:
        plot(result, args.plot, f"CifarResNet-{args.depth}, batch {args.batch}, {args.dtype}, "
                                f"{jax.devices()[0].device_kind}")
        print(f"drew {args.plot}", flush=True)


if __name__ == "__main__":
    bench_cli.run(main)
