"""A custom source: `root/train/<class>/*.png|jpg` and `root/test/<class>/...`.

The layout tfds's ImageFolder reads; we read it with Pillow directly (no
preparation step). Classes are the sub-directory names of train/, sorted as
strings ('10' before '2', as torchvision's ImageFolder and earlier runs order them).
Every image becomes 8-bit RGB as a viewer shows it: EXIF orientation applied,
grayscale and palette images expanded to three channels, transparency dropped,
16-bit images scaled to 8 bits.
"""
from __future__ import annotations

import concurrent.futures
import os
import warnings

import numpy as np

from stochastic_depth_jax import errors, logs
from stochastic_depth_jax.data.splits import Split

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Files operating systems leave in folders: skipped without a warning, as hidden ones.
_SYSTEM_FILES = ("thumbs.db", "desktop.ini")
_LAYOUT = "expected <root>/train/<class>/*.png|jpg and <root>/test/<class>/..."
# Pillow decodes with the GIL released, so threads decode in parallel.
_READ_THREADS = min(16, os.cpu_count() or 1)


def _entries(directory: str) -> tuple[list[str], list[str], list[str]]:
    """(sub-directories, image files, other entries) of `directory`, each sorted; hidden
    and system files are left out."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as error:
        raise errors.DataError(f"Cannot list {directory!r} ({error.strerror}); check its "
                               f"permissions.") from error
    dirs, images, other = [], [], []
    for name in names:
        if name.startswith(".") or name.lower() in _SYSTEM_FILES:
            continue
        if os.path.isdir(os.path.join(directory, name)):
            dirs.append(name)
        elif name.lower().endswith(IMAGE_EXTENSIONS):
            images.append(name)
        else:
            other.append(name)
    return dirs, images, other


def _warn_skipped(split_dir: str, skipped: list[str]) -> None:
    """One warning naming what under `split_dir` is not read (never silently)."""
    if skipped:
        examples = ", ".join(repr(s) for s in skipped[:3])
        entries = "entry" if len(skipped) == 1 else "entries"
        warnings.warn(
            f"Skipped {len(skipped)} {entries} of {split_dir!r} ({examples}"
            f"{', ...' if len(skipped) > 3 else ''}): only class directories and the "
            f"{'/'.join(IMAGE_EXTENSIONS)} images directly in them are read.",
            logs.RunWarning, stacklevel=3)


def list_classes(split_dir: str) -> tuple[list[str], list[str]]:
    """(class directory names under `split_dir` in label order (sorted as strings),
    the other entries there, which are not read)."""
    if not os.path.isdir(split_dir):
        raise errors.DataFileNotFoundError(
            f"Image folder split {split_dir!r} does not exist; {_LAYOUT}")
    dirs, images, other = _entries(split_dir)
    return sorted(dirs), images + other


def _read_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3]: the image as a viewer shows it (see the module docstring)."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode != "F" and not image.mode.startswith("I"):
                return np.asarray(image.convert("RGB"), np.uint8)
            mode, pixels = image.mode, np.asarray(image)  # one channel, 16 or 32 bits
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError,
            Image.DecompressionBombError) as error:
        raise errors.DataError(
            f"Cannot read image {path!r} ({error}); fix or remove it.") from error
    return _gray_to_rgb(path, mode, pixels)


def _gray_to_rgb(path: str, mode: str, pixels: np.ndarray) -> np.ndarray:
    """A 16-bit grayscale image (Pillow mode ``I;16*``) scaled to 8 bits (65535 -> 255) and
    repeated to RGB. 32-bit integer (``I``) and floating-point (``F``) images are refused:
    their range is not known (a 32-bit image may hold 0..255 or 0..65535)."""
    if not mode.startswith("I;16"):
        kind = "floating-point" if pixels.dtype.kind == "f" else "32-bit integer"
        raise errors.DataError(
            f"Image {path!r} has {kind} pixels (values {pixels.min()}..{pixels.max()}), not "
            f"8 or 16 bits; convert it to an 8- or 16-bit image.")
    gray = (pixels.astype(np.int64) * 255 + 32767) // 65535
    return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=-1)


def _class_files(class_dir: str) -> tuple[list[str], list[str]]:
    """(image paths, skipped entries) of a class directory."""
    dirs, images, other = _entries(class_dir)
    if not images:
        raise errors.DataError(f"Class directory {class_dir!r} has no {'/'.join(IMAGE_EXTENSIONS)} "
                               f"images; add some or remove the directory.")
    skipped = [name + "/" for name in dirs] + other
    name = os.path.basename(class_dir)
    return [os.path.join(class_dir, f) for f in images], [f"{name}/{s}" for s in skipped]


def _read_split(split_dir: str, classes: list[str], skipped: list[str]
                ) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """(paths, images uint8 [H, W, 3], labels int32 [N]) of `split_dir/<class>/`, each image
    labelled by its class's index in `classes`; warns once about what is not read (the
    `skipped` entries of `split_dir` and those of its class directories)."""
    skipped = list(skipped)
    paths, labels = [], []
    for label, name in enumerate(classes):
        files, skip = _class_files(os.path.join(split_dir, name))
        paths += files
        labels += [label] * len(files)
        skipped += skip
    _warn_skipped(split_dir, skipped)
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
        images = list(pool.map(_read_image, paths))  # in order; the first error is raised
    return paths, images, np.asarray(labels, np.int32)


def _check_one_size(paths: list[str], images: list[np.ndarray]) -> None:
    """Refuses images of different sizes, naming one of each size and the fix."""
    (height, width, _) = images[0].shape
    for path, image in zip(paths, images):
        if image.shape != images[0].shape:
            raise errors.DataError(
                f"Images differ in size: {path!r} is {image.shape[1]}x{image.shape[0]} but "
                f"{paths[0]!r} is {width}x{height} (width x height); all images must have "
                f"one size: resize them first.")


# What the reader before version 2 did not read as it is read now (it converted every image
# with Pillow's ``convert('RGB')``, read .png/.jpg/.jpeg only and ignored EXIF orientation).
_EARLIER_EXTENSIONS = (".png", ".jpg", ".jpeg")
_EXIF_ORIENTATION = 0x0112


def earlier_reader_difference(root: str) -> str | None:
    """Why the earlier reader would have read the folder's images differently (the first
    such image: one it skipped, a 16-bit one it clipped, an EXIF rotation it ignored), or
    None if it read the same pixels. Opens each image's header only.

    For runs recorded without a pixel fingerprint, so evaluating or resuming one on images
    that now read differently is refused rather than silently using other pixels.
    """
    from PIL import Image

    root = os.path.expanduser(root)
    for split in ("train", "test"):
        classes, _ = list_classes(os.path.join(root, split))
        for name in classes:
            for path in _class_files(os.path.join(root, split, name))[0]:
                if not path.lower().endswith(_EARLIER_EXTENSIONS):
                    return f"{path!r} was not read before (only .png/.jpg/.jpeg were)"
                try:
                    with Image.open(path) as image:
                        mode = image.mode
                        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
                except (OSError, SyntaxError, ValueError):
                    continue  # unreadable either way: the load reports it
                if mode.startswith("I;16"):
                    return f"the 16-bit image {path!r} was clipped before, is scaled now"
                if orientation not in (None, 1):
                    return f"{path!r} has an EXIF rotation ({orientation}), applied only now"
    return None


def _check_root(root: str) -> None:
    if not root:
        raise errors.DataError(f"image_folder: needs a path, e.g. image_folder:/data/pets; "
                               f"{_LAYOUT}")
    if not os.path.exists(root):
        raise errors.DataFileNotFoundError(f"Image folder {root!r} does not exist; {_LAYOUT}")
    if not os.path.isdir(root):
        raise errors.DataError(f"Image folder {root!r} is a file, not a directory; {_LAYOUT}")


def load(root: str) -> tuple[list[str], Split, Split]:
    """Reads an image folder (`~` in `root` is expanded).

    Returns:
      (classes, train, test): class names (label i is classes[i]), and the two
      Splits: images uint8 [N, H, W, 3], labels int32 [N].

    Raises:
      errors.DataError: a missing or empty directory, an unreadable file, images of
        different sizes, or classes that differ between train/ and test/; the
        message names the path.
    """
    root = os.path.expanduser(root)
    _check_root(root)
    classes, train_skipped = list_classes(os.path.join(root, "train"))
    if not classes:
        raise errors.DataError(
            f"{os.path.join(root, 'train')!r} has no class directories; {_LAYOUT}")
    if len(classes) < 2:
        raise errors.DataError(
            f"Image folder {root!r} has one class ({classes[0]!r}): a classifier needs at least "
            "two class directories under train/ and test/.")
    test_classes, test_skipped = list_classes(os.path.join(root, "test"))
    if test_classes != classes:
        raise errors.DataError(
            f"Image folder {root!r}: train and test classes differ; only in train: "
            f"{sorted(set(classes) - set(test_classes))}, only in test: "
            f"{sorted(set(test_classes) - set(classes))}; give both the same class "
            f"directories.")
    train_paths, train_images, train_labels = _read_split(
        os.path.join(root, "train"), classes, train_skipped)
    test_paths, test_images, test_labels = _read_split(
        os.path.join(root, "test"), classes, test_skipped)
    _check_one_size(train_paths + test_paths, train_images + test_images)
    return (classes, Split(np.stack(train_images), train_labels),
            Split(np.stack(test_images), test_labels))
