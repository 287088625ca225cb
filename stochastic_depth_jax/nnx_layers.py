"""Native Flax NNX modules: the stochastic-depth wrapper, DropPath, the ViT and ConvNeXt twins.

They follow the NNX guides: modules own their parameters, gate keys come from an
``nnx.Rngs`` stream named ``'stochastic_depth'`` (or a key passed at call time), and
``model.train()`` / ``model.eval()`` switch ``deterministic``. Gates, subsets, skipping and
scaling are those of the one core op, :mod:`stochastic_depth_jax.ops`::

    block = StochasticDepth(MyBranch(rngs=rngs), survival_prob=0.8, mode='sample',
                            rngs=nnx.Rngs(stochastic_depth=0))
    y = x + block(x)  # training: f runs on round(0.8 n) examples only

The ViT and the ConvNeXt here have the parameter names of :class:`stochastic_depth_jax.vit.ViT`
and :class:`stochastic_depth_jax.convnext.ConvNeXt` (Linen), and for the same parameters and
key give the same outputs (see :func:`load_linen_params`).
"""

from __future__ import annotations

import contextlib
import dis
import functools
import os
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import flax.errors
from flax import nnx

from stochastic_depth_jax import conv
from stochastic_depth_jax import convnext as linen_convnext
from stochastic_depth_jax import ops, vit as linen_vit

__all__ = [
    "StochasticDepth",
    "DropPath",
    "Attention",
    "AttentionBranch",
    "MlpBranch",
    "EncoderBlock",
    "ViT",
    "ConvNeXtBranch",
    "ConvNeXtBlock",
    "ConvNeXtDownsample",
    "ConvNeXt",
    "load_linen_params",
]

Array = Any
RngsLike = Any  # nnx.Rngs, nnx.RngStream, a PRNG key, or None


def _as_stream(rngs: RngsLike, collection: str) -> Any:
    """A forked stream of ``collection`` from ``rngs`` (None stays None), as nnx.Dropout."""
    if isinstance(rngs, nnx.Rngs):
        return _stream(rngs, collection).fork()
    if isinstance(rngs, nnx.RngStream):
        return rngs.fork()
    if rngs is None:
        return nnx.data(None)
    given = "a PRNG key" if isinstance(rngs, jax.Array) else type(rngs).__name__
    raise TypeError(f"rngs must be nnx.Rngs, nnx.RngStream or None, got {given}: build it "
                    f"with rngs=nnx.Rngs({collection}=seed), or pass a key at each call "
                    f"(rngs=key).")


def _key(rngs: RngsLike, collection: str) -> Array:
    """A key from a call-time ``rngs`` (Rngs, stream or key)."""
    if isinstance(rngs, nnx.Rngs):
        return _stream(rngs, collection)()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    if isinstance(rngs, Mapping):  # Linen's apply(..., rngs={'stochastic_depth': key})
        raise TypeError(f"rngs at an NNX call is one key, not a dict of streams (Linen's "
                        f"apply form): pass rngs=key, or rngs=nnx.Rngs({collection}=key).")
    if rngs is None:
        return rngs
    typed = isinstance(rngs, jax.Array) and jnp.issubdtype(rngs.dtype, jax.dtypes.prng_key)
    raw = isinstance(rngs, jax.Array) and rngs.dtype == jnp.uint32 and rngs.shape[-1:] == (2,)
    if not (typed or raw):
        what = (f"an array of shape {rngs.shape} and dtype {rngs.dtype}"
                if hasattr(rngs, "shape") and hasattr(rngs, "dtype") else repr(rngs))
        if "\n" in what:  # a list of keys: each key's repr spans lines
            what = f"a {type(rngs).__name__}" + (
                f" of {len(rngs)}" if isinstance(rngs, (list, tuple)) else "")
        raise TypeError(f"rngs must be nnx.Rngs, an nnx.RngStream or a PRNG key "
                        f"(jax.random.key(seed)), got {what}.")
    if rngs.shape != ((2,) if raw else ()):
        # Keys split per layer but not scanned over reach every layer as one array.
        raise TypeError(f"rngs must be one PRNG key, got {rngs.shape[0] if rngs.ndim else ''} "
                        f"keys (an array of shape {rngs.shape}): inside nnx.scan, scan over "
                        f"keys split per layer (in_axes=0 for them), or pass one key.")
    return rngs


def _has_stream(rngs: nnx.Rngs, collection: str) -> bool:
    """Whether ``rngs[collection]`` gives a stream: its own, or, as for ``nnx.Dropout``, the
    ``'default'`` stream of ``nnx.Rngs(seed)``."""
    return collection in rngs or "default" in rngs


def _stream(rngs: nnx.Rngs, collection: str) -> Any:
    if not _has_stream(rngs, collection):
        raise ValueError(f"The nnx.Rngs has no {collection!r} stream for stochastic-depth gates: "
                         f"build it with nnx.Rngs(params=..., {collection}=seed), or pass "
                         f"rngs=key at call time.")
    return rngs[collection]


def _check_nnx_branch(branch: Any) -> None:
    """TypeError for a Linen module (it failed at the first call with Flax's "Can't call
    compact methods on unbound modules") or a module class given as the branch."""
    if isinstance(branch, nn.Module):
        raise TypeError(
            f"StochasticDepth (NNX) got a Linen module ({type(branch).__name__}) as its branch: "
            f"use sdj.StochasticDepth (Linen) inside Linen models, or convert it, "
            f"flax.nnx.bridge.ToNNX(branch, rngs=rngs), and initialise it with "
            f"bridge.lazy_init.")
    if isinstance(branch, type):
        raise TypeError(
            f"StochasticDepth got the class {branch.__name__} as its branch, not a module: "
            f"pass an instance, e.g. {branch.__name__}(..., rngs=rngs).")


def _code_names(code: Any) -> set[str]:
    """The global and attribute names a code object (and the functions defined in it) reads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _code_names(const)
    return names


# The instructions that read a global (by name: the opcodes differ between Pythons).
_READS_GLOBAL = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"})


@functools.lru_cache(maxsize=1024)
def _global_names(code: Any) -> frozenset[str]:
    """The names a code object (and the functions defined in it) reads as globals: not its
    attribute names (``self.conv`` does not read a global ``conv``)."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in _READS_GLOBAL}
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _global_names(const)
    return frozenset(names)


# Where JAX's, Flax's and NumPy's own functions live (told by their code's file: functools.wraps
# copies __module__).
_LIBRARIES = tuple(os.path.dirname(path) + os.sep for path in (
    jax.__file__, os.path.dirname(nnx.__file__), np.__file__))


def _function_parts(branch: Any) -> list[tuple[Any, set[str]]]:
    """What a plain function branch reads from outside, each object with the attribute names
    the code holding it reads: the objects it closes over (closure cells, default arguments,
    a ``functools.partial``'s function and arguments, a bound method's ``self``, the globals
    it names). Functions among them (a ``jax.checkpoint`` or ``jax.jit`` of a lambda, a
    function made by another, the user's decorators, a global helper), callable objects of
    plain classes, the attributes a plain object's method reads and the items of plain
    lists, tuples and dicts are read in turn, to any depth, each once (a function reaching
    itself is read once)."""
    parts: list[tuple[Any, set[str]]] = []
    todo, seen = [branch], {}  # seen holds what it read (ids of live objects stay unique)
    while todo:
        fn = todo.pop()
        if id(fn) in seen:
            continue
        seen[id(fn)] = fn
        found, inner = _function_level(fn)
        parts += found
        todo += inner
    return parts


