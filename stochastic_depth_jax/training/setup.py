"""Builds what a run needs from its config: data, model, optimiser, state, steps.

Shared by training (``loop.py``), evaluation (``evaluate.py``) and the benchmark, so all
three construct exactly the same model and state layout.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

import stochastic_depth_jax
from stochastic_depth_jax import data as data_lib
from stochastic_depth_jax import errors
from stochastic_depth_jax import hugepages
from stochastic_depth_jax.data import image_folder
from stochastic_depth_jax.models import CifarResNet
from stochastic_depth_jax import convnext as convnext_lib
from stochastic_depth_jax import vit as vit_lib
from stochastic_depth_jax.convnext import ConvNeXt
from stochastic_depth_jax.vit import ViT
from stochastic_depth_jax.training import config as config_lib
from stochastic_depth_jax.training import distributed, optim, step as step_lib
from stochastic_depth_jax.training import implementation as implementation_lib
from stochastic_depth_jax.training import state as state_lib

__all__ = [
    "Setup",
    "absolute_data_path",
    "absolute_data_paths",
    "load_data",
    "build_model",
    "MODEL_BUILDERS",
    "build",
    "abstract_state",
    "code_version",
    "run_metadata",
]

FAKE_DATA_DIR = "fake_data"


def absolute_data_path(field: str, value: Any) -> Any:
    """``value`` of the config ``field`` made absolute where it names a local place
    (``dataset``'s ``image_folder:`` path, ``data_dir``; ``~`` expanded), else unchanged.
    Not resolved: a symlink or a shared filesystem's mount point stays as the user named it.
    An image folder's ``file:///path`` URL is recorded as its local path; a remote location
    (``gs://bucket/...``: anything else with ``://``) is left as it is."""
    prefix = data_lib.IMAGE_FOLDER_PREFIX
    if field == "dataset" and isinstance(value, str) and value.startswith(prefix):
        path = image_folder.file_url_path(value.removeprefix(prefix))
        return prefix + _absolute_local(path)
    if field == "data_dir" and value:
        return _absolute_local(value)
    return value


def _absolute_local(path: str) -> str:
    """``path`` made absolute, unless it is remote (``gs://``, ``s3://``, ...): those are
    absolute already, and ``abspath`` would turn them into a local path under the current
    directory."""
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def absolute_data_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config``, or a copy whose data paths are absolute (:func:`absolute_data_path`), so
    that run.json's record finds the data from any directory (``evaluate.py``)."""
    paths = {field: absolute_data_path(field, config[field]) for field in ("dataset", "data_dir")}
    if all(config[field] == path for field, path in paths.items()):
        return config
    config = config.copy_and_resolve_references()
    for field, path in paths.items():
        config[field] = path
    return config


def load_data(config: ml_collections.ConfigDict, workdir: str,
              recorded: dict[str, Any] | None = None) -> data_lib.Dataset:
    """Loads ``config.dataset``; with ``config.fake_data.num_train > 0`` first writes a small
    random dataset with the real tfds name under ``<workdir>/fake_data`` (process 0).

    ``recorded``: the ``data`` record of the run's ``run.json`` when resuming or evaluating
    it, so its validation split is rebuilt as it was held out (``data.recorded_holdout``).

    Each dataset there has its own completion marker (``.complete-<dataset>``), so a second
    smoke config in the same workdir writes its own fake data instead of looking for real
    data.
    """
    data_dir = config.data_dir
    if config_lib.fake_train_size(config):
        data_dir = os.path.join(workdir, FAKE_DATA_DIR)
        if jax.process_index() == 0:
            _write_fake_data(config, data_dir)
        multihost_utils.sync_global_devices("fake_data")
    return data_lib.load_dataset(
        config.dataset,
        data_dir=data_dir,
        download=config.download,
        validation_size=config.validation_size,
        seed=config.seed,
        train_on_all=config.train_on_all,
        label=config.label,
        holdout=data_lib.recorded_holdout(recorded, config.dataset),
        progress_bar=config.get("progress_bar", True),  # a run.json may predate the field
        normalization=config.get("normalization", "channel"),  # as progress_bar
        augment=config.get("augment", "auto"),  # as progress_bar; 'auto': the dataset's
    )


def _write_fake_data(config: ml_collections.ConfigDict, data_dir: str) -> None:
    """Writes ``config``'s fake dataset in ``data_dir``, then its completion marker, unless
    the marker is there and so is every file of the data. A marker beside missing data (a
    run stopped while writing it, whose clean-up removed the data as the marker was
    written; files deleted by hand) is not trusted: the data is written again, with one
    line saying so, instead of the load looking for the real dataset there."""
    f = config.fake_data
    marker = os.path.join(data_dir, f".complete-{config.dataset}")
    # Only SVHN has an extra split: another dataset's num_extra writes nothing.
    extra = f.num_extra if config.dataset == "svhn" else 0
    wanted = {"num_train": f.num_train, "num_test": f.num_test, "num_extra": extra,
              "seed": config.seed}
    what = (f"fake {config.dataset} data ({f.num_train} train, {f.num_test} test"
            + (f", {extra} extra" if extra else "")
            + " random images; config.fake_data)")
    if os.path.exists(marker):
        missing = data_lib.testing.missing_tfds_file(config.dataset, data_dir)
        written = _fake_data_written(marker)
        if missing is None and written in (None, wanted):
            return
        changed = [k for k in wanted if written.get(k) != wanted[k]] if written else []
        why = (f"is incomplete ({missing} is missing)" if missing is not None else
               f"was written with {_fields(written, changed)} and this config has "
               f"{_fields(wanted, changed)}" if changed else "has an unreadable marker")
        print(f"The {what} in {data_dir} {why}: writing it again; no download.", flush=True)
        os.remove(marker)
    else:
        print(f"Writing {what} to {data_dir}: no download.", flush=True)
    data_lib.testing.remove_tfds_dataset(config.dataset, data_dir)  # a partial one
    try:
        data_lib.testing.make_tfds_dataset(config.dataset, data_dir, num_train=f.num_train,
                                           num_test=f.num_test, num_extra=extra,
                                           seed=config.seed)
    except (RuntimeError, OSError) as e:  # the next run removes what was written
        raise _disk_full(e, data_dir) or e
    with open(marker, "w") as out:
        json.dump(wanted, out)


def _disk_full(error: BaseException, directory: str) -> OSError | None:
    """A full disk (or quota) that ``error`` reports in its text only, as an ``OSError``
    naming ``directory``: TensorFlow Datasets' record writer raises a RuntimeError ('write()
    failed: No space left on device'), which ended the run in a traceback; None for
    another error."""
    if isinstance(error, OSError) and error.errno is not None:
        return None  # reported as it is (naming its file, or named by the caller)
    for code in (errno.ENOSPC, errno.EDQUOT):
        if os.strerror(code) in str(error):
            failure = OSError(code, os.strerror(code), directory)
            failure.__cause__ = error
            return failure
    return None


def _fake_data_written(marker: str) -> dict[str, Any] | None:
    """What the fake data beside ``marker`` was written with (sizes, seed): None for an
    empty marker (older versions wrote no content: trusted as before), {} if unreadable.
    A marker that said only 'complete' let a config with other sizes train on the old data
    while run.json recorded the new ones."""
    try:
        with open(marker) as f:
            text = f.read()
        written = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return {}
    return written if written is None or isinstance(written, dict) else {}


def _fields(values: dict[str, Any], keys: list[str]) -> str:
    """``fake_data.num_train=160, seed=0`` of ``values``' ``keys``, as config fields."""
    return ", ".join(f"{k if k == 'seed' else 'fake_data.' + k}={values.get(k)}" for k in keys)


def _implementation(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                    implementation: str | None) -> str:
    if implementation is not None:
        return implementation
    return implementation_lib.resolve(config.model, mesh.devices.flat[0].platform).implementation


def build_cifar_resnet(config: ml_collections.ConfigDict, num_classes: int,
                       mesh: jax.sharding.Mesh, implementation: str | None = None) -> CifarResNet:
    """The ``CifarResNet`` (or ``WideResNet``, ``model.name='wide_resnet'``) described by
    ``config.model``.

    ``implementation`` overrides ``model.implementation`` (``build`` passes the resolved
    one); by default ``'auto'`` is resolved for the platform of ``mesh``.
    """
    m = config.model
    name = m.get("name", "cifar_resnet")
    extra = {"widen_factor": m.widen_factor} if name == "wide_resnet" else {}
    return config_lib.MODELS[name](
        **extra,
        depth=m.depth,
        num_classes=num_classes,
        final_survival_prob=float(m.final_survival_prob),
        survival_rule=m.survival_rule,
        mode=m.mode,
        scaling=m.scaling,
        shortcut=m.shortcut,
        width=m.width,
        scan=m.scan,
        scan_unroll=bool(m.get("scan_unroll", False)),
        block=m.block,
        implementation=_implementation(config, mesh, implementation),
        remat=m.remat,
        dropout_rate=float(m.get("dropout_rate", 0.0)),
        initialization=m.get("initialization", "ours"),  # absent from older run.json
        dtype=config_lib.DTYPES[m.dtype],
    )


def _drop_path_implementation(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                              implementation: str | None) -> str:
    """The resolved implementation of a drop-path model (ViT, ConvNeXt).

    Raises ``errors.ConfigError`` if drop-path subsets (``mode='sample'``, ``'skip'``) would
    be drawn across devices: ``model.groups`` must be a multiple of the mesh size.
    """
    m = config.model
    implementation = _implementation(config, mesh, implementation)
    if drop_path_groups(config, implementation) and m.groups % mesh.size:
        raise errors.ConfigError(
            f"model.groups={m.groups} is not a multiple of the {mesh.size} devices: drop-path "
            f"subsets would move activations between devices. Set --config.model.groups to a "
            f"multiple of {mesh.size} dividing batch_size={config.batch_size}."
        )
    return implementation


def check_groups(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Refuses (``errors.ConfigError``) a drop-path model whose ``model.groups`` is not a
    multiple of the mesh size, as :func:`build_model` would, but from the config alone:
    the trainer calls it with the batch-size checks, before any data is downloaded or
    prepared. Nothing for the ResNets (no ``model.groups``)."""
    _drop_path_implementation(config, mesh, None)


def drop_path_groups(config: ml_collections.ConfigDict, implementation: str) -> int | None:
    """``model.groups`` of a drop-path model (ViT, ConvNeXt) that draws per-example subsets
    in groups (``mode='sample'``, ``implementation`` (resolved) ``'skip'``, a drop rate):
    the mesh size must divide it. None for a model without such subsets."""
    m = config.model
    subsets = (m.get("groups") is not None and m.get("mode") == "sample"
               and implementation == "skip" and m.get("drop_path_rate", 0) > 0)
    return int(m.groups) if subsets else None


def build_vit(config: ml_collections.ConfigDict, num_classes: int,
              mesh: jax.sharding.Mesh, implementation: str | None = None) -> ViT:
    """The ``ViT`` described by ``config.model`` (``model.groups`` checked against the mesh,
    see :func:`_drop_path_implementation`)."""
    m = config.model
    implementation = _drop_path_implementation(config, mesh, implementation)
    return ViT(
        num_classes=num_classes, size=m.size, patch_size=m.patch_size, pool=m.pool,
        drop_path_rate=float(m.drop_path_rate), drop_path_rule=m.drop_path_rule, mode=m.mode,
        scaling=m.scaling, implementation=implementation, groups=m.groups, width=m.width,
        depth=m.depth, num_heads=m.num_heads, dtype=config_lib.DTYPES[m.dtype],
        remat=config_lib.drop_path_remat(m),
        layer_scale_init=m.get("layer_scale_init"),  # absent from an older run.json: none
    )


def build_convnext(config: ml_collections.ConfigDict, num_classes: int,
                   mesh: jax.sharding.Mesh, implementation: str | None = None) -> ConvNeXt:
    """The ``ConvNeXt`` described by ``config.model`` (``model.groups`` checked against the
    mesh, see :func:`_drop_path_implementation`)."""
    m = config.model
    implementation = _drop_path_implementation(config, mesh, implementation)
    return ConvNeXt(
        num_classes=num_classes, size=m.size,
        depths=None if m.depths is None else tuple(m.depths),
        dims=None if m.dims is None else tuple(m.dims), stem_stride=m.stem_stride,
        drop_path_rate=float(m.drop_path_rate), drop_path_rule=m.drop_path_rule,
        layer_scale_init=m.layer_scale_init, mode=m.mode, scaling=m.scaling,
        implementation=implementation, groups=m.groups, dtype=config_lib.DTYPES[m.dtype],
        remat=config_lib.drop_path_remat(m),
    )


# config.model.name -> builder(config, num_classes, mesh, implementation); names as
# config.MODEL_VALIDATORS.
MODEL_BUILDERS: dict[str, Callable[..., Any]] = {
    "cifar_resnet": build_cifar_resnet,
    "wide_resnet": build_cifar_resnet,
    "vit": build_vit,
    "convnext": build_convnext,
}


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                mesh: jax.sharding.Mesh | None = None,
                implementation: str | None = None) -> Any:
    """The model named by ``config.model.name`` (default ``'cifar_resnet'``).

    ``implementation``: the resolved ``model.implementation`` (default: resolve ``'auto'``
    for the platform of ``mesh``, all devices by default).
    """
    mesh = distributed.make_mesh() if mesh is None else mesh
    name = config.model.get("name", "cifar_resnet")
    return MODEL_BUILDERS[name](config, num_classes, mesh, implementation)


@dataclasses.dataclass
class Setup:
    """Everything built from a config and a dataset (see ``build``)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    model: Any
    keys: step_lib.StepKeys
    steps_per_epoch: int
    lr_schedule: Callable[[Any], Any]
    optimizer: Any
    train_step: Callable[..., state_lib.TrainState]
    eval_step: Callable[..., Any]
    implementation: implementation_lib.Resolved | None = None

    def init_state(self, image_shape: tuple[int, int, int]) -> state_lib.TrainState:
        """A freshly initialised, replicated train state."""
        return state_lib.create_train_state(
            self.model,
            self.optimizer,
            image_shape,
            self.keys.init,
            distributed.replicated(self.mesh),
        )


def build(
    config: ml_collections.ConfigDict,
    *,
    num_classes: int,
    num_train: int,
    mean: Any,
    std: Any,
    augment: str,
    mesh: jax.sharding.Mesh | None = None,
) -> Setup:
    """Model, optimiser and jitted steps for ``config`` on ``mesh`` (default: all devices)."""
    mesh = distributed.make_mesh() if mesh is None else mesh
    distributed.check_batch_size(config.batch_size, mesh)
    distributed.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    spe = data_lib.steps_per_epoch(num_train, config.batch_size)
    # Resolved once, for the platform the run's devices are on; run.json records it.
    resolved = implementation_lib.resolve(config.model, mesh.devices.flat[0].platform)
    model = build_model(config, num_classes, mesh, resolved.implementation)
    optimizer = optim.make_optimizer(config, spe)
    keys = step_lib.StepKeys.from_seed(config.seed, config.init_rng_impl)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    train_step = step_lib.make_train_step(
        model,
        optimizer,
        keys=keys,
        mesh=mesh,
        batch_size=config.batch_size,
        steps_per_epoch=spe,
        mean=mean,
        std=std,
        augment=augment,
        compact_multiple=resolved.compact_multiple,
        compact_lengths=resolved.compact_lengths,
        label_smoothing=config.label_smoothing,
    )
    return Setup(
        config,
        mesh,
        model,
        keys,
        spe,
        optim.make_lr_schedule(config, spe),
        optimizer,
        train_step,
        step_lib.make_eval_step(model, mesh),
        resolved,
    )


# config.model.name -> (the field that constrains the image sides, a check of the built model
# on images [1, H, W, C] raising ValueError): a ViT's patches, a ConvNeXt's stem and stages.
_IMAGE_CHECKS: dict[str, tuple[str, Callable[[Any, tuple[int, ...]], None]]] = {
    "vit": ("patch_size", lambda model, shape: vit_lib.check_patches(shape, model.patch_size)),
    "convnext": ("stem_stride", lambda model, shape: convnext_lib.check_image(
        shape, model.stem_stride, len(model.stages()[0]))),
}


def check_image_shape(config: ml_collections.ConfigDict, model: Any, dataset: str,
                      image_shape: tuple[int, ...]) -> None:
    """Refuses a model that cannot take the dataset's ``image_shape`` ``[H, W, C]`` images
    (a ViT patch size that does not divide the sides; a ConvNeXt whose stem stride and
    stages do not fit them), naming the field, before anything is written: the model's own
    check fails only at initialisation, with a traceback and after the workdir's checkpoint
    folders exist."""
    field, check = _IMAGE_CHECKS.get(config.model.get("name", "cifar_resnet"), (None, None))
    if check is None:
        return
    try:
        check(model, (1, *image_shape))
    except ValueError as e:
        raise errors.ConfigError(
            f"Invalid config: model.{field}={config.model[field]!r} does not fit {dataset}: {e}"
        ) from None


def build_for_dataset(
    config: ml_collections.ConfigDict, ds: data_lib.Dataset, mesh: jax.sharding.Mesh | None = None
) -> Setup:
    """``build`` with the class count, training size and statistics of a loaded dataset."""
    num_held = 0 if ds.validation is None else len(ds.validation)
    held = f" ({num_held} held out for validation)" if num_held else ""
    mesh = distributed.make_mesh() if mesh is None else mesh
    config_lib.check_batch_fits(config.batch_size, len(ds.train), ds.name + held, num_held,
                                mesh.size)
    setup = build(
        config,
        num_classes=ds.num_classes,
        num_train=len(ds.train),
        mean=ds.mean,
        std=ds.std,
        augment=ds.augment,
        mesh=mesh,
    )
    check_image_shape(config, setup.model, ds.name, tuple(ds.image_shape))
    return setup


def abstract_state(setup: Setup, image_shape: tuple[int, int, int]) -> Any:
    """Shapes, dtypes and (replicated) shardings of the train state, without computing it."""
    shapes = jax.eval_shape(
        lambda: state_lib.create_train_state(
            setup.model,
            setup.optimizer,
            image_shape,
            setup.keys.init,
            distributed.replicated(setup.mesh),
        )
    )
    sharding = distributed.replicated(setup.mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def code_version() -> dict[str, Any]:
    """Package version and, when run from a git checkout, ``git describe --dirty``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(stochastic_depth_jax.__file__)))
    try:
        git = (
            subprocess.run(
                ["git", "-C", root, "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        git = None
    return {"package": stochastic_depth_jax.__version__, "git": git, "jax": jax.__version__}


def run_metadata(
    config: ml_collections.ConfigDict,
    ds: data_lib.Dataset,
    mesh: jax.sharding.Mesh,
    implementation: implementation_lib.Resolved | None = None,
) -> dict[str, Any]:
    """What ``run.json`` records: config, data statistics, code version, devices, and the
    resolved skipping implementation (with the reason)."""
    if implementation is None:
        implementation = implementation_lib.resolve(config.model, mesh.devices.flat[0].platform)
    return {
        "implementation": implementation.to_json(),
        "config": json.loads(config.to_json()),
        "data": {
            "name": ds.name,
            "num_classes": ds.num_classes,
            # Label i is class_names[i] (image folders; None for tfds datasets).
            "class_names": None if ds.class_names is None else list(ds.class_names),
            "image_shape": list(ds.image_shape),
            "augment": ds.augment,
            # normalization='channel': [C] lists; 'pixel': the mean image as nested lists
            # [H][W][C] and the global std as one number.
            "mean": np.asarray(ds.mean).tolist(),
            "std": np.asarray(ds.std).tolist(),
            "num_train": len(ds.train),
            "num_test": len(ds.test),
            "num_validation": 0 if ds.validation is None else len(ds.validation),
            # How validation was held out: a resumed or evaluated run holds it out so again.
            "holdout": ds.holdout,
            # Every split's pixels and labels: a resumed or evaluated run checks it.
            "pixels_sha256": data_lib.fingerprint(ds),
        },
        "code_version": code_version(),
        "devices": {
            "count": mesh.size,
            "processes": jax.process_count(),
            "platform": jax.devices()[0].platform,
            # Did process 0 allocate with transparent huge pages (stochastic_depth_jax.hugepages)?
            "huge_pages": hugepages.active(),
        },
    }
