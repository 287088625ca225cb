"""Deterministic evaluation: full splits with every block active (``train=False``).

``evaluate_checkpoint`` rebuilds the run from ``<workdir>/run.json``, restores a
checkpoint and evaluates the whole test set; the same checkpoint gives bit-identical
numbers every time (fixed batch plan, masked padding, no randomness).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import warnings
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stochastic_depth_jax import data as data_lib
from stochastic_depth_jax import errors, logs
from stochastic_depth_jax.data import image_folder
from stochastic_depth_jax.training import checkpoint as checkpoint_lib
from stochastic_depth_jax.training import config as config_lib
from stochastic_depth_jax.training import distributed
from stochastic_depth_jax.training import implementation as implementation_lib
from stochastic_depth_jax.training.metrics import epoch_text
from stochastic_depth_jax.training import setup as setup_lib
from stochastic_depth_jax.training import workdir as workdir_lib

__all__ = [
    "evaluate_split",
    "evaluate_checkpoint",
    "load_run_config",
    "read_run_json",
    "runs_inside",
    "refuse_a_run_s_folder",
    "run_folder_holding",
    "RUN_DIRS",
    "recorded_fields",
    "relocate_data",
    "check_same_data",
    "data_location",
    "restore_run",
    "RestoredRun",
    "RUN_FILE",
    "DIVERGED_FILE",
    "result_label",
    "selection_fields",
    "selection_text",
    "evaluation_mesh",
    "epoch_text",
]

RUN_FILE = "run.json"


def evaluate_split(
    eval_step: Any, state: Any, split: data_lib.DeviceSplit, *, batch_size: int, mean: Any, std: Any
) -> dict[str, float]:
    """Mean loss and error over every example of ``split`` (padding masked out).

    Sums stay on the device until the end: one host transfer per split.
    """
    total = [jnp.zeros((), jnp.float32)] * 3
    for images, labels, mask in data_lib.eval_batches(
        split, batch_size=batch_size, mean=mean, std=std
    ):
        total = [t + v for t, v in zip(total, eval_step(state, images, labels, mask))]
    loss, errors, count = (float(np.asarray(t.addressable_data(0))) for t in total)
    return {"loss": loss / count, "error": errors / count, "count": int(count)}


def read_run_json(workdir: str,
                  fix: str = "restore it from a copy or rerun") -> dict[str, Any] | None:
    """The metadata a run recorded in ``<workdir>/run.json``; None if there is no such file.

    Raises:
      errors.CheckpointError: the file is damaged (not JSON, or no ``config`` object);
        the message ends with ``fix``.
    """
    path = os.path.join(workdir, RUN_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise ValueError("it holds no 'config' object")
    except ValueError as e:
        raise errors.CheckpointError(
            f"{path} is damaged ({type(e).__name__}: {e}); {fix}.") from e
    return meta


def load_run_config(workdir: str, fix: str = "restore it from a copy or rerun"
                    ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """The validated config and metadata a run recorded in ``<workdir>/run.json``; ``fix``
    ends the message of a damaged one (:func:`read_run_json`)."""
    meta = read_run_json(workdir, fix)
    if meta is None:
        runs = runs_inside(workdir)
        raise errors.CheckpointError(
            f"{os.path.join(workdir, RUN_FILE)} not found: is {workdir!r} the --workdir of a "
            "training run?" + (f" It holds runs (a sweep's root?): {', '.join(runs[:3])}"
                               + (f" and {len(runs) - 3} more" if len(runs) > 3 else "")
                               + "; give one of them." if runs else "") + _export_hint(workdir))
    config = ml_collections.ConfigDict(meta["config"])
    with recorded_fields(workdir, meta, config):
        return config_lib.validate(config, recorded=True), meta


def _export_hint(directory: str) -> str:
    """Where ``directory`` is a pruned model (``evaluate.py --export``, ``save_pruned``: it
    holds ``model.json``), what it is and how to use it; else ''."""
    if not os.path.isfile(os.path.join(directory, "model.json")):
        return ""
    record = os.path.join(directory, "export.json")
    return (" It holds a pruned model (evaluate.py --export), not a run: load it with "
            "stochastic_depth_jax.load_pruned"
            + (f"; its errors, and the run it came from, are in {record}"
               if os.path.isfile(record) else "") + ".")


def runs_inside(directory: str) -> list[str]:
    """The paths of the training runs (with a ``run.json``) directly inside ``directory``."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [os.path.join(directory, n) for n in names
            if os.path.isfile(os.path.join(directory, n, RUN_FILE))]


# The directories a run makes in its workdir and manages (rotates, moves, purges, remakes).
RUN_DIRS = frozenset({"checkpoints", "checkpoints_best", checkpoint_lib.UNFINISHED_DIR,
                      checkpoint_lib.CORRUPT_DIR, checkpoint_lib.SUPERSEDED_DIR,
                      "tensorboard", setup_lib.FAKE_DATA_DIR})


