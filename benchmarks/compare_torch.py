"""Ours vs PyTorch on one machine, one command: the same ResNet, batch and optimizer.

Runs ``bench_step.py`` (this environment's JAX; fp32 and bf16) and ``bench_torch.py`` (a
Python that has PyTorch, e.g. a separate venv) one after the other on the same machine, then
writes one table to ``benchmarks/results/vs_torch_<backend>.md``::

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
import datetime
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
OURS = ("constant", "skip-remat-convs", "compact", "lengths-3")  # bench_step.py variants


def _run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=os.path.dirname(HERE))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch-python", required=True, help="a Python interpreter with torch")
    ap.add_argument("--depth", type=int, default=110)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--torch-variants", default="", help="bench_torch.py --variants")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--variants", default=",".join(OURS),
                    help="our bench_step.py variants, a subset of the default (each compact "
                         "variant compiles one program per bucket tuple: ~4 s each on an H100)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--step-out", default=None,
                    help="where our step tables go (default: results/step_<backend>.md)")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in OURS]
    if bad or "constant" not in variants:
        ap.error(f"--variants must include 'constant' and be among {list(OURS)}; "
                 f"got {bad or variants}")
    common = ["--depth", str(args.depth), "--batch", str(args.batch)]
    if args.rounds:
        common += ["--rounds", str(args.rounds)]
    ours = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            path = os.path.join(tmp, f"jax_{dtype}.json")
            _run([sys.executable, os.path.join(HERE, "bench_step.py"), *common,
                  "--variants", ",".join(variants), "--dtype", dtype,
                  "--compile-depths", "", "--json", path,
                  *(["--out", args.step_out] if args.step_out else [])])
            ours[dtype] = json.load(open(path))
            default = default_variant(ours[dtype]["backend"])
            if default not in ours[dtype]["median_s"]:  # before spending more time
                raise SystemExit(f"'auto' on {ours[dtype]['backend']} is {default!r}, which "
                                 f"was not run: add it to --variants")
        path = os.path.join(tmp, "torch.json")
        _run([args.torch_python, os.path.join(HERE, "bench_torch.py"), *common,
              "--json", path, "--out", os.path.join(tmp, "t.md"),
              *(["--variants", args.torch_variants] if args.torch_variants else [])])
        theirs = json.load(open(path))
    text = _table(args, ours, theirs)
    print("\n" + text)
    backend = next(iter(ours.values()))["backend"]
    out = args.out or os.path.join(HERE, "results", f"vs_torch_{backend}.md")
    with open(out, "a") as f:
        f.write(text + "\n")
    print(f"appended to {out}")


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
        f"{datetime.date.today().isoformat()}; ours: jax {first['jax']} on {first['device']}; "
        f"torch {theirs['torch']} on {theirs['device']}; same machine, run one after the other; "
        f"p_L = 0.5 (linear decay), SGD Nesterov, channels-last for Torch.",
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
    main()
