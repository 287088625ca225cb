"""Depth on demand: remove residual blocks of a trained model at test time.

A network trained with stochastic depth is an implicit ensemble of its sub-networks
(Huang et al., 2016, Sec. 3), so blocks can be removed after training at a small cost in
accuracy, as LayerDrop (Fan et al., 2019) showed for transformers. This module:

* orders the blocks for removal by a named rule (:data:`ORDERS`): ``'survival'`` (lowest
  survival probability first, ties deepest first: the deepest blocks of a linear-decay net),
  ``'greedy'`` (each time the block whose removal costs the least validation error) or
  ``'list'`` (your order);
* evaluates the model with blocks removed (:class:`SubNetworkEvaluator`; the remaining blocks
  keep their evaluation scaling, p_l f for ``scaling='test'``) and draws the curve of blocks
  kept vs error vs measured throughput (:func:`depth_curve`);
* exports a pruned model (:func:`prune`): a model definition with the blocks deleted
  (``keep=...``) and a smaller parameter tree, saved with Orbax and loadable on its own
  (:func:`save_pruned`, :func:`load_pruned`);
* evaluates the Monte-Carlo ensemble of k sampled sub-networks against the deterministic
  scaled network (:func:`mc_evaluate`).

Batches are given as a callable returning a fresh iterable of ``(images [B, H, W, C] float,
labels int32 [B], mask bool [B])`` (padded examples have mask False), e.g.
``lambda: data.eval_batches(split, batch_size=500, mean=m, std=s)``.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stochastic_depth_jax import errors
from stochastic_depth_jax import models, ops
from stochastic_depth_jax.training import state as state_lib

__all__ = [
    "ORDERS",
    "MODEL_CLASSES",
    "removal_order",
    "survival_order",
    "greedy_order",
    "list_order",
    "keep_mask",
    "SubNetworkEvaluator",
    "prune",
    "param_count",
    "save_pruned",
    "load_pruned",
    "check_export_directory",
    "throughput",
    "depth_curve",
    "mc_evaluate",
]

Batches = Callable[[], Iterable[tuple[Any, Any, Any]]]
MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"

# Model classes a saved pruned model may name (load_pruned rebuilds the definition from it).
MODEL_CLASSES: dict[str, type] = {
    "CifarResNet": models.CifarResNet,
    "WideResNet": models.WideResNet,
    "ResNet": models.ResNet,
}


def _require_blockwise(model: Any) -> None:
    """Refuses models without block-wise survival probabilities (the ViT, the ConvNeXt)."""
    if not all(hasattr(type(model), m) for m in ("num_blocks", "survival_probs", "kept_blocks")):
        raise errors.ConfigError(
            f"Depth on demand needs a model with block-wise stochastic depth "
            f"({', '.join(sorted(MODEL_CLASSES))}); got a {type(model).__name__}.")


def _host_scalar(value: Any) -> Any:
    """A 0-d NumPy or JAX array (``jnp.argmin``'s result, an element of an index array) as
    the Python number it holds, so that it is checked as one; anything else as it is."""
    if hasattr(value, "__array__") and np.ndim(value) == 0:
        return np.asarray(value).item()
    return value


def _not_block_indices(values: Iterable[Any], num_blocks: int) -> list[Any]:
    """The entries of ``values`` that are not 0-based block indices in ``[0, num_blocks)``:
    a bool, a float (2.5, or 3.0) or a number out of range (a NumPy or 0-d JAX integer is the
    index it holds). :func:`keep_mask` and :func:`list_order` refuse them."""
    return [v for v in values if isinstance(v, (bool, np.bool_))
            or not isinstance(v, (int, np.integer)) or not 0 <= v < num_blocks]


def keep_mask(num_blocks: int, removed: Iterable[int]) -> np.ndarray:
    """bool ``[num_blocks]``, False at the (0-based) block indices in ``removed``.

    The ``keep`` that :func:`prune` takes, e.g. ``keep_mask(model.num_blocks(), [53, 52])``.
    Indices are checked, not wrapped: a negative or too large index (often a 1-based block
    number) is a ValueError naming it, as :func:`list_order` refuses it; so is an index given
    twice (the mask would remove one block fewer than the list names).
    """
    num_blocks = _host_scalar(num_blocks)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)) \
            or num_blocks < 1:
        raise ValueError(f"keep_mask's num_blocks is the full model's block count, a positive "
                         f"integer (model.num_blocks()), got {num_blocks!r}.")
    L = int(num_blocks)
    if hasattr(removed, "__array__"):  # a NumPy or JAX array: its values as Python scalars
        removed = np.asarray(removed).reshape(-1).tolist()
    removed = [removed] if isinstance(removed, (int, np.integer)) else list(removed)
    removed = [_host_scalar(r) for r in removed]  # e.g. a list of jnp.argmin results
    bad = _not_block_indices(removed, L)
    if bad:
        raise ValueError(f"keep_mask's removed blocks must be 0-based integer indices in "
                         f"[0, {L}), got {bad}; e.g. keep_mask({L}, [{L - 1}]) removes the "
                         f"last block.")
    repeated = sorted({int(r) for r in removed if removed.count(r) > 1})
    if repeated:  # one fewer block removed than listed: a list recorded with it mislabels
        raise ValueError(f"keep_mask's removed blocks must be distinct, got {repeated} more "
                         f"than once in {[int(r) for r in removed]}; name each block once.")
    keep = np.ones(L, bool)
    keep[np.asarray(removed, int)] = False
    return keep


# ---- removal orders ------------------------------------------------------------------------

def _present(model: Any) -> list[int]:
    """The 0-based indices of the blocks ``model`` has: all L, or a pruned model's kept ones
    (its deleted blocks are not there to remove again)."""
    return [int(l) for l in np.flatnonzero(model.kept_blocks())]


def survival_order(model: Any) -> list[int]:
    """Blocks by survival probability, lowest first; ties (uniform rule) deepest first.

    Under the paper's linear decay this removes the deepest block first, the intuition of
    Sec. 3: the blocks trained to be dropped most often are the ones the net needs least.
    A pruned model's order holds the blocks it has (indices over the full model).
    """
    _require_blockwise(model)
    probs = model.survival_probs()
    return sorted(_present(model), key=lambda l: (probs[l], -l))


def list_order(model: Any, blocks: Sequence[int]) -> list[int]:
    """The user's order, checked: distinct 0-based block indices in ``[0, L)``."""
    _require_blockwise(model)
    L = model.num_blocks()
    blocks = [_host_scalar(b) for b in blocks]  # 2.5 or True is refused, not read as 2 or 1
    bad = _not_block_indices(blocks, L)
    blocks = blocks if bad else [int(b) for b in blocks]  # NumPy integers as Python ints
    if bad or len(set(blocks)) != len(blocks):
        problem = f"must be distinct indices in [0, {L}) (0-based, L = {L} blocks), got {blocks}"
        raise errors.ConfigError(
            f"blocks {problem}; e.g. blocks=[{L - 1}, {L - 2}].",
            command_line=f"--blocks {problem}; e.g. --blocks {L - 1},{L - 2}.")
    deleted = [b for b in blocks if b not in _present(model)]
    if deleted:  # removing one again changes nothing: a curve's point would repeat
        raise errors.ConfigError(
            f"blocks {deleted} are already deleted from this pruned model; it has blocks "
            f"{_present(model)}.")
    return blocks


def greedy_order(model: Any, error_of: Callable[[np.ndarray], float],
                 max_removed: int | None = None,
                 on_step: Callable[[list[int], float], None] | None = None) -> list[int]:
    """Greedy by validation error: each step removes the block whose removal (given those
    already removed) gives the lowest ``error_of(keep)``; ties go to the deeper block.

    ``error_of`` maps a bool ``[L]`` keep mask to an error (e.g. a
    :class:`SubNetworkEvaluator` on the validation split). Costs about L^2 / 2 evaluations
    (``max_removed`` stops early). ``on_step(order, error)``, if given, is called after
    each removal with the order so far and its error (progress: the search is long).
    """
    _require_blockwise(model)
    L, present = model.num_blocks(), _present(model)  # a pruned model: the blocks it has
    order: list[int] = []
    limit = len(present) if max_removed is None else min(len(present), max_removed)
    while len(order) < limit:
        candidates = [l for l in reversed(present) if l not in order]
        errors = [error_of(keep_mask(L, order + [l])) for l in candidates]
        order.append(candidates[int(np.argmin(errors))])
        if on_step is not None:
            on_step(list(order), float(min(errors)))
    return order


ORDERS = ("survival", "greedy", "list")


def removal_order(rule: str, model: Any, *, blocks: Sequence[int] | None = None,
                  error_of: Callable[[np.ndarray], float] | None = None,
                  on_step: Callable[[list[int], float], None] | None = None,
                  max_removed: int | None = None) -> list[int]:
    """The order in which to remove blocks under ``rule`` (one of :data:`ORDERS`).

    ``'list'`` needs ``blocks``; ``'greedy'`` needs ``error_of``, reports each removal
    to ``on_step`` and stops after ``max_removed`` removals where given (see
    :func:`greedy_order`; the other orders cost nothing and are given whole).
    """
    if rule == "survival":
        return survival_order(model)
    if rule == "list":
        if not blocks:
            raise errors.ConfigError(
                "order 'list' needs the blocks to remove, in order (e.g. blocks=[8, 7, 6]; "
                "0-based).",
                command_line="order 'list' needs the blocks to remove, in order (e.g. --blocks "
                             "8,7,6; 0-based).")
        return list_order(model, blocks)
    if rule == "greedy":
        if error_of is None:
            raise errors.ConfigError("order 'greedy' needs error_of(keep) -> validation error.")
        return greedy_order(model, error_of, max_removed=max_removed, on_step=on_step)
    raise errors.ConfigError(f"Unknown removal order {rule!r}; valid: {list(ORDERS)}.")


# ---- evaluating sub-networks ---------------------------------------------------------------

def _sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 ``[3]``: summed loss, errors and count over the unmasked examples."""
    logits = logits.astype(jnp.float32)
    w = mask.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    errors = (jnp.argmax(logits, -1) != labels).astype(jnp.float32)
    return jnp.stack([jnp.sum(loss * w), jnp.sum(errors * w), jnp.sum(w)])


def _host(x: jax.Array) -> np.ndarray:
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def _metrics(total: np.ndarray) -> dict[str, float]:
    loss, errors, count = (float(v) for v in total)
    return {"error": errors / count, "loss": loss / count, "count": int(count)}


def _apply_sums(model: Any, variables: Any, images: jax.Array, labels: jax.Array,
                mask: jax.Array, gates: jax.Array | None) -> jax.Array:
    logits = model.apply(variables, images, train=False, gates=gates)
    return _sums(logits, labels, mask)


@functools.lru_cache(maxsize=8)
def _shared_gated_sums(model: Any) -> Any:
    return jax.jit(functools.partial(_apply_sums, model))


def _gated_sums(model: Any) -> Any:
    """The jitted ``(variables, images, labels, mask, gates) -> sums`` of ``model``, one per
    model (Flax modules compare by their fields): the evaluators of a depth curve's splits
    share its compilations, where each compiled the same programs again. A model with an
    unhashable field gets its own."""
    try:
        return _shared_gated_sums(model)
    except TypeError:
        return jax.jit(functools.partial(_apply_sums, model))


class SubNetworkEvaluator:
    """Error of the model with some blocks removed, over every example of ``batches``.

    One compilation serves every keep mask that removes a block: the mask enters as gates of
    the full model at evaluation (``train=False, gates=keep``), so a removed block is skipped
    by ``lax.cond`` (implementation 'skip'; 'mask' and ``mode='sample'`` models compute it
    and multiply it by 0: the same numbers where it is finite) and the kept ones run scaled
    as at evaluation. A mask keeping every block runs the model as evaluated (no gates; a
    second compilation): the gated program rounds otherwise (~1e-6), so its figures could
    differ from the model's own by an example or two.
    ``evaluator(keep)`` returns ``{'error', 'loss', 'count'}``; results are cached per mask.
    """

    def __init__(self, model: Any, variables: Any, batches: Batches):
        _require_blockwise(model)  # Else the first call fails deep in apply ('gates').
        self.model, self.variables, self._batches = model, variables, batches
        self._cache: dict[tuple[bool, ...], dict[str, float]] = {}
        self._sums = _gated_sums(model)

    def __call__(self, keep: Sequence[bool]) -> dict[str, float]:
        key = tuple(bool(k) for k in keep)
        L = self.model.num_blocks()
        if len(key) != L:  # else an all-True mask of another length ran the model as is
            raise ValueError(f"keep has one entry per block of the full model ({L}), got "
                             f"{len(key)}; e.g. pruning.keep_mask({L}, removed).")
        if key not in self._cache:
            gates = None if all(key) else jnp.asarray(key)  # all kept: the model itself
            total = jnp.zeros(3, jnp.float32)
            for images, labels, mask in self._batches():
                total = total + self._sums(self.variables, images, labels, mask, gates)
            self._cache[key] = _metrics(_host(total))
        return self._cache[key]

    def error(self, keep: Sequence[bool]) -> float:
        """Just the error, e.g. as ``error_of`` for :func:`greedy_order`."""
        return self(keep)["error"]


# ---- the pruned model ----------------------------------------------------------------------

def param_count(variables: Any) -> int:
    """Number of parameters in ``variables['params']`` (or in a bare parameter tree)."""
    tree = variables.get("params", variables) if isinstance(variables, dict) else variables
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


def _sample_input(variables: Any) -> jax.ShapeDtypeStruct:
    channels = _take(variables, ("params", "stem_conv", "kernel"), {}).shape[2]
    return jax.ShapeDtypeStruct((1, 32, 32, channels), jnp.float32)


def _scan_indices(model: Any, keep: np.ndarray) -> dict[str, np.ndarray]:
    """``'stage<i>_scan'`` -> indices, into ``model``'s stacked scan axis, of the blocks
    ``keep`` retains (``model`` may itself be pruned already)."""
    old, out, start = model.kept_blocks(), {}, 0
    for i, n in enumerate(model.stage_sizes_()):
        rest_old = np.flatnonzero(old[start + 1:start + n])
        rest_new = np.flatnonzero(keep[start + 1:start + n])
        out[f"stage{i + 1}_scan"] = np.searchsorted(rest_old, rest_new)
        start += n
    return out


def _take(tree: Any, path: tuple, scans: dict[str, np.ndarray]) -> Any:
    """The leaf of ``tree`` (the full model's variables) at ``path`` (keys, or names), the
    blocks a pruned scan keeps taken from a stacked one. A ValueError naming the path where
    ``tree`` has none: variables without ``'batch_stats'`` (or a bare parameter tree, or
    another model's) failed with a ``KeyError`` of one name."""
    node, index = tree, None
    for key in path:
        name = getattr(key, "key", key)
        if name in scans:
            index = scans[name]
        try:
            node = node[name]
        except (KeyError, TypeError, IndexError):
            where = "".join(f"[{k!r}]" for k in (getattr(k, "key", k) for k in path))
            raise ValueError(
                f"prune found no variables{where} in the variables given, which the model "
                f"needs; pass the full model's variables as model.init returns them, "
                f"{{'params': ..., 'batch_stats': ...}} (not the parameters alone, nor "
                f"another model's).") from None
    return node if index is None else jnp.asarray(node)[index]


def prune(model: Any, variables: Any, keep: Sequence[bool]) -> tuple[Any, Any]:
    """The model with blocks deleted, and its (smaller) variables taken from ``variables``.

    Args:
      model: a trained :class:`CifarResNet`, :class:`WideResNet` or :class:`ResNet`.
      variables: its ``{'params', 'batch_stats'}``.
      keep: bool ``[L]``; False blocks are deleted (indices over the full model).

    Returns:
      ``(pruned_model, pruned_variables)``: ``pruned_model = model.clone(keep=keep)`` has
      no parameters and no compute for deleted blocks, and computes exactly what ``model``
      computes at evaluation with ``gates=keep``.
    """
    _require_blockwise(model)
    keep = np.asarray(keep, bool)
    L = model.num_blocks()
    if keep.shape != (L,):
        raise ValueError(f"prune's keep has one entry per block of the full model ({L}; a "
                         f"pruned model's deleted blocks too), got shape {keep.shape}; e.g. "
                         f"pruning.keep_mask({L}, removed).")
    keep = keep & model.kept_blocks()  # a pruned model prunes further
    pruned = model.clone(keep=tuple(bool(k) for k in keep))
    x = _sample_input(variables)
    abstract = jax.eval_shape(lambda x: pruned.init({"params": jax.random.key(0)}, x, train=False),
                              x)
    scans = _scan_indices(model, keep)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    values = []
    for path, leaf in leaves:
        value = _take(variables, path, scans)
        if tuple(value.shape) != tuple(leaf.shape):
            raise ValueError(f"{jax.tree_util.keystr(path)}: expected {leaf.shape} for the "
                             f"pruned model, got {value.shape}; are these the model's variables?")
        values.append(value)
    return pruned, jax.tree_util.tree_unflatten(treedef, values)


def _definition(model: Any) -> dict[str, Any]:
    """JSON-able constructor fields of ``model`` (refuses custom conv/norm modules)."""
    cls = type(model)
    name = next((k for k, v in MODEL_CLASSES.items() if v is cls), None)
    if name is None:
        raise ValueError(f"Cannot save a {cls.__name__}; savable: {sorted(MODEL_CLASSES)}.")
    fields = {}
    for field in model.__dataclass_fields__:
        if field in ("parent", "name"):
            continue
        value = getattr(model, field)
        if field in ("conv", "norm"):
            if value is not cls.__dataclass_fields__[field].default:
                raise ValueError(f"Cannot save a model with a custom {field} module; only "
                                 "the defaults can be rebuilt by load_pruned.")
            continue
        if field == "dtype":
            value = None if value is None else jnp.dtype(value).name
        elif isinstance(value, tuple):
            value = list(value)
        fields[field] = value
    return {"class": name, "fields": fields}


def _from_definition(definition: dict[str, Any]) -> Any:
    fields = dict(definition["fields"])
    if fields.get("dtype") is not None:
        fields["dtype"] = jnp.dtype(fields["dtype"])
    for key in ("keep", "stage_sizes"):
        if fields.get(key) is not None:
            fields[key] = tuple(fields[key])
    return MODEL_CLASSES[definition["class"]](**fields)


def check_export_directory(directory: str) -> None:
    """Refuses to save into ``directory`` unless it is new or empty.

    An export never overwrites or mixes with other files (an earlier export, a run's
    checkpoints): whatever is there stays untouched.

    Raises:
      errors.WorkdirError: ``directory`` is a file or a non-empty directory.
    """
    if os.path.isdir(directory):
        entries = sorted(os.listdir(directory))
        if entries:
            raise errors.WorkdirError(
                f"Export directory {directory} is not empty (holds {len(entries)} entries, "
                f"e.g. {entries[0]!r}); choose a new or empty directory. Nothing was written.")
    elif os.path.lexists(directory):
        raise errors.WorkdirError(
            f"Export directory {directory} is a file; choose a new or empty directory.")


def save_pruned(directory: str, model: Any, variables: Any,
                metadata: dict[str, Any] | None = None, *, mean: Any = None,
                std: Any = None) -> str:
    """Saves a (pruned) model: ``model.json`` (its definition) and Orbax ``variables/``.

    ``directory`` must be new or empty (:func:`check_export_directory`). ``metadata``
    (e.g. the source run and the removed blocks; JSON values, NumPy and JAX ones stored as lists
    and numbers) is stored in ``model.json``; so are the
    input normalisation ``mean`` and ``std`` (float ``[C]`` each, or a mean image
    ``[H, W, C]`` and a scalar std (``normalization='pixel'``); pixel units 0-255: the model
    expects ``(pixels - mean) / std``) when given, in their shapes. Returns ``directory``.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.path.expanduser(directory))  # '~/pruned' too
    check_export_directory(directory)
    if (mean is None) != (std is None):
        raise errors.ConfigError("save_pruned needs both mean and std, or neither.")
    # The bits of the variables saved beside this definition: load_pruned refuses others
    # (another export's of the same shapes, which keeps other blocks, ran silently wrong).
    record = {**_definition(model), "metadata": metadata or {},
              "num_params": param_count(variables),
              "variables_checksum": _loaded_checksum(model, variables)}
    if mean is not None:
        # As run.json records them: [C] lists, or a mean image [H][W][C] and one std.
        record["input"] = {"mean": np.asarray(mean).tolist(),
                           "std": np.asarray(std).tolist(),
                           "normalised": "(pixels - mean) / std, pixels in [0, 255]"}
    text = _record_json(record)  # before anything is written: a refusal leaves nothing
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, VARIABLES_DIR), variables)
    with open(os.path.join(directory, MODEL_FILE), "w") as f:
        f.write(text)
    return directory


def _record_json(record: dict[str, Any]) -> str:
    """``record`` as ``model.json``'s text; NumPy and JAX values (a keep mask, an error
    computed with ``jnp``) as JSON lists and numbers.

    Raises:
      errors.ConfigError: the metadata holds something else JSON cannot hold (a traced
        value, an array spread over other hosts).
    """
    def plain(value: Any) -> Any:
        if isinstance(value, jax.Array) and ops.is_concrete(value):
            value = np.asarray(value)
        if isinstance(value, (np.ndarray, np.generic)):
            return value.tolist()
        raise TypeError(f"a value of type {type(value).__name__}")

    try:
        return json.dumps(record, indent=2, default=plain)
    except (TypeError, ValueError) as e:
        raise errors.ConfigError(
            f"save_pruned's metadata must be JSON-serialisable (numbers, strings, lists, "
            f"dicts with string keys, NumPy or local JAX arrays); {e}. Nothing was "
            "written.") from None


def load_pruned(directory: str) -> tuple[Any, Any, dict[str, Any]]:
    """Loads what :func:`save_pruned` wrote: ``(model, variables, metadata)``.

    Runs on its own: ``model.apply(variables, (pixels - mean) / std, train=False)`` with
    ``mean, std = np.float32(metadata['input']['mean']), np.float32(metadata['input']['std'])``
    (``[C]`` each, or ``[H, W, C]`` and a scalar; pixel units; ``evaluate.py --export``
    records them). ``'input'`` is absent from
    exports saved without them (older exports load as before).
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.path.expanduser(directory))  # '~/pruned' too
    path = os.path.join(directory, MODEL_FILE)
    if not os.path.exists(path):
        raise errors.CheckpointError(f"{path} not found: is {directory!r} a directory written by "
                                "save_pruned (evaluate.py --export)?")
    with open(path) as f:
        record = json.load(f)
    model = _from_definition(record)
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(os.path.join(directory, VARIABLES_DIR))
        tree = getattr(meta, "item_metadata", meta)
        abstract = _abstract_variables(model, tree)
        variables = ckptr.restore(os.path.join(directory, VARIABLES_DIR), abstract)
    _check_saved_together(directory, record, model, variables)
    metadata = dict(record.get("metadata", {}))
    if "input" in record:
        metadata["input"] = record["input"]
    return model, variables, metadata


def _abstract_variables(model: Any, tree: Any) -> Any:
    """The shapes and dtypes :func:`load_pruned` restores ``model``'s variables as (its
    own: saved ones of another dtype are cast), ``tree`` the saved ones or their
    metadata (for the input channels)."""
    channels = tree["params"]["stem_conv"]["kernel"].shape[2]
    x = jax.ShapeDtypeStruct((1, 32, 32, channels), jnp.float32)
    return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x, train=False),
                          x)


