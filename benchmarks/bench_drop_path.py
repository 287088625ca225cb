"""Drop-path benchmark: ViT or ConvNeXt train-step time, subset skipping vs masking vs none.

Measures, side by side in one process, the wall time of a full training step of a ViT
(default) or a ConvNeXt (``--model convnext``) (forward,
label-smoothed cross-entropy, backward, AdamW update) for drop rates 0.1 ... 0.5 (uniform
over blocks) and timm's linear rule to 0.4, each with ``implementation='skip'`` (the branch
runs only on the kept subset of examples) and ``'mask'`` (timm: compute, multiply), plus
no drop path. Compilation is excluded; variants are interleaved round by round so machine
noise hits all alike; every variant sees the same key sequence; median and IQR reported.

Run by hand (not in CI)::

    python benchmarks/bench_drop_path.py            # GPU: ViT-S/16, 224x224, batch 128
                                                    # CPU: 4 blocks, width 192, 32x32/4, batch 64
    python benchmarks/bench_drop_path.py --rounds 3 --rates 0.4 --depth 2   # quick look
    python benchmarks/bench_drop_path.py --model convnext   # GPU: ConvNeXt-T, 224x224, batch 128
                                                    # CPU: ConvNeXt-Atto, 32x32, stem 2, batch 32

Prints a table and appends it, with machine, versions, date, code and command line, to
``benchmarks/results/drop_path_<backend>.md`` (``--out``: elsewhere); a run at other sizes
than the backend's defaults says so in its table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import bench_cli  # next to this file; first: Ctrl-C in JAX's import

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stochastic_depth_jax import ConvNeXt, ViT, convnext, vit
from provenance import machine_line, run_label, size_changes

DEFAULTS = {  # (model, backend) -> model and batch of the standard run
    ("vit", "cpu"): dict(size="ti", depth=4, image=32, patch=4, batch=64, rounds=5),
    ("vit", "gpu"): dict(size="s", depth=None, image=224, patch=16, batch=128, rounds=20),
    # ConvNeXt: --patch is the stem stride (ImageNet 4; on 32x32, 2 as configs/cifar10_convnext).
    ("convnext", "cpu"): dict(size="atto", depth=None, image=32, patch=2, batch=32, rounds=5),
    ("convnext", "gpu"): dict(size="tiny", depth=None, image=224, patch=4, batch=128, rounds=20),
}
# What the "Not the default sizes" warning names: the network, images and batch, which change
# what is measured; not --rounds or --warmup, how often (provenance.REPEATS).
SIZES = ("size", "depth", "depths", "image", "patch", "batch")


@dataclasses.dataclass
class Runner:
    name: str
    rate: float
    rule: str
    implementation: str
    step: callable
    state: tuple
    times: list
    batch: tuple = ()  # (images, labels): step arguments, as in a trainer, not constants


def variants(rates: list[float], linear: float,
             unfused: bool = False) -> list[tuple[str, float, str, str]]:
    """``(name, rate, rule, implementation)``: no drop path, then skip/mask per setting (and
    skip with the kept outputs scattered into zeros and then added, ``unfused``)."""
    out = [("none", 0.0, "uniform", "skip")]
    settings = [(f"uniform {r:g}", r, "uniform") for r in rates]
    if linear > 0:
        settings.append((f"linear to {linear:g}", linear, "linear"))
    for label, rate, rule in settings:
        for impl in ("skip", "mask") + (("skip-unfused",) if unfused else ()):
            out.append((f"{label} {impl}", rate, rule, impl))
    return out


def make_model(args, rate: float = 0.0, rule: str = "uniform", impl: str = "skip"):
    """The benchmarked network (``args.model``) with this drop-path setting."""
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
    if args.model == "convnext":
        return ConvNeXt(num_classes=10, size=args.size, depths=args.depths,
                        stem_stride=args.patch, drop_path_rate=rate, drop_path_rule=rule,
                        implementation=impl, dtype=dtype)
    return ViT(num_classes=10, size=args.size, depth=args.depth, patch_size=args.patch,
               drop_path_rate=rate, drop_path_rule=rule, implementation=impl.split("-")[0],
               fused_residual=impl != "skip-unfused", dtype=dtype)


def describe(args) -> str:
    """The results heading: network, input, batch, dtype."""
    model = make_model(args)
    if args.model == "convnext":
        depths, dims = model.stages()
        net = (f"ConvNeXt-{args.size.capitalize()} (depths {depths}, dims {dims}, "
               f"{sum(depths)} blocks), stem stride {args.patch}")
    else:
        width, depth, heads = model.dims()
        net = (f"ViT-{args.size.capitalize()}/{args.patch} ({depth} blocks, width {width}, "
               f"{heads} heads)")
    return f"## Drop path, {net}, {args.image}x{args.image}, batch {args.batch}, {args.dtype}"


def make_runner(name, rate, rule, impl, args, key, x, y) -> Runner:
    model = make_model(args, rate, rule, impl)
    params = jax.jit(lambda k: model.init(k, x[:2], train=False))(key)["params"]
    tx = optax.adamw(1e-3, weight_decay=0.05)

    def loss_fn(params, k, x, y):
        logits = model.apply({"params": params}, x, train=True, key=k).astype(jnp.float32)
        targets = optax.smooth_labels(jax.nn.one_hot(y, 10), 0.1)
        return optax.softmax_cross_entropy(logits, targets).mean()

    @jax.jit
    def step(params, opt_state, k, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, k, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return Runner(name, rate, rule, impl, step, (params, tx.init(params)), [], (x, y))


def run_once(r: Runner, key) -> float:
    t0 = time.perf_counter()
    out = r.step(*r.state, key, *r.batch)
    jax.block_until_ready(out)
    r.state = out[:2]
    return time.perf_counter() - t0


def table(runners: list[Runner], batch: int) -> list[str]:
    """One row per variant: median, IQR, img/s, ratio to no drop path and to its mask twin
    (the medians' ratio, and :func:`bench_cli.per_round`'s median of each round's ratio)."""
    med = {r.name: statistics.median(r.times) for r in runners}
    by_name = {r.name: r for r in runners}
    rows = ["| variant | median ms/step | IQR ms | img/s | / no drop path | skip / mask "
            "| skip / mask, per round |",
            "|---|---|---|---|---|---|---|"]
    for r in runners:
        q = np.percentile(r.times, [25, 75])
        label, _, impl = r.name.rpartition(" ")
        twin = f"{label} mask" if impl.startswith("skip") else None
        paired = twin in med and r.name != "none"
        vs_mask = f"**{med[r.name] / med[twin]:.3f}**" if paired else "-"
        per_round = (f"{bench_cli.per_round(r.times, by_name[twin].times):.3f}" if paired
                     else "-")
        rows.append(f"| {r.name} | {med[r.name] * 1e3:.1f} | {q[0] * 1e3:.1f}-{q[1] * 1e3:.1f} "
                    f"| {batch / med[r.name]:.1f} | {med[r.name] / med['none']:.3f} "
                    f"| {vs_mask} | {per_round} |")
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    backend = "cpu" if jax.default_backend() == "cpu" else "gpu"
    first = bench_cli.argument_parser(add_help=False)
    first.add_argument("--model", choices=["vit", "convnext"], default="vit")
    model = first.parse_known_args(argv)[0].model
    d = DEFAULTS[(model, backend)]
    here = f"{model} on {backend}"  # the defaults follow both: each flag's help says its own
    ap = bench_cli.argument_parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["vit", "convnext"], default="vit",
                    help="the network timed (defaults below follow it)")
    ap.add_argument("--size", default=d["size"],
                    help="ViT: ti, s, b, l; ConvNeXt: atto ... xlarge (sdj.CONVNEXT_SIZES)"
                         f"; default for {here}: {d['size']}")
    ap.add_argument("--depth", type=int, default=d["depth"],  # the CPU's ViT-Ti: 4 of its 12
                    help=f"ViT blocks (default for {here}: {d['depth']})" if d["depth"]
                    else "ViT blocks (default: the size's)")
    ap.add_argument("--depths", default=None,
                    help="ConvNeXt blocks per stage, e.g. 1,1,3,1 (default: the size's)")
    ap.add_argument("--image", type=int, default=d["image"],
                    help=f"image side (default for {here}: {d['image']})")
    ap.add_argument("--patch", type=int, default=d["patch"],
                    help=f"ViT patch size / ConvNeXt stem stride (default for {here}: "
                         f"{d['patch']})")
    ap.add_argument("--batch", type=int, default=d["batch"],
                    help=f"default for {here}: {d['batch']}")
    ap.add_argument("--rounds", type=int, default=d["rounds"],
                    help=f"timed rounds (default for {here}: {d['rounds']})")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed rounds before them (default: %(default)s)")
    ap.add_argument("--rates", default="0.1,0.2,0.3,0.4,0.5",
                    help="uniform drop rates (default: %(default)s)")
    ap.add_argument("--linear", type=float, default=0.4,
                    help="timm linear rule to this rate (default: %(default)s)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--unfused", action="store_true",
                    help="also time skipping with the kept outputs scattered into zeros and "
                         "then added (the default adds them into x in one scatter-add)")
    ap.add_argument("--out", default=None,
                    help=bench_cli.OUT_HELP.format("drop_path_<backend>.md"))
    args = ap.parse_args(argv)
    args.label = run_label("bench_drop_path.py", argv, size_changes(ap, args, SIZES))
    args.backend = backend
    if args.model == "convnext" and (args.unfused or args.depth is not None):
        raise bench_cli.bad_flag("--unfused and --depth are ViT options (the ConvNeXt always "
                                 "adds its kept outputs into x in one scatter-add; give its "
                                 "depths with --depths 1,1,3,1)")
    if args.model == "vit" and args.depths is not None:
        raise bench_cli.bad_flag("--depths is a ConvNeXt option; give the ViT's block count "
                                 "with --depth")
    args.depths = tuple(bench_cli.numbers(args.depths, "--depths", int)) if args.depths else None
    _check(args)
    return args


