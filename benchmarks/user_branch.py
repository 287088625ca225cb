"""A new user's network: stock Flax layers in a residual branch wrapped in StochasticDepth.

Flax-examples-style blocks (``nn.Conv`` without bias + ``nn.BatchNorm`` + ReLU, as in the
Flax ImageNet example) on CIFAR-shaped input, every branch wrapped as the README shows::

    y = x + StochasticDepth(Branch(..., parent=None), survival_prob=p)(x, deterministic=...)

Used by ``bench_step.py --user-branch`` to check that such a branch gets the speed-up of
real skipping without the user changing their code.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from stochastic_depth_jax import StochasticDepth


class UserBranch(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN of stock Flax layers; ``[b, H, W, C] -> [b, H, W, C]``."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                                 epsilon=1e-5, dtype=self.dtype)
        y = nn.relu(norm()(conv(self.features, (3, 3))(x)))
        return norm(scale_init=nn.initializers.zeros)(conv(self.features, (3, 3))(y))


class UserNet(nn.Module):
    """Stem conv, ``blocks`` wrapped residual blocks of width ``width``, pooled dense head.

    Input ``[batch, 32, 32, 3]``; logits ``[batch, num_classes]``.
    """

    blocks: int = 8
    width: int = 32
    survival_prob: float = 0.5
    reroute_convs: str = "auto"
    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x))
        for _ in range(self.blocks):
            sd = StochasticDepth(UserBranch(self.width, self.dtype, parent=None),
                                 survival_prob=self.survival_prob,
                                 reroute_convs=self.reroute_convs)
            x = nn.relu(x + sd(x, deterministic=not train, train=train))
        return nn.Dense(self.num_classes, dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))