def _function_level(fn: Any) -> tuple[list[tuple[Any, set[str]]], list[Any]]:
    """One level of :func:`_function_parts`: the objects ``fn`` reads (with the attribute
    names its code reads), and the functions among them, read next."""
    if isinstance(fn, functools.partial):
        code = getattr(getattr(fn.func, "__func__", fn.func), "__code__", None)
        names = _code_names(code) if code is not None else set()
        given = [*fn.args, *fn.keywords.values()]
        parts, then = _sort_out(given, names)
        return parts, [fn.func] + then
    if _is_container(fn):  # [conv1, conv2] closed over: its items
        return _sort_out(fn.values() if isinstance(fn, Mapping) else fn, set())
    if _is_plain_callable(fn):  # an object of the user's class with __call__, not a Module
        call = type(fn).__call__
        parts, then = _held(fn, _code_names(call.__code__))
        return parts, [call] + then
    if not _is_function(fn):
        return [(fn, set())], []  # a module or other object itself (partial(self.conv))
    owner = fn.__self__ if isinstance(fn, types.MethodType) else None
    fn = getattr(fn, "__func__", fn)
    inner = [fn.__wrapped__] if hasattr(fn, "__wrapped__") else []
    code = getattr(fn, "__code__", None)
    if code is not None and code.co_filename.startswith(_LIBRARIES):
        code = None  # a library's function (jax.checkpoint's wrapper): only what it wraps
    names = _code_names(code) if code is not None else set()
    if code is not None:
        inner += [cell.cell_contents for cell in (getattr(fn, "__closure__", None) or ())
                  if _cell_filled(cell)]
        # Default arguments too: lambda v, conv=conv: conv(v), as written in a loop.
        inner += [*(getattr(fn, "__defaults__", None) or ()),
                  *(getattr(fn, "__kwdefaults__", None) or {}).values()]
        globals_ = getattr(fn, "__globals__", {})
        inner += [globals_[n] for n in _global_names(code) if n in globals_]
    parts, then = _sort_out(inner, names)
    if owner is not None and _is_nnx_object(owner):
        parts.append((owner, names))  # a module's method: the attributes it reads
    elif owner is not None:  # a plain object's method (helper.forward): what it holds
        held_parts, held_then = _held(owner, names)
        parts, then = parts + held_parts, then + held_then
    return parts, then


def _held(obj: Any, names: set[str]) -> tuple[list[tuple[Any, set[str]]], list[Any]]:
    """What a plain object's code reading ``names`` uses of its attributes (as
    :func:`_function_level`): the objects, and the callables among them, read next."""
    return _sort_out(_fields(obj, names).values(), names)


def _fields(obj: Any, names: set[str]) -> dict[str, Any]:
    """The attributes among ``names`` a plain object holds, in its ``__dict__`` or its
    ``__slots__`` (a holder with slots, or a dataclass with ``slots=True``, hid its layers)."""
    fields = getattr(obj, "__dict__", None)
    found = {n: fields[n] for n in names if n in fields} if isinstance(fields, Mapping) else {}
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for n in ((slots,) if isinstance(slots, str) else slots):
            if n in names and n not in found and hasattr(obj, n):
                found[n] = getattr(obj, n)
    return found


def _sort_out(objs: Any, names: set[str]) -> tuple[list[tuple[Any, set[str]]], list[Any]]:
    """``objs`` as :func:`_function_level` returns them: the objects read next
    (:func:`_read_next`), and the others with ``names``; plain values (numbers, strings,
    arrays: :func:`_is_plain_value`) left out at once (a closed-over table of a million
    numbers was read as a million objects, seconds a call)."""
    parts, then = [], []
    for obj in objs:
        if _is_plain_value(obj):
            continue
        if _read_next(obj):
            then.append(obj)
        else:
            parts.append((obj, names))
    return parts, then


def _is_nnx_object(obj: Any) -> bool:
    return isinstance(obj, nnx.Variable) or nnx.graph.is_graph_node(obj)


def _read_next(obj: Any) -> bool:
    """Whether :func:`_function_parts` reads what ``obj`` reads in turn: a function, an
    object of a plain class with ``__call__`` (``lambda v: helper(v)``), or a plain list,
    tuple or dict (``lambda v: layers[0](v)``)."""
    return _is_function(obj) or _is_plain_callable(obj) or _is_container(obj)


# Values that hold no NNX state and call nothing (told by their exact type, at once).
_PLAIN_TYPES = frozenset({int, float, complex, bool, str, bytes, type(None)})


def _is_plain_value(obj: Any) -> bool:
    """A number, string, None or array (NumPy's or a JAX one)."""
    return (type(obj) in _PLAIN_TYPES or isinstance(obj, (np.ndarray, np.generic))
            or isinstance(obj, jax.Array))


def _is_container(obj: Any) -> bool:
    """A plain list, tuple, set or mapping (a dict, Flax's ``FrozenDict``, ...; not an NNX
    one, which is a graph node)."""
    return (isinstance(obj, (list, tuple, set, frozenset, Mapping))
            and not nnx.graph.is_graph_node(obj))


def _is_function(obj: Any) -> bool:
    """A function, method or partial, or a wrapper of one (``jax.jit``, ``jax.checkpoint``);
    not an NNX module."""
    return not nnx.graph.is_graph_node(obj) and (
        isinstance(obj, (types.FunctionType, types.MethodType, functools.partial))
        or hasattr(obj, "__wrapped__"))


def _is_plain_callable(obj: Any) -> bool:
    """An instance of a class of the user's that defines ``__call__`` in Python (the attributes
    its ``__call__`` reads are what it uses), not a module, Variable, function or wrapper."""
    call = getattr(type(obj), "__call__", None)
    return (isinstance(call, types.FunctionType) and not isinstance(obj, type)
            and not isinstance(obj, nnx.Variable) and not nnx.graph.is_graph_node(obj)
            and not _is_function(obj)
            and not call.__code__.co_filename.startswith(_LIBRARIES))


def _cell_filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a cell not assigned yet
        return False
    return True


def _is_nnx_state(value: Any) -> bool:
    """An NNX Variable, or a graph node (Module, nnx.List, ...) holding at least one."""
    if isinstance(value, nnx.Variable):
        return True
    if not nnx.graph.is_graph_node(value):
        return False
    return any(isinstance(v, nnx.Variable) for _, v in nnx.iter_graph(value))


def _trace_of(value: Any) -> Any:
    """The NNX trace state a Variable or NNX object was made in (None where unknown)."""
    if isinstance(value, nnx.Variable):
        return getattr(value, "_trace_state", None)
    return getattr(getattr(value, "_pytree__state", None), "trace_state", None)


def _bakes_in_constants(value: Any) -> bool:
    """Whether a transform would take ``value``'s state as constants: a parameter holding a
    concrete array (made outside every transform, as in ``__init__``), or state all concrete.
    Layers of an enclosing transform (a function built in ``__call__`` under ``nnx.jit``,
    its wrapper then run in ``nnx.remat`` / ``nnx.cond`` / ``nnx.vmap``) hold that
    transform's traced values, which JAX closes over correctly."""
    variables = [value] if isinstance(value, nnx.Variable) else [
        v for _, v in nnx.iter_graph(value) if isinstance(v, nnx.Variable)]
    concrete = [(isinstance(v, nnx.Param), not isinstance(leaf, jax.core.Tracer))
                for v in variables for leaf in jax.tree.leaves(v.get_value())]
    return any(param and fixed for param, fixed in concrete) or all(
        fixed for _, fixed in concrete)


def _used_nnx_state(branch: Any) -> list:
    """The NNX modules and variables a plain-function branch uses (:func:`_function_parts`);
    a plain object it reads (a ``SimpleNamespace``, dataclass or class with ``__slots__`` of
    layers, ``lambda v: layers.conv(v)``) is read through the attributes its code names, as if
    they were closed over themselves."""
    used = []
    for obj, names in _function_parts(branch):
        reached = [obj] if _is_nnx_object(obj) else list(_fields(obj, names).values())
        for node in filter(_is_nnx_object, reached):
            attrs = [getattr(node, n) for n in names if not isinstance(node, nnx.Variable)
                     and n in getattr(node, "__dict__", {})]
            # Read through attributes (self.conv), or used itself (a closed-over conv).
            used += [a for a in attrs if _is_nnx_state(a)] if attrs else [node]
    return [u for u in used if _is_nnx_state(u)]


