"""Host-side dataset containers and the paper's train/validation splits.

Splits are deterministic functions of an integer seed (numpy PCG64), so a run's
validation set can be rebuilt from its config alone.
"""
from __future__ import annotations

import dataclasses
import numbers

import numpy as np
from stochastic_depth_jax import errors

# Paper, Sec. 4: "we hold out 5,000 training images as validation" for CIFAR.
CIFAR_VALIDATION_FRACTION = 5000 / 50000
# Paper, Sec. 4 (following Sermanet et al. / Goodfellow et al.): 400 per class from
# train and 200 per class from extra form SVHN's validation set of 6,000.
SVHN_VALIDATION_PER_CLASS = (400, 200)


@dataclasses.dataclass(frozen=True)
class Split:
    """A split held in host memory.

    Attributes:
        images: uint8 [N, H, W, C], raw pixels in [0, 255].
        labels: int32 [N].
    """
    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        """Refuses, in one line with the fix, what the pipeline would misread: float pixels
        (normalised as if in [0, 255]), and labels that are not class indices (float labels
        were truncated to int32 when placed on the devices; a negative one trained as no
        class at all). Labels (or pixels) given as a list are kept as the array checked:
        a list passed the checks, then failed later with a traceback (``labels == c``)."""
        images, labels = np.asarray(self.images), np.asarray(self.labels)
        for field, array in (("images", images), ("labels", labels)):
            if not isinstance(getattr(self, field), np.ndarray):
                object.__setattr__(self, field, array)  # frozen
        if images.dtype != np.uint8 or images.ndim != 4:
            raise errors.DataError(
                f"Split.images must be uint8 [N, H, W, C] pixels in [0, 255], got "
                f"{images.dtype} {images.shape}; convert them first (floats in [0, 1]: "
                f"np.round(x * 255).astype(np.uint8); grayscale [N, H, W]: x[..., None]).")
        if labels.shape != (images.shape[0],):
            raise errors.DataError(f"Split.labels must be [N={images.shape[0]}], got "
                                   f"{labels.shape}.")
        if labels.dtype.kind not in "iu":
            raise errors.DataError(
                f"Split.labels must be integer class indices, got {labels.dtype}; convert "
                f"them (e.g. labels.astype(np.int32)) after checking that they are whole.")
        if labels.size and labels.min() < 0:
            raise errors.DataError(
                f"Split.labels must be class indices from 0, got {labels.min()}; number the "
                f"classes 0, 1, ..., num_classes - 1.")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, indices: np.ndarray) -> "Split":
        """Returns the examples at `indices` (int [K]) as a new Split of length K."""
        return Split(self.images[indices], self.labels[indices].astype(np.int32))


def concatenate(*splits: Split) -> Split:
    """Joins splits end to end (e.g. SVHN train + extra)."""
    return Split(np.concatenate([s.images for s in splits]),
                 np.concatenate([s.labels for s in splits]).astype(np.int32))


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def resolve_count(validation_size: int | float, num_examples: int, least: int = 1,
                  most: int | None = None, why_most: str = "") -> int:
    """Turns a count (int) or fraction (float in [0, 1)) into a number of examples;
    ``least``: the smallest count a refusal suggests (SVHN's per-class split: one a class);
    ``most``: the largest count the caller can hold out (default ``num_examples - 1``; a
    per-class hold-out keeps one example of each class), ``why_most`` saying why. A refusal
    suggests only a count and a fraction that hold out from ``least`` to ``most``.

    NumPy scalars count by their kind (``np.int64(5)`` a count, ``np.float32(0.1)`` a
    fraction: ``int()`` truncated it to 0, silently no validation set); a bool or a string
    is refused rather than read as 1 or parsed."""
    if isinstance(validation_size, bool) or not isinstance(validation_size, numbers.Real):
        raise errors.DataError(
            f"validation_size={validation_size!r} must be a count (an int such as 5000), a "
            f"fraction (a float in [0, 1) such as 0.1), 0 for no validation set, or None for "
            f"the paper's split.")
    bounded = most is not None and most < num_examples - 1
    most = num_examples - 1 if most is None else min(most, num_examples - 1)
    fix = lambda kind, why=why_most: _what_works(num_examples, least, most, why, kind, bounded)
    if not isinstance(validation_size, numbers.Integral):
        validation_size = float(validation_size)
        if not 0.0 <= validation_size < 1.0:
            count = (f" as an int ({int(validation_size)})" if validation_size >= 1
                     and validation_size.is_integer() else "")  # 5000.0 from a JSON file
            raise errors.DataError(
                f"validation_size={validation_size} as a fraction must be in [0, 1); pass a "
                f"fraction such as 0.1, a count{count or ' (an int)'}, or 0 for no validation "
                f"set.")
        count = _count_of(validation_size, num_examples)
        if validation_size > 0 and not 0 < count < num_examples:
            raise errors.DataError(
                f"validation_size={validation_size} of the {num_examples} training examples "
                f"holds out {count}, leaving {num_examples - count} to train on; "
                f"{fix('another fraction')}.")
        kind = "a smaller fraction"
    else:
        count = int(validation_size)
        if not 0 <= count < num_examples:
            raise errors.DataError(
                f"validation_size={count} must be >= 0 and smaller than the {num_examples} "
                f"training examples; {fix('a smaller count')}.")
        kind = "a smaller count"
    if count > most:  # only a caller's bound: the others are refused above
        raise errors.DataError(
            f"validation_size={validation_size} holds out {count} of the {num_examples} "
            f"training examples, more than the {most} that can be ({why_most}); "
            f"{fix(kind, why='')}.")
    return count