def _loaded_checksum(model: Any, variables: Any) -> int:
    """The checksum of ``variables`` as :func:`load_pruned` will restore them: cast to the
    model's dtypes (bfloat16 variables saved load as float32; their own bits' checksum
    refused every such export). Variables not of the model's structure (which no load
    restores) are summed as they are."""
    try:
        abstract = _abstract_variables(model, variables)
        loaded = jax.tree.map(lambda a, s: jnp.asarray(a).astype(s.dtype), variables, abstract)
    except (KeyError, TypeError, ValueError):
        loaded = variables
    return state_lib.checksum(loaded)


def _check_saved_together(directory: str, record: dict[str, Any], model: Any,
                          variables: Any) -> None:
    """Refuses variables other than those saved with ``model.json``'s definition.

    Variables of the same shapes fit any definition keeping as many blocks per scanned
    stage: those of an export keeping other blocks ran silently with this one's survival
    probabilities and block order (another network's outputs). Exports saved before the
    checksum was recorded load as before."""
    if "variables_checksum" not in record:
        return
    if state_lib.checksum(variables) != int(record["variables_checksum"]):
        kept = [int(i) for i in np.flatnonzero(model.kept_blocks())]
        raise errors.CheckpointError(
            f"{os.path.join(directory, VARIABLES_DIR)} does not hold the variables saved "
            f"with {os.path.join(directory, MODEL_FILE)} (which keeps blocks {kept}): another "
            "export's (other blocks kept?) or damaged; copy an export's model.json and "
            "variables/ together, or export again.")


