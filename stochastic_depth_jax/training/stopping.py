"""A graceful stop on SIGTERM / SIGINT / SIGUSR1: checkpoint the current step, then exit.

Schedulers (SLURM, Kubernetes, TPU maintenance events, preemptible VMs) send SIGTERM and
wait a grace period before killing; a user presses Ctrl-C. :class:`StopSignals` turns either
into a request that the training loop honours at its next metrics point (every
``log_every_steps`` steps): it saves a 'latest' checkpoint of that step, waits until the
save is committed and raises :class:`Stopped`, which the command-line tools report in one
line with exit status ``128 + signal`` (143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1 on
Linux). Rerunning the same
command (from Python: calling ``train_and_evaluate`` again with the same workdir) resumes
from that step.

With several processes the request is agreed on at those points (one tiny all-gather), so
every process stops at the same step even if only one of them got the signal. A second
Ctrl-C stops at once (``KeyboardInterrupt``), keeping the previous checkpoint.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np

from stochastic_depth_jax import errors

__all__ = ["Stopped", "StopSignals"]

# SIGUSR1 too: SLURM's `--signal=USR1@<seconds>` (PyTorch Lightning's requeue signal) sends
# it ahead of the time limit to ask for a checkpoint; by default it ended the process unsaved.
SIGNALS = (signal.SIGTERM, signal.SIGINT) + tuple(
    s for s in (getattr(signal, "SIGUSR1", None),) if s is not None)


class Stopped(errors.Error):
    """Training stopped on a signal after saving a checkpoint; rerun to resume.

    Its message ends with how to resume where it is caught: ``str()`` says it to a Python
    caller (a notebook: call ``train_and_evaluate`` again with the same workdir), and
    ``command_line`` is the line the command-line tools print (run the same command).

    Args:
      stopped: what stopped where, and where its checkpoint is.
      signum: the signal; ``exit_status`` is ``128 + signum``.
      call_again: what a Python caller calls again to resume.
    """

    def __init__(self, stopped: str, signum: int,
                 call_again: str = "train_and_evaluate again with the same workdir"):
        message, command_line = errors.run_again(stopped, call_again, "to resume")
        super().__init__(message, command_line=command_line)
        self.stopped = stopped
        self.exit_status = 128 + signum


class StopSignals:
    """Context manager: while active, :data:`SIGNALS` request a stop instead of killing.
    ``when`` is what the line printed at the first signal says happens next (an attribute
    of that name: the owner may change it as it goes, e.g. a sweep while a run sets up).

    Handlers are installed only in the main thread (Python allows no other); elsewhere the
    object never requests a stop. The previous handlers are restored on exit.

    Nested (a sweep around each run's own), a request is never lost: one the inner object
    did not act on (a signal during a run's last evaluation, after its last stop point) is
    passed to the enclosing one on exit, and one pending in the enclosing object when an
    inner one starts is the inner one's too.
    """

    def __init__(self, when: str = "at the next metrics point after saving a checkpoint"
                 ) -> None:
        self.signum: int | None = None
        self.when = when  # what the first signal's line says happens next
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
            outer = self._enclosing()
            if outer is not None and self.signum is None:
                self.signum = outer.signum
        return self

    def __exit__(self, *exc: Any) -> None:
        outer = self._enclosing()
        if outer is not None and outer.signum is None:
            outer.signum = self.signum
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _enclosing(self) -> "StopSignals | None":
        """The StopSignals whose handler this one replaced, if any."""
        owner = getattr(self._previous.get(signal.SIGTERM), "__self__", None)
        return owner if isinstance(owner, StopSignals) else None

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum
            print(f"\n{signal.Signals(signum).name} received: stopping {self.when} (Ctrl-C "
                  "again to stop at once).", flush=True)

    def agreed(self) -> int | None:
        """The signal to stop on, the same in every process; None to go on.

        Every process must call this at the same steps (it all-gathers when there are
        several processes).
        """
        local = self.signum or 0
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            gathered = np.asarray(multihost_utils.process_allgather(np.int32(local)))
            local = int(gathered.max())
        return local or None

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name
