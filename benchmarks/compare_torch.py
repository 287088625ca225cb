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
that backend (CPU: skip; GPU/TPU: compact). Every compact program the rounds use is
compiled before timing. Torch: eager and ``torch.compile``, constant and real skipping.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_cli  # noqa: E402  (next to this file)
from provenance import run_label, size_changes  # noqa: E402

OURS = ("constant", "skip-remat-convs", "compact", "lengths-3")  # bench_step.py variants
SIZES = {"depth": None, "batch": None, "rounds": "bench_step.py's and bench_torch.py's"}


class StepFailed(bench_cli.FlagError):
    """A benchmark this script runs failed (its own error is printed above)."""


def _run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    status = subprocess.run(cmd, cwd=os.path.dirname(HERE)).returncode
    if status:
        raise StepFailed(f"{os.path.basename(cmd[1])} failed (exit status {status}; its "
                         f"output is above); nothing was written to --out.")


def _check_torch(python: str) -> None:
    """Raises unless ``python`` runs and imports torch: before minutes of our benchmarks."""
    try:
        found = subprocess.run([python, "-c", "import torch"], capture_output=True).returncode
    except OSError as e:
        raise bench_cli.bad_flag(f"--torch-python {python}: cannot run it ({e.strerror}); give "
                                 f"the path of a Python interpreter that has PyTorch.") from None
    if found:
        raise bench_cli.bad_flag(f"--torch-python {python}: {bench_cli.TORCH_MISSING}")


def parse_args(argv) -> argparse.Namespace:
    """The flags, checked (torch found, paths writable) before anything runs."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
                    help="where our step tables go (default: results/step_<backend>.md)")
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
    args.out = bench_cli.results_path(args.out, f"vs_torch_{backend}.md")
    args.step_out = bench_cli.results_path(args.step_out, f"step_{backend}.md", "--step-out")
    _check_torch(args.torch_python)
    return args


def main(argv=None) -> None:
    """Runs both benchmarks and appends the joint table (see the module's doc)."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    variants = args.variants
    common = ["--depth", str(args.depth), "--batch", str(args.batch)]
    if args.rounds:
        common += ["--rounds", str(args.rounds)]
    ours = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            path = os.path.join(tmp, f"jax_{dtype}.json")
            _run([sys.executable, os.path.join(HERE, "bench_step.py"), *common,
                  "--variants", ",".join(variants), "--dtype", dtype,
                  "--compile-depths", "", "--json", path, "--out", args.step_out])
            ours[dtype] = json.load(open(path))
            default = default_variant(ours[dtype]["backend"])
            if default not in ours[dtype]["median_s"]:  # before spending more time
                raise bench_cli.bad_flag(f"--variants: 'auto' on {ours[dtype]['backend']} is "
                                         f"{default!r}, which was not run: add it.")
        path = os.path.join(tmp, "torch.json")
        _run([args.torch_python, os.path.join(HERE, "bench_torch.py"), *common,
              "--json", path, "--out", os.path.join(tmp, "t.md"),
              *(["--variants", args.torch_variants] if args.torch_variants is not None else [])])
        theirs = json.load(open(path))
    bench_cli.append_table(_table(args, ours, theirs), args.out)


def default_variant(backend: str) -> str:
    """Our bench_step variant that model.implementation='auto' picks on ``backend``."""
    return "skip-remat-convs" if backend == "cpu" else "compact"


def _table(args, ours, theirs) -> str:
    b = args.batch
    rows = []
    for dtype, res in ours.items():
        prec = "fp32" if dtype == "float32" else "bf16"
        med = res["median_s"]
        skip = "skip-remat-convs"  # the config's default remat
        default = default_variant(res["backend"])
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