def _check_closed_over_modules(sd: StochasticDepth, batch_gate: bool) -> list:
    """ValueError for a plain-function branch that uses NNX modules from outside the NNX
    transform (``nnx.jit``, ``nnx.grad``, ``nnx.scan``, ...) the wrapper runs in.

    Such a transform works on a copy of the wrapper, but the function still points at the
    original modules: it computes with their values as constants, so their gradients are
    zero, ``nnx.jit`` keeps stale parameters, and BatchNorm cannot update. Told apart from a
    function built inside the transform (fine) by the trace each was made in, and from one
    whose layers come from an enclosing transform (fine) by their concrete values (see
    :func:`_bakes_in_constants`); a wrapper that is itself the original (called under a JAX
    transform of its own) is not refused.
    With ``batch_gate`` (a training call in batch mode) modules with running state
    (BatchNorm) are refused too: a dropped block would update them (``'mask'``) or fail
    inside the ``cond`` (``'skip'``). Returns the NNX objects the function uses (whose
    ``nnx.Conv`` layers the wrapper reroutes as a Module branch's)."""
    used = _used_nnx_state(sd.branch)
    own = _trace_of(sd)
    stale = [u for u in used if own is not None and own.is_valid()
             and _trace_of(u) is not None and not _trace_of(u).is_valid()
             and _bakes_in_constants(u)]
    if stale:
        # Frozen layers too: which state an nnx.grad filter leaves out cannot be told from
        # here, and under nnx.jit their values are compiled in (a later load never reaches
        # them).
        raise _needs_module_branch(
            sd, "state ({}) made outside the NNX transform it runs in (nnx.jit, nnx.grad, "
            "nnx.scan, ...), which copies the wrapper but not what the function closes over: "
            "their gradients would be zero, their updates lost, and under nnx.jit their "
            "values compiled in as constants (frozen layers too: weights loaded later would "
            "not reach them)", stale, "; frozen layers as well, kept out of training by "
            "nnx.grad's filter (argnums=nnx.DiffState(0, ...)) or the optimizer's wrt=")
    running = [u for u in used if batch_gate and not isinstance(u, nnx.Variable)
               and _updates_state(u)]
    if batch_gate and running:
        raise _needs_module_branch(
            sd, "modules with running state ({}), which a batch-mode gate cannot leave "
            "unchanged when it drops the block (only an nnx.Module branch's state is carried)",
            running)
    return [u for u in used if not isinstance(u, nnx.Variable)]


def _needs_module_branch(sd: Any, problem: str, found: list[Any], also: str = "") -> ValueError:
    """The one line refusing a function branch over NNX state: ``problem`` (with ``{}``
    for the kinds ``found``), and the fix (``also`` appended to it)."""
    kinds = ", ".join(sorted({type(u).__name__ for u in found}))
    what = (f"an object of class {type(sd.branch).__name__} (not an nnx.Module)"
            if _is_plain_callable(sd.branch) else "a function")
    return ValueError(
        f"{type(sd).__name__}'s branch is {what} that uses NNX {problem.format(kinds)}: "
        f"make the branch an nnx.Module that holds them (e.g. nnx.Sequential(conv, bn), or "
        f"a small Module class){also}.")


def _updates_state(module: Any) -> bool:
    """Whether ``module`` holds running state (BatchNorm statistics) a call may update: not
    that of a BatchNorm built or set with ``use_running_average=True`` (frozen)."""
    frozen = [path for path, m in nnx.iter_graph(module)
              if isinstance(m, nnx.BatchNorm) and m.use_running_average is True]
    return bool(nnx.state(module, nnx.All(_KEPT_STATE, lambda path, _: not any(
        tuple(path[:len(f)]) == tuple(f) for f in frozen))))


def _refuse_unknown_arguments(module: nnx.Module, unknown: Mapping[str, Any]) -> None:
    """Python's TypeError for an unknown keyword, naming the fix for a drop rate given to
    ``StochasticDepth`` (which takes the survival probability) or misnamed for ``DropPath``
    or a subclass (:func:`stochastic_depth_jax.ops.rate_argument_error`)."""
    key, name = next(iter(unknown)), type(module).__name__
    error = ops.rate_argument_error(name, key, unknown[key],
                                    takes_rate=isinstance(module, DropPath))
    if error is not None:
        raise error
    raise TypeError(f"{name}.__init__() got an unexpected keyword argument {key!r}")


# nnx.merge reuses the state's Variables unless told copy=True: a state the transform does
# not trace (closed over, or jax.grad / jax.jacfwd of the input only) keeps those of the
# level outside it, which the wrapper's nnx.cond cannot update either.
_NNX_TRANSFORMS_FIX = (
    "ran inside a JAX transform (jax.lax.scan, jax.vmap, jax.lax.fori_loop, jax.grad, ...; "
    "or an NNX one not given the model) that closes over NNX modules or a split state, or "
    "merges a state it does not differentiate, whose state (key counters, parameters, "
    "BatchNorm statistics) NNX cannot update from inside it: use NNX's transform instead "
    "(nnx.scan, nnx.vmap, nnx.fori_loop, nnx.grad) and pass it the model as an argument (one "
    "closed over, by nnx.jit too, is not carried), or nnx.split the model outside and merge "
    "it inside the function with nnx.merge(graphdef, state, copy=True) (without copy=True a "
    "state closed over, or one jax.grad / jax.jacfwd do not differentiate, keeps the "
    "variables of the level outside; with it, return nnx.state(copy) and nnx.update the "
    "model, or the copy's key counters and BatchNorm statistics are lost)")


class _TransformError(flax.errors.TraceContextError):
    """NNX's refusal to update state across a JAX transform, naming NNX's transforms (still
    a ``TraceContextError``, without the link Flax adds to a page with no entry for it)."""

    def __init__(self, message: str):
        Exception.__init__(self, message)


