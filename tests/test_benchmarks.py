"""The benchmarks the GPU suite runs, at toy sizes: a part that breaks should break here, on
the CPU, not in a lent GPU's minutes. Figures are not checked (they are the machine's), only
that every variant ran and its table row is there and well formed; and the scripts as a user
meets them: a rerun never loses a recorded table, a bad flag is one line, an interruption
during the timed rounds (or the compile timings after them) writes what was measured, marked
as such, and any other writes nothing."""

import _thread
import argparse
import ast
import io
import json
import os
import re
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings

import jax
import ml_collections
import numpy as np
import pytest

from bench_scripts import BENCHMARKS, load
from stochastic_depth_jax.training import stopping

RECORDED = "# Recorded\n\n## an earlier table\n\n| variant | ms |\n|---|---|\n| constant | 1.0 |\n\n"


def rows(path, first_cells):
    """The table rows of ``path`` whose first cell is one of ``first_cells``, split."""
    found = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and cells[0] in first_cells:
            found[cells[0]] = cells
    return found


def test_bench_step_every_kind_of_variant(tmp_path):
    out = tmp_path / "step.md"
    # skip and compact also run in test_stage_costs; here the suffix and fitted lengths.
    names = ["constant", "lengths-3-unrolled"]
    load("bench_step").main(["--depth", "8", "--batch", "4", "--rounds", "1", "--warmup", "1",
                             "--variants", ",".join(names), "--compile-depths", "",
                             "--out", str(out)])
    found = rows(out, names)
    assert sorted(found) == sorted(names)
    assert float(found["constant"][4]) == 1.0  # the ratio base
    assert all(float(found[n][1]) > 0 for n in names)
    # A toy run's table names its command and says that its sizes are not the recorded ones.
    text = out.read_text()
    assert "command: `python benchmarks/bench_step.py --depth 8 --batch 4 --rounds 1" in text
    assert ("**Not the default sizes** (--depth 8 (default 110); --batch 4 (default 128, 32 "
            "with --user-branch)): not comparable" in text)


def test_bench_step_leaves_loop_variants_out_of_its_default_list_where_none_can_run(capsys):
    """Its docstring's `--depth 20` run (stages of 3 blocks, not scanned by default) ended in
    the model's traceback: the default list holds the loop variants."""
    bench_step = load("bench_step")
    names = ["constant", "loop", "loop-remat-convs-unrolled"]
    args = bench_step.parse_args(["--depth", "20"])
    assert bench_step.with_a_loop_to_run(names, args, None) == ["constant"]
    assert ("left out loop, loop-remat-convs-unrolled: depth 20 with --scan auto scans no "
            "stage for implementation='loop' to loop over (--scan true runs them)."
            in capsys.readouterr().out)
    assert bench_step.with_a_loop_to_run(names, args, True) == names



def test_ours_default_is_what_auto_picks_for_the_depth(monkeypatch):
    """'auto' picks compact mode on a GPU only where a stage is scanned: compare_torch.py's
    "ours default" column showed compact mode at --depth 20 (every block masked), which the
    trainer runs with lax.cond."""
    bench_step, compare_torch = load("bench_step"), load("compare_torch")
    assert bench_step.auto_variant(110, None) == "skip-remat-convs"  # CPU
    monkeypatch.setattr(bench_step.jax, "default_backend", lambda: "gpu")
    assert bench_step.auto_variant(110, None) == "compact"
    assert bench_step.auto_variant(20, None) == "skip-remat-convs"
    assert bench_step.auto_variant(20, True) == "compact"
    ours = {"float32": {"backend": "gpu", "auto_variant": "skip-remat-convs", "jax": "0",
                        "device": "GPU", "median_s": {"constant": 0.1, "compact": 0.2,
                                                      "skip-remat-convs": 0.08}}}
    args = argparse.Namespace(depth=20, batch=32, label="")
    table = compare_torch._table(args, ours, {"torch": "0", "device": "GPU", "median_s": {}})
    [row] = [line for line in table.splitlines() if line.startswith("| fp32")]
    cells = row.split(" | ")
    assert (cells[5], cells[10]) == ("400", "0.800")  # ours default img/s, / constant: skip's


def test_compare_torch_refuses_variants_without_the_default_before_running(monkeypatch):
    """``--variants constant,compact`` on a CPU, whose 'auto' is lax.cond skipping: refused
    only once bench_step.py had run (minutes); now before anything runs."""
    compare_torch = load("compare_torch")
    monkeypatch.setattr(compare_torch, "_check_torch", lambda python: None)
    ran = []
    monkeypatch.setattr(compare_torch, "_run", ran.append)
    argv = ["--torch-python", sys.executable, "--out", "", "--step-out", "", "--dtypes",
            "float32"]
    with pytest.raises(load("bench_cli").FlagError, match=r"^--variants constant,compact: "
                       r"'auto' on cpu is 'skip-remat-convs' \(the table's 'ours default'\)"):
        compare_torch.main([*argv, "--variants", "constant,compact"])
    assert ran == []
    assert compare_torch.parse_args([*argv, "--variants", "constant,skip-remat-convs"])


@pytest.mark.parametrize("dry_run", [False, True])
def test_compare_torch_child_commands_pass_their_scripts_checks(dry_run, tmp_path, monkeypatch):
    """The commands compare_torch.py runs (the suite's vs-torch part, and its dry run) pass
    bench_step.py's and bench_torch.py's own checks, which refuse a flag the run would
    ignore: a child refused there fails the part on a GPU, after the first minutes."""
    compare_torch, suite = load("compare_torch"), load("gpu_suite")
    bench_step, bench_torch = load("bench_step"), bench_torch_without_torch(monkeypatch)
    monkeypatch.setattr(compare_torch, "_check_torch", lambda python: None)
    ran = []

    def parsed_only(cmd):  # each child's flags checked in process; its medians made up
        script = os.path.basename(cmd[1])
        args = (bench_step if script == "bench_step.py" else bench_torch).parse_args(cmd[2:])
        ran.append((script, args))
        names = (args.variants.split(",") if script == "bench_step.py"
                 else ["eager-fp32-constant", "eager-fp32-skip"])
        with open(args.json, "x") as f:
            json.dump({"device": "cpu", "backend": "cpu", "jax": "0", "torch": "0",
                       "auto_variant": "skip-remat-convs",
                       "median_s": {n: 0.1 for n in names}}, f)

    monkeypatch.setattr(compare_torch, "_run", parsed_only)
    part = suite.BY_NAME["vs-torch"]
    args = suite.parse_args([*(["--dry-run"] if dry_run else []), "--out-dir", str(tmp_path),
                             "--torch-python", sys.executable])
    argv = suite.command(part, args)[2:]
    compare_torch.main(argv)
    assert [script for script, _ in ran] == ["bench_step.py", "bench_step.py", "bench_torch.py"]
    depth = 14 if dry_run else 110
    assert {(a.depth, a.batch) for _, a in ran} == {(depth, 8 if dry_run else 128)}
    assert "| fp32 |" in (tmp_path / "vs_torch_gpu.md").read_text()  # the part's --out


def test_bench_step_flags_at_their_defaults_are_the_default_sizes():
    """compare_torch.py passes --batch 128 to bench_step.py: its table said "Not the default
    sizes (--batch 128 (default 128, ...))"."""
    parse = load("bench_step").parse_args
    assert jax.default_backend() == "cpu"
    for argv in (["--batch", "128", "--rounds", "6"], ["--user-branch", "--batch", "32"]):
        assert "Not the default sizes" not in parse(argv).label, argv
    assert parse(["--user-branch"]).batch == parse(["--user-branch", "--batch", "32"]).batch
    assert "--batch 32 (default" in parse(["--batch", "32"]).label


@pytest.mark.parametrize("script, argv", [
    ("bench_step", ["--rounds", "7", "--warmup", "0"]),
    ("stage_costs", ["--rounds", "7", "--warmup", "0", "--out", ""]),
    ("bench_prune", ["--rounds", "7", "--no-write"]),
    ("compare_torch", ["--rounds", "7", "--torch-python", sys.executable, "--out", "",
                       "--step-out", ""]),
])
def test_rounds_and_warm_up_are_not_sizes_in_any_benchmark(script, argv, monkeypatch):
    """``--rounds 7`` was flagged "**Not the default sizes**" in every table but
    bench_drop_path.py's: a table run with more rounds than the default (the recorded ones'
    7 or 10) read as a smoke run. Rounds change how often a step is timed, not what (the
    table says how many); one rule for every script (``provenance.REPEATS``)."""
    module = load(script)
    if script == "compare_torch":  # this Python has no PyTorch: the check is not the point
        monkeypatch.setattr(module, "_check_torch", lambda python: None)
    assert "Not the default sizes" not in module.parse_args(argv).label
    assert "**Not the default sizes** (--batch 8 (default " in module.parse_args(
        [*argv, "--batch", "8"]).label


def test_no_benchmark_lists_a_repetition_count_as_a_size():
    """Every script's SIZES (read from its source: bench_torch.py needs PyTorch to import),
    and the shared rule: a repetition count is never named, even where a script lists it."""
    provenance = load("provenance")
    for name in sorted(os.listdir(BENCHMARKS)):
        if name.endswith(".py"):
            with open(os.path.join(BENCHMARKS, name)) as f:
                tree = ast.parse(f.read())
            for node in tree.body:
                if (isinstance(node, ast.Assign)
                        and any(getattr(t, "id", "") == "SIZES" for t in node.targets)):
                    sizes = ast.literal_eval(node.value)
                    assert not set(sizes) & set(provenance.REPEATS), (name, sizes)
    parser = argparse.ArgumentParser()
    for flag in ("--batch", "--rounds", "--warmup"):
        parser.add_argument(flag, type=int, default=1)
    args = parser.parse_args(["--batch", "2", "--rounds", "3", "--warmup", "4"])
    assert provenance.size_changes(parser, args, ("batch", "rounds", "warmup")) == [
        "--batch 2 (default 1)"]


