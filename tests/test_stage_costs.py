"""benchmarks/stage_costs.py: its cost model's arithmetic and a tiny end-to-end run."""

import importlib.util
import os
import sys

import numpy as np
import pytest

import stochastic_depth_jax as sdj

HERE = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, HERE)
    try:
        spec = importlib.util.spec_from_file_location("stage_costs",
                                                      os.path.join(HERE, "stage_costs.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(HERE)
    return module


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


def synthetic_times(script, model, per_block, fixed, overhead):
    """Median times a perfectly linear machine would measure, plus known overheads."""
    sizes = np.asarray(model.stage_sizes_(), float)
    full = fixed + per_block @ sizes
    times = {"full": full, "no-blocks": fixed}
    for s in range(3):
        times[f"no-stage-{s + 1}"] = full - per_block[s] * sizes[s]
    probs = model.survival_probs()
    rng = np.random.default_rng(1)
    gates = [rng.random(len(probs)) < probs for _ in range(20)]
    for name, extra in overhead.items():
        ran = np.mean([script.blocks_run(name, model, g) for g in gates], 0)
        times[name] = fixed + per_block @ ran + extra
    return times, gates


def test_analysis_recovers_stage_costs_floor_and_overheads(script):
    model = sdj.CifarResNet(depth=110)
    per_block = np.array([0.4, 0.2, 0.1])  # ms: the first stage 4x the last
    overhead = {"skip": 0.7, "compact": 0.3, "lengths-3": 0.2}
    times, gates = synthetic_times(script, model, per_block, 3.0, overhead)
    a = script.analyse(times, model, list(overhead), gates)
    np.testing.assert_allclose(a["per_block"], per_block)
    assert a["additive_fixed"] == pytest.approx(3.0)
    probs = model.survival_probs()
    saved = sum(per_block[s] * (18 - probs[18 * s:18 * (s + 1)].sum()) for s in range(3))
    assert a["floor"] == pytest.approx(times["full"] - saved)
    # Costly early blocks are rarely dropped: the real floor is above the block count's.
    assert a["floor"] / a["full"] > a["equal_cost_floor"] / a["full"] + 0.03
    for row in a["rows"]:
        assert row["measured"] - row["predicted"] == pytest.approx(overhead[row["variant"]])
        assert row["expected"] >= a["floor"] - 1e-9
    text = script.report(a, type("A", (), {"depth": 110, "batch": 128, "dtype": "float32",
                                          "warmup": 2})(), 20, 0.75)
    assert "| compact |" in text and f"**{a['floor'] / a['full']:.3f}**" in text


def test_equal_block_costs_give_the_block_count_floor(script):
    model = sdj.CifarResNet(depth=110)
    times, gates = synthetic_times(script, model, np.array([0.2, 0.2, 0.2]), 1.0, {})
    a = script.analyse(times, model, [], gates)
    assert a["floor"] == pytest.approx(a["equal_cost_floor"])


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
        with pytest.raises(SystemExit, match="not skipping variants"):
            script.main(["--variants", bad])
