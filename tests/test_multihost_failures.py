"""A multi-process job in which one process goes wrong: every process ends within a bound,
with a non-zero status and one line saying what happened and on which process."""

import atexit
import collections
import errno
import itertools
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import pytest

from processes import finish_all, free_address, start_all
from stochastic_depth_jax import errors
from stochastic_depth_jax.training import distributed
from stochastic_depth_jax.training import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "workers", "fails_on_one.py")
sys.path.insert(0, os.path.dirname(WORKER))
import fails_on_one  # noqa: E402
# SDJ_SHARED_WAIT_S: a workdir not shared is called so after 5 s, not the default 90.
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
           PYTHONUNBUFFERED="1", SDJ_SHARED_WAIT_S="5")
# Each case ends within seconds; the old code hung for minutes (a test fails at this bound,
# with every process's output). The bound only catches hangs: where the old code ended sooner,
# with a traceback, a C++ abort or another message, the assertions on the output fail it. So it
# is generous, for loaded machines: on a 2-core machine a job that trains and saves once took
# 21 s quiet, 40 s at load 6 to 8, over 60 s at load 8, and once ran past the 90 s this was
# at load 12. It stays below the 300 s a process waits by default for the others to join
# (--init_timeout), so that a process left waiting there is caught as a hang.
BOUND_S = 240
# An --init_timeout the old code waited out in the join: longer than the bound, so that a
# process left waiting there fails the test, however slowly the processes start.
PAST_THE_BOUND = str(2 * BOUND_S)


def _train_args(tmp_path, address, *extra, processes=2):
    return ["--config", "cifar10:smoke", "--config.progress_bar=false",
            "--config.write_tensorboard=false", "--workdir", str(tmp_path / "run"),
            "--coordinator_address", address, "--coordinator_bind_address", address,
            "--num_processes", str(processes), *extra]


def _error_line(status, text):
    """Asserts a failure reported in one line, without a traceback; returns the line."""
    assert status == 1, text[-3000:]
    assert "Traceback" not in text and "stack trace" not in text, text[-3000:]
    [line] = [x for x in text.splitlines() if x.startswith("error:")]
    return line


def test_a_process_with_another_config_stops_the_job(tmp_path):
    address = free_address()
    commands = [[sys.executable, "train.py", *_train_args(tmp_path, address),
                 "--process_id", str(i), *extra]
                for i, extra in enumerate(([], ["--config.batch_size=16"]))]
    (s0, out0, _), (s1, out1, _) = finish_all(
        start_all(commands, env=ENV, cwd=REPO), timeout=BOUND_S)
    mine = _error_line(s1, out1)
    assert "Process 1's config differs from process 0's (batch_size: 16 here, 32 on " \
           "process 0)" in mine
    theirs = _error_line(s0, out0)
    assert theirs.startswith("error: process 1 of 2 failed, so process 0 stops too")
    assert theirs.endswith(mine.removeprefix("error: "))
    assert not os.path.exists(tmp_path / "run")  # Nothing written before the check.


def test_a_workdir_the_processes_do_not_share_stops_the_job_in_one_line(tmp_path):
    """Each process given a workdir of its own (as each host's local disk is): the old code
    hung 10 minutes in the first checkpoint save (Orbax waiting for process 0's folders),
    then failed with a traceback; with fake data, process 1 called the dataset missing."""
    address = free_address()
    commands = [[sys.executable, "train.py", *_train_args(tmp_path / f"host{i}", address),
                 "--process_id", str(i)] for i in range(2)]
    (s0, out0, _), (s1, out1, _) = finish_all(
        start_all(commands, env=ENV, cwd=REPO), timeout=BOUND_S)
    mine = _error_line(s1, out1)
    # The path named is process 1's own --workdir, said so (it read as process 0's).
    assert mine.startswith(f"error: Process 1 does not see process 0's workdir in its own "
                           f"--workdir {tmp_path / 'host1' / 'run'} (the run.lock process 0 "
                           "took is missing there): every process needs the same --workdir"), mine
    theirs = _error_line(s0, out0)
    assert theirs.startswith("error: process 1 of 2 failed, so process 0 stops too"), theirs
    assert theirs.endswith(mine.removeprefix("error: "))
    assert not os.path.exists(tmp_path / "host0" / "run")  # Only its lock there: removed.
    # It waited ENV's 5 s for process 0's lock, not the default 90 s, which says it waits.
    assert "to see the run.lock" not in out1, out1[-3000:]


def test_processes_that_load_different_data_stop_before_training(tmp_path):
    """Each host reads its own copy of the data (an image folder's path may differ per
    host): copies that differ by one pixel trained each host on other examples under the
    same indices, and the job ended with status 0."""
    import numpy as np
    from PIL import Image
    from stochastic_depth_jax.data import testing
    for i in range(2):
        testing.make_image_folder(str(tmp_path / f"host{i}"), classes=2, per_class_train=24,
                                  per_class_test=4, size=(8, 8))
    changed = tmp_path / "host1" / "train" / "class0" / "0.png"
    pixels = np.asarray(Image.open(changed)).copy()
    pixels[0, 0] ^= 255
    Image.fromarray(pixels).save(changed)
    address = free_address()
    commands = [[sys.executable, "train.py", *_train_args(tmp_path, address),
                 f"--config.dataset=image_folder:{tmp_path / f'host{i}'}",
                 "--config.batch_size=8", "--config.eval_batch_size=8",
                 "--config.validation_size=8", "--process_id", str(i)] for i in range(2)]
    (s0, out0, _), (s1, out1, _) = finish_all(
        start_all(commands, env=ENV, cwd=REPO), timeout=BOUND_S)
    mine = _error_line(s1, out1)
    assert mine == ("error: Process 1's dataset differs from process 0's (40 training, 8 "
                    "validation, 8 test images on both, but other pixels or labels); every "
                    "process must load the same data: copy process 0's data_dir (or image "
                    "folder) to this host."), mine
    theirs = _error_line(s0, out0)
    assert theirs.startswith("error: process 1 of 2 failed, so process 0 stops too"), theirs
    assert "epoch 1" not in out0 + out1  # stopped before training
    assert not os.path.exists(tmp_path / "run")


def test_the_bound_on_a_job_is_a_hang_detector_below_the_wait_to_join(request):
    """A process left waiting in the join (the default --init_timeout) fails a test at
    BOUND_S as a hang, and a wait set past the bound ends within pytest's timeout."""
    parser = distributed.ArgumentParser(prog="train.py")
    distributed.add_arguments(parser)
    assert BOUND_S < parser.parse_args([]).init_timeout
    assert BOUND_S < int(PAST_THE_BOUND) < float(request.config.getini("timeout"))


