"""ConvNeXt (Liu et al., 2022, "A ConvNet for the 2020s") with drop path that really skips (Linen).

Every block is one residual branch, ``x + DP(gamma * pwconv2(gelu(pwconv1(LN(dwconv(x))))))``
(depthwise 7x7 convolution, channels-last LayerNorm, 4x inverted bottleneck, layer scale
``gamma``), where DP is drop path through the one core op
(:class:`stochastic_depth_jax.StochasticDepth` with ``shortcut=x``: with per-example subsets
the branch runs only on the kept examples, whose outputs are added into x in one
scatter-add). The default semantics are timm's drop path (per-example gates, ``'train'``
scaling: kept examples scaled by ``n / k``, evaluation unscaled) with real skipping
(``mode='sample'``, ``implementation='skip'``; see :mod:`stochastic_depth_jax.ops`).

Drop rates: ``drop_path_rates(sum(depths), rate, rule)`` over all blocks of all stages, in
order (timm's ConvNeXt: ``linspace(0, rate, sum(depths))``), so block j of the whole
network (counting from 0 across stages) drops with the j-th rate.

Keys: training draws one key per forward pass (``make_rng('stochastic_depth')``, or the
``key`` argument); block j (over all stages) draws its gate from ``fold_in(key, j)``. The
NNX twin (:class:`stochastic_depth_jax.nnx_layers.ConvNeXt`) has the same parameter names
and derives its keys the same way, so the same parameters and key give the same outputs.

Layout: stem ``stem_conv`` (``stem_stride`` x ``stem_stride`` patchify, stride
``stem_stride``) + ``stem_norm``; stage s has ``depths[s]`` blocks; between stages s and
s + 1, ``downsample_{s}`` (LayerNorm, then a 2x2 stride-2 convolution); then global average
pooling, ``norm`` and ``head``. Blocks are named ``blocks_{j}`` with j over all stages.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from stochastic_depth_jax import ops
from stochastic_depth_jax.layers import StochasticDepth, gate_rng
from stochastic_depth_jax.vit import (NO_TRAIN, block_gate, check_block_train,
                                     check_image_sides, check_layer_scale_init,
                                     check_positive_int, check_remat, drop_path_rates,
                                     layer_scale)

__all__ = [
    "CONVNEXT_SIZES",
    "KERNEL_INIT",
    "convnext_dims",
    "check_stem_stride",
    "check_image",
    "block_gate",
    "ConvNeXtBranch",
    "ConvNeXtBlock",
    "ConvNeXtDownsample",
    "ConvNeXt",
]

Array = Any

# name -> (depths per stage, channels per stage); timm's names and sizes (atto..nano are
# timm's small variants, tiny..xlarge the paper's, Liu et al. 2022).
CONVNEXT_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}
# The official code initialises convolutions and linear layers with timm's
# ``trunc_normal_(std=.02)``, whose bounds of +-2 are absolute (100 standard deviations): the
# same distribution as N(0, 0.02^2). Flax's ``truncated_normal(0.02)`` cuts at +-2 standard
# deviations (+-0.04), which leaves a standard deviation of 0.0176, 12% too small.
KERNEL_INIT = nn.initializers.normal(stddev=0.02)
EPS = 1e-6  # every LayerNorm of the official code
KERNEL = 7  # depthwise kernel side


def _positive_ints(value: Any, name: str) -> tuple[int, ...]:
    ok = isinstance(value, (tuple, list)) and len(value) >= 1 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in value)
    if not ok:
        raise ValueError(f"ConvNeXt {name} must be a non-empty tuple of integers >= 1 (one per "
                         f"stage, e.g. (3, 3, 9, 3)), got {value!r}.")
    return tuple(int(v) for v in value)


def convnext_dims(size: str, depths: Any = None,
                  dims: Any = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(depths, dims)`` per stage of a named size, each overridable; validated.

    Args:
      size: a key of :data:`CONVNEXT_SIZES`.
      depths: blocks per stage (overrides the size's), e.g. ``(1, 1, 2, 1)``.
      dims: channels per stage (overrides the size's), as many as ``depths``.
    """
    if size not in CONVNEXT_SIZES:
        raise ValueError(f"Unknown ConvNeXt size {size!r}; valid: {list(CONVNEXT_SIZES)}.")
    d, c = CONVNEXT_SIZES[size]
    d = _positive_ints(d if depths is None else depths, "depths")
    c = _positive_ints(c if dims is None else dims, "dims")
    if len(d) != len(c):
        raise ValueError(f"ConvNeXt depths {d} and dims {c} give different stage counts "
                         f"({len(d)} vs {len(c)}); pass one depth and one width per stage.")
    return d, c


def check_stem_stride(stem_stride: Any) -> None:
    """ValueError unless ``stem_stride`` is an integer >= 1."""
    check_positive_int(stem_stride, "stem_stride", " (ImageNet: 4, CIFAR: 1 or 2)")