def _naming_nnx_transforms(call: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates a wrapper's ``__call__``: NNX's "Cannot mutate Param from a different trace
    level", raised where the wrapper (its key stream, or its branch) updates state inside a
    plain ``jax.lax.scan`` (or ``jax.vmap``, ...) around a closed-over model, becomes one
    line naming ``nnx.scan``; an enclosing wrapper passes it on as it is, and so does a
    wrapper whose state is all of its caller's level (the branch's own transform raised it:
    :func:`_of_another_level`). Called eagerly (no transform around it), it walks nothing:
    there is no other level to name (what NNX refuses then, state leaked out of a
    transform, NNX's words name)."""
    @functools.wraps(call)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        # Before the call (see _of_another_level); ~1 ms a call, spent only under a trace.
        states = None if conv.is_eager() else _trace_states(self)
        try:
            return call(self, *args, **kwargs)
        except flax.errors.TraceContextError as e:
            if (states is None or isinstance(e, _TransformError)
                    or not _of_another_level(self, states)):
                raise  # an inner wrapper's line, or the branch's own transform's (NNX's words)
            said = str(e).split(" (https://")[0].rstrip(".")
            raise _TransformError(f"{type(self).__name__} {_NNX_TRANSFORMS_FIX} (NNX said: "
                                  f"{said}).") from None
    return wrapped


def _trace_states(node: Any) -> list[Any]:
    """The NNX trace states of ``node`` and of the objects and Variables in its graph."""
    nodes = [node] + ([] if isinstance(node, nnx.Variable)
                      else [n for _, n in nnx.iter_graph(node)])
    return [t for t in map(_trace_of, nodes) if t is not None]


def _of_another_level(sd: Any, states: list[Any]) -> bool:
    """Whether the wrapper or NNX state it uses (``states``: its graph's, taken before the
    call, as a failed NNX update leaves the modules empty; a function branch's closed-over
    layers) was made at another trace level than the one the wrapper is called at: a plain
    JAX transform around it, or a state merged without copying, whose NNX
    ``TraceContextError`` is the wrapper's to name. Otherwise the branch's own code raised it
    (a ``jax.lax.scan`` of its own over its layers), which NNX's words point at."""
    if not _has_state(sd.branch):
        states = states + [t for obj, _ in _function_parts(sd.branch)
                           if isinstance(obj, nnx.Variable) or nnx.graph.is_graph_node(obj)
                           for t in _trace_states(obj)]
    return not all(t.is_valid() for t in states)


class StochasticDepth(nnx.Module):
    """Wraps a residual branch module f so it survives with probability p; returns ``b f(x)``.

    The caller adds the shortcut (``y = x + sd(x)``). Semantics as
    :func:`stochastic_depth_jax.stochastic_depth`: ``mode='batch'`` with ``'skip'`` runs
    nothing of f when the gate is closed (an ``nnx.cond``); ``mode='sample'`` with
    ``'skip'`` runs f only on a random subset of exactly ``k`` examples
    (:func:`stochastic_depth_jax.ops.subset_size`), so a BatchNorm in f normalises over the
    subset; ``'mask'`` computes f for every example and multiplies.

    Args:
      branch: the residual branch, called ``branch(x, *args, **kwargs)``: an ``nnx.Module``
        (its BatchNorm statistics update only when it runs) or a plain function. A function
        that uses NNX layers made outside the NNX transform the wrapper runs in (a lambda
        over ``self.conv``, under ``nnx.jit`` / ``nnx.grad``, also in ``nnx.remat``; frozen
        layers too) is refused, as is one using BatchNorm in batch-mode training (not one
        with ``use_running_average=True``): hold the layers in an ``nnx.Module`` branch.
      survival_prob: p in (0, 1], the probability of *keeping* the branch (a float; 1 never
        draws a key); not timm's drop rate 1 - p (for that, :class:`DropPath`). A module
        attribute is static, so per-layer rates of a stack built with ``nnx.vmap`` are
        passed at call time instead (``survival_prob=`` below).
      mode, scaling, implementation, groups: as the core op.
      batch_axis: ``'sample'``: the axis of ``x`` (and of the branch output) that indexes
        examples: 0 for ``[batch, ...]``, 1 for ``[tokens, batch, width]`` layouts.
      deterministic: evaluation mode unless overridden at call time (``model.eval()``).
      rng_collection: the ``nnx.Rngs`` stream gates are drawn from.
      rngs: ``nnx.Rngs`` with that stream (or a stream); may be None if every training call
        passes ``rngs=``.
      reroute_convs: whether stock ``nnx.Conv`` layers inside the branch compute through
        :func:`stochastic_depth_jax.conv.conv_general_dilated` (same parameters and numbers,
        a gradient XLA:CPU runs fast inside ``cond``): ``'auto'`` (on the CPU backend),
        ``'always'`` or ``'never'``; a wrapper inside the branch decides for its own
        branch. A call under forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``
        innermost over its input or state) reroutes nothing, whatever this says
        (:func:`~stochastic_depth_jax.conv.stock_convs_under_forward_mode`; ``'never'``
        where the wrapper cannot see forward mode: README, "Forward-mode autodiff"). See
        :func:`~stochastic_depth_jax.conv.reroute_nnx_convs`.
    """

    def __init__(self, branch: nnx.Module, survival_prob: float = 1.0, *, mode: str = "batch",
                 scaling: str = "test", implementation: str = "skip", groups: int = 1,
                 batch_axis: int = 0, deterministic: bool = False,
                 rng_collection: str = "stochastic_depth", rngs: RngsLike = None,
                 reroute_convs: str = "auto", **unknown: Any):
        if unknown:
            _refuse_unknown_arguments(self, unknown)
        _check_nnx_branch(branch)
        ops.validate_options(mode, scaling, implementation)
        if reroute_convs not in conv.REROUTE_CONVS:
            raise ValueError(f"Unknown reroute_convs {reroute_convs!r}; "
                             f"valid: {list(conv.REROUTE_CONVS)}.")
        ops.check_survival_prob(survival_prob)
        if not ops.is_concrete(survival_prob):
            # A traced attribute would leak out of the transform that created the module.
            raise ValueError(
                "StochasticDepth got a traced survival_prob at construction (e.g. per-layer "
                "rates under nnx.vmap); a module attribute cannot vary per layer: build the "
                "layers with one float and pass each layer's rate at call time, "
                "sd(x, survival_prob=p), scanning over the rates.")
        ops.check_batch_axis(batch_axis)
        self.branch = branch
        # A Python float: a JAX scalar attribute would be NNX state, traced under nnx.jit.
        self.survival_prob = float(survival_prob)
        self.mode, self.scaling, self.implementation = mode, scaling, implementation
        self.groups, self.batch_axis = groups, batch_axis
        self.deterministic = deterministic
        self.rng_collection = rng_collection
        self.reroute_convs = reroute_convs
        self.rngs = _as_stream(rngs, rng_collection)

    def _outside_state(self) -> Any:
        """The state of the layers a function branch closes over: forward mode over them
        alone (``jax.jvp`` in the parameters, not the input) is looked for too
        (:func:`~stochastic_depth_jax.conv.stock_convs_under_forward_mode`)."""
        if _has_state(self.branch):
            return None
        # A Variable first: it is a graph node too, and nnx.state of one failed (IndexError).
        return [u[...] if isinstance(u, nnx.Variable) else nnx.state(u)
                for u in _used_nnx_state(self.branch)]

    @_naming_nnx_transforms
    @conv.stock_convs_under_forward_mode
    def __call__(self, x: Array, *args: Any, deterministic: bool | None = None,
                 survival_prob: Any = None, rngs: RngsLike = None, gate: Any = None,
                 shortcut: Array | None = None, **kwargs: Any) -> Array:
        """Runs the gated branch on ``x`` ``[batch, ...]`` (batch along ``batch_axis``; a
        pytree of such arrays works too).

        Args:
          deterministic: overrides the module's flag (evaluation: all of f, scaled); a
            Python bool (static under ``nnx.jit``).
          survival_prob: overrides the module's p for this call; may be traced (a layer's
            rate scanned over with ``nnx.scan``) in batch mode or with ``'mask'``.
          rngs: a key, stream or Rngs for this call's gate (default: the module's stream).
          gate: a pre-drawn gate as :func:`stochastic_depth_jax.ops.draw_gate` returns
            (subset rows sorted and without repeats, see ``ops.subset_branch``).
          shortcut: optional, shaped like ``branch(x)``: returned added to the gated
            residual; drop-path subsets add their outputs into it in one scatter-add.

        Returns:
          the gated residual (``+ shortcut``), shaped like ``branch(x)``.
        """
        deterministic = self.deterministic if deterministic is None else deterministic
        ops.check_deterministic(deterministic)
        closed_over = [] if _has_state(self.branch) else _check_closed_over_modules(
            self, self.mode == "batch" and not deterministic)
        p = self.survival_prob if survival_prob is None else survival_prob
        ops.check_survival_prob(p)
        p = ops.checked_prob(p)  # a traced p out of (0, 1]: NaN, scalar ops only

        def run(branch, v):
            with contextlib.ExitStack() as stack:
                for node in (branch, *closed_over):  # a function's layers: as a Module's
                    stack.enter_context(conv.reroute_nnx_convs(node, self.reroute_convs))
                return branch(v, *args, **kwargs)

        if deterministic and gate is None:
            return ops.with_shortcut(ops.scaled(run(self.branch, x),
                                                ops.eval_scale(p, self.scaling)), shortcut)
        if not deterministic and gate is None and ops.is_static_one(p):
            return ops.with_shortcut(ops.scaled(run(self.branch, x), 1.0), shortcut)
        if gate is None:
            key = _key(rngs if rngs is not None else self.rngs, self.rng_collection)
            if key is None:
                raise ValueError(f"{type(self).__name__} in training needs rngs: pass "
                                 "rngs=nnx.Rngs(stochastic_depth=...) or call with rngs=key "
                                 "(to evaluate: model.eval(), or deterministic=True).")
            batch = ops.batch_size_of(x, self.batch_axis) if self.mode == "sample" else None
            gate = ops.draw_gate(key, p, mode=self.mode, implementation=self.implementation,
                                 batch_size=batch, groups=self.groups)
        ops.check_gate(gate, self.mode, deterministic)
        if self.mode == "sample" and not deterministic:
            branch = ops.naming_whole_arguments(lambda v: run(self.branch, v), x, args, kwargs,
                                                self.batch_axis)
            return ops.gated_branch(branch, x, gate, p, mode=self.mode,
                                    scaling=self.scaling, implementation=self.implementation,
                                    shortcut=shortcut, batch_axis=self.batch_axis)
        # A gated evaluation keeps the evaluation scale on the blocks it runs (as Linen).
        scale = ops.eval_scale if deterministic else ops.train_scale
        factor = scale(p, self.scaling)
        if self.mode == "batch" and self.implementation == "skip":
            return ops.with_shortcut(self._cond(run, x, gate, factor, ops.closed_fill(p)),
                                     shortcut)
        if self.mode == "batch" and _has_state(self.branch):
            run = _keep_state_if_dropped(run, gate)
        return ops.with_shortcut(ops.masked(run(self.branch, x), gate, factor, self.batch_axis,
                                            ops.closed_fill(p)), shortcut)

    def _cond(self, run, x: Array, gate: Array, factor: Any, fill: Any = None) -> Array:
        """Batch-mode skipping: an ``nnx.cond`` so a stateful branch (BatchNorm) may update."""
        ops.check_shared_gate(gate)
        # In f32; ``scaled`` casts it to each output's dtype.
        factor = jnp.asarray(factor, jnp.float32)
        if not _has_state(self.branch):  # a plain function: nothing for nnx to carry
            out = jax.eval_shape(lambda v: run(self.branch, v), x)
            return jax.lax.cond(gate, lambda v: ops.scaled(run(self.branch, v), factor),
                                lambda v: ops.zeros_like_output(out, fill), x)
        out, adds_variables = _output_struct(run, self.branch, x)
        if adds_variables:
            # A cond cannot add variables on one side only (what ``nnx.capture`` records):
            # masking gives the same outputs, gradients and statistics, as Linen's wrapper.
            run = _keep_state_if_dropped(run, gate)
            return ops.masked(run(self.branch, x), gate, factor, self.batch_axis, fill)
        return nnx.cond(gate, lambda b, v: ops.scaled(run(b, v), factor),
                        lambda b, v: ops.zeros_like_output(out, fill), self.branch, x)

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view``; ``nnx.view_info`` reads its Args section (it needs one).

        Args:
          deterministic: if True, evaluation (every block runs, scaled; no gates drawn).
        """
        if deterministic is not None:
            self.deterministic = deterministic


def _has_state(branch: Any) -> bool:
    """True for an NNX module (or other graph node); False for a plain function such as
    ``jnp.tanh`` or a ``functools.partial``, which holds no variables."""
    return nnx.graph.is_graph_node(branch)


# The state a dropped branch leaves as it was: everything but parameters and rng counters
# (BatchNorm's BatchStat, and any other mutable variable of the same structure); not what
# ``nnx.capture`` records either (its ``__captures__``, of any variable type).
_KEPT_STATE = nnx.Not(nnx.Any(nnx.Param, nnx.RngState, nnx.Intermediate,
                              nnx.PathContains("__captures__")))


def _keep_state_if_dropped(run: Any, gate: Array) -> Any:
    """Wraps ``run`` so a dropped (gate 0) branch leaves its non-parameter state unchanged.

    The mask implementation computes a dropped branch; this keeps its semantics equal to
    skipping, where a dropped block's BatchNorm statistics are not updated (as the Linen
    wrapper does).
    """
    def wrapped(branch, v):
        old = jax.tree_util.tree_map(lambda a: a, nnx.state(branch, _KEPT_STATE))
        y = run(branch, v)
        new = nnx.state(branch, _KEPT_STATE)
        nnx.update(branch, jax.tree_util.tree_map(lambda o, n: jnp.where(gate, n, o), old, new))
        return y

    return wrapped


def _output_struct(run: Any, branch: nnx.Module, x: Array) -> tuple[Any, bool]:
    """Shape/dtype of ``run(branch, x)``, and whether the run adds variables to ``branch``,
    without running it or changing ``branch``.

    The branch is traced abstractly on a copy of its state, so an output that differs from
    ``x`` in shape or dtype (a bf16 branch on an f32 stream, a widening branch) needs no
    declaration (``branch.output_struct(x)``, when the branch defines it, gives the output).
    Variables are added by ``sow`` / ``perturb`` under ``nnx.capture`` (or a ``sow`` outside
    it): the copy's graph or state structure changes.
    """
    graphdef, state = nnx.split(branch)
    added = []

    def trace(s, v):
        before = jax.tree_util.tree_structure(s)  # before the run: it may update s in place
        module = nnx.merge(graphdef, s)
        y = run(module, v)
        after, new_state = nnx.split(module)
        added.append(after != graphdef or jax.tree_util.tree_structure(new_state) != before)
        return y

    out = jax.eval_shape(trace, state, x)
    if hasattr(branch, "output_struct"):
        out = branch.output_struct(x)
    return out, added[0]


class DropPath(StochasticDepth):
    """timm-style drop path over a branch that really skips: ``StochasticDepth`` with a drop
    ``rate`` (= 1 - p), per-example subsets (``mode='sample'``, ``'skip'``) and inverted
    (``'train'``) scaling by default."""

    def __init__(self, branch: nnx.Module, rate: float = 0.0, *, mode: str = "sample",
                 scaling: str = "train", implementation: str = "skip", **kwargs: Any):
        if "survival_prob" in kwargs:  # Python said "got multiple values for argument"
            rate, name = ops.drop_rate_text(kwargs["survival_prob"]), type(self).__name__
            raise TypeError(f"{name} takes the drop rate, not survival_prob: "
                            f"{name}(branch, rate={rate}), or "
                            f"StochasticDepth(branch, survival_prob=..., mode='sample', "
                            f"scaling='train').")
        rate = ops.check_drop_rate(rate, type(self).__name__)
        super().__init__(branch, 1.0 - rate, mode=mode, scaling=scaling,
                         implementation=implementation, **kwargs)


def _linear(din: int, dout: int, dtype: Any, rngs: nnx.Rngs, init=linen_vit.KERNEL_INIT):
    return nnx.Linear(din, dout, kernel_init=init, dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
    """Self-attention (fused ``qkv``, ``proj``), ``[batch, tokens, width]`` in and out."""

    def __init__(self, width: int, num_heads: int, *, dtype: Any = None, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.qkv = _linear(width, 3 * width, dtype, rngs, init=linen_vit.qkv_init)
        self.proj = _linear(width, width, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        return self.proj(linen_vit.attend(self.qkv(x), self.num_heads))


def _run_branch(branch: nnx.Module, x: Array) -> Array:
    """``branch.forward(x)``, under ``nnx.remat`` when ``branch.remat`` (the backward pass
    recomputes it from ``x``; the same values and gradients).

    ``graph_updates=False`` writes back only the variables the call changed: by default
    ``nnx.remat`` set every parameter again, which fails ("Cannot mutate Param from a
    different trace level") in a JAX transform closing over the model, such as
    ``jax.jit(lambda x: model(x, deterministic=True))`` or ``jax.grad`` in the input, and
    left the model unusable."""
    if branch.remat:
        return nnx.remat(type(branch).forward, graph_updates=False)(branch, x)
    return branch.forward(x)


def _layer_scale(module: nnx.Module, width: int, init: float | None) -> None:
    """Gives ``module`` the layer scale ``gamma`` (``[width]``, float32, every entry ``init``)
    of the Linen :func:`stochastic_depth_jax.vit.layer_scale`; none when ``init`` is 0 or
    None."""
    if init:
        module.gamma = nnx.Param(jnp.full((width,), init, jnp.float32))


def _scaled(module: nnx.Module, y: Array) -> Array:
    """``y * module.gamma``, or ``y`` where ``module`` has no layer scale."""
    if hasattr(module, "gamma"):
        return y * module.gamma[...].astype(y.dtype)
    return y


class AttentionBranch(nnx.Module):
    """Pre-norm attention residual branch ``gamma * attn(LN(x))`` (``gamma``: layer scale,
    none unless ``layer_scale_init``); ``remat``: see :func:`_run_branch`."""

    def __init__(self, width: int, num_heads: int, *, dtype: Any = None, remat: bool = False,
                 layer_scale_init: float | None = None, rngs: nnx.Rngs):
        linen_vit.check_remat(remat, "AttentionBranch")
        linen_vit.check_layer_scale_init(layer_scale_init, linen_vit.VIT_LAYER_SCALE)
        self.remat = bool(remat)
        self.norm = nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.attn = Attention(width, num_heads, dtype=dtype, rngs=rngs)
        _layer_scale(self, width, layer_scale_init)

    def forward(self, x: Array) -> Array:
        """``gamma * attn(LN(x))``, never rematerialised."""
        return _scaled(self, self.attn(self.norm(x)))

    def __call__(self, x: Array) -> Array:
        return _run_branch(self, x)


class MlpBranch(nnx.Module):
    """Pre-norm MLP residual branch ``gamma * fc2(gelu(fc1(LN(x))))`` (``gamma`` as
    :class:`AttentionBranch`'s); ``remat``: see :func:`_run_branch`."""

    def __init__(self, width: int, mlp_dim: int, *, dtype: Any = None, remat: bool = False,
                 layer_scale_init: float | None = None, rngs: nnx.Rngs):
        linen_vit.check_remat(remat, "MlpBranch")
        linen_vit.check_layer_scale_init(layer_scale_init, linen_vit.VIT_LAYER_SCALE)
        self.remat = bool(remat)
        self.norm = nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.fc1 = _linear(width, mlp_dim, dtype, rngs)
        self.fc2 = _linear(mlp_dim, width, dtype, rngs)
        _layer_scale(self, width, layer_scale_init)

    def forward(self, x: Array) -> Array:
        """``gamma * fc2(gelu(fc1(LN(x))))``, never rematerialised."""
        return _scaled(self, self.fc2(jax.nn.gelu(self.fc1(self.norm(x)), approximate=False)))

    def __call__(self, x: Array) -> Array:
        return _run_branch(self, x)


class EncoderBlock(nnx.Module):
    """DeiT pre-norm block with drop path on both branches; twin of the Linen block (kept
    outputs are added into ``x`` in one scatter-add, as the Linen block's default).

    Args:
      width, num_heads, mlp_dim: block dimensions.
      survival_prob: 1 - drop rate (static float).
      mode, scaling, implementation, groups: of both branches' stochastic depth.
      remat: rematerialise both branches (``nnx.remat``): the same values and gradients,
        less memory kept for the backward pass.
      layer_scale_init: LayerScale of both branches, before drop path (see the Linen
        block); 0 or None (default): none.
      rngs: parameter initialisation (and the ``'stochastic_depth'`` stream, if present,
        for calls without gates).
    """

    def __init__(self, width: int, num_heads: int, mlp_dim: int, survival_prob: float = 1.0, *,
                 mode: str = "sample", scaling: str = "train", implementation: str = "skip",
                 groups: int = 1, dtype: Any = None, remat: bool = False,
                 layer_scale_init: float | None = None, rngs: nnx.Rngs):
        sd_rngs = rngs if "stochastic_depth" in rngs else None
        opts = dict(mode=mode, scaling=scaling, implementation=implementation, groups=groups,
                    rngs=sd_rngs)
        branch = dict(dtype=dtype, remat=remat, layer_scale_init=layer_scale_init, rngs=rngs)
        self.attn = StochasticDepth(AttentionBranch(width, num_heads, **branch), survival_prob,
                                    **opts)
        self.mlp = StochasticDepth(MlpBranch(width, mlp_dim, **branch), survival_prob, **opts)

    def __call__(self, x: Array, gates: tuple[Any, Any] = (None, None), *,
                 deterministic: bool | None = None) -> Array:
        """``x`` ``[batch, tokens, width]``; ``gates`` as :func:`vit.block_gates` returns."""
        _check_block_keys(self, (self.attn, self.mlp), gates, deterministic,
                          "vit.block_gates(key, i, p, ...)")
        x = self.attn(x, deterministic=deterministic, gate=gates[0], shortcut=x)
        return self.mlp(x, deterministic=deterministic, gate=gates[1], shortcut=x)


def _check_block_keys(block: nnx.Module, wrappers: tuple, gates: tuple, deterministic: Any,
                      draw: str) -> None:
    """Refuses a training call of a block whose wrappers would draw gates without a stream.

    A block takes its stream only from ``'stochastic_depth'`` (not ``nnx.Rngs(seed)``'s
    default one) and its call has no ``rngs=``, so the wrapper's own message would name a
    fix the block does not take.
    """
    if deterministic is not None:  # None: each wrapper's own flag
        ops.check_deterministic(deterministic)  # a traced flag: its own message, not Python's
    for sd, gate in zip(wrappers, gates):
        training = not (sd.deterministic if deterministic is None else deterministic)
        if training and gate is None and sd.rngs is None \
                and not ops.is_static_one(sd.survival_prob):
            raise ValueError(
                f"{type(block).__name__} in training needs gates or a 'stochastic_depth' "
                f"stream: build it with nnx.Rngs(params=..., stochastic_depth=seed) (blocks do "
                f"not draw from nnx.Rngs(seed)'s default stream), or pass gates from {draw} "
                f"(to evaluate: model.eval(), or deterministic=True).")


class ViT(nnx.Module):
    """NNX twin of :class:`stochastic_depth_jax.vit.ViT`; ``[batch, H, W, C]`` -> logits.

    Usage::

        model = ViT(10, size='ti', patch_size=4, drop_path_rate=0.1,
                    rngs=nnx.Rngs(params=0, stochastic_depth=1))
        logits = model(images)            # training: draws from 'stochastic_depth'
        model.eval(); logits = model(images)

    One key per forward pass (the stream's next key, or ``rngs=`` at call time); block i and
    branch j use ``fold_in(fold_in(key, i), j)``, as the Linen ViT.

    Args: as the Linen ViT (``in_channels`` is the image channel count), plus ``rngs``
    holding ``params`` and (for training without call-time keys) ``stochastic_depth``.
    """

    def __init__(self, num_classes: int, *, size: str = "s", patch_size: int = 16,
                 image_size: int = 224, in_channels: int = 3, pool: str = "token",
                 drop_path_rate: float = 0.0, drop_path_rule: str = "linear",
                 mode: str = "sample", scaling: str = "train", implementation: str = "skip",
                 groups: int = 1, width: int | None = None, depth: int | None = None,
                 num_heads: int | None = None, mlp_ratio: int = 4, dtype: Any = None,
                 deterministic: bool = False, remat: bool = False,
                 layer_scale_init: float | None = None, rngs: nnx.Rngs):
        linen_vit.check_remat(remat, "ViT")
        linen_vit.check_layer_scale_init(layer_scale_init, linen_vit.VIT_LAYER_SCALE)
        if pool not in linen_vit.POOLS:
            raise ValueError(f"Unknown pool {pool!r}; valid: {list(linen_vit.POOLS)}.")
        ops.validate_options(mode, scaling, implementation)
        width, depth, heads = linen_vit.vit_dims(size, width, depth, num_heads)
        linen_vit.check_patches((1, image_size, image_size, in_channels), patch_size)
        self.patch_size = patch_size
        self.pool, self.mode, self.implementation, self.groups = pool, mode, implementation, groups
        self.deterministic = deterministic
        self.probs = tuple(float(p) for p in
                           1.0 - linen_vit.drop_path_rates(depth, drop_path_rate, drop_path_rule))
        self.stem_conv = nnx.Conv(in_channels, width, (patch_size, patch_size),
                                  strides=(patch_size, patch_size), padding="VALID", dtype=dtype,
                                  rngs=rngs)
        tokens = (image_size // patch_size) ** 2 + (pool == "token")
        if pool == "token":
            self.cls = nnx.Param(jnp.zeros((1, 1, width), jnp.float32))
        self.pos_embed = nnx.Param(linen_vit.POS_INIT(rngs.params(), (1, tokens, width),
                                                      jnp.float32))
        self.blocks = nnx.List([
            EncoderBlock(width, heads, mlp_ratio * width, p, mode=mode, scaling=scaling,
                         implementation=implementation, groups=groups, dtype=dtype, remat=remat,
                         layer_scale_init=layer_scale_init, rngs=rngs)
            for p in self.probs
        ])
        self.norm = nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.head = _linear(width, num_classes, dtype, rngs, init=nnx.initializers.zeros)
        self.rngs = _as_stream(rngs if _has_stream(rngs, "stochastic_depth") else None,
                               "stochastic_depth")

    def __call__(self, x: Array, *, deterministic: bool | None = None,
                 rngs: RngsLike = None) -> Array:
        """Classifies ``x`` ``[batch, H, W, C]``; ``rngs`` (key, stream, Rngs) overrides."""
        deterministic = self.deterministic if deterministic is None else deterministic
        key = _forward_key(self, deterministic, rngs)
        linen_vit.check_patches(x.shape, self.patch_size)
        _check_channels("ViT", x.shape, self.stem_conv)
        image_shape = x.shape
        x = self.stem_conv(x)
        b, width = x.shape[0], x.shape[-1]
        x = x.reshape(b, -1, width)
        # The NNX ViT sizes its position embedding at construction (image_size=224 unless
        # told): name that argument, not only "a new model".
        h, w = image_shape[1:3]
        rebuild = (f"build it with image_size={h}" if h == w else
                   "crop or resize them to a square and build it with that image_size")
        linen_vit.check_tokens(self.pos_embed[...].shape[1], x.shape[1] + (self.pool == "token"),
                               image_shape, self.patch_size, rebuild)
        if self.pool == "token":
            cls = jnp.broadcast_to(self.cls[...], (b, 1, width)).astype(x.dtype)
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.pos_embed[...].astype(x.dtype)
        for i, (block, p) in enumerate(zip(self.blocks, self.probs)):
            gates = linen_vit.block_gates(key, i, p, mode=self.mode,
                                          implementation=self.implementation, batch_size=b,
                                          groups=self.groups)
            x = block(x, gates, deterministic=deterministic)
        x = self.norm(x)
        x = x[:, 0] if self.pool == "token" else jnp.mean(x, axis=1)
        return self.head(x)

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view``; ``nnx.view_info`` reads its Args section (it needs one).

        Args:
          deterministic: if True, evaluation (every block runs, scaled; no gates drawn).
        """
        if deterministic is not None:
            self.deterministic = deterministic


def _check_channels(model: str, image_shape: tuple[int, ...], stem: nnx.Conv) -> None:
    """ValueError unless the images have the channels the stem was built for (``in_channels``,
    3 unless told): grayscale images reached JAX's "lhs feature dimension size divided by
    feature_group_count must equal the rhs input feature dimension size"."""
    if image_shape[-1] != stem.in_features:
        raise ValueError(
            f"This {model} was built for {stem.in_features}-channel images "
            f"(in_channels={stem.in_features}), got images of shape {tuple(image_shape)} with "
            f"{image_shape[-1]}: build it with in_channels={image_shape[-1]}.")


def _forward_key(model: Any, deterministic: bool, rngs: RngsLike) -> Array | None:
    """The key of one forward pass of a ViT or ConvNeXt (None in evaluation or without drop
    path): from ``rngs`` if given, else the model's ``'stochastic_depth'`` stream."""
    ops.check_deterministic(deterministic)
    if deterministic or all(p >= 1.0 for p in model.probs):
        return None
    key = _key(rngs if rngs is not None else model.rngs, "stochastic_depth")
    if key is None:
        raise ValueError(f"{type(model).__name__} in training needs a 'stochastic_depth' key: "
                         "build it with nnx.Rngs(params=..., stochastic_depth=...) or pass "
                         "rngs=key (to evaluate: model.eval(), or deterministic=True).")
    return key


def load_linen_params(model: nnx.Module, params: Any) -> None:
    """Copies a Linen ViT's (or ConvNeXt's) ``params`` into the NNX ``model`` in place (same
    names).

    Linen's ``blocks_{i}`` is NNX's ``blocks[i]``; every other name is the same. ``params`` is
    ``variables['params']`` (the whole ``variables`` dict is accepted too). Raises ValueError
    when the two models differ in depth, names or shapes, or when the NNX model has a
    parameter the Linen one lacks (e.g. layer scale); nothing is copied then.
    """
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    if not isinstance(params, Mapping):
        raise ValueError(f"load_linen_params takes the Linen ViT's params (a mapping), got "
                         f"{type(params).__name__}.")
    linen_depth = sum(1 for name in params if str(name).startswith("blocks_"))
    if linen_depth != len(model.blocks):
        raise ValueError(f"The Linen parameters have {linen_depth} blocks, the NNX "
                         f"{type(model).__name__} {len(model.blocks)}: build the NNX model with "
                         f"the same size (or depth / depths).")
    updates = []
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(p, "key", p)) for p in path]
        try:
            node: Any = model
            for name in names[:-1]:
                if name.startswith("blocks_"):
                    node = node.blocks[int(name.removeprefix("blocks_"))]
                else:
                    node = getattr(node, name)
            variable = getattr(node, names[-1])
        except (AttributeError, IndexError, ValueError):
            raise ValueError(f"Parameter {'/'.join(names)} of the Linen model has no "
                             f"counterpart in the NNX {type(model).__name__} (different "
                             f"pool, layer scale or architecture?).") \
                from None
        if variable[...].shape != np.shape(value):
            raise ValueError(f"Parameter {'/'.join(names)}: NNX shape {variable[...].shape}, "
                             f"Linen shape {np.shape(value)}.")
        updates.append((variable, value))
    # A parameter the Linen model lacks (layer scale built with 0 there, 1e-6 here) kept its
    # initial value, and the two models differed without a word.
    loaded = {id(variable) for variable, _ in updates}
    missing = ["/".join(map(str, path)) for path, node in nnx.iter_graph(model)
               if isinstance(node, nnx.Param) and id(node) not in loaded]
    if missing:
        raise ValueError(f"The NNX {type(model).__name__} has parameters the Linen model lacks "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): "
                         f"build it as the Linen one (pool, layer_scale_init, architecture).")
    for variable, value in updates:  # all checked first: a failed load changes nothing
        variable[...] = jnp.asarray(value)


