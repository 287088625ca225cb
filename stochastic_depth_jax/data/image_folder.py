"""A custom source: `root/train/<class>/*.png|jpg` and `root/test/<class>/...`.

The layout tfds's ImageFolder reads; we read it with Pillow directly (no
preparation step). Classes are the sub-directory names of train/, sorted as
strings ('10' before '2', as torchvision's ImageFolder and earlier runs order them).
Every image becomes 8-bit RGB as a viewer shows it: EXIF orientation applied,
grayscale and palette images expanded to three channels, transparency dropped,
16-bit images scaled to 8 bits.

Image sizes are read from the files' headers first, so a folder of mixed sizes, or one too
large for the memory, is refused in seconds, before any image is decoded; the images are then
decoded straight into one array.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import re
import struct
import urllib.parse
import warnings
from typing import Any

import numpy as np

from stochastic_depth_jax import errors, logs
from stochastic_depth_jax.data.splits import Split

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Files operating systems leave in folders: skipped without a warning, as hidden ones.
_SYSTEM_FILES = ("thumbs.db", "desktop.ini")
_LAYOUT = "expected <root>/train/<class>/*.png|jpg and <root>/test/<class>/..."
# What other layouts (ImageNet's train/ + val/) call the split read here from test/ only.
_VALIDATION_NAMES = ("val", "valid", "validation")
# Training holds about twice the decoded folder in host memory (the images and their
# train/validation copies): warn above half of the available memory.
_MEMORY_MARGIN = 2
# Errors Pillow raises for a file it cannot read (DecompressionBombError: absurdly large).
_UNREADABLE = (OSError, SyntaxError, ValueError)
_EXIF_ORIENTATION = 0x0112
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
            f"Image folder split {split_dir!r} does not exist{_found_beside(split_dir)}; "
            f"{_LAYOUT}")
    dirs, images, other = _entries(split_dir)
    return sorted(dirs), images + other


def _found_beside(split_dir: str) -> str:
    """`` (found a/, b/)``: the directories beside a missing `split_dir`, a hint only: ''
    where they cannot be listed (the missing directory is the error to report)."""
    try:
        dirs = _entries(os.path.dirname(split_dir))[0]
    except errors.DataError:
        return ""
    found = ", ".join(d + "/" for d in dirs[:5]) + (", ..." if len(dirs) > 5 else "")
    return f" (found {found or 'no directories'})"


def _read_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3]: the image as a viewer shows it (see the module docstring)."""
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode != "F" and not image.mode.startswith("I"):
                return np.asarray(image.convert("RGB"), np.uint8)
            mode, pixels = image.mode, np.asarray(image)  # one channel, 16 or 32 bits
    except _UNREADABLE + (Image.DecompressionBombError,) as error:
        raise _unreadable(path, error) from error
    return _gray_to_rgb(path, mode, pixels)


def _unreadable(path: str, error: Exception) -> errors.DataError:
    return errors.DataError(f"Cannot read image {path!r} ({error}); fix or remove it.")


