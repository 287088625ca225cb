"""Runs the kept blocks of a stack of identical blocks in one loop of dynamic length.

The third way to really skip dropped blocks, beside ``lax.cond`` skipping (one conditional
per block) and compact mode (kept blocks gathered into scans of a few static lengths, one
compiled program per tuple of lengths, padding masked): a ``lax.while_loop`` whose trip
count is the number of kept blocks. One compiled program whatever the gates, no padding,
no conditional per block.

A while loop of dynamic length has no reverse-mode derivative in JAX, so :func:`kept_loop`
carries its own (``jax.custom_vjp``): the forward loop keeps each kept block's VJP
residuals (what ``jax.vjp`` of the block saves, under the block's own remat policy) in
buffers with one slot per block of the stack, and the backward loop walks the kept blocks
in reverse, applying each block's VJP to its stored residuals and adding the parameter
gradients into that block's slot. Memory is that of a scan over every block of the stack
(the buffers are sized for all of them); compute is that of the kept blocks only.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from stochastic_depth_jax import ops

__all__ = ["kept_loop"]

Array = Any
# block_fn(params, stats, x, survival_prob) -> (y, new_stats) for one block's slices.
BlockFn = Callable[[Any, Any, Array, Array], tuple[Array, Any]]


def kept_loop(block_fn: BlockFn, params: Any, stats: Any, x: Array, probs: Array,
              gates: Array) -> tuple[Array, Any]:
    """Applies the blocks whose gate is open, in order, to ``x``; the others not at all.

    Args:
      block_fn: ``(params, stats, x, survival_prob) -> (y, new_stats)`` for one block;
        ``y`` has ``x``'s shape and dtype (identical blocks). Differentiated with respect
        to ``params``, ``x`` and ``probs`` (a block's VJP takes its probability only when
        ``probs`` is differentiated, so constant probabilities store nothing more);
        ``new_stats`` (e.g. BatchNorm running statistics) carries no gradient. It must not
        close over a value being differentiated (a parameter shared by the blocks): the
        loop's own VJP has no gradient for it, and JAX raises ``UnexpectedTracerError``;
        pass it in ``params``, one copy per slot.
      params: the blocks' parameters, every leaf stacked on axis 0 (one slot per block).
      stats: the blocks' non-differentiated state, stacked the same way (may be empty).
      x: the input of the first block, one array (not a pytree).
      probs: float ``[n]``, each block's survival probability (passed to ``block_fn``).
      gates: bool ``[n]``, True where a block runs (traced or concrete).

    Returns:
      ``(y, stats)``: the output of the last kept block (``x`` if none is kept, or the
        stack has no block), and
      ``stats`` with the kept blocks' slots replaced by their ``new_stats``. ``stats``
      carries no gradient: a loss on it (or ``jax.jacrev`` of it) gets that part of the
      gradient as zero, with a warning; return it as an auxiliary output (``has_aux``).

    Derivatives: reverse mode (``jax.grad``, ``jax.vjp``) through the loop's own VJP;
    forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) through JAX's JVP of the
    plain loop; and forward over reverse (``jax.hessian``, ``jax.jvp`` of a gradient).
    Reverse over reverse (``jax.grad`` of a gradient, or of a ``jvp``) with gates traced
    under ``jit`` would reverse a loop of dynamic length: refused in one line (with
    concrete gates, outside ``jit``, it works). Forward mode is recognised where
    ``kept_loop`` is traced: ``jax.jvp`` of a ``jax.jit``-ed (or ``jax.checkpoint``-ed)
    function that calls it gets JAX's "can't apply forward-mode autodiff (jvp) to a
    custom_vjp function"; put the ``jit`` (or ``checkpoint``) outside the ``jvp``.
    """
    gates = jnp.asarray(gates)
    if gates.ndim != 1 or gates.dtype != jnp.bool_:
        raise ValueError(f"kept_loop needs one bool gate per block, shape [n]; got "
                         f"{gates.dtype}{list(gates.shape)}.")
    _check_shared_gates(gates)
    n, probs = gates.shape[0], jnp.asarray(probs)  # a list of floats: one array, not n leaves
    for leaf in jax.tree_util.tree_leaves((params, stats, probs)):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != n:
            raise ValueError(f"kept_loop: every leaf of params, stats and probs must be "
                             f"stacked on axis 0 with {n} slots (one per gate); got "
                             f"shape {tuple(jnp.shape(leaf))}.")
    if isinstance(x, (bool, int, float, complex)):  # a Python number is one array too
        x = jnp.asarray(x)
    if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
        raise ValueError(f"kept_loop: x must be one array (the blocks' input and output); got "
                         f"{type(x).__name__}: pass a pytree's arrays concatenated, or use "
                         "implementation='skip'.")
    if n == 0:  # no block to run (a stack pruned to nothing): x as it is, as lax.scan gives
        return x, stats
    order = jnp.argsort(jnp.logical_not(gates), stable=True).astype(jnp.int32)  # kept first
    count = jnp.sum(gates.astype(jnp.int32))
    modes = _autodiff_modes((params, stats, x, probs))
    if modes[:1] == ["forward"]:  # jax.jvp / jax.jacfwd: JAX's own JVP of the plain loop
        _check_reversible(modes[1:], count)
        return _plain_loop(block_fn, params, stats, x, probs, order, count)
    return _loop(_Block(block_fn), params, stats, x, probs, order, count)


def _autodiff_modes(tree: Any) -> list[str]:
    """How each autodiff transformation differentiating a leaf of ``tree`` does it,
    innermost (the first to see the loop) first: ``'forward'`` (``jax.jvp``, ``jacfwd``,
    ``jax.linearize``, whose linear function is evaluated forward) or ``'reverse'``
    (``jax.grad``, ``vjp``). Read from the leaves' tracers; a tracer of a kind not known
    here gives none (the loop then runs as it did)."""
    owners, chains = set(), []
    for leaf in jax.tree_util.tree_leaves(tree):
        while isinstance(leaf, jax.core.Tracer):  # a tracer wraps those of outer traces
            owners.add(id(getattr(leaf, "_trace", None)))
            chain, trace = [], getattr(leaf, "_trace", None)
            while trace is not None:
                chain.append(trace)
                trace = getattr(trace, "parent_trace", None)
            chains.append(chain)
            leaf = getattr(leaf, "primal", getattr(leaf, "val", None))
    modes = []
    for trace in max(chains, key=len, default=[]):  # the innermost trace's, outwards
        if id(trace) not in owners:
            continue
        kind = type(trace).__name__  # JAX's internal classes, named here, not imported
        if kind == "LinearizeTrace":  # jax.linearize's own: its JVP runs forward
            modes.append("reverse" if getattr(trace, "is_vjp", True) else "forward")
        elif kind == "JVPTrace":  # a JVP under partial evaluation (no direct linearize): reverse
            parent = type(getattr(trace, "parent_trace", None)).__name__
            modes.append("reverse" if parent == "JaxprTrace" else "forward")
    return modes


def _check_reversible(outer_modes: list[str], count: Array) -> None:
    """ValueError where reverse mode would differentiate a loop of traced length (the
    loop's own passes, or the plain loop of a forward-mode derivative): JAX cannot, and its
    error suggests ``lax.scan``."""
    if "reverse" in outer_modes and isinstance(count, jax.core.Tracer):
        raise ValueError(
            "kept_loop: reverse mode (jax.grad, jax.vjp) of a derivative of the loop (grad of "
            "grad, grad of jvp) with gates traced under jit would reverse a loop of dynamic "
            "length, which JAX cannot; use forward over reverse (jax.hessian, jax.jvp or "
            "jax.jacfwd of jax.grad), or concrete gates outside jit.")


def _plain_loop(block_fn: BlockFn, params, stats, x, probs, order, count):
    """The kept blocks in one loop, without the loop's own VJP: what forward mode (and
    :func:`kept_loop` undifferentiated) runs."""
    def body(i, carry):
        x, stats = carry
        j = order[i]
        y, new_stats = block_fn(_slot(params, j), _slot(stats, j), x, probs[j])
        _check_block_output(x, y)
        return y, _put(stats, j, new_stats)

    return lax.fori_loop(0, count, body, (x, stats))


def _check_block_output(x: Array, y: Array) -> None:
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(f"kept_loop: a block must return its input's shape and dtype "
                         f"({x.dtype}{list(x.shape)}), got {y.dtype}{list(y.shape)}.")


def _check_shared_gates(gates: Array) -> None:
    """ValueError for gates that differ between ``shard_map`` devices: each device would run
    a loop of its own length, while a replicated parameter's gradient (or a BatchNorm synced
    across the devices) is summed across them inside the loop, once per block."""
    axes = ops.varying_axes(gates)
    if axes:
        raise ValueError(
            f"kept_loop: gates that differ between shard_map devices (they vary over mesh axes "
            f"{axes}, e.g. drawn from a key with jax.lax.axis_index folded in) would give each "
            "device a loop of its own length, and the sums across devices inside it would not "
            "match. Give every device the same gates (the same key), or use "
            "implementation='mask' for gates per device.")


class _Block:
    """``block_fn`` with room for the VJP's tree structure, which the forward pass learns
    while tracing and the backward pass needs to rebuild each block's VJP (a structure is
    not a JAX value, so it cannot travel with the residuals). One per :func:`kept_loop`
    call."""

    def __init__(self, fn: BlockFn):
        self.fn = fn
        self.vjp_tree = None
        # Whether the survival probabilities are differentiated (known while tracing the
        # forward rule): only then does each block's VJP take its probability, which may
        # store more (``f(x)`` for a branch scaled by 1 / p).
        self.prob_grad = False
        self.out_struct = None  # the output's type, for a zero cotangent

    def vjp(self, params, stats, x, prob):
        """``(y, new_stats, residual leaves)`` of one block; records the VJP's structure."""
        if self.prob_grad:
            y, vjp, new_stats = jax.vjp(lambda p, v, q: self.fn(p, stats, v, q), params, x,
                                        prob, has_aux=True)
        else:
            y, vjp, new_stats = jax.vjp(lambda p, v: self.fn(p, stats, v, prob), params, x,
                                        has_aux=True)
        leaves, self.vjp_tree = jax.tree_util.tree_flatten(vjp)
        return y, new_stats, leaves


