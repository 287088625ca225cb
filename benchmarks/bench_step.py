"""Train-step benchmark: constant depth vs stochastic depth (skipping) vs mask-multiply.

Measures, side by side in one process, the median wall time of a full training step
(forward, cross-entropy, backward, SGD-Nesterov update with weight decay) of a CIFAR ResNet
on random non-zero inputs, compilation excluded, variants interleaved round by round so that
machine noise hits all of them alike. Every stochastic variant sees the same sequence of
step keys (hence the same gates). Also measures compile time of two depths.

Run by hand (not in CI)::

    python benchmarks/bench_step.py                       # ResNet-110, batch 128
    python benchmarks/bench_step.py --depth 20 --batch 32 --rounds 5 --compile-depths 20,56
    python benchmarks/bench_step.py --user-branch         # a user's stock-Flax branch

``--user-branch`` times instead a new user's network (``benchmarks/user_branch.py``: stock
``nn.Conv`` + ``nn.BatchNorm`` blocks, each branch wrapped in ``StochasticDepth``; 8 blocks of
width 32, batch 32 unless ``--batch`` is given) at survival 1.0 and 0.5, with the library's
default rerouting of stock convolutions (``reroute_convs='auto'``) and without it, under the
user's own plain ``jax.jit`` (what they get without changing their code), and the rerouted
pair again under ``jax.jit(..., compiler_options=cpu_compiler_options())`` (what passing the
library's options adds); and its Flax NNX twin (``UserNetNNX``, ``nnx-*`` variants) with and
without rerouting under the user's own ``nnx.jit``.

Prints a table and appends it, with machine, versions, date, code and command line, to
``benchmarks/results/step_<backend>.md`` (``--out``: elsewhere); a run at other sizes than
the defaults says so in its table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cli  # noqa: E402  (next to this file; first: Ctrl-C in JAX's import)

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from stochastic_depth_jax import CifarResNet, draw_gates, models
from stochastic_depth_jax.conv import cpu_compiler_options
from stochastic_depth_jax.training import compilation, implementation

from user_branch import UserNet, UserNetNNX  # noqa: E402  (benchmark-only, next to this file)
from provenance import machine_line, run_label, size_changes  # noqa: E402

# The flags that set the sizes measured; a table at other values than the defaults says so.
# (Not --rounds or --warmup: how often, not what; provenance.REPEATS.)
SIZES = {"depth": None, "batch": "128, 32 with --user-branch", "blocks": None, "width": None}

VARIANTS = {
    # name: (final_survival_prob, implementation, remat)
    "constant": (1.0, "skip", "none"),  # constant depth, the baseline
    "skip": (0.5, "skip", "none"),  # stochastic depth, dropped blocks not computed
    "skip-remat-convs": (0.5, "skip", "convs"),
    "skip-remat-full": (0.5, "skip", "full"),
    "mask": (0.5, "mask", "none"),  # stochastic depth as timm/torchvision: compute, multiply
    # Kept blocks gathered into scans of static length (host-side gates; no conditionals),
    # kept counts rounded up to a multiple of 4 / 2 / 1 (fewer compilations vs less waste),
    # or to one of 3 / 4 lengths per stage fitted to the schedule.
    "compact": (0.5, "compact4", "none"),
    "compact-remat-convs": (0.5, "compact4", "convs"),  # the trainer's default remat
    "constant-remat-convs": (1.0, "skip", "convs"),
    "compact-2": (0.5, "compact2", "none"),
    "compact-1": (0.5, "compact1", "none"),
    "lengths-3": (0.5, "lengths3", "none"),
    "lengths-4": (0.5, "lengths4", "none"),
    # Each scanned stage's kept blocks in one loop of dynamic length (one program, no padding).
    "loop": (0.5, "loop", "none"),
    "loop-remat-convs": (0.5, "loop", "convs"),
}
# Any variant with "-unrolled" appended: the same with scan_unroll=True (scans inlined: no
# loop for XLA:GPU to drive from the host block by block).
UNROLLED = "-unrolled"


def known_variant(name: str) -> bool:
    """Whether ``name`` is one of :data:`VARIANTS`, optionally with ``-unrolled``."""
    return name.removesuffix(UNROLLED) in VARIANTS


@dataclasses.dataclass
class Runner:
    name: str
    step: callable
    state: tuple
    times: list
    buckets: callable = None  # host gates -> static scan lengths (compact variant only)
    batch: tuple = ()  # (images, labels): step arguments, as in the trainer, not constants


def make_runner(name, depth, batch, scan, dtype, key, x, y, keep=None, label=None):
    """A Runner for ``VARIANTS[name]`` (``keep``: a pruned model's blocks; ``label``: the
    runner's name in tables, default ``name``)."""
    p_l, impl, remat = VARIANTS[name.removesuffix(UNROLLED)]
    compact = impl.startswith(("compact", "lengths"))
    model = CifarResNet(depth=depth, num_classes=10, final_survival_prob=p_l,
                        implementation="skip" if compact else impl, remat=remat, scan=scan,
                        scan_unroll=name.endswith(UNROLLED), dtype=dtype, keep=keep)
    variables = jax.jit(lambda k: model.init({"params": k}, x[:2], train=False))(key)
    tx = optax.chain(optax.add_decayed_weights(1e-4),
                     optax.sgd(0.1, momentum=0.9, nesterov=True))
    opt_state = tx.init(variables["params"])

    constant = p_l == 1.0

    def loss_fn(params, batch_stats, gates, buckets, x, y):
        # Buckets computed from these gates, as the trainer's: its program, no run-time check.
        with models.buckets_fitted():
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True,
                gates=None if constant else gates, buckets=buckets, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates["batch_stats"]

    @functools.partial(jax.jit, static_argnums=4, compiler_options=cpu_compiler_options())
    def step(params, batch_stats, opt_state, gates, buckets, x, y):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, gates, buckets, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    state = (variables["params"], variables["batch_stats"], opt_state)
    buckets = None
    if impl.startswith("compact"):
        multiple = int(impl[len("compact"):])
        buckets = lambda g: model.compact_buckets(np.asarray(g), multiple)  # noqa: E731
    elif impl.startswith("lengths"):
        lengths = model.compact_lengths(int(impl[len("lengths"):]))
        buckets = lambda g: model.compact_buckets(np.asarray(g), lengths=lengths)  # noqa: E731
    return Runner(label or name, step, state, [], buckets, (x, y))


def random_batch(batch: int):
    """``(x, y, key)``: random non-zero CIFAR-shaped images and labels, and an init key."""
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, 32, 32, 3), jnp.float32)
    return x, jax.random.randint(ky, (batch,), 0, 10), kp


