"""Input-pipeline benchmark (run by hand): load + place CIFAR-sized data, ms per batch.

    python benchmarks/bench_data.py [--steps 200] [--out benchmarks/results/data.md]

Measures (1) placing 50,000 x 32x32x3 uint8 random arrays on the device, (2)
preparing and reading a fake tfds 'cifar10' of the same size (array_record, PNG,
written to a temporary data_dir), (3) the per-step cost of `train_batch` for
batch 128 (gather + normalise + flip/translate), median over many steps with
compilation excluded, called once per batch (dispatch and the step's transfer included)
and, as the train step pays it, --steps batches inside one jitted loop, with what that
cost is made of (the epoch order alone; + gather and normalisation; + augmentation) and
images per second, and (4) an evaluation batch.

Prints a table and appends it, with machine, versions, date, code and command line, to
``benchmarks/results/data.md`` (``--out``: elsewhere); a run at other sizes than the
defaults says so in its table.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cli  # noqa: E402  (next to this file; first: Ctrl-C in JAX's import)

import jax
import jax.numpy as jnp
import numpy as np

from stochastic_depth_jax import data
from stochastic_depth_jax.data import order

from provenance import cpu_name, run_label, size_changes  # noqa: E402

SIZES = ("steps", "tfds_train")


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - start


def _step_times(fn, steps):
    """Per-call seconds of fn(step) for steps 1..steps (step 0 compiles, untimed)."""
    jax.block_until_ready(fn(0))
    times = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        jax.block_until_ready(fn(step))
        times.append(time.perf_counter() - start)
    return np.asarray(times)


def bench_placement(mesh):
    rng = np.random.default_rng(0)
    split = data.Split(rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8),
                       rng.integers(0, 10, 50000).astype(np.int32))
    dev, seconds = _timed(lambda: data.put_on_devices(split, mesh))
    return split, dev, seconds


def bench_tfds(num_train):
    with tempfile.TemporaryDirectory() as data_dir:
        _, prepare = _timed(lambda: data.testing.make_tfds_dataset(
            "cifar10", data_dir, num_train=num_train, num_test=10000))
        ds, load = _timed(lambda: data.load_dataset("cifar10", data_dir=data_dir))
    return prepare, load, ds


def bench_steps(dev, steps, augment, mean, std):
    batch = jax.jit(functools.partial(data.train_batch, batch_size=128, mean=mean, std=std,
                                      augment=augment))
    key = jax.random.key(0)
    return _step_times(lambda s: batch(dev, key, jnp.int32(s)), steps)


def in_one_jit(dev, steps, augment, mean, std, order_only=False):
    """Seconds per batch of `train_batch` (or, with ``order_only``, of its example order
    alone) over ``steps`` batches in one jitted scan, as the train step runs it: no
    dispatch or transfer per batch. Each batch is added into the carry, so none of it is
    optimised away. Median of 5 rounds, compilation excluded."""
    spe = data.steps_per_epoch(len(dev), 128)

    def one(step):
        if order_only:
            positions = (step % spe) * 128 + jnp.arange(128)
            return order.permute(jax.random.fold_in(key, step // spe), positions, len(dev))
        return data.train_batch(dev, key, step, batch_size=128, mean=mean, std=std,
                                augment=augment)

    @jax.jit
    def run(start):
        def body(carry, step):
            return jax.tree.map(jnp.add, carry, one(step)), None
        init = jax.tree.map(jnp.zeros_like, jax.eval_shape(one, jnp.int32(0)))
        return jax.lax.scan(body, init, start + jnp.arange(steps, dtype=jnp.int32))[0]

    key = jax.random.key(0)
    jax.block_until_ready(run(0))
    return float(np.median([_timed(lambda: run(r * steps))[1] for r in range(1, 6)])) / steps


def _per_batch(seconds):
    return f"{seconds * 1e3:.3f} ms ({128 / seconds:,.0f} img/s)"


def bench_eval(dev, mean, std):
    batches = data.eval_batches(dev, batch_size=500, mean=mean, std=std)
    _, seconds = _timed(lambda: [b[0] for b in batches])
    return seconds


def parse_args(argv) -> argparse.Namespace:
    """The flags, checked before anything is measured; ``args.out``: where the table goes,
    ``args.label``: its provenance line."""
    parser = bench_cli.argument_parser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed train_batch calls")
    parser.add_argument("--tfds-train", type=int, default=50000,
                        help="size of the fake tfds cifar10 train split (0 to skip)")
    parser.add_argument("--out", default=None, help=bench_cli.OUT_HELP.format("data.md"))
    args = parser.parse_args(argv)
    args.label = run_label("bench_data.py", argv, size_changes(parser, args, SIZES))
    bench_cli.at_least(args, 1, "steps")
    bench_cli.at_least(args, 0, "tfds_train")
    args.out = bench_cli.results_path(args.out, "data.md")
    return args


def main(argv=None):
    """Times placing, loading and batching CIFAR-sized data; appends the table."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    with bench_cli.jax_cache():  # JAX_COMPILATION_CACHE_DIR, checked as train.py's cache
        return _measure(args)


