"""Runs that cannot lose results: one writer per workdir, self-healing metrics, labelled
evaluation fallbacks, and anticipated mistakes reported in one line without a traceback."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs`, train.py and evaluate.py live at the repository root.

import evaluate as evaluate_cli  # noqa: E402
import train as train_cli  # noqa: E402
import warned  # noqa: E402
from cli_output import one_line_error  # noqa: E402
from configs import load_config  # noqa: E402
from stochastic_depth_jax import data, errors  # noqa: E402
from stochastic_depth_jax.training import checkpoint as ckpt_lib  # noqa: E402
from stochastic_depth_jax.training import evaluate, loop, metrics  # noqa: E402
from stochastic_depth_jax.training import workdir as workdir_lib  # noqa: E402

TINY = ["--config.progress_bar=false", "--config.write_tensorboard=false"]


def _image_folder(root, classes=2):
    return data.testing.make_image_folder(
        root, classes=classes, per_class_train=12, per_class_test=12, size=(8, 8)
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch smoke run on a small image folder (smoke variant + real images)."""
    root = tmp_path_factory.mktemp("reliability")
    folder = _image_folder(str(root / "images"))
    config = load_config(
        "cifar10:smoke",
        TINY
        + [
            f"--config.dataset=image_folder:{folder}",
            "--config.validation_size=0.25",  # A fraction, as README says.
            "--config.batch_size=8",
            "--config.eval_batch_size=8",
            "--config.model.remat=none",  # A string field given 'none' stays a string.
            "--config.write_plots=false",
        ],
    )
    assert config.model.remat == "none" and config.validation_size == 0.25
    workdir = str(root / "run")
    loop.train_and_evaluate(config, workdir)
    return config, workdir


def _copy(run, tmp_path):
    """The run's config (a copy: a test that changes it must not change the next test's)
    and a copy of its workdir."""
    workdir = str(tmp_path / "copy")
    shutil.copytree(run[1], workdir)
    return run[0].copy_and_resolve_references(), workdir


# One writer per workdir ------------------------------------------------------------------

_HOLD = """
import sys, time
from stochastic_depth_jax.training import workdir
lock = workdir.WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_second_run_on_busy_workdir_refuses_and_touches_nothing(tmp_path):
    workdir = str(tmp_path / "busy")
    os.makedirs(os.path.join(workdir, "checkpoints"))
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write('{"epoch": 1, "step": 4}\n')
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, workdir], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.time()
        out = subprocess.run(
            [sys.executable, "train.py", "--config", "cifar10:smoke", "--workdir", workdir],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 1
        assert "Traceback" not in out.stderr
        [line] = [x for x in out.stderr.splitlines() if x.startswith("error:")]
        assert f"in use by another run: pid {holder.pid}" in line
        assert time.time() - t0 < 120  # Refused at start-up, not after preparing data.
        assert open(os.path.join(workdir, "metrics.jsonl")).read() == '{"epoch": 1, "step": 4}\n'
        assert sorted(os.listdir(workdir)) == ["checkpoints", "metrics.jsonl", "run.lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder's lock is stale: the next run takes it over and says whose it was.
    with pytest.warns(UserWarning, match=f"Taking over the lock of pid {holder.pid}"):
        lock = workdir_lib.WorkdirLock(workdir).acquire()
    with pytest.raises(errors.WorkdirBusyError, match=f"pid {os.getpid()}"):
        workdir_lib.WorkdirLock(workdir).acquire()
    lock.release()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # A cleanly released lock is not 'stale'.
        workdir_lib.WorkdirLock(workdir).acquire().release()


# Self-healing metrics --------------------------------------------------------------------


def _write_lines(workdir, lines):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, metrics.METRICS_FILE), "w") as f:
        f.write("".join(lines))


def _epochs(workdir):
    return [r["epoch"] for r in metrics.read_metrics(workdir)]


def test_torn_last_line_is_dropped_on_restart(tmp_path):
    workdir = str(tmp_path)
    good = [json.dumps({"epoch": e, "step": 4 * e}) + "\n" for e in (1, 2, 3)]
    _write_lines(workdir, good + ['{"epoch": 4, "step": 1'])  # Crash while appending.
    with pytest.warns(UserWarning, match=r"unreadable line\(s\) \[4\].*metrics.jsonl"):
        assert _epochs(workdir) == [1, 2, 3]
    with pytest.warns(UserWarning, match="unreadable line"):
        writer = metrics.MetricWriter(workdir, tensorboard=False, resume_epoch=3, resume_step=12)
    writer.write({"epoch": 4, "step": 16, "loss": np.float32(0.5)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # The file is whole again.
        assert _epochs(workdir) == [1, 2, 3, 4]
    with open(os.path.join(workdir, "metrics.jsonl.dropped")) as f:
        assert f.read() == '{"epoch": 4, "step": 1\n'  # the torn line set aside as it was


def test_a_disk_filling_up_mid_record_is_an_error_naming_metrics_jsonl(tmp_path,
                                                                       monkeypatch):
    """The disk fills up while a record is appended: the kernel writes part of it and fails
    only the next write. The part was taken for the whole line, and the next record (once
    space was freed, e.g. by the checkpoints' rotation) joined it: both unreadable on
    resume. Where the write did fail, the run ended with 'error: Cannot write a file (No
    space left on device)', naming no file."""
    from stochastic_depth_jax.training import cli

    workdir = str(tmp_path)
    writer = metrics.MetricWriter(workdir, tensorboard=False)
    writer.write({"epoch": 1, "step": 4})
    real_write, calls = os.write, []

    def write(fd, data):  # a full disk: part of the line, then ENOSPC
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(data[:10]))

    monkeypatch.setattr(metrics.os, "write", write)
    with pytest.raises(OSError) as info:
        writer.write({"epoch": 2, "step": 8})
    path = os.path.join(workdir, "metrics.jsonl")
    assert info.value.filename == path and len(calls) == 2
    assert cli._message(info.value) == (f"Cannot write {path} (No space left on device): free "
                                        "some space or use another --workdir.")


def test_a_write_that_makes_no_progress_is_an_error_not_a_hang(tmp_path, monkeypatch):
    """os.write returning 0 (a broken file system) looped for good on the rest of the line."""
    writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
    monkeypatch.setattr(metrics.os, "write", lambda fd, data: 0)
    with pytest.raises(OSError, match="made no progress") as info:
        writer.write({"epoch": 1, "step": 4})
    assert info.value.filename == os.path.join(str(tmp_path), "metrics.jsonl")


def test_a_full_disk_while_a_resume_rewrites_metrics_is_an_error_naming_the_file(
        tmp_path, monkeypatch):
    """A resumed run rewrites metrics.jsonl to the records of its checkpoint and appends
    the others to metrics.jsonl.dropped. On a disk with too little space left (the previous
    session ended on a full disk; NFS and delayed allocation report it at fsync) the run
    ended with 'error: Cannot write a file (No space left on device)', naming no file, as
    appending did before. Now each names its file, and metrics.jsonl is left as it was."""
    from stochastic_depth_jax.training import cli

    workdir = str(tmp_path)
    writer = metrics.MetricWriter(workdir, tensorboard=False)
    for epoch in (1, 2, 3):
        writer.write({"epoch": epoch, "step": 4 * epoch})
    path = os.path.join(workdir, metrics.METRICS_FILE)
    with open(path) as f:
        before = f.read()

    def fsync(fd):  # as the kernel reports a full disk at fsync: no file named
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    for resume_epoch, named in ((3, path), (2, path + ".dropped")):
        with pytest.raises(OSError) as info, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # epoch 3 dropped, in a warning
            metrics.MetricWriter(workdir, tensorboard=False, resume_epoch=resume_epoch)
        assert cli._message(info.value) == (f"Cannot write {named} (No space left on "
                                            "device): free some space or use another --workdir.")
        with open(path) as f:
            assert f.read() == before
    assert sorted(os.listdir(workdir)) == ["metrics.jsonl", "metrics.jsonl.dropped"]


