"""tfds builders with the real names, versions and feature specs, minus TensorFlow.

tfds's CIFAR and SVHN generators open their archives with `tf.io.gfile` and hand
numpy images to the Image feature, whose encoder then needs TensorFlow; tfds extracts
CIFAR's tar.gz with `tf.io.gfile` too. These subclasses keep everything else (download
URLs, checksums, `_info()`, split names) and read with plain Python (CIFAR's archive with
`tarfile`, unextracted), encoding images to PNG with Pillow. The
prepared output is identical in layout, so `tfds.builder(name)` finds it later.
"""
from __future__ import annotations

import contextlib
import glob
import io
import os
import tempfile
import zlib

import numpy as np

from stochastic_depth_jax import logs

CIFAR_IMAGE_BYTES = 32 * 32 * 3


class DamagedArchiveError(ValueError):
    """A dataset's archive (``path``) that cannot be read as one: cut short, damaged, or
    another file under its name (``problem`` says which). tfds trusts an archive it
    downloaded earlier without checking it again, so preparing from a damaged one ended in a
    traceback, on every run."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path} {problem}")
        self.path, self.problem = path, problem


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
    yield from cifar_records(data, num_labels, path)


def cifar_records(data: bytes, num_labels: int, where: str):
    """Yields (labels uint8 [num_labels], image uint8 [32, 32, 3]) from the content ``data``
    of a CIFAR .bin file (named ``where`` in the error for a damaged one)."""
    record = num_labels + CIFAR_IMAGE_BYTES
    if len(data) % record:
        raise DamagedArchiveError(where, f"is {len(data)} bytes, not a multiple of the "
                                  f"{record}-byte CIFAR record: the archive is damaged")
    rows = np.frombuffer(data, np.uint8).reshape(-1, record)
    for row in rows:
        yield row[:num_labels], row[num_labels:].reshape(3, 32, 32).transpose(1, 2, 0)


def read_cifar_archive(path: str, prefix: str, names: list[str]) -> dict[str, bytes]:
    """The content of the files ``names`` under ``prefix`` in the CIFAR archive (tar.gz) at
    ``path``, read in one pass with :mod:`tarfile`.

    Raises:
      DamagedArchiveError: the archive is damaged, or lacks one of them (another archive).
    """
    import tarfile

    wanted = {prefix + name: name for name in names}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(os.fspath(path), "r:*") as archive:
            for member in archive:
                if member.name in wanted and member.isfile():
                    found[wanted[member.name]] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise DamagedArchiveError(os.fspath(path), f"cannot be read as the CIFAR archive "
                                  f"({type(error).__name__}: {error}): the archive is "
                                  "damaged") from error
    missing = [prefix + name for name in names if name not in found]
    if missing:
        raise DamagedArchiveError(os.fspath(path), f"lacks {', '.join(missing)}: it is not "
                                  "the CIFAR archive")
    return found


def _cifar_split_generators(self, dl_manager):
    """tfds's Cifar10._split_generators, minus TensorFlow: the archive is downloaded (or
    taken from the manual directory or an earlier download) and read with :mod:`tarfile`.
    tfds's extraction writes every file with ``tf.io.gfile``: preparing CIFAR failed there,
    "Error while extracting ...: No module named 'tensorflow'"."""
    from tensorflow_datasets.core import splits as splits_lib

    info = self._cifar_info
    archive = dl_manager.download(info.url)
    content = read_cifar_archive(archive, info.prefix,
                                 [*info.label_files, *info.train_files, *info.test_files])
    for label_key, label_file in zip(info.label_keys, info.label_files):
        names = [name for name in content[label_file].decode("utf-8", "replace").split("\n")
                 if name]
        feature = self.info.features[label_key]
        if len(names) != feature.num_classes:  # tfds's own error was a traceback
            raise DamagedArchiveError(os.fspath(archive), f"names {len(names)} classes in "
                                      f"{info.prefix}{label_file}, not {feature.num_classes}: "
                                      "it is not the CIFAR archive")
        feature.names = names

    def files(names):
        return [(f"{os.fspath(archive)} ({info.prefix}{f})", content[f]) for f in names]

    return {
        splits_lib.Split.TRAIN: self._generate_examples("train_", files(info.train_files)),
        splits_lib.Split.TEST: self._generate_examples("test_", files(info.test_files)),
    }


def _cifar_generate(self, split_prefix, files):
    """Same records as tfds's Cifar10._generate_examples, read without TensorFlow from
    ``files``, (where, content) of the split's .bin files in the archive."""
    label_keys = self._cifar_info.label_keys
    index = 0
    for where, content in files:
        for labels, image in cifar_records(content, len(label_keys), where):
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


class _RecordingDownloader:
    """tfds's downloader, recording the directory each download of one builder writes into,
    with the promise of its end (:func:`_recording`)."""

    def __init__(self, inner, started: list):
        self._inner, self._started = inner, started

    def download(self, url, destination_path, *args, **kwargs):
        result = self._inner.download(url, destination_path, *args, **kwargs)
        self._started.append((os.fspath(destination_path), result))
        return result

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _recording(builder, manager):
    """tfds's download ``manager``, whose downloads are listed in
    ``builder.downloads_started``: (directory, promise) each, so that those a failure left
    are removed, and only those (another process sharing data_dir downloads into its own
    directory there). Where this tfds keeps its downloader elsewhere, none is listed (and
    none removed)."""
    builder.downloads_started = []
    if "_DownloadManager__downloader" in vars(manager):  # tfds's private attribute
        manager._DownloadManager__downloader = _RecordingDownloader(
            manager._downloader, builder.downloads_started)
    return manager


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
    methods = ({"_generate_examples": _svhn_generate} if tfds_name == "svhn_cropped" else
               {"_generate_examples": _cifar_generate,
                "_split_generators": _cifar_split_generators})
    # tfds reads a builder's checksums beside its module: this one's had none, and those
    # of tfds's global list (CIFAR's) do not include SVHN's. So SVHN's downloads were not
    # checked, and its files in downloads/manual were ignored (downloaded again, offline too).

    def make_download_manager(self, *args, **kwargs):
        return _recording(self, base._make_download_manager(self, *args, **kwargs))

    return type(base.__name__, (base,), {
        "name": tfds_name, **methods, "url_infos": base.url_infos,
        "_make_download_manager": make_download_manager,
        "__module__": __name__}, skip_registration=True)
