"""PyTorch peer of the train-step benchmark: the same CIFAR ResNet, the paper's real skipping.

Needs PyTorch (optional, not a dependency of the package: ``pip install torch``, ideally in
an environment of its own; neither JAX nor this package is needed there). Builds
the CIFAR ResNet of the paper (depth 6n+2, widths 16/32/64, option-A shortcuts: 2x2
average pooling plus zero channel padding, as the paper and our default; Torch
``BatchNorm2d``), and times a full train step
(forward, cross-entropy, backward, SGD with Nesterov momentum 0.9 and L2 1e-4 on every
weight, lr 0.1) on random CIFAR-shaped data, in channels-last memory format, for:

* ``constant``: every block runs;
* ``skip``: stochastic depth as the official Torch code does it: the gates (linear decay to
  p_L = 0.5) are drawn on the host and a Python ``if`` skips a dropped block's branch, so it
  costs nothing forward or backward;

each in fp32 and bf16 autocast, eager and ``torch.compile``. Under ``torch.compile`` each
residual branch is compiled (the ``if`` stays in Python: compiling the whole network would
guard on, and recompile for, every gate pattern). Variants run interleaved round by round.

    python benchmarks/bench_torch.py                          # ResNet-110, batch 128
    python benchmarks/bench_torch.py --depth 20 --batch 32 --rounds 3 --variants eager
    python benchmarks/bench_torch.py --json out.json          # also write medians as JSON
    python benchmarks/bench_torch.py --whole-epochs --epochs 2   # whole 45k-image epochs

Appends a table, with machine, versions, date, code and command line, to
``benchmarks/results/torch_<device>.md`` (``--out``: elsewhere; a run at other sizes than the
defaults says so in its table). ``compare_torch.py`` runs this
and ``bench_step.py`` side by side and writes one table. ``--whole-epochs`` times whole
training epochs instead, as ``bench_train.py --whole-epochs`` does for ours: the images on
the device, batches drawn, padded, cropped and flipped there, host-side gates per step, and
an evaluation (residuals scaled by p_l) after each epoch, timed apart; appended to
``benchmarks/results/torch_epochs_<device>.md``. There a SIGTERM or Ctrl-C stops the
variant training at once, and the rows of the variants that finished are appended, the
heading naming the one stopped (none finished: nothing is written), as ``bench_train.py
--whole-epochs`` does (``gpu_suite.py``'s budget sends SIGTERM before its SIGKILL).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cli  # noqa: E402  (next to this file)
from provenance import run_label, size_changes  # noqa: E402

try:
    import torch
except ModuleNotFoundError as e:
    if e.name != "torch" or __name__ != "__main__":
        raise
    sys.exit(f"error: {bench_cli.TORCH_MISSING}")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# The flags that set the sizes measured (not --rounds or --warmup: provenance.REPEATS).
SIZES = ("depth", "batch", "epochs", "train_images", "test_images")


class Branch(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN, the paper's residual function."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class Block(nn.Module):
    """``relu(shortcut(x) + f(x))``, or ``relu(shortcut(x))`` when the gate is closed."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.branch = Branch(cin, cout, stride)
        self.stride, self.pad = stride, cout - cin

    def shortcut(self, x):
        if self.stride > 1:  # the paper's "average pooling followed by zero paddings"
            x = F.avg_pool2d(x, self.stride)
        return F.pad(x, (0, 0, 0, 0, 0, self.pad)) if self.pad else x

    def forward(self, x, keep: bool = True, scale: float = 1.0):
        s = self.shortcut(x)
        if keep:  # the paper's real skipping: a dropped branch is never called
            b = self.branch(x)
            s = s + (b if scale == 1.0 else scale * b)  # test time: the residual times p_l
        return F.relu(s)


class CifarResNet(nn.Module):
    """The paper's CIFAR ResNet; ``forward(x, gates)`` with one Python bool per block."""

    def __init__(self, depth: int = 110, num_classes: int = 10):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        blocks, cin = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(Block(cin, width, stride if i == 0 else 1))
                cin = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(64, num_classes)
        for m in self.modules():  # He init as the official code
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x, gates=None, scales=None):
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x, True if gates is None else gates[i],
                      1.0 if scales is None else scales[i])
        return self.head(x.mean((2, 3)))


def survival_probs(num_blocks: int, p_last: float) -> list[float]:
    """Linear decay p_l = 1 - l / L (1 - p_L), l = 1..L."""
    return [1 - (l / num_blocks) * (1 - p_last) for l in range(1, num_blocks + 1)]


