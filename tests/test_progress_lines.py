"""What each finished epoch says: its line where no progress bar is drawn, its images/s."""

import os
import sys
import time

import pytest

from stochastic_depth_jax.training import progress

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/


@pytest.mark.parametrize("epoch, shown", [
    (3, "epoch 3/50: "), (0.5, "epoch 0.5/50: "), (2 / 7, "epoch 0.29/50: "),
    (12 + 1 / 3, "epoch 12.33/50: ")])
def test_an_epoch_cut_short_shows_its_fraction_to_two_decimals(epoch, shown):
    """svhn:smoke with --config.train_on_all=true --config.max_steps=2 (7 steps an epoch)
    printed 'epoch 0.2857142857142857/2: ...'."""
    record = {"epoch": epoch, "train_loss": 2.3, "train_error": 0.9, "test_error": 0.875,
              "epoch_time_s": 0.1, "images_per_s": 500.0}
    line = progress.epoch_line(record, 50)
    assert line.startswith(shown + "train loss 2.3000, error 90.00%; test error 87.50%")


def test_an_epoch_resumed_midway_counts_the_images_of_the_steps_it_timed(tmp_path):
    """A session resumed mid-epoch times only the steps it runs, but counted every step of
    the epoch: a ConvNeXt smoke run stopped at step 34 of 49 printed 1114 img/s for its
    second epoch instead of about 340."""
    from configs import load_config
    from stochastic_depth_jax.training import metrics, train_and_evaluate

    flags = ["--config.progress_bar=false", "--config.write_tensorboard=false",
             "--config.write_plots=false", "--config.num_epochs=1"]
    resumed = str(tmp_path / "resumed")
    train_and_evaluate(load_config("cifar10:smoke", flags + ["--config.max_steps=1"]),
                       resumed)  # 1 of the epoch's 4 steps, then resumed
    with pytest.warns(UserWarning, match="changed config: max_steps: 1 -> 0"):
        train_and_evaluate(load_config("cifar10:smoke", flags), resumed)
    [record] = [r for r in metrics.read_metrics(resumed) if r["epoch"] == 1]
    assert record["step"] == 4
    assert record["images_per_s"] == pytest.approx(3 * 32 / record["epoch_time_s"])
    # And the resumed epoch's figures are the uninterrupted run's: the epoch's sums and the
    # optimizer's momentum came back from the checkpoint (else only the slow subprocess
    # resume tests would see them lost).
    train_and_evaluate(load_config("cifar10:smoke", flags), str(tmp_path / "whole"))
    [whole] = metrics.read_metrics(str(tmp_path / "whole"))
    for key in ("train_loss", "train_error", "test_loss", "test_error", "val_loss"):
        assert record[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-7), key


def test_on_a_terminal_each_epoch_leaves_its_line_with_the_evaluation(monkeypatch, capsys):
    """With the bar drawn (a terminal), a finished epoch used to leave only the bar, with
    its training loss and error: the validation and test errors evaluated after it never
    appeared. Now the bar is cleared and the epoch's line printed, as in a log."""
    monkeypatch.setattr(progress, "interactive", lambda stream: True)
    assert progress.draws_bar(True) and progress.prints_epoch_lines(True)
    bar = progress.EpochProgress(1, 2, total=3, start=0, batch_size=4)
    bar.update(3, 2.3, 0.9)
    bar.close()
    assert "epoch 1/2" not in capsys.readouterr().err.rsplit("\r", 1)[-1]  # cleared


def test_time_spent_evaluating_mid_epoch_is_left_out_of_the_bars_images_per_s(monkeypatch):
    """With eval_every_steps the bar's images/s dipped after each evaluation."""
    monkeypatch.setattr(progress, "interactive", lambda stream: True)
    clock = iter([0.0, 1.0, 3.0])  # steps 1-2 in 1 s; then a 1.5 s evaluation, 0.5 s of steps
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    bar = progress.EpochProgress(1, 2, total=6, start=0, batch_size=4)
    bar.update(0)
    bar.update(2)
    bar.exclude(1.5)
    bar.update(4)
    assert bar._bar.postfix.endswith("img/s=16")  # 2 steps x 4 images in 0.5 s, not 2 s
    bar.close()


