"""The skipping paths under explicit sharding (``AxisType.Explicit``, ``jax.make_mesh``'s
default since jax 0.10): batch-mode ``cond`` and drop-path subsets, on 8 CPU devices, against
the same computation on one device."""
import contextlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import stochastic_depth_jax as sdj
from stochastic_depth_jax import layers, nnx_layers, ops

B, T, D = 16, 3, 4
X = jax.random.normal(jax.random.key(0), (B, T, D))
W = jax.random.normal(jax.random.key(1), (D, D))
MOVES = re.compile(r"\b(all-gather|all-to-all|collective-permute|reduce-scatter)(-start)?\(")


def _mesh():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    return mesh


def _keys():
    """A key whose batch-mode gate (p = 0.5) is open and one whose gate is closed."""
    keys = {}
    for seed in range(32):
        keys.setdefault(bool(jax.random.bernoulli(jax.random.key(seed), 0.5)),
                        jax.random.key(seed))
    return keys


def _explicit(fn, x, *args, spec=P("data"), hlo=False, set_mesh=True):
    """``fn(x, *args)`` with ``x`` sharded as ``spec`` over an explicit mesh, under
    ``jax.set_mesh`` of it unless ``set_mesh=False``; returns the result and (with ``hlo``)
    the compiled program."""
    mesh = _mesh()
    with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
        x = jax.device_put(x, NamedSharding(mesh, spec))
        out = fn(x, *args)
        text = fn.lower(x, *args).compile().as_text() if hlo else None
    return out, text


def _close(got, want):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 got, want)


def _op_step(**opts):
    def loss(x, w, key):
        y = sdj.stochastic_depth(lambda v: jnp.tanh(v @ w), x, survival_prob=0.5, key=key,
                                 shortcut=x, **opts)
        return jnp.sum(y ** 2)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize("open_", [True, False])
def test_op_batch_mode_matches_one_device(open_):
    key = _keys()[open_]
    step = _op_step(mode="batch")
    want = step(X, W, key)
    got, _ = _explicit(step, X, W, key)
    _close(got, want)
    assert jax.typeof(got[1][0]).sharding.spec[0] == "data"  # the input's gradient stays sharded
    # A closed gate: the output is the shortcut, the weights get no gradient.
    assert np.any(np.asarray(got[1][1]) != 0) == open_


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_op_mask_implementation_matches_one_device(mode):
    step = _op_step(mode=mode, implementation="mask")
    key = jax.random.key(3)
    got, _ = _explicit(step, X, W, key)
    _close(got, step(X, W, key))


@pytest.mark.parametrize("groups, batch_axis, spec", [
    (4, 0, P("data")),
    (8, 1, P(None, "data")),
    (1, 0, P()),  # a replicated batch: any groups
])
def test_op_drop_path_subsets_match_one_device_and_stay_on_their_shards(groups, batch_axis,
                                                                         spec):
    step = _op_step(mode="sample", groups=groups, scaling="train", batch_axis=batch_axis)
    x = jnp.moveaxis(X, 0, batch_axis)
    key = jax.random.key(3)
    want = step(x, W, key)
    got, hlo = _explicit(step, x, W, key, spec=spec, hlo=True)
    _close(got, want)
    entry = lambda s: (tuple(s) + (None,) * 3)[batch_axis]
    assert entry(ops.explicit_sharding(got[1][0]).spec) == entry(spec)  # stays sharded
    # Some examples dropped (their input gradient is the shortcut's alone: 2 x).
    same = np.isclose(np.asarray(got[1][0]), 2 * np.asarray(x))
    dropped = np.all(same, axis=(1 - batch_axis, 2))
    assert 0 < dropped.sum() < B
    assert not MOVES.findall(hlo)


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_op_with_sharded_inputs_and_no_mesh_context(mode):
    """Inputs sharded over an explicit mesh, without ``jax.set_mesh`` (the input gradient
    only: the weight gradient of the branch's own matmul would need a mesh context)."""
    def loss(x, key):
        y = sdj.stochastic_depth(lambda v: jnp.tanh(v @ W), x, survival_prob=0.5, key=key,
                                 mode=mode, groups=4, shortcut=x)
        return jnp.sum(y ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    for open_ in (True, False) if mode == "batch" else (None,):
        key = jax.random.key(3) if open_ is None else _keys()[open_]
        got, hlo = _explicit(step, X, key, hlo=True, set_mesh=False)
        _close(got, step(X, key))
        assert ops.explicit_sharding(got[1]).spec[0] == "data"
        assert not MOVES.findall(hlo)


def test_op_drop_path_groups_not_a_multiple_of_the_data_shards_is_one_clear_error():
    step = _op_step(mode="sample", groups=2)
    with pytest.raises(ValueError, match=r"groups=2 is not a multiple of 4.*groups=4.*Auto"):
        _explicit(step, X, W, jax.random.key(3))


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D)(nn.gelu(nn.Dense(2 * D)(x)))