class Runner:
    """One variant: its own model, optimizer and timings."""

    def __init__(self, name, depth, batch, device, compiled, bf16, stochastic):
        self.name, self.device, self.bf16, self.stochastic = name, device, bf16, stochastic
        torch.manual_seed(0)
        self.model = CifarResNet(depth).to(device).to(memory_format=torch.channels_last)
        if compiled:
            for block in self.model.blocks:
                block.branch = torch.compile(block.branch)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9,
                                   nesterov=True, weight_decay=1e-4)
        self.times: list[float] = []

    def step(self, x, y, gates) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = F.cross_entropy(self.model(x, gates if self.stochastic else None), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        sync(self.device)
        return time.perf_counter() - t0


def allow_recompiles() -> None:
    """Every branch shape, stride and precision is its own compiled graph (about 6 per
    variant); Dynamo's default limit of 8 per code object would silently fall back to eager.
    Fail instead of falling back if the raised limit is still hit."""
    cfg = torch._dynamo.config
    for name, value in (("recompile_limit", 256), ("accumulated_recompile_limit", 4096),
                        ("fail_on_recompile_limit_hit", True)):
        if hasattr(cfg, name):
            setattr(cfg, name, value)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# CIFAR-10 channel statistics (0-255 scale), as the trainer normalises.
MEAN = (125.3, 123.0, 113.9)
STD = (63.0, 62.1, 66.7)


def augment(images, gen):
    """The paper's augmentation on the device: 4-pixel zero padding, a random 32x32 crop and a
    random horizontal flip per image; ``images`` uint8 ``[B, H, W, 3]``."""
    b, h, w, _ = images.shape
    padded = F.pad(images, (0, 0, 4, 4, 4, 4))  # (C, W, H) pairs, last dimension first
    dev = images.device
    oy, ox = torch.randint(0, 9, (2, b), device=dev, generator=gen)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]
    crops = padded[torch.arange(b, device=dev)[:, None, None], rows, cols]
    flip = torch.rand(b, device=dev, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(2), crops)


def normalise(images):
    """uint8 NHWC -> float NCHW in channels-last memory (a permuted NHWC tensor)."""
    mean = torch.tensor(MEAN, device=images.device)
    std = torch.tensor(STD, device=images.device)
    return ((images.float() - mean) / std).permute(0, 3, 1, 2)


