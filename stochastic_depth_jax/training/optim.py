"""Optimiser and learning-rate schedule, built from config values only.

The paper's recipe (Huang et al., 2016, Sec. 4; official Torch code ``optim.sgd``):
SGD with Nesterov momentum 0.9 and dampening 0, L2 weight decay 1e-4 added to the gradient
of every parameter (BatchNorm scales and biases included, the Torch default), learning rate
0.1 divided by 10 at 50% and 75% of training (ResNet-1202: after 10 warm-up epochs at 0.01).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

__all__ = ["OPTIMIZERS", "LR_SCHEDULES", "WEIGHT_DECAY_MASKS", "make_optimizer", "make_lr_schedule"]


# A step schedule's warm-up rate, as a fraction of ``learning_rate``: He et al. (2016) warm
# ResNet-110 up at 0.01 for 0.1, and the stochastic-depth paper its ResNet-1202 (Sec. 4).
STEP_WARMUP_FACTOR = 0.1


def step_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Piecewise-constant lr: ``learning_rate * lr_decay_factor ** k`` after k boundaries.

    The update with count ``epoch * steps_per_epoch`` (the first step of that epoch) is the
    first to use the decayed rate. With ``warmup_epochs > 0`` the updates of the first
    ``warmup_epochs`` epochs use ``learning_rate * STEP_WARMUP_FACTOR`` instead (the paper's
    ResNet-1202: 0.01 for 10 epochs, then 0.1); boundaries still count from epoch 0.
    """
    boundaries = {
        int(e) * steps_per_epoch: config.lr_decay_factor for e in config.lr_boundaries_epochs
    }
    steps = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
    warmup = config.warmup_epochs * steps_per_epoch
    if not warmup:
        return steps
    rate = config.learning_rate * STEP_WARMUP_FACTOR
    return lambda count: jnp.where(count < warmup, rate, steps(count))


def constant_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Constant learning rate ``config.learning_rate`` (ablations)."""
    del steps_per_epoch
    return optax.constant_schedule(config.learning_rate)


def warmup_cosine_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up from 0 over ``warmup_epochs``, then cosine decay to 0 at the end of
    ``num_epochs`` (DeiT, ViT recipes)."""
    total = config.num_epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup,
                                              max(total, warmup + 1), end_value=0.0)


def _all_params(params: Any) -> Any:
    return jax.tree.map(lambda _: True, params)


# A scanned stage (``nn.scan``, the ResNets' ``stage<i>_scan``, also around a user's blocks
# in ``ResidualStages``) stacks its blocks' parameters along one leading axis: a BatchNorm
# scale there is ``[blocks, C]``. Only that name: a user's module that merely ends in
# ``_scan`` stacks nothing, and its kernels are kernels.
_SCANNED_STAGE = re.compile(r"stage\d+_scan")
# Never decayed by 'kernels': per-layer vectors, whatever axes a scan stacks on them, and
# the ViT's position embedding and class token (DeiT's and timm's ``no_weight_decay``).
_NOT_KERNELS = ("bias", "scale", "pos_embed", "cls")


def _path_names(path: tuple) -> list[str]:
    """The parameter's names along ``path``: dict keys and list indices; an ``nnx.Variable``'s
    ``.value`` (the array inside an ``nnx.Param``, as ``nnx.Optimizer`` passes them) is not
    a name, so an NNX model's leaves are named as its Linen twin's."""
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            if k.name not in ("value", "raw_value"):
                names.append(k.name)
        elif isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        else:
            names.append(str(k))
    return names


def _kernels_only(params: Any) -> Any:
    """True for conv/dense kernels (and other weights of ndim > 1), False for biases,
    BatchNorm/LayerNorm scales and biases, layer scales' ``gamma`` (1-D: timm, DINOv2 and
    the ConvNeXt code decay none), and the ViT's ``pos_embed`` and ``cls`` token (as DeiT,
    which decays neither); Linen parameters or an NNX model's ``nnx.Param`` state.

    The ndim is the layer's own: a scanned stage's stacking axis does not count (a
    ResNet-110 stage's BatchNorm scale is ``[17, C]``; the ndim test alone decayed it, as
    it did not the unscanned first block's, and a scanned model trained otherwise than
    the same model unrolled)."""
    def kernel(path, p):
        names = _path_names(path)
        if names and names[-1] in _NOT_KERNELS:
            return False
        stacked = sum(bool(_SCANNED_STAGE.fullmatch(n)) for n in names)
        return p.ndim - stacked > 1
    return jax.tree_util.tree_map_with_path(kernel, params)


def sgd(config: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
    """Torch-style SGD: g += wd * w (before momentum), buf = m * buf + g, step = g + m * buf.

    ``optax.trace(nesterov=True)`` computes exactly Torch's Nesterov update with dampening 0,
    and the learning rate multiplies after the momentum, as in Torch.
    """
    mask = WEIGHT_DECAY_MASKS[config.weight_decay_on]
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=mask),
        optax.sgd(lr, momentum=config.momentum or None, nesterov=config.nesterov),
    )


def adamw(config: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay ``weight_decay``, on ``weight_decay_on`` params; DeiT:
    0.05 on kernels), betas ``adam_b1``, ``adam_b2``."""
    mask = WEIGHT_DECAY_MASKS[config.weight_decay_on]
    return optax.adamw(lr, b1=config.adam_b1, b2=config.adam_b2,
                       weight_decay=config.weight_decay, mask=mask)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {"sgd": sgd, "adamw": adamw}
LR_SCHEDULES: dict[str, Callable[..., optax.Schedule]] = {
    "step": step_schedule,
    "constant": constant_schedule,
    "warmup_cosine": warmup_cosine_schedule,
}
WEIGHT_DECAY_MASKS: dict[str, Callable[[Any], Any]] = {"all": _all_params, "kernels": _kernels_only}


def make_lr_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """The schedule named by ``config.lr_schedule``; maps update count -> float32 learning
    rate.

    The schedule computes in float32 from a float32 count (exact below 2**24 updates), so it
    gives the same rates with and without ``jax_enable_x64`` (an int count and Python floats
    compute in float64 there, and 0.1 * 0.1 rounded once differs from float32's product).
    """
    schedule = LR_SCHEDULES[config.lr_schedule](config, steps_per_epoch)
    return lambda count: jnp.asarray(schedule(jnp.asarray(count, jnp.float32)), jnp.float32)


def make_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """The optimiser named by ``config.optimizer`` with the configured schedule."""
    return OPTIMIZERS[config.optimizer](config, make_lr_schedule(config, steps_per_epoch))