def round_gates(depth: int, count: int):
    """``(first, rounds)``: gates of ``key(42)`` and of ``fold_in(key(42), i)`` for the
    ``count`` rounds, under CifarResNet-``depth``'s schedule (the same in every benchmark)."""
    base_key = jax.random.key(42)
    draw = jax.jit(lambda k: draw_gates(k, CifarResNet(depth=depth).survival_probs()))
    return draw(base_key), [draw(jax.random.fold_in(base_key, i)) for i in range(count)]


def compile_all(runners, first_gates, all_gates) -> None:
    """Compiles each runner's program(s) before timing: one step on ``first_gates``, and for
    compact variants one step per further bucket tuple that ``all_gates`` will use."""
    for r in runners:
        t0 = time.perf_counter()
        run_once(r, first_gates)
        if r.buckets is not None:  # compile every static scan length the rounds will use
            seen = {r.buckets(first_gates)}
            for g in all_gates:
                if r.buckets(g) not in seen:
                    seen.add(r.buckets(g))
                    run_once(r, g)
            print(f"{r.name}: {len(seen)} compiled bucket combinations", flush=True)
        print(f"compiled+first step {r.name}: {time.perf_counter() - t0:.1f}s", flush=True)


NNX = "nnx"  # USER_VARIANTS' jit of the Flax NNX net
USER_VARIANTS = {
    # name: (survival_prob, reroute_convs, compiler options): a user's own jax.jit passes no
    # compiler options, so the plain pairs are what a user gets without changing their code.
    "constant": (1.0, "auto", False),  # the baseline: the same net at survival 1.0
    "skip": (0.5, "auto", False),  # what a user gets by default
    "constant-stock": (1.0, "never", False),  # stock Flax convolutions everywhere
    "skip-stock": (0.5, "never", False),
    "constant-options": (1.0, "auto", True),  # jit(..., compiler_options=cpu_compiler_options())
    "skip-options": (0.5, "auto", True),
    # The Flax NNX twin (user_branch.UserNetNNX) under the user's own nnx.jit.
    "nnx-constant": (1.0, "auto", NNX),
    "nnx-skip": (0.5, "auto", NNX),
    "nnx-constant-stock": (1.0, "never", NNX),
    "nnx-skip-stock": (0.5, "never", NNX),
}
USER_JITS = {False: "jax.jit", True: "jax.jit + cpu_compiler_options()", NNX: "nnx.jit, NNX net"}


