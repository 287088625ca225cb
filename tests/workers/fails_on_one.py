"""``train.py`` whose process 1 goes wrong while it loads the data, as process 0 waits for it
in a collective: ``python fails_on_one.py MODE TRAIN_PY_ARGUMENTS...``.

``raise``: process 1 raises a ``DataError`` (a host that cannot find the data). ``stop``:
process 1 stops itself with SIGSTOP (a hung host: its connections stay open, it says
nothing); ``stop0``: process 0 does (the job's coordination service hangs with it).
``last0``/``last1``: the others finish at once (their training is replaced by a no-op)
and process 0/1 raises a ``DataError`` once they all wait in JAX's exit (process 0 writing
its results after the last collective). ``mixedWR`` (3 processes): process ``W`` fails so
once the others but ``R`` have finished, while process ``R`` still trains. ``save``: saves
take ``SAVE_S`` seconds and process 1 raises a ``DataError`` as soon as its first one
started. ``stale0``/``stale1``: process 0/1 does not list the newest 'latest' checkpoint;
``stalebest1``: process 1 lists no 'best' checkpoint; ``stalesummary1``: process 1 does not
read the run's summary.json.
``full0``/``full1``: the disk fills on process 0/1 during the 'latest' save of step
``FULL_AT`` (its writes there fail with ENOSPC). ``slowplot``: process 0's drawing of the
curves takes ``DRAW_S`` seconds longer, and prints ``DRAWN`` when done; ``hungplot``: it
never ends, and the others wait ``HUNG_WAIT_S`` for it. ``damaged0``/``damaged1``: process
0/1 reads the newest 'latest' checkpoint as damaged, the other reads it intact.
Used by ``tests/test_multihost_failures.py``.
"""

import errno
import os
import signal
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)  # train.py and configs/ live at the repository root.

import jax  # noqa: E402

import train  # noqa: E402
from stochastic_depth_jax import errors  # noqa: E402
from stochastic_depth_jax.training import distributed  # noqa: E402
from stochastic_depth_jax.training import loop  # noqa: E402
from stochastic_depth_jax.training import setup as setup_lib  # noqa: E402

MESSAGE = "Dataset folder '/data/cifar10' does not exist on this host (injected)."
LAST = "Cannot write the plots: the disk is full (injected)."
# The others hear of a failure within a poll (1 s; 1.0 s measured): 3 s left 2 s for a
# loaded machine to run process 0's watch before its save ended and the test failed.
SAVE_S, SAVED = 6, "a save was committed (injected)"
FINISHED = "training finished (injected)"
FULL_AT = 8  # The end of the smoke config's second epoch.
DRAW_S, DRAWN = 5, "the curves were drawn (injected)"
HUNG_WAIT_S = 3


def _fail_last(who: int, running: frozenset[int] = frozenset()) -> None:
    """Process ``who`` fails once every other one has finished; the others finish at once,
    but for those in ``running``, which go on training (until they are stopped)."""
    check = distributed.check_same_config

    def check_then_finish(config):
        check(config)
        if jax.process_index() in running:
            time.sleep(600)  # Training, while the others finish and fail (then stopped).
        if jax.process_index() == who:
            others = set(range(jax.process_count())) - {who} - running
            deadline = time.monotonic() + 30
            while not others <= set(distributed._left(distributed._client())):
                assert time.monotonic() < deadline, "the others did not finish"
                time.sleep(0.1)
            raise errors.DataError(LAST)
        from stochastic_depth_jax.training import loop  # After initialize, as train.py.

        def finish(config, workdir):
            # Said on every process: train.py prints its summary on process 0 only.
            print(FINISHED, flush=True)
            return {"final": {}, "best": {}}

        loop.train_and_evaluate = finish

    distributed.check_same_config = check_then_finish


def _fail_while_saving() -> None:
    """Every save takes ``SAVE_S`` longer in its background thread, which prints ``SAVED``
    when done; process 1 fails just after it started its first save."""
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    from stochastic_depth_jax.training import checkpoint as checkpoint_lib

    background = async_checkpointer._background_wait_for_commit_futures

    def slow_background(*args, **kwargs):
        time.sleep(SAVE_S)
        background(*args, **kwargs)
        print(SAVED, flush=True)

    async_checkpointer._background_wait_for_commit_futures = slow_background
    save = checkpoint_lib.Checkpoints.save

    def save_then_fail(self, *args, **kwargs):
        started = save(self, *args, **kwargs)
        if jax.process_index() == 1:
            raise errors.DataError(MESSAGE)
        return started

    checkpoint_lib.Checkpoints.save = save_then_fail


