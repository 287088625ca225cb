"""Deterministic evaluation: full splits with every block active (``train=False``).

``evaluate_checkpoint`` rebuilds the run from ``<workdir>/run.json``, restores a
checkpoint and evaluates the whole test set; the same checkpoint gives bit-identical
numbers every time (fixed batch plan, masked padding, no randomness).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stochastic_depth_jax import data as data_lib
from stochastic_depth_jax.training import checkpoint as checkpoint_lib
from stochastic_depth_jax.training import config as config_lib
from stochastic_depth_jax.training import setup as setup_lib

__all__ = [
    "evaluate_split",
    "evaluate_checkpoint",
    "load_run_config",
    "restore_run",
    "RestoredRun",
    "RUN_FILE",
]

RUN_FILE = "run.json"


def evaluate_split(
    eval_step: Any, state: Any, split: data_lib.DeviceSplit, *, batch_size: int, mean: Any, std: Any
) -> dict[str, float]:
    """Mean loss and error over every example of ``split`` (padding masked out).

    Sums stay on the device until the end: one host transfer per split.
    """
    total = [jnp.zeros((), jnp.float32)] * 3
    for images, labels, mask in data_lib.eval_batches(
        split, batch_size=batch_size, mean=mean, std=std
    ):
        total = [t + v for t, v in zip(total, eval_step(state, images, labels, mask))]
    loss, errors, count = (float(np.asarray(t.addressable_data(0))) for t in total)
    return {"loss": loss / count, "error": errors / count, "count": int(count)}


def load_run_config(workdir: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """The validated config and metadata a run recorded in ``<workdir>/run.json``."""
    path = os.path.join(workdir, RUN_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: is {workdir!r} the --workdir of a training run?"
        )
    with open(path) as f:
        meta = json.load(f)
    return config_lib.validate(ml_collections.ConfigDict(meta["config"])), meta


def _parse_which(which: str | int) -> tuple[str, int | None]:
    if isinstance(which, int) or str(which).isdigit():
        return "latest", int(which)
    if which in ("latest", "best"):
        return which, None
    raise ValueError(f"checkpoint must be 'latest', 'best' or a step number, got {which!r}")


@dataclasses.dataclass
class RestoredRun:
    """A training run's checkpoint restored for evaluation or analysis.

    Attributes:
      config: the run's validated config; ds: its dataset (host splits); setup: model,
      mesh and steps built exactly as in training; state: the restored ``TrainState``;
      mean, std: float32 ``[C]`` normalisation; kind: 'latest' or 'best'; meta: the
      checkpoint's metadata (``step``, ``epoch``, ...).
    """

    config: ml_collections.ConfigDict
    ds: data_lib.Dataset
    setup: setup_lib.Setup
    state: Any
    mean: np.ndarray
    std: np.ndarray
    kind: str
    meta: dict[str, Any]

    def device_split(self, split: str) -> data_lib.DeviceSplit:
        """``'test'`` or ``'validation'`` placed on the run's mesh."""
        host_split = {"test": self.ds.test, "validation": self.ds.validation}[split]
        if host_split is None:
            raise ValueError(f"The run has no {split} split.")
        return data_lib.put_on_devices(host_split, self.setup.mesh)


def restore_run(workdir: str, checkpoint: str | int = "best") -> RestoredRun:
    """Rebuilds the run in ``workdir`` from ``run.json`` and restores one checkpoint.

    ``checkpoint``: 'best', 'latest' or a step number (of the 'latest' series; a step of
    the best series is found there too).
    """
    config, meta = load_run_config(workdir)
    kind, step = _parse_which(checkpoint)
    ds = setup_lib.load_data(config, workdir)
    data_meta = meta["data"]
    mean, std = np.float32(data_meta["mean"]), np.float32(data_meta["std"])
    setup = setup_lib.build(
        config,
        num_classes=ds.num_classes,
        num_train=len(ds.train),
        mean=mean,
        std=std,
        augment=ds.augment,
    )
    ckpts = checkpoint_lib.Checkpoints(workdir, read_only=True)
    if step is not None and step not in ckpts.steps("latest") and step in ckpts.steps("best"):
        kind = "best"
    abstract = setup_lib.abstract_state(setup, ds.image_shape)
    state, ckpt_meta = ckpts.restore(kind, abstract, step)
    ckpts.close()
    return RestoredRun(config, ds, setup, state, mean, std, kind, ckpt_meta)


def evaluate_checkpoint(
    workdir: str, checkpoint: str | int = "best", split: str = "test"
) -> dict[str, Any]:
    """Restores a checkpoint of the run in ``workdir`` and evaluates one split.

    Args:
      workdir: a training run's directory (holds ``run.json`` and checkpoints).
      checkpoint: 'best', 'latest' or a step number (see :func:`restore_run`).
      split: 'test' or 'validation'.

    Returns:
      ``{'checkpoint', 'step', 'epoch', 'split', 'error', 'loss', 'count'}``.
    """
    run = restore_run(workdir, checkpoint)
    result = evaluate_split(
        run.setup.eval_step,
        run.state,
        run.device_split(split),
        batch_size=run.config.eval_batch_size,
        mean=run.mean,
        std=run.std,
    )
    return {
        "checkpoint": run.kind,
        "step": int(run.meta["step"]),
        "epoch": run.meta.get("epoch"),
        "split": split,
        **result,
    }
