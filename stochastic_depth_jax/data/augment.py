"""On-device normalisation and augmentation, as pure functions of explicit keys.

Every example's augmentation is drawn from
    key_i = fold_in(fold_in(augment_key, step), i)
where i is the example's position in the *global* batch, so the result does not
depend on how many devices share the batch, and a resumed run repeats it exactly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from stochastic_depth_jax import errors

# 'translate': the shifts without the flip (digits, text: a mirrored 2 or R is no longer one).
AUGMENTATIONS = ("flip_translate", "translate", "none")
# Paper, Sec. 4 (CIFAR): "translation by up to 4 pixels" and horizontal flips, as the
# official code's own CIFAR loader draws them (a shift in [-4, 4] per axis, zero fill).
MAX_SHIFT = 4


def check_augment(name: str) -> str:
    """Returns `name` if it is a known augmentation, else raises naming the choices."""
    if name not in AUGMENTATIONS:
        raise errors.ConfigError(f"Unknown augment={name!r}; choose one of {AUGMENTATIONS}.")
    return name


def normalize(images: jax.Array, mean, std) -> jax.Array:
    """uint8 [..., H, W, C] pixels -> float32 (x - mean) / std, in [0, 255] units: mean and
    std broadcast ([C] each, or a mean image [H, W, C] and a scalar std)."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std


def translate(image: jax.Array, dy: jax.Array, dx: jax.Array,
              max_shift: int = MAX_SHIFT) -> jax.Array:
    """Shifts one image by (dy, dx) pixels, filling uncovered pixels with zeros.

    Args:
      image: [H, W, C].
      dy, dx: int32 scalars in [-max_shift, max_shift]; positive moves content
        down / right, i.e. out[y, x] = image[y - dy, x - dx].

    Returns:
      [H, W, C], same dtype. Equivalent to zero-padding by max_shift and taking
      a random crop, the usual "pad 4, crop 32" recipe.
    """
    height, width, _ = image.shape
    pad = ((max_shift, max_shift), (max_shift, max_shift), (0, 0))
    padded = jnp.pad(image, pad)
    # All three indices int32 (lax.dynamic_slice concatenates them): a Python 0 would be
    # int64 under jax_enable_x64.
    dy, dx = jnp.asarray(dy, jnp.int32), jnp.asarray(dx, jnp.int32)
    start = (max_shift - dy, max_shift - dx, jnp.zeros((), jnp.int32))
    return jax.lax.dynamic_slice(padded, start, image.shape[:2] + image.shape[2:])


def flip_translate(image: jax.Array, key: jax.Array,
                   max_shift: int = MAX_SHIFT, flip: bool = True) -> jax.Array:
    """Random horizontal flip (p = 0.5) then random translation of one image [H, W, C].

    The shift (dy, dx) is uniform on [-max_shift, max_shift]^2, i.e. one of the
    81 crops of the 4-pixel zero-padded image. ``flip=False`` ('translate'): the same
    shift for the same key, never mirrored.
    """
    # One draw of three words (not split + bernoulli + randint): a third of the
    # threefry code, which is most of this function's compile time.
    bits = jax.random.bits(key, (3,), jnp.uint32)
    if flip:
        image = jnp.where(bits[0] & 1, image[:, ::-1, :], image)
    # Modulo bias of 2**32 % 9 words in 2**32: below 1e-9, irrelevant.
    span = jnp.uint32(2 * max_shift + 1)
    dy, dx = ((bits[1:] % span).astype(jnp.int32) - max_shift)
    return translate(image, dy, dx, max_shift)


def example_keys(augment_key: jax.Array, step, positions: jax.Array) -> jax.Array:
    """Per-example keys [B] from (key, step, global batch position [B])."""
    step_key = jax.random.fold_in(augment_key, step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(positions)


def augment_batch(images: jax.Array, augment_key: jax.Array, step,
                  augment: str) -> jax.Array:
    """Augments a global batch.

    Args:
      images: float32 [B, H, W, C], already normalised (so the zero fill of a
        translation is the mean colour, or with normalization='pixel' the mean at that
        pixel, as in the official code).
      augment_key: a jax PRNG key.
      step: int scalar (may be traced).
      augment: 'flip_translate', 'translate' (no flip) or 'none'.

    Returns:
      float32 [B, H, W, C].
    """
    if check_augment(augment) == "none":
        return images
    keys = example_keys(augment_key, step, jnp.arange(images.shape[0]))
    flip = augment == "flip_translate"
    return jax.vmap(lambda image, key: flip_translate(image, key, flip=flip))(images, keys)
