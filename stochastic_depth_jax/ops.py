"""The framework-free stochastic-depth op: a residual branch under a Bernoulli gate.

Semantics (Huang et al., 2016, Sec. 3):

* ``mode='batch'`` (the paper): one gate b ~ Bernoulli(p) per block per mini-batch. With
  ``implementation='skip'`` (default) a closed gate means the branch is *not computed*,
  neither forward nor backward: the op is a ``lax.cond`` on a scalar predicate, and only the
  taken branch runs. ``implementation='mask'`` computes the branch and multiplies by the
  gate, which is what timm/torchvision/Keras do; it exists for comparison.
* ``mode='sample'`` (drop path): each example has its own gate. With
  ``implementation='skip'`` (default) the branch runs only on a random subset of exactly
  ``k`` examples, drawn without replacement (as DINOv2's block): the op gathers the subset,
  runs the branch on ``[k, ...]``, and scatters the outputs back into zeros (or, given
  ``shortcut=``, adds them into the shortcut in one scatter-add), so a dropped example gets
  exactly zero (only the shortcut) and costs no branch compute. See
  :func:`subset_size` for ``k`` and :func:`draw_subset` for ``groups`` (per-shard subsets).
  ``implementation='mask'`` is timm's drop path: independent Bernoulli(p) gates, branch
  computed for the whole batch, then multiplied.
* ``scaling='test'`` (the paper, Eq. 5): training returns ``b f(x)``, evaluation ``p f(x)``.
  ``scaling='train'`` (inverted, as timm): training returns ``b f(x) / p``, evaluation
  ``f(x)``. Both have the same expectation at train and test time. For subsets the kept
  fraction is ``k / n`` rather than p (rounding, see :func:`subset_size`); ``'train'``
  scales kept examples by ``n / k`` (DINOv2's ``B / k``), so the training expectation is
  exactly f(x); ``'test'`` evaluation scales by the nominal p.
* A branch that normalises over the batch (BatchNorm) sees only the subset in
  ``'sample'``/``'skip'``: its batch statistics (and running averages) are over the
  ``groups * k`` kept examples.

Under ``vmap`` with a per-example key, ``lax.cond`` becomes a ``select`` and both branches
run; use ``mode='sample'`` for per-example gates instead.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MODES",
    "SCALINGS",
    "IMPLEMENTATIONS",
    "draw_gates",
    "draw_gate",
    "subset_size",
    "draw_subset",
    "subset_mask",
    "subset_branch",
    "naming_whole_arguments",
    "with_shortcut",
    "zeros_like_output",
    "explicit_sharding",
    "varying_axes",
    "check_shared_gate",
    "batch_size_of",
    "train_scale",
    "eval_scale",
    "gated_branch",
    "stochastic_depth",
    "validate_options",
    "check_survival_prob",
    "check_survival_probs",
    "is_static_one",
    "is_concrete",
    "check_deterministic",
    "TracedFlagError",
    "check_gate",
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
    """Raises ValueError for a survival probability that is not a scalar in (0, 1].

    Python and NumPy scalars, 0-d arrays and concrete (non-traced) JAX scalars are
    range-checked; traced values cannot be inspected under ``jit`` (the op, the wrappers
    and :func:`gated_branch` turn one out of range into NaN outputs, :func:`checked_prob`).
    Lists, tuples, strings, None, bools (Python, NumPy or 0-d arrays such as
    ``jnp.array(True)``, traced ones too), complex numbers and arrays with dimensions (a whole
    schedule) are refused: one call gates one block with one probability."""
    if not is_real_number(p):
        raise ValueError(
            f"survival_prob must be a float in (0, 1], got {p!r} ({_kind_text(p)}); pass one "
            "block's probability, e.g. survival_prob=0.8 (a schedule gives one per block: "
            "sdj.linear_decay(L, 0.5)[l - 1])."
        )
    if (p.ndim if isinstance(p, jax.Array) else np.ndim(p)) > 0:
        raise ValueError(
            f"survival_prob must be one block's survival probability (a scalar), got an array "
            f"of shape {tuple(np.shape(p))}; index the schedule per block, e.g. "
            "survival_prob=sdj.linear_decay(L, 0.5)[l - 1]."
        )
    if not is_concrete(p):
        return  # traced values are the caller's to check
    v = float(np.asarray(p, dtype=np.float64))
    if math.isnan(v) or not 0.0 < v <= 1.0:
        raise ValueError(f"survival_prob must be in (0, 1], got {v!r}.")


def is_real_number(value: Any) -> bool:
    """True for a Python int or float, or a value with an integer or floating dtype (NumPy or
    JAX, concrete or traced, any shape). False for bools, whose ``float()`` is 1.0 or 0.0:
    ``jnp.array(True)`` or ``np.array(True)`` as a survival probability kept the block always
    (a traced one too), silently; for text, complex numbers (``float()`` drops the imaginary
    part), None, lists and tuples."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, float)):
        return True
    dtype = getattr(value, "dtype", None)
    if dtype is None or not isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return False
    return bool(jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))


def _kind_text(value: Any) -> str:
    """The type of ``value`` for a message, with its dtype where it has one (``ArrayImpl``
    alone would not say that ``jnp.array(True)`` is a bool)."""
    dtype = getattr(value, "dtype", None)
    return type(value).__name__ + (f", dtype {dtype}" if dtype is not None else "")


def check_survival_probs(probs: Any) -> None:
    """Raises ValueError unless every entry of a schedule known on the host is in (0, 1].

    A schedule of drop rates (``drop_path_rates``, 0 at the first block) passed where
    survival probabilities are meant would otherwise drop those blocks (almost) always.
    Traced schedules (and arrays spanning other hosts) are left to the caller, as in
    :func:`check_survival_prob`."""
    check_probs_are_numbers(probs, "survival probabilities")
    if isinstance(probs, jax.Array) and not is_concrete(probs):
        return
    try:
        values = np.asarray(probs, dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced values are the caller's to check
    bad = np.flatnonzero(~((values > 0.0) & (values <= 1.0)))  # NaN is out of range too
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"survival probabilities must be in (0, 1], got {float(values.flat[i])!r} at index "
            f"{i}; drop rates (sdj.drop_path_rates) are 1 - p: pass 1 - rates.")


