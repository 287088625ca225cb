"""A custom source: `root/train/<class>/*.png|jpg` and `root/test/<class>/...`.

The layout tfds's ImageFolder reads; we read it with Pillow directly (no
preparation step). Classes are the sorted sub-directory names of train/.
"""
from __future__ import annotations

import concurrent.futures
import os

import numpy as np

from stochastic_depth_jax import errors
from stochastic_depth_jax.data.splits import Split

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Pillow decodes with the GIL released, so threads decode in parallel.
_READ_THREADS = min(16, os.cpu_count() or 1)


def list_classes(split_dir: str) -> list[str]:
    """Sorted class directory names under `split_dir` (hidden entries ignored)."""
    if not os.path.isdir(split_dir):
        raise errors.DataFileNotFoundError(
            f"Image folder split {split_dir!r} does not exist; expected "
            f"<root>/train/<class>/*.png|jpg and <root>/test/<class>/...")
    return sorted(d for d in os.listdir(split_dir)
                  if not d.startswith(".") and os.path.isdir(os.path.join(split_dir, d)))


def _read_image(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), np.uint8)
    except (OSError, UnidentifiedImageError) as error:
        raise errors.DataError(f"Cannot read image {path!r} ({error}); fix or remove it.") from error


def _class_files(class_dir: str) -> list[str]:
    files = sorted(f for f in os.listdir(class_dir)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    if not files:
        raise errors.DataError(f"Class directory {class_dir!r} has no {'/'.join(IMAGE_EXTENSIONS)} "
                         f"images; add some or remove the directory.")
    return [os.path.join(class_dir, f) for f in files]


def read_split(split_dir: str, classes: list[str],
               image_shape: tuple[int, int, int] | None = None) -> Split:
    """Reads every image of `split_dir/<class>/`, labelled by its index in `classes`.

    Args:
      split_dir: e.g. root/train.
      classes: class names; label i is classes[i].
      image_shape: required (H, W, 3) or None to take the first image's shape.

    Returns:
      Split: images uint8 [N, H, W, 3] (converted to RGB), labels int32 [N].

    Raises:
      ValueError: an empty class, an unreadable file, or a size mismatch; the
        message names the path.
    """
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _class_files(os.path.join(split_dir, name))
        paths += files
        labels += [label] * len(files)
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
        images = list(pool.map(_read_image, paths))  # in order; the first error is raised
    for path, image in zip(paths, images):
        image_shape = image_shape or image.shape
        if image.shape != tuple(image_shape):
            raise errors.DataError(
                f"Image {path!r} is {image.shape[1]}x{image.shape[0]} but the others "
                f"are {image_shape[1]}x{image_shape[0]} (width x height); all images "
                f"must have one size: resize them first.")
    return Split(np.stack(images), np.asarray(labels, np.int32))


def load(root: str) -> tuple[list[str], Split, Split]:
    """Reads an image folder.

    Returns:
      (classes, train, test): class names, and the two Splits.
    """
    classes = list_classes(os.path.join(root, "train"))
    if not classes:
        raise errors.DataError(f"{os.path.join(root, 'train')!r} has no class directories.")
    if len(classes) < 2:
        raise errors.DataError(
            f"Image folder {root!r} has one class ({classes[0]!r}): a classifier needs at least "
            "two class directories under train/ and test/.")
    test_classes = list_classes(os.path.join(root, "test"))
    if test_classes != classes:
        raise errors.DataError(
            f"Image folder {root!r}: train and test classes differ; only in train: "
            f"{sorted(set(classes) - set(test_classes))}, only in test: "
            f"{sorted(set(test_classes) - set(classes))}.")
    train = read_split(os.path.join(root, "train"), classes)
    test = read_split(os.path.join(root, "test"), classes, train.images.shape[1:])
    return classes, train, test