def test_a_full_disk_at_tensorboard_s_flush_is_named_and_the_saves_in_flight_committed(
        tmp_path, monkeypatch):
    """TensorBoard's event file flush on a full disk raised an OSError naming no file
    ('error: Cannot write a file'); closing the writers then failed the same way, in the
    'finally' that waits for the checkpoint saves in flight: that wait was skipped (the
    epoch's 'best' save left unfinished, Orbax's threads printing tracebacks at exit), and
    the close's error replaced the first. Both errors now name tensorboard/, the first is
    the one raised, and the saves are waited for: the 'best' save of step 4 is committed."""
    import tensorboardX

    from stochastic_depth_jax.training import cli

    workdir = str(tmp_path / "run")
    closed = []
    real_close = ckpt_lib.Checkpoints.close
    monkeypatch.setattr(ckpt_lib.Checkpoints, "close",
                        lambda self: closed.append(True) or real_close(self))
    raised = []

    def full(self):  # the first epoch's record's flush fails, and so does the close
        raised.append(OSError(errno.ENOSPC, "No space left on device"))
        raise raised[-1]

    monkeypatch.setattr(tensorboardX.SummaryWriter, "flush", full)
    monkeypatch.setattr(tensorboardX.SummaryWriter, "close", full)
    config = load_config("cifar10:smoke", ["--config.progress_bar=false",
                                           "--config.write_plots=false"])
    with pytest.raises(OSError) as info:
        loop.train_and_evaluate(config, workdir)
    assert len(raised) == 2 and info.value.__cause__ is raised[0]  # the flush's, not the close's
    assert cli._message(info.value) == (
        f"Cannot write {os.path.join(workdir, 'tensorboard')} (No space left on device): "
        "free some space or use another --workdir.")
    assert closed == [True]
    # The first epoch's 'best' (saved before its record was written) is committed.
    assert os.listdir(os.path.join(workdir, "checkpoints_best")) == ["4"]
    assert ckpt_lib.Checkpoints(workdir).steps("best") == [4]


def test_a_full_disk_while_writing_fake_data_is_one_line_naming_its_directory(
        capsys, tmp_path, monkeypatch):
    """TensorFlow Datasets' record writer reports a full disk as a RuntimeError ('write()
    failed: No space left on device'): a smoke run on a full disk ended in its traceback.
    It is one line naming the fake data's directory, and the new workdir is removed."""
    workdir = str(tmp_path / "run")

    def full(name, data_dir, **sizes):
        os.makedirs(data_dir, exist_ok=True)
        raise RuntimeError(
            'Failed to finalize writing of split "train": write() failed: No space left on '
            f"device; writing {data_dir}/{name}/incomplete.X/{name}-train.array_record")

    monkeypatch.setattr(data.testing, "make_tfds_dataset", full)
    line = one_line_error(capsys, train_cli.main, ["--config", "cifar10:smoke", "--workdir",
                                                   workdir, *TINY])
    assert line == (f"error: Cannot write {os.path.join(workdir, 'fake_data')} (No space "
                    "left on device): free some space or use another --workdir.")
    assert not os.path.exists(workdir)


@pytest.mark.parametrize("inside", ["checkpoints/99", "checkpoints_best/mine", "fake_data/x"])
def test_a_workdir_in_another_run_s_checkpoint_folder_is_refused(capsys, tmp_path, inside):
    """train.py --workdir <run>/checkpoints/99 trained there; that run then took the new
    run's directory for a damaged checkpoint of step 99 ('Skipping the latest checkpoint at
    step 99 ... moved to checkpoints_corrupt/')."""
    other = tmp_path / "other"
    for folder in ("checkpoints/8", "checkpoints_best/4", "fake_data"):
        os.makedirs(other / folder)
    (other / "run.json").write_text("{}")
    before = sorted(str(p.relative_to(other)) for p in other.rglob("*"))
    workdir = str(other / inside)
    line = one_line_error(capsys, train_cli.main, ["--config", "cifar10:smoke", "--workdir",
                                                   workdir, *TINY])
    managed = os.path.join(os.path.realpath(other), inside.split("/")[0])
    assert line == (f"error: The workdir {workdir} is inside {managed}/, a folder of the run in "
                    f"{os.path.realpath(other)} whose contents that run manages (it would "
                    "take this run for a damaged checkpoint and move it aside, or delete it); "
                    "give this run a directory outside it.")
    assert sorted(str(p.relative_to(other)) for p in other.rglob("*")) == before


def test_a_run_s_folder_is_found_through_a_link_and_in_another_case_only_where_case_is_ignored(
        tmp_path):
    """``run_folder_holding`` went by the real path alone and matched names in any case: a
    run's ``checkpoints`` linked to another disk let ``<run>/checkpoints/99`` through (the
    run then took it for a damaged checkpoint), and on a file system that tells case apart
    the user's own ``Checkpoints/`` beside a run was refused as the run's."""
    run, disk = tmp_path / "run", tmp_path / "disk"
    for folder in (run / "Checkpoints", disk):
        os.makedirs(folder)
    (run / "run.json").write_text("{}")
    os.symlink(disk, run / "checkpoints")
    assert evaluate.run_folder_holding(str(run / "checkpoints" / "99")) == str(
        run / "checkpoints")
    # The user's folder: another folder, where 'RUN.JSON' is not the run's 'run.json'.
    assert evaluate.run_folder_holding(str(run / "Checkpoints" / "mine")) is None
    (run / "RUN.JSON").write_text("{}")  # as a file system that ignores case shows it
    assert evaluate.run_folder_holding(str(run / "Checkpoints" / "mine")) == str(
        run / "Checkpoints")
    assert evaluate.run_folder_holding(str(run / "mine")) is None


def test_a_released_lock_marks_no_run_whose_folders_a_workdir_would_be_in(tmp_path):
    """A run that failed before writing anything (its dataset not found) in a directory
    that existed leaves its released, empty lock there: ``exp/checkpoints/r110``, a user's
    own layout, was then refused as in 'a folder of the run in exp', which holds no run. A
    lock that names its holder (a run starting, before its run.json) still marks one."""
    exp = tmp_path / "exp"
    os.makedirs(exp)
    workdir_lib.WorkdirLock(str(exp)).acquire().release()  # what the failed run leaves
    assert os.listdir(exp) == [workdir_lib.LOCK_FILE]
    workdir = str(exp / "checkpoints" / "r110")
    assert evaluate.run_folder_holding(workdir) is None
    train_cli.main(["--config", "cifar10:smoke", "--config.max_steps=1", "--workdir", workdir,
                    *TINY])
    assert os.path.isfile(os.path.join(workdir, "summary.json"))
    (exp / workdir_lib.LOCK_FILE).write_text('{"pid": 1}')  # held, or its holder killed
    assert evaluate.run_folder_holding(workdir) == str(exp / "checkpoints")


