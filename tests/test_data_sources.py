"""Data sources and splits: fake tfds datasets with the real names, image folders, errors."""
import errno
import fcntl
import io
import re
import os
import shutil
import sys
import time
import types
import warnings

import numpy as np
import pytest

import warned
from stochastic_depth_jax import data, errors
from stochastic_depth_jax.data import builders, sources, splits
from stochastic_depth_jax.training import workdir as workdir_lib


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One data_dir with small cifar10, cifar100 and svhn_cropped, prepared as array_record."""
    root = str(tmp_path_factory.mktemp("tfds"))
    data.testing.make_tfds_dataset("cifar10", root, num_train=200, num_test=50)
    data.testing.make_tfds_dataset("cifar100", root, num_train=200, num_test=40, seed=1)
    data.testing.make_tfds_dataset("svhn", root, num_train=200, num_test=30, num_extra=300)
    return root


def _rows(split):
    return {row.tobytes() for row in split.images.reshape(len(split), -1)}


def test_cifar_paper_split_sizes_and_union(data_dir):
    ds = data.load_dataset("cifar10", data_dir=data_dir, download=False)
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (180, 20, 50)
    assert ds.num_classes == 10 and ds.image_shape == (32, 32, 3) and ds.augment == "flip_translate"
    everything = data.load_dataset("cifar10", data_dir=data_dir, train_on_all=True)
    assert ds.validation is not None and everything.validation is None
    assert len(everything.train) == 200
    assert _rows(ds.train) | _rows(ds.validation) == _rows(everything.train)
    assert not _rows(ds.train) & _rows(ds.validation)
    assert ds.train.images.dtype == np.uint8 and ds.train.labels.dtype == np.int32


def test_split_is_a_function_of_the_seed(data_dir):
    load = lambda seed: data.load_dataset("cifar10", data_dir=data_dir, seed=seed)
    a, b, c = load(0), load(0), load(1)
    np.testing.assert_array_equal(a.validation.images, b.validation.images)
    assert _rows(a.validation) != _rows(c.validation)


@pytest.mark.parametrize("size, expected", [(30, 30), (0.25, 50), (0, None)])
def test_validation_size_count_fraction_none(data_dir, size, expected):
    ds = data.load_dataset("cifar10", data_dir=data_dir, validation_size=size)
    assert (len(ds.validation) if ds.validation else None) == expected


def test_bad_validation_size_says_what_to_do(data_dir):
    with pytest.raises(ValueError, match="pass a smaller count, a fraction such as 0.1, or 0"):
        data.load_dataset("cifar10", data_dir=data_dir, validation_size=500)


def test_paper_split_arithmetic_at_full_size():
    """CIFAR 50,000 -> 45,000 + 5,000; SVHN 73,257 + 531,131 -> 598,388 + 6,000."""
    tiny = lambda labels: splits.Split(np.zeros((len(labels), 1, 1, 1), np.uint8),
                                       labels.astype(np.int32))
    train, val = splits.holdout(tiny(np.arange(50000) % 10), None, seed=0)
    assert (len(train), len(val)) == (45000, 5000)
    rng = np.random.default_rng(0)
    svhn_train, extra = tiny(rng.integers(0, 10, 73257)), tiny(rng.integers(0, 10, 531131))
    train, val = splits.svhn_holdout(svhn_train, extra, 10, None, seed=0)
    assert (len(train), len(val)) == (598388, 6000)
    assert np.all(np.bincount(val.labels[:4000]) == 400)
    assert np.all(np.bincount(val.labels[4000:]) == 200)


def test_svhn_validation_size_as_a_fraction_or_too_small_a_count():
    """A fraction (which README allows) is of train + extra; it used to become 0 per class,
    i.e. silently no validation set. A count under one per class is one clear error."""
    rng = np.random.default_rng(0)
    tiny = lambda n: splits.Split(np.zeros((n, 1, 1, 1), np.uint8),
                                  rng.integers(0, 10, n).astype(np.int32))
    svhn_train, extra = tiny(600), tiny(1400)
    train, val = splits.svhn_holdout(svhn_train, extra, 10, 0.1, seed=0)
    assert (len(train), len(val)) == (1800, 200)
    assert np.all(np.bincount(val.labels, minlength=10) == 20)
    with pytest.raises(ValueError, match="fewer than one per class.*at least 10"):
        splits.svhn_holdout(svhn_train, extra, 10, 5, seed=0)
    # A fraction that holds out none suggests a count the per-class split takes (not 1).
    with pytest.raises(ValueError, match="a count such as 10,"):
        splits.svhn_holdout(svhn_train, extra, 10, 0.0001, seed=0)
    assert splits.svhn_holdout(svhn_train, extra, 10, 0, seed=0)[1] is None
    # More than the smallest class holds (the paper's 400 + 200 a class of small data) names
    # the largest count that fits, which then holds out.
    in_train, in_extra = np.bincount(svhn_train.labels).min(), np.bincount(extra.labels).min()
    most = 10 * max(p for p in range(1, 200) if 2 * p // 3 <= in_train
                    and p - 2 * p // 3 <= in_extra)
    with pytest.raises(errors.DataError, match=f"from 'train' but it has only .*; pass "
                       f"validation_size={most} or less.$"):
        splits.svhn_holdout(svhn_train, extra, 10, None, seed=0)
    assert len(splits.svhn_holdout(svhn_train, extra, 10, most, seed=0)[1]) == most
    with pytest.raises(errors.DataError, match=f"validation_size={most} or less"):
        splits.svhn_holdout(svhn_train, extra, 10, most + 10, seed=0)


def test_svhn_split_is_gathered_in_one_copy_in_order():
    """The SVHN split took train's and extra's kept examples, then joined them: two copies
    of the 1.8 GB training set at once while loading (3.5 GB above the inputs, measured).
    Each example's pixels here are its index in train + extra: the parts keep that order."""
    import tracemalloc

    def indexed(start, count):  # images of 8x8 pixels, the first one holding the index
        index = np.arange(start, start + count)
        images = np.zeros((count, 8, 8, 3), np.uint8)
        images[:, 0, 0] = np.stack([index >> 16, (index >> 8) & 255, index & 255], -1)
        return splits.Split(images, (index % 10).astype(np.int32))

    def indices(split):
        pixels = split.images[:, 0, 0].astype(np.int64)
        return (pixels[:, 0] << 16) | (pixels[:, 1] << 8) | pixels[:, 2]

    svhn_train, extra = indexed(0, 3000), indexed(3000, 12000)
    inputs = svhn_train.images.nbytes + extra.images.nbytes
    tracemalloc.start()
    try:
        train, val = splits.svhn_holdout(svhn_train, extra, 10, 300, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / inputs < 1.3  # was 2.0: the kept examples twice
    kept, held = indices(train), indices(val)
    assert np.all(np.diff(kept) > 0) and len(kept) == 14700
    assert np.all(np.diff(held[:200]) > 0) and np.all(held[:200] < 3000)  # from train
    assert np.all(np.diff(held[200:]) > 0) and np.all(held[200:] >= 3000)  # from extra
    np.testing.assert_array_equal(np.sort(np.concatenate([kept, held])), np.arange(15000))
    np.testing.assert_array_equal(train.labels, kept % 10)
    np.testing.assert_array_equal(val.labels, held % 10)


def test_cifar100_fine_and_coarse(data_dir):
    fine = data.load_dataset("cifar100", data_dir=data_dir)
    coarse = data.load_dataset("cifar100", data_dir=data_dir, label="coarse")
    assert (fine.num_classes, coarse.num_classes) == (100, 20)
    np.testing.assert_array_equal(coarse.train.labels, fine.train.labels // 5)
    with pytest.raises(ValueError, match="coarse"):
        data.load_dataset("cifar10", data_dir=data_dir, label="coarse")


def test_svhn_uses_train_plus_extra(data_dir):
    ds = data.load_dataset("svhn", data_dir=data_dir, validation_size=60)
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (440, 60, 30)
    assert ds.augment == "none"
    assert np.all(np.bincount(ds.validation.labels, minlength=10) == 6)
    # 400/class > the fake's 20/class: the largest count that fits is named (31 a class: 20
    # from train's 20, 11 from extra's 30).
    with pytest.raises(ValueError, match="only 20; pass validation_size=310 or less."):
        data.load_dataset("svhn", data_dir=data_dir)


def test_mean_std_are_train_statistics_in_pixel_units(data_dir):
    ds = data.load_dataset("cifar10", data_dir=data_dir)
    pixels = ds.train.images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(ds.mean, pixels.mean(0), rtol=1e-5)
    np.testing.assert_allclose(ds.std, pixels.std(0), rtol=1e-4)
    assert ds.mean.dtype == np.float32 and ds.mean.shape == (3,)


def _assert_offline_message(error, name, data_dir):
    """One line naming the problem and both fixes, then the exact command to prepare it."""
    problem, command = str(error).split("\n")
    assert problem.startswith(f"Dataset '{name}' is not prepared in data_dir={data_dir!r} and "
                              "cannot be downloaded (")
    assert f" in {os.path.join(data_dir, 'downloads', 'manual')} and run again" in problem
    assert f"copy {os.path.join(data_dir, name)} to the same place here" in problem
    ours = {v: k for k, v in sources.TFDS_NAMES.items()}[name]
    assert command == (f"  python -c \"from stochastic_depth_jax import data; "
                       f"data.load_dataset('{ours}', data_dir='{data_dir}')\"")


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/cifar-10-binary.tar.gz",
                                 "http://10.255.255.1/cifar-10-binary.tar.gz"])
