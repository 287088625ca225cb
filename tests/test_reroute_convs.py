"""Stock flax.linen.Conv (and flax.nnx.Conv) layers inside StochasticDepth are rerouted to the
CPU-friendly conv with unchanged parameters, values and gradients; unsupported configurations
fall back."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from stochastic_depth_jax import DropPath, StochasticDepth, nnx_layers, ops
from stochastic_depth_jax.conv import reroute_flax_convs, reroute_nnx_convs

# nn.Conv keyword sets: strides, padding modes, groups (falls back), bias, dilation (falls back).
CONV_CONFIGS = [
    dict(kernel_size=(3, 3)),
    dict(kernel_size=(3, 3), strides=2, use_bias=False),
    dict(kernel_size=(3, 3), padding="VALID"),
    dict(kernel_size=(2, 3), strides=(2, 1), padding=((1, 2), (0, 1))),
    dict(kernel_size=(3, 3), padding="CIRCULAR"),
    dict(kernel_size=(1, 1), strides=2),
    dict(kernel_size=(3, 3), feature_group_count=2),
    dict(kernel_size=(3, 3), kernel_dilation=2),
]


class Branch(nn.Module):
    """conv (config under test) - BN - ReLU - conv 3x3 SAME, stock Flax layers."""

    conv_kwargs: dict

    @nn.compact
    def __call__(self, x, *, train):
        y = nn.Conv(4, **self.conv_kwargs)(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train)(y))
        return nn.Conv(4, (3, 3))(y)

    def output_struct(self, x):
        return jax.eval_shape(lambda v: self.clone(parent=None).init_with_output(
            jax.random.key(0), v, train=False)[0], x)


def _wrapped(conv_kwargs, reroute):
    return StochasticDepth(Branch(conv_kwargs, parent=None), survival_prob=0.5,
                           reroute_convs=reroute)


def _uses_custom_conv(fn, *args):
    return "custom_vjp_call" in str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("conv_kwargs", CONV_CONFIGS)
def test_rerouted_branch_matches_stock(conv_kwargs):
    x = jax.random.normal(jax.random.key(0), (2, 7, 8, 4))
    fast, stock = _wrapped(conv_kwargs, "always"), _wrapped(conv_kwargs, "never")
    v_fast = fast.init(jax.random.key(1), x, deterministic=True, train=False)
    v_stock = stock.init(jax.random.key(1), x, deterministic=True, train=False)
    # Same parameter names, shapes and initial values: checkpoints are interchangeable.
    jax.tree_util.tree_map(np.testing.assert_array_equal, v_fast, v_stock)

    def loss(module, params, gate):
        y, upd = module.apply({**v_stock, "params": params}, x, deterministic=False,
                              gate=gate, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), (y, upd)

    for gate in (True, False):
        (l_f, (y_f, u_f)), g_f = jax.jit(jax.value_and_grad(
            lambda p: loss(fast, p, gate), has_aux=True))(v_stock["params"])
        (l_s, (y_s, u_s)), g_s = jax.jit(jax.value_and_grad(
            lambda p: loss(stock, p, gate), has_aux=True))(v_stock["params"])
        np.testing.assert_allclose(y_f, y_s, rtol=1e-5, atol=1e-5)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                                       atol=1e-4), g_f, g_s)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                                       atol=1e-6), u_f, u_s)
    fallback = "feature_group_count" in conv_kwargs or "kernel_dilation" in conv_kwargs
    first = nn.Conv(4, **conv_kwargs)
    w = first.init(jax.random.key(2), x)
    with reroute_flax_convs("always"):
        rerouted = _uses_custom_conv(lambda v: first.apply(w, v), x)
    assert rerouted != fallback


def test_auto_reroutes_on_cpu_only_and_never_leaves_stock():
    x = jnp.ones((1, 6, 6, 3))
    conv = nn.Conv(2, (3, 3))
    w = conv.init(jax.random.key(0), x)
    with reroute_flax_convs("auto"):
        assert _uses_custom_conv(lambda v: conv.apply(w, v), x) == (jax.default_backend() == "cpu")
    with reroute_flax_convs("never"):
        assert not _uses_custom_conv(lambda v: conv.apply(w, v), x)
    # Outside the context the module is stock again (the swapped field was restored).
    assert not _uses_custom_conv(lambda v: conv.apply(w, v), x)


def test_user_conv_function_is_respected_and_bad_option_rejected():
    x = jnp.ones((1, 6, 6, 3))
    conv = nn.Conv(2, (3, 3), conv_general_dilated=jax.lax.conv_general_dilated)
    w = conv.init(jax.random.key(0), x)
    with reroute_flax_convs("always"):
        assert not _uses_custom_conv(lambda v: conv.apply(w, v), x)
    with pytest.raises(ValueError, match="reroute_convs"):
        _wrapped({"kernel_size": (3, 3)}, "sometimes").init(
            jax.random.key(0), jnp.ones((1, 6, 6, 4)), deterministic=True, train=False)


class NnxBranch(nnx.Module):
    """The NNX twin of :class:`Branch`: stock ``nnx.Conv`` (config under test) - BatchNorm -
    ReLU - conv 3x3 SAME."""

    def __init__(self, conv_kwargs, rngs):
        self.conv1 = nnx.Conv(4, 4, **conv_kwargs, rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.conv2 = nnx.Conv(4, 4, (3, 3), rngs=rngs)

    def __call__(self, x):
        return self.conv2(nnx.relu(self.norm(self.conv1(x))))


def _nnx_wrapped(conv_kwargs, mode, **reroute):
    rngs = nnx.Rngs(params=1, stochastic_depth=2)
    return nnx_layers.StochasticDepth(NnxBranch(conv_kwargs, rngs), 0.5, mode=mode, rngs=rngs,
                                      **reroute)


def _nnx_step(model, x, gate):
    """Output, parameter gradients and BatchNorm statistics of one training call, and
    whether it computed through the library's convolution; the model is left unchanged."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest):
        m = nnx.merge(graphdef, params, rest, copy=True)  # copy: jax.grad mutates BatchStat
        y = m(x, gate=gate, deterministic=False)
        return jnp.sum(jnp.sin(y)), (y, nnx.state(m, nnx.BatchStat))

    run = jax.value_and_grad(loss, has_aux=True)
    (_, (y, stats)), grads = jax.jit(run)(params, rest)
    return y, grads, stats, _uses_custom_conv(loss, params, rest)