def _check(args) -> None:
    """Raises before anything is measured on a flag that cannot work."""
    bench_cli.at_least(args, 1, "batch", "rounds", "image", "patch")
    bench_cli.at_least(args, 0, "warmup")
    args.rates = bench_cli.numbers(args.rates, "--rates")
    for rate in [*args.rates, args.linear]:
        if not 0 <= rate < 1:
            raise bench_cli.bad_flag(f"--rates/--linear {rate:g}: a drop rate in [0, 1).")
    try:  # the model's own check of size, depth, ...
        model = make_model(args)
        if args.model == "vit":
            model.dims()
        stages = 1 if args.model == "vit" else len(model.stages()[0])
    except (ValueError, KeyError) as e:
        raise bench_cli.bad_flag(f"--model {args.model} --size {args.size}: {e}") from None
    image = (1, args.image, args.image, 3)
    try:  # the model checks the images only as it runs: a traceback, after the compiles
        if args.model == "vit":
            vit.check_patches(image, args.patch)
        else:
            convnext.check_image(image, args.patch, stages)
    except ValueError as e:
        raise bench_cli.bad_flag(f"--image {args.image} --patch {args.patch}: {e}") from None
    args.out = bench_cli.results_path(args.out, f"drop_path_{args.backend}.md")


def main(argv=None) -> None:
    """Times each drop-path variant's train step and appends the table (see the module's doc)."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    with bench_cli.jax_cache():  # JAX_COMPILATION_CACHE_DIR, checked as train.py's cache
        return _measure(args)


def _measure(args) -> None:
    """:func:`main`'s work, once its flags are checked."""
    rates = args.rates
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (args.batch, args.image, args.image, 3), jnp.float32)
    y = jax.random.randint(ky, (args.batch,), 0, 10)
    runners = []
    for name, rate, rule, impl in variants(rates, args.linear, args.unfused):
        r = make_runner(name, rate, rule, impl, args, kp, x, y)
        t0 = time.perf_counter()
        run_once(r, jax.random.key(1))
        print(f"compiled+first step {name}: {time.perf_counter() - t0:.1f}s", flush=True)
        runners.append(r)
    base_key = jax.random.key(42)
    for i in bench_cli.rounds(args.warmup + args.rounds, args.warmup):
        key = jax.random.fold_in(base_key, i)
        times = [run_once(r, key) for r in runners]
        if i >= args.warmup:
            for r, dt in zip(runners, times):
                r.times.append(dt)
        print(bench_cli.round_line(i, args.warmup, [f"{dt:.3f}" for dt in times]), flush=True)
    lines = [
        describe(args),
        "",
        f"{machine_line()}; "
        f"{args.rounds} interleaved rounds after {args.warmup} warm-up; compile excluded; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(none)'}. Train step = forward, "
        f"label-smoothed cross-entropy, backward, AdamW. skip: mode='sample', "
        f"implementation='skip' (branch on round(B(1 - rate)) examples, outputs added into x "
        f"in one scatter-add); skip-unfused: the same outputs scattered into zeros, then "
        f"added; mask: timm's drop path (computed for all, multiplied).",
        "",
        args.label,
        "",
        *table(runners, args.batch),
    ]
    bench_cli.append_table("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    bench_cli.run(main)