def test_offline_error_is_fast_and_says_what_to_do(tmp_path, monkeypatch, url):
    # A refused port / an unroutable address (or one a firewall answers with an
    # error page): no test can ever start a real download.
    monkeypatch.setitem(sources.DOWNLOAD_URLS, "cifar10", url)
    start = time.perf_counter()
    with pytest.raises(data.DataUnavailableError) as info:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 5
    _assert_offline_message(info.value, "cifar10", str(tmp_path))
    assert isinstance(info.value, RuntimeError)


def test_download_false_fails_at_once(tmp_path):
    start = time.perf_counter()
    with pytest.raises(data.DataUnavailableError) as info:
        data.load_dataset("svhn", data_dir=str(tmp_path), download=False)
    assert time.perf_counter() - start < 5
    _assert_offline_message(info.value, "svhn_cropped", str(tmp_path))
    assert "extra_32x32.mat" in str(info.value)


def test_a_wrong_manual_archive_is_one_line_naming_it(tmp_path):
    """An archive in downloads/manual (where the offline message says to put it) that fails
    tfds's checksum, a truncated copy or another file, ended in tfds's traceback."""
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "cifar-10-binary.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(data.DataUnavailableError) as info:
        data.load_dataset("cifar10", data_dir=str(tmp_path), download=False)
    assert str(info.value) == (
        f"{str(manual / 'cifar-10-binary.tar.gz')!r} (15 bytes, expected 162.17 MiB) does not "
        "match tfds's checksum for 'cifar10': it is damaged, incomplete or another file; "
        "replace it with the original archive "
        "(https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz), or delete it to download "
        "it again.")


def test_an_empty_manual_archive_is_named_with_its_size(tmp_path):
    """An empty file (a copy that failed) was said to be of 'Unknown size', tfds's text for
    a size of 0."""
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "cifar-10-binary.tar.gz").write_bytes(b"")
    with pytest.raises(data.DataUnavailableError, match=re.escape(
            f"{str(manual / 'cifar-10-binary.tar.gz')!r} (0 bytes, expected 162.17 MiB) does "
            "not match tfds's checksum for 'cifar10'")):
        data.load_dataset("cifar10", data_dir=str(tmp_path), download=False)


def test_a_wrong_download_says_to_run_again_not_to_replace_a_temporary_file(tmp_path,
                                                                           monkeypatch):
    """A download that is not the archive (a proxy's page) was named by its path in tfds's
    temporary directory, with 'replace it with the original archive, or delete it to
    download it again': tfds never reads that file again."""
    import hashlib

    from tensorflow_datasets.core import utils as tfds_utils
    from tensorflow_datasets.core.download import checksums, downloader

    page = b"<html>proxy login</html>"

    def download(self, url, destination, verify=True):  # what the network answered
        path = destination / os.path.basename(url)
        path.write_bytes(page)
        return downloader.DownloadResult(path=path, url_info=checksums.UrlInfo(
            size=tfds_utils.Size(len(page)), checksum=hashlib.sha256(page).hexdigest(),
            filename=path.name))

    monkeypatch.setattr(downloader._Downloader, "_sync_download", download)
    monkeypatch.setattr(sources, "reachable", lambda url, timeout=None: None)
    with pytest.raises(data.DataUnavailableError) as info:
        data.load_dataset("cifar10", data_dir=str(tmp_path), download=True)
    assert str(info.value) == (
        "The archive downloaded for 'cifar10' from "
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz (24 bytes, expected 162.17 "
        "MiB) does not match tfds's checksum: the download was cut short or is not the "
        "archive (e.g. a proxy's page); run again, or put the original archive in "
        f"{tmp_path / 'downloads' / 'manual'}.")



def _download_fails(monkeypatch, error):
    """The download host answers the probe, then tfds's download raises ``error`` (what the
    network does to a download: no real one is ever started)."""
    from tensorflow_datasets.core.download import downloader

    def download(self, url, destination, verify=True):
        (destination / "part-of-the-archive").write_bytes(b"12345")
        raise error

    monkeypatch.setattr(downloader._Downloader, "_sync_download", download)
    monkeypatch.setattr(sources, "reachable", lambda url, timeout=None: None)


@pytest.mark.parametrize("name", ["connection", "http"])
def test_a_download_failing_after_the_probe_is_one_line_and_leaves_no_part(tmp_path,
                                                                          monkeypatch, name):
    """The host answered the probe, then the download failed (a connection dropped midway,
    a proxy refusing the transfer): requests' ConnectionError, or tfds's DownloadError,
    ended in a traceback, and the part downloaded stayed in data_dir for good."""
    import requests
    from tensorflow_datasets.core.download import util as download_util

    url = sources.DOWNLOAD_URLS["cifar10"]
    error = {"connection": requests.exceptions.ConnectionError(
                 f"Max retries exceeded with url: {url}\n(Caused by NameResolutionError)"),
             "http": download_util.DownloadError(f"Failed to get url {url}. HTTP code: 403.")}
    _download_fails(monkeypatch, error[name])
    with pytest.raises(data.DataUnavailableError) as info:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    problem = str(info.value).splitlines()[0]
    assert f"the download failed: {str(error[name]).splitlines()[0]}" in problem
    _assert_offline_message(info.value, "cifar10", str(tmp_path))
    downloads = tmp_path / "downloads" / "cifar10"
    assert not list(downloads.iterdir())


def test_a_failed_download_keeps_another_process_download_in_progress(tmp_path,
                                                                        monkeypatch):
    """Only this call's parts are removed: a process sharing data_dir downloads into its
    own directory there."""
    import requests

    theirs = tmp_path / "downloads" / "cifar10" / f"archive.tar.gz.tmp.{'a' * 32}"
    theirs.mkdir(parents=True)
    (theirs / "archive.tar.gz").write_bytes(b"theirs")
    _download_fails(monkeypatch, requests.exceptions.ReadTimeout("read timed out"))
    with pytest.raises(data.DataUnavailableError, match="the download failed: read timed out"):
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    assert list((tmp_path / "downloads" / "cifar10").iterdir()) == [theirs]
    assert (theirs / "archive.tar.gz").read_bytes() == b"theirs"


def test_a_failed_download_keeps_a_download_another_process_started_meanwhile(
        tmp_path, monkeypatch):
    """Only this call's parts are removed: a process sharing data_dir that started its
    download while this one ran had its directory removed under it (it then failed)."""
    import requests
    from tensorflow_datasets.core.download import downloader

    theirs = tmp_path / "downloads" / "cifar10" / f"archive.tar.gz.tmp.{'b' * 32}"

    def download(self, url, destination, verify=True):
        (destination / "part-of-the-archive").write_bytes(b"12345")
        theirs.mkdir()
        (theirs / "archive.tar.gz").write_bytes(b"theirs")
        raise requests.exceptions.ReadTimeout("read timed out")

    monkeypatch.setattr(downloader._Downloader, "_sync_download", download)
    monkeypatch.setattr(sources, "reachable", lambda url, timeout=None: None)
    with pytest.raises(data.DataUnavailableError, match="the download failed: read timed out"):
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    assert list((tmp_path / "downloads" / "cifar10").iterdir()) == [theirs]
    assert (theirs / "archive.tar.gz").read_bytes() == b"theirs"


def test_a_failure_keeps_the_parts_of_downloads_still_running(tmp_path):
    """One download failing while the others of the call run on (SVHN's three): those may
    end whole, and tfds then keeps their archives; the ended ones' parts are removed."""
    import promise

    running, ended = tmp_path / f"a.tmp.{'1' * 32}", tmp_path / f"b.tmp.{'2' * 32}"
    for part in (running, ended):
        part.mkdir()
        (part / "part").write_bytes(b"123")
    builder = types.SimpleNamespace(downloads_started=[
        (str(running), promise.Promise()), (str(ended), promise.Promise.reject(OSError()))])
    with pytest.raises(OSError), sources._failed_downloads_removed(builder):
        raise OSError("the download failed")
    assert running.exists() and not ended.exists()


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.ENOSPC])
def test_a_data_dir_that_cannot_be_written_is_one_line_naming_it(tmp_path, monkeypatch,
                                                                  code):
    """Preparing in a data_dir this user cannot write (a shared read-only copy, a full
    disk) was reported as a workdir: 'resume the run there (chmod/chown), or use another
    --workdir'."""
    from stochastic_depth_jax.training import cli

    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):  # as a read-only data_dir answers (tests run as root)
        if os.fspath(path).startswith(str(tmp_path)):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(sources, "reachable", lambda url, timeout=None: None)
    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(data.DataUnavailableError) as info:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "workdir" not in cli._message(info.value)
    assert message.startswith(f"Dataset 'cifar10' cannot be prepared in "
                              f"data_dir={str(tmp_path)!r}: cannot write {tmp_path}")
    assert message.endswith(f"set data_dir to a directory it can write, or prepare it "
                            f"elsewhere and copy {tmp_path / 'cifar10'} here.")


