"""Small fake datasets for tests and benchmarks, with the real tfds names and specs.

`make_tfds_dataset` prepares a dataset that `tfds.builder(name, data_dir=...)` and
`load_dataset` find exactly as if it had been downloaded; no network, no TF.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import io
import os
import shutil

import numpy as np

from stochastic_depth_jax.data import builders, sources

_SPLITS = ("train", "test", "extra")


def _random_split(rng, size, num_classes, shape, prefix, coarse):
    """Yields (key, record): balanced labels, random pixels, PNG-encoded."""
    labels = rng.permutation(np.arange(size) % num_classes)
    for i, label in enumerate(labels):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        record = {"id": f"{prefix}{i:06d}", "image": builders.png_bytes(image),
                  "label": int(label)}
        if coarse:
            record["coarse_label"] = int(label) // 5  # 100 fine -> 20 coarse.
        yield i, record


def make_tfds_dataset(name: str, data_dir: str, *, num_train: int, num_test: int,
                      num_extra: int = 0, seed: int = 0,
                      corrupt: tuple[str, ...] = (), num_shards: int | None = None) -> str:
    """Writes a prepared array_record tfds dataset from random images.

    Args:
      name: 'cifar10', 'cifar100', 'svhn' or 'svhn_cropped'.
      data_dir: tfds data directory to write into.
      num_train, num_test, num_extra: split sizes ('extra' only for SVHN).
        Labels are balanced: example i of a split has class i % num_classes
        before shuffling.
      seed: pixels and labels are a function of it.
      corrupt: split names whose first record gets undecodable image bytes
        (to test that corruption is reported).
      num_shards: record files written per split (tfds names them
        ``<name>-<split>.array_record-00000-of-0000N``); None: tfds's choice (one).

    Returns:
      The prepared dataset's directory, e.g. <data_dir>/cifar10/3.0.2.
    """
    tfds_name = sources.TFDS_NAMES.get(name, name)
    base = builders.real_builder_class(tfds_name)
    sizes = {"train": num_train, "test": num_test, "extra": num_extra}
    if tfds_name != "svhn_cropped":
        del sizes["extra"]

    def split_generators(self, dl_manager):
        del dl_manager
        features = self.info.features
        out = {}
        for index, (split, size) in enumerate(sizes.items()):
            rng = np.random.default_rng([seed, index])
            gen = _random_split(rng, size, features["label"].num_classes,
                                features["image"].shape, split + "_",
                                "coarse_label" in features)
            out[split] = _corrupt_first(gen) if split in corrupt else gen
        return out

    cls = type(base.__name__, (base,), {"name": tfds_name, "__module__": __name__,
                                        "_split_generators": split_generators},
               skip_registration=True)
    with builders.no_tempdir_leak():
        builder = cls(data_dir=data_dir)
    config = sources.import_tfds().download.DownloadConfig(num_shards=num_shards)
    with _quiet_tfds():
        builder.download_and_prepare(file_format="array_record", download_config=config)
    return os.fspath(builder.data_dir)


def missing_tfds_file(name: str, data_dir: str) -> str | None:
    """The first file of the prepared dataset ``name`` in ``data_dir`` that is not there
    (its ``dataset_info.json``, or a split's record file), or None if every one is.

    So that a completion marker is trusted only beside its data: a run stopped while
    writing it, or a user, may have removed some of it.
    """
    tfds_name = sources.TFDS_NAMES.get(name, name)
    builder = sources.tfds_builder(tfds_name, data_dir)
    with builders.no_tempdir_leak():
        if not builder.is_prepared():
            return os.path.join(os.fspath(builder.data_dir), "dataset_info.json")
        paths = [os.fspath(p) for split in builder.info.splits.values()
                 for p in split.filepaths]
    return next((p for p in paths if not os.path.exists(p)), None)


def remove_tfds_dataset(name: str, data_dir: str) -> None:
    """Removes what is left of the prepared dataset ``name`` in ``data_dir`` (every version),
    so that :func:`make_tfds_dataset` writes it whole again."""
    shutil.rmtree(os.path.join(data_dir, sources.TFDS_NAMES.get(name, name)),
                  ignore_errors=True)


@contextlib.contextmanager
def _quiet_tfds():
    """Hides tfds's output while it prepares fake data: its "Downloading and preparing
    dataset Unknown size" and "downloaded and prepared" lines (printed to stdout) and its
    progress bars, which speak of a download that does not happen. Errors still raise."""
    tfds = sources.import_tfds()
    from tensorflow_datasets.core.utils import tqdm_utils

    was_on = getattr(tqdm_utils, "_active", True)  # tfds has a setter only.
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tfds.display_progress_bar(was_on)


def _corrupt_first(records):
    for i, (key, record) in enumerate(records):
        if i == 0:
            record = dict(record, image=b"not a png")
        yield key, record


def make_image_folder(root: str, *, classes, per_class_train: int, per_class_test: int,
                      size: tuple[int, int] = (32, 32), seed: int = 0) -> str:
    """Writes root/{train,test}/<class>/<i>.png of random RGB images.

    Args:
      root: directory to create.
      classes: class names (or an int: 'class0', 'class1', ...).
      per_class_train, per_class_test: images per class in each split.
      size: (height, width).

    Returns:
      root.
    """
    from PIL import Image
    if isinstance(classes, int):
        classes = [f"class{i}" for i in range(classes)]
    rng = np.random.default_rng(seed)

    def save(job):
        pixels, path = job
        Image.fromarray(pixels).save(path)

    # Pixels drawn in order (the same images for a seed), PNGs encoded by threads (Pillow
    # releases the GIL while encoding).
    with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        for split, count in (("train", per_class_train), ("test", per_class_test)):
            for name in classes:
                directory = os.path.join(root, split, name)
                os.makedirs(directory, exist_ok=True)
                jobs = [(rng.integers(0, 256, tuple(size) + (3,), dtype=np.uint8),
                         os.path.join(directory, f"{i}.png")) for i in range(count)]
                list(pool.map(save, jobs))
    return root
