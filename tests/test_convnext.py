"""ConvNeXt with drop path: sizes, per-block rates and keys, skip == mask, Linen == NNX, the
trainer config, clear errors."""
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs` lives at the repository root, beside train.py.

import stochastic_depth_jax as sdj  # noqa: E402
from configs import load_config  # noqa: E402
from stochastic_depth_jax import convnext, nnx_layers, ops  # noqa: E402
from stochastic_depth_jax.training import distributed  # noqa: E402
from stochastic_depth_jax.training import setup as setup_lib  # noqa: E402
from trainer_steps import train_steps  # noqa: E402
from twins import assert_nnx_matches_linen  # noqa: E402

X = jax.random.normal(jax.random.key(2), (8, 16, 16, 3))  # [batch, H, W, C]
# 5 blocks over 4 stages; stem 2 on 16x16 leaves 8/4/2/1 pixels per stage side.
TINY = dict(size="atto", depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), stem_stride=2,
            drop_path_rate=0.4)
TRAIN_FLAGS = ["--config.progress_bar=false", "--config.write_tensorboard=false"]
# timm's parameter counts (1000 classes), in millions, to the 0.01M timm reports.
TIMM_PARAMS_M = {"atto": 3.70, "femto": 5.22, "pico": 9.05, "nano": 15.59, "tiny": 28.59,
                 "small": 50.22, "base": 88.59, "large": 197.77, "xlarge": 350.20}


def _random_params(module, *args, **kwargs):
    """Random parameters of ``module`` without compiling its init (slow on XLA:CPU): a
    LayerNorm scale near 1, everything else N(0, 0.1^2), so that no branch is hidden (layer
    scale starts at 1e-6, the head would start near 0)."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"]
    rng = np.random.default_rng(9)

    def draw(path, leaf):
        base = 1.0 if getattr(path[-1], "key", None) == "scale" else 0.0
        return jnp.asarray(base + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _params(model, x=X):
    return _random_params(model, x, train=False)


@pytest.mark.parametrize("size", sorted(convnext.CONVNEXT_SIZES))
def test_sizes_have_timm_parameter_counts_and_logit_shapes(size):
    model = sdj.ConvNeXt(num_classes=1000, size=size)
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    params = jax.eval_shape(lambda v: model.init(jax.random.key(0), v, train=False), x)["params"]
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert count / 1e6 == pytest.approx(TIMM_PARAMS_M[size], abs=0.006)
    depths, dims = convnext.CONVNEXT_SIZES[size]
    assert sum(1 for name in params if name.startswith("blocks_")) == sum(depths)
    assert params["head"]["kernel"].shape == (dims[-1], 1000)
    logits = jax.eval_shape(lambda p, v: model.apply({"params": p}, v, train=False), params, x)
    assert logits.shape == (2, 1000)


@pytest.mark.parametrize("rule", ["linear", "paper", "uniform"])
def test_drop_rates_run_over_all_blocks_of_all_stages(rule):
    model = sdj.ConvNeXt(num_classes=3, **{**TINY, "drop_path_rule": rule})
    probs = model.survival_probs()
    np.testing.assert_allclose(1.0 - probs, sdj.drop_path_rates(5, 0.4, rule))
    if rule == "linear":  # timm: linspace(0, rate, sum(depths)), 0 at the very first block
        np.testing.assert_allclose(1.0 - probs, [0.0, 0.1, 0.2, 0.3, 0.4], atol=1e-12)
    big = sdj.ConvNeXt(num_classes=3, size="tiny", drop_path_rate=0.1).survival_probs()
    assert big.shape == (18,) and big[0] == 1.0 and big[-1] == pytest.approx(0.9)


def test_block_j_draws_from_fold_in_key_j_with_k_from_its_rate():
    """The model equals its layers composed by hand with gates from fold_in(key, j)."""
    model = sdj.ConvNeXt(num_classes=3, groups=2, **{**TINY, "drop_path_rate": 0.6})
    params = _params(model)
    key = jax.random.key(5)
    probs = model.survival_probs()

    def by_hand(params, x):
        x = jax.lax.conv_general_dilated(x, params["stem_conv"]["kernel"], (2, 2), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = _layer_norm(x + params["stem_conv"]["bias"], params["stem_norm"])
        widths = [8, 16, 24, 24, 32]
        for j, p in enumerate(probs):
            if j in (1, 2, 4):  # first blocks of stages 2, 3, 4
                s = {1: 0, 2: 1, 4: 2}[j]
                x = convnext.ConvNeXtDownsample(widths[j]).apply(
                    {"params": params[f"downsample_{s}"]}, x)
            gate = convnext.block_gate(key, j, float(p), mode="sample", implementation="skip",
                                       batch_size=8, groups=2)
            if gate is not None:  # k from this block's rate, per group of 4
                assert gate.shape == (2, ops.subset_size(8, float(p), 2))
            block = convnext.ConvNeXtBlock(float(p), groups=2)
            x = block.apply({"params": params[f"blocks_{j}"]}, x, gate, train=True)
        x = _layer_norm(jnp.mean(x, axis=(1, 2)), params["norm"])
        return x @ params["head"]["kernel"] + params["head"]["bias"]

    expected = jax.jit(by_hand)(params, X)
    got = jax.jit(lambda p: model.apply({"params": p}, X, train=True, key=key))(params)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    other = jax.jit(lambda p: model.apply({"params": p}, X, train=True,
                                          key=jax.random.key(6)))(params)
    assert not np.allclose(got, other, atol=1e-4)  # the key matters: not a vacuous check


def _layer_norm(x, p, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


@pytest.mark.parametrize("scaling", ["test", "train"])
def test_block_skip_equals_mask_for_the_same_subset(scaling):
    x = X[:, :4, :4, :].repeat(4, axis=-1)  # [8, 4, 4, 12]
    skip = convnext.ConvNeXtBlock(0.6, scaling=scaling, implementation="skip", groups=2)
    params = {"params": _random_params(skip, x, train=False)}
    idx = ops.draw_subset(jax.random.key(11), 8, 0.6, 2)  # k = 2 of each 4 (round(2.4))
    k_over_n = idx.shape[1] / 4
    # The mask form's 1/p equals the subset's n/k when p is the kept fraction k/n.
    mask = convnext.ConvNeXtBlock(k_over_n, scaling=scaling, implementation="mask", groups=2)

    def loss(params, x, block, gate):
        y = block.apply(params, x, gate, train=True)
        return jnp.sum(jnp.sin(y)), y

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (l_s, y_s), g_s = grad(params, x, skip, idx)
    (l_m, y_m), g_m = grad(params, x, mask, ops.subset_mask(idx, 8))
    np.testing.assert_allclose(y_s, y_m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l_s, l_m, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_m)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    dropped = ~np.asarray(ops.subset_mask(idx, 8))
    np.testing.assert_array_equal(np.asarray(y_s)[dropped], np.asarray(x)[dropped])
    assert not np.allclose(np.asarray(y_s)[~dropped], np.asarray(x)[~dropped])


def test_evaluation_is_deterministic_and_draws_no_key():
    model = sdj.ConvNeXt(num_classes=3, **TINY)
    params = _params(model)
    run = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
    a, b = run(params, X), run(params, X)  # no rngs given: evaluation needs none
    np.testing.assert_array_equal(a, b)
    train = jax.jit(lambda p: model.apply({"params": p}, X, train=True,
                                          key=jax.random.key(3)))(params)
    assert not np.allclose(a, train, atol=1e-4)
    # 'train' scaling evaluates the unscaled network: the same as a model without drop path.
    plain = sdj.ConvNeXt(num_classes=3, **{**TINY, "drop_path_rate": 0.0})
    np.testing.assert_allclose(jax.jit(lambda p: plain.apply({"params": p}, X, train=True))(
        params), a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation, layer_scale", [("skip", 1e-6), ("mask", 0.0)])
def test_nnx_convnext_matches_linen_for_same_params_and_key(implementation, layer_scale):
    opts = dict(TINY, implementation=implementation, layer_scale_init=layer_scale)
    linen = sdj.ConvNeXt(num_classes=5, **opts)
    params = _params(linen)
    assert ("gamma" in params["blocks_0"]["drop_path"]["branch"]) == bool(layer_scale)
    model = nnx_layers.ConvNeXt(5, rngs=nnx.Rngs(params=1, stochastic_depth=2), **opts)
    nnx_layers.load_linen_params(model, params)
    assert_nnx_matches_linen(linen, params, model, X, atol=1e-5)



def test_nnx_convnext_draws_from_its_stream_and_eval_switches_it_off():
    # Layer scale 1: with gamma at its 1e-6 init the branches barely move the logits (the
    # draws would differ by ~1e-7, within float noise of each other).
    model = nnx_layers.ConvNeXt(3, rngs=nnx.Rngs(params=0, stochastic_depth=1),
                                layer_scale_init=1.0, **TINY)
    forward = nnx.jit(lambda m, x: m(x))
    a, b = forward(model, X), forward(model, X)  # a fresh key per call
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    model.eval()
    np.testing.assert_array_equal(forward(model, X), forward(model, X))
    bare = nnx_layers.ConvNeXt(3, rngs=nnx.Rngs(params=0), **TINY)
    with pytest.raises(ValueError, match=r"needs a 'stochastic_depth' key: .* \(to evaluate: "
                                         r"model.eval\(\)"):
        bare(X)


def test_smoke_config_trains_through_the_trainer_same_on_one_and_eight_devices(tmp_path):
    config = load_config("cifar10_convnext:smoke", TRAIN_FLAGS)
    assert config.model.groups == 8 and config.model.implementation == "skip"

    def train(mesh):
        setup, losses, params0, state = train_steps(config, str(tmp_path), mesh)
        return setup, losses, params0, jax.device_get(state.params)

    setup, eight, p0, p8 = train(distributed.make_mesh())
    assert isinstance(setup.model, sdj.ConvNeXt) and setup.model.drop_path_rate == 0.3
    assert np.all(np.isfinite(eight)) and np.all(eight > 0)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p8)))
    # groups=8 fixes the subsets whatever the device count: 1 and 8 devices train the same.
    _, one, _, p1 = train(distributed.make_mesh(jax.devices()[:1]))
    np.testing.assert_allclose(eight, one, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), p8, p1)


@pytest.mark.parametrize("kwargs, shape, message", [
    ({}, (2, 20, 20, 3), "20x20 images do not divide into this ConvNeXt's stages.*multiples "
                         "of 16"),
    ({}, (2, 16, 16), r"images \[batch, height, width, channels\]"),
    ({"size": "huge"}, (2, 16, 16, 3), "Unknown ConvNeXt size 'huge'.*atto"),
    ({"depths": (1, 1)}, (2, 16, 16, 3), r"depths \(1, 1\) and dims .* different stage counts"),
    ({"dims": (8, 0, 8, 8)}, (2, 16, 16, 3), "dims must be a non-empty tuple of integers >= 1"),
    ({"stem_stride": 0}, (2, 16, 16, 3), "stem_stride must be an integer >= 1"),
    ({"drop_path_rate": 1.0}, (2, 16, 16, 3), "drop_path_rate must be in"),
    ({"drop_path_rule": "cosine"}, (2, 16, 16, 3), "Unknown drop_path_rule 'cosine'"),
    ({"mode": "token"}, (2, 16, 16, 3), "Unknown stochastic-depth mode 'token'"),
])
def test_bad_input_is_a_clear_error(kwargs, shape, message):
    model = sdj.ConvNeXt(num_classes=3, **{**TINY, **kwargs})
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.key(0), jnp.zeros(shape), train=False)
    if len(shape) == 4 and shape[1] == 16:  # construction-time checks in NNX
        with pytest.raises(ValueError, match=message):
            nnx_layers.ConvNeXt(3, rngs=nnx.Rngs(0), **{**TINY, **kwargs})


def test_groups_that_do_not_split_the_batch_are_a_clear_error():
    model = sdj.ConvNeXt(num_classes=3, **{**TINY, "groups": 3})
    params = _params(model)
    with pytest.raises(ValueError, match="does not split into groups=3"):
        model.apply({"params": params}, X, train=True, key=jax.random.key(0))


@pytest.mark.parametrize("override, message", [
    ("--config.model.size=huge", "model.size='huge'"),
    ("--config.model.depths=(1,1)", "different stage counts"),
    ("--config.model.stem_stride=0", "model: stem_stride must be an integer >= 1"),
    ("--config.model.layer_scale_init=-1.0", "model.layer_scale_init=-1.0 must be"),
    ("--config.model.drop_path_rate=1.0", "drop_path_rate must be in"),
    ("--config.model.groups=5", "model.groups=5 must be"),
])
def test_bad_convnext_config_fails_at_load(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("cifar10_convnext:smoke", TRAIN_FLAGS + [override])


def test_convnext_groups_not_a_multiple_of_devices_is_a_clear_error():
    config = load_config("cifar10_convnext:smoke", TRAIN_FLAGS + ["--config.model.groups=4"])
    with pytest.raises(ValueError, match="model.groups=4 is not a multiple of the 8 devices"):
        setup_lib.build_model(config, 10, distributed.make_mesh())


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_kernels_start_as_the_official_code_s_n_0_0_02(api):
    """The official ConvNeXt draws its conv and linear weights with timm's
    ``trunc_normal_(std=.02)``, whose bounds of +-2 are absolute (100 standard deviations):
    N(0, 0.02^2). Flax's ``truncated_normal(0.02)`` cut them at +-0.04, a standard deviation
    of 0.0176: every kernel started 12% too small."""
    kw = dict(size="atto", depths=(1, 1, 1, 1), stem_stride=2)
    if api == "linen":
        params = sdj.ConvNeXt(num_classes=100, **kw).init(jax.random.key(0), X,
                                                          train=False)["params"]
    else:
        model = nnx_layers.ConvNeXt(100, **kw, rngs=nnx.Rngs(params=0))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    kernels = np.concatenate([
        np.ravel(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if getattr(path[-1], "key", None) == "kernel"])
    assert kernels.size > 500_000
    assert np.std(kernels) == pytest.approx(0.02, rel=0.01)
    beyond = np.mean(np.abs(kernels) > 0.04)  # 2 standard deviations: 4.55% of N(0, 1)
    assert abs(beyond - 0.0455) <= 5 * np.sqrt(0.0455 * 0.9545 / kernels.size)


@pytest.mark.parametrize("value", ["1e-6", True, (1e-6,), float("nan")])
def test_a_layer_scale_init_that_is_not_a_number_is_one_clear_error(value):
    # '1e-6' failed in the initialiser ('format number 1 of "1e-6" is not recognized'); True
    # started every layer scale at 1 instead of near 0.
    message = (f"layer_scale_init must be a number (ConvNeXt: 1e-6) or 0 or None (no layer "
               f"scale), got {value!r}.")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):  # JAX adds a note
        sdj.ConvNeXt(num_classes=3, **TINY, layer_scale_init=value).init(jax.random.key(0), X,
                                                                      train=False)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        nnx_layers.ConvNeXt(3, rngs=nnx.Rngs(params=0), **TINY, layer_scale_init=value)


def test_the_head_normalises_the_mean_over_every_pixel_of_the_last_stage():
    """``head(LayerNorm(mean over H, W))``, as timm's and the official head: a last stage of
    4x4 pixels (TINY's is 1x1, where pooling first or normalising first, or one pixel
    instead of the mean, give the same)."""
    model = sdj.ConvNeXt(num_classes=5, depths=(1, 1), dims=(8, 16), stem_stride=2,
                         drop_path_rate=0.4)
    params = _params(model)
    logits, state = model.apply({"params": params}, X, train=False,
                                capture_intermediates=True, mutable=["intermediates"])
    features = np.asarray(state["intermediates"]["blocks_1"]["__call__"][0], np.float64)
    assert features.shape == (8, 4, 4, 16)
    pooled = features.mean(axis=(1, 2))
    norm = params["norm"]
    pooled = (pooled - pooled.mean(-1, keepdims=True)) / np.sqrt(
        pooled.var(-1, keepdims=True) + convnext.EPS) * norm["scale"] + norm["bias"]
    expected = pooled @ np.asarray(params["head"]["kernel"]) + params["head"]["bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_defaults_are_the_official_code_s():
    """Unset, a ConvNeXt is the paper's ImageNet model: a 4x4 stride-4 stem, layer scale
    started at 1e-6, a 4x inverted bottleneck and no drop path (timm's default rate 0)."""
    model = sdj.ConvNeXt(num_classes=3, depths=(1,), dims=(8,))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                                               train=False))["params"]
    assert params["stem_conv"]["kernel"].shape == (4, 4, 3, 8)
    assert params["blocks_0"]["drop_path"]["branch"]["pwconv1"]["kernel"].shape == (8, 32)
    assert np.all(model.survival_probs() == 1.0)
    gamma = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)[
        "params"]["blocks_0"]["drop_path"]["branch"]["gamma"]
    np.testing.assert_array_equal(gamma, np.full((8,), 1e-6, np.float32))
    assert sdj.ConvNeXt(num_classes=3).stages() == ((3, 3, 9, 3), (96, 192, 384, 768))