def test_processes_with_unequal_device_counts_stop_at_once_in_one_line(tmp_path):
    """A host with a GPU fewer: the old code failed in JAX's multi-host utilities with a
    traceback (``cannot reshape array of size 3 into shape (2,2)``) on every process."""
    address = free_address()
    procs = [proc for i, n in enumerate((2, 1)) for proc in start_all(
        [[sys.executable, "train.py", *_train_args(tmp_path, address), "--process_id", str(i),
          "--config.batch_size=24", "--config.eval_batch_size=24"]],
        env=dict(ENV, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}"), cwd=REPO)]
    for status, out, _ in finish_all(procs, timeout=BOUND_S):
        assert _error_line(status, out) == (
            "error: The processes of this job do not all have the same number of devices "
            "(process 1: 1; the others: 2); give every process as many (the same "
            "CUDA_VISIBLE_DEVICES count, or the launcher's GPUs per task).")
    assert not os.path.exists(tmp_path / "run")


def test_a_process_given_another_process_count_stops_the_job_at_once(tmp_path):
    """Process 1 told of 3 processes where process 0 started a job of 2: the old code ran it
    (as 2), process 1 watching for a process that does not exist."""
    address = free_address()
    commands = [[sys.executable, "train.py",
                 *_train_args(tmp_path, address, processes=2 + i), "--process_id", str(i)]
                for i in range(2)]
    (s0, out0, _), (s1, out1, _) = finish_all(start_all(commands, env=ENV, cwd=REPO),
                                               timeout=BOUND_S)
    mine = _error_line(s1, out1)
    assert mine == ("error: Process 1 was given --num_processes 3, but the job process 0 "
                    "started has 2 processes; give every process the same --num_processes.")
    assert _error_line(s0, out0).endswith(mine.removeprefix("error: "))
    assert not os.path.exists(tmp_path / "run")


def test_unequal_device_counts_name_the_processes_that_differ():
    distributed.check_device_counts([0, 0, 1, 1, 2, 2])
    with pytest.raises(errors.DistributedError, match=r"devices \(process 0: 3, process 2: "
                       r"1; the others: 2\); give"):
        distributed.check_device_counts([0, 0, 0, 1, 1, 2, 3, 3])


TYPO = "--config.batch_sise=16"


@pytest.mark.parametrize("typos", [{0}, {0, 1}])
def test_a_config_typo_on_some_processes_stops_the_job_at_once(tmp_path, typos):
    # The processes with the typo fail before joining; the old code left the others
    # waiting in the join until --init_timeout (here longer than the bound).
    address = free_address()
    commands = [[sys.executable, "train.py", *_train_args(tmp_path, address),
                 "--process_id", str(i), "--init_timeout", PAST_THE_BOUND,
                 *([TYPO] * (i in typos))]
                for i in range(2)]
    results = finish_all(start_all(commands, env=ENV, cwd=REPO), timeout=BOUND_S)
    own = "error: Unknown config field 'batch_sise'. Did you mean 'batch_size'? "
    for i, (status, out, _) in enumerate(results):
        line = _error_line(status, out)
        if i in typos:  # Its own error first, then why it does not exit yet.
            assert line.startswith(own), line
            assert out.index(own) < out.index("only to tell the other processes"), out
        else:
            [who] = typos
            assert line.startswith(f"error: process {who} of 2 failed, so process {i} stops "
                                   f"too (see process {who}'s output); its error: "
                                   + own.removeprefix("error: ")), line
    assert not os.path.exists(tmp_path / "run")


def test_a_usage_error_on_one_process_stops_the_job_at_once(tmp_path):
    """A misspelt flag on one process: argparse's usage error and exit 2 there, while the
    other waited the whole --init_timeout (here past the bound) and then blamed the launch. A mistake
    in the job flags themselves cannot reach the others: they wait, then name that cause."""
    address, lone = free_address(), free_address()
    commands = [[sys.executable, "train.py", *_train_args(tmp_path / str(job), where,
                                                          "--init_timeout", timeout),
                 "--process_id", str(i), *(mistake if i == 1 else [])]
                for job, (where, timeout, mistake) in enumerate([
                    (address, PAST_THE_BOUND, ["--confg.batch_size=16"]),
                    (lone, "3", ["--process_id", "one"])])
                for i in range(2)]
    results = finish_all(start_all(commands, env=ENV, cwd=REPO), timeout=BOUND_S)
    (status0, out0, _), (status1, out1, _), (waited, out2, _), (bad, out3, _) = results
    usage = ("train.py: error: unrecognised argument '--confg.batch_size=16' (overrides look "
             "like --config.<field>=<value>); did you mean --config.batch_size=16?")
    assert status1 == 2 and usage in out1.splitlines(), out1
    assert _error_line(status0, out0) == (
        "error: process 1 of 2 failed, so process 0 stops too (see process 1's output); its "
        f"error: a mistake on its command line ({usage.replace(': error', '', 1)})")
    assert bad == 2 and "argument --process_id: invalid int value: 'one'" in out3, out3
    assert _error_line(waited, out2).startswith(
        f"error: multi-process start failed: the 2 processes did not all join at {lone} "
        "within 3 s. Most likely a process was not started, or stopped before joining")


@pytest.mark.parametrize("argv, joins", [
    (["--process_id", "1", "--bogus"], True),
    (["--process_id=1", "--bogus"], True),
    (["--process", "1", "--bogus"], True),  # argparse's abbreviation, read as it reads it
    (["--process_id", "1", "--bogus", "--debug"], False),
    (["--process_id", "one", "--bogus"], False),
])
def test_a_usage_error_joins_the_job_its_flags_name_unless_debugging(monkeypatch, capsys,
                                                                      argv, joins):
    """Under --debug a misspelt flag joined the job to report it (and waited up to
    --init_timeout), where --debug reports any other error without joining."""
    told = []
    monkeypatch.delenv("SDJ_DEBUG", raising=False)
    monkeypatch.setattr(distributed, "_expected", None)  # restored after: expect_job sets it
    monkeypatch.setattr(distributed, "leave_job", lambda message, status: told.append(
        (distributed._expected["process_id"], message, status)))
    parser = distributed.ArgumentParser(prog="train.py")
    distributed.add_arguments(parser)
    parser.add_argument("--debug", action="store_true")
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(["--coordinator_address", "127.0.0.1:1", "--num_processes", "2",
                           *argv])
    assert stopped.value.code == 2
    assert "train.py: error:" in capsys.readouterr().err
    assert told == ([(1, "a mistake on its command line (train.py: unrecognized arguments: "
                      "--bogus)", 2)] if joins else [])


def test_a_lone_process_with_a_typo_says_so_before_waiting_for_the_others():
    # One of two processes run alone to try the command: its error shows at once, then it
    # waits to tell the others, which a Ctrl-C ends.
    address = free_address()
    proc = subprocess.Popen(
        [sys.executable, "train.py", "--config", "cifar10:smoke", TYPO, "--coordinator_address",
         address, "--coordinator_bind_address", address, "--num_processes", "2",
         "--process_id", "1"], cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    try:
        lines = []
        while not lines or "Ctrl-C stops" not in lines[-1]:
            lines.append(proc.stdout.readline())
            assert lines[-1], lines  # Ended (the old code: exit 1 without telling anyone).
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=BOUND_S) == -signal.SIGINT
    finally:
        proc.kill()
        proc.communicate()
    assert [x for x in lines if x.startswith("error:")] == [lines[-2]], lines
    assert lines[-2].startswith("error: Unknown config field 'batch_sise'.")
    assert lines[-1] == ("Joining the job only to tell the other processes of this failure "
                         "(waiting up to 300 s for them all; Ctrl-C stops).\n")


def test_only_a_failure_the_cli_reports_leaves_the_checkpoint_close_to_it(monkeypatch):
    # A Python caller's failure in a job reaches no leave_job, and a close left to the exit
    # fails (the interpreter has shut its thread pools down; the save stays uncommitted):
    # the run closes its checkpoints at once, as before. The command-line tools report the
    # failure first, then close (leave_job).
    monkeypatch.setattr(distributed, "in_job", lambda: True)
    monkeypatch.setattr(distributed, "_closing", [])
    assert not distributed.close_after_reporting(lambda: None)
    assert distributed._closing == []
    with distributed.reporting_failures():
        assert distributed.close_after_reporting(print)
    assert distributed._closing == [print]
    assert not distributed.close_after_reporting(lambda: None)  # The block has ended.


def test_the_workdir_stays_locked_until_a_failed_runs_save_is_committed(monkeypatch, tmp_path):
    # The command-line tools finish a failed run's save after reporting the failure: the
    # workdir lock is held until then, or a run started meanwhile would take the save in
    # flight for one left unfinished and move it aside.
    sys.path.insert(0, REPO)  # `configs` lives at the repository root.
    from configs import load_config
    from stochastic_depth_jax.training import loop

    monkeypatch.setattr(distributed, "in_job", lambda: True)
    monkeypatch.setattr(distributed, "_closing", [])
    workdir = str(tmp_path / "run")
    saved = []

    def fails_while_saving(config, workdir):
        os.makedirs(os.path.join(workdir, "checkpoints", "4.orbax-checkpoint-tmp-1"))
        assert distributed.close_after_reporting(lambda: saved.append("committed"))
        raise RuntimeError("failed with a save in flight")

    monkeypatch.setattr(loop, "_run_locked", fails_while_saving)
    with distributed.reporting_failures(), pytest.raises(RuntimeError, match="in flight"):
        loop.train_and_evaluate(load_config("cifar10:smoke"), workdir)
    with pytest.raises(errors.WorkdirBusyError):
        workdir_lib.WorkdirLock(workdir).acquire()
    distributed._close_all()  # What leave_job runs once the others know.
    assert saved == ["committed"]
    workdir_lib.WorkdirLock(workdir).acquire().release()


def test_a_failed_run_ended_at_once_before_its_release_still_releases_the_workdir(
        monkeypatch, tmp_path):
    # Its failure left the release to leave_job (once the others are told); the peer watch
    # ending the process first (another process failed too, which broke a collective of
    # this one) skipped it: run.lock kept the run's record, and the next run took the lock
    # over from a holder 'gone'.
    sys.path.insert(0, REPO)  # `configs` lives at the repository root.
    from configs import load_config
    from stochastic_depth_jax.training import loop

    monkeypatch.setattr(distributed, "in_job", lambda: True)
    monkeypatch.setattr(distributed, "_closing", [])
    monkeypatch.setattr(os, "_exit", lambda status: None)
    workdir = tmp_path / "run"
    workdir.mkdir()  # A run's workdir: kept.

    def fails_with_a_close_pending(config, workdir):
        assert distributed.close_after_reporting(lambda: None)
        raise RuntimeError("a collective broke (injected)")

    monkeypatch.setattr(loop, "_run_locked", fails_with_a_close_pending)
    with distributed.reporting_failures(), pytest.raises(RuntimeError, match="injected"):
        loop.train_and_evaluate(load_config("cifar10:smoke"), str(workdir))
    distributed._exit_now(1)  # The peer watch ends the process: no leave_job.
    assert (workdir / workdir_lib.LOCK_FILE).read_text() == ""
    workdir_lib.WorkdirLock(str(workdir)).acquire().release()
    distributed._close_all()  # Leaves nothing registered for the other tests.
    assert not distributed._cleanups


@pytest.mark.parametrize("kept", [None, "metrics.jsonl", "checkpoints"])
def test_a_run_failing_with_only_fake_data_written_leaves_no_workdir(monkeypatch, tmp_path,
                                                                     kept):
    # The fake data is made again by the next run; a result or a checkpoint keeps it all.
    sys.path.insert(0, REPO)  # `configs` lives at the repository root.
    from configs import load_config
    from stochastic_depth_jax.training import loop, setup as setup_lib

    workdir = tmp_path / "run"
    load_data = setup_lib.load_data

    def fails_after_loading(config, workdir, *args):
        load_data(config, workdir, *args)
        if kept == "checkpoints":
            os.makedirs(os.path.join(workdir, kept, "0"))
        elif kept:
            open(os.path.join(workdir, kept), "w").close()
        raise errors.DataError("failed after the fake data was written (injected)")

    monkeypatch.setattr(setup_lib, "load_data", fails_after_loading)
    with pytest.raises(errors.DataError, match="injected"):
        loop.train_and_evaluate(load_config("cifar10:smoke"), str(workdir))
    if kept is None:
        assert not os.path.exists(workdir)
    else:
        assert {kept, setup_lib.FAKE_DATA_DIR} <= set(os.listdir(workdir))
        assert (workdir / workdir_lib.LOCK_FILE).read_text() == ""  # Released.


def test_a_failed_run_leaves_its_new_workdir_to_a_run_that_took_the_lock_first(
        monkeypatch, tmp_path):
    # Two runs started at once in a new workdir: this one created it, the other one locked
    # it first and is writing its fake data there. This one, refused, must not remove them.
    sys.path.insert(0, REPO)  # `configs` lives at the repository root.
    from configs import load_config
    from stochastic_depth_jax.training import loop, setup as setup_lib

    workdir, prepare = tmp_path / "run", workdir_lib.prepare_workdir
    other = workdir_lib.WorkdirLock(str(workdir))

    def created_then_locked_by_another(path):
        created = prepare(path)
        other.acquire()
        os.makedirs(os.path.join(path, setup_lib.FAKE_DATA_DIR))
        return created

    monkeypatch.setattr(workdir_lib, "prepare_workdir", created_then_locked_by_another)
    try:
        with pytest.raises(errors.WorkdirBusyError):
            loop.train_and_evaluate(load_config("cifar10:smoke"), str(workdir))
        assert set(os.listdir(workdir)) == {workdir_lib.LOCK_FILE, setup_lib.FAKE_DATA_DIR}
        with pytest.raises(errors.WorkdirBusyError):  # Still the other run's lock file.
            workdir_lib.WorkdirLock(str(workdir)).acquire()
    finally:
        other.release()


def test_a_process_ended_at_once_cleans_up_within_a_bound(monkeypatch):
    # os._exit skips finally blocks: what the run registered runs first, from this thread,
    # even when one clean-up fails and another hangs on a dead filesystem.
    ran, exits = [], []
    monkeypatch.setattr(os, "_exit", exits.append)
    monkeypatch.setattr(distributed, "CLEANUP_WAIT_S", 0.5)
    hung = threading.Event()

    def fails():
        ran.append("fails")
        raise OSError("injected")

    start = time.monotonic()
    with distributed.cleanup_if_stopped(lambda: ran.append("first") or hung.wait()), \
            distributed.cleanup_if_stopped(fails):
        distributed._exit_now(1)
    hung.set()
    assert exits == [1] and ran == ["fails", "first"]
    assert time.monotonic() - start < 5
    distributed._exit_now(2)  # The block ended: nothing more runs.
    assert exits == [1, 2] and ran == ["fails", "first"]


def test_evaluate_joins_with_the_timeouts_of_train(monkeypatch, tmp_path):
    sys.path.insert(0, REPO)  # evaluate.py lives at the repository root.
    import evaluate as evaluate_cli

    joined = []

    def initialize(**job):
        joined.append(job)
        raise errors.DistributedError("stop here")

    monkeypatch.setattr(distributed, "initialize", initialize)
    monkeypatch.setattr(distributed, "_expected", None, raising=False)  # Restored after.
    args = evaluate_cli.parse_args(["--workdir", str(tmp_path), "--multihost",
                                    "--init_timeout", "20", "--heartbeat_timeout", "7"])
    with pytest.raises(errors.DistributedError, match="stop here"):
        evaluate_cli.run(args)
    assert joined == [dict(auto=True, coordinator_address=None, num_processes=None,
                           process_id=None, coordinator_bind_address=None, timeout_s=20,
                           heartbeat_timeout_s=7)]
    assert distributed._expected == joined[0]  # A failure before joining tells the others.


def _worker_job(tmp_path, mode, *extra, processes=2):
    address = free_address()
    return start_all([[sys.executable, WORKER, mode,
                       *_train_args(tmp_path, address, *extra, processes=processes),
                       "--process_id", str(i)] for i in range(processes)], env=ENV, cwd=REPO)


def test_a_process_failing_in_setup_stops_the_other(tmp_path):
    (s0, out0, _), (s1, out1, _) = finish_all(_worker_job(tmp_path, "raise"),
                                               timeout=BOUND_S)
    assert _error_line(s1, out1).endswith("does not exist on this host (injected).")
    line = _error_line(s0, out0)
    assert re.fullmatch(r"error: process 1 of 2 failed, so process 0 stops too \(see "
                        r"process 1's output\); its error: Dataset folder .* \(injected\)\.",
                        line), line
    # Its workdir, with only fake data written, goes as a lone run's does (see below).
    assert "Writing fake cifar10 data" in out0 and not os.path.exists(tmp_path / "run")


def test_a_process_failing_during_a_save_is_reported_before_the_save_ends(tmp_path):
    # The old code waited for the save (every process takes part) before telling the others.
    (s0, out0, _), (s1, out1, _) = finish_all(_worker_job(tmp_path, "save"), timeout=BOUND_S)
    assert (s0, s1) == (1, 1), f"process 0:\n{out0[-3000:]}\nprocess 1:\n{out1[-3000:]}"
    assert _error_line(s1, out1) == "error: " + fails_on_one.MESSAGE
    line = _error_line(s0, out0)
    assert line.startswith("error: process 1 of 2 failed, so process 0 stops too"), line
    assert out0.index(line) < out0.index(fails_on_one.SAVED), out0[-3000:]
    assert fails_on_one.SAVED in out1  # Completed and committed, not abandoned:
    saved = os.listdir(tmp_path / "run" / "checkpoints_best")
    assert [name for name in saved if name.isdigit()] == saved != [], saved


def test_a_job_that_diverged_ends_once_process_0_has_drawn_its_curves(tmp_path):
    """Every process finds the divergence at the same step; process 0 alone then draws the
    curves up to it. The others reported it at once, and process 0, stopped because 'process
    1 failed', was ended in the middle of its drawing: no error.png marking the divergence."""
    results = finish_all(_worker_job(tmp_path, "slowplot", "--config.learning_rate=1e8"),
                         timeout=BOUND_S)
    for status, out, _ in results:
        assert "non-finite" in _error_line(status, out), out[-3000:]
    assert fails_on_one.DRAWN in results[0][1], results[0][1][-3000:]
    assert {"error.png", "loss.png"} <= set(os.listdir(tmp_path / "run"))


def test_a_job_that_diverged_ends_though_process_0_s_drawing_hangs(tmp_path):
    """Process 0's last drawing never ends: the others waited for it in a device collective,
    for good (the job hung silent, on CPUs too). Now they wait ``DRAWING_WAIT_S``, then
    report the divergence, which ends process 0 too."""
    (s0, out0, _), (s1, out1, _) = finish_all(
        _worker_job(tmp_path, "hungplot", "--config.learning_rate=1e8"), timeout=BOUND_S)
    assert "non-finite" in _error_line(s1, out1), out1[-3000:]
    line = _error_line(s0, out0)
    assert line.startswith("error: process 1 of 2 failed, so process 0 stops too") and (
        "non-finite" in line), out0[-3000:]
    assert fails_on_one.DRAWN not in out0


@pytest.mark.parametrize("who, saves", [(0, "async"), (1, "async"), (0, "sync")])
def test_a_disk_filling_on_one_process_during_a_save_stops_the_job_at_once(tmp_path, who,
                                                                           saves):
    """Process ``who``'s part of a save failed (ENOSPC): Orbax's save thread there still
    synced with the others after its failure, while they waited for it after their own
    writes; the job hung silent for Orbax's timeout (20 minutes), each waiting for the
    other. Now the failed process says why and the other stops, naming it. Process 0's
    save met the full disk twice (its metadata, its arrays): said once, not again at the
    close as a 'warning: the checkpoint being saved at this failure was not completed'.
    Synchronous saves (``async_checkpointing=False``) end so too: Orbax's synchronous
    save raises its failure on the caller's thread before its barriers."""
    (s0, out0, _), (s1, out1, _) = finish_all(
        _worker_job(tmp_path, f"full{who}", "--config.num_epochs=3",
                    f"--config.async_checkpointing={saves == 'async'}"), timeout=BOUND_S)
    outputs = (out0, out1)
    checkpoints = tmp_path / "run" / "checkpoints"
    full = (f"error: Cannot write {checkpoints} (No space left on device): free some space "
            "or use another --workdir. The checkpoints saved before are kept")
    assert _error_line((s0, s1)[who], outputs[who]).startswith(full), outputs[who][-3000:]
    assert "warning" not in outputs[who], outputs[who][-3000:]
    line = _error_line((s1, s0)[who], outputs[1 - who])
    assert line.startswith(f"error: process {who} of 2 failed, so process {1 - who} stops "
                           f"too (see process {who}'s output); its error: Cannot write "
                           f"{checkpoints} (No space left on device)"), line
    assert "4" in os.listdir(checkpoints)  # The step saved before, kept.


def test_processes_that_list_different_checkpoints_stop_before_training(tmp_path):
    """Resumed with process 0 not listing the newest checkpoint (its host's view of the
    workdir lagging): every process stops before anything is written. Process 0 compared
    with itself: it went on from step 2, set the record of step 4 aside (metrics.jsonl
    emptied) and rewrote run.json before process 1's failure stopped it; before that
    check, the two trained on out of step (process 1 then ended by JAX's runtime)."""
    from configs import load_config
    from stochastic_depth_jax.training import loop

    flags = ["--config.progress_bar=false", "--config.write_tensorboard=false",
             "--config.checkpoint_every_steps=2"]
    run = tmp_path / "run"
    loop.train_and_evaluate(load_config("cifar10:smoke", flags + ["--config.max_steps=4"]),
                            str(run))
    before = {name: (run / name).read_text() for name in ("metrics.jsonl", "run.json")}
    results = finish_all(_worker_job(tmp_path, "stale0", *flags, "--config.max_steps=6"),
                         timeout=BOUND_S)
    assert {name: (run / name).read_text() for name in before} == before
    assert not (run / "metrics.jsonl.dropped").exists()
    for status, out, _ in results:  # The process that says it first names it for the other.
        assert _error_line(status, out).endswith(
            "The processes of this job start from different steps (process 0: step 2; the "
            f"others: step 4): the hosts list different checkpoints in {run / 'checkpoints'} "
            "(a shared filesystem whose caches lag); start the job again once every host "
            "sees the same files."), out[-3000:]


@pytest.mark.parametrize("who", [0, 1])
def test_a_checkpoint_damaged_on_one_host_only_stops_every_process_in_one_line(tmp_path, who):
    """Resumed where process ``who`` reads the newest checkpoint as damaged (its host's copy
    broken) and the other reads it intact: the one went on to set it aside while the other
    restored it, and the job ended in a traceback ('sync_global_devices name mismatch').
    Now every process stops with one line naming it, and nothing is moved."""
    from configs import load_config
    from stochastic_depth_jax.training import loop

    flags = ["--config.progress_bar=false", "--config.write_tensorboard=false",
             "--config.write_plots=false", "--config.checkpoint_every_steps=2"]
    run = tmp_path / "run"
    loop.train_and_evaluate(load_config("cifar10:smoke", flags + ["--config.max_steps=4"]),
                            str(run))
    results = finish_all(_worker_job(tmp_path, f"damaged{who}", *flags,
                                     "--config.max_steps=6"), timeout=BOUND_S)
    for status, out, _ in results:  # The process that says it first names it for the other.
        assert _error_line(status, out).endswith(
            f"The latest checkpoint at step 4 in {run / 'checkpoints'} is unreadable on "
            f"process {who} (ValueError: Unexpected end of JSON input (injected)) but read by "
            "another: the hosts see different files (a shared filesystem whose caches lag, or "
            "copies that differ); nothing was moved. Start the job again once every host sees "
            f"the same files, or move {run / 'checkpoints' / '4'} aside to resume from the "
            "step before it."), out[-3000:]
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
    assert not (run / "checkpoints_corrupt").exists()


def test_processes_that_do_not_all_read_an_earlier_best_stop_before_training(tmp_path):
    """Resumed from an earlier version's best that no evaluation measured, which every
    process reads to evaluate it: process 1, not listing it (its host's view of the workdir
    lagging), chose the best again and trained on while process 0 evaluated that checkpoint
    in collectives process 1 never entered."""
    from configs import load_config
    from stochastic_depth_jax.training import loop
    from test_trainer_invariants import _strip_best_evaluation

    flags = ["--config.progress_bar=false", "--config.write_tensorboard=false",
             "--config.write_plots=false", "--config.select_best_by=train",
             "--config.lr_boundaries_epochs=()", "--config.num_epochs=3"]
    run = tmp_path / "run"
    loop.train_and_evaluate(load_config("cifar10:smoke", flags + ["--config.max_steps=5"]),
                            str(run))
    _strip_best_evaluation(str(run))
    before = {name: (run / name).read_text() for name in ("metrics.jsonl", "run.json")}
    results = finish_all(_worker_job(tmp_path, "stalebest1", *flags), timeout=BOUND_S)
    for status, out, _ in results:  # The process that says it first names it for the other.
        assert _error_line(status, out).endswith(
            "The processes of this job do not all read the restored best's 'best' checkpoint "
            "(epoch 1, step 4): process 1 could not; the hosts list different checkpoints in "
            f"{run / 'checkpoints_best'} (a shared filesystem whose caches lag); start the "
            "job again once every host sees the same files."), out[-3000:]
    assert {name: (run / name).read_text() for name in before} == before
    assert sorted(os.listdir(run / "checkpoints")) == ["4", "5"]


def test_processes_that_do_not_all_read_a_finished_run_s_summary_stop_alike(tmp_path):
    """A finished run started again: process 0 read its summary.json and returned it
    (nothing to train; an earlier version's best evaluated in collectives), while process
    1, not reading it (its host's view of the workdir lagging), went on to evaluate the
    run's end in collectives process 0 never entered. Both now stop with one line naming
    the file, and the run's files stay as they were."""
    from configs import load_config
    from stochastic_depth_jax.training import loop

    flags = ["--config.progress_bar=false", "--config.write_tensorboard=false",
             "--config.write_plots=false"]
    run = tmp_path / "run"
    loop.train_and_evaluate(load_config("cifar10:smoke", flags), str(run))
    before = {name: (run / name).read_text()
              for name in ("metrics.jsonl", "run.json", "summary.json")}
    results = finish_all(_worker_job(tmp_path, "stalesummary1", *flags), timeout=BOUND_S)
    for status, out, _ in results:  # The process that says it first names it for the other.
        assert _error_line(status, out).endswith(
            f"The processes of this job do not all read {run / 'summary.json'} of step 8, "
            "which the run reached: process 1 could not (a shared filesystem whose caches "
            "lag); start the job again once every host sees the same files."), out[-3000:]
    assert {name: (run / name).read_text() for name in before} == before


def test_a_damaged_checkpoint_every_process_reads_is_set_aside_by_all_together(tmp_path):
    """A damaged 'best' checkpoint read on resuming (an earlier version's best, evaluated
    now): process 0 moved it aside before process 1 had failed to read it, process 1 took
    it for rotated away (not damage) and went on without the move's barrier, and process 0
    ended in a traceback (``sync_global_devices name mismatch``)."""
    from configs import load_config
    from stochastic_depth_jax.training import loop
    from test_trainer_invariants import _strip_best_evaluation

    flags = ["--config.progress_bar=false", "--config.write_tensorboard=false",
             "--config.write_plots=false", "--config.select_best_by=train",
             "--config.lr_boundaries_epochs=()", "--config.num_epochs=2"]
    run = tmp_path / "run"
    loop.train_and_evaluate(load_config("cifar10:smoke", flags + ["--config.max_steps=5"]),
                            str(run))
    _strip_best_evaluation(str(run))
    for folder, _, files in os.walk(run / "checkpoints_best" / "4" / "state"):
        for name in files:
            if os.path.basename(folder) == "d":  # the arrays' data
                with open(os.path.join(folder, name), "w") as f:
                    f.write("damaged")
    address = free_address()
    commands = [[sys.executable, "train.py", *_train_args(tmp_path, address, *flags[2:]),
                 "--process_id", str(i)] for i in range(2)]
    results = finish_all(start_all(commands, env=ENV, cwd=REPO), timeout=BOUND_S)
    for status, out, _ in results:
        assert status == 0 and "Traceback" not in out, out[-3000:]
        assert "warning: Skipping the best checkpoint at step 4" in out, out[-3000:]
    assert "its 'best' checkpoint cannot be read to measure it" in results[0][1]
    [moved] = os.listdir(run / "checkpoints_corrupt")
    assert moved.startswith("best-4-")


def test_different_starts_name_the_processes_behind_the_newest_step():
    from stochastic_depth_jax.training import loop

    assert loop._different_starts([4, 4, 4], "ckpts") is None
    assert loop._different_starts([4, 2, 4, 0, 2, 2, 2], "ckpts").startswith(
        "The processes of this job start from different steps (process 1: step 2, process 3: "
        "step 0, process 4: step 2, process 5: step 2, ...; the others: step 4): the hosts "
        "list different checkpoints in ckpts")


_SILENT_PROCESS_1 = (
    "error: process 1 of 2 failed, so process 0 stops too (see process 1's output); its "
    "error: no sign of life for 3 s (killed, crashed, hung or its host unreachable; "
    "--heartbeat_timeout)")


def _with_process_1_stopped(tmp_path, *extra):
    """Process 0's ``(status, output)`` in a job whose process 1 stops (SIGSTOP) where its
    worker does, with a 3 s ``--heartbeat_timeout``; process 1 is killed after."""
    procs = _worker_job(tmp_path, "stop", "--heartbeat_timeout", "3", *extra)
    try:
        [(s0, out0, _)] = finish_all(procs[:1], timeout=BOUND_S)
    finally:
        procs[1].kill()
        procs[1].communicate()
    return s0, out0


def test_a_hung_process_is_reported_after_the_heartbeat_timeout(tmp_path):
    # Process 1 stops (SIGSTOP) in setup: its connections stay open, so only silence tells.
    s0, out0 = _with_process_1_stopped(tmp_path)
    assert _error_line(s0, out0) == _SILENT_PROCESS_1
    # Ended from the watch thread while its main thread waited for process 1 in a collective:
    # its clean-up ran all the same (the old code left the fake data and a locked workdir).
    assert "Writing fake cifar10 data" in out0 and not os.path.exists(tmp_path / "run")


def test_a_process_hung_while_the_others_wait_in_the_data_check_is_reported(tmp_path):
    """Process 1 stops (SIGSTOP) before loading an image folder, which process 0 loads and
    then waits for process 1's in the data check (no fake data: no collective before it):
    that wait is bounded by the silence (--heartbeat_timeout), not by its own long one."""
    from stochastic_depth_jax.data import testing
    root = testing.make_image_folder(str(tmp_path / "images"), classes=2, per_class_train=24,
                                     per_class_test=4, size=(8, 8))
    s0, out0 = _with_process_1_stopped(
        tmp_path, f"--config.dataset=image_folder:{root}", "--config.batch_size=8",
        "--config.eval_batch_size=8", "--config.validation_size=8")
    assert _error_line(s0, out0) == _SILENT_PROCESS_1
    assert not os.path.exists(tmp_path / "run")


def test_a_hung_process_0_is_reported_after_the_heartbeat_timeout(tmp_path):
    # Process 0 stops (SIGSTOP) in setup, and the job's service with it: the others' calls
    # to it block. The old code left process 1 to JAX's runtime, which aborted it (C++
    # trace, status 134) once its heartbeat calls timed out, 17-33 s later here.
    procs = _worker_job(tmp_path, "stop0", "--heartbeat_timeout", "3")
    try:
        [(s1, out1, _)] = finish_all(procs[1:], timeout=BOUND_S)
    finally:
        procs[0].kill()
        procs[0].communicate()
    assert _error_line(s1, out1) == (
        "error: process 0 of 2 failed, so process 1 stops too (see process 0's output); its "
        "error: no answer from the job's coordination service, which it hosts, for 3 s (hung "
        "or its host unreachable; --heartbeat_timeout)")


def test_a_free_address_is_kept_for_its_coordinator():
    """The port of ``free_address`` was released at once: the kernel could give it to a test
    in the other pytest-xdist worker before this job's coordinator bound it. It is held
    back from a plain bind (as from binds to port 0) for a while, and still passes the
    trainer's check and binds as the coordinator's gRPC server does."""
    address = free_address()
    host, port = address.rsplit(":", 1)
    with socket.socket() as other:
        with pytest.raises(OSError) as refused:
            other.bind((host, int(port)))
    assert refused.value.errno == errno.EADDRINUSE
    distributed._check_port_free(address)  # not "already in use on this host"
    with socket.socket() as coordinator:
        coordinator.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        coordinator.bind((host, int(port)))
        coordinator.listen()


def test_a_busy_coordinator_port_is_named():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        done = subprocess.run(
            [sys.executable, "train.py", "--config", "cifar10:smoke", "--coordinator_address",
             address, "--coordinator_bind_address", address, "--num_processes", "2",
             "--process_id", "0"], cwd=REPO, env=ENV, text=True, capture_output=True,
            timeout=BOUND_S)
    line = _error_line(done.returncode, done.stderr + done.stdout)
    assert line.startswith(f"error: The coordinator's port {address.rsplit(':')[1]} is "
                           "already in use on this host")


@pytest.mark.parametrize("text, lost", [
    ("UNKNOWN: Gloo all-reduce failed: [pair.cc:538] Read error [10.0.0.2]:41887: "
     "Connection reset by peer", True),
    ("UNKNOWN: Gloo AllGather failed: Connection closed by peer [10.0.0.2]:1", True),
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 bytes.", False),
])
def test_a_collective_that_lost_its_peer_is_one_line(text, lost):
    line = distributed.lost_peer(jax.errors.JaxRuntimeError(text))
    assert (line is not None) == lost
    if lost:
        assert text in line and "another process died or was killed" in line
    assert distributed.lost_peer(RuntimeError(text)) is None  # only the runtime's errors


@pytest.mark.parametrize("who", [0, 1])
def test_a_process_failing_after_the_others_finished_ends_with_them(tmp_path, who):
    # Process 0 writing its results after the last collective, or the reverse: the old code
    # aborted the finished one (C++ trace, status 134) or left it in JAX's exit barrier
    # until JAX's heartbeat (3 + 30 s here) aborted it.
    results = finish_all(_worker_job(tmp_path, f"last{who}", "--heartbeat_timeout", "3"),
                         timeout=BOUND_S)
    status, out, _ = results[who]
    assert _error_line(status, out) == "error: " + fails_on_one.LAST
    [(other_status, other_out, _)] = results[:who] + results[who + 1:]
    assert other_status == 0, other_out[-3000:]
    assert "error" not in other_out and "Terminating" not in other_out, other_out[-3000:]


@pytest.mark.parametrize("who", [0, 1])
def test_a_process_failing_after_one_finished_while_one_trains_stops_them_all(tmp_path, who):
    # Process `who` fails once process 2 - who has finished (it waits in JAX's exit barrier,
    # which can no longer complete), while process 2 still trains. The old code aborted the
    # finished one (C++ trace, status 134) as process 0 exited (who=0), or left process 0
    # in the barrier until JAX's heartbeat (3 + 30 s) aborted it (who=1).
    done = 1 - who
    results = finish_all(_worker_job(tmp_path, f"mixed{who}2", "--heartbeat_timeout", "3",
                                     "--config.batch_size=48", "--config.eval_batch_size=48",
                                     processes=3), timeout=BOUND_S)
    assert _error_line(results[who][0], results[who][1]) == "error: " + fails_on_one.LAST
    for i in (done, 2):
        line = _error_line(*results[i][:2])
        assert line.startswith(f"error: process {who} of 3 failed, so process {i} stops too"), \
            line
    assert fails_on_one.FINISHED in results[done][1]  # It had finished.


def test_a_heartbeat_timeout_shorter_than_a_few_polls_is_refused_before_joining():
    # 1,000 processes poll every 10 s: 10 s of silence would be seen on healthy processes.
    done = subprocess.run(
        [sys.executable, "train.py", "--config", "cifar10:smoke", "--coordinator_address",
         free_address(), "--num_processes", "1000", "--process_id", "1", "--init_timeout",
         "5", "--heartbeat_timeout", "10"], cwd=REPO, env=ENV, text=True,
        capture_output=True, timeout=BOUND_S)
    poll = distributed.poll_interval(1000)
    assert poll > distributed.poll_interval(2)  # Fewer calls a second to the one service.
    line = _error_line(done.returncode, done.stderr + done.stdout)
    assert line == (f"error: --heartbeat_timeout 10 is too short for 1000 processes, which look "
                    f"for failed ones every {poll:g} s; use at least --heartbeat_timeout "
                    f"{3 * poll:.0f}.")
    assert "joining" not in done.stderr


class _Store:
    """The job's key-value store as the runtime's client answers it: a key is set once
    unless ``allow_overwrite`` (else ``ALREADY_EXISTS``, as the real client raises);
    ``failures[method]`` of the next calls of ``method`` raise, and so does any write of a
    key containing one of ``refused``."""

    def __init__(self, refused=()):
        self.kv, self.failures, self.refused = {}, collections.Counter(), refused

    def _check(self, method, key=""):
        if self.failures[method] > 0 or any(part in key for part in self.refused):
            self.failures[method] -= 1
            raise RuntimeError("UNAVAILABLE: failed to connect (injected)")

    def key_value_set(self, key, value, allow_overwrite=False):
        self._check("key_value_set", key)
        if key in self.kv and not allow_overwrite:
            raise RuntimeError(f"ALREADY_EXISTS: key {key} already exists.")
        self.kv[key] = value

    def key_value_dir_get(self, prefix):
        self._check("key_value_dir_get")
        return [(k, v) for k, v in list(self.kv.items()) if k.startswith(prefix)]

    def blocking_key_value_get(self, key, timeout_ms):
        return self.kv[key]

    def wait_at_barrier(self, key, timeout_ms):
        pass


def _watch(monkeypatch, store, poll_s=0.02):
    """A peer watch over ``store``, polling every ``poll_s``; unregistered from the exit."""
    monkeypatch.setattr(distributed, "poll_interval", lambda num_processes: poll_s)
    watch = distributed._PeerWatch(store, silence_s=5)
    atexit.unregister(watch.close)
    return watch


def test_one_failed_call_to_the_service_does_not_stop_the_heartbeat(monkeypatch):
    store = _Store()
    store.failures["key_value_set"] = 1  # The first beat: a network blip.
    watch = _watch(monkeypatch, store)
    key, deadline = f"{distributed._KEY}/beat/0", time.monotonic() + 10
    try:
        while int(store.kv.get(key, 0)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert int(store.kv.get(key, 0)) >= 3 and watch.thread.is_alive()
    finally:
        watch.close()


def test_a_process_stops_once_the_service_answers_nothing(monkeypatch, capsys):
    # Process 0, which hosts the service, hangs: this one's calls to it block for good.
    store, hung = _Store(), threading.Event()
    store._check = lambda method, key="": hung.wait()
    monkeypatch.setattr(distributed, "_me", lambda: 1)
    monkeypatch.setattr(distributed, "_count", lambda: 2)
    exits = queue.Queue()
    monkeypatch.setattr(os, "_exit", exits.put)
    monkeypatch.setattr(distributed, "poll_interval", lambda num_processes: 0.02)
    watch = distributed._PeerWatch(store, silence_s=1)
    atexit.unregister(watch.close)
    try:
        assert exits.get(timeout=10) == 1
    finally:
        watch.stop.set()
        hung.set()
    assert capsys.readouterr().err == (
        "error: process 0 of 2 failed, so process 1 stops too (see process 0's output); its "
        "error: no answer from the job's coordination service, which it hosts, for 1 s (hung "
        "or its host unreachable; --heartbeat_timeout)\n")


def test_a_process_stops_even_if_it_cannot_say_so(monkeypatch):
    # Another process failed; recording that this one leaves fails (the service is gone).
    store = _Store(refused=("/left/",))
    store.kv[f"{distributed._KEY}/failed/1"] = "injected"
    exits = queue.Queue()
    monkeypatch.setattr(os, "_exit", exits.put)  # Returns: the watch goes on, tries again.
    watch = _watch(monkeypatch, store)
    try:
        assert exits.get(timeout=10) == 1
    finally:
        watch.close()


def test_a_finished_process_watches_for_a_failed_one_without_a_thread_started_at_exit(
        monkeypatch, capsys):
    # Python 3.12 before 3.12.3 refuses to start a thread in an exit handler: the old code
    # started the exit watch there (a traceback at the exit of every process of a job).
    store, exits = _Store(), queue.Queue()
    monkeypatch.setattr(distributed, "_me", lambda: 1)
    monkeypatch.setattr(distributed, "_count", lambda: 2)
    monkeypatch.setattr(os, "_exit", exits.put)
    watch = _watch(monkeypatch, store)

    def refused(thread):
        raise RuntimeError("can't create new thread at interpreter shutdown")

    with monkeypatch.context() as shutting_down:
        shutting_down.setattr(threading.Thread, "start", refused)
        watch.close(at_exit=True)  # Finished: waits in JAX's shutdown barrier.
    store.kv[f"{distributed._KEY}/failed/0"] = "injected"  # Then process 0 fails and stops.
    store.kv[f"{distributed._KEY}/left/0"] = distributed._STOPPED
    assert exits.get(timeout=10) == 1
    assert capsys.readouterr().err == (
        "error: process 0 of 2 failed, so process 1 stops too (see process 0's output); its "
        "error: injected\n")


def _check_as(monkeypatch, process, config):
    """``check_same_config(config)`` as in a fresh ``process`` of the job."""
    monkeypatch.setattr(jax, "process_index", lambda: process)
    monkeypatch.setattr(distributed, "_config_checks", itertools.count(), raising=False)
    distributed.check_same_config(config)


def test_each_host_may_keep_its_image_folder_elsewhere(monkeypatch):
    store = _Store()
    monkeypatch.setattr(distributed, "_client", lambda: store)
    config = {"dataset": "image_folder:/mnt/data/imagenet", "batch_size": 32, "data_dir": "a"}
    _check_as(monkeypatch, 0, config)
    _check_as(monkeypatch, 1, dict(config, dataset="image_folder:/data/in", data_dir="b"))
    with pytest.raises(errors.ConfigError, match=r"\(dataset: 'cifar10' here, "
                                                 r"'image_folder:.*' on process 0\)"):
        _check_as(monkeypatch, 1, dict(config, dataset="cifar10"))


def test_the_configs_may_be_compared_twice_in_one_job(monkeypatch):
    store = _Store()
    monkeypatch.setattr(distributed, "_client", lambda: store)
    config = {"dataset": "cifar10", "batch_size": 32}
    _check_as(monkeypatch, 0, config)
    distributed.check_same_config(config)  # The same process again: keys of its own.


class _LateStore(_Store):
    """The store of a job whose other process gets to a key or barrier ``late_s`` seconds
    after this one: a wait shorter than that times out, as the runtime's client's does."""

    def __init__(self, late_s):
        super().__init__()
        self.late_s = late_s

    def _arrives(self, key, timeout_ms):
        if timeout_ms < self.late_s * 1000:
            raise RuntimeError(f"DEADLINE_EXCEEDED: {key} timed out (injected)")

    def blocking_key_value_get(self, key, timeout_ms):
        self._arrives(key, timeout_ms)
        return super().blocking_key_value_get(key, timeout_ms)

    def wait_at_barrier(self, key, timeout_ms):
        self._arrives(key, timeout_ms)


def _check_data_as(monkeypatch, process, fingerprint, sizes):
    """``check_same_data`` as in a fresh ``process`` of the job."""
    monkeypatch.setattr(jax, "process_index", lambda: process)
    monkeypatch.setattr(distributed, "_data_checks", itertools.count())
    distributed.check_same_data(fingerprint, sizes)


def test_the_data_check_waits_for_a_host_that_loads_its_data_minutes_later(monkeypatch):
    """One host prepares SVHN for the first time (download, decoding) while the others had
    it: their loads end 20 minutes apart. Such a job waited for that host in its first
    collective; the data check stopped it after 300 s, on every process."""
    store = _LateStore(late_s=20 * 60)
    monkeypatch.setattr(distributed, "_client", lambda: store)
    sizes = "40 training, 8 validation, 8 test images"
    _check_data_as(monkeypatch, 0, "same", sizes)  # waits at the barrier for process 1
    _check_data_as(monkeypatch, 1, "same", sizes)  # waits for process 0's fingerprint


def test_processes_whose_data_differs_in_size_are_told_both_sizes(monkeypatch):
    store = _Store()
    monkeypatch.setattr(distributed, "_client", lambda: store)
    _check_data_as(monkeypatch, 0, "a", "40 training, 8 validation, 8 test images")
    with pytest.raises(errors.DataError, match=re.escape(
            "Process 1's dataset differs from process 0's (39 training, 8 validation, 8 test "
            "images here, 40 training, 8 validation, 8 test images on process 0); every "
            "process must load the same data")):
        _check_data_as(monkeypatch, 1, "b", "39 training, 8 validation, 8 test images")


@pytest.mark.parametrize("how", ["done", "stopped"])
def test_a_finished_process_waits_in_the_exit_only_for_a_failed_one_that_waits_there(
        monkeypatch, how):
    # Process 1 failed as this one finished; it waits in JAX's exit barrier ("done": all
    # the others had finished) or exits at once ("stopped"): this one would wait for it.
    store = _Store()
    store.kv.update({f"{distributed._KEY}/failed/1": "injected",
                     f"{distributed._KEY}/left/1": how})
    exits = queue.Queue()
    monkeypatch.setattr(os, "_exit", exits.put)
    watch = _watch(monkeypatch, store, poll_s=60)  # Only the exit looks at the store:
    watch.poll_s = 0.02  # (the peer watch waits 60 s) and then, while it waits, at once.
    watch.close(at_exit=True)
    assert store.kv[f"{distributed._KEY}/left/0"] == ("done" if how == "done" else "stopped")
    if how == "done":  # Waits in JAX's exit barrier, and stops once one exits at once (a
        time.sleep(0.2)  # third process, stopped by process 1's failure).
        assert exits.empty()
        # Not waiting long for process 1 to stop too: here, it never will.
        monkeypatch.setattr(distributed, "LEAVE_WAIT_S", 0.2)
        store.kv[f"{distributed._KEY}/left/2"] = "stopped"
        assert store.kv[f"{distributed._KEY}/left/0"] == "done"
    assert exits.get(timeout=10) == 1
    time.sleep(0.1)
    assert exits.empty() and store.kv[f"{distributed._KEY}/left/0"] == "stopped"


def test_a_finished_process_stops_once_another_does_when_process_0_failed(monkeypatch):
    # Process 0 failed as this one (1) had finished and a third (2) still trained: process 0
    # waits for both to stop before it exits (its exit ends the job's service). The old code
    # waited here for process 0 to leave, LEAVE_WAIT_S, as long as process 0 waited for this
    # one: it stopped about when process 0 exited, which has JAX's runtime abort it (C++
    # trace, status 134).
    store = _Store()
    store.kv[f"{distributed._KEY}/failed/0"] = "injected"
    monkeypatch.setattr(distributed, "_me", lambda: 1)
    monkeypatch.setattr(distributed, "_count", lambda: 3)
    exits = queue.Queue()
    monkeypatch.setattr(os, "_exit", exits.put)
    watch = _watch(monkeypatch, store, poll_s=60)  # Only the exit looks at the store.
    # The old code's wait, long: a loaded machine's slow thread cannot pass for it (5 s).
    monkeypatch.setattr(distributed, "LEAVE_WAIT_S", 60.0)
    stopped = threading.Timer(0.2, store.kv.__setitem__,
                              (f"{distributed._KEY}/left/2", "stopped"))
    start = time.monotonic()
    stopped.start()
    watch.close(at_exit=True)
    assert exits.get(timeout=10) == 1
    assert time.monotonic() - start < distributed.LEAVE_WAIT_S / 2
    assert store.kv[f"{distributed._KEY}/left/1"] == "stopped"


def test_a_failed_process_with_a_close_pending_does_not_wait_for_a_failed_process_0(
        monkeypatch):
    # Every process failed at once (processes that restored different steps): process 1,
    # with a checkpoint close pending, waited for process 0 to leave while process 0 waited
    # for it; process 0 gave up first, and its exit (ending the job's service) had JAX's
    # runtime abort process 1 (C++ trace, status -6), seen in CI under load.
    store = _Store()
    monkeypatch.setattr(distributed, "_me", lambda: 1)
    monkeypatch.setattr(distributed, "_count", lambda: 2)
    monkeypatch.setattr(distributed, "_client", lambda: store)
    monkeypatch.setattr(distributed, "_join_to_report", lambda: store)
    monkeypatch.setattr(distributed, "_watcher", None)
    monkeypatch.setattr(distributed, "_closing", [lambda: None])  # a save to commit first
    monkeypatch.setattr(distributed, "LEAVE_WAIT_S", 60.0)
    exits = queue.Queue()
    monkeypatch.setattr(distributed, "_exit_now", exits.put)
    # Process 0 reports its own failure just after this one starts waiting.
    threading.Timer(0.3, store.kv.__setitem__,
                    (f"{distributed._KEY}/failed/0", "process 0 failed too")).start()
    start = time.monotonic()
    distributed.leave_job("process 1 failed", 1)
    assert exits.get(timeout=10) == 1
    assert time.monotonic() - start < 10
    assert store.kv[f"{distributed._KEY}/left/1"] == "stopped"


def test_the_wait_for_a_shared_workdir_is_90_s_unless_the_environment_says(monkeypatch):
    from stochastic_depth_jax.training import workdir

    monkeypatch.delenv("SDJ_SHARED_WAIT_S", raising=False)
    assert workdir.shared_wait_s() == 90
    monkeypatch.setenv("SDJ_SHARED_WAIT_S", "300")
    assert workdir.shared_wait_s() == 300
    for bad in ("a minute", "nan", "-5"):
        monkeypatch.setenv("SDJ_SHARED_WAIT_S", bad)
        with pytest.raises(errors.ConfigError, match=f"SDJ_SHARED_WAIT_S='{bad}' is not a "
                           r"number of seconds \(0 or more\)"):
            workdir.shared_wait_s()


def test_a_process_waiting_for_the_shared_lock_file_says_so_then_names_its_state(
        tmp_path, monkeypatch, capsys):
    """The wait (90 s by default) was silent: a job that looked hung for a minute and a half;
    and an old run.lock there (this host's own copy of an earlier run) read "the run.lock
    process 0 took is not process 0's there"."""
    from stochastic_depth_jax.training import workdir

    monkeypatch.setenv("SDJ_SHARED_WAIT_S", "8")
    clock = iter(range(0, 100))  # one second a read
    monkeypatch.setattr(workdir.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(workdir.time, "sleep", lambda s: None)
    (tmp_path / workdir.LOCK_FILE).write_text(json.dumps({"pid": 1, "token": 7}))
    lock = workdir.WorkdirLock(str(tmp_path))
    with pytest.raises(errors.WorkdirError, match=r"\(the run.lock process 0 took is not the "
                       r"one there, which another run wrote\): every process needs"):
        lock._check_shared(8)
    assert capsys.readouterr().out == (
        f"Process 0: waiting up to 8 s to see the run.lock process 0 wrote in {tmp_path} (a "
        "shared filesystem may show it late).\n")
