"""Device-resident datasets: placement, training batches and masked evaluation batches.

The whole uint8 split lives on the accelerator (as in airbench / hlb-CIFAR10), so a
training batch is a gather plus a few elementwise ops inside the jitted train step:
no host round trip per step.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from stochastic_depth_jax import errors
from stochastic_depth_jax.data import augment as augment_lib
from stochastic_depth_jax.data import order
from stochastic_depth_jax.data.splits import Split

DATA_AXIS = "data"
# Replicate below this size (CIFAR: 150 MB); shard above it (SVHN train: 1.8 GB),
# so a small-memory accelerator still holds SVHN. Override with `shard=`.
DEFAULT_SHARD_THRESHOLD_BYTES = 1 << 30
# Tags that give the example order and the augmentation independent key streams.
_ORDER_TAG, _AUGMENT_TAG = 0, 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceSplit:
    """A split placed on the devices of a mesh.

    Attributes:
      images: uint8 jax.Array [N_padded, H, W, C]; replicated, or sharded over the
        mesh axis 'data' along N (then padded with zero images to a multiple of
        the axis size; padding is never sampled or evaluated).
      labels: int32 jax.Array [N_padded].
      num_examples: N, the real number of examples (static).
      mesh: the mesh the arrays live on (static).
    """
    images: jax.Array
    labels: jax.Array
    num_examples: int = dataclasses.field(metadata=dict(static=True))
    mesh: Mesh = dataclasses.field(metadata=dict(static=True))

    def __len__(self) -> int:
        return self.num_examples

    @property
    def sharded(self) -> bool:
        """True if the examples are split over the 'data' axis rather than replicated."""
        return self.images.sharding.spec[:1] == (DATA_AXIS,)


def _check_mesh(mesh: Mesh) -> None:
    if DATA_AXIS not in mesh.axis_names:
        raise errors.ConfigError(f"The mesh needs an axis named {DATA_AXIS!r}; it has "
                                 f"{mesh.axis_names}. Build it e.g. with jax.make_mesh((n,), "
                                 f"('data',), axis_types=(jax.sharding.AxisType.Auto,)).")


def put_on_devices(split: Split, mesh: Mesh, *, shard: bool | None = None,
                   shard_threshold_bytes: int = DEFAULT_SHARD_THRESHOLD_BYTES
                   ) -> DeviceSplit:
    """Places a host split on the mesh once, as uint8.

    Args:
      split: host Split, images uint8 [N, H, W, C], labels int32 [N].
      mesh: a Mesh with an axis 'data' (Auto axis type).
      shard: True to split the examples over 'data' (each device holds N / D),
        False to replicate, None to shard only if images exceed
        `shard_threshold_bytes`.

    Returns:
      DeviceSplit. Works across processes: each process supplies its devices'
      slices from its own full host copy.
    """
    _check_mesh(mesh)
    if shard is None:
        shard = split.images.nbytes > shard_threshold_bytes
    images, labels = split.images, split.labels.astype(np.int32)
    spec, rows = P(), len(split)
    if shard:  # padded with zero examples to a multiple of the axis size (SVHN on 8 devices)
        spec, rows = P(DATA_AXIS), len(split) + -len(split) % mesh.shape[DATA_AXIS]

    def place(array: np.ndarray) -> jax.Array:
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback((rows,) + array.shape[1:], sharding,
                                            lambda index: _padded_rows(array, rows, index))

    return DeviceSplit(place(images), place(labels), len(split), mesh)


def _padded_rows(array: np.ndarray, rows: int, index: tuple) -> np.ndarray:
    """``array`` padded with zero rows to ``rows``, at ``index`` (a device's shard): only
    that shard is copied. A padded copy of the whole split first (np.concatenate) held
    it twice in host memory while it was placed (1.8 GB more for SVHN's train split on 8
    devices, whose 598,388 examples do not divide by 8)."""
    start, stop, _ = index[0].indices(rows)
    real = array[start:min(stop, len(array))][(slice(None),) + tuple(index[1:])]
    missing = stop - max(start, len(array))
    if missing <= 0:
        return real
    return np.concatenate([real, np.zeros((missing,) + real.shape[1:], array.dtype)])


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full training batches per epoch; the incomplete tail of each epoch is dropped."""
    if batch_size <= 0 or num_examples < batch_size:
        raise errors.DataError(f"batch_size={batch_size} needs 0 < batch_size <= the "
                               f"{num_examples} training examples: use a batch_size from 1 "
                               f"to {num_examples} (or more training data).")
    return num_examples // batch_size


def _shard_batch(x: jax.Array, mesh: Mesh) -> jax.Array:
    """Asks for the batch dimension to be split over 'data' when it divides evenly."""
    if x.shape[0] % mesh.shape[DATA_AXIS]:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(DATA_AXIS)))