@pytest.mark.parametrize("conv_kwargs", [CONV_CONFIGS[1], CONV_CONFIGS[4], CONV_CONFIGS[6]])
@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_nnx_wrapper_reroutes_stock_convs_by_default(conv_kwargs, mode):
    # nnx.Conv's gradient inside the batch-mode nnx.cond ran on XLA:CPU's slow path: a
    # wrapped stock-NNX branch at survival 0.5 trained 8x slower than at 1.0 (Linen: 0.5x).
    x = jax.random.normal(jax.random.key(0), (4, 7, 8, 4))
    fast = _nnx_wrapped(conv_kwargs, mode)
    gates = ((True, False) if mode == "batch"
             else (ops.draw_gate(jax.random.key(3), 0.5, mode="sample", batch_size=4),))
    fallback = "feature_group_count" in conv_kwargs
    for gate in gates:
        y_f, g_f, s_f, rerouted = _nnx_step(fast, x, gate)
        assert rerouted == (jax.default_backend() == "cpu")  # conv2 at least
        stock = _nnx_wrapped(conv_kwargs, mode, reroute_convs="never")
        y_s, g_s, s_s, stock_rerouted = _nnx_step(stock, x, gate)
        np.testing.assert_allclose(y_f, y_s, rtol=1e-5, atol=1e-5)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                                       atol=1e-4), g_f, g_s)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                                       atol=1e-6), s_f, s_s)
        assert not stock_rerouted
    with reroute_nnx_convs(fast, "always"):  # the configuration under test, or its fallback
        assert _uses_custom_conv(fast.branch.conv1, x) != fallback
    # The swap is undone: the module (its graph) is as built.
    assert fast.branch.conv1.conv_general_dilated is jax.lax.conv_general_dilated
    assert nnx.graphdef(fast) == nnx.graphdef(_nnx_wrapped(conv_kwargs, mode))