def train_epoch(r: "Runner", x, y, batch, probs, host_gen, dev_gen) -> float:
    """One epoch (``len(x) // batch`` steps) of ``r``; its seconds, the device synchronised."""
    r.model.train()
    sync(r.device)
    t0 = time.perf_counter()
    perm = torch.randperm(len(x), device=r.device, generator=dev_gen)
    for i in range(len(x) // batch):
        idx = perm[i * batch:(i + 1) * batch]
        images = normalise(augment(x[idx], dev_gen))
        gates = ((torch.rand(len(probs), generator=host_gen) < probs).tolist()
                 if r.stochastic else None)  # host-side, as the official code
        with torch.autocast(r.device.type, dtype=torch.bfloat16, enabled=r.bf16):
            loss = F.cross_entropy(r.model(images, gates), y[idx])
        r.opt.zero_grad(set_to_none=True)
        loss.backward()
        r.opt.step()
    sync(r.device)
    return time.perf_counter() - t0


def evaluate(r: "Runner", x, y, probs, batch: int = 500) -> tuple[float, float]:
    """Test error and seconds: every block, residuals scaled by p_l for stochastic depth."""
    r.model.eval()
    sync(r.device)
    t0 = time.perf_counter()
    errors = torch.zeros((), device=r.device)
    scales = probs.tolist() if r.stochastic else None
    with torch.no_grad(), torch.autocast(r.device.type, dtype=torch.bfloat16, enabled=r.bf16):
        for i in range(0, len(x), batch):
            logits = r.model(normalise(x[i:i + batch]), None, scales)
            errors += (logits.argmax(-1) != y[i:i + batch]).sum()
    error = float(errors) / len(x)  # synchronises
    sync(r.device)
    return error, time.perf_counter() - t0


class _VariantStopped(BaseException):
    """A signal while a variant trains (:class:`_EpochStops`): it stops at once, its epochs
    not timed whole (a ``BaseException``: no ``except Exception`` in torch catches it)."""


class _EpochStops:
    """Ctrl-C and SIGTERM during ``--whole-epochs``, as ``bench_train.py``'s: the first
    stops the variant training at once (or while the images are made), or the next variant
    is not started, and the rows of the variants that finished are appended, the heading
    naming the one stopped (none finished: nothing is written); then a second Ctrl-C stops
    at once, a second SIGTERM is ignored. Without this, SIGTERM (``gpu_suite.py``'s budget)
    ended the command at once and the finished variants' rows were lost."""

    def __init__(self):
        self.signum: int | None = None
        self.training = False  # inside a variant (or making the images): stop it at once
        self._previous: dict = {}

    def __enter__(self) -> "_EpochStops":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop at once, nothing written
                raise bench_cli.Interrupted(bench_cli.signal_name(signum), 128 + signum)
            return
        self.signum = signum
        # Its line printed to no reader (gpu_suite.py died and sent this SIGTERM) must not
        # raise BrokenPipeError here, which would end the command without the rows.
        bench_cli.outputs_survive_their_reader()
        print(f"{bench_cli.signal_name(signum)}: stopping now; the rows of the variants that "
              f"finished are appended (Ctrl-C again: stop at once, nothing written)",
              file=sys.stderr, flush=True)
        if self.training:
            raise _VariantStopped()


def run_variants(names, train, stops: _EpochStops, done=None) -> tuple[list, str | None]:
    """``train(name)`` (a variant's row) for each of ``names`` until ``stops`` takes a
    signal: the rows of the variants that finished, and the name of the one stopped, or
    not started, (None where every variant finished). ``done(row)`` after each (its lines,
    printed once a signal no longer stops the variant)."""
    rows = []
    for name in names:
        if stops.signum is not None:  # since the last variant finished
            return rows, name
        try:
            stops.training = True
            row = train(name)
            stops.training = False
        except _VariantStopped:
            return rows, name
        rows.append(row)
        if done is not None:
            done(row)
    return rows, None


def cut_short(stops: _EpochStops, rows: list, stopped: str | None) -> None:
    """After a signal (``stops.signum``): marks the table appended next (the rows of the
    variants that finished; the variant ``stopped``, None if every one had finished), or,
    where none finished, stops now with nothing written."""
    if stops.signum is None:
        return
    status = 128 + stops.signum
    if stopped is None:
        bench_cli.cut_after_the_last(status, "variants")
    elif rows:
        bench_cli.cut_before(status, f"the variant {stopped}")
    else:
        raise bench_cli.Interrupted(bench_cli.signal_name(stops.signum), status)


def epoch_data(args, device) -> tuple[list, list]:
    """Random uint8 CIFAR-shaped images and labels on ``device``: (train, test) of each."""
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8).to(device)
            for n in (args.train_images, args.test_images)]
    labels = [torch.randint(0, 10, (n,), generator=g).to(device)
              for n in (args.train_images, args.test_images)]
    return data, labels


def variant_epochs(args, device, name, data, labels) -> tuple[str, float, float, float]:
    """Variant ``name``'s ``args.epochs`` epochs, each evaluated after it: its row (name,
    first epoch s, median epoch s, median evaluation s)."""
    r = Runner(name, args.depth, args.batch, device, *VARIANTS[name])
    probs = torch.tensor(survival_probs(len(r.model.blocks), args.p))
    host_gen = torch.Generator().manual_seed(1)
    dev_gen = torch.Generator(device=device).manual_seed(2)
    epochs, evals = [], []
    for epoch in range(args.epochs):
        epochs.append(train_epoch(r, data[0], labels[0], args.batch, probs, host_gen, dev_gen))
        error, seconds = evaluate(r, data[1], labels[1], probs)
        evals.append(seconds)
        print(f"{name} epoch {epoch + 1}: {epochs[-1]:.2f} s, evaluation {seconds:.2f} s "
              f"(test error {error:.3f})", flush=True)
    return name, epochs[0], statistics.median(epochs[1:] or epochs), statistics.median(
        evals[1:] or evals)


def print_row(args, row) -> None:
    """A finished variant's figures (``row``: :func:`variant_epochs`'), printed at once: a
    kill before the table is appended leaves them in the log."""
    name, _, steady, ev = row
    print(f"{name}: median epoch {steady:.2f} s "
          f"({args.train_images // args.batch * args.batch / steady:.0f} img/s); 500 "
          f"epochs (training + evaluation each epoch): {500 * (steady + ev) / 60:.1f} "
          f"min", flush=True)


