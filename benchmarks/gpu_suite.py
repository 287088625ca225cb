"""Every pending GPU figure in one command, in priority order, inside a time budget.

    python benchmarks/gpu_suite.py --out-dir /path/to/results            # all parts, 550 s
    python benchmarks/gpu_suite.py --list                                # parts and estimates
    python benchmarks/gpu_suite.py --parts epochs --budget 400

GPU time is often lent in short slices, so the suite runs its parts most-wanted first, starts
a part only if its estimate fits in what is left of ``--budget`` seconds, and stops a part that
overruns the budget (its printed lines stay in the log): SIGTERM 30 s before the budget's end,
so that a benchmark in its timed rounds appends the table of the rounds done, marked as
interrupted, then SIGKILL at the end. Each part is a separate process
(a fresh JAX: no compiled program is shared between parts) that appends its raw table to a
file in ``--out-dir`` (default ``benchmarks/results``); everything printed also goes to
``<out-dir>/gpu_suite.log``. Estimates are guesses for one H100/H200 and include compilation;
the log records each part's real wall time, so later runs can be planned from it. It refuses
to start where JAX has no GPU (its tables are named ``*_gpu.md``); parts that need PyTorch are
not started where ``--torch-python`` has none, or one that sees no CUDA GPU (it would write
the CPU's figures to those tables). Ctrl-C or SIGTERM is passed on to the running part,
which is given up to 30 s (again: at once) to append what it measured, marked as
interrupted, before it is killed; a reader that exits (``| head``) kills it (its table is not
written). Either way the earlier parts' tables are kept, and the log says what the running
part appended. Ctrl-Z stops the running part with the suite (on Linux with the
processes it runs in sessions of their own: vs-torch's benchmark), and ``fg`` / ``bg``
continue both (the budget's clock runs on meanwhile).

Parts (the order was re-planned after the 2026-12-04 H200 run, which measured drop-path,
vs-torch and user-branch; its wall times: 359 s, 215 s and 26 s; and, by hand, 200 s of
``bench_train.py --whole-epochs constant,auto --epochs 2``, which finished constant depth
and reached step 180 of the default's first epoch: the epochs parts' estimates are set from
that, about 150 s a variant for three epochs). A 15-minute device slice whose machine's
start leaves 750 s holds the issue's two headline tables: ``--parts epochs --budget 400``,
then at once (a machine left idle is given back) ``--parts epochs-bf16 --budget 350``
(each, as ``--list`` shows: the part's estimate, 20 s for the start-up checks and the 30 s
before the budget's end at which a part still running is sent SIGTERM; before its first
part the suite prints what it expects of each part); then ``loop-step``, ``epochs-loop``
(``implementation='loop'``, the candidate with no padding and one program) and
``graphs-step``, ``epochs-torch``, ``epochs-torch-compile``, ``epochs-lengths``.
``--dry-run`` runs the parts at toy sizes on any machine, a CPU too, to check them before a
GPU's minutes are spent. After each part, and again in the
summary, the suite prints the headline figures of the tables the part appended
(``suite_figures.py``): each variant against constant depth, the 500-epoch projection, and
our whole-epoch throughput over PyTorch's where both ran in the same command, on the
same network, config, batch, precision and p_L:

* ``stage-costs``: where a ResNet-110 step's time goes (``stage_costs_gpu.md``): each
  stage's block cost, forward and backward, measured by removing the stage; the floor the
  schedule allows with those costs (the first stage's blocks, dropped least, may cost more
  than the third's on a GPU); and for ``lax.cond`` skipping and compact mode (multiple 4)
  the step time their blocks predict against the measured one, the difference being their
  own overhead; drawn to ``stage_costs_gpu_float32.png``. This says how far 0.78 is
  reachable at all;
* ``epochs``: whole 45k-image epochs, constant depth vs the default config (on a GPU:
  compact mode, multiple 4), fp32 (``train.md``), with the 500-epoch projection;
* ``epochs-bf16``: constant depth vs the default over whole epochs in bf16, with the
  500-epoch projection the issue's 30-minute target is about;
* ``loop-step``: train step of ResNet-110, batch 128, fp32, the trainer's ``remat='convs'``:
  constant depth, compact mode (multiple 4), ``implementation='loop'`` (each scanned
  stage's kept blocks in one loop of dynamic length: no padding, one program, but a loop
  whose trip count the host reads) and ``lax.cond`` skipping (``step_gpu.md``): whether
  the loop beats compact mode on a GPU at all;
* ``epochs-loop``: constant depth vs ``implementation='loop'`` over whole epochs, fp32
  (``train.md``): if it beats the default there, it becomes the GPU default;
* ``graphs-step``: ``loop-step``'s variants with conditionals and while loops recorded into
  XLA's command buffers (``--xla_gpu_enable_command_buffer=+CONDITIONAL,+WHILE``, off by
  default; the table's heading records it): if a conditional no longer splits the step's
  CUDA graphs, ``lax.cond`` skipping may pay on a GPU without compact mode;
* ``epochs-torch``: PyTorch's whole epochs (eager, fp32 and bf16, constant and skipping;
  images on the GPU, augmented there, an evaluation per epoch), the PyTorch column of the
  training-time table (needs ``--torch-python``; ``torch_epochs_gpu.md``);
* ``epochs-torch-compile``: PyTorch's whole epochs with ``torch.compile`` (each residual
  branch compiled), skipping, fp32 and bf16: the epochs of the issue's >= 1.0x target
  (``torch_epochs_gpu.md``; its estimate is a guess, not yet measured);
* ``epochs-lengths``: constant depth vs compact mode with 3 scan lengths per stage fitted to
  the schedule (the candidate default: it pads 2.5 blocks a step where multiple 4 pads 3.7,
  and compiles all its 27 programs in the first epoch), fp32 (``train.md``);
* ``profile``: the device timeline of 5 steps each of constant depth, ``lax.cond``
  skipping and compact mode (``profile_gpu.md``; ``--trace-dir`` by hand keeps the raw
  traces): busy / wall,
  kernels per step and their median length, the costliest kernels; whether the step is
  bound by the GPU's work or by launches and host work;
* ``unroll``: train step of CIFAR ResNet-110, batch 128, fp32: constant depth and compact
  mode (multiple 4) with their scans as loops and inlined (``scan_unroll=True``: no loop
  for XLA:GPU to drive from the host block by block), and each with the trainer's default
  ``remat='convs'`` (BN and ReLU recomputed in the backward pass: fewer bytes, more
  kernels; measured on the H100 only for ``lax.cond`` skipping) (``step_gpu.md``). Inlined programs
  compile slower (ResNet-110 gradient with ``lax.cond`` skipping, on the 2-core CPU: 14.7 s
  against 8.0 s looped), hence the estimate;
* ``stage-costs-bf16``: ``stage-costs`` in bf16;
* ``drop-path``: ViT-S/16 at 224x224, batch 128: subset skipping vs masking vs no drop path
  at drop 0.1 and 0.4 and the linear rule to 0.4 (``drop_path_gpu.md``), again since the
  gather and scatter were told their indices are sorted and unique;
* ``drop-path-unfused``: ``drop-path`` again with the unfused add beside the fused one;
* ``drop-path-convnext``: ``drop-path`` for ConvNeXt-T at 224x224, batch 128;
* ``profile-drop-path``: ``profile`` for ViT-S/16 at drop 0.4: no drop path, subset
  skipping and masking, to find the ~0.37 ms per branch that skipping costs on the GPU
  whatever the rate (gather and scatter kernels, or lost fusion);
* ``epochs-compact``: compact-mode granularity over whole epochs beside constant depth:
  multiple 2, and 4 fitted lengths per stage (multiple 4 and 3 fitted lengths are in
  ``epochs`` and ``epochs-lengths``; multiple 1 is left out: it compiles 301 programs in
  three epochs, ``benchmarks/compact_buckets.py``). Multiple 2 and 4 lengths compile 90
  and 58 programs in three epochs, ~4 s each: about 850 s, more than a 600 s command holds,
  so a slice of that length needs two runs by hand, ``--whole-epochs constant,compact-2``
  and ``constant,lengths-4``;
* ``vs-torch``: train step of CIFAR ResNet-110, batch 128, fp32 and bf16: constant depth,
  ``lax.cond`` skipping, compact mode (multiple 4, the GPU default), then PyTorch eager and
  ``torch.compile``, constant and skipping (needs ``--torch-python`` with torch; the step
  tables are kept in ``step_gpu.md``, the joint table in ``vs_torch_gpu.md``);
* ``user-branch``: a user's stock-Flax branch wrapped in ``StochasticDepth``, survival 0.5 vs
  1.0, and its Flax NNX twin under ``nnx.jit`` (``nnx-*``) (``step_gpu.md``);
* ``compile``: compile time of ResNet-1202 vs ResNet-110 (``step_gpu.md``).
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import datetime
import io
import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_cli  # noqa: E402  (next to this file)
import suite_figures  # noqa: E402
from bench_cli import child_backend as backend  # noqa: E402
from provenance import SUITE_PART_ENV  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    estimate_s: int  # a guess, compilation included
    # After the python executable; {out}, {torch} and {images} (the epochs parts' shared
    # image folder, written once per machine in the temporary directory) are filled in.
    args: tuple[str, ...]
    torch: bool = False  # run with --torch-python instead of this Python
    xla_flags: str = ""  # appended to $XLA_FLAGS for this part (its table records them)


# Conditionals and while loops recorded into XLA:GPU's command buffers (CUDA graphs, with
# CUDA's conditional nodes) instead of splitting them: off by default in XLA.
COMMAND_BUFFER_CONTROL_FLOW = "--xla_gpu_enable_command_buffer=+CONDITIONAL,+WHILE"

PARTS = (
    Part("stage-costs", 150, ("benchmarks/stage_costs.py", "--variants", "skip,compact",
                              "--rounds", "20", "--plot", "{out}/stage_costs_gpu_float32.png",
                              "--out", "{out}/stage_costs_gpu.md")),
    Part("epochs", 350, ("benchmarks/bench_train.py", "--whole-epochs",
                         "constant,auto", "--epochs", "3", "--train-images", "45000",
                         "--images-dir", "{images}", "--out", "{out}/train.md")),
    Part("epochs-bf16", 300, ("benchmarks/bench_train.py", "--whole-epochs", "constant,auto",
                              "--dtype", "bfloat16", "--epochs", "3", "--train-images", "45000",
                              "--images-dir", "{images}", "--out", "{out}/train.md")),
    Part("loop-step", 150, ("benchmarks/bench_step.py", "--variants",
                            "constant-remat-convs,compact-remat-convs,loop-remat-convs,"
                            "skip-remat-convs", "--rounds", "20", "--compile-depths", "",
                            "--out", "{out}/step_gpu.md")),
    Part("epochs-loop", 330, ("benchmarks/bench_train.py", "--whole-epochs", "constant,loop",
                              "--epochs", "3", "--train-images", "45000",
                              "--images-dir", "{images}", "--out", "{out}/train.md")),
    Part("graphs-step", 150, ("benchmarks/bench_step.py", "--variants",
                              "constant-remat-convs,skip-remat-convs,loop-remat-convs,"
                              "compact-remat-convs", "--rounds", "20", "--compile-depths", "",
                              "--out", "{out}/step_gpu.md"),
         xla_flags=COMMAND_BUFFER_CONTROL_FLOW),
    Part("epochs-torch", 200, ("benchmarks/bench_torch.py", "--whole-epochs", "--epochs", "2",
                              "--train-images", "45000", "--variants", "eager",
                              "--out", "{out}/torch_epochs_gpu.md"), torch=True),
    # torch.compile's skipping, against which the 1.0x is set (its constant depth
    # and eager are in vs-torch's steps and epochs-torch): each residual branch compiled.
    Part("epochs-torch-compile", 240, ("benchmarks/bench_torch.py", "--whole-epochs",
                                       "--epochs", "2", "--train-images", "45000",
                                       "--variants", "compile-fp32-skip,compile-bf16-skip",
                                       "--out", "{out}/torch_epochs_gpu.md"), torch=True),
    Part("epochs-lengths", 330, ("benchmarks/bench_train.py", "--whole-epochs",
                                 "constant,lengths-3", "--epochs", "3", "--train-images",
                                 "45000", "--images-dir", "{images}", "--out", "{out}/train.md")),
    Part("profile", 90, ("benchmarks/profile_step.py", "--variants", "constant,skip,compact",
                         "--steps", "5", "--out", "{out}/profile_gpu.md")),
    Part("unroll", 340, ("benchmarks/bench_step.py", "--variants",
                         "constant,constant-remat-convs,constant-unrolled,compact,"
                         "compact-remat-convs,compact-unrolled",
                         "--rounds", "20", "--compile-depths", "",
                         "--out", "{out}/step_gpu.md")),
    Part("stage-costs-bf16", 150, ("benchmarks/stage_costs.py", "--variants", "skip,compact",
                                   "--dtype", "bfloat16", "--rounds", "20",
                                   "--plot", "{out}/stage_costs_gpu_bfloat16.png",
                                   "--out", "{out}/stage_costs_gpu.md")),
    Part("drop-path", 380, ("benchmarks/bench_drop_path.py", "--rates", "0.1,0.4",
                            "--linear", "0.4", "--rounds", "10",
                            "--out", "{out}/drop_path_gpu.md")),
    Part("drop-path-unfused", 560, ("benchmarks/bench_drop_path.py", "--rates", "0.1,0.4",
                                    "--linear", "0.4", "--unfused", "--rounds", "10",
                                    "--out", "{out}/drop_path_gpu.md")),
    Part("drop-path-convnext", 200, ("benchmarks/bench_drop_path.py", "--model", "convnext",
                                     "--rates", "0.1,0.4", "--linear", "0.4", "--rounds", "10",
                                     "--out", "{out}/drop_path_gpu.md")),
    Part("profile-drop-path", 120, ("benchmarks/profile_step.py", "--drop-path", "0.4",
                                    "--steps", "5", "--out", "{out}/profile_gpu.md")),
    Part("epochs-compact", 850, ("benchmarks/bench_train.py", "--whole-epochs",
                                 "constant,compact-2,lengths-4", "--epochs", "3",
                                 "--train-images", "45000", "--images-dir", "{images}",
                                 "--out", "{out}/train.md")),
    Part("vs-torch", 230, ("benchmarks/compare_torch.py", "--torch-python", "{torch}",
                           "--rounds", "20",
                           "--variants", "constant,skip-remat-convs,compact", "--step-out",
                           "{out}/step_gpu.md", "--out", "{out}/vs_torch_gpu.md")),
    # The Linen net and its NNX twin under the user's own jit (H200, 2026-12-04: the Linen
    # pair took 26 s, 3-4 s compiling each). Not the '-stock' variants (reroute_convs='auto'
    # reroutes on the CPU only: the same programs on a GPU) nor '-options' (CPU options).
    Part("user-branch", 50, ("benchmarks/bench_step.py", "--user-branch", "--variants",
                             "constant,skip,nnx-constant,nnx-skip",
                             "--out", "{out}/step_gpu.md")),
    Part("compile", 60, ("benchmarks/bench_step.py", "--variants", "constant",
                         "--rounds", "3", "--compile-depths", "110,1202",
                         "--out", "{out}/step_gpu.md")),
)
BY_NAME = {p.name: p for p in PARTS}

# --dry-run: each script's toy sizes, appended after a part's own flags (argparse keeps a
# flag's last value), so that every part runs its own variants and code on a CPU in minutes.
# ResNet-56 is the smallest CIFAR ResNet whose stages bench_train.py scans ('loop' needs it).
DRY_RUN_FLAGS = {
    "bench_train.py": ("--depth", "56", "--batch", "8", "--epochs", "2", "--train-images",
                       "48", "--test-images", "20", "--eval-batch", "10"),
    "bench_step.py": ("--batch", "8", "--rounds", "2", "--warmup", "1"),
    "stage_costs.py": ("--depth", "14", "--batch", "8", "--rounds", "2", "--warmup", "1"),
    "profile_step.py": ("--batch", "8", "--steps", "2"),
    # Batch 8: at 4, k = round(4 x 0.9) kept every example, and drop 0.1 skipped nothing.
    "bench_drop_path.py": ("--image", "32", "--batch", "8", "--rounds", "2", "--warmup", "1"),
    # ResNet-56 as bench_train.py's: the summary compares whole epochs of the same network.
    # Its parts time whole epochs: no --rounds or --warmup (train steps' only, refused there).
    "bench_torch.py": ("--depth", "56", "--batch", "8", "--epochs", "2", "--train-images",
                       "48", "--test-images", "20"),
    "compare_torch.py": ("--depth", "14", "--batch", "8", "--rounds", "2"),
}
# Per network of bench_drop_path.py (the ConvNeXt takes --depths, the ViT --depth; its
# --patch is the ConvNeXt's stem stride: 32x32 images need 2, as its CPU default).
DRY_RUN_DROP_PATH = {"vit": ("--size", "ti", "--depth", "2", "--patch", "8"),
                     "convnext": ("--size", "atto", "--depths", "1,1,1,1", "--patch", "2")}
# The network's toy sizes, per script and the flag that picks the network (the scripts
# refuse a size of the network they do not run): bench_step.py's user's network or the
# ResNet, profile_step.py's drop-path network (bench_drop_path.py's sizes) or the ResNet.
DRY_RUN_NETWORK = {("bench_step.py", "--user-branch"): ("--blocks", "2", "--width", "8"),
                   ("bench_step.py", ""): ("--depth", "14", "--scan", "true"),
                   ("profile_step.py", "--drop-path"): (),
                   ("profile_step.py", ""): ("--depth", "14")}


def dry_run_flags(part: Part) -> list[str]:
    """The flags :data:`DRY_RUN_FLAGS` appends to ``part``'s for a dry run: toy sizes of its
    script; a part that times compiling (``compile``) compiles two toy depths."""
    script = os.path.basename(part.args[0])
    flags = list(DRY_RUN_FLAGS.get(script, ()))
    if script == "bench_drop_path.py":
        flags += DRY_RUN_DROP_PATH["convnext" if "convnext" in part.args else "vit"]
    for (name, picks), network in DRY_RUN_NETWORK.items():
        if name == script and (picks in part.args or not picks):
            flags += network
            break
    depths = part.args.index("--compile-depths") + 1 if "--compile-depths" in part.args else 0
    if depths and part.args[depths]:
        flags += ["--compile-depths", "14,20"]
    return flags


def parse_args(argv=None) -> argparse.Namespace:
    ap = bench_cli.argument_parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                    help="seconds for the whole command: its checks (JAX's backend, the "
                         "parts' imports) and the parts; --list shows the budget that runs "
                         "each part alone to its end by its estimate (default: "
                         "%(default)g, the first two parts')")
    ap.add_argument("--parts", default=",".join(BY_NAME), help="comma-separated, in order")
    ap.add_argument("--out-dir", default=None,
                    help="each part appends its table to a file here (made if missing; "
                         "default benchmarks/results, with --dry-run a new temporary "
                         "directory), and the log to gpu_suite.log")
    ap.add_argument("--torch-python", default=sys.executable,
                    help="a Python with torch for epochs-torch and vs-torch (default: this one)")
    ap.add_argument("--dry-run", action="store_true",
                    help="run the parts at toy sizes (DRY_RUN_FLAGS) on any backend, a CPU "
                         "too, a torch without CUDA too: to check, before GPU minutes are "
                         "spent, that each part runs end to end and writes its table (marked "
                         "'Not the default sizes'; never to benchmarks/results). The budget "
                         "still counts the GPU estimates")
    ap.add_argument("--list", action="store_true", help="print the parts and exit")
    args = ap.parse_args(argv)
    args.selected = [BY_NAME[n] for n in bench_cli.names_from(args.parts, BY_NAME, "--parts")]
    # The parts run from the repository root: a path relative to here must not move there.
    if args.out_dir is not None:
        args.out_dir = os.path.abspath(args.out_dir)
    elif not args.dry_run:
        args.out_dir = bench_cli.RESULTS
    if args.dry_run and args.out_dir and _inside(args.out_dir, bench_cli.RESULTS):
        raise bench_cli.bad_flag(f"--dry-run --out-dir {args.out_dir}: a dry run's toy tables "
                                 f"do not go among the recorded ones (in or under "
                                 f"benchmarks/results); give a directory elsewhere or leave "
                                 f"--out-dir out (a new temporary one).")
    in_the_way = args.out_dir and _file_in_the_way(args.out_dir)
    if in_the_way:  # found once the checks had run: "use another --workdir"
        raise bench_cli.bad_flag(f"--out-dir {args.out_dir}: {in_the_way} is a file, not a "
                                 f"directory; give a directory (made if missing).")
    if os.sep in args.torch_python:  # a bare name ('python3') is looked up on PATH
        args.torch_python = os.path.abspath(args.torch_python)
    if args.budget <= 0:
        raise bench_cli.bad_flag(f"--budget {args.budget:g}: seconds, more than 0.")
    return args


def _file_in_the_way(path: str) -> str | None:
    """The file at ``path``, or at the first of its parents that exists, where that is not
    a directory (``path`` cannot be made); None where it can."""
    while path and not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return None if not os.path.exists(path) or os.path.isdir(path) else path


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or under it (links resolved: a link to the results,
    or a path through one, is the results)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


# Exits 0 where torch imports and sees a CUDA GPU, 3 where it sees none.
_TORCH_CHECK = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"


def torch_problem(python: str, need_cuda: bool = True) -> str | None:
    """Why ``python`` cannot run the parts that need PyTorch, or None if it can: torch
    imports there and sees a CUDA GPU (``need_cuda``; a dry run takes a CPU-only torch). A
    torch without one (a CPU-only wheel, a driver it does not support) would measure the
    CPU and write it to the *_gpu.md tables."""
    try:
        status = subprocess.run([python, "-c", _TORCH_CHECK], capture_output=True).returncode
    except OSError:
        status = None
    if status == 0 or (status == 3 and not need_cuda):
        return None
    if status == 3:
        return (f"PyTorch in --torch-python {python} sees no CUDA GPU: its figures would be "
                f"the CPU's, in a *_gpu.md table; give a Python whose torch has CUDA")
    return (f"no PyTorch in --torch-python {python}; it is optional: pip install torch")


def needs_torch(part: Part) -> bool:
    """Whether ``part`` runs PyTorch (itself, or through ``--torch-python``)."""
    return part.torch or "{torch}" in part.args


def command(part: Part, args: argparse.Namespace) -> list[str]:
    """The command line of ``part``: its Python, its script and flags filled in, and in a
    dry run (``args.dry_run``) :func:`dry_run_flags` after them."""
    images = "stochastic_depth_jax_bench_images" + ("_dry_run" if args.dry_run else "")
    fill = {"out": args.out_dir, "torch": args.torch_python,
            "images": os.path.join(tempfile.gettempdir(), images)}
    return [args.torch_python if part.torch else sys.executable,
            *(a.format(**fill) for a in part.args),
            *(dry_run_flags(part) if args.dry_run else ())]


def part_env(part: Part, dry_run: bool = False) -> dict[str, str]:
    """The environment ``part`` runs in: its name in ``$SDJ_GPU_SUITE_PART``, so that its
    table says it has the suite's sizes (``provenance.run_label``; not in a dry run, whose
    toy sizes its tables name), unbuffered output, and its ``xla_flags`` after any
    ``$XLA_FLAGS`` already set."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop(SUITE_PART_ENV, None)
    if not dry_run:
        env[SUITE_PART_ENV] = part.name
    if part.xla_flags:
        env["XLA_FLAGS"] = " ".join(filter(None, (os.environ.get("XLA_FLAGS"), part.xla_flags)))
    return env


