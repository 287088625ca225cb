"""2-D convolution whose backward pass stays fast on XLA:CPU inside ``cond`` and ``scan``.

Why this exists: on XLA:CPU (jaxlib 0.10) the gradient convolutions that JAX's autodiff
emits (input gradient: ``dim_labels=b01f_01oi``-style; weight gradient:
``f01b_i01o->01bf``) are rewritten to fast kernels only in the entry computation. Inside
a nested computation, i.e. the branch of a ``lax.cond`` or the body of a ``lax.scan``,
they run on a slow generic path. Measured on a 2-core CPU, batch 32, 32x32x16 -> 16, 3x3,
two-conv residual block, fwd + bwd: 52 ms unconditionally, 1523 ms inside ``lax.cond``;
four such blocks under ``lax.scan``: 6141 ms vs 224 ms unrolled. Stochastic depth needs
exactly those two constructs (a cond per block, a scan over blocks).

:func:`conv2d` is a ``jax.custom_vjp`` convolution whose backward pass is written as two
*forward-layout* (NHWC x HWIO -> NHWC) convolutions, which XLA:CPU runs fast everywhere:
the same blocks take 44 ms inside ``cond`` and 179 ms under ``scan``, with gradients
bit-identical to autodiff's in that probe. A stride-s convolution runs forward as XLA's
strided convolution, and its gradients are those of the stride-1 convolution it subsamples
(the cotangent spread onto every s-th position; exact): s^2 the FLOPs of that layer's
backward pass, which in a CIFAR ResNet touches 2 of 109 convolutions. Measured (noisy
2-core CPU, fwd + bwd inside ``lax.cond``, 64x64 inputs): still faster than XLA's own
gradient up to stride 4 (k3 s2 9 against 81 ms, k4 s4 15 against 29), slower beyond (k8 s8
17 against 4 ms, a k16 s16 patchify 47-63 against 1), so :func:`conv_general_dilated`
leaves larger strides of larger-than-1x1 kernels to XLA (:data:`_MAX_STRIDE_AREA`). (The
forward pass was the stride-1 convolution subsampled until 2026-12-07: 3.6-58x the time of
XLA's strided forward in that probe.)

:class:`Conv` is a drop-in for ``flax.linen.Conv`` (same ``kernel``/``bias`` parameters, so
checkpoints move between backends) that uses :func:`conv2d` on CPU and XLA's own
convolution elsewhere (cuDNN on GPU, TPU convolutions), chosen when the model is traced.

Users' own branches built from *stock* ``flax.linen.Conv`` get the same speed-up without a
code change: :func:`reroute_flax_convs` is a Flax method interceptor, active while
:class:`~stochastic_depth_jax.StochasticDepth` runs its branch on CPU, that hands each
``nn.Conv`` the drop-in :func:`conv_general_dilated` (same parameters, same numbers; cases
it does not cover fall back to ``lax.conv_general_dilated``). :func:`reroute_nnx_convs` does
the same for the stock ``nnx.Conv`` layers of an NNX branch (the NNX wrappers use it).

XLA:CPU by default runs :func:`conv2d`'s weight-gradient convolution with YNNPACK, slower
than its own (Eigen) convolution at a CIFAR ResNet's shapes; :func:`cpu_compiler_options`
gives the ``jax.jit`` options that keep it on XLA's kernels, reductions on YNNPACK's (the
trainer uses them).
Rewriting the convolution as im2col + matmul, or the weight gradient as a patches matmul or
nine shifted dots, was slower (README, "What is left on the CPU").
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import warnings
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jaxlib
from flax import nnx
import jax.numpy as jnp
from jax import lax
from jax.extend.core import get_opaque_trace_state

from stochastic_depth_jax.kept_loop import _autodiff_modes  # forward or reverse
from stochastic_depth_jax.ops import explicit_sharding, varying_axes

__all__ = [
    "conv2d",
    "conv_general_dilated",
    "reroute_flax_convs",
    "reroute_nnx_convs",
    "Conv",
    "CONV_IMPLEMENTATIONS",
    "REROUTE_CONVS",
    "cpu_compiler_options",
]

Array = Any
Pads = tuple[tuple[int, int], tuple[int, int]]

_DN = ("NHWC", "HWIO", "NHWC")
# conv_general_dilated's largest sh * sw for conv2d (1x1 kernels: any): its gradient costs
# sh * sw times the layer's stride-1 backward, slower than XLA's own beyond 4x4 (module
# docstring). A 1x1 kernel's input is padded and subsampled first: its gradient costs no more.
# A product, not a limit per dimension: lopsided strides of area <= 16 measured faster
# rerouted (grad inside a jitted cond, 8x64x64x16 -> 32, noisy 2-core CPU, 2026-12-07:
# (8, 2) 0.40-0.57x XLA's time, (8, 1) 0.30-0.46x, (16, 1) 0.49-0.67x, 3x3 or stride-sized
# kernels, with and without cpu_compiler_options; (8, 8) 1.7-3.3x, left to XLA).
_MAX_STRIDE_AREA = 16
CONV_IMPLEMENTATIONS = ("auto", "xla", "cpu_friendly")


def _conv(x: Array, w: Array, pads: Pads, out_sharding: Any = None,
          strides: tuple[int, int] = (1, 1)) -> Array:
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DN,
                                    out_sharding=out_sharding)


def _grad_shardings(x: Array, w: Array) -> tuple[Any, Any]:
    """``out_sharding`` for the input and weight gradients of :func:`_conv_s_bwd`: the
    operands' own shardings (the kernel's in the ``[ci, kh, kw, co]`` layout the weight
    gradient comes out in), or None without explicit mesh axes.

    Under ``AxisType.Explicit`` axes (``jax.make_mesh``'s default since jax 0.10) a
    convolution that contracts a sharded axis is refused unless told its output's sharding,
    and the weight gradient contracts the batch (sharded in data parallelism): stated
    here, the kernel's gradient is summed over the batch's devices, as autodiff's own
    gradient of ``lax.conv_general_dilated`` is."""
    sx, sw = explicit_sharding(x), explicit_sharding(w)
    if sx is None and sw is None:
        return None, None
    mesh = (sx or sw).mesh

    def spec(v, sharding):
        given = tuple(sharding.spec) if sharding is not None else ()
        return given + (None,) * (v.ndim - len(given))

    wi = spec(w, sw)
    named = jax.sharding.NamedSharding
    return (named(mesh, jax.sharding.PartitionSpec(*spec(x, sx))),
            named(mesh, jax.sharding.PartitionSpec(wi[2], wi[0], wi[1], wi[3])))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_s(x: Array, w: Array, pads: Pads, strides: tuple[int, int]) -> Array:
    return _conv(x, w, pads, strides=strides)


def _conv_s_fwd(x, w, pads, strides):
    return _conv(x, w, pads, strides=strides), (x, w)


def _conv_s_bwd(pads, strides, res, ct):
    x, w = res
    kh, kw = w.shape[:2]
    (pt, pb), (pl, pr) = pads
    if strides != (1, 1):
        # The cotangent of the stride-1 convolution this one subsamples: ct at every s-th
        # position, zeros between and after (a pad, as autodiff transposes a strided slice).
        full = (x.shape[1] + pt + pb - kh + 1, x.shape[2] + pl + pr - kw + 1)
        ct = lax.pad(ct, jnp.zeros((), ct.dtype), [(0, 0, 0)] + [
            (0, f - ((n - 1) * s + 1), s - 1) for f, n, s in zip(full, ct.shape[1:3], strides)
        ] + [(0, 0, 0)])
    # Input gradient: correlate the cotangent with the spatially flipped kernel, in/out
    # channels swapped; padding k - 1 - p restores the input's size.
    gx_sharding, gw_sharding = _grad_shardings(x, w)
    w_flip = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    gx = _conv(ct, w_flip, ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)),
               gx_sharding)
    # Weight gradient as a forward-layout conv: input channels play the batch, the batch
    # plays the contracted feature axis, and the cotangent is the (large) kernel.
    gw = _conv(x.transpose(3, 1, 2, 0), ct.transpose(1, 2, 0, 3), pads,
               gw_sharding)  # [ci, kh, kw, co]
    return gx.astype(x.dtype), gw.transpose(1, 2, 0, 3).astype(w.dtype)


_conv_s.defvjp(_conv_s_fwd, _conv_s_bwd)


def _conv_stock(x: Array, w: Array, pads: Pads, strides: tuple[int, int]) -> Array:
    """:func:`_conv_s` with JAX's own gradient (forward mode differentiates it)."""
    return _conv(x, w, pads, strides=strides)


# XLA:CPU (jaxlib 0.10 to 0.12) hands the weight-gradient convolution of _conv_s_bwd (input
# channels as the batch, the cotangent as a batch-sized kernel) to YNNPACK, and XLA's own
# (Eigen) convolution runs it faster at a CIFAR ResNet's shapes. The option lists what
# YNNPACK may still take: dots, and reductions, without which XLA splits each large
# reduction (BatchNorm's statistics) into a slow reduce-window (a mean and variance of
# 128x32x32x16: 0.66 ms on YNNPACK, 4.7 ms so). Measured (shared, noisy 2-core machine):
# four scanned cond-wrapped two-conv blocks, batch 128, fwd + bwd, 692 -> 506 ms
# (32x32x16), 413 -> 318 (16x16x32), 305 -> 235 (8x8x64); reductions back on YNNPACK, the
# ResNet-110 train step a further 5-14% faster (medians; 9-17% round by round; ResNet-56
# 17%; README, "What is left on the CPU"). Im2col + matmul and nine-shifted-dot formulations were
# slower (XLA:CPU's dot is no faster than its convolution here), so the formulation itself
# is unchanged.
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# The option's forms, best first, each with what a step loses when it is the best one this
# jaxlib accepts. XLA refuses the whole option for one value it does not know ("... is not a
# valid enum value"), so a jaxlib without LIBRARY_FUSION_TYPE_REDUCE still gets the dots-only
# form (the option's first form here, which keeps the convolutions off YNNPACK). Its cost is
# the measured one inverted: the ResNet-110 and ResNet-56 steps 5-17% faster with reductions
# (per-round ratios down to 0.83) are 5-20% slower without them.
_CPU_OPTION_FORMS = (
    ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE", ""),
    ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
     "BatchNorm statistics and other large reductions run as a slower reduce-window "
     "(ResNet train steps 5-20% slower)"),
)
# What a step loses when this jaxlib accepts none of the forms. Not the reductions: without
# the option XLA:CPU leaves them on YNNPACK, as the first form does.
_NO_FORM_COST = ("every CPU convolution runs on YNNPACK, whose weight gradients are slower "
                 "(steps up to ~2x slower)")