def test_an_unexpected_error_while_preparing_keeps_its_traceback(tmp_path, monkeypatch):
    """A bug is not disguised as missing data."""
    def download(self, url, destination, verify=True):
        raise FileNotFoundError(2, "No such file or directory", "somewhere")

    from tensorflow_datasets.core.download import downloader

    monkeypatch.setattr(downloader._Downloader, "_sync_download", download)
    monkeypatch.setattr(sources, "reachable", lambda url, timeout=None: None)
    with pytest.raises(FileNotFoundError):
        data.load_dataset("cifar10", data_dir=str(tmp_path))



def _cifar_archive(path, name, rng):
    """A CIFAR binary archive laid out as the real one, a few records per file; returns
    {split: (labels [N, num_labels], images [N, 32, 32, 3])} as stored."""
    import tarfile

    cls = builders.real_builder_class(name)
    info = cls._cifar_info.fget(cls)  # a property
    num_labels = len(info.label_keys)
    stored, members = {}, {}
    counts = {"batches.meta.txt": 10, "coarse_label_names.txt": 20, "fine_label_names.txt": 100}
    for label_file in info.label_files:
        members[label_file] = "".join(f"class{i}\n" for i in range(counts[label_file])).encode()
    for split, files in (("train", info.train_files), ("test", info.test_files)):
        labels = rng.integers(0, 10, (3 * len(files), num_labels), dtype=np.uint8)
        images = rng.integers(0, 256, (3 * len(files), 3, 32, 32), dtype=np.uint8)
        for i, file in enumerate(files):
            rows = slice(3 * i, 3 * i + 3)
            members[file] = np.concatenate(
                [labels[rows], images[rows].reshape(3, -1)], axis=1).tobytes()
        stored[split] = (labels, images.transpose(0, 2, 3, 1))
    with tarfile.open(path, "w:gz") as archive:
        for file, content in members.items():
            member = tarfile.TarInfo(info.prefix + file)
            member.size = len(content)
            archive.addfile(member, io.BytesIO(content))
    return stored


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_is_prepared_offline_from_an_archive_an_earlier_run_downloaded(tmp_path,
                                                                            monkeypatch, name):
    """A run that downloaded the archive and was stopped while preparing left it in
    data_dir/downloads, where tfds uses it again: offline, the next run was refused ("cannot
    be downloaded"); and preparing CIFAR at all failed without TensorFlow, in tfds's
    extraction ("No module named 'tensorflow'")."""
    from tensorflow_datasets.core.download import downloader, resource

    url = sources.DOWNLOAD_URLS[name]
    info = builders.real_builder_class(name).url_infos[url]
    archive = tmp_path / "downloads" / name / resource.get_dl_fname(url, info.checksum)
    archive.parent.mkdir(parents=True)
    stored = _cifar_archive(archive, name, np.random.default_rng(0))
    resource.write_info_file(url=url, path=archive, dataset_name=name,
                             original_fname=os.path.basename(url), url_info=info)

    def offline(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(sources, "reachable", offline)
    monkeypatch.setattr(downloader._Downloader, "_sync_download", offline)
    ds = data.load_dataset(name, data_dir=str(tmp_path), train_on_all=True)
    assert "tensorflow" not in sys.modules
    for split, (labels, images) in (("train", stored["train"]), ("test", stored["test"])):
        got = getattr(ds, split)  # in tfds's order: compared as sets of (label, image)
        assert (sorted(zip(got.labels.tolist(), map(bytes, got.images)))
                == sorted(zip(labels[:, -1].tolist(), map(bytes, images))))  # fine: last



def _offline(monkeypatch):
    """Any use of the network fails the test."""
    from tensorflow_datasets.core.download import downloader

    def offline(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(sources, "reachable", offline)
    monkeypatch.setattr(downloader._Downloader, "_sync_download", offline)


def _earlier_download(tmp_path, name):
    """The path of ``name``'s archive as an earlier run's download left it, and its info."""
    from etils import epath
    from tensorflow_datasets.core.download import resource

    url = sources.DOWNLOAD_URLS[name]
    info = builders.real_builder_class(name).url_infos[url]
    archive = tmp_path / "downloads" / name / resource.get_dl_fname(url, info.checksum)
    archive.parent.mkdir(parents=True)
    resource.write_info_file(url=url, path=epath.Path(archive), dataset_name=name,
                             original_fname=os.path.basename(url), url_info=info)
    return archive


def _with_member(archive, member, change):
    """Rewrites the tar.gz ``archive`` with the content of its file ``member`` (a suffix of
    its name) passed through ``change`` (None: left out)."""
    import tarfile

    with tarfile.open(archive) as old:
        members = [(m, old.extractfile(m).read()) for m in old.getmembers()]
    with tarfile.open(archive, "w:gz") as new:
        for m, content in members:
            content = change(content) if m.name.endswith(member) else content
            if content is not None:
                m.size = len(content)
                new.addfile(m, io.BytesIO(content))


@pytest.mark.parametrize("damage", ["cut short", "record cut short", "class names",
                                    "no test batch"])
def test_a_damaged_archive_an_earlier_run_downloaded_is_one_line(tmp_path, monkeypatch,
                                                                 damage):
    """tfds uses an archive it downloaded earlier without checking it again: one damaged
    since (a disk error, a copy cut short) ended in a ValueError's traceback, on every run."""
    archive = _earlier_download(tmp_path, "cifar10")
    _cifar_archive(archive, "cifar10", np.random.default_rng(0))
    if damage == "cut short":
        archive.write_bytes(archive.read_bytes()[:-100])
    elif damage == "record cut short":
        _with_member(archive, "/test_batch.bin", lambda content: content[:-1])
    elif damage == "class names":
        _with_member(archive, "/batches.meta.txt", lambda content: b"cat\ndog\n")
    else:
        _with_member(archive, "/test_batch.bin", lambda content: None)
    _offline(monkeypatch)
    with pytest.raises(data.DataUnavailableError) as info:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"Dataset 'cifar10' cannot be prepared from {archive}")
    assert message.endswith("delete it to download it again, or replace it with the original "
                            f"archive ({sources.DOWNLOAD_URLS['cifar10']}).")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_records_read_from_the_archive_are_tfds_own(tmp_path, monkeypatch, name):
    """The records, in order (keys, ids, coarse and fine labels, HWC images) and the class
    names are those tfds's own generator makes from the extracted archive."""
    import tarfile

    from PIL import Image
    from tensorflow_datasets.image_classification import cifar

    archive = tmp_path / "archive.tar.gz"
    _cifar_archive(archive, name, np.random.default_rng(1))
    with tarfile.open(archive) as opened:
        opened.extractall(tmp_path / "extracted", filter="data")
    monkeypatch.setattr(cifar, "tf", types.SimpleNamespace(
        io=types.SimpleNamespace(gfile=types.SimpleNamespace(GFile=open))))
    with builders.no_tempdir_leak():
        builder = builders.tf_free_builder(name)(data_dir=str(tmp_path / "data"))
    info = builder._cifar_info
    dl_manager = types.SimpleNamespace(download=lambda url: archive)
    ours = builder._split_generators(dl_manager)
    for split, files in (("train", info.train_files), ("test", info.test_files)):
        paths = [str(tmp_path / "extracted" / info.prefix / f) for f in files]
        theirs = list(builders.real_builder_class(name)._generate_examples(
            builder, f"{split}_", paths))
        mine = list(ours[split])
        assert [key for key, _ in mine] == [key for key, _ in theirs] == list(range(len(mine)))
        for (_, record), (_, expected) in zip(mine, theirs):
            image = np.asarray(Image.open(io.BytesIO(record.pop("image"))))
            np.testing.assert_array_equal(image, expected.pop("image"))
            assert record == {k: (int(v) if k != "id" else v) for k, v in expected.items()}
    for key, file in zip(info.label_keys, info.label_files):
        text = (tmp_path / "extracted" / info.prefix / file).read_text()
        assert builder.info.features[key].names == [n for n in text.split("\n") if n]


def test_svhn_is_prepared_offline_from_the_files_an_earlier_run_downloaded(tmp_path,
                                                                         monkeypatch):
    """SVHN's three files, downloaded by a run stopped while preparing: used again, with
    tfds's checksums (the builder that prepares SVHN had none: they were downloaded again)."""
    import scipy.io
    from tensorflow_datasets.core.download import resource

    rng = np.random.default_rng(0)
    stored = {}
    for url, info in builders.real_builder_class("svhn_cropped").url_infos.items():
        images = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
        stored[info.filename] = images
        path = tmp_path / "downloads" / "svhn_cropped" / resource.get_dl_fname(
            url, info.checksum)
        path.parent.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(path, {"X": images, "y": np.full((4, 1), 10, np.uint8)})
        resource.write_info_file(url=url, path=path, dataset_name="svhn_cropped",
                                 original_fname=info.filename, url_info=info)
    _offline(monkeypatch)
    ds = data.load_dataset("svhn", data_dir=str(tmp_path), train_on_all=True)
    assert len(ds.train) == 8 and set(ds.test.labels) == {0}  # train + extra; 10 is 0
    assert sorted(map(bytes, ds.test.images)) == sorted(
        map(bytes, np.rollaxis(stored["test_32x32.mat"], -1)))


def test_svhn_files_put_in_downloads_manual_are_used_and_checked(tmp_path, monkeypatch):
    """The offline message says to put SVHN's files in downloads/manual: they were ignored
    and downloaded again (offline: the network's error), unchecked."""
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    for name in sources.MANUAL_FILES["svhn_cropped"]:
        (manual / name).write_bytes(b"not the file")
    _offline(monkeypatch)
    with pytest.raises(data.DataUnavailableError, match=re.escape(
            "(12 bytes, expected 1.24 GiB) does not match tfds's checksum for 'svhn_cropped'")):
        data.load_dataset("svhn", data_dir=str(tmp_path), download=False)

def test_corrupt_record_is_reported(tmp_path):
    data.testing.make_tfds_dataset("cifar10", str(tmp_path), num_train=20, num_test=10,
                                   corrupt=("test",))
    with pytest.raises(data.CorruptDataError, match="split 'test'.*prepare the dataset again "
                       r"\(or copy it again, whole, from where it was prepared\)\.$"):
        data.load_dataset("cifar10", data_dir=str(tmp_path), validation_size=0)


def test_a_missing_record_file_is_named_with_the_fix(tmp_path):
    """A prepared dataset copied without one of its record files was reported as "Record 0
    ... cannot be decoded (RuntimeError: open() failed: No such file ...)", the file last."""
    prepared = data.testing.make_tfds_dataset("cifar10", str(tmp_path), num_train=20,
                                              num_test=10)
    [record] = [f for f in os.listdir(prepared) if f.startswith("cifar10-test.array_record")]
    os.remove(os.path.join(prepared, record))
    with pytest.raises(data.CorruptDataError) as caught:
        data.load_dataset("cifar10", data_dir=str(tmp_path), validation_size=0)
    assert str(caught.value) == (
        f"'cifar10' in {prepared} is incomplete: the record file {record} of split 'test' is "
        f"missing; delete {prepared} and prepare the dataset again (or copy it again, whole, "
        "from where it was prepared).")


def test_a_sharded_dataset_moved_elsewhere_loads_and_names_its_missing_shards(tmp_path):
    """The record files checked are the ones its dataset_info.json lists, where it now lies:
    a prepared dataset copied or moved (the paths tfds wrote it under gone) loads, each
    split's shards (``-00000-of-00003``) found; shards missing are counted and named."""
    made = data.testing.make_tfds_dataset("cifar10", str(tmp_path / "prepared"),
                                          num_train=30, num_test=9, num_shards=3)
    train_shards = sorted(f for f in os.listdir(made) if f.startswith("cifar10-train."))
    assert train_shards == [f"cifar10-train.array_record-0000{i}-of-00003" for i in range(3)]
    shutil.move(str(tmp_path / "prepared"), str(tmp_path / "copy"))
    moved = made.replace(str(tmp_path / "prepared"), str(tmp_path / "copy"))
    ds = data.load_dataset("cifar10", data_dir=str(tmp_path / "copy"), download=False,
                           validation_size=0)
    assert (len(ds.train), len(ds.test)) == (30, 9)
    for shard in train_shards[1:]:
        os.remove(os.path.join(moved, shard))
    with pytest.raises(data.CorruptDataError) as caught:
        data.load_dataset("cifar10", data_dir=str(tmp_path / "copy"), download=False,
                          validation_size=0)
    assert str(caught.value) == (
        f"'cifar10' in {moved} is incomplete: 2 of the 3 record files of split 'train' "
        f"({', '.join(train_shards[1:])}) are missing; delete {moved} and prepare the dataset "
        "again (or copy it again, whole, from where it was prepared).")


@pytest.mark.parametrize("damage", ["empty", "not json", "a directory"])
def test_a_damaged_dataset_info_is_one_line_naming_it(tmp_path, damage):
    """A prepared dataset whose dataset_info.json is unreadable (an interrupted copy leaves
    it empty or cut short) ended in protobuf's ParseError (tfds's DatasetInfoFileError for a
    directory) and its traceback, from tfds.builder."""
    prepared = data.testing.make_tfds_dataset("cifar10", str(tmp_path), num_train=20,
                                              num_test=10)
    info = os.path.join(prepared, "dataset_info.json")
    if damage == "a directory":
        os.remove(info)
        os.mkdir(info)
    else:
        with open(info, "w") as f:
            f.write("" if damage == "empty" else '{"name": "cifar10", "vers')
    with pytest.raises(data.CorruptDataError) as caught:
        data.load_dataset("cifar10", data_dir=str(tmp_path), download=False)
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, errors.Error)
    assert message.startswith(f"'cifar10' in {prepared} is damaged: {info} cannot be read (")
    assert message.endswith(f"delete {prepared} and prepare the dataset again (or copy it "
                            "again, whole, from where it was prepared).")


