"""benchmarks/stage_costs.py: its cost model's arithmetic and a tiny end-to-end run."""

import numpy as np
import pytest

import stochastic_depth_jax as sdj
from bench_scripts import load


@pytest.fixture(scope="module")
def script():
    return load("stage_costs")


@pytest.mark.parametrize("depth", [110, 20])  # 20: stages too short to scan
@pytest.mark.parametrize("variant", ["skip", "compact", "lengths-3", "mask"])
def test_expected_blocks_run_is_the_mean_over_drawn_gates(script, depth, variant):
    model = sdj.CifarResNet(depth=depth)
    probs = model.survival_probs()
    rng = np.random.default_rng(0)
    draws = rng.random((4000, len(probs))) < probs
    mean = np.mean([script.blocks_run(variant, model, g) for g in draws], 0)
    expected = script.expected_blocks_run(variant, model)
    # 4000 draws: the per-stage count's standard error is below 0.03 blocks.
    np.testing.assert_allclose(mean, expected, atol=0.1)
    n = model.blocks_per_stage()
    assert np.all(expected <= n) and np.all(expected > 0)
    if variant == "skip":
        assert expected.sum() == pytest.approx(probs.sum())


def test_compact_runs_first_blocks_and_whole_buckets(script):
    model = sdj.CifarResNet(depth=110)
    gates = np.ones(54, bool)
    gates[[0, 20, 21, 40, 41, 42, 43, 44]] = False  # stage 1: first off; 2: 2 off; 3: 5 off
    np.testing.assert_array_equal(script.blocks_run("skip", model, gates), [17, 16, 13])
    # Compact, multiple 4: first block always (masked), then 17 / 16 / 12 of the rest.
    np.testing.assert_array_equal(script.blocks_run("compact", model, gates), [18, 17, 13])



@pytest.mark.parametrize("variant", ["compact", "lengths-3"])
def test_compact_runs_every_block_of_a_stage_too_short_to_scan(script, variant):
    """Compact mode masks an unscanned stage's blocks (ResNet-20's stages of 3): all of them
    run, whatever the gates; the cost model counted only the kept ones (lax.cond's)."""
    model = sdj.CifarResNet(depth=20)
    gates = np.array([1, 0, 0, 0, 1, 0, 1, 1, 1], bool)
    np.testing.assert_array_equal(script.blocks_run(variant, model, gates), [3, 3, 3])
    np.testing.assert_array_equal(script.expected_blocks_run(variant, model), [3, 3, 3])