def _slot(tree: Any, j: Array) -> Any:
    return jax.tree_util.tree_map(lambda a: lax.dynamic_index_in_dim(a, j, keepdims=False),
                                  tree)


def _buffer(struct: jax.ShapeDtypeStruct, n: int) -> Array:
    """Zeros for ``n`` slots of a residual shaped like ``struct``, typed as the residual
    is: a loop's carry must keep its type, and inside ``shard_map`` a residual computed from
    a per-device batch varies over the mesh axes (zeros made there do not), under explicit
    mesh axes it has a sharding."""
    zeros = ops.zeros_like_output(struct)
    return jnp.broadcast_to(zeros, (n,) + zeros.shape)


def _put(tree: Any, j: Array, values: Any) -> Any:
    return jax.tree_util.tree_map(lambda a, v: a.at[j].set(v.astype(a.dtype)), tree, values)


def _forward(block: _Block, params, stats, x, probs, order, count):
    n = order.shape[0]
    shapes = jax.eval_shape(block.vjp, _slot(params, 0), _slot(stats, 0), x, probs[0])
    residuals = [_buffer(s, n) for s in shapes[2]]

    def body(i, carry):
        x, stats, residuals = carry
        j = order[i]
        y, new_stats, leaves = block.vjp(_slot(params, j), _slot(stats, j), x, probs[j])
        _check_block_output(x, y)
        residuals = [r.at[i].set(leaf) for r, leaf in zip(residuals, leaves)]
        return y, _put(stats, j, new_stats), residuals

    y, stats, residuals = lax.fori_loop(0, count, body, (x, stats, residuals))
    return (y, stats), (residuals, params, probs, order, count)


