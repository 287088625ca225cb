"""Flax Linen layers: Torch-statistics BatchNorm, the StochasticDepth wrapper, and blocks.

All modules are pure-functional Linen: variables and keys are explicit. Training-mode gates
come from the rng stream ``'stochastic_depth'``::

    logits, updates = model.apply(variables, x, train=True,
                                  rngs={'stochastic_depth': key}, mutable=['batch_stats'])
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
from flax import nnx
from flax.linen import module as linen_module
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from stochastic_depth_jax import ops
from stochastic_depth_jax.conv import (REROUTE_CONVS, Conv, stock_convs_under_forward_mode,
                                      reroute_flax_convs)

__all__ = [
    "BatchNorm",
    "StochasticDepth",
    "DropPath",
    "BasicBranch",
    "PreActBranch",
    "BottleneckBranch",
    "Shortcut",
    "ResidualBlock",
    "BasicBlock",
    "PreActBlock",
    "BottleneckBlock",
    "REMAT_POLICIES",
    "conv_kernel_init",
    "gate_rng",
]

Array = Any
ModuleDef = Any

# He initialisation as fb.resnet.torch writes it: N(0, sqrt(2 / (k * k * out_channels))). The
# official stochastic-depth code uses fan-in (nninit), which differs only where a conv changes
# the width (the stem, the transition convs), each followed by BatchNorm (README); the models'
# initialization='official' gives it (blocks and shortcuts take a ``kernel_init``).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Rematerialisation of a *surviving* branch inside the skip cond. See StochasticDepth.remat.
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "convs": jax.checkpoint_policies.save_only_these_names("stochastic_depth_conv"),
}


class BatchNorm(nn.Module):
    """Batch normalisation with Torch's running statistics.

    Running averages follow Torch: ``new = (1 - momentum) * old + momentum * batch``
    (momentum 0.1 is Flax's 0.9) and the running variance uses the unbiased batch variance
    (n / (n - 1)); normalisation uses the biased one, as Torch. Statistics are computed in
    float32 for a bfloat16, float16 or float32 input (the output has ``dtype``, else the
    input's) and in float64 for a float64 one (``jax_enable_x64``); the running statistics
    are kept in float32 (in ``param_dtype`` where it is wider), and written back in the
    dtype they were given (float64 ones, with ``jax_enable_x64``, stay float64). Under a
    sharded ``jit`` the batch mean is taken over the global batch, so statistics do not
    depend on device count.
    Inside ``jax.shard_map`` (or ``pmap``) each device sees only its shard: ``axis_name``
    averages the statistics over that mapped axis, so they are again the global batch's.

    Attributes:
      momentum: Torch-convention momentum.
      epsilon: added to the variance.
      scale_init: initialiser of the scale (``zeros`` gives zero-init residual branches).
      axis_name: None, or the mapped axis (a name or tuple of names, e.g. ``'data'`` of a
        ``shard_map`` over the batch) whose devices' shards together make the batch: in
        training the batch mean and variance (and the unbiased count n) are then those of
        the whole batch (``jax.lax.pmean``; every shard must hold as many examples), and the
        running statistics the same on every device. Evaluation is unchanged. For groups
        of devices (``axis_index_groups``, which ``shard_map`` does not implement) make the
        group a mesh axis and name only it.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Callable[..., Array] = nn.initializers.ones
    axis_name: str | tuple[str, ...] | None = None

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        """Normalises ``x`` ``[..., channels]`` over all axes but the last."""
        ops.check_deterministic(train, name="train")  # a traced flag: its own message, not Python's
        features = x.shape[-1]
        axes = tuple(range(x.ndim - 1))
        # Statistics (and the running ones kept) in float32 at least: a bfloat16 or float16
        # input in float32, a float64 one (jax_enable_x64) in float64.
        compute = jnp.promote_types(x.dtype, jnp.float32)
        stats = jnp.promote_types(self.param_dtype, jnp.float32)
        mean_v = self.variable("batch_stats", "mean", jnp.zeros, (features,), stats)
        var_v = self.variable("batch_stats", "var", jnp.ones, (features,), stats)
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        if train:
            shards = self._shards()  # checks axis_name before a pmean over it
            xf = x.astype(compute)
            mean = self._batch_mean(xf, axes)
            var = self._batch_mean(jnp.square(xf - mean), axes)
            if not self.is_initializing():
                n = x.size // features * shards
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                # Written back in the dtype they came in (``stats`` from init): a skipping
                # ``cond`` returns a dropped block's unchanged, and both sides must agree.
                mean_v.value = ((1.0 - m) * mean_v.value + m * mean).astype(mean_v.value.dtype)
                var_v.value = ((1.0 - m) * var_v.value + m * unbiased).astype(var_v.value.dtype)
        else:
            mean, var = mean_v.value.astype(compute), var_v.value.astype(compute)
        mul = scale.astype(compute) * jax.lax.rsqrt(var + self.epsilon)
        add = bias.astype(compute) - mean * mul
        dtype = self.dtype or x.dtype
        return (x * mul.astype(dtype) + add.astype(dtype)).astype(dtype)

    def _synced(self) -> bool:
        # As Flax's BatchNorm: init (often outside the mapped function) reduces locally.
        return self.axis_name is not None and not self.is_initializing()

    def _batch_mean(self, v: Array, axes: tuple[int, ...]) -> Array:
        """Mean of ``v`` over ``axes`` of this shard, and over ``axis_name``'s shards (equal
        in size, so the mean of their means is the whole batch's)."""
        mean = jnp.mean(v, axes)
        return jax.lax.pmean(mean, self.axis_name) if self._synced() else mean

    def _shards(self) -> int:
        """How many shards make the batch: the size of ``axis_name`` (1 without one); a
        ValueError naming the axis where it is not bound (JAX's own error there is an
        assertion without a message, or one that points at ``psum``)."""
        if not self._synced():
            return 1
        try:
            return jax.lax.axis_size(self.axis_name)
        except NameError:
            raise ValueError(
                f"BatchNorm(axis_name={self.axis_name!r}) averages its batch statistics over "
                f"a mapped axis of that name, which is not bound here: call the model inside "
                f"jax.shard_map (or pmap) over that axis, or leave axis_name=None (under jit "
                f"the statistics are already the whole batch's).") from None


def gate_rng(module: nn.Module, collection: str = "stochastic_depth", *,
             monte_carlo: bool = False) -> Array:
    """``module.make_rng(collection)`` (which falls back to the ``'params'`` stream, as Flax
    does), or, when neither stream was given, a ValueError saying how to pass the gate key.
    ``monte_carlo``: the gates are drawn at evaluation (``train=False, stochastic=True``),
    which the error names instead of training."""
    _check_gate_rng(module, collection, monte_carlo=monte_carlo)
    _check_split_in_scan(module, collection if module.has_rng(collection) else "params")
    return module.make_rng(collection)


def _check_gate_rng(module: nn.Module, collection: str = "stochastic_depth", *,
                   monte_carlo: bool = False) -> None:
    """The ValueError of :func:`gate_rng` where ``module`` has neither ``collection`` nor
    the ``'params'`` stream to draw from; nothing otherwise (no key is drawn)."""
    if module.has_rng(collection) or module.has_rng("params"):
        return
    if monte_carlo:  # "Training" and "evaluate with train=False" misled here
        drawing = (f"Monte-Carlo depth (train=False, stochastic=True) samples a sub-network "
                   f"from the rng stream {collection!r}")
        fix = (f"pass rngs={{{collection!r}: key}} to apply() (a new key per sample, e.g. "
               f"jax.random.fold_in(key, i)), or stochastic=False for the deterministic "
               f"network")
    else:
        drawing = (f"Training (train=True / deterministic=False) draws stochastic-depth gates "
                   f"from the rng stream {collection!r}")
        fix = (f"pass rngs={{{collection!r}: jax.random.fold_in(key, step)}} (or evaluate "
               f"with train=False / deterministic=True)")
    lifted = _transforms_around(module)
    # nn.scan and nn.vmap pass on only the streams their split_rngs name; nn.remat and
    # nn.jit pass on all, so under those alone apply() was not given the stream.
    if "scan(" in lifted or "vmap(" in lifted:
        raise ValueError(
            f"{drawing}, which this layer, inside the Linen transform {lifted}, was not "
            f"given: pass rngs={{{collection!r}: jax.random.fold_in(key, step)}} to apply() "
            f"and name the stream in the split_rngs of nn.scan or nn.vmap (they pass on no "
            f"other), e.g. split_rngs={{'params': True, {collection!r}: True}}.")
    raise ValueError(f"{drawing}, which apply() was not given: {fix}.")


def _transforms_around(module: nn.Module) -> str:
    """The Linen transforms (``nn.scan``, ``nn.vmap``, ...) around ``module``, as Flax names
    them in its scope's debug path (``'remat(scan())'``); ``''`` outside any."""
    path = getattr(module.scope, "debug_path", None) or ()
    return ", ".join(p for p in path if isinstance(p, str) and p.endswith(")"))


def _check_split_in_scan(module: nn.Module, collection: str) -> None:
    """ValueError when ``module``'s parameters differ from one iteration of a scan to the
    next (``nn.scan`` with ``variable_axes={'params': 0}``: a stack of layers) while its key
    stream comes from outside the scan (not in ``split_rngs``): every layer would draw the
    same gates (see :func:`stochastic_depth_jax.ops.key_shared_across_scan`)."""
    stream = module.scope.rngs.get(collection)
    params = jax.tree_util.tree_leaves(module.variables.get("params", {}))
    if stream is not None and params and ops.key_shared_across_scan(
            getattr(stream, "rng", None), params[0]):
        raise ValueError(
            f"{type(module).__name__} runs inside a scan over layers (or over train steps) "
            f"whose rng stream {collection!r} is not split, so every layer (or step) would "
            f"draw the same gate: add it to nn.scan's split_rngs, e.g. split_rngs={{'params': "
            f"True, {collection!r}: True}} (in a jax.lax.scan of your own, scan over "
            f"jax.random.split(key, n)); to share one gate on purpose, pass gate=.")


def _refusing_drop_rates(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` (a Linen wrapper's dataclass ``__init__``), saying in one line what to write
    for a drop rate passed by another library's name (``rate=``, ``drop_path_rate=``, ...;
    :func:`stochastic_depth_jax.ops.rate_argument_error`), as the NNX wrappers do, where
    Python said only "unexpected keyword argument"."""

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fields = {f.name for f in dataclasses.fields(self)}
        for key in kwargs.keys() - fields:
            error = ops.rate_argument_error(type(self).__name__, key, kwargs[key],
                                            takes_rate=isinstance(self, DropPath))
            if error is not None:
                raise error
        init(self, *args, **kwargs)

    return __init__


class _RefusesDropRates(nn.Module):
    """Base of the Linen wrappers: no fields; wraps each subclass's generated ``__init__``
    with :func:`_refusing_drop_rates` (Flax generates it, and forbids defining one)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)  # Flax makes cls a dataclass: its __init__
        cls.__init__ = _refusing_drop_rates(cls.__init__)


class StochasticDepth(_RefusesDropRates):
    """Wraps any residual branch module f so that it survives with probability p.

    Returns the gated residual only; the caller adds the shortcut::

        y = x + StochasticDepth(MyBranch(parent=None), survival_prob=0.8)(x, deterministic=not train)

    (``parent=None`` makes the branch's parameters live under this module, as ``branch``.)

    Semantics are those of :func:`stochastic_depth_jax.stochastic_depth`: ``mode='batch'``
    with ``implementation='skip'`` evaluates nothing of f, forward or backward, when the
    gate is closed, and f's ``batch_stats`` stay unchanged; ``mode='sample'`` gates each
    example: with ``'skip'`` f runs only on a random subset of exactly ``k`` examples (see
    :func:`stochastic_depth_jax.ops.subset_size`), so a BatchNorm inside f normalises over
    (and updates its running statistics from) the subset; with ``'mask'`` f runs on the
    whole batch under Bernoulli(p) gates.

    Attributes:
      branch: the residual branch, called as ``branch(x, *args, **kwargs)``.
      survival_prob: p, the probability of *keeping* the branch; overridden by the
        ``survival_prob`` call argument when given. Not timm's or torchvision's drop rate,
        which is 1 - p: their ``drop_path_rate=0.1`` is ``survival_prob=0.9`` (or
        :class:`DropPath` with ``rate=0.1``); ``survival_prob=0.1`` keeps 10% of the time.
      mode: ``'batch'`` (paper) or ``'sample'`` (drop path).
      scaling: ``'test'`` (paper: p f at evaluation) or ``'train'`` (f / p in training).
      implementation: ``'skip'`` (real skipping) or ``'mask'`` (compute, then multiply).
      remat: what a *surviving* branch keeps for its backward pass: ``'none'`` (all
        activations), ``'convs'`` (convolution outputs tagged ``stochastic_depth_conv``;
        cheap element-wise ops are recomputed) or ``'full'`` (only the input). Inside a
        ``lax.scan``, a ``lax.cond`` under ``grad`` must fill the skipped branch's residuals
        with zeros; saving fewer residuals makes a skipped block cheaper. It applies to
        batch-mode skipping only (that ``cond``): drop path (``mode='sample'``) and
        ``'mask'`` run the branch as it is, so for them wrap the branch in ``nn.remat``.
      rng_collection: the rng stream gates are drawn from.
      reroute_convs: whether stock ``flax.linen.Conv`` layers inside the branch compute
        through :func:`stochastic_depth_jax.conv.conv_general_dilated` (same parameters and
        numbers, a gradient XLA:CPU runs fast inside ``cond``): ``'auto'`` (on the CPU
        backend), ``'always'`` or ``'never'``; a wrapper inside the branch decides for its
        own branch. A call under forward mode (``jax.jvp``, ``jax.jacfwd``,
        ``jax.linearize`` innermost over its input or parameters) reroutes nothing, whatever
        this says (:func:`~stochastic_depth_jax.conv.stock_convs_under_forward_mode`;
        ``'never'`` where the wrapper cannot see forward mode: README, "Forward-mode
        autodiff"). See :func:`~stochastic_depth_jax.conv.reroute_flax_convs`.
      groups: ``'sample'``/``'skip'``: the subset is drawn within this many contiguous groups
        of the batch (a multiple of the data-shard count keeps activations on their device,
        and is required under explicit mesh axes; see
        :func:`stochastic_depth_jax.ops.draw_subset`).
      batch_axis: ``'sample'``: the axis of ``x`` (and of the branch output) that indexes
        examples: 0 for ``[batch, ...]``, 1 for ``[tokens, batch, width]`` layouts.
    """

    branch: nn.Module
    survival_prob: float = 1.0
    mode: str = "batch"
    scaling: str = "test"
    implementation: str = "skip"
    remat: str = "none"
    rng_collection: str = "stochastic_depth"
    reroute_convs: str = "auto"
    groups: int = 1
    batch_axis: int = 0

    @nn.compact
    @stock_convs_under_forward_mode
    def __call__(
        self,
        x: Array,
        *args: Any,
        deterministic: bool,
        survival_prob: Any = None,
        gate: Any = None,
        shortcut: Any = None,
        **kwargs: Any,
    ) -> Array:
        """Runs the gated branch.

        Args:
          x: branch input, ``[batch, ...]`` (batch along ``batch_axis``), or a pytree of
            such arrays (the branch then takes and returns pytrees).
          *args, **kwargs: forwarded to the branch (static values, e.g. ``train=True``).
          deterministic: evaluation mode (a Python bool, static under ``jit``): the branch
            runs scaled per ``scaling`` (p f for ``'test'``); with a ``gate`` it runs only
            where the gate is open (a fixed sub-network at test time, e.g. a pruned model).
          survival_prob: per-call p (may be traced, e.g. inside ``nn.scan``).
          gate: a pre-drawn gate as :func:`stochastic_depth_jax.ops.draw_gate` returns
            (bool scalar, int32 subset ``[groups, k]`` or bool ``[batch]``; subset rows
            sorted and without repeats, see :func:`stochastic_depth_jax.ops.subset_branch`);
            in training it is drawn from ``rng_collection`` when omitted.
          shortcut: optional, shaped like ``branch(x)``: returned added to the gated
            residual; with drop-path subsets the kept outputs are added into it in one
            scatter-add (``y = sd(x, shortcut=x, ...)`` instead of ``y = x + sd(x, ...)``).

        Returns:
          the gated residual (``+ shortcut``), shaped like ``branch(x)``.
        """
        _check_linen_branch(self.branch)
        ops.validate_options(self.mode, self.scaling, self.implementation)
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"Unknown remat {self.remat!r}; valid: {sorted(REMAT_POLICIES)}.")
        if self.reroute_convs not in REROUTE_CONVS:
            raise ValueError(f"Unknown reroute_convs {self.reroute_convs!r}; "
                             f"valid: {list(REROUTE_CONVS)}.")
        ops.check_batch_axis(self.batch_axis)
        ops.check_deterministic(deterministic)
        p = self._module_prob() if survival_prob is None else survival_prob
        ops.check_survival_prob(p)
        p = ops.checked_prob(p)  # a traced p out of (0, 1]: NaN, scalar ops only
        call = functools.partial(_call_branch, args=args, kwargs=kwargs)
        if deterministic and (gate is None or self.is_initializing()):
            return ops.with_shortcut(ops.scaled(call(self, x), ops.eval_scale(p, self.scaling)),
                                     shortcut)
        if not deterministic and self.is_initializing():
            return ops.with_shortcut(call(self, x), shortcut)
        if not deterministic and gate is None and ops.is_static_one(p):
            return ops.with_shortcut(ops.scaled(call(self, x), 1.0), shortcut)
        if gate is None:
            batch = ops.batch_size_of(x, self.batch_axis) if self.mode == "sample" else None
            gate = ops.draw_gate(gate_rng(self, self.rng_collection), p, mode=self.mode,
                                 implementation=self.implementation, batch_size=batch,
                                 groups=self.groups)
        ops.check_gate(gate, self.mode, deterministic)
        if self.mode == "sample" and not deterministic:
            # Subset gather/scatter (or add into the shortcut) or mask: the op's one
            # implementation.
            branch = ops.naming_whole_arguments(lambda v: call(self, v), x, args, kwargs,
                                                self.batch_axis)
            return ops.gated_branch(branch, x, gate, p, mode=self.mode,
                                    scaling=self.scaling, implementation=self.implementation,
                                    shortcut=shortcut, batch_axis=self.batch_axis)
        # A gated evaluation keeps the evaluation scale on the blocks it runs.
        scale = ops.eval_scale if deterministic else ops.train_scale
        factor = scale(p, self.scaling)
        if self.mode == "sample" or self.implementation == "mask" or self._sows(call, x):
            if self.mode == "batch" and self.is_mutable_collection("batch_stats"):
                self._check_stats_under_wrapper()
                call = _keep_stats_if_dropped(call, gate)
            return ops.with_shortcut(ops.masked(call(self, x), gate, factor, self.batch_axis,
                                                ops.closed_fill(p)), shortcut)
        return ops.with_shortcut(self._skip(call, x, gate, factor, ops.closed_fill(p)),
                                 shortcut)

    def _module_prob(self) -> Any:
        """p when the call gives none: the ``survival_prob`` field."""
        return self.survival_prob

    def _outside_state(self) -> Any:
        """The variables of a branch bound to another module (``MyBranch()`` made in a
        parent's compact method): forward mode over them alone (``jax.jvp`` in the
        parameters, not the input) is looked for too
        (:func:`~stochastic_depth_jax.conv.stock_convs_under_forward_mode`)."""
        scope = getattr(self.branch, "scope", None)
        if scope is None or scope.path[:len(self.scope.path)] == self.scope.path:
            return None
        return self.branch.variables

    def _check_stats_under_wrapper(self) -> None:
        """ValueError for a branch bound to another module (``MyBranch()`` made in a parent's
        compact method, not ``parent=None``) that has ``batch_stats``: a masked batch-mode
        call keeps a dropped branch's statistics by mapping this wrapper's own variables,
        and those live elsewhere (Flax failed with a pytree structure error)."""
        scope = getattr(self.branch, "scope", None)
        if scope is None or scope.path[:len(self.scope.path)] == self.scope.path:
            return
        if "batch_stats" in self.branch.variables:
            raise ValueError(
                f"StochasticDepth keeps a dropped branch's batch_stats unchanged, which needs "
                f"them under the wrapper, but its branch {type(self.branch).__name__} is bound "
                f"to {type(self.branch.parent).__name__} (as {'/'.join(scope.path)}): create "
                f"it unbound, StochasticDepth({type(self.branch).__name__}(parent=None), ...).")

    def _sows(self, call: Callable[..., Array], x: Array) -> bool:
        """Whether the branch writes the mutable ``'intermediates'`` collection (it sows, or
        ``capture_intermediates=True``). A skipping ``cond`` cannot create variables in one
        branch only, so such a call masks instead: the same outputs, gradients and
        statistics, with the dropped branch computed (and its intermediates recorded)."""
        if not self.is_mutable_collection("intermediates"):
            return False

        capture = capturing_intermediates()

        def sown(variables, v):
            run = nn.apply(call, self.clone(parent=None), mutable=True,
                           capture_intermediates=capture)
            return run(variables, v, rngs={"params": jax.random.key(0)})[1]

        return "intermediates" in jax.eval_shape(sown, self.variables, x)

    def _skip(self, call: Callable[..., Array], x: Array, gate: Array, factor: Any,
              fill: Any = None) -> Array:
        ops.check_shared_gate(gate)

        def run(module, v, f):
            return ops.scaled(call(module, v), f[0])

        policy = REMAT_POLICIES[self.remat]
        if policy is not None:
            run = nn.remat(run, policy=policy, prevent_cse=False)

        out = _branch_output(self, call, x)

        def skip(module, v, f):
            return ops.zeros_like_output(out, f[1])

        # The factor travels in f32; ``scaled`` casts it to each output's dtype.
        return nn.cond(gate, run, skip, self, x, (jnp.asarray(factor, jnp.float32), fill))


class DropPath(StochasticDepth):
    """timm-style drop path that really skips: :class:`StochasticDepth` taking the drop
    ``rate`` (= 1 - p, the probability of dropping) instead of ``survival_prob``, with
    per-example subsets (``mode='sample'``, ``'skip'``) and inverted (``'train'``) scaling
    by default, as NNX's :class:`stochastic_depth_jax.nnx_layers.DropPath`::

        y = x + DropPath(Mlp(parent=None), rate=0.1)(x, deterministic=not train)

    Attributes:
      rate: the drop rate in [0, 1), by keyword (timm's ``drop_path_rate`` for this branch);
        a ``survival_prob`` (also the second positional argument) is refused.
      Other fields as :class:`StochasticDepth`; the call too (its ``survival_prob=``
      overrides p, as there).
    """

    mode: str = "sample"
    scaling: str = "train"
    rate: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.survival_prob, (int, float)) or self.survival_prob != 1.0:
            p, name = self.survival_prob, type(self).__name__  # a subclass's own name
            raise TypeError(
                f"{name} takes the drop rate by keyword, {name}(branch, rate=...), but got "
                f"survival_prob={p!r} (its second positional argument): for a drop rate of "
                f"{p!r} write rate={p!r}, for a survival probability of {p!r} "
                f"rate={ops.drop_rate_text(p)}.")
        ops.check_drop_rate(self.rate, type(self).__name__)
        super().__post_init__()

    def _module_prob(self) -> Any:
        return 1.0 - float(self.rate)


def capturing_intermediates() -> Any:
    """The ``capture_intermediates`` of the enclosing ``apply`` (Flax keeps it on a context
    stack, which a nested ``apply`` would otherwise reset), for such a nested ``apply``."""
    return (getattr(linen_module._context, "capture_stack", None) or [False])[-1]


def _check_linen_branch(branch: Any) -> None:
    """TypeError for a branch the Linen wrapper cannot own: an NNX module (it ran as a
    constant closure, its parameters outside the Linen variables, so never trained) or a
    module class instead of an instance (Flax's "Could not convert Dense(features=Array..."
    )."""
    if isinstance(branch, nnx.Module):
        raise TypeError(
            f"StochasticDepth (Linen) got an NNX module ({type(branch).__name__}) as its "
            f"branch, whose parameters Linen would neither see nor train: use "
            f"stochastic_depth_jax.nnx_layers.StochasticDepth (or DropPath) for NNX branches.")
    if isinstance(branch, type):
        raise TypeError(
            f"StochasticDepth got the class {branch.__name__} as its branch, not a module: "
            f"pass an instance, e.g. StochasticDepth({branch.__name__}(..., parent=None)).")


def _keep_stats_if_dropped(call: Callable[..., Array], gate: Array) -> Callable[..., Array]:
    """Wraps ``call`` so a dropped (gate 0) branch leaves its running statistics unchanged.

    The mask implementation computes a dropped branch; this keeps its semantics equal to
    skipping, where a dropped block's BatchNorm statistics are not updated (as in the
    official code).
    """
    saved = {}

    def save(tree):
        saved["old"] = tree
        return tree

    def restore(tree):
        return jax.tree_util.tree_map(lambda old, new: jnp.where(gate, new, old),
                                      saved["old"], tree)

    return nn.map_variables(call, "batch_stats", trans_in_fn=save, trans_out_fn=restore,
                            mutable=True)


def _call_branch(module: StochasticDepth, x: Array, *, args: tuple, kwargs: dict) -> Array:
    with reroute_flax_convs(module.reroute_convs):
        return module.branch(x, *args, **kwargs)


def _branch_output(module: StochasticDepth, call: Callable[..., Array], x: Array) -> Any:
    """Shape/dtype of ``call(module, x)`` (the branch's output) without running it.

    A branch with an ``output_struct(x)`` method (the library's own) says it; any other is
    traced abstractly on a copy of the wrapper's variables, so a branch whose output differs
    from its input in shape or dtype (strided, widening, bf16 compute on an f32 stream)
    works in a skipping ``cond`` as it is. Nothing is computed, no variable changes, and any
    rng stream the branch draws from gets a placeholder key.
    """
    if hasattr(module.branch, "output_struct"):
        return module.branch.output_struct(x)

    def shape_of(variables, v):
        run = nn.apply(call, module.clone(parent=None), mutable=True)
        return run(variables, v, rngs={"params": jax.random.key(0)})[0]

    return jax.eval_shape(shape_of, module.variables, x)


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _tag(y: Array, merge: int = 0) -> Array:
    """Names a convolution output so the ``'convs'`` remat policy can keep it.

    The value kept has the last ``merge + 1`` axes of ``y`` merged into one (a reshape: no
    copy in the row-major layout). Inside a scan each kept value is stacked into a buffer
    that is zero-filled every step, and XLA folds the fills of buffers of one shape and dtype
    into one that it then copies into each of the others; a branch gives its kept values
    different ``merge`` (and so shapes, also unlike the block input's) so that each buffer
    is filled on its own, without the copies.
    """
    if not merge:
        return checkpoint_name(y, "stochastic_depth_conv")
    kept = checkpoint_name(y.reshape(y.shape[:y.ndim - 1 - merge] + (-1,)),
                           "stochastic_depth_conv")
    return kept.reshape(y.shape)


class Dropout(nn.Module):
    """``nn.Dropout`` (the same rng, mask and scaling) drawing its mask from float32 uniforms
    whatever ``jax_enable_x64`` says: flax's draws from its Python-float keep probability,
    float64 uniforms under x64, another mask from the same key. Its class name is flax's,
    so its automatic name (``Dropout_0``), and with it the rng it folds in, are too."""

    rate: float
    deterministic: bool = False
    rng_collection: str = "dropout"

    def __call__(self, inputs: Array) -> Array:
        if self.rate == 0.0 or self.deterministic:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        keep_prob = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng(self.rng_collection),
                                    jnp.asarray(keep_prob, jnp.float32), inputs.shape)
        return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


class _Branch(nn.Module):
    """Shared fields of the residual branches (not public).

    ``dropout_rate > 0`` adds dropout between the branch's convolutions in training (as Wide
    ResNets do; rng stream ``'dropout'``); evaluation never drops. ``zero_init_last``: the
    branch starts as zero: its last BatchNorm scale starts at 0 (Goyal et al.), or in a
    pre-activation branch, which ends in a convolution, that convolution's kernel (as timm's
    ResNetV2; a zero scale before its ReLU would pass no gradient to the branch).
    """

    features: int
    strides: int = 1
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm
    act: Callable[[Array], Array] = nn.relu
    dtype: Any = None
    zero_init_last: bool = False
    dropout_rate: float = 0.0
    kernel_init: Callable[..., Array] = conv_kernel_init

    expansion = 1

    def output_struct(self, x: Array) -> jax.ShapeDtypeStruct:
        """Shape/dtype of the branch output for input ``x`` ``[batch, H, W, C]`` (under
        explicit sharding, the batch axis sharded as ``x``'s; inside ``shard_map``, varying
        over the mesh axes ``x`` varies over)."""
        b, h, w, _ = x.shape
        s = self.strides
        shape = (b, _conv_out(h, 3, s, 1), _conv_out(w, 3, s, 1), self.features * self.expansion)
        sharding = ops.explicit_sharding(x)
        if sharding is not None:
            batch = (tuple(sharding.spec) + (None,))[0]
            sharding = jax.sharding.NamedSharding(sharding.mesh,
                                                  jax.sharding.PartitionSpec(batch))
        return jax.ShapeDtypeStruct(shape, self.output_dtype(x), sharding=sharding,
                                    manual_axis_type=jax.typeof(x).manual_axis_type)

    def output_dtype(self, x: Array) -> Any:
        """The dtype the branch returns for input ``x``: ``dtype``, else the promotion of
        ``x``'s with its convolutions' parameters' (float32 by default), as the convolutions
        compute: a bfloat16 input gives a float32 output there, not a bfloat16 one. With a
        user's own ``conv`` or ``norm`` module, whose dtype rules may be others (a bfloat16
        kernel without a ``param_dtype`` field), the branch is traced abstractly instead
        (nothing computed, no variable created)."""
        if self.dtype is not None:
            return jnp.dtype(self.dtype)
        conv = self.conv(self.features, (1, 1), parent=None)
        if type(conv) in (Conv, nn.Conv) and type(self.norm(parent=None)) is BatchNorm:
            return jnp.result_type(x.dtype, conv.param_dtype)
        branch = self.clone(parent=None)
        run = functools.partial(branch.init_with_output, {"params": jax.random.key(0)},
                                train=False)
        return jax.eval_shape(run, jax.ShapeDtypeStruct(x.shape, x.dtype))[0].dtype

    def _conv(self, features: int, kernel: int, strides: int, name: str,
              last: bool = False) -> nn.Module:
        """``last``: the branch's output convolution (zero-initialised by ``zero_init_last``)."""
        pad = (kernel - 1) // 2  # Torch's symmetric padding, also for stride 2
        zero = last and self.zero_init_last
        return self.conv(
            features,
            (kernel, kernel),
            strides=(strides, strides),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            kernel_init=nn.initializers.zeros if zero else self.kernel_init,
            dtype=self.dtype,
            name=name,
        )

    def _dropout(self, y: Array, train: bool) -> Array:
        if not self.dropout_rate:
            return y
        return Dropout(self.dropout_rate, deterministic=not train)(y)

    def _last_norm(self, name: str) -> nn.Module:
        # Otherwise the norm's own scale_init (a model may give its norm another one).
        kw = {"scale_init": nn.initializers.zeros} if self.zero_init_last else {}
        return self.norm(dtype=self.dtype, name=name, **kw)


class BasicBranch(_Branch):
    """The paper's residual function f: conv3x3(stride)-BN-ReLU-conv3x3-BN.

    Input ``[batch, H, W, C_in]``; output ``[batch, H / stride, W / stride, features]``.
    """

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        y = _tag(self._conv(self.features, 3, self.strides, "conv1")(x), merge=2)
        y = self.act(self.norm(dtype=self.dtype, name="bn1")(y, train=train))
        y = _tag(self._conv(self.features, 3, 1, "conv2")(self._dropout(y, train)), merge=1)
        return self._last_norm("bn2")(y, train=train)


class PreActBranch(_Branch):
    """Pre-activation residual function (He et al., 2016b): BN-ReLU-conv3x3-BN-ReLU-conv3x3.

    Input ``[batch, H, W, C_in]``; output ``[batch, H / stride, W / stride, features]``.
    """

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        y = self.act(self.norm(dtype=self.dtype, name="bn1")(x, train=train))
        y = _tag(self._conv(self.features, 3, self.strides, "conv1")(y), merge=2)
        y = self.act(self.norm(dtype=self.dtype, name="bn2")(y, train=train))
        conv2 = self._conv(self.features, 3, 1, "conv2", last=True)
        return _tag(conv2(self._dropout(y, train)), merge=1)


class BottleneckBranch(_Branch):
    """Bottleneck residual function: 1x1-BN-ReLU-3x3(stride)-BN-ReLU-1x1(4x)-BN.

    Input ``[batch, H, W, C_in]``; output ``[batch, H / stride, W / stride, 4 * features]``.
    """

    expansion = 4

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        y = _tag(self._conv(self.features, 1, 1, "conv1")(x), merge=1)
        y = self.act(self.norm(dtype=self.dtype, name="bn1")(y, train=train))
        y = _tag(self._conv(self.features, 3, self.strides, "conv2")(y), merge=2)
        y = self.act(self.norm(dtype=self.dtype, name="bn2")(y, train=train))
        y = _tag(self._conv(self.features * 4, 1, 1, "conv3")(self._dropout(y, train)), merge=1)
        return self._last_norm("bn3")(y, train=train)


SHORTCUTS = ("A-avg", "A", "B")


class Shortcut(nn.Module):
    """The identity path of a residual block, made to match the branch's output.

    * ``'A-avg'``: ``s x s`` average pooling with stride ``s`` plus zero channel padding,
      parameter-free: the stochastic-depth paper's shortcut ("an average pooling layer
      followed by zero paddings", Sec. 4), as one version of the official Torch code's
      ``ResidualDrop.lua`` writes it (``SpatialAveragePooling(2, 2, 2, 2)``, ``nn.Padding``).
    * ``'A'``: stride-``s`` subsampling plus zero channel padding, parameter-free: the
      ResNet paper's option A as fb.resnet.torch writes it (a 1x1 pooling with stride
      ``s``); also the official ``ResidualDrop.lua``'s in its other versions, the one
      whose ``main.lua`` trains SVHN among them (``SpatialAveragePooling(1, 1, 2, 2)``:
      a 1x1 "average" with stride 2); and this library's ``'A'`` before ``'A-avg'``
      existed, so runs recorded with ``'A'`` evaluate as they trained.
    * ``'B'``: 1x1 convolution with stride ``s`` plus BatchNorm (projection).

    ``kind`` defaults to ``'A-avg'``, as :class:`ResidualBlock`'s ``shortcut``. Identity
    when the input already has the output's shape.
    """

    features: int
    strides: int = 1
    kind: str = "A-avg"
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm
    dtype: Any = None
    kernel_init: Callable[..., Array] = conv_kernel_init

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        """``[batch, H, W, C_in]`` -> ``[batch, H / strides, W / strides, features]``."""
        if self.kind not in SHORTCUTS:
            raise ValueError(f"Unknown shortcut {self.kind!r}; valid: {list(SHORTCUTS)}.")
        s = self.strides
        if s == 1 and x.shape[-1] == self.features:
            return x
        if self.kind == "B":
            y = self.conv(self.features, (1, 1), strides=(s, s), use_bias=False,
                          kernel_init=self.kernel_init, dtype=self.dtype, name="conv")(x)
            return self.norm(dtype=self.dtype, name="bn")(y, train=train)
        if self.features < x.shape[-1]:
            raise ValueError(
                f"Shortcut {self.kind!r} pads channels with zeros, so it cannot go from "
                f"{x.shape[-1]} to {self.features} channels; use shortcut='B'."
            )
        if self.kind == "A" or s == 1:
            y = x[:, ::s, ::s, :]
        else:  # an odd side's last window averages the pixels it has, as the branch's output
            y = nn.avg_pool(x, (s, s), strides=(s, s), padding="SAME", count_include_pad=False)
            y = y.astype(x.dtype)  # the pool's division by counts returned float32 for bf16
        return jnp.pad(y, ((0, 0), (0, 0), (0, 0), (0, self.features - x.shape[-1])))


class ResidualBlock(nn.Module):
    """``out = act(shortcut(x) + b * f(x))`` with f a branch and b a stochastic-depth gate.

    Attributes:
      features: branch width (output channels are ``features * branch_cls.expansion``).
      strides: spatial stride of the block (and its shortcut).
      branch_cls: the residual function, a ``_Branch`` subclass.
      shortcut: ``'A-avg'``, ``'A'`` or ``'B'`` (see :class:`Shortcut`).
      post_activation: apply ``act`` after the addition (True for the paper's blocks, False
        for pre-activation blocks).
      mode, scaling, implementation, remat: see :class:`StochasticDepth`.
      dropout_rate: dropout between the branch's convolutions in training (rng ``'dropout'``).
      has_branch: False for a block deleted from a pruned model: no branch parameters, no
        compute, ``out = act(shortcut(x))``, which is what the block computes when its gate
        is closed.
      kernel_init: initialiser of the branch's and a projection shortcut's convolutions
        (default :data:`conv_kernel_init`, He on fan-out).
    """

    features: int
    strides: int = 1
    branch_cls: ModuleDef = None  # type: ignore[assignment]
    shortcut: str = "A-avg"
    post_activation: bool = True
    mode: str = "batch"
    scaling: str = "test"
    implementation: str = "skip"
    remat: str = "convs"
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm
    act: Callable[[Array], Array] = nn.relu
    dtype: Any = None
    zero_init_last: bool = False
    dropout_rate: float = 0.0
    has_branch: bool = True
    kernel_init: Callable[..., Array] = conv_kernel_init

    @nn.compact
    def __call__(self, x: Array, survival_prob: Any = 1.0, gate: Any = None, *,
                 train: bool, stochastic: bool | None = None) -> Array:
        """Runs the block on ``x`` ``[batch, H, W, C]``.

        Args:
          survival_prob: p_l of this block (static or traced).
          gate: pre-drawn gate; in training drawn from the ``'stochastic_depth'`` stream if
            None and ``survival_prob`` is not a static 1. At evaluation a gate runs the block
            (scaled as at evaluation) only if open.
          train: training mode (gated, batch statistics) vs evaluation (all blocks, scaled).
          stochastic: gate the block as in training (default: ``train``). ``train=False,
            stochastic=True`` is one sampled sub-network with running statistics, for
            Monte-Carlo evaluation.
        """
        ops.check_deterministic(train, name="train")  # a traced flag: its own message, not Python's
        if stochastic is not None:
            ops.check_deterministic(stochastic, name="stochastic")
        stochastic = train if stochastic is None else stochastic
        branch = self.branch_cls(
            features=self.features, strides=self.strides, conv=self.conv, norm=self.norm,
            act=self.act, dtype=self.dtype, zero_init_last=self.zero_init_last,
            dropout_rate=self.dropout_rate, kernel_init=self.kernel_init, parent=None,
        )
        if not self.has_branch:
            out_features = self.features * self.branch_cls.expansion
            shortcut = Shortcut(out_features, self.strides, self.shortcut, conv=self.conv,
                                norm=self.norm, dtype=self.dtype,
                                kernel_init=self.kernel_init, name="shortcut")
            out = shortcut(x, train=train)
            # In the dtype of the block with its gate closed (shortcut + zeros of the
            # branch's dtype): a scanned stage's carry after a deleted first block must be.
            if hasattr(branch, "output_dtype"):
                out = out.astype(branch.output_dtype(x))
            return self.act(out) if self.post_activation else out
        if (stochastic and not train and gate is None and not self.is_initializing()
                and survival_prob is not None and not ops.is_static_one(survival_prob)):
            _check_gate_rng(self, monte_carlo=True)  # the wrapper's line would say training
        sd = StochasticDepth(
            branch, mode=self.mode, scaling=self.scaling, implementation=self.implementation,
            remat=self.remat, name="stochastic_depth",
        )
        y = sd(x, deterministic=not stochastic, survival_prob=survival_prob, gate=gate,
               train=train)
        shortcut = Shortcut(y.shape[-1], self.strides, self.shortcut, conv=self.conv,
                            norm=self.norm, dtype=self.dtype, kernel_init=self.kernel_init,
                            name="shortcut")
        out = shortcut(x, train=train).astype(y.dtype) + y
        return self.act(out) if self.post_activation else out


class BasicBlock(ResidualBlock):
    """The paper's block: ``relu(shortcut(x) + b * (conv-BN-ReLU-conv-BN)(x))``.

    ``[batch, H, W, C_in]`` -> ``[batch, H / strides, W / strides, features]``; fields and
    call (``survival_prob``, ``gate``, ``train``, ``stochastic``) as :class:`ResidualBlock`.
    """

    branch_cls: ModuleDef = BasicBranch


class PreActBlock(ResidualBlock):
    """Pre-activation block: ``shortcut(x) + b * (BN-ReLU-conv-BN-ReLU-conv)(x)``.

    ``[batch, H, W, C_in]`` -> ``[batch, H / strides, W / strides, features]``; fields and
    call as :class:`ResidualBlock` (no activation after the addition).
    """

    branch_cls: ModuleDef = PreActBranch
    post_activation: bool = False


class BottleneckBlock(ResidualBlock):
    """Bottleneck block with projection shortcut: ``relu(shortcut(x) + b * f(x))``.

    f is :class:`BottleneckBranch`; ``[batch, H, W, C_in]`` -> ``[batch, H / strides,
    W / strides, 4 * features]``; fields and call as :class:`ResidualBlock`.
    """

    branch_cls: ModuleDef = BottleneckBranch
    shortcut: str = "B"
