"""Compact mode's scan lengths: the kept-count distribution and the least-padding lengths."""
import itertools
import re

import jax
import numpy as np
import pytest

import stochastic_depth_jax as sdj
from stochastic_depth_jax import buckets


def test_kept_count_pmf_is_exact():
    probs = [0.9, 0.5, 0.3, 0.75]
    want = np.zeros(5)
    for kept in itertools.product([0, 1], repeat=4):  # every outcome, by enumeration
        want[sum(kept)] += np.prod([p if k else 1 - p for p, k in zip(probs, kept)])
    np.testing.assert_allclose(buckets.kept_count_pmf(probs), want, atol=1e-12)


# Late blocks of a deep schedule, and rates low enough that no block is often kept (k = 0
# pads up to the shortest length too).
@pytest.mark.parametrize("probs", [np.linspace(0.95, 0.55, 7), np.full(7, 0.1)])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_optimal_lengths_beat_every_other_choice(count, probs):
    pmf = buckets.kept_count_pmf(probs)
    got = buckets.optimal_lengths(probs, count)
    assert got[-1] == 7 and got[0] >= 1 and len(got) <= count and list(got) == sorted(set(got))
    best = min(buckets.expected_padding(pmf, (*rest, 7))
               for rest in itertools.combinations(range(1, 7), count - 1))
    assert buckets.expected_padding(pmf, got) == pytest.approx(best, abs=1e-12)


def test_enough_lengths_pad_nothing_and_never_more_lengths_than_needed():
    probs = np.full(5, 0.6)
    got = buckets.optimal_lengths(probs, 10)
    assert got == (1, 2, 3, 4, 5)  # k = 0 rounds up to 1: a scan is never empty
    assert buckets.optimal_lengths([1.0, 1.0, 1.0], 3) == (3,)  # always 3 kept: one length


def test_round_up_and_bad_input():
    assert [buckets.round_up(k, (2, 5, 9)) for k in (0, 2, 3, 9)] == [2, 2, 5, 9]
    with pytest.raises(ValueError, match="exceed the longest"):
        buckets.round_up(10, (2, 5, 9))
    with pytest.raises(ValueError, match="count must be >= 1"):
        buckets.optimal_lengths([0.5], 0)


def test_resnet110_three_fitted_lengths_pad_less_than_multiple_four():
    """Under the paper's schedule 3 fitted lengths pad less than a multiple of 4 (the GPU
    default), with at most 3^3 = 27 programs (exact, stage by stage)."""
    model = sdj.CifarResNet(depth=110)
    probs, lengths = model.survival_probs(), model.compact_lengths(3)
    fitted = multiple = 0.0
    for i, start in enumerate((0, 18, 36)):
        pmf = buckets.kept_count_pmf(probs[start + 1:start + 18])
        assert len(lengths[i]) <= 3
        fitted += buckets.expected_padding(pmf, lengths[i])
        multiple += buckets.expected_padding(pmf, (4, 8, 12, 16, 17))
    assert fitted < 0.75 * multiple


def test_granularity_script_counts_programs_and_padding(tmp_path):
    """benchmarks/compact_buckets.py on a small run: its table is consistent with itself."""
    from bench_scripts import load

    script = load("compact_buckets")
    out = tmp_path / "table.md"
    script.main(["--depth", "56", "--epochs", "3", "--steps-per-epoch", "40", "--multiples",
                 "1,4", "--lengths", "2", "--out", str(out)])
    rows = [line.split(" | ") for line in out.read_text().splitlines()
            if line.startswith("| multiple") or line.startswith("| lengths")]
    assert len(rows) == 3
    for row in rows:
        computed, padding = float(row[1]), float(row[2])
        programs = [int(p.strip(" |")) for p in row[3:]]
        assert 0 < computed <= 1 and padding >= 0 and programs == sorted(programs)
    assert float(rows[0][2]) == 0.0  # multiple 1 pads nothing
    assert int(rows[2][-1].strip(" |")) <= 2 ** 3  # 2 lengths in each of 3 stages
    assert float(rows[2][2]) < float(rows[1][2])  # fitted lengths pad less than multiple 4