def flags_already_set(part: Part) -> list[str]:
    """The flags in ``$XLA_FLAGS`` that ``part``'s own ``xla_flags`` set again. XLA applies
    the part's after them, and a ``+X,-Y`` value edits the list before it: after the
    caller's ``--xla_gpu_enable_command_buffer=`` (none), graphs-step records only
    conditionals and while loops in command buffers. The parts without flags of their own
    run with the caller's: the comparison is no longer with XLA's default."""
    names = {flag.split("=", 1)[0] for flag in part.xla_flags.split()}
    return [flag for flag in os.environ.get("XLA_FLAGS", "").split()
            if flag.split("=", 1)[0] in names]


def _flags_note(part: Part) -> str:
    """A line for the part's header where :func:`flags_already_set` finds any, else ''."""
    caller = flags_already_set(part)
    if not caller:
        return ""
    return (f"note: $XLA_FLAGS already sets {' '.join(caller)}: {part.name}'s "
            f"{part.xla_flags} applies after it (a +/- value edits that list), and the other "
            f"parts run with it (their tables' headings record XLA_FLAGS)\n")


def run_part(cmd: list[str], timeout: float, log, env: dict[str, str]) -> tuple[str, float]:
    """Runs ``cmd`` from the repository root in ``env`` (:func:`part_env`), in a session of
    its own, echoing its output to stdout and ``log``; kills its process group after
    ``timeout`` seconds. A Ctrl-Z stops the part with the suite, and ``fg`` / ``bg``
    continue both (:class:`bench_cli.StopsWithThis`): it is not in the suite's process
    group, which the terminal's Ctrl-Z stops."""
    t0 = time.perf_counter()
    with bench_cli.child_stops_with_this() as job:
        # SIGTERM if the suite dies (SIGKILL at a machine's time limit): the part, in a
        # session of its own, ran on, on the GPU under the next command; a benchmark
        # appends what it measured on SIGTERM.
        proc = job.started(subprocess.Popen(
            bench_cli.dying_with_this(cmd, signal.SIGTERM), cwd=os.path.dirname(HERE),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True))
        over_budget = _echo_until_done(proc, timeout, log)
    if over_budget:
        status = _stopped_by_budget(proc.returncode)
    else:
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    return status, time.perf_counter() - t0


