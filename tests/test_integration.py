"""The library inside users' own models: scan, remat, vmap, sharding, NNX transforms, mixed
precision, pytree inputs and batch-not-first layouts."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import stochastic_depth_jax as sdj
from stochastic_depth_jax import nnx_layers

B, T, D, L = 8, 3, 4, 6
X = jax.random.normal(jax.random.key(0), (B, T, D))


class Ones(nn.Module):
    """A branch returning ones, so ``out - x`` counts the kept layers per example."""

    @nn.compact
    def __call__(self, x):
        return jnp.ones_like(x) + self.param("b", nn.initializers.zeros, ())


class Mlp(nn.Module):
    dtype: object = None
    out: int = D

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(2 * D, dtype=self.dtype)(x))
        return nn.Dense(self.out, dtype=self.dtype)(h)


class ScanLayer(nn.Module):
    """One layer of an ``nn.scan`` stack; the scanned input is this layer's survival prob
    (None: the static 0.5)."""

    mode: str = "batch"
    implementation: str = "skip"
    branch: type = Ones

    @nn.compact
    def __call__(self, x, p):
        sd = sdj.StochasticDepth(self.branch(parent=None), survival_prob=0.5, mode=self.mode,
                                 implementation=self.implementation)
        return x + sd(x, deterministic=False, survival_prob=p), None


def _stack(split=True, **kw):
    return nn.scan(ScanLayer, variable_axes={"params": 0}, length=L,
                   split_rngs={"params": True, "stochastic_depth": split})(**kw)


def _kept_counts(model, variables, probs, keys=range(8), x=jnp.zeros((B, 2))):
    apply = jax.jit(lambda k: model.apply(variables, x, probs, rngs={"stochastic_depth": k})[0])
    return np.stack([np.asarray(apply(jax.random.key(i))[:, 0]) for i in keys])


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_linen_scan_gives_each_layer_its_own_gate_only_with_split_rngs(mode):
    probs = None  # the layers' static survival_prob=0.5
    x = jnp.zeros((B, 2))
    split = _stack(mode=mode)
    counts = _kept_counts(split, split.init(jax.random.key(0), x, probs), probs)
    assert len(set(counts.ravel())) > 2 and set(counts.ravel()) != {0.0, float(L)}
    assert len({tuple(c) for c in counts}) > 1  # fresh gates per key


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_linen_scan_without_split_rngs_says_what_to_add(mode):
    # Without the stream in split_rngs every layer would get the same key, so all layers
    # would be kept or dropped together; that is refused, eagerly and under jit.
    x = jnp.zeros((B, 2))
    shared = _stack(split=False, mode=mode)
    variables = shared.init(jax.random.key(0), x, None)
    message = r"scan over layers.*'stochastic_depth' is not split.*split_rngs="
    with pytest.raises(ValueError, match=message):
        _kept_counts(shared, variables, None, keys=[0])
    with pytest.raises(ValueError, match=message):
        shared.apply(variables, x, None, rngs={"stochastic_depth": jax.random.key(1)})
    # The same stacked layers under a jax.lax.scan of the user's own, the key closed over.
    layer, key = ScanLayer(mode=mode), jax.random.key(1)

    def body(h, layer_params):
        y, _ = layer.apply({"params": layer_params}, h, None, rngs={"stochastic_depth": key})
        return y, None

    with pytest.raises(ValueError, match=r"jax.random.split\(key, n\)"):
        jax.lax.scan(body, x, variables["params"])


@pytest.mark.parametrize("wrap", [lambda m: m, nn.remat])
def test_linen_scan_whose_split_rngs_leave_out_the_stream_says_to_add_it(wrap):
    # nn.scan passes on only the streams its split_rngs name: the layer had no gate stream,
    # and the error said apply() was not given one (it was), not where it was lost.
    stack = nn.scan(wrap(ScanLayer), variable_axes={"params": 0}, length=L,
                    split_rngs={"params": True})()
    x = jnp.zeros((B, 2))
    variables = stack.init(jax.random.key(0), x, None)
    with pytest.raises(ValueError, match=r"inside the Linen transform [a-z(]*scan\(\).*was "
                                         r"not given.*split_rngs=\{'params': True, "
                                         r"'stochastic_depth': True\}\."):
        stack.apply(variables, x, None, rngs={"stochastic_depth": jax.random.key(1)})

@pytest.mark.parametrize("wrap", [nn.remat, nn.jit])
def test_a_layer_under_remat_or_jit_alone_says_apply_was_not_given_the_stream(wrap):
    # nn.remat and nn.jit pass on every stream: the message blamed the split_rngs of an
    # nn.scan or nn.vmap that is not there.
    model = wrap(ScanLayer)()
    x = jnp.zeros((B, 2))
    variables = model.init(jax.random.key(0), x, None)
    with pytest.raises(ValueError) as caught:
        model.apply(variables, x, None)
    assert str(caught.value) == (
        "Training (train=True / deterministic=False) draws stochastic-depth gates from the "
        "rng stream 'stochastic_depth', which apply() was not given: pass "
        "rngs={'stochastic_depth': jax.random.fold_in(key, step)} (or evaluate with "
        "train=False / deterministic=True).")


def test_linen_scan_with_one_shared_layer_or_a_pre_drawn_gate_is_not_refused():
    x = jnp.zeros((B, 2))
    # Weights shared by every iteration (variable_broadcast), the stream not split: one
    # layer applied repeatedly (as an RNN cell over time); nothing to say.
    loop = nn.scan(ScanLayer, variable_broadcast="params", length=L,
                   split_rngs={"params": False, "stochastic_depth": False})()
    variables = loop.init(jax.random.key(0), x, None)
    y, _ = loop.apply(variables, x, None, rngs={"stochastic_depth": jax.random.key(1)})
    assert set(np.unique(np.asarray(y))) <= {0.0, float(L)}

    class GatedLayer(nn.Module):
        @nn.compact
        def __call__(self, h, gate):
            sd = sdj.StochasticDepth(Ones(parent=None), survival_prob=0.5)
            return h + sd(h, deterministic=False, gate=gate), None

    # One gate for every layer on purpose, passed in: taken as it is.
    stack = nn.scan(GatedLayer, variable_axes={"params": 0}, length=L,
                    split_rngs={"params": True}, in_axes=nn.broadcast)()
    gate = jnp.asarray(True)
    variables = stack.init(jax.random.key(0), x, gate)
    np.testing.assert_array_equal(stack.apply(variables, x, gate)[0], float(L))


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_a_scan_over_microbatches_with_one_key_is_not_refused(mode):
    # Gradient accumulation: a lax.scan over microbatches takes the gradient of parameters
    # closed over (the same in every iteration) with one key (one gate for the whole
    # batch in batch mode). Not a scan over layers: it was refused as one.
    model = ScanLayer(mode=mode, branch=Mlp)
    xs = jax.random.normal(jax.random.key(2), (3, B, D))
    params = model.init(jax.random.key(0), xs[0], None)["params"]
    key = jax.random.key(1)

    def grad(p, x):
        return jax.grad(lambda p: model.apply({"params": p}, x, None,
                                              rngs={"stochastic_depth": key})[0].sum())(p)

    def accumulate(p):
        return jax.lax.scan(lambda acc, x: (jax.tree.map(jnp.add, acc, grad(p, x)), None),
                            jax.tree.map(jnp.zeros_like, p), xs)[0]

    loop = jax.tree.map(lambda *g: sum(g), *[grad(params, x) for x in xs])
    for a, b in zip(jax.tree.leaves(jax.jit(accumulate)(params)), jax.tree.leaves(loop)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # A stack scanned without the stream split is still refused under grad and vmap.
    shared = _stack(split=False, mode=mode)
    x = jnp.zeros((B, 2))
    variables = shared.init(jax.random.key(0), x, None)
    keys = jax.random.split(key, 2)
    with pytest.raises(ValueError, match="is not split"):
        jax.grad(lambda v: shared.apply(v, x, None, rngs={"stochastic_depth": key})[0].sum())(
            variables)
    with pytest.raises(ValueError, match="is not split"):
        jax.vmap(lambda k: shared.apply(variables, x, None, rngs={"stochastic_depth": k}))(keys)

def test_linen_scan_takes_a_per_layer_rate_in_batch_mode():
    probs = jnp.asarray([1.0, 1.0, 1.0, 1e-7, 1e-7, 1e-7])  # traced inside the scan
    model = _stack(mode="batch")
    x = jnp.zeros((B, 2))
    counts = _kept_counts(model, model.init(jax.random.key(0), x, probs), probs)
    np.testing.assert_array_equal(counts, 3.0)
    grad = jax.jit(jax.grad(lambda v: model.apply(
        v, x, probs, rngs={"stochastic_depth": jax.random.key(1)})[0].sum()))(
        model.init(jax.random.key(0), x, probs))
    np.testing.assert_array_equal(grad["params"]["StochasticDepth_0"]["branch"]["b"],
                                  [B * 2.0] * 3 + [0.0] * 3)


def test_linen_scan_per_layer_rate_with_subsets_says_what_to_do():
    probs = jnp.asarray(sdj.linear_decay(L, 0.5))
    model = _stack(mode="sample")
    variables = model.init(jax.random.key(0), X, probs)
    with pytest.raises(ValueError, match=r"nn.scan.*unroll.*implementation='mask'"):
        model.apply(variables, X, probs, rngs={"stochastic_depth": jax.random.key(1)})
    masked = _stack(mode="sample", implementation="mask")
    y, _ = masked.apply(variables, X, probs, rngs={"stochastic_depth": jax.random.key(1)})
    assert y.shape == X.shape


class Block(nn.Module):
    mode: str = "batch"
    remat_branch: bool = False

    @nn.compact
    def __call__(self, x, train=True):
        branch = (nn.remat(Mlp) if self.remat_branch else Mlp)(parent=None, name="branch")
        sd = sdj.StochasticDepth(branch, survival_prob=0.5, mode=self.mode, name="sd")
        return x + sd(x, deterministic=not train)


class Net(nn.Module):
    mode: str = "batch"
    remat_block: bool = False
    remat_branch: bool = False

    @nn.compact
    def __call__(self, x, train=True):
        cls = nn.remat(Block, static_argnums=(2,)) if self.remat_block else Block
        for i in range(3):
            x = cls(self.mode, self.remat_branch, name=f"block{i}")(x, train)
        return x


def _grads(model, variables, key, x=X):
    loss = lambda v: jnp.sum(model.apply(v, x, True, rngs={"stochastic_depth": key}) ** 2)
    return jax.jit(jax.grad(loss))(variables)


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_remat_around_the_block_or_the_branch_changes_nothing(mode):
    plain = Net(mode)
    variables = plain.init(jax.random.key(0), X, False)
    key = jax.random.key(3)
    expected = _grads(plain, variables, key)
    for model in (Net(mode, remat_block=True), Net(mode, remat_branch=True)):
        got = _grads(model, variables, key)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     got, expected)


def test_vmap_per_example_gradients_share_the_batch_gate():
    model = Net("batch")
    variables = model.init(jax.random.key(0), X, False)
    key = jax.random.key(3)
    per_example = jax.vmap(lambda xi: _grads(model, variables, key, xi[None]))(X)
    for i in (0, 5):
        one = _grads(model, variables, key, X[i:i + 1])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6),
                     per_example, one)


def test_vmap_per_example_gradients_with_drop_path_gates_drawn_outside():
    sd = sdj.StochasticDepth(Mlp(parent=None), survival_prob=0.5, mode="sample",
                             scaling="train")
    variables = sd.init(jax.random.key(0), X, deterministic=True)
    gates = sdj.draw_gates(jax.random.key(1), jnp.asarray([0.5]), mode="sample",
                           batch_size=B)[0]  # bool [B]
    assert 0 < int(gates.sum()) < B

    def loss(v, x, gate):
        return jnp.sum((x + sd.apply(v, x, deterministic=False, gate=gate)) ** 2)

    per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(variables, X[:, None],
                                                                 gates[:, None])
    whole = jax.grad(loss)(variables, X, gates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a.sum(0), b, rtol=1e-5, atol=1e-5),
                 per_example, whole)


def test_jit_with_donated_activations():
    w = jax.random.normal(jax.random.key(1), (D, D))
    step = jax.jit(lambda x, key: sdj.stochastic_depth(
        lambda h: jnp.tanh(h @ w), x, survival_prob=0.5, key=key, mode="sample", shortcut=x),
        donate_argnums=(0,))
    x = jnp.array(X)
    expected = sdj.stochastic_depth(lambda h: jnp.tanh(h @ w), X, survival_prob=0.5,
                                    key=jax.random.key(2), mode="sample", shortcut=X)
    np.testing.assert_allclose(step(x, jax.random.key(2)), expected, rtol=1e-6)


@pytest.mark.parametrize("x_dtype, branch_dtype", [(jnp.float32, jnp.bfloat16),
                                                   (jnp.bfloat16, jnp.float32),
                                                   (jnp.float32, jnp.float16)])
def test_linen_batch_skipping_takes_a_branch_computing_in_another_dtype(x_dtype, branch_dtype):
    x = X.astype(x_dtype)
    outs = {}
    for impl in ("skip", "mask"):
        sd = sdj.StochasticDepth(Mlp(branch_dtype, parent=None), survival_prob=0.5,
                                 implementation=impl)
        variables = sd.init(jax.random.key(0), x, deterministic=True)
        for k in range(4):  # both gate values occur
            rngs = {"stochastic_depth": jax.random.key(k)}
            y = sd.apply(variables, x, deterministic=False, rngs=rngs)
            fused = sd.apply(variables, x, deterministic=False, rngs=rngs, shortcut=x)
            assert y.dtype == branch_dtype and fused.dtype == jnp.result_type(x_dtype, branch_dtype)
            np.testing.assert_array_equal(fused, x + y)
            outs[impl, k] = y
    for k in range(4):  # the same gates; 16-bit rounding differs between the two programs
        skip, mask = (np.asarray(outs[i, k], np.float32) for i in ("skip", "mask"))
        np.testing.assert_array_equal(skip == 0, mask == 0)
        np.testing.assert_allclose(skip, mask, rtol=2e-2, atol=1e-3)
    assert any(np.any(outs["skip", k] == 0) for k in range(4))
    assert any(np.all(outs["skip", k] != 0) for k in range(4))


def test_batch_skipping_takes_a_branch_that_changes_the_shape():
    sd = sdj.StochasticDepth(Mlp(out=2 * D, parent=None), survival_prob=0.5)
    variables = sd.init(jax.random.key(0), X, deterministic=True)
    ys = [sd.apply(variables, X, deterministic=False, rngs={"stochastic_depth": jax.random.key(k)})
          for k in range(4)]
    assert all(y.shape == (B, T, 2 * D) for y in ys)
    assert {bool(jnp.any(y != 0)) for y in ys} == {True, False}


class NnxWide(nnx.Module):
    def __init__(self, dtype, out, rngs):
        self.fc = nnx.Linear(D, out, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc(x)


@pytest.mark.parametrize("dtype, out", [(jnp.bfloat16, D), (jnp.float32, 2 * D)])
def test_nnx_batch_skipping_takes_another_dtype_or_shape(dtype, out):
    rngs = nnx.Rngs(params=0, stochastic_depth=1)
    sd = nnx_layers.StochasticDepth(NnxWide(dtype, out, rngs), 0.5, rngs=rngs)
    ys = [sd(X) for _ in range(6)]
    assert all(y.dtype == dtype and y.shape == (B, T, out) for y in ys)
    assert {bool(jnp.any(y != 0)) for y in ys} == {True, False}
    step = nnx.jit(lambda m, x: m(x))
    assert step(sd, X).dtype == dtype


class NnxSowing(nnx.Module):
    """A branch with BatchNorm that records its hidden activations (``sow``)."""

    def __init__(self, rngs):
        self.fc = nnx.Linear(D, D, rngs=rngs)
        self.bn = nnx.BatchNorm(D, rngs=rngs)

    def __call__(self, x):
        h = self.fc(x)
        self.sow(nnx.Intermediate, "hidden", h)
        return self.bn(h) + 1.0


@pytest.mark.parametrize("jit", [False, True])
def test_nnx_batch_skipping_under_nnx_capture_masks_as_linen_does(jit):
    # nnx.capture records what a branch sows; a skipping nnx.cond cannot record on one side
    # only (it raised "cond branch outputs must have the same pytree structure"), so the
    # wrapper masks instead: the outputs and BatchNorm statistics of 'mask', and the
    # intermediates recorded for closed gates too (as the Linen wrapper's intermediates).
    def build(implementation):
        rngs = nnx.Rngs(params=0, stochastic_depth=1)
        return nnx_layers.StochasticDepth(NnxSowing(rngs), 0.5, implementation=implementation,
                                          rngs=rngs)

    skip, mask = build("skip"), build("mask")
    forward = nnx.capture(lambda m, x, key: m(x, rngs=key), nnx.Intermediate)
    if jit:
        forward = nnx.jit(forward)
    kept = set()
    for seed in range(6):
        key = jax.random.key(seed)
        y, recorded = forward(skip, X, key)
        want, _ = forward(mask, X, key)
        np.testing.assert_allclose(y, want, rtol=1e-6)
        np.testing.assert_allclose(skip.branch.bn.mean[...], mask.branch.bn.mean[...],
                                   rtol=1e-6)
        assert [h.shape for h in recorded["branch"]["hidden"]] == [(B, T, D)]
        kept.add(bool(jnp.any(y != 0)))
    assert kept == {True, False}


# What this test does on purpose (newer Flax deprecates it; it still works).
@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)' outside:DeprecationWarning")
def test_nnx_batch_skipping_of_a_branch_sowing_outside_nnx_capture_masks():
    # Without nnx.capture a sow adds an nnx.Intermediate to the branch, which a skipping
    # nnx.cond cannot do on one side only either: masked, as 'mask', recorded every call.
    def build(implementation):
        rngs = nnx.Rngs(params=0, stochastic_depth=1)
        return nnx_layers.StochasticDepth(NnxSowing(rngs), 0.5, implementation=implementation,
                                          rngs=rngs)

    skip, mask = build("skip"), build("mask")
    kept = set()
    for seed in range(6):
        key = jax.random.key(seed)
        y, want = skip(X, rngs=key), mask(X, rngs=key)
        np.testing.assert_allclose(y, want, rtol=1e-6)
        np.testing.assert_allclose(skip.branch.bn.mean[...], mask.branch.bn.mean[...],
                                   rtol=1e-6)
        kept.add(bool(jnp.any(y != 0)))
    assert kept == {True, False} and len(skip.branch.hidden.get_value()) == 6


def _tree_branch(h):
    return {"a": jnp.tanh(h["a"]) + 1.0, "b": h["b"] * 2.0 + 1.0}


@pytest.mark.parametrize("mode, impl", [("batch", "skip"), ("batch", "mask"),
                                        ("sample", "skip"), ("sample", "mask")])
def test_raw_op_takes_pytree_activations(mode, impl):
    x = {"a": X, "b": X[:, 0]}
    key = jax.random.key(4)
    opts = dict(survival_prob=0.5, mode=mode, implementation=impl, scaling="train")
    y = sdj.stochastic_depth(_tree_branch, x, key=key, **opts)
    fused = sdj.stochastic_depth(_tree_branch, x, key=key, shortcut=x, **opts)
    jax.tree.map(lambda f, s, v: np.testing.assert_allclose(f, s + v, rtol=1e-6), fused, x, y)
    # Each example is kept or dropped in every leaf together, as a single array would be.
    kept_a = np.any(np.asarray(y["a"]) != 0, axis=(1, 2))
    np.testing.assert_array_equal(kept_a, np.any(np.asarray(y["b"]) != 0, axis=1))
    single = sdj.stochastic_depth(lambda h: jnp.tanh(h) + 1.0, X, key=key, **opts)
    np.testing.assert_allclose(y["a"], single, rtol=1e-6)
    evaluated = sdj.stochastic_depth(_tree_branch, x, deterministic=True, **opts)
    jax.tree.map(np.testing.assert_allclose, evaluated, _tree_branch(x))


def test_pytree_leaves_without_a_common_batch_axis_fail_clearly():
    x = {"a": X, "b": X[0]}  # 8 vs 3 along axis 0
    with pytest.raises(ValueError, match=r"different sizes \[3, 8\] along batch_axis=0"):
        sdj.stochastic_depth(_tree_branch, x, survival_prob=0.5, key=jax.random.key(0),
                             mode="sample")
    with pytest.raises(ValueError, match="needs a batch axis at batch_axis=3"):
        sdj.stochastic_depth(jnp.tanh, X, survival_prob=0.5, key=jax.random.key(0),
                             mode="sample", batch_axis=3)
    for bad in ("tokens", -2):  # a negative axis would differ between input and output ranks
        with pytest.raises(ValueError, match="batch_axis must be a non-negative integer"):
            sdj.stochastic_depth(jnp.tanh, X, survival_prob=0.5, key=jax.random.key(0),
                                 mode="sample", batch_axis=bad)
    with pytest.raises(ValueError, match="batch_axis must be a non-negative integer"):
        nnx_layers.DropPath(nnx.Linear(D, D, rngs=nnx.Rngs(0)), rate=0.5, batch_axis=-1,
                            rngs=nnx.Rngs(stochastic_depth=0))


@pytest.mark.parametrize("impl", ["skip", "mask"])
def test_batch_axis_gates_examples_in_a_tokens_first_layout(impl):
    key = jax.random.key(5)
    f = lambda h: jnp.tanh(h @ jnp.ones((D, D))) + 1.0
    opts = dict(survival_prob=0.5, key=key, mode="sample", implementation=impl,
                scaling="train", groups=2 if impl == "skip" else 1)
    xt = jnp.swapaxes(X, 0, 1)  # [tokens, batch, width]
    expected = sdj.stochastic_depth(f, X, **opts)
    got = sdj.stochastic_depth(f, xt, batch_axis=1, **opts)
    np.testing.assert_allclose(got, jnp.swapaxes(expected, 0, 1), rtol=1e-6)
    fused = sdj.stochastic_depth(f, xt, batch_axis=1, shortcut=xt, **opts)
    np.testing.assert_allclose(fused, xt + got, rtol=1e-6)
    # Whole examples are dropped, never single tokens.
    kept = np.any(np.asarray(got) != 0, axis=(0, 2))
    assert 0 < kept.sum() < B
    np.testing.assert_array_equal(np.all(np.asarray(got) != 0, axis=(0, 2)), kept)


def test_wrappers_take_batch_axis_and_pytrees():
    xt = jnp.swapaxes(X, 0, 1)
    key = jax.random.key(6)
    sd = sdj.StochasticDepth(Mlp(parent=None), survival_prob=0.5, mode="sample", batch_axis=1)
    variables = sd.init(jax.random.key(0), xt, deterministic=True)
    y = sd.apply(variables, xt, deterministic=False, rngs={"stochastic_depth": key})
    front = sdj.StochasticDepth(Mlp(parent=None), survival_prob=0.5, mode="sample")
    y0 = front.apply(variables, X, deterministic=False, rngs={"stochastic_depth": key})
    np.testing.assert_allclose(y, jnp.swapaxes(y0, 0, 1), rtol=1e-5, atol=1e-6)

    class Pair(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(D, D, rngs=rngs)

        def __call__(self, h):
            return self.fc(h[0]), jnp.tanh(h[1])

    rngs = nnx.Rngs(params=0, stochastic_depth=1)
    for mode in ("batch", "sample"):
        drop = nnx_layers.StochasticDepth(Pair(rngs), 0.5, mode=mode, batch_axis=1, rngs=rngs)
        out = drop((xt, xt))
        assert [o.shape for o in out] == [xt.shape, xt.shape]
        kept = np.any(np.asarray(out[1]) != 0, axis=(0, 2))
        np.testing.assert_array_equal(kept, np.any(np.asarray(out[0]) != 0, axis=(0, 2)))


class ShardedMlp(nn.Module):
    """A Megatron-style MLP: hidden units sharded over 'model'."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        h = nn.Dense(4 * D, kernel_init=nn.with_partitioning(init, (None, "model")))(x)
        return nn.Dense(D, kernel_init=nn.with_partitioning(init, ("model", None)))(nn.gelu(h))