def user_baseline(name: str) -> str:
    """The variant ``name``'s row is divided by: the same reroute_convs and jit at survival
    1.0 (``skip-options`` -> ``constant-options``)."""
    return name.replace("skip", "constant", 1)


def make_user_runner(name, blocks, width, batch, dtype, key, x, y):
    """A Runner for ``USER_VARIANTS[name]``; its step takes a per-round rng key as gates
    (the NNX net draws from its own ``nnx.Rngs`` stream, seeded alike for every NNX
    variant)."""
    p, reroute, options = USER_VARIANTS[name]
    if options == NNX:
        return make_nnx_user_runner(name, blocks, width, dtype, x, y)
    model = UserNet(blocks=blocks, width=width, survival_prob=p, reroute_convs=reroute,
                    dtype=dtype or jnp.float32)
    variables = jax.jit(lambda k: model.init({"params": k}, x[:2], train=False))(key)
    tx = optax.chain(optax.add_decayed_weights(1e-4),
                     optax.sgd(0.1, momentum=0.9, nesterov=True))

    def loss_fn(params, batch_stats, k, x, y):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                      train=True, rngs={"stochastic_depth": k},
                                      mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates["batch_stats"]

    @functools.partial(jax.jit, static_argnums=4,
                       compiler_options=cpu_compiler_options() if options else None)
    def step(params, batch_stats, opt_state, k, buckets, x, y):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, k, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    return Runner(name, step, state, [], None, (x, y))


def make_nnx_user_runner(name, blocks, width, dtype, x, y):
    """A Runner for an NNX variant of ``USER_VARIANTS``: the training step an NNX user
    writes (``nnx.Optimizer``, ``nnx.value_and_grad`` under ``nnx.jit``), state held in the
    model and optimizer objects."""
    p, reroute, _ = USER_VARIANTS[name]
    model = UserNetNNX(blocks, width, p, reroute, dtype=dtype or jnp.float32,
                       rngs=nnx.Rngs(params=0, stochastic_depth=42))
    tx = optax.chain(optax.add_decayed_weights(1e-4),
                     optax.sgd(0.1, momentum=0.9, nesterov=True))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train(model, optimizer, x, y):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    def step(model, optimizer, _, key, buckets, x, y):
        return model, optimizer, None, train(model, optimizer, x, y)

    return Runner(name, step, (model, optimizer, None), [], None, (x, y))


def run_once(r: Runner, gates) -> float:
    t0 = time.perf_counter()  # compact: reading the gates to the host is part of the step
    out = r.step(*r.state, gates, None if r.buckets is None else r.buckets(gates), *r.batch)
    jax.block_until_ready(out)
    r.state = out[:3]
    return time.perf_counter() - t0