def whole_epochs(args, device, names) -> str:
    """``--whole-epochs``: each variant trains ``args.epochs`` epochs of random CIFAR-shaped
    images held on the device (batches drawn and augmented there, as our trainer does),
    evaluated after each epoch; the report's text. A signal stops it as
    :class:`_EpochStops` says (:func:`cut_short`: the report is then of the variants that
    finished)."""
    with _EpochStops() as stops:
        try:
            stops.training = True  # none finished yet: a signal stops at once
            data, labels = epoch_data(args, device)
            stops.training = False
        except _VariantStopped:  # run_variants starts none
            data = labels = None
        rows, stopped = run_variants(
            names, lambda name: variant_epochs(args, device, name, data, labels), stops,
            lambda row: print_row(args, row))
    cut_short(stops, rows, stopped)
    return epochs_report(args, device, rows)


def epochs_report(args, device, rows) -> str:
    """The ``--whole-epochs`` table of ``rows`` (:func:`variant_epochs`')."""
    steady = {name: st for name, _, st, _ in rows}
    lines = []
    steps = args.train_images // args.batch
    for name, first, st, ev in rows:
        base = steady.get(name.rsplit("-", 1)[0] + "-constant")
        ratio = f"{st / base:.3f}" if base else "-"
        lines.append(f"| {name} | {first:.2f} | {st:.2f} | {steps * args.batch / st:.0f} | "
                     f"{ratio} | {ev:.2f} | {500 * (st + ev) / 60:.1f} |")
    return "\n".join([
        f"## PyTorch whole epochs, CIFAR ResNet-{args.depth}, batch {args.batch}, "
        f"{args.train_images} training images ({steps} steps), channels-last",
        "",
        f"{describe_device(device)}; "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} threads; torch {torch.__version__}; "
        f"python {platform.python_version()}; p_L={args.p}. Random uint8 images held on the "
        f"device; each step draws its batch from a per-epoch permutation and pads, crops and "
        f"flips it there; gates drawn on the host per step; evaluation of "
        f"{args.test_images} test images (batch 500, residuals scaled by p_l) after every "
        f"epoch, timed apart. 500-epoch projection = 500 x (median epoch + median "
        f"evaluation), epochs >= 2. Variants run one after another.",
        "",
        args.label,
        "",
        "| variant | epoch 1 s | median epoch s | img/s | skip / constant | median "
        "evaluation s | 500 epochs, min |",
        "|---|---|---|---|---|---|---|",
        *lines,
        "",
    ])


def describe_device(device) -> str:
    """``cuda (<GPU name>)`` or ``cpu (<host CPU>)``."""
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    return f"{device.type} ({name})"


VARIANTS = {  # name: (compiled, bf16, stochastic)
    f"{mode}-{prec}-{kind}": (mode == "compile", prec == "bf16", kind == "skip")
    for mode in ("eager", "compile") for prec in ("fp32", "bf16") for kind in ("constant", "skip")
}