def run_folder_holding(path: str) -> str | None:
    """The folder of a run (one of :data:`RUN_DIRS`, e.g. ``checkpoints/``, in a directory
    holding a ``run.json`` or a run's lock that names its holder) that ``path`` is or lies
    in, by its real path, else as written (a run's ``checkpoints`` that is a link to another
    disk); with the folder's name in another case only on a file system that ignores case,
    where it is the same folder (on another, ``Checkpoints/`` beside a run is the user's
    own); None if none.
    A file or export written there is the run's to delete, move or read as its own (a
    directory ``checkpoints/99`` is taken for a damaged checkpoint and moved aside)."""
    for candidate in dict.fromkeys((os.path.realpath(path), os.path.abspath(path))):
        while os.path.dirname(candidate) != candidate:
            parent = os.path.dirname(candidate)
            if _is_run_folder(parent, os.path.basename(candidate)):
                return candidate
            candidate = parent
    return None


def refuse_a_run_s_folder(path: str, what: str, consequence: str, fix: str, *,
                          folder_of: str | None = None) -> None:
    """Raises a one-line WorkdirError where ``path`` (or ``folder_of``, e.g. the directory a
    file will be written in) is or lies in a run's folder (:func:`run_folder_holding`):
    "<what> is [inside] <folder>/, a folder of the run in ... whose contents that run manages
    (<consequence>); <fix>"."""
    managed = run_folder_holding(path if folder_of is None else folder_of)
    if managed is None:
        return
    itself = managed in (os.path.realpath(path), os.path.abspath(path))
    raise errors.WorkdirError(
        f"{what} is {'' if itself else 'inside '}{managed}/, a folder of the run in "
        f"{os.path.dirname(managed)} whose contents that run manages ({consequence}); {fix}")


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _is_run_folder(parent: str, name: str) -> bool:
    """Whether ``parent/name`` is a folder :data:`RUN_DIRS` names of a run in ``parent``."""
    if name.lower() not in {d.lower() for d in RUN_DIRS}:
        return False
    # A lock names its holder until released: a released one, left empty by a run that
    # failed before writing anything (a dataset not found), marks no run.
    markers = [f for f in (RUN_FILE, workdir_lib.LOCK_FILE) if os.path.isfile(
        os.path.join(parent, f)) and (f == RUN_FILE or _size(os.path.join(parent, f)))]
    # The run's own file under another case: the file system ignores case (macOS's default).
    return bool(markers) and (name in RUN_DIRS or os.path.isfile(
        os.path.join(parent, markers[0].swapcase())))


@contextlib.contextmanager
def recorded_fields(workdir: str, meta: dict[str, Any],
                    config: ml_collections.ConfigDict) -> Iterator[None]:
    """Reports, in one line, the lookup of a field that ``run.json`` (``meta``, read into
    ``config``) lacks but this version's configs have: it was written by another version.
    The line names the field by its dotted path (``model.mode``: ml_collections names the
    leaf only) and the recorded ``code_version``. A field that this version's configs lack
    too (a misspelt name in the code that reads it) and any other error go through as they
    are.

    Raises:
      errors.ConfigError: a field this version reads is not in the recorded config.
    """
    try:
        yield
    except (AttributeError, KeyError) as e:
        field = _missing_field(e, config, meta["config"])
        if field is None or not _in_this_version(field, meta["config"]):
            raise
        raise errors.ConfigError(
            f"{os.path.join(workdir, RUN_FILE)} records a config without the field "
            f"{field!r}, which this version of stochastic_depth_jax needs: it was written by "
            f"another version ({_recorded_version(meta)}); use that version for this run."
        ) from e


def _in_this_version(field: str, recorded: dict[str, Any]) -> bool:
    """Whether ``field`` (dotted) is in a config this version's ``configs`` package builds
    for the recorded config's model (any config name and variant: run.json does not record
    which). True where that package is not beside this library (an installed copy) or one
    of its configs fails to build: the field cannot be checked, and the code that reads it
    is this version's, tested."""
    model = recorded.get("model")
    name = model.get("name", "cifar_resnet") if isinstance(model, dict) else "cifar_resnet"
    known = _config_fields(name)
    return known is None or field in known


@functools.cache
def _config_fields(model_name: str) -> frozenset[str] | None:
    """The dotted names of every field and sub-config of the configs that the repository's
    ``configs`` package builds for ``model_name``; None where ``import configs`` would not
    give that package (next to this one), or where building them fails. Imported only
    here, on an error's path: the library itself needs none of it."""
    init = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.realpath(__file__)))), "configs", "__init__.py")
    try:
        spec = importlib.util.find_spec("configs")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or os.path.realpath(spec.origin) != init:
        return None  # not a checkout, or a package of that name of someone else's
    try:
        return frozenset(_built_fields(importlib.import_module("configs"), model_name))
    except Exception:  # noqa: BLE001  A config that fails to build: nothing to check against,
        return None  # and its error is not the one being reported.