def _probe_cpu_options(options: dict[str, str]) -> None:
    """Compiles a trivial program with ``options`` (raises if XLA refuses them)."""
    jax.jit(lambda a: a + 1, compiler_options=options).lower(
        jnp.zeros((), jnp.float32)).compile()


@functools.cache
def _cpu_options() -> tuple[tuple[str, str], ...]:
    """The first of :data:`_CPU_OPTION_FORMS` this jaxlib's XLA:CPU accepts, as option
    items (empty if none); warns once if that is not the first form.

    Every refusal warns, "no such option" included: that is what a jaxlib that renamed or
    dropped this experimental option answers, and training silently slower is worse than
    one line on a jaxlib where the option never existed.
    """
    refusal = None
    for value, cost in _CPU_OPTION_FORMS:
        try:
            _probe_cpu_options({_YNN_OPTION: value})
        except Exception as e:  # any refusal: try the next form
            refusal = refusal or (str(e).strip().splitlines() or [type(e).__name__])[0]
            continue
        if refusal is not None:
            _warn_refused(refusal, f"train steps compile with {_YNN_OPTION}={value}, so {cost}")
        return ((_YNN_OPTION, value),)
    _warn_refused(refusal, f"train steps compile without it, so {_NO_FORM_COST}")
    return ()