def check_probs_are_numbers(probs: Any, what: str) -> None:
    """ValueError for a schedule that holds bools, text or complex numbers: a bool mask
    (gates, a pruned model's ``keep``) passed as survival probabilities read True as 1.0,
    every such block kept always, silently (a traced one too: its dtype is known while
    tracing); text ('0.5') was parsed as numbers; a complex one lost its imaginary part."""
    try:
        dtype = probs.dtype if isinstance(probs, jax.Array) else np.asarray(probs).dtype
        kind = np.dtype(dtype).kind
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
            TypeError, ValueError):
        return  # ragged, or not an array: the caller's other checks name it
    if kind in "bUSc":
        got = {"b": "bools", "c": "complex numbers"}.get(kind, "text")
        raise ValueError(f"{what} must be numbers in (0, 1], got {got} "
                         f"({dtype}); a gate mask or keep= is not a "
                         "schedule: e.g. sdj.linear_decay(L, 0.5).")


def check_drop_rate(rate: Any, name: str = "DropPath") -> float:
    """``rate`` (a ``DropPath``'s, Linen or NNX: 1 - p) as a float, or one line saying what
    is wrong: a concrete number in [0, 1) is required (a module field is fixed when the
    model is built; a rate that varies under ``jit``, e.g. a schedule, goes in the call's
    ``survival_prob=``, as 1 - rate). ``name``: the class the line names (a subclass's)."""
    if isinstance(rate, jax.core.Tracer):
        raise ValueError(f"{name} rate must be known when the model is built, got a traced "
                         "value; pass a rate that varies under jit to the call instead, as "
                         "survival_prob=1 - rate.")
    if not is_real_number(rate) or not is_concrete(rate) or np.ndim(rate) \
            or not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"{name} rate must be a float in [0, 1), got {rate!r}; pass one "
                         "branch's drop rate (e.g. rate=0.1).")
    return float(rate)


def drop_rate_text(survival_prob: Any) -> str:
    """``1 - survival_prob`` for a message about ``DropPath`` (``'1 - p'`` where that is not
    a number)."""
    try:
        return f"{1.0 - float(survival_prob):g}"
    except (TypeError, ValueError):
        return "1 - p"


# Names other libraries give the drop rate (timm, torchvision, Keras).
RATE_NAMES = ("rate", "drop_rate", "drop_path_rate", "drop_prob")


def rate_argument_error(name: str, key: str, value: Any, *,
                        takes_rate: bool) -> TypeError | None:
    """The one-line TypeError for a drop rate given to the wrapper ``name`` as the unknown
    keyword ``key`` (one of :data:`RATE_NAMES`): ``StochasticDepth`` takes the survival
    probability, ``DropPath`` (``takes_rate``: it or a subclass of it, which refuses
    ``survival_prob``) the rate as ``rate=``; None for any other keyword. Shared by the
    Linen and NNX wrappers."""
    if key not in RATE_NAMES:
        return None
    rate, keep, each = _rate_text(value), drop_rate_text(value), ""
    given = f"{key}={rate}"
    if np.ndim(value) > 0:  # a whole schedule (its repr spans lines): one rate a module
        rate, keep, each = "r", "1 - r", " for each layer's rate r (one module a layer)"
        given = f"{key}= a schedule of {np.size(value)} rates"
    if takes_rate:
        return TypeError(f"{name} takes the drop rate as rate=, not {key}=: "
                         f"{name}(branch, rate={rate}){each}.")
    return TypeError(f"{name} takes survival_prob (the probability of keeping the branch), "
                     f"not a drop rate ({given}): {name}(branch, survival_prob={keep}), or "
                     f"DropPath(branch, rate={rate}) for drop path with timm's "
                     f"defaults{each}.")


def _rate_text(rate: Any) -> str:
    """A scalar rate as a short number (``0.1``, not ``Array(0.1, dtype=float32)``)."""
    if isinstance(rate, (int, float, np.generic, np.ndarray, jax.Array)) and not isinstance(
            rate, bool):
        try:
            return f"{float(rate):g}"
        except (TypeError, ValueError):  # a traced rate
            pass
    return repr(rate)


def checked_prob(p: Any) -> Any:
    """``p`` as it is where it is known on the host (:func:`check_survival_prob` refuses it
    out of (0, 1]); a traced ``p`` out of (0, 1], or NaN, becomes NaN, with scalar ops only.

    A NaN p draws closed gates and scales by NaN, and a closed batch-mode gate gives NaN
    (:func:`closed_fill`), so a bad rate that arrives traced (a drop-rate schedule, 0 at the
    first block, scanned in as survival probabilities) turns the loss NaN at the first
    training step, instead of training with that block never kept (with ``'mask'`` the
    gate gives NaN, :func:`masked`)."""
    if is_concrete(p):
        return p
    return jnp.where((p > 0) & (p <= 1), p, jnp.nan)


def closed_fill(p: Any) -> Any:
    """What a skipped branch's zeros get added (:func:`zeros_like_output`): None for a p
    known on the host; for a traced p (:func:`checked_prob`'s) a scalar, 0, or NaN where p
    is out of range. Also added to a mask's gate (:func:`masked`)."""
    return None if is_concrete(p) else 0.0 * p


def is_concrete(value: Any) -> bool:
    """True for a value known on the host: a Python or NumPy number or array, or a JAX array
    that is not traced (e.g. ``jnp.float32(0.9)`` outside ``jit``)."""
    if isinstance(value, (bool, int, float, np.ndarray, np.generic)):
        return True
    return isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer) \
        and value.is_fully_addressable


def is_static_one(p: Any) -> bool:
    """True when ``p`` is a concrete 1.0 (see :func:`is_concrete`): such a block never draws
    a key."""
    if is_concrete(p) and np.ndim(p) == 0 and not isinstance(p, (bool, np.bool_)):
        return float(np.asarray(p, dtype=np.float64)) == 1.0
    return False


def key_shared_across_scan(key: Any, varying: Any) -> bool:
    """True when ``varying`` (e.g. a layer's parameter) is a value of a ``lax.scan``'s body
    (``nn.scan`` / ``nnx.scan`` over stacked layers: it differs from one iteration to the
    next) while ``key`` comes from outside that scan, so every iteration would draw the same
    gates.

    Read off the traces at trace time, at no cost when running. A value that ``grad`` or
    ``vmap`` carries inside the body is looked through to the value it carries: parameters
    closed over by a scan over microbatches (gradient accumulation) are the same in every
    iteration, and the one key is then one gate for the whole batch. Where the traces cannot
    be read (a concrete ``varying``; a transform between the scan and the layer, such as
    ``nn.remat`` or ``nn.cond``, that takes the value in as its own argument) it answers
    False."""
    trace = getattr(varying, "_trace", None)
    while trace is not None and getattr(trace, "frame", None) is None:
        # grad's and vmap's tracers carry the value they wrap (primal, val): look through
        varying = getattr(varying, "primal", getattr(varying, "val", None))
        trace = getattr(varying, "_trace", None)
    info = getattr(getattr(trace, "frame", None), "debug_info", None)
    if key is None or getattr(info, "traced_for", None) != "scan":
        return False
    outer = getattr(key, "_trace", None)  # None: a concrete key, outside every trace
    trace = getattr(trace, "parent_trace", None)
    while trace is not None and trace is not outer:
        trace = getattr(trace, "parent_trace", None)
    return trace is outer


