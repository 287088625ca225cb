"""``train.py`` whose evaluations return the errors of ``$VAL_ERROR`` (JSON, by step) for the
validation split and ``0.6 + step / 100`` for the test split, as the ``fake_evaluation``
fixture of ``tests/test_eval_every_steps.py``; process 1 reads the records of an earlier
session ``LATE_S`` seconds late, as a slower host does (after process 0 dropped them):
``python fake_evaluation.py TRAIN_PY_ARGUMENTS...``."""

import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)  # train.py and configs/ live at the repository root.

import jax  # noqa: E402

import train  # noqa: E402
from stochastic_depth_jax.training import loop  # noqa: E402

LATE_S = 3


def main(argv: list[str]) -> None:
    val_error = {int(k): v for k, v in json.loads(os.environ["VAL_ERROR"]).items()}

    def evaluate_split(eval_step, state, split, **kwargs):
        step = int(loop._host(state.step))
        error = val_error[step] if len(split) == 32 else 0.6 + step / 100
        return {"loss": 2 * error, "error": error, "count": len(split)}

    records_after = loop._records_after

    def late_records_after(workdir, step):
        if jax.process_index() == 1:
            time.sleep(LATE_S)
        return records_after(workdir, step)

    loop.evaluate_lib.evaluate_split = evaluate_split
    loop._records_after = late_records_after
    train.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