def _warn_refused(reason: str, consequence: str) -> None:
    """One RunWarning: XLA refused the option's best form (``reason``: XLA's first line)."""
    import jaxlib

    from stochastic_depth_jax import logs
    warnings.warn(
        f"XLA:CPU of jaxlib {jaxlib.__version__} refused the compiler option "
        f"{_YNN_OPTION}={_CPU_OPTION_FORMS[0][0]} ({reason}): {consequence}; results equal "
        f"to float rounding. Nothing to do, unless you can move to a jaxlib this library is "
        f"tested with (README, 'Tested versions').", logs.RunWarning, stacklevel=4)


def cpu_compiler_options() -> dict[str, str]:
    """``compiler_options`` for ``jax.jit`` of a training step: faster conv gradients on CPU.

    On the CPU backend, XLA options under which :func:`conv2d`'s weight gradient (and every
    other convolution) runs on XLA's own convolution kernels instead of YNNPACK's, while
    dots and reductions stay on YNNPACK (same values to float32 rounding; a ResNet-110
    train step 11-48% faster in four of five noisy side-by-side runs on a shared 2-core
    CPU, 2-6% in the other; reductions kept on YNNPACK, a further 5-14%). Empty on other
    backends and on a jaxlib that refuses the option (with one warning); dots only on a
    jaxlib that refuses the reductions' value (with one warning). Use as
    ``jax.jit(step, compiler_options=cpu_compiler_options())``; the trainer does.
    """
    if jax.default_backend() != "cpu":
        return {}
    return dict(_cpu_options())


