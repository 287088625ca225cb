"""Vision Transformer (DeiT-style pre-norm blocks) with drop path that really skips (Linen).

Each encoder block has two residual branches, ``x + attn(LN(x))`` and ``x + mlp(LN(x))``,
each wrapped in :class:`stochastic_depth_jax.StochasticDepth` with drop probability
``drop_path_rates(...)[i]`` for block i (timm/DeiT: one rate per block, an independent draw
per branch). ``layer_scale_init`` adds LayerScale (CaiT, DINOv2; timm's ``init_values``)
inside each branch, before its drop path: ``x + DP(gamma * attn(LN(x)))``. The default
semantics are timm's drop path (per-example gates, ``'train'`` scaling: kept examples scaled
by ``n / k``, evaluation unscaled) with real skipping: each branch runs only on the kept
subset (``mode='sample'``, ``implementation='skip'``; see :mod:`stochastic_depth_jax.ops`).

The NNX twin is :class:`stochastic_depth_jax.nnx_layers.ViT`, with the same parameter
names and, for the same parameters and key, the same outputs.

Keys: training draws one key per forward pass (``make_rng('stochastic_depth')``, or the
``key`` argument); block i uses ``fold_in(key, i)`` and its branch j (0: attention,
1: MLP) ``fold_in(fold_in(key, i), j)``. The NNX ViT derives its keys the same way.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from stochastic_depth_jax import ops, schedules
from stochastic_depth_jax.layers import StochasticDepth, _transforms_around, gate_rng

__all__ = [
    "VIT_SIZES",
    "DROP_PATH_RULES",
    "POOLS",
    "drop_path_rates",
    "vit_dims",
    "attend",
    "block_gate",
    "block_gates",
    "NO_TRAIN",
    "check_block_train",
    "check_remat",
    "check_layer_scale_init",
    "layer_scale",
    "qkv_init",
    "Attention",
    "AttentionBranch",
    "MlpBranch",
    "EncoderBlock",
    "ViT",
]

Array = Any

# name -> (width, depth, heads); MLP width is 4x (Dosovitskiy et al., 2021; DeiT Ti/S).
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "ti": (192, 12, 3),
    "s": (384, 12, 6),
    "b": (768, 12, 12),
    "l": (1024, 24, 16),
}
POOLS = ("token", "gap")
KERNEL_INIT = nn.initializers.xavier_uniform()
POS_INIT = nn.initializers.normal(stddev=0.02)


def qkv_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """Xavier-uniform per projection of the fused ``[width, 3 * width]`` q/k/v kernel.

    The original JAX ViT (and big_vision) draws q, k and v as three ``[width, width]``
    kernels (Flax's ``MultiHeadDotProductAttention(kernel_init=xavier_uniform())``), each
    U(+-sqrt(3 / width)). Xavier over the fused matrix, as timm's ``weight_init='jax'``,
    counts a fan-out of ``3 * width``: a standard deviation 1/sqrt(2) of the original's.
    """
    fan_in, fused = shape
    kernel = nn.initializers.xavier_uniform(in_axis=0, out_axis=2, batch_axis=1)(
        key, (fan_in, 3, fused // 3), dtype)
    return kernel.reshape(shape)


def _timm_linear(depth: int, rate: float) -> np.ndarray:
    """timm/DeiT: ``linspace(0, rate, depth)``: 0 at the first block, ``rate`` at the last."""
    return np.linspace(0.0, rate, depth)


def _paper_linear(depth: int, rate: float) -> np.ndarray:
    """The stochastic-depth paper's rule (Eq. 4, blocks l = 1..L): ``(l / L) rate``."""
    return 1.0 - schedules.linear_decay(depth, 1.0 - rate)


def _uniform(depth: int, rate: float) -> np.ndarray:
    """The same rate for every block."""
    return np.full((depth,), float(rate))


DROP_PATH_RULES: dict[str, Callable[[int, float], np.ndarray]] = {
    "linear": _timm_linear,
    "paper": _paper_linear,
    "uniform": _uniform,
}


def drop_path_rates(depth: int, rate: float, rule: str = "linear") -> np.ndarray:
    """Per-block drop probabilities, float64 ``[depth]``.

    Args:
      depth: number of encoder blocks.
      rate: the largest (last block's) drop probability, in ``[0, 1)``.
      rule: ``'linear'`` (timm/DeiT: 0 at the first block to ``rate`` at the last; one
        block alone gets 0, as timm's ``linspace(0, rate, 1)``),
        ``'paper'`` (Huang et al. Eq. 4: ``l / L * rate`` for l = 1..L, so the first block
        already drops ``rate / L``) or ``'uniform'``.
    """
    if rule not in DROP_PATH_RULES:
        raise ValueError(f"Unknown drop_path_rule {rule!r}; valid: {sorted(DROP_PATH_RULES)}.")
    if isinstance(rate, (bool, np.bool_)) or not ops.is_concrete(rate) or np.ndim(rate) \
            or not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1) (DeiT-S: 0.1), got {rate!r}.")
    check_positive_int(depth, "depth")
    return DROP_PATH_RULES[rule](int(depth), float(rate))