def compile_seconds(depth, batch, scan, dtype) -> float:
    model = CifarResNet(depth=depth, num_classes=10, final_survival_prob=0.5, scan=scan,
                        dtype=dtype)
    x = jnp.ones((batch, 32, 32, 3), jnp.float32)
    y = jnp.zeros((batch,), jnp.int32)
    variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x[:2],
                                                  train=False))

    def loss(params, bs, k, x, y):
        logits, _ = model.apply({"params": params, "batch_stats": bs}, x, train=True,
                                rngs={"stochastic_depth": k}, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    # Compiled, never loaded: under JAX_COMPILATION_CACHE_DIR (set in many a shell) a second
    # run timed loading the program from the persistent cache (5.7 s, then 1.2 s).
    with compilation.cache_dir_in_use(""):
        t0 = time.perf_counter()
        jax.jit(jax.grad(loss)).lower(variables["params"], variables["batch_stats"],
                                      jax.random.key(0), x, y).compile()
        return time.perf_counter() - t0


def time_rounds(runners, all_gates, warmup) -> None:
    """Runs every runner on each round's gates in turn, recording times after ``warmup``;
    a Ctrl-C or SIGTERM ends the rounds after the current one (:func:`bench_cli.rounds`)."""
    for i in bench_cli.rounds(len(all_gates), warmup):
        gates = all_gates[i]
        times = [run_once(r, gates) for r in runners]
        if i >= warmup:
            for r, dt in zip(runners, times):
                r.times.append(dt)
        print(bench_cli.round_line(i, warmup, [f"{dt:.3f}" for dt in times]), flush=True)


def with_a_loop_to_run(names: list[str], args: argparse.Namespace, scan) -> list[str]:
    """``names`` without the ``implementation='loop'`` variants where ``--depth`` and ``--scan``
    scan no stage (the model refuses them: every block would compute; ResNet-20's stages of
    3 blocks are not scanned by default): left out of the default list, saying so; named in
    ``--variants``, a flag error naming the fix, before anything compiles."""
    try:
        CifarResNet(depth=args.depth, scan=scan, implementation="loop")
        return names
    except ValueError:
        pass
    loops = [n for n in names if VARIANTS[n.removesuffix(UNROLLED)][1] == "loop"]
    fix = "--scan true" if args.depth > 8 else "--depth 14 or more with --scan true"
    why = (f"depth {args.depth} with --scan {args.scan} scans no stage for "
           f"implementation='loop' to loop over")
    if loops and args.variants is not None:
        raise bench_cli.bad_flag(f"--variants {','.join(loops)}: {why}; pass {fix}, or leave "
                                 f"them out.")
    if loops:
        print(f"left out {', '.join(loops)}: {why} ({fix} runs them).", flush=True)
    return [n for n in names if n not in loops]


def _constant_depth(name: str) -> bool:
    """Whether ``name`` is a :data:`VARIANTS` entry (``-unrolled`` or not) at p_L = 1."""
    return VARIANTS.get(name.removesuffix(UNROLLED), (0.5,))[0] == 1.0


def table_rows(runners, batch, baseline=None) -> list[str]:
    """Median, IQR, throughput and two ratios to the runner named ``baseline(name)``
    (default: the first runner, if it is a constant-depth variant such as 'constant' or
    'constant-remat-convs'); '-' where that runner did not run.

    The first ratio divides the medians; the second is :func:`bench_cli.per_round`, the
    median of each round's own ratio, which drift between rounds does not move."""
    by_name = {r.name: r for r in runners}
    first = runners[0].name if _constant_depth(runners[0].name) else None
    rows = []
    for r in runners:
        med = statistics.median(r.times)
        q = np.percentile(r.times, [25, 75])
        base = by_name.get(baseline(r.name) if baseline else first)
        ratio = f"{med / statistics.median(base.times):.3f}" if base else "-"
        paired = f"{bench_cli.per_round(r.times, base.times):.3f}" if base else "-"
        rows.append(f"| {r.name} | {med * 1e3:.1f} | {q[0] * 1e3:.1f}-{q[1] * 1e3:.1f} | "
                    f"{batch / med:.1f} | {ratio} | {paired} |")
    return rows


def medians(path: str, runners, batch, dtype: str, **context) -> tuple[str, dict]:
    """``(path, {variant: median seconds} plus context)``: the ``--json`` file for
    ``compare_torch.py`` that :func:`bench_cli.append_table` writes with the table;
    ``context`` names the network (a file of medians said no depth), and ``label`` the
    run's provenance line, as the table's."""
    return path, {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                  "jax": jax.__version__, "batch": batch, "dtype": dtype, **context,
                  "median_s": {r.name: statistics.median(r.times) for r in runners}}


def auto_variant(depth: int, scan, backend: str | None = None) -> str:
    """The variant the trainer's ``model.implementation='auto'`` picks for ``depth`` and
    ``scan`` on ``backend`` (default: this one's) (``compare_torch.py``'s "ours default"),
    from the trainer's own rule: compact mode on GPU/TPU only where a stage is scanned (not
    ResNet-20's stages of 3 blocks), else ``lax.cond`` skipping."""
    model = ml_collections.ConfigDict({
        "name": "cifar_resnet", "depth": depth, "scan": scan, "implementation": "auto",
        "mode": "batch", "final_survival_prob": 0.5, "compact_multiple": 0,
        "compact_lengths": 0})
    resolved = implementation.resolve(model, backend or jax.default_backend())
    return "compact" if resolved.compact_multiple else "skip-remat-convs"


def user_branch_main(args, dtype) -> None:
    """``--user-branch``: a user's stock-Flax network, survival 1.0 vs 0.5, side by side."""
    batch, rounds = args.batch, args.rounds
    names = (list(USER_VARIANTS) if args.variants is None
             else bench_cli.names_from(args.variants, USER_VARIANTS, "--user-branch --variants"))
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, 32, 32, 3), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, 10)
    runners = [make_user_runner(n, args.blocks, args.width, batch, dtype, kp, x, y)
               for n in names]
    keys = [jax.random.fold_in(jax.random.key(42), i) for i in range(args.warmup + rounds)]
    for r in runners:
        t0 = time.perf_counter()
        run_once(r, keys[0])
        print(f"compiled+first step {r.name}: {time.perf_counter() - t0:.1f}s", flush=True)
    time_rounds(runners, keys, args.warmup)
    lines = [
        f"## Train step, user's stock-Flax branch ({args.blocks} wrapped blocks, width "
        f"{args.width}), batch {batch}, {args.dtype}",
        "",
        f"{machine_line()}; {rounds} interleaved rounds after {args.warmup} warm-up; compile "
        f"excluded; XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(none)'}.",
        "",
        args.label,
        "",
        "| variant (survival, reroute_convs, jit) | median ms/step | IQR ms | img/s | "
        "/ constant | per round |",
        "|---|---|---|---|---|---|",
        *[row.replace(f"| {n} |", f"| {n} ({USER_VARIANTS[n][0]}, {USER_VARIANTS[n][1]}, "
                                  f"{USER_JITS[USER_VARIANTS[n][2]]}) |", 1)
          for row, n in zip(table_rows(runners, batch, user_baseline), names)],
        "",
        "Network: benchmarks/user_branch.py (stock nn.Conv + nn.BatchNorm, each branch wrapped "
        "in StochasticDepth with uniform survival; nnx-*: its Flax NNX twin, stock nnx.Conv + "
        "nnx.BatchNorm in nnx_layers.StochasticDepth, trained with nnx.Optimizer and "
        "nnx.value_and_grad under the user's nnx.jit). Gates drawn from the same per-round "
        "keys for every Linen variant (NNX: from the model's nnx.Rngs stream, seeded alike). "
        "jax.jit: the user's own jit, no compiler options; "
        "+ cpu_compiler_options(): jax.jit(..., compiler_options=sdj.conv."
        "cpu_compiler_options()). '/ constant': divided by the survival-1.0 row of the same "
        "reroute_convs and jit; 'per round': the median of each round's ratio.",
    ]
    bench_cli.append_table("\n".join(lines) + "\n", args.out,
                           medians=medians(args.json, runners, batch, args.dtype,
                                           blocks=args.blocks, width=args.width,
                                           rounds=rounds, label=args.label))


