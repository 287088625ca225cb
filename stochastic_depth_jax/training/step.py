"""Jit-compiled train and eval steps, sharded over a 1-D ``'data'`` mesh.

The train step draws its own batch from the device-resident split (no host round trip),
splits it along ``'data'`` and keeps every parameter replicated; XLA inserts the gradient
all-reduce and the cross-device BatchNorm statistics, so the result is that of one big
device: the same for 1 or 8 devices (to float rounding) and across processes.

Randomness per step: stochastic-depth gates use ``fold_in(gate_key, step)``; batch order
and augmentation are pure functions of ``(data_key, step)`` (``data.train_batch``). Every
device therefore drops the same blocks, and a resumed run repeats the same draws.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stochastic_depth_jax import data as data_lib
from stochastic_depth_jax import models
from stochastic_depth_jax.conv import cpu_compiler_options
from stochastic_depth_jax.ops import draw_gates
from stochastic_depth_jax.training import compilation, distributed
from stochastic_depth_jax.training import state as state_lib

__all__ = [
    "StepKeys",
    "make_train_step",
    "make_eval_step",
    "step_gates",
    "dropout_key",
    "CompactTrainStep",
    "FIRST_CONV",
]

# The paper's Fig. 7 tracks the gradient magnitude at the first convolution.
FIRST_CONV = ("stem_conv", "kernel")


@dataclasses.dataclass(frozen=True)
class StepKeys:
    """The run's base keys, all derived from ``config.seed``."""

    init: jax.Array
    data: jax.Array
    gates: jax.Array

    @classmethod
    def from_seed(cls, seed: int, init_impl: str = "threefry2x32") -> "StepKeys":
        """Keys for ``seed``; the init key may use another PRNG implementation.

        Gates and augmentation always use threefry, whose bits do not depend on sharding. The
        init runs replicated, so any implementation gives the same parameters on every device
        count; ``'rbg'`` compiles in seconds where threefry takes ~30 s on XLA:CPU.
        """
        _, data, gates = jax.random.split(jax.random.key(seed), 3)
        init = jax.random.fold_in(jax.random.key(seed, impl=init_impl), 0)
        return cls(init, data, gates)


def _first_conv_grad(grads: Any) -> jax.Array:
    node = grads
    for name in FIRST_CONV:
        node = node[name]
    return node


def _accumulate(
    sums: dict,
    step: jax.Array,
    steps_per_epoch: int,
    loss: jax.Array,
    errors: jax.Array,
    batch: int,
    g: jax.Array,
) -> dict:
    """Adds one step to the epoch sums, restarting them at the first step of an epoch."""
    fresh = step % steps_per_epoch == 0
    new = {k: jnp.where(fresh, 0.0, v) for k, v in sums.items() if k != "nonfinite_step"}
    new["loss"] += loss
    new["errors"] += errors
    new["examples"] += batch
    new["steps"] += 1
    new["grad_l2"] += jnp.sqrt(jnp.sum(jnp.square(g)))
    new["grad_mean_abs"] += jnp.mean(jnp.abs(g))
    bad = sums["nonfinite_step"]
    new["nonfinite_step"] = jnp.where((bad < 0) & ~jnp.isfinite(loss), step, bad)
    return new