def test_restarted_sequences_leave_one_record_per_epoch(tmp_path):
    workdir = str(tmp_path)
    # Two runs raced in one workdir before the lock existed: epochs 1,2,3,1,2.
    _write_lines(workdir, [json.dumps({"epoch": e, "run": i}) + "\n"
                           for i, e in enumerate((1, 2, 3, 1, 2))])
    with pytest.warns(UserWarning, match="match the restored checkpoint"):
        metrics.MetricWriter(workdir, tensorboard=False, resume_epoch=2, resume_step=8)
    records = metrics.read_metrics(workdir)
    assert [(r["epoch"], r["run"]) for r in records] == [(1, 3), (2, 4)]  # The latest attempt.


def test_resume_after_torn_metrics_line_continues_the_run(run, tmp_path):
    config, workdir = _copy(run, tmp_path)
    before = metrics.read_metrics(workdir)
    with open(os.path.join(workdir, metrics.METRICS_FILE), "a") as f:
        f.write('{"epoch": 3, "st')
    config.num_epochs = 3
    with pytest.warns(UserWarning, match="unreadable line"):
        loop.train_and_evaluate(config, workdir)
    after = metrics.read_metrics(workdir)
    assert [r["epoch"] for r in after] == [1, 2, 3] and after[:2] == before


# Evaluation says what it evaluated ---------------------------------------------------------


def test_corrupt_best_checkpoint_is_never_labelled_best(run, tmp_path):
    config, workdir = _copy(run, tmp_path)
    ckpts = ckpt_lib.Checkpoints(workdir)
    [*_, old_best] = ckpts.steps("best")
    latest = max(ckpts.steps("latest"))
    # A later improvement saved as 'best' (the run's own state at its last step), then damaged.
    from stochastic_depth_jax.training import setup as setup_lib

    ds = setup_lib.load_data(config, workdir)
    setup = setup_lib.build_for_dataset(config, ds)
    state, meta = ckpts.restore("latest", setup_lib.abstract_state(setup, ds.image_shape))
    new_best = latest + 1
    ckpts.save("best", new_best, state.replace(step=state.step + 1), {"epoch": 3.0, "best": meta["best"]})
    ckpts.close()
    step_dir = os.path.join(workdir, "checkpoints_best", str(new_best))
    for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            if os.sep + "d" in dirpath:
                os.truncate(os.path.join(dirpath, name), 3)
    with pytest.warns(ckpt_lib.CheckpointCorruptWarning):
        result = evaluate.evaluate_checkpoint(workdir, "best")
    assert result["requested"] == "best" and result["checkpoint"] == "step"
    assert result["evaluated_step"] == old_best
    assert f"step {new_best}) is damaged" in result["note"]
    assert "next best" in result["note"]
    # The CLI names the file by the step evaluated and warns; nothing is called 'best'.
    with pytest.warns(ckpt_lib.CheckpointCorruptWarning):
        evaluate_cli.main(["--workdir", workdir])
    assert not os.path.exists(os.path.join(workdir, "eval_best_test.json"))
    saved = json.load(open(os.path.join(workdir, f"eval_step{old_best}_test.json")))
    assert saved["evaluated_step"] == old_best and "note" in saved


# Anticipated mistakes: one line, exit status 1, no traceback -------------------------------


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["--config.seed=-1"], "seed=-1 must be an integer"),
        (["--config.label=foo"], "label='foo' is not available for dataset 'cifar10'; valid: ['fine']"),
        (["--config.learning_rate=inf"], "learning_rate=inf must be a finite number"),
        (["--config.validation_size=0"], "validation_size=0 leaves no validation set"),
        (["--config.validation_size=1.5"], "validation_size=1.5 must be a count"),
        (["--config.batch_size=12"], "batch_size=12 does not divide by the 8 devices"),
        (["--config.model.remat=nope"], "model.remat='nope'; valid: ['convs', 'full', 'none']"),
        (["--config.nope=1"], "Unknown config field 'nope'"),
    ],
)
def test_train_cli_config_mistakes(capsys, tmp_path, overrides, expected):
    line = one_line_error(
        capsys,
        train_cli.main,
        ["--config", "cifar10:smoke", "--workdir", str(tmp_path / "w"), *TINY, *overrides],
    )
    assert expected in line
    assert not os.path.exists(tmp_path / "w")  # A failed start leaves no empty workdir.


def test_train_cli_unknown_variant_of_a_config_file(capsys, tmp_path):
    line = one_line_error(
        capsys, train_cli.main, ["--config", "configs/svhn.py:foo", "--workdir", str(tmp_path)]
    )
    assert "Unknown variant 'foo'" in line and "['smoke']" in line


def test_train_cli_workdir_is_a_file(capsys, tmp_path):
    path = tmp_path / "file"
    path.write_text("precious")
    line = one_line_error(
        capsys, train_cli.main, ["--config", "cifar10:smoke", "--workdir", str(path), *TINY]
    )
    assert f"Cannot write {path}" in line and "use another --workdir" in line
    assert path.read_text() == "precious"


def test_train_cli_workdir_linked_to_a_disk_not_mounted(capsys, tmp_path):
    """Was 'File exists: a file is in the way of the directory; use another --workdir'."""
    link = tmp_path / "run"
    os.symlink(tmp_path / "unmounted" / "run", link)
    line = one_line_error(
        capsys, train_cli.main, ["--config", "cifar10:smoke", "--workdir", str(link), *TINY])
    assert line == (f"error: Cannot write {link}: it is a symbolic link to {tmp_path}/unmounted/run, "
                    "which does not exist (its filesystem not mounted, or moved?): mount it or "
                    "mend the link to resume the run there, or use another --workdir.")
    assert os.listdir(tmp_path) == ["run"]


@pytest.mark.parametrize("code, strerror, fix", [
    (errno.EACCES, "Permission denied", "give this user write access to resume the run there"),
    (errno.EROFS, "Read-only file system", "remount it writable to resume the run there"),
])
def test_a_workdir_that_cannot_be_written_says_how_to_resume_in_place(code, strerror, fix):
    """Another --workdir alone would start a run that is already there afresh."""
    line = workdir_lib.describe_os_error(OSError(code, strerror), "runs/c10")
    assert line.startswith(f"Cannot write runs/c10 ({strerror}): ")
    assert fix in line and line.endswith("or use another --workdir.")


@pytest.mark.parametrize("classes, expected", [(1, "has one class"), (0, "no class directories")])
def test_train_cli_bad_image_folder(capsys, tmp_path, classes, expected):
    folder = _image_folder(str(tmp_path / "images"), classes=classes)
    os.makedirs(os.path.join(folder, "train"), exist_ok=True)
    line = one_line_error(
        capsys,
        train_cli.main,
        ["--config", "cifar10:smoke", "--workdir", str(tmp_path / "w"), *TINY,
         f"--config.dataset=image_folder:{folder}"],
    )
    assert expected in line


def test_evaluate_cli_mistakes(capsys, run, tmp_path):
    _, workdir = run
    assert "not a directory" in one_line_error(
        capsys, evaluate_cli.main, ["--workdir", str(tmp_path / "none")]
    )
    assert "run.json not found" in one_line_error(
        capsys, evaluate_cli.main, ["--workdir", str(tmp_path)]
    )
    assert "--checkpoint must be 'latest', 'best' or a step number, got 'bets'" in (
        one_line_error(capsys, evaluate_cli.main, ["--workdir", workdir, "--checkpoint", "bets"])
    )
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", workdir, "--checkpoint", "999"])
    assert f"No checkpoint at step 999 in {workdir}: checkpoints/ holds steps [" in line
    assert line.endswith("; give one of them (--checkpoint STEP), or --checkpoint best or latest.")
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    shutil.copy(os.path.join(workdir, "run.json"), empty)
    assert "has no best checkpoint yet" in one_line_error(
        capsys, evaluate_cli.main, ["--workdir", empty]
    )
    out = str(tmp_path / "blocked")
    open(out, "w").close()  # A file where the output's directory should be: before the work.
    for where in (out, str(tmp_path / "missing")):
        line = one_line_error(
            capsys,
            evaluate_cli.main,
            ["--workdir", workdir, "--checkpoint", "latest", "--output", where + "/eval.json"],
        )
        assert line == (f"error: --output {where}/eval.json: its directory {where} does not "
                        "exist (or is not a directory); create it, or give another path. "
                        "Nothing was evaluated.")
    line = one_line_error(  # A name too long to create: found only when it is written.
        capsys,
        evaluate_cli.main,
        ["--workdir", workdir, "--checkpoint", "latest", "--output", str(tmp_path / ("x" * 300))],
    )
    assert "printed above but not saved" in line and "--output PATH" in line