def test_bench_step_user_branch_nnx(tmp_path):
    """The NNX twin under the user's own nnx.jit: each row divided by its own survival-1.0
    row, and the steps train (the model's parameters move)."""
    bench = load("bench_step")
    out = tmp_path / "user.md"
    bench.main(["--user-branch", "--blocks", "2", "--width", "4", "--batch", "4", "--rounds",
                "1", "--warmup", "1", "--variants", "nnx-constant,nnx-skip", "--out", str(out)])
    names = ["nnx-constant (1.0, auto, nnx.jit, NNX net)", "nnx-skip (0.5, auto, nnx.jit, NNX net)"]
    found = rows(out, names)
    assert sorted(found) == sorted(names)
    assert float(found[names[0]][4]) == 1.0
    img_s = [float(found[n][3]) for n in names]
    assert float(found[names[1]][4]) == pytest.approx(
        img_s[0] / img_s[1], abs=_printed_quotient_error(*img_s))
    import jax.numpy as jnp
    from flax import nnx
    x, y = jnp.ones((4, 32, 32, 3)), jnp.zeros((4,), jnp.int32)
    runner = bench.make_user_runner("nnx-skip", 2, 4, 4, None, None, x, y)
    before = jax.tree.map(jnp.array, nnx.state(runner.state[0], nnx.Param))
    bench.run_once(runner, None)
    after = nnx.state(runner.state[0], nnx.Param)
    assert any(not jnp.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_bench_step_user_branch(tmp_path):
    """A user's own jax.jit (no compiler options) and the jit with the library's options,
    each pair divided by its own survival-1.0 row."""
    out = tmp_path / "user.md"
    load("bench_step").main(["--user-branch", "--blocks", "2", "--width", "4", "--batch", "4",
                             "--rounds", "1", "--warmup", "1", "--variants",
                             "constant,skip,constant-options,skip-options", "--out", str(out)])
    plain, options = "jax.jit", "jax.jit + cpu_compiler_options()"
    names = [f"constant (1.0, auto, {plain})", f"skip (0.5, auto, {plain})",
             f"constant-options (1.0, auto, {options})", f"skip-options (0.5, auto, {options})"]
    found = rows(out, names)
    assert sorted(found) == sorted(names)
    # img/s, not the ms column: a step of ~1 ms printed to 0.1 ms is off by up to 5%.
    img_s = {n.split()[0]: float(found[n][3]) for n in names}
    ratio = {n.split()[0]: float(found[n][4]) for n in names}
    assert ratio["constant"] == ratio["constant-options"] == 1.0
    for name, base in [("skip", "constant"), ("skip-options", "constant-options")]:
        assert ratio[name] == pytest.approx(img_s[base] / img_s[name],
                                            abs=_printed_quotient_error(img_s[base], img_s[name]))


def _printed_quotient_error(a, b, half=0.05, ratio_half=0.0005):
    """How far a ratio printed to 3 decimals may be from ``a / b``, where ``a`` and ``b``
    are printed to 0.1 (``half`` either way): the rounding, whatever the machine's speed
    (a slow step, few img/s, makes the quotient of the printed values coarse)."""
    half += 1e-9  # the float reading of the printed text
    widest = max((a + half) / (b - half) - a / b, a / b - (a - half) / (b + half))
    return ratio_half + 1e-9 + widest


def _shared_cache():
    """``--cache-dir`` for toy bench_train runs whose compile figures no assertion reads:
    the session's persistent cache (tests/conftest.py), so the runs after the first load
    their variants' programs instead of compiling them again (each compiled a ResNet-8's
    programs anew, the cache being off by default: most of these tests' time)."""
    return ["--cache-dir", jax.config.jax_compilation_cache_dir]


def test_bench_train_whole_epochs(tmp_path, capsys):
    out = tmp_path / "train.md"
    load("bench_train").main([
        "--whole-epochs", "constant,auto", "--epochs", "1", "--train-images", "64",
        "--test-images", "20", "--depth", "8", "--batch", "16", "--eval-batch", "80",
        "--out", str(out)])
    found = rows(out, ["constant", "auto"])
    assert sorted(found) == ["auto", "constant"] and found["constant"][4] == "1.000"
    # The images it trained on: 64 asked, 57 per class written (500 validation held out).
    assert "float32, 70 training images (4 steps, the last partial batch dropped)" in (
        out.read_text())
    # What each ran as, 'auto' resolved (README: lax.cond skipping on the CPU), from run.json.
    assert found["constant"][1] == "constant depth (cpu)"
    assert found["auto"][1] == "lax.cond skip (cpu)"
    # gpu_suite.py reads its figures back from the table as written.
    lines, epochs = load("suite_figures").lines_of(out.read_text())
    assert [e.variant for e in epochs] == ["constant (constant depth (cpu))",
                                           "auto (lax.cond skip (cpu))"]
    # What it is paired with PyTorch's by: the network, the config, the batch and p_L.
    assert {(e.network, e.model, e.batch, e.p_last) for e in epochs} == {
        ("ResNet-8", "cifar10", 16, "0.5")}
    assert lines[1].startswith("whole epochs fp32, ours auto (lax.cond skip (cpu)): ")
    assert f"({4 * 16 / epochs[1].epoch_s:.0f} img/s), {found['auto'][4]} x constant" in lines[1]
    # Each variant's figures are printed as soon as it finished (a SIGKILL before the table
    # is appended leaves them in gpu_suite.py's log).
    printed = capsys.readouterr().out
    assert (f"auto: median epoch >= 2 {found['auto'][3]} s, compiles excluded, "
            f"{found['auto'][4]} x constant; 500 epochs (training + evaluation each epoch): "
            f"{found['auto'][7]} min\n") in printed
    assert printed.index("auto: median epoch") < printed.index("## Whole epochs")


def test_bench_train_whole_epochs_subtract_no_mid_epoch_evaluation(tmp_path, capsys):
    """With eval_every_steps (SVHN: every 200 steps) an evaluation runs inside the epoch;
    the trainer keeps its time, its first compiles included, out of epoch_time_s, and the
    compiles inside the epoch were subtracted from it again (9 programs, ~1.7 s, off a
    0.2 s epoch: its steady figure went negative). Constant depth compiles every program
    of its steps before epoch 1: nothing inside it is the steps' compile."""
    out = tmp_path / "train.md"
    load("bench_train").main([
        "--config", "svhn:smoke", "--whole-epochs", "constant", "--epochs", "1",
        "--train-images", "64", "--test-images", "20", "--depth", "8", "--batch", "16",
        "--eval-batch", "80", "--out", str(out)])
    printed = capsys.readouterr().out
    # 4 steps: step 2 evaluates inside the epoch (its time is in the evaluations).
    assert "compiling inside them [0.0] s ([0] programs)" in printed, printed
    found = rows(out, ["constant"])["constant"]
    assert float(found[3]) > 0  # one epoch: its time, nothing subtracted
    assert ("after every epoch, and the validation images (the test images too at a new "
            "best) every 2 steps inside it (eval_every_steps; an epoch's evaluations summed)"
            in out.read_text())


def test_bench_train_whole_epochs_stopped_keeps_the_variants_that_finished(
        tmp_path, capsys, monkeypatch):
    """A SIGTERM (gpu_suite.py's budget) while the trainer runs the second variant: the
    first one's row is appended, the heading saying which variant was stopped; the whole
    table was lost (the trainer stops after a checkpoint, raising Stopped)."""
    from stochastic_depth_jax.training import loop
    train = loop.train_and_evaluate

    def stopped_in_auto(config, workdir):
        if os.path.basename(workdir) == "auto":
            raise stopping.Stopped("stopped by SIGTERM at step 2", signal.SIGTERM)
        return train(config, workdir)

    monkeypatch.setattr(loop, "train_and_evaluate", stopped_in_auto)
    out = tmp_path / "train.md"
    out.write_text(RECORDED)
    code, err = run_command("bench_train", [
        "--whole-epochs", "constant,auto", "--epochs", "1", "--train-images", "64",
        "--test-images", "20", "--depth", "8", "--batch", "16", "--eval-batch", "80",
        "--out", str(out), *_shared_cache()], capsys)
    assert code == 143 and err[-1] == (
        "interrupted (SIGTERM): the table of those that finished was appended, marked as "
        "interrupted.")
    text = out.read_text()
    assert text.startswith(RECORDED)
    assert "(interrupted before the variant auto finished)" in text
    found = rows(out, ["constant", "auto"])
    assert "auto" not in found and found["constant"][1] == "constant depth (cpu)"


def test_bench_train_whole_epochs_signal_outside_the_trainers_steps(tmp_path, capsys,
                                                                   monkeypatch):
    """A SIGTERM while a variant's trainer loads its data, initialises or compiles (before
    it takes signals as a stop request; seconds at 45k images), or after its last stop
    point, ended the command at once or was lost: the finished variants' table was lost
    (SIGKILL followed in gpu_suite). Now that variant stops at once, or the next one is not
    started, and the rows of those that finished are appended."""
    from stochastic_depth_jax.training import loop
    prepare, train = loop._prepare, loop._train

    def signalled_while_preparing(config, workdir):
        if os.path.basename(workdir) == "auto":
            os.kill(os.getpid(), signal.SIGTERM)
        return prepare(config, workdir)

    def signalled_after_the_last_stop_point(run):
        summary = train(run)
        if os.path.basename(run.workdir) == "constant":
            os.kill(os.getpid(), signal.SIGTERM)  # as in the last evaluation
        return summary

    monkeypatch.setattr(loop, "_prepare", signalled_while_preparing)
    out = tmp_path / "train.md"
    argv = ["--whole-epochs", "constant,auto,cond", "--epochs", "1", "--train-images", "64",
            "--test-images", "20", "--depth", "8", "--batch", "16", "--eval-batch", "80",
            "--out", str(out), *_shared_cache()]
    code, err = run_command("bench_train", argv, capsys)
    assert code == 143 and "(interrupted before the variant auto finished)" in out.read_text()
    assert sorted(rows(out, ["constant", "auto", "cond"])) == ["constant"]
    monkeypatch.setattr(loop, "_prepare", prepare)
    monkeypatch.setattr(loop, "_train", signalled_after_the_last_stop_point)
    out.unlink()
    code, err = run_command("bench_train", argv, capsys)
    assert code == 143 and "(interrupted before the variant auto finished)" in out.read_text()
    assert sorted(rows(out, ["constant", "auto", "cond"])) == ["constant"]


def test_bench_train_whole_epochs_signal_after_the_last_variant(tmp_path, capsys,
                                                               monkeypatch):
    """A SIGTERM or Ctrl-C after the last variant's last stop point (its last evaluation)
    was taken and dropped: the table was appended and the command exited 0, as if no one
    had asked it to stop. The table is whole, and the exit now says so, as bench_torch.py's
    and the rounds' do."""
    from stochastic_depth_jax.training import loop
    train = loop._train

    def signalled_after_the_last_stop_point(run):
        summary = train(run)
        os.kill(os.getpid(), signal.SIGTERM)  # as in the last evaluation
        return summary

    monkeypatch.setattr(loop, "_train", signalled_after_the_last_stop_point)
    out = tmp_path / "train.md"
    code, err = run_command("bench_train", [
        "--whole-epochs", "constant", "--epochs", "1", "--train-images", "64",
        "--test-images", "20", "--depth", "8", "--batch", "16", "--eval-batch", "80",
        "--out", str(out), *_shared_cache()], capsys)
    assert code == 143 and err[-1] == (
        "interrupted (SIGTERM): every one of the variants had finished; the table was "
        "appended whole."), err
    assert "interrupted" not in out.read_text() and sorted(rows(out, ["constant"])) == [
        "constant"]


def _constant_then_auto(tmp_path, capsys):
    """bench_train --whole-epochs constant,auto at toy sizes: (table path, exit code,
    stderr)."""
    out = tmp_path / "train.md"
    code, err = run_command("bench_train", [
        "--whole-epochs", "constant,auto", "--epochs", "1", "--train-images", "64",
        "--test-images", "20", "--depth", "8", "--batch", "16", "--eval-batch", "80",
        "--out", str(out), *_shared_cache()], capsys)
    return out, code, err


def test_bench_train_whole_epochs_signal_in_the_steps_stops_the_variant_at_once(
        tmp_path, capsys, monkeypatch):
    """A SIGTERM inside a variant's steps: the trainer stopped at its next metrics point,
    up to 20 steps on, which in compact mode's first epoch (programs compiled as bucket
    tuples are first drawn) could outlast gpu_suite's 30 s before SIGKILL, losing the rows
    of the variants that had finished (seen at toy sizes on the CPU: killed, nothing
    appended). The unfinished variant's row is not written anyway: it stops at once."""
    from stochastic_depth_jax.training import loop
    train_epoch = loop._train_epoch

    def far_from_a_metrics_point(run, compiled, epoch, end):
        if os.path.basename(run.workdir) != "auto":
            return train_epoch(run, compiled, epoch, end)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(600):  # steps still to run before the next metrics point
            time.sleep(0.1)
        raise AssertionError("the variant ran on to its next metrics point")

    monkeypatch.setattr(loop, "_train_epoch", far_from_a_metrics_point)
    out, code, err = _constant_then_auto(tmp_path, capsys)
    assert code == 143, err
    assert "(interrupted before the variant auto finished)" in out.read_text()
    assert sorted(rows(out, ["constant", "auto"])) == ["constant"]
    assert loop._train_epoch is far_from_a_metrics_point  # bench_train put back its patches
    assert stopping.StopSignals._handle.__name__ == "_handle"


class _ReaderGone(io.TextIOBase):
    """The stdout and stderr of a part whose gpu_suite.py died: a pipe with no reader."""

    def writable(self):
        return True

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("where", ["in the steps", "while preparing"])
def test_bench_train_whole_epochs_appends_its_rows_when_the_suite_died(
        tmp_path, capsys, monkeypatch, where):
    """gpu_suite.py killed (SIGKILL at a lent machine's time limit): its part gets SIGTERM
    (PR_SET_PDEATHSIG) with its output a pipe that no one reads. The stop's line, printed
    from the signal handler, raised BrokenPipeError there instead of stopping the variant,
    and bench_train.py ended as after `| head` (exit 141) without the rows of the variants
    that had finished. The benchmarks' rounds survived it; now bench_train.py does too."""
    from stochastic_depth_jax.training import loop
    train_epoch, prepare = loop._train_epoch, loop._prepare

    def suite_dies(workdir):
        if os.path.basename(workdir) == "auto":
            monkeypatch.setattr(sys, "stdout", _ReaderGone())
            monkeypatch.setattr(sys, "stderr", _ReaderGone())
            os.kill(os.getpid(), signal.SIGTERM)

    def in_the_steps(run, compiled, epoch, end):
        suite_dies(run.workdir)
        return train_epoch(run, compiled, epoch, end)

    def while_preparing(config, workdir):
        suite_dies(workdir)
        return prepare(config, workdir)

    if where == "in the steps":
        monkeypatch.setattr(loop, "_train_epoch", in_the_steps)
    else:
        monkeypatch.setattr(loop, "_prepare", while_preparing)
    out, code, err = _constant_then_auto(tmp_path, capsys)
    assert code == 143, err
    assert "(interrupted before the variant auto finished)" in out.read_text()
    assert sorted(rows(out, ["constant", "auto"])) == ["constant"]


def test_bench_train_epoch_compiles_fail_loudly_without_the_trainers_epochs():
    """Where the trainer no longer runs its epochs through loop._train_epoch, the wrapper
    sees no epoch: an error, not a table that subtracted no compiles."""
    bench_train = load("bench_train")
    with bench_train._EpochCompiles() as compiles:
        pass
    with pytest.raises(RuntimeError, match=r"epochs \[1, 2\] ran without loop._train_epoch"):
        compiles.of(2)

def test_bench_train_epochs_exclude_the_compiles_inside_them():
    """Compact mode compiles a program where a bucket tuple is first drawn, also in epochs
    >= 2 (ResNet-110, multiple 4, the GPU's 'auto': 7 in epoch 2, 2 in epoch 3, ~4 s each
    against ~7 s epochs): the steady epoch, its ratio and the 500-epoch projection, said to
    exclude compilation, took them in."""
    bench_train = load("bench_train")
    run = bench_train._EpochRun(epochs=[10.0, 9.0, 5.0], compile_s=[4.0, 4.0, 0.0],
                                compile_programs=[1, 1, 0], evals=[3.0, 1.0, 1.0],
                                ran_as="compact, multiple 4 (gpu)",
                                compilation={"programs": 2, "compile_s": 8.0})
    constant = bench_train._EpochRun([6.0, 5.0, 5.0], [1.0, 0.0, 0.0], [1, 0, 0],
                                     [3.0, 1.0, 1.0], "constant depth (gpu)",
                                     {"programs": 1, "compile_s": 1.0})
    assert run.steady() == 5.0  # median(9 - 4, 5 - 0), not median(9, 5) = 7
    row = bench_train._epoch_row("auto", run, {"auto": run, "constant": constant})
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:8] == ["auto", "compact, multiple 4 (gpu)", "10.0", "5.00", "1.000",
                         "1, 4.0", "1.00", f"{500 * 6 / 60:.1f}"]


def test_bench_train_runs_have_no_lr_drop_they_never_reach(tmp_path):
    """cifar10's lr drops lie after epochs 250 and 375: every 1- or 2-epoch benchmark run
    warned that they never happen, naming a --config flag this script does not take. The
    runs keep the drops they reach (the same schedule), so nothing warns."""
    from stochastic_depth_jax.training import config as config_lib

    bench_train = load("bench_train")
    args = bench_train.parse_args(["--whole-epochs", "auto", "--epochs", "2", "--eval-batch", "80"])
    folder = str(tmp_path / "images")
    assert config_lib.unreached_lr_drops(bench_train._config(args, str(tmp_path), folder)) is None
    config = bench_train._variant_config(args, str(tmp_path), folder, "auto")
    assert config_lib.unreached_lr_drops(config) is None
    args = bench_train.parse_args(["--whole-epochs", "auto", "--epochs", "300", "--eval-batch", "80"])
    config = bench_train._variant_config(args, str(tmp_path), folder, "auto")
    assert tuple(config.lr_boundaries_epochs) == (250,)  # the drop it reaches, kept


def test_bench_train_names_what_each_run_ran_as():
    """A constant-depth row is the plain network (the train step compacts nothing at
    p_L = 1, whatever a record from before resolve() knew that says); the others say their
    resolved implementation."""
    bench_train = load("bench_train")
    resolved = {"implementation": "skip", "compact_multiple": 4, "requested": "auto",
                "platform": "gpu", "reason": "GPU", "compact_lengths": 0}
    model = ml_collections.ConfigDict({"final_survival_prob": 1.0})
    assert bench_train._ran_as(resolved, model) == "constant depth (gpu)"
    model.final_survival_prob = 0.5
    assert bench_train._ran_as(resolved, model) == "compact, multiple 4 (gpu)"
    resolved.update(compact_multiple=0, compact_lengths=3)
    assert bench_train._ran_as(resolved, model) == "compact, 3 lengths (gpu)"


def test_bench_train_epoch_compiles_are_assigned_to_their_epoch():
    """The compiles inside each epoch's steps are counted for that epoch, those between the
    epochs (evaluation) for none."""
    bench_train = load("bench_train")
    from stochastic_depth_jax.training import loop

    def train_epoch(run, compiled, epoch, end):  # epoch 2 meets a new program
        if epoch == 2:
            jax.jit(lambda x: x * 3 + epoch)(np.ones(7, np.float32)).block_until_ready()
        return 0.0

    original = loop._train_epoch
    loop._train_epoch = train_epoch
    try:
        with bench_train._EpochCompiles() as compiles:
            for epoch in (1, 2, 3):
                loop._train_epoch(None, None, epoch, 0)
                # Between epochs: not counted.
                jax.jit(lambda x: x - epoch)(np.ones(5, np.float32)).block_until_ready()
        assert loop._train_epoch is train_epoch  # put back
    finally:
        loop._train_epoch = original
    seconds, programs = compiles.of(3)
    assert programs == [0, 1, 0] and seconds[0] == seconds[2] == 0.0 and seconds[1] > 0


def test_bench_train_epoch_compiles_count_only_their_stall():
    """A compact step meeting a new bucket tuple compiles on the host while the device still
    runs the steps dispatched before it (asynchronous dispatch: up to 20 of them between the
    trainer's metric syncs, ~0.4 s on an H100): only the compile time beyond that queue
    stalls the epoch, so subtracting all of it took the queued steps out too (ResNet-110,
    multiple 4: ~9 compiles in epochs 2-3 made compact mode look faster than it is). The
    queue is now drained before a new program is compiled, so what is subtracted is a stall."""
    bench_train = load("bench_train")
    from stochastic_depth_jax.training import loop, step as step_lib

    heavy = jax.jit(lambda x: jax.lax.fori_loop(0, 30, lambda i, a: jax.numpy.tanh(a @ a), x))
    x = jax.numpy.full((1024, 1024), 1e-3, jax.numpy.float32)
    heavy(x).block_until_ready()
    t0 = time.perf_counter()
    heavy(x).block_until_ready()
    device_s = time.perf_counter() - t0  # the queued steps' device time

    def traced_slowly(state, split, gates, buckets):  # a compile as long as the queue
        time.sleep(device_s)
        return state + gates.sum()

    compact = object.__new__(step_lib.CompactTrainStep)  # one new bucket tuple per step
    compact._jitted = jax.jit(traced_slowly, static_argnums=3)
    compact._key, compact._draw = None, lambda key, step: np.zeros(2, np.float32)
    compact._bucketing = lambda gates: (1,)
    compact._replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    compact._drawn, compact.compile_s = set(), 0.0

    def train_epoch(run, compiled, epoch, end):
        t0 = time.perf_counter()
        state = compiled(heavy(x), None, 0)  # dispatched behind the queued steps
        jax.block_until_ready(state)
        return time.perf_counter() - t0

    original = loop._train_epoch
    loop._train_epoch = train_epoch
    try:
        with bench_train._EpochCompiles() as compiles:
            took = loop._train_epoch(None, compact, 1, 0)
    finally:
        loop._train_epoch = original
    seconds, programs = compiles.of(1)
    assert programs == [1] and seconds[0] >= device_s
    assert took - seconds[0] > 0.5 * device_s  # the steps' time is left, not ~0 (0.5: load)

def test_bench_train_bare_config_divides_by_the_devices(tmp_path):
    """The bare-step run's validation batch was a fixed 100, which 8 devices do not divide:
    the trainer refused it on an 8-GPU host. Here 8 simulated devices."""
    bench_train = load("bench_train")
    args = bench_train.parse_args(["--depth", "8", "--batch", "16", "--steps", "1", "--out", ""])
    config = bench_train._config(args, str(tmp_path), folder=str(tmp_path))
    assert jax.device_count() == 8
    assert config.eval_batch_size % 8 == 0 and config.validation_size == config.eval_batch_size


