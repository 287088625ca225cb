"""Resuming as a user does, with the real command line on tiny fake data: what cannot be
resumed is refused in one line and nothing good is moved, overwritten or mislabelled."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs`, train.py and evaluate.py live at the repository root.

import evaluate as evaluate_cli  # noqa: E402
import train as train_cli  # noqa: E402
from cli_output import one_line_error  # noqa: E402
from configs import load_config  # noqa: E402
from stochastic_depth_jax.training import checkpoint as ckpt_lib  # noqa: E402
from stochastic_depth_jax.training import loop, metrics, stopping  # noqa: E402

FLAGS = ["--config.progress_bar=false", "--config.write_tensorboard=false",
         "--config.write_plots=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The workdir of a finished 2-epoch ``cifar10:smoke`` run (checkpoints at steps 4, 8)."""
    workdir = str(tmp_path_factory.mktemp("resume") / "run")
    loop.train_and_evaluate(load_config("cifar10:smoke", FLAGS), workdir)
    return workdir


def _copy(trained, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(trained, workdir)
    return workdir


def _snapshot(workdir):
    """What a failed start must leave as it was: every file's bytes but the lock's."""
    files = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            if name != "run.lock" and os.access(path, os.R_OK):
                with open(path, "rb") as f:
                    files[os.path.relpath(path, workdir)] = f.read()
    return files


def _without_read_permission():
    """The command prefix under which reads honour file modes: none for a normal user; for
    root (whom modes do not stop), a user namespace that drops its capabilities."""
    if os.geteuid() != 0:
        return []
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-U", "true"], capture_output=True).returncode != 0:
        pytest.skip("runs as root without user namespaces (unshare -U): a file's modes cannot "
                    "deny root a read; test_checkpoint.py simulates the denied read")
    return ["unshare", "-U"]


def test_a_denied_read_is_one_line_and_moves_nothing(trained, tmp_path):
    """A workdir whose newest checkpoint this user may not read (copied from another user):
    training and evaluation each stop with one line naming it, the cause and the fix; the
    checkpoint stays in place, and no older one is resumed or evaluated instead."""
    workdir = _copy(trained, tmp_path)
    newest = max(ckpt_lib.Checkpoints(workdir, read_only=True).steps("latest"))
    denied = []
    for root, _, names in os.walk(os.path.join(workdir, "checkpoints", str(newest), "state")):
        denied += [os.path.join(root, name) for name in names]
    before = _snapshot(workdir)
    for path in denied:
        os.chmod(path, 0)
    prefix = _without_read_permission()
    commands = {
        "train": ["train.py", "--config", "cifar10:smoke", "--workdir", workdir, *FLAGS,
                  "--config.num_epochs=3"],
        "evaluate": ["evaluate.py", "--workdir", workdir, "--checkpoint", "latest"],
    }
    try:
        for name, command in commands.items():
            out = subprocess.run([*prefix, sys.executable, *command], cwd=REPO, text=True,
                                 capture_output=True, timeout=300)
            assert out.returncode == 1, (name, out.stderr[-3000:])
            assert "Traceback" not in out.stderr and "Event loop" not in out.stderr, out.stderr
            [line] = [x for x in out.stderr.splitlines() if x.startswith("error:")]
            assert line.startswith(f"error: Cannot read {workdir}/checkpoints/{newest} "
                                   "(Permission denied): "), line
            assert "give it read access" in line and "no older checkpoint was used" in line
    finally:
        for path in denied:
            os.chmod(path, 0o644)
    assert not os.path.exists(os.path.join(workdir, "checkpoints_corrupt"))
    assert _snapshot(workdir) == before


@pytest.mark.parametrize("damage", ["truncated", "not_an_object"])
def test_a_damaged_run_json_is_one_line_and_overwrites_nothing(trained, tmp_path, capsys,
                                                              damage, monkeypatch):
    """Reported before any data is loaded (run.json says how the validation split was held
    out), by the one reader of run.json."""
    def load_data(*args):
        raise AssertionError("data loaded before run.json was checked")

    monkeypatch.setattr(loop.setup_lib, "load_data", load_data)
    workdir = _copy(trained, tmp_path)
    path = os.path.join(workdir, "run.json")
    if damage == "truncated":
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        json.dump(["not", "a", "run"], open(path, "w"))
    before = _snapshot(workdir)
    line = one_line_error(capsys, train_cli.main, [
        "--config", "cifar10:smoke", "--workdir", workdir, *FLAGS, "--config.num_epochs=3"])
    assert line.startswith(f"error: {path} is damaged (")
    assert "restore it from a copy, or move it aside" in line
    assert _snapshot(workdir) == before


def test_evaluating_a_run_json_without_its_data_record_is_one_line(trained, tmp_path, capsys):
    """The record holds the normalisation the model was trained with: without it the run
    cannot be evaluated as trained, and nothing is written."""
    workdir = _copy(trained, tmp_path)
    path = os.path.join(workdir, "run.json")
    meta = json.load(open(path))
    del meta["data"]
    json.dump(meta, open(path, "w"))
    before = _snapshot(workdir)
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", workdir])
    assert line == (f"error: {path} records no data (the normalisation the model was trained "
                    "with is unknown), so it cannot be evaluated as trained; restore run.json "
                    "from a copy.")
    assert _snapshot(workdir) == before


def test_a_missing_run_json_is_written_anew_with_a_warning(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    os.remove(os.path.join(workdir, "run.json"))
    config = load_config("cifar10:smoke", FLAGS + ["--config.num_epochs=3"])
    with pytest.warns(UserWarning, match=r"run.json is missing although the checkpoints reach "
                      r"step 8: written anew.* the validation split is held out anew by this "
                      r"config's seed and validation_size"):
        summary = loop.train_and_evaluate(config, workdir)
    assert summary["steps"] == 12
    assert json.load(open(os.path.join(workdir, "run.json")))["config"]["num_epochs"] == 3


def test_extending_a_run_cut_short_by_max_steps_keeps_the_record_of_its_last_step(tmp_path):
    """The record of a max_steps end (epoch 1.5) is the restored checkpoint's own: a run
    extended from it dropped it, so a 'best' saved at that step was described by no record
    (nor drawn on the curves), while TensorBoard kept its points."""
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(load_config("cifar10:smoke", FLAGS + ["--config.max_steps=6"]),
                            workdir)
    cut = metrics.read_metrics(workdir)[-1]
    assert (cut["epoch"], cut["step"]) == (1.5, 6)
    summary = loop.train_and_evaluate(load_config("cifar10:smoke", FLAGS), workdir)
    records = metrics.read_metrics(workdir)
    assert [r["epoch"] for r in records] == [1, 1.5, 2] and records[1] == cut
    assert summary["steps"] == 8


def test_a_run_stopped_mid_epoch_then_ended_there_records_its_last_step(tmp_path):
    """Stopped at step 3 (a SIGTERM: no record), then given max_steps=3: the restart trained
    nothing and its summary's final record was an earlier epoch's (here none at all), not
    step 3's, which a run ending there evaluates and records."""
    workdir = str(tmp_path / "run")
    flags = FLAGS + ["--config.log_every_steps=3"]
    with stopping.StopSignals() as pending, pytest.raises(stopping.Stopped):
        pending.signum = signal.SIGTERM  # as if it came during the first compile
        loop.train_and_evaluate(load_config("cifar10:smoke", flags), workdir)
    assert metrics.read_metrics(workdir) == []
    summary = loop.train_and_evaluate(
        load_config("cifar10:smoke", flags + ["--config.max_steps=3"]), workdir)
    assert summary["steps"] == 3 and summary["final"]["step"] == 3
    [record] = metrics.read_metrics(workdir)
    assert record == summary["final"] and record["epoch"] == 0.75 and "test_error" in record
    # Its steps were trained by the stopped session, untimed: no 0 s, 0 img/s.
    assert "epoch_time_s" not in record and "images_per_s" not in record


def test_a_missing_run_json_of_an_image_folder_run_says_validation_is_held_out_per_class():
    """Earlier image-folder runs held validation out at random: without run.json to say so,
    the resumed run holds it out per class, and the warning says so."""
    line = loop._missing_run_json("w/run.json", 8, "image_folder:/data/pets")
    assert "validation split is held out anew per class by this config's seed" in line
    assert "some validation images were trained on" in line


def test_another_batch_size_is_refused_before_anything_is_written(trained, tmp_path):
    """Step 8 is epoch 2 at batch 32 but epoch 1 at batch 16: resuming would retrain an
    epoch under the wrong label and schedule."""
    workdir = _copy(trained, tmp_path)
    before = _snapshot(workdir)
    config = load_config("cifar10:smoke", FLAGS + ["--config.batch_size=16",
                                                   "--config.num_epochs=3"])
    with pytest.raises(ValueError, match=r"at step 8 .* saved at epoch 2, 4 steps per epoch; "
                       r"this config makes 8 steps per epoch \(batch_size: 32 -> 16; "):
        loop.train_and_evaluate(config, workdir)
    assert _snapshot(workdir) == before


def test_another_select_best_by_is_refused_before_anything_is_written(trained, tmp_path):
    """Resumed with select_best_by=train, each epoch's training error was compared with the
    best validation error, and 'best' saved where the one fell below the other."""
    workdir = _copy(trained, tmp_path)
    before = _snapshot(workdir)
    config = load_config("cifar10:smoke", FLAGS + ["--config.select_best_by=train",
                                                   "--config.num_epochs=3"])
    with pytest.raises(ValueError, match=r"chose its best checkpoint \(step \d+\) with "
                       r"select_best_by='validation' and this config has 'train': .* Resume it "
                       r"with --config.select_best_by=validation, or train in a fresh"):
        loop.train_and_evaluate(config, workdir)
    assert _snapshot(workdir) == before


def test_the_non_finite_message_names_a_committed_checkpoint(tmp_path, monkeypatch):
    """A save only started is not a checkpoint to resume from. On storage that commits a
    save only when waited for, the message waits for it and names what is on disk then."""
    pending = []
    real = {name: getattr(ckpt_lib.Checkpoints, name) for name in ("save", "wait", "close")}

    def save(self, kind, step, state, meta):
        pending.append((self, kind, step, jax.tree.map(jnp.copy, state), meta))  # donated
        return True

    def flushing(name):
        def method(self):
            while pending:
                real["save"](*pending.pop(0))
            real[name](self)
        return method

    monkeypatch.setattr(ckpt_lib.Checkpoints, "save", save)
    for name in ("wait", "close"):
        monkeypatch.setattr(ckpt_lib.Checkpoints, name, flushing(name))
    checkpoints, on_disk = os.path.join(tmp_path, "checkpoints"), []

    class Recorded(loop.NonFiniteLossError):
        def __init__(self, message):
            on_disk.append(sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit()))
            super().__init__(message)

    monkeypatch.setattr(loop, "NonFiniteLossError", Recorded)
    config = load_config("cifar10:smoke", FLAGS + [
        "--config.learning_rate=1e12", "--config.lr_schedule=constant",
        "--config.checkpoint_every_steps=1"])
    with pytest.raises(Recorded) as info:
        loop.train_and_evaluate(config, str(tmp_path))
    named = re.search(r"the last good checkpoint \(step (\d+)\)", str(info.value))
    assert named and on_disk[0] and int(named.group(1)) == on_disk[0][-1], (info.value, on_disk)


def _refused_split_change(workdir, flags, named, fix):
    """Resumes ``workdir`` with ``flags`` and checks the refusal of a split change: one line
    naming it (``named``) and the ``fix``, with nothing written."""
    before = _snapshot(workdir)
    config = load_config("cifar10:smoke", FLAGS + flags + ["--config.num_epochs=3"])
    with pytest.raises(ValueError, match=rf"split into training and validation images by "
                       rf"another config than this one \({named}\): .* Resume it as it trained "
                       rf"with {fix}, or train in a fresh --workdir\.$"):
        loop.train_and_evaluate(config, workdir)
    assert _snapshot(workdir) == before


def test_a_changed_validation_size_is_refused_before_anything_is_written(trained, tmp_path):
    """Another validation_size holds out other validation images from the same data (the
    steps per epoch unchanged): the resumed run validated on images it had trained on, or
    trained on ones it had validated on, and its validation errors and best were
    mislabelled, with only a warning. Refused in one line naming the change and the fix."""
    _refused_split_change(_copy(trained, tmp_path), ["--config.validation_size=31"],
                          "validation_size: 32 -> 31", "--config.validation_size=32")


def test_a_changed_seed_of_real_data_is_refused_before_anything_is_written(tmp_path):
    """Another seed holds out other validation images of the same (real) images."""
    from stochastic_depth_jax import data

    folder = data.testing.make_image_folder(str(tmp_path / "images"), classes=2,
                                            per_class_train=40, per_class_test=8)
    flags = [f"--config.dataset=image_folder:{folder}"]
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(load_config("cifar10:smoke", FLAGS + flags), workdir)
    _refused_split_change(workdir, flags + ["--config.seed=1"], "seed: 0 -> 1",
                          "--config.seed=0")


def test_another_seed_of_fake_data_is_other_data_and_only_warned_about(tmp_path):
    """Fake data is drawn from the seed: another one is other images, a change of the data
    on purpose (as another fake_data size), warned about as such. With train_on_all, which
    holds no image out, it was refused as one that moves images between the splits."""
    common = FLAGS + ["--config.train_on_all=true", "--config.select_best_by=test"]
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(load_config("cifar10:smoke", common + ["--config.max_steps=4"]),
                            workdir)
    with pytest.warns(UserWarning, match=r"changed config: max_steps: 4 -> 0; seed: 0 -> 1"):
        summary = loop.train_and_evaluate(
            load_config("cifar10:smoke", common + ["--config.seed=1"]), workdir)
    assert summary["steps"] == 10


def test_a_split_field_change_that_moves_no_image_is_only_warned_about(tmp_path):
    """With train_on_all there is no validation split: another validation_size changes
    no image's split, and the run goes on with the usual warning."""
    common = FLAGS + ["--config.train_on_all=true", "--config.select_best_by=test"]
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(load_config("cifar10:smoke", common + ["--config.max_steps=4"]),
                            workdir)
    with pytest.warns(UserWarning, match=r"changed config: max_steps: 4 -> 0; "
                      r"validation_size: 32 -> 31"):
        summary = loop.train_and_evaluate(
            load_config("cifar10:smoke", common + ["--config.validation_size=31"]), workdir)
    assert summary["steps"] == 10