def test_nnx_reroute_respects_user_conv_and_rejects_bad_option():
    x = jnp.ones((1, 6, 6, 3))
    own = lambda *a, **k: jax.lax.conv_general_dilated(*a, **k)  # noqa: E731
    conv = nnx.Conv(3, 2, (3, 3), conv_general_dilated=own, rngs=nnx.Rngs(0))
    with reroute_nnx_convs(conv, "always"):
        assert conv.conv_general_dilated is own
        assert not _uses_custom_conv(lambda v: conv(v), x)
    stock = nnx.Conv(3, 2, (3, 3), rngs=nnx.Rngs(0))
    with reroute_nnx_convs(nnx.Sequential(stock), "always"):  # convs nested in the graph
        assert _uses_custom_conv(lambda v: stock(v), x)
    with reroute_nnx_convs(jnp.tanh, "always"):  # a plain function: nothing to reroute
        pass
    # A call that names its output sharding (explicit mesh axes) goes to lax with it.
    mesh = jax.make_mesh((len(jax.devices()),), ("data",),
                         axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
        xs = jax.device_put(jnp.ones((len(jax.devices()), 6, 6, 3)), P("data"))
        want = stock(xs, out_sharding=P("data"))
        with reroute_nnx_convs(stock, "always"):
            assert not _uses_custom_conv(lambda v: stock(v, out_sharding=P("data")), xs)
            np.testing.assert_array_equal(stock(xs, out_sharding=P("data")), want)
    with pytest.raises(ValueError, match="reroute_convs"):
        nnx_layers.StochasticDepth(stock, 0.5, reroute_convs="sometimes")


def _custom_convs(fn, *args):
    return str(jax.make_jaxpr(fn)(*args)).count("custom_vjp_call[")


class _OuterBranch(nn.Module):
    """A stock conv plus a wrapped stock conv whose wrapper sets ``inner_reroute``."""

    inner_reroute: str

    @nn.compact
    def __call__(self, h, *, train):
        inner = StochasticDepth(nn.Conv(3, (3, 3), parent=None), 0.5,
                                reroute_convs=self.inner_reroute)
        return nn.Conv(3, (3, 3))(h) + inner(h, deterministic=not train)


class _NnxOuterBranch(nnx.Module):
    def __init__(self, inner_reroute, rngs):
        self.conv = nnx.Conv(3, 3, (3, 3), rngs=rngs)
        self.inner = nnx_layers.StochasticDepth(nnx.Conv(3, 3, (3, 3), rngs=rngs), 0.5,
                                                rngs=rngs, reroute_convs=inner_reroute)

    def __call__(self, h):
        return self.conv(h) + self.inner(h)


@pytest.mark.parametrize("inner", ["never", "always"])
def test_innermost_reroute_setting_decides(inner):
    # A wrapper with reroute_convs='never' in the branch of one that reroutes (e.g. for
    # jax.jvp of a jitted function, README "Forward-mode autodiff") was ignored: the
    # enclosing rerouting still handed its convolutions the custom-gradient convolution.
    x = jnp.ones((2, 6, 6, 3))
    want = 2 if inner == "always" else 1  # the outer branch's own conv is rerouted in both
    outer = StochasticDepth(_OuterBranch(inner, parent=None), 0.5, reroute_convs="always")
    v = outer.init(jax.random.key(0), x, deterministic=True, train=False)
    for train in (False, True):
        run = lambda v, x: outer.apply(  # noqa: E731
            v, x, deterministic=not train, train=train,
            rngs={"stochastic_depth": jax.random.key(1)})
        assert _custom_convs(run, v, x) == want
    rngs = nnx.Rngs(params=0, stochastic_depth=1)
    model = nnx_layers.StochasticDepth(_NnxOuterBranch(inner, rngs), 0.5, rngs=rngs,
                                       reroute_convs="always")
    graphdef, state = nnx.split(model)

    def train_call(state, x):
        return nnx.merge(graphdef, state, copy=True)(x, rngs=jax.random.key(1))

    assert _custom_convs(train_call, state, x) == want
    model.eval()
    assert _custom_convs(lambda v: model(v), x) == want
    for conv in (model.branch.conv, model.branch.inner.branch):  # the swaps are undone
        assert conv.conv_general_dilated is jax.lax.conv_general_dilated
    # The contexts themselves: the inner one decides within it, the outer one after it.
    conv = nn.Conv(2, (3, 3))
    w = conv.init(jax.random.key(0), x)
    nconv = nnx.Conv(3, 2, (3, 3), rngs=nnx.Rngs(0))
    with reroute_flax_convs("always"), reroute_nnx_convs(nconv, "always"):
        with reroute_flax_convs(inner), reroute_nnx_convs(nconv, inner):
            assert _uses_custom_conv(lambda v: conv.apply(w, v), x) == (inner == "always")
            assert _uses_custom_conv(lambda v: nconv(v), x) == (inner == "always")
        assert _uses_custom_conv(lambda v: conv.apply(w, v), x)
        assert _uses_custom_conv(lambda v: nconv(v), x)
    assert not _uses_custom_conv(lambda v: conv.apply(w, v), x)
    assert not _uses_custom_conv(lambda v: nconv(v), x)


class _ScanVmapConvs(nn.Module):
    """Stock convs inside ``nn.scan``, ``nn.remat`` and ``nn.vmap`` (per-slice kernels)."""

    @nn.compact
    def __call__(self, h):
        class Body(nn.Module):
            @nn.compact
            def __call__(self, c, _):
                return nn.relu(nn.Conv(3, (3, 3))(c)), None

        h = nn.scan(Body, variable_axes={"params": 0}, split_rngs={"params": True},
                    length=2)()(h, None)[0]
        h = nn.remat(nn.Conv)(3, (3, 3), strides=2)(h)
        per_slice = nn.vmap(nn.Conv, variable_axes={"params": 0}, split_rngs={"params": True})
        return per_slice(3, (3, 3))(h[None])[0]


# (module, input shape, dtype, whether the stock conv is rerouted): every option a stock
# Linen conv can carry; what the CPU-friendly conv does not cover computes as stock.
LINEN_OPTIONS = {
    "reflect": (nn.Conv(4, (3, 3), padding="REFLECT"), (2, 6, 7, 3), jnp.float32, True),
    "negative-pads": (nn.Conv(4, (3, 3), strides=2, padding=((-1, 2), (1, -1))), (2, 7, 8, 3),
                      jnp.float32, True),
    "no-batch-axis": (nn.Conv(4, (3, 3), strides=(1, 2)), (6, 7, 3), jnp.float32, True),
    "two-batch-axes": (nn.Conv(4, (3, 3)), (2, 2, 6, 7, 3), jnp.float32, True),
    "mask": (nn.Conv(4, (3, 3), mask=jnp.tril(jnp.ones((3, 3, 3, 4)))), (2, 6, 7, 3),
             jnp.float32, True),
    "bf16": (nn.Conv(4, (3, 3), dtype=jnp.bfloat16), (2, 6, 7, 3), jnp.float32, True),
    "f16": (nn.Conv(4, (3, 3), param_dtype=jnp.float16), (2, 6, 7, 3), jnp.float16, True),
    "scan-remat-vmap": (_ScanVmapConvs(), (2, 6, 7, 3), jnp.float32, True),
    "stride-4": (nn.Conv(4, (4, 4), strides=4), (2, 8, 8, 3), jnp.float32, True),
    "1x1-stride-8": (nn.Conv(4, (1, 1), strides=8), (2, 9, 9, 3), jnp.float32, True),
    # Its gradient as the stride-1 conv's costs 64x that conv's: XLA's own is faster.
    "patchify-8": (nn.Conv(4, (8, 8), strides=8), (2, 16, 16, 3), jnp.float32, False),
    "input-dilation": (nn.Conv(4, (3, 3), input_dilation=2, padding=1), (2, 6, 7, 3),
                       jnp.float32, False),
    "depthwise": (nn.Conv(4, (3, 3), feature_group_count=4), (2, 6, 7, 4), jnp.float32, False),
    "precision": (nn.Conv(4, (3, 3), precision="highest"), (2, 6, 7, 3), jnp.float32, False),
    "1-D causal": (nn.Conv(4, (3,), padding="CAUSAL"), (2, 7, 3), jnp.float32, False),
    "3-D": (nn.Conv(4, (2, 2, 2)), (2, 3, 4, 4, 3), jnp.float32, False),
    "transpose": (nn.ConvTranspose(4, (3, 3), strides=(2, 2)), (2, 6, 7, 3), jnp.float32,
                  False),
    "local": (nn.ConvLocal(4, (3, 3)), (2, 6, 7, 3), jnp.float32, False),
}


@pytest.mark.parametrize("name", list(LINEN_OPTIONS))
def test_stock_linen_conv_options_rerouted_or_stock(name):
    module, shape, dtype, rerouted = LINEN_OPTIONS[name]
    x = jax.random.normal(jax.random.key(0), shape).astype(dtype)
    v = module.init(jax.random.key(1), x)

    def loss(v, x, when):
        with reroute_flax_convs(when):
            y = module.apply(v, x)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    run = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)
    (_, y_f), g_f = run(v, x, "always")
    (_, y_s), g_s = run(v, x, "never")
    low = jnp.finfo(y_f.dtype).bits == 16  # gradients in half precision: its rounding
    tol = dict(rtol=5e-2, atol=5e-2) if low else dict(rtol=1e-5, atol=1e-5)
    assert y_f.dtype == y_s.dtype
    np.testing.assert_allclose(np.float32(y_f), np.float32(y_s), **tol)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
        np.float32(a), np.float32(b), **tol), g_f, g_s)
    assert _uses_custom_conv(lambda v, x: loss(v, x, "always"), v, x) == rerouted


