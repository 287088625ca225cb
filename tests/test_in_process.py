"""The trainer called from Python, as in a notebook or a sweep in one process: a call leaves
the session as it found it (signal handlers, warnings, logging, JAX's config, matplotlib's
backend, the workdir lock), Ctrl-C stops it with a checkpoint and the next call resumes;
progress is a bar on a terminal or in a notebook and one line per epoch in a pipe; and a
``SystemExit`` of the command-line tools caught by the session leaves nothing in effect."""

import io
import json
import os
import subprocess
import sys

import pytest

from stochastic_depth_jax import hugepages
from stochastic_depth_jax.training import progress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A session: a figure open on its own matplotlib backend, then three calls of the trainer
# on one workdir: Ctrl-C after the first epoch, a call that resumes and finishes, one that
# finds the run finished. Prints what each call changed in the session, as JSON.
_SESSION = r"""
import json, logging, os, signal, sys, threading, time, warnings
import matplotlib
matplotlib.use("svg")  # stands in for a notebook's inline backend
import matplotlib.pyplot as plt
import jax
from configs import load_config
from stochastic_depth_jax.training import progress, stopping, train_and_evaluate
from stochastic_depth_jax.training import workdir as workdir_lib

workdir, cache = sys.argv[1], sys.argv[2]
plt.figure()
config = load_config("cifar10:smoke", ["--config.num_epochs=5", "--config.write_tensorboard=false",
                                       f"--config.compilation_cache_dir={cache}"])

def session():
    loggers = [logging.getLogger(n) for n in ("", "absl", "asyncio", "jax", "orbax")]
    return {
        "signals": [signal.getsignal(s) for s in stopping.SIGNALS],
        "warnings": (list(warnings.filters), warnings.showwarning, warnings.formatwarning),
        "hooks": (sys.unraisablehook, sys.excepthook),
        "logging": [(list(x.handlers), list(x.filters), x.level) for x in loggers],
        "jax_config": dict(jax.config.values),
        "matplotlib": (plt.get_backend(), plt.get_fignums()),
        # but tqdm's monitor: one daemon thread per process, from its first bar on
        "threads": sorted(t.name for t in threading.enumerate() if t.name != "tqdm_monitor"),
    }

def changed(before):
    deadline = time.monotonic() + 10  # a closed library's threads may take a moment to end
    after = session()
    while after["threads"] != before["threads"] and time.monotonic() < deadline:
        time.sleep(0.05)
        after = session()
    return {k: [repr(before[k]), repr(after[k])] for k in before if before[k] != after[k]}

def lock_is_free():
    workdir_lib.WorkdirLock(workdir).acquire().release()  # WorkdirBusyError otherwise
    return True

# Ctrl-C once the first epoch's line is printed: a thread waiting for it could be scheduled
# after the whole (tiny) run had finished on a loaded machine.
epoch_line = progress.epoch_line

def ctrl_c_after_the_first_epoch(record, num_epochs):
    if record["epoch"] == 1:
        os.kill(os.getpid(), signal.SIGINT)
    return epoch_line(record, num_epochs)

before = session()
progress.epoch_line = ctrl_c_after_the_first_epoch
report = {}
try:
    train_and_evaluate(config, workdir)
except stopping.Stopped as e:
    report["stopped"] = str(e)
progress.epoch_line = epoch_line
report["changed_by_the_stopped_call"] = changed(before)
report["lock_free_after_stop"] = lock_is_free()
report["checkpoints_after_stop"] = sorted(int(s) for s in os.listdir(workdir + "/checkpoints"))
summary = train_and_evaluate(config, workdir)
report["resumed_steps"], report["final_epoch"] = summary["steps"], summary["final"]["epoch"]
report["changed_by_the_resumed_call"] = changed(before)
report["finished_call_returns_the_summary"] = train_and_evaluate(config, workdir) == summary
report["changed_by_all_calls"] = changed(before)
report["lock_free_at_end"] = lock_is_free()
print("REPORT " + json.dumps(report))
"""