@pytest.mark.parametrize("code, fix", [(errno.EROFS, "remount the filesystem writable"),
                                       (errno.ENOSPC, "free some space")])
def test_an_unsaved_result_says_the_fix_for_an_evaluation(capsys, run, monkeypatch, code, fix):
    """A result that could not be written in a read-only run said train.py's fix: 'remount
    it writable to resume the run there, or use another --workdir' (another run)."""
    import contextlib

    _, workdir = run

    @contextlib.contextmanager
    def refused(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), path)
        yield

    monkeypatch.setattr(workdir_lib, "atomic_write", refused)
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", workdir])
    path = os.path.join(workdir, "eval_best_test.json")
    assert line == (f"error: The result is printed above but not saved: Cannot write {path} "
                    f"({os.strerror(code)}): {fix}, or pass --output PATH.")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(errors.ConfigError, match="seed=-1"):
        train_cli.main(["--config", "cifar10:smoke", "--config.seed=-1", "--debug"])


def test_non_finite_loss_is_one_line(capsys, tmp_path):
    line = one_line_error(
        capsys,
        train_cli.main,
        ["--config", "cifar10:smoke", "--workdir", str(tmp_path / "w"), *TINY,
         "--config.learning_rate=1e12", "--config.lr_schedule=constant",
         "--config.log_every_steps=1"],
    )
    assert "non-finite" in line.lower() and "stopping without saving" in line
    assert "no checkpoint had been saved yet" in line or "last good checkpoint (step" in line


def _tensorboard_events(path):
    """The Event protos of one TensorBoard file (TFRecord framing: length, crc, data, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    events, blob = [], open(path, "rb").read()
    offset = 0
    while offset < len(blob):
        (length,) = struct.unpack("<Q", blob[offset : offset + 8])
        data = blob[offset + 12 : offset + 12 + length]
        events.append(event_pb2.Event.FromString(data))
        offset += 12 + length + 4
    return events


def test_resume_purges_tensorboard_points_after_the_checkpoint(tmp_path):
    from tensorboardX.proto import event_pb2

    workdir = str(tmp_path)
    writer = metrics.MetricWriter(workdir, resume_epoch=0, resume_step=0)
    for epoch in (1, 2, 3):
        writer.write({"epoch": epoch, "step": 4 * epoch, "train_loss": 1.0 / epoch})
    writer.close()
    time.sleep(1.1)  # Event files are named by the second they were opened in.
    with pytest.warns(UserWarning, match="dropped 1 other record"):
        writer = metrics.MetricWriter(workdir, resume_epoch=2, resume_step=8)
    writer.write({"epoch": 3, "step": 12, "train_loss": 0.3})
    writer.close()
    files = sorted(os.listdir(os.path.join(workdir, "tensorboard")))
    assert len(files) == 2
    resumed = _tensorboard_events(os.path.join(workdir, "tensorboard", files[-1]))
    starts = [e.step for e in resumed if e.session_log.status == event_pb2.SessionLog.START]
    # TensorBoard discards every earlier point at step >= 9: epoch 3's first value (step 12).
    assert starts == [9]
    values = [(e.step, v.tag) for e in resumed for v in e.summary.value]
    assert values == [(12, "train_loss")]


# What the trainer tells its user --------------------------------------------------------------


def test_train_help_lists_every_config_module(capsys):
    """--help's config list comes from the configs package: every config file is in it."""
    config_dir = os.path.join(REPO, "configs")
    modules = sorted(
        name[:-3] for name in os.listdir(config_dir)
        if name.endswith(".py") and name not in ("__init__.py", "base.py")
    )
    assert "cifar100_wrn" in modules
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--help"])
    out = capsys.readouterr().out
    [line] = [x for x in out.splitlines() if x.startswith("configs: ")]
    assert line.removeprefix("configs: ").split(", ") == modules
    for name in modules:  # Each one loads (CONFIGS is the registry load_config uses).
        assert load_config(name + ":smoke").batch_size > 0


_WARN = """
import sys, warnings
from stochastic_depth_jax.training import cli, workdir

def main():
    workdir.WorkdirLock(sys.argv[1]).acquire().release()
    warnings.warn("a library's warning", FutureWarning)

cli.run_reporting_errors(main, False)
assert warnings.formatwarning is warnings._formatwarning_orig  # Restored afterwards.
"""


