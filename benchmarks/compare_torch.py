"""Ours vs PyTorch on one machine, one command: the same ResNet, batch and optimizer.

Runs ``bench_step.py`` (this environment's JAX; fp32 and bf16) and ``bench_torch.py`` (a
Python that has PyTorch, e.g. a separate venv; PyTorch is optional) one after the other on
the same machine, then appends one table, with date, code and command line, to
``benchmarks/results/vs_torch_<backend>.md`` (``--out``: elsewhere)::

    python benchmarks/compare_torch.py --torch-python /path/to/torch-venv/bin/python
    python benchmarks/compare_torch.py --torch-python ... --depth 20 --batch 32 --rounds 3

Ours: constant depth, ``skip`` (lax.cond skipping, remat 'convs' as the config),
``compact`` (compact mode, multiple 4) and ``lengths-3`` (compact mode, 3 scan lengths per
stage fitted to the schedule); "default" is what ``model.implementation='auto'`` picks on
that backend for that depth (CPU: skip; GPU/TPU: compact where a stage is scanned, so not
at ``--depth 20``, whose stages of 3 blocks are not). Every compact program the rounds use is
compiled before timing. Torch: eager and ``torch.compile``, constant and real skipping.

Ctrl-C or SIGTERM is passed on to the benchmark running, which appends the table of the
rounds it completed (marked as interrupted; ``bench_step.py``'s to ``--step-out``, where the
earlier ones are whole); no joint table is written, and the last line says what was. Ctrl-Z
stops the benchmark with this script, and ``fg`` / ``bg`` continue both.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_cli  # noqa: E402  (next to this file)
from provenance import run_label, size_changes  # noqa: E402

OURS = ("constant", "skip-remat-convs", "compact", "lengths-3")  # bench_step.py variants
SIZES = ("depth", "batch")  # not --rounds: how often, not what (provenance.REPEATS)


class StepFailed(bench_cli.FlagError):
    """A benchmark this script runs failed (its own error is printed above)."""


def _run(cmd: list[str]) -> None:
    """Runs the benchmark ``cmd`` from the repository root, in a session of its own (a
    Ctrl-C in the terminal reaches only this script): each Ctrl-C or SIGTERM here is passed
    on to it, and waited for (the first: it finishes its round and appends the table of the
    rounds done, marked; the second: it stops at once; a third kills it). The interruption
    is then raised here, to say what was written. A Ctrl-Z (SIGTSTP) stops the benchmark
    (SIGSTOP) and then this script; continuing this script (SIGCONT: ``fg``, ``bg``)
    continues the benchmark (:class:`bench_cli.StopsWithThis`)."""
    print("$ " + " ".join(cmd), flush=True)
    caught: list[int] = []
    sent: list[int] = []
    proc = None

    def pass_on(signum=None, frame=None):
        if signum is not None:
            caught.append(signum)
        while proc is not None and len(sent) < len(caught):  # each once, also if caught
            sent.append(caught[len(sent)])  # while it started
            _signal(proc, os.path.basename(cmd[1]), sent[-1], len(sent))

    try:
        with bench_cli.child_stops_with_this({signal.SIGINT: pass_on,
                                              signal.SIGTERM: pass_on}) as job:
            proc = job.started(subprocess.Popen(_dying_with_this(cmd),
                                                cwd=os.path.dirname(HERE),
                                                start_new_session=True))
            pass_on()
            status = proc.wait()
    finally:
        if proc is not None and proc.poll() is None:  # this script failed: not left running
            proc.kill()
            proc.wait()
    if caught:
        raise bench_cli.Interrupted(bench_cli.signal_name(caught[0]), 128 + caught[0])
    if status == bench_cli.SIGPIPE_STATUS:  # its output's reader exited: so did ours
        raise BrokenPipeError
    if status:
        raise StepFailed(f"{os.path.basename(cmd[1])} failed (exit status {status}; its "
                         f"output is above); nothing was written to --out.")


def _signal(proc: subprocess.Popen, name: str, signum: int, count: int) -> None:
    """Passes the ``count``-th signal ``signum`` on to ``proc`` (the script ``name``); from
    the third, kills it."""
    if count >= 3:
        print(f"{bench_cli.signal_name(signum)} again: killing {name}", file=sys.stderr,
              flush=True)
        proc.kill()
    else:
        proc.send_signal(signum)


def _dying_with_this(cmd: list[str]) -> list[str]:
    """``cmd``, run so that on Linux it is killed when this process dies, even by SIGKILL
    (``gpu_suite.py``'s budget kills this script's process group, which the child, in a
    session of its own, is not in; closing the terminal hangs this script up); elsewhere
    ``cmd`` as it is (:func:`bench_cli.dying_with_this`)."""
    return bench_cli.dying_with_this(cmd, signal.SIGKILL)


def _check_torch(python: str) -> None:
    """Raises unless ``python`` runs and imports torch: before minutes of our benchmarks."""
    try:
        found = subprocess.run([python, "-c", "import torch"], capture_output=True).returncode
    except OSError as e:
        raise bench_cli.bad_flag(f"--torch-python {python}: cannot run it ({e.strerror}); give "
                                 f"the path of a Python interpreter that has PyTorch.") from None
    if found:
        raise bench_cli.bad_flag(f"--torch-python {python}: {bench_cli.TORCH_MISSING}")


def _check_default_is_run(args, backend: str) -> None:
    """Raises unless ``--variants`` has what ``implementation='auto'`` picks on ``backend``
    (the table's "ours default"): said after the first bench_step.py run, minutes in. Where
    JAX did not start in a child, bench_step.py's own medians say it (:func:`_ours`)."""
    if backend.startswith("unknown"):
        return
    import bench_step  # JAX imported, not started: the benchmarks' children get the device

    default = bench_step.auto_variant(args.depth, None, backend)
    if default not in args.variants:
        raise bench_cli.bad_flag(f"--variants {','.join(args.variants)}: 'auto' on {backend} "
                                 f"is {default!r} (the table's 'ours default'), which would "
                                 f"not be run: add it.")


def parse_args(argv) -> argparse.Namespace:
    """The flags, checked (torch found, paths writable) before anything runs."""
    ap = bench_cli.argument_parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch-python", required=True,
                    help="a Python interpreter with torch (optional dependency; e.g. a venv's)")
    ap.add_argument("--depth", type=int, default=110, help="CIFAR ResNet depth (6n+2)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds of both benchmarks")
    ap.add_argument("--torch-variants", default=None, help="bench_torch.py --variants")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="ours: float32, bfloat16")
    ap.add_argument("--variants", default=",".join(OURS),
                    help="our bench_step.py variants, a subset of the default (each compact "
                         "variant compiles one program per bucket tuple: ~4 s each on an H100)")
    ap.add_argument("--out", default=None, help=bench_cli.OUT_HELP.format("vs_torch_<backend>.md"))
    ap.add_argument("--step-out", default=None,
                    help="where our step tables go (default: results/step_<backend>.md; "
                         "'' to print them only)")
    args = ap.parse_args(argv)
    args.label = run_label("compare_torch.py", argv, size_changes(ap, args, SIZES))
    args.variants = bench_cli.names_from(args.variants, OURS, "--variants")
    if "constant" not in args.variants:
        raise bench_cli.bad_flag(f"--variants {','.join(args.variants)}: include 'constant' "
                                 f"(every ratio is to it).")
    args.dtypes = bench_cli.names_from(args.dtypes, ("float32", "bfloat16"), "--dtypes")
    bench_cli.at_least(args, 1, "batch", "rounds")
    bench_cli.cifar_depth(args.depth)
    backend = bench_cli.child_backend()  # JAX here would take the GPU from bench_step.py
    _check_default_is_run(args, backend)
    args.out = bench_cli.results_path(args.out, f"vs_torch_{backend}.md")
    args.step_out = bench_cli.results_path(args.step_out, f"step_{backend}.md", "--step-out")
    bench_cli.distinct_outputs(("--out", args.out), ("--step-out", args.step_out))
    _check_torch(args.torch_python)
    return args