def check_image(image_shape: tuple[int, ...], stem_stride: int, stages: int) -> None:
    """ValueError unless ``image_shape`` ``[batch, H, W, C]`` divides into every stage.

    The stem divides H and W by ``stem_stride``, each of the ``stages - 1`` downsampling
    layers by 2, so both must be multiples of ``stem_stride * 2 ** (stages - 1)``.
    """
    check_stem_stride(stem_stride)
    total = stem_stride * 2 ** (stages - 1)
    fix = _stage_fix(image_shape[1:3], stem_stride, stages) if len(image_shape) == 4 else ""
    check_image_sides(
        image_shape, "ConvNeXt", total,
        f"do not divide into this ConvNeXt's stages: stem stride {stem_stride} and "
        f"{stages - 1} stride-2 downsamplings need sides that are multiples of {total}; "
        f"resize or crop the images, or use {fix}.")


def _stage_fix(sides: tuple[int, ...], stem_stride: int, stages: int) -> str:
    """The model change that fits ``sides``: the largest smaller stem stride that does, else
    fewer stages (at stem stride 1, or where no smaller stride fits, only they can)."""
    down = 2 ** (stages - 1)
    fits = [s for s in range(stem_stride - 1, 0, -1) if not any(n % (s * down) for n in sides)]
    return f"stem_stride={fits[0]}" if fits else "fewer stages (depths, dims)"


class ConvNeXtBranch(nn.Module):
    """The residual branch of a ConvNeXt block, ``[batch, H, W, C]`` -> ``[batch, H, W, C]``.

    ``gamma * pwconv2(gelu(pwconv1(norm(dwconv(x)))))``: depthwise 7x7 convolution,
    LayerNorm over channels, Dense to ``mlp_ratio * C``, exact GELU, Dense back to C, and a
    learnable per-channel layer scale ``gamma`` initialised to ``layer_scale_init`` (none when
    it is 0 or None).
    """

    layer_scale_init: float | None = 1e-6
    mlp_ratio: int = 4
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        check_layer_scale_init(self.layer_scale_init)
        c = x.shape[-1]
        y = nn.Conv(c, (KERNEL, KERNEL), padding="SAME", feature_group_count=c,
                    kernel_init=KERNEL_INIT, dtype=self.dtype, name="dwconv")(x)
        y = nn.LayerNorm(epsilon=EPS, dtype=self.dtype, name="norm")(y)
        y = nn.Dense(self.mlp_ratio * c, kernel_init=KERNEL_INIT, dtype=self.dtype,
                     name="pwconv1")(y)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(c, kernel_init=KERNEL_INIT, dtype=self.dtype, name="pwconv2")(y)
        return layer_scale(self, y, self.layer_scale_init)


class ConvNeXtBlock(nn.Module):
    """``x + DP(branch(x))``: a ConvNeXt block, drop path added into x in one scatter-add.

    Attributes:
      survival_prob: 1 - this block's drop rate (a static float).
      layer_scale_init, mlp_ratio, dtype: of the branch (:class:`ConvNeXtBranch`).
      mode, scaling, implementation, groups: see :class:`stochastic_depth_jax.StochasticDepth`.
      remat: rematerialise the branch (``nn.remat`` inside the drop-path wrapper, ``train``
        static): the backward pass recomputes a kept branch from its input; the same values
        and gradients.
    """

    survival_prob: float = 1.0
    layer_scale_init: float | None = 1e-6
    mlp_ratio: int = 4
    mode: str = "sample"
    scaling: str = "train"
    implementation: str = "skip"
    groups: int = 1
    dtype: Any = None
    remat: bool = False

    @nn.compact
    def __call__(self, x: Array, gate: Any = None, *, train: bool = NO_TRAIN) -> Array:
        """``x`` ``[batch, H, W, C]``; ``gate`` from :func:`block_gate` (None: drawn here)."""
        check_block_train(train, "ConvNeXtBlock", self)
        check_remat(self.remat, "ConvNeXtBlock")
        branch = (_REMAT_BRANCH if self.remat else ConvNeXtBranch)(
            self.layer_scale_init, self.mlp_ratio, self.dtype, parent=None)
        sd = StochasticDepth(branch, survival_prob=self.survival_prob, mode=self.mode,
                             scaling=self.scaling, implementation=self.implementation,
                             groups=self.groups, name="drop_path")
        return sd(x, deterministic=not train, gate=gate, shortcut=x)


# The branch under ``nn.remat``: made once, as ``nn.remat`` makes a new class per call.
_REMAT_BRANCH = nn.remat(ConvNeXtBranch)


