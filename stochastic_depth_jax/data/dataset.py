"""`load_dataset`: a named dataset, split as in the paper, with its normalisation stats."""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from stochastic_depth_jax import errors
from stochastic_depth_jax.data import image_folder, sources, splits
from stochastic_depth_jax.data.splits import Split

IMAGE_FOLDER_PREFIX = "image_folder:"
# Paper, Sec. 4: CIFAR is augmented (flip + translate); SVHN is not.
_AUGMENT = {"cifar10": "flip_translate", "cifar100": "flip_translate", "svhn": "none"}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset in host memory.

    Attributes:
      name: as passed to load_dataset.
      num_classes: number of labels.
      image_shape: (H, W, C).
      train, validation, test: Splits (validation is None when train_on_all or
        validation_size == 0).
      mean, std: float32 [C], per channel over the train split, in [0, 255]
        pixel units; normalised = (pixel - mean) / std. Record them with the run.
      augment: 'flip_translate' (CIFAR, image folders) or 'none' (SVHN).
      class_names: label names for image folders (label i is class_names[i]),
        else None.
    """
    name: str
    num_classes: int
    image_shape: tuple
    train: Split
    validation: Split | None
    test: Split
    mean: np.ndarray
    std: np.ndarray
    augment: str
    class_names: tuple | None = None


def fingerprint(ds: Dataset) -> str:
    """sha256 of every split's pixels and labels (train, validation, test, in that order):
    equal exactly when a run would see the same examples in the same splits."""
    digest = hashlib.sha256()
    for split in (ds.train, ds.validation, ds.test):
        if split is None:
            digest.update(b"no split")
            continue
        digest.update(repr(split.images.shape).encode())
        digest.update(np.ascontiguousarray(split.images).data)
        digest.update(np.ascontiguousarray(split.labels, "<i4").data)
    return digest.hexdigest()


def _label_key(name: str, label: str) -> str:
    if label == "fine":
        return "label"
    if label == "coarse" and name == "cifar100":
        return "coarse_label"
    raise errors.DataError(f"label={label!r} is not available for {name!r}; use 'fine' "
                     f"(or 'coarse' for cifar100).")


def _load_tfds(name, data_dir, download, validation_size, seed, train_on_all, label):
    """(num_classes, train, validation, test) for cifar10 / cifar100 / svhn."""
    tfds_name = sources.TFDS_NAMES[name]
    key = _label_key(name, label)
    sources.ensure_prepared(tfds_name, data_dir, download)
    read = lambda split: sources.read_split(tfds_name, split, data_dir, key)
    train, test = read("train"), read("test")
    num_classes = sources.num_classes(tfds_name, data_dir, key)
    if name == "svhn":
        extra = read("extra")
        if train_on_all:
            return num_classes, splits.concatenate(train, extra), None, test
        train, validation = splits.svhn_holdout(train, extra, num_classes,
                                                validation_size, seed)
        return num_classes, train, validation, test
    if train_on_all:
        return num_classes, train, None, test
    return (num_classes,) + splits.holdout(train, validation_size, seed) + (test,)


def load_dataset(name: str, *, data_dir: str | None = None, download: bool = True,
                 validation_size: int | float | None = None, seed: int = 0,
                 train_on_all: bool = False, label: str = "fine") -> Dataset:
    """Loads a dataset into host memory, split as in the paper.

    Args:
      name: 'cifar10', 'cifar100', 'svhn' (tfds 'svhn_cropped', train + extra),
        or 'image_folder:<path>' (root/train/<class>/*.png|jpg, root/test/...;
        every image read as 8-bit RGB, see image_folder.py).
      data_dir: tfds data directory; None -> $TFDS_DATA_DIR or ~/tensorflow_datasets.
      download: allow downloading + preparing (array_record) when not prepared.
      validation_size: None for the paper's (CIFAR: 5,000 = 10% of train; SVHN:
        400/class from train + 200/class from extra); an int count, a float
        fraction (CIFAR, image folders), or 0 for none.
      seed: the validation hold-out is a deterministic function of it.
      train_on_all: train on every training example, no validation set.
      label: 'fine' or, for cifar100, 'coarse' (20 superclasses).

    Returns:
      Dataset.

    Raises:
      DataUnavailableError: not prepared and not downloadable now (fails in ~2 s).
      CorruptDataError: a stored record cannot be decoded.
      ValueError: unknown name or label, bad validation_size, bad image folder.
    """
    class_names = None
    if name.startswith(IMAGE_FOLDER_PREFIX):
        class_names, train, test = image_folder.load(name[len(IMAGE_FOLDER_PREFIX):])
        num_classes, validation, augment = len(class_names), None, "flip_translate"
        if not train_on_all:
            train, validation = splits.holdout(train, validation_size, seed)
        class_names = tuple(class_names)
    elif name in sources.TFDS_NAMES:
        num_classes, train, validation, test = _load_tfds(
            name, data_dir or sources.default_data_dir(), download, validation_size,
            seed, train_on_all, label)
        augment = _AUGMENT[name]
    else:
        raise errors.DataError(f"Unknown dataset {name!r}; choose one of "
                         f"{sorted(sources.TFDS_NAMES)} or 'image_folder:<path>'.")
    mean, std = splits.channel_stats(train)
    return Dataset(name, num_classes, tuple(train.images.shape[1:]), train, validation,
                   test, mean, std, augment, class_names)