def parse_args(argv) -> argparse.Namespace:
    """The flags, checked (a bad one raises before anything is measured); ``args.out`` is
    where the table goes and ``args.label`` its provenance line."""
    ap = bench_cli.argument_parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=110, help="CIFAR ResNet depth (6n+2)")
    ap.add_argument("--batch", type=int, default=None, help="default 128 (32 with --user-branch)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 30 GPU, 6 CPU)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds before them")
    ap.add_argument("--scan", choices=["auto", "true", "false"], default="auto")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated, each also with '{UNROLLED}' appended; default: all "
                         f"of {','.join(VARIANTS)} (--user-branch: {','.join(USER_VARIANTS)})")
    ap.add_argument("--compile-depths", default="110,1202",
                    help="also time compiling these depths ('' for none)")
    ap.add_argument("--user-branch", action="store_true",
                    help="time a user's stock-Flax wrapped network instead of CifarResNet")
    ap.add_argument("--blocks", type=int, default=8, help="--user-branch: wrapped blocks")
    ap.add_argument("--width", type=int, default=32, help="--user-branch: channels")
    ap.add_argument("--out", default=None, help=bench_cli.OUT_HELP.format("step_<backend>.md"))
    ap.add_argument("--json", default="",
                    help="also write {variant: median seconds} to this new file")
    args = ap.parse_args(argv)
    bench_cli.used_only(ap, args, "with --user-branch", args.user_branch, "blocks", "width")
    bench_cli.used_only(ap, args, "without --user-branch", not args.user_branch, "depth", "scan",
                        "compile_depths")
    defaults = _defaults(args.user_branch)
    for name, value in defaults.items():  # given at its default's value (compare_torch.py
        if getattr(args, name) == value:  # passes --batch): the table's sizes are the default
            setattr(args, name, None)
    args.label = run_label("bench_step.py", argv, size_changes(ap, args, SIZES))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    bench_cli.at_least(args, 1, "batch", "rounds", "blocks", "width")
    bench_cli.at_least(args, 0, "warmup")
    args.compile_depths = [bench_cli.integer(v, "--compile-depths")
                           for v in args.compile_depths.split(",") if v.strip()]
    if not args.user_branch:
        bench_cli.cifar_depth(args.depth)
        for depth in args.compile_depths:
            bench_cli.cifar_depth(depth, "--compile-depths")
    args.out = bench_cli.results_path(args.out, f"step_{jax.default_backend()}.md")
    args.json = bench_cli.new_file(args.json, "--json")
    bench_cli.distinct_outputs(("--out", args.out), ("--json", args.json))
    return args