class TracedFlagError(TypeError):
    """A ``deterministic`` / ``train`` / ``stochastic`` flag that arrived traced: its own
    class, so that a caller that knows why it was traced (the stages' refusal of
    ``nn.jit(BasicBlock)``) can name that cause instead; a ``TypeError`` like JAX's own."""


def check_deterministic(deterministic: Any, *, name: str = "deterministic") -> None:
    """Raises :class:`TracedFlagError` (a TypeError) for a traced ``deterministic`` flag, and
    a TypeError for one that is not a bool. ``name``: the argument's name in the caller's
    signature (``'train'``, ``'stochastic'``), whose meaning of True the message says:
    ``train=True`` is what ``deterministic=False`` is.

    Training and evaluation are different programs (a gate is drawn or not), so the flag is
    chosen while tracing; a ``train`` flag passed into ``jax.jit`` as an ordinary argument
    arrives here as a tracer, which Python's ``if`` cannot read. A flag that is not a bool
    would be read by Python's truth value: ``None`` (a user module's unset
    ``deterministic: bool | None = None`` field, passed on) would silently train, and the
    string ``'False'`` evaluate."""
    if isinstance(deterministic, jax.core.Tracer):
        raise TracedFlagError(
            "deterministic (or train) must be a Python bool, known while tracing, got a traced "
            "value: mark the flag static, e.g. jax.jit(step, static_argnames='train') or "
            "nnx.jit(..., static_argnames='train'), or switch NNX modules with "
            "model.train() / model.eval(); nn.remat and jax.checkpoint trace keyword "
            "arguments, so around the Linen wrapper rematerialise its branch instead: "
            "StochasticDepth(nn.remat(MyBranch)(parent=None)), or StochasticDepth(remat='full') "
            "(batch-mode skipping only: drop path and 'mask' run the branch as it is)."
        )
    if not _is_bool(deterministic):
        use = _FLAG_USES.get(name, "pass True or False")
        raise TypeError(f"{name} must be a bool, got {deterministic!r} "
                        f"({type(deterministic).__name__}): {use}.")


# What True and False mean, by the flag's name (check_deterministic's message).
_FLAG_USES = {
    "deterministic": "pass True for evaluation, False for training (e.g. deterministic=not "
                     "train)",
    "train": "pass True for training, False for evaluation",
    "stochastic": "pass True to gate the blocks as in training, False to run them all, or "
                  "None (the default) to follow train",
}


def _is_bool(flag: Any) -> bool:
    """True for a Python or NumPy bool, or a concrete 0-d bool array (``jnp.bool_(True)``)."""
    if isinstance(flag, (bool, np.bool_)):
        return True
    return isinstance(flag, (np.ndarray, jax.Array)) and flag.dtype == np.bool_ \
        and flag.ndim == 0


def check_gate(gate: Array, mode: str, deterministic: bool = False) -> None:
    """TypeError unless ``gate`` has a form :func:`gated_branch` takes for ``mode``.

    ``'batch'`` takes a bool scalar; ``'sample'`` a bool ``[batch]`` mask or integer subset
    indices ``[groups, k]``. An integer 0/1 gate (NumPy's binomial draws ints) would be taken
    for something else, so it is refused with the fix. With ``deterministic`` (a gated
    evaluation) subset indices are refused too: they are training gates."""
    dtype = jnp.result_type(gate)
    if mode == "batch" and (dtype != jnp.bool_ or jnp.ndim(gate)):
        raise TypeError(
            f"A mode='batch' gate must be a bool scalar (one per block), got {dtype} of shape "
            f"{tuple(jnp.shape(gate))}; pass a bool gate, e.g. gate.astype(bool) (for a "
            "model, gates=gates.astype(bool) with one entry per block).")
    if mode == "sample" and dtype != jnp.bool_ and not (
            jnp.issubdtype(dtype, jnp.integer) and jnp.ndim(gate) == 2):
        raise TypeError(
            f"A mode='sample' gate must be a bool [batch] mask or int32 subset indices "
            f"[groups, k] (ops.draw_gate), got {dtype} of shape {tuple(jnp.shape(gate))}; "
            "for a 0/1 mask pass gate.astype(bool).")
    if deterministic and jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            "StochasticDepth got subset indices as gate with deterministic=True; subsets "
            "are training gates. For a fixed sub-network at evaluation pass a bool gate "
            "(a scalar, or [batch] with mode='sample'), or no gate."
        )


def draw_gates(
    key: Array, survival_probs: Array, *, mode: str = "batch", batch_size: int | None = None
) -> Array:
    """Draws Bernoulli survival gates for several blocks from one key.

    Args:
      key: a JAX PRNG key.
      survival_probs: float ``[num_blocks]`` survival probabilities p_l.
      mode: ``'batch'`` gives bool ``[num_blocks]``; ``'sample'`` gives bool
        ``[num_blocks, batch_size]`` (one Bernoulli gate per example, applied as a mask:
        subsets have a different static size per block, see :func:`draw_gate`).
      batch_size: required for ``mode='sample'``.

    Returns:
      bool gates, ``True`` where the block survives.
    """
    validate_options(mode, "test")
    check_key(key)
    check_survival_probs(survival_probs)
    probs = jnp.asarray(survival_probs, dtype=jnp.float32)
    if mode == "batch":
        return jax.random.bernoulli(key, probs, probs.shape)
    if batch_size is None:
        raise ValueError("mode='sample' needs batch_size to draw one gate per example.")
    shape = probs.shape + (batch_size,)
    return jax.random.bernoulli(key, probs[..., None], shape)


def _check_groups(batch_size: int, groups: int) -> int:
    """Returns the group size ``batch_size // groups``; raises ValueError if it is not whole."""
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be an integer >= 1, got {groups!r}.")
    if batch_size % groups:
        raise ValueError(
            f"The batch of {batch_size} examples does not split into groups={groups} equal "
            f"groups for drop-path subsets; use a batch size divisible by {groups} (or fewer "
            f"groups)."
        )
    return batch_size // groups