def _count_of(fraction: float, num_examples: int) -> int:
    """The examples a fraction of ``num_examples`` holds out (:func:`resolve_count`'s)."""
    return int(round(fraction * num_examples))


def _what_works(num_examples: int, least: int, most: int, why_most: str, kind: str,
                bounded: bool) -> str:
    """The fix of a refused validation size: a count and a fraction that hold out from
    ``least`` to ``most`` of ``num_examples`` (``kind``: the refused one's; ``bounded``:
    ``most`` is the caller's, said), or, where none does, 0 alone."""
    if most < least:
        because = f" ({why_most})" if why_most else ""
        return (f"no validation set can be held out of them{because}: pass 0 for no "
                "validation set")
    fractions = [0.1] + [round(least / num_examples, digits) for digits in range(1, 7)]
    fraction = next((f for f in fractions
                     if 0 < f < 1 and least <= _count_of(f, num_examples) <= most), None)
    as_fraction = f" such as {fraction}" if fraction is not None else ""
    limit = f" (at most {most} here)" if bounded else ""
    if kind == "a smaller count":
        return (f"pass a smaller count{limit}, a fraction{as_fraction}, or 0 for no "
                "validation set")
    return f"pass {kind}{as_fraction}, a count such as {least}{limit}, or 0 for no validation set"


# How a validation set is held out of the training split (recorded in run.json's data):
# 'random': uniformly at random (the paper's CIFAR protocol; image folders before per_class);
# 'per_class': each class in proportion to its size (image folders now).
HOLDOUTS = ("random", "per_class")


def holdout(split: Split, validation_size: int | float | None, seed: int,
            method: str = "random") -> tuple[Split, Split | None]:
    """Holds out a validation set: uniformly at random (the paper's CIFAR protocol) or
    per class (:func:`per_class_counts`).

    Args:
        split: the full training split, N examples.
        validation_size: count (int), fraction (float) or None for the paper's
            10% (5,000 of CIFAR's 50,000). 0 gives no validation set.
        seed: integer seed; the same seed always selects the same examples.
        method: one of HOLDOUTS.

    Returns:
        (train, validation): disjoint, together exactly `split`; each keeps the
        original example order. validation is None when its size is 0.
    """
    if method not in HOLDOUTS:
        raise errors.DataError(f"holdout={method!r}; valid: {list(HOLDOUTS)}.")
    if validation_size is None:
        validation_size = CIFAR_VALIDATION_FRACTION
    if method == "random":
        count = resolve_count(validation_size, len(split))
    else:
        sizes = np.bincount(split.labels)
        room = int(np.maximum(sizes - 1, 0).sum())  # the fix suggested must not exceed it
        count = resolve_count(validation_size, len(split), most=room, why_most=(
            "a per-class hold-out keeps one example of each class to train on"
            + ("" if room else ", and no class has more than one")))
    if count == 0:
        return split, None
    held = np.zeros(len(split), bool)
    rng = _rng(seed)
    if method == "random":
        held[rng.permutation(len(split))[:count]] = True
    else:
        members = np.split(np.argsort(split.labels, kind="stable"), np.cumsum(sizes)[:-1])
        for label, take in enumerate(per_class_counts(sizes, count, rng)):
            held[rng.permutation(members[label])[:take]] = True
    return split.take(np.flatnonzero(~held)), split.take(np.flatnonzero(held))