def _measure(args):
    """:func:`main`'s work, once its flags are checked."""
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    split, dev, place_s = bench_placement(mesh)
    mean, std = data.splits.channel_stats(split)
    rows = [("put_on_devices, 50k x 32x32x3 uint8 (147 MB)", f"{place_s * 1e3:.1f} ms")]
    if args.tfds_train:
        prepare_s, load_s, _ = bench_tfds(args.tfds_train)
        rows += [(f"make fake tfds cifar10 ({args.tfds_train} + 10000, PNG, array_record)",
                  f"{prepare_s:.1f} s"),
                 ("load_dataset('cifar10') from that data_dir (decode + split + stats)",
                  f"{load_s:.1f} s")]
    for augment in ("flip_translate", "none"):
        times = bench_steps(dev, args.steps, augment, mean, std) * 1e3
        rows.append((f"train_batch, batch 128, augment={augment} (median [p10, p90] "
                     f"of {args.steps})",
                     f"{np.median(times):.3f} ms [{np.percentile(times, 10):.3f}, "
                     f"{np.percentile(times, 90):.3f}]"))
    order_s = in_one_jit(dev, args.steps, "none", mean, std, order_only=True)
    plain_s = in_one_jit(dev, args.steps, "none", mean, std)
    full_s = in_one_jit(dev, args.steps, "flip_translate", mean, std)
    rows += [(f"in one jit ({args.steps} batches of 128 per call, median of 5): "
              f"augment=flip_translate", _per_batch(full_s)),
             ("... of which the epoch order (keyed permutation at 128 positions)",
              f"{order_s * 1e3:.3f} ms"),
             ("... of which gather + normalise (augment=none minus the order)",
              f"{(plain_s - order_s) * 1e3:.3f} ms"),
             ("... of which flip + translate (flip_translate minus none)",
              f"{(full_s - plain_s) * 1e3:.3f} ms")]
    eval_s = bench_eval(dev, mean, std)
    rows.append(("eval_batches over 50k, batch 500 (incl. compile)", f"{eval_s:.2f} s"))
    _report(rows, args.out, args.label)


def _report(rows, out, label):
    """Appends the table of ``rows`` to ``out`` (the file's title first, if it is new;
    None: prints it only)."""
    header = (f"Machine: {cpu_name()}, {os.cpu_count()} cores, "
              f"{jax.device_count()} x {jax.devices()[0].device_kind} "
              f"({jax.default_backend()}); Python {platform.python_version()}, "
              f"jax {jax.__version__}, numpy {np.__version__}.")
    markdown = ["## Input pipeline", "", header, "", label, "",
                "| measurement | result |", "|---|---|"]
    markdown += [f"| {name} | {value} |" for name, value in rows]
    bench_cli.append_table("\n".join(markdown) + "\n", out,
                           title="# Input pipeline benchmark (`benchmarks/bench_data.py`)")


if __name__ == "__main__":
    bench_cli.run(main)