def check_batch_axis(batch_axis: Any) -> None:
    """ValueError unless ``batch_axis`` is a non-negative int (a negative axis would mean
    different axes for a branch input and an output of another rank)."""
    if isinstance(batch_axis, bool) or not isinstance(batch_axis, (int, np.integer)) \
            or batch_axis < 0:
        raise ValueError(f"batch_axis must be a non-negative integer axis (e.g. 1 for "
                         f"[tokens, batch, width]), got {batch_axis!r}.")


def batch_size_of(x: Any, batch_axis: int = 0) -> int:
    """The batch size of ``x`` (an array or a pytree of arrays) along ``batch_axis``.

    Raises ValueError when a leaf has no such axis, or when leaves disagree: per-example
    gates need every leaf to carry the same batch axis.
    """
    check_batch_axis(batch_axis)
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves:
        raise ValueError("mode='sample' gates each example, but x has no arrays; pass the "
                         "branch input (an array, or a pytree of arrays with a batch axis).")
    sizes = set()
    for leaf in leaves:
        ndim = jnp.ndim(leaf)
        if not batch_axis < ndim:
            raise ValueError(
                f"mode='sample' gates each example, so x needs a batch axis at "
                f"batch_axis={batch_axis}, but an input of shape {jnp.shape(leaf)} has none; "
                "give x a batch axis (e.g. x[None]), set batch_axis, or use mode='batch' for "
                "one gate per call.")
        sizes.add(jnp.shape(leaf)[batch_axis])
    if len(sizes) > 1:
        raise ValueError(
            f"mode='sample': the arrays of x have different sizes {sorted(sizes)} along "
            f"batch_axis={batch_axis}; every leaf needs the same batch axis (move it there, or "
            "pass the per-example arrays only).")
    return sizes.pop()


def _static_prob(survival_prob: Any) -> float:
    """``survival_prob`` as a Python float; ValueError if it is traced (k must be static)."""
    try:
        p = float(survival_prob)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(
            "mode='sample' with implementation='skip' sizes its subset from survival_prob, "
            f"which must be a static Python float, got {survival_prob!r}. A per-layer rate is "
            "traced inside nn.scan / lax.scan / nnx.scan: unroll the blocks (a Python loop), "
            "scan only blocks that share one rate (pass it as a float), or use "
            "implementation='mask' (Bernoulli gates, which take a traced rate)."
        ) from None
    check_survival_prob(p)
    return p


def subset_size(batch_size: int, survival_prob: float, groups: int = 1) -> int:
    """Examples kept per group: ``k = min(n, max(1, floor(n p + 1/2)))``, ``n = B / groups``.

    The rounding is to the nearest integer (DINOv2 rounds down: ``max(1, int(B p))``), so the
    kept fraction ``k / n`` is within ``1 / (2 n)`` of p, except that at least one example
    per group always runs the branch. ``k == n`` means nothing is dropped.

    Args:
      batch_size: B, the (global) batch size.
      survival_prob: p in (0, 1], a static float.
      groups: the batch is split into this many contiguous groups of ``n`` examples, each
        keeping exactly ``k`` (``groups * k`` in all).

    Returns:
      k, a Python int in ``[1, n]``.
    """
    if jax.export.is_symbolic_dim(batch_size):
        # A symbolic dimension (jax.export with shape polymorphism) cannot size a subset;
        # any concrete size (a NumPy or JAX integer too) can, as before.
        raise ValueError(
            f"mode='sample' with implementation='skip' needs a static batch size (the subset "
            f"size k is a shape), got the symbolic dimension {batch_size!r}: export with a "
            f"concrete batch size, or use implementation='mask'.")
    n = _check_groups(batch_size, groups)
    p = _static_prob(survival_prob)
    return min(n, max(1, math.floor(n * p + 0.5)))


def draw_subset(key: Array, batch_size: int, survival_prob: float, groups: int = 1) -> Array:
    """Draws the examples that run the branch: ``k`` per group, without replacement.

    Each of the ``groups`` contiguous groups of ``n = batch_size / groups`` examples keeps a
    uniformly random subset of exactly ``k = subset_size(batch_size, survival_prob, groups)``
    examples (the ``k`` smallest of ``n`` uniform numbers). Each example is kept with
    probability exactly ``k / n``.

    Groups exist for sharded batches: with ``groups`` a multiple of the number of data shards,
    every group lies on one device, and choosing, gathering and scattering never move
    activations between devices. Under explicit mesh axes (``AxisType.Explicit``) the groups
    are sharded as the batch, which needs ``groups`` to be such a multiple. The subset is a
    function of ``(key, batch_size, p, groups)`` only, not of the device count.

    Returns:
      int32 ``[groups, k]``: sorted indices within each group (example ``g * n + i`` of the
      batch for entry ``i`` of row ``g``).
    """
    check_key(key)
    n = _check_groups(batch_size, groups)
    k = subset_size(batch_size, survival_prob, groups)
    _warn_if_never_dropped(n, k, _static_prob(survival_prob), groups)
    # float32 scores whatever jax_enable_x64 says: the same subset from the same key.
    scores = jax.random.uniform(key, (groups, n), jnp.float32)
    idx = jnp.argsort(scores, axis=-1)[:, :k]
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def check_key(key: Any) -> None:
    """TypeError unless ``key`` is one PRNG key: typed (``jax.random.key``, any
    implementation), or raw uint32 ``[2]`` (``jax.random.PRNGKey``; ``[4]`` for ``'rbg'``).
    An integer seed, or a seed array, reached JAX's "invalid PRNG key data", which does not
    say that a key was wanted."""
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype == jnp.uint32 and getattr(key, "shape", None) in ((2,), (4,))
    if not (typed or raw):
        raise TypeError(f"key must be a PRNG key, e.g. jax.random.fold_in(jax.random.key(seed), "
                        f"step), got {key!r}.")


def _warn_if_never_dropped(n: int, k: int, p: float, groups: int) -> None:
    """Warns when a drop rate of 10% or more rounds to no drop at all (groups too small)."""
    if k == n and 1.0 - p >= 0.1 - 1e-9:
        warnings.warn(
            f"Drop path is off for a branch with survival_prob={p:g}: each of the {groups} "
            f"group(s) has {n} example(s), and k = round({n} x {p:g}) keeps all of them, every "
            f"step. Use more examples per group (a larger batch or fewer groups), or "
            f"implementation='mask' for independent Bernoulli gates.",
            stacklevel=3,
        )