def _header_size(path: str) -> tuple[int, int]:
    """(width, height) of the image as :func:`_read_image` reads it (EXIF orientation
    applied), from the file's header: no pixel is decoded."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            width, height = image.size
            # Pillow finds a PNG's EXIF chunk placed after the pixels only by decoding them;
            # such rare files are caught once decoded (_decode_split).
            has_exif = image.format != "PNG" or "exif" in image.info
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1) if has_exif else 1
    except _UNREADABLE + (Image.DecompressionBombError,) as error:
        raise _unreadable(path, error) from error
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)  # 90 degrees


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
    if not images:  # train/ and test/ must name the same classes: removing it is both
        name = os.path.basename(class_dir)
        raise errors.DataError(
            f"Class directory {class_dir!r} has no {'/'.join(IMAGE_EXTENSIONS)} images; add "
            f"some, or remove the class from both train/ and test/ (train/{name}/ and "
            f"test/{name}/).")
    skipped = [name + "/" for name in dirs] + other
    name = os.path.basename(class_dir)
    return [os.path.join(class_dir, f) for f in images], [f"{name}/{s}" for s in skipped]


def _list_split(split_dir: str, classes: list[str], skipped: list[str]
                ) -> tuple[list[str], np.ndarray]:
    """(image paths, labels int32 [N]) of `split_dir/<class>/`, each image labelled by its
    class's index in `classes`; warns once about what is not read (the `skipped` entries of
    `split_dir` and those of its class directories)."""
    skipped = list(skipped)
    paths, labels = [], []
    for label, name in enumerate(classes):
        files, skip = _class_files(os.path.join(split_dir, name))
        paths += files
        labels += [label] * len(files)
        skipped += skip
    _warn_skipped(split_dir, skipped)
    return paths, np.asarray(labels, np.int32)


def _size_error(path: str, size: tuple[int, int], first: str,
                first_size: tuple[int, int]) -> errors.DataError:
    return errors.DataError(
        f"Images differ in size: {path!r} is {size[0]}x{size[1]} but {first!r} is "
        f"{first_size[0]}x{first_size[1]} (width x height); all images must have one size: "
        f"resize them first.")


def one_size(paths: list[str]) -> tuple[int, int]:
    """The (width, height) all images at `paths` share, read from their headers (about
    0.1 ms an image); refuses the first image of another size, naming it and the first."""
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
        sizes = list(pool.map(_header_size, paths))  # in order; the first error is raised
    for path, size in zip(paths, sizes):
        if size != sizes[0]:
            raise _size_error(path, size, paths[0], sizes[0])
    return sizes[0]


def _decode_split(paths: list[str], labels: np.ndarray, size: tuple[int, int],
                  first: str) -> Split:
    """The images at `paths` (all `size`, as their headers said) decoded into one uint8
    array, without a second copy; an image that decodes to another size (a PNG whose EXIF
    rotation only decoding finds) is refused like a mismatched header."""
    images = np.empty((len(paths), size[1], size[0], 3), np.uint8)

    def decode(index: int) -> None:
        pixels = _read_image(paths[index])
        if pixels.shape != images.shape[1:]:
            raise _size_error(paths[index], pixels.shape[1::-1], first, size)
        images[index] = pixels

    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
        for _ in pool.map(decode, range(len(paths))):  # in order; the first error is raised
            pass
    return Split(images, labels)


_MEMINFO = "/proc/meminfo"
_CGROUP = "/sys/fs/cgroup"
# A container's memory cgroup, v2 then v1: (limit, usage, statistics, the page cache there
# that the kernel reclaims first: files read earlier, e.g. the dataset just untarred).
_CGROUP_FILES = (("memory.max", "memory.current", "memory.stat", "inactive_file"),
                 ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                  "memory/memory.stat", "total_inactive_file"))


def system_memory(meminfo: str | None = None) -> int | None:
    """Bytes the kernel can still give (``MemAvailable`` of ``meminfo``, /proc/meminfo by
    default, page cache included); the physical memory where that is not known (macOS),
    None where nothing is."""
    match = re.search(r"^MemAvailable:\s+(\d+) kB", _read_text(meminfo or _MEMINFO), re.M)
    if match:
        return int(match.group(1)) * 1024
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def cgroup_memory(cgroup: str | None = None) -> tuple[int, int] | None:
    """``(limit, free)`` bytes of the container's memory cgroup mounted at ``cgroup``
    (/sys/fs/cgroup by default): its limit, and what is left of it: the limit less the
    usage without the inactive page cache (as ``docker stats`` and the kubelet count), at
    least 0. None without a limit."""
    root = cgroup or _CGROUP
    for limit_file, usage_file, stat_file, cache_field in _CGROUP_FILES:
        limit = _read_text(os.path.join(root, limit_file)).strip()
        usage = _read_text(os.path.join(root, usage_file)).strip()
        if limit.isdigit() and usage.isdigit():  # cgroup v2 writes 'max' for no limit
            cache = re.search(rf"^{cache_field} (\d+)$",
                              _read_text(os.path.join(root, stat_file)), re.M)
            used = max(0, int(usage) - (int(cache.group(1)) if cache else 0))
            return int(limit), max(0, int(limit) - used)
    return None


def available_memory(meminfo: str | None = None, cgroup: str | None = None) -> int | None:
    """Bytes of memory this process can still take: the kernel's figure
    (:func:`system_memory`), or less under a container's limit (:func:`cgroup_memory`);
    None where nothing is known."""
    return _least(system_memory(meminfo), cgroup_memory(cgroup))


def _least(system: int | None, container: tuple[int, int] | None) -> int | None:
    """The smaller of the kernel's figure and the container's free memory, where known."""
    known = [m for m in (system, container[1] if container else None) if m is not None]
    return min(known) if known else None


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def check_memory(root: str, count: int, size: tuple[int, int], meminfo: str | None = None,
                 cgroup: str | None = None) -> None:
    """Refuses, before decoding, a folder whose `count` images of `size` (as 8-bit RGB) do
    not fit in the memory the kernel has available or under the container's limit; warns
    when only the container's estimate of its free memory (its usage may still hold page
    cache the kernel can reclaim) is too small, or when training (which holds about twice
    the images) may run out; each in one line naming the fix. ``meminfo``, ``cgroup``: as
    :func:`available_memory`."""
    need = count * size[0] * size[1] * 3
    system, container = system_memory(meminfo), cgroup_memory(cgroup)
    available = _least(system, container)
    if available is None or _MEMORY_MARGIN * need <= available:
        return
    held = (f"Image folder {root!r} holds {count} images of {size[0]}x{size[1]}: "
            f"{need / 2**30:.1f} GiB decoded as 8-bit RGB")
    fix = "resize the images (smaller width x height) or use fewer"
    if system is not None and need > system:
        raise errors.DataError(f"{held}, more than the {_gib(system)} of memory available; "
                               f"{fix}, or use a machine with more memory.")
    if container is not None and need > container[0]:
        raise errors.DataError(f"{held}, more than this container's memory limit of "
                               f"{_gib(container[0])}; {fix}, or raise the limit.")
    if need > available:
        warnings.warn(f"{held}, more than the {_gib(available)} this container's memory limit "
                      f"({_gib(container[0])}) leaves free, unless the kernel reclaims page "
                      f"cache, so it may run out: {fix}, or raise the limit.", logs.RunWarning,
                      stacklevel=3)
        return
    warnings.warn(f"{held}, and training holds about twice that; {_gib(available)} of memory "
                  f"is available, so it may run out: {fix}.", logs.RunWarning, stacklevel=3)


# What the reader before version 2 did not read as it is read now (it converted every image
# with Pillow's ``convert('RGB')``, read .png/.jpg/.jpeg only and ignored EXIF orientation).
_EARLIER_EXTENSIONS = (".png", ".jpg", ".jpeg")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The PNG chunks Pillow reads an EXIF orientation from: eXIf, and the text chunks that may hold
# a raw EXIF profile or XMP.
_PNG_METADATA = (b"eXIf", b"tEXt", b"zTXt", b"iTXt")
_PNG_READ = 1 << 16  # a small PNG whole, in one read; larger ones are walked chunk by chunk


@dataclasses.dataclass(frozen=True)
class _PngChunks:
    """What a PNG's chunk headers say of how it reads: bits a sample, whether a chunk that
    can hold an EXIF orientation comes before or after the pixels, where the pixels start
    (``pixels_at``: the first IDAT chunk), the ``(offset, size)`` of each such chunk after
    them, and whether it is animated (an acTL chunk)."""

    bits: int
    metadata: bool
    metadata_after_pixels: bool
    pixels_at: int = 0
    after_pixels: tuple[tuple[int, int], ...] = ()
    animated: bool = False


def _png_chunks(path: str) -> _PngChunks | None:
    """The chunk headers of the PNG at `path`, read without its pixels; None where it is
    not a whole PNG (another format, a damaged or truncated file): Pillow decides then."""
    try:
        with open(path, "rb", buffering=0) as f:
            data = f.read(_PNG_READ)
            # The signature, then IHDR: length, type, width, height, bit depth, ..., CRC.
            if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
                return None
            at, before, pixels_at, after, animated = 33, False, 0, [], False
            while True:
                header = data[at:at + 8]
                if len(header) < 8:  # past what was read: a larger PNG
                    f.seek(at)
                    header = f.read(8)
                    if len(header) < 8:
                        return None
                length, kind = struct.unpack(">I4s", header)
                if kind == b"IEND":
                    return _PngChunks(data[24], before or bool(after), bool(after), pixels_at,
                                      tuple(after), animated)
                if kind == b"IDAT" and not pixels_at:
                    pixels_at = at
                animated = animated or kind == b"acTL"
                if kind in _PNG_METADATA:
                    if pixels_at:
                        after.append((at, 12 + length))
                    else:
                        before = True
                at += 12 + length  # the header, the chunk's data and its CRC
    except OSError:
        return None


def _png_headers(path: str, png: _PngChunks) -> bytes:
    """The PNG at `path` without its pixels, its metadata chunks that follow them moved
    before them: Pillow's ``open`` then finds, from headers only, what it otherwise finds
    by decoding the pixels (it reads the chunks after them in order, into the same
    ``info``). The pixel chunk is announced, empty: ``open`` stops there."""
    with open(path, "rb") as f:
        parts = [f.read(png.pixels_at)]
        for offset, size in png.after_pixels:
            f.seek(offset)
            parts.append(f.read(size))
    return b"".join(parts) + struct.pack(">I4s", 0, b"IDAT")


def _mode_and_orientation(path: str, png: _PngChunks | None) -> tuple[str, Any]:
    """The image's mode and EXIF orientation as Pillow reads them, without decoding a PNG's
    pixels where Pillow would (metadata after them; not an animated PNG, rare, which is
    decoded as Pillow does)."""
    from PIL import Image
    with Image.open(path) as image:
        mode = image.mode
        if png is None:
            return mode, image.getexif().get(_EXIF_ORIENTATION, 1)
        if not png.metadata_after_pixels or "exif" in image.info:
            # Pillow's PNG reader decodes the pixels to find metadata after them, unless
            # open() found an EXIF profile: the base reader reads what open() found.
            return mode, Image.Image.getexif(image).get(_EXIF_ORIENTATION, 1)
        if png.animated:  # Pillow reads the first frame's chunks only
            return mode, image.getexif().get(_EXIF_ORIENTATION, 1)
    try:
        with Image.open(io.BytesIO(_png_headers(path, png))) as image:
            return mode, Image.Image.getexif(image).get(_EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError):
        pass  # e.g. a bad checksum, which Pillow checks before the pixels only
    with Image.open(path) as image:
        return mode, image.getexif().get(_EXIF_ORIENTATION, 1)


def _earlier_difference(path: str) -> str | None:
    """Why the earlier reader read the image at `path` differently, or None. Decides as
    Pillow's reader from the file's headers: a PNG's chunks (and the metadata chunks
    after its pixels), never its pixels (a PNG's, where the data load decoded them)."""
    if not path.lower().endswith(_EARLIER_EXTENSIONS):
        return f"{path!r} was not read before (only .png/.jpg/.jpeg were)"
    png = _png_chunks(path)
    if png is not None and png.bits <= 8 and not png.metadata:
        return None  # nearly every PNG: 8 bits, no EXIF; decided without Pillow
    try:
        mode, orientation = _mode_and_orientation(path, png)
    except (OSError, SyntaxError, ValueError):
        return None  # unreadable either way: the load reports it
    if mode.startswith("I;16"):
        return f"the 16-bit image {path!r} was clipped before, is scaled now"
    if orientation not in (None, 1):
        return f"{path!r} has an EXIF rotation ({orientation}), applied only now"
    return None


def earlier_reader_difference(root: str) -> str | None:
    """Why the earlier reader would have read the folder's images differently (the first
    such image: one it skipped, a 16-bit one it clipped, an EXIF rotation it ignored), or
    None if it read the same pixels. A PNG is told from its chunk headers (8 bits and no
    metadata: nearly every one) or by Pillow from its headers and metadata chunks, also
    those after its pixels (which Pillow alone finds by decoding them); a JPEG's header is
    read by Pillow.

    For runs recorded without a pixel fingerprint, so evaluating or resuming one on images
    that now read differently is refused rather than silently using other pixels.
    """
    root = local_root(root)
    paths = []
    for split in ("train", "test"):
        classes, _ = list_classes(os.path.join(root, split))
        for name in classes:
            paths += _class_files(os.path.join(root, split, name))[0]
    # In order: the first image that differs is named. Not threaded: mostly Python work.
    return next((r for r in map(_earlier_difference, paths) if r is not None), None)


_FILE_URL = "file://"


def file_url_path(root: str) -> str:
    """The local path a ``file://`` URL names (``file:///data/pets`` or
    ``file://localhost/data/pets``: ``/data/pets``, %-escapes decoded as in any URL); any
    other `root` (a path, a remote URL, a malformed ``file://`` one) is returned unchanged."""
    if not root[:len(_FILE_URL)].lower() == _FILE_URL:
        return root
    rest = root[len(_FILE_URL):]
    if rest[:len("localhost/")].lower() == "localhost/":
        rest = rest[len("localhost"):]
    return urllib.parse.unquote(rest) if rest.startswith("/") else root


def local_root(root: str) -> str:
    """The local directory an ``image_folder:`` path names: `root` with ``~`` expanded, or
    the path of a ``file://`` URL (:func:`file_url_path`). Refuses, in one line, a remote
    location (``gs://``, ``s3://``, ...) and a ``file://`` URL without an absolute path."""
    if not root:
        raise errors.DataError(f"image_folder: needs a path, e.g. image_folder:/data/pets; "
                               f"{_LAYOUT}")
    path = file_url_path(root)
    if path[:len(_FILE_URL)].lower() == _FILE_URL:
        rest = path[len(_FILE_URL):]
        raise errors.DataError(
            f"Image folder {root!r} is not a local file URL: file:// is followed by an "
            f"absolute path (file:///data/pets, or file://localhost/data/pets); give a relative "
            f"folder without file://: image_folder:{rest or 'data/pets'}")
    if "://" in path:  # gs://, s3://, ...: the rule by which run.json keeps such paths as named
        local = "/data/" + (os.path.basename(root.rstrip("/")) or "images")
        raise errors.DataError(
            f"Image folder {root!r} is remote: image folders are read from a local disk only; "
            f"copy it to one (e.g. gsutil -m cp -r {root.rstrip('/')} /data/) and use the "
            f"local copy: image_folder:{local}")
    return os.path.expanduser(path)


def _check_root(root: str) -> None:
    if not os.path.exists(root):
        raise errors.DataFileNotFoundError(f"Image folder {root!r} does not exist; {_LAYOUT}")
    if not os.path.isdir(root):
        raise errors.DataError(f"Image folder {root!r} is a file, not a directory; {_LAYOUT}")


def _check_validation_directory(root: str) -> None:
    """A validation directory (val/, valid/, validation/: ImageNet's and Keras's layouts)
    where test/ is missing is named as the test/ to rename; beside a test/, it is warned
    about as not read (the validation set is held out of train/)."""
    dirs = _entries(root)[0]
    found = [d for d in dirs if d.lower() in _VALIDATION_NAMES]
    if "train" in dirs and "test" not in dirs and found:
        raise errors.DataFileNotFoundError(
            f"Image folder {root!r} has train/ and {found[0]}/ but no test/: rename "
            f"{found[0]}/ to test/ (or link it: ln -s {found[0]} "
            f"{os.path.join(root, 'test')}); results are reported on test/, and the "
            "validation set is held out of train/ (validation_size).")
    if found and "test" in dirs:
        warnings.warn(
            f"{os.path.join(root, found[0])!r} is not read: the validation set is held out of "
            f"train/ (validation_size); to evaluate on it, name it test/.", logs.RunWarning,
            stacklevel=3)


def load(root: str) -> tuple[list[str], Split, Split]:
    """Reads an image folder: a local path (`~` expanded) or a ``file://`` URL
    (:func:`local_root`).

    Every image's size is read from its header first: mixed sizes, or more images than the
    memory holds (:func:`check_memory`), are refused before any is decoded.

    Returns:
      (classes, train, test): class names (label i is classes[i]), and the two
      Splits: images uint8 [N, H, W, 3], labels int32 [N].

    Raises:
      errors.DataError: a remote path (``gs://...``) or a ``file://`` URL without an
        absolute path, a missing or empty directory, an unreadable file, images of different
        sizes, classes that differ between train/ and test/, or too little memory; the
        message names the path.
    """
    root = local_root(root)
    _check_root(root)
    _check_validation_directory(root)
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
    train_paths, train_labels = _list_split(os.path.join(root, "train"), classes, train_skipped)
    test_paths, test_labels = _list_split(os.path.join(root, "test"), classes, test_skipped)
    size = one_size(train_paths + test_paths)
    check_memory(root, len(train_paths) + len(test_paths), size)
    return (classes, _decode_split(train_paths, train_labels, size, train_paths[0]),
            _decode_split(test_paths, test_labels, size, train_paths[0]))