def make_train_step(
    model: Any,
    optimizer: optax.GradientTransformation,
    *,
    keys: StepKeys,
    mesh: jax.sharding.Mesh,
    batch_size: int,
    steps_per_epoch: int,
    mean: Any,
    std: Any,
    augment: str,
    compact_multiple: int = 0,
    compact_lengths: int = 0,
    label_smoothing: float = 0.0,
) -> Callable[..., state_lib.TrainState]:
    """Returns ``train_step(state, train_split) -> state`` (jitted, state donated).

    On CPU it is jitted with :func:`~stochastic_depth_jax.conv.cpu_compiler_options`, which
    JAX accepts on a top-level jit only: compile it with ``train_step.lower(...).compile()``
    rather than wrapping it in another ``jax.jit``.

    With ``compact_multiple > 0`` or ``compact_lengths > 0`` it returns a
    :class:`CompactTrainStep` instead, called as
    ``train_step(state, train_split, step)`` with the host's step number: the gates are drawn
    on the host and the model runs in compact mode (no conditionals; see
    ``CifarResNet.compact_buckets``). Both forms draw the same gates,
    ``draw_gates(fold_in(gate_key, step), p)``, so they train identically.

    Models whose class sets ``takes_gates = True`` (``CifarResNet``, ``ResNet``) get all
    their gates, drawn up front, as ``gates=`` (and ``buckets=`` in compact mode); any
    other model (the ViT) draws its own from the ``'stochastic_depth'`` rng stream, which
    is ``fold_in(gate_key, step)`` for every model.

    Args:
      model: a Linen module, ``apply(variables, x [B, H, W, C], train=True, ...)``.
      optimizer: optax transformation (weight decay included).
      keys: the run's keys; mesh: the data mesh (``batch_size`` must divide by its size).
      batch_size: global batch; steps_per_epoch: for the epoch sums.
      mean, std: normalisation (``[C]`` each, or ``[H, W, C]`` and a scalar with
        ``normalization='pixel'``); augment: ``data.AUGMENTATIONS`` name.
      compact_multiple: > 0 for compact mode (models with ``compact_buckets`` only), each
        stage's scan length rounded up to a multiple of this.
      compact_lengths: > 0 for compact mode with this many scan lengths per stage, chosen
        for the model's survival probabilities (``model.compact_lengths``); exclusive with
        ``compact_multiple``.
      label_smoothing: cross-entropy against ``(1 - s) one_hot + s / classes``.

    The loss (mean cross-entropy over the global batch), errors and the first-conv
    gradient norms are added to ``state.sums`` on the device.
    """
    distributed.check_batch_size(batch_size, mesh)
    replicated = distributed.replicated(mesh)
    compact = compact_multiple or compact_lengths
    if compact_multiple and compact_lengths:
        raise ValueError(f"compact_multiple={compact_multiple} and compact_lengths="
                         f"{compact_lengths} both ask for compact mode: set one of them to 0.")
    if compact and not hasattr(model, "compact_buckets"):
        what = (f"compact_multiple={compact_multiple}" if compact_multiple
                else f"compact_lengths={compact_lengths}")
        raise ValueError(f"{what} needs a model with compact mode (CifarResNet); "
                         f"{type(model).__name__} has none: set it to 0.")

    def train_step(state: state_lib.TrainState, split: data_lib.DeviceSplit, gates=None,
                   buckets=None):
        images, labels = data_lib.train_batch(
            split, keys.data, state.step, batch_size=batch_size, mean=mean, std=std, augment=augment
        )
        images = jax.lax.with_sharding_constraint(images, distributed.batch_sharded(mesh))
        gate_key = jax.random.fold_in(keys.gates, state.step)
        extra = {}
        if _takes_gates(model):
            extra["gates"] = step_gates(model, keys.gates, state.step, batch_size) \
                if gates is None else gates
            extra["buckets"] = buckets

        def loss_fn(params):
            # Buckets computed from these gates (StepDraws): no run-time check in the step.
            with models.buckets_fitted():
                return _loss(params)

        def _loss(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                rngs={
                    "stochastic_depth": gate_key,
                    "dropout": dropout_key(keys, state.step),  # used only if dropout_rate > 0
                },
                mutable=["batch_stats"],
                **extra,
            )
            logits = logits.astype(jnp.float32)
            loss = cross_entropy(logits, labels, label_smoothing).mean()
            return loss, (logits, updates.get("batch_stats", {}))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        errors = jnp.sum(jnp.argmax(logits, -1) != labels).astype(jnp.float32)
        sums = _accumulate(
            state.sums,
            state.step,
            steps_per_epoch,
            loss,
            errors,
            batch_size,
            _first_conv_grad(grads),
        )
        return state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
            sums=sums,
        )

    if compact and float(model.final_survival_prob) < 1.0:  # constant: nothing to compact
        jitted = jax.jit(train_step, out_shardings=replicated, donate_argnums=0,
                         static_argnums=3, compiler_options=cpu_compiler_options())
        if compact_lengths:
            lengths = model.compact_lengths(compact_lengths)
            bucketing = functools.partial(model.compact_buckets, lengths=lengths)
        else:
            bucketing = functools.partial(model.compact_buckets, multiple=compact_multiple)
        return CompactTrainStep(jitted, model, keys.gates, bucketing, batch_size, mesh)
    return jax.jit(train_step, out_shardings=replicated, donate_argnums=0,
                   compiler_options=cpu_compiler_options())


# Stream id folded into the gate key for dropout (Wide ResNets), so dropout masks are
# independent of the gates and, like them, a function of the step only.
DROPOUT_STREAM = 0x64726F70