class ShardedNet(nn.Module):
    mode: str
    groups: int = 1

    @nn.compact
    def __call__(self, x):
        for _ in range(3):
            sd = sdj.StochasticDepth(ShardedMlp(parent=None), survival_prob=0.5, mode=self.mode,
                                     groups=self.groups, scaling="train")
            x = sd(x, deterministic=False, shortcut=x)
        return x


MOVES = re.compile(r"\b(all-gather|all-to-all|collective-permute|reduce-scatter)(-start)?\(")


def _sharded_step(model, mesh_shape):
    devices = np.asarray(jax.devices()[:int(np.prod(mesh_shape))]).reshape(mesh_shape)
    mesh = jax.sharding.Mesh(devices, ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    x = jax.random.normal(jax.random.key(0), (16, T, D))
    boxed = model.init(jax.random.key(0), x)
    specs = nn.get_partition_spec(boxed)
    variables = jax.device_put(nn.meta.unbox(boxed),
                               jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    loss = lambda v, x, k: jnp.mean(model.apply(v, x, rngs={"stochastic_depth": k}) ** 2)
    step = jax.jit(jax.value_and_grad(loss))
    key = jax.random.key(7)
    value, grads = step(variables, x, key)
    hlo = step.lower(variables, x, key).compile().as_text()
    return float(value), jax.tree.map(np.asarray, grads), hlo


@pytest.mark.parametrize("mode, groups", [("batch", 1), ("sample", 4)])
def test_data_and_model_sharded_user_model_matches_one_device(mode, groups):
    assert jax.device_count() == 8
    model = ShardedNet(mode, groups)
    one, grads1, _ = _sharded_step(model, (1, 1))
    eight, grads8, hlo = _sharded_step(model, (4, 2))  # 4 data shards x 2 model shards
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads8, grads1)
    # Subsets drawn per data shard move no activations: only the tensor-parallel all-reduces.
    assert not MOVES.findall(hlo)


def _nnx_stack(mode):
    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.sd = nnx_layers.StochasticDepth(OnesNnx(rngs), 0.5, mode=mode, rngs=rngs)

        def __call__(self, h):
            return h + self.sd(h)

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return Layer(rngs)

    return make(nnx.Rngs(params=0, stochastic_depth=1))


class OnesNnx(nnx.Module):
    def __init__(self, rngs):
        self.b = nnx.Param(jnp.zeros(()))

    def __call__(self, h):
        return jnp.ones_like(h) + self.b[...]


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_nnx_scan_over_a_vmapped_stack_draws_per_layer_and_per_call(mode):
    model = _nnx_stack(mode)

    @nnx.jit
    def forward(model, h):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(layer, h):
            return layer(h)
        return body(model, h)

    counts = np.stack([np.asarray(forward(model, jnp.zeros((B, 2)))[:, 0]) for _ in range(6)])
    assert len(set(counts.ravel())) > 2  # layers differ (not all or nothing)
    assert len({tuple(c) for c in counts}) > 1  # calls differ
    model.eval()
    np.testing.assert_allclose(forward(model, jnp.zeros((B, 2))), L * 0.5)


def test_nnx_scan_with_call_time_keys_needs_one_key_per_layer():
    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.sd = nnx_layers.StochasticDepth(OnesNnx(rngs), 0.5)  # keys at call time

        def __call__(self, h, key):
            return h + self.sd(h, rngs=key)

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return Layer(rngs)

    stack = make(nnx.Rngs(params=0))

    def counts(key_axis, keys):
        body = nnx.scan(lambda layer, h, key: layer(h, key),
                        in_axes=(0, nnx.Carry, key_axis), out_axes=nnx.Carry)
        return {float(body(stack, jnp.zeros((B, 1)), k)[0, 0]) for k in keys}

    split = counts(0, [jax.random.split(jax.random.key(i), L) for i in range(8)])
    assert len(split) > 2
    # One key broadcast to every layer: every layer draws the same gate.
    assert counts(None, [jax.random.key(i) for i in range(8)]) <= {0.0, float(L)}


def test_nnx_scan_over_microbatches_with_one_key_is_not_refused():
    """Gradient accumulation: one layer broadcast into an nnx.scan over microbatches, one key
    from outside: every microbatch of the mini-batch gets the same gate, as it should. NNX
    passes the broadcast model through the scan's carry, so this cannot be told from a stack
    of layers given one key; a check that refused that mistake refused this too."""
    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.sd = nnx_layers.StochasticDepth(OnesNnx(rngs), 0.5)

        def __call__(self, h, key):
            return h + self.sd(h, rngs=key)

    layer, micro = Layer(nnx.Rngs(params=0)), jnp.zeros((4, B, 1))

    def accumulate(layer, micro, key):
        def body(layer, x):
            return nnx.grad(lambda m: jnp.sum(m(x, key)))(layer).sd.branch.b[...]
        return nnx.scan(body, in_axes=(None, 0), out_axes=0)(layer, micro)

    seen = set()
    for run in (accumulate, nnx.jit(accumulate)):
        for seed in range(8):
            grads = np.asarray(run(layer, micro, jax.random.key(seed)))
            assert len(set(grads.tolist())) == 1  # one gate for all the microbatches
            seen.add(float(grads[0]))
    assert seen == {0.0, float(B)}  # kept in some mini-batches, dropped in others

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return Layer(rngs)

    stack = make(nnx.Rngs(params=0))
    h = jnp.zeros((B, 1))
    # Keys split per layer and scanned over still draw per layer.
    split = nnx.jit(lambda s, h, keys: nnx.scan(lambda layer, h, k: layer(h, k),
                                                in_axes=(0, nnx.Carry, 0),
                                                out_axes=nnx.Carry)(s, h, keys))
    sums = {float(split(stack, h, jax.random.split(jax.random.key(i), L))[0, 0])
            for i in range(8)}
    assert len(sums) > 2