@pytest.mark.parametrize("failure", [PermissionError(13, "Permission denied"),
                                     OSError(5, "Input/output error")])
def test_a_dataset_info_this_user_cannot_read_is_not_called_damaged(tmp_path, monkeypatch,
                                                                    failure):
    """A dataset_info.json that cannot be read (another user's mode 600 copy, a failing
    disk or network file system) was 'damaged: delete it and prepare the dataset again':
    a whole dataset, maybe shared, deleted for a permission."""
    import builtins

    prepared = data.testing.make_tfds_dataset("cifar10", str(tmp_path), num_train=20,
                                              num_test=10)
    info = os.path.join(prepared, "dataset_info.json")
    real_open = builtins.open

    def unreadable(file, *args, **kwargs):
        if os.fspath(file) == info:
            raise type(failure)(failure.errno, failure.strerror, info)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", unreadable)
    with pytest.raises(errors.DataError) as caught:
        data.load_dataset("cifar10", data_dir=str(tmp_path), download=False)
    message = str(caught.value)
    assert not isinstance(caught.value, data.CorruptDataError)
    assert "\n" not in message and "delete" not in message
    assert message == (
        f"'cifar10' in {prepared} cannot be read: {info}: {failure.strerror} "
        f"({type(failure).__name__}); let this user read {prepared} and its files (or fix "
        "the file system holding them), or set data_dir to a copy it can read.")
    assert os.path.exists(info)