@pytest.mark.parametrize("kwargs, shape, rerouted", [
    (dict(kernel_size=(3, 3), dtype=jnp.bfloat16), (2, 6, 7, 3), True),
    (dict(kernel_size=(3, 3), mask=jnp.tril(jnp.ones((3, 3, 3, 4)))), (6, 7, 3), True),
    (dict(kernel_size=(3, 3), dtype=jnp.bfloat16, preferred_element_type=jnp.float32),
     (2, 6, 7, 3), False),
    (dict(kernel_size=(3,), padding="CAUSAL"), (2, 7, 3), False),
    (dict(kernel_size=(3, 3), input_dilation=2, padding=1), (2, 6, 7, 3), False),
])
def test_stock_nnx_conv_options_rerouted_or_stock(kwargs, shape, rerouted):
    conv = nnx.Conv(3, 4, rngs=nnx.Rngs(0), **kwargs)
    x = jax.random.normal(jax.random.key(0), shape)
    graphdef, params = nnx.split(conv)

    def loss(params, x, when):
        m = nnx.merge(graphdef, params, copy=True)
        with reroute_nnx_convs(m, when):
            y = m(x)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    run = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)
    (_, y_f), g_f = run(params, x, "always")
    (_, y_s), g_s = run(params, x, "never")
    tol = dict(rtol=5e-2, atol=5e-2) if "dtype" in kwargs else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.float32(y_f), np.float32(y_s), **tol)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
        np.float32(a), np.float32(b), **tol), g_f, g_s)
    assert _uses_custom_conv(lambda p, x: loss(p, x, "always"), params, x) == rerouted


def test_rerouted_branch_second_order_matches_stock():
    # jax.hessian (forward over reverse) differentiates the custom gradient's backward pass;
    # plain jax.jvp computes stock convs instead (README, "Forward-mode autodiff").
    x = jax.random.normal(jax.random.key(0), (1, 3, 3, 2))
    branch = nn.Sequential([nn.Conv(2, (3, 3), strides=2), jnp.tanh, nn.Conv(2, (2, 2))],
                           parent=None)
    hessians = {}
    for when in ("always", "never"):
        wrapped = StochasticDepth(branch, 0.5, reroute_convs=when)
        v = wrapped.init(jax.random.key(1), x, deterministic=True)

        def f(x):
            return jnp.sum(jnp.sin(wrapped.apply(v, x, deterministic=False, gate=True)))

        hessians[when] = jax.jit(jax.hessian(f))(x)
        if when == "never":
            assert np.isfinite(jax.jvp(f, (x,), (jnp.ones_like(x),))[1])
    np.testing.assert_allclose(hessians["always"], hessians["never"], rtol=1e-5, atol=1e-6)
    assert np.abs(hessians["never"]).sum() > 0


