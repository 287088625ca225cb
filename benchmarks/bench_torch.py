"""PyTorch peer of the train-step benchmark: the same CIFAR ResNet, the paper's real skipping.

Needs PyTorch (not a dependency of the package; install it in its own environment). Builds
the CIFAR ResNet of the paper (depth 6n+2, widths 16/32/64, option-A shortcuts: stride
subsampling plus zero channel padding, Torch ``BatchNorm2d``), and times a full train step
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

Appends a table to ``benchmarks/results/torch_<device>.md``. ``compare_torch.py`` runs this
and ``bench_step.py`` side by side and writes one table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


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
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.pad)) if self.pad else x

    def forward(self, x, keep: bool = True):
        s = self.shortcut(x)
        if keep:  # the paper's real skipping: a dropped branch is never called
            s = s + self.branch(x)
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

    def forward(self, x, gates=None):
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x, True if gates is None else gates[i])
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


VARIANTS = {  # name: (compiled, bf16, stochastic)
    f"{mode}-{prec}-{kind}": (mode == "compile", prec == "bf16", kind == "skip")
    for mode in ("eager", "compile") for prec in ("fp32", "bf16") for kind in ("constant", "skip")
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=110)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=None, help="default 30 on GPU, 5 on CPU")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--p", type=float, default=0.5, help="p_L of the skip variants")
    ap.add_argument("--variants", default="",
                    help="comma-separated names or prefixes (e.g. 'eager'); default: all of "
                         + ",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--json", default="", help="also write {variant: median seconds} here")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rounds = args.rounds or (30 if device.type == "cuda" else 5)
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    names = [n for n in VARIANTS if not wanted or any(n.startswith(w) for w in wanted)]
    if not names:
        raise SystemExit(f"no variant matches {wanted}; valid: {list(VARIANTS)}")
    torch.backends.cudnn.benchmark = True
    allow_recompiles()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    runners = [Runner(n, args.depth, args.batch, device, *VARIANTS[n]) for n in names]
    probs = torch.tensor(survival_probs(len(runners[0].model.blocks), args.p))
    kept = []
    for i in range(args.warmup + rounds):
        gates = (torch.rand(len(probs), generator=g) < probs).tolist()  # host-side, as Torch's
        if i == 0:  # every branch runs once (and compiles) before timing
            gates = [True] * len(gates)
        for r in runners:
            dt = r.step(x, y, gates)
            if i >= args.warmup:
                r.times.append(dt)
        if i >= args.warmup:
            kept.append(sum(gates) / len(gates))
        print(f"round {i}: " + ", ".join(f"{r.name} {dt * 1e3:.0f}ms" for r, dt in
                                          zip(runners, [r.times[-1] if r.times else 0
                                                        for r in runners])), flush=True)
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
        f"{datetime.date.today().isoformat()}; {device.type} ({dev}); "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} threads; torch {torch.__version__}; "
        f"python {platform.python_version()}; {rounds} interleaved rounds after {args.warmup} "
        f"warm-up (compilation in warm-up); p_L={args.p}, mean fraction kept "
        f"{statistics.mean(kept):.3f}.",
        "",
        "| variant | median ms/step | img/s | skip / constant |",
        "|---|---|---|---|",
        *rows,
        "",
    ])
    print("\n" + text)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"torch_{device.type}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "a") as f:
        f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(dev), "torch": torch.__version__, "batch": args.batch,
                       "median_s": med}, f, indent=2)


if __name__ == "__main__":
    main()
