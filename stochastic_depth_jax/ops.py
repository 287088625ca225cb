"""The framework-free stochastic-depth op: a residual branch under a Bernoulli gate.

Semantics (Huang et al., 2016, Sec. 3):

* ``mode='batch'`` (the paper): one gate b ~ Bernoulli(p) per block per mini-batch. With
  ``implementation='skip'`` (default) a closed gate means the branch is *not computed*,
  neither forward nor backward: the op is a ``lax.cond`` on a scalar predicate, and only the
  taken branch runs. ``implementation='mask'`` computes the branch and multiplies by the
  gate, which is what timm/torchvision/Keras do; it exists for comparison.
* ``mode='sample'`` (drop path): one gate per example, shape ``[batch]``. Some examples of
  the batch always need the branch, so this mode always computes it and masks.
* ``scaling='test'`` (the paper, Eq. 5): training returns ``b f(x)``, evaluation ``p f(x)``.
  ``scaling='train'`` (inverted, as timm): training returns ``b f(x) / p``, evaluation
  ``f(x)``. Both have the same expectation at train and test time.

Under ``vmap`` with a per-example key, ``lax.cond`` becomes a ``select`` and both branches
run; use ``mode='sample'`` for per-example gates instead.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MODES",
    "SCALINGS",
    "IMPLEMENTATIONS",
    "draw_gates",
    "train_scale",
    "eval_scale",
    "gated_branch",
    "stochastic_depth",
    "validate_options",
    "check_survival_prob",
    "is_static_one",
    "scaled",
    "masked",
]

MODES = ("batch", "sample")
SCALINGS = ("test", "train")
IMPLEMENTATIONS = ("skip", "mask")

Array = Any


def validate_options(mode: str, scaling: str, implementation: str = "skip") -> None:
    """Raises ValueError naming the bad option and the valid values."""
    for name, value, valid in (
        ("mode", mode, MODES),
        ("scaling", scaling, SCALINGS),
        ("implementation", implementation, IMPLEMENTATIONS),
    ):
        if value not in valid:
            raise ValueError(f"Unknown stochastic-depth {name} {value!r}; valid: {list(valid)}.")


def check_survival_prob(p: Any) -> None:
    """Raises ValueError for a static survival probability outside (0, 1] or NaN.

    Traced or device values are left to the caller (they cannot be inspected in jit)."""
    if not isinstance(p, (int, float, np.ndarray, np.generic)):
        return  # traced or device values are the caller's to check
    values = np.ravel(np.asarray(p, dtype=np.float64))
    for v in values:
        if math.isnan(v) or not 0.0 < v <= 1.0:
            raise ValueError(f"survival_prob must be in (0, 1], got {v!r}.")


def is_static_one(p: Any) -> bool:
    """True when ``p`` is a concrete 1.0: such a block never draws a key."""
    if isinstance(p, (int, float)):
        return float(p) == 1.0
    return False


def draw_gates(
    key: Array, survival_probs: Array, *, mode: str = "batch", batch_size: int | None = None
) -> Array:
    """Draws Bernoulli survival gates for several blocks from one key.

    Args:
      key: a JAX PRNG key.
      survival_probs: float ``[num_blocks]`` survival probabilities p_l.
      mode: ``'batch'`` gives bool ``[num_blocks]``; ``'sample'`` gives bool
        ``[num_blocks, batch_size]`` (one gate per example).
      batch_size: required for ``mode='sample'``.

    Returns:
      bool gates, ``True`` where the block survives.
    """
    validate_options(mode, "test")
    probs = jnp.asarray(survival_probs, dtype=jnp.float32)
    if mode == "batch":
        return jax.random.bernoulli(key, probs, probs.shape)
    if batch_size is None:
        raise ValueError("mode='sample' needs batch_size to draw one gate per example.")
    shape = probs.shape + (batch_size,)
    return jax.random.bernoulli(key, probs[..., None], shape)


def train_scale(survival_prob: Array, scaling: str) -> Array:
    """Factor on a surviving branch during training: 1 (paper) or 1/p (inverted)."""
    return 1.0 if scaling == "test" else 1.0 / survival_prob


def eval_scale(survival_prob: Array, scaling: str) -> Array:
    """Factor on every branch at evaluation: p (paper, Eq. 5) or 1 (inverted)."""
    return survival_prob if scaling == "test" else 1.0


def scaled(y: Array, factor: Any) -> Array:
    """``y * factor`` in ``y``'s dtype; a static factor of 1 adds no op."""
    if isinstance(factor, (int, float)) and factor == 1.0:
        return y
    return y * jnp.asarray(factor, dtype=y.dtype)