def test_the_final_line_of_a_one_step_run_says_step(tmp_path):
    """--config.max_steps=1 printed 'Finished epoch 0.12/2 (1 steps)'."""
    summary = {"final": {"epoch": 0.125, "step": 1, "test_error": 0.5}, "steps": 1}
    first = progress.summary_lines(summary, str(tmp_path), 2)[0]
    assert first == "Finished epoch 0.12/2 (1 step); last epoch: test error 50.00%."


def test_the_final_lines_of_a_run_rerun_with_fewer_epochs_and_of_validation_records(tmp_path):
    """A finished 2-epoch run rerun with num_epochs=1 printed 'Finished epoch 2/1'; the
    results line named no validation.jsonl where eval_every_steps wrote one."""
    (tmp_path / "validation.jsonl").write_text("")
    summary = {"final": {"epoch": 2, "step": 8, "test_error": 0.5}, "steps": 8,
               "best": {"metric": "val_error", "epoch": 4 / 3, "step": 8, "val_error": 0.4,
                        "test_error": 0.45}}
    first, best, results = progress.summary_lines(summary, str(tmp_path), 1)
    assert first == "Finished epoch 2 (8 steps); last epoch: test error 50.00%."
    # A best within an epoch (eval_every_steps) names its step: the rounded epoch does not.
    assert best == ("Best by validation error: epoch 1.33 (step 8), test error 45.00% (val "
                    "error 40.00%); in checkpoints_best/.")
    summary["best"].update(epoch=2.0, step=12)
    assert progress.summary_lines(summary, str(tmp_path), 1)[1].startswith(
        "Best by validation error: epoch 2, test error 45.00%")
    assert results == f"Results in {tmp_path}: summary.json, metrics.jsonl, validation.jsonl."


def test_where_no_bar_is_drawn_a_long_epoch_prints_a_line_every_few_minutes(
        monkeypatch, capsys):
    """Piped to a log (a scheduler's output), ResNet-110's ~15-minute CPU epoch printed
    nothing until it ended: no sign the run was alive, nor when the epoch would end."""
    monkeypatch.setattr(progress, "interactive", lambda stream: False)
    assert progress.LINE_EVERY_S == 300
    # The epoch starts at 0 s; step 10 at 20 s (after compiling); 20 at 200 s (too soon); 40
    # at 320 s (a line); 45 at 500 s (too soon); 80 at 640 s (a line, after a 60 s
    # evaluation left out of img/s); 100 at 700 s, the epoch's end (its own line).
    times = iter([0.0, 20.0, 200.0, 320.0, 500.0, 640.0, 700.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(times))
    bar = progress.EpochProgress(3, 500, total=100, start=0, batch_size=8)
    for n in (10, 20, 40, 45):
        bar.update(n, 2.5, 0.75)
    bar.exclude(60.0)
    for n in (80, 100):
        bar.update(n, 2.25, 0.5)
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        # 30 steps in 300 s after the first update: 0.1 step/s, 0.8 img/s, 600 s left.
        "epoch 3/500: step 40/100, train loss 2.5000, error 75.00% so far; 1 img/s, "
        "~10 min left in the epoch",
        # 70 steps in 560 s of training (620 s less the evaluation): 0.125 step/s, 160 s left.
        "epoch 3/500: step 80/100, train loss 2.2500, error 50.00% so far; 1 img/s, "
        "~3 min left in the epoch"]


def test_no_lines_within_an_epoch_with_progress_bar_off_or_a_bar_drawn(monkeypatch, capsys):
    monkeypatch.setattr(progress.time, "perf_counter", iter([0.0, 1.0, 1e4]).__next__)
    bar = progress.EpochProgress(1, 2, total=10, start=0, batch_size=8, enabled=False)
    bar.update(1, 2.5, 0.75)
    bar.update(5, 2.5, 0.75)
    monkeypatch.setattr(progress, "interactive", lambda stream: True)
    monkeypatch.setattr(progress.time, "perf_counter", iter([0.0, 1.0, 1e4]).__next__)
    bar = progress.EpochProgress(1, 2, total=10, start=0, batch_size=8)
    bar.update(1, 2.5, 0.75)
    bar.update(5, 2.5, 0.75)
    bar.close()
    assert capsys.readouterr().out == ""