def subset_mask(indices: Array, batch_size: int) -> Array:
    """The bool ``[batch_size]`` gate of a subset: True for examples in ``indices [G, k]``."""
    groups = indices.shape[0]
    n = _check_groups(batch_size, groups)
    rows = jax.vmap(lambda i: jnp.zeros((n,), bool).at[i].set(True))(indices)
    return rows.reshape(batch_size)


def _check_subset_rows(indices: Any, n: int) -> None:
    """Refuses concrete subset indices that break the gather/scatter's contract (each row
    sorted, without repeats, in [0, n)): XLA is told so, and other indices give undefined
    results. Traced ones (under ``jit``) cannot be checked."""
    if not is_concrete(indices):
        return
    # Signed and wide: for unsigned indices, 1 - 3 would wrap to a large positive difference.
    rows = np.asarray(indices).astype(np.int64)
    if rows.size and not (np.all(np.diff(rows, axis=-1) > 0) and rows.min() >= 0
                          and rows.max() < n):
        raise ValueError(
            f"Subset indices must be sorted within each row, without repeats, and in [0, {n}) "
            f"(got {rows.tolist() if rows.size <= 16 else 'other indices'}): draw them with "
            "ops.draw_subset, or pass jnp.sort(indices, axis=-1) of distinct indices.")


def subset_branch(branch: Callable[[Array], Array], x: Array, indices: Array,
                  factor: Any = 1.0, shortcut: Array | None = None,
                  batch_axis: int = 0) -> Array:
    """Runs ``branch`` on the subset ``indices`` of ``x`` and scatters it back.

    Args:
      branch: ``[m, ...] -> [m, ...out]``, applied once to the ``groups * k`` kept examples.
      x: ``[batch, ...]`` (or a pytree of such arrays; the branch then takes and returns
        pytrees, every leaf with the batch axis).
      indices: int ``[groups, k]`` from :func:`draw_subset`: within each row sorted and
        without repeats (the gather and scatter are told so, which allows XLA to skip atomic
        updates; other indices give undefined results).
      factor: multiplies the kept outputs (``n / k`` for ``scaling='train'``).
      shortcut: optional ``[batch, ...out]``: the kept outputs are added into it in one
        scatter-add (DINOv2's ``index_add``) instead of being scattered into zeros and added
        afterwards, which saves a full-size temporary and one pass over the activations.
      batch_axis: the axis of ``x`` (and of the branch output) that indexes examples, e.g. 1
        for ``[tokens, batch, width]``; the branch sees its input in that layout. Other than 0
        it costs a transpose of the input and output on each side of the gather and scatter.

    Returns:
      ``[batch, ...out]``: ``factor * branch(x[i])`` for kept examples, exactly 0 elsewhere
      (plus ``shortcut`` when given), with a zero gradient through the branch for dropped
      examples. The gather and scatter act within each group (batched over the group axis),
      so they stay local to a data shard.
    """
    tree_map = jax.tree_util.tree_map
    batch = batch_size_of(x, batch_axis)
    if batch_axis != 0:  # gather and scatter along axis 0; the branch sees the user's layout
        front = lambda t: tree_map(lambda v: jnp.moveaxis(v, batch_axis, 0), t)
        back = lambda t: tree_map(lambda v: jnp.moveaxis(v, 0, batch_axis), t)
        out = subset_branch(lambda v: front(branch(back(v))), front(x), indices, factor,
                            None if shortcut is None else front(shortcut))
        return back(out)
    if isinstance(indices, (list, tuple)):
        indices = np.asarray(indices)
    if np.ndim(indices) != 2:
        raise ValueError(f"Subset indices must be int [groups, k] (ops.draw_subset's); got "
                         f"shape {tuple(np.shape(indices))}: for one group pass indices[None].")
    groups, k = indices.shape
    n = _check_groups(batch, groups)
    if k > n:
        raise ValueError(
            f"Subset indices of shape {tuple(indices.shape)} keep k={k} examples per group, "
            f"but each of the {groups} group(s) of the batch of {batch} has only n={n}; "
            f"draw them for this batch: ops.draw_subset(key, {batch}, p, groups={groups}).")
    if k == n:  # nothing dropped: no gather, no scatter
        return with_shortcut(scaled(branch(x), factor), shortcut)
    _check_subset_rows(indices, n)
    hints = dict(indices_are_sorted=True, unique_indices=True)  # draw_subset's contract
    take = jax.vmap(lambda v, i: v.at[i].get(**hints))
    picked = tree_map(lambda v: _merge_groups(take(_split_groups(v, groups),
                                                   _group_indices(indices, v))), x)
    y = scaled(branch(picked), factor)
    if shortcut is not None:
        _check_shortcut(shortcut, tree_map(
            lambda v: jax.ShapeDtypeStruct((batch,) + v.shape[1:], v.dtype), y))

    def scatter(v, s=None):
        vg, ig = _split_groups(v, groups), _group_indices(indices, v)
        if s is None:
            out = jax.vmap(
                lambda a, i: jnp.zeros((n,) + a.shape[1:], a.dtype).at[i].set(a, **hints))(
                vg, ig)
        else:
            dtype = jnp.result_type(s, v)  # as ``shortcut + y`` would promote
            sg = _split_groups(s.astype(dtype), groups)
            out = jax.vmap(lambda t, a, i: t.at[i].add(a.astype(dtype), **hints))(sg, vg, ig)
        return _merge_groups(out)

    return tree_map(scatter, y) if shortcut is None else tree_map(scatter, y, shortcut)


def naming_whole_arguments(branch: Callable[[Any], Any], x: Any, args: tuple, kwargs: dict,
                           batch_axis: int = 0) -> Callable[[Any], Any]:
    """``branch`` (a wrapper's call with ``args`` / ``kwargs`` bound), failing in one line
    when it fails on a drop-path subset of ``x`` while another argument has the whole batch.

    A subset gathers only ``x``: the other arguments reach the branch as they are, so a
    per-example one (an attention mask) meets ``k`` examples of ``x`` and breaks deep in the
    branch (a broadcasting error). Errors of a full-batch call, with no such argument, or
    that do not name both sizes (a mismatch of the two prints both shapes; any other error
    of the branch, e.g. a missing rng, is the user's own) pass through unchanged.
    """
    batch = batch_size_of(x, batch_axis)

    def call(v: Any) -> Any:
        try:
            return branch(v)
        except (TypeError, ValueError) as e:
            kept = batch_size_of(v, batch_axis)
            whole = _whole_batch_arguments(args, kwargs, batch, batch_axis)
            if kept == batch or not whole or not _names_sizes(str(e), kept, batch):
                raise
            raise ValueError(
                f"The branch failed on the {kept} of {batch} examples a drop-path subset "
                f"keeps ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                f"argument {', '.join(whole)} has the whole batch of {batch} along "
                f"batch_axis={batch_axis}, but subsets gather only x: pass per-example "
                "arguments inside x (sd((x, mask)), the branch taking the pair), or use "
                "implementation='mask'.") from e

    return call