def _stopped_by_budget(returncode: int) -> str:
    """The summary's status of a part the budget stopped: what its exit says of its table
    (the SIGTERM's table is marked as interrupted where one was appended; one appended after
    the part's last stop point is whole; SIGKILL lost whatever was not yet appended)."""
    if returncode == -signal.SIGKILL:
        return ("killed at the budget's end (SIGKILL after SIGTERM; what it had not appended "
                "is lost)")
    return (f"stopped (budget: SIGTERM, exit {returncode}; a table it appended says whether "
            "it is whole)")


# Seconds before the budget's end at which a running part is sent SIGTERM (at most a quarter
# of its time): a benchmark in its timed rounds then appends the table of the rounds done,
# marked as interrupted (bench_cli.rounds), before the SIGKILL at the end.
GRACE_S = 30.0
# A guess at the seconds of the checks before the first part on a GPU machine (JAX's backend
# and the parts' imports, a child process each; ~5 s on the 2-core CPU): the budgets that
# budget_for suggests allow for it; the suite prints what they took.
STARTUP_S = 20
DEFAULT_BUDGET = 550  # the first two parts by their estimates (budget_for), in a 600 s command


def budget_for(parts: list[Part], startup: float = STARTUP_S) -> int:
    """The ``--budget`` that runs ``parts`` to their end by their estimates: the start-up
    checks (``startup`` seconds), the estimates, and the :data:`GRACE_S` before the
    budget's end at which a part still running is sent SIGTERM."""
    return math.ceil(startup + sum(p.estimate_s for p in parts) + GRACE_S)


