"""The training state: everything a checkpoint must hold for an exact resume.

No random key lives here: per-step randomness is ``fold_in(base_key, step)`` (see
``step.py``), so the step counter is enough to continue the same random stream.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["TrainState", "EPOCH_SUMS", "zero_sums", "create_train_state", "checksum", "all_finite"]

# Per-epoch running sums kept on the device (no host sync per step) and checkpointed, so a
# run resumed mid-epoch reports the same epoch metrics as an uninterrupted one.
EPOCH_SUMS = ("loss", "errors", "examples", "steps", "grad_l2", "grad_mean_abs")


def zero_sums() -> dict[str, jax.Array]:
    """Zeroed epoch sums plus ``nonfinite_step`` (-1: no non-finite loss seen yet)."""
    sums = {k: jnp.zeros((), jnp.float32) for k in EPOCH_SUMS}
    sums["nonfinite_step"] = jnp.full((), -1, jnp.int32)
    return sums


class TrainState(flax.struct.PyTreeNode):
    """Model and optimiser state.

    Attributes:
      step: int32 scalar, number of updates applied so far.
      params: model parameters (pytree of float arrays).
      batch_stats: BatchNorm running statistics.
      opt_state: optax state (momentum buffers, schedule count).
      sums: epoch running sums, see ``EPOCH_SUMS`` and ``zero_sums``.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    sums: dict[str, jax.Array]


def create_train_state(
    model: Any,
    optimizer: optax.GradientTransformation,
    image_shape: tuple[int, int, int],
    key: jax.Array,
    sharding: jax.sharding.Sharding,
) -> TrainState:
    """Initialises a ``TrainState`` directly with ``sharding`` (e.g. replicated).

    Args:
      model: a Flax Linen module taking ``x [batch, H, W, C]`` and ``train``.
      optimizer: the optax transformation.
      image_shape: ``(H, W, C)``.
      key: PRNG key for parameter initialisation.
      sharding: sharding of every leaf of the state.
    """

    def init(key):
        x = jnp.zeros((1, *image_shape), jnp.float32)
        variables = model.init({"params": key}, x, train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=optimizer.init(params),
            sums=zero_sums(),
        )

    return jax.jit(init, out_shardings=sharding)(key)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Position-weighted wrapping uint32 sum of the bits of ``x`` (exact, order-free)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32).ravel()
    weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(words * weights, dtype=jnp.uint32)


@jax.jit
def _checksum(tree: Any) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    total = jnp.zeros((), jnp.uint32)
    for i, leaf in enumerate(leaves):
        total = total * jnp.uint32(31) + _leaf_checksum(leaf) + jnp.uint32(i)
    return total


def checksum(tree: Any) -> int:
    """An integer fingerprint of every bit of ``tree``; independent of sharding and devices.

    Integer sums are associative, so the value does not depend on the reduction order (device
    count, process count): a checkpoint saved by 8 devices verifies on 1.
    """
    value = _checksum(tree)
    return int(np.asarray(value.addressable_data(0)))


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def all_finite(tree: Any) -> bool:
    """True if no floating-point leaf of ``tree`` holds a NaN or an infinity."""
    return bool(np.asarray(_all_finite(tree).addressable_data(0)))