def independent_blocks_run(name, gates):
    """Blocks per stage of ResNet-110 (3 x 18), written out apart from the script's code."""
    g = np.asarray(gates, bool).reshape(3, 18)
    if name == "skip":
        return g.sum(1).astype(float)
    assert name == "compact"  # multiple 4: first block always, rest rounded up, 1..17
    rest = g[:, 1:].sum(1)
    return np.array([1 + max(1, min(17, -(-k // 4) * 4)) for k in rest], float)


def synthetic_times(model, per_block, fixed, overhead, inflate=1.0):
    """What a machine with these per-block costs would measure, plus known overheads.

    ``inflate`` > 1: removing a stage saves that much more than its blocks' share (costs
    that do not add up), for every stage alike.
    """
    sizes = np.asarray(model.stage_sizes_(), float)
    full = fixed + per_block @ sizes
    times = {"full": full, "no-blocks": fixed}
    for s in range(3):
        times[f"no-stage-{s + 1}"] = full - inflate * per_block[s] * sizes[s]
    probs = model.survival_probs()
    rng = np.random.default_rng(1)
    gates = [rng.random(len(probs)) < probs for _ in range(21)]
    rounds = {}
    for name, extra in overhead.items():
        rounds[name] = [fixed + per_block @ independent_blocks_run(name, g) + extra
                        for g in gates]
        times[name] = float(np.median(rounds[name]))
    return times, gates, rounds


@pytest.mark.parametrize("inflate", [1.0, 1.12])
def test_analysis_recovers_stage_costs_floor_and_overheads(script, inflate):
    model = sdj.CifarResNet(depth=110)
    per_block = np.array([0.4, 0.2, 0.1])  # ms: the first stage 4x the last
    overhead = {"skip": 0.7, "compact": 0.3}
    times, gates, rounds = synthetic_times(model, per_block, 3.0, overhead, inflate)
    a = script.analyse(times, model, list(overhead), gates, rounds)
    np.testing.assert_allclose(a["per_block"], per_block)  # normalised: inflation removed
    np.testing.assert_allclose(a["removal"], inflate * per_block * 18)
    probs = model.survival_probs()
    saved = sum(per_block[s] * (18 - probs[18 * s:18 * (s + 1)].sum()) for s in range(3))
    assert a["floor"] == pytest.approx(times["full"] - saved)
    # Costly early blocks are rarely dropped: the real floor is above the block count's.
    assert a["floor"] / a["full"] > a["equal_cost_floor"] / a["full"] + 0.03
    for row in a["rows"]:
        assert row["overhead"] == pytest.approx(overhead[row["variant"]])
        assert row["expected"] >= a["floor"] - 1e-9
    label = load("provenance").run_label("stage_costs.py", ["--rounds", "21"])
    args = type("A", (), {"depth": 110, "batch": 128, "dtype": "float32", "warmup": 2,
                          "label": label})()
    text = script.report(a, args, 21, 0.75)
    assert "| compact |" in text and f"**{a['floor'] / a['full']:.3f}**" in text
    assert "stage_costs.py --rounds 21`" in text
    if inflate > 1:  # 12% of 12.6 ms of blocks is 9.7% of the 15.6 ms step
        assert "+9.7% of the step more than the blocks' time" in text


def test_plot_draws_the_breakdown(script, tmp_path):
    model = sdj.CifarResNet(depth=110)
    times, gates, rounds = synthetic_times(model, np.array([4e-4, 2e-4, 1e-4]), 3e-3,
                                           {"skip": 7e-4, "compact": -1e-4})
    a = script.analyse(times, model, ["skip", "compact"], gates, rounds)
    path = tmp_path / "costs.png"
    script.plot(a, str(path), "synthetic")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_equal_block_costs_give_the_block_count_floor(script):
    model = sdj.CifarResNet(depth=110)
    times, gates, rounds = synthetic_times(model, np.array([0.2, 0.2, 0.2]), 1.0, {})
    a = script.analyse(times, model, [], gates, rounds)
    assert a["floor"] == pytest.approx(a["equal_cost_floor"])
    assert a["floor"] / a["full"] == pytest.approx(
        1 - 0.2 * (54 - model.survival_probs().sum()) / a["full"])


def test_tiny_run_end_to_end(script, tmp_path):
    out = tmp_path / "stage_costs.md"
    script.main(["--depth", "8", "--batch", "4", "--rounds", "1", "--warmup", "1",
                 "--variants", "skip,compact", "--out", str(out)])
    text = out.read_text()
    assert "Floor under the schedule" in text
    assert [line.split(" | ")[0] for line in text.splitlines()
            if line.startswith("| skip") or line.startswith("| compact")] == ["| skip",
                                                                               "| compact"]


def test_rejects_constant_and_unknown_variants(script):
    for bad in ("constant", "nonsense"):
        with pytest.raises(load("bench_cli").FlagError, match=f"unknown {bad}; valid: skip,"):
            script.main(["--variants", bad])


def test_plot_labels_the_overhead_of_any_hatched_bar(script, tmp_path, monkeypatch):
    """The legend's "overhead" was tied to the last variant's bar: where that one had none
    (compact below its prediction), the hatched bar of another had no legend entry."""
    import matplotlib.figure

    model = sdj.CifarResNet(depth=110)
    times, gates, rounds = synthetic_times(model, np.array([4e-4, 2e-4, 1e-4]), 3e-3,
                                           {"skip": 7e-4, "compact": -6e-4})
    a = script.analyse(times, model, ["skip", "compact"], gates, rounds)
    drawn, savefig = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *args, **kw: (drawn.append(fig), savefig(fig, *args, **kw)))
    script.plot(a, str(tmp_path / "costs.png"), "synthetic")
    [fig] = drawn
    hatched = [p for p in fig.axes[0].patches if p.get_hatch()]
    assert len(hatched) == 1  # skip's: compact took less than its blocks' prediction
    assert "overhead" in fig.axes[0].get_legend_handles_labels()[1]


@pytest.mark.parametrize("formats", ["installed", "matplotlib 3.8"])
def test_plot_is_checked_before_measuring_and_never_drawn_over(script, tmp_path, monkeypatch,
                                                               formats):
    """``--plot breakdown`` (no extension): matplotlib wrote breakdown.png, over an earlier
    drawing there, as only 'breakdown' was checked; ``--plot costs.md`` failed with a
    traceback after the rounds, their table lost."""
    if formats != "installed":  # pyproject allows 3.8, which lists no .avif (nor .gif)
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        old = dict.fromkeys("eps jpg jpeg pdf pgf png ps raw rgba svg svgz tif tiff".split())
        monkeypatch.setattr(FigureCanvasAgg, "get_supported_filetypes",
                            classmethod(lambda cls: dict(old)))
    earlier = tmp_path / "breakdown.png"
    earlier.write_bytes(b"an earlier drawing")
    args = script.parse_args(["--plot", str(tmp_path / "breakdown"), "--out", ""])
    assert args.plot == str(tmp_path / "breakdown-1.png")
    assert script.parse_args(["--plot", str(earlier), "--out", ""]).plot == args.plot
    assert earlier.read_bytes() == b"an earlier drawing"
    with pytest.raises(load("bench_cli").FlagError,
                       match=r"costs.md: matplotlib draws no '.md' file; give a name ending "
                             r"in .png \(or \.[a-z]+, .*\.pdf, .*\.svg"):
        script.parse_args(["--plot", str(tmp_path / "costs.md"), "--out", ""])


def test_a_drawing_that_fails_does_not_lose_the_table(script, tmp_path, monkeypatch):
    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(script, "plot", full_disk)
    out = tmp_path / "stage_costs.md"
    with pytest.raises(OSError):
        script.main(["--depth", "8", "--batch", "4", "--rounds", "1", "--warmup", "1",
                     "--variants", "skip", "--out", str(out), "--plot",
                     str(tmp_path / "costs.png")])
    assert "Floor under the schedule" in out.read_text()
