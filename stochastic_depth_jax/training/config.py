"""Config overrides (``--config.a.b=value``) and validation against the registries.

Every name-valued field is checked against an explicit dictionary of choices when the
config loads, so a typo fails at once with the valid names.
"""

from __future__ import annotations

import ast
import difflib
import math
from typing import Any, Sequence

import jax.numpy as jnp
import ml_collections

from stochastic_depth_jax import convnext, errors, layers, models, ops, schedules, vit
from stochastic_depth_jax import data as data_lib
from stochastic_depth_jax.data import augment as augment_lib, splits
from stochastic_depth_jax.training import implementation, optim

__all__ = [
    "DTYPES",
    "TRAIN_DTYPES",
    "MODELS",
    "DATASETS",
    "LABELS",
    "MODEL_VALIDATORS",
    "INIT_RNG_IMPLS",
    "SELECT_BEST_BY",
    "split_override",
    "apply_overrides",
    "validate",
    "field_names",
    "config_changes",
    "resolved_augment",
    "moved_folder",
    "with_absent_defaults",
    "check_batch_fits",
    "fake_train_size",
    "unreached_lr_drops",
    "fake_train_fields",
]

# model.dtype -> the models' compute dtype. The trainer trains in TRAIN_DTYPES only: float16
# needs loss scaling, which it does not do (_check_trainable_dtype). 'float16' stays here so
# that a run an earlier version trained in it is still evaluated, analysed and collected as
# it was trained; the library's models take any float dtype for users who scale.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
TRAIN_DTYPES = ("bfloat16", "float32")
# config.model.name -> model class (a run.json without the field means 'cifar_resnet').
MODELS = {"cifar_resnet": models.CifarResNet, "wide_resnet": models.WideResNet}
DATASETS = ("cifar10", "cifar100", "svhn")  # or 'image_folder:<path>'
# Label sets per dataset ('coarse': CIFAR-100's 20 superclasses); others have 'fine' only.
LABELS = {"cifar100": ("fine", "coarse")}
# Which evaluation picks the reported ('best') model: config name -> metric key.
# PRNG implementations for parameter initialisation (see step.StepKeys.from_seed).
INIT_RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
SELECT_BEST_BY = {"validation": "val_error", "test": "test_error", "train": "train_error"}


def fake_train_size(config: Any) -> int:
    """How many random-label training images the run generates: ``fake_data.num_train``, and
    for SVHN its ``num_extra`` too (SVHN trains on train + extra, as the real data does); 0
    where it reads real data (``fake_data.num_train`` 0): fake data stands in for a tfds
    dataset only, an image folder is real data already. ``config``: a ConfigDict, or
    run.json's config dict."""
    if str(config["dataset"]).startswith("image_folder:"):
        return 0
    fake = config.get("fake_data") or {}
    size = int(fake.get("num_train", 0) or 0)
    if size and config["dataset"] == "svhn":
        size += int(fake.get("num_extra", 0) or 0)
    return size


def fake_train_fields(dataset: str) -> str:
    """The ``fake_data`` fields :func:`fake_train_size` adds up for ``dataset``, as messages
    name them."""
    return "fake_data.num_train + num_extra" if dataset == "svhn" else "fake_data.num_train"


def config_changes(old: dict[str, Any], new: dict[str, Any],
                   prefix: str = "") -> dict[str, dict[str, Any]]:
    """``{'a.b': {'old': x, 'new': y}}`` for every (nested) field that differs.

    Takes configs as ``run.json`` stores them (``json.loads(config.to_json())``: tuples
    become lists), so compare two configs in that form.
    """
    changes = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.update(config_changes(a, b, prefix + key + "."))
        elif a != b:
            changes[prefix + key] = {"old": a, "new": b}
    if not prefix and "augment" in changes and resolved_augment(old) == resolved_augment(new):
        del changes["augment"]  # 'auto' and the dataset's own named: the same training
    return changes


def resolved_augment(config: dict[str, Any]) -> str:
    """The augmentation a top-level ``config`` (as run.json stores it) trains with: its
    ``augment``, 'auto' (or absent: recorded before the field) as its dataset's own."""
    augment = config.get("augment") or "auto"
    if augment == "auto":
        return data_lib.default_augment(str(config.get("dataset")))
    return augment