class _NoTrain:
    """The default of a model's or block's keyword-only ``train``: Linen's ``nn.vmap`` drops
    keyword arguments, and Python's "missing 1 required keyword-only argument: 'train'"
    named no way to pass it (:func:`check_block_train`)."""

    def __repr__(self) -> str:
        return "<no train>"


NO_TRAIN: Any = _NoTrain()


def check_block_train(train: Any, name: str, module: nn.Module | None = None) -> None:
    """TypeError in one line for a ViT's, ConvNeXt's or block's ``train`` that is not a
    Python bool.

    ``nn.remat(ViT)`` or ``nn.remat(EncoderBlock)`` (or ``nn.jit`` without
    ``static_argnames``) traces the keyword-only ``train``, which the model reads in Python:
    JAX's ``TracerBoolConversionError`` named neither the model nor a fix; the fix named is
    the model's own ``remat=True``. ``nn.vmap`` and ``nn.scan`` drop keyword arguments (no
    ``train`` at all): the fix named passes it through a function. ``None`` or a string was
    read by its truth value (``train=None`` evaluated, ``'False'`` trained). ``module``: the model,
    whose Linen transforms say who traced ``train``: outside ``nn.remat`` / ``nn.jit``
    (``jax.jit(model.apply)`` with ``train`` not static) the general message, which names
    ``jax.jit(..., static_argnames='train')``, is the one.
    """
    lifted = _transforms_around(module) if module is not None else ""
    if train is NO_TRAIN:
        if "vmap(" in lifted:
            raise TypeError(
                f"{name} got no train flag: nn.vmap drops keyword arguments; map a function "
                f"that passes it, nn.vmap(lambda m, x: m(x, train=train), variable_axes="
                f"{{'params': None}}, split_rngs={{'params': False, 'stochastic_depth': "
                f"True}})(model, x) in a parent module, or jax.vmap over model.apply.")
        if "scan(" in lifted:
            raise TypeError(f"{name} got no train flag: nn.scan drops keyword arguments; "
                            f"{_scan_fix(name)} in a parent module.")
        raise TypeError(f"{name} needs train=True (training) or train=False (evaluation).")
    try:
        ops.check_deterministic(train, name="train")
    except ops.TracedFlagError:
        if module is None or ("remat(" not in lifted and "jit(" not in lifted):
            raise
        raise ops.TracedFlagError(
            f"{name} got a traced train flag (nn.remat, or nn.jit without static_argnames, "
            f"traces keyword arguments), which it must read in Python: to rematerialise, "
            f"apply {name} itself with remat=True (each block's branches recomputed in the "
            f"backward pass), and under nn.jit pass static_argnames='train'."
        ) from None


def _scan_fix(name: str) -> str:
    """The ``nn.scan`` that passes ``train`` to the block (or model) ``name``: a stack of
    blocks carries x through them; a model (ViT, ConvNeXt) maps over a stack of batches
    with shared parameters."""
    if name in ("ViT", "ConvNeXt"):
        return ("scan a function that passes it, nn.scan(lambda m, c, x: (c, m(x, "
                "train=train)), variable_broadcast='params', split_rngs={'params': False, "
                "'stochastic_depth': True})(model, None, xs)")
    return ("scan a function that passes it and returns (carry, output), nn.scan(lambda m, "
            "x, _: (m(x, train=train), None), variable_axes={'params': 0}, split_rngs="
            "{'params': True, 'stochastic_depth': True}, length=depth)(block, x, None)")