def plan(parts: list[Part], budget: float, spent: float, skipped=frozenset()) -> list[str]:
    """What each of ``parts`` does by the estimates, one line each, inside ``budget``
    seconds of which ``spent`` are gone (the start-up checks), as :func:`_run_parts` decides:
    started only where its estimate fits in what is left, and cut short where it would end
    after its SIGTERM; ``skipped``: the names of parts not started whatever the time (no
    PyTorch)."""
    lines, at = [], spent
    for part in parts:
        left = budget - at
        if part.name in skipped:
            lines.append(f"{part.name}: not started (no PyTorch that it can use)")
            continue
        if part.estimate_s > left:
            lines.append(f"{part.name} ~{part.estimate_s} s: not started ({left:.0f} s left "
                         f"by then)")
            continue
        sigterm, at = budget - min(GRACE_S, left / 4), at + part.estimate_s
        lines.append(f"{part.name} ~{part.estimate_s} s: ends ~{at:.0f} s in" + (
            "" if at <= sigterm else f", after its SIGTERM at {sigterm:.0f} s: it may be "
                                     f"cut short"))
    return lines


def _echo_until_done(proc: subprocess.Popen, timeout: float, log) -> bool:
    """Echoes the output of the part ``proc`` to ``log`` and stdout until it ends; sends its
    process group SIGTERM :data:`GRACE_S` seconds before ``timeout``, SIGKILL at
    ``timeout`` or if this fails. Ctrl-C or SIGTERM here is passed on to it
    (:func:`_pass_on`). Whether the budget stopped it."""
    stopped = threading.Event()

    def stop(signum):
        stopped.set()
        bench_cli._killpg_if_there(proc.pid, signum)

    grace = min(GRACE_S, timeout / 4)
    timers = [threading.Timer(timeout - grace, stop, (signal.SIGTERM,)),
              threading.Timer(timeout, stop, (signal.SIGKILL,))]
    output = PartOutput(proc.stdout)
    try:
        try:
            for timer in timers:  # inside: a signal while they start is passed on too
                timer.start()
            for line in output:
                log.write(line)  # first: the log keeps it also if stdout's reader exited
                log.flush()
                sys.stdout.write(line)
        except (bench_cli.Interrupted, KeyboardInterrupt) as e:
            timers[0].cancel()  # a second SIGTERM would stop a benchmark at once
            _pass_on(proc, e, log, already=stopped.is_set(), output=output)
            raise
        proc.wait()
    finally:
        for timer in timers:
            timer.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return stopped.is_set()