def _forward_rule(block: _Block, params, stats, x, probs, order, count):
    """The forward rule, given each leaf as a ``CustomVJPPrimal`` (``symbolic_zeros``): it
    learns whether ``probs`` is differentiated."""
    block.prob_grad = bool(probs.perturbed)
    value = lambda t: jax.tree_util.tree_map(lambda v: v.value, t)
    params, stats, x, probs, order, count = map(value, (params, stats, x, probs, order, count))
    # Differentiated again in reverse mode (grad of grad): the loops below would be.
    _check_reversible(_autodiff_modes((params, stats, x, probs)), count)
    block.out_struct = _typed_struct(x)
    return _forward(block, params, stats, x, probs, order, count)


def _typed_struct(x: Array) -> jax.ShapeDtypeStruct:
    """``x``'s shape, dtype, explicit sharding and ``shard_map`` varying axes, for zeros of
    its type (:func:`ops.zeros_like_output`)."""
    manual = getattr(jax.typeof(x), "manual_axis_type", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=ops.explicit_sharding(x),
                                manual_axis_type=manual)


def _zero_cotangent(block: _Block, t: Any) -> Array:
    """The output's cotangent as an array: zeros for a symbolic zero (the output unused),
    typed as the output, which is typed as ``x`` (a loop's carry keeps its type): its
    explicit sharding, and varying over the ``shard_map`` axes ``x`` varies over."""
    if not isinstance(t, SymbolicZero):
        return t
    return ops.zeros_like_output(block.out_struct)