def conv2d(x: Array, w: Array, strides: Sequence[int] = (1, 1),
           padding: Pads = ((0, 0), (0, 0))) -> Array:
    """NHWC convolution with a CPU-friendly custom gradient.

    Args:
      x: ``[batch, H, W, C_in]``.
      w: ``[kh, kw, C_in, C_out]`` (HWIO, as ``flax.linen.Conv``'s kernel).
      strides: spatial strides ``(sh, sw)``.
      padding: explicit ``((top, bottom), (left, right))``; a negative pad crops the input
        (computed as that crop, right where XLA:CPU's own convolution is not).

    Returns:
      ``[batch, H_out, W_out, C_out]`` with ``H_out = (H + top + bottom - kh) // sh + 1``.

    Forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) cannot differentiate a
    ``custom_vjp``: where it is the innermost autodiff over ``x`` or ``w``, or an enclosing
    wrapper or ResNet stage found it (:func:`_under_forward_mode`), this is the same
    convolution with JAX's own gradient. Forward mode applied from outside a trace that
    starts inside (``jax.jvp`` of a jitted function) cannot be seen: JAX's error.
    """
    sh, sw = (int(s) for s in strides)
    # Forward mode cannot differentiate the custom_vjp: there, the same convolution, stock.
    conv = _conv_stock if _under_forward_mode(x, w) else _conv_s
    x, w = _same_varying(x, w)
    x, pads = _crop_negative_pads(x, padding)
    if w.shape[0] == 1 and w.shape[1] == 1:  # 1x1: pad and subsample first, exact
        if pads != ((0, 0), (0, 0)):  # else its gradient is sh * sw times a stride-1 one's
            x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
        return conv(x[:, ::sh, ::sw, :], w, ((0, 0), (0, 0)), (1, 1))
    return conv(x, w, pads, (sh, sw))


def _crop_negative_pads(x: Array, padding: Any) -> tuple[Array, Pads]:
    """``x`` cropped by the negative pads of ``padding`` (explicit pairs), and the pads left
    (each at least 0): the same convolution. XLA:CPU's own convolution (jaxlib 0.10) gives
    wrong numbers for some negative pads, e.g. ``((-2, 1), (-3, 2))`` with a 4x5 kernel on a
    15x16 input (its largest error 31 against values of about 10); a crop is a slice, whose
    gradient (a pad) is exact. Pads cropping more than a side holds are refused, as
    ``lax.conv_general_dilated`` refuses them (a slice would wrap around instead)."""
    pads = tuple((int(a), int(b)) for a, b in padding)
    if all(p >= 0 for pair in pads for p in pair):
        return x, pads  # type: ignore[return-value]
    (t, b), (l, r) = pads
    h, w = x.shape[1:3]
    if max(-t, 0) + max(-b, 0) > h or max(-l, 0) + max(-r, 0) > w:
        raise ValueError(f"Negative padding {pads} crops more than the input's spatial size "
                         f"{(h, w)} holds; give pads whose negative parts sum to at most it.")
    x = x[:, max(-t, 0):h - max(-b, 0), max(-l, 0):w - max(-r, 0), :]
    return x, tuple((max(a, 0), max(b, 0)) for a, b in pads)  # type: ignore[return-value]


def _same_varying(x: Array, w: Array) -> tuple[Array, Array]:
    """``x`` and ``w`` made to vary over the same ``shard_map`` mesh axes (unchanged outside
    one). The custom gradient returns each operand's gradient typed as the operand, and
    inside ``shard_map`` a replicated kernel's gradient computed from a per-device batch
    varies; cast to varying here, as ``lax``'s own convolution does implicitly, the kernel's
    gradient is summed over the devices by the cast's transpose."""
    axes = set(varying_axes(x)) | set(varying_axes(w))

    def cast(v: Array) -> Array:
        missing = tuple(sorted(axes - set(varying_axes(v))))
        return lax.pcast(v, missing, to="varying") if missing else v

    return cast(x), cast(w)