def _defaults(user_branch: bool) -> dict[str, int]:
    """The sizes ``--batch`` and ``--rounds`` stand for when not given (:data:`SIZES`)."""
    return {"batch": 32 if user_branch else 128,
            "rounds": 30 if jax.default_backend() != "cpu" else 6}


def main(argv=None) -> None:
    """Times the variants' train steps and appends their table (see the module's doc)."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    with bench_cli.jax_cache():  # JAX_COMPILATION_CACHE_DIR, checked as train.py's cache
        return _measure(args)


def _measure(args) -> None:
    """:func:`main`'s work, once its flags are checked."""
    dtype = None if args.dtype == "float32" else jnp.bfloat16
    if args.user_branch:
        return user_branch_main(args, dtype)
    scan = {"auto": None, "true": True, "false": False}[args.scan]
    rounds = args.rounds
    names = (list(VARIANTS) if args.variants is None
             else bench_cli.names_from(args.variants, VARIANTS, "--variants", known_variant,
                                       f", each also with '{UNROLLED}' appended"))

    names = with_a_loop_to_run(names, args, scan)
    x, y, kp = random_batch(args.batch)
    runners = [make_runner(n, args.depth, args.batch, scan, dtype, kp, x, y) for n in names]
    probs = CifarResNet(depth=args.depth).survival_probs()
    first, all_gates = round_gates(args.depth, args.warmup + rounds)
    compile_all(runners, first, all_gates)
    time_rounds(runners, all_gates, args.warmup)
    timed = all_gates[args.warmup:args.warmup + len(runners[0].times)]  # interrupted: fewer
    active = [float(np.asarray(g).mean()) for g in timed]
    rows = table_rows(runners, args.batch)
    compile_rows = []
    # A signal here: the table without the other depths (none after cut-short rounds).
    for d in bench_cli.after_rounds(args.compile_depths, "compile depths"):
        s = compile_seconds(d, args.batch, scan, dtype)
        compile_rows.append((d, s))
        print(f"compile depth {d}: {s:.1f}s", flush=True)

    lines = [
        f"## Train step, CifarResNet-{args.depth}, batch {args.batch}, {args.dtype}, "
        f"scan={args.scan}",
        "",
        f"{machine_line()}; {rounds} interleaved rounds after {args.warmup} warm-up; compile "
        f"excluded; XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(none)'}.",
        "",
        args.label,
        "",
        "| variant | median ms/step | IQR ms | img/s | / constant depth | per round |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Gates are drawn per round from fold_in(key, round) and shared by every stochastic "
        f"variant; mean fraction of blocks kept over the timed rounds: "
        f"{np.mean(active):.3f} (expected {probs.mean():.3f}). Every row, '-unrolled' ones "
        f"included, is divided by the first row if that is constant depth ('-': it is not): "
        f"'/ constant depth' divides the medians, 'per round' is the median of each round's "
        f"ratio (the two variants timed back to back), which drift between rounds does not "
        f"move.",
    ]
    if compile_rows:
        lines += ["", "| compile (jit of grad), depth | seconds |", "|---|---|"]
        lines += [f"| {d} | {s:.1f} |" for d, s in compile_rows]
        if len(compile_rows) == 2:
            lines.append(f"\nCompile-time ratio {compile_rows[1][0]}/{compile_rows[0][0]}: "
                         f"{compile_rows[1][1] / compile_rows[0][1]:.2f}")
    bench_cli.append_table("\n".join(lines) + "\n", args.out,
                           medians=medians(args.json, runners, args.batch, args.dtype,
                                           depth=args.depth, scan=args.scan, rounds=rounds,
                                           auto_variant=auto_variant(args.depth, scan),
                                           label=args.label))


if __name__ == "__main__":
    bench_cli.run(main)