def test_a_session_calls_the_trainer_is_interrupted_resumes_and_is_left_as_it_was(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=REPO)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # The session's own setting: none.
    env.pop("GLIBC_TUNABLES", None)  # nor the suite's (conftest): as a user's notebook
    out = subprocess.run(
        [sys.executable, "-c", _SESSION, str(tmp_path / "run"), str(tmp_path / "cache")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [line] = [x for x in out.stdout.splitlines() if x.startswith("REPORT ")]
    report = json.loads(line[len("REPORT "):])
    # Ctrl-C: a checkpoint of the step reached, then Stopped (one of our errors), not exit.
    assert report["stopped"].startswith("stopped by SIGINT at step ")
    # Its message speaks to the Python caller: no command to run again.
    assert report["stopped"].endswith(": call train_and_evaluate again with the same workdir "
                                      "to resume."), report["stopped"]
    step = int(report["stopped"].split(" at step ")[1].split()[0])
    assert 4 <= step < 20 and report["checkpoints_after_stop"][-1] == step
    assert report["lock_free_after_stop"] and report["lock_free_at_end"]
    assert (report["resumed_steps"], report["final_epoch"]) == (20, 5)
    assert f"Resuming from step {step} " in out.stdout
    assert report["finished_call_returns_the_summary"]
    assert out.stdout.count("Skipping implementation") == 3  # one per call: no doubled output
    # Started without huge pages where they would help: said once, with how to have them.
    hinted = hugepages.reason_not_to(env) is None
    assert out.stdout.count("start Python with GLIBC_TUNABLES=glibc.malloc.hugetlb=1") == hinted
    for key in ("changed_by_the_stopped_call", "changed_by_the_resumed_call",
                "changed_by_all_calls"):
        assert report[key] == {}, (key, report[key])
    # Piped: one line per epoch on stdout, no bar redraws kept in the log.
    epochs = [x.split(":")[0] for x in out.stdout.splitlines() if x.startswith("epoch ")]
    assert epochs == [f"epoch {e}/5" for e in range(1, 6)]
    assert "\r" not in out.stderr and "step/s" not in out.stderr


class _Terminal(io.StringIO):
    def isatty(self):
        return True


class _KernelStream(io.StringIO):
    """Stands in for a Jupyter kernel's output stream (not a terminal, redraws in place)."""


_KernelStream.__module__ = "ipykernel.iostream"


@pytest.mark.parametrize(
    "stdout, stderr, bar, expected",
    [
        (_Terminal, _Terminal, True, (True, False)),  # a terminal: the bar
        (_KernelStream, _KernelStream, True, (True, False)),  # a notebook: the bar
        (io.StringIO, _Terminal, True, (True, True)),  # train.py | tee log: both
        (io.StringIO, io.StringIO, True, (False, True)),  # a log file: lines only
        (_Terminal, _Terminal, False, (False, True)),  # progress_bar=false
    ],
)
def test_a_bar_where_it_redraws_in_place_and_lines_where_it_would_pile_up(
        monkeypatch, stdout, stderr, bar, expected):
    """(bar drawn, a one-off task's start/finish lines); every epoch prints its line."""
    monkeypatch.setattr(sys, "stdout", stdout())
    monkeypatch.setattr(sys, "stderr", stderr())
    assert (progress.draws_bar(bar), progress.prints_task_lines(bar)) == expected
    assert progress.prints_epoch_lines(bar)
    epoch = progress.EpochProgress(1, 2, total=4, start=0, batch_size=8, enabled=bar)
    epoch.update(4, 2.3, 0.9)
    epoch.close()
    assert ("epoch 1/2" in sys.stderr.getvalue()) == expected[0]


# `%run train.py` in IPython after a full disk failed a background save: SystemExit(1) is
# caught by the session, which goes on; a later library report of a disk failure shows.
_CAUGHT_EXIT = r"""
import logging
from stochastic_depth_jax import errors
from stochastic_depth_jax.training import cli

FULL = "Error writing file: No space left on device [os_error_code='28']"

def failed_save():
    logging.getLogger("absl").error("background save failed", exc_info=ValueError(FULL))
    raise errors.WorkdirError("Cannot write ckpt (No space left on device): free some space.")

try:
    cli.run_reporting_errors(failed_save, debug=False)
except SystemExit as e:
    print("exit status", e.code)
logging.getLogger("absl").error("a later run's report", exc_info=ValueError(FULL))
"""


def test_a_caught_exit_of_the_tools_leaves_later_reports_alone():
    out = subprocess.run([sys.executable, "-c", _CAUGHT_EXIT], cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "exit status 1" in out.stdout
    assert "background save failed" not in out.stderr  # dropped while the tool ran
    assert "a later run's report" in out.stderr and "os_error_code='28'" in out.stderr


def test_caught_exits_of_the_tools_leave_one_quieting_at_exit(capsys):
    """A notebook that catches five failures: one set of log filters and one unraisable hook
    stay installed for the exit, not five; it knows what each failure's libraries logged."""
    import logging

    from stochastic_depth_jax import errors
    from stochastic_depth_jax.training import cli

    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    filters = [len(x.filters) for x in loggers]
    installed = list(cli._QUIET_AT_EXIT)  # another test's caught exit may have left one
    seen = len(installed[0][1].seen) if installed else 0
    full = ValueError("Error writing file [os_error_code='28']")

    def failed_save():
        logging.getLogger("absl").error("background save failed", exc_info=full)
        raise errors.WorkdirError("Cannot write ckpt (No space left on device): free space.")

    hooks = []
    try:
        for _ in range(5):
            with pytest.raises(SystemExit):
                cli.run_reporting_errors(failed_save, debug=False)
            hooks.append(sys.unraisablehook)
        assert all(hook is hooks[0] for hook in hooks)
        assert [len(x.filters) - n for x, n in zip(loggers, filters)] == [0 if installed else 1] * 2
        [(_, reports)] = cli._QUIET_AT_EXIT
        assert len(reports.seen) - seen == 5
    finally:
        if not installed:  # leave the test session as it was
            for stack, _ in cli._QUIET_AT_EXIT:
                stack.close()
            cli._QUIET_AT_EXIT.clear()
    assert capsys.readouterr().err.count("error: Cannot write ckpt") == 5
