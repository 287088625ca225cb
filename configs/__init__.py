"""Experiment configs: ``name[:arg]`` or a path to a config file, plus dotted overrides.

  from configs import load_config
  config = load_config('cifar100:smoke', overrides=['--config.batch_size=64'])

Each module here defines ``get_config(arg=None) -> ml_collections.ConfigDict``; a config
file may list the args it accepts in ``VARIANTS`` (default: ``(None, 'smoke')``). The library
(``stochastic_depth_jax``) does not need this package; ``train.py`` imports it. Only when a
run.json's config lacks a field that the code reads does the library look here, where
``import configs`` finds this package, to tell another version's run.json from a misspelt
field (``training.evaluate.recorded_fields``).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import importlib.util
import os
import pkgutil
import re
import shlex
import traceback
from types import ModuleType
from typing import Iterator, Sequence

import ml_collections

from stochastic_depth_jax import errors
from stochastic_depth_jax.training import config as config_lib

# Every module of this package except ``base`` (shared fields) is a config, so the list
# (``--help``, error messages) cannot drift from the files: name -> module path.
_NOT_CONFIGS = ("base",)
CONFIGS: dict[str, str] = {
    m.name: f"{__name__}.{m.name}"
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)
    if not m.ispkg and not m.name.startswith("_") and m.name not in _NOT_CONFIGS
}
VARIANTS = (None, "smoke")


@contextlib.contextmanager
def _user_file(path: str) -> Iterator[None]:
    """Reports an exception raised by the code of config file ``path`` in one line.

    A syntax error names its line; any other exception names its type, message and the
    file's innermost line in the traceback (``--debug`` keeps the whole traceback, as the
    ``ConfigError`` chains it).
    """
    try:
        yield
    except SyntaxError as e:
        text = f": {e.text.strip()!r}" if e.text and e.text.strip() else ""
        raise errors.ConfigError(
            f"Config file {path!r} has a syntax error at line {e.lineno} ({e.msg}){text}; "
            "fix the file.") from e
    except errors.Error:
        raise
    except Exception as e:  # noqa: BLE001  The user's own code: reported with its location.
        target = os.path.abspath(path)
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
                 if os.path.abspath(f.filename) == target]
        where = f" at line {lines[-1]}" if lines else ""
        raise errors.ConfigError(
            f"Config file {path!r} raised {type(e).__name__}{where}: {e}; fix the file "
            "(--debug shows the traceback).") from e


def _config_module(name: str) -> ModuleType:
    if name in CONFIGS:
        return importlib.import_module(CONFIGS[name])
    if name.endswith(".py"):
        if not os.path.isfile(name):
            raise errors.ConfigError(
                f"Config file {name!r} does not exist; give an existing .py file defining "
                f"get_config, or one of the registered configs {sorted(CONFIGS)}.")
        spec = importlib.util.spec_from_file_location(
            "sd_config_" + os.path.basename(name)[:-3], name
        )
        module = importlib.util.module_from_spec(spec)
        with _user_file(name):
            spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise errors.ConfigError(f"Config file {name!r} defines no get_config(arg=None).")
        return module
    raise errors.ConfigError(
        f"Unknown config {name!r}; valid names: {sorted(CONFIGS)} "
        "(or a path to a .py file defining get_config)."
    )


def _unknown_variant(name: str, arg: str | None, variants: tuple) -> errors.ConfigError:
    """The error for variant ``arg`` (None: none given) of config ``name``, which takes
    ``variants``: "(or none)" only where None is one of them (a config file's ``VARIANTS``
    may require one)."""
    named = [v for v in variants if v is not None]
    if arg is None:
        return errors.ConfigError(f"Config {name!r} needs a variant: give {name}:<variant> "
                                  f"with one of {named}.")
    none = " (or none)" if None in variants else ""
    return errors.ConfigError(
        f"Unknown variant {arg!r} of config {name!r}; valid: {named}{none}.")


def _check_returned(path: str, arg: str | None, config: object) -> None:
    """A config file's ``get_config`` must return a ``ConfigDict``: None (a forgotten
    ``return``) failed in the overrides with AttributeError's traceback, and a dict was
    told to "build it with load_config", which is what ran it."""
    if not isinstance(config, ml_collections.ConfigDict):
        raise errors.ConfigError(
            f"Config file {path!r}: get_config({arg!r}) returned "
            f"{'None' if config is None else 'a ' + type(config).__name__}, not an "
            "ml_collections.ConfigDict; return one (configs/base.py's base_config() is a "
            "start, or ml_collections.ConfigDict(your_dict)).")


def _check_fields(path: str, config: ml_collections.ConfigDict) -> None:
    """A config file's config has every top-level field of ``base.base_config()`` (those
    that runs recorded before the field existed may lack excepted): the trainer reads them,
    and a missing one failed with a KeyError or AttributeError traceback, at validation or
    later in training (``write_plots``)."""
    from configs import base

    optional = set(config_lib.with_absent_defaults({}))
    missing = [k for k in base.base_config() if k not in config and k not in optional]
    if missing:
        raise errors.ConfigError(
            f"Config file {path!r} lacks the field{'s' * (len(missing) > 1)} "
            f"{', '.join(missing)}; start from configs/base.py's base_config(), which has "
            "every field, and set what differs.")


def _missing_field(error: BaseException) -> str | None:
    """The key a ConfigDict's KeyError names (``"'depth'"``; its AttributeError wraps
    one), or None for another error."""
    while (isinstance(error, (KeyError, AttributeError)) and error.args
           and isinstance(error.args[0], BaseException)):
        error = error.args[0]
    if not (isinstance(error, KeyError) and error.args and isinstance(error.args[0], str)):
        return None
    match = re.match(r"'([^'\n]+)'", error.args[0])
    return match.group(1) if match else None


def _check_model_switch(name: str, arg: str | None, config: ml_collections.ConfigDict,
                        overrides: Sequence[str]) -> None:
    """Refuses a ``--config.model.name`` override naming a model whose fields this config's
    model block lacks (``cifar10 --config.model.name=vit``: no ``model.size``), naming
    the flags that train that model on this config's data (:func:`config_for_model`). The
    model block is the model's: that failed with
    an AttributeError traceback (a registered config), or with the new model's first
    missing field, or an 'invalid model.size' naming the other model's sizes (ViT and
    ConvNeXt). 'cifar_resnet' and 'wide_resnet' share their fields: switching passes, also
    in a config file written before some field existed."""
    names = [text for key, text in map(config_lib.split_override, overrides)
             if key == "model.name"]
    before = config.model.get("name", "cifar_resnet") if "model" in config else None
    if not names or before is None or names[-1] == before:
        return
    new, have = names[-1], set(config.model.keys())
    others = {}  # the registered configs' defaults; one that needs a variant is none
    for other in CONFIGS:
        with contextlib.suppress(errors.Error):
            others[other] = load_config(other)
    def fields(model: str) -> set[str] | None:  # of the registered configs of ``model``
        return next((set(c.model.keys()) for c in others.values()
                     if c.model.get("name") == model), None)

    makers = sorted(n for n, c in others.items() if c.model.get("name") == new)
    if not makers or fields(new) == fields(before):  # no such model (validation lists the
        return  # valid names), or one with the same fields (a config file may lack some)
    missing = sorted(fields(new) - have)
    if missing:
        listed = ", ".join(f"model.{f}" for f in missing[:4]) + (
            f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise errors.ConfigError(
            f"--config.model.name={new} does not fit config {name!r}: its model block is for "
            f"model.name={before!r} and lacks {listed}, which {new!r} needs; train {new!r} "
            f"with {config_for_model(name + ':' + (arg or ''), overrides, new)}, or with a "
            f"config file whose model block is for {new!r}.")


# The fields that say what data a run trains on: carried into the config of another model
# that :func:`config_for_model` advises (``svhn:smoke`` as a ViT trains SVHN's fake data).
_DATA_FIELDS = ("dataset", "data_dir", "label", "validation_size", "train_on_all",
                "fake_data.num_train", "fake_data.num_test", "fake_data.num_extra")


def _field(config: ml_collections.ConfigDict, dotted: str) -> object:
    for part in dotted.split("."):
        config = config[part]
    return config


def _model_configs(model: str) -> list[str]:
    """The registered configs whose model is ``model`` (one that needs a variant: none)."""
    names = []
    for name in sorted(CONFIGS):
        with contextlib.suppress(errors.Error):
            if load_config(name).model.get("name", "cifar_resnet") == model:
                names.append(name)
    return names


def config_for_model(spec: str, overrides: Sequence[str], model: str) -> str | None:
    """The ``--config`` flags that train ``model`` as ``spec`` with ``overrides`` asked to
    (``--config.model.name=vit`` on a config whose model block is another's): the registered
    config of ``model`` (of ``spec``'s dataset where there is one) with ``spec``'s variant
    where it has it (``:official_smoke`` as ``:smoke``), the data fields of ``spec`` that
    differ from its own, and the overrides but ``model.name``: ``'--config
    cifar10_vit:smoke --config.dataset=svhn --config.fake_data.num_extra=64'`` for
    ``svhn:smoke``; None where no registered config trains ``model``. The flags are checked
    to load; an override that config has no field for, or that it is refused with, is left
    out and named with why (``--config.num_epochs=1`` where the ConvNeXt warms up for an
    epoch): the advice dropped every override silently where one did not fit."""
    makers = _model_configs(model)
    if not makers:
        return None
    asked = []  # ``(item, key)``: the overrides but the model's name
    for item in overrides:
        with contextlib.suppress(errors.Error):
            key = config_lib.split_override(item)[0]
            if key != "model.name":
                asked.append((item, key))
    try:  # the data asked for: the model block's overrides are the other model's
        given = load_config(spec, [i for i, k in asked if not k.startswith("model.")])
    except Exception:  # noqa: BLE001  the user's config: a mistake in it is said later
        given = None
    if given is not None:  # its dataset's config first: cifar100 for a cifar100 ResNet
        makers.sort(key=lambda n: load_config(n).dataset != given.dataset)
    name, _, arg = spec.partition(":")
    variants = tuple(getattr(_config_module(makers[0]), "VARIANTS", VARIANTS))
    if arg not in variants:
        arg = "smoke" if arg and "smoke" in arg and "smoke" in variants else ""
    target = f"{makers[0]}:{arg}" if arg else makers[0]
    default = load_config(target)
    kept, no_field = [], []
    for item, key in asked:
        try:
            _field(default, key)
            kept.append(item)
        except (KeyError, AttributeError):
            no_field.append(item)
    data = []
    if given is not None:
        try:
            own = load_config(target, kept)
        except Exception:  # noqa: BLE001  an override that does not fit it: left out below
            own = default
        for field in _DATA_FIELDS:
            with contextlib.suppress(KeyError, AttributeError):
                value = _field(given, field)
                if value != _field(own, field):
                    data.append(f"--config.{field}={'None' if value is None else value}")
    flags, refused = _loading_flags(target, kept, data)
    left = []
    if no_field:
        left.append(f"{', '.join(no_field)}: {target} has no such field")
    left += [f"{item}: {target} refuses it ({why})" for item, why in refused]
    words = " ".join(shlex.quote(a) for a in ["--config", target, *flags])
    return words + (f" (left out: {'; '.join(left)})" if left else "")


def _loading_flags(target: str, kept: list[str], data: list[str]
                   ) -> tuple[list[str], list[tuple[str, str]]]:
    """The flags of ``kept`` and ``data`` that ``target`` loads with, and each override of
    ``kept`` left out with the first line of the error it was refused with. One at a time:
    the one whose leaving out lets the rest load, else one refused on its own, else the
    last; ``data`` is left out where ``kept`` loads without it alone."""
    def error(flags: list[str]) -> str | None:
        try:
            load_config(target, flags)
        except Exception as e:  # noqa: BLE001  the user's value: said with the advice
            return str(e).splitlines()[0].rstrip(".")
        return None

    flags, refused = list(kept), []
    while (why := error(flags + data)) is not None:
        if error(flags) is None:
            return flags, refused
        rest = [flags[:i] + flags[i + 1:] for i in range(len(flags))]
        i = next((i for i, r in enumerate(rest) if error(r + data) is None), None)
        if i is None:
            alone = [error([item]) for item in flags]
            i = next((i for i, e in enumerate(alone) if e is not None), len(flags) - 1)
            why = alone[i] or why
        refused.append((flags.pop(i), why))
    return flags + data, refused


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Builds, overrides and validates a config.

    Args:
      spec: ``'cifar100'``, ``'cifar100:smoke'`` or ``'path/to/file.py[:arg]'``.
      overrides: ``'--config.a.b=value'`` (or ``'a.b=value'``) strings, applied in order.

    Returns:
      The validated ``ConfigDict``.

    Raises:
      ValueError: on an unknown config, variant, field or an invalid value; the message lists
        the valid choices.
    """
    name, _, arg = spec.partition(":")
    arg = arg or None
    if name not in CONFIGS:  # '--config=~/exp.py': the shell expands no '~' after '='
        name = os.path.expanduser(name)
    module = _config_module(name)
    variants = tuple(getattr(module, "VARIANTS", VARIANTS))  # A file may declare its own.
    if arg not in variants:
        raise _unknown_variant(name, arg, variants)
    if name in CONFIGS:
        config = module.get_config(arg)
    else:
        with _user_file(name):
            config = module.get_config(arg)
        _check_returned(name, arg, config)
        _check_fields(name, config)
    _check_model_switch(name, arg, config, overrides)
    config_lib.apply_overrides(config, overrides)
    try:
        config_lib.validate(config)
    except (KeyError, AttributeError) as e:  # a model field a config file lacks
        field = _missing_field(e)
        if name in CONFIGS or field is None:
            raise
        raise errors.ConfigError(
            f"Config file {name!r} has no field {field!r} (model.{field}?), which its model "
            "needs; start from the model block of a config in configs/ for that model.") from e
    return config


def _config_fields() -> set[str]:
    """The dotted field names of every registered config (``seed``, ``model.depth``): a flag
    named as one (``--seed=1``) is an override whose ``--config.`` prefix was forgotten.
    Read only for such a usage error; a config that fails to load adds none."""
    fields: set[str] = set()
    for name in CONFIGS:
        with contextlib.suppress(Exception):
            fields.update(config_lib.field_names(load_config(name)))
    return fields


def _did_you_mean(parser: argparse.ArgumentParser, item: str) -> str:
    """``'; did you mean --workdir?'`` for a misspelt flag of ``parser`` (``--work_dir``) or
    a misspelt ``--config.`` prefix (``--confg.seed=1``: ``--config.seed=1``); else ''."""
    flag, sep, value = item.partition("=")
    prefix, dot, field = flag.partition(".")
    if dot and field and difflib.get_close_matches(prefix, ["--config"], cutoff=0.75):
        return f"; did you mean --config.{field}{sep}{value}?"
    name = flag.lstrip("-").replace("-", "_")  # '--seed=1', '--batch-size', '--model.depth'
    if flag.startswith("--") and name in _config_fields():
        return f"; did you mean --config.{name}{sep}{value}?"
    options = [o for o in parser._option_string_actions if o.startswith("--")]
    close = difflib.get_close_matches(flag, options, n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


def parse_overrides(parser: argparse.ArgumentParser, rest: Sequence[str]) -> list[str]:
    """The ``--config.<field>=<value>`` overrides among ``rest``, the arguments that
    ``parser.parse_known_args`` left; any other argument is a usage error of ``parser``.

    ``--config.a.b value`` is read as ``--config.a.b=value``, as argparse reads ``--flag
    value``, unless the next argument starts with ``--`` (another flag, not a value: joined,
    ``--config.data_dir --config.seed=1`` would set data_dir to the text of the seed
    override). What an override means is :func:`config_lib.split_override`'s to say.
    """
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        joined = "=" not in item and i + 1 < len(rest) and not rest[i + 1].startswith("--")
        if not item.startswith("--config."):  # '--seed 1': did you mean --config.seed=1?
            meant = f"{item}={rest[i + 1]}" if joined else item
            parser.error(f"unrecognised argument {item!r} (overrides look like "
                         f"--config.<field>=<value>){_did_you_mean(parser, meant)}")
        if joined:
            item, i = f"{item}={rest[i + 1]}", i + 1
        overrides.append(item)
        i += 1
    return overrides