def _nhwc_numbers(lhs_ndim: int, rhs_ndim: int, dimension_numbers: Any) -> bool:
    """True if ``dimension_numbers`` describe NHWC x HWIO -> NHWC (what ``nn.Conv`` uses)."""
    if lhs_ndim != 4 or rhs_ndim != 4:
        return False
    shape = (1, 1, 1, 1)
    given = lax.conv_dimension_numbers(shape, shape, dimension_numbers)
    return given == lax.conv_dimension_numbers(shape, shape, _DN)


def _unit(dilation: Any) -> bool:
    return dilation is None or all(int(d) == 1 for d in dilation)


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Any = None, rhs_dilation: Any = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> Array:
    """Drop-in for ``lax.conv_general_dilated`` that uses :func:`conv2d` where it can.

    :func:`conv2d` covers 2-D NHWC x HWIO convolutions with strides up to 4x4 (product at
    most :data:`_MAX_STRIDE_AREA`; any for a 1x1 kernel) and any padding (a string or
    explicit pairs), no dilation, one feature group, one batch group, default precision and
    operands of one dtype; every other call goes to
    ``lax.conv_general_dilated`` unchanged. Shapes as ``lax.conv_general_dilated``, e.g.
    ``[batch, H, W, C_in] x [kh, kw, C_in, C_out] -> [batch, H_out, W_out, C_out]``.
    """
    covered = (
        _nhwc_numbers(jnp.ndim(lhs), jnp.ndim(rhs), dimension_numbers)
        and (math.prod(int(s) for s in window_strides or ()) <= _MAX_STRIDE_AREA
             or tuple(jnp.shape(rhs)[:2]) == (1, 1))
        and _unit(lhs_dilation) and _unit(rhs_dilation)
        and feature_group_count == 1 and batch_group_count == 1
        and precision is None and preferred_element_type is None
        and jnp.result_type(lhs) == jnp.result_type(rhs)
    )
    if not covered:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    strides = tuple(int(s) for s in window_strides)
    pads = _explicit_padding(padding, rhs.shape[:2], lhs.shape, strides)
    return conv2d(lhs, rhs, strides, pads)


# When StochasticDepth reroutes stock nn.Conv layers: 'auto' = on the CPU backend only (where
# XLA's own gradient convolutions are slow inside cond/scan), 'always', 'never'.
REROUTE_CONVS = ("auto", "always", "never")


def _rerouting(when: str) -> bool:
    """Whether ``when`` (one of :data:`REROUTE_CONVS`) turns the rerouting on here."""
    if when not in REROUTE_CONVS:
        raise ValueError(f"Unknown reroute_convs {when!r}; valid: {list(REROUTE_CONVS)}.")
    if getattr(_LINEN, "forward", False):  # in a wrapper forward mode differentiates
        return False
    return when == "always" or (when == "auto" and jax.default_backend() == "cpu")


# Whether the innermost reroute_flax_convs of this thread (Flax's interceptor stack is per
# thread too) turned the rerouting on: a 'never' inside an 'always' turns it off. And
# ``rerouted``: how many convolutions (or NNX branches) this thread has rerouted so far;
# ``forward``: whether a wrapper this thread is in found forward mode innermost over its
# inputs (its branch then computes stock, whatever reroute_convs says).
_LINEN = threading.local()

# JAX's words (jax 0.10) when forward mode (jax.jvp, jax.jacfwd) reaches a custom_vjp
# function, such as conv2d's gradient (where conv2d could not see forward mode).
_JVP_REFUSAL = "can't apply forward-mode autodiff (jvp) to a custom_vjp function"
_FORWARD_MODE_WAY_OUT = (
    "build the wrapper with reroute_convs='never' (same parameters and numbers; README, "
    "'Forward-mode autodiff')")
FORWARD_MODE_FIX = (
    "forward-mode autodiff (jax.jvp, jax.jacfwd, jax.linearize) reached this wrapper's "
    "rerouted convolutions where the wrapper cannot see it (taken inside its branch, of a jit, "
    "checkpoint, lax.cond or lax.scan of the branch's own): on the CPU they run the "
    "library's CPU-friendly convolution, whose "
    "gradient is a jax.custom_vjp; " + _FORWARD_MODE_WAY_OUT)
