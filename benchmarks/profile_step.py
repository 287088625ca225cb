"""What the device does during a train step: kernels, busy time and idle gaps, per variant.

Profiles a few steps of each ``bench_step.py`` variant with ``jax.profiler`` (after every
program is compiled and warmed up) and summarises the trace's device timeline:

* wall ms per step (host clock around the profiled steps);
* device busy ms per step: the union of all kernel and copy intervals on the device's
  streams (overlaps counted once); busy / wall says whether the step is bound by the
  device's work (near 1) or by launches, host work and synchronisation (well below 1);
* kernels (and memory copies) per step and their median duration: at batch 128 a ResNet-110
  step is thousands of small kernels, each paying a launch and a tail;
* the kernels that take the most time, by name;
* with ``--by-source`` (CPU, ResNet), the XLA thread pool's time (threads x wall) split by
  what it comes from (convolutions, ``conv.py``'s transposes, BatchNorm, ReLU, the scans'
  stacked residuals, skipped blocks' zero-fill, ..., the runtime between ops, idle), each
  op matched to its HLO instruction's metadata. XLA's own (Eigen) convolutions run as
  unnamed pool tasks after their thunk returns; that work is found between the pool's
  task markers and counted with the ops in flight (the busy and kernel columns, which see
  named events only, leave it out).

On a GPU the timeline is the ``/device:GPU:N`` planes' stream lines (CUPTI). XLA turns CUDA
graphs off while profiling unless told otherwise, which would change what is measured, so
this script sets ``--xla_enable_command_buffers_during_profiling=true`` in ``XLA_FLAGS``
before JAX starts. On the CPU, where there is no device plane, the XLA runtime's threads'
events stand in (an approximation: their events are regions of work, not kernels).

    python benchmarks/profile_step.py --variants constant,compact --steps 5
    python benchmarks/profile_step.py --depth 20 --batch 16 --steps 2     # quick CPU run
    python benchmarks/profile_step.py --variants skip-remat-convs --steps 3 --by-source
    python benchmarks/profile_step.py --drop-path 0.4      # the ViT's drop path: skip vs mask

Appends its tables to ``benchmarks/results/profile_<backend>.md`` (``--out``: elsewhere), with
machine, versions, date, code and command line (and a warning where the sizes are not the
defaults); ``--trace-dir`` keeps the raw traces (TensorBoard's profile plugin or Perfetto open them).
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cli  # noqa: E402  (next to this file; first: Ctrl-C in JAX's import)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_step  # noqa: E402
from provenance import machine_line, run_label, size_changes  # noqa: E402

SIZES = {"depth": None, "batch": "128; with --drop-path, bench_drop_path.py's", "steps": None}

# Keeps XLA's CUDA graphs on while profiling (set before JAX starts its backend).
_FLAG = "--xla_enable_command_buffers_during_profiling=true"

# Events on the CPU's XLA threads that mark scheduling or enclose others, not work.
_CPU_NOISE = ("ThreadpoolListener", "ThunkExecutor", "end: ")


def device_events(planes) -> tuple[str, list[tuple[str, int, int]]]:
    """``(source, [(name, start_ns, end_ns)])`` of the device timeline in ``planes``.

    ``planes``: ``[(plane_name, [(line_name, [(event_name, start_ns, duration_ns)])])]``.
    The first accelerator plane's lines (``/device:GPU:0``, ``/device:TPU:0``), else the CPU
    runtime's XLA threads.
    """
    for plane, lines in planes:
        if plane.startswith("/device:") and not plane.startswith("/device:CUSTOM"):
            # CUPTI's stream lines hold the kernels and copies; lines derived from them
            # (XLA Ops, Steps, ...) would count the same time twice.
            streams = [(line, evs) for line, evs in lines if line.startswith("Stream")]
            events = [(n, s, s + d) for line, evs in streams or lines for n, s, d in evs
                      if streams or not line.startswith(("XLA Modules", "Steps"))]
            if events:
                return plane, events
    for plane, lines in planes:
        if plane == "/host:CPU":
            events = [(n, s, s + d) for line, evs in lines if line.startswith("tf_XLA")
                      for n, s, d in evs if d > 0 and not n.startswith(_CPU_NOISE)]
            return "/host:CPU XLA threads", events
    return "none", []


def union_ns(events) -> int:
    """Total length of the union of ``[start, end)`` intervals."""
    total, cur_start, cur_end = 0, None, None
    for _, start, end in sorted(events, key=lambda e: e[1]):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def summarise(events, steps: int, wall_s: float, top: int = 8) -> dict:
    """Per-step figures of a device timeline ``[(name, start_ns, end_ns)]`` over ``steps``."""
    durations = [end - start for _, start, end in events]
    by_name = collections.defaultdict(int)
    for name, start, end in events:
        by_name[name] += end - start
    busy = union_ns(events) / 1e9
    return {
        "wall_ms": wall_s / steps * 1e3,
        "busy_ms": busy / steps * 1e3,
        "busy_fraction": busy / wall_s if wall_s else 0.0,
        "kernels": len(events) / steps,
        "median_us": statistics.median(durations) / 1e3 if durations else 0.0,
        "under_5us": (sum(d < 5000 for d in durations) / len(durations)) if durations else 0.0,
        "top": sorted(by_name.items(), key=lambda kv: -kv[1])[:top],
        "total_ns": sum(durations),
    }


# Where an op's time goes (--by-source): the first matching rule names it. An op is known by
# its HLO instruction (the CPU trace's event name): shape, ``op_name`` metadata (the JAX call
# path) and whether it sits in a skipping cond's first branch (the skipped block).
_STACKED = re.compile(r"\w+\[\d+,\d+,\d+,\d+,\d+\]$")  # [blocks, batch, H, W, C]
# What a scanned stage's stacks are created by (``ResidualStages._scan_stage``: ``lax.scan``
# allocates each stacked output as a broadcast zero), whatever their shape.
_STACK_INIT = "_scan_stage/broadcast_in_dim"
SOURCES = (
    ("skipped blocks' zero-fill", lambda n, shape, meta, skip: skip),
    ("convolutions", lambda n, shape, meta, skip: "conv_general_dilated" in meta),
    ("conv.py's backward transposes", lambda n, shape, meta, skip:
        n.startswith("transpose") and re.search(r"conv\d?/transpose", meta)),
    # The scan's zero-filled stacks: 5-D, or with their last axes merged (layers._tag).
    ("scan stacked residuals: zero-init", lambda n, shape, meta, skip:
        "broadcast" in n and (bool(_STACKED.match(shape)) or meta.endswith(_STACK_INIT))),
    ("scan stacked residuals: copies", lambda n, shape, meta, skip:
        n.startswith("copy") and bool(_STACKED.match(shape))),
    ("scan stacked residuals: write", lambda n, shape, meta, skip: "dynamic_update_slice" in meta),
    ("scan stacked residuals: read", lambda n, shape, meta, skip: "dynamic_slice" in meta),
    ("remat reduce_precision", lambda n, shape, meta, skip: "reduce_precision" in meta),
    ("BatchNorm reductions", lambda n, shape, meta, skip:
        re.search(r"bn\d?/", meta) and "reduce" in meta),
    ("BatchNorm element-wise", lambda n, shape, meta, skip: re.search(r"bn\d?/", meta)),
    ("ReLU", lambda n, shape, meta, skip: "relu" in meta or "select_n" in meta),
    ("other copies", lambda n, shape, meta, skip: n.startswith("copy")),
)
_CONTAINERS = ("cond", "while", "call", "SlinkyThreadPool")  # enclose other events


def hlo_ops(hlo: str) -> dict[str, tuple[str, str, bool]]:
    """``{instruction: (shape, op_name, in a cond's first branch)}`` of compiled HLO text.

    An instruction without ``op_name`` (XLA:CPU splits a large reduction into a
    ``reduce-window`` without metadata, then a ``reduce`` with it) takes its first user's.
    """
    first_branches = set(re.findall(r"branch_computations=\{%?([\w.\-]+),", hlo))
    ops, users, computation = {}, {}, None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%?([\w.\-]+) ", line)
        if header and line.rstrip().endswith("{"):
            computation = header.group(1)
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.+?) [\w\-]+\(([^)]*)\)", line)
        if m and m.group(1) not in ops:
            meta = re.search(r'op_name="([^"]*)"', line)
            ops[m.group(1)] = (m.group(2).split("{")[0], meta.group(1) if meta else "",
                               computation in first_branches)
            for operand in re.findall(r"%([\w.\-]+)", m.group(3)):
                users.setdefault(operand, m.group(1))
    for name, (shape, meta, skip) in ops.items():
        if not meta and name in users:
            ops[name] = (shape, ops[users[name]][1], skip)
    return ops


def _label(name: str, ops: dict) -> str:
    shape, meta, skip = ops.get(name, ("", "", False))
    return next((lb for lb, rule in SOURCES if rule(name, shape, meta, skip)), "other")


def by_source(events, ops: dict) -> dict[str, int]:
    """Nanoseconds per :data:`SOURCES` label (``'other'`` for the rest) of the leaf events
    (those that enclose others, conditionals and loops, are left out)."""
    totals = collections.defaultdict(int)
    for name, start, end in events:
        if not name.startswith(_CONTAINERS):
            totals[_label(name, ops)] += end - start
    return dict(totals)


# XLA:CPU's intra-op thread pool. Its threads mark each task they run (StartRegion ..
# StopRegion) but only thunks carry a named event: a convolution's thunk (XLA's Eigen
# kernel) returns after a few microseconds, its work runs as unnamed pool tasks, and an
# ``end: <op>`` marker says when it completed; a large loop fusion's other threads run
# unnamed tasks too. That work is attributed to the ops in flight while it runs.
_POOL_LINE = "tf_XLAEigen"
_REGION = ("ThreadpoolListener::StartRegion", "ThreadpoolListener::StopRegion")
RUNTIME = "XLA runtime between ops (thunk executor, cond and loop control)"
UNOWNED = "untraced thread-pool tasks, no op in flight"
IDLE = "idle pool threads (waiting: dependencies, the host)"


def _is_leaf(name: str, duration: int) -> bool:
    """Whether a CPU trace event is an op's own work (not scheduling, not a container)."""
    return duration > 0 and not name.startswith(_CPU_NOISE + _CONTAINERS)


def subtract(intervals, cover) -> list[tuple[int, int]]:
    """``[start, end)`` intervals minus the union of ``cover``'s (both lists of pairs)."""
    merged = []  # the union of cover as disjoint sorted intervals: one pass below
    for start, end in sorted(cover):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    out, cover, i = [], merged, 0
    for start, end in sorted(intervals):
        while i < len(cover) and cover[i][1] <= start:
            i += 1
        cur, j = start, i
        while j < len(cover) and cover[j][0] < end:
            if cover[j][0] > cur:
                out.append((cur, cover[j][0]))
            cur = max(cur, cover[j][1])
            j += 1
        if cur < end:
            out.append((cur, end))
    return out


def _regions(events) -> list[tuple[int, int]]:
    """The tasks a pool thread ran: its StartRegion .. StopRegion pairs."""
    regions, start = [], None
    for name, s, _ in sorted(events, key=lambda e: e[1]):
        if name == _REGION[0]:
            start = s
        elif name == _REGION[1] and start is not None:
            regions.append((start, s))
            start = None
    return regions


def op_windows(lines) -> list[tuple[int, int, str]]:
    """``(start, end, op)`` of each leaf op run on the XLA threads: its thunk's event, to
    its ``end: <op>`` marker where that comes later (asynchronous: a convolution)."""
    launches, ends = collections.defaultdict(list), collections.defaultdict(list)
    for line, evs in lines:
        for name, s, d in evs:
            if name.startswith("end: "):
                ends[name[5:]].append(s)
            elif _is_leaf(name, d):
                launches[name].append((s, s + d))
    windows = []
    for name, runs in launches.items():  # an op's runs never overlap: pair them in order
        marks = sorted(ends[name]) + [0] * len(runs)
        windows += [(s, max(e, mark), name) for (s, e), mark in zip(sorted(runs), marks)]
    return windows


def attribute(untraced, windows) -> dict[str | None, float]:
    """Nanoseconds of ``untraced`` intervals (several threads' may overlap) per op in flight
    (``windows``), split equally among the ops in flight; ``None``: no op in flight."""
    points = [(s, 1, None) for s, _ in untraced] + [(e, -1, None) for _, e in untraced]
    points += [(s, 1, op) for s, _, op in windows] + [(e, -1, op) for _, e, op in windows]
    points.sort(key=lambda p: p[0])
    totals, flight, threads, last = collections.defaultdict(float), collections.Counter(), 0, 0
    for t, step, op in points:
        if threads and t > last:
            ops = list(flight) or [None]
            for o in ops:
                totals[o] += threads * (t - last) / len(ops)
        last = t
        if op is None:
            threads += step
        else:
            flight[op] += step
            if not flight[op]:
                del flight[op]
    return dict(totals)


def _xla_lines(planes, prefix: str = "tf_XLA") -> list:
    """``[(line, events)]`` of the CPU plane's lines named ``prefix...``."""
    return [(line, evs) for plane, ls in planes if plane == "/host:CPU"
            for line, evs in ls if line.startswith(prefix)]


def pool_threads(planes) -> int:
    """How many XLA:CPU intra-op pool threads the trace shows."""
    return len(_xla_lines(planes, _POOL_LINE))


def thread_time(planes, ops: dict, wall_ns: int) -> tuple[dict[str, float], dict[str, float]]:
    """The CPU pool threads' time over ``wall_ns`` by source: ``({label: ns}, {label: ns
    of it in untraced pool tasks})``, summing to pool threads x wall. Labels: :data:`SOURCES`,
    ``'other'``, :data:`RUNTIME`, :data:`UNOWNED`, :data:`IDLE`."""
    lines = _xla_lines(planes)
    leaves = [(n, s, s + d) for _, evs in lines for n, s, d in evs if _is_leaf(n, d)]
    totals = collections.defaultdict(float, by_source(leaves, ops))
    pool = [evs for _, evs in _xla_lines(planes, _POOL_LINE)]
    untraced, runtime = [], 0
    for evs in pool:
        regions = _regions(evs)
        named = [(s, s + d) for n, s, d in evs if d > 0 and not n.startswith(_REGION)]
        leaf = [(s, s + d) for n, s, d in evs if _is_leaf(n, d)]
        gaps = subtract(regions, named)
        untraced += gaps
        runtime += sum(e - s for s, e in subtract(regions, leaf)) - sum(e - s for s, e in gaps)
    hidden = collections.defaultdict(float)
    for op, ns in attribute(untraced, op_windows(lines)).items():
        hidden[UNOWNED if op is None else _label(op, ops)] += ns
    for label, ns in hidden.items():
        totals[label] += ns
    totals[RUNTIME] += runtime
    totals[IDLE] = max(0.0, len(pool) * wall_ns - sum(totals.values()))
    return dict(totals), dict(hidden)


def read_trace(trace_dir: str):
    """The planes of the newest ``*.xplane.pb`` under ``trace_dir``, as plain tuples."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
    data = jax.profiler.ProfileData.from_file(files[-1])
    return [(plane.name, [(line.name, [(e.name, int(e.start_ns), int(e.duration_ns))
                                       for e in line.events]) for line in plane.lines])
            for plane in data.planes]


def profile(run_once, runner, inputs, trace_dir: str) -> tuple[float, list]:
    """Runs ``run_once(runner, i)`` for each of ``inputs`` (gates or keys) under the
    profiler; wall seconds and the trace's planes."""
    jax.block_until_ready(runner.state)
    with jax.profiler.trace(trace_dir):
        t0 = time.perf_counter()
        for i, g in enumerate(inputs):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                run_once(runner, g)
        wall = time.perf_counter() - t0
    return wall, read_trace(trace_dir)


def resnet_runners(args):
    """``(heading, run_once, [(name, make_runner)], inputs)`` for CifarResNet variants."""
    names = bench_cli.names_from(args.variants, bench_step.VARIANTS, "--variants",
                                 bench_step.known_variant,
                                 f", each also with '{bench_step.UNROLLED}' appended")
    dtype = None if args.dtype == "float32" else jnp.bfloat16
    x, y, kp = bench_step.random_batch(args.batch)
    _, gates = bench_step.round_gates(args.depth, args.steps + 2)

    def make(name):
        runner = bench_step.make_runner(name, args.depth, args.batch, None, dtype, kp, x, y)
        bench_step.compile_all([runner], gates[0], gates)
        return runner

    heading = f"CifarResNet-{args.depth}, batch {args.batch}, {args.dtype}"
    return heading, bench_step.run_once, [(n, functools.partial(make, n)) for n in names], gates


def step_hlo(runner, gates) -> str:
    """The compiled HLO text of a ``bench_step`` runner's step on ``gates``."""
    buckets = None if runner.buckets is None else runner.buckets(gates)
    return runner.step.lower(*runner.state, gates, buckets, *runner.batch).compile().as_text()


def drop_path_runners(args):
    """The same for ``bench_drop_path.py``'s network: no drop path, skip and mask at
    ``--drop-path`` (uniform), with that script's defaults for the backend."""
    import bench_drop_path as dp

    dargs = dp.parse_args(["--model", args.model, "--dtype", args.dtype] +
                          (["--batch", str(args.batch)] if args.batch else []))
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (dargs.batch, dargs.image, dargs.image, 3), jnp.float32)
    y = jax.random.randint(ky, (dargs.batch,), 0, 10)
    keys = [jax.random.fold_in(jax.random.key(42), i) for i in range(args.steps + 2)]
    specs = [v for v in dp.variants([args.drop_path], 0.0) if not v[0].endswith("unfused")]
    makers = [(name, functools.partial(dp.make_runner, name, rate, rule, impl, dargs, kp, x, y))
              for name, rate, rule, impl in specs]
    return dp.describe(dargs).removeprefix("## "), dp.run_once, makers, keys


def source_lines(name: str, s: dict, steps: int) -> list[str]:
    """The ``--by-source`` split of one variant: shares of its pool threads' time."""
    total = sum(s["sources"].values())
    if not total:  # a trace without XLA:CPU threads' events: nothing to split
        return [f"Thread time by source, {name}: the trace holds no XLA thread-pool events."]
    lines = [f"Thread time by source, {name} ({s['pool_threads']} XLA pool threads x "
             f"{s['wall_ms']:.0f} ms wall = {total / steps / 1e6:.0f} ms/step; untraced pool "
             f"tasks (XLA's Eigen convolutions, the helper threads of a large fusion) are "
             f"counted with the ops in flight, split equally where several are):", ""]
    for label, ns in sorted(s["sources"].items(), key=lambda kv: -kv[1]):
        hidden = s["untraced"].get(label, 0)  # part of ns: 0 where ns is (idle, a busy pool)
        note = (f" ({hidden / ns:.0%} of it untraced pool tasks)"
                if label != UNOWNED and hidden and hidden >= 0.05 * ns else "")
        lines.append(f"- {ns / total:.1%} {label}{note}")
    return lines


def report(results: dict, args, source: str, heading: str) -> str:
    lines = [
        f"## Device timeline of the train step: {heading}",
        "",
        f"{machine_line()}; {args.steps} profiled steps per variant after warm-up; timeline: "
        f"{source}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}.",
        "",
        args.label,
        "",
        "| variant | wall ms/step | device busy ms/step | busy / wall | kernels and copies "
        "/ step | median length us | under 5 us |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in results.items():
        lines.append(f"| {name} | {s['wall_ms']:.2f} | {s['busy_ms']:.2f} | "
                     f"{s['busy_fraction']:.2f} | {s['kernels']:.0f} | {s['median_us']:.1f} | "
                     f"{s['under_5us']:.0%} |")
    for name, s in results.items():
        lines += ["", f"Most time, {name} (share of kernel time):", ""]
        lines += [f"- {share / max(s['total_ns'], 1):.1%} `{kname[:90]}`"
                  for kname, share in s["top"]]
    for name, s in results.items():
        if s.get("sources"):
            lines += ["", *source_lines(name, s, args.steps)]
    lines += ["", "Profiling adds per-event overhead: compare wall times with the benchmarks' "
                  "(bench_step.py, bench_drop_path.py)."]
    return "\n".join(lines) + "\n"


def parse_args(argv) -> argparse.Namespace:
    """The flags, checked before anything is profiled; ``args.label``: the provenance line."""
    ap = bench_cli.argument_parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=110, help="CIFAR ResNet depth (6n+2)")
    ap.add_argument("--batch", type=int, default=None,
                    help="default 128 (with --drop-path: bench_drop_path.py's for the backend)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--variants", default="constant,compact", help="bench_step.py variants")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps per variant")
    ap.add_argument("--trace-dir", default="", help="keep the raw traces here")
    ap.add_argument("--drop-path", type=float, default=0.0,
                    help="> 0: profile bench_drop_path.py's network instead (no drop path, "
                         "skip and mask at this uniform rate; its sizes for the backend)")
    ap.add_argument("--model", choices=["vit", "convnext"], default="vit",
                    help="with --drop-path: the network")
    ap.add_argument("--by-source", action="store_true",
                    help="CPU, ResNet: also split the thread pool's time by what it comes "
                         "from (convolutions, BatchNorm, the scans' stacked residuals, ...)")
    ap.add_argument("--out", default=None, help=bench_cli.OUT_HELP.format("profile_<backend>.md"))
    args = ap.parse_args(argv)
    # First: the rate picks the network, hence which flags apply (said, not '--depth ...').
    if args.drop_path < 0 or args.drop_path >= 1:
        raise bench_cli.bad_flag(f"--drop-path {args.drop_path}: a drop rate in (0, 1), or 0 "
                                 f"for the ResNet.")
    bench_cli.used_only(ap, args, "with --drop-path", bool(args.drop_path), "model")
    bench_cli.used_only(ap, args, "without --drop-path (the ResNet)", not args.drop_path,
                        "depth", "variants")
    args.label = run_label("profile_step.py", argv, size_changes(ap, args, SIZES))
    bench_cli.at_least(args, 1, "steps", "batch")
    if args.by_source and (args.drop_path or jax.default_backend() != "cpu"):
        raise bench_cli.bad_flag("--by-source splits the CPU's ResNet profile only (the CPU "
                                 "trace names each op by its HLO instruction): run it on the "
                                 "CPU, without --drop-path.")
    if not args.drop_path:
        bench_cli.cifar_depth(args.depth)
        args.batch = args.batch or 128
    if args.trace_dir and os.path.exists(args.trace_dir) and not os.path.isdir(args.trace_dir):
        # The profiler refused it after the first variant compiled: a traceback.
        raise bench_cli.bad_flag(f"--trace-dir {args.trace_dir}: a file, not a directory; give "
                                 f"a directory (made if missing).")
    args.out = bench_cli.results_path(args.out, f"profile_{jax.default_backend()}.md")
    bench_cli.distinct_outputs(("--out", args.out), ("--trace-dir", args.trace_dir))
    if args.trace_dir:  # the profiler's error came once the first variant was profiled
        try:
            os.makedirs(args.trace_dir, exist_ok=True)
        except OSError as e:
            raise bench_cli.bad_flag(f"--trace-dir {args.trace_dir}: cannot create it "
                                     f"({e.strerror or e}); give a directory this user can "
                                     f"write (made if missing).") from None
    return args


def main(argv=None) -> None:
    """Profiles each variant's steps and appends the timeline tables (see the module's doc)."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    with bench_cli.jax_cache():  # JAX_COMPILATION_CACHE_DIR, checked as train.py's cache
        return _measure(args)


def _measure(args) -> None:
    """:func:`main`'s work, once its flags are checked."""
    heading, run_once, makers, inputs = (drop_path_runners if args.drop_path
                                         else resnet_runners)(args)
    results, source = {}, "none"
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in makers:
            runner = make()
            for g in inputs[:2]:  # compile (drop path) and warm up
                run_once(runner, g)
            trace_dir = os.path.join(args.trace_dir or tmp, name.replace(" ", "_"))
            wall, planes = profile(run_once, runner, inputs[2:], trace_dir)
            source, events = device_events(planes)
            if jax.default_backend() != "cpu" and not source.startswith("/device:"):
                print(f"WARNING: the trace has no {jax.default_backend()} device timeline; "
                      f"these figures are the host's ({source}), not the device's", flush=True)
            results[name] = summarise(events, args.steps, wall)
            if args.by_source:  # the profiled steps' program, for the gates of the first
                ops = hlo_ops(step_hlo(runner, inputs[2]))
                results[name]["sources"], results[name]["untraced"] = thread_time(
                    planes, ops, int(wall * 1e9))
                results[name]["pool_threads"] = pool_threads(planes)
            s = results[name]
            print(f"{name}: {s['wall_ms']:.2f} ms/step wall, {s['busy_ms']:.2f} ms busy, "
                  f"{s['kernels']:.0f} kernels/step ({source})", flush=True)
    text = report(results, args, source, heading)
    bench_cli.append_table(text, args.out)


if __name__ == "__main__":
    if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
    bench_cli.run(main)