# ConvNeXt: the NNX twin of stochastic_depth_jax.convnext (same parameter names, same keys).


class ConvNeXtBranch(nnx.Module):
    """ConvNeXt residual branch ``gamma * pwconv2(gelu(pwconv1(norm(dwconv(x)))))``,
    ``[batch, H, W, C]`` in and out; twin of :class:`stochastic_depth_jax.convnext.
    ConvNeXtBranch` (no ``gamma`` when ``layer_scale_init`` is 0 or None); ``remat``: see
    :func:`_run_branch`."""

    def __init__(self, width: int, *, layer_scale_init: float | None = 1e-6,
                 mlp_ratio: int = 4, dtype: Any = None, remat: bool = False, rngs: nnx.Rngs):
        linen_vit.check_remat(remat, "ConvNeXtBranch")
        linen_convnext.check_layer_scale_init(layer_scale_init)
        self.remat = bool(remat)
        k = linen_convnext.KERNEL
        self.dwconv = nnx.Conv(width, width, (k, k), padding="SAME", feature_group_count=width,
                               kernel_init=linen_convnext.KERNEL_INIT, dtype=dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(width, epsilon=linen_convnext.EPS, dtype=dtype, rngs=rngs)
        self.pwconv1 = _linear(width, mlp_ratio * width, dtype, rngs, linen_convnext.KERNEL_INIT)
        self.pwconv2 = _linear(mlp_ratio * width, width, dtype, rngs, linen_convnext.KERNEL_INIT)
        _layer_scale(self, width, layer_scale_init)

    def __call__(self, x: Array) -> Array:
        return _run_branch(self, x)

    def forward(self, x: Array) -> Array:
        """The branch, never rematerialised."""
        y = self.pwconv1(self.norm(self.dwconv(x)))
        return _scaled(self, self.pwconv2(jax.nn.gelu(y, approximate=False)))


class ConvNeXtBlock(nnx.Module):
    """``x + DP(branch(x))`` with the kept outputs added into ``x`` in one scatter-add; twin
    of :class:`stochastic_depth_jax.convnext.ConvNeXtBlock`.

    Args:
      width: channels C; survival_prob: 1 - drop rate (static float).
      layer_scale_init, mlp_ratio, dtype: of the branch.
      mode, scaling, implementation, groups: of the drop path.
      remat: rematerialise the branch (``nnx.remat``): the same values and gradients, less
        memory kept for the backward pass.
      rngs: parameter initialisation (and the ``'stochastic_depth'`` stream, if present,
        for calls without a gate).
    """

    def __init__(self, width: int, survival_prob: float = 1.0, *,
                 layer_scale_init: float | None = 1e-6, mlp_ratio: int = 4,
                 mode: str = "sample", scaling: str = "train", implementation: str = "skip",
                 groups: int = 1, dtype: Any = None, remat: bool = False, rngs: nnx.Rngs):
        branch = ConvNeXtBranch(width, layer_scale_init=layer_scale_init, mlp_ratio=mlp_ratio,
                                dtype=dtype, remat=remat, rngs=rngs)
        self.drop_path = StochasticDepth(
            branch, survival_prob, mode=mode, scaling=scaling, implementation=implementation,
            groups=groups, rngs=rngs if "stochastic_depth" in rngs else None)

    def __call__(self, x: Array, gate: Any = None, *, deterministic: bool | None = None) -> Array:
        """``x`` ``[batch, H, W, C]``; ``gate`` as :func:`convnext.block_gate` returns."""
        _check_block_keys(self, (self.drop_path,), (gate,), deterministic,
                          "convnext.block_gate(key, j, p, ...)")
        return self.drop_path(x, deterministic=deterministic, gate=gate, shortcut=x)


class ConvNeXtDownsample(nnx.Module):
    """LayerNorm, then a 2x2 stride-2 convolution: ``[b, H, W, C]`` -> ``[b, H/2, W/2, out]``."""

    def __init__(self, width: int, features: int, *, dtype: Any = None, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(width, epsilon=linen_convnext.EPS, dtype=dtype, rngs=rngs)
        self.conv = nnx.Conv(width, features, (2, 2), strides=(2, 2), padding="VALID",
                             kernel_init=linen_convnext.KERNEL_INIT, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.conv(self.norm(x))


class ConvNeXt(nnx.Module):
    """NNX twin of :class:`stochastic_depth_jax.convnext.ConvNeXt`; ``[batch, H, W, C]`` ->
    logits.

    Usage::

        model = ConvNeXt(10, size='atto', stem_stride=2, drop_path_rate=0.1,
                         rngs=nnx.Rngs(params=0, stochastic_depth=1))
        logits = model(images)            # training: draws from 'stochastic_depth'
        model.eval(); logits = model(images)

    One key per forward pass (the stream's next key, or ``rngs=`` at call time); block j
    (over all stages) draws from ``fold_in(key, j)``, as the Linen ConvNeXt. Submodules
    ``stem_conv``, ``stem_norm``, ``downsample_{s}``, ``blocks[j]``, ``norm``, ``head``
    carry the Linen names (``load_linen_params`` copies a Linen ConvNeXt's parameters).

    Args: as the Linen ConvNeXt (``in_channels`` is the image channel count), plus ``rngs``
    holding ``params`` and (for training without call-time keys) ``stochastic_depth``.
    """

    def __init__(self, num_classes: int, *, size: str = "tiny", depths: Any = None,
                 dims: Any = None, stem_stride: int = 4, in_channels: int = 3,
                 drop_path_rate: float = 0.0, drop_path_rule: str = "linear",
                 layer_scale_init: float | None = 1e-6, mode: str = "sample",
                 scaling: str = "train", implementation: str = "skip", groups: int = 1,
                 mlp_ratio: int = 4, dtype: Any = None, deterministic: bool = False,
                 remat: bool = False, rngs: nnx.Rngs):
        linen_vit.check_remat(remat, "ConvNeXt")
        ops.validate_options(mode, scaling, implementation)
        depths, dims = linen_convnext.convnext_dims(size, depths, dims)
        linen_convnext.check_stem_stride(stem_stride)
        self.stem_stride, self.stages = stem_stride, len(depths)
        self.mode, self.implementation, self.groups = mode, implementation, groups
        self.deterministic = deterministic
        self.probs = tuple(float(p) for p in 1.0 - linen_vit.drop_path_rates(
            sum(depths), drop_path_rate, drop_path_rule))
        init = linen_convnext.KERNEL_INIT
        s = stem_stride
        self.stem_conv = nnx.Conv(in_channels, dims[0], (s, s), strides=(s, s),
                                  padding="VALID", kernel_init=init, dtype=dtype, rngs=rngs)
        self.stem_norm = nnx.LayerNorm(dims[0], epsilon=linen_convnext.EPS, dtype=dtype,
                                       rngs=rngs)
        for stage in range(1, len(dims)):  # Linen's names: downsample_0 ... downsample_{S-2}
            setattr(self, f"downsample_{stage - 1}",
                    ConvNeXtDownsample(dims[stage - 1], dims[stage], dtype=dtype, rngs=rngs))
        widths = [w for d, w in zip(depths, dims) for _ in range(d)]
        self.blocks = nnx.List([
            ConvNeXtBlock(w, p, layer_scale_init=layer_scale_init, mlp_ratio=mlp_ratio,
                          mode=mode, scaling=scaling, implementation=implementation,
                          groups=groups, dtype=dtype, remat=remat, rngs=rngs)
            for w, p in zip(widths, self.probs)
        ])
        # Blocks that follow a downsampling layer (the first of stages 2, 3, ...).
        self.stage_starts = tuple(int(e) for e in np.cumsum(depths)[:-1])
        self.norm = nnx.LayerNorm(dims[-1], epsilon=linen_convnext.EPS, dtype=dtype, rngs=rngs)
        self.head = _linear(dims[-1], num_classes, dtype, rngs, init)
        self.rngs = _as_stream(rngs if _has_stream(rngs, "stochastic_depth") else None,
                               "stochastic_depth")

    def __call__(self, x: Array, *, deterministic: bool | None = None,
                 rngs: RngsLike = None) -> Array:
        """Classifies ``x`` ``[batch, H, W, C]``; ``rngs`` (key, stream, Rngs) overrides."""
        deterministic = self.deterministic if deterministic is None else deterministic
        linen_convnext.check_image(x.shape, self.stem_stride, self.stages)
        _check_channels("ConvNeXt", x.shape, self.stem_conv)
        key = _forward_key(self, deterministic, rngs)
        x = self.stem_norm(self.stem_conv(x))
        for j, (block, p) in enumerate(zip(self.blocks, self.probs)):
            if j in self.stage_starts:  # first block of stage s + 1 follows downsample_{s}
                x = getattr(self, f"downsample_{self.stage_starts.index(j)}")(x)
            gate = linen_convnext.block_gate(key, j, p, mode=self.mode,
                                             implementation=self.implementation,
                                             batch_size=x.shape[0], groups=self.groups)
            x = block(x, gate, deterministic=deterministic)
        return self.head(self.norm(jnp.mean(x, axis=(1, 2))))

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view``; ``nnx.view_info`` reads its Args section (it needs one).

        Args:
          deterministic: if True, evaluation (every block runs, scaled; no gates drawn).
        """
        if deterministic is not None:
            self.deterministic = deterministic
