"""The CPU-friendly custom-VJP convolution equals XLA's, in value and gradient."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from stochastic_depth_jax.conv import Conv, conv2d, conv_general_dilated, cpu_compiler_options


def _ref(x, w, strides, pads):
    return lax.conv_general_dilated(x, w, strides, pads,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("k, s, pads", [
    (3, 1, ((1, 1), (1, 1))),
    (3, 2, ((1, 1), (1, 1))),
    (1, 1, ((0, 0), (0, 0))),
    (1, 2, ((0, 0), (0, 0))),
    (7, 2, ((3, 3), (3, 3))),
    (3, 1, ((0, 2), (1, 0))),
])
def test_value_and_grads_match_xla(k, s, pads):
    x = jax.random.normal(jax.random.key(0), (2, 9, 10, 3))
    w = jax.random.normal(jax.random.key(1), (k, k, 3, 5))
    ct = jax.random.normal(jax.random.key(2), _ref(x, w, (s, s), pads).shape)
    y, vjp = jax.vjp(lambda a, b: conv2d(a, b, (s, s), pads), x, w)
    y_ref, vjp_ref = jax.vjp(lambda a, b: _ref(a, b, (s, s), pads), x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(vjp(ct), vjp_ref(ct)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)
    # The same under the trainer's compiler options (XLA's own kernels for the gradients).
    y_vjp = jax.jit(lambda a, b, c: jax.vjp(lambda a, b: conv2d(a, b, (s, s), pads), a, b)[1](c),
                    compiler_options=cpu_compiler_options())
    for g, g_ref in zip(y_vjp(x, w, ct), vjp_ref(ct)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("k, s, padding", [
    ((3, 3), (3, 2), "SAME"), ((2, 3), (4, 4), "VALID"), ((3, 2), (2, 3), ((2, 0), (0, 1))),
])
def test_unequal_strides_with_remainders_match_xla_at_batch_one(k, s, padding, dtype):
    # The strided backward spreads the cotangent onto every s-th position of the stride-1
    # output and pads the rest: odd sizes leave a remainder after the last strided position.
    x = jax.random.normal(jax.random.key(0), (1, 7, 9, 3), dtype)
    w = jax.random.normal(jax.random.key(1), (*k, 3, 4), dtype)
    pads = tuple(lax.padtype_to_pads((7, 9), k, s, padding)) if isinstance(padding, str) \
        else padding
    ct = jax.random.normal(jax.random.key(2), _ref(x, w, s, pads).shape, dtype)
    y, vjp = jax.vjp(lambda a, b: conv2d(a, b, s, pads), x, w)
    y_ref, vjp_ref = jax.vjp(lambda a, b: _ref(a, b, s, pads), x, w)
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    scale = lambda a: np.asarray(a, np.float32) / np.abs(np.asarray(a, np.float32)).max()
    np.testing.assert_allclose(scale(y), scale(y_ref), atol=tol)
    for g, g_ref in zip(vjp(ct), vjp_ref(ct)):
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape
        np.testing.assert_allclose(scale(g), scale(g_ref), atol=tol)


def test_strided_forward_is_xlas_strided_convolution():
    # The forward pass of a stride-2 conv was the stride-1 conv subsampled (4x the FLOPs and
    # the full-resolution output); only the gradient needs the stride-1 formulation.
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    forward = str(jax.make_jaxpr(lambda a, b: conv2d(a, b, (2, 2), ((1, 1), (1, 1))))(x, w))
    assert "window_strides=(2, 2)" in forward and "window_strides=(1, 1)" not in forward
    backward = str(jax.make_jaxpr(jax.grad(
        lambda a, b: jnp.sum(conv2d(a, b, (2, 2), ((1, 1), (1, 1))) ** 2), (0, 1)))(x, w))
    assert "window_strides=(1, 1)" in backward  # the gradients as the stride-1 conv's


def test_grads_inside_cond_and_scan():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    ws = jax.random.normal(jax.random.key(1), (3, 3, 3, 4, 4)) * 0.2
    pads = ((1, 1), (1, 1))

    def net(conv, ws, gate):
        def body(h, w):
            return jax.nn.relu(h + lax.cond(gate, lambda v: conv(v, w), jnp.zeros_like, h)), None
        return jnp.sum(lax.scan(body, x, ws)[0] ** 2)

    for gate in (True, False):
        g = jax.grad(net, argnums=1)(lambda v, w: conv2d(v, w, (1, 1), pads), ws, gate)
        g_ref = jax.grad(net, argnums=1)(lambda v, w: _ref(v, w, (1, 1), pads), ws, gate)
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def _library_fused_convolutions(hlo: str) -> int:
    """Convolutions inside the YNNPACK fusions (``ynn_fusion``) of an optimised HLO text."""
    computations = {}
    for block in hlo.split("\n\n"):
        head = block.strip().split(" ", 1)[0]
        computations[head.removeprefix("ENTRY").strip().lstrip("%")] = block
    called = re.findall(r"ynn_fusion[.\d]* = .*? calls=%([\w.\-]+)", hlo)
    return sum(computations.get(c, "").count("convolution(") for c in called)


def _known_cpu_options() -> dict[str, str]:
    """``cpu_compiler_options()``, failing in one line where this jaxlib lacks the option."""
    options = cpu_compiler_options()
    assert options, (f"jaxlib {jax.lib.__version__}'s XLA:CPU refuses the YNNPACK option: "
                     "update _CPU_OPTION_FORMS in stochastic_depth_jax/conv.py")
    return options


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU compiler options")
def test_cpu_compiler_options_keep_gradient_convolutions_on_xla_kernels():
    """Under ``cpu_compiler_options()`` no gradient convolution of a scanned, cond-wrapped
    block goes to YNNPACK (which ran the weight gradient ~1.3x slower at ResNet shapes)."""
    # Batch 32 at 16x16x16: YNNPACK takes the weight gradient by default (not below ~32).
    x = jax.random.normal(jax.random.key(0), (32, 16, 16, 16))
    ws = jax.random.normal(jax.random.key(1), (2, 3, 3, 16, 16)) * 0.2

    def loss(ws, gates):
        def body(h, a):
            w, g = a
            return lax.cond(g, lambda v: jax.nn.relu(conv2d(v, w, (1, 1), ((1, 1), (1, 1)))),
                            lambda v: v, h), None
        return jnp.sum(lax.scan(body, x, (ws, gates))[0] ** 2)

    compiled = jax.jit(jax.grad(loss), compiler_options=_known_cpu_options()).lower(
        ws, jnp.array([True, False])).compile()
    assert _library_fused_convolutions(compiled.as_text()) == 0


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU compiler options")
def test_trainer_step_keeps_gradient_convolutions_on_xla_kernels():
    """The trainer's CPU train step is compiled with ``cpu_compiler_options()``."""
    from configs import load_config
    from stochastic_depth_jax import data
    from stochastic_depth_jax.training import distributed
    from stochastic_depth_jax.training import setup as setup_lib
    _known_cpu_options()  # else the count below fails (or passes) for another reason
    config = load_config("cifar10:smoke", ["--config.batch_size=32"])
    split = data.Split(np.full((64, 16, 16, 3), 128, np.uint8), np.arange(64, dtype=np.int32) % 10)
    mesh = distributed.make_mesh(jax.devices()[:1])
    setup = setup_lib.build(config, num_classes=10, num_train=64, mean=np.full(3, 0.5),
                            std=np.full(3, 0.25), augment="flip_translate", mesh=mesh)
    state = setup.init_state(split.images.shape[1:])
    hlo = setup.train_step.lower(state, data.put_on_devices(split, mesh)).compile().as_text()
    assert "convolution(" in hlo
    assert _library_fused_convolutions(hlo) == 0, (
        "YNNPACK runs a convolution of the train step: jit it with "
        "compiler_options=cpu_compiler_options()")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU compiler options")
