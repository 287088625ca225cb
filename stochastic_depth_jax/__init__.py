"""stochastic_depth_jax: Deep Networks with Stochastic Depth (Huang et al., 2016) in JAX.

Public API:

* schedules: :func:`linear_decay`, :func:`uniform`, :func:`survival_probabilities`;
* the framework-free op :func:`stochastic_depth` (and :func:`draw_gates`, :func:`gated_branch`);
* Flax Linen layers: :class:`StochasticDepth`, :class:`BatchNorm`, :class:`BasicBlock`,
  :class:`PreActBlock`, :class:`BottleneckBlock`, :class:`Shortcut`;
* models: :class:`CifarResNet`, :class:`ResNet`, :data:`ResNet50`, :data:`ResNet101`,
  :data:`ResNet152`;
* :func:`reroute_flax_convs`: the context in which stock ``flax.linen.Conv`` layers use the
  CPU-friendly convolution of :mod:`stochastic_depth_jax.conv` (``StochasticDepth`` enters
  it on CPU by itself).
"""

from stochastic_depth_jax.conv import reroute_flax_convs
from stochastic_depth_jax.layers import (
    BasicBlock,
    BasicBranch,
    BatchNorm,
    BottleneckBlock,
    BottleneckBranch,
    PreActBlock,
    PreActBranch,
    ResidualBlock,
    Shortcut,
    StochasticDepth,
)
from stochastic_depth_jax.models import (
    CifarResNet,
    ResNet,
    ResNet50,
    ResNet101,
    ResNet152,
    valid_cifar_depths,
)
from stochastic_depth_jax.ops import draw_gates, gated_branch, stochastic_depth
from stochastic_depth_jax.schedules import linear_decay, survival_probabilities, uniform

__version__ = "0.1.0"

__all__ = [
    "BasicBlock",
    "BasicBranch",
    "BatchNorm",
    "BottleneckBlock",
    "BottleneckBranch",
    "CifarResNet",
    "PreActBlock",
    "PreActBranch",
    "ResNet",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "ResidualBlock",
    "Shortcut",
    "StochasticDepth",
    "draw_gates",
    "gated_branch",
    "linear_decay",
    "reroute_flax_convs",
    "stochastic_depth",
    "survival_probabilities",
    "uniform",
    "valid_cifar_depths",
]