def moved_folder(change: dict[str, Any]) -> bool:
    """A ``dataset`` change (of :func:`config_changes`) from one ``image_folder:`` path to
    another: the images moved (or are others, which a resumed run's data check finds)."""
    return all(isinstance(change.get(k), str) and change[k].startswith("image_folder:")
               for k in ("old", "new"))


# Fields of the block-wise ResNets (``MODELS``) that a run.json recorded before they existed
# lacks, and the value such a run was trained with: what the code reads for an absent one
# (``config.model.get('scan_unroll', False)``).
_ABSENT_MODEL_FIELDS = {"name": "cifar_resnet", "widen_factor": 1, "dropout_rate": 0.0,
                        "scan_unroll": False, "initialization": "ours"}


# The same for the fields of every config (a run without eval_every_steps evaluated once an
# epoch; one without normalization normalised per channel).
# One without augment augmented as its dataset does ('auto').
_ABSENT_FIELDS = {"eval_every_steps": 0, "normalization": "channel", "augment": "auto"}


def with_absent_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (as run.json stores it) with the fields it predates (the ResNet fields and
    ``_ABSENT_FIELDS``) filled in with the values it was trained with, so that comparing it
    with a newer config (:func:`config_changes`) finds only what really differs."""
    config = {**_ABSENT_FIELDS, **config}
    model = config.get("model")
    if not isinstance(model, dict) or model.get("name", "cifar_resnet") not in MODELS:
        return config
    return {**config, "model": {**_ABSENT_MODEL_FIELDS, **model}}


def field_names(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted leaf names of ``config``, e.g. ``['batch_size', 'model.depth', ...]``."""
    names = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            names += field_names(value, prefix + key + ".")
        else:
            names.append(prefix + key)
    return sorted(names)


_NONE_WORDS = ("None", "none", "null")


def _parse(text: str, field_type: Any, current: Any = None, may_be_empty: bool = False) -> Any:
    """Parses an override string for a field of type ``field_type`` now holding ``current``.

    A string field takes the text as is ('none' is a valid ``model.remat``); None-words
    give None only for fields that can hold None (``may_be_empty``: placeholders, also
    once given a value, and untyped fields).
    """
    if field_type is str and current is not None and not may_be_empty:
        return text
    if text in _NONE_WORDS:
        return None
    if field_type is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        none = " or None" if current is None else ""  # a placeholder may be empty
        raise ValueError(f"expected true/false{none}, got {text!r}")
    if field_type is int:
        return int(text)
    if field_type is float:
        return float(text)
    if field_type is str:
        return text
    if field_type in (tuple, list):
        try:
            value = ast.literal_eval(text if text.strip().startswith(("(", "[")) else f"({text},)")
        except (ValueError, SyntaxError):  # ast's own message names an AST node's address.
            raise ValueError("expected values separated by commas, e.g. 250,375 or (250, 375); "
                             "() for none") from None
        return field_type(value)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# Fields that hold a value by default yet accept None (their validators say what None means).
NULLABLE_FIELDS = ("model.layer_scale_init",)


def _may_be_empty(node: ml_collections.ConfigDict, leaf: str, key: str) -> bool:
    """Whether field ``leaf`` of ``node`` (dotted name ``key``) may hold None: a placeholder
    (declared with ``config_dict.placeholder``, empty by default), a field that is None now
    (untyped), or one of ``NULLABLE_FIELDS``."""
    # A placeholder stays a FieldReference once set, and only the unresolved items show it.
    field = dict(node.items(preserve_field_references=True))[leaf]
    return (isinstance(field, ml_collections.FieldReference) or node[leaf] is None
            or key in NULLABLE_FIELDS)


def split_override(item: str) -> tuple[str, str]:
    """``'--config.a.b=value'`` (or ``'a.b=value'``) -> ``('a.b', 'value')``.

    The value is everything after the first ``=`` (it may hold more). The one parser of an
    override's form: :func:`apply_overrides` and the sweep's checks both read keys with it.

    Raises:
      errors.ConfigError: ``item`` has no ``=``.
    """
    key, sep, text = item.removeprefix("--").removeprefix("config.").partition("=")
    if not sep:
        raise errors.ConfigError(f"Override {item!r} must look like --config.field=value.")
    return key, text