# The longest one wait for a part's output lasts: a Ctrl-C or SIGTERM that lands just before
# a blocking read (CPython runs a handler between bytecodes, not inside the read) is handled
# at the end of the wait; it waited for the part's next line, minutes where a part compiles.
READ_WAIT_S = 0.5


class PartOutput:
    """The lines of a part's output ``stream`` (its pipe, in text mode), as ``for line in
    stream`` gives them, read in waits of at most :data:`READ_WAIT_S` (a signal that landed
    just before a wait is handled at its end). What was read and not yet given out is kept
    here, also when a signal stops the iteration: :func:`_pass_on` goes on from there."""

    def __init__(self, stream):
        self.fd = stream.fileno()
        self.readable = select.poll()  # (not select.select: no limit on the descriptor)
        self.readable.register(self.fd, select.POLLIN)
        decoder = codecs.getincrementaldecoder(stream.encoding)(stream.errors)
        self.decoder = io.IncrementalNewlineDecoder(decoder, translate=True)
        self.text, self.ended = "", False

    def __iter__(self):
        while True:
            line, newline, rest = self.text.partition("\n")
            if newline or (self.ended and line):
                self.text = rest
                yield line + newline
            elif self.ended:
                return
            elif self.readable.poll(READ_WAIT_S * 1000):  # data, or its end
                chunk = os.read(self.fd, 1 << 16)
                self.text += self.decoder.decode(chunk, final=not chunk)
                self.ended = not chunk


