"""stochastic_depth_jax: Deep Networks with Stochastic Depth (Huang et al., 2016) in JAX.

Public API:

* schedules: :func:`linear_decay`, :func:`uniform`, :func:`survival_probabilities`;
* the framework-free op :func:`stochastic_depth` (and :func:`draw_gates`, :func:`draw_gate`,
  :func:`gated_branch`; per-example subsets: :func:`subset_size`, :func:`draw_subset`,
  :func:`subset_branch`; :func:`batch_size_of` for pytree inputs and ``batch_axis``);
* Flax Linen layers: :class:`StochasticDepth` (``survival_prob``: the probability of
  keeping), :class:`DropPath` (timm's drop ``rate``), :class:`BatchNorm`,
  :class:`BasicBlock`, :class:`PreActBlock`, :class:`BottleneckBlock`, :class:`Shortcut`;
* models: :class:`CifarResNet`, :class:`WideResNet`, :class:`ResNet`, :data:`ResNet50`,
  :data:`ResNet101`, :data:`ResNet152`;
* depth on demand (module :mod:`stochastic_depth_jax.pruning`): :func:`prune`,
  :func:`keep_mask`, :func:`save_pruned`, :func:`load_pruned`, :func:`removal_order`,
  :func:`depth_curve`, :func:`mc_evaluate`, :class:`SubNetworkEvaluator`.
* :func:`reroute_flax_convs`: the context in which stock ``flax.linen.Conv`` layers use the
  CPU-friendly convolution of :mod:`stochastic_depth_jax.conv` (``StochasticDepth`` enters
  it on CPU by itself).
* the Vision Transformer with drop path (Linen): :class:`ViT`, :func:`drop_path_rates`,
  :data:`VIT_SIZES`;
* ConvNeXt with drop path (Linen): :class:`ConvNeXt`, :data:`CONVNEXT_SIZES` (module
  :mod:`stochastic_depth_jax.convnext`);
* native Flax NNX modules: :mod:`nnx_layers` (``StochasticDepth``, ``DropPath``,
  ``EncoderBlock``, ``ViT``, ``ConvNeXtBlock``, ``ConvNeXt``, ``load_linen_params``).
* :func:`kept_loop`: the kept blocks of a stack of identical blocks in one loop of dynamic
  length, with its own VJP (``implementation='loop'`` in the ResNets);
* compact mode's scan lengths (module :mod:`stochastic_depth_jax.buckets`):
  ``CifarResNet.compact_lengths`` fits them to the survival schedule.
* :class:`RunWarning`: the category of the trainer's warnings (skipped checkpoints, trimmed
  metrics, changed configs), for ``warnings.filterwarnings``.
"""

from stochastic_depth_jax.conv import reroute_flax_convs
from stochastic_depth_jax.convnext import CONVNEXT_SIZES, ConvNeXt
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
    DropPath,
)
from stochastic_depth_jax.models import (
    CifarResNet,
    ResNet,
    ResNet50,
    ResNet101,
    ResNet152,
    WideResNet,
    valid_cifar_depths,
)
from stochastic_depth_jax import buckets, nnx_layers
from stochastic_depth_jax.kept_loop import kept_loop
from stochastic_depth_jax.logs import RunWarning
from stochastic_depth_jax.ops import (
    batch_size_of,
    draw_gate,
    draw_gates,
    draw_subset,
    gated_branch,
    stochastic_depth,
    subset_branch,
    subset_size,
)
from stochastic_depth_jax.pruning import (
    SubNetworkEvaluator,
    depth_curve,
    keep_mask,
    load_pruned,
    mc_evaluate,
    prune,
    removal_order,
    save_pruned,
)
from stochastic_depth_jax.schedules import linear_decay, survival_probabilities, uniform
from stochastic_depth_jax.vit import VIT_SIZES, ViT, drop_path_rates

__version__ = "0.1.0"

__all__ = [
    "BasicBlock",
    "BasicBranch",
    "BatchNorm",
    "BottleneckBlock",
    "BottleneckBranch",
    "CifarResNet",
    "CONVNEXT_SIZES",
    "ConvNeXt",
    "PreActBlock",
    "PreActBranch",
    "ResNet",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "ResidualBlock",
    "RunWarning",
    "Shortcut",
    "StochasticDepth",
    "DropPath",
    "SubNetworkEvaluator",
    "WideResNet",
    "depth_curve",
    "VIT_SIZES",
    "ViT",
    "batch_size_of",
    "draw_gate",
    "draw_gates",
    "draw_subset",
    "drop_path_rates",
    "gated_branch",
    "keep_mask",
    "kept_loop",
    "linear_decay",
    "load_pruned",
    "mc_evaluate",
    "prune",
    "removal_order",
    "save_pruned",
    "reroute_flax_convs",
    "nnx_layers",
    "buckets",
    "stochastic_depth",
    "subset_branch",
    "subset_size",
    "survival_probabilities",
    "uniform",
    "valid_cifar_depths",
]