def _gather(dev: DeviceSplit, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Examples at int32 indices [B] -> (uint8 [B, H, W, C], int32 [B])."""
    # For a sharded split, XLA partitions this gather as masked local gathers
    # plus a reduction of the [B, ...] result; the full split is never gathered.
    return dev.images[indices], dev.labels[indices]


def _epoch_key(key: jax.Array, epoch) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(key, _ORDER_TAG), epoch)


def epoch_order(key: jax.Array, epoch, num_examples: int) -> jax.Array:
    """The whole example order of one epoch: int32 [N], a permutation of 0..N-1.

    train_batch evaluates the same permutation only at its batch's positions.
    """
    return order.permute(_epoch_key(key, epoch), jnp.arange(num_examples), num_examples)


def train_batch(dev: DeviceSplit, key: jax.Array, step, *, batch_size: int,
                mean, std, augment: str) -> tuple[jax.Array, jax.Array]:
    """One training batch, a pure function of (key, step); jit-able, step may be traced.

    epoch = step // steps_per_epoch; the batch is slice `step % steps_per_epoch`
    of `epoch_order(key, epoch)` (a keyed permutation, see order.py), so every epoch
    visits N - N % batch_size distinct examples (the incomplete last batch is dropped).
    Augmentation keys are fold_in(fold_in(k, step), i) with i the position in the
    global batch: identical on 1, 2 or 8 devices.

    Args:
      dev: DeviceSplit from put_on_devices.
      key: jax PRNG key (the run's data key).
      step: int scalar, global step from 0.
      batch_size: global batch size (static).
      mean, std: in [0, 255] pixel units (Dataset.mean / .std: [C], or [H, W, C] and ()).
      augment: a ``data.AUGMENTATIONS`` name (static).

    Returns:
      images float32 [batch, H, W, C] normalised and augmented, labels int32
      [batch]; sharded over 'data' when batch_size divides by its size.
    """
    per_epoch = steps_per_epoch(dev.num_examples, batch_size)
    step = jnp.asarray(step, jnp.int32)
    positions = (step % per_epoch) * batch_size + jnp.arange(batch_size)
    indices = order.permute(_epoch_key(key, step // per_epoch), positions, dev.num_examples)
    images, labels = _gather(dev, indices)
    images = augment_lib.normalize(images, mean, std)
    augment_key = jax.random.fold_in(key, _AUGMENT_TAG)
    images = augment_lib.augment_batch(images, augment_key, step, augment)
    return _shard_batch(images, dev.mesh), _shard_batch(labels, dev.mesh)


def eval_plan(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which example fills each evaluation slot.

    Returns:
      indices int32 [num_batches, batch_size] and mask bool [num_batches,
      batch_size]; the masked-in indices are 0..N-1, each exactly once (the
      last batch is padded with copies of example 0, masked out).
    """
    if batch_size <= 0:
        raise errors.ConfigError(f"batch_size must be positive, got {batch_size}.")
    num_batches = -(-num_examples // batch_size)
    flat = np.arange(num_batches * batch_size, dtype=np.int32)
    mask = flat < num_examples
    indices = np.where(mask, flat, 0).astype(np.int32)
    return indices.reshape(num_batches, batch_size), mask.reshape(num_batches, batch_size)


@jax.jit
def _eval_batch(dev: DeviceSplit, indices: jax.Array, mask: jax.Array, mean, std):
    images, labels = _gather(dev, indices)
    images = augment_lib.normalize(images, mean, std)
    return (_shard_batch(images, dev.mesh), _shard_batch(labels, dev.mesh),
            _shard_batch(mask, dev.mesh))


def eval_batches(dev: DeviceSplit, *, batch_size: int, mean, std,
                 with_indices: bool = False) -> Iterator[tuple[jax.Array, ...]]:
    """Yields evaluation batches covering every example exactly once, in order.

    Args:
      dev: DeviceSplit.
      batch_size: global batch size; the last batch is padded to it.
      mean, std: [0, 255] units (Dataset.mean / .std).
      with_indices: also yield the int32 [batch] example indices (for checks).

    Yields:
      (images float32 [batch, H, W, C] normalised, labels int32 [batch],
      mask bool [batch]) and, if with_indices, indices int32 [batch]. Sum the
      metrics with `mask` as weights; mask.sum() over all batches == len(dev).
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    for indices, mask in zip(*eval_plan(dev.num_examples, batch_size)):
        batch = _eval_batch(dev, jnp.asarray(indices), jnp.asarray(mask), mean, std)
        yield batch + (indices,) if with_indices else batch