def test_refused_cpu_options_warn_once_and_train_without_them(monkeypatch):
    """A jaxlib that renames or rejects the YNNPACK option: one warning naming the option,
    the jaxlib and the cost, then compiler options left empty (the step still compiles)."""
    import jaxlib

    from stochastic_depth_jax import conv

    def refuse(options):
        raise RuntimeError("INVALID_ARGUMENT: No such compile option: "
                           "'xla_cpu_experimental_ynn_fusion_type'\nmore detail")

    monkeypatch.setattr(conv, "_probe_cpu_options", refuse)
    message = _only_warning(conv, expect={})
    for part in ("xla_cpu_experimental_ynn_fusion_type=", f"jaxlib {jaxlib.__version__}",
                 "No such compile option", "slower", "Nothing to do"):
        assert part in message
    assert ("BatchNorm" in message) == _splits_reductions({}), message


def _splits_reductions(options: dict[str, str]) -> bool:
    """Whether XLA:CPU under ``options`` splits BatchNorm's statistics (a mean and variance
    of ``128x32x32x16``) into a slower reduce-window: a warning may say so only then."""
    x = jax.ShapeDtypeStruct((128, 32, 32, 16), jnp.float32)
    stats = jax.jit(lambda a: (a.mean((0, 1, 2)), a.var((0, 1, 2))), compiler_options=options)
    return "reduce-window" in stats.lower(x).compile().as_text()