@pytest.mark.parametrize("mode, groups", [("batch", 1), ("sample", 4)])
def test_linen_wrapper_matches_one_device(mode, groups):
    sd = sdj.StochasticDepth(Mlp(parent=None), survival_prob=0.5, mode=mode, groups=groups)
    variables = sd.init(jax.random.key(0), X, deterministic=True)

    def loss(x, v, key):
        y = sd.apply(v, x, deterministic=False, shortcut=x, rngs={"stochastic_depth": key})
        return jnp.mean(y ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    kept = set()
    for seed in range(4 if mode == "batch" else 1):
        key = jax.random.key(seed)
        got, hlo = _explicit(step, X, variables, key, hlo=mode == "sample")
        _close(got, step(X, variables, key))
        kept.add(bool(np.any(np.asarray(got[1][1]["params"]["branch"]["Dense_0"]["kernel"]))))
    # Batch mode saw both gates (a closed one leaves the branch without gradient).
    assert kept == ({True, False} if mode == "batch" else {True})
    if mode == "sample":
        assert not MOVES.findall(hlo)


class NnxMlp(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, h):
        return jnp.tanh(self.fc(h))


@pytest.mark.parametrize("drop_path", [False, True])
def test_nnx_wrappers_match_one_device(drop_path):
    def make(seed):
        if drop_path:
            return nnx_layers.DropPath(NnxMlp(nnx.Rngs(0)), 0.5, groups=4,
                                       rngs=nnx.Rngs(stochastic_depth=seed))
        return nnx_layers.StochasticDepth(NnxMlp(nnx.Rngs(0)), 0.5, mode="batch",
                                          rngs=nnx.Rngs(stochastic_depth=seed))

    @nnx.jit
    def step(x, model):
        return nnx.value_and_grad(lambda m, x: jnp.mean(m(x, shortcut=x) ** 2))(model, x)

    kept = set()
    for seed in range(1 if drop_path else 4):
        want = step(X, make(seed))
        got, _ = _explicit(step, X, make(seed))
        _close(got, want)
        kept.add(bool(np.any(np.asarray(got[1]["branch"]["fc"]["kernel"][...]) != 0)))
    assert kept == ({True} if drop_path else {True, False})  # batch mode: both gates


@pytest.mark.parametrize("open_", [True, False])
def test_residual_block_skips_under_explicit_sharding(open_):
    """The library's blocks declare their output (``output_struct``) with the batch sharding,
    so the skipping ``cond`` traces (gradients: the ResNet train step below)."""
    block = layers.BasicBlock(features=8, strides=2)
    x = jax.random.normal(jax.random.key(0), (B, 8, 8, 4))
    variables = block.init(jax.random.key(0), x, train=False)
    fwd = jax.jit(lambda x, v: block.apply(v, x, 0.5, jnp.asarray(open_), train=True,
                                           mutable=["batch_stats"]))
    got, _ = _explicit(fwd, x, variables)
    _close(got, fwd(x, variables))
    assert ops.explicit_sharding(got[0]).spec[0] == "data"


@pytest.mark.parametrize("set_mesh", [True, False])
def test_resnet_train_step_matches_one_device(set_mesh):
    """A data-parallel train step of a library ResNet over an explicit mesh (``jax.make_mesh``'s
    default): the loss, the gradients and the BatchNorm statistics are the one-device
    step's, with a block skipped and the rest run, through the library's CPU convolution,
    whose weight gradient contracts the sharded batch (1x1, strided 3x3 and the 7x7 stem)."""
    model = sdj.ResNet(stage_sizes=(1, 2), width=4, num_classes=3)
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
    variables = model.init(jax.random.key(1), x, train=False)
    gates = jnp.array([True, False, True])

    def step(x, v):
        def loss(params):
            y, upd = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                                 train=True, gates=gates, mutable=["batch_stats"])
            return jnp.sum(y ** 2), upd
        return jax.value_and_grad(loss, has_aux=True)(v["params"])

    step = jax.jit(step)
    # Replicated on the mesh, as a pod user puts them (without the mesh context jax needs
    # that to resolve the head's weight gradient, a dot over the sharded batch).
    replicated = jax.device_put(variables, NamedSharding(_mesh(), P()))
    got, _ = _explicit(step, x, replicated, set_mesh=set_mesh)
    _close(got, step(x, variables))
