"""A new user's network: stock Flax layers in a residual branch wrapped in StochasticDepth.

Flax-examples-style blocks (``nn.Conv`` without bias + ``nn.BatchNorm`` + ReLU, as in the
Flax ImageNet example) on CIFAR-shaped input, every branch wrapped as the README shows::

    y = x + StochasticDepth(Branch(..., parent=None), survival_prob=p)(x, deterministic=...)

:class:`UserNetNNX` is its Flax NNX twin (stock ``nnx.Conv`` + ``nnx.BatchNorm`` in
``nnx_layers.StochasticDepth``, gates from the model's own ``nnx.Rngs`` stream).

Used by ``bench_step.py --user-branch`` to check that such a branch gets the speed-up of
real skipping without the user changing their code.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

from stochastic_depth_jax import StochasticDepth, nnx_layers


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


class UserBranchNNX(nnx.Module):
    """:class:`UserBranch` in Flax NNX: conv3x3-BN-ReLU-conv3x3-BN of stock NNX layers."""

    def __init__(self, features: int, dtype: Any, rngs: nnx.Rngs):
        conv = functools.partial(nnx.Conv, features, features, (3, 3), use_bias=False,
                                 dtype=dtype, rngs=rngs)
        norm = functools.partial(nnx.BatchNorm, features, momentum=0.9, epsilon=1e-5,
                                 dtype=dtype, rngs=rngs)
        self.conv1, self.bn1 = conv(), norm()
        self.conv2, self.bn2 = conv(), norm(scale_init=nnx.initializers.zeros)

    def __call__(self, x):
        return self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))


class UserNetNNX(nnx.Module):
    """:class:`UserNet` in Flax NNX; ``model.train()`` / ``model.eval()`` as usual, gates
    from ``rngs``' ``'stochastic_depth'`` stream."""

    def __init__(self, blocks: int = 8, width: int = 32, survival_prob: float = 0.5,
                 reroute_convs: str = "auto", num_classes: int = 10, dtype: Any = jnp.float32,
                 *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, width, (3, 3), use_bias=False, dtype=dtype, rngs=rngs)
        self.norm = nnx.BatchNorm(width, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([
            nnx_layers.StochasticDepth(UserBranchNNX(width, dtype, rngs), survival_prob,
                                       reroute_convs=reroute_convs, rngs=rngs)
            for _ in range(blocks)])
        self.head = nnx.Linear(width, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.stem(x)))
        for block in self.blocks:
            x = nnx.relu(x + block(x))
        return self.head(jnp.mean(x, axis=(1, 2)))