def dropout_key(keys: StepKeys, step: Any) -> jax.Array:
    """The step's dropout key: ``fold_in(fold_in(gate_key, DROPOUT_STREAM), step)``."""
    return jax.random.fold_in(jax.random.fold_in(keys.gates, DROPOUT_STREAM), step)


def _takes_gates(model: Any) -> bool:
    """True for models that take all their gates, pre-drawn, as ``gates=``."""
    return getattr(model, "takes_gates", False)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
    """Per-example cross-entropy, float ``[batch]``; labels int ``[batch]``.

    With ``label_smoothing`` s > 0 the target is ``(1 - s) one_hot + s / num_classes``.
    Computed in float32 at least (bfloat16 logits are cast up; float64 ones stay).
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    # One-hot in the logits' dtype (the default float is float64 under jax_enable_x64).
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    targets = optax.smooth_labels(one_hot, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def step_gates(model: Any, gate_key: jax.Array, step: Any, batch_size: int) -> Any:
    """The step's gates, bool ``[L]`` (``[L, batch]`` in sample mode); None at constant depth.

    A function of ``fold_in(gate_key, step)`` only: the same on every device, process and
    resume.
    """
    if float(model.final_survival_prob) == 1.0:
        return None
    return draw_gates(jax.random.fold_in(gate_key, step), model.survival_probs(),
                      mode=model.mode, batch_size=batch_size)


class CompactTrainStep:
    """A train step in compact mode: gates drawn on the host, one program per bucket tuple.

    ``__call__(state, split, step)`` with ``step`` = ``state.step`` as a host integer (the
    loop knows it without reading the device). The gates come from the host's CPU backend,
    bit-identical to the device draw (threefry), so every process picks the same buckets.

    Attributes:
      compile_s: seconds spent tracing, lowering and compiling (or loading from the
        persistent cache) the programs of the bucket tuples drawn so far. A tuple is first
        drawn inside an epoch's steps: the trainer keeps these seconds out of the epoch's
        ``epoch_time_s`` and images/s, as it keeps the other programs' compilation, done
        before the first epoch.
    """

    def __init__(self, jitted, model, gate_key, bucketing, batch_size, mesh):
        self._jitted, self._bucketing = jitted, bucketing  # bucketing: host gates -> buckets
        cpu = jax.local_devices(backend="cpu")[0]
        self._key = jax.device_put(gate_key, cpu)
        self._draw = jax.jit(lambda k, s: step_gates(model, k, s, batch_size))
        self._replicated = distributed.replicated(mesh)
        self.compile_s = 0.0
        self._drawn: set = set()  # the bucket tuples whose program exists

    def __call__(self, state: state_lib.TrainState, split: data_lib.DeviceSplit, step: int):
        gates = np.asarray(self._draw(self._key, np.int32(step)))
        buckets = self._bucketing(gates)
        gates = jax.device_put(gates, self._replicated)
        if buckets in self._drawn:
            return self._jitted(state, split, gates, buckets)
        # A new tuple: its program compiles now. The steps dispatched before it finish
        # first, so the seconds counted are a stall of the device, not the queue's work;
        # another thread's compiles meanwhile (an async checkpoint's) stall no step.
        jax.block_until_ready(state)
        with compilation.CompileStats(this_thread=True) as stats:
            state = self._jitted(state, split, gates, buckets)
        self.compile_s += stats.compile_s + stats.trace_and_lower_s
        self._drawn.add(buckets)
        return state


def make_eval_step(
    model: Any, mesh: jax.sharding.Mesh
) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
    """Returns ``eval_step(state, images, labels, mask) -> (loss_sum, error_sum, count)``.

    ``train=False``: every block active, residuals scaled as configured. Padded examples
    (``mask`` False) count nowhere. Shapes: images [B, H, W, C], labels int32 [B], mask
    bool [B]; outputs are float32 scalars, replicated.
    """

    def eval_step(state, images, labels, mask):
        images = jax.lax.with_sharding_constraint(images, distributed.batch_sharded(mesh))
        logits = model.apply(
            {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
        ).astype(jnp.float32)
        weight = mask.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        errors = (jnp.argmax(logits, -1) != labels).astype(jnp.float32)
        return jnp.sum(loss * weight), jnp.sum(errors * weight), jnp.sum(weight)

    return jax.jit(eval_step, out_shardings=distributed.replicated(mesh))
