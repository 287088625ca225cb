"""benchmarks/profile_step.py: its timeline arithmetic and a tiny profiled run on the CPU."""

import re

import pytest

from bench_scripts import load


@pytest.fixture(scope="module")
def script():
    return load("profile_step")


def test_union_counts_overlaps_once(script):
    events = [("a", 0, 10), ("b", 5, 15), ("c", 20, 30), ("d", 22, 25), ("e", 30, 31)]
    assert script.union_ns(events) == 15 + 11
    assert script.union_ns([]) == 0


def test_gpu_stream_lines_are_the_timeline(script):
    planes = [
        ("/host:CPU", [("python", [("step", 0, 100)]),
                       ("tf_XLAPjRtCpuClient/1", [("fusion", 0, 5)])]),
        ("/device:GPU:0", [("Stream #7(Compute)", [("conv", 0, 4000), ("bn", 4000, 1000)]),
                           ("Stream #8(MemcpyH2D)", [("copy", 2000, 500)]),
                           ("XLA Ops", [("conv", 0, 4000), ("bn", 4000, 1000)])]),
    ]
    source, events = script.device_events(planes)
    assert source == "/device:GPU:0"
    assert sorted(e[0] for e in events) == ["bn", "conv", "copy"]  # XLA Ops not counted twice
    s = script.summarise(events, steps=1, wall_s=10e-6)
    assert s["busy_ms"] == pytest.approx(5e-3) and s["busy_fraction"] == pytest.approx(0.5)
    assert s["kernels"] == 3 and s["under_5us"] == pytest.approx(1.0)
    assert s["top"][0] == ("conv", 4000)


def test_cpu_falls_back_to_xla_threads_without_scheduling_events(script):
    planes = [("/host:CPU", [
        ("python", [("step", 0, 100)]),
        ("tf_XLAEigen/2", [("ThreadpoolListener::StartRegion", 0, 0), ("ynn_fusion", 1, 9)]),
        ("tf_XLAPjRtCpuClient/1", [("ThunkExecutor::Execute", 0, 50), ("cond.3", 10, 20)]),
    ])]
    source, events = script.device_events(planes)
    assert source.startswith("/host:CPU")
    assert sorted(e[0] for e in events) == ["cond.3", "ynn_fusion"]


def test_tiny_profile_end_to_end(script, tmp_path):
    out = tmp_path / "profile.md"
    script.main(["--depth", "8", "--batch", "4", "--steps", "2", "--variants", "constant,skip",
                 "--by-source", "--out", str(out)])
    assert "profile_step.py --depth 8 --batch 4 --steps 2" in out.read_text()
    rows = [line.split(" | ") for line in out.read_text().splitlines()
            if line.startswith("| constant") or line.startswith("| skip")]
    assert len(rows) == 2
    for row in rows:
        wall, busy, fraction, kernels = (float(v) for v in row[1:5])
        assert 0 < busy <= wall and 0 < fraction <= 1 and kernels >= 1
    for variant in ("constant", "skip"):  # the pool threads' whole time is attributed
        section = out.read_text().split(f"Thread time by source, {variant} ")[1].split("\n\n")[1]
        shares = {line.split(" ", 2)[2].split(" (")[0]: float(line.split()[1].rstrip("%"))
                  for line in section.splitlines()}
        # each share printed to 0.1%: their sum is off by up to 0.05 points for each
        assert sum(shares.values()) == pytest.approx(100, abs=0.05 * len(shares) + 1e-9)
        assert {"convolutions", script.IDLE.split(" (")[0]} <= set(shares)
        # XLA's Eigen convolutions run as unnamed pool tasks: found, and counted as theirs
        assert re.search(r"% convolutions \(\d+% of it untraced pool tasks\)", section)


HLO = """\
%region_0.1 (a: f32[4]) -> f32[4,8] {
  ROOT %broadcast.3 = f32[4,8]{1,0} broadcast(f32[] %c), dimensions={}
}

ENTRY %main.9 (p: f32[4,8]) -> f32[3,4,2,2,8] {
  %wrapped_broadcast.5 = f32[3,4,2,2,8]{4,3,2,1,0} fusion(%c), kind=kLoop
  %wrapped_broadcast.6 = f32[3,4,32]{2,1,0} fusion(%c), kind=kLoop, metadata={op_name="jit(step)/jvp(CifarResNet)/stages/stages._scan_stage/broadcast_in_dim"}
  %ynn_fusion.2 = f32[4,2,2,8]{3,2,1,0} fusion(%p), metadata={op_name="jit(step)/branch/conv1/conv_general_dilated"}
  %fusion.7 = f32[8]{0} fusion(%p), metadata={op_name="jit(step)/branch/bn1/reduce_sum"}
  %wrapped_reduce-window.3 = f32[2,1,1,8]{3,2,1,0} fusion(%p, %c), kind=kLoop
  %fusion.8 = (f32[8]{0}, f32[8]{0}) fusion(%wrapped_reduce-window.3), metadata={op_name="jit(step)/branch/bn2/reduce_sum"}
  %cond.4 = f32[4,8]{1,0} conditional(%g, %p, %p), branch_computations={%region_0.1, %region_1.2}
}
"""