class ConvNeXtDownsample(nn.Module):
    """Between stages: LayerNorm, then a 2x2 stride-2 convolution to ``features`` channels;
    ``[batch, H, W, C]`` -> ``[batch, H / 2, W / 2, features]``."""

    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.LayerNorm(epsilon=EPS, dtype=self.dtype, name="norm")(x)
        return nn.Conv(self.features, (2, 2), strides=(2, 2), padding="VALID",
                       kernel_init=KERNEL_INIT, dtype=self.dtype, name="conv")(x)


class ConvNeXt(nn.Module):
    """ConvNeXt classifier with drop path; ``[batch, H, W, C]`` -> ``[batch, classes]``.

    Usage::

        model = ConvNeXt(num_classes=1000, size='tiny', drop_path_rate=0.1)
        variables = model.init(jax.random.key(0), images, train=False)
        logits = model.apply(variables, images, train=True,
                             rngs={'stochastic_depth': jax.random.fold_in(key, step)})

    Attributes:
      size: a key of :data:`CONVNEXT_SIZES`; ``depths`` / ``dims`` override it when set.
      stem_stride: side and stride of the patchify stem (ImageNet: 4; on 32x32 CIFAR, 2
        leaves 16/8/4/2 pixels per stage side). H and W must be multiples of
        ``stem_stride * 2 ** (stages - 1)``.
      drop_path_rate, drop_path_rule: the last block's rate and the rule over all
        ``sum(depths)`` blocks (:func:`stochastic_depth_jax.drop_path_rates`; timm: linear,
        0.1 for T, 0.4 for S, 0.5 for B/L on ImageNet-1k).
      layer_scale_init: initial layer scale ``gamma`` (1e-6); 0 or None: no layer scale.
      mode, scaling, implementation, groups: of every block's drop path (default: per-example
        subsets that skip, timm's inverted scaling).
      mlp_ratio: inverted-bottleneck width over block width (4).
      dtype: computation dtype (parameters float32).
      remat: rematerialise every block's branch (:class:`ConvNeXtBlock`): less memory for
        the backward pass, another forward pass of the kept branches in time; the same
        values and gradients. ``nn.remat(ConvNeXt)`` cannot do it (it traces ``train``).
    """

    num_classes: int
    size: str = "tiny"
    depths: tuple[int, ...] | None = None
    dims: tuple[int, ...] | None = None
    stem_stride: int = 4
    drop_path_rate: float = 0.0
    drop_path_rule: str = "linear"
    layer_scale_init: float | None = 1e-6
    mode: str = "sample"
    scaling: str = "train"
    implementation: str = "skip"
    groups: int = 1
    mlp_ratio: int = 4
    dtype: Any = None
    remat: bool = False

    def stages(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(depths, dims)`` per stage."""
        return convnext_dims(self.size, self.depths, self.dims)

    def survival_probs(self) -> np.ndarray:
        """Per-block survival probabilities over all stages, float64 ``[sum(depths)]``."""
        depths, _ = self.stages()
        return 1.0 - drop_path_rates(sum(depths), self.drop_path_rate, self.drop_path_rule)

    @nn.compact
    def __call__(self, x: Array, *, train: bool = NO_TRAIN, key: Array | None = None) -> Array:
        """Classifies ``x`` ``[batch, H, W, C]``; ``key`` overrides the drop-path stream."""
        check_block_train(train, "ConvNeXt", self)
        check_remat(self.remat, "ConvNeXt")
        if key is not None:
            ops.check_key(key)
        ops.validate_options(self.mode, self.scaling, self.implementation)
        depths, dims = self.stages()
        probs = self.survival_probs()
        check_image(x.shape, self.stem_stride, len(depths))
        if train and key is None and np.any(probs < 1.0) and not self.is_initializing():
            key = gate_rng(self)
        s = self.stem_stride
        x = nn.Conv(dims[0], (s, s), strides=(s, s), padding="VALID", kernel_init=KERNEL_INIT,
                    dtype=self.dtype, name="stem_conv")(x)
        x = nn.LayerNorm(epsilon=EPS, dtype=self.dtype, name="stem_norm")(x)
        j = 0
        for stage, (depth, width) in enumerate(zip(depths, dims)):
            if stage:
                x = ConvNeXtDownsample(width, self.dtype, name=f"downsample_{stage - 1}")(x)
            for _ in range(depth):
                p = float(probs[j])
                gate = block_gate(key if train else None, j, p, mode=self.mode,
                                  implementation=self.implementation, batch_size=x.shape[0],
                                  groups=self.groups)
                x = ConvNeXtBlock(p, self.layer_scale_init, self.mlp_ratio, self.mode,
                                  self.scaling, self.implementation, self.groups, self.dtype,
                                  self.remat, name=f"blocks_{j}")(x, gate, train=train)
                j += 1
        x = nn.LayerNorm(epsilon=EPS, dtype=self.dtype, name="norm")(jnp.mean(x, axis=(1, 2)))
        return nn.Dense(self.num_classes, kernel_init=KERNEL_INIT, dtype=self.dtype,
                        name="head")(x)