def test_lengths_and_buckets_from_another_model_fail_clearly():
    model = sdj.CifarResNet(depth=110)
    gates = np.ones(54, bool)
    for bad, message in (((1, 5),) * 3, r"lengths\[0\]=\(1, 5\) but stage 1 needs sorted"), \
                        (((17,),) * 2, "lengths has 2 entries for 3 stages"), \
                        (((),) * 3, r"lengths\[0\]=\(\) but stage 1"), \
                        (((16.5, 17),) * 3, r"^lengths\[0\]=\(16.5, 17\) must be integer scan "
                                            r"lengths; compute them with model.compact_lengths"):
        with pytest.raises(ValueError, match=message):
            model.compact_buckets(gates, lengths=bad)
    with pytest.raises(ValueError, match="multiple must be an integer >= 1, got 0"):
        model.compact_buckets(gates, multiple=0)
    # Per-example gates [L, batch] or another model's: buckets summed over the wrong axis.
    for bad in (np.ones((54, 8), bool), np.ones(12, bool)):
        with pytest.raises(ValueError, match=r"gates must be one per block, shape \(54,\) "
                           r".*got shape " + re.escape(str(bad.shape))):
            model.compact_buckets(bad)
    tiny = sdj.CifarResNet(depth=26, width=4, num_classes=3, scan=True)  # 3 scanned per stage
    x = np.zeros((2, 8, 8, 3), np.float32)
    variables = tiny.init({"params": jax.random.key(0)}, x, train=False)
    # A float was read by int(): (2.9, 3, 3) ran a scan of 2 where the gates keep 3.
    for bad, message in (((5, 1, 1), r"buckets\[0\]=5 but stage 1 needs 1..3"),
                         ((1, 1), "buckets has 2 entries for 3 stages"),
                         ((2.9, 3, 3), r"^buckets must be integer scan lengths, got "
                                       r"\(2.9, 3, 3\); compute them with "),
                         ((True, 1, 1), r"^buckets must be integer scan lengths")):
        with pytest.raises(ValueError, match=message):
            tiny.apply(variables, x, train=True, gates=np.ones(12, bool), buckets=bad,
                       mutable=["batch_stats"])


def test_buckets_too_short_for_host_gates_fail_clearly():
    """Buckets of other gates, shorter than a stage's kept count: the scan ran only the first
    kept blocks and dropped the others, silently (another network's output)."""
    tiny = sdj.CifarResNet(depth=26, width=4, num_classes=3, scan=True)  # 3 scanned per stage
    x = np.zeros((2, 8, 8, 3), np.float32)
    variables = tiny.init({"params": jax.random.key(0)}, x, train=False)
    gates = np.ones(12, bool)
    with pytest.raises(ValueError, match=r"^buckets\[0\]=1 but the gates keep 3 of stage 1's "
                       r"scanned blocks .*model.compact_buckets\(gates, ...\)."):
        tiny.apply(variables, x, train=True, gates=gates, buckets=(1, 3, 3),
                   mutable=["batch_stats"])
    gates[1:4] = False  # a first block's gate does not count: it runs outside the scan
    tiny.apply(variables, x, train=True, gates=gates, buckets=(1, 3, 3), mutable=["batch_stats"])


def test_fitted_lengths_for_the_other_resnets():
    """Only scanned stages (>= 8 identical blocks by default) get lengths."""
    assert sdj.ResNet152().compact_lengths(3) == ((), (), (24, 28, 35), ())
    assert sdj.WideResNet(depth=28).compact_lengths(3) == ((), (), ())  # 4 blocks a stage
    wide = sdj.WideResNet(depth=28, scan=True).compact_lengths(2)
    assert all(len(ls) <= 2 and ls[-1] == 3 for ls in wide)


def test_expected_blocks_is_the_mean_of_the_blocks_stage_buckets_runs():
    """Each stage's first block, an unscanned stage's blocks and every scan slot compute:
    the mean over every gate draw, by enumeration, of what ``stage_buckets`` gives."""
    probs = np.array([0.95, 0.9, 0.8, 0.7, 0.9, 0.6, 0.5, 0.4, 0.55, 0.3])
    sizes, scanned = (4, 2, 4), (True, False, True)
    lengths = ((1, 3), (), (2, 3))
    for multiple, lens in ((1, None), (2, None), (4, None), (1, lengths), (0, None)):
        want = 0.0
        for gates in itertools.product([False, True], repeat=len(probs)):
            weight = np.prod([p if g else 1 - p for p, g in zip(probs, gates)])
            if multiple:
                scans = buckets.stage_buckets(np.array(gates), sizes, scanned, multiple, lens)
            else:  # the loop: the kept count itself
                scans = [sum(gates[1:4]), 0, sum(gates[7:10])]
            want += weight * (sum(scans) + 1 + 2 + 1)  # two first blocks, an unscanned stage
        got = buckets.expected_blocks(probs, sizes, scanned, multiple, lens)
        assert got == pytest.approx(want, rel=1e-12)