# ---- throughput and the curve --------------------------------------------------------------

def throughput(model: Any, variables: Any, image_shape: Sequence[int], *, batch_size: int = 128,
               repeats: int = 5) -> dict[str, float]:
    """Inference images/s of ``model.apply(variables, x, train=False)`` on the default device.

    Compiles and warms up first; reports the median and spread over ``repeats`` timed
    calls of one batch ``[batch_size, *image_shape]``.
    """
    device = jax.devices()[0]  # one device, whatever the variables' sharding
    variables = jax.device_put(variables, device)
    x = jax.device_put(jnp.zeros((batch_size, *image_shape), jnp.float32), device)
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    jax.block_until_ready(fn(variables, x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(variables, x))
        times.append(time.perf_counter() - t0)
    times = np.asarray(times)
    return {"images_per_s": float(batch_size / np.median(times)),
            "seconds_median": float(np.median(times)), "seconds_min": float(times.min()),
            "seconds_max": float(times.max()), "batch_size": batch_size, "repeats": repeats}


def depth_curve(model: Any, variables: Any, order: Sequence[int], *,
                evaluators: dict[str, SubNetworkEvaluator], image_shape: Sequence[int],
                throughput_batch: int = 128, repeats: int = 5, measure_every: int = 1,
                on_point: Callable[[dict[str, Any]], None] | None = None
                ) -> list[dict[str, Any]]:
    """Error on each split and measured throughput as blocks are removed in ``order``.

    Point k (k = 0..len(order)) removes ``order[:k]``. Errors come from the full model with
    those blocks gated off (``evaluators``: split name -> :class:`SubNetworkEvaluator`);
    throughput and parameter count come from the exported pruned model (:func:`prune`),
    the thing one would deploy, every ``measure_every`` points and at both ends.
    ``on_point(point)``, if given, is called with each point as it is done (progress: a
    deep model's curve takes minutes).

    Returns:
      one dict per point: ``blocks_kept``, ``removed`` (0-based indices), ``<split>_error``,
      ``<split>_loss``, and where measured ``num_params``, ``images_per_s`` and
      ``throughput_s_min_max`` (fastest and slowest timed batch).
    """
    _require_blockwise(model)
    L = model.num_blocks()
    points = []
    for k in range(len(order) + 1):
        keep = keep_mask(L, order[:k])
        kept = int((keep & model.kept_blocks()).sum())  # a pruned model's deleted ones not
        point: dict[str, Any] = {"blocks_kept": kept, "removed": list(order[:k])}
        for name, evaluate in evaluators.items():
            result = evaluate(keep)
            point[f"{name}_error"], point[f"{name}_loss"] = result["error"], result["loss"]
        if k % measure_every == 0 or k == len(order):
            pruned, pvars = prune(model, variables, keep)
            point["num_params"] = param_count(pvars)
            speed = throughput(pruned, pvars, image_shape, batch_size=throughput_batch,
                               repeats=repeats)
            point["images_per_s"] = speed["images_per_s"]
            point["throughput_s_min_max"] = [speed["seconds_min"], speed["seconds_max"]]
        points.append(point)
        if on_point is not None:
            on_point(point)
    return points


# ---- Monte-Carlo depth ---------------------------------------------------------------------

def mc_evaluate(model: Any, variables: Any, batches: Batches, *, samples: int,
                key: jax.Array) -> dict[str, Any]:
    """Averaged softmax of ``samples`` sampled sub-networks vs the deterministic network.

    Member i is the sub-network with gates ``draw_gates(fold_in(key, i), p)`` (the same for
    every batch and every example, so the ensemble is k fixed networks, whatever the batch
    size; a ``mode='sample'`` model trained on one draw per example gets the same k
    networks for each example), run with running BatchNorm statistics and training-time
    scaling. The deterministic network runs every block
    scaled by p_l (paper Eq. 5).

    Returns:
      ``{'deterministic': {error, loss}, 'mc': {error, loss}, 'member_mean_error',
      'samples', 'count'}``; ``loss`` is the NLL of the (averaged) predicted distribution.
    """
    if samples < 1:
        raise errors.ConfigError(f"samples must be >= 1, got {samples}.")
    _require_blockwise(model)
    probs = model.survival_probs()

    # The deterministic network is its own program, so its figures do not depend on
    # ``samples`` (one program holding both fuses it differently per loop length).
    @jax.jit
    def det_sums(variables, images, labels, mask):
        return _sums(model.apply(variables, images, train=False), labels, mask)

    def sums(variables, images, labels, mask):
        def member(i, acc):
            gates = ops.draw_gates(jax.random.fold_in(key, i), probs)  # one network
            if model.mode == "sample":  # its gates are [blocks, batch]: the same for each
                gates = jnp.broadcast_to(gates[:, None], gates.shape + images.shape[:1])
            logits = model.apply(variables, images, train=False, stochastic=True, gates=gates)
            p = jax.nn.softmax(logits.astype(jnp.float32))
            member_err = _sums(logits, labels, mask)[1]  # a count: exact in float32
            return acc[0] + p / samples, acc[1] + member_err

        shape = jax.eval_shape(lambda: model.apply(variables, images, train=False)).shape
        init = (jnp.zeros(shape, jnp.float32), jnp.zeros((), jnp.float32))
        avg, member_err = jax.lax.fori_loop(0, samples, member, init)
        mc = _sums(jnp.log(jnp.maximum(avg, 1e-30)), labels, mask)  # log-probs as logits
        return jnp.concatenate([mc, member_err[None]])

    fn = jax.jit(sums)
    total = jnp.zeros(7, jnp.float32)
    for images, labels, mask in batches():
        total = total + jnp.concatenate([det_sums(variables, images, labels, mask),
                                         fn(variables, images, labels, mask)])
    total = _host(total)
    det, mc = _metrics(total[0:3]), _metrics(total[3:6])
    return {
        "deterministic": {"error": det["error"], "loss": det["loss"]},
        "mc": {"error": mc["error"], "loss": mc["loss"]},
        # Summed as counts and divided here: 576 / 640, not float32's 0.8999999761.
        "member_mean_error": float(total[6]) / (samples * det["count"]),
        "samples": samples,
        "count": det["count"],
    }