def _backward(block: _Block, saved, cotangents):
    residuals, params, probs, order, count = saved
    _warn_if_statistics_differentiated(cotangents[1])
    dy = _zero_cotangent(block, cotangents[0])  # statistics carry no gradient

    def body(k, carry):
        dx, dparams, dprobs = carry
        i = count - 1 - k  # the kept blocks in reverse
        vjp = jax.tree_util.tree_unflatten(block.vjp_tree, [r[i] for r in residuals])
        if block.prob_grad:
            dp, dx, dq = vjp(dx)
            dprobs = dprobs.at[order[i]].add(dq.astype(dprobs.dtype))
        else:
            dp, dx = vjp(dx)
        dparams = jax.tree_util.tree_map(_accumulate(order[i]), dparams, dp)
        return dx, dparams, dprobs

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    dprobs = jnp.zeros_like(probs) if block.prob_grad else None  # None: no carry
    dx, dparams, dprobs = lax.fori_loop(0, count, body, (dy, zeros, dprobs))
    # An integer or bool leaf (a block's index, say) has no gradient: float0, as JAX's own.
    dparams = jax.tree_util.tree_map(
        lambda a, d: d if jnp.issubdtype(a.dtype, jnp.inexact)
        else np.zeros(a.shape, jax.dtypes.float0), params, dparams)
    return dparams, None, dx, dprobs, None, None


def _warn_if_statistics_differentiated(cotangent: Any) -> None:
    """Warns where the returned statistics are differentiated (a loss on them, ``jacrev``
    of them): their cotangent is dropped, so that part of the gradient is missing. Their
    cotangent is a symbolic zero where they are not (an auxiliary output, ``has_aux``)."""
    leaves = jax.tree_util.tree_leaves(cotangent,
                                       is_leaf=lambda t: isinstance(t, SymbolicZero))
    # An integer leaf's cotangent (float0) is no gradient either.
    if all(isinstance(t, SymbolicZero) or t.dtype == jax.dtypes.float0 for t in leaves):
        return
    warnings.warn(
        "kept_loop: the statistics it returns are differentiated (a loss on them, or jacrev "
        "of them), but they carry no gradient through the loop: that part of the gradient "
        "is zero. Differentiate the blocks' output only (return the statistics as an "
        "auxiliary output, has_aux=True, or stop_gradient them), or use "
        "implementation='skip' or 'mask', which differentiate them.", stacklevel=2)


def _accumulate(j: Array) -> Callable[[Array, Array], Array]:
    """Adds a block's parameter gradient into slot ``j``; a float0 one (an integer or bool
    leaf's) is no gradient, and adding it fails."""
    return lambda a, v: a if v.dtype == jax.dtypes.float0 else a.at[j].add(v)


def _loop_primal(block, params, stats, x, probs, order, count):
    return _forward(block, params, stats, x, probs, order, count)[0]


_loop = jax.custom_vjp(_loop_primal, nondiff_argnums=(0,))
_loop.defvjp(_forward_rule, _backward, symbolic_zeros=True)
