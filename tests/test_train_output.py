"""What ``train.py`` prints and records on a smoke run: one line of ours about fake data and
none of tfds's download chatter, one line per epoch without the progress bar, the skipping
implementation that really runs, and summary.json's two compile figures."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs` lives at the repository root.

from configs import load_config  # noqa: E402
from stochastic_depth_jax.training import setup as setup_lib  # noqa: E402


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """``train.py --config cifar10:smoke`` without the bar, in mode='sample' (one device)."""
    workdir = str(tmp_path_factory.mktemp("output") / "smoke")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run(
        [sys.executable, "train.py", "--config", "cifar10:smoke", "--workdir", workdir,
         "--config.progress_bar=false", "--config.model.mode=sample",
         "--config.write_tensorboard=false", "--config.write_plots=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, out.stdout, out.stderr


def test_fake_data_is_one_line_of_ours_and_nothing_from_tfds(sample_run):
    _, stdout, stderr = sample_run
    [line] = [x for x in stdout.splitlines() if "fake" in x]
    assert line.startswith("Writing fake cifar10 data (160 train, 64 test")
    assert line.endswith("no download.")
    for noise in ("Downloading and preparing", "downloaded and prepared", "Generating splits",
                  "Shuffling", "\x1b[A", "OpenCV", "Unknown size"):
        assert noise not in stdout + stderr, noise


def test_fake_data_line_names_only_the_splits_written(monkeypatch, tmp_path, capsys):
    """Only SVHN has an extra split: fake CIFAR data with num_extra set said it wrote extra
    images it never wrote."""
    written = []
    monkeypatch.setattr(setup_lib.data_lib.testing, "make_tfds_dataset",
                        lambda *args, **kwargs: written.append(kwargs["num_extra"]))
    for spec in ("cifar10:smoke", "svhn:smoke"):
        config = load_config(spec, ["--config.fake_data.num_extra=64"])
        setup_lib._write_fake_data(config, str(tmp_path))
    cifar, svhn = capsys.readouterr().out.splitlines()
    assert "(160 train, 64 test random images;" in cifar
    assert "(160 train, 64 test, 64 extra random images;" in svhn
    assert written == [0, 64]


def test_without_the_bar_each_epoch_prints_one_line(sample_run):
    _, stdout, _ = sample_run
    lines = [x for x in stdout.splitlines() if x.startswith("epoch ")]
    assert [x.split(":")[0] for x in lines] == ["epoch 1/2", "epoch 2/2"]
    for line in lines:
        assert "train loss " in line and "val error " in line and "test error " in line
        assert " s (" in line and "img/s)" in line


def test_the_run_ends_with_its_selected_model_and_where_the_results_are(sample_run):
    """train.py ended by printing the final and best records as ~40 lines of JSON; it now
    says in three lines where the run ended, the test error of the model it selected (the
    paper's number) and where summary.json is."""
    workdir, stdout, _ = sample_run
    best = json.load(open(os.path.join(workdir, "summary.json")))["best"]
    last = stdout.rstrip("\n").splitlines()[-3:]
    assert last[0].startswith("Finished epoch 2/2 (8 steps); last epoch: val error ")
    assert last[1] == (f"Best by validation error: epoch {best['epoch']:g}, test error "
                       f"{100 * best['test_error']:.2f}% (val error {100 * best['val_error']:.2f}%)"
                       "; in checkpoints_best/.")
    assert last[2] == f"Results in {workdir}: summary.json, metrics.jsonl."  # no plots here
    assert "{" not in stdout


def test_sample_mode_resnet_records_the_masking_it_runs(sample_run):
    workdir, stdout, _ = sample_run
    [line] = [x for x in stdout.splitlines() if x.startswith("Skipping implementation")]
    assert line.startswith("Skipping implementation (auto on cpu): mask (every block computes")
    assert "lax.cond" not in line and "masked in the ResNets" in line
    recorded = json.load(open(os.path.join(workdir, "run.json")))["implementation"]
    assert recorded["implementation"] == "mask" and "masked in the ResNets" in recorded["reason"]


def test_summary_has_one_name_per_compile_figure(sample_run):
    workdir, _, _ = sample_run
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert "compile_time_s" not in summary
    assert summary["train_step_compile_s"] > 0  # The train step, ahead of the first epoch.
    assert summary["compilation"]["programs"] > 1  # Every program of the session.


def test_second_smoke_config_in_a_smoke_workdir_writes_its_own_fake_data(sample_run, tmp_path):
    """cifar100:smoke in a copy of a cifar10:smoke workdir: fake cifar100 data is written
    (no download is tried: download=False would fail at once otherwise)."""
    workdir = str(tmp_path / "copy")
    shutil.copytree(sample_run[0], workdir)
    config = load_config("cifar100:smoke", ["--config.download=false"])
    ds = setup_lib.load_data(config, workdir)
    assert ds.num_classes == 100 and len(ds.train) + len(ds.validation) == 160
    cifar10 = setup_lib.load_data(load_config("cifar10:smoke", ["--config.download=false"]),
                                  workdir)
    assert cifar10.num_classes == 10  # The first dataset is still there.


def test_fake_data_of_other_sizes_is_written_again(capsys, tmp_path):
    """The marker said only 'complete': a config with other fake_data sizes (or seed) in the
    same workdir trained on the old data, while run.json recorded the new sizes."""
    workdir = str(tmp_path / "run")
    setup_lib.load_data(load_config("cifar10:smoke", ["--config.download=false"]), workdir)
    capsys.readouterr()
    bigger = load_config("cifar10:smoke", ["--config.download=false",
                                           "--config.fake_data.num_train=192"])
    ds = setup_lib.load_data(bigger, workdir)
    assert len(ds.train) + len(ds.validation) == 192
    assert ("was written with fake_data.num_train=160 and this config has "
            "fake_data.num_train=192: writing it again; no download.") in capsys.readouterr().out
    setup_lib.load_data(bigger, workdir)  # as written now: used as it is
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("lost", ["to a stopped run's clean-up", "by hand"])
def test_fake_data_marked_complete_but_missing_is_written_again(capsys, monkeypatch, tmp_path,
                                                                lost):
    """A run stopped at once (another process failed) removes its new workdir from a
    clean-up thread while the main thread may still be writing the fake data: the thread
    emptied fake_data/ as the main thread wrote its .complete-* marker there (then it could
    not remove the directory), and the next run trusted the marker and looked for the real
    dataset in fake_data/ ("not prepared ... cannot be downloaded"). So did one after a
    user deleted a file of it."""
    from stochastic_depth_jax import data as data_lib

    config = load_config("cifar10:smoke", ["--config.download=false"])
    workdir = str(tmp_path / "run")
    fake = os.path.join(workdir, setup_lib.FAKE_DATA_DIR)
    if lost == "by hand":
        setup_lib.load_data(config, workdir)
        [record] = [os.path.join(d, f) for d, _, files in os.walk(fake) for f in files
                    if f.startswith("cifar10-train.array_record")]
        os.remove(record)
    else:
        write = data_lib.testing.make_tfds_dataset

        def emptied_as_it_is_written(name, data_dir, **kwargs):
            # The clean-up thread's rmtree, at this moment: it has removed what it listed
            # in fake_data/; the main thread writes the marker next.
            write(name, data_dir, **kwargs)
            for entry in os.listdir(data_dir):
                shutil.rmtree(os.path.join(data_dir, entry))

        monkeypatch.setattr(data_lib.testing, "make_tfds_dataset", emptied_as_it_is_written)
        with pytest.raises(data_lib.DataUnavailableError):
            setup_lib.load_data(config, workdir)
        monkeypatch.undo()
        assert os.listdir(fake) == [".complete-cifar10"]  # what the stopped run left
    capsys.readouterr()
    ds = setup_lib.load_data(config, workdir)
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(f"The fake cifar10 data (160 train, 64 test random images; "
                           f"config.fake_data) in {fake} is incomplete (")
    assert line.endswith(" is missing): writing it again; no download.")
    fresh = setup_lib.load_data(config, str(tmp_path / "fresh"))
    np.testing.assert_array_equal(ds.train.images, fresh.train.images)
    np.testing.assert_array_equal(ds.test.labels, fresh.test.labels)
    capsys.readouterr()
    setup_lib.load_data(config, workdir)  # now complete: trusted, nothing written
    assert capsys.readouterr().out == ""


def test_a_closed_output_pipe_is_one_line_not_a_traceback(tmp_path):
    """``train.py ... | head -1``: the reader exits, the next print raised BrokenPipeError,
    which ended in a traceback (and another at the exit's flush)."""
    proc = subprocess.Popen(
        [sys.executable, "train.py", "--config", "cifar10:smoke", "--workdir",
         str(tmp_path / "run"), "--config.progress_bar=false"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()  # the first line, as `head -1` reads it, then the reader is gone
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    [line] = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: The output's reader exited (a broken pipe")