def per_class_counts(sizes: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """How many of each class's `sizes[c]` examples a per-class hold-out of `count` takes.

    Largest remainders: class c gets floor(count * sizes[c] / N); the seats left go one each
    to the classes with the largest fractional parts (ties in a seeded random order), so the
    total is exactly `count`. Every class keeps at least one training example: a class of
    one example gives none, and a seat a class cannot give goes to the next in that order.

    Raises:
        errors.DataError: `count` leaves some class without a training example.
    """
    sizes = np.asarray(sizes, np.int64)
    room = np.maximum(sizes - 1, 0)  # what a class can give and keep one to train on
    if count > room.sum():
        raise errors.DataError(
            f"A per-class validation set of {count} of the {sizes.sum()} training examples "
            f"would leave a class without a training example (each class keeps one, so at "
            f"most {room.sum()} can be held out); pass "
            f"{'a smaller validation_size' if room.sum() else '0 for no validation set'}.")
    quota = count * sizes / sizes.sum()
    taken = np.minimum(np.floor(quota).astype(np.int64), room)
    tie_order = rng.permutation(sizes.size)
    order = tie_order[np.argsort(-(quota - taken)[tie_order], kind="stable")]
    while taken.sum() < count:  # one pass, unless a class's cap (room) turns seats away
        for c in order:
            if taken.sum() < count and taken[c] < room[c]:
                taken[c] += 1
    return taken


def _per_class_holdout(labels: np.ndarray, per_class: int, num_classes: int,
                       rng: np.random.Generator, source: str, most: int) -> np.ndarray:
    """Boolean [N] mask choosing `per_class` random examples of every class; ``most``: the
    largest SVHN validation_size the data holds (:func:`_most_svhn_validation`), named
    where `per_class` is too many."""
    held = np.zeros(labels.shape[0], bool)
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if per_class > members.size:
            fix = (f"pass validation_size={most} or less" if most
                   else "no validation set fits: pass validation_size=0")
            raise errors.DataError(
                f"SVHN validation wants {per_class} examples of class {c} from '{source}' "
                f"but it has only {members.size}; {fix}.")
        held[rng.permutation(members)[:per_class]] = True
    return held


def _most_svhn_validation(train: Split, extra: Split, num_classes: int) -> int:
    """The largest validation_size count whose per-class shares (two thirds of each from
    train, the rest from extra: :func:`svhn_holdout`) the smallest class of each holds."""
    smallest = [int(np.bincount(s.labels, minlength=num_classes)[:num_classes].min())
                for s in (train, extra)]
    per_class = next((p for p in range(sum(smallest), 0, -1)
                      if 2 * p // 3 <= smallest[0] and p - 2 * p // 3 <= smallest[1]), 0)
    return per_class * num_classes


def svhn_holdout(train: Split, extra: Split, num_classes: int,
                 validation_size: int | float | None,
                 seed: int) -> tuple[Split, Split | None]:
    """The paper's SVHN split: per-class validation from train and from extra.

    Args:
        train, extra: tfds 'svhn_cropped' train (73,257) and extra (531,131) splits.
        num_classes: 10 for SVHN.
        validation_size: None for the paper's 400/class from train + 200/class from
            extra (6,000); a count, or a fraction of train + extra, is spread evenly over
            classes (rounded down to a multiple of ``num_classes``) with the same 2:1
            train:extra ratio; 0 gives no validation set.
        seed: integer seed.

    Returns:
        (train, validation): training = the rest of train + extra (598,388 for the
        real data), validation = the held-out examples (train part first).
    """
    if validation_size is None:
        from_train, from_extra = SVHN_VALIDATION_PER_CLASS
    else:
        count = resolve_count(validation_size, len(train) + len(extra), least=num_classes)
        per_class = count // num_classes
        if count and not per_class:
            raise errors.DataError(
                f"validation_size={validation_size} holds out {count} SVHN images, fewer than "
                f"one per class ({num_classes}), which the per-class split needs; pass at "
                f"least {num_classes} (or 0 for no validation set).")
        from_train = (2 * per_class) // 3
        from_extra = per_class - from_train
    if from_train + from_extra == 0:
        return concatenate(train, extra), None
    rng = _rng(seed)
    most = _most_svhn_validation(train, extra, num_classes)
    held_train = _per_class_holdout(train.labels, from_train, num_classes, rng, "train", most)
    held_extra = _per_class_holdout(extra.labels, from_extra, num_classes, rng, "extra", most)
    kept = _take_from((train, np.flatnonzero(~held_train)), (extra, np.flatnonzero(~held_extra)))
    validation = _take_from((train, np.flatnonzero(held_train)),
                            (extra, np.flatnonzero(held_extra)))
    return kept, validation


def _take_from(*parts: tuple[Split, np.ndarray]) -> Split:
    """The examples at each ``(split, indices)`` part, end to end, gathered straight into one
    array: ``concatenate(train.take(a), extra.take(b))`` held two copies of the result at
    once (for SVHN's 1.8 GB, 3.5 GB above the inputs while loading)."""
    count = sum(len(indices) for _, indices in parts)
    images = np.empty((count,) + parts[0][0].images.shape[1:], np.uint8)
    labels = np.empty(count, np.int32)
    start = 0
    for split, indices in parts:
        stop = start + len(indices)
        # mode="clip" (the indices are in range): the default, "raise", buffers `out`, a
        # second copy.
        np.take(split.images, indices, axis=0, out=images[start:stop], mode="clip")
        labels[start:stop] = split.labels[indices]
        start = stop
    return Split(images, labels)


# The statistics read a split in chunks of about this many bytes of pixels (at least one
# image): their work arrays (bincount's int64 copy of a channel) take a few times that,
# whatever the size of the images. A chunk of 8192 images in float64 took 16x its pixels
# (400 MB for CIFAR's, 10 GB for 224 x 224 images).
_STATS_CHUNK_BYTES = 4 << 20
_VALUES = np.arange(256, dtype=np.float64)


def _chunks(images: np.ndarray):
    """``images`` [N, ...] in consecutive slices of about ``_STATS_CHUNK_BYTES``."""
    step = max(1, _STATS_CHUNK_BYTES // max(1, images[:1].nbytes))
    for start in range(0, len(images), step):
        yield images[start:start + step]


def _value_counts(chunk: np.ndarray) -> np.ndarray:
    """int64 [C, 256]: how many of the chunk's uint8 [..., C] values of each channel are
    0, 1, ..., 255. Sums of values and of squares follow exactly (in integers), in a pass
    that is several times faster than summing float copies."""
    flat = chunk.reshape(-1, chunk.shape[-1])
    return np.stack([np.bincount(flat[:, c], minlength=256) for c in range(flat.shape[1])])


def channel_stats(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of a split, in [0, 255] pixel units.

    Returns:
        (mean, std): float32 [C] each. Counted per value in chunks (:func:`_value_counts`),
        so 600k SVHN images need no float copy and the sums are exact.
    """
    counts = sum((_value_counts(chunk) for chunk in _chunks(split.images)),
                 np.zeros((split.images.shape[-1], 256), np.int64))
    count = len(split) * split.images.shape[1] * split.images.shape[2]
    mean = counts @ _VALUES / count
    std = np.sqrt(np.maximum(counts @ np.square(_VALUES) / count - mean**2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def pixel_stats(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """The official Torch code's normalisation (``cifar-dataset.lua``): the mean image and
    one global std of a split, in [0, 255] pixel units.

    Returns:
        (mean, std): float32 [H, W, C] and a float32 scalar (shape ``()``). Summed in
        integers, in chunks, as :func:`channel_stats`.
    """
    total = np.zeros(split.images.shape[1:], np.int64)
    counts = np.zeros((split.images.shape[-1], 256), np.int64)
    for chunk in _chunks(split.images):
        total += chunk.sum(0, dtype=np.int64)
        counts += _value_counts(chunk)
    mean = total / len(split)
    # E[x^2] - E[x]^2 over every value; the mean of the per-pixel means is the global mean.
    variance = float((counts @ np.square(_VALUES)).sum()) / (len(split) * mean.size) \
        - mean.mean() ** 2
    std = np.sqrt(max(variance, 0.0))
    return mean.astype(np.float32), np.float32(max(std, 1e-3)).reshape(())


# config.normalization: how the training split's statistics normalise every split's inputs.
NORMALIZATIONS = {"channel": channel_stats, "pixel": pixel_stats}