# Seconds a part is given, after a Ctrl-C or SIGTERM to the suite is passed on to it, to
# append what it measured (as a benchmark does: bench_cli.rounds, bench_train.py's
# variants) before it is killed: as long as the budget gives one before its end.
PASS_ON_WAIT_S = GRACE_S


def _pass_on(proc: subprocess.Popen, stop: BaseException, log, already: bool,
             output: PartOutput | None = None) -> None:
    """Passes the suite's Ctrl-C or SIGTERM (``stop``) on to the part ``proc``'s process
    group (not where the budget's SIGTERM was ``already`` sent: a second one stops a
    benchmark at once), and echoes its output to ``log`` (and stdout while it has a
    reader) until it ends, for at most :data:`PASS_ON_WAIT_S` seconds; a second Ctrl-C or
    SIGTERM, or the wait's end, kills it (the caller). It was SIGKILLed at once: a
    benchmark in its timed rounds, or ``bench_train.py --whole-epochs``, lost what it had
    measured. ``output``: the part's, as read so far (default: from here on)."""
    output = PartOutput(proc.stdout) if output is None else output
    signum = signal.SIGINT if isinstance(stop, KeyboardInterrupt) else stop.status - 128
    how = bench_cli.signal_name(signum)
    if already:  # not passed on: the part is appending what it measured, or will be killed
        said = "the running part was already sent the budget's SIGTERM, not this"
    else:
        bench_cli._killpg_if_there(proc.pid, signum)
        said = "passed on to the running part"
    _say(f"{how}: {said}; it appends what it measured; waiting up to {PASS_ON_WAIT_S:.0f} s "
         f"for it, no later than the budget's end ({how} again: kill it at once)\n", log)
    killer = threading.Timer(PASS_ON_WAIT_S, bench_cli._killpg_if_there,
                             (proc.pid, signal.SIGKILL))
    killer.start()
    try:
        for line in output:
            _say(line, log)
        proc.wait()
    except (bench_cli.Interrupted, KeyboardInterrupt):  # again: killed at once (the caller)
        pass
    finally:
        killer.cancel()