def _names_sizes(message: str, *sizes: int) -> bool:
    """Whether ``message`` names each of ``sizes`` as a number (a shape's entry): an argument
    of the whole batch beside a subset of ``x`` fails with both sizes in the message, while an
    argument merely as long as the batch (8 heads, batch 8) is not the cause of other errors."""
    return all(re.search(rf"(?<![\d.]){n}(?![\d.])", message) for n in sizes)


def _whole_batch_arguments(args: tuple, kwargs: dict, batch: int, batch_axis: int
                           ) -> list[str]:
    """Names and shapes of the arguments with an array of ``batch`` along ``batch_axis``."""
    named = [(f"args[{i}]", a) for i, a in enumerate(args)] + \
        [(f"{name}=", a) for name, a in kwargs.items()]
    return [f"{name} (shape {tuple(jnp.shape(leaf))})" for name, a in named
            for leaf in jax.tree_util.tree_leaves(a)
            if hasattr(leaf, "shape") and jnp.ndim(leaf) > batch_axis
            and jnp.shape(leaf)[batch_axis] == batch][:3]


def explicit_sharding(v: Any) -> Any:
    """The sharding in the type of ``v`` (an array, tracer or ``ShapeDtypeStruct``) when it is
    over a mesh with ``AxisType.Explicit`` axes, else None (no mesh, or automatic axes, whose
    shardings are not part of the type)."""
    if isinstance(v, jax.ShapeDtypeStruct):
        sharding = v.sharding
    else:
        sharding = jax.typeof(v).sharding
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    explicit = jax.sharding.AxisType.Explicit
    return sharding if explicit in tuple(sharding.mesh.axis_types) else None


def _spec(v: Array) -> tuple | None:
    """The entries of ``v``'s explicit ``PartitionSpec``, one per axis, or None when ``v``
    has no explicit sharding."""
    sharding = explicit_sharding(v)
    if sharding is None:
        return None
    return tuple(sharding.spec) + (None,) * (v.ndim - len(sharding.spec))