def test_compact_modes_compiles_inside_an_epoch_are_left_out_of_its_time(tmp_path,
                                                                         monkeypatch):
    """Compact mode compiles a program where a bucket tuple is first drawn, inside the
    epoch's steps (on a GPU, 'auto': 20 in epoch 1, 7 in epoch 2, ~4 s each against ~7 s
    epochs). That time went into epoch_time_s and images/s: a ResNet-20 smoke run printed
    'epoch 2/3: ... 28.9 s (4 img/s)', nearly all of it compiling, and training_time.md,
    which says compilation is excluded, compared such epochs with constant depth's, whose
    step is compiled before the first epoch. Here each new program takes 1000 s more."""
    from types import SimpleNamespace

    from configs import load_config
    from stochastic_depth_jax.training import compilation, metrics, train_and_evaluate
    from stochastic_depth_jax.training import step as step_lib

    shift = [0.0]
    perf_counter = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: perf_counter() + shift[0])

    class SlowCompiles(compilation.CompileStats):
        def __exit__(self, *exc):
            super().__exit__(*exc)
            shift[0] += 1000.0
            self.compile_s += 1000.0

    # raising=False: the step had no such measure before; the clock then never moved.
    monkeypatch.setattr(step_lib, "compilation", SimpleNamespace(CompileStats=SlowCompiles),
                        raising=False)
    flags = ["--config.progress_bar=false", "--config.write_tensorboard=false",
             "--config.write_plots=false", "--config.num_epochs=1", "--config.model.depth=14",
             "--config.model.scan=True", "--config.model.compact_multiple=1",
             "--config.lr_boundaries_epochs=()"]
    train_and_evaluate(load_config("cifar10:smoke", flags), str(tmp_path))
    [record] = metrics.read_metrics(str(tmp_path))
    programs = round(record.get("compile_time_s", 0.0) / 1000)
    assert 1 <= programs <= 4  # one per bucket tuple of the epoch's 4 steps
    assert 0 < record["epoch_time_s"] < 1000
    assert record["images_per_s"] == pytest.approx(4 * 32 / record["epoch_time_s"])
    # The line printed says where the rest of the epoch's wall time went.
    assert progress.epoch_line(record, 1).endswith(
        f"; {record['compile_time_s']:.1f} s compiling new programs")


def test_compact_modes_compile_seconds_are_its_own_threads_only():
    """The seconds a new bucket tuple's program stalls the steps counted every thread's
    compiles meanwhile (an async checkpoint's, a user's): taken off epoch_time_s, another
    thread's seconds made the epoch look faster, or its time negative."""
    import threading

    import jax
    import numpy as np

    from stochastic_depth_jax.training import step as step_lib

    def other_thread_compiles(state, split, gates, buckets):
        thread = threading.Thread(
            target=lambda: jax.jit(lambda v: v * 7.25 - 0.5)(np.ones(3)).block_until_ready())
        thread.start()
        thread.join()
        return state

    def this_thread_compiles(state, split, gates, buckets):
        return jax.jit(lambda v: v * 3.75 + 0.25)(state)

    compact = object.__new__(step_lib.CompactTrainStep)  # no model: the measure alone
    compact._key, compact._draw = None, lambda key, step: np.zeros(2, np.float32)
    compact._replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    compact._drawn, compact.compile_s = set(), 0.0
    compact._bucketing = lambda gates: (1,)
    compact._jitted = other_thread_compiles
    compact(np.ones(3, np.float32), None, 0)
    assert compact.compile_s == 0.0
    compact._bucketing = lambda gates: (2,)  # a new tuple: this thread's compile counts
    compact._jitted = this_thread_compiles
    compact(np.ones(3, np.float32), None, 1)
    assert compact.compile_s > 0.0
