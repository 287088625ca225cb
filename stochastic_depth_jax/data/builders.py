"""tfds builders with the real names, versions and feature specs, minus TensorFlow.

tfds's CIFAR and SVHN generators open their archives with `tf.io.gfile` and hand
numpy images to the Image feature, whose encoder then needs TensorFlow. These
subclasses keep everything else (download URLs, checksums, `_info()`, split
names) and read with plain Python, encoding images to PNG with Pillow. The
prepared output is identical in layout, so `tfds.builder(name)` finds it later.
"""
from __future__ import annotations

import contextlib
import glob
import io
import os
import tempfile

import numpy as np

from stochastic_depth_jax import logs

CIFAR_IMAGE_BYTES = 32 * 32 * 3


@contextlib.contextmanager
def no_tempdir_leak():
    """Creates tfds builders without their litter: stray temp dirs and misleading warnings.

    A builder made for a dataset that is not prepared yet looks for precomputed metadata
    in a fresh ``tempfile.mkdtemp('tfds')`` and never deletes it (one stray directory in
    the system temp dir per fake-data run or offline check): new, still-empty ones are
    removed. It also warns "Variant folder ... has no dataset_info.json" for the version
    folder it has not written yet; that line is dropped.
    """
    pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
    before = set(glob.glob(pattern))
    try:
        with logs.drop_absl_messages("Variant folder"):
            yield
    finally:
        for path in set(glob.glob(pattern)) - before:
            try:
                os.rmdir(path)  # Fails (and is skipped) unless empty.
            except OSError:
                pass


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, C] -> PNG file bytes (what tfds stores for an Image feature)."""
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
        buffer, format="PNG", compress_level=1)  # Fast; size hardly matters here.
    return buffer.getvalue()


def read_cifar_binary(path: str, num_labels: int):
    """Yields (labels uint8 [num_labels], image uint8 [32, 32, 3]) from a CIFAR .bin file."""
    with open(path, "rb") as handle:
        data = handle.read()
    record = num_labels + CIFAR_IMAGE_BYTES
    if len(data) % record:
        raise ValueError(f"{path} is {len(data)} bytes, not a multiple of the "
                         f"{record}-byte CIFAR record: the archive is damaged.")
    rows = np.frombuffer(data, np.uint8).reshape(-1, record)
    for row in rows:
        yield row[:num_labels], row[num_labels:].reshape(3, 32, 32).transpose(1, 2, 0)


def _cifar_generate(self, split_prefix, filepaths):
    """Same records as tfds's Cifar10._generate_examples, read without TensorFlow."""
    label_keys = self._cifar_info.label_keys
    index = 0
    for path in filepaths:
        for labels, image in read_cifar_binary(path, len(label_keys)):
            record = {k: int(v) for k, v in zip(label_keys, labels)}
            record["id"] = f"{split_prefix}{index:05d}"
            record["image"] = png_bytes(image)
            yield index, record
            index += 1


def _svhn_generate(self, split_prefix, filepath):
    """Same records as tfds's svhn_cropped Builder._generate_examples, without TF."""
    import scipy.io  # A jax dependency, so always present.
    with open(os.fspath(filepath), "rb") as handle:
        mat = scipy.io.loadmat(handle)
    for i, (image, label) in enumerate(zip(np.rollaxis(mat["X"], -1), mat["y"])):
        yield i, {"image": png_bytes(np.ascontiguousarray(image)),
                  "label": int(label.reshape(())) % 10,  # SVHN stores digit 0 as 10.
                  "id": f"{split_prefix}{i:06d}"}


def real_builder_class(tfds_name: str):
    """The registered tfds builder class for cifar10, cifar100 or svhn_cropped."""
    from stochastic_depth_jax.data import sources  # imports this module
    return sources.import_tfds().builder_cls(tfds_name)


def tf_free_builder(tfds_name: str):
    """A subclass of the real builder that prepares `tfds_name` without TensorFlow.

    Returns:
      A builder class; instantiate with data_dir=... and call
      download_and_prepare(file_format='array_record').
    """
    base = real_builder_class(tfds_name)
    generate = _svhn_generate if tfds_name == "svhn_cropped" else _cifar_generate
    return type(base.__name__, (base,), {
        "name": tfds_name, "_generate_examples": generate,
        "__module__": __name__}, skip_registration=True)