def _only_warning(conv, expect):
    """The one RunWarning of two ``cpu_compiler_options()`` calls (which return ``expect``)
    on a fresh probe; names the calling line (here), not conv.py's internals."""
    from stochastic_depth_jax import logs
    from warned import messages

    conv._cpu_options.cache_clear()
    try:
        with pytest.warns(logs.RunWarning) as caught:
            assert cpu_compiler_options() == expect and cpu_compiler_options() == expect
    finally:
        conv._cpu_options.cache_clear()  # the real probe for the other tests
    [message] = messages(caught, logs.RunWarning)
    assert "\n" not in message
    assert {w.filename for w in caught if issubclass(w.category, logs.RunWarning)} == {__file__}
    return message


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU compiler options")
def test_a_refused_option_value_falls_back_to_the_next_form(monkeypatch):
    """A jaxlib whose XLA knows the option but not one value of the best form (a bogus
    value here, refused by the real XLA) gets the next form, with one warning naming the
    refused value, the form used and the cost."""
    import jaxlib

    from stochastic_depth_jax import conv
    value = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_NOSUCH"
    monkeypatch.setattr(conv, "_CPU_OPTION_FORMS", ((value, ""),) + conv._CPU_OPTION_FORMS[1:])
    fallback = conv._CPU_OPTION_FORMS[1][0]
    message = _only_warning(conv, expect={"xla_cpu_experimental_ynn_fusion_type": fallback})
    for part in (f"jaxlib {jaxlib.__version__}", f"={value} (", "LIBRARY_FUSION_TYPE_NOSUCH",
                 f"compile with xla_cpu_experimental_ynn_fusion_type={fallback},", "slower"):
        assert part in message
    assert ("BatchNorm" in message) == _splits_reductions(
        {"xla_cpu_experimental_ynn_fusion_type": fallback}), message


def test_module_matches_flax_conv_and_rejects_unknown_implementation():
    import flax.linen as nn
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    ours = Conv(6, (3, 3), strides=(2, 2), padding="SAME", implementation="cpu_friendly")
    theirs = nn.Conv(6, (3, 3), strides=(2, 2), padding="SAME")
    v = theirs.init(jax.random.key(1), x)
    np.testing.assert_allclose(ours.apply(v, x), theirs.apply(v, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cpu_friendly"):
        Conv(6, implementation="fast").init(jax.random.key(1), x)


def _cropped_ref(x, w, strides, pads):
    """The convolution of ``pads`` computed another way: the input cropped by the negative
    pads and zero-padded by the positive ones, then a VALID convolution."""
    (t, b), (l, r) = pads
    h, wd = x.shape[1:3]
    x = x[:, max(-t, 0):h - max(-b, 0), max(-l, 0):wd - max(-r, 0), :]
    x = jnp.pad(x, ((0, 0), (max(t, 0), max(b, 0)), (max(l, 0), max(r, 0)), (0, 0)))
    return _ref(x, w, strides, ((0, 0), (0, 0)))


@pytest.mark.parametrize("shape, k, s, pads", [
    ((2, 15, 16, 16), (4, 5), (1, 1), ((-2, 1), (-3, 2))),
    ((2, 4, 14, 13), (1, 1), (3, 1), ((-2, 3), (0, 0))),
    ((2, 14, 19, 15), (3, 3), (2, 3), ((-3, 0), (-2, 1))),
    ((2, 9, 10, 3), (3, 3), (2, 2), ((-1, 2), (1, -1))),
])
def test_negative_pads_crop_the_input_where_xla_s_cpu_convolution_is_wrong(shape, k, s, pads):
    """XLA:CPU's convolution gave wrong numbers for some negative pads (e.g. the first case:
    errors of 31 against values of about 10), and conv2d (the rerouted stock nn.Conv, the
    library's Conv) inherited them. It now crops the input by them: the values and the
    gradients, inside a jitted cond too, are those of the crop, pad and VALID convolution."""
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (*k, shape[-1], 6))
    y_ref, vjp_ref, ct = _conv2d_matches_the_crop_reference(x, w, s, pads, value_tol=1e-4)
    in_cond = jax.jit(lambda a, b, c, gate: lax.cond(
        gate, lambda: jax.vjp(lambda a, b: conv2d(a, b, s, pads), a, b)[1](c),
        lambda: (jnp.zeros_like(a), jnp.zeros_like(b))))
    for g, g_ref in zip(in_cond(x, w, ct, jnp.bool_(True)), vjp_ref(ct)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)
    for implementation in ("xla", "cpu_friendly"):  # the library's Conv, either way
        module = Conv(6, k, strides=s, padding=pads, use_bias=False,
                      implementation=implementation)
        y_module = module.apply({"params": {"kernel": w}}, x)
        np.testing.assert_allclose(y_module, y_ref, rtol=1e-4, atol=1e-4)


def _conv2d_matches_the_crop_reference(x, w, s, pads, value_tol):
    """Asserts conv2d's values (to ``value_tol``) and gradients (to 1e-4) are those of the
    crop, pad and VALID convolution; returns its output, VJP and a cotangent."""
    y_ref, vjp_ref = jax.vjp(lambda a, b: _cropped_ref(a, b, s, pads), x, w)
    ct = jax.random.normal(jax.random.key(2), y_ref.shape)
    y, vjp = jax.vjp(lambda a, b: conv2d(a, b, s, pads), x, w)
    np.testing.assert_allclose(y, y_ref, rtol=value_tol, atol=value_tol)
    for g, g_ref in zip(vjp(ct), vjp_ref(ct)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)
    return y_ref, vjp_ref, ct


@pytest.mark.parametrize("padding", ["CIRCULAR", "REFLECT"])
def test_module_pads_circular_and_reflect_as_flax_conv(padding):
    """The drop-in for nn.Conv refused nn.Conv's 'CIRCULAR' and 'REFLECT' paddings (a
    RuntimeError from lax: "Unrecognized padding type"); it pads the input as nn.Conv
    does, with the same values and gradients, either implementation."""
    import flax.linen as nn
    x = jax.random.normal(jax.random.key(0), (2, 7, 8, 3))
    for k, s in (((3, 3), (1, 1)), ((4, 3), (2, 2))):
        theirs = nn.Conv(5, k, strides=s, padding=padding)
        v = theirs.init(jax.random.key(1), x)
        loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))
        want = jax.grad(loss(theirs), (0, 1))(v, x)
        for implementation in ("cpu_friendly", "xla"):
            ours = Conv(5, k, strides=s, padding=padding, implementation=implementation)
            np.testing.assert_allclose(ours.apply(v, x), theirs.apply(v, x), rtol=1e-5,
                                       atol=1e-5)
            got = jax.grad(loss(ours), (0, 1))(v, x)
            jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
                a, b, rtol=1e-4, atol=1e-4), got, want)