def check_remat(remat: Any, name: str) -> None:
    """TypeError unless ``remat`` (of a ViT, a ConvNeXt or their blocks) is a bool: the
    ResNets' string policies (``'none'``, ``'full'``) would be read by their truth value."""
    if not isinstance(remat, (bool, np.bool_)):
        raise TypeError(
            f"{name} remat must be a bool (True: recompute each block's branches in the "
            f"backward pass, the ResNets' remat='full'; False: keep their activations), got "
            f"{remat!r}.")


def check_layer_scale_init(value: Any, example: str = "ConvNeXt: 1e-6") -> None:
    """ValueError unless ``value`` (a ViT's or ConvNeXt's ``layer_scale_init``) is None or a
    finite number; ``example`` is the model's usual value, named in the message. A string
    ('1e-6') failed in the initialiser ('format number 1 of "1e-6" is not recognized'), and
    True started every layer scale at 1 instead of at a small value."""
    ok = value is None or (not isinstance(value, (bool, np.bool_, str, bytes))
                           and np.ndim(value) == 0)
    try:
        ok = ok and (value is None or math.isfinite(float(value)))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"layer_scale_init must be a number ({example}) or 0 or None "
                         f"(no layer scale), got {value!r}.")


def layer_scale(module: nn.Module, y: Array, init: float | None) -> Array:
    """``y * gamma``, the learnable per-channel layer scale ``gamma`` (a parameter of
    ``module`` named ``'gamma'``, float32, shape ``[channels]``) initialised to ``init``;
    ``y`` unchanged (and no parameter) when ``init`` is 0 or None."""
    if not init:
        return y
    gamma = module.param("gamma", nn.initializers.constant(init), (y.shape[-1],), jnp.float32)
    return y * gamma.astype(y.dtype)


# The ViT's usual layer_scale_init, as its refusal names it.
VIT_LAYER_SCALE = "ViT: e.g. 1e-5, as DINOv2"