def _say(text: str, log) -> None:
    """Writes ``text`` to ``log``, then to stdout unless its reader exited (the Ctrl-C that
    stopped the suite also stops a ``| tee`` in its process group): then it is dropped."""
    log.write(text)
    log.flush()
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        bench_cli._to_devnull(sys.stdout)


def main(argv=None) -> None:
    started = time.perf_counter()  # the budget counts the checks below too
    args = parse_args(argv)
    if args.list:
        for p in PARTS:
            flags = f"XLA_FLAGS+={p.xla_flags} " if p.xla_flags else ""
            print(f"{p.name:18s} ~{p.estimate_s:4d} s (alone: --budget {budget_for([p]):4d})  "
                  f"{flags}python {' '.join(p.args)}")
        return
    found = backend()
    if found != "gpu" and not args.dry_run:
        raise bench_cli.bad_flag(
            f"JAX's backend here is {found}, not gpu: the suite measures GPU figures and writes "
            f"them to *_gpu.md tables. Run it on a machine with a GPU (and jax[cuda]); on a CPU "
            f"run the benchmarks themselves (README, 'Tests and benchmarks'), or check the "
            f"parts at toy sizes with --dry-run.")
    versions = preflight(args.selected)
    torch_why = (torch_problem(args.torch_python, need_cuda=not args.dry_run)
                 if any(needs_torch(p) for p in args.selected) else None)
    if args.out_dir is None:  # a dry run's own
        args.out_dir = tempfile.mkdtemp(prefix="gpu_suite_dry_run-")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "gpu_suite.log"), "a") as log:
        start = (f"\n=== gpu_suite.py{' --dry-run' if args.dry_run else ''}, "
                 f"{datetime.datetime.now():%Y-%m-%d %H:%M}, backend {found}, budget "
                 f"{args.budget:g} s, tables to {args.out_dir}; {versions}\n")
        log.write(start)
        sys.stdout.write(start)
        _echo(_plan_text(args, torch_why, time.perf_counter() - started), log)
        _run_parts(args, torch_why, log, started)


def _plan_text(args, torch_why: str | None, spent: float) -> str:
    """The plan printed before the first part (:func:`plan`), and the budget that would run
    every part selected to its end (:func:`budget_for`, with the checks' ``spent`` seconds)."""
    skipped = {p.name for p in args.selected if needs_torch(p) and torch_why}
    runs = [p for p in args.selected if p.name not in skipped]
    needed = budget_for(runs, spent)
    toy = "; a dry run's toy sizes take less" if args.dry_run else ""
    return (f"plan by the estimates (guesses for one H100/H200, compilation included{toy}), "
            f"the start-up checks having taken {spent:.0f} s:\n"
            + "".join(f"  {line}\n" for line in plan(args.selected, args.budget, spent, skipped))
            + f"  --budget {needed} runs every part selected to its end (given "
              f"{args.budget:g} s{'' if needed <= args.budget else ': too little'})\n")


# Modules that a part's script imports only once it runs, not at its own import: the
# trainer writes TensorBoard files through tensorboardX and reads images through Pillow;
# stage_costs.py draws its --plot with matplotlib, after its rounds and its table.
RUN_TIME_MODULES = {"bench_train.py": ("tensorboardX", "PIL"), "stage_costs.py": ("matplotlib",)}
PIP_NAMES = {"PIL": "pillow"}  # where a module's package has another name
VERSIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml_collections",
            "tensorboardX", "numpy")
THIS_PACKAGE = "stochastic_depth_jax"  # on the path by PYTHONPATH or pip install -e, not pip
# Imports each module named (a script of benchmarks/ by its name), in this Python, with the
# path a part has (run with -P from the repository root: benchmarks/, argv[1], then
# PYTHONPATH's and site's; neither the root nor the current directory); prints
# [{missing module: [modules that need it]}, {module: error}, {distribution: version}].
# A script that puts the root on its path (bench_train.py) has this package (argv[2]) for
# itself only: one imported after it that uses it needs it found on the part's own path.
_IMPORT_CHECK = """import importlib, importlib.machinery, importlib.util, json, platform, sys
import importlib.metadata as md
sys.path.insert(0, sys.argv[1])
package, base = sys.argv[2], list(sys.path)
found = importlib.util.find_spec(package) is not None
missing, failed = {}, {}
for name in sys.argv[4:]:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing.setdefault((e.name or name).split(".")[0], []).append(name)
    except Exception as e:
        failed[name] = f"{type(e).__name__}: {e}"
    else:
        uses = any(str(getattr(v, "__module__", None) or getattr(v, "__name__", "")).split(".")[0]
                   == package for v in vars(module).values())
        if uses and not found and not importlib.machinery.PathFinder.find_spec(package):
            missing.setdefault(package, []).append(name)
    sys.path[:] = base
versions = {"python": platform.python_version()}
for dist in sys.argv[3].split(","):
    try:
        versions[dist] = md.version(dist)
    except md.PackageNotFoundError:
        versions[dist] = "none"
print(json.dumps([missing, failed, versions]))
"""


def part_modules(part: Part) -> dict[str, str]:
    """What ``part`` imports in this Python, each with the script it is for: its script
    (compare_torch.py's bench_step.py too) and :data:`RUN_TIME_MODULES`; none for a part
    run with ``--torch-python`` (:func:`torch_problem` checks that one)."""
    script = os.path.basename(part.args[0])
    if part.torch or not script.endswith(".py"):  # (a test's stand-in part: python -c)
        return {}
    scripts = [script] + (["bench_step.py"] if script == "compare_torch.py" else [])
    return {m: s.removesuffix(".py") for s in scripts
            for m in (s.removesuffix(".py"), *RUN_TIME_MODULES.get(s, ()))}