def _built_fields(configs: Any, model_name: str) -> Iterator[str]:
    """The dotted names in every config of the ``configs`` package for ``model_name``."""
    for module_name in configs.CONFIGS.values():
        module = importlib.import_module(module_name)
        for variant in getattr(module, "VARIANTS", configs.VARIANTS):
            built = module.get_config(variant)
            if built.model.get("name", "cifar_resnet") == model_name:
                yield from (prefix + key for node, prefix in _dicts(built) for key in node)


def _recorded_version(meta: dict[str, Any]) -> str:
    """run.json's ``code_version`` as a message names it."""
    version = meta.get("code_version")
    if not isinstance(version, dict) or not (version.get("package") or version.get("git")):
        return "run.json records no code_version"
    return f"code_version {version.get('package') or '?'}, git {version.get('git') or '?'}"


def _failed_lookup(error: BaseException | None) -> tuple[Any, Any] | None:
    """``(config_dict, key)`` of the ``ConfigDict`` lookup that raised ``error`` (or the
    error it was raised from), or None if none did. Read from the lookup's frame: the
    error names only the key, and not always as it is (a did-you-mean text)."""
    lookup, seen = ml_collections.ConfigDict.__getitem__.__code__, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        tb, found = error.__traceback__, None
        while tb is not None:
            if tb.tb_frame.f_code is lookup:  # its first two arguments: self, key
                found = tuple(tb.tb_frame.f_locals.get(n) for n in lookup.co_varnames[:2])
            tb = tb.tb_next
        if found is not None:
            return found
        error = error.__cause__ or error.__context__
    return None


def _missing_field(error: BaseException, config: ml_collections.ConfigDict,
                   recorded: dict[str, Any]) -> str | None:
    """The dotted name (``model.mode``) of the field whose lookup raised ``error``, if
    ``recorded`` (run.json's config, read into ``config``) lacks it; else None. The dict
    looked up is placed by identity in ``config``, or (a copy of it, e.g. with the data
    moved) by its fields in ``recorded``."""
    found = _failed_lookup(error)
    if found is None:
        return None
    parent, key = found
    if not isinstance(parent, ml_collections.ConfigDict) or not isinstance(key, str):
        return None
    prefix = next((p for node, p in _dicts(config) if node is parent), None)
    if prefix is None:
        prefix = next((p for node, p in _dicts(recorded) if set(node) == set(parent.keys())),
                      None)
    if prefix is None:
        return None
    node = recorded
    for name in prefix.split(".")[:-1]:
        node = node.get(name) if isinstance(node, dict) else None
    return prefix + key if isinstance(node, dict) and key not in node else None


def _dicts(config: Any, prefix: str = "") -> Iterator[tuple[Any, str]]:
    """``(dict, 'its.dotted.prefix.')`` for ``config`` (a ConfigDict, or a dict as
    run.json records it) and every one inside it."""
    yield config, prefix
    for key, value in config.items():
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            yield from _dicts(value, f"{prefix}{key}.")


def relocate_data(config: ml_collections.ConfigDict, data_dir: str) -> ml_collections.ConfigDict:
    """A copy of a run's ``config`` that reads its data from ``data_dir`` (the data moved).

    A tfds dataset's ``data_dir`` is replaced; an ``image_folder:<path>`` dataset gets the
    new path. :func:`restore_run` then checks that the data found there is the data the run
    recorded, so a result is never labelled with the wrong dataset.

    Raises:
      errors.DataFileNotFoundError: ``data_dir`` is not a directory.
      errors.DataError: an image folder's ``data_dir`` is remote, or a ``file://`` URL
        without an absolute path (``image_folder.local_root``).
      errors.ConfigError: the run trained on fake data written in its own workdir.
    """
    if config.dataset.startswith(data_lib.IMAGE_FOLDER_PREFIX):
        data_dir = image_folder.local_root(data_dir)  # a file:// URL too, as in training
    data_dir = os.path.expanduser(data_dir)
    if not os.path.isdir(data_dir):
        raise errors.DataFileNotFoundError(
            f"--data-dir {data_dir!r} is not a directory; give the folder that now holds the "
            "run's dataset.")
    config = ml_collections.ConfigDict(config.to_dict())
    if config.dataset.startswith("image_folder:"):
        config.dataset = f"image_folder:{data_dir}"
    elif config.fake_data.num_train:
        raise errors.ConfigError(
            "This run trained on fake data written inside its workdir (config.fake_data), so "
            "--data-dir does not apply; drop it.")
    else:
        config.data_dir = data_dir
    return config