def test_bench_train_images_are_reused_and_others_refused(tmp_path, capsys):
    bench_train = load("bench_train")

    def args(folder, train_images=64):
        return type("Args", (), {"images_dir": str(folder), "train_images": train_images,
                                 "test_images": 20})()

    images = tmp_path / "images"
    sibling = tmp_path / "images.partial"  # a user's folder that merely looks like staging
    sibling.mkdir()
    (sibling / "mine.txt").write_text("keep me")
    assert bench_train._epoch_images(args(f"{images}/"), str(tmp_path)) == str(images)
    assert (sibling / "mine.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["images", "images.partial"]  # no staging left
    marker = (images / "bench_train_images.txt").read_text()
    capsys.readouterr()
    assert bench_train._epoch_images(args(images), str(tmp_path)) == str(images)
    assert f"reusing the images in {images}" in capsys.readouterr().out
    flag_error = load("bench_cli").FlagError
    with pytest.raises(flag_error, match="holds other images than this run needs"):
        bench_train._epoch_images(args(images, 128), str(tmp_path))
    assert (images / "bench_train_images.txt").read_text() == marker
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(flag_error, match="is not a bench_train image folder"):
        bench_train._epoch_images(args(other), str(tmp_path))
    assert (other / "notes.txt").read_text() == "keep me"


def test_bench_drop_path_tiny_vit(tmp_path):
    out = tmp_path / "dp.md"
    load("bench_drop_path").main(["--size", "ti", "--depth", "2", "--image", "32", "--patch",
                                  "8", "--batch", "4", "--rounds", "1", "--warmup", "1",
                                  "--rates", "0.4", "--linear", "0.4", "--out", str(out)])
    found = rows(out, ["none", "uniform 0.4 skip", "uniform 0.4 mask"])
    assert len(found) == 3 and found["uniform 0.4 skip"][5].strip("*") != "-"
    assert float(found["uniform 0.4 skip"][6]) > 0 and found["uniform 0.4 mask"][6] == "-"


@pytest.mark.parametrize("model, sizes", [
    ("vit", "--size ti; --depth 4; --image 32; --patch 4; --batch 64; --rounds 5"),
    ("convnext", "--size atto; --image 32; --patch 2; --batch 32; --rounds 5")])
def test_bench_drop_path_help_says_the_defaults_of_the_model(model, sizes, capsys):
    """``--help`` showed no default for the sizes and rounds (they follow --model and the
    backend): a user could not tell what a bare run measures. The CPU's ViT-Ti runs 4 of its
    12 blocks: --depth said "the size's"."""
    with pytest.raises(SystemExit):
        load("bench_drop_path").parse_args(["--model", model, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in sizes.split("; "):
        name, value = flag.split()
        after = text.split(f" {name} {name[2:].upper()} ", 1)[1]
        assert f"default for {model} on cpu: {value}" in after.split(" --")[0], flag
    assert "--warmup WARMUP untimed rounds before them (default: 2)" in text


def test_bench_drop_path_rounds_are_not_sizes_and_warm_up_rounds_print_their_times(
        tmp_path, monkeypatch, capsys):
    """``--rounds 7`` (as the recorded CPU table) was flagged "**Not the default sizes**":
    rounds change how often a step is timed, not what (the table says how many), unlike
    the batch. Warm-up rounds printed 0.000 for every variant (nothing timed yet), not the
    times they took."""
    module = load("bench_drop_path")
    for argv in (["--rounds", "7"], ["--warmup", "3"], ["--rounds", "3", "--warmup", "0"]):
        assert "Not the default sizes" not in module.parse_args(argv).label, argv
    assert "**Not the default sizes** (--batch 8 (default " in module.parse_args(
        ["--batch", "8"]).label
    times = iter(range(1, 100))  # the step times run_once reports, in ms: 1, 2, 3, ...
    monkeypatch.setattr(module, "run_once", lambda r, key: next(times) / 1e3)
    module.main(["--size", "ti", "--depth", "1", "--image", "8", "--patch", "8", "--batch",
                 "4", "--rounds", "1", "--warmup", "1", "--rates", "0.5", "--linear", "0",
                 "--out", str(tmp_path / "dp.md")])
    printed = capsys.readouterr().out  # 3 variants; 3 compile steps took 1, 2 and 3 ms
    assert "warm-up round 0: 0.004, 0.005, 0.006\n" in printed, printed
    assert "\nround 1: 0.007, 0.008, 0.009\n" in printed, printed


def test_bench_step_warm_up_rounds_print_their_times(monkeypatch, capsys):
    """bench_step.py's (and stage_costs.py's) warm-up rounds printed 0.000 for every variant,
    and a later warm-up round too (nothing timed yet), not the times they took, as
    bench_drop_path.py's did."""
    bench_step = load("bench_step")
    times = iter(range(1, 100))  # the step times run_once reports, in ms: 1, 2, 3, ...
    monkeypatch.setattr(bench_step, "run_once", lambda r, gates: next(times) / 1e3)
    runners = [argparse.Namespace(times=[]) for _ in range(2)]
    bench_step.time_rounds(runners, [None] * 3, 2)
    assert capsys.readouterr().out == ("warm-up round 0: 0.001, 0.002\n"
                                       "warm-up round 1: 0.003, 0.004\nround 2: 0.005, 0.006\n")
    assert [r.times for r in runners] == [[0.005], [0.006]]


def test_gpu_suite_budget_and_stops(tmp_path, monkeypatch, capsys):
    suite = load("gpu_suite")
    quick = suite.Part("quick", 1, ("-c", "import os; print('quick ran as part', "
                                          "os.environ['SDJ_GPU_SUITE_PART'])"))
    slow = suite.Part("slow", 1, ("-c", "import time; print('slow started', flush=True); "
                                        "time.sleep(60)"))
    huge = suite.Part("huge", 10**6, ("-c", "print('never')"))
    monkeypatch.setattr(suite, "BY_NAME", {p.name: p for p in (quick, slow, huge)})
    monkeypatch.setattr(suite, "backend", lambda: "gpu")
    suite.main(["--parts", "quick,huge,slow", "--budget", "8", "--out-dir", str(tmp_path)])
    log = (tmp_path / "gpu_suite.log").read_text()
    assert "quick ran as part quick" in log and "never" not in log and "slow started" in log
    assert "quick: ok" in log
    assert "huge: not started" in log
    assert "slow: stopped (budget" in log


def test_gpu_suite_budget_lets_a_part_write_what_it_measured(tmp_path, monkeypatch):
    """A part still running near the budget's end is sent SIGTERM first, as a benchmark in its
    timed rounds takes it to append the table of the rounds done (marked as interrupted),
    and SIGKILL only at the end; a SIGKILL alone lost every round it had measured."""
    suite = load("gpu_suite")
    rounds = suite.Part("rounds", 1, ("-c", textwrap.dedent("""\
        import signal, sys, time
        def table(signum, frame):
            print('table of the rounds done, marked interrupted', flush=True)
            sys.exit(143)
        signal.signal(signal.SIGTERM, table)
        print('rounds started', flush=True)
        time.sleep(60)
        """)))
    stubborn = suite.Part("stubborn", 1, ("-c", textwrap.dedent("""\
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print('stubborn started', flush=True)
        time.sleep(60)
        """)))
    monkeypatch.setattr(suite, "BY_NAME", {p.name: p for p in (rounds, stubborn)})
    monkeypatch.setattr(suite, "backend", lambda: "gpu")
    t0 = time.perf_counter()
    suite.main(["--parts", "rounds", "--budget", "8", "--out-dir", str(tmp_path)])
    assert time.perf_counter() - t0 < 8 - 1  # SIGTERM a quarter of the budget before its end
    suite.main(["--parts", "stubborn", "--budget", "4", "--out-dir", str(tmp_path)])
    assert time.perf_counter() - t0 < 8 + 4 + 5  # SIGKILL at the budget's end
    log = (tmp_path / "gpu_suite.log").read_text()
    assert "rounds started" in log and "table of the rounds done, marked interrupted" in log
    assert "rounds: stopped (budget" in log
    # Its summary line says what is known: a table ends interrupted only where the part
    # wrote one; SIGKILL lost what was not written.
    assert "rounds: stopped (budget: SIGTERM, exit 143; " in log
    assert "stubborn started" in log and "stubborn: killed at the budget's end (SIGKILL" in log
    with pytest.raises(load("bench_cli").FlagError, match="--parts: unknown nonsense; valid: "):
        suite.main(["--parts", "nonsense"])


def test_gpu_suite_runs_torch_parts_with_the_torch_python(tmp_path, monkeypatch):
    suite = load("gpu_suite")
    args = suite.parse_args(["--torch-python", "/some/venv/bin/python", "--out-dir",
                             str(tmp_path)])
    # The parts run from the repository root: paths given relative to the caller's directory
    # are made absolute (the log was written here, the parts' tables looked for there).
    monkeypatch.chdir(tmp_path)
    relative = suite.parse_args(["--torch-python", "venv/bin/python", "--out-dir", "results"])
    assert relative.out_dir == str(tmp_path / "results")
    assert relative.torch_python == str(tmp_path / "venv" / "bin" / "python")
    assert suite.parse_args(["--torch-python", "python3"]).torch_python == "python3"  # PATH
    torch_parts = [p for p in suite.PARTS if p.torch]
    assert [p.name for p in torch_parts] == ["epochs-torch", "epochs-torch-compile"]
    assert suite.command(torch_parts[0], args)[:2] == ["/some/venv/bin/python",
                                                       "benchmarks/bench_torch.py"]
    assert suite.command(suite.BY_NAME["epochs"], args)[0] == sys.executable
    vs = suite.command(suite.BY_NAME["vs-torch"], args)  # runs ours, and torch through the flag
    assert vs[0] == sys.executable and vs[vs.index("--torch-python") + 1] == "/some/venv/bin/python"


def test_gpu_suite_torch_parts_need_a_torch_that_sees_the_gpu(tmp_path):
    """A --torch-python whose torch sees no CUDA GPU (a CPU-only wheel) ran epochs-torch and
    vs-torch on the CPU, into torch_epochs_gpu.md and vs_torch_gpu.md: only a Python without
    torch was refused."""
    suite = load("gpu_suite")
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "class cuda:\n    @staticmethod\n    def is_available():\n        return False\n")
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path / "site"} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    assert "sees no CUDA GPU" in suite.torch_problem(str(python))
    assert suite.torch_problem(str(python), need_cuda=False) is None  # a dry run takes it
    # A Python without torch, also where the tests' own Python has one (a CPU wheel).
    (fake / "__init__.py").write_text("raise ModuleNotFoundError('no torch here')\n")
    assert "no PyTorch in --torch-python" in suite.torch_problem(str(python))
    assert "no PyTorch in --torch-python" in suite.torch_problem(str(tmp_path / "missing"))


def test_gpu_suite_parts_name_known_variants():
    """Every variant a suite part asks of bench_step / bench_train / stage_costs exists."""
    suite, bench_step, bench_train = load("gpu_suite"), load("bench_step"), load("bench_train")
    for part in suite.PARTS:
        args = list(part.args)
        script = os.path.basename(args[0])
        if "--variants" in args and script in ("bench_step.py", "stage_costs.py",
                                               "profile_step.py", "compare_torch.py"):
            for name in args[args.index("--variants") + 1].split(","):
                known = (name in bench_step.USER_VARIANTS if "--user-branch" in args
                         else bench_step.known_variant(name))  # --user-branch: its own
                assert known, (part.name, name)
        if "--whole-epochs" in args and script == "bench_train.py":
            for name in args[args.index("--whole-epochs") + 1].split(","):
                assert name in bench_train.EPOCH_VARIANTS, (part.name, name)


def test_gpu_suite_parts_parse(tmp_path, monkeypatch):
    """Every part's flags pass its script's checks (a typo costs no GPU minutes), and its
    table says it is the suite's: not '**Not the default sizes**' (a smoke run's warning),
    which the suite's 45,000-image epochs and 20 rounds would otherwise get."""
    suite = load("gpu_suite")
    monkeypatch.setattr(jax, "device_count", lambda: 1)  # the suite's one GPU, not 8 CPUs
    args = suite.parse_args(["--out-dir", str(tmp_path)])
    for part in suite.PARTS:
        script, *argv = suite.command(part, args)[1:]
        name = os.path.basename(script).removesuffix(".py")
        if name != "compare_torch":  # needs PyTorch (its children: the test of them)
            module = (bench_torch_without_torch(monkeypatch) if name == "bench_torch"
                      else load(name))  # its flags need no PyTorch: checked too
            with monkeypatch.context() as env:
                for key, value in suite.part_env(part).items():
                    env.setenv(key, value)
                label = module.parse_args(argv).label
            assert "Not the default sizes" not in label, (part.name, label)
            assert f"Run by gpu_suite.py, part {part.name}: the sizes of the recorded" in label


def run_command(module, argv, capsys):
    """``(exit status, stderr lines)`` of ``python benchmarks/<module>.py <argv>``, in process."""
    with pytest.raises(SystemExit) as stopped:
        load("bench_cli").run(load(module).main, argv)
    return stopped.value.code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("module, argv, message", [
    ("bench_step", ["--variants", "nope"], "--variants: unknown nope; valid: constant, skip,"),
    ("bench_step", ["--variants", ""], "--variants is empty: give one or more names"),
    ("bench_step", ["--rounds", "0"], "--rounds 0: must be at least 1."),
    ("bench_step", ["--depth", "21"], "--depth 21: a CIFAR ResNet's depth is 6n+2"),
    ("bench_step", ["--compile-depths", "110,21"], "error: --compile-depths 21: a CIFAR "
                                                   "ResNet's depth is 6n+2"),  # was '--depth'
    ("bench_step", ["--json", "{recorded}"], "exists; give a new file"),
    ("stage_costs", ["--variants", "constant"], "--variants: unknown constant; valid: skip,"),
    ("bench_train", ["--whole-epochs", "nope"], "--whole-epochs: unknown nope; valid: constant,"),
    ("bench_train", ["--whole-epochs", "constant,auto,constant"],
     "--whole-epochs: constant given more than once; give each name once."),
    ("bench_step", ["--variants", "skip,skip"], "--variants: skip given more than once"),
    ("bench_train", ["--batch", "12"], "--batch 12 does not divide by the 8 devices"),
    ("bench_prune", ["--fractions", "0,1.5"], "--fractions [0.0, 1.5]: each in [0, 1)"),
    # --no-write won: the --out file asked for was silently not written (toy sizes: fast).
    ("bench_prune", ["--no-write", "--depth", "8", "--batch", "1", "--rounds", "1",
                     "--fractions", "0", "--out", "{recorded}"],
     "recorded.md: --no-write prints the table only, so nothing would be written there. "
     "Drop one of the two flags."),
    ("bench_drop_path", ["--rates", "x"], "--rates 'x': give comma-separated numbers."),
    # The model checked the images only as it ran: a traceback after the flags were taken.
    ("bench_drop_path", ["--image", "30"], "--image 30 --patch 4: 30x30 images do not tile "
                                           "into 4x4 patches"),
    ("bench_drop_path", ["--model", "convnext", "--image", "36"],
     "--image 36 --patch 2: 36x36 images do not divide into this ConvNeXt's stages"),
    # argparse's error: a usage block, then the line, exit status 2.
    ("bench_drop_path", ["--model", "convnext", "--unfused"], "--unfused and --depth are ViT "
                                                              "options"),
    ("bench_drop_path", ["--depths", "1,1,3,1"], "--depths is a ConvNeXt option"),
    ("compact_buckets", ["--depth", "100"], "nearest: 98 or 104."),
    # Unscanned stages: a table of stage-first blocks only (0.33 computed), negative padding.
    ("compact_buckets", ["--depth", "20"], "--depth 20: its stages (3 blocks) are not scanned"),
    ("compact_buckets", ["--final-survival", "1"], "--final-survival 1.0: p_L in (0, 1) (at 1,"),
    ("bench_data", ["--out", "{tmp}/missing/data.md"], "missing does not exist; create it"),
    ("profile_step", ["--trace-dir", "{recorded}"], "recorded.md: a file, not a directory"),
    # The profiler's traceback, once the first variant had compiled and run.
    ("profile_step", ["--trace-dir", "{recorded}/traces"],
     "recorded.md/traces: cannot create it (Not a directory); give a directory"),
    ("gpu_suite", ["--parts", "user-branch"], "JAX's backend here is cpu, not gpu"),
    # After the backend's and the parts' checks: "... use another --workdir".
    ("gpu_suite", ["--out-dir", "{recorded}/tables"],
     "--out-dir {recorded}/tables: {recorded} is a file, not a directory; give a directory"),
    # Two outputs at one path: the table appended, then the medians' new file refused there
    # ("a file is in the way ... use another --workdir"), or the drawing (a directory of
    # traces, the trainer's cache) made over it, after the measuring.
    ("bench_step", ["--out", "{tmp}/t.md", "--json", "{tmp}/t.md"],
     "--out and --json both name {tmp}/t.md; give each its own path"),
    ("stage_costs", ["--out", "{tmp}/t.png", "--plot", "{tmp}/t.png"],
     "--out and --plot both name {tmp}/t.png; give each its own path"),
    ("profile_step", ["--out", "{tmp}/t", "--trace-dir", "{tmp}/t"],
     "--out and --trace-dir both name {tmp}/t; give each its own path"),
    ("bench_train", ["--out", "{tmp}/t.md", "--cache-dir", "{tmp}/t.md"],
     "--out and --cache-dir both name {tmp}/t.md; give each its own path"),
    ("bench_train", ["--whole-epochs", "constant", "--eval-batch", "400", "--images-dir",
                     "{tmp}/i", "--cache-dir", "{tmp}/i"],
     "--images-dir and --cache-dir both name {tmp}/i; give each its own path"),
    ("compare_torch", ["--torch-python", sys.executable, "--out", "{tmp}/t.md", "--step-out",
                       "{tmp}/t.md"],
     "--out and --step-out both name {tmp}/t.md; give each its own path"),
    # implementation='loop' where no stage is scanned: the model refuses it (a traceback;
    # bench_train.py's after training the variants before it, whose table was lost).
    ("bench_step", ["--depth", "20", "--variants", "constant,loop"],
     "--variants loop: depth 20 with --scan auto scans no stage for implementation='loop' "
     "to loop over; pass --scan true"),
    ("bench_train", ["--whole-epochs", "constant,loop", "--depth", "20"],
     "--whole-epochs loop: refused at these flags"),
    # The bare-step mode wrote its images, then the trainer refused the config.
    ("bench_train", ["--implementation", "loop", "--depth", "20"],
     "refused at these flags (this script sets no model.scan"),
    # ... a note that every other refusal carried too, unrelated to it.
    ("bench_train", ["--p", "1.5"], "error: refused at these flags. Invalid config: "
                                    "model.final_survival_prob=1.5 must be in (0, 1]"),
    # A flag of the other mode was ignored: the default network measured (minutes of
    # ResNet-110), its table's command and "Not the default sizes" naming the value given.
    ("bench_step", ["--blocks", "2", "--width", "8"], "error: --blocks, --width are used only "
                                                      "with --user-branch, so here they would "
                                                      "be ignored; drop them."),
    ("bench_step", ["--user-branch", "--depth", "20"], "--depth is used only without "
                                                       "--user-branch, so here it would be"),
    ("profile_step", ["--model", "convnext"], "--model is used only with --drop-path, so"),
    # A rate out of range picks no network: said, not that its flags would be ignored.
    ("profile_step", ["--drop-path", "1.5", "--depth", "20"], "error: --drop-path 1.5: a drop "
                                                              "rate in (0, 1), or 0 for"),
    ("profile_step", ["--drop-path", "0.4", "--variants", "constant"],
     "--variants is used only without --drop-path (the ResNet), so here it would be ignored"),
    ("bench_train", ["--epochs", "3", "--train-images", "45000"],
     "--epochs, --train-images are used only with --whole-epochs, so here they would be"),
    ("bench_train", ["--images-dir", "{tmp}/images"], "--images-dir is used only with "
                                                      "--whole-epochs"),
    ("bench_train", ["--whole-epochs", "constant", "--steps", "5"],
     "--steps is used only without --whole-epochs (the bare steps timed), so here it would"),
])
def test_a_bad_flag_is_one_line_and_writes_nothing(module, argv, message, tmp_path, capsys,
                                                   monkeypatch):
    recorded = tmp_path / "recorded.md"
    recorded.write_text(RECORDED)
    argv = [a.format(tmp=tmp_path, recorded=recorded) for a in argv]
    if module == "gpu_suite":  # whatever this machine has: the check, not the detection
        monkeypatch.setattr(load("gpu_suite"), "backend", lambda: "cpu")
    out = [] if "--out" in argv or module == "gpu_suite" else ["--out", str(recorded)]
    status, err = run_command(module, argv + out, capsys)
    assert status == 1 and len(err) == 1 and err[0].startswith("error: "), err
    assert message.format(tmp=tmp_path, recorded=recorded) in err[0]
    assert recorded.read_text() == RECORDED and sorted(os.listdir(tmp_path)) == ["recorded.md"]


def test_gpu_suite_asks_a_child_for_the_backend():
    assert load("gpu_suite").backend() == jax.default_backend()


def test_torch_missing_is_one_line_saying_it_is_optional(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as where PyTorch is not installed
    monkeypatch.setattr(sys, "argv", ["bench_torch.py"])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(os.path.join(BENCHMARKS, "bench_torch.py"), run_name="__main__")
    assert str(stopped.value.code).startswith("error: PyTorch is not installed in this Python. "
                                              "It is optional")
    assert "pip install torch" in stopped.value.code
    no_torch = tmp_path / "python"  # a Python without torch, for compare_torch.py
    no_torch.write_text("#!/bin/sh\nexit 1\n")
    no_torch.chmod(0o755)
    status, err = run_command("compare_torch", ["--torch-python", str(no_torch), "--out",
                                                str(tmp_path / "vs.md")], capsys)
    assert status == 1 and len(err) == 1
    assert err[0].startswith(f"error: --torch-python {no_torch}: PyTorch is not installed")


def test_bench_data_appends_below_the_recorded_table(tmp_path, capsys):
    out = tmp_path / "data.md"
    out.write_text(RECORDED)
    load("bench_data").main(["--steps", "1", "--tfds-train", "0", "--out", str(out)])
    text = out.read_text()
    assert text.startswith(RECORDED) and text.count("| train_batch, batch 128") == 2
    assert "**Not the default sizes** (--steps 1 (default 200); --tfds-train 0" in text
    assert f"appended to {out}" in capsys.readouterr().out


@pytest.mark.parametrize("how, status, by", [("SIGTERM", 143, "signal"), ("Ctrl-C", 130, "key"),
                                            ("SIGTERM", 143, "trainer")])
def test_an_interrupted_benchmark_writes_nothing(how, status, by, tmp_path, capsys,
                                                 monkeypatch):
    bench_step = load("bench_step")

    def interrupt(*args):
        if by == "signal":
            signal.raise_signal(signal.SIGTERM)
        if by == "trainer":  # bench_train.py's trainer, stopped by SIGTERM after a checkpoint
            raise stopping.Stopped("stopped at step 3", signal.SIGTERM)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_step, "compile_all", interrupt)
    out = tmp_path / "step.md"
    out.write_text(RECORDED)
    code, err = run_command("bench_step", ["--depth", "8", "--batch", "2", "--variants",
                                           "constant", "--out", str(out)], capsys)
    assert code == status and err == [
        f"interrupted ({how}): no table was written; the results files are as they were."]
    assert out.read_text() == RECORDED


def child_env(**changes) -> dict:
    """The environment of a benchmark run as a child process: unbuffered, and compiling
    through the session's persistent compilation cache, every program kept (bench_step.py
    at depth 8 compiles for over 10 s on 2 busy cores; loaded, for under 1 s)."""
    from stochastic_depth_jax.training import compilation
    return dict(os.environ, PYTHONUNBUFFERED="1",
                JAX_COMPILATION_CACHE_DIR=compilation.cache_dir_for("auto"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **changes)


# Far more rounds than can run before a signal sent on seeing round 0 lands: a round of
# these tiny steps takes ~10 ms, so 200 left only ~2 s (less on a fast machine) for the test
# to be scheduled and send it; the script then finished every round and exited 0.
ROUNDS_PAST_THE_SIGNAL = 3000


def test_a_benchmark_interrupted_in_its_rounds_writes_the_rounds_done(tmp_path):
    """A Ctrl-C (or a `timeout` kill) after minutes of rounds lost them all: the table was
    only written at the end. Run as `bench_step.py | tee log`, the same Ctrl-C stops tee:
    the next round's line then hit the closed pipe, and the script stopped with the
    trainer's broken-pipe error, its table not written."""
    out, js = tmp_path / "step.md", tmp_path / "step.json"
    out.write_text(RECORDED)
    asked = ROUNDS_PAST_THE_SIGNAL
    proc = subprocess.Popen(
        [sys.executable, os.path.join(BENCHMARKS, "bench_step.py"), "--depth", "8", "--batch",
         "2", "--warmup", "0", "--rounds", str(asked), "--variants", "constant",
         "--compile-depths", "", "--json", str(js), "--out", str(out)],
        env=child_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while not proc.stdout.readline().startswith("round 0:"):
            assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        proc.stdout.close()  # its reader gone, as `| tee` stopped by the same Ctrl-C
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    text = out.read_text()
    assert text.startswith(RECORDED)
    [(heading, done)] = re.findall(r"\n(## Train step, CifarResNet-8.*\(interrupted after "
                                   rf"(\d+) of {asked} rounds\))\n", text)
    assert 1 <= int(done) < asked
    assert f"**Interrupted after {done} of {asked} rounds** (Ctrl-C)" in text
    assert float(rows(out, ["constant"])["constant"][1]) > 0
    assert not js.exists()  # a file of medians that could not say it is partial
    assert err.splitlines()[-1] == (f"interrupted (Ctrl-C): the table of the {done} of {asked} "
                                    "timed rounds completed was appended, marked as "
                                    "interrupted.")


def test_a_second_signal_or_one_in_the_warm_up_stops_at_once(tmp_path, capsys, monkeypatch):
    bench_step = load("bench_step")
    run_once, calls = bench_step.run_once, []

    def signalled(r, gates):  # call 1 compiles; call 2 is round 0, warm-up or timed
        calls.append(r.name)
        for _ in range(signals if len(calls) == 2 else 0):
            signal.raise_signal(signal.SIGTERM)
        return run_once(r, gates)

    monkeypatch.setattr(bench_step, "run_once", signalled)
    out = tmp_path / "step.md"
    for signals, warmup in [(1, "1"), (2, "0")]:
        calls.clear()
        code, err = run_command("bench_step", [
            "--depth", "8", "--batch", "2", "--rounds", "3", "--warmup", warmup, "--variants",
            "constant", "--compile-depths", "", "--out", str(out)], capsys)
        assert code == 143 and err[-1] == ("interrupted (SIGTERM): no table was written; the "
                                           "results files are as they were."), err
        assert not out.exists()


def test_compile_times_are_compiled_not_loaded_from_the_persistent_cache(tmp_path):
    """bench_step.py's compile times went through JAX's persistent cache where
    JAX_COMPILATION_CACHE_DIR was set: a second run timed loading the program (ResNet-20:
    5.7 s, then 1.2 s). The timed program is compiled with the cache off, not stored."""
    import jax.numpy as jnp
    from stochastic_depth_jax.training import compilation

    bench_step = load("bench_step")
    cache, before = tmp_path / "cache", jax.config.jax_compilation_cache_dir or ""
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # every program
    compilation.use_cache_dir(str(cache))
    try:
        with compilation.CompileStats() as stats:
            assert bench_step.compile_seconds(8, 2, False, jnp.float32) > 0
        assert jax.config.jax_compilation_cache_dir == str(cache)  # the setting, restored
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
        compilation.use_cache_dir(before)
    assert stats.programs >= 1 and stats.cache_hits == 0
    stored = os.listdir(cache) if cache.exists() else []  # the model's set-up may store some
    assert not [name for name in stored if name.startswith("jit_loss-")], stored


@pytest.mark.parametrize("when, mark, held", [
    ("compiling", "interrupted after 1 of 2 compile depths", "with 1 of 2 compile depths,"),
    ("last round", "interrupted before the compile depths", "without the compile depths,"),
])
def test_a_signal_after_the_rounds_writes_their_table_marked(tmp_path, capsys, monkeypatch,
                                                             when, mark, held):
    """bench_step.py times compilation at depths 110 and 1202 after its rounds: a Ctrl-C or
    SIGTERM then lost the rounds' table ('no table was written'); one in the last round left
    the compile times out of a table that said nothing of it."""
    bench_step = load("bench_step")
    compiled, steps, run_once = [], [], bench_step.run_once

    def compile_seconds(depth, *args):
        compiled.append(depth)
        if when == "compiling" and len(compiled) == 1:
            signal.raise_signal(signal.SIGTERM)
        return 1.5

    def step(r, gates):  # call 1 compiles, calls 2 and 3 are the rounds
        steps.append(r.name)
        if when == "last round" and len(steps) == 3:
            signal.raise_signal(signal.SIGTERM)
        return run_once(r, gates)

    monkeypatch.setattr(bench_step, "compile_seconds", compile_seconds)
    monkeypatch.setattr(bench_step, "run_once", step)
    out, js = tmp_path / "step.md", tmp_path / "step.json"
    code, err = run_command("bench_step", [
        "--depth", "8", "--batch", "2", "--rounds", "2", "--warmup", "0", "--variants",
        "constant", "--compile-depths", "20,56", "--json", str(js), "--out", str(out)], capsys)
    assert code == 143 and len(steps) == 3, err
    assert err[-1] == f"interrupted (SIGTERM): the table, {held} was appended, marked as " \
                      "interrupted."
    text = out.read_text()
    assert text.splitlines()[0].endswith(f" ({mark})")
    assert len(rows(out, ["constant"])["constant"]) == 6  # the rounds' row, whole (both ratios)
    assert ("| 20 | 1.5 |" in text) == (when == "compiling") and "| 56 |" not in text
    assert compiled == ([20] if when == "compiling" else [])
    medians = json.loads(js.read_text())  # the rounds are whole: their medians too
    # ... saying what was measured, as the table does (they named no depth, nor the run).
    assert (medians["depth"], medians["batch"], medians["rounds"], medians["scan"]) == (
        8, 2, 2, "auto")
    assert medians["label"].startswith("Run ") and "bench_step.py --depth 8" in medians["label"]


def test_an_interrupted_table_printed_only_does_not_say_it_was_appended(capsys):
    """bench_prune.py --no-write, interrupted in its rounds, said the table 'was appended'."""
    cli = load("bench_cli")

    def main(argv):
        for i in cli.rounds(3):
            if i == 0:
                signal.raise_signal(signal.SIGINT)
        cli.append_table("## a table\n\n| variant |\n", None)

    with pytest.raises(SystemExit) as stopped:
        cli.run(main, [])
    out, err = capsys.readouterr()
    assert stopped.value.code == 130
    assert "## a table (interrupted after 1 of 3 rounds)" in out and "appended" not in out
    assert err.splitlines()[-1] == ("interrupted (Ctrl-C): the table of the 1 of 3 timed "
                                    "rounds completed was printed only (written nowhere), "
                                    "marked as interrupted.")


@pytest.mark.parametrize("signalled_round, whole", [(1, True), (0, False)])
def test_the_json_medians_are_written_with_a_table_of_whole_rounds(tmp_path, capsys,
                                                                   signalled_round, whole):
    """bench_torch.py wrote its --json medians (compare_torch.py reads them) after appending
    its table: a signal in the last round, which leaves every round whole, raised the
    interruption before they were written. A table lacking rounds gets no medians file."""
    cli = load("bench_cli")
    out, js = tmp_path / "torch.md", tmp_path / "torch.json"
    medians = {"median_s": {"eager-fp32-constant": 0.25}}

    def main(argv):
        for i in cli.rounds(2):
            if i == signalled_round:
                signal.raise_signal(signal.SIGINT)
        cli.append_table("## a table\n\n| variant |\n", str(out), medians=(str(js), medians))

    with pytest.raises(SystemExit) as stopped:
        cli.run(main, [])
    assert stopped.value.code == 130
    assert ("## a table (interrupted after 1 of 2 rounds)" in out.read_text()) != whole
    if whole:
        assert json.loads(js.read_text()) == medians
    else:
        assert not js.exists()


def test_compare_torch_interrupted_says_what_its_benchmark_appended(tmp_path):
    """A Ctrl-C reached compare_torch.py and the bench_step.py it ran: the benchmark
    appended the table of its rounds done, marked, while compare_torch.py, which killed it
    a quarter of a second later (if it had not finished), said that no table was written.
    And that table's command line carried this machine's temporary paths."""
    out, step = tmp_path / "vs.md", tmp_path / "step.md"
    out.write_text(RECORDED)
    step.write_text(RECORDED)
    torch_python = tmp_path / "python"  # found to have torch; never run: stopped before
    torch_python.write_text("#!/bin/sh\nexit 0\n")
    torch_python.chmod(0o755)
    asked = ROUNDS_PAST_THE_SIGNAL
    proc = subprocess.Popen(
        [sys.executable, os.path.join(BENCHMARKS, "compare_torch.py"), "--torch-python",
         str(torch_python), "--depth", "8", "--batch", "2", "--rounds", str(asked),
         "--dtypes", "float32", "--variants", "constant,skip-remat-convs", "--out", str(out),
         "--step-out", str(step)],  # with the CPU's 'auto': refused without it
        env=child_env(TMPDIR=str(tmp_path)), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        while not proc.stdout.readline().startswith("round 2:"):  # 2 warm-up rounds before
            assert proc.poll() is None, proc.stderr.read()
        os.killpg(proc.pid, signal.SIGINT)  # a Ctrl-C in its terminal: its process group
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    [done] = re.findall(rf"\n## Train step, CifarResNet-8.*\(interrupted after (\d+) of {asked} "
                        r"rounds\)\n", step.read_text())
    assert err.splitlines()[-1] == (
        f"interrupted (Ctrl-C): no comparison table was written to {out}; bench_step.py "
        f"appended its table of float32 (interrupted after {done} of {asked} rounds) to {step}.")
    assert out.read_text() == RECORDED
    [label] = [line for line in step.read_text().splitlines() if line.startswith("Run ")]
    assert "--json '<tmp>/compare_torch-" in label and "--out '<tmp>/step.md'`" in label



# How each script that runs a child in a session of its own runs it: compare_torch.py its
# benchmark, gpu_suite.py its part.
_RUNS_A_CHILD = {
    "compare_torch": "compare_torch._run({cmd})",
    "gpu_suite": "gpu_suite.run_part({cmd}, 60, open(os.devnull, 'w'), dict(os.environ))",
}
_SLEEPER = ("[sys.executable, '-c', 'import os, time; print(os.getpid(), flush=True); "
            "time.sleep(60)']")


def _running_a_sleeper(script: str, first: str,
                       cmd: str = _SLEEPER) -> tuple[subprocess.Popen, int]:
    """A Python process that imports ``script`` (of :data:`_RUNS_A_CHILD`), runs ``first``,
    then has ``script`` run a child ``cmd`` (by default one that prints its pid and sleeps
    for a minute); returns the process and the pid of the sleeper (the first line of digits
    printed), once it runs."""
    runs = "\n".join([f"import os, sys; sys.path.insert(0, sys.argv[1]); import {script}",
                      first, _RUNS_A_CHILD[script].format(cmd=cmd)])
    proc = subprocess.Popen([sys.executable, "-u", "-c", runs, BENCHMARKS], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        while True:  # after compare_torch.py's '$ <command>' line
            line = proc.stdout.readline()
            assert line, f"{script}.py ended before its child started"
            if line.strip().isdigit():
                return proc, int(line)
    except BaseException:
        proc.kill()
        raise


@pytest.mark.parametrize("script", ["compare_torch", "gpu_suite"])
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGHUP])
def test_compare_torch_benchmark_dies_with_it(signum, script):
    """compare_torch.py runs each benchmark in a session of its own (a Ctrl-C reaches only
    compare_torch.py, which passes it on once): gpu_suite.py's budget, killing the part's
    process group (SIGKILL), or a closed terminal (SIGHUP) would leave the benchmark running
    on, on the GPU under the next part. gpu_suite.py's parts too: a suite killed at a
    machine's time limit left its part running, on the GPU under the next command (the part
    gets SIGTERM, on which a benchmark appends what it measured)."""
    # SIGHUP as in a terminal's session: a run under nohup (or CI) inherits it ignored.
    proc, child = _running_a_sleeper(
        script, "import signal; signal.signal(signal.SIGHUP, signal.SIG_DFL)")
    try:
        os.kill(proc.pid, signum)
        proc.wait(timeout=60)
        for _ in range(100):
            try:  # gone, or a zombie (killed) that nothing reaped
                with open(f"/proc/{child}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except FileNotFoundError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the benchmark outlived compare_torch.py")
    finally:
        proc.kill()
        for pid in [child] if child else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _state(pid):
    """The state letter of process ``pid`` (``/proc/<pid>/stat``): 'T' stopped, 'S', 'R'..."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _until_state(pid, stopped, timeout_s=10):
    """Whether process ``pid`` gets (``stopped``) or leaves the stopped state 'T' in time."""
    end = time.monotonic() + timeout_s
    while (_state(pid) == "T") != stopped:
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def test_child_stops_with_this_puts_back_what_it_installed_if_installing_is_interrupted(
        monkeypatch):
    """A Ctrl-C while ``child_stops_with_this`` installs its handlers (a KeyboardInterrupt
    before its SIGINT handler is in) left the SIGTSTP and SIGCONT handlers it had installed
    in place, not put back: a later Ctrl-Z was held for a child that never started, and did
    not stop the script."""
    cli = load("bench_cli")
    signums = (signal.SIGTSTP, signal.SIGCONT, signal.SIGINT)
    before = {s: signal.getsignal(s) for s in signums}
    install = signal.signal
    interrupted = []

    def interrupted_at_sigint(signum, handler):
        if signum == signal.SIGINT and not interrupted:
            interrupted.append(signum)
            raise KeyboardInterrupt
        return install(signum, handler)

    monkeypatch.setattr(signal, "signal", interrupted_at_sigint)
    with pytest.raises(KeyboardInterrupt):
        with cli.child_stops_with_this({signal.SIGINT: lambda signum, frame: None}):
            pass
    assert interrupted
    assert {s: signal.getsignal(s) for s in signums} == before


def _parent(pid):
    """The parent process id of process ``pid`` (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_ctrl_z_stops_gpu_suite_s_part_with_the_benchmark_that_part_runs():
    """gpu_suite.py's vs-torch part is compare_torch.py, which runs its benchmark in a
    session of its own: a Ctrl-Z stopped the suite and compare_torch.py (SIGSTOP to the
    part's process group), and the benchmark ran on, holding the GPU. It stops with them,
    and continues with them."""
    runs = (f"import sys; sys.path.insert(0, {BENCHMARKS!r}); import compare_torch; "
            f"compare_torch._run({_SLEEPER})")
    proc, benchmark = _running_a_sleeper("gpu_suite", "os.setpgid(0, 0)",
                                         cmd=f"[sys.executable, '-c', {runs!r}]")
    part = _parent(benchmark)  # compare_torch.py
    try:
        os.kill(proc.pid, signal.SIGTSTP)
        assert _until_state(benchmark, stopped=True), "Ctrl-Z did not stop the part's benchmark"
        assert _until_state(part, stopped=True), "Ctrl-Z did not stop the part"
        assert _until_state(proc.pid, stopped=True), "Ctrl-Z did not stop gpu_suite.py"
        os.kill(proc.pid, signal.SIGCONT)
        assert _until_state(part, stopped=False), "SIGCONT did not continue the part"
        assert _until_state(benchmark, stopped=False), "SIGCONT did not continue the benchmark"
    finally:
        for pid in (proc.pid, part, benchmark):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


# A Ctrl-Z that comes as the child starts, before the script that starts it knows it.
_CTRL_Z_WHILE_STARTING = """import signal, subprocess
class _Popen(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        print(self.pid, flush=True)
        signal.raise_signal(signal.SIGTSTP)
subprocess.Popen = _Popen"""


@pytest.mark.parametrize("racing", [False, True], ids=["running", "while-starting"])
@pytest.mark.parametrize("script", ["compare_torch", "gpu_suite"])
def test_ctrl_z_stops_and_continues_the_child(script, racing):
    """compare_torch.py runs each benchmark, gpu_suite.py each part, in a session of its
    own, so a Ctrl-Z in the terminal (SIGTSTP to its process group) stopped the script only,
    and the child ran on, holding the machine. SIGTSTP now stops both, SIGCONT (`fg`, `bg`)
    continues both; also a Ctrl-Z that comes while the child is being started, before
    the script knows it (it stopped the script only)."""
    # A process group of its own in this session, as a shell's job: an orphaned group
    # (this test run in a session of its own) would ignore SIGTSTP.
    first = "os.setpgid(0, 0)" + ("\n" + _CTRL_Z_WHILE_STARTING if racing else "")
    proc, child = _running_a_sleeper(script, first)
    try:
        if not racing:
            os.kill(proc.pid, signal.SIGTSTP)
        assert _until_state(child, stopped=True), f"Ctrl-Z did not stop {script}.py's child"
        assert _until_state(proc.pid, stopped=True), f"Ctrl-Z did not stop {script}.py"
        os.kill(proc.pid, signal.SIGCONT)
        assert _until_state(proc.pid, stopped=False)
        assert _until_state(child, stopped=False), "SIGCONT did not continue the child"
    finally:
        proc.kill()
        proc.wait()
        for pid in [child] if child else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_compare_torch_runs_no_python_between_fork_and_exec(monkeypatch):
    """compare_torch.py set the parent-death signal in a ``preexec_fn``: Python code in the
    child between fork and exec, which may deadlock where the parent has threads (JAX's).
    The benchmark runs the same command, in a session of its own."""
    compare_torch, started = load("compare_torch"), []

    def popen(cmd, **kwargs):
        started.append((cmd, kwargs))
        raise OSError("recorded")

    monkeypatch.setattr(compare_torch.subprocess, "Popen", popen)
    with pytest.raises(OSError, match="recorded"):
        compare_torch._run(["python", "bench_step.py", "--depth", "8"])
    [(cmd, kwargs)] = started
    assert kwargs.get("preexec_fn") is None and kwargs["start_new_session"]
    assert cmd[-4:] == ["python", "bench_step.py", "--depth", "8"]


def test_a_benchmark_whose_reader_exits_stops_quietly(tmp_path):
    """`bench_step.py | head -3` ended with the trainer's line, 'error: The output's reader
    exited (...): stopped. Checkpoints saved before are kept; run the same command again to
    resume, ...', and exit status 1. A benchmark that prints its rounds until the reader
    exits (bench_step.py's compilation would cost seconds): one line, exit status 141."""
    prints = ("import sys; sys.path.insert(0, sys.argv[1]); import bench_cli, itertools; "
              "bench_cli.run(lambda argv: [print(f'round {i}', flush=True) "
              "for i in itertools.count()])")
    proc = subprocess.Popen([sys.executable, "-c", prints, BENCHMARKS], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert [proc.stdout.readline() for _ in range(3)] == ["round 0\n", "round 1\n",
                                                               "round 2\n"]  # | head -3
        proc.stdout.close()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 141 and err.splitlines() == [
        "interrupted (its output's reader exited, e.g. `| head`): no table was written; the "
        "results files are as they were."], err


def test_command_lines_write_paths_as_any_machine_reads_them(tmp_path, monkeypatch):
    """The tables' command lines carried this machine's paths (compare_torch.py's temporary
    --json files, a venv's --torch-python, an absolute --out), replaced by hand before the
    tables were committed."""
    provenance = load("provenance")
    home, temp = tmp_path / "home", tmp_path / "tmp"
    (temp / "run").mkdir(parents=True)
    (home / "venv" / "bin").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    repo = os.path.dirname(os.path.abspath(BENCHMARKS))
    monkeypatch.chdir(BENCHMARKS)  # a relative path is read from here, written from the root
    line = provenance.command_line("compare_torch.py", [
        "--torch-python", str(home / "venv" / "bin" / "python"),
        "--out", os.path.join(repo, "benchmarks", "results", "vs.md"),
        "--step-out", os.path.join("results", "step.md"),
        "--json=" + str(temp / "run" / "a b.json"), "--plot", str(home / "plot.png"),
        "--images-dir", "/data/cifar",  # elsewhere: whole, it matters to rerun the command
        "--compile-depths", "", "--variants", "constant,skip"])
    assert line == (
        "python benchmarks/compare_torch.py --torch-python '<python with torch>' "
        "--out benchmarks/results/vs.md --step-out benchmarks/results/step.md "
        "--json='<tmp>/run/a b.json' --plot ~/plot.png --images-dir /data/cifar "
        "--compile-depths '' --variants constant,skip")
    # Pasted into a shell, a placeholder is one word: `<tmp>/x`, bare, was two redirections
    # (from a file 'tmp', into '/x': run where 'tmp' exists, it wrote there).
    words = list(shlex.shlex(line, posix=True, punctuation_chars=True))
    assert "<python with torch>" in words and "--json=<tmp>/run/a b.json" in words
    assert not [w for w in words if w and set(w) <= set("<>|&;()")], words
    inside = os.path.join(repo, "torch-venv", "bin", "python")
    for python, shown in [(inside, "torch-venv/bin/python"), ("python3", "python3")]:
        assert provenance.command_line("x.py", ["--torch-python", python]).endswith(shown)
    # The scripts' own labels, from their flags.
    torch_python = home / "venv" / "bin" / "python"
    torch_python.write_text("#!/bin/sh\nexit 0\n")
    torch_python.chmod(0o755)
    monkeypatch.setattr(load("bench_cli"), "child_backend", lambda: "cpu")
    vs = load("compare_torch").parse_args([
        "--torch-python", str(torch_python), "--depth", "8", "--out", str(temp / "vs.md"),
        "--step-out", str(home / "step.md")]).label
    assert ("`python benchmarks/compare_torch.py --torch-python '<python with torch>' "
            "--depth 8 --out '<tmp>/vs.md' --step-out ~/step.md`") in vs
    step = load("bench_step").parse_args(["--depth", "8", "--json", str(temp / "run" / "s.json"),
                                          "--out", str(home / "step.md")]).label
    assert "`python benchmarks/bench_step.py --depth 8 --json '<tmp>/run/s.json' --out " \
           "~/step.md`" in step


def test_command_lines_write_a_file_named_alone_from_the_root(monkeypatch):
    """Run from benchmarks/, `--out mine.md` wrote to benchmarks/mine.md while its command
    line said `--out mine.md` (pasted at the root: a file there); a value that only looked
    like a path from there (`--variants results/x`) was rewritten as one."""
    provenance = load("provenance")
    monkeypatch.chdir(BENCHMARKS)
    assert provenance.command_line("bench_step.py", [
        "--out", "mine.md", "--json=m.json", "--variants", "results/x",
        "--torch-python", "python3"]) == (
        "python benchmarks/bench_step.py --out benchmarks/mine.md --json=benchmarks/m.json "
        "--variants results/x --torch-python python3")


def test_an_abbreviated_flag_is_refused(tmp_path, capsys):
    """argparse took `--js FILE` for `--json FILE`, and the table's command line, which
    writes a path portably by its flag's full name, recorded this machine's path. Every
    script's parser takes full names only."""
    js = tmp_path / "s.json"
    with pytest.raises(SystemExit) as stopped:
        load("bench_step").parse_args(["--js", str(js), "--out", ""])
    assert stopped.value.code == 2
    assert f"unrecognized arguments: --js {js}" in capsys.readouterr().err
    scripts = [name for name in os.listdir(BENCHMARKS) if name.endswith(".py")]
    assert not [name for name in scripts if name != "bench_cli.py" and "argparse.ArgumentParser("
                in open(os.path.join(BENCHMARKS, name)).read()]  # bench_cli.argument_parser


# Prepended to a stand-in part's code: once its own handlers are in, it sends the suite
# (this test process, argv[1]) the signal argv[2], before it prints anything, so that the
# suite waits in its read of the part's output. A thread of the test that sent it on seeing
# the part's first line in the log took the interpreter's lock from the suite's thread at the
# points where that thread gave it up: just before the read (the signal then waited for the
# part's end) or in JAX's garbage-collection callback (which drops what it raises: the suite
# ran the part to its end and exited 0). Under load that failed a test now and then.
_SIGNALS_THE_SUITE = "import os, sys\nsuite, signum = int(sys.argv[1]), int(sys.argv[2])\n"


def test_gpu_suite_interrupted_stops_the_part_and_logs_it(tmp_path, capsys, monkeypatch):
    suite = load("gpu_suite")
    # SIGTERM once the part has started (sent by the part), not after a fixed delay: a
    # loaded machine may not have started it 3 s in.
    slow = suite.Part("slow", 1, ("-c", _SIGNALS_THE_SUITE + "import time\n"
                                  "os.kill(suite, signum); print('slow started', flush=True)\n"
                                  "time.sleep(60)", str(os.getpid()), str(int(signal.SIGTERM))))
    monkeypatch.setattr(suite, "BY_NAME", {"slow": slow})
    monkeypatch.setattr(suite, "backend", lambda: "gpu")
    status, err = run_command("gpu_suite", ["--parts", "slow", "--out-dir", str(tmp_path)],
                              capsys)
    assert status == 143 and len(err) == 1
    assert err[0].startswith("interrupted (SIGTERM): part slow stopped")
    log = (tmp_path / "gpu_suite.log").read_text()
    assert "slow started" in log and "slow: interrupted (SIGTERM)" in log


# A part that, on Ctrl-C or SIGTERM, appends the table of what it measured, marked, as a
# benchmark in its timed rounds does, after a moment (the suite SIGKILLed it at once).
_WRITES_ON_SIGNAL = _SIGNALS_THE_SUITE + textwrap.dedent("""\
    import signal, sys, time
    def table(signum, frame):
        time.sleep(0.5)
        with open(sys.argv[3], 'a') as f:
            f.write('## Toy (interrupted after 1 of 2 rounds)\\n\\n| variant | ms |\\n'
                    '|---|---|\\n| constant | 1.0 |\\n\\n')
        print('appended after', signal.Signals(signum).name, flush=True)
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, table)
    signal.signal(signal.SIGINT, table)
    os.kill(suite, signum)
    print('rounds started', flush=True)
    time.sleep(60)
    """)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_gpu_suite_interrupted_lets_its_part_write_what_it_measured(tmp_path, capsys,
                                                                    monkeypatch, signum):
    """A SIGTERM to the suite (a lent machine's time limit) or a Ctrl-C SIGKILLed its running
    part at once: a benchmark in its timed rounds, or bench_train.py's whole epochs, lost
    what it had measured. Now the signal is passed on, and the part given time to append
    it; one that does not stop is killed at the end of that wait."""
    suite = load("gpu_suite")
    to_suite = (str(os.getpid()), str(int(signum)))  # the part signals the suite, when ready
    rounds = suite.Part("rounds", 1, ("-c", _WRITES_ON_SIGNAL, *to_suite, "{out}/toy.md"))
    stubborn = suite.Part("stubborn", 1, ("-c", _SIGNALS_THE_SUITE + textwrap.dedent("""\
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.kill(suite, signum)
        print('stubborn started', flush=True)
        time.sleep(60)
        """), *to_suite))
    monkeypatch.setattr(suite, "BY_NAME", {p.name: p for p in (rounds, stubborn)})
    monkeypatch.setattr(suite, "backend", lambda: "gpu")
    monkeypatch.setattr(suite, "preflight", lambda parts: "versions: stand-in")
    monkeypatch.setattr(suite, "PASS_ON_WAIT_S", 2.0)
    log = tmp_path / "gpu_suite.log"
    how = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    for name in ("rounds", "stubborn"):
        t0 = time.perf_counter()
        status, err = run_command("gpu_suite", ["--parts", name, "--budget", "100",
                                                "--out-dir", str(tmp_path)], capsys)
        assert status == 128 + signum and len(err) == 1, err
        # A hang detector: not the part's minute, nor the budget's 100 s (a few seconds).
        assert time.perf_counter() - t0 < 50
    summaries = [part.splitlines() for part in log.read_text().split("=== summary\n")[1:]]
    assert f"appended after {signal.Signals(signum).name}" in log.read_text()
    assert summaries[0][0] == (f"rounds: interrupted ({how}); stopped after it appended what "
                               f"it measured (interrupted after 1 of 2 rounds)")
    assert "| constant | 1.0 |" in (tmp_path / "toy.md").read_text()
    assert summaries[1][0] == f"stubborn: interrupted ({how}); its table was not written"
    assert err[0] == (f"interrupted ({how}): part stubborn stopped and its table not written; "
                      f"the parts before it wrote theirs (summary in {log}).")


# A part that, on Ctrl-C, writes 'got SIGINT' and exits; otherwise ends after argv[1]'s
# seconds. Its files in argv[2]: 'ready' (its handler is in), 'ended' (it ran to its end).
_ENDS_ON_CTRL_C = textwrap.dedent("""\
    import os, signal, sys, time
    def got(signum, frame):
        print('got', signal.Signals(signum).name, flush=True)
        sys.exit(128 + signum)
    signal.signal(signal.SIGINT, got)
    open(os.path.join(sys.argv[2], 'ready'), 'w').close()
    print('started', flush=True)
    time.sleep(float(sys.argv[1]))
    open(os.path.join(sys.argv[2], 'ended'), 'w').close()
    """)


def test_gpu_suite_handles_a_ctrl_c_that_lands_before_its_read(tmp_path, capsys, monkeypatch):
    """A Ctrl-C or SIGTERM that landed just before the suite's blocking read of the part's
    output (CPython runs a handler between bytecodes) waited for the part's next line: a
    part compiling for minutes ran on, and the suite stopped only after it had ended. The
    read waits at most READ_WAIT_S at a time. A handler pending without a signal
    (``_thread.interrupt_main``) is that state: no read is interrupted."""
    suite = load("gpu_suite")
    part = suite.Part("quiet", 1, ("-c", _ENDS_ON_CTRL_C, "60", str(tmp_path)))
    monkeypatch.setattr(suite, "BY_NAME", {"quiet": part})
    monkeypatch.setattr(suite, "backend", lambda: "gpu")
    monkeypatch.setattr(suite, "preflight", lambda parts: "versions: stand-in")
    log, main = tmp_path / "gpu_suite.log", threading.main_thread().ident

    def waiting():  # the suite's thread waits for the part's output
        frame = sys._current_frames().get(main)
        return frame is not None and frame.f_code.co_filename == suite.__file__

    def pending_ctrl_c():
        end = time.monotonic() + 120
        while not ((tmp_path / "ready").exists() and waiting()):
            if time.monotonic() > end:
                return  # the test fails on what the log lacks
            time.sleep(0.02)
        _thread.interrupt_main(signal.SIGINT)

    sender = threading.Thread(target=pending_ctrl_c)
    sender.start()
    try:
        status, err = run_command("gpu_suite", ["--parts", "quiet", "--out-dir",
                                                str(tmp_path)], capsys)
    finally:
        sender.join()
    lines = log.read_text().splitlines()
    assert status == 130 and "got SIGINT" in lines, lines[-8:]
    assert not (tmp_path / "ended").exists()  # it was passed the Ctrl-C, not waited for
    assert err[0].startswith("interrupted (Ctrl-C): part quiet stopped")


def test_gpu_suite_passes_on_a_ctrl_c_that_lands_while_it_starts_its_timers(
        tmp_path, capsys, monkeypatch):
    """A Ctrl-C that landed after the part had started, while the suite started the
    budget's timers, was neither passed on nor followed by a kill: the part ran on
    unwatched, said not to have written its table, and the timers (threads the interpreter
    waits for at its exit) kept the suite from exiting until the budget's end."""
    suite = load("gpu_suite")
    ready = tmp_path / "ready"
    part = suite.Part("quiet", 1, ("-c", _ENDS_ON_CTRL_C, "60", str(tmp_path)))
    monkeypatch.setattr(suite, "BY_NAME", {"quiet": part})
    monkeypatch.setattr(suite, "backend", lambda: "gpu")
    monkeypatch.setattr(suite, "preflight", lambda parts: "versions: stand-in")
    started = []

    class CtrlCAtTheSecond(threading.Timer):
        def start(self):
            started.append(self)
            if len(started) == 2:  # the part's handler in, then a Ctrl-C as this one starts
                end = time.monotonic() + 120
                while not ready.exists() and time.monotonic() < end:
                    time.sleep(0.02)
                raise KeyboardInterrupt
            super().start()

    monkeypatch.setattr(suite.threading, "Timer", CtrlCAtTheSecond)
    try:
        status, err = run_command("gpu_suite", ["--parts", "quiet", "--out-dir",
                                                str(tmp_path)], capsys)
        cancelled = started[0].finished.is_set()  # the suite can exit
    finally:
        for timer in started:
            timer.cancel()
    lines = (tmp_path / "gpu_suite.log").read_text().splitlines()
    assert status == 130 and "got SIGINT" in lines and cancelled, lines[-8:]


def test_gpu_suite_ctrl_c_after_the_budgets_sigterm_is_not_said_to_be_passed_on(tmp_path,
                                                                               capsys):
    """A Ctrl-C after the budget's SIGTERM had been sent to the part is, rightly, not passed
    on (a second signal stops a benchmark at once, nothing written), but the log said
    'Ctrl-C: passed on to the running part': it names now the SIGTERM the part is handling.
    Before it, the Ctrl-C is passed on and said to be."""
    suite = load("gpu_suite")
    part = textwrap.dedent("""\
        import signal, sys, time
        def got(signum, frame):
            print('got', signal.Signals(signum).name, flush=True)
            sys.exit(128 + signum)
        signal.signal(signal.SIGINT, got)
        print('started', flush=True)
        time.sleep(float(sys.argv[1]))
        print('ended', flush=True)
        """)
    for already, sleep_s in ((True, "0.5"), (False, "60")):
        proc = subprocess.Popen([sys.executable, "-c", part, sleep_s], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            assert proc.stdout.readline() == "started\n"
            with open(tmp_path / f"{already}.log", "w+") as log:
                suite._pass_on(proc, KeyboardInterrupt(), log, already=already)
                log.seek(0)
                said, *then = log.read().splitlines()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if already:
            assert said.startswith("Ctrl-C: the running part was already sent the budget's "
                                   "SIGTERM, not this; ") and then == ["ended"], (said, then)
        else:
            assert said.startswith("Ctrl-C: passed on to the running part; ") and then == [
                "got SIGINT"], (said, then)
        assert "waiting up to 30 s for it, no later than the budget's end" in said
    capsys.readouterr()


class ReaderExits(io.StringIO):
    """A stdout whose reader (`| head`) exits at the first text that starts with ``last``."""

    def __init__(self, last: str):
        super().__init__()
        self.last, self.gone = last, False

    def write(self, text):
        self.gone = self.gone or text.startswith(self.last)
        if self.gone:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def test_gpu_suite_whose_reader_exits_says_what_was_written(tmp_path, capsys, monkeypatch):
    """`gpu_suite.py | head`: the suite stopped saying "no table was written; the results
    files are as they were" although the parts before had written theirs, and its log lost
    the running part's line and the summary."""
    suite = load("gpu_suite")
    parts = [suite.Part(name, 1, ("-c", f"print('{name} ran')")) for name in ("one", "two")]
    monkeypatch.setattr(suite, "BY_NAME", {p.name: p for p in parts})
    monkeypatch.setattr(suite, "backend", lambda: "gpu")
    log = tmp_path / "gpu_suite.log"
    for last, stopped in (("two ran", "part two stopped and its table not written; the parts "
                                      f"before it wrote theirs (summary in {log})."),
                          ("\n=== summary", f"every part had run; the summary is in {log}.")):
        monkeypatch.setattr(sys, "stdout", ReaderExits(last))
        status, err = run_command("gpu_suite", ["--out-dir", str(tmp_path)], capsys)
        assert status == 141 and err == [
            f"interrupted (its output's reader exited, e.g. `| head`): {stopped}"], err
        summary = log.read_text().rpartition("=== summary\n")[2].splitlines()
        assert [line.split(",")[0] for line in summary] == ["one: ok", "two: ok"] if (
            last == "\n=== summary") else ["one: ok", "two: interrupted (its output's reader "
                                         "exited, e.g. `| head`); its table was not written"]
    assert log.read_text().splitlines().count("two ran") == 2  # the line that hit the closed pipe


def test_a_table_appended_to_the_results_is_not_a_code_change(tmp_path):
    """The second of two runs read 'code <commit> + uncommitted changes': the only change
    was the first run's table, appended to benchmarks/results."""
    bench = tmp_path / "benchmarks"
    (bench / "results").mkdir(parents=True)
    shutil.copy(os.path.join(BENCHMARKS, "provenance.py"), bench)
    (bench / "results" / "step_cpu.md").write_text(RECORDED)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "recorded"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    version = runpy.run_path(str(bench / "provenance.py"))["code_version"]
    assert not version().endswith("uncommitted changes")
    (bench / "results" / "step_cpu.md").write_text(RECORDED + "## a new table\n")
    assert not version().endswith("uncommitted changes")
    (bench / "provenance.py").write_text((bench / "provenance.py").read_text() + "\n# edit\n")
    assert version().endswith(" + uncommitted changes")


def test_results_paths_never_lose_a_file(tmp_path):
    cli = load("bench_cli")
    recorded = tmp_path / "plot.png"
    recorded.write_text("recorded")
    assert cli.fresh_file(str(recorded), "--plot") == str(tmp_path / "plot-1.png")
    assert cli.results_path(str(recorded), "x.md") == str(recorded)  # only opened to check
    assert recorded.read_text() == "recorded"
    assert cli.results_path(None, "x.md") == os.path.normpath(
        os.path.join(BENCHMARKS, "results", "x.md"))
    assert not os.path.exists(os.path.join(BENCHMARKS, "results", "x.md"))
    with pytest.raises(cli.FlagError, match="is a directory; give a file in it"):
        cli.results_path(str(tmp_path), "x.md")


def bench_torch_without_torch(monkeypatch):
    """``bench_torch.py``'s functions where PyTorch is not installed (its flags need none of
    it): imported over a stand-in ``torch`` of a machine without a GPU."""
    import types
    torch = types.ModuleType("torch")
    torch.nn = types.ModuleType("torch.nn")
    torch.nn.Module = object
    torch.nn.functional = types.ModuleType("torch.nn.functional")
    torch.cuda = types.SimpleNamespace(is_available=lambda: False)
    for module in (torch, torch.nn, torch.nn.functional):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(sys, "path", list(sys.path))  # it adds benchmarks/ for its imports
    return types.SimpleNamespace(**runpy.run_path(os.path.join(BENCHMARKS, "bench_torch.py")))


def test_bench_torch_times_no_round_that_compiles(tmp_path, monkeypatch):
    """``--warmup 0``: round 0, which runs every block (all gates on) so that torch.compile
    compiles each branch, was timed: compilation in a step's median, and a table saying
    "(compilation in warm-up)" of no warm-up."""
    bench_torch = bench_torch_without_torch(monkeypatch)
    with pytest.raises(load("bench_cli").FlagError,
                       match=r"--warmup 0: at least 1 \(the first round runs every block"):
        bench_torch.parse_args(["--warmup", "0", "--out", ""])
    assert bench_torch.parse_args(["--warmup", "1", "--out", ""]).warmup == 1


def test_bench_torch_refuses_the_whole_epochs_sizes_without_whole_epochs(monkeypatch):
    """``--epochs 3`` without ``--whole-epochs`` was ignored: the train steps were timed, and
    the table said "Not the default sizes (--epochs 3 ...)", a size not measured."""
    bench_torch = bench_torch_without_torch(monkeypatch)
    with pytest.raises(load("bench_cli").FlagError, match=r"^--epochs, --test-images are "
                       r"used only with --whole-epochs, so here they would be ignored"):
        bench_torch.parse_args(["--epochs", "3", "--test-images", "100", "--out", ""])
    assert bench_torch.parse_args(["--whole-epochs", "--epochs", "3", "--out", ""]).epochs == 3
    assert bench_torch.parse_args(["--epochs", "2", "--out", ""]).epochs == 2  # the default
    # ... and the other way: whole epochs time no rounds (the suite's dry run passed them).
    with pytest.raises(load("bench_cli").FlagError, match=r"^--rounds, --warmup are used "
                       r"only without --whole-epochs \(the train steps timed\), so here"):
        bench_torch.parse_args(["--whole-epochs", "--rounds", "2", "--warmup", "1", "--out", ""])
    assert bench_torch.parse_args(["--whole-epochs", "--warmup", "3", "--out", ""]).whole_epochs


def test_bench_torch_refuses_json_with_whole_epochs(tmp_path, capsys, monkeypatch):
    """`bench_torch.py --whole-epochs --json FILE` ran for minutes and wrote no FILE, saying
    nothing of it: its --json medians are the train steps' (compare_torch.py's)."""
    bench_torch = bench_torch_without_torch(monkeypatch)
    js, out = tmp_path / "epochs.json", tmp_path / "t.md"
    with pytest.raises(SystemExit) as stopped:
        load("bench_cli").run(bench_torch.main, ["--whole-epochs", "--json", str(js), "--out",
                                                 str(out)])
    err = capsys.readouterr().err.splitlines()
    assert stopped.value.code == 1 and err == [
        f"error: --json {js} with --whole-epochs: the --json medians are of train steps "
        f"(compare_torch.py reads them); whole epochs write their table only. Drop one of the "
        f"two flags."]
    assert not js.exists() and not out.exists()
    assert bench_torch.parse_args(["--json", str(js), "--out", str(out)]).json == str(js)


def _torch_whole_epochs(monkeypatch, tmp_path, capsys, train, done=None):
    """bench_torch.py --whole-epochs eager-fp32-constant,eager-fp32-skip, run as its main
    runs it, without PyTorch: ``train(name)`` stands in for a variant's epochs (its row),
    ``done(name)`` after its figures are printed. (table path, exit status, stderr)."""
    import types
    bench_torch = bench_torch_without_torch(monkeypatch)
    monkeypatch.setattr(bench_torch.torch, "get_num_threads", lambda: 1, raising=False)
    monkeypatch.setattr(bench_torch.torch, "__version__", "stand-in", raising=False)
    names = ["eager-fp32-constant", "eager-fp32-skip"]
    code = bench_torch.whole_epochs.__globals__
    monkeypatch.setitem(code, "epoch_data", lambda args, device: ([[0] * 64], [[0] * 64]))
    monkeypatch.setitem(code, "variant_epochs", lambda args, device, name, *data: train(name))
    print_row = code["print_row"]
    monkeypatch.setitem(code, "print_row",
                        lambda args, row: (print_row(args, row), done and done(row[0])))
    out = tmp_path / "torch_epochs.md"
    out.write_text(RECORDED)
    args = bench_torch.parse_args(["--whole-epochs", "--variants", ",".join(names), "--batch",
                                   "16", "--train-images", "64", "--out", str(out)])
    device = types.SimpleNamespace(type="cpu")
    code, err = run_command_main(lambda argv: load("bench_cli").append_table(
        bench_torch.whole_epochs(args, device, args.names), args.out), capsys)
    return out, code, err


def run_command_main(main, capsys):
    """``(exit status, stderr lines)`` of ``main`` run as a benchmark's ``__main__``."""
    with pytest.raises(SystemExit) as stopped:
        load("bench_cli").run(main, [])
    return stopped.value.code, capsys.readouterr().err.splitlines()


def _row(name):
    return name, 2.0, 1.0 if name.endswith("constant") else 0.8, 0.1


def _signalled_in(stopped):
    """A stand-in for a variant's epochs that sends this process SIGTERM in variant
    ``stopped``'s steps and trains on for a minute (a stop at once ends it)."""
    def train(name):
        if name == stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(600):
                time.sleep(0.1)
            raise AssertionError("the variant ran on after the signal")
        return _row(name)
    return train


def test_bench_torch_whole_epochs_stopped_keeps_the_variants_that_finished(
        tmp_path, capsys, monkeypatch):
    """gpu_suite.py's budget SIGTERM during bench_torch.py --whole-epochs ended it at once:
    only the log lines of the variants that finished survived, no table (bench_train.py
    appended their rows). Now the variant training stops at once and the rows of those
    that finished are appended, the heading naming the one stopped, as bench_train.py's."""
    out, code, err = _torch_whole_epochs(monkeypatch, tmp_path, capsys,
                                         _signalled_in("eager-fp32-skip"))
    assert code == 143 and err[-1] == (
        "interrupted (SIGTERM): the table of those that finished was appended, marked as "
        "interrupted."), err
    text = out.read_text()
    assert text.startswith(RECORDED)
    assert "(interrupted before the variant eager-fp32-skip finished)" in text
    assert sorted(rows(out, ["eager-fp32-constant", "eager-fp32-skip"])) == [
        "eager-fp32-constant"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers put back
    # None finished: nothing is written.
    out, code, err = _torch_whole_epochs(monkeypatch, tmp_path, capsys,
                                         _signalled_in("eager-fp32-constant"))
    assert code == 143 and err[-1] == (
        "interrupted (SIGTERM): no table was written; the results files are as they were.")
    assert out.read_text() == RECORDED


def test_bench_torch_whole_epochs_signal_after_the_last_variant(tmp_path, capsys,
                                                               monkeypatch):
    """A signal after the last variant finished (its figures printed): the table is whole,
    appended as it is, and the exit says so."""
    def last_done(name):
        if name == "eager-fp32-skip":
            os.kill(os.getpid(), signal.SIGTERM)

    out, code, err = _torch_whole_epochs(monkeypatch, tmp_path, capsys, _row, last_done)
    assert code == 143 and err[-1] == (
        "interrupted (SIGTERM): every one of the variants had finished; the table was "
        "appended whole."), err
    assert "interrupted" not in out.read_text().removeprefix(RECORDED)
    found = rows(out, ["eager-fp32-constant", "eager-fp32-skip"])
    assert sorted(found) == ["eager-fp32-constant", "eager-fp32-skip"]
    assert found["eager-fp32-skip"][4] == "0.800"  # skip / constant


def test_bench_torch_whole_epochs_appends_its_rows_when_the_suite_died(
        tmp_path, capsys, monkeypatch):
    """gpu_suite.py killed: its part gets SIGTERM (PR_SET_PDEATHSIG) with no reader on its
    output; the stop's line must not keep the finished rows from being appended."""
    train = _signalled_in("eager-fp32-skip")

    def suite_died(name):
        if name == "eager-fp32-skip":
            monkeypatch.setattr(sys, "stdout", _ReaderGone())
            monkeypatch.setattr(sys, "stderr", _ReaderGone())
        return train(name)

    out, code, err = _torch_whole_epochs(monkeypatch, tmp_path, capsys, suite_died)
    assert code == 143
    assert "(interrupted before the variant eager-fp32-skip finished)" in out.read_text()
    assert sorted(rows(out, ["eager-fp32-constant", "eager-fp32-skip"])) == [
        "eager-fp32-constant"]


# The scripts that take --out, and what else their flags need here.
OUT_SCRIPTS = {"bench_step": [], "bench_train": [], "bench_data": [], "bench_drop_path": [],
               "bench_prune": [], "compact_buckets": [], "stage_costs": [], "profile_step": [],
               "bench_torch": [], "compare_torch": ["--torch-python", "{torch}"]}


def test_out_empty_prints_only_in_every_script(tmp_path, capsys, monkeypatch):
    """`--out ''` meant the committed table (bench_step.py's default, benchmarks/results/
    step_cpu.md) in every script but bench_train.py, which printed only: a smoke run that
    asked for no file appended to the recorded results. Now '' prints only, everywhere, and
    each --help says so."""
    taking_out = [name[:-3] for name in os.listdir(BENCHMARKS) if name.endswith(".py")
                  and 'add_argument("--out"' in open(os.path.join(BENCHMARKS, name)).read()]
    assert sorted(taking_out) == sorted(OUT_SCRIPTS)  # a new script is checked here too
    torch_python = tmp_path / "python"  # found to have torch; compare_torch.py runs nothing
    torch_python.write_text("#!/bin/sh\nexit 0\n")
    torch_python.chmod(0o755)
    monkeypatch.setattr(load("bench_cli"), "child_backend", lambda: "cpu")
    for name, needed in OUT_SCRIPTS.items():
        module = bench_torch_without_torch(monkeypatch) if name == "bench_torch" else load(name)
        argv = [a.format(torch=torch_python) for a in needed]
        assert module.parse_args(argv + ["--out", ""]).out is None, name
        with pytest.raises(SystemExit):
            module.parse_args(argv + ["--help"])
        assert "'' to print it only, writing no file" in " ".join(
            capsys.readouterr().out.split()), name
    assert load("compare_torch").parse_args(["--torch-python", str(torch_python), "--step-out",
                                             ""]).step_out is None
    assert load("bench_prune").parse_args(["--no-write"]).out is None  # its older spelling


def test_bench_prune_times_each_pruned_model_against_the_full_one(capsys):
    """Without fraction 0 the least pruned model was the 'full' one of 'time / full' (its
    row read 1.00); the full model is now always measured."""
    load("bench_prune").main(["--no-write", "--depth", "8", "--batch", "1", "--rounds", "1",
                              "--fractions", "0.5"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if re.match(r"\| \d", line)]
    assert [(r[0], r[1], r[5]) for r in rows][:1] == [("| 0", "3", "1.00")]
    assert [r[:2] for r in rows] == [["| 0", "3"], ["| 2", "1"]]  # 0.5 of 3 blocks: 2


def test_bench_prune_first_calls_are_compiled_not_loaded_from_the_persistent_cache(
        tmp_path, capsys):
    """Its 'first call (compile) s' column went through JAX's persistent cache where
    JAX_COMPILATION_CACHE_DIR was set: a second run timed loading the programs. They are
    compiled with the cache off, and not stored."""
    from stochastic_depth_jax.training import compilation

    cache, before = tmp_path / "cache", jax.config.jax_compilation_cache_dir or ""
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # every program
    compilation.use_cache_dir(str(cache))
    try:
        load("bench_prune").main(["--no-write", "--depth", "8", "--batch", "1", "--rounds",
                                  "1", "--fractions", "0.5"])
        assert jax.config.jax_compilation_cache_dir == str(cache)  # the setting, restored
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
        compilation.use_cache_dir(before)
    assert "first call (compile) s" in capsys.readouterr().out
    stored = os.listdir(cache) if cache.exists() else []  # the model's set-up may store some
    assert not [name for name in stored if name.startswith("jit__lambda-")], stored


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_a_benchmark_imports_jax_is_one_line(signum, tmp_path):
    """A Ctrl-C while a benchmark still imported JAX (seconds, before any flag is read)
    printed a KeyboardInterrupt traceback from inside the import; a SIGTERM killed it
    without a word."""
    out = tmp_path / "step.md"
    importing = (  # stands for the seconds JAX takes to import: the signal lands in them
        "import runpy, sys, time\n"
        "class SlowJax:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'jax':\n"
        "            print('importing jax', flush=True)\n"
        "            for _ in range(600):\n"  # not one sleep(60): a signal that landed
        "                time.sleep(0.1)\n"  # just before its start waited for its end
        "sys.meta_path.insert(0, SlowJax())\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    proc = subprocess.Popen([sys.executable, "-c", importing,
                             os.path.join(BENCHMARKS, "bench_step.py"), "--out", str(out)],
                            env=child_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == "importing jax\n", proc.stderr.read()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    how = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    assert proc.returncode == 128 + signum and err.splitlines() == [
        f"interrupted ({how}): no table was written; the results files are as they were."], err
    assert not out.exists()


def test_bench_step_ratios_against_a_constant_depth_first_row():
    """A table led by 'constant-remat-convs' (the gpu_suite's loop-step part) printed '-' for
    every ratio: only a first row named exactly 'constant' was a baseline."""
    bench_step = load("bench_step")
    runners = [bench_step.Runner(name, None, (), times) for name, times in (
        ("constant-remat-convs", [2.0, 2.0]), ("loop-remat-convs", [1.5, 1.5]))]
    rows = bench_step.table_rows(runners, 128)
    assert rows[0].endswith("| 1.000 | 1.000 |") and rows[1].endswith("| 0.750 | 0.750 |")
    assert bench_step.table_rows(runners[::-1], 128)[0].endswith("| - | - |")  # not constant


def test_bench_step_per_round_ratio_cancels_drift_between_rounds():
    """A load that arrives halfway through round 3 (after constant depth ran in it) and
    doubles every time from then on moves the medians apart: skip's 3.2 over constant's 2.0
    says 1.600 for a variant that took 0.8 of constant depth's time in every other round;
    the median of the rounds' own ratios says 0.800."""
    bench_step = load("bench_step")
    runners = [bench_step.Runner("constant", None, (), [2.0, 2.0, 2.0, 4.0, 4.0]),
               bench_step.Runner("skip", None, (), [1.6, 1.6, 3.2, 3.2, 3.2])]
    cells = [c.strip() for c in bench_step.table_rows(runners, 128)[1].strip("|").split("|")]
    assert cells[4:] == ["1.600", "0.800"]


def test_gpu_suite_part_xla_flags_follow_the_callers(monkeypatch):
    """A part's own XLA flags (graphs-step: control flow in command buffers) are appended to
    the caller's $XLA_FLAGS, which other parts get unchanged."""
    suite = load("gpu_suite")
    graphs = suite.BY_NAME["graphs-step"]
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert suite.part_env(graphs)["XLA_FLAGS"] == suite.COMMAND_BUFFER_CONTROL_FLOW
    assert "XLA_FLAGS" not in suite.part_env(suite.BY_NAME["epochs"])
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=somewhere")
    assert suite.part_env(graphs)["XLA_FLAGS"] == ("--xla_dump_to=somewhere "
                                                   + suite.COMMAND_BUFFER_CONTROL_FLOW)
    assert suite.part_env(suite.BY_NAME["epochs"])["XLA_FLAGS"] == "--xla_dump_to=somewhere"


def test_gpu_suite_says_where_the_callers_xla_flags_set_a_parts_flag_too(monkeypatch):
    """XLA applies graphs-step's +CONDITIONAL,+WHILE to the caller's own command-buffer list
    (none after '='), and the other parts run with it: the header says so."""
    suite = load("gpu_suite")
    graphs = suite.BY_NAME["graphs-step"]
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=x --xla_gpu_enable_command_buffer=")
    assert suite.flags_already_set(graphs) == ["--xla_gpu_enable_command_buffer="]
    assert suite._flags_note(graphs).startswith(
        "note: $XLA_FLAGS already sets --xla_gpu_enable_command_buffer=: graphs-step's "
        f"{suite.COMMAND_BUFFER_CONTROL_FLOW} applies after it")
    assert suite._flags_note(suite.BY_NAME["epochs"]) == ""
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=x")
    assert suite._flags_note(graphs) == ""


def test_gpu_suite_list_shows_a_parts_own_xla_flags(capsys):
    suite = load("gpu_suite")
    suite.main(["--list"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert f"XLA_FLAGS+={suite.COMMAND_BUFFER_CONTROL_FLOW} python" in lines["graphs-step"]
    assert "XLA_FLAGS" not in lines["epochs"] and set(lines) == set(suite.BY_NAME)


def test_gpu_suite_dry_run_parts_parse_at_toy_sizes(tmp_path, monkeypatch):
    """--dry-run runs every part at its script's toy sizes (DRY_RUN_FLAGS after the part's
    own flags): each must still parse (a size its script refuses, a ConvNeXt given the
    ViT's --depth, would fail the dry run, not find a bug), and its table must say it is
    not at the recorded sizes: the suite's part name is not passed on in a dry run."""
    suite = load("gpu_suite")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    args = suite.parse_args(["--dry-run", "--out-dir", str(tmp_path)])
    for part in suite.PARTS:
        script, *argv = suite.command(part, args)[1:]
        name = os.path.basename(script).removesuffix(".py")
        assert argv[-len(suite.dry_run_flags(part)):] == suite.dry_run_flags(part)
        assert suite.SUITE_PART_ENV not in suite.part_env(part, dry_run=True)
        if name == "compare_torch":  # needs PyTorch; its sizes are bench_step.py's names
            continue
        module = bench_torch_without_torch(monkeypatch) if name == "bench_torch" else load(name)
        with monkeypatch.context() as env:
            env.delenv(suite.SUITE_PART_ENV, raising=False)
            parsed = module.parse_args(argv)
        assert "**Not the default sizes**" in parsed.label, (part.name, parsed.label)
        if name == "bench_drop_path" and parsed.model == "convnext":  # checked at its init
            from stochastic_depth_jax import convnext
            convnext.check_image((1, parsed.image, parsed.image, 3), parsed.patch, 4)
        if "--depth" in argv and name != "bench_drop_path":
            assert parsed.depth <= 56, part.name
        assert "stochastic_depth_jax_bench_images_dry_run" in " ".join(argv) or (
            "--images-dir" not in argv)
    compile_part = suite.command(suite.BY_NAME["compile"], args)
    assert compile_part[-2:] == ["--compile-depths", "14,20"]
    assert "--compile-depths" not in suite.dry_run_flags(suite.BY_NAME["loop-step"])


def test_gpu_suite_dry_run_never_writes_to_the_recorded_results(tmp_path, capsys,
                                                                monkeypatch):
    """A dry run on a CPU is allowed (the GPU run is not, and says that a dry run is); its
    toy tables never go to benchmarks/results, whose tables are the recorded ones."""
    suite = load("gpu_suite")
    results = os.path.join(BENCHMARKS, "results")
    (tmp_path / "link").symlink_to(results)
    # Under the results too (a sub-directory was accepted, and its toy tables written there),
    # and through a link.
    for inside in (results, os.path.join(results, "sub"), os.path.join(results, "..",
                                                                        "results", "a", "b"),
                   str(tmp_path / "link"), str(tmp_path / "link" / "sub")):
        with pytest.raises(load("bench_cli").FlagError, match="a dry run's toy tables do not "
                                                              "go among the recorded ones"):
            suite.parse_args(["--dry-run", "--out-dir", inside])
    assert suite.parse_args(["--dry-run", "--out-dir", results + "-elsewhere"]).out_dir
    assert suite.parse_args(["--dry-run"]).out_dir is None  # a new temporary directory
    assert suite.parse_args([]).out_dir == os.path.normpath(results)
    monkeypatch.setattr(suite, "backend", lambda: "cpu")
    status, err = run_command("gpu_suite", ["--parts", "epochs", "--out-dir", str(tmp_path)],
                              capsys)
    assert status == 1 and "check the parts at toy sizes with --dry-run" in err[0]
    monkeypatch.setattr(suite, "BY_NAME", {"quick": suite.Part("quick", 1, ("-c", "pass"))})
    monkeypatch.setattr(suite, "preflight", lambda parts: "versions: stand-in")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    suite.main(["--dry-run", "--parts", "quick", "--budget", "30"])
    made = [p for p in tmp_path.iterdir() if p.name.startswith("gpu_suite_dry_run-")]
    assert len(made) == 1 and "quick: ok" in (made[0] / "gpu_suite.log").read_text()


def test_gpu_suite_refuses_in_one_line_where_a_part_cannot_import(tmp_path, capsys,
                                                                  monkeypatch):
    """The GPU image lacks some of what the parts import (ml_collections, tensorboardX): each
    part then failed with a traceback after its start-up, one after the other, and the
    budget went by with no table. Now the suite checks the parts' imports first, in one
    child, and names what is missing and the fix; it records the versions in its log."""
    suite = load("gpu_suite")
    versions = suite.preflight([suite.BY_NAME["epochs"], suite.BY_NAME["vs-torch"]])
    assert versions.startswith("versions: python ") and f"jax {jax.__version__}" in versions
    assert suite.part_modules(suite.BY_NAME["vs-torch"]) == {"compare_torch": "compare_torch",
                                                             "bench_step": "bench_step"}
    assert suite.part_modules(suite.BY_NAME["epochs"])["tensorboardX"] == "bench_train"
    assert suite.part_modules(suite.BY_NAME["epochs-torch"]) == {}  # torch_problem's
    monkeypatch.setitem(suite.RUN_TIME_MODULES, "bench_train.py", ("no_such_module_here",))
    monkeypatch.setattr(suite, "backend", lambda: "gpu")
    status, err = run_command("gpu_suite", ["--parts", "loop-step,epochs", "--out-dir",
                                            str(tmp_path)], capsys)
    assert status == 1 and len(err) == 1, err
    assert ("this Python lacks modules that the parts import: no_such_module_here (for "
            "bench_train). Install them (pip install no_such_module_here;") in err[0]
    assert not os.listdir(tmp_path)  # no part started, no log


# A whole-epochs table of ours and of PyTorch's, as bench_train.py / bench_torch.py write
# them (their headings and columns; the figures made up).
OURS_EPOCHS = """
## Whole epochs, ResNet-110 (config cifar10), batch 128, p_L=0.5, {dtype}, 45000 training \
images (351 steps, the last partial batch dropped)

| variant | ran as | epoch 1 s (with compiles) | median epoch >= 2 s, compiles excluded | \
/ constant (same scan form) | compiled inside epochs >= 2: programs, s | median evaluation s \
| 500 epochs, min | programs compiled | compile s |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| constant | constant depth (gpu) | 8.9 | 7.29 | 1.000 | 0, 0.0 | 0.14 | 61.9 | 26 | 17.2 |
| auto | compact, multiple 4 (gpu) | 90.0 | 6.00 | 0.823 | 9, 36.0 | 0.14 | 51.2 | 45 | 99.0 |
"""
THEIR_EPOCHS = """
## PyTorch whole epochs, CIFAR ResNet-110, batch 128, 45000 training images (351 steps), \
channels-last

cuda (a GPU); 16 cores, 16 threads; torch 2.x; python 3.11; p_L=0.5. Random uint8 images.

| variant | epoch 1 s | median epoch s | img/s | skip / constant | median evaluation s | \
500 epochs, min |
|---|---|---|---|---|---|---|
| eager-fp32-constant | 17.00 | 16.00 | 2808 | - | 1.00 | 141.7 |
| eager-fp32-skip | 13.00 | 12.00 | 3744 | 0.750 | 1.00 | 108.3 |
"""


def test_suite_figures_read_the_columns_the_epoch_benchmarks_write():
    """The columns suite_figures.py reads are those bench_torch.py and bench_train.py write
    (bench_torch.py's tables need PyTorch to make: its source is read instead)."""
    with open(os.path.join(BENCHMARKS, "bench_torch.py")) as f:
        torch_source = f.read().replace('"\n        "', "")
    header = load("suite_figures").tables(THEIR_EPOCHS)[0].rows[0]
    assert "| " + " | ".join(header) + " |" in torch_source
    assert "## PyTorch whole epochs, CIFAR ResNet-{args.depth}, batch {args.batch}" in (
        torch_source)
    assert "python {platform.python_version()}; p_L={args.p}." in torch_source


def test_suite_figures_pair_ours_and_pytorch_only_where_they_measured_the_same():
    """Ours and PyTorch's whole epochs were paired by network, precision and kind only: a
    table at another batch, p_L or config (another model) was printed as a ratio of
    throughputs that compares nothing."""
    figures = load("suite_figures")

    def pairs(ours, theirs):
        return [line.split(": ", 1)[1].split(":")[0]
                for line in figures.ours_vs_torch(figures.lines_of(ours + theirs)[1])]

    ours = OURS_EPOCHS.format(dtype="float32")
    assert pairs(ours, THEIR_EPOCHS) == [
        "ours constant (constant depth (gpu)) / PyTorch eager-fp32-constant",
        "ours auto (compact, multiple 4 (gpu)) / PyTorch eager-fp32-skip"]
    assert not pairs(ours, THEIR_EPOCHS.replace("batch 128", "batch 8"))
    assert not pairs(ours.replace("config cifar10", "config cifar100_wrn"), THEIR_EPOCHS)
    assert not pairs(ours.replace(" (config cifar10)", ""), THEIR_EPOCHS)  # unknown model
    # Another p_L: constant depth is still the same network; the stochastic rows are not.
    assert pairs(ours, THEIR_EPOCHS.replace("p_L=0.5", "p_L=0.2")) == [
        "ours constant (constant depth (gpu)) / PyTorch eager-fp32-constant"]
    assert pairs(ours, THEIR_EPOCHS.replace("p_L=0.5", "p_L=0.50")) == pairs(ours,
                                                                            THEIR_EPOCHS)


def test_gpu_suite_prints_the_figures_of_each_part_and_at_its_end(tmp_path, monkeypatch,
                                                                  capsys):
    """After each part, and in its summary, the suite prints the headline figures of the
    tables the part appended (only those: not the ones already in the file): whole epochs
    against constant depth with the 500-epoch projection, PyTorch's epochs, and our
    throughput over PyTorch's where both ran in the same command."""
    suite = load("gpu_suite")
    (tmp_path / "train.md").write_text(OURS_EPOCHS.format(dtype="bfloat16"))  # earlier
    write = "import sys; open(sys.argv[1], 'a').write(sys.argv[2])"
    ours = suite.Part("ours", 1, ("-c", write, "{out}/train.md",
                                  OURS_EPOCHS.format(dtype="float32")))
    theirs = suite.Part("theirs", 1, ("-c", write, "{out}/torch_epochs_gpu.md", THEIR_EPOCHS))
    monkeypatch.setattr(suite, "BY_NAME", {"ours": ours, "theirs": theirs})
    monkeypatch.setattr(suite, "backend", lambda: "gpu")
    monkeypatch.setattr(suite, "preflight", lambda parts: "versions: stand-in")
    suite.main(["--parts", "ours,theirs", "--budget", "60", "--out-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    log = (tmp_path / "gpu_suite.log").read_text()
    summary = log.split("=== summary\n")[1]
    assert ("figures: ours: whole epochs fp32, ours auto (compact, multiple 4 (gpu)): 6.00 "
            "s/epoch (7488 img/s), 0.823 x constant; 500 epochs (training + evaluation each "
            "epoch): 51.2 min\n") in summary
    assert "bf16" not in summary  # the table that was there before
    assert ("figures: theirs: whole epochs fp32, PyTorch eager-fp32-skip: 12.00 s/epoch "
            "(3744 img/s), 0.750 x constant;") in summary
    assert ("figures: ours vs PyTorch: whole epochs fp32: ours auto (compact, multiple 4 "
            "(gpu)) / PyTorch eager-fp32-skip: 2.00x the throughput\n") in summary
    assert ("ours vs PyTorch: whole epochs fp32: ours constant (constant depth (gpu)) / "
            "PyTorch eager-fp32-constant: 2.19x") in summary  # constant with constant only
    assert summary.count("ours vs PyTorch") == 2
    # Not across networks (a dry run's, or a hand-made command's, other sizes).
    lines, epochs = load("suite_figures").lines_of(OURS_EPOCHS.format(dtype="float32")
                                                   + THEIR_EPOCHS.replace("-110", "-56"))
    assert len(epochs) == 4 and not load("suite_figures").ours_vs_torch(epochs)
    # As it goes: after the part, before the next one starts.
    assert log.index("figures: ours: whole epochs fp32, ours auto") < log.index("=== theirs")
    assert printed.count("figures: ours: whole epochs fp32, ours auto") == 2


def test_gpu_suite_budget_counts_its_own_checks(tmp_path, monkeypatch):
    """--budget sizes a lent machine's slice: the checks before the first part (JAX's
    backend, the parts' imports: a child process each, seconds on a GPU image) count in
    it. The clock started after them, and the command outlasted its budget by that much."""
    suite = load("gpu_suite")
    part = suite.Part("part", 3, ("-c", "print('part ran')"))
    monkeypatch.setattr(suite, "BY_NAME", {"part": part})
    monkeypatch.setattr(suite, "backend", lambda: "gpu")
    monkeypatch.setattr(suite, "preflight", lambda parts: time.sleep(2) or "versions: -")
    suite.main(["--parts", "part", "--budget", "4", "--out-dir", str(tmp_path)])
    log = (tmp_path / "gpu_suite.log").read_text()
    assert "part ran" not in log and "part: not started (estimate 3 s, " in log


def test_gpu_suite_documented_budgets_run_their_parts_to_their_end():
    """The budgets the suite's doc gave (`--parts epochs --budget 380`) were less than the
    part's estimate (350 s), the start-up checks and the 30 s before the budget's end at
    which a part is sent SIGTERM: by its own estimate the part was cut short. Each budget
    documented, and the default, now runs its parts to their end by the estimates."""
    suite = load("gpu_suite")
    documented = re.findall(r"--parts ([\w-]+) --budget (\d+)", suite.__doc__)
    assert len(documented) >= 3, documented
    for name, budget in documented:
        part = suite.BY_NAME[name]
        assert int(budget) == suite.budget_for([part]), (name, budget)
        assert "cut short" not in " ".join(suite.plan([part], int(budget), suite.STARTUP_S))
    assert suite.budget_for([suite.BY_NAME["epochs"]]) == (
        suite.STARTUP_S + 350 + suite.GRACE_S)
    default = suite.parse_args([]).budget
    started = [line for line in suite.plan(suite.PARTS, default, suite.STARTUP_S)
               if "not started" not in line]
    assert len(started) >= 2 and not [line for line in started if "cut short" in line]
    assert default == suite.budget_for(suite.PARTS[:2])
    with open(os.path.join(BENCHMARKS, "..", "README.md")) as f:
        assert f"inside --budget seconds ({default:g})" in f.read()
    assert f"# all parts, {default:g} s" in suite.__doc__


def test_gpu_suite_prints_its_plan_before_the_first_part(tmp_path, monkeypatch, capsys):
    """Before the first part, the suite prints what the estimates say of each part: started
    or not, ending before its SIGTERM or not, and the budget that would run them all."""
    suite = load("gpu_suite")
    parts = [suite.Part("first", 40, ("-c", "print('first ran')")),
             suite.Part("second", 50, ("-c", "print('second ran')")),
             suite.Part("third", 200, ("-c", "print('third ran')"))]
    monkeypatch.setattr(suite, "BY_NAME", {p.name: p for p in parts})
    monkeypatch.setattr(suite, "backend", lambda: "gpu")
    monkeypatch.setattr(suite, "preflight", lambda parts: "versions: stand-in")
    suite.main(["--parts", "first,second,third", "--budget", "100", "--out-dir",
                str(tmp_path)])
    log = (tmp_path / "gpu_suite.log").read_text()
    planned = log[log.index("plan by the estimates"):log.index("=== first")].splitlines()
    assert [line.split(":")[0].strip() for line in planned[1:4]] == [
        "first ~40 s", "second ~50 s", "third ~200 s"]
    assert "ends ~4" in planned[1] and "cut short" not in planned[1]
    assert "after its SIGTERM at 85 s: it may be cut short" in planned[2]  # 100 - 60 / 4
    assert "not started (" in planned[3]
    assert re.search(r"--budget 32\d runs every part selected to its end \(given 100 s: "
                     r"too little\)", planned[4]), planned[4]
    assert "third: not started (estimate 200 s" in log  # as the plan said


def test_gpu_suite_user_branch_part_runs_the_nnx_twin_and_what_differs_on_a_gpu():
    """bench_step.py --user-branch gained the NNX twin (nnx-* variants); the suite's part
    still named only the Linen pair, so a GPU run never measured NNX. Its '-stock' variants
    are the same programs off the CPU (reroute_convs='auto' reroutes there only) and its
    '-options' ones pass CPU compiler options: a GPU's minutes are not spent on them."""
    suite, bench_step = load("gpu_suite"), load("bench_step")
    argv = suite.BY_NAME["user-branch"].args
    names = argv[argv.index("--variants") + 1].split(",")
    assert set(names) <= set(bench_step.USER_VARIANTS)
    assert {bench_step.USER_VARIANTS[n][2] for n in names} == {False, bench_step.NNX}
    assert {bench_step.USER_VARIANTS[n][1] for n in names} == {"auto"}
    assert all(bench_step.user_baseline(n) in names for n in names)  # each ratio's base


def test_gpu_suite_import_check_sees_the_path_its_parts_see(tmp_path, monkeypatch):
    """A part runs as `python benchmarks/<script>.py` from the repository root: its path has
    benchmarks/, not the root (bench_train.py adds it itself, the others do not), so where
    this package is not installed (a GPU image, the repository copied there) their
    `import stochastic_depth_jax` fails. The import check put the root on its path (and
    `python -c` the current directory), passed, and every part then failed in turn. It
    imports now as the parts do, and says how to put the package on the path."""
    suite = load("gpu_suite")
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    (root / "only_at_root.py").write_text("")
    (root / "benchmarks" / "script.py").write_text("import only_at_root\n")
    part = suite.Part("script", 1, ("benchmarks/script.py",))
    ran = subprocess.run([sys.executable, *part.args], cwd=root, capture_output=True,
                         text=True)  # as run_part runs it
    assert "No module named 'only_at_root'" in ran.stderr
    monkeypatch.setattr(suite, "HERE", str(root / "benchmarks"))
    monkeypatch.chdir(root)
    with pytest.raises(load("bench_cli").FlagError,
                       match=r"lacks modules that the parts import: only_at_root \(for script\)"):
        suite.preflight([part])
    (root / "benchmarks" / "script.py").write_text("import stochastic_depth_jax_not_here\n")
    monkeypatch.setattr(suite, "THIS_PACKAGE", "stochastic_depth_jax_not_here")
    with pytest.raises(load("bench_cli").FlagError) as refused:
        suite.preflight([part])
    assert f"Put this repository on the path (PYTHONPATH={root}, or pip install -e {root})" in (
        str(refused.value)) and "pip install stochastic_depth_jax_not_here" not in str(
        refused.value)


def test_gpu_suite_import_check_covers_the_stage_costs_drawing():
    """stage-costs and stage-costs-bf16 pass --plot: stage_costs.py imports matplotlib only
    to draw it, after its rounds and before appending its table. A GPU image without
    matplotlib passed the import check, then lost each part's table after its minutes."""
    import inspect
    suite = load("gpu_suite")
    assert "import matplotlib" in inspect.getsource(load("stage_costs").plot)
    for part in suite.PARTS:
        if "--plot" in part.args:
            assert suite.part_modules(part)["matplotlib"] == "stage_costs", part.name


def test_gpu_suite_import_check_not_fooled_by_a_script_that_adds_the_root(tmp_path,
                                                                          monkeypatch):
    """bench_train.py puts the repository root on its own path: imported first in the one
    child, it made this package importable for every script checked after it, which, run
    as parts, then failed (`--parts epochs,loop-step` where the package is not installed)."""
    suite = load("gpu_suite")
    root = tmp_path / "repo"
    (root / "pkgx").mkdir(parents=True)
    (root / "benchmarks").mkdir()
    (root / "pkgx" / "__init__.py").write_text("def thing():\n    pass\n")
    (root / "benchmarks" / "adds.py").write_text(
        "import os, sys\nsys.path.insert(0, os.path.dirname(os.path.dirname("
        "os.path.abspath(__file__))))\nfrom pkgx import thing\n")
    (root / "benchmarks" / "needs.py").write_text("from pkgx import thing\n")
    (root / "benchmarks" / "neither.py").write_text("import json\n")
    parts = [suite.Part(n, 1, (f"benchmarks/{n}.py",)) for n in ("adds", "needs", "neither")]
    for part, works in zip(parts, [True, False, True]):  # as run_part runs them
        ran = subprocess.run([sys.executable, *part.args], cwd=root, capture_output=True)
        assert (ran.returncode == 0) == works, part.name
    monkeypatch.setattr(suite, "HERE", str(root / "benchmarks"))
    monkeypatch.setattr(suite, "THIS_PACKAGE", "pkgx")
    with pytest.raises(load("bench_cli").FlagError,
                       match=r"lacks modules that the parts import: pkgx \(for needs\)\. Put "):
        suite.preflight(parts)
    assert suite.preflight([parts[0], parts[2]]).startswith("versions: ")


def test_suite_figures_name_a_step_table_they_cannot_read():
    """A train-step table without a '/ constant' column (a column renamed) raised
    StopIteration out of suite_figures.lines_of, which gpu_suite.py calls after each part
    (in a finally): the suite stopped there, its later parts not run. Named instead."""
    table = ("## Train step, CifarResNet-110, batch 128, float32, scan=auto\n\n"
             "| variant | median ms/step | img/s |\n|---|---|---|\n| constant | 7.0 | 18000 |\n")
    lines, epochs = load("suite_figures").lines_of(table)
    assert epochs == [] and len(lines) == 1
    assert lines[0].startswith("(could not read the table 'Train step, CifarResNet-110, ")



def _under_jax_cache_setting(path, run):
    """``run()`` with JAX's own cache setting at ``path`` (as JAX_COMPILATION_CACHE_DIR sets
    it); the warnings it raised about the cache, JAX's setting checked to be restored."""
    from stochastic_depth_jax.training import compilation

    before = jax.config.jax_compilation_cache_dir or ""
    compilation.use_cache_dir(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
        assert jax.config.jax_compilation_cache_dir == path
    finally:
        compilation.use_cache_dir(before)
    return [str(w.message) for w in caught if "compilation cache" in str(w.message)]


def test_profile_step_under_a_jax_cache_that_cannot_be_created_says_it_once(tmp_path):
    """JAX_COMPILATION_CACHE_DIR under a file (a read-only or missing home): profile_step.py
    (and bench_drop_path.py, stage_costs.py) printed JAX's warning, with its source line,
    and went on; train.py, sweep.py and evaluate.py say it in one line and compile without
    the cache. Now the benchmarks too."""
    (tmp_path / "file").write_text("")
    out, bad = tmp_path / "table.md", str(tmp_path / "file" / "cache")
    said = _under_jax_cache_setting(bad, lambda: load("profile_step").main(
        ["--depth", "8", "--batch", "2", "--steps", "1", "--variants", "constant", "--out",
         str(out)]))
    assert said == [
        "Persistent compilation cache off: JAX_COMPILATION_CACHE_DIR "
        f"(jax_compilation_cache_dir): cannot create {bad} (Not a directory); set "
        "JAX_COMPILATION_CACHE_DIR to a directory this user can write to keep compiled "
        "programs, or unset it to turn the cache off."]
    assert "| constant" in out.read_text()


@pytest.mark.parametrize("script", ["profile_step", "bench_drop_path", "stage_costs",
                                    "bench_step", "bench_prune", "bench_data",
                                    "compact_buckets"])
def test_every_jax_benchmark_checks_jaxs_cache_setting(script, tmp_path, monkeypatch):
    """Each benchmark that compiles with JAX measures under JAX's cache setting checked as
    the trainer's is: a read-only one is one warning, not JAX's for every program it cannot
    store, and still serves what it holds."""
    from test_compilation import _unwritable_dir

    module, seen = load(script), []

    def measure(args):  # what the script measures, in short: one compile
        seen.append(jax.config.jax_compilation_cache_dir)
        jax.block_until_ready(jax.jit(lambda x: x * 3 + len(seen))(np.float32(1)))

    monkeypatch.setattr(module, "_measure", measure, raising=False)
    cache = _unwritable_dir(tmp_path)
    said = _under_jax_cache_setting(cache, lambda: module.main(["--out", ""]))
    assert seen == [cache]
    assert [m.split(":")[0] for m in said] == ["Persistent compilation cache read-only"]


def test_the_compact_benchmark_times_the_trainers_program():
    """The trainer's steps compile no bucket check (their buckets come from the gates they
    pass); the benchmark's compact step compiled one, a conditional per scanned stage (which
    splits CUDA graphs on GPU): it timed another program than the trainer's."""
    bench_step = load("bench_step")
    x, y, key = bench_step.random_batch(2)
    runner = bench_step.make_runner("compact", 26, 2, True, jax.numpy.float32, key, x, y)
    first, _ = bench_step.round_gates(26, 0)
    args = (*runner.state, first, runner.buckets(first), *runner.batch)
    jaxpr = str(runner.step.trace(*args).jaxpr)
    assert "cond[" not in jaxpr and "scan[" in jaxpr
