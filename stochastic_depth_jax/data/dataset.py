"""`load_dataset`: a named dataset, split as in the paper, with its normalisation stats."""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from stochastic_depth_jax import errors
from stochastic_depth_jax.data import image_folder, sources, splits
from stochastic_depth_jax.data.augment import AUGMENTATIONS
from stochastic_depth_jax.data.splits import Split

IMAGE_FOLDER_PREFIX = "image_folder:"
# Paper, Sec. 4: CIFAR is augmented (flip + translate); SVHN is not.
_AUGMENT = {"cifar10": "flip_translate", "cifar100": "flip_translate", "svhn": "none"}


def default_augment(name: str) -> str:
    """The augmentation :func:`load_dataset` gives ``name`` by default: the paper's for its
    datasets, flip + translate for an image folder (and any other name)."""
    return _AUGMENT.get(name, "flip_translate")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset in host memory.

    Attributes:
      name: as passed to load_dataset.
      num_classes: number of labels.
      image_shape: (H, W, C).
      train, validation, test: Splits (validation is None when train_on_all or
        validation_size == 0).
      mean, std: over the train split, in [0, 255] pixel units; normalised =
        (pixel - mean) / std. Record them with the run. normalization='channel': float32
        [C] each; 'pixel' (the official code's): the mean image [H, W, C] and one global
        std (shape ()).
      augment: the training batches' augmentation (``AUGMENTATIONS``): the dataset's by
        default, 'flip_translate' (CIFAR, image folders) or 'none' (SVHN), or the one
        load_dataset was given.
      class_names: label names for image folders (label i is class_names[i]),
        else None.
      holdout: how validation was (or, without a validation set, would be) held out of the
        training data: 'random', 'per_class' (splits.HOLDOUTS) or 'svhn' (the paper's
        400 + 200 per class). Record it with the run.
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
    holdout: str = "random"
    # fingerprint()'s, kept while no split can change (see there); not copied by replace().
    _fingerprint: str | None = dataclasses.field(default=None, init=False, repr=False,
                                                 compare=False)


def _arrays(ds: Dataset) -> list[np.ndarray]:
    return [a for split in (ds.train, ds.validation, ds.test) if split is not None
            for a in (split.images, split.labels)]


def _read_only(ds: Dataset) -> Dataset:
    """``ds`` with its splits' arrays made read-only: load_dataset's own, which nothing
    writes after loading; a fingerprint of them stays true (:func:`fingerprint`)."""
    for array in _arrays(ds):
        array.flags.writeable = False
    return ds


def fingerprint(ds: Dataset) -> str:
    """sha256 of every split's pixels and labels (train, validation, test, in that order):
    equal exactly when a run would see the same examples in the same splits.

    Hashing them takes seconds on SVHN and a run asks several times (the processes' data
    agreement, run.json, the resume check): computed once per dataset whose arrays cannot
    change (read-only, as :func:`load_dataset` returns them), and each time for arrays that
    may have been written in place since."""
    if any(a.flags.writeable for a in _arrays(ds)):
        return _digest(ds)
    if ds._fingerprint is None:
        object.__setattr__(ds, "_fingerprint", _digest(ds))  # a frozen dataclass
    return ds._fingerprint


def _digest(ds: Dataset) -> str:
    """The sha256 of :func:`fingerprint`, computed."""
    digest = hashlib.sha256()
    for split in (ds.train, ds.validation, ds.test):
        if split is None:
            digest.update(b"no split")
            continue
        digest.update(repr(split.images.shape).encode())
        digest.update(np.ascontiguousarray(split.images).data)
        digest.update(np.ascontiguousarray(split.labels, "<i4").data)
    return digest.hexdigest()


# Image folders hold validation out per class; those recorded before `holdout` was (a
# run.json whose data record lacks it) held it out at random and keep that split.
IMAGE_FOLDER_HOLDOUT = "per_class"
_EARLIER_IMAGE_FOLDER_HOLDOUT = "random"


def recorded_holdout(recorded: dict | None, name: str) -> str | None:
    """The hold-out method that rebuilds the split a run recorded (run.json's ``data``), for
    dataset `name` loaded again (resume, evaluation); None for the dataset's default (no
    record, a tfds dataset, whose method is fixed, or a record of a tfds dataset)."""
    if not recorded or not name.startswith(IMAGE_FOLDER_PREFIX):
        return None
    if not str(recorded.get("name", "")).startswith(IMAGE_FOLDER_PREFIX):
        return None  # the run switched from a tfds dataset to this folder: a new split
    return recorded.get("holdout", _EARLIER_IMAGE_FOLDER_HOLDOUT)


def _label_key(name: str, label: str) -> str:
    if label == "fine":
        return "label"
    if label == "coarse" and name == "cifar100":
        return "coarse_label"
    raise errors.DataError(f"label={label!r} is not available for {name!r}; use 'fine' "
                     f"(or 'coarse' for cifar100).")


def _load_tfds(name, data_dir, download, validation_size, seed, train_on_all, label,
               progress_bar):
    """(num_classes, train, validation, test) for cifar10 / cifar100 / svhn."""
    tfds_name = sources.TFDS_NAMES[name]
    key = _label_key(name, label)
    sources.check_local_data_dir(data_dir, tfds_name)
    data_dir = sources.local_data_dir(data_dir)
    sources.ensure_prepared(tfds_name, data_dir, download)
    read = lambda split: sources.read_split(tfds_name, split, data_dir, key, progress_bar)
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
                 train_on_all: bool = False, label: str = "fine",
                 holdout: str | None = None, progress_bar: bool = True,
                 normalization: str = "channel", augment: str | None = None) -> Dataset:
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
      holdout: image folders only: 'per_class' (None: the default; each class gives its
        share, see splits.per_class_counts) or 'random' (as image folders were split before
        this was recorded: :func:`recorded_holdout` rebuilds a recorded run's split). CIFAR
        is held out at random and SVHN per class, as in the paper.
      progress_bar: the one-time decoding of a tfds dataset (cached for later loads) shows
        a bar on a terminal or in a notebook; False (the trainer's ``progress_bar=False``)
        prints a start and a finish line instead, as a pipe or a log file gets.
      normalization: the statistics of the training split (after the holdout) that
        normalise inputs: 'channel' (per-channel mean and std) or 'pixel' (the official
        Torch code's mean image and global std; see :attr:`Dataset.mean`).
      augment: None or 'auto' for the dataset's (the paper's: CIFAR flip + translate, SVHN none; an
        image folder flip + translate), or an ``AUGMENTATIONS`` name: 'flip_translate',
        'translate' (no flip: digits, text) or 'none'.

    Returns:
      Dataset, its splits' arrays read-only (NumPy's "assignment destination is read-only"
      where written): its fingerprint is computed once. To change pixels or labels, build
      a dataset of copies (``dataclasses.replace(ds, train=Split(np.array(ds.train.images),
      ds.train.labels))``), whose fingerprint is computed again at each check.

    Raises:
      DataUnavailableError: not prepared and not downloadable now (fails in ~2 s).
      CorruptDataError: a stored record cannot be decoded.
      ValueError: unknown name or label, bad validation_size, bad image folder.
    """
    if normalization not in splits.NORMALIZATIONS:
        raise errors.DataError(f"normalization={normalization!r}; valid: "
                               f"{list(splits.NORMALIZATIONS)}")
    augment = None if augment == "auto" else augment  # the config's word for the same
    if augment is not None and augment not in AUGMENTATIONS:
        raise errors.DataError(f"augment={augment!r}; valid: None or 'auto' (the dataset's) "
                               f"or {list(AUGMENTATIONS)}")
    class_names = None
    if holdout is not None and not name.startswith(IMAGE_FOLDER_PREFIX):
        raise errors.DataError(f"holdout={holdout!r} applies to image folders only; {name!r} "
                               "is split as in the paper: pass holdout=None.")
    if name.startswith(IMAGE_FOLDER_PREFIX):
        if label != "fine":  # it was ignored: the run trained on the class directories
            raise errors.DataError(f"label={label!r} is not available for an image folder, "
                                   "whose labels are its class directories; use 'fine'.")
        holdout = holdout or IMAGE_FOLDER_HOLDOUT
        class_names, train, test = image_folder.load(name[len(IMAGE_FOLDER_PREFIX):])
        num_classes, validation = len(class_names), None
        if not train_on_all:
            train, validation = splits.holdout(train, validation_size, seed, holdout)
        class_names = tuple(class_names)
    elif name in sources.TFDS_NAMES:
        holdout = "svhn" if name == "svhn" else "random"
        num_classes, train, validation, test = _load_tfds(
            name, data_dir or sources.default_data_dir(), download, validation_size,
            seed, train_on_all, label, progress_bar)
    else:
        raise errors.DataError(f"Unknown dataset {name!r}; choose one of "
                         f"{sorted(sources.TFDS_NAMES)} or 'image_folder:<path>'.")
    mean, std = splits.NORMALIZATIONS[normalization](train)
    augment = default_augment(name) if augment is None else augment
    return _read_only(Dataset(name, num_classes, tuple(train.images.shape[1:]), train,
                              validation, test, mean, std, augment, class_names, holdout))
