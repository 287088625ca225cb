"""A multi-process job in which one process goes wrong: every process ends within a bound,
with a non-zero status and one line saying what happened and on which process."""

import os
import re
import socket
import subprocess
import sys

import jax
import pytest

from processes import finish_all, free_address, start_all
from stochastic_depth_jax.training import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "workers", "fails_on_one.py")
sys.path.insert(0, os.path.dirname(WORKER))
import fails_on_one  # noqa: E402
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
           PYTHONUNBUFFERED="1")
# Each case ends within seconds; the old code hung for minutes (a test fails at this bound).
BOUND_S = 60


def _train_args(tmp_path, address, *extra):
    return ["--config", "cifar10:smoke", "--config.progress_bar=false",
            "--config.write_tensorboard=false", "--workdir", str(tmp_path / "run"),
            "--coordinator_address", address, "--coordinator_bind_address", address,
            "--num_processes", "2", *extra]


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


def _worker_job(tmp_path, mode, *extra):
    address = free_address()
    return start_all([[sys.executable, WORKER, mode, *_train_args(tmp_path, address, *extra),
                       "--process_id", str(i)] for i in range(2)], env=ENV, cwd=REPO)


def test_a_process_failing_in_setup_stops_the_other(tmp_path):
    (s0, out0, _), (s1, out1, _) = finish_all(_worker_job(tmp_path, "raise"),
                                               timeout=BOUND_S)
    assert _error_line(s1, out1).endswith("does not exist on this host (injected).")
    line = _error_line(s0, out0)
    assert re.fullmatch(r"error: process 1 of 2 failed, so process 0 stops too \(see "
                        r"process 1's output\); its error: Dataset folder .* \(injected\)\.",
                        line), line


def test_a_hung_process_is_reported_after_the_heartbeat_timeout(tmp_path):
    # Process 1 stops (SIGSTOP) in setup: its connections stay open, so only silence tells.
    procs = _worker_job(tmp_path, "stop", "--heartbeat_timeout", "3")
    try:
        [(s0, out0, _)] = finish_all(procs[:1], timeout=BOUND_S)
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert _error_line(s0, out0) == (
        "error: process 1 of 2 failed, so process 0 stops too (see process 1's output); its "
        "error: no sign of life for 3 s (killed, crashed, hung or its host unreachable; "
        "--heartbeat_timeout)")


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
                         timeout=25)
    status, out, _ = results[who]
    assert _error_line(status, out) == "error: " + fails_on_one.LAST
    [(other_status, other_out, _)] = results[:who] + results[who + 1:]
    assert other_status == 0, other_out[-3000:]
    assert "error" not in other_out and "Terminating" not in other_out, other_out[-3000:]