def masked(y: Array, gate: Array, factor: Any) -> Array:
    """``y * gate * factor``; a ``[batch]`` gate broadcasts over ``y``'s trailing axes."""
    gate = jnp.asarray(gate)
    mask = gate.astype(y.dtype).reshape(gate.shape + (1,) * (y.ndim - gate.ndim))
    return scaled(y * mask, factor)


def gated_branch(
    branch: Callable[..., Array],
    x: Array,
    gate: Array,
    survival_prob: Array,
    *,
    mode: str = "batch",
    scaling: str = "test",
    implementation: str = "skip",
) -> Array:
    """Applies ``branch`` to ``x`` under an already-drawn training gate.

    Args:
      branch: ``x -> y``; a pure function (close over parameters as needed).
      x: the block input, e.g. ``[batch, height, width, channels]``.
      gate: bool scalar (``mode='batch'``) or bool ``[batch]`` (``mode='sample'``).
      survival_prob: p for this block (scalar; may be traced).

    Returns:
      ``gate * branch(x) * train_scale`` with the shape and dtype of ``branch(x)``; in
      ``'batch'``/``'skip'`` the branch is not evaluated when the gate is closed.
    """
    factor = train_scale(survival_prob, scaling)
    if mode == "sample" or implementation == "mask":
        return masked(branch(x), gate, factor)
    out = jax.eval_shape(branch, x)
    return jax.lax.cond(
        gate,
        lambda v: scaled(branch(v), factor),
        lambda v: jnp.zeros(out.shape, out.dtype),
        x,
    )


def stochastic_depth(
    branch: Callable[[Array], Array],
    x: Array,
    *,
    survival_prob: float | Array,
    key: Array | None = None,
    deterministic: bool = False,
    mode: str = "batch",
    scaling: str = "test",
    implementation: str = "skip",
) -> Array:
    """Runs a residual branch under stochastic depth; returns its gated output.

    The caller adds the shortcut: ``out = act(shortcut(x) + stochastic_depth(f, x, ...))``.

    Args:
      branch: the residual function f, ``x -> f(x)``; pure (close over parameters).
      x: input array, any shape; ``[batch, ...]`` for ``mode='sample'``.
      survival_prob: p in (0, 1]. A concrete 1.0 never draws a key.
      key: PRNG key for the gate; required in training unless ``survival_prob`` is 1.
      deterministic: evaluation mode: every branch runs, scaled per ``scaling``.
      mode: ``'batch'`` (one gate per call, paper) or ``'sample'`` (one per example).
      scaling: ``'test'`` (paper: scale by p at evaluation) or ``'train'`` (scale by 1/p
        in training).
      implementation: ``'skip'`` (closed gate computes nothing) or ``'mask'``.

    Returns:
      The gated residual, shaped like ``f(x)``.
    """
    validate_options(mode, scaling, implementation)
    check_survival_prob(survival_prob)
    if deterministic:
        return scaled(branch(x), eval_scale(survival_prob, scaling))
    if is_static_one(survival_prob):
        return branch(x)
    if key is None:
        raise ValueError(
            "stochastic_depth needs a PRNG `key` in training (deterministic=False) when "
            "survival_prob < 1; pass key=jax.random.fold_in(base_key, step)."
        )
    if mode == "batch":
        gate = jax.random.bernoulli(key, survival_prob)
    else:
        gate = jax.random.bernoulli(key, survival_prob, (x.shape[0],))
    return gated_branch(
        branch, x, gate, survival_prob, mode=mode, scaling=scaling, implementation=implementation
    )