def test_tfds_not_installed_is_one_line_and_image_folders_need_none(tmp_path, monkeypatch):
    """Without tensorflow-datasets, a tfds dataset (real or the trainer's fake data) ended
    in ModuleNotFoundError's traceback; an image folder never needed it."""
    from configs import load_config
    from stochastic_depth_jax.training import setup

    root = data.testing.make_image_folder(str(tmp_path / "images"), classes=2,
                                          per_class_train=5, per_class_test=2, size=(8, 8))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    expected = ("tensorflow-datasets is not installed; it reads cifar10, cifar100 and svhn "
                "(fake data too): pip install 'tensorflow-datasets>=4.9.8,<5' (or reinstall "
                "this package with its dependencies); an image_folder: dataset is read "
                "without it.")
    with pytest.raises(data.TfdsImportError) as caught:
        data.load_dataset("cifar10", data_dir=str(tmp_path / "tfds"))
    assert str(caught.value) == expected
    assert isinstance(caught.value, errors.Error) and isinstance(caught.value, ImportError)
    config = load_config("cifar10:smoke", ["--config.progress_bar=false"])
    with pytest.raises(data.TfdsImportError, match="not installed"):
        setup.load_data(config, str(tmp_path / "workdir"))  # writes fake data first
    ds = data.load_dataset(f"image_folder:{root}", validation_size=0)
    assert len(ds.train) == 10 and len(ds.test) == 4


@pytest.mark.parametrize("message", [
    "No module named 'array_record'",
    "No module named 'array_record'\nIt is needed to read tfds's record files.",
])
def test_a_module_tfds_needs_missing_is_one_line_naming_it(tmp_path, monkeypatch, message):
    """tfds installed without a module it imports but does not declare (array_record); a
    module's own multi-line import message gives its first line only."""
    import builtins

    real_import = builtins.__import__

    def without_array_record(name, *args, **kwargs):
        if name == "tensorflow_datasets":
            raise ModuleNotFoundError(message, name="array_record")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_array_record)
    with pytest.raises(data.TfdsImportError) as caught:
        data.load_dataset("svhn", data_dir=str(tmp_path))
    assert str(caught.value) == (
        "tensorflow-datasets cannot be imported (ModuleNotFoundError: No module named "
        "'array_record'); it reads cifar10, cifar100 and svhn: reinstall this package with "
        "its dependencies, which include the modules tfds uses without declaring them "
        "(array_record, importlib_resources); an image_folder: dataset is read without it.")


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="cifar100.*image_folder"):
        data.load_dataset("mnist")


def test_tf_free_cifar_reader_matches_the_binary_layout(tmp_path):
    image = np.arange(3072, dtype=np.uint32).astype(np.uint8).reshape(3, 32, 32)
    path = tmp_path / "batch.bin"
    path.write_bytes(bytes([7]) + image.tobytes() + bytes([3]) + image.tobytes())
    records = list(builders.read_cifar_binary(str(path), num_labels=1))
    assert [int(r[0][0]) for r in records] == [7, 3]
    np.testing.assert_array_equal(records[0][1], image.transpose(1, 2, 0))
    path.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="damaged"):
        list(builders.read_cifar_binary(str(path), num_labels=1))


def test_tf_free_builders_keep_real_name_and_version():
    for name in ("cifar10", "cifar100", "svhn_cropped"):
        cls = builders.tf_free_builder(name)
        assert cls.name == name
        assert cls.VERSION == builders.real_builder_class(name).VERSION


# --- image folders --------------------------------------------------------------------

def test_image_folder_loads(tmp_path):
    root = data.testing.make_image_folder(str(tmp_path / "imgs"), classes=["cat", "dog", "eel"],
                                          per_class_train=10, per_class_test=4, size=(24, 16))
    ds = data.load_dataset(f"image_folder:{root}", validation_size=6)
    assert ds.class_names == ("cat", "dog", "eel") and ds.num_classes == 3
    assert ds.image_shape == (24, 16, 3)
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (24, 6, 12)
    np.testing.assert_array_equal(np.bincount(ds.test.labels), [4, 4, 4])


def _folder(tmp_path):
    return data.testing.make_image_folder(str(tmp_path / "f"), classes=2, per_class_train=2,
                                          per_class_test=1)


def test_image_folder_empty_class(tmp_path):
    root = _folder(tmp_path)
    os.makedirs(os.path.join(root, "train", "class2"))
    os.makedirs(os.path.join(root, "test", "class2"))
    with pytest.raises(ValueError, match="class2.*has no"):
        data.load_dataset(f"image_folder:{root}")
    # Removing only the empty one was refused next, as train/ and test/ differing: the fix
    # names both.
    os.rmdir(os.path.join(root, "train", "class2"))
    data.testing.make_image_folder(os.path.join(tmp_path, "more"), classes=["class2"],
                                   per_class_train=2, per_class_test=0)
    os.rename(os.path.join(tmp_path, "more", "train", "class2"),
              os.path.join(root, "train", "class2"))
    with pytest.raises(errors.DataError, match=r"test/class2' has no .* images; add some, or "
                       r"remove the class from both train/ and test/ \(train/class2/ and "
                       r"test/class2/\)\.$"):
        data.load_dataset(f"image_folder:{root}")