def test_the_reroute_setting_is_per_thread_and_undone_after_an_exception(monkeypatch):
    """The innermost reroute_flax_convs decides through a per-thread flag: another thread's
    convs stay stock while one thread reroutes, and an exception in the context restores
    the enclosing setting (Linen), as it restores the swapped NNX layers."""
    import threading

    from jax import lax

    from stochastic_depth_jax import conv as conv_lib

    rerouted = []
    real = conv_lib.conv_general_dilated

    def spy(*args, **kwargs):
        rerouted.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(conv_lib, "conv_general_dilated", spy)
    x = jnp.ones((1, 5, 5, 2))
    conv = nn.Conv(3, (3, 3))
    variables = conv.init(jax.random.key(0), x)
    entered, applied = threading.Event(), threading.Event()

    def rerouting():
        with reroute_flax_convs("always"):
            entered.set()
            applied.wait(timeout=60)
            conv.apply(variables, x)

    def stock():
        entered.wait(timeout=60)
        conv.apply(variables, x)
        applied.set()

    threads = [threading.Thread(target=rerouting, name="rerouting"),
               threading.Thread(target=stock, name="stock")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rerouted == ["rerouting"]
    with pytest.raises(RuntimeError):
        with reroute_flax_convs("always"):
            with reroute_flax_convs("never"):
                raise RuntimeError
    rerouted.clear()
    conv.apply(variables, x)
    assert rerouted == []
    layer = nnx.Conv(2, 3, (3, 3), rngs=nnx.Rngs(0))
    with pytest.raises(RuntimeError):
        with reroute_nnx_convs(layer, "always"):
            with reroute_nnx_convs(layer, "never"):
                assert layer.conv_general_dilated is lax.conv_general_dilated
                raise RuntimeError
    assert layer.conv_general_dilated is lax.conv_general_dilated


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("when", ["always", "never"])
def test_nnx_function_branch_built_in_call_reroutes_the_convs_it_uses(when, remat):
    """A function branch made inside the user's __call__ (so it sees nnx.jit's copy of the
    layers) computed its convs with XLA's, slow inside the cond on the CPU, silently; so did
    one wrapped in nnx.remat (its wrappers hid the function)."""
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 3, (3, 3), rngs=rngs)

        def __call__(self, x, key):
            branch = lambda v: jnp.tanh(self.conv(v))  # noqa: E731
            sd = nnx_layers.StochasticDepth(nnx.remat(branch) if remat else branch, 0.5,
                                            reroute_convs=when)
            return x + sd(x, rngs=key)

    block = Block(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
    key = next(jax.random.key(s) for s in range(32) if bool(ops.draw_gate(jax.random.key(s),
                                                                            0.5)))
    forward = nnx.jit(lambda m, v: m(v, key))
    graphdef, state = nnx.split(block)
    pure = lambda s, v: forward(nnx.merge(graphdef, s), v)  # noqa: E731
    assert _uses_custom_conv(pure, state, x) == (when == "always")
    step = nnx.jit(nnx.grad(lambda m, v: jnp.sum(m(v, key) ** 2)))
    assert block.conv.conv_general_dilated is jax.lax.conv_general_dilated  # restored
    stock = nnx_layers.StochasticDepth(nnx.Sequential(block.conv, jnp.tanh), 0.5,
                                       reroute_convs="never")
    want = nnx.grad(lambda s: jnp.sum((x + s(x, rngs=key)) ** 2))(stock)
    np.testing.assert_allclose(step(block, x)["conv"]["kernel"][...],
                               want["branch"]["layers"][0]["kernel"][...], rtol=1e-4,
                               atol=1e-5)


def _rerouting(fn, *args):
    """``fn(*args)`` and how many convolutions (NNX: branches) its tracing rerouted."""
    from stochastic_depth_jax import conv as conv_lib
    before = getattr(conv_lib._LINEN, "rerouted", 0)
    out = fn(*args)
    return out, getattr(conv_lib._LINEN, "rerouted", 0) - before


def _forward_derivatives(f, primals, names=None):
    """f's forward-mode derivatives at ``primals`` (a tuple of pytrees), eagerly and under
    jit around the transform: {name: (value, convolutions rerouted)}, for the ``names``
    given (default all)."""
    tangents = jax.tree.map(jnp.cos, primals)
    argnums = tuple(range(len(primals)))
    transforms = {"jvp": lambda *p: jax.jvp(f, p, tangents),
                  "jacfwd": jax.jacfwd(f, argnums=argnums),
                  "linearize": lambda *p: jax.linearize(f, *p)[1](*tangents)}
    transforms.update({f"jit({k})": jax.jit(t) for k, t in list(transforms.items())})
    return {name: _rerouting(t, *primals) for name, t in transforms.items()
            if names is None or name in names}


def _same_derivatives(rerouted, stock):
    """The rerouting wrapper's forward-mode derivatives are the stock wrapper's, none of
    them zero, and computed with nothing rerouted."""
    assert rerouted.keys() == stock.keys()
    for name, (got, count) in rerouted.items():
        assert count == 0, name
        assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(got)) > 0, name
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     got, stock[name][0])