def _hide_newest_checkpoint(who: int, wanted: str = "latest") -> None:
    """Process ``who`` lists the 'latest' checkpoints without the newest one, or (``wanted``
    'best') no 'best' checkpoint: a host whose view of the shared workdir lags."""
    from stochastic_depth_jax.training import checkpoint as checkpoint_lib

    steps = checkpoint_lib.Checkpoints.steps

    def stale(self, kind="latest"):
        listed = steps(self, kind)
        if jax.process_index() != who or kind != wanted:
            return listed
        return listed[:-1] if kind == "latest" else []

    checkpoint_lib.Checkpoints.steps = stale


def _damage_newest_checkpoint(who: int) -> None:
    """Process ``who`` reads the newest 'latest' checkpoint as damaged (its host's copy of
    the files, or its cache of a shared one, broken); the others read it intact."""
    from stochastic_depth_jax.training import checkpoint as checkpoint_lib

    read_meta = checkpoint_lib.Checkpoints.read_meta

    def damaged(self, kind, step):
        if jax.process_index() == who and kind == "latest" and step == max(self.steps(kind)):
            raise ValueError("Unexpected end of JSON input (injected)")
        return read_meta(self, kind, step)

    checkpoint_lib.Checkpoints.read_meta = damaged


def _hide_summary(who: int) -> None:
    """Process ``who`` reads no summary.json: a host whose view of the shared workdir lags
    behind the job that finished the run."""
    from stochastic_depth_jax.training import loop

    saved_summary = loop._saved_summary
    loop._saved_summary = lambda workdir, step: (
        None if jax.process_index() == who else saved_summary(workdir, step))


def _fill_the_disk(who: int) -> None:
    """Process ``who``'s writes into the 'latest' save of step ``FULL_AT`` (Orbax's
    temporary directory) fail with ENOSPC, as TensorStore's do on a full disk; every
    process writes its part of a save there (process 1: its array metadata)."""
    from etils import epath

    path_type = type(epath.Path("/"))
    write_text = path_type.write_text
    where = os.path.join("checkpoints", f"{FULL_AT}.orbax-checkpoint-tmp")

    def full(self, *args, **kwargs):
        if jax.process_index() == who and where in str(self):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *args, **kwargs)

    path_type.write_text = full


def _draw_slowly(delay_s: float = DRAW_S) -> None:
    """Process 0's drawing of error.png and loss.png takes ``delay_s`` seconds longer (a
    loaded host, matplotlib imported for the first time) and prints ``DRAWN`` once done."""
    from stochastic_depth_jax.training import plots

    plot_curves = plots.plot_curves

    def slow(*args, **kwargs):
        time.sleep(delay_s)
        drawn = plot_curves(*args, **kwargs)
        print(DRAWN, flush=True)
        return drawn

    plots.plot_curves = slow


def main(mode: str, argv: list[str]) -> None:
    if mode.startswith("last"):
        _fail_last(int(mode.removeprefix("last")))
    if mode.startswith("mixed"):
        who, running = mode.removeprefix("mixed")
        _fail_last(int(who), frozenset({int(running)}))
    if mode == "save":
        _fail_while_saving()
    if mode.startswith("full"):
        _fill_the_disk(int(mode.removeprefix("full")))
    if mode == "slowplot":
        _draw_slowly()
    if mode == "hungplot":  # The others wait HUNG_WAIT_S for a drawing that never ends.
        loop.DRAWING_WAIT_S = HUNG_WAIT_S
        _draw_slowly(3600)
    if mode == "stalebest1":
        _hide_newest_checkpoint(1, "best")
    elif mode == "stalesummary1":
        _hide_summary(1)
    elif mode.startswith("damaged"):
        _damage_newest_checkpoint(int(mode.removeprefix("damaged")))
    elif mode.startswith("stale"):
        _hide_newest_checkpoint(int(mode.removeprefix("stale")))
    if mode not in ("raise", "stop", "stop0"):
        train.main(argv)
        return
    original = setup_lib.load_data

    def load_data(config, *args, **kwargs):
        if jax.process_index() == (0 if mode == "stop0" else 1):
            if mode == "raise":
                raise errors.DataFileNotFoundError(MESSAGE)
            os.kill(os.getpid(), signal.SIGSTOP)
        return original(config, *args, **kwargs)

    setup_lib.load_data = load_data
    train.main(argv)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