def test_image_folder_unreadable_file(tmp_path):
    root = _folder(tmp_path)
    bad = os.path.join(root, "train", "class1", "bad.png")
    open(bad, "wb").write(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        data.load_dataset(f"image_folder:{root}")


def test_image_folder_mismatched_classes(tmp_path):
    root = _folder(tmp_path)
    os.rename(os.path.join(root, "test", "class1"), os.path.join(root, "test", "other"))
    with pytest.raises(ValueError, match="only in train: \\['class1'\\].*only in test: \\['other'\\]"):
        data.load_dataset(f"image_folder:{root}")


def test_image_folder_mixed_sizes(tmp_path):
    from PIL import Image
    root = _folder(tmp_path)
    odd = os.path.join(root, "test", "class0", "odd.png")
    Image.fromarray(np.zeros((20, 32, 3), np.uint8)).save(odd)
    with pytest.raises(errors.DataError, match="odd.png' is 32x20 but '.*train/class0/0.png' is "
                       "32x32 .*one size: resize them"):
        data.load_dataset(f"image_folder:{root}")


def test_image_folder_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="Image folder '.*nothing' does not exist"):
        data.load_dataset(f"image_folder:{tmp_path / 'nothing'}")


@pytest.mark.parametrize("path", ["gs://bucket/pets/", "s3://bucket/a/pets"])
def test_remote_image_folder_is_one_line_saying_to_copy_it(path):
    """Read as a local path, it 'did not exist'; the line says why and what to run."""
    with pytest.raises(errors.DataError) as info:
        data.load_dataset(f"image_folder:{path}")
    message = str(info.value)
    assert "\n" not in message and "does not exist" not in message
    assert message.startswith(f"Image folder {path!r} is remote: image folders are read from "
                              "a local disk only")
    assert f"cp -r {path.rstrip('/')} /data/" in message
    assert message.endswith("image_folder:/data/pets")


def test_image_folder_root_mistakes(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    with pytest.raises(errors.DataError, match="0.png' is a file, not a directory"):
        data.load_dataset(f"image_folder:{os.path.join(root, 'train', 'class0', '0.png')}")
    with pytest.raises(errors.DataError, match="image_folder: needs a path"):
        data.load_dataset("image_folder:")
    monkeypatch.setenv("HOME", str(tmp_path))  # `~` is expanded, as a shell would.
    assert data.load_dataset("image_folder:~/f/", validation_size=0).class_names == (
        "class0", "class1")


def _save(path, pixels, mode=None, **kwargs):
    from PIL import Image
    Image.fromarray(pixels, mode).save(path, **kwargs)


def _gray_folder(root, pixels, names=("a", "b")):
    """root/{train,test}/<name>/0.png, grayscale."""
    for split in ("train", "test"):
        for name in names:
            os.makedirs(os.path.join(root, split, name))
            _save(os.path.join(root, split, name, "0.png"), pixels, "L")
    return root


def test_image_folder_converts_every_mode_to_8_bit_rgb(tmp_path):
    """Grayscale, palette, RGBA and 16-bit PNGs mixed with RGB ones: all 3-channel uint8,
    the 16-bit one scaled (65535 -> 255), not clipped."""
    root = _folder(tmp_path)
    ramp = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
    class0 = os.path.join(root, "train", "class0")
    _save(os.path.join(class0, "gray.png"), (ramp // 4).astype(np.uint8), "L")
    _save(os.path.join(class0, "pal.png"), np.full((32, 32), 7, np.uint8), "P")
    _save(os.path.join(class0, "rgba.png"), np.full((32, 32, 4), 9, np.uint8), "RGBA")
    _save(os.path.join(class0, "deep.png"), ramp * 64)  # 16-bit: 0..65472
    ds = data.load_dataset(f"image_folder:{root}", validation_size=0)
    assert ds.image_shape == (32, 32, 3) and len(ds.train) == 8
    by_name = dict(zip(["deep", "gray", "pal", "rgba"], ds.train.images[2:6]))  # after 0, 1
    np.testing.assert_array_equal(by_name["deep"][..., 0], (ramp.astype(np.int64) * 64 * 255
                                                           + 32767) // 65535)
    np.testing.assert_array_equal(by_name["deep"][..., 0], by_name["deep"][..., 2])
    np.testing.assert_array_equal(by_name["gray"][..., 1], ramp // 4)
    assert by_name["rgba"].max() == 9 and by_name["rgba"].min() == 9


def test_image_folder_of_grayscale_images_has_three_channels(tmp_path):
    root = _gray_folder(str(tmp_path / "g"), np.full((8, 8), 50, np.uint8))
    ds = data.load_dataset(f"image_folder:{root}", validation_size=0)
    assert ds.image_shape == (8, 8, 3) and ds.mean.shape == (3,)


def test_image_folder_applies_exif_orientation(tmp_path):
    """A phone photo stored sideways with an EXIF rotation is read as a viewer shows it."""
    from PIL import Image
    root = _folder(tmp_path)  # 32x32 images
    stored = np.zeros((32, 16, 3), np.uint8)
    stored[:, :8] = 255  # left half white as stored; the top half once rotated
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    for split in ("train", "test"):
        for name in ("class0", "class1"):
            os.remove(os.path.join(root, split, name, "0.png"))
            _save(os.path.join(root, split, name, "0.jpg"), stored, exif=exif, quality=100)
    for split in ("train", "test"):  # the others: 16 high, 32 wide, as displayed
        for name in ("class0", "class1"):
            for path in os.listdir(os.path.join(root, split, name)):
                if path.endswith(".png"):
                    _save(os.path.join(root, split, name, path), np.zeros((16, 32, 3), np.uint8))
    ds = data.load_dataset(f"image_folder:{root}", validation_size=0)
    assert ds.image_shape == (16, 32, 3)
    shown = ds.train.images[0].mean(-1)
    assert shown[:8].mean() > 200 and shown[8:].mean() < 50


def test_image_folder_reads_other_formats_and_names_what_it_skips(tmp_path):
    root = _folder(tmp_path)
    class0 = os.path.join(root, "train", "class0")
    pixels = np.zeros((32, 32, 3), np.uint8)
    for name in ("a.BMP", "b.webp", "c.tif", "d.JPG", "e.Png"):
        fmt = {"d.JPG": "JPEG", "e.Png": "PNG"}.get(name)
        _save(os.path.join(class0, name), pixels, format=fmt)
    for junk in (".DS_Store", "Thumbs.db", "._0.png"):  # system files: skipped silently
        open(os.path.join(class0, junk), "wb").write(b"junk")
    open(os.path.join(class0, "README.txt"), "w").write("about cats")
    os.makedirs(os.path.join(class0, "more"))
    _save(os.path.join(class0, "more", "x.png"), pixels)
    _save(os.path.join(root, "train", "loose.png"), pixels)
    with pytest.warns(UserWarning, match="Skipped 3 entries of .*train' \\('loose.png', "
                      "'class0/more/', 'class0/README.txt'\\): only class directories and "
                      ".* images directly in them") as caught:
        ds = data.load_dataset(f"image_folder:{root}", validation_size=0)
    assert len(warned.messages(caught, UserWarning)) == 1
    np.testing.assert_array_equal(np.bincount(ds.train.labels), [7, 2])


def test_image_folder_class_names_are_sorted_as_strings(tmp_path):
    """Numeric names too ('10' before '2'): the order torchvision's ImageFolder uses, and the
    order runs trained before class names were recorded depend on."""
    root = data.testing.make_image_folder(str(tmp_path / "n"), classes=["10", "2", "1"],
                                          per_class_train=1, per_class_test=1, size=(4, 4))
    ds = data.load_dataset(f"image_folder:{root}", validation_size=0)
    assert ds.class_names == ("1", "10", "2")
    np.testing.assert_array_equal(np.sort(ds.test.labels), [0, 1, 2])


@pytest.mark.parametrize("fmt, content, expected", [
    ("PNG", b"", "cannot identify image file"),
    ("PNG", "truncate", "truncated"),
    ("JPEG", "truncate", "runcated"),
    ("TIFF", "float", "floating-point pixels.*convert it to an 8- or 16-bit image"),
    ("TIFF", "int32", "32-bit integer pixels \\(values 0..200\\).*convert it to an 8- or "
     "16-bit image"),
])
def test_image_folder_bad_files_are_one_error_naming_them(tmp_path, fmt, content, expected):
    root = _folder(tmp_path)
    path = os.path.join(root, "test", "class1", f"bad.{fmt.lower()}")
    if content == "float":
        _save(path, np.zeros((32, 32), np.float32))
    elif content == "int32":  # 0..200 in a 32-bit image: scaling it as 16 bits would darken it
        _save(path, np.linspace(0, 200, 32 * 32).astype(np.int32).reshape(32, 32))
    elif content == "truncate":
        _save(path, np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8), format=fmt)
        whole = open(path, "rb").read()
        open(path, "wb").write(whole[:len(whole) // 2])
    else:
        open(path, "wb").write(content)
    with pytest.raises(errors.DataError, match=f"bad.{fmt.lower()}.*{expected}"):
        data.load_dataset(f"image_folder:{root}")


def test_validation_fraction_that_holds_out_nothing_or_everything_is_refused():
    split = splits.Split(np.zeros((4, 2, 2, 3), np.uint8), np.arange(4, dtype=np.int32))
    with pytest.raises(errors.DataError, match="validation_size=0.1 of the 4 training examples "
                       "holds out 0, leaving 4.*a count such as 1, or 0 for no validation"):
        splits.holdout(split, 0.1, 0)
    with pytest.raises(errors.DataError, match="holds out 4, leaving 0"):
        splits.holdout(split, 0.9, 0)
    assert splits.holdout(split, 0.0, 0)[1] is None and len(splits.holdout(split, 0.25, 0)[1]) == 1
    # A fraction out of [0, 1) named no fix; a whole one (a count written 2.0, as a JSON
    # file may hold it) is told to be an int.
    with pytest.raises(errors.DataError, match=re.escape(
            "validation_size=2.0 as a fraction must be in [0, 1); pass a fraction such as 0.1, "
            "a count as an int (2), or 0 for no validation set.")):
        splits.holdout(split, 2.0, 0)
    with pytest.raises(errors.DataError, match=re.escape("; pass a fraction such as 0.1, a "
                                                         "count (an int), or 0 for no")):
        splits.holdout(split, -0.5, 0)


def test_validation_size_as_a_numpy_scalar_counts_by_its_kind_and_others_are_refused():
    """np.float32(0.1) (not a Python float) was truncated by int() to 0: silently no
    validation set. True was read as 1, a string parsed or failed with a traceback."""
    split = splits.Split(np.zeros((20, 2, 2, 3), np.uint8), np.arange(20, dtype=np.int32))
    assert len(splits.holdout(split, np.float32(0.1), 0)[1]) == 2
    assert len(splits.holdout(split, np.int64(3), 0)[1]) == 3
    for bad in (True, "5", "0.1", [5]):
        expected = re.escape(f"validation_size={bad!r} must be a count (an int such as 5000), "
                             "a fraction (a float in [0, 1) such as 0.1)")
        with pytest.raises(errors.DataError, match=expected):
            splits.holdout(split, bad, 0)


def test_decoded_cache_is_reused_and_rebuilt_when_stale_or_broken(tmp_path, monkeypatch):
    root = str(tmp_path)
    data.testing.make_tfds_dataset("cifar10", root, num_train=30, num_test=10)
    first = sources.read_split("cifar10", "test", root)
    caches = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
              if f.startswith("decoded-test-label")]
    assert len(caches) == 1 and caches[0].endswith(".npz")
    calls = []
    real = sources._decode_chunk
    monkeypatch.setattr(sources, "_decode_chunk", lambda *a: calls.append(1) or real(*a))
    again = sources.read_split("cifar10", "test", root)  # from the cache: nothing decoded
    assert calls == []
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)
    with open(caches[0], "wb") as f:  # a broken cache is ignored with a warning, then rebuilt
        f.write(b"not an npz")
    with pytest.warns(UserWarning, match="damaged decoded-data cache"):
        rebuilt = sources.read_split("cifar10", "test", root)
    assert calls and np.array_equal(rebuilt.images, first.images)
    calls.clear()
    monkeypatch.setattr(sources, "_records_stamp", lambda *a: "re-prepared")  # stale stamp
    sources.read_split("cifar10", "test", root)
    assert calls


def test_a_split_prepared_again_in_files_of_the_same_sizes_is_decoded_again(tmp_path,
                                                                             monkeypatch):
    """The cache is stamped with its record files' names, sizes and times: data prepared
    (or copied) again whose files keep their sizes is not read from the old cache."""
    root = str(tmp_path)
    data.testing.make_tfds_dataset("cifar10", root, num_train=30, num_test=10)
    sources.read_split("cifar10", "test", root)
    info_dir = os.path.dirname(_cache(root))
    records = [os.path.join(info_dir, f) for f in os.listdir(info_dir)
               if f.startswith("cifar10-test.")]
    assert records
    for path in records:
        later = os.stat(path).st_mtime_ns + 5 * 10**9
        os.utime(path, ns=(later, later))
    calls = []
    real = sources._decode_chunk
    monkeypatch.setattr(sources, "_decode_chunk", lambda *a: calls.append(1) or real(*a))
    sources.read_split("cifar10", "test", root)
    assert calls


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "zero_tail"])
def test_damaged_decoded_cache_is_rebuilt(tmp_path, monkeypatch, damage):
    root = str(tmp_path)
    data.testing.make_tfds_dataset("cifar10", root, num_train=30, num_test=10)
    first = sources.read_split("cifar10", "test", root)
    [cache] = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
               if f.startswith("decoded-test-label")]
    blob = bytearray(open(cache, "rb").read())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip_bytes":  # Inside the image array: only a content check sees it.
        for i in range(600, 3000, 97):
            blob[i] ^= 0x5A
    else:
        blob[-200:] = bytes(200)
    open(cache, "wb").write(bytes(blob))
    calls = []
    real = sources._decode_chunk
    monkeypatch.setattr(sources, "_decode_chunk", lambda *a: calls.append(1) or real(*a))
    with pytest.warns(UserWarning, match="damaged decoded-data cache"):
        rebuilt = sources.read_split("cifar10", "test", root)
    assert calls  # Decoded again from the records...
    np.testing.assert_array_equal(rebuilt.images, first.images)
    np.testing.assert_array_equal(rebuilt.labels, first.labels)
    calls.clear()
    again = sources.read_split("cifar10", "test", root)  # ...and the cache is good again.
    assert calls == [] and np.array_equal(again.images, first.images)


def _cache(root, split="test"):
    [cache] = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
               if f == f"decoded-{split}-label.npz"]
    return cache