def test_forward_mode_through_a_rerouted_linen_branch_equals_stock():
    """jax.jvp / jax.jacfwd / jax.linearize through a branch whose stock convs the wrapper
    reroutes (reroute_convs 'auto' on the CPU, or 'always') failed: eagerly one line naming
    reroute_convs='never', under jit JAX's "can't apply forward-mode autodiff (jvp) to a
    custom_vjp function" (linearize: JAX's words as its linear function ran). The wrapper
    now sees forward mode and computes the stock convs: the derivatives are 'never''s, in
    the input and the parameters, eagerly and under jit, skipping, masking or drop path."""
    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 2))
    branch = nn.Sequential([nn.Conv(2, (3, 3)), jnp.tanh, nn.Conv(2, (1, 1))], parent=None)
    key = {"stochastic_depth": jax.random.key(2)}
    wrappers = [  # (make(reroute_convs), call keywords, reroute_convs, derivatives taken)
        (lambda r: StochasticDepth(branch, 0.5, reroute_convs=r),
         dict(gate=jnp.bool_(True)), "always", None),
        (lambda r: StochasticDepth(branch, 0.5, reroute_convs=r),
         dict(gate=jnp.bool_(True)), "auto", ("jvp", "jit(linearize)")),
        (lambda r: StochasticDepth(branch, 0.5, implementation="mask", reroute_convs=r),
         dict(gate=jnp.bool_(True)), "always", ("linearize", "jit(jvp)")),
        (lambda r: DropPath(branch, rate=0.5, reroute_convs=r), dict(rngs=key), "auto",
         ("jvp", "jit(jacfwd)")),
    ]
    for make, call, rerouting, names in wrappers:
        results = {}
        for when in (rerouting, "never"):
            wrapped = make(when)
            v = wrapped.init(jax.random.key(1), x, deterministic=True)

            def f(params, x):
                y = wrapped.apply({"params": params}, x, deterministic=False, **call)
                return jnp.sum(jnp.sin(y))

            rerouted = _rerouting(jax.grad(f), v["params"], x)[1]  # reverse mode reroutes
            assert (rerouted > 0) == (when != "never")
            results[when] = _forward_derivatives(f, (v["params"], x), names)
        _same_derivatives(results[rerouting], results["never"])


def test_forward_mode_through_a_rerouted_nnx_branch_equals_stock():
    """As for Linen: jax.jvp / jax.jacfwd / jax.linearize through an NNX wrapper rerouting
    its branch's nnx.Conv layers failed (one line naming reroute_convs='never', or JAX's
    words); they now give 'never''s derivatives, in the parameters (the model merged inside
    the transform) and the input, or the parameters only, eagerly and under jit."""
    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 2))
    results = {}
    for when in ("always", "never"):
        rngs = nnx.Rngs(0)
        branch = nnx.Sequential(nnx.Conv(2, 2, (3, 3), rngs=rngs), jnp.tanh,
                                nnx.Conv(2, 2, (1, 1), rngs=rngs))
        layer = nnx_layers.StochasticDepth(branch, 0.5, rngs=nnx.Rngs(1), reroute_convs=when)
        graphdef, state, rest = nnx.split(layer, nnx.Param, ...)

        def f(s, x):
            y = nnx.merge(graphdef, s, rest, copy=True)(x, deterministic=False,
                                                        gate=jnp.bool_(True))
            return jnp.sum(jnp.sin(y))

        rerouted = _rerouting(jax.grad(f), state, x)[1]  # reverse mode reroutes
        assert (rerouted > 0) == (when == "always")
        results[when] = {**_forward_derivatives(f, (state, x)),
                         **{f"{k} (parameters only)": d for k, d in _forward_derivatives(
                             lambda s: f(s, x), (state,), ("jvp", "jit(jacfwd)")).items()}}
    _same_derivatives(results["always"], results["never"])


class _BoundBranch(nn.Module):
    """A wrapper whose branch conv is made here, bound to this module (no parent=None)."""

    reroute: str

    @nn.compact
    def __call__(self, x):
        return StochasticDepth(nn.Conv(2, (3, 3)), 0.5, reroute_convs=self.reroute)(
            x, deterministic=False, gate=jnp.bool_(True))


class _ClosingBlock(nnx.Module):
    """An NNX wrapper whose function branch, made in the call, closes over a conv."""

    def __init__(self, reroute, rngs):
        self.conv, self.reroute = nnx.Conv(2, 2, (3, 3), rngs=rngs), reroute

    def __call__(self, x):
        sd = nnx_layers.StochasticDepth(lambda v: jnp.tanh(self.conv(v)), 0.5,
                                        reroute_convs=self.reroute)
        return sd(x, deterministic=False, gate=jnp.bool_(True))


