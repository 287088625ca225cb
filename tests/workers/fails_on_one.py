"""``train.py`` whose process 1 goes wrong while it loads the data, as process 0 waits for it
in a collective: ``python fails_on_one.py raise|stop TRAIN_PY_ARGUMENTS...``.

``raise``: process 1 raises a ``DataError`` (a host that cannot find the data). ``stop``:
process 1 stops itself with SIGSTOP (a hung host: its connections stay open, it says
nothing). Used by ``tests/test_multihost_failures.py``.
"""

import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)  # train.py and configs/ live at the repository root.

import jax  # noqa: E402

import train  # noqa: E402
from stochastic_depth_jax import errors  # noqa: E402
from stochastic_depth_jax.training import setup as setup_lib  # noqa: E402

MESSAGE = "Dataset folder '/data/cifar10' does not exist on this host (injected)."


def main(mode: str, argv: list[str]) -> None:
    original = setup_lib.load_data

    def load_data(config, workdir, *args, **kwargs):
        if jax.process_index() == 1:
            if mode == "raise":
                raise errors.DataFileNotFoundError(MESSAGE)
            os.kill(os.getpid(), signal.SIGSTOP)
        return original(config, workdir, *args, **kwargs)

    setup_lib.load_data = load_data
    train.main(argv)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