def _unknown_field(key: str, valid: Sequence[str]) -> errors.ConfigError:
    """The error for an override of a field ``config`` lacks: the fields of a group named
    ``key``, or the closest field name, then every valid field."""
    group = [v for v in valid if v.startswith(key + ".")]
    if group:
        return errors.ConfigError(
            f"Config field {key!r} is a group of fields; override one of them: "
            f"{', '.join(group)}")
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.75)  # a typo, not a guess
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return errors.ConfigError(
        f"Unknown config field {key!r}.{hint} Valid fields: {', '.join(valid)}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies ``'--config.a.b=value'`` (or ``'a.b=value'``) overrides in place.

    Raises:
      ValueError: for an unknown field (listing the valid ones) or an unparsable value.
    """
    valid = field_names(config)
    for item in overrides:
        key, text = split_override(item)
        if key not in valid:
            raise _unknown_field(key, valid)
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        try:
            may_be_empty = _may_be_empty(node, leaf, key)
            value = _parse(text, node.get_type(leaf), node[leaf], may_be_empty)
            if value is None and not may_be_empty:
                raise ValueError(
                    f"the field cannot be empty (None empties only an optional field); give "
                    f"a value, like the current {node[leaf]!r}"
                )
            node[leaf] = value
        except (ValueError, TypeError, SyntaxError) as e:
            raise errors.ConfigError(
                f"Bad value {text!r} for config field {key!r} "
                f"(type {node.get_type(leaf).__name__}): {e}"
            ) from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise errors.ConfigError(f"Invalid config: {message}")


def _check_choice(value: Any, choices: Any, field: str) -> None:
    _check(value in choices, f"{field}={value!r}; valid: {sorted(choices)}")


def _check_dtype(dtype: Any) -> None:
    """A precision the models can be built in; the valid ones named are those that train."""
    _check(dtype in DTYPES, f"model.dtype={dtype!r}; valid: {sorted(TRAIN_DTYPES)}")


def _check_trainable_dtype(dtype: Any) -> None:
    """Refuses float16 to train, but not to read: :func:`validate` of a recorded run skips
    this, as its run.json cannot be changed to another precision."""
    _check(dtype != "float16",
           "model.dtype='float16' needs loss scaling, which the trainer does not do (float16 "
           "gradients can underflow or overflow: a ConvNeXt's first step overflows); use "
           "'bfloat16' (mixed precision with float32's range) or 'float32'")


def _validate_resnet(m: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    """The CIFAR ResNets: 'cifar_resnet' (depth 6n+2) and 'wide_resnet' (WRN-d-k, 6n+4)."""
    del config
    if m.get("name", "cifar_resnet") == "wide_resnet":
        _check(
            _integer(m.depth) and m.depth >= 10 and (m.depth - 4) % 6 == 0,
            f"model.depth={m.depth!r} must be 6n+4 with n >= 1 for a wide_resnet (e.g. 16, "
            f"22, 28, 40)",
        )
        k = m.get("widen_factor", 1)
        _check(_integer(k) and k >= 1, f"model.widen_factor={k!r} must be >= 1")
    else:
        _check(
            _integer(m.depth) and m.depth >= 8 and (m.depth - 2) % 6 == 0,
            f"model.depth={m.depth!r} must be 6n+2 with n >= 1 (e.g. 8, 20, 56, 110, 152, 1202)",
        )
    _check(_integer(m.width) and m.width >= 1, f"model.width={m.width!r} must be >= 1")
    p = m.final_survival_prob
    _check(
        isinstance(p, (int, float)) and not math.isnan(p) and 0.0 < p <= 1.0,
        f"model.final_survival_prob={p!r} must be in (0, 1] (paper: 0.5; 1.0 = constant depth)",
    )
    rate = m.get("dropout_rate", 0.0)
    _check(isinstance(rate, (int, float)) and 0.0 <= rate < 1.0,
           f"model.dropout_rate={rate!r} must be in [0, 1) (0: none; Wide ResNets: 0.3)")
    _check_choice(m.survival_rule, schedules.SCHEDULES, "model.survival_rule")
    _check_choice(m.mode, ops.MODES, "model.mode")
    _check_choice(m.scaling, ops.SCALINGS, "model.scaling")
    _check_dtype(m.dtype)
    _check_choice(m.block, models.CIFAR_BLOCKS, "model.block")
    _check_choice(m.shortcut, layers.SHORTCUTS, "model.shortcut")
    _check_choice(m.get("initialization", "ours"), models.INITIALIZATIONS,
                  "model.initialization")
    _check(m.implementation != "compact", f"model.implementation='compact' is not a name: "
           f"compact mode is model.compact_multiple={implementation.DEFAULT_COMPACT_MULTIPLE} "
           f"(or model.compact_lengths=3) with implementation 'auto' or 'skip'")
    _check_choice(m.implementation, implementation.IMPLEMENTATIONS, "model.implementation")
    _check_choice(m.remat, layers.REMAT_POLICIES, "model.remat")
    _check(
        _integer(m.compact_multiple) and m.compact_multiple >= 0,
        f"model.compact_multiple={m.compact_multiple!r} must be an integer >= 0 (0: off, or "
        f"chosen by implementation='auto'; {implementation.DEFAULT_COMPACT_MULTIPLE} is a good "
        f"GPU value)",
    )
    _check(
        isinstance(m.get("scan_unroll", False), bool),
        f"model.scan_unroll={m.get('scan_unroll')!r} must be True or False",
    )
    _check(
        _integer(m.compact_lengths) and m.compact_lengths >= 0,
        f"model.compact_lengths={m.compact_lengths!r} must be an integer >= 0 (0: off; e.g. 3 "
        f"lengths per stage fitted to the survival schedule)",
    )
    _check(
        m.compact_multiple == 0 or m.compact_lengths == 0,
        f"model.compact_multiple={m.compact_multiple} and model.compact_lengths="
        f"{m.compact_lengths} both choose compact mode's scan lengths: set one of them to 0",
    )
    _check(
        (m.compact_multiple == 0 and m.compact_lengths == 0) or m.mode == "batch",
        "model.compact_multiple / compact_lengths > 0 need model.mode='batch' (one gate per "
        "block)",
    )
    if m.implementation == models.LOOP:
        _check(m.compact_multiple == 0 and m.compact_lengths == 0,
               f"model.implementation='loop' runs each stage's kept blocks in one loop, with no "
               f"scan lengths: set model.compact_multiple={m.compact_multiple} and "
               f"model.compact_lengths={m.compact_lengths} to 0")
        _check(m.mode == "batch", f"model.implementation='loop' needs model.mode='batch' (one "
               f"gate per block), got {m.mode!r}")
        _check(rate == 0, f"model.implementation='loop' runs blocks that draw no randomness: "
               f"model.dropout_rate={rate} needs implementation 'skip' or 'mask'")
        _check_loop_stages(m)


def _check_loop_stages(m: ml_collections.ConfigDict) -> None:
    """Refuses implementation='loop' where no stage is scanned: it loops over the blocks
    after each stage's first in scanned stages only and masks the others, so it would
    compute every block (as 'mask') while the run says 'loop'."""
    wide = m.get("name", "cifar_resnet") == "wide_resnet"
    n = (models.WideResNet if wide else models.CifarResNet)(depth=m.depth).blocks_per_stage()
    scan = m.get("scan")
    fix = ("set model.scan=True" if n > 1 else
           f"use model.depth={16 if wide else 14} or more with model.scan=True")
    _check(any(models._scanned_stages((n, n, n), scan)),
           f"model.implementation='loop' loops over the blocks after each stage's first in "
           f"scanned stages, and model.depth={m.depth} ({n} block{'s' * (n > 1)} per stage) with "
           f"model.scan={scan!r} scans none{_scan_rule(scan)}, so every block would compute, "
           f"masked: {fix}, or use implementation 'skip'")


def _scan_rule(scan: bool | None) -> str:
    """Which stages ``model.scan`` scans, as the loop refusal's parenthesis: the rule of the
    value given (``True`` needs 2 blocks a stage, ``None`` 9), not always ``None``'s."""
    if scan is None:
        return f" (None: stages of {models.AUTO_SCAN_MIN_BLOCKS + 1} blocks or more)"
    return " (True: stages of 2 blocks or more)" if scan else ""


def _validate_vit(m: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    _check_choice(m.size, vit.VIT_SIZES, "model.size")
    for field in ("width", "depth", "num_heads"):
        v = m[field]
        _check(v is None or (_integer(v) and v >= 1),
               f"model.{field}={v!r} must be None (from model.size) or an integer >= 1")
    try:
        width, depth, _ = vit.vit_dims(m.size, m.width, m.depth, m.num_heads)
        vit.drop_path_rates(depth, m.drop_path_rate, m.drop_path_rule)
    except ValueError as e:
        _check(False, f"model: {e}")
    _check(_integer(m.patch_size) and m.patch_size >= 1,
           f"model.patch_size={m.patch_size!r} must be an integer >= 1 (CIFAR: 4)")
    _check_choice(m.pool, vit.POOLS, "model.pool")
    _check_layer_scale(m.get("layer_scale_init"), "1e-5 as DINOv2")  # absent: an older run
    _validate_drop_path(m, config)


def _check_layer_scale(value: Any, example: str) -> None:
    """``model.layer_scale_init`` of a ViT or ConvNeXt: None or a number >= 0."""
    _check(value is None or (_finite(value) and value >= 0),
           f"model.layer_scale_init={value!r} must be a number >= 0 ({example}; 0 or None: no "
           f"layer scale)")


# model.name -> how a message names the drop-path model.
_DROP_PATH_NAMES = {"vit": "ViT", "convnext": "ConvNeXt"}

# model.remat of a ViT or ConvNeXt -> the model's remat flag. Absent (a run.json written
# before the field): 'none'.
DROP_PATH_REMAT = {"none": False, "full": True}


def drop_path_remat(m: ml_collections.ConfigDict) -> bool:
    """The ``remat`` flag of the ViT or ConvNeXt that ``model`` block ``m`` describes."""
    return DROP_PATH_REMAT[m.get("remat", "none")]


def _validate_drop_path(m: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    """The drop-path fields shared by the ViT and the ConvNeXt."""
    # Their configs lack the field; a config file that adds it would have it ignored.
    _check(m.get("initialization", "ours") == "ours",
           f"model.initialization={m.get('initialization')!r} applies to the ResNets only "
           f"(model.name 'cifar_resnet', 'wide_resnet'), not to {m.name!r}: remove it")
    _check_choice(m.mode, ops.MODES, "model.mode")
    _check_choice(m.scaling, ops.SCALINGS, "model.scaling")
    _check(m.implementation != models.LOOP,
           f"model.implementation='loop' loops over a ResNet's scanned stages; {m.name!r} "
           f"takes one of {list(implementation.DROP_PATH_IMPLEMENTATIONS)}")
    _check_choice(m.implementation, implementation.DROP_PATH_IMPLEMENTATIONS,
                  "model.implementation")
    _check_dtype(m.dtype)
    remat = m.get("remat", "none")
    _check(isinstance(remat, str) and remat in DROP_PATH_REMAT,
           f"model.remat={remat!r}: a {_DROP_PATH_NAMES.get(m.name, m.name)} takes 'none' "
           f"(keep every activation for the backward pass) or 'full' (recompute each block's "
           f"branches from their input in the backward pass); 'convs' (keep the convolution "
           f"outputs) is the ResNets' only")
    _check(_integer(m.groups) and m.groups >= 1 and config.batch_size % m.groups == 0,
           f"model.groups={m.groups!r} must be an integer >= 1 dividing batch_size="
           f"{config.batch_size} (drop-path subsets are drawn per group; use a multiple of "
           f"the device count)")


def _validate_convnext(m: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    _check_choice(m.size, convnext.CONVNEXT_SIZES, "model.size")
    try:
        depths, _ = convnext.convnext_dims(m.size, m.depths, m.dims)
        vit.drop_path_rates(sum(depths), m.drop_path_rate, m.drop_path_rule)
        convnext.check_stem_stride(m.stem_stride)
    except ValueError as e:
        _check(False, f"model: {e}")
    _check_layer_scale(m.layer_scale_init, "1e-6")
    _validate_drop_path(m, config)


# config.model.name -> validator; training.setup.MODEL_BUILDERS has the same names.
MODEL_VALIDATORS = {
    "cifar_resnet": _validate_resnet,
    "wide_resnet": _validate_resnet,
    "vit": _validate_vit,
    "convnext": _validate_convnext,
}


def _validate_model(config: ml_collections.ConfigDict) -> None:
    name = config.model.get("name", "cifar_resnet")
    _check_choice(name, MODEL_VALIDATORS, "model.name")
    MODEL_VALIDATORS[name](config.model, config)


def _validate_optim(c: ml_collections.ConfigDict) -> None:
    _check_choice(c.optimizer, optim.OPTIMIZERS, "optimizer")
    _check_choice(c.lr_schedule, optim.LR_SCHEDULES, "lr_schedule")
    _check_choice(c.weight_decay_on, optim.WEIGHT_DECAY_MASKS, "weight_decay_on")
    _check(
        _finite(c.learning_rate) and c.learning_rate > 0,
        f"learning_rate={c.learning_rate!r} must be a finite number > 0 (paper: 0.1)",
    )
    _check(_finite(c.momentum) and 0 <= c.momentum < 1, f"momentum={c.momentum!r} must be in [0, 1)")
    _check(
        _finite(c.weight_decay) and c.weight_decay >= 0,
        f"weight_decay={c.weight_decay!r} must be a finite number >= 0",
    )
    _check(_finite(c.lr_decay_factor) and 0 < c.lr_decay_factor <= 1,
           f"lr_decay_factor={c.lr_decay_factor!r} must be in (0, 1]")
    _check(_integer(c.warmup_epochs) and 0 <= c.warmup_epochs < c.num_epochs,
           f"warmup_epochs={c.warmup_epochs!r} must be an integer in [0, num_epochs="
           f"{c.num_epochs!r}); for fewer epochs set --config.warmup_epochs too")
    _check(_finite(c.label_smoothing) and 0.0 <= c.label_smoothing < 1.0,
           f"label_smoothing={c.label_smoothing!r} must be in [0, 1) (DeiT: 0.1)")
    _check(_finite(c.adam_b1) and _finite(c.adam_b2)
           and 0.0 <= c.adam_b1 < 1.0 and 0.0 <= c.adam_b2 < 1.0,
           f"adam_b1={c.adam_b1!r}, adam_b2={c.adam_b2!r} must be in [0, 1)")
    b = c.lr_boundaries_epochs
    _check(
        isinstance(b, (tuple, list))
        and all(_integer(e) and e > 0 for e in b) and list(b) == sorted(set(b)),
        f"lr_boundaries_epochs={b!r} must be increasing positive integers (epochs; () for "
        "none)",
    )
    _check(not c.warmup_epochs or c.lr_schedule != "constant",
           f"warmup_epochs={c.warmup_epochs!r} does nothing with lr_schedule='constant'; set "
           "--config.warmup_epochs=0, or lr_schedule='step' (warm-up at lr / 10)")
    if c.warmup_epochs and c.lr_schedule == "step" and b:
        # Ending at the drop hides it too: the warm-up's lr / 10 would go on as the decayed
        # rate (lr_decay_factor 0.1), and the run would never train at learning_rate.
        _check(c.warmup_epochs < b[0],
               f"warmup_epochs={c.warmup_epochs!r} lasts until the first lr drop "
               f"(lr_boundaries_epochs={tuple(b)!r}): the warm-up would hide it; warm up for "
               f"fewer than {b[0]} epochs")


def unreached_lr_drops(config: ml_collections.ConfigDict) -> str | None:
    """Why some learning-rate drops of a step schedule never happen, or None: a boundary at
    or after ``num_epochs`` (a drop after epoch E starts epoch E + 1). Not an error, as a
    run may be extended later, but a run shortened by ``--config.num_epochs`` alone (the
    CIFAR configs' drops are after epochs 250 and 375) trained at the first rate
    throughout, silently."""
    n, b = config.num_epochs, tuple(config.lr_boundaries_epochs)
    late = [e for e in b if e >= n]
    if config.lr_schedule != "step" or not late:
        return None
    fix = ("--config.lr_boundaries_epochs=() (none)" if n == 1 else
           f"--config.lr_boundaries_epochs to epochs below {n}, or () for none")
    drops = "drops" if len(late) > 1 else "drop"
    return (f"lr_boundaries_epochs={b!r}: the learning-rate {drops} after epoch"
            f"{'s' * (len(late) > 1)} {', '.join(map(str, late))} never happen"
            f"{'s' * (len(late) == 1)} in a run of num_epochs={n} (unless extended later); "
            f"set {fix}.")


def _integer(x: Any) -> bool:
    """Whether ``x`` is an int and not a bool: a config built in Python keeps True in an int
    field (``config.eval_every_steps = True`` evaluated every step; the flags refuse it)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _validate_data(config: ml_collections.ConfigDict) -> None:
    ds = config.dataset
    _check(
        ds in DATASETS or (isinstance(ds, str) and ds.startswith("image_folder:")),
        f'dataset={ds!r}; valid: {list(DATASETS)} or "image_folder:<path>"',
    )
    # Absent from the config of a run recorded before it: normalised per channel.
    _check_choice(config.get("normalization", "channel"), splits.NORMALIZATIONS,
                  "normalization")
    _check_choice(config.get("augment", "auto"), ("auto",) + augment_lib.AUGMENTATIONS,
                  "augment")
    labels = LABELS.get(ds, ("fine",))
    _check(
        config.label in labels,
        f"label={config.label!r} is not available for dataset {ds!r}; valid: {list(labels)}",
    )
    seed = config.seed
    _check(
        _integer(seed) and 0 <= seed < 2**32,
        f"seed={seed!r} must be an integer in [0, 2**32)",
    )
    v = config.validation_size
    _check(
        v is None
        or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
        or (isinstance(v, float) and 0.0 <= v < 1.0),
        f"validation_size={v!r} must be a count >= 0, a fraction in [0, 1) or None (the "
        "paper's split)",
    )
    no_validation = config.train_on_all or v == 0
    without = "train_on_all=True" if config.train_on_all else "validation_size=0"
    by_validation = config.select_best_by == "validation"
    n = config.get("eval_every_steps", 0)
    _check(  # Said before the selection's check, so one line names both fixes.
        not (no_validation and n),
        f"{without} leaves no validation set for eval_every_steps={n} (the validation error "
        f"every {n} steps); set --config.eval_every_steps=0"
        + (' and select_best_by to "test" or "train"' if by_validation else ""),
    )
    _check(
        not (no_validation and by_validation),
        f'{without} leaves no validation set; set select_best_by to "test" or "train"',
    )
    fake = fake_train_size(config)
    if fake and isinstance(v, int):
        _check(
            v < fake,
            f"validation_size={v} must be smaller than {fake_train_fields(ds)}={fake}",
        )
    if fake:
        _check_fake_splits(config)
        _check_fake_batch(config)


def _check_fake_splits(config: ml_collections.ConfigDict) -> None:
    """Fake data writes every split the dataset has (test, and SVHN's extra), and tfds cannot
    write an empty one: refused before any data is written, instead of tfds's traceback."""
    f = config.fake_data
    _check(f.num_test > 0, f"fake_data.num_test={f.num_test}: fake data needs a test split; "
                           "set --config.fake_data.num_test to at least 1 (the smoke "
                           "configs use 64)")
    if config.dataset == "svhn":
        _check(f.num_extra > 0,
               f"fake_data.num_extra={f.num_extra}: fake svhn data needs its extra split "
               "(SVHN trains on train + extra); set --config.fake_data.num_extra to at least "
               "1 (svhn:smoke uses 64)")


def _check_fake_batch(config: ml_collections.ConfigDict) -> None:
    """A batch larger than the fake training set, refused before any data is written (the
    loaded data is checked again: ``check_batch_fits``)."""
    f, v = config.fake_data, config.validation_size
    held = 0
    if config.dataset == "svhn":  # train + extra, less a per-class holdout: a bound
        available, why = f.num_train + f.num_extra, "fake_data.num_train + num_extra"
    elif config.train_on_all:
        available, why = f.num_train, "fake_data.num_train"
    else:
        held = splits.resolve_count(splits.CIFAR_VALIDATION_FRACTION if v is None else v,
                                    f.num_train)
        available = f.num_train - held
        why = f"fake_data.num_train={f.num_train} less validation_size={held}"
    check_batch_fits(config.batch_size, available, f"fake {config.dataset} data ({why})", held)


def check_batch_fits(batch_size: int, num_train: int, what: str, held: int = 0,
                     devices: int = 1) -> None:
    """Refuses a ``batch_size`` larger than the ``num_train`` training examples of ``what``
    (not one full batch an epoch). ``held`` validation images taken from the training data
    are the other way out (a ``:smoke`` config's 32 on a small image folder). ``devices``:
    the mesh's, where known, which split every batch evenly: the size suggested is a
    multiple of them (the one below the data's size failed next, on the devices)."""
    fewer = (f", or hold out fewer than {held} for validation (--config.validation_size)"
             if held else "")
    most = num_train // devices * devices
    if devices == 1:
        fix = f"lower --config.batch_size to at most {num_train}{fewer}"
    elif most:
        fix = (f"lower --config.batch_size to at most {most}, a multiple of the {devices} "
               f"devices that split each batch{fewer}")
    else:
        fix = (f"the {devices} devices that split each batch need at least {devices}: use more "
               f"training data{fewer}")
    _check(batch_size <= num_train,
           f"batch_size={batch_size} is larger than the {num_train} training examples of "
           f"{what}: {fix}")


def _validate_counts(config: ml_collections.ConfigDict) -> None:
    """The integer counts (batch sizes, epochs, intervals)."""
    for field in (
        "batch_size",
        "eval_batch_size",
        "num_epochs",
        "eval_every_epochs",
        "keep_checkpoints",
        "log_every_steps",
    ):
        _check(
            _integer(config[field]) and config[field] >= 1,
            f"{field}={config[field]!r} must be an integer >= 1",
        )
    for field in ("max_steps", "checkpoint_every_epochs", "checkpoint_every_steps",
                  "eval_every_steps"):
        value = config.get(field, 0)  # eval_every_steps: absent from older config files
        _check(
            _integer(value) and value >= 0,
            f"{field}={value!r} must be an integer >= 0",
        )
    for field, n in config.fake_data.items():
        _check(_integer(n) and n >= 0, f"fake_data.{field}={n!r} must be >= 0")


def _check_cache_dir(setting: Any, recorded: bool) -> None:
    """'auto', a path or '' (off); a None-word is refused, as a string field keeps it as
    text: ``--config.compilation_cache_dir=None`` meant off, and cached into ./None. Not in
    a ``recorded`` run.json: the run is evaluated whatever its cache was."""
    _check(isinstance(setting, str),
           f"compilation_cache_dir={setting!r} must be 'auto', a path or '' (off)")
    _check(recorded or setting not in _NONE_WORDS,
           f"compilation_cache_dir={setting!r} would be a directory named {setting!r} in the "
           "current directory; --config.compilation_cache_dir='' turns the cache off (or give "
           f"./{setting} for that directory)")


def validate(config: ml_collections.ConfigDict, *,
             recorded: bool = False) -> ml_collections.ConfigDict:
    """Checks every field; returns ``config`` or raises ``errors.ConfigError`` (a
    ``ValueError``) naming the field, its value and the valid values.

    ``recorded``: ``config`` is a run's ``run.json`` (evaluate.py, the depth analyses, the
    sweep's records), read to use the run as trained, not to train: a precision the trainer
    no longer trains in (``model.dtype='float16'``) is accepted.
    """
    if not isinstance(config, ml_collections.ConfigDict):  # a dict has no attribute access
        raise errors.ConfigError(
            f"The config must be an ml_collections.ConfigDict (configs.load_config), got a "
            f"{type(config).__name__}; build it with load_config(name, overrides).")
    _validate_counts(config)  # First: the other checks compare against them.
    _validate_data(config)
    _validate_model(config)
    if not recorded:
        _check_trainable_dtype(config.model.dtype)
    _validate_optim(config)
    _check_cache_dir(config.compilation_cache_dir, recorded)
    _check_choice(config.init_rng_impl, INIT_RNG_IMPLS, "init_rng_impl")
    _check_choice(config.select_best_by, SELECT_BEST_BY, "select_best_by")
    return config
