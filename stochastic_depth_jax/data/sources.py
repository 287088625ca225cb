"""Reading raw splits: tfds datasets by name (prepared as array_record), offline checks.

TensorFlow is never imported. tfds's own CIFAR and SVHN generators read their
archives through `tf.io.gfile`, so when data must be prepared we subclass the real
builders (same name, version and feature spec) with plain-Python readers.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import sys
import time
import urllib.error
import urllib.request
import warnings
import zlib
from typing import Any, Iterator, Sequence

import numpy as np
import tqdm

from stochastic_depth_jax import errors, files, logs
from stochastic_depth_jax.data import image_folder
from stochastic_depth_jax.data.builders import (DamagedArchiveError, no_tempdir_leak,
                                                 real_builder_class, tf_free_builder)
from stochastic_depth_jax.data.splits import Split

# Our names -> tfds names. SVHN is 'svhn_cropped' (32x32 digits) with its 'extra' split.
TFDS_NAMES = {"cifar10": "cifar10", "cifar100": "cifar100", "svhn": "svhn_cropped"}
# An archive tfds downloads for each dataset: probed (HTTP HEAD) before allowing a
# download, so an offline machine fails in seconds instead of tfds's 205 s of retries.
DOWNLOAD_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    "svhn_cropped": "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
}
MANUAL_FILES = {
    "cifar10": ("cifar-10-binary.tar.gz",),
    "cifar100": ("cifar-100-binary.tar.gz",),
    "svhn_cropped": ("train_32x32.mat", "test_32x32.mat", "extra_32x32.mat"),
}
PROBE_TIMEOUT_S = 2.0
_READ_CHUNK = 1024


class DataUnavailableError(errors.Error, RuntimeError):
    """The dataset is not prepared locally and cannot be downloaded now."""


class TfdsImportError(errors.Error, ImportError):
    """tensorflow-datasets (or a module it needs) cannot be imported: the tfds datasets
    cannot be read, wherever they are."""


class CorruptDataError(errors.Error, RuntimeError):
    """A stored record could not be decoded; it is reported, never dropped."""


def default_data_dir() -> str:
    """tfds's default: $TFDS_DATA_DIR or ~/tensorflow_datasets, ``~`` expanded in either
    (:func:`local_data_dir`)."""
    return local_data_dir(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def local_data_dir(data_dir) -> str:
    """``data_dir`` (a str or a path object) with ``~`` expanded, as the command line's
    ``--config.data_dir`` is: a ``~/tensorflow_datasets`` given from Python, or in a
    $TFDS_DATA_DIR that no shell expanded (a Dockerfile's ENV, a .env file), named a folder
    ``~`` under the current directory, where the prepared data was reported missing."""
    data_dir = os.fspath(data_dir)
    return data_dir if "://" in data_dir else os.path.expanduser(data_dir)


# What an image folder needs instead, named where tfds cannot be imported.
_NO_TFDS_NEEDED = "an image_folder: dataset is read without it"


def import_tfds():
    """tensorflow_datasets, imported on use (keeps `import stochastic_depth_jax` light for
    model-only users).

    Raises:
      TfdsImportError: it (or a module it needs) cannot be imported: one line saying what
        to install, instead of an ImportError's traceback.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        if error.name == "tensorflow_datasets":
            raise TfdsImportError(
                "tensorflow-datasets is not installed; it reads cifar10, cifar100 and svhn "
                "(fake data too): pip install 'tensorflow-datasets>=4.9.8,<5' (or reinstall this "
                f"package with its dependencies); {_NO_TFDS_NEEDED}.") from error
        # One line: an import error's text may run over several (a module's own message).
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise TfdsImportError(
            f"tensorflow-datasets cannot be imported ({type(error).__name__}: {first_line}); "
            "it reads cifar10, cifar100 and svhn: reinstall this package with its "
            "dependencies, which include the modules tfds uses without declaring them "
            f"(array_record, importlib_resources); {_NO_TFDS_NEEDED}.") from error
    return tfds


def check_local_data_dir(data_dir: str, tfds_name: str) -> None:
    """Refuses a remote tfds ``data_dir`` (``gs://bucket/tensorflow_datasets``, any other
    ``scheme://``) in one line, before anything is read: the prepared array_record files are
    read with ``os`` and array_record's reader, which open local paths only (it failed with
    a FileNotFoundError's traceback listing the bucket as a local directory).

    Raises:
      errors.DataError: ``data_dir`` names a remote location.
    """
    data_dir = os.fspath(data_dir)  # a pathlib.Path, as os.path.join takes it
    if "://" not in data_dir:  # (tfds takes '://' anywhere in a path for a URL's)
        return
    local = image_folder.file_url_path(data_dir)
    if local != data_dir:  # file:///data/tfds is local, but tfds reads no file:// URL
        raise errors.DataError(f"data_dir {data_dir!r} is a file:// URL, which tfds does not "
                               f"read; give its local path: data_dir={local}")
    where = f"{data_dir.rstrip('/')}/{tfds_name}"
    raise errors.DataError(
        f"data_dir {data_dir!r} is remote: prepared tfds datasets are read from a local disk "
        f"only (array_record files); copy it to one (e.g. gsutil -m cp -r {where} "
        f"/data/tensorflow_datasets/) and set data_dir=/data/tensorflow_datasets.")


def _unavailable_message(tfds_name: str, data_dir: str, reason: str) -> str:
    """One line naming the problem and both fixes, then the command that prepares the data
    elsewhere (on a line of its own, to copy as it is)."""
    manual = os.path.join(data_dir, "downloads", "manual")
    needed = ", ".join(MANUAL_FILES[tfds_name])
    return (
        f"Dataset '{tfds_name}' is not prepared in data_dir={data_dir!r} and cannot be "
        f"downloaded ({reason}): put {needed} in {manual} and run again (checked against "
        f"tfds's checksums), or prepare it on a machine with internet with the command below "
        f"(or tfds's download_and_prepare(file_format='array_record'), which needs "
        f"TensorFlow) and copy {os.path.join(data_dir, tfds_name)} to the same place here:\n"
        f"  python -c \"from stochastic_depth_jax import data; "
        f"data.load_dataset('{_our_name(tfds_name)}', data_dir='{data_dir}')\"")


def tfds_builder(tfds_name: str, data_dir: str):
    """``tfds.builder(tfds_name, data_dir=data_dir)``, which reads the prepared dataset's
    ``dataset_info.json`` where there is one.

    Raises:
      CorruptDataError: that file is damaged (empty or cut short by an interrupted copy,
        not JSON, a directory): one line naming it and the fix, instead of protobuf's
        ParseError (or tfds's error) and its traceback.
      errors.DataError: that file cannot be read (no permission, an I/O error): one line
        saying so; the dataset may be whole, so deleting it is not the fix.
    """
    tfds = import_tfds()
    try:
        with no_tempdir_leak():
            return tfds.builder(tfds_name, data_dir=data_dir)
    except Exception as error:  # noqa: BLE001  re-raised unless the file is unreadable
        damaged = _unreadable_info(tfds_name, data_dir)
        if damaged is None:
            raise
        path, why = damaged
        directory = os.path.dirname(path)
        if isinstance(why, OSError) and not isinstance(why, IsADirectoryError):
            raise errors.DataError(
                f"'{tfds_name}' in {directory} cannot be read: {path}: "
                f"{why.strerror or why} ({type(why).__name__}); let this user read "
                f"{directory} and its files (or fix the file system holding them), or set "
                f"data_dir to a copy it can read.") from error
        raise CorruptDataError(
            f"'{tfds_name}' in {directory} is damaged: {path} cannot be read "
            f"({type(why).__name__}: {why}); delete {directory} and prepare the dataset "
            f"again (or copy it again, whole, from where it was prepared).") from error


def _unreadable_info(tfds_name: str, data_dir: str) -> tuple[str, Exception] | None:
    """(path, why) where the ``dataset_info.json`` that ``tfds.builder`` reads for
    ``tfds_name`` in ``data_dir`` exists but is not readable JSON (``why``: the OSError
    reading it, or the ValueError decoding it); None otherwise."""
    version = str(real_builder_class(tfds_name).VERSION)
    path = os.path.join(data_dir, tfds_name, version, "dataset_info.json")
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:  # no permission, a directory; not JSON or UTF-8
        return path, error
    return None


def _our_name(tfds_name: str) -> str:
    return {v: k for k, v in TFDS_NAMES.items()}[tfds_name]


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if `url` answers an HTTP HEAD in time, else the reason it does not.

    urllib honours the usual *_proxy environment variables, as tfds's download
    does. A bare TCP connect is not enough: some networks accept every connection
    and answer 404 (or never answer), where tfds would then retry for minutes.
    """
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError as error:
        if error.code == 405:  # HEAD not allowed, but the server is there.
            return None
        return f"{url} answered HTTP {error.code}"
    except (OSError, ValueError) as error:  # DNS, refused, timeout, TLS.
        return f"cannot reach {url} ({getattr(error, 'reason', error)})"


def _archives_present(tfds_name: str, data_dir: str) -> bool:
    """Whether every archive ``tfds_name`` is prepared from is in ``data_dir`` already, so
    that preparing it needs no network: put in ``downloads/manual``, or downloaded whole by
    an earlier run whose preparation was stopped (a Ctrl-C, a kill, a full disk), which
    tfds keeps in ``downloads`` and uses again. Such a run was refused offline ("cannot be
    downloaded"), its archives there."""
    from etils import epath  # a dependency of tfds's
    from tensorflow_datasets.core.download import resource

    downloads = os.path.join(data_dir, "downloads")
    manual = os.path.join(downloads, "manual")
    infos = real_builder_class(tfds_name).url_infos or {}

    def present(url: str) -> bool:
        info = infos[url]
        if info.filename and os.path.exists(os.path.join(manual, info.filename)):
            return True
        name = resource.get_dl_fname(url, info.checksum)
        return any(resource.is_locally_cached(epath.Path(where, name))
                   for where in (os.path.join(downloads, tfds_name), downloads))

    return bool(infos) and all(present(url) for url in infos)


def ensure_prepared(tfds_name: str, data_dir: str, download: bool) -> None:
    """Makes sure `tfds_name` is prepared as array_record in data_dir, or fails fast.

    Raises:
      DataUnavailableError: not prepared, and download=False or the download
        host is unreachable (decided in ~PROBE_TIMEOUT_S, never tfds's 205 s of
        retries) and no manual archive is present; or the download failed midway (the
        parts it left removed), or data_dir cannot be written to prepare it; or an archive
        in data_dir cannot be read (damaged, or another file).
    """
    tfds = import_tfds()
    builder = tfds_builder(tfds_name, data_dir)
    with no_tempdir_leak():
        prepared = builder.is_prepared()
    if prepared:
        if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            raise DataUnavailableError(
                f"'{tfds_name}' in {builder.data_dir} was prepared as "
                f"{builder.info.file_format.value}; reading without TensorFlow needs "
                f"array_record. Delete that directory, or re-prepare it with "
                f"download_and_prepare(file_format='array_record').")
        return
    manual_dir = os.path.join(data_dir, "downloads", "manual")
    if not _archives_present(tfds_name, data_dir):
        if not download:
            raise DataUnavailableError(_unavailable_message(
                tfds_name, data_dir, "download=False"))
        why = reachable(DOWNLOAD_URLS[tfds_name])
        if why:
            raise DataUnavailableError(_unavailable_message(tfds_name, data_dir, why))
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    with no_tempdir_leak():
        builder = tf_free_builder(tfds_name)(data_dir=data_dir)
    try:
        with _failed_downloads_removed(builder):
            builder.download_and_prepare(file_format="array_record",
                                         download_config=config)
    except tfds.core.download.download_manager.NonMatchingChecksumError as error:
        raise DataUnavailableError(_checksum_message(tfds_name, error, manual_dir)) from None
    except DamagedArchiveError as error:  # tfds checks an earlier run's download no more
        raise DataUnavailableError(
            f"Dataset '{tfds_name}' cannot be prepared from {error.path}: it {error.problem}; "
            f"delete it to download it again, or replace it with the original archive "
            f"({DOWNLOAD_URLS[tfds_name]}).") from error
    except OSError as error:
        unwritable = _unwritable_message(tfds_name, data_dir, error)
        if unwritable is None and not _download_failure(error):
            raise
        raise DataUnavailableError(unwritable or _unavailable_message(
            tfds_name, data_dir, f"the download failed: {_first_line(error)}")) from error
    except tfds.core.download.util.DownloadError as error:  # an HTTP status other than 200
        raise DataUnavailableError(_unavailable_message(
            tfds_name, data_dir, f"the download failed: {_first_line(error)}")) from error


# tfds downloads each archive into a directory of its own beside where it keeps it,
# '<archive name>.tmp.<32 hex digits>', removed once the archive is whole.
_DOWNLOAD_TEMPORARY = re.compile(r".+\.tmp\.[0-9a-f]{32}")


@contextlib.contextmanager
def _failed_downloads_removed(builder) -> Iterator[None]:
    """Removes the download directories that the block's ended downloads left (tfds does
    not: each failure left its part of the archive, up to 1.2 GB for SVHN's extra split,
    in ``data_dir`` for good): those ``builder`` started (another process sharing data_dir
    downloads into its own; removing those that appeared meanwhile failed it), once ended
    (one still running may end whole, and tfds then keeps its archive)."""
    try:
        yield
    except BaseException:
        for path, result in getattr(builder, "downloads_started", ()):
            if (getattr(result, "is_pending", True) is False
                    and _DOWNLOAD_TEMPORARY.fullmatch(os.path.basename(path))):
                shutil.rmtree(path, ignore_errors=True)
        raise


# Where the disk, not the dataset, stops its preparation: data_dir cannot be written.
_UNWRITABLE = {errno.EACCES: "this user may not write there",
               errno.EPERM: "this user may not write there",
               errno.EROFS: "the filesystem is read-only",
               errno.ENOSPC: "the disk is full",
               errno.EDQUOT: "the disk quota is exhausted"}


def _unwritable_message(tfds_name: str, data_dir: str, error: OSError) -> str | None:
    """One line for a preparation that cannot write to ``data_dir`` (a shared read-only
    copy, a full disk), naming data_dir and its fixes; None for any other OSError. It was
    reported as a workdir that cannot be written, told to "resume the run there (chmod/chown),
    or use another --workdir", which changes nothing."""
    why = _UNWRITABLE.get(error.errno)
    if why is None:
        return None
    where = error.filename or data_dir
    return (f"Dataset '{tfds_name}' cannot be prepared in data_dir={data_dir!r}: cannot write "
            f"{where} ({why}); give this user write access there or free some space, set "
            f"data_dir to a directory it can write, or prepare it elsewhere and copy "
            f"{os.path.join(data_dir, tfds_name)} here.")


def _download_failure(error: OSError) -> bool:
    """Whether ``error`` is the network failing during tfds's download (after the probe
    answered: a connection dropped or refused midway, a timeout, a TLS or proxy failure):
    requests' errors, which are OSErrors without a number; it ended in their traceback."""
    requests = sys.modules.get("requests")  # imported by tfds's downloader
    return requests is not None and isinstance(error, requests.exceptions.RequestException)


def _first_line(error: BaseException) -> str:
    """``error``'s message, first line only (tfds's and requests' may run over several)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _checksum_message(tfds_name: str, error: Exception, manual_dir: str) -> str:
    """One line for an archive that fails tfds's checksum, instead of tfds's traceback:
    which file, its size against the expected one, and the fix. A file in ``manual_dir`` (a
    damaged or truncated copy, or another file under the archive's name) is to be replaced;
    one tfds downloaded (a proxy's page, a transfer cut short) lies in a temporary directory
    tfds never reads again, so replacing it would change nothing."""
    text = str(error)
    path = re.search(r"downloaded to (.+?), has wrong checksum", text)
    sizes = re.findall(r"UrlInfo\(size=([^,]+),", text)
    url = re.search(r"Artifact (\S+?),", text)
    # tfds writes a size of 0 (an empty file, a copy that failed) as 'Unknown size'.
    sizes = ["0 bytes" if size == "Unknown size" else size for size in sizes]
    got = f" ({sizes[1]}, expected {sizes[0]})" if len(sizes) == 2 else ""
    source = f" ({url.group(1)})" if url else ""
    if path and not _inside(path.group(1), manual_dir):
        origin = f" from {url.group(1)}" if url else ""
        return (f"The archive downloaded for '{tfds_name}'{origin}{got} does not match tfds's "
                f"checksum: the download was cut short or is not the archive (e.g. a proxy's "
                f"page); run again, or put the original archive in {manual_dir}.")
    where = repr(path.group(1)) if path else "The archive"
    return (f"{where}{got} does not match tfds's checksum for '{tfds_name}': it is damaged, "
            f"incomplete or another file; replace it with the original archive{source}, or "
            f"delete it to download it again.")


def _inside(path: str, directory: str) -> bool:
    """Whether ``path`` lies in ``directory`` (both as the file system resolves them)."""
    directory = os.path.realpath(directory)
    return os.path.commonpath([os.path.realpath(path), directory]) == directory


def _decode_chunk(source, start: int, stop: int, where: str) -> list[dict]:
    """Decodes records [start, stop); on failure finds and names the bad record."""
    try:
        return source.__getitems__(list(range(start, stop)))
    except Exception:  # pylint: disable=broad-except  # narrowed below, per record
        for index in range(start, stop):
            try:
                source[index]
            except Exception as error:
                raise CorruptDataError(
                    f"Record {index} of {where} cannot be decoded ({type(error).__name__}: "
                    f"{error}). The prepared files are damaged: delete that directory "
                    f"and prepare the dataset again (or copy it again, whole, from where it "
                    f"was prepared).") from error
        raise


def read_split(tfds_name: str, split: str, data_dir: str,
               label_key: str = "label", progress_bar: bool = True) -> Split:
    """Reads a prepared tfds split fully into host memory.

    Decoding the stored PNGs is the slow part (~0.45 ms per image on a CPU core: 28 s for
    CIFAR's 60k, minutes for SVHN), so the decoded arrays are cached beside the prepared
    data (``decoded-<split>-<label_key>.npz``) and reused while the array_record files are
    unchanged. An unreadable or stale cache is rebuilt; an unwritable directory only costs
    the decoding next time. ``progress_bar``: as the trainer's (``config.progress_bar``):
    False shows a long decoding by a start and a finish line instead of a bar.

    Returns:
      Split with images uint8 [N, H, W, C] and labels int32 [N] (from `label_key`),
      in the stored record order.
    """
    tfds = import_tfds()
    source = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
    info_dir = source.dataset_info.data_dir
    _require_record_files(source.dataset_info.splits[split].filepaths, tfds_name, split,
                          info_dir)
    cache = os.path.join(info_dir, f"decoded-{split}-{label_key}.npz")
    stamp = _records_stamp(info_dir, tfds_name, split)
    _remove_abandoned(cache)
    cached = _read_cache(cache, stamp, len(source))
    if cached is not None:
        return cached
    shape = source.dataset_info.features["image"].shape
    images = np.empty((len(source),) + tuple(shape), np.uint8)
    labels = np.empty(len(source), np.int32)
    where = f"'{tfds_name}' split '{split}' in {info_dir}"
    starts = range(0, len(source), _READ_CHUNK)
    # tfds suggests installing OpenCV for speed; Pillow (a dependency) decodes, once per
    # dataset thanks to the cache below.
    with logs.drop_absl_messages("OpenCV is not installed"):
        for start in _decoding(starts, f"{tfds_name}/{split}", len(source), progress_bar):
            stop = min(start + _READ_CHUNK, len(source))
            records = _decode_chunk(source, start, stop, where)
            images[start:stop] = np.stack([r["image"] for r in records])
            labels[start:stop] = [r[label_key] for r in records]
    _write_cache(cache, stamp, images, labels)
    return Split(images, labels)


def _require_record_files(paths: Sequence[Any], tfds_name: str, split: str,
                          info_dir: str) -> None:
    """Refuses a prepared split whose record files (``paths``, as its dataset_info lists
    them) are not all there, naming them: an interrupted or partial copy was reported as
    "Record 0 cannot be decoded (open() failed: ...)", the missing file last.

    Raises:
      CorruptDataError: one line naming the missing files and the fix.
    """
    missing = [os.path.basename(os.fspath(p)) for p in paths if not p.exists()]
    if not missing:
        return
    which = (f"the record file {missing[0]} of split '{split}' is" if len(missing) == 1 else
             f"{len(missing)} of the {len(paths)} record files of split '{split}' "
             f"({', '.join(missing)}) are")
    raise CorruptDataError(
        f"'{tfds_name}' in {info_dir} is incomplete: {which} missing; "
        f"delete {info_dir} and prepare the dataset again (or copy it again, whole, from "
        "where it was prepared).")


def _decoding(starts: range, what: str, count: int, progress_bar: bool) -> Iterator[int]:
    """``starts`` (the chunks to decode), showing the progress of a long decoding (8 chunks
    or more) as the epochs' progress is shown (process 0 only): a bar where it redraws in
    place (a terminal, a notebook) unless ``progress_bar`` is off, and a start and a finish
    line on stdout where no bar is drawn or every redraw would be kept (a pipe, a log
    file)."""
    if len(starts) < 8:
        yield from starts
        return
    # Imported on use: the training package imports this one.
    from stochastic_depth_jax.training import progress

    lines = progress.prints_task_lines(progress_bar)
    if lines:
        print(f"Decoding {what} ({count} images), once: the arrays are cached beside the "
              "data for later runs.", flush=True)
    t0 = time.perf_counter()
    yield from tqdm.tqdm(starts, desc=f"decoding {what}", unit="chunk", leave=False,
                         disable=not progress.draws_bar(progress_bar))
    if lines:
        print(f"Decoded {what} in {time.perf_counter() - t0:.1f} s.", flush=True)


def _records_stamp(info_dir: str, tfds_name: str, split: str) -> str:
    """Names, sizes and mtimes of a split's record files: changes when data is re-prepared."""
    prefix = f"{tfds_name}-{split}."
    parts = [f"{f}:{st.st_size}:{st.st_mtime_ns}"
             for f in sorted(os.listdir(info_dir)) if f.startswith(prefix)
             for st in [os.stat(os.path.join(info_dir, f))]]
    return "|".join(parts)


def _content_crc(images: np.ndarray, labels: np.ndarray) -> int:
    """CRC-32 of the decoded arrays (~0.1 s for CIFAR): catches any flipped byte."""
    crc = zlib.crc32(np.ascontiguousarray(images).data)
    return zlib.crc32(np.ascontiguousarray(labels, dtype=np.int32).data, crc)


def _read_cache(path: str, stamp: str, count: int) -> Split | None:
    """The cached split, or None if absent, stale or damaged in any way (then rebuilt)."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as z:
            if str(z["stamp"]) != stamp or len(z["labels"]) != count:
                return None
            images, labels = z["images"], z["labels"].astype(np.int32)
            if int(z["crc"]) != _content_crc(images, labels):
                raise ValueError("content checksum mismatch")
            return Split(images, labels)
    except Exception as e:  # noqa: BLE001  zipfile, numpy and pickle raise many types.
        warnings.warn(
            f"Ignoring damaged decoded-data cache {path} ({type(e).__name__}: {e}); "
            "decoding again and rewriting it.",
            logs.RunWarning,
        )
        return None


def _write_cache(path: str, stamp: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Writes the decoded split to ``path`` atomically, under a temporary name of its own
    that its writer holds (:func:`stochastic_depth_jax.files.atomic_write`): hosts sharing a
    ``data_dir`` each rename a whole file. The name was ``<path>.tmp-<pid>.npz``, the same
    for two hosts whose processes have the same pid (containers): the second truncated and
    renamed the first one's file while it was written (its rename then failed with a
    warning, and its last writes went into the cache)."""
    try:
        with files.atomic_write(path, "wb") as f:  # Removed on an error.
            np.savez(
                f,
                images=images,
                labels=labels,
                stamp=np.array(stamp),
                crc=np.array(_content_crc(images, labels), np.int64),
            )
    except OSError as e:
        warnings.warn(f"Could not cache decoded data at {path} ({e}); it will be decoded "
                      f"again next time.", logs.RunWarning)


def _remove_abandoned(cache: str) -> None:
    """Removes the temporary files of ``cache`` that writers killed mid-write left (a whole
    split's size each, one more each kill): those of :func:`_write_cache` that no process
    holds and that were not written to for ``files.ABANDONED_AFTER_S``
    (``files.remove_abandoned_temporaries``: other hosts may be writing theirs), and
    earlier versions' ``<cache>.tmp-<pid>.npz``, which their writers did not hold, once not
    written to for as long. Never raises: a leftover must not stop a run."""
    directory, name = os.path.split(cache)
    files.remove_abandoned_temporaries(directory, name.__eq__)
    earlier = re.compile(re.escape(name) + r"\.tmp-[0-9]+\.npz")
    try:
        entries = [e for e in os.listdir(directory) if earlier.fullmatch(e)]
    except OSError:
        return
    for entry in entries:
        path = os.path.join(directory, entry)
        with contextlib.suppress(OSError):
            info = os.lstat(path)
            if (stat.S_ISREG(info.st_mode)
                    and time.time() - info.st_mtime >= files.ABANDONED_AFTER_S):
                os.remove(path)


def num_classes(tfds_name: str, data_dir: str, label_key: str = "label") -> int:
    """Number of classes of a tfds label feature (works before preparation too)."""
    return tfds_builder(tfds_name, data_dir).info.features[label_key].num_classes