def check_positive_int(value: Any, name: str, hint: str = "") -> None:
    """ValueError unless ``value`` is an integer >= 1 (not a bool); ``hint``, e.g.
    ``" (CIFAR: 4)"``, follows the requirement in the message."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1{hint}, got {value!r}.")


def check_image_sides(image_shape: tuple[int, ...], model: str, multiple: int,
                      why: str) -> None:
    """ValueError unless ``image_shape`` is ``[batch, H, W, C]`` with H and W multiples of
    ``multiple``; ``why`` completes "<H>x<W> images ..." (what fails, and the fix).

    A channels-first batch (PyTorch's ``[N, 3, H, H]``) is named as such, as the ResNets
    do: it failed as "3xH images do not tile ...", whose fix (resize or crop) was wrong."""
    shape = tuple(image_shape)
    if len(shape) != 4:
        one = "; for one image pass x[None]" if len(shape) == 3 else ""
        raise ValueError(f"{model} takes images [batch, height, width, channels], got shape "
                         f"{shape}{one}.")
    if shape[1] in (1, 3) and shape[2] == shape[3] > 4:
        raise ValueError(f"{model} takes images [batch, height, width, channels], got shape "
                         f"{shape}, which is channels-first (NCHW); pass "
                         f"x.transpose(0, 2, 3, 1).")
    h, w = shape[1:3]
    if h % multiple or w % multiple:
        raise ValueError(f"{h}x{w} images {why}")


def check_patches(image_shape: tuple[int, ...], patch_size: int) -> None:
    """ValueError unless ``image_shape`` ``[batch, H, W, C]`` tiles into whole patches."""
    check_positive_int(patch_size, "patch_size")
    check_image_sides(
        image_shape, "ViT", patch_size,
        f"do not tile into {patch_size}x{patch_size} patches (the edge pixels would be "
        f"dropped); use a patch size that divides both sides, or resize or crop the images.")


def check_tokens(expected: int, got: int, image_shape: tuple[int, ...], patch_size: int,
                 rebuild: str = "build a new model for this size") -> None:
    """ValueError when the images give another token count than the position embedding has;
    ``rebuild`` names how to make a model for these images."""
    if expected != got:
        raise ValueError(
            f"{image_shape[1]}x{image_shape[2]} images with patch {patch_size} give {got} tokens, "
            f"but this model's position embedding has {expected}: use the image size the model "
            f"was built for, or {rebuild}.")


def vit_dims(size: str, width: int | None = None, depth: int | None = None,
             num_heads: int | None = None) -> tuple[int, int, int]:
    """``(width, depth, heads)`` of a named size, each overridable; validates the size."""
    if size not in VIT_SIZES:
        raise ValueError(f"Unknown ViT size {size!r}; valid: {list(VIT_SIZES)}.")
    w, d, h = VIT_SIZES[size]
    # None takes the size's value; 0 is refused (``width or w`` built the size's 12 blocks
    # for depth=0).
    for value, name in ((width, "width"), (depth, "depth"), (num_heads, "num_heads")):
        if value is not None:
            check_positive_int(value, name, " (None: the size's)")
    w, d, h = (v if v is not None else default
               for v, default in ((width, w), (depth, d), (num_heads, h)))
    if w % h:
        raise ValueError(f"ViT width {w} does not divide into {h} heads.")
    return w, d, h


def attend(qkv: Array, num_heads: int) -> Array:
    """Multi-head self-attention from fused projections.

    Args:
      qkv: ``[batch, tokens, 3 * width]`` (queries, keys, values concatenated).

    Returns:
      ``[batch, tokens, width]``: softmax(q k^T / sqrt(d)) v per head, heads concatenated.
    """
    b, t, three_w = qkv.shape
    q, k, v = jnp.split(qkv.reshape(b, t, 3, num_heads, three_w // (3 * num_heads)), 3, axis=2)
    out = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])
    return out.reshape(b, t, three_w // 3)


def block_gate(key: Array | None, index: int, survival_prob: float, *, mode: str,
               implementation: str, batch_size: int, groups: int) -> Any:
    """Gate ``index`` drawn from ``fold_in(key, index)``; None when ``key`` is None or p is 1.

    The ConvNeXt's block i draws ``block_gate(key, i, ...)``; the ViT's block i branch j
    ``block_gate(fold_in(key, i), j, ...)`` (:func:`block_gates`).
    """
    if key is None or ops.is_static_one(survival_prob):
        return None
    return ops.draw_gate(jax.random.fold_in(key, index), survival_prob, mode=mode,
                         implementation=implementation, batch_size=batch_size, groups=groups)


def block_gates(key: Array | None, index: int, survival_prob: float, *, mode: str,
                implementation: str, batch_size: int, groups: int) -> tuple[Any, Any]:
    """The two branch gates of block ``index`` from the forward pass's key (None: draw none).

    Block i uses ``fold_in(key, i)``; its attention and MLP branches fold in 0 and 1.
    """
    if key is None or ops.is_static_one(survival_prob):
        return None, None
    block_key = jax.random.fold_in(key, index)
    return tuple(block_gate(block_key, j, survival_prob, mode=mode,
                            implementation=implementation, batch_size=batch_size,
                            groups=groups) for j in (0, 1))


class Attention(nn.Module):
    """Self-attention: fused ``qkv`` projection, :func:`attend`, output ``proj``.

    ``[batch, tokens, width]`` -> ``[batch, tokens, width]``.
    """

    num_heads: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        width = x.shape[-1]
        qkv = nn.Dense(3 * width, kernel_init=qkv_init, dtype=self.dtype, name="qkv")(x)
        return nn.Dense(width, kernel_init=KERNEL_INIT, dtype=self.dtype,
                        name="proj")(attend(qkv, self.num_heads))


class AttentionBranch(nn.Module):
    """Pre-norm attention residual branch ``gamma * attn(LN(x))``, ``[batch, tokens, width]``;
    ``gamma`` is the layer scale (:func:`layer_scale`; none by default)."""

    num_heads: int
    dtype: Any = None
    layer_scale_init: float | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        check_layer_scale_init(self.layer_scale_init, VIT_LAYER_SCALE)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        y = Attention(self.num_heads, self.dtype, name="attn")(y)
        return layer_scale(self, y, self.layer_scale_init)


class MlpBranch(nn.Module):
    """Pre-norm MLP residual branch ``gamma * fc2(gelu(fc1(LN(x))))``,
    ``[batch, tokens, width]``; ``gamma`` as :class:`AttentionBranch`'s."""

    mlp_dim: int
    dtype: Any = None
    layer_scale_init: float | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        check_layer_scale_init(self.layer_scale_init, VIT_LAYER_SCALE)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        y = nn.Dense(self.mlp_dim, kernel_init=KERNEL_INIT, dtype=self.dtype, name="fc1")(y)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(x.shape[-1], kernel_init=KERNEL_INIT, dtype=self.dtype, name="fc2")(y)
        return layer_scale(self, y, self.layer_scale_init)


class EncoderBlock(nn.Module):
    """DeiT pre-norm block: ``x += SD(attn(LN(x)))``, then ``x += SD(mlp(LN(x)))``.

    Attributes:
      num_heads, mlp_dim: attention heads, MLP hidden width.
      survival_prob: 1 - drop rate of this block (a static float).
      mode, scaling, implementation, groups: see :class:`stochastic_depth_jax.StochasticDepth`.
      fused_residual: add a branch's kept outputs into ``x`` in one scatter-add (DINOv2's
        ``index_add``; default) rather than scatter them into zeros and add; same values.
      remat: rematerialise each branch (``nn.remat`` inside its stochastic-depth wrapper,
        with ``train`` static): the backward pass recomputes a kept branch from its input
        instead of keeping its activations (attention weights, the MLP's hidden layer);
        the same values and gradients (timm's ``set_grad_checkpointing``, per branch).
      layer_scale_init: LayerScale (CaiT, DINOv2; timm's ``init_values``): each branch's
        output times a learnable per-channel ``gamma`` started at this value, before drop
        path, ``x + DP(gamma * attn(LN(x)))``; 0 or None (default): none.
    """

    num_heads: int
    mlp_dim: int
    survival_prob: float = 1.0
    mode: str = "sample"
    scaling: str = "train"
    implementation: str = "skip"
    groups: int = 1
    dtype: Any = None
    fused_residual: bool = True
    remat: bool = False
    layer_scale_init: float | None = None

    @nn.compact
    def __call__(self, x: Array, gates: tuple[Any, Any] = (None, None), *,
                 train: bool = NO_TRAIN) -> Array:
        """``x`` ``[batch, tokens, width]``; ``gates`` from :func:`block_gates`."""
        check_block_train(train, "EncoderBlock", self)
        check_remat(self.remat, "EncoderBlock")
        attention, mlp = (_REMAT_BRANCHES if self.remat else (AttentionBranch, MlpBranch))
        ls = self.layer_scale_init
        branches = (attention(self.num_heads, self.dtype, ls, parent=None),
                    mlp(self.mlp_dim, self.dtype, ls, parent=None))
        for name, branch, gate in zip(("attn", "mlp"), branches, gates):
            sd = StochasticDepth(branch, survival_prob=self.survival_prob, mode=self.mode,
                                 scaling=self.scaling, implementation=self.implementation,
                                 groups=self.groups, name=name)
            if self.fused_residual:
                x = sd(x, deterministic=not train, gate=gate, shortcut=x)
            else:
                x = x + sd(x, deterministic=not train, gate=gate)
        return x


# The branches under ``nn.remat``: made once, as ``nn.remat`` makes a new class per call.
_REMAT_BRANCHES = (nn.remat(AttentionBranch), nn.remat(MlpBranch))


class ViT(nn.Module):
    """Vision Transformer classifier with drop path; ``[batch, H, W, C]`` -> ``[batch, classes]``.

    Usage::

        model = ViT(size='s', patch_size=16, num_classes=1000, drop_path_rate=0.1)
        variables = model.init(jax.random.key(0), images, train=False)
        logits = model.apply(variables, images, train=True,
                             rngs={'stochastic_depth': jax.random.fold_in(key, step)})

    Attributes:
      size: ``'ti'``, ``'s'``, ``'b'`` or ``'l'`` (:data:`VIT_SIZES`); ``width``, ``depth``,
        ``num_heads`` override it when set.
      patch_size: square patch side (16 for ImageNet 224, 4 for CIFAR 32).
      pool: ``'token'`` (class token) or ``'gap'`` (no class token: the mean of the patch
        tokens after the final LayerNorm, the original JAX ViT's and big_vision's
        ``'gap'``; timm's ``global_pool='avg'`` averages first, then normalises).
      drop_path_rate, drop_path_rule: see :func:`drop_path_rates` (DeiT: 0.1 for S, linear).
      mode, scaling, implementation, groups: of every branch's stochastic depth (default:
        per-example subsets that skip, timm's inverted scaling).
      mlp_ratio: MLP width over model width (4).
      dtype: computation dtype (parameters float32).
      fused_residual: see :class:`EncoderBlock` (for benchmarks; the values are the same).
      remat: rematerialise every block's branches (:class:`EncoderBlock`): less memory for
        the backward pass, another forward pass of the kept branches in time; the same
        values and gradients. ``nn.remat(ViT)`` cannot do it (it traces ``train``).
      layer_scale_init: LayerScale on every branch (:class:`EncoderBlock`; timm's
        ``init_values``, DINOv2: 1e-5); 0 or None (default): none, as DeiT.

    Initialisation is the original JAX ViT's (Dosovitskiy et al.'s code) without its
    N(0, 1e-6) MLP biases: Xavier-uniform linears, the fused q/k/v kernel per
    projection (:func:`qkv_init`), LeCun-normal patch embedding, zero head and class token,
    position embedding N(0, 0.02). timm's ``weight_init='jax'`` differs in the fused qkv
    (one Xavier matrix) and the class token (N(0, 1e-6)).
    """

    num_classes: int
    size: str = "s"
    patch_size: int = 16
    pool: str = "token"
    drop_path_rate: float = 0.0
    drop_path_rule: str = "linear"
    mode: str = "sample"
    scaling: str = "train"
    implementation: str = "skip"
    groups: int = 1
    width: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: int = 4
    dtype: Any = None
    fused_residual: bool = True
    remat: bool = False
    layer_scale_init: float | None = None

    def dims(self) -> tuple[int, int, int]:
        """``(width, depth, heads)``."""
        return vit_dims(self.size, self.width, self.depth, self.num_heads)

    def survival_probs(self) -> np.ndarray:
        """Per-block survival probabilities ``1 - drop_path_rates``, float64 ``[depth]``."""
        return 1.0 - drop_path_rates(self.dims()[1], self.drop_path_rate, self.drop_path_rule)

    @nn.compact
    def __call__(self, x: Array, *, train: bool = NO_TRAIN, key: Array | None = None) -> Array:
        """Classifies ``x`` ``[batch, H, W, C]``; ``key`` overrides the drop-path stream."""
        check_block_train(train, "ViT", self)
        check_remat(self.remat, "ViT")
        check_layer_scale_init(self.layer_scale_init, VIT_LAYER_SCALE)
        if key is not None:
            ops.check_key(key)
        if self.pool not in POOLS:
            raise ValueError(f"Unknown pool {self.pool!r}; valid: {list(POOLS)}.")
        ops.validate_options(self.mode, self.scaling, self.implementation)
        width, depth, heads = self.dims()
        probs = self.survival_probs()
        if train and key is None and np.any(probs < 1.0) and not self.is_initializing():
            key = gate_rng(self)
        p = self.patch_size
        check_patches(x.shape, p)
        image_shape = x.shape
        x = nn.Conv(width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    name="stem_conv")(x)
        x = x.reshape(x.shape[0], -1, width)
        tokens = x.shape[1] + (self.pool == "token")
        if self.has_variable("params", "pos_embed"):
            check_tokens(self.get_variable("params", "pos_embed").shape[1], tokens, image_shape,
                         p)
        if self.pool == "token":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, width), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, width)).astype(x.dtype),
                                 x], axis=1)
        # float32 parameters (the initialisers' default is float64 under jax_enable_x64).
        pos = self.param("pos_embed", POS_INIT, (1,) + x.shape[1:], jnp.float32)
        x = x + pos.astype(x.dtype)
        for i in range(depth):
            sp = float(probs[i])
            gates = block_gates(key if train else None, i, sp, mode=self.mode,
                                implementation=self.implementation, batch_size=x.shape[0],
                                groups=self.groups)
            x = EncoderBlock(heads, self.mlp_ratio * width, sp, self.mode, self.scaling,
                             self.implementation, self.groups, self.dtype, self.fused_residual,
                             self.remat, self.layer_scale_init,
                             name=f"blocks_{i}")(x, gates, train=train)
        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        x = x[:, 0] if self.pool == "token" else jnp.mean(x, axis=1)
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                        name="head")(x)