def test_project_warnings_print_as_one_line_and_others_keep_their_form(tmp_path):
    with open(tmp_path / workdir_lib.LOCK_FILE, "w") as f:  # Left by a killed run.
        json.dump({"pid": 4242, "host": "elsewhere", "started_at": 0}, f)
    out = subprocess.run([sys.executable, "-c", _WARN, str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    ours = [x for x in lines if "Taking over the lock" in x]
    assert len(ours) == 1 and ours[0].startswith("warning: Taking over the lock of pid 4242")
    # Ours names no file and shows no source line. (Python's format of the library's
    # warning shows its source line too on Python >= 3.13, which keeps -c code in linecache.)
    assert "workdir.py" not in out.stderr
    after = lines[lines.index(ours[0]) + 1:]
    assert not after or not after[0].startswith(" "), out.stderr
    assert any("FutureWarning: a library's warning" in x for x in lines)  # Python's format.


# What Orbax, asyncio and TensorStore print when a full disk fails a background save.
_LIBRARY_NOISE = """
import sys, threading
from absl import logging
from stochastic_depth_jax import errors
from stochastic_depth_jax.training import cli

FULL = "RESOURCE_EXHAUSTED: Error writing local file: No space left on device [os_error_code='28']"

class LateCallback:  # A write completing into the event loop Orbax has closed.
    def __del__(self):
        raise RuntimeError("Event loop is closed")

def main():
    def background_save():
        try:
            raise ValueError(FULL)
        except ValueError:
            logging.exception("_SignalingThread.run() raised an exception")
    thread = threading.Thread(target=background_save)
    thread.start()
    thread.join()
    try:
        raise ValueError("something else")
    except ValueError:
        logging.exception("an unrelated failure")
    LateCallback()
    try:  # as the checkpointer raises it (Checkpoints._writing)
        raise ValueError(FULL)
    except ValueError as e:
        raise errors.WorkdirError("Cannot write ckpt (No space left on device): free some "
                                  "space or use another --workdir.") from e

cli.run_reporting_errors(main, "--debug" in sys.argv)
"""


@pytest.mark.parametrize("debug", [False, True])
def test_library_reports_of_a_reported_error_are_dropped_unless_debug(tmp_path, debug):
    out = subprocess.run(
        [sys.executable, "-c", _LIBRARY_NOISE] + (["--debug"] if debug else []),
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 1
    if debug:  # Everything shows, and the error keeps its traceback.
        assert "_SignalingThread.run() raised an exception" in out.stderr
        assert "Event loop is closed" in out.stderr
        assert "[os_error_code='28']" in out.stderr and "Traceback" in out.stderr
        return
    lines = out.stderr.splitlines()
    assert "_SignalingThread" not in out.stderr and "Event loop is closed" not in out.stderr
    assert "an unrelated failure" in out.stderr  # Other errors are never hidden.
    assert lines[-1] == (
        "error: Cannot write ckpt (No space left on device): free some space or use another "
        "--workdir."
    )
    assert out.stderr.count("Traceback") == 1  # the unrelated failure's only


# Orbax's reads of a damaged checkpoint: the first fails, the others are abandoned in flight.
_ABANDONED_READS = """
import gc, sys, warnings
from stochastic_depth_jax import logs
from stochastic_depth_jax.training import cli

class InFlight:
    def __await__(self):
        yield

async def read_array_index():  # as orbax's serialization._read_array_index_and_device_put
    try:
        await InFlight()
    except BaseException as e:
        raise Exception("Encountered error while reading array index: (slice(0, 8, 1),). "
                        "See full TensorStore details: {'driver': 'zarr'}") from e

class Unrelated:
    def __del__(self):
        raise ValueError("an unrelated unraisable error")

def main():
    reads = [read_array_index() for _ in range(3)]
    for read in reads:
        read.send(None)
    warnings.warn("Skipping the latest checkpoint at step 20: it is unreadable or corrupt",
                  logs.RunWarning)
    del reads, read
    gc.collect()
    Unrelated()

cli.run_reporting_errors(main, "--debug" in sys.argv)
"""


@pytest.mark.parametrize("debug", [False, True])
def test_reads_abandoned_by_a_damaged_checkpoint_print_nothing(debug):
    """A resume or evaluation skipping a damaged checkpoint (files truncated) printed, after
    its one-line warning, sometimes 'Exception ignored in: <coroutine object
    _read_array_index_and_device_put ...>' with TensorStore's spec for each array that was
    being read (some 2,500 lines for a ResNet-8): the reads Orbax abandoned, closed when
    collected. Shown under --debug; other unraisable errors always are."""
    out = subprocess.run(
        [sys.executable, "-c", _ABANDONED_READS] + (["--debug"] if debug else []),
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("Encountered error while reading array index") == (3 if debug
                                                                                else 0)
    assert "an unrelated unraisable error" in out.stderr
    assert out.stderr.startswith("warning: Skipping the latest checkpoint at step 20: ")


def test_a_second_ctrl_c_while_a_save_commits_is_one_line(capsys, caplog):
    """Orbax logged 'Save Finalize thread (save_finalize) failed.' with the Ctrl-C's
    traceback before the one line 'interrupted (Ctrl-C).'."""
    from absl import logging as absl_logging

    from stochastic_depth_jax.training import cli

    def interrupted_while_waiting():
        try:
            raise KeyboardInterrupt  # raised by StopSignals in the save's join()
        except KeyboardInterrupt:
            absl_logging.exception("[step=7][wait_until_finished] Save Finalize thread "
                                   "(save_finalize) failed.")
            raise

    with pytest.raises(SystemExit) as exited:
        cli.run_reporting_errors(interrupted_while_waiting, debug=False)
    assert exited.value.code == 130
    assert "Save Finalize" not in caplog.text
    assert capsys.readouterr().err.splitlines() == ["interrupted (Ctrl-C)."]


def test_full_disk_during_a_save_is_one_line_and_the_run_resumes(run, tmp_path):
    """A real full disk (a small tmpfs in a private mount namespace) fails the checkpoint
    of epoch 3: one error line, the saved checkpoints untouched; after freeing space the
    same command resumes from them and finishes."""
    if shutil.which("unshare") is None or subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True
    ).returncode != 0:
        pytest.skip("needs a private mount namespace (unshare -rm) to mount a small tmpfs")
    config, workdir = run
    mount, out = tmp_path / "disk", tmp_path / "out"
    os.makedirs(mount)
    os.makedirs(out)
    command = " ".join(
        [sys.executable, "train.py", "--config", "cifar10:smoke", *TINY,
         f"--config.dataset={config.dataset}", "--config.validation_size=0.25",
         "--config.batch_size=8", "--config.eval_batch_size=8", "--config.model.remat=none",
         "--config.write_plots=false", "--config.num_epochs=3", "--workdir", f"{mount}/w"]
    )
    script = f"""
mount -t tmpfs -o size=4m tmpfs {mount} || exit 99
cp -r {workdir} {mount}/w
free=$(df -k --output=avail {mount} | tail -1)
dd if=/dev/zero of={mount}/filler bs=1k count=$((free - 48)) 2>/dev/null
{command} > {out}/full.out 2> {out}/full.err; echo $? > {out}/full.rc
ls {mount}/w/checkpoints > {out}/full.ls
rm {mount}/filler
{command} > {out}/resume.out 2> {out}/resume.err; echo $? > {out}/resume.rc
ls {mount}/w/checkpoints > {out}/resume.ls
"""
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, timeout=600)
    if done.returncode == 99:
        pytest.skip("cannot mount a tmpfs in a private mount namespace")

    def read(name):
        return open(out / name).read()

    saved = sorted(int(x) for x in os.listdir(os.path.join(workdir, "checkpoints")))
    err = read("full.err")
    assert read("full.rc").strip() == "1", err
    assert "Traceback" not in err and len(err.splitlines()) <= 6, err
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert f"{mount}/w/checkpoints (No space left on device)" in line
    assert [int(x) for x in read("full.ls").split() if x.isdigit()] == saved
    assert read("resume.rc").strip() == "0", read("resume.err")
    assert f"Resuming from step {saved[-1]} " in read("resume.out")
    assert max(int(x) for x in read("resume.ls").split() if x.isdigit()) > saved[-1]


@pytest.mark.parametrize("error", [TypeError("not JSON"), OSError(28, "No space left")])
def test_run_json_and_summary_are_replaced_only_whole(tmp_path, monkeypatch, error):
    """run.json and summary.json are written through workdir.atomic_write (on disk before the
    rename; no partial file left by a failure), as every other file the trainer rewrites."""
    path = tmp_path / "summary.json"
    loop._write_json(str(path), {"steps": 10})

    def fails(obj, f, **kwargs):
        f.write('{"ste')
        raise error

    monkeypatch.setattr(loop.json, "dump", fails)
    with pytest.raises(type(error)):
        loop._write_json(str(path), {"steps": 20})
    assert os.listdir(tmp_path) == ["summary.json"] and json.loads(path.read_text()) == {
        "steps": 10}


def test_temporary_files_left_by_killed_writes_are_removed_at_start(run, tmp_path):
    """A run killed while replacing run.json, summary.json, metrics.jsonl or a plot
    (workdir.atomic_write) left '<name>.tmp-<12 hex digits>' beside it, one more each time;
    the next run removes them. Others stay: evaluate.py's (it may be writing while a run
    starts) and any whose name is not exactly that of one of the run's own."""
    config, workdir = _copy(run, tmp_path)
    config = config.copy_and_resolve_references()
    config.num_epochs = 2  # as the run trained (another test sets the shared config's to 3)
    stale = [f"{name}.tmp-0123456789ab" for name in (
        "run.json", "summary.json", "metrics.jsonl", "validation.jsonl", "error.png",
        "loss.png")]
    others = ["eval_best_test.json.tmp-0123456789ab", "run.json.tmp-0123456789abc",
              "run.json.tmp-mine", "notes.txt.tmp-0123456789ab", "xrun.json.tmp-0123456789ab"]
    for name in stale + others:
        with open(os.path.join(workdir, name), "w") as f:
            f.write('{"ste')
    os.mkdir(os.path.join(workdir, "summary.json.tmp-abcdefabcdef"))  # not a file: kept
    others.append("summary.json.tmp-abcdefabcdef")
    summary = open(os.path.join(workdir, "summary.json")).read()
    loop.train_and_evaluate(config, workdir)  # nothing to train: it reached its end
    left = set(os.listdir(workdir))
    assert left.isdisjoint(stale) and set(others) <= left
    assert open(os.path.join(workdir, "summary.json")).read() == summary


def _write_old(path, text='{"ste'):
    """A file as a kill mid-write left it, long enough ago."""
    with open(path, "w") as f:
        f.write(text)
    old = time.time() - 10 * workdir_lib.ABANDONED_AFTER_S
    os.utime(path, (old, old))


def test_evaluations_killed_while_writing_leave_no_temporary_files(capsys, run, tmp_path):
    """evaluate.py killed while writing its result left 'eval_best_test.json.tmp-<12 hex>'
    in the run's workdir, one more each time, which nothing removed (a run's start leaves
    them: an evaluation may be writing). The next evaluation removes those no process holds
    and not just created; the run's own, other names, and one being written stay."""
    import fcntl

    _, workdir = _copy(run, tmp_path)
    abandoned = ["eval_best_test.json.tmp-0123456789ab", "eval_step8_test.json.tmp-aaaaaaaaaaaa",
                 "depth_curve_survival.png.tmp-0123456789ab"]
    kept = ["run.json.tmp-0123456789ab", "eval_best_test.json.tmp-mine",
            "eval_best_test.json.tmp-0123456789abc", "notes.json.tmp-0123456789ab",
            "eval_latest_test.json.tmp-bbbbbbbbbbbb", "eval_best_test.json.tmp-cccccccccccc"]
    for name in abandoned + kept:
        _write_old(os.path.join(workdir, name))
    os.utime(os.path.join(workdir, kept[-1]))  # just created: not locked yet
    held = open(os.path.join(workdir, kept[-2]))  # another evaluation writing it
    fcntl.flock(held.fileno(), fcntl.LOCK_EX)
    out = tmp_path / "elsewhere"
    out.mkdir()
    _write_old(str(out / "mine.json.tmp-0123456789ab"))
    _write_old(str(out / "other.json.tmp-0123456789ab"))
    try:
        evaluate_cli.main(["--workdir", workdir, "--output", str(out / "mine.json")])
    finally:
        held.close()
    left = set(os.listdir(workdir))
    assert left.isdisjoint(abandoned) and set(kept) <= left
    assert sorted(os.listdir(out)) == ["mine.json", "other.json.tmp-0123456789ab"]
    assert json.loads((out / "mine.json").read_text())["split"] == "test"


_WRITING = """
import sys, time
from stochastic_depth_jax.training import workdir
with workdir.atomic_write(sys.argv[1]) as f:
    f.write('{"ste')
    f.flush()
    print("writing", flush=True)
    time.sleep(600)
"""


def test_a_write_in_progress_is_kept_and_a_killed_one_removed(tmp_path):
    """Told apart by the writer's flock, which the kernel releases when it is killed, not
    by age alone: a slow writer's file is never removed under it."""
    path = str(tmp_path / "eval_best_test.json")
    writer = subprocess.Popen([sys.executable, "-c", _WRITING, path], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        [tmp] = os.listdir(tmp_path)
        later = time.time() + 10 * workdir_lib.ABANDONED_AFTER_S
        assert workdir_lib.remove_abandoned_temporaries(
            str(tmp_path), lambda n: True, now=later) == []
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert workdir_lib.remove_abandoned_temporaries(str(tmp_path), lambda n: True) == []
    assert workdir_lib.remove_abandoned_temporaries(
        str(tmp_path), lambda n: True, now=later) == [os.path.join(str(tmp_path), tmp)]
    assert os.listdir(tmp_path) == []


def test_abandoned_temporaries_are_removed_where_flock_is_a_posix_lock(tmp_path, monkeypatch):
    """On NFS, Linux emulates flock with POSIX locks, whose exclusive kind needs a file open
    for writing: the clean-up asked for one on a file it opened to read, failed (EBADF) and
    so left every abandoned file, while a writer's lock (its file open to write) works.
    Emulated here; a live writer's file still stays."""
    import fcntl

    real_flock = fcntl.flock

    def posix_emulated(fd, operation):
        read_only = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        if operation & fcntl.LOCK_EX and read_only:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", posix_emulated)
    abandoned = str(tmp_path / "eval_best_test.json.tmp-0123456789ab")
    _write_old(abandoned)
    later = time.time() + 10 * workdir_lib.ABANDONED_AFTER_S
    with workdir_lib.atomic_write(str(tmp_path / "eval_latest_test.json")) as f:
        f.write("{}")
        assert workdir_lib.remove_abandoned_temporaries(
            str(tmp_path), lambda n: True, now=later) == [abandoned]
        [writing] = [n for n in os.listdir(tmp_path) if ".tmp-" in n]
        assert writing.startswith("eval_latest_test.json.tmp-")
    assert os.listdir(tmp_path) == ["eval_latest_test.json"]


def test_a_killed_write_probe_does_not_keep_a_failed_first_run_s_workdir(tmp_path,
                                                                      monkeypatch):
    """A run killed while checking that its new workdir is writable left
    '.write-test-<pid>' there: the next run found the workdir existing, not its own, and
    kept it when it failed before writing anything, as if it held results. Such probes are
    removed (not those of a process still running: a run starting beside it); a workdir
    holding something else is kept, with it."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    dead = f".write-test-{ended.pid}"
    workdir = tmp_path / "new"
    workdir.mkdir()
    # A run starting beside this one (here: this test's parent process) holds its probe.
    live = f".write-test-{os.getppid()}"
    (workdir / live).write_text("ok")
    assert workdir_lib.prepare_workdir(str(workdir)) is False
    assert os.listdir(workdir) == [live]
    os.remove(workdir / live)
    (workdir / dead).write_text("ok")
    assert workdir_lib.prepare_workdir(str(workdir)) is True
    assert os.listdir(workdir) == []
    workdir_lib.remove_unused(str(workdir))
    assert not workdir.exists()
    workdir.mkdir()
    for name in (dead, ".write-test-x", "notes.txt"):
        (workdir / name).write_text("ok")
    assert workdir_lib.prepare_workdir(str(workdir)) is False
    assert sorted(os.listdir(workdir)) == [".write-test-x", "notes.txt"]
    # A run starting beside it removed this run's probe first: not a failure to write.
    real_remove = os.remove

    def remove(path, *args, **kwargs):
        real_remove(path, *args, **kwargs)
        if os.path.basename(path).startswith(".write-test-"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)

    monkeypatch.setattr(workdir_lib.os, "remove", remove)
    assert workdir_lib.prepare_workdir(str(workdir)) is False


def test_dropped_records_warning_names_only_the_dropped_epochs(tmp_path):
    """A run stopped after epoch 76's record but before its checkpoint resumes at 75."""
    workdir = str(tmp_path)
    _write_lines(workdir, [json.dumps({"epoch": e, "step": 4 * e}) + "\n" for e in range(1, 77)])
    with pytest.warns(UserWarning) as caught:
        metrics.MetricWriter(workdir, tensorboard=False, resume_epoch=75)
    [message] = warned.messages(caught, UserWarning)
    assert "kept the records of epochs 1-75 that" in message
    aside = os.path.join(workdir, "metrics.jsonl.dropped")
    assert message.endswith(f"dropped 1 other record(s) (epoch 76); they are kept in {aside}.")
    assert metrics.read_metrics(workdir, "metrics.jsonl.dropped") == [{"epoch": 76, "step": 304}]
    # A restart that re-ran epochs 2-3 then stopped: the first attempt's records go.
    _write_lines(workdir, [json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3, 2, 3, 4)])
    with pytest.warns(UserWarning) as caught:
        metrics.MetricWriter(workdir, tensorboard=False, resume_epoch=3)
    [message] = warned.messages(caught, UserWarning)
    assert "kept the records of epochs 1-3 that" in message
    assert "dropped 3 other record(s) (epochs 2-4)" in message
    assert metrics._epoch_ranges([1 / 3, 2.0, 123.25, 3]) == "0.33, 2, 123.25, 3"
    assert _epochs(workdir) == [1, 2, 3]
    # Appended to the records set aside before: nothing a reset drops is lost.
    assert [r["epoch"] for r in metrics.read_metrics(workdir, "metrics.jsonl.dropped")] == [
        76, 2, 3, 4]


def test_records_set_aside_before_a_crash_are_not_set_aside_twice(tmp_path, monkeypatch):
    """Killed after appending to metrics.jsonl.dropped but before rewriting metrics.jsonl,
    the next start set the same records aside again: the history held them twice."""
    workdir = str(tmp_path)
    _write_lines(workdir, [json.dumps({"epoch": e, "step": 4 * e}) + "\n" for e in (1, 2, 3)])

    def killed(path):
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning):
        m.setattr(metrics.workdir_lib, "atomic_write", killed)
        metrics.MetricWriter(workdir, tensorboard=False, resume_epoch=1)
    assert _epochs(workdir) == [1, 2, 3]  # not rewritten
    with pytest.warns(UserWarning, match=r"dropped 2 other record\(s\) \(epochs 2-3\)"):
        metrics.MetricWriter(workdir, tensorboard=False, resume_epoch=1)
    assert _epochs(workdir) == [1]
    assert [r["epoch"] for r in metrics.read_metrics(workdir, "metrics.jsonl.dropped")] == [2, 3]


def test_records_dropped_at_a_start_from_step_0_do_not_name_a_restored_checkpoint(tmp_path):
    """checkpoints/ deleted by hand: the run starts afresh, and the warning said the records
    did not 'match the restored checkpoint (epoch 0)', a checkpoint that does not exist."""
    workdir = str(tmp_path)
    _write_lines(workdir, [json.dumps({"epoch": e, "step": 4 * e}) + "\n" for e in (1, 2)])
    with pytest.warns(UserWarning) as caught:
        metrics.MetricWriter(workdir, tensorboard=False, resume_epoch=0)
    [message] = warned.messages(caught, UserWarning)
    assert message.endswith("kept no records (no checkpoint to resume from: training starts "
                            "from step 0); dropped 2 other record(s) (epochs 1-2); they are "
                            f"kept in {os.path.join(workdir, 'metrics.jsonl.dropped')}.")
    assert len(metrics.read_metrics(workdir, "metrics.jsonl.dropped")) == 2  # not lost


def test_a_line_without_an_epoch_never_costs_the_records_before_it(tmp_path):
    """A line without an epoch (a note added by hand) read as epoch 0, a restart from the
    start: resuming rewrote metrics.jsonl without every record before it."""
    workdir = str(tmp_path)
    note = {"note": "moved to node 4"}
    _write_lines(workdir, [json.dumps(r) + "\n" for r in (
        {"epoch": 1}, {"epoch": 2}, note, {"epoch": 3})])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dropped
        metrics.MetricWriter(workdir, tensorboard=False, resume_epoch=3)
    assert metrics.read_metrics(workdir) == [{"epoch": 1}, {"epoch": 2}, note, {"epoch": 3}]
    # A restart still replaces the records it repeats; the note stays.
    _write_lines(workdir, [json.dumps(r) + "\n" for r in (
        {"epoch": 1}, note, {"epoch": 2, "run": 0}, {"epoch": 2, "run": 1})])
    with pytest.warns(UserWarning) as caught:
        metrics.MetricWriter(workdir, tensorboard=False, resume_epoch=2)
    [message] = warned.messages(caught, UserWarning)
    assert "kept the records of epochs 1-2 that" in message
    assert "dropped 1 other record(s) (epoch 2); they are kept in " in message
    assert metrics.read_metrics(workdir) == [{"epoch": 1}, note, {"epoch": 2, "run": 1}]


def test_resume_with_changed_config_keeps_each_sessions_values(run, tmp_path):
    """Sessions at lr a (the fixture's), 0.05, then 0.07: run.json's config is the current
    one and its history says what each session changed, so lr a is not lost."""
    config, workdir = _copy(run, tmp_path)
    first_lr = config.learning_rate
    spe = json.load(open(os.path.join(workdir, loop.SUMMARY_FILE)))["steps_per_epoch"]
    for epochs, lr in ((3, 0.05), (4, 0.07)):
        resumed = config.copy_and_resolve_references()
        resumed.num_epochs, resumed.learning_rate = epochs, lr
        with pytest.warns(UserWarning, match="changed config: learning_rate: "):
            loop.train_and_evaluate(resumed, workdir)
    meta = json.load(open(os.path.join(workdir, evaluate.RUN_FILE)))
    assert meta["config"]["learning_rate"] == 0.07 and meta["start_step"] == 3 * spe
    assert meta["config_changes"] == {
        "learning_rate": {"old": 0.05, "new": 0.07},
        "num_epochs": {"old": 3, "new": 4},
    }
    first, second = meta["history"]
    assert first["start_step"] == 0 and first["config_changes"] == {}
    assert second["start_step"] == 2 * spe
    assert second["config_changes"] == {
        "learning_rate": {"old": first_lr, "new": 0.05},
        "num_epochs": {"old": 2, "new": 3},
    }
    assert {"code_version", "devices", "started_at"} <= set(first) & set(second)
    # What each session ran ('auto' resolves per platform; a resume may run elsewhere).
    assert first["implementation"]["requested"] == meta["config"]["model"]["implementation"]
    assert first["implementation"]["platform"] == second["implementation"]["platform"] == "cpu"
    # A run.json from before a field existed: the field is recorded, not warned about.
    path = os.path.join(workdir, evaluate.RUN_FILE)
    del meta["config"]["model"]["compact_lengths"]
    json.dump(meta, open(path, "w"))
    resumed = config.copy_and_resolve_references()
    resumed.num_epochs, resumed.learning_rate = 5, 0.07
    with pytest.warns(UserWarning) as caught:
        loop.train_and_evaluate(resumed, workdir)
    [message] = [str(w.message) for w in caught if "changed config" in str(w.message)]
    assert "num_epochs: 4 -> 5" in message and "compact_lengths" not in message
    changes = json.load(open(path))["config_changes"]
    assert changes["model.compact_lengths"] == {"old": None, "new": 0}


def test_resuming_a_run_recorded_with_subsampling_shortcuts_keeps_them(run, tmp_path):
    """A run recorded with model.shortcut='A' (the default before 'A-avg'), resumed by the
    same command: its parameter-free shortcuts restore, but the rest would train with
    average pooling. Refused in one line naming the way to resume it as trained, before
    anything is written."""
    config, workdir = _copy(run, tmp_path)
    path = os.path.join(workdir, evaluate.RUN_FILE)
    meta = json.load(open(path))
    meta["config"]["model"]["shortcut"] = "A"
    json.dump(meta, open(path, "w"))
    before = {f: open(os.path.join(workdir, f), "rb").read()
              for f in (evaluate.RUN_FILE, metrics.METRICS_FILE)}
    resumed = config.copy_and_resolve_references()
    resumed.num_epochs = 3
    assert resumed.model.shortcut == "A-avg"
    with pytest.raises(errors.ConfigError, match=(
            r"trained with model.shortcut='A' \(run.json\) and this config has 'A-avg' .*"
            r"Resume it as trained with --config.model.shortcut=A, or train in a fresh")):
        loop.train_and_evaluate(resumed, workdir)
    assert before == {f: open(os.path.join(workdir, f), "rb").read() for f in before}



def test_resuming_with_another_initialization_is_refused(run, tmp_path):
    """A resumed run keeps the parameters it has: another model.initialization was recorded
    in run.json as if the run had it (unwarned for a run.json from before the field).
    Refused in one line naming the way to resume it, before anything is written."""
    config, workdir = _copy(run, tmp_path)
    path = os.path.join(workdir, evaluate.RUN_FILE)
    meta = json.load(open(path))
    assert meta["config"]["model"].pop("initialization") == "ours"  # as an earlier version's
    json.dump(meta, open(path, "w"))
    before = {f: open(os.path.join(workdir, f), "rb").read()
              for f in (evaluate.RUN_FILE, metrics.METRICS_FILE)}
    resumed = config.copy_and_resolve_references()
    resumed.num_epochs, resumed.model.initialization = 3, "official"
    with pytest.raises(errors.ConfigError, match=(
            r"^The run in .* was initialised with model.initialization='ours' \(run.json, from "
            r"before the field\) and this config has 'official': .* Resume it with "
            r"--config.model.initialization=ours, or train in a fresh --workdir.$")):
        loop.train_and_evaluate(resumed, workdir)
    assert before == {f: open(os.path.join(workdir, f), "rb").read() for f in before}
    meta["config"]["model"]["initialization"] = "official"  # an :official run resumed without
    json.dump(meta, open(path, "w"))
    with pytest.raises(errors.ConfigError, match=r"initialization='official' \(run.json\) and "
                       r"this config has 'ours'.*--config.model.initialization=official,"):
        loop.train_and_evaluate(config.copy_and_resolve_references(), workdir)

def test_stop_signals_request_a_stop_and_a_second_ctrl_c_stops_at_once():
    import signal as signal_lib

    from stochastic_depth_jax.training import stopping

    before = signal_lib.getsignal(signal_lib.SIGTERM)
    with stopping.StopSignals() as stop:
        assert stop.agreed() is None
        os.kill(os.getpid(), signal_lib.SIGINT)  # Ctrl-C: a request, no KeyboardInterrupt
        assert stop.agreed() == signal_lib.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal_lib.SIGINT)  # the second one stops at once
    assert signal_lib.getsignal(signal_lib.SIGTERM) is before  # handlers restored
    # SLURM's --signal=USR1@N asks for a checkpoint ahead of the limit: it ended the process.
    before = signal_lib.getsignal(signal_lib.SIGUSR1)
    with stopping.StopSignals() as stop:
        os.kill(os.getpid(), signal_lib.SIGUSR1)
        assert stop.agreed() == signal_lib.SIGUSR1
    assert signal_lib.getsignal(signal_lib.SIGUSR1) is before