def _on_mesh_of(v: Array, *spec: Any) -> Any:
    """``NamedSharding(spec)`` on the mesh of ``v``'s explicit sharding (no mesh context
    needed)."""
    mesh = explicit_sharding(v).mesh
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _split_groups(v: Array, groups: int) -> Array:
    """``[B, ...] -> [groups, B / groups, ...]``. Under explicit sharding the batch's mesh
    axes shard the group axis, which needs ``groups`` to be a multiple of their size."""
    shape = (groups, v.shape[0] // groups) + v.shape[1:]
    spec = _spec(v)
    if spec is None:
        return v.reshape(shape)
    entry = spec[0]
    names = entry if isinstance(entry, tuple) else () if entry is None else (entry,)
    shards = math.prod(explicit_sharding(v).mesh.shape[a] for a in names)
    if groups % shards:
        raise ValueError(
            f"Drop-path subsets under explicit sharding: the batch axis is split over "
            f"{shards} devices (mesh axes {names}), and groups={groups} is not a multiple of "
            f"{shards}, so the subsets would have to move activations between devices. Set "
            f"groups to a multiple of the data shards (groups={shards}), or make those mesh "
            "axes jax.sharding.AxisType.Auto.")
    return jax.lax.reshape(v, shape, out_sharding=_on_mesh_of(v, entry, None, *spec[1:]))


def _merge_groups(v: Array) -> Array:
    """``[groups, m, ...] -> [groups * m, ...]`` (the batch keeps the group axis's sharding)."""
    shape = (v.shape[0] * v.shape[1],) + v.shape[2:]
    spec = _spec(v)
    if spec is None:
        return v.reshape(shape)
    return jax.lax.reshape(v, shape, out_sharding=_on_mesh_of(v, spec[0], *spec[2:]))


def _group_indices(indices: Array, v: Array) -> Array:
    """Subset ``indices [groups, k]`` sharded over the groups as ``v``'s batch axis (each
    device keeps its groups' rows; no activations move)."""
    spec = _spec(v)
    if spec is None:
        return indices
    return jax.sharding.reshard(indices, _on_mesh_of(v, spec[0], None))


def _check_shortcut(shortcut: Any, y: Any) -> None:
    """ValueError unless ``shortcut`` is shaped like ``y`` (arrays or pytrees of them)."""
    def shapes(t):
        return jax.tree_util.tree_map(lambda v: tuple(v.shape), t)
    if shapes(shortcut) != shapes(y):
        raise ValueError(
            f"shortcut has shape {shapes(shortcut)} but the branch output is {shapes(y)}; "
            "pass the block's shortcut (e.g. shortcut=x for an identity shortcut) shaped like "
            "the branch output."
        )


def with_shortcut(y: Array, shortcut: Array | None) -> Array:
    """``shortcut + y`` (``y`` unchanged when ``shortcut`` is None); shapes must match.

    Pytrees add leaf by leaf."""
    if shortcut is None:
        return y
    _check_shortcut(shortcut, y)
    return jax.tree_util.tree_map(lambda s, v: s + v, shortcut, y)


def varying_axes(v: Any) -> tuple:
    """The ``shard_map`` mesh axes over which ``v`` (an array, tracer or ``ShapeDtypeStruct``)
    varies, sorted; ``()`` outside ``shard_map`` or for a value replicated over its axes."""
    if isinstance(v, jax.ShapeDtypeStruct):
        manual = getattr(v, "manual_axis_type", None)
    elif isinstance(v, jax.Array):
        manual = getattr(jax.typeof(v), "manual_axis_type", None)
    else:  # a Python or NumPy value: the same on every device
        return ()
    return tuple(sorted(getattr(manual, "varying", ()) or ()))


def check_shared_gate(gate: Any) -> None:
    """ValueError for a batch-mode gate that differs between ``shard_map`` devices.

    Skipping is a ``cond`` on the gate; the gradient of a parameter shared by the devices is
    summed across them inside it, and a device whose gate is closed never joins the sum, so
    the others would wait for it forever (XLA aborts the process)."""
    axes = varying_axes(gate)
    if axes:
        raise ValueError(
            f"A mode='batch' gate that differs between shard_map devices (it varies over mesh "
            f"axes {axes}, e.g. drawn from a key with jax.lax.axis_index folded in) cannot "
            "skip: the gradient's sum across devices would run only where the gate is open. "
            "Give every device the same key, or use implementation='mask' for a gate per "
            "device.")


def zeros_like_output(out: Any, fill: Any = None) -> Any:
    """Zeros shaped like ``out`` (a pytree of ``ShapeDtypeStruct``, e.g. from
    ``jax.eval_shape``): a skipped branch's output. A ``cond``'s two branches must agree in
    type, so under explicit sharding each leaf takes the struct's sharding, and inside
    ``shard_map`` it varies over the mesh axes the struct's does (zeros made there are
    replicated, while the branch's output varies with its per-device input). ``fill``: a
    scalar added to every element (:func:`closed_fill`: 0, or NaN for a bad traced p)."""
    def zeros(o):
        sharding = explicit_sharding(o)
        value = 0 if fill is None else jnp.asarray(fill).astype(o.dtype)  # one broadcast
        if sharding is None:  # as before explicit sharding existed
            z = jnp.full(o.shape, value, o.dtype)
        else:
            z = jnp.full(o.shape, value, o.dtype, out_sharding=sharding)
        axes = varying_axes(o)
        return jax.lax.pcast(z, axes, to="varying") if axes else z

    return jax.tree_util.tree_map(zeros, out)


def draw_gate(
    key: Array,
    survival_prob: Any,
    *,
    mode: str = "batch",
    implementation: str = "skip",
    batch_size: int | None = None,
    groups: int = 1,
) -> Array:
    """One block's training gate, in the form :func:`gated_branch` takes.

    Args:
      key: a JAX PRNG key (one per block and step, e.g. ``fold_in(step_key, block)``).
      survival_prob: this block's p in (0, 1] (one float; traced allowed except for
        ``'sample'`` with ``'skip'``, whose subset size ``k`` is a shape), checked as
        :func:`stochastic_depth` checks it.
      mode, implementation: as :func:`stochastic_depth`.
      batch_size: the number of examples, required for ``mode='sample'``.
      groups: ``'sample'`` with ``'skip'``: see :func:`draw_subset`.

    Returns:
      bool scalar (``'batch'``); int32 subset indices ``[groups, k]`` (``'sample'`` with
      ``'skip'``, see :func:`draw_subset`); bool ``[batch_size]`` Bernoulli(p) gates
      (``'sample'`` with ``'mask'``).
    """
    validate_options(mode, "test", implementation)
    check_key(key)
    # A rate out of range drew a gate that is always open (p > 1) or always closed (p = 0,
    # e.g. the first block's drop rate passed as p), where the op refuses it.
    check_survival_prob(survival_prob)
    survival_prob = checked_prob(survival_prob)  # traced out of range: NaN, closed gates
    if mode == "batch":
        return jax.random.bernoulli(key, _draw_prob(survival_prob))
    if batch_size is None:
        raise ValueError("mode='sample' needs batch_size to draw one gate per example.")
    if implementation == "skip":
        return draw_subset(key, batch_size, survival_prob, groups)
    return jax.random.bernoulli(key, _draw_prob(survival_prob), (batch_size,))


def _draw_prob(p: Any) -> Array:
    """``p`` as the Bernoulli draw takes it: float32, so that a key gives the same gates with
    and without ``jax_enable_x64`` (the draw compares uniforms of ``p``'s dtype, and a Python
    float is float64 under x64), and a bfloat16 or float16 ``p`` (cast exactly) is drawn
    with its own probability: uniforms of those dtypes are multiples of 2^-7 and 2^-10, so
    ``bfloat16(255/256)`` never closed its gate and other values were kept more often than
    p (by up to 1/256)."""
    return jnp.asarray(p, jnp.float32)


def train_scale(survival_prob: Array, scaling: str) -> Array:
    """Factor on a surviving branch during training: 1 (paper) or 1/p (inverted)."""
    validate_options("batch", scaling)  # any other value than 'test' would read as 'train'
    return 1.0 if scaling == "test" else 1.0 / survival_prob


def eval_scale(survival_prob: Array, scaling: str) -> Array:
    """Factor on every branch at evaluation: p (paper, Eq. 5) or 1 (inverted)."""
    validate_options("batch", scaling)  # any other value than 'test' would read as 'train'
    return survival_prob if scaling == "test" else 1.0


def scaled(y: Array, factor: Any) -> Array:
    """``y * factor`` in ``y``'s dtype (leaf by leaf for a pytree); a static 1 adds no op.

    Raises TypeError for a non-floating leaf: scaling an integer output by p or 1/p would
    truncate it."""
    for v in jax.tree_util.tree_leaves(y):
        if not jnp.issubdtype(jnp.result_type(v), jnp.inexact):
            raise TypeError(
                f"Stochastic depth scales the branch output, which must be floating point, got "
                f"{jnp.result_type(v)}; cast it in the branch (e.g. return y.astype(jnp.float32)).")
    if isinstance(factor, (int, float)) and factor == 1.0:
        return y
    return jax.tree_util.tree_map(lambda v: _times(v, factor), y)


def _times(v: Array, factor: Any) -> Array:
    """``v * factor`` in ``v``'s dtype, rounded once.

    A bfloat16 (or float16) output is multiplied in float32 and cast back: a factor first
    cast to bfloat16 is off by up to 0.2% (p = 0.9907 is 0.9922 there), the same way for
    every element and every step, so the kept or evaluated branch would be scaled by that
    rounded factor rather than p or 1/p; rounding the product alone is unbiased."""
    dtype = jnp.result_type(v)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        return (v.astype(jnp.float32) * jnp.asarray(factor, jnp.float32)).astype(dtype)
    return v * jnp.asarray(factor, dtype=dtype)


def masked(y: Array, gate: Array, factor: Any, batch_axis: int = 0, fill: Any = None) -> Array:
    """``y * gate * factor``; a ``[batch]`` gate broadcasts along ``y``'s ``batch_axis``
    (a scalar gate over everything); pytrees leaf by leaf. ``fill``: added to the gate
    (:func:`closed_fill`: 0, or NaN for a bad traced p)."""
    gate = jnp.asarray(gate)
    if fill is not None:
        gate = gate.astype(jnp.float32) + fill
    check_batch_axis(batch_axis)

    def one(v):
        shape = [1] * v.ndim
        if gate.ndim:
            _check_mask_fits(gate, v, batch_axis)
            shape[batch_axis] = gate.shape[0]
        return scaled(v * gate.astype(v.dtype).reshape(shape), factor)

    return jax.tree_util.tree_map(one, y)


def _check_mask_fits(gate: Array, v: Array, batch_axis: int) -> None:
    """ValueError unless a per-example ``gate`` is ``[batch]`` for the branch output ``v``
    (otherwise the multiply fails on broadcasting, or a ``[batch, 1]`` gate passes by
    chance)."""
    batch = v.shape[batch_axis] if batch_axis < v.ndim else None
    if gate.ndim != 1 or gate.shape[0] != batch:
        raise ValueError(
            f"A per-example gate must be bool [batch], one entry per example, got shape "
            f"{tuple(gate.shape)} for a branch output of shape {tuple(v.shape)} "
            f"(batch_axis={batch_axis}); draw it for this batch, e.g. "
            f"ops.draw_gate(key, p, mode='sample', implementation='mask', batch_size=B).")


def gated_branch(
    branch: Callable[..., Array],
    x: Array,
    gate: Array,
    survival_prob: Array,
    *,
    mode: str = "batch",
    scaling: str = "test",
    implementation: str = "skip",
    shortcut: Array | None = None,
    batch_axis: int = 0,
) -> Array:
    """Applies ``branch`` to ``x`` under an already-drawn training gate.

    Args:
      branch: ``x -> y``; a pure function (close over parameters as needed).
      x: the block input, e.g. ``[batch, height, width, channels]``.
      gate: as :func:`draw_gate` returns: bool scalar (``'batch'``), int32 subset indices
        ``[groups, k]`` (``'sample'``/``'skip'``) or bool ``[batch]`` (``'sample'``/
        ``'mask'``; a bool ``[batch]`` gate is always applied as a mask, whatever the
        implementation, since a Bernoulli draw has no static size).
      survival_prob: p for this block (scalar; may be traced except for subsets).
      shortcut: optional, shaped like ``branch(x)``: returned added to the gated residual
        (for subsets in one scatter-add, see :func:`subset_branch`).
      batch_axis: ``'sample'``: the axis of ``x`` and ``branch(x)`` that indexes examples.

    Returns:
      ``gate * branch(x) * train_scale`` (``+ shortcut``) with the shape and dtype of
      ``branch(x)``; in
      ``'batch'``/``'skip'`` the branch is not evaluated when the gate is closed, in
      ``'sample'``/``'skip'`` only on the subset.
    """
    validate_options(mode, scaling, implementation)  # a typo would pick another branch
    check_survival_prob(survival_prob)
    survival_prob = checked_prob(survival_prob)
    gate = jnp.asarray(gate)
    check_gate(gate, mode)
    if mode == "sample" and jnp.issubdtype(gate.dtype, jnp.integer):
        groups, k = gate.shape
        factor = 1.0 if scaling == "test" else (batch_size_of(x, batch_axis) // groups) / k
        return subset_branch(branch, x, gate, factor, shortcut, batch_axis)
    factor = train_scale(survival_prob, scaling)
    if mode == "sample" or implementation == "mask":
        return with_shortcut(masked(branch(x), gate, factor, batch_axis,
                                    closed_fill(survival_prob)), shortcut)
    check_shared_gate(gate)
    out = jax.eval_shape(branch, x)
    return with_shortcut(jax.lax.cond(
        gate,
        lambda v: scaled(branch(v), factor),
        lambda v: zeros_like_output(out, closed_fill(survival_prob)),
        x,
    ), shortcut)


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
    groups: int = 1,
    shortcut: Array | None = None,
    batch_axis: int = 0,
) -> Array:
    """Runs a residual branch under stochastic depth; returns its gated output.

    The caller adds the shortcut: ``out = act(shortcut(x) + stochastic_depth(f, x, ...))``,
    or passes it: ``act(stochastic_depth(f, x, ..., shortcut=shortcut(x)))``, which for
    drop-path subsets adds the kept outputs into it in place (DINOv2's ``index_add``).

    Args:
      branch: the residual function f, ``x -> f(x)``; pure (close over parameters).
      x: input array, any shape, or a pytree of arrays (the branch takes and returns the
        same structure); ``mode='sample'`` gates along ``batch_axis`` of every leaf.
      survival_prob: p in (0, 1], the probability of *keeping* the branch (timm's drop
        rate is 1 - p). A concrete 1.0 never draws a key.
      key: PRNG key for the gate; required in training unless ``survival_prob`` is 1.
      deterministic: evaluation mode: every branch runs, scaled per ``scaling``. A Python
        bool (static under ``jit``).
      mode: ``'batch'`` (one gate per call, paper) or ``'sample'`` (one per example).
      scaling: ``'test'`` (paper: scale by p at evaluation) or ``'train'`` (scale by 1/p
        in training; ``n / k`` for subsets).
      implementation: ``'skip'`` (a dropped block or example computes nothing) or
        ``'mask'`` (compute everything, multiply by the gate).
      groups: ``'sample'``/``'skip'`` only: draw the subset within this many contiguous
        groups of the batch (see :func:`draw_subset`); a multiple of the data-shard count
        keeps a sharded batch on its devices (required under explicit mesh axes).
      shortcut: optional, shaped like ``f(x)``: added to the result (see above).
      batch_axis: ``'sample'``: the axis that indexes examples (default 0; 1 for
        ``[tokens, batch, width]`` layouts). The op cannot tell which axis is the batch: with
        the default, a ``[tokens, batch, ...]`` input would drop tokens, not examples.

    Returns:
      The gated residual (``+ shortcut``), shaped like ``f(x)``.
    """
    validate_options(mode, scaling, implementation)
    check_survival_prob(survival_prob)
    survival_prob = checked_prob(survival_prob)
    check_deterministic(deterministic)
    if deterministic:
        return with_shortcut(scaled(branch(x), eval_scale(survival_prob, scaling)), shortcut)
    if is_static_one(survival_prob):
        return with_shortcut(scaled(branch(x), 1.0), shortcut)
    if key is None:
        raise ValueError(
            "stochastic_depth needs a PRNG `key` in training (deterministic=False) when "
            "survival_prob < 1; pass key=jax.random.fold_in(base_key, step)."
        )
    check_key(key)
    batch = batch_size_of(x, batch_axis) if mode == "sample" else None
    gate = draw_gate(key, survival_prob, mode=mode, implementation=implementation,
                     batch_size=batch, groups=groups)
    return gated_branch(
        branch, x, gate, survival_prob, mode=mode, scaling=scaling,
        implementation=implementation, shortcut=shortcut, batch_axis=batch_axis,
    )