# JAX's refusal raised from the user's own code (a custom_vjp of the branch's own, or one of
# its own lax.cond / jax.checkpoint holding a rerouted convolution): either may be the cause.
_FORWARD_MODE_FIX_OR_OWN = (
    "forward-mode autodiff (jax.jvp, jax.jacfwd, jax.linearize) inside this wrapper's branch "
    "reached a jax.custom_vjp, either one of the branch's own (which needs a "
    "jax.custom_jvp instead) or the library's CPU-friendly convolution that the branch's "
    "stock convolutions run on the CPU, under a jit, checkpoint, lax.cond or lax.scan of the "
    "branch's own (" + _FORWARD_MODE_WAY_OUT + ")")
# Where JAX, Flax and this library live: a refusal whose innermost frame outside them is
# none of this library's was raised in the user's own code.
_JAX_AND_FLAX = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                      for m in (jax, jaxlib, flax))
_THIS_LIBRARY = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _count_rerouted() -> None:
    _LINEN.rerouted = getattr(_LINEN, "rerouted", 0) + 1


def _refusal_message(error: BaseException) -> str:
    """The line for JAX's refusal ``error`` of forward mode through a wrapper that rerouted a
    convolution: :data:`FORWARD_MODE_FIX` when the refusal went through :func:`conv2d`
    (JAX's traceback filtering keeps this library's frames) or was raised from this
    library's code (the wrapper's ``lax.cond``) or Flax's (``nnx.Sequential``); one naming a
    custom_vjp of the branch's own as well when it was raised from the user's code."""
    tb, innermost = error.__traceback__, __file__  # the traceback starts in this module
    while tb is not None:
        code = tb.tb_frame.f_code
        if code is conv2d.__code__:
            return FORWARD_MODE_FIX
        if not os.path.abspath(code.co_filename).startswith(_JAX_AND_FLAX):
            innermost = code.co_filename
        tb = tb.tb_next
    mine = os.path.abspath(innermost).startswith(_THIS_LIBRARY)
    return FORWARD_MODE_FIX if mine else _FORWARD_MODE_FIX_OR_OWN


def _eager_trace_state() -> Any:
    """The trace eager code runs in (JAX's evaluation), taken in a new thread, which starts
    outside every transform: this module may be imported under one (a lazy import inside a
    jitted function), whose trace no later call matches, and every eager call read its
    module's state (~1 ms) as if traced."""
    taken = []
    thread = threading.Thread(target=lambda: taken.append(get_opaque_trace_state()))
    thread.start()
    thread.join()
    return taken[0]


# A call made in it has no autodiff over its values to look for (one under any transform is
# looked for).
_EAGER = _eager_trace_state()


def is_eager() -> bool:
    """Whether the caller runs outside every JAX transform (in any thread)."""
    return get_opaque_trace_state() == _EAGER


def _forward_mode_innermost(tree: Any) -> bool:
    """Whether forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) is the innermost
    autodiff over the leaves of ``tree``."""
    modes = _autodiff_modes(tree)
    return bool(modes) and modes[0] == "forward"


def _call_tree(args: tuple, kwargs: dict) -> Any:
    """A method call's arguments and its module's state (NNX variables, a bound Linen
    module's, and what its ``_outside_state()`` gives)."""
    module, tree = (args[0] if args else None), (args[1:], kwargs)
    if nnx.graph.is_graph_node(module):
        tree = (tree, nnx.state(module))
    elif isinstance(module, nn.Module) and module.scope is not None:
        tree = (tree, module.variables)
    outside = getattr(module, "_outside_state", None)  # a branch's layers held elsewhere
    return tree, (outside() if outside is not None else None)


def _under_forward_mode(*operands: Array) -> bool:
    """Whether a convolution of ``operands`` must be stock, forward mode differentiating it:
    a call decorated with :func:`stock_convs_under_forward_mode` that encloses it found
    forward mode innermost over its inputs, or forward mode is innermost over ``operands``.
    :func:`conv2d` (so :class:`Conv` and the rerouted convolutions) asks it."""
    return getattr(_LINEN, "forward", False) or _forward_mode_innermost(operands)