def main(argv=None) -> None:
    """Runs both benchmarks and appends the joint table (see the module's doc)."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    common = ["--depth", str(args.depth), "--batch", str(args.batch)]
    if args.rounds:
        common += ["--rounds", str(args.rounds)]
    appended: list[str] = []  # what bench_step.py appended to --step-out, as the line says it
    with tempfile.TemporaryDirectory(prefix="compare_torch-") as tmp:
        try:
            ours = {dtype: _ours(args, common, dtype, tmp, appended) for dtype in args.dtypes}
            path = os.path.join(tmp, "torch.json")
            _run([args.torch_python, os.path.join(HERE, "bench_torch.py"), *common,
                  "--json", path, "--out", os.path.join(tmp, "t.md"),
                  *(["--variants", args.torch_variants] if args.torch_variants is not None
                    else [])])
            theirs = json.load(open(path))
        except bench_cli.STOPS as e:  # no comparison from partial results: say what is kept
            raise bench_cli.stopped(e, _kept(args, appended, tmp)) from None
    bench_cli.append_table(_table(args, ours, theirs), args.out)


def _ours(args, common: list[str], dtype: str, tmp: str, appended: list[str]) -> dict:
    """Runs ``bench_step.py`` in ``dtype``; its medians. Adds to ``appended`` the table it
    appended to ``--step-out``, also if it was interrupted (with its mark)."""
    path = os.path.join(tmp, f"jax_{dtype}.json")
    step_out = args.step_out or ""  # '': printed only (bench_step.py --out '')
    size = os.path.getsize(step_out) if os.path.exists(step_out) else 0
    try:
        _run([sys.executable, os.path.join(HERE, "bench_step.py"), *common,
              "--variants", ",".join(args.variants), "--dtype", dtype,
              "--compile-depths", "", "--json", path, "--out", step_out])
    finally:
        if os.path.exists(step_out) and os.path.getsize(step_out) > size:
            with open(step_out, "rb") as f:
                f.seek(size)
                mark = bench_cli.interruption_mark(f.read().decode())
            appended.append(dtype + (f" ({mark})" if mark else ""))
    ours = json.load(open(path))
    default = ours["auto_variant"]
    if default not in ours["median_s"]:  # before spending more time
        raise bench_cli.bad_flag(f"--variants: 'auto' on {ours['backend']} is {default!r}, "
                                 f"which was not run: add it.")
    return ours


def _kept(args, appended: list[str], tmp: str) -> str:
    """What an interrupted run leaves (the line it ends with): never a comparison table."""
    kept = []
    if appended:
        kept.append(f"bench_step.py appended its table{'s' if len(appended) > 1 else ''} of "
                    f"{' and '.join(appended)} to {args.step_out}")
    if os.path.exists(os.path.join(tmp, "t.md")):
        kept.append("bench_torch.py's table was printed above, not kept")
    if not kept:
        return ""  # Interrupted's: nothing was written
    where = f" to {args.out}" if args.out else ""  # --out '': it would only be printed
    return "; ".join([f"no comparison table was written{where}", *kept]) + "."


def _table(args, ours, theirs) -> str:
    b = args.batch
    rows = []
    for dtype, res in ours.items():
        prec = "fp32" if dtype == "float32" else "bf16"
        med = res["median_s"]
        skip = "skip-remat-convs"  # the config's default remat
        default = res["auto_variant"]  # bench_step.py's, for this backend and depth
        t = {k.replace(f"-{prec}", ""): v for k, v in theirs["median_s"].items() if prec in k}
        cells = [med["constant"], med.get(skip), med.get("compact"), med.get("lengths-3"),
                 med[default],
                 t.get("eager-constant"), t.get("eager-skip"), t.get("compile-constant"),
                 t.get("compile-skip")]
        ips = " | ".join("-" if c is None else f"{b / c:.0f}" for c in cells)
        best_eager = t.get("eager-skip")
        best_compile = t.get("compile-skip")
        vs_eager = f"{best_eager / med[default]:.2f}" if best_eager else "-"
        vs_compile = f"{best_compile / med[default]:.2f}" if best_compile else "-"
        rows.append(f"| {prec} | {ips} | {med[default] / med['constant']:.3f} | {vs_eager} | "
                    f"{vs_compile} |")
    first = next(iter(ours.values()))
    return "\n".join([
        f"## Ours vs PyTorch, CIFAR ResNet-{args.depth}, batch {b}, train step img/s",
        "",
        f"Ours: jax {first['jax']} on {first['device']}; "
        f"torch {theirs['torch']} on {theirs['device']}; same machine, run one after the other; "
        f"p_L = 0.5 (linear decay), SGD Nesterov, channels-last for Torch.",
        "",
        args.label,
        "",
        "| precision | ours constant | ours skip (cond) | ours compact (multiple 4) | "
        "ours compact (3 fitted lengths) | ours default | "
        "torch eager constant | torch eager skip | torch compile constant | torch compile skip "
        "| ours default / ours constant (time) | ours default vs torch eager skip (speed) | "
        "vs torch compile skip |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])


if __name__ == "__main__":
    bench_cli.run(main)