def test_two_hosts_caching_a_split_at_once_each_write_a_file_of_their_own(tmp_path,
                                                                           monkeypatch):
    """Two hosts sharing a data_dir, whose processes have the same pid (containers), cache
    the same split at once: both wrote '<cache>.tmp-<pid>.npz'. The second truncated the
    first one's file and renamed it while the first was writing it: the first's rename
    failed (a warning that its cache was lost), and its last writes went into the file
    the second had made the cache. Each now writes a file of its own."""
    root = str(tmp_path)
    data.testing.make_tfds_dataset("cifar10", root, num_train=30, num_test=10)
    first = sources.read_split("cifar10", "test", root)
    cache = _cache(root)
    os.remove(cache)
    savez = np.savez

    def the_other_host_meanwhile(file, **arrays):
        savez(file, **arrays)  # Written, not yet renamed: the other host writes it all.
        monkeypatch.setattr(np, "savez", savez)
        sources._write_cache(cache, str(arrays["stamp"]), arrays["images"], arrays["labels"])

    monkeypatch.setattr(np, "savez", the_other_host_meanwhile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sources.read_split("cifar10", "test", root)
    assert warned.messages(caught, UserWarning) == []
    assert np.savez is savez  # Both wrote, ...
    assert [n for n in os.listdir(os.path.dirname(cache)) if ".tmp-" in n] == []
    calls = []
    real = sources._decode_chunk
    monkeypatch.setattr(sources, "_decode_chunk", lambda *a: calls.append(1) or real(*a))
    again = sources.read_split("cifar10", "test", root)  # ... and the cache is whole.
    assert calls == [] and np.array_equal(again.images, first.images)


def test_the_decoded_caches_temporaries_a_kill_left_are_removed(tmp_path):
    """A run killed while caching a split left its temporary file (a whole split's size:
    hundreds of MB), and each kill one more. Those of this cache that no writer holds and
    that were not written to for a minute go, as earlier versions' ('<cache>.tmp-<pid>.npz')
    do; one being written (recent, or held by its writer) and other files stay."""
    root = str(tmp_path)
    data.testing.make_tfds_dataset("cifar10", root, num_train=30, num_test=10)
    sources.read_split("cifar10", "test", root)
    cache = _cache(root)
    directory, name = os.path.split(cache)
    abandoned = [f"{name}.tmp-0123456789ab", f"{name}.tmp-4242.npz"]
    held, recent = f"{name}.tmp-00000000abcd", f"{name}.tmp-fedcba987654"
    others = [f"{name}.tmp-12.npz.part", "notes.json.tmp-0123456789ab", f"{name}.tmp-x1.npz"]
    old = time.time() - 2 * workdir_lib.ABANDONED_AFTER_S
    for entry in abandoned + [held, recent] + others:
        with open(os.path.join(directory, entry), "wb") as f:
            f.write(b"part of a split")
        if entry != recent:
            os.utime(os.path.join(directory, entry), (old, old))
    with open(os.path.join(directory, held), "rb+") as writer:
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # A live writer's.
        sources.read_split("cifar10", "test", root)
    left = set(os.listdir(directory))
    assert not left & set(abandoned), sorted(left)
    assert {held, recent, name, *others} <= left, sorted(left)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("where", ["pipe", "terminal"])
def test_decoding_shows_a_bar_on_a_terminal_and_two_lines_in_a_pipe(tmp_path, monkeypatch,
                                                                     where):
    """``train.py > log``: the one-time decoding leaves a start and a finish line, not the
    bar's redraws; on a terminal, the bar alone (cleared when done)."""
    root = str(tmp_path)
    data.testing.make_tfds_dataset("cifar10", root, num_train=40, num_test=10)
    monkeypatch.setattr(sources, "_READ_CHUNK", 4)  # 10 chunks: long enough to show progress
    stdout, stderr = (io.StringIO(), io.StringIO()) if where == "pipe" else (
        _Terminal(), _Terminal())
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    sources.read_split("cifar10", "train", root)
    if where == "pipe":
        start, finish = stdout.getvalue().splitlines()
        assert start.startswith("Decoding cifar10/train (40 images), once")
        assert finish.startswith("Decoded cifar10/train in ")
        assert stderr.getvalue() == ""
    else:
        assert stdout.getvalue() == ""
        assert "decoding cifar10/train" in stderr.getvalue()


def test_progress_bar_false_decodes_with_two_lines_on_a_terminal_too(tmp_path, monkeypatch):
    """``--config.progress_bar=false`` reaches the one-time decoding (via ``load_data``): on a
    terminal it prints the start and finish lines a log gets, and draws no bar."""
    from configs import load_config
    from stochastic_depth_jax.training import setup

    root = str(tmp_path)
    data.testing.make_tfds_dataset("cifar10", root, num_train=40, num_test=10)
    monkeypatch.setattr(sources, "_READ_CHUNK", 4)  # train: 10 chunks, long enough to show
    stdout, stderr = _Terminal(), _Terminal()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    config = load_config("cifar10:smoke", [f"--config.data_dir={root}",
                                           "--config.fake_data.num_train=0",
                                           "--config.progress_bar=false"])
    ds = setup.load_data(config, str(tmp_path / "workdir"))
    assert ds.augment == "flip_translate"  # augment='auto': the dataset's
    start, finish = stdout.getvalue().splitlines()
    assert start.startswith("Decoding cifar10/train (40 images), once")
    assert finish.startswith("Decoded cifar10/train in ")
    assert stderr.getvalue() == ""


def test_the_trainer_loads_the_configs_augmentation_and_records_it(tmp_path):
    """--config.augment reaches the data the trainer loads, and run.json's data record."""
    from configs import load_config
    from stochastic_depth_jax.training import setup

    root = str(tmp_path)
    data.testing.make_tfds_dataset("cifar10", root, num_train=40, num_test=10)
    config = load_config("cifar10:smoke", [f"--config.data_dir={root}",
                                           "--config.fake_data.num_train=0",
                                           "--config.progress_bar=false",
                                           "--config.augment=none", "--config.batch_size=8"])
    ds = setup.load_data(config, str(tmp_path / "workdir"))
    assert ds.augment == "none"
    record = setup.run_metadata(config, ds, setup.build_for_dataset(config, ds).mesh)
    assert record["data"]["augment"] == "none" and record["config"]["augment"] == "none"


@pytest.mark.parametrize("data_dir", ["gs://bucket/tensorflow_datasets", "s3://b/tfds/"])
def test_a_remote_tfds_data_dir_is_refused_in_one_line(data_dir):
    """A gs:// data_dir (tfds on GCS, as on TPU pods) failed with a FileNotFoundError's
    traceback: the prepared record files are listed with os and read by array_record, which
    open local paths only."""
    with pytest.raises(errors.DataError) as caught:
        data.load_dataset("cifar10", data_dir=data_dir, download=False)
    where = data_dir.rstrip("/") + "/cifar10"
    assert str(caught.value) == (
        f"data_dir {data_dir!r} is remote: prepared tfds datasets are read from a local disk "
        f"only (array_record files); copy it to one (e.g. gsutil -m cp -r {where} "
        "/data/tensorflow_datasets/) and set data_dir=/data/tensorflow_datasets.")



def test_a_data_dir_given_as_a_path_object_loads(tmp_path):
    """A ``pathlib.Path`` data_dir (os.path.join and tfds take one) raised a TypeError from
    the remote data_dir check ('://' in a Path)."""
    data.testing.make_tfds_dataset("cifar10", str(tmp_path), num_train=12, num_test=5)
    ds = data.load_dataset("cifar10", data_dir=tmp_path, download=False, validation_size=0)
    assert (len(ds.train), len(ds.test)) == (12, 5)


@pytest.mark.parametrize("given", ["argument", "environment"])
def test_a_data_dir_under_the_home_directory_given_with_a_tilde_loads(tmp_path, monkeypatch,
                                                                      given):
    """``data_dir='~/tensorflow_datasets'`` from Python, or a $TFDS_DATA_DIR that no shell
    expanded (a Dockerfile's ENV), named a folder '~' under the current directory: the
    prepared data was reported missing (and a download would have gone there)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data.testing.make_tfds_dataset("cifar10", str(tmp_path / "home" / "tfds"), num_train=12,
                                   num_test=5)
    monkeypatch.chdir(tmp_path)
    if given == "environment":
        monkeypatch.setenv("TFDS_DATA_DIR", "~/tfds")
    ds = data.load_dataset("cifar10", data_dir="~/tfds" if given == "argument" else None,
                           download=False, validation_size=0)
    assert (len(ds.train), len(ds.test)) == (12, 5)
    assert not os.path.exists(tmp_path / "~")


@pytest.mark.parametrize("url", ["file://{}", "file://localhost{}"])
def test_a_file_url_data_dir_is_told_to_be_its_local_path(tmp_path, url):
    """A file:// data_dir names a local directory: it was refused as remote, with advice to
    copy it with gsutil (tfds reads no file:// URL; image folders take one)."""
    data.testing.make_tfds_dataset("cifar10", str(tmp_path), num_train=12, num_test=5)
    with pytest.raises(errors.DataError) as caught:
        data.load_dataset("cifar10", data_dir=url.format(tmp_path), download=False)
    assert str(caught.value) == (
        f"data_dir {url.format(tmp_path)!r} is a file:// URL, which tfds does not read; give "
        f"its local path: data_dir={tmp_path}")
    ds = data.load_dataset("cifar10", data_dir=str(tmp_path), download=False, validation_size=0)
    assert (len(ds.train), len(ds.test)) == (12, 5)