def data_location(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Where :func:`setup_lib.load_data` reads ``config``'s dataset, for messages."""
    if config.dataset.startswith("image_folder:"):
        return config.dataset.removeprefix("image_folder:")
    if config.fake_data.num_train:
        return os.path.join(workdir, setup_lib.FAKE_DATA_DIR)
    return config.data_dir or "tfds's default data_dir"


def _moved_data_hint(config: ml_collections.ConfigDict) -> str:
    """What to do when a run's data is not where its run.json says: give --data-dir; a run
    recorded before data paths were recorded absolute may name a relative one."""
    hint = ("give its new location: evaluate.py --data-dir DIR (restore_run(..., "
            "data_dir=DIR)).")
    image_folder = config.dataset.startswith(data_lib.IMAGE_FOLDER_PREFIX)
    recorded = (config.dataset.removeprefix(data_lib.IMAGE_FOLDER_PREFIX) if image_folder
                else None if config.fake_data.num_train else config.data_dir)
    if recorded and not os.path.isabs(os.path.expanduser(recorded)):
        return (f"run.json records the relative path {recorded!r}, which is read from the "
                f"current directory ({os.getcwd()}): run from the directory train.py ran in, "
                f"or {hint}")
    return f"If the run's data moved, {hint}"


# What run.json's "data" records and a loaded dataset must match, as (key, value of ds).
_DATA_FINGERPRINT = (
    ("num_classes", lambda ds: ds.num_classes),
    ("image_shape", lambda ds: list(ds.image_shape)),
    ("num_train", lambda ds: len(ds.train)),
    ("num_test", lambda ds: len(ds.test)),
    ("num_validation", lambda ds: 0 if ds.validation is None else len(ds.validation)),
    ("holdout", lambda ds: ds.holdout),
)


def check_same_data(recorded: dict[str, Any], ds: data_lib.Dataset,
                    config: ml_collections.ConfigDict, workdir: str,
                    fix: str = "point --data-dir at the run's dataset") -> None:
    """Refuses a dataset that differs from the one a run recorded in ``run.json``'s
    ``data``: sizes, shape, classes and their label order, the training split's channel
    statistics and (recorded since it exists) the fingerprint of every split's pixels and
    labels (:func:`data_lib.fingerprint`).

    A run recorded before the fingerprint, on an image folder that the earlier reader read
    differently (``image_folder.earlier_reader_difference``), is refused too.

    Raises:
      errors.DataError: naming the first differences and where the data was read.
      errors.ConfigError: ``config.normalization`` is not the one the run trained with.
    """
    _check_same_normalization(recorded, ds, config)
    where = data_location(config, workdir)
    diffs = []
    for key, value in _DATA_FINGERPRINT:
        if key in recorded and recorded[key] != value(ds):
            diffs.append(f"{key} {recorded[key]} recorded, {value(ds)} here")
    names = None if ds.class_names is None else list(ds.class_names)
    if recorded.get("class_names", names) != names:
        diffs.append("class names or their label order differ")
    diffs += _stats_differences(recorded, ds)
    if "pixels_sha256" in recorded and recorded["pixels_sha256"] != data_lib.fingerprint(ds):
        diffs.append("the images or labels of a split differ")
    if diffs:
        raise errors.DataError(
            f"The data read from {where} is not the data this run trained on "
            f"({'; '.join(diffs[:3])}); {fix}.")
    if "pixels_sha256" not in recorded and config.dataset.startswith("image_folder:"):
        reason = image_folder.earlier_reader_difference(where)
        if reason is not None:
            raise errors.DataError(
                f"This run was recorded by an earlier version of this library, whose image "
                f"folder reader read these images differently ({reason}), so its results "
                "would not be on the images it trained on; use the version that trained it "
                "(run.json's code_version), or retrain.")


def _check_same_normalization(recorded: dict[str, Any], ds: data_lib.Dataset,
                               config: ml_collections.ConfigDict) -> None:
    """Refuses statistics of another ``normalization`` than the recorded ones (a [C] mean
    is per channel, an [H, W, C] one per pixel): the model would see inputs normalised
    otherwise than it trained on (a resume with a changed ``--config.normalization``)."""
    if "mean" not in recorded or np.ndim(recorded["mean"]) == np.ndim(ds.mean):
        return
    trained = "pixel" if np.ndim(recorded["mean"]) == 3 else "channel"
    raise errors.ConfigError(
        f"This run was trained with normalization={trained!r} (run.json's data records its "
        f"statistics) and this config has normalization="
        f"{config.get('normalization', 'channel')!r}: set --config.normalization={trained} "
        "as it trained, or train in a fresh --workdir.")


def _stats_differences(recorded: dict[str, Any], ds: data_lib.Dataset) -> list[str]:
    """The normalisation statistics (of the same shape) that differ from the recorded ones."""
    what = "channel" if np.ndim(ds.mean) == 1 else "pixel"
    return [f"training-split {what} {key} differs" for key in ("mean", "std")
            if key in recorded and not np.allclose(recorded[key], getattr(ds, key), rtol=1e-5)]


def _parse_which(which: str | int) -> tuple[str, int | None]:
    if isinstance(which, int) or str(which).isdigit():
        return "latest", int(which)
    if which in ("latest", "best"):
        return which, None
    raise errors.ConfigError(
        f"--checkpoint must be 'latest', 'best' or a step number, got {which!r}"
    )


def _restore_labelled(
    ckpts: checkpoint_lib.Checkpoints, kind: str, step: int | None, abstract: Any
) -> tuple[Any, dict[str, Any], str | None]:
    """Restores ``kind`` (newest first, or exactly ``step``); says if it fell back.

    The 'best' series is saved on every improvement of the selection metric, so its older
    steps are the next best by that metric, in order.

    Returns:
      ``(state, meta, note)``; ``note`` is None when the requested checkpoint itself was
      evaluated, else it says which one was damaged and what was evaluated instead.
    """
    wanted = step if step is not None else max(ckpts.steps(kind), default=None)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", checkpoint_lib.CheckpointCorruptWarning)
            state, meta = ckpts.restore(kind, abstract, step)
    finally:  # the skipped checkpoints are reported whether or not one was readable
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    damaged = any(issubclass(w.category, checkpoint_lib.CheckpointCorruptWarning)
                  for w in caught)
    if int(meta["step"]) == wanted or not damaged:
        # The requested one, or (a run still training rotates its checkpoints) the newest
        # one on disk when it was read: nothing damaged to report.
        return state, meta, None
    order = "the next best by the selection metric" if kind == "best" else "the previous one"
    value = (meta.get("best") or {}).get("value") if kind == "best" else None
    note = (
        f"the {kind} checkpoint (step {wanted}) is damaged; evaluated {order}, step "
        f"{meta['step']}" + (f" ({meta['best']['metric']} {value:.4f})" if value is not None else "")
    )
    return state, meta, note


@dataclasses.dataclass
class RestoredRun:
    """A training run's checkpoint restored for evaluation or analysis.

    Attributes:
      config: the run's validated config; ds: its dataset (host splits); setup: model,
      mesh and steps built exactly as in training; state: the restored ``TrainState``;
      mean, std: float32 normalisation (``[C]`` each, or ``[H, W, C]`` and a scalar with
      ``normalization='pixel'``); kind: 'latest' or 'best'; meta: the
      checkpoint's metadata (``step``, ``epoch``, ...); note: None, or why an older
      checkpoint than the one requested was restored (the requested one is damaged).
    """

    config: ml_collections.ConfigDict
    ds: data_lib.Dataset
    setup: setup_lib.Setup
    state: Any
    mean: np.ndarray
    std: np.ndarray
    kind: str
    meta: dict[str, Any]
    note: str | None = None

    def device_split(self, split: str) -> data_lib.DeviceSplit:
        """``'test'`` or ``'validation'`` placed on the run's mesh."""
        if split not in ("test", "validation"):
            raise errors.ConfigError(f"split must be 'test' or 'validation', got {split!r}")
        host_split = {"test": self.ds.test, "validation": self.ds.validation}[split]
        if host_split is None:
            raise errors.ConfigError(f"The run has no {split} split (validation_size=0?).")
        return data_lib.put_on_devices(host_split, self.setup.mesh)


def restore_run(workdir: str, checkpoint: str | int = "best",
                data_dir: str | None = None) -> RestoredRun:
    """Rebuilds the run in ``workdir`` from ``run.json`` and restores one checkpoint.

    ``checkpoint``: 'best', 'latest' or a step number (of the 'latest' series; a step of
    the best series is found there too). If the requested checkpoint is damaged, the
    next one of its series is restored and ``note`` says so. ``data_dir``: where the run's
    dataset is now, if it moved (:func:`relocate_data`). The data read must match what
    ``run.json`` recorded (:func:`check_same_data`).

    Raises:
      errors.CheckpointError: not a run, no such step, or nothing readable.
      errors.ConfigError: a bad ``checkpoint``.
      errors.DataError: the data found is not the run's.
    """
    workdir = os.path.expanduser(workdir)  # '~/runs/x' from Python, as on the command line
    config, meta = load_run_config(workdir)
    # A field this version reads after validating (data_dir, model.scan, ...) that another
    # version's run.json lacks: one line naming it.
    with recorded_fields(workdir, meta, config):
        return _restore(workdir, config, meta, checkpoint, data_dir)


def _restore(workdir: str, config: ml_collections.ConfigDict, meta: dict[str, Any],
             checkpoint: str | int, data_dir: str | None) -> RestoredRun:
    """:func:`restore_run` once ``run.json`` is read."""
    if data_dir is not None:
        config = relocate_data(config, data_dir)
    kind, step = _parse_which(checkpoint)
    ckpts = checkpoint_lib.Checkpoints(workdir, read_only=True)
    try:
        if step is not None and step not in ckpts.steps("latest") and step in ckpts.steps("best"):
            kind = "best"
        held = ckpts.steps("latest") or ckpts.steps("best")  # none: _no_checkpoint says so
        if step is not None and held and step not in ckpts.steps(kind):
            raise (_unmounted(workdir, _CHECKPOINT_DIRS.values())
                   or _no_step(workdir, step, ckpts.steps("latest"), ckpts.steps("best")))
        if not ckpts.steps(kind):
            raise (_unmounted(workdir, [_CHECKPOINT_DIRS[kind]])
                   or _no_checkpoint(workdir, kind, ckpts.steps("latest"), ckpts.steps("best")))
        try:
            ds = setup_lib.load_data(config, workdir, meta.get("data"))
        except (data_lib.DataUnavailableError, errors.DataFileNotFoundError) as e:
            if data_dir is not None:
                raise
            raise type(e)(f"{e}\n{_moved_data_hint(config)}") from e
        data_meta = meta.get("data")
        if not isinstance(data_meta, dict) or not {"mean", "std"} <= data_meta.keys():
            raise errors.CheckpointError(
                f"{os.path.join(workdir, RUN_FILE)} records no data (the normalisation the "
                "model was trained with is unknown), so it cannot be evaluated as trained; "
                "restore run.json from a copy.")
        check_same_data(data_meta, ds, config, workdir)
        mean, std = np.float32(data_meta["mean"]), np.float32(data_meta["std"])
        setup = setup_lib.build(
            config,
            num_classes=ds.num_classes,
            num_train=len(ds.train),
            mean=mean,
            std=std,
            augment=ds.augment,
            mesh=evaluation_mesh(config),
        )
        abstract = setup_lib.abstract_state(setup, ds.image_shape)
        state, ckpt_meta, note = _restore_labelled(ckpts, kind, step, abstract)
    finally:
        ckpts.close()
    _warn_if_training(workdir, kind if step is None else None, ckpt_meta)
    return RestoredRun(config, ds, setup, state, mean, std, kind, ckpt_meta, note)


def evaluation_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The mesh a run is evaluated on: every device, or, in one process whose device count
    the run's batch sizes do not divide (another machine than the one it trained on: 3
    GPUs for a batch of 128), the first of them, as many as both batch sizes (and a
    drop-path model's subset groups, :func:`setup.drop_path_groups`) divide over.
    Every example is evaluated either way (padding is masked); only float rounding of the
    sums depends on the device count. A multi-process job keeps every device (its mesh
    spans the processes).

    Raises:
      errors.ConfigError: a multi-process job whose device count those sizes do not divide
        (the same on every process, before any collective).
    """
    devices = jax.devices()
    # A drop-path model's subset groups must divide over the devices too (setup.build).
    implementation = implementation_lib.resolve(config.model, devices[0].platform)
    groups = setup_lib.drop_path_groups(config, implementation.implementation)
    sizes = {"batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size,
             **({} if groups is None else {"model.groups": groups})}
    if jax.process_count() > 1:
        indivisible = [f"{k}={v}" for k, v in sizes.items() if v % len(devices)]
        if indivisible:  # setup.build would name --config flags evaluate.py does not have
            raise errors.ConfigError(
                f"The run's {' and '.join(indivisible)} "
                f"{'does' if len(indivisible) == 1 else 'do'} not divide over the "
                f"{len(devices)} devices of this {jax.process_count()}-process job; evaluate "
                "it in one process (it uses as many of its devices as they divide over), or "
                "on a device count they divide by.")
        return distributed.make_mesh(devices)
    usable = max(n for n in range(1, len(devices) + 1)
                 if all(v % n == 0 for v in sizes.values()))
    return distributed.make_mesh(devices[:usable])


def _warn_if_training(workdir: str, kind: str | None, meta: dict[str, Any]) -> None:
    """Warns, in one line, that the 'best' or 'latest' checkpoint of a run still training
    is only the one so far (its result will be superseded); None ``kind``: a step, which
    is what it is."""
    holder = None if kind is None else workdir_lib.training_holder(workdir)
    if holder is not None and jax.process_index() == 0:  # one line for a job's processes
        warnings.warn(
            f"The run in {workdir} is still training, by {holder}: its {kind} checkpoint so far, "
            f"step {int(meta['step'])}, is evaluated; evaluate again when it has finished.",
            logs.RunWarning)


# Where each kind of checkpoint is kept in a run's workdir.
_CHECKPOINT_DIRS = {"latest": "checkpoints", "best": "checkpoints_best"}


def _unmounted(workdir: str, names: Iterable[str]
               ) -> checkpoint_lib.CheckpointAccessError | None:
    """The error for the first of ``names`` (checkpoint directories of ``workdir``) that is
    a symbolic link to nothing (the disk holding them not mounted), else None: read, it
    holds no checkpoint, and the run was said to have none yet ('evaluate it once one is
    saved') or not the step asked for."""
    for name in names:
        path = os.path.join(workdir, name)
        if os.path.islink(path) and not os.path.exists(path):
            return checkpoint_lib.CheckpointAccessError(
                workdir_lib.dangling_link(path, "evaluate the run", access="read"))
    return None


def _no_checkpoint(workdir: str, kind: str, latest: list[int], best: list[int]
                   ) -> checkpoint_lib.NoCheckpointError:
    """The error for a run without a ``kind`` checkpoint: what there is, and what to do."""
    if kind == "latest" and best:  # 'nor any other', it said: checkpoints/ deleted, or
        # killed after a mid-epoch 'best' (eval_every_steps), before its first 'latest'
        return checkpoint_lib.NoCheckpointError(
            f"The run in {workdir} has no latest checkpoint; its best checkpoints are at "
            f"steps {best}: evaluate one with checkpoint='best' or a step.",
            command_line=f"The run in {workdir} has no latest checkpoint; its best "
                         f"checkpoints are at steps {best}: evaluate one with --checkpoint "
                         "best or --checkpoint STEP.")
    if kind == "best" and latest:
        return checkpoint_lib.NoCheckpointError(
            f"The run in {workdir} has no best checkpoint yet; its latest checkpoints are at "
            f"steps {latest}: evaluate one with checkpoint='latest' or a step.",
            command_line=f"The run in {workdir} has no best checkpoint yet; its latest "
                         f"checkpoints are at steps {latest}: evaluate one with --checkpoint "
                         "latest or --checkpoint STEP.")
    diverged = _diverged_before_saving(workdir)
    if diverged is not None:  # 'once one is saved': none ever will be
        return checkpoint_lib.NoCheckpointError(
            f"The run in {workdir} diverged{diverged} before it saved any checkpoint (its "
            f"{DIVERGED_FILE} records it): there is nothing to evaluate. To train it again, "
            "remove its directory and run its sweep again (a lower --config.learning_rate "
            "or another --config.seed is a new sweep, in a new --root).")
    return checkpoint_lib.NoCheckpointError(
        f"The run in {workdir} has no {kind} checkpoint yet, nor any other: one is saved at "
        "the end of each epoch (and every checkpoint_every_steps steps if set); evaluate it "
        "once one is saved.")


# The record a sweep writes in a run that diverged (loop.DIVERGED_FILE, named here: loop
# imports this module).
DIVERGED_FILE = "diverged.json"


def _diverged_before_saving(workdir: str) -> str | None:
    """``' at epoch N'`` (or ``''``) where ``workdir``'s run holds a divergence record
    (:data:`DIVERGED_FILE`, readable JSON), else None: a run with no checkpoint that
    diverged will never save one."""
    try:
        with open(os.path.join(workdir, DIVERGED_FILE)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    epoch = record.get("epoch")
    return f" at epoch {epoch}" if isinstance(epoch, int) and not isinstance(epoch, bool) else ""


def _no_step(workdir: str, step: int, latest: list[int], best: list[int]
             ) -> checkpoint_lib.NoCheckpointError:
    """The error for a step number that neither series holds: the steps of both (a step
    of either is evaluated; the best series may keep steps the latest one rotated out)."""
    held = f"checkpoints/ holds steps {latest} and checkpoints_best/ steps {best}"
    return checkpoint_lib.NoCheckpointError(
        f"No checkpoint at step {step} in {workdir}: {held}; give one of them, or "
        "checkpoint='best' or 'latest'.",
        command_line=f"No checkpoint at step {step} in {workdir}: {held}; give one of them "
                     "(--checkpoint STEP), or --checkpoint best or latest.")


def result_label(checkpoint: str | int, result: dict[str, Any]) -> str:
    """How an evaluation's file names its checkpoint: ``'best'`` or ``'latest'`` as
    requested, else ``step<N>`` (a step number was requested, or an older checkpoint was
    evaluated because the requested one is damaged: never 'best' or 'latest' then).

    ``result`` holds ``'evaluated_step'`` and, after a fallback, ``'note'``.
    """
    if "note" in result or str(checkpoint) not in ("best", "latest"):
        return f"step{int(result['evaluated_step'])}"
    return str(checkpoint)


def _epoch(value: Any) -> int | float | None:
    """A checkpoint's epoch as recorded (a float), as an int when whole (end of epoch)."""
    if value is None:
        return None
    return int(value) if float(value).is_integer() else float(value)


def fake_data_fields(config: ml_collections.ConfigDict) -> dict[str, bool]:
    """``{'fake_data': True}`` for a run that trained (and is evaluated) on fake random-label
    data (``config.fake_data``), whose errors sit at chance; ``{}`` for a real dataset.
    Results carry it so that a figure quoted from one cannot pass for a real one. An image
    folder is real data whatever ``fake_data.num_train`` says (a smoke config's 160, left
    as it was): :func:`config_lib.fake_train_size`, as training decides."""
    return {"fake_data": True} if config_lib.fake_train_size(config) else {}


# The split each selection metric reads: select_best_by is named by its split.
_METRIC_SPLITS = {metric: split for split, metric in config_lib.SELECT_BEST_BY.items()}


def selection_fields(checkpoint: str | int, kind: str, meta: dict[str, Any],
                     split: str) -> dict[str, Any]:
    """What chose a 'best' checkpoint evaluated as requested (``checkpoint`` 'best'; or the
    next best, a fallback): ``{'selected_by': 'val_error'}``, with ``'selected_on_split':
    True`` where that metric is of ``split`` itself (``select_best_by='test'``, evaluated on
    the test set): its error is then optimistic, the minimum over the evaluated epochs,
    not a held-out figure, and says so. ``{}`` for any other checkpoint (a step asked for,
    'latest'), or a best whose metric is not recorded."""
    best = meta.get("best")
    if str(checkpoint) != "best" or kind != "best" or not isinstance(best, dict):
        return {}
    metric = best.get("metric")
    if not isinstance(metric, str):
        return {}
    return {"selected_by": metric,
            **({"selected_on_split": True} if _METRIC_SPLITS.get(metric) == split else {})}


def selection_text(result: dict[str, Any]) -> str:
    """``' (chosen by its own test error: optimistic, not a held-out figure)'`` for a
    result that :func:`selection_fields` marks ``selected_on_split``; else ''."""
    if not result.get("selected_on_split"):
        return ""
    return (f" (chosen by its own {result['split']} error: optimistic, not a held-out "
            "figure)")


def evaluate_checkpoint(
    workdir: str, checkpoint: str | int = "best", split: str = "test",
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Restores a checkpoint of the run in ``workdir`` and evaluates one split.

    Args:
      workdir: a training run's directory (holds ``run.json`` and checkpoints).
      checkpoint: 'best', 'latest' or a step number (see :func:`restore_run`).
      split: 'test' or 'validation'.
      data_dir: where the run's dataset is now, if it moved (see :func:`restore_run`).

    Returns:
      ``{'requested', 'checkpoint', 'step', 'evaluated_step', 'epoch', 'split', 'error',
      'loss', 'count'}`` (``epoch``: an int at the end of an epoch, else a float),
      ``'fake_data': True`` for a run on fake data (:func:`fake_data_fields`),
      for 'best' ``'selected_by'`` (the metric that chose it) and, where that metric is
      of ``split`` itself, ``'selected_on_split': True`` (:func:`selection_fields`), and,
      if the requested checkpoint was damaged and an older one was evaluated instead,
      ``'note'`` saying so. ``'checkpoint'`` is ``'best'`` or ``'latest'`` only when that
      checkpoint was evaluated; ``'step'`` for a step number requested or a fallback.

    Raises:
      errors.CheckpointError: not a run, no such step, or nothing readable.
      errors.ConfigError: a bad ``checkpoint`` or ``split``.
    """
    if split not in ("test", "validation"):
        raise errors.ConfigError(f"split must be 'test' or 'validation', got {split!r}")
    run = restore_run(workdir, checkpoint, data_dir)
    result = evaluate_split(
        run.setup.eval_step,
        run.state,
        run.device_split(split),
        batch_size=run.config.eval_batch_size,
        mean=run.mean,
        std=run.std,
    )
    evaluated = int(run.meta["step"])
    out = {
        "requested": str(checkpoint),
        # 'best'/'latest' only when that is what was evaluated: a requested step held in
        # checkpoints_best/ need not be the run's best (a later step may be).
        "checkpoint": run.kind if run.note is None and str(checkpoint) == run.kind else "step",
        "step": evaluated,
        "evaluated_step": evaluated,
        "epoch": _epoch(run.meta.get("epoch")),
        "split": split,
        **result,
        **selection_fields(checkpoint, run.kind, run.meta, split),
        **fake_data_fields(run.config),
    }
    if data_dir is not None:
        out["data_dir"] = data_dir
    if run.note is not None:
        out["note"] = run.note
    return out