def test_a_stop_says_how_to_resume_to_python_and_on_the_command_line(capsys):
    """From Python (a notebook) a stopped run is resumed by calling the trainer again; the
    command-line tools print their own line: run the same command."""
    import signal as signal_lib

    from stochastic_depth_jax.training import cli, stopping

    what = "stopped by SIGTERM at step 6 (epoch 2, step 2 of 4); its checkpoint is saved in w"
    stop = stopping.Stopped(what, signal_lib.SIGTERM)
    assert str(stop) == f"{what}: call train_and_evaluate again with the same workdir to resume."

    def main():
        raise stop

    with pytest.raises(SystemExit) as exit_info:
        cli.run_reporting_errors(main, debug=False)
    assert exit_info.value.code == 128 + signal_lib.SIGTERM
    assert capsys.readouterr().err == f"{what}: run the same command to resume.\n"
    # Each signal's own status, as a shell reports it: 130 for Ctrl-C, not SIGTERM's 143.
    for signum in (signal_lib.SIGINT, signal_lib.SIGUSR1):
        assert stopping.Stopped(what, signum).exit_status == 128 + signum


def test_an_image_folder_run_recorded_before_per_class_holdout_keeps_its_split(
        run, tmp_path, monkeypatch):
    """A run.json written before the hold-out method and absolute paths were recorded: a
    relative folder path and no data.holdout (its validation set was held out at random).
    It evaluates and resumes on the split it trained on, and the resumed run records the
    path absolute, so it then evaluates from any directory."""
    import jax

    from stochastic_depth_jax.training import setup

    config, workdir = _copy(run, tmp_path)
    folder = config.dataset.removeprefix("image_folder:")
    monkeypatch.chdir(os.path.dirname(folder))
    earlier = config.copy_and_resolve_references()
    earlier.dataset = f"image_folder:{os.path.basename(folder)}"
    legacy = setup.load_data(earlier, workdir, {"name": earlier.dataset})
    assert data.fingerprint(legacy) != data.fingerprint(setup.load_data(earlier, workdir))
    path = os.path.join(workdir, evaluate.RUN_FILE)
    meta = json.load(open(path))
    recorded = setup.run_metadata(earlier, legacy, jax.make_mesh((1,), ("data",)))["data"]
    meta["data"] = {k: v for k, v in recorded.items() if k != "holdout"}
    meta["config"]["dataset"] = earlier.dataset
    json.dump(meta, open(path, "w"))
    assert evaluate.evaluate_checkpoint(workdir, "latest", "validation")["count"] == 6
    earlier.num_epochs = 3
    with pytest.warns(UserWarning) as caught:
        loop.train_and_evaluate(earlier, workdir)
    [message] = [str(w.message) for w in caught if "changed config" in str(w.message)]
    assert "num_epochs: 2 -> 3" in message and "dataset" not in message
    meta = json.load(open(path))
    assert meta["config"]["dataset"] == f"image_folder:{folder}"
    assert meta["data"]["holdout"] == "random"
    monkeypatch.chdir(tmp_path)
    assert evaluate.evaluate_checkpoint(workdir, "latest", "validation")["count"] == 6


def test_records_set_aside_after_a_torn_line_of_the_dropped_file_start_their_own(tmp_path):
    """Killed while appending to metrics.jsonl.dropped, the next start appended the same
    records after the torn line: the first joined it, unreadable, lost from the history."""
    workdir = str(tmp_path)
    _write_lines(workdir, [json.dumps({"epoch": e, "step": 4 * e}) + "\n" for e in (1, 2, 3)])
    with open(os.path.join(workdir, "metrics.jsonl.dropped"), "w") as f:
        f.write('{"epoch": 2, "st')  # the torn first line of the set-aside records
    with pytest.warns(UserWarning, match=r"dropped 2 other record\(s\) \(epochs 2-3\)"):
        metrics.MetricWriter(workdir, tensorboard=False, resume_epoch=1)
    with pytest.warns(UserWarning, match=r"Skipping unreadable line\(s\) \[1\]"):
        kept = metrics.read_metrics(workdir, "metrics.jsonl.dropped")
    assert [r["epoch"] for r in kept] == [2, 3]