def test_forward_mode_in_parameters_held_outside_the_wrapper_equals_stock():
    """jax.jvp in the parameters alone (the input not differentiated) of a branch whose
    layers the wrapper does not hold (a Linen branch bound to its parent, an NNX function
    branch closing over a layer) was not seen: eagerly one line naming
    reroute_convs='never', under jit JAX's "can't apply forward-mode autodiff (jvp) to a
    custom_vjp function". It now gives 'never''s derivatives, nothing rerouted."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 2))
    results = {"linen": {}, "nnx": {}}
    for when in ("always", "never"):
        model = _BoundBranch(when)
        v = model.init(jax.random.key(1), x)
        graphdef, state = nnx.split(_ClosingBlock(when, nnx.Rngs(0)))
        losses = {"linen": (lambda p: jnp.sum(jnp.sin(model.apply(p, x))), v),
                  "nnx": (lambda s: jnp.sum(jnp.sin(nnx.merge(graphdef, s, copy=True)(x))),
                          state)}
        for kind, (f, params) in losses.items():
            if when == "always":  # reverse mode reroutes
                assert _rerouting(jax.grad(f), params)[1] > 0
            results[kind][when] = _forward_derivatives(f, (params,), ("jvp", "jit(jvp)"))
    for kind in results:
        _same_derivatives(results[kind]["always"], results[kind]["never"])


def test_second_order_through_a_rerouted_branch_still_reroutes():
    """Forward over reverse (jax.hessian, jvp of grad, linearize of grad) differentiates the
    rerouted convolution's backward pass: it stays rerouted (not taken for forward mode)
    and equals the stock branch's (Linen and NNX)."""
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 2))
    t = jnp.cos(x)
    results = {}
    for when in ("always", "never"):
        wrapped = StochasticDepth(nn.Sequential([nn.Conv(2, (3, 3)), jnp.tanh], parent=None),
                                  0.5, reroute_convs=when)
        v = wrapped.init(jax.random.key(1), x, deterministic=True)
        layer = nnx_layers.StochasticDepth(nnx.Conv(2, 2, (3, 3), rngs=nnx.Rngs(0)), 0.5,
                                           rngs=nnx.Rngs(1), reroute_convs=when)
        graphdef, state = nnx.split(layer)
        losses = {
            "linen": lambda x: jnp.sum(jnp.sin(wrapped.apply(v, x, deterministic=False,
                                                             gate=jnp.bool_(True)))),
            "nnx": lambda x: jnp.sum(jnp.sin(nnx.merge(graphdef, state, copy=True)(
                x, deterministic=False, gate=jnp.bool_(True)))),
        }
        for kind, f in losses.items():
            for name, second in {"jit(hessian)": jax.jit(jax.hessian(f)),
                                 "jvp(grad)": lambda x: jax.jvp(jax.grad(f), (x,), (t,))[1],
                                 "linearize(grad)": lambda x: jax.linearize(
                                     jax.grad(f), x)[1](t)}.items():
                got, rerouted = _rerouting(second, x)
                assert (rerouted > 0) == (when == "always"), (kind, name)
                assert float(jnp.abs(got).max()) > 0
                results.setdefault((kind, name), []).append(got)
    for rerouted, stock in results.values():
        np.testing.assert_allclose(rerouted, stock, rtol=1e-4, atol=1e-5)


def test_forward_mode_the_wrapper_cannot_see():
    """Where forward mode starts outside a trace that starts inside the wrapper (jax.jvp of
    a jitted or checkpointed function) the wrapper reroutes, and JAX refuses the custom_vjp
    as it compiles: 'never' is the way (README, "Forward-mode autodiff"). A jvp inside the
    branch over a rerouted conv computes it stock (it was one line naming 'never'); one of a
    jitted function there is one line naming reroute_convs='never' (NNX, eagerly);
    a custom_vjp of the branch's own is refused in JAX's words, no conv being rerouted
    under forward mode (it was one line naming reroute_convs='never', which did not help)."""
    from stochastic_depth_jax.conv import _FORWARD_MODE_FIX_OR_OWN, FORWARD_MODE_FIX
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 2))
    t = jnp.ones_like(x)
    branch = nn.Sequential([nn.Conv(2, (3, 3)), jnp.tanh], parent=None)
    unseen = {}
    for when in ("always", "never"):
        wrapped = StochasticDepth(branch, 0.5, reroute_convs=when)
        v = wrapped.init(jax.random.key(1), x, deterministic=True)

        def f(x):
            return jnp.sum(wrapped.apply(v, x, deterministic=False, gate=jnp.bool_(True)))

        for outer in (jax.jit, jax.checkpoint):
            if when == "always":
                with pytest.raises(TypeError, match="^can't apply forward-mode autodiff"):
                    jax.jvp(outer(f), (x,), (t,))
            else:
                unseen[outer] = jax.jvp(outer(f), (x,), (t,))[1]
    for tangent in unseen.values():  # 'never': as when the wrapper sees forward mode
        np.testing.assert_allclose(tangent, jax.jvp(f, (x,), (t,))[1], rtol=1e-5)

    conv = nnx.Conv(2, 2, (3, 3), rngs=nnx.Rngs(0))

    def inner(jitted, when):
        # A new function to jit each time: jax.jit(conv) would keep its first trace.
        how = (lambda c: jax.jit(lambda v: c(v))) if jitted else (lambda c: c)
        return nnx_layers.StochasticDepth(lambda u: jax.jvp(how(conv), (u,), (u,))[1], 0.5,
                                          implementation="mask", reroute_convs=when)

    seen, seen_never = inner(False, "always"), inner(False, "never")
    jitted, jitted_never = inner(True, "always"), inner(True, "never")
    gate = dict(deterministic=False, gate=jnp.bool_(True))
    # A jvp inside the branch over a rerouted conv sees its operands: stock, as 'never'.
    np.testing.assert_allclose(seen(x, **gate), seen_never(x, **gate), rtol=1e-5)
    with pytest.raises(TypeError) as info:  # of a jitted function: one line (in user code)
        jitted(x, **gate)
    assert str(info.value) == _FORWARD_MODE_FIX_OR_OWN and "\n" not in str(info.value)
    assert "\n" not in FORWARD_MODE_FIX
    np.testing.assert_allclose(jitted_never(x, **gate), seen_never(x, **gate), rtol=1e-5)

    @jax.custom_vjp
    def own(v):
        return jnp.tanh(v)

    own.defvjp(lambda v: (jnp.tanh(v), v), lambda v, ct: (ct / jnp.cosh(v) ** 2,))

    class Linen(nn.Module):
        own_first: bool

        @nn.compact
        def __call__(self, v):
            return nn.Conv(2, (3, 3))(own(v)) if self.own_first else own(nn.Conv(2, (3, 3))(v))

    for own_first in (True, False):
        wrapped = StochasticDepth(Linen(own_first, parent=None), 0.5, implementation="mask",
                                  reroute_convs="always")
        v = wrapped.init(jax.random.key(1), x, deterministic=True)
        layer = nnx_layers.StochasticDepth(
            (lambda u: conv(own(u))) if own_first else (lambda u: own(conv(u))), 0.5,
            implementation="mask", reroute_convs="always")
        for call in (lambda x: wrapped.apply(v, x, deterministic=False, gate=jnp.bool_(True)),
                     lambda x: layer(x, deterministic=False, gate=jnp.bool_(True))):
            with pytest.raises(TypeError) as info:
                jax.jvp(lambda x: jnp.sum(call(x)), (x,), (t,))
            assert str(info.value).startswith(
                "can't apply forward-mode autodiff (jvp) to a custom_vjp function")