def test_buckets_too_short_for_traced_gates_fail_when_run():
    """Under jit the gates are traced and the buckets cannot be checked before tracing: a
    stage keeping more blocks than its bucket ran the first ones only and returned another
    network's output and gradients, silently. Now the run fails, naming the fix; buckets
    that hold the kept blocks give the same output and gradients as before."""
    tiny = sdj.CifarResNet(depth=26, width=4, num_classes=3, scan=True)  # 3 scanned per stage
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    variables = tiny.init({"params": jax.random.key(0)}, x, train=False)

    def loss(params, gates, bucket):
        out, _ = tiny.apply({**variables, "params": params}, x, train=True, gates=gates,
                            buckets=bucket, mutable=["batch_stats"])
        return (out ** 2).sum()

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=2)
    gates = np.ones(12, bool)
    gates[[5, 6]] = False  # stage 2 keeps 1 of its 3 scanned blocks
    full = grad(variables["params"], gates, (3, 3, 3))
    fits = grad(variables["params"], gates, (3, 1, 3))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 fits, full)
    with pytest.raises(Exception, match=r"Compact mode: stage1_scan keeps 3 blocks but its "
                       r"bucket scans only 2: .*model.compact_buckets\(gates\) on the host"):
        jax.block_until_ready(grad(variables["params"], gates, (2, 1, 3)))
    # The trainer computes its buckets from the gates it passes: its step has no
    # conditional (compact mode's point: one splits CUDA graphs on GPU).
    def program(fitted):  # a function of its own each: JAX keeps a function's first trace
        def step(params, gates):
            if not fitted:
                return loss(params, gates, (3, 1, 3))
            with sdj.models.buckets_fitted():
                return loss(params, gates, (3, 1, 3))
        return str(jax.make_jaxpr(step)(variables["params"], gates))

    traced, fitted = program(False), program(True)
    assert "cond[" in traced and "cond[" not in fitted


def test_stage_buckets_round_up_within_the_scanned_blocks_and_never_to_zero():
    """A stage of n blocks scans at most its n - 1 after the first, and at least one slot
    (a scan of length 0 is not a program); ``check_buckets`` holds them to the same range."""
    sizes, scanned = (5, 5), (True, True)
    gates = np.array([True] * 5 + [True] + [False] * 4)  # stage 2 keeps only its first block
    assert buckets.stage_buckets(gates, sizes, scanned, multiple=3) == (4, 1)
    assert buckets.check_buckets((4, 1), sizes, scanned, gates) == (4, 1)
    for bad in ((5, 1), (4, 0)):
        with pytest.raises(ValueError, match=r"needs 1..4"):
            buckets.check_buckets(bad, sizes, scanned)


def test_buckets_fitting_vmapped_gates_run_and_too_short_ones_fail():
    """Under vmap over the gates the check's conditional became a select running both
    branches: the callback refused every call, buckets that hold every draw's kept blocks
    too. Now those run (each draw's output as its own call's) and only a draw keeping more
    than its bucket fails."""
    tiny = sdj.CifarResNet(depth=26, width=4, num_classes=3, scan=True)  # 3 scanned per stage
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    variables = tiny.init({"params": jax.random.key(0)}, x, train=False)

    def out(gates, bucket):
        return tiny.apply(variables, x, train=True, gates=gates, buckets=bucket,
                          mutable=["batch_stats"])[0]

    draws = np.ones((2, 12), bool)
    draws[0, [5, 6]] = False  # stage 2 keeps 1 of its 3 scanned blocks in the first draw
    fits = jax.jit(jax.vmap(lambda g: out(g, (3, 3, 3))))(draws)
    for draw, got in zip(draws, fits):
        np.testing.assert_allclose(got, jax.jit(out, static_argnums=1)(draw, (3, 3, 3)),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match=r"Compact mode: stage2_scan keeps 3 blocks but its "
                       r"bucket scans only 1: "):
        jax.block_until_ready(jax.jit(jax.vmap(lambda g: out(g, (3, 1, 3))))(draws))