def test_padded_strided_1x1_convolution_pads_and_subsamples_first():
    """A 1x1 kernel with any stride is rerouted (its input subsampled first, so its
    gradient costs no more), but with padding it ran as the strided convolution, whose
    gradient is the stride-1 one's over the whole padded input: inside a cond, stride 8,
    23x XLA's time (37.5 against 1.6 ms). It now pads, then subsamples: the same numbers."""
    x = jax.random.normal(jax.random.key(0), (2, 17, 12, 3))
    w = jax.random.normal(jax.random.key(1), (1, 1, 3, 5))
    for s, pads in (((8, 8), ((1, 1), (1, 1))), ((4, 3), ((2, 0), (-1, 1)))):
        _conv2d_matches_the_crop_reference(x, w, s, pads, value_tol=1e-5)
        grads = str(jax.make_jaxpr(jax.grad(
            lambda a, b: jnp.sum(conv2d(a, b, s, pads) ** 2), (0, 1)))(x, w))
        assert f"window_strides={s}" not in grads


@pytest.mark.parametrize("pads", [((0, -12), (0, 0)), ((-10, 0), (1, 1)), ((-5, -5), (0, 0)),
                                  ((0, 0), (-4, -6))])
def test_negative_pads_cropping_more_than_the_input_are_refused_as_lax_refuses_them(pads):
    """The crop of negative pads sliced ``x[:, :h + b]``: a pad beyond the input's side
    wrapped around (``((0, -12), (0, 0))`` on a 9x9 input kept 4 rows) and gave numbers
    where ``lax.conv_general_dilated`` refuses the pads. Refused in one line."""
    x = jnp.ones((1, 9, 9, 2))
    w = jnp.ones((3, 3, 2, 4))
    with pytest.raises(ValueError, match="Negative padding is larger"):
        lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    calls = [lambda: conv2d(x, w, (1, 1), pads), lambda: conv2d(x, w[:1, :1], (2, 2), pads),
             lambda: conv_general_dilated(x, w, (1, 1), pads,
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))]
    calls += [lambda impl=impl: Conv(4, (3, 3), padding=pads, implementation=impl).init(
        jax.random.key(0), x) for impl in ("xla", "cpu_friendly")]
    for call in calls:  # (JAX may add its note on filtered frames below the line)
        with pytest.raises(ValueError) as info:
            call()
        assert re.fullmatch(r"Negative padding .* crops more than the input's spatial size "
                            r"\(9, 9\) holds; .*", str(info.value).splitlines()[0])