def parse_args(argv) -> argparse.Namespace:
    """The flags, checked before anything is measured; ``args.names``: the variants run,
    ``args.out``: where the table goes, ``args.label``: its provenance line."""
    ap = bench_cli.argument_parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=110, help="CIFAR ResNet depth (6n+2)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=None, help="default 30 on GPU, 5 on CPU")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    ap.add_argument("--p", type=float, default=0.5, help="p_L of the skip variants")
    ap.add_argument("--variants", default=None,
                    help="comma-separated names or prefixes (e.g. 'eager'); default: all of "
                         + ",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--json", default="",
                    help="also write {variant: median seconds} of the train steps to this "
                         "new file (for compare_torch.py; not with --whole-epochs)")
    ap.add_argument("--whole-epochs", action="store_true",
                    help="time whole training epochs (with augmentation and an evaluation "
                         "per epoch) instead of steps; default variants: the eager ones")
    ap.add_argument("--epochs", type=int, default=2, help="--whole-epochs: epochs per variant")
    ap.add_argument("--train-images", type=int, default=45000,
                    help="--whole-epochs: training images")
    ap.add_argument("--test-images", type=int, default=10000,
                    help="--whole-epochs: test images evaluated after every epoch")
    ap.add_argument("--out", default=None, help=bench_cli.OUT_HELP.format(
        "torch_<device>.md, with --whole-epochs torch_epochs_<device>.md"))
    args = ap.parse_args(argv)
    bench_cli.used_only(ap, args, "with --whole-epochs", args.whole_epochs, "epochs",
                        "train_images", "test_images")
    bench_cli.used_only(ap, args, "without --whole-epochs (the train steps timed)",
                        not args.whole_epochs, "rounds", "warmup")
    default_rounds = 30 if torch.cuda.is_available() else 5
    if args.rounds == default_rounds:  # given at its default (compare_torch.py passes it)
        args.rounds = None
    args.label = run_label("bench_torch.py", argv, size_changes(ap, args, SIZES))
    args.rounds = default_rounds if args.rounds is None else args.rounds
    bench_cli.at_least(args, 1, "batch", "rounds", "epochs", "test_images")
    bench_cli.at_least(args, 0, "warmup", "threads")
    if args.warmup < 1 and not args.whole_epochs:  # round 0 was timed: compiles, all blocks
        raise bench_cli.bad_flag(f"--warmup {args.warmup}: at least 1 (the first round runs "
                                 f"every block once, compiling torch.compile's variants, "
                                 f"and must not be timed).")
    bench_cli.cifar_depth(args.depth)
    if args.whole_epochs and args.json:  # was accepted, and no file written
        raise bench_cli.bad_flag(f"--json {args.json} with --whole-epochs: the --json medians "
                                 f"are of train steps (compare_torch.py reads them); whole "
                                 f"epochs write their table only. Drop one of the two flags.")
    if args.whole_epochs and args.train_images < args.batch:
        raise bench_cli.bad_flag(f"--train-images {args.train_images}: at least one batch "
                                 f"(--batch {args.batch}).")
    args.names = bench_cli.names_from(
        args.variants if args.variants is not None
        else ("eager" if args.whole_epochs else ",".join(VARIANTS)), VARIANTS,
        "--variants", lambda w: any(n.startswith(w) for n in VARIANTS), " or their prefixes")
    args.names = [n for n in VARIANTS if any(n.startswith(w) for w in args.names)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out = bench_cli.results_path(
        args.out, f"torch_epochs_{device}.md" if args.whole_epochs else f"torch_{device}.md")
    args.json = bench_cli.new_file(args.json, "--json")
    bench_cli.distinct_outputs(("--out", args.out), ("--json", args.json))
    return args


def main(argv=None):
    """Times the variants' train steps (or whole epochs) and appends the table."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rounds = args.rounds
    names = args.names
    torch.backends.cudnn.benchmark = True
    allow_recompiles()
    if args.whole_epochs:
        bench_cli.append_table(whole_epochs(args, device, names), args.out)
        return
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    runners = [Runner(n, args.depth, args.batch, device, *VARIANTS[n]) for n in names]
    probs = torch.tensor(survival_probs(len(runners[0].model.blocks), args.p))
    kept = []
    for i in bench_cli.rounds(args.warmup + rounds, args.warmup):
        gates = (torch.rand(len(probs), generator=g) < probs).tolist()  # host-side, as Torch's
        if i == 0:  # every branch runs once (and compiles) before timing
            gates = [True] * len(gates)
        times = [r.step(x, y, gates) for r in runners]
        if i >= args.warmup:
            for r, dt in zip(runners, times):
                r.times.append(dt)
            kept.append(sum(gates) / len(gates))
        print(bench_cli.round_line(i, args.warmup, [f"{r.name} {dt * 1e3:.0f}ms" for r, dt
                                                    in zip(runners, times)]), flush=True)
    med = {r.name: statistics.median(r.times) for r in runners}
    rows = []
    for r in runners:
        base = med.get(r.name.rsplit("-", 1)[0] + "-constant")
        ratio = f"{med[r.name] / base:.3f}" if base else "-"
        rows.append(f"| {r.name} | {med[r.name] * 1e3:.1f} | {args.batch / med[r.name]:.1f} | "
                    f"{ratio} |")
    dev = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or platform.machine())
    text = "\n".join([
        f"## PyTorch train step, CIFAR ResNet-{args.depth}, batch {args.batch}, channels-last",
        "",
        f"{describe_device(device)}; "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} threads; torch {torch.__version__}; "
        f"python {platform.python_version()}; {rounds} interleaved rounds after {args.warmup} "
        f"warm-up (compilation in warm-up); p_L={args.p}, mean fraction kept "
        f"{statistics.mean(kept):.3f}.",
        "",
        args.label,
        "",
        "| variant | median ms/step | img/s | skip / constant |",
        "|---|---|---|---|",
        *rows,
        "",
    ])
    # With the table: appended after a signal in the last round too (compare_torch.py).
    bench_cli.append_table(text, args.out, medians=(args.json, {
        "device": str(dev), "torch": torch.__version__, "depth": args.depth, "batch":
        args.batch, "p": args.p, "rounds": rounds, "label": args.label, "median_s": med}))


if __name__ == "__main__":
    bench_cli.run(main)