def preflight(parts: list[Part]) -> str:
    """Imports, in a child of this Python, what ``parts`` need (:func:`part_modules`), and
    raises a flag error naming what is missing or fails to import, before any part starts
    (each would fail after its start-up, one after the other, spending the budget); returns
    the versions line for the log."""
    owners = {m: s for p in parts for m, s in part_modules(p).items()}
    root = os.path.dirname(HERE)
    found = subprocess.run([sys.executable, "-P", "-c", _IMPORT_CHECK, HERE, THIS_PACKAGE,
                            ",".join(VERSIONS), *owners], capture_output=True, text=True,
                           cwd=root)  # as run_part: a relative PYTHONPATH alike
    try:
        missing, failed, versions = json.loads(found.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise bench_cli.bad_flag(f"{sys.executable} could not check the parts' imports: "
                                 f"{found.stderr.strip()[-300:]}") from None
    if missing:
        needs = "; ".join(f"{m} (for {', '.join(dict.fromkeys(owners[n] for n in by))})"
                          for m, by in missing.items())
        names = " ".join(PIP_NAMES.get(m, m) for m in missing if m != THIS_PACKAGE)
        fixes = ([f"Install them (pip install {names}; on a machine without network, wheels "
                  f"saved elsewhere with pip download)"] if names else [])
        if THIS_PACKAGE in missing:
            fixes.append(f"Put this repository on the path (PYTHONPATH={root}, or pip "
                         f"install -e {root})")
        raise bench_cli.bad_flag(f"this Python lacks modules that the parts import: {needs}. "
                                 f"{'. '.join(fixes)}. Then run again; no part was started.")
    if failed:
        raise bench_cli.bad_flag("importing a part's script fails here, no part was started: "
                                 + "; ".join(f"{m}: {e}" for m, e in failed.items()))
    return "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())


def _run_parts(args, torch_why: str | None, log, start: float) -> None:
    """Runs the selected parts in order inside the budget; after each, the figures of the
    tables it appended (:mod:`suite_figures`); the summary, with every part's figures and
    our whole epochs against PyTorch's where both ran, ends the log, also after Ctrl-C or
    SIGTERM (which stop the running part). ``torch_why``: why the parts that need PyTorch
    cannot run (:func:`torch_problem`), None if they can; ``start``: the suite's start
    (``time.perf_counter()``), from which ``--budget`` counts."""
    summary, figures, epochs = [], [], []
    part, appended = None, ""
    try:
        for part in args.selected:
            appended = ""
            left = args.budget - (time.perf_counter() - start)
            if needs_torch(part) and torch_why:
                summary.append(f"{part.name}: not started ({torch_why})")
                continue
            if part.estimate_s > left:
                summary.append(f"{part.name}: not started (estimate {part.estimate_s} s, "
                               f"{left:.0f} s left)")
                continue
            cmd = command(part, args)
            header = (f"\n=== {part.name}: {' '.join(cmd[1:])} ({left:.0f} s left)\n"
                      + _flags_note(part))
            log.write(header)
            sys.stdout.write(header)
            sizes = suite_figures.file_sizes(args.out_dir)
            try:
                status, took = run_part(cmd, left, log, part_env(part, args.dry_run))
            finally:  # what it appended, also when it was interrupted
                appended = suite_figures.appended_since(args.out_dir, sizes)
                found, rows = suite_figures.lines_of(appended)
                figures += [f"{part.name}: {line}" for line in found]
                epochs += rows
                _echo("".join(f"figures: {f}\n" for f in figures[len(figures) - len(found):]),
                      log)
            summary.append(f"{part.name}: {status}, {took:.0f} s (estimate {part.estimate_s} s)")
    except bench_cli.STOPS as e:  # a closed output (`| head`) too: the parts' tables are kept
        name = part.name if part else "none"
        table = (_what_it_appended(appended) if appended and not isinstance(e, BrokenPipeError)
                 else "")
        stop = bench_cli.stopped(e, f"part {name} stopped {table or 'and its table not written'}"
                                    f"; the parts before it wrote theirs (summary in "
                                    f"{log.name}).")
        summary.append(f"{name}: interrupted ({stop.how}); "
                       f"{'stopped ' + table if table else 'its table was not written'}")
        raise stop from None
    finally:
        # sys.exc_info(): what is being raised, if anything (its own line ends the command)
        figures += [f"ours vs PyTorch: {line}" for line in suite_figures.ours_vs_torch(epochs)]
        _summary("\n=== summary\n" + "\n".join(summary) + "\n"
                 + "".join(f"figures: {f}\n" for f in figures), log, sys.exc_info()[1])


def _what_it_appended(text: str) -> str:
    """What the tables a part appended (``text``) after the signal passed on to it say of
    themselves: marked as interrupted, or whole."""
    marks = [t.mark.strip(" ()") for t in suite_figures.tables(text)]
    cut = [m for m in marks if m]
    if cut:
        return f"after it appended what it measured ({'; '.join(cut)})"
    return "after it appended its table" + ("s" if len(marks) > 1 else "") + " whole"


def _echo(text: str, log) -> None:
    """Writes ``text`` to ``log`` (first: it keeps it also if stdout's reader exited), then
    to stdout."""
    log.write(text)
    log.flush()
    sys.stdout.write(text)


def _summary(text: str, log, raising: BaseException | None) -> None:
    """Writes the summary ``text`` to ``log``, then to stdout. A stdout whose reader exited
    (``| head``) leaves the exception being raised (``raising``) as it is, or, after the
    last part, stops the suite saying that every part ran."""
    log.write(text)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError as e:
        if raising is None:
            raise bench_cli.stopped(e, f"every part had run; the summary is in {log.name}.") \
                from None


if __name__ == "__main__":
    bench_cli.run(main)