def _counting_convs(monkeypatch):
    """Counts conv2d's convolutions as traced: {'custom': custom_vjp, 'stock': JAX's own}."""
    from stochastic_depth_jax import conv as conv_lib
    calls = {"custom": 0, "stock": 0}

    def counted(kind, fn):
        def count(*args):
            calls[kind] += 1
            return fn(*args)
        return count

    monkeypatch.setattr(conv_lib, "_conv_s", counted("custom", conv_lib._conv_s))
    stock = getattr(conv_lib, "_conv_stock", None)  # (none before forward mode computed it)
    monkeypatch.setattr(conv_lib, "_conv_stock", counted("stock", stock), raising=False)
    return calls


def test_forward_mode_through_the_library_models_equals_xla(monkeypatch):
    """jax.jvp / jax.linearize through CifarResNet, WideResNet or ResNet on the CPU got
    JAX's "can't apply forward-mode autodiff (jvp) to a custom_vjp function", in evaluation
    and training: their sdj.conv.Conv ('auto', or 'cpu_friendly') is the custom_vjp
    convolution there. It now computes stock under forward mode, also in scanned stages
    (the stages see forward mode as they are called), with implementation='xla''s numbers;
    reverse mode and jax.hessian keep the custom convolution."""
    import functools

    import stochastic_depth_jax as sdj
    calls = _counting_convs(monkeypatch)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    makes = [lambda c: sdj.CifarResNet(depth=14, width=4, num_classes=3, scan=True, conv=c),
             lambda c: sdj.WideResNet(depth=10, widen_factor=1, width=4, num_classes=3, conv=c),
             lambda c: sdj.ResNet(stage_sizes=(1, 2, 1, 1), width=4, num_classes=3, conv=c)]
    for i, make in enumerate(makes):
        v = make(sdj.conv.Conv).init(jax.random.key(1), x, train=False)
        t = (jax.tree.map(jnp.cos, v["params"]), jnp.cos(x))
        outs = {}
        for impl in ("auto", "cpu_friendly", "xla") if i == 0 else ("auto", "xla"):
            model = make(functools.partial(sdj.conv.Conv, implementation=impl))

            def f(params, x, train, model=model):
                if not train:
                    return model.apply({**v, "params": params}, x, train=False)
                return model.apply({**v, "params": params}, x, train=True,
                                   mutable=["batch_stats"],
                                   rngs={"stochastic_depth": jax.random.key(3)})[0]

            calls.update(custom=0, stock=0)
            outs[impl] = [jax.jit(lambda p, x: jax.jvp(lambda p, x: f(p, x, True),
                                                       (p, x), t)[1])(v["params"], x)]
            if i == 0:  # and eagerly, evaluating, and linearize
                outs[impl] += [jax.jvp(lambda p, x: f(p, x, False), (v["params"], x), t)[1],
                               jax.linearize(lambda x: f(v["params"], x, True), x)[1](x)]
            assert calls["custom"] == 0 and (calls["stock"] > 0) == (impl != "xla"), impl
        for impl in set(outs) - {"xla"}:
            for got, want in zip(outs[impl], outs["xla"]):
                assert float(jnp.abs(want).max()) > 0
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        if i == 0:
            model = make(sdj.conv.Conv)
            loss = lambda p, x: jnp.sum(jnp.sin(model.apply({**v, "params": p}, x,  # noqa: E731
                                                            train=False)))
            for second in (jax.grad(loss), jax.hessian(lambda p, x: loss(p, x[:1]), 1)):
                calls.update(custom=0, stock=0)
                jax.make_jaxpr(second)(v["params"], x)
                assert calls["custom"] > 0 and calls["stock"] == 0

