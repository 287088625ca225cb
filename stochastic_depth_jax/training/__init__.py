"""Training and evaluation of stochastic-depth ResNets (the paper's experiments).

  from stochastic_depth_jax.training import train_and_evaluate, evaluate_checkpoint
  summary = train_and_evaluate(config, workdir)          # config: ml_collections.ConfigDict
  result = evaluate_checkpoint(workdir, 'best')          # {'error', 'loss', 'step', ...}

Both raise (never exit): anticipated mistakes as :mod:`stochastic_depth_jax.errors` types;
Ctrl-C during training as :class:`Stopped` once a checkpoint is saved (a second Ctrl-C:
``KeyboardInterrupt``). A call leaves the process as it found it, so a notebook or a sweep
calls them again and again.

Modules: ``config`` (overrides, validation, registries), ``optim`` (Torch-style SGD,
step schedule), ``state`` (TrainState), ``step`` (sharded jitted steps), ``checkpoint``
(Orbax, corruption handling), ``metrics``/``progress``/``plots`` (outputs), ``setup``
(build a run from a config), ``loop`` (``train_and_evaluate``), ``evaluate``,
``distributed`` (multi-host start-up, mesh), ``implementation`` (``model.implementation=
'auto'`` per platform), ``compilation`` (persistent compilation cache, compile counts),
``depth`` (pruning curve, export and Monte-Carlo depth of a run), ``sweep`` (p_L sweeps over
depths), ``figures`` (the paper's Fig. 7/8 and the training-time table, with their sources).
"""

from stochastic_depth_jax.training.checkpoint import (
    CheckpointCorruptWarning,
    Checkpoints,
    IncompatibleCheckpointError,
    NoCheckpointError,
)
from stochastic_depth_jax.training.config import apply_overrides, validate
from stochastic_depth_jax.training.evaluate import evaluate_checkpoint
from stochastic_depth_jax.training.loop import NonFiniteLossError, train_and_evaluate
from stochastic_depth_jax.training.optim import make_lr_schedule, make_optimizer
from stochastic_depth_jax.training.state import TrainState
from stochastic_depth_jax.training.stopping import Stopped

__all__ = [
    "CheckpointCorruptWarning",
    "Checkpoints",
    "IncompatibleCheckpointError",
    "NoCheckpointError",
    "NonFiniteLossError",
    "Stopped",
    "TrainState",
    "apply_overrides",
    "evaluate_checkpoint",
    "make_lr_schedule",
    "make_optimizer",
    "train_and_evaluate",
    "validate",
]