def test_ops_are_attributed_by_their_hlo_instruction(script):
    ops = script.hlo_ops(HLO)
    assert ops["broadcast.3"] == ("f32[4,8]", "", True)  # in the skipped branch
    # XLA's first stage of a split reduction has no metadata: its user's names it
    assert ops["wrapped_reduce-window.3"][1] == "jit(step)/branch/bn2/reduce_sum"
    # a stack of kept convolution outputs with merged axes (layers._tag) is one as well
    events = [("cond.4", 0, 100), ("broadcast.3", 0, 7), ("wrapped_broadcast.5", 10, 15),
              ("wrapped_broadcast.6", 15, 21),
              ("ynn_fusion.2", 20, 40), ("fusion.7", 40, 43), ("copy.1", 50, 51),
              ("wrapped_reduce-window.3", 60, 64), ("fusion.8", 64, 65)]
    assert script.by_source(events, ops) == {
        "skipped blocks' zero-fill": 7, "scan stacked residuals: zero-init": 5 + 6,
        "convolutions": 20, "BatchNorm reductions": 3 + 4 + 1, "other copies": 1}


def test_untraced_pool_tasks_go_to_the_ops_in_flight(script):
    """An asynchronous convolution's thunk returns at once and its work runs as unnamed pool
    tasks until its ``end:`` marker: that time is the convolution's (shared with any other
    op in flight), and the split covers pool threads x wall."""
    r0, r1 = script._REGION
    planes = [("/host:CPU", [
        ("tf_XLAPjRtCpuClient/3", [("ThunkExecutor::Execute (wait for completion)", 0, 50)]),
        ("tf_XLAEigen/1", [(r0, 0, 0), ("ThunkExecutor::Execute", 0, 40),
                           ("ynn_fusion.2", 0, 2),  # the convolution's thunk: launch only
                           ("fusion.7", 20, 10), ("end: fusion.7", 29, 0), (r1, 40, 0)]),
        ("tf_XLAEigen/2", [(r0, 2, 0), (r1, 18, 0),  # only the convolution in flight
                           (r0, 20, 0), (r1, 30, 0),  # the convolution and fusion.7
                           ("end: ynn_fusion.2", 35, 0),
                           (r0, 36, 0), (r1, 38, 0)]),  # nothing in flight
    ])]
    ops = script.hlo_ops(HLO)
    totals, untraced = script.thread_time(planes, ops, wall_ns=50)
    assert untraced == {"convolutions": 16 + 5, "BatchNorm reductions": 5, script.UNOWNED: 2}
    assert totals == {"convolutions": 2 + 16 + 5, "BatchNorm reductions": 10 + 5,
                      script.UNOWNED: 2, script.RUNTIME: 40 - 2 - 10,
                      script.IDLE: 2 * 50 - 23 - 15 - 2 - 28}
    assert script.pool_threads(planes) == 2


def test_source_split_of_a_fully_busy_pool(script):
    """A pool thread busy with named ops the whole wall: no idle and no runtime time (0 ns
    labels), which the report lists at 0% instead of dividing by them; a trace without XLA
    thread events: one line, not a division by zero."""
    r0, r1 = script._REGION
    planes = [("/host:CPU", [("tf_XLAEigen/1", [(r0, 0, 0), ("fusion.7", 0, 50), (r1, 50, 0)])])]
    totals, untraced = script.thread_time(planes, script.hlo_ops(HLO), wall_ns=50)
    assert totals == {"BatchNorm reductions": 50, script.RUNTIME: 0, script.IDLE: 0}
    s = {"sources": totals, "untraced": untraced, "pool_threads": 1, "wall_ms": 50e-6}
    assert script.source_lines("constant", s, steps=1)[2:] == [
        "- 100.0% BatchNorm reductions", f"- 0.0% {script.RUNTIME}", f"- 0.0% {script.IDLE}"]
    totals, untraced = script.thread_time([("/host:CPU", [])], {}, wall_ns=50)  # no events
    s.update(sources=totals, untraced=untraced, pool_threads=0)
    assert script.source_lines("constant", s, steps=1) == [
        "Thread time by source, constant: the trace holds no XLA thread-pool events."]

def test_tiny_drop_path_profile(script, tmp_path):
    out = tmp_path / "profile.md"
    script.main(["--drop-path", "0.5", "--batch", "4", "--steps", "1", "--out", str(out)])
    text = out.read_text()
    assert "ViT-Ti" in text
    names = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ")
             and not line.startswith(("| variant", "|---"))]
    assert names == ["| none", "| uniform 0.5 skip", "| uniform 0.5 mask"]


def test_rejects_unknown_variants_and_zero_steps(script):
    flag_error = load("bench_cli").FlagError
    with pytest.raises(flag_error, match="--variants: unknown nonsense"):
        script.main(["--variants", "nonsense"])
    with pytest.raises(flag_error, match="--steps 0: must be at least 1"):
        script.main(["--steps", "0"])
    with pytest.raises(flag_error, match="a drop rate in"):
        script.main(["--drop-path", "1.5"])
    with pytest.raises(flag_error, match="--by-source splits the CPU's ResNet profile only"):
        script.main(["--drop-path", "0.5", "--by-source"])