@contextlib.contextmanager
def stock_convs_where_forward_mode(values: Callable[[], Any]):
    """Context in which :func:`conv2d` computes stock, and no wrapper reroutes, if forward
    mode is the innermost autodiff over the leaves of ``values()`` (called only under a
    transform: eagerly there is nothing to find, and reading a module's state costs ~1 ms);
    an enclosing context's finding holds inside."""
    enclosing = getattr(_LINEN, "forward", False)
    _LINEN.forward = enclosing or (not is_eager() and _forward_mode_innermost(values()))
    try:
        yield
    finally:
        _LINEN.forward = enclosing


def stock_convs_under_forward_mode(call: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates a wrapper's ``__call__`` that reroutes convolutions, so forward mode
    (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) differentiates its branch.

    The rerouted convolution's gradient is a ``jax.custom_vjp``, which forward mode cannot
    differentiate. Where forward mode is the innermost autodiff over the call's arguments
    or its module's state (read from their tracers as the wrapper is called, eagerly or
    traced under ``jit`` around the ``jvp``), the call reroutes nothing: the branch (and
    any wrapper inside it) computes its stock convolutions, whatever ``reroute_convs`` says
    (``'always'`` too: the alternative is JAX's error). Reverse mode and forward over
    reverse (``jax.hessian``, ``jvp`` of ``grad``) keep rerouting.

    Also used on :class:`~stochastic_depth_jax.models.ResidualStages`, whose scans trace
    their blocks on their own: :func:`conv2d` reads the finding there.

    Forward mode the wrapper cannot see, applied from outside a trace that starts inside
    it (``jax.jvp`` of a jitted or ``jax.checkpoint``-ed function, a ``lax.scan`` /
    ``nn.scan`` / ``nnx.scan`` body) is refused by JAX as it compiles; one refused while
    the wrapper runs (a ``jvp`` inside the branch of a jitted function, run eagerly)
    becomes one line naming ``reroute_convs='never'`` (:data:`FORWARD_MODE_FIX`;
    :func:`_refusal_message`), or is left as JAX's words when no convolution was
    rerouted."""
    @functools.wraps(call)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        before = getattr(_LINEN, "rerouted", 0)
        try:
            with stock_convs_where_forward_mode(lambda: _call_tree(args, kwargs)):
                return call(*args, **kwargs)
        except TypeError as e:
            if not str(e).startswith(_JVP_REFUSAL) or getattr(_LINEN, "rerouted", 0) == before:
                raise
            raise TypeError(_refusal_message(e)) from None
    return wrapped


def _reroute_interceptor(next_fun, args, kwargs, context):
    module = context.module
    stock = (getattr(_LINEN, "on", False)
             and isinstance(module, nn.Conv) and context.method_name == "__call__"
             and module.conv_general_dilated is None
             and module.conv_general_dilated_cls is None)
    if not stock:
        return next_fun(*args, **kwargs)
    # Linen modules are frozen dataclasses; the field is swapped for this call only and
    # restored, so the module (and its parameters: same names, shapes, init) is unchanged.
    _count_rerouted()
    object.__setattr__(module, "conv_general_dilated", conv_general_dilated)
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(module, "conv_general_dilated", None)


@contextlib.contextmanager
def reroute_flax_convs(when: str = "always"):
    """Context in which stock ``flax.linen.Conv`` calls use :func:`conv_general_dilated`.

    Applies to ``nn.Conv`` (and subclasses) that set neither ``conv_general_dilated`` nor
    ``conv_general_dilated_cls``; parameters, initialisation and results are unchanged (to
    float rounding), only the gradient's formulation differs. ``when`` is one of
    :data:`REROUTE_CONVS`; ``'auto'`` reroutes on the CPU backend only. The innermost context
    decides: ``'never'`` inside one that reroutes (a wrapper with ``reroute_convs='never'``
    in another's branch) leaves the convolutions it encloses stock.
    """
    on = _rerouting(when)
    enclosing = getattr(_LINEN, "on", False)
    _LINEN.on = on
    try:
        if on:  # under an enclosing one too: the first to see a stock conv swaps it
            with nn.intercept_methods(_reroute_interceptor):
                yield
        else:
            yield
    finally:
        _LINEN.on = enclosing


def _nnx_conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int],
                              padding: Any, *, out_sharding: Any = None, **kwargs: Any) -> Array:
    """:func:`conv_general_dilated` with ``flax.nnx.Conv``'s call signature (it passes
    ``out_sharding``; a call that sets one goes to ``lax`` unchanged)."""
    if out_sharding is not None:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding,
                                        out_sharding=out_sharding, **kwargs)
    return conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)


def _set_conv_fn(convs: list, fn: Callable[..., Array]) -> None:
    # object.__setattr__, as the Linen interceptor: the attribute is static (not state), and
    # NNX's own setattr refuses a module created at another trace level (a closed-over model).
    for m in convs:
        object.__setattr__(m, "conv_general_dilated", fn)


@contextlib.contextmanager
def reroute_nnx_convs(module: Any, when: str = "always"):
    """Context in which the stock ``flax.nnx.Conv`` layers of ``module`` use
    :func:`conv_general_dilated`: the NNX counterpart of :func:`reroute_flax_convs`.

    Applies to the ``nnx.Conv`` layers (and subclasses) found in ``module``'s graph whose
    ``conv_general_dilated`` is ``lax.conv_general_dilated`` (the default); the attribute is
    swapped for the duration of the context and restored, so parameters, the module's graph
    and results (to float rounding) are unchanged. ``module`` may be any object; one that
    is not an NNX graph node (a plain function) is left as it is. ``when``: as
    :func:`reroute_flax_convs`; where it turns the rerouting off, layers an enclosing context
    rerouted compute stock for the duration (the innermost context decides).
    """
    on = _rerouting(when)
    if not nnx.graph.is_graph_node(module):
        yield
        return
    stock, rerouted = lax.conv_general_dilated, _nnx_conv_general_dilated
    was, becomes = (stock, rerouted) if on else (rerouted, stock)
    convs = [m for _, m in nnx.iter_graph(module)
             if isinstance(m, nnx.Conv) and m.conv_general_dilated is was]
    if on and convs:
        _count_rerouted()
    _set_conv_fn(convs, becomes)
    try:
        yield
    finally:
        _set_conv_fn(convs, was)


def _explicit_padding(padding: Any, kernel: Sequence[int], x_shape, strides) -> Pads:
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(x_shape[1:3], kernel, strides, padding))  # type: ignore[return-value]
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    pads = []
    for p in padding:
        pads.append((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])))
    return tuple(pads)  # type: ignore[return-value]


# nn.Conv's paddings that pad the input itself (periodic, mirrored), then convolve VALID.
_PAD_MODES = {"CIRCULAR": "wrap", "REFLECT": "reflect"}


class Conv(nn.Module):
    """Drop-in for ``flax.linen.Conv`` (2-D, NHWC) with a backend-aware implementation.

    ``implementation='auto'`` uses :func:`conv2d` when tracing for CPU and
    ``lax.conv_general_dilated`` otherwise; ``'xla'`` and ``'cpu_friendly'`` force one.
    Under forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) :func:`conv2d`
    computes JAX's own convolution, ``'cpu_friendly'`` too (README, "Forward-mode
    autodiff").
    ``padding``: as ``nn.Conv``'s ('SAME', 'VALID', 'SAME_LOWER', 'CIRCULAR', 'REFLECT', an
    int, or explicit pairs, negative ones cropping).
    Parameters: ``kernel`` ``[kh, kw, C_in, features]`` and optional ``bias``.
    Input ``[batch, H, W, C_in]``; output ``[batch, H_out, W_out, features]``.
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    padding: Any = "SAME"
    use_bias: bool = True
    kernel_init: Callable[..., Array] = nn.linear.default_kernel_init
    bias_init: Callable[..., Array] = nn.initializers.zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.implementation not in CONV_IMPLEMENTATIONS:
            raise ValueError(f"Unknown conv implementation {self.implementation!r}; "
                             f"valid: {list(CONV_IMPLEMENTATIONS)}.")
        kh, kw = self.kernel_size
        strides = tuple(self.strides) if self.strides is not None else (1, 1)
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                            self.param_dtype)
        dtype = self.dtype or jnp.result_type(x.dtype, kernel.dtype)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        padding = self.padding
        if isinstance(padding, str) and padding in _PAD_MODES:  # as nn.Conv does
            x = jnp.pad(x, [(0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)],
                        mode=_PAD_MODES[padding])
            padding = "VALID"
        pads = _explicit_padding(padding, (kh, kw), x.shape, strides)
        impl = self.implementation
        if impl == "auto":
            impl = "cpu_friendly" if jax.default_backend() == "cpu" else "xla"
        if impl == "cpu_friendly":
            y = conv2d(x, kernel, strides, pads)
        else:
            x, pads = _crop_negative_pads(x, pads)
            y = lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DN)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(dtype)
        return y
