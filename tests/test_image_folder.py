"""Users' own image folders: the per-class validation hold-out (and the random one that runs
recorded before it keep), data paths recorded absolute, the train/ + val/ layout, and sizes
and memory checked from the images' headers before any image is decoded."""

import dataclasses
import os
import re
import sys
import types

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs` and train.py live at the repository root.

import train as train_cli  # noqa: E402
from cli_output import one_line_error  # noqa: E402
from configs import load_config  # noqa: E402
from stochastic_depth_jax import data, errors, logs  # noqa: E402
from stochastic_depth_jax.data import image_folder, splits  # noqa: E402
from stochastic_depth_jax.training import evaluate, setup  # noqa: E402


def _labels_split(sizes):
    """A Split of 1x1 images whose labels are `sizes[c]` times each class c, in class order."""
    labels = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
    images = np.arange(labels.size, dtype=np.uint8).reshape(-1, 1, 1, 1)
    return splits.Split(images, labels)


# --- the per-class hold-out ---------------------------------------------------------------

def test_per_class_counts_follow_largest_remainders_and_keep_every_class_training():
    sizes = np.array([2, 5, 23])
    for count in range(1, 16):  # up to half: no class's share reaches all of its images
        taken = splits.per_class_counts(sizes, count, np.random.default_rng(count))
        quota = count * sizes / sizes.sum()
        assert taken.sum() == count and np.all(taken <= sizes - 1)
        assert np.all((taken == np.floor(quota)) | (taken == np.ceil(quota))), (count, taken)
    # A class of one image keeps it even where its share rounds up; the seat goes elsewhere.
    taken = splits.per_class_counts(np.array([1, 1, 8]), 2, np.random.default_rng(0))
    assert list(taken[:2]) == [0, 0] and taken.sum() == 2
    with pytest.raises(errors.DataError, match="would leave a class without a training "
                       "example .*at most 7 can be held out.*smaller validation_size"):
        splits.per_class_counts(np.array([1, 1, 8]), 8, np.random.default_rng(0))


def test_per_class_hold_out_is_disjoint_complete_and_seeded():
    split = _labels_split([3, 7, 20])
    train, val = splits.holdout(split, 0.2, seed=5, method="per_class")
    assert sorted(np.concatenate([train.images, val.images]).ravel()) == list(range(30))
    np.testing.assert_array_equal(np.bincount(val.labels), [1, 1, 4])
    again = splits.holdout(split, 0.2, seed=5, method="per_class")[1]
    np.testing.assert_array_equal(again.images, val.images)
    other = splits.holdout(split, 0.2, seed=6, method="per_class")[1]
    assert not np.array_equal(other.images, val.images)


@pytest.mark.parametrize("sizes, refused", [
    ([2, 2, 1], 0.05), ([2, 2, 1], 0.9), ([2, 2, 1], 5), ([3, 1, 1, 1, 1, 1, 1, 1, 1, 1], 0.01),
    ([2, 2, 1], 3), ([1, 1, 1], 0.1), ([1, 1, 1], 3), ([1, 1, 1], 2)])
def test_a_refused_per_class_validation_size_suggests_only_what_holds_out(sizes, refused):
    """A per-class hold-out refused a fraction of a small folder suggesting 'a count such
    as 1', which it then refused too where no class has a second image to give."""
    split = _labels_split(sizes)
    with pytest.raises(errors.DataError) as caught:
        splits.holdout(split, refused, seed=0, method="per_class")
    message = str(caught.value)
    if max(sizes) == 1:
        assert "keeps one example of each class to train on, and no class has more than " \
               "one)" in message
        assert message.endswith("pass 0 for no validation set.") and "such as" not in message
    else:
        fraction = float(re.search(r"fraction such as ([0-9.]+),", message)[1])
        count = re.search(r"a count such as (\d+)", message)  # or 'a smaller count'
        most = int(re.search(r"at most (\d+) here", message)[1])
        assert most == sum(sizes) - len(sizes)
        for works in (fraction, most, *([int(count[1])] if count else [])):
            assert len(splits.holdout(split, works, seed=0, method="per_class")[1]) >= 1
    assert splits.holdout(split, 0, seed=0, method="per_class")[1] is None


def test_a_folder_of_one_image_a_class_is_told_to_hold_out_none(tmp_path):
    root = data.testing.make_image_folder(str(tmp_path / "f"), classes=3, per_class_train=1,
                                          per_class_test=1, size=(4, 4))
    with pytest.raises(errors.DataError, match=r"holds out 0, leaving 3 to train on; no "
                       r"validation set can be held out of them \(a per-class hold-out keeps "
                       r"one .*no class has more than one\): pass 0 for no validation set\.$"):
        data.load_dataset(f"image_folder:{root}", validation_size=0.1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes of 10 training images: a random 10% hold-out can take one class's three."""
    return data.testing.make_image_folder(
        str(tmp_path_factory.mktemp("pets")), classes=["cat", "dog", "eel"],
        per_class_train=10, per_class_test=1, size=(4, 4))


def test_image_folder_validation_takes_every_class_its_share(folder):
    held = [np.bincount(data.load_dataset(f"image_folder:{folder}", validation_size=0.1,
                                          seed=seed).validation.labels, minlength=3)
            for seed in range(8)]
    np.testing.assert_array_equal(held, [[1, 1, 1]] * 8)


def test_a_runs_record_rebuilds_the_split_it_trained_on(folder, tmp_path):
    """A run.json recorded before the hold-out method (no data.holdout) gets the random split
    it trained on, exactly as the earlier code drew it; a new record, the per-class one."""
    config = load_config("cifar10:smoke", [f"--config.dataset=image_folder:{folder}",
                                           "--config.validation_size=0.1", "--config.seed=3"])
    workdir, mesh = str(tmp_path), jax.make_mesh((1,), ("data",))
    everything = data.load_dataset(config.dataset, train_on_all=True).train
    earlier = np.sort(np.random.Generator(np.random.PCG64(3)).permutation(30)[:3])

    legacy = setup.load_data(config, workdir, {"name": config.dataset})  # no "holdout"
    np.testing.assert_array_equal(legacy.validation.images, everything.images[earlier])
    np.testing.assert_array_equal(legacy.validation.labels, everything.labels[earlier])
    assert legacy.holdout == "random"
    old_record = {k: v for k, v in setup.run_metadata(config, legacy, mesh)["data"].items()
                  if k != "holdout"}
    evaluate.check_same_data(old_record, setup.load_data(config, workdir, old_record), config,
                             workdir)

    new = setup.load_data(config, workdir)  # a new run: no record
    assert data.fingerprint(new) != old_record["pixels_sha256"]
    with pytest.raises(errors.DataError, match="images or labels of a split differ"):
        evaluate.check_same_data(old_record, new, config, workdir)
    new_record = setup.run_metadata(config, new, mesh)["data"]
    assert new_record["holdout"] == "per_class"
    again = setup.load_data(config, workdir, new_record)
    assert data.fingerprint(again) == new_record["pixels_sha256"]
    with pytest.raises(errors.DataError, match="holdout per_class recorded, random here"):
        evaluate.check_same_data(new_record, legacy, config, workdir)


def test_tfds_datasets_keep_the_papers_hold_out():
    with pytest.raises(errors.DataError, match="holdout='per_class' applies to image folders "
                       "only"):
        data.load_dataset("cifar10", holdout="per_class")
    assert data.recorded_holdout({"name": "cifar10"}, "cifar10") is None
    # A workdir that switches from a tfds dataset to a folder: the folder's default split.
    assert data.recorded_holdout({"name": "cifar10"}, "image_folder:/x") is None


# --- data paths ---------------------------------------------------------------------------

def test_data_paths_are_made_absolute_but_not_resolved(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "real")
    os.symlink(tmp_path / "real", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load_config("cifar10:smoke", ["--config.dataset=image_folder:link/",
                                           "--config.data_dir=~/tfds"])
    made = setup.absolute_data_paths(config)
    assert made.dataset == f"image_folder:{tmp_path / 'link'}"  # the symlink, as named
    assert made.data_dir == str(tmp_path / "home" / "tfds")
    assert config.dataset == "image_folder:link/"  # the caller's config is unchanged
    assert setup.absolute_data_paths(made) is made


@pytest.mark.parametrize("remote", ["gs://bucket/tensorflow_datasets", "s3://bucket/pets"])
def test_remote_data_paths_are_left_as_named(tmp_path, monkeypatch, remote):
    """tfds on GCS, as on TPU pods: a ``gs://`` path is not a file under the current
    directory."""
    monkeypatch.chdir(tmp_path)
    config = load_config("cifar10:smoke", [f"--config.dataset=image_folder:{remote}",
                                           f"--config.data_dir={remote}"])
    made = setup.absolute_data_paths(config)
    assert (made.dataset, made.data_dir) == (f"image_folder:{remote}", remote)


def _file_urls(path):
    """The two local ``file://`` URLs of the absolute ``path``, a space %-escaped."""
    escaped = path.replace(" ", "%20")
    return [f"file://{escaped}", f"file://localhost{escaped}"]


def test_a_file_url_is_a_local_image_folder_in_training_and_evaluation(tmp_path):
    """``image_folder:file:///abs/path`` (or ``file://localhost/...``) is read as the local
    path: loaded, recorded in run.json as the path, accepted by evaluate.py --data-dir and
    by the check for images the earlier reader read differently."""
    root = data.testing.make_image_folder(str(tmp_path / "my pets"), classes=2,
                                          per_class_train=2, per_class_test=1, size=(4, 4))
    plain = data.load_dataset(f"image_folder:{root}", validation_size=0)
    for url in _file_urls(root):
        ds = data.load_dataset(f"image_folder:{url}", validation_size=0)
        assert data.fingerprint(ds) == data.fingerprint(plain)
        config = load_config("cifar10:smoke", [f"--config.dataset=image_folder:{url}"])
        assert setup.absolute_data_paths(config).dataset == f"image_folder:{root}"
        assert evaluate.relocate_data(config, url).dataset == f"image_folder:{root}"
        assert image_folder.earlier_reader_difference(url) is None


@pytest.mark.parametrize("url", ["file://pets", "file://data/pets", "file://"])
def test_a_file_url_without_an_absolute_path_is_one_line(url):
    with pytest.raises(errors.DataError) as info:
        data.load_dataset(f"image_folder:{url}")
    message = str(info.value)
    assert "\n" not in message and "remote" not in message
    assert message.startswith(f"Image folder {url!r} is not a local file URL: file:// is "
                              "followed by an absolute path (file:///data/pets")
    assert message.endswith(f"without file://: image_folder:{url[7:] or 'data/pets'}")


def _png_chunks(png: bytes) -> list[bytes]:
    """A PNG's chunks (length, type, data and CRC each), after its signature."""
    chunks, at = [], 8
    while at < len(png):
        end = at + 12 + int.from_bytes(png[at:at + 4], "big")
        chunks.append(png[at:end])
        at = end
    return chunks


def _png(pixels, **save):
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def _after_pixels(png: bytes, kind: bytes = b"eXIf", crc: bool = True) -> bytes:
    """``png`` with its ``kind`` chunks (eXIf by default) moved after the pixels (allowed,
    and written by some tools): Pillow finds them only by decoding the pixels. ``crc``
    False: their checksums damaged, which Pillow checks only before the pixels."""
    chunks = _png_chunks(png)
    moved = [c if crc else c[:-4] + bytes(4) for c in chunks if c[4:8] == kind]
    rest = [c for c in chunks if c[4:8] != kind]
    return png[:8] + b"".join(rest[:-1] + moved + rest[-1:])  # before IEND


def _earlier_reader_cases():
    """name -> (PNG bytes, whether the earlier reader read it differently)."""
    from PIL import Image, PngImagePlugin
    rgb = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    turned, upright = Image.Exif(), Image.Exif()
    turned[0x0112], upright[0x0112] = 6, 1
    text, xmp, raw = (PngImagePlugin.PngInfo() for _ in range(3))
    text.add_text("Software", "a scanner")
    xmp.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="6"/>'
                 "</x:xmpmeta>")
    profile = turned.tobytes()  # as ImageMagick writes it: a hex dump after three lines
    raw.add_text("Raw profile type exif", f"\nexif\n{len(profile):8d}\n{profile.hex()}",
                 zip=True)
    both = _png_chunks(_png(rgb, exif=upright))
    turned_last = _png_chunks(_after_pixels(_png(rgb, exif=turned)))
    return {
        "plain": (_png(rgb), False),
        "text": (_png(rgb, pnginfo=text), False),
        "exif_upright": (_png(rgb, exif=upright), False),
        "exif_turned": (_png(rgb, exif=turned), True),
        "gray16": (_png(np.full((4, 4), 40000, np.uint16)), True),
        "damaged": (_png(rgb)[:40], False),  # unreadable either way: the load reports it
        # After the pixels: found by decoding them, now from the chunks.
        "exif_turned_after_pixels": (_after_pixels(_png(rgb, exif=turned)), True),
        "exif_upright_after_pixels": (_after_pixels(_png(rgb, exif=upright)), False),
        "text_after_pixels": (_after_pixels(_png(rgb, pnginfo=text), b"tEXt"), False),
        "xmp_turned_after_pixels": (_after_pixels(_png(rgb, pnginfo=xmp), b"iTXt"), True),
        "raw_exif_turned_after_pixels": (_after_pixels(_png(rgb, pnginfo=raw), b"zTXt"), True),
        # An EXIF before the pixels: Pillow reads no further, the one after is ignored.
        "exif_before_and_after_pixels": (
            _png(rgb)[:8] + b"".join(both[:-1] + turned_last[-2:]), False),
        "exif_turned_after_pixels_bad_crc": (
            _after_pixels(_png(rgb, exif=turned), crc=False), True),
    }


@pytest.mark.parametrize("case", sorted(_earlier_reader_cases()))
def test_the_earlier_reader_check_reads_headers_and_decides_as_pillow_does(
        tmp_path, monkeypatch, case):
    """Before evaluating a run recorded without a pixel fingerprint: a plain PNG is told
    from its chunk headers, without Pillow; any other is decided by Pillow as before, from
    its headers: a PNG with metadata after its pixels was decoded in full (2,000 PNGs of
    256x256: 3.9 s, now 0.4 s)."""
    from PIL import Image, ImageFile

    png, differs = _earlier_reader_cases()[case]
    root = data.testing.make_image_folder(str(tmp_path / "f"), classes=2, per_class_train=2,
                                          per_class_test=1, size=(4, 4))
    path = os.path.join(root, "test", "class1", "new.png")
    with open(path, "wb") as f:
        f.write(png)
    if "after_pixels" in case:
        with Image.open(path) as image:
            assert "exif" not in image.info or "before" in case  # found only by decoding
    opened, decoded = [], []
    monkeypatch.setattr(Image, "open", lambda p, *a, real=Image.open: opened.append(p) or real(
        p, *a))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self, real=ImageFile.ImageFile.load:
                        decoded.append(self.filename) or real(self))
    reason = image_folder.earlier_reader_difference(root)
    assert (reason is not None) == differs and (not differs or repr(path) in reason)
    files = [p for p in opened if isinstance(p, str)]
    assert files[:1] == ([] if case == "plain" else [path])  # the folder's PNGs: headers only
    # Decoded only where Pillow would read a damaged checksum after the pixels (rare).
    assert decoded == ([path] if case.endswith("bad_crc") else [])
    # The decision Pillow alone makes (as before this check read headers) is the same.
    monkeypatch.setattr(image_folder, "_png_chunks", lambda p: None)
    assert image_folder.earlier_reader_difference(root) == reason


# --- layout -------------------------------------------------------------------------------

def test_a_train_and_val_folder_says_what_to_rename(capsys, tmp_path):
    root = data.testing.make_image_folder(str(tmp_path / "inet"), classes=2, per_class_train=2,
                                          per_class_test=1, size=(4, 4))
    os.rename(os.path.join(root, "test"), os.path.join(root, "val"))
    line = one_line_error(capsys, train_cli.main, [
        "--config", "cifar10:smoke", "--workdir", str(tmp_path / "w"),
        f"--config.dataset=image_folder:{root}"])
    assert line == (f"error: Image folder {root!r} has train/ and val/ but no test/: rename "
                    f"val/ to test/ (or link it: ln -s val {os.path.join(root, 'test')}); "
                    "results are reported on test/, and the validation set is held out of "
                    "train/ (validation_size).")
    os.symlink("val", os.path.join(root, "test"))  # the fix it names
    with pytest.warns(logs.RunWarning, match="val' is not read: the validation set is held "
                      "out of train/"):
        assert len(data.load_dataset(f"image_folder:{root}", validation_size=0).test) == 2
    os.remove(os.path.join(root, "test"))
    os.rename(os.path.join(root, "val"), os.path.join(root, "eval"))
    with pytest.raises(FileNotFoundError, match="split '.*test' does not exist \\(found eval/, "
                       "train/\\)"):
        data.load_dataset(f"image_folder:{root}")


def test_a_missing_split_is_named_even_where_its_parent_cannot_be_listed(tmp_path,
                                                                          monkeypatch):
    """The directories found beside it are a hint: listing them fails (its folder is gone,
    or unreadable) without hiding which split is missing."""
    split = str(tmp_path / "gone" / "train")
    with pytest.raises(errors.DataFileNotFoundError) as info:
        image_folder.list_classes(split)
    assert str(info.value).startswith(f"Image folder split {split!r} does not exist; expected")
    os.makedirs(tmp_path / "locked" / "test")
    real_listdir = os.listdir

    def listdir(path):
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied", path)
        return real_listdir(path)

    monkeypatch.setattr(image_folder.os, "listdir", listdir)
    with pytest.raises(errors.DataFileNotFoundError, match="split '.*locked/train' does not "
                       "exist; expected"):
        image_folder.list_classes(str(tmp_path / "locked" / "train"))


# --- sizes and memory, from the headers -----------------------------------------------------

def _no_decoding(monkeypatch):
    def fail(path):
        raise AssertionError(f"{path} was decoded")
    monkeypatch.setattr(image_folder, "_read_image", fail)


def test_mixed_sizes_are_refused_from_the_headers(tmp_path, monkeypatch):
    """Refused before any image is decoded, naming two images; an EXIF-rotated JPEG whose
    stored size is turned counts at the size it is viewed at."""
    from PIL import Image

    root = data.testing.make_image_folder(str(tmp_path / "f"), classes=2, per_class_train=3,
                                          per_class_test=1, size=(6, 4))  # 4 wide, 6 high
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 6 wide and 4 high, viewed turned by 90 degrees: 4x6
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(
        os.path.join(root, "train", "class1", "turned.jpg"), exif=exif)
    assert len(data.load_dataset(f"image_folder:{root}", validation_size=0).train) == 7
    odd = os.path.join(root, "test", "class0", "odd.png")
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(odd)
    _no_decoding(monkeypatch)
    with pytest.raises(errors.DataError, match="odd.png' is 6x4 but '.*train/class0/0.png' is "
                       "4x6 \\(width x height\\)"):
        data.load_dataset(f"image_folder:{root}")


def _fake_memory(tmp_path, available_kb, cgroup=None, v1=False):
    """A /proc/meminfo saying `available_kb` kB are available, and a cgroup directory with
    `cgroup` = (limit, usage, inactive page cache) bytes (v2 files, or v1's with `v1`);
    no limit if None. Returns their paths."""
    directory = tmp_path / f"memory-{len(os.listdir(tmp_path))}"  # a new one each call
    meminfo = directory / "meminfo"
    root = directory / "cgroup"
    os.makedirs(root / "memory")
    meminfo.write_text(f"MemTotal: 99999999 kB\nMemAvailable:   {available_kb} kB\n")
    if cgroup is not None:
        limit, usage, cache = cgroup
        names = (("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                  "memory/memory.stat", "total_inactive_file") if v1 else
                 ("memory.max", "memory.current", "memory.stat", "inactive_file"))
        (root / names[0]).write_text(f"{limit}\n")
        (root / names[1]).write_text(f"{usage}\n")
        if cache is not None:
            (root / names[2]).write_text(f"anon 5\n{names[3]} {cache}\nactive_file 7\n")
    return str(meminfo), str(root)


def test_a_folder_larger_than_the_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    root = data.testing.make_image_folder(str(tmp_path / "f"), classes=2, per_class_train=3,
                                          per_class_test=2, size=(8, 4))
    decoded = 10 * 8 * 4 * 3  # images x height x width x RGB: 960 bytes, under 1 kB
    meminfo, cgroup = _fake_memory(tmp_path, available_kb=1)
    monkeypatch.setattr(image_folder, "_MEMINFO", meminfo)
    monkeypatch.setattr(image_folder, "_CGROUP", cgroup)
    assert decoded < image_folder.available_memory() < 2 * decoded
    with pytest.warns(logs.RunWarning, match="holds 10 images of 4x8: 0.0 GiB decoded as 8-bit "
                      "RGB, and training holds about twice that.*may run out: resize"):
        assert len(data.load_dataset(f"image_folder:{root}", validation_size=0).train) == 6
    monkeypatch.setattr(image_folder, "_MEMINFO", _fake_memory(tmp_path, available_kb=0)[0])
    _no_decoding(monkeypatch)
    with pytest.raises(errors.DataError, match="holds 10 images of 4x8.*more than the 0.0 GiB of "
                       "memory available; resize the images.*or use fewer, or use a machine"):
        data.load_dataset(f"image_folder:{root}")


@pytest.mark.parametrize("v1", [False, True])
def test_a_containers_page_cache_is_not_counted_as_used(tmp_path, v1):
    """A container that just untarred its dataset: most of its usage is page cache the kernel
    reclaims (inactive_file), not memory taken; usage above the limit leaves 0, not less."""
    gib = 2**30
    assert image_folder.cgroup_memory(_fake_memory(
        tmp_path, 10**8, (8 * gib, 7 * gib, 6 * gib), v1)[1]) == (8 * gib, 7 * gib)
    meminfo, cgroup = _fake_memory(tmp_path, 10**8, (8 * gib, 9 * gib, None), v1)
    assert image_folder.cgroup_memory(cgroup) == (8 * gib, 0)
    assert image_folder.available_memory(meminfo, cgroup) == 0
    meminfo, cgroup = _fake_memory(tmp_path, 10**8, ("max", 9 * gib, 0) if not v1 else None)
    assert image_folder.cgroup_memory(cgroup) is None  # no limit
    assert image_folder.available_memory(meminfo, cgroup) == 10**8 * 1024


def test_only_the_containers_estimate_of_free_memory_warns_rather_than_refuses(tmp_path):
    """Under its limit the container's free memory is an estimate (its usage may hold page
    cache still active): a folder that fits the limit is warned about; one that does not is
    refused."""
    meminfo, cgroup = _fake_memory(tmp_path, 10**8, (3000, 2900, 0))
    with pytest.warns(logs.RunWarning, match=r"holds 1 images of 10x10: 0.0 GiB decoded as "
                      r"8-bit RGB, more than the 0.0 GiB this container's memory limit \(0.0 "
                      r"GiB\) leaves free, unless the kernel reclaims page cache"):
        image_folder.check_memory("r", 1, (10, 10), meminfo, cgroup)  # 300 bytes
    with pytest.raises(errors.DataError, match="holds 20 images.*more than this container's "
                       "memory limit of 0.0 GiB; resize the images .* or raise the limit"):
        image_folder.check_memory("r", 20, (10, 10), meminfo, cgroup)  # 6000 bytes


def test_available_memory_is_known_here():
    available = image_folder.available_memory()
    assert available is None or 0 <= available <= (
        os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def test_a_loaded_datasets_fingerprint_is_computed_once(tmp_path, monkeypatch):
    """Hashing every pixel took seconds on SVHN, two or three times a run (the processes'
    data agreement, run.json, the resume check): once per loaded dataset now, whose arrays
    are read-only. A copy with other splits, and arrays that can be written in place (a
    dataset built by hand), are hashed again, so a changed pixel always shows."""
    from stochastic_depth_jax.data import dataset as dataset_lib

    root = data.testing.make_image_folder(str(tmp_path / "images"), classes=2,
                                          per_class_train=4, per_class_test=1, size=(4, 4))
    computed = []
    sha256 = dataset_lib.hashlib.sha256
    monkeypatch.setattr(dataset_lib, "hashlib", types.SimpleNamespace(
        sha256=lambda: computed.append(1) or sha256()))
    ds = data.load_dataset(f"image_folder:{root}", validation_size=2)
    first = data.fingerprint(ds)
    assert [data.fingerprint(ds) for _ in range(3)] == [first] * 3 and len(computed) == 1
    with pytest.raises(ValueError, match="read-only"):
        ds.train.images[0] = 0
    swapped = dataclasses.replace(ds, validation=ds.test, test=ds.validation)
    assert data.fingerprint(swapped) != first and len(computed) == 2
    images = np.array(ds.train.images)  # writable
    by_hand = dataclasses.replace(ds, train=splits.Split(images, ds.train.labels))
    assert data.fingerprint(by_hand) == first
    images[0, 0, 0, 0] ^= 1
    assert data.fingerprint(by_hand) != first and len(computed) == 4
