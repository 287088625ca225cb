"""The Linen StochasticDepth wrapper around a user's branch, and Torch-statistics BatchNorm."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stochastic_depth_jax as sdj
from compiled import with_conditionals

X = jax.random.normal(jax.random.key(0), (6, 5))


class MyBranch(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5)(jnp.tanh(nn.Dense(5)(x)))


class MyBlock(nn.Module):
    p: float = 0.5
    mode: str = "batch"

    @nn.compact
    def __call__(self, x, train):
        sd = sdj.StochasticDepth(MyBranch(parent=None), survival_prob=self.p, mode=self.mode)
        return x + sd(x, deterministic=not train)


def test_wrapper_owns_branch_params_and_scales_at_eval():
    block = MyBlock()
    v = block.init({"params": jax.random.key(1)}, X, False)
    assert set(v["params"]) == {"StochasticDepth_0"}
    assert set(v["params"]["StochasticDepth_0"]) == {"branch"}
    f = MyBranch().apply({"params": v["params"]["StochasticDepth_0"]["branch"]}, X)
    np.testing.assert_allclose(block.apply(v, X, False), X + 0.5 * f, rtol=1e-6)


@pytest.mark.parametrize("scaling, factor", [("test", 0.5), ("train", 1.0)])
@pytest.mark.parametrize("implementation", ["skip", "mask"])
def test_gated_evaluation_scales_open_branches_as_evaluation_does(scaling, factor,
                                                                 implementation):
    # A gate at evaluation (a fixed sub-network) runs the open branch scaled by the
    # evaluation factor (p for 'test', 1 for 'train'), not by the training factor.
    sd = sdj.StochasticDepth(MyBranch(parent=None), survival_prob=0.5, scaling=scaling,
                             implementation=implementation)
    v = sd.init(jax.random.key(1), X, deterministic=True)
    f = MyBranch().apply({"params": v["params"]["branch"]}, X)
    for gate, want in ((True, factor * f), (False, 0.0 * f)):
        y = sd.apply(v, X, deterministic=True, gate=jnp.bool_(gate))
        np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-7)


def test_wrapper_gates_from_its_rng_stream_and_skips_gradients():
    block = MyBlock()
    v = block.init({"params": jax.random.key(1)}, X, False)
    f = MyBranch().apply({"params": v["params"]["StochasticDepth_0"]["branch"]}, X)
    outcomes = set()
    for i in range(16):
        key = jax.random.key(i)
        y = block.apply(v, X, True, rngs={"stochastic_depth": key})
        kept = not np.allclose(y, X)
        outcomes.add(kept)
        np.testing.assert_allclose(y, X + (f if kept else 0.0), rtol=1e-6, atol=1e-6)
        g = jax.grad(lambda p: block.apply({"params": p}, X, True,
                                           rngs={"stochastic_depth": key}).sum())(v["params"])
        total = sum(float(jnp.abs(a).sum()) for a in jax.tree_util.tree_leaves(g))
        assert (total > 0) == kept
    assert outcomes == {True, False}
    with pytest.raises(Exception, match="stochastic_depth"):
        block.apply(v, X, True)  # training without the rng stream


def test_wrapper_sample_mode_gates_rows():
    block = MyBlock(mode="sample")
    v = block.init({"params": jax.random.key(1)}, X, False)
    y = block.apply(v, X, True, rngs={"stochastic_depth": jax.random.key(3)})
    f = MyBranch().apply({"params": v["params"]["StochasticDepth_0"]["branch"]}, X)
    rows = [np.allclose(y[i], X[i]) for i in range(6)]
    for i, dropped in enumerate(rows):
        np.testing.assert_allclose(y[i], X[i] + (0.0 if dropped else f[i]), rtol=1e-6, atol=1e-6)


def test_batchnorm_uses_torch_statistics():
    x = jax.random.normal(jax.random.key(2), (4, 3, 3, 2)) * 3.0 + 1.0
    bn = sdj.BatchNorm()
    v = bn.init(jax.random.key(0), x, train=False)
    _, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    xs = np.asarray(x).reshape(-1, 2)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * xs.mean(0), rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * xs.var(0, ddof=1),
                               rtol=1e-5)
    y = bn.apply(v, x, train=True, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 2),
                               (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5), rtol=1e-4,
                               atol=1e-5)


class SowingBranch(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(5)(x))
        self.sow("intermediates", "hidden", h)
        return nn.Dense(5)(h)


@pytest.mark.parametrize("seed", range(4))
def test_batch_skipping_works_when_the_branch_writes_intermediates(seed):
    sd = sdj.StochasticDepth(SowingBranch(parent=None), survival_prob=0.5)
    variables = sd.init(jax.random.key(0), X, deterministic=True)
    rngs = {"stochastic_depth": jax.random.key(seed)}
    y, state = sd.apply(variables, X, deterministic=False, rngs=rngs, mutable=["intermediates"])
    np.testing.assert_allclose(y, sd.apply(variables, X, deterministic=False, rngs=rngs),
                               rtol=1e-6)
    assert state["intermediates"]["branch"]["hidden"][0].shape == (6, 5)


def test_capture_intermediates_keeps_model_outputs_and_batch_stats():
    model = sdj.CifarResNet(depth=8, num_classes=3, width=4)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    dropped = 0
    for seed in range(4):
        rngs = {"stochastic_depth": jax.random.key(seed)}
        y, state = model.apply(variables, x, train=True, rngs=rngs, capture_intermediates=True,
                               mutable=["batch_stats", "intermediates"])
        y0, state0 = model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
        np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-6)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                               state["batch_stats"], state0["batch_stats"])
        dropped += int(np.sum(~np.asarray(state["intermediates"]["gates"][0])))
        assert len(jax.tree_util.tree_leaves(state["intermediates"])) > 1  # captured calls
    assert dropped > 0  # some block was skipped, so the statistics check means something


def test_a_gate_made_inside_jit_folds_skipping_and_the_tests_check_says_so():
    """The check the equivalence tests make (``compiled.with_conditionals``): a gate made from
    a constant inside ``jit`` leaves the compiled gradient no conditional (XLA folds it into
    the branch the gate picks), and the check refuses it; a gate passed as an argument keeps
    one forward and one backward, with the same gradient."""
    sd = sdj.StochasticDepth(MyBranch(parent=None), survival_prob=0.5)
    params = sd.init(jax.random.key(0), X, deterministic=True)["params"]

    def loss(params, gate):
        return jnp.sum((X + sd.apply({"params": params}, X, deterministic=False, gate=gate)) ** 2)

    branching = jax.jit(jax.grad(loss))
    for value in (True, False):
        gate = jnp.bool_(value)
        folded = jax.jit(jax.grad(lambda p, v=value: loss(p, jnp.bool_(v))))
        with pytest.raises(AssertionError, match="folded into straight-line code"):
            with_conditionals(folded, params)
        got = with_conditionals(branching, params, gate, at_least=2)(params, gate)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                               got, folded(params))


def test_batchnorm_adds_epsilon_to_the_variance_in_training_and_evaluation():
    # A channel whose variance is near epsilon: without it the output would be ~sqrt(2)
    # larger (or infinite for a constant channel).
    x = jax.random.normal(jax.random.key(2), (4, 3, 3, 2)) * 3e-3
    x = x.at[..., 1].set(0.5)  # constant channel: variance 0
    bn = sdj.BatchNorm()
    v = bn.init(jax.random.key(0), x, train=False)
    xs = np.asarray(x, np.float64).reshape(-1, 2)
    y = bn.apply(v, x, train=True, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 2),
                               (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5), rtol=1e-3,
                               atol=1e-5)
    stats = {"mean": jnp.asarray([0.0, 0.5]), "var": jnp.asarray([1e-5, 0.0])}
    y = bn.apply({"params": v["params"], "batch_stats": stats}, x, train=False)
    want = (xs - np.array([0.0, 0.5])) / np.sqrt(np.array([1e-5, 0.0]) + 1e-5)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 2), want, rtol=1e-4, atol=1e-6)


def test_wrapper_in_training_draws_from_the_params_stream_when_given_only_that():
    # As make_rng: no 'stochastic_depth' stream falls back to 'params' (not an error).
    block = MyBlock()
    v = block.init({"params": jax.random.key(1)}, X, False)
    f = MyBranch().apply({"params": v["params"]["StochasticDepth_0"]["branch"]}, X)
    outcomes = set()
    for i in range(8):
        y = block.apply(v, X, True, rngs={"params": jax.random.key(i)})
        kept = not np.allclose(y, X)
        outcomes.add(kept)
        np.testing.assert_allclose(y, X + (f if kept else 0.0), rtol=1e-6, atol=1e-6)
    assert outcomes == {True, False}


class ScannedBlocks(nn.Module):
    """Three MyBlocks stacked by ``nn.scan`` (parameters per layer); ``split``: whether the
    gate stream is split per layer (else broadcast: the same key in every layer)."""
    split: bool = True

    @nn.compact
    def __call__(self, x, train):
        return nn.scan(lambda m, v, _: (m(v, train), None), variable_axes={"params": 0},
                       split_rngs={"params": True, "stochastic_depth": self.split},
                       length=3)(MyBlock(name="blocks"), x, None)[0]


def test_wrapper_in_a_scan_over_layers_refuses_a_gate_stream_that_is_not_split():
    v = ScannedBlocks().init({"params": jax.random.key(1)}, X, False)
    rngs = {"stochastic_depth": jax.random.key(0)}
    with pytest.raises(ValueError, match="is not split, so every layer"):
        ScannedBlocks(split=False).apply(v, X, True, rngs=rngs)
    gated = [ScannedBlocks().apply(v, X, True, rngs={"stochastic_depth": jax.random.key(i)})
             for i in range(4)]
    assert all(y.shape == X.shape for y in gated)


def test_drop_path_takes_the_drop_rate_and_scales_inverted_by_default():
    # DropPath(rate=r) is StochasticDepth(survival_prob=1 - r, mode='sample',
    # scaling='train'): the same rows, the same 1 / p, from the same key.
    x = jax.random.normal(jax.random.key(0), (8, 5))
    dp = sdj.DropPath(MyBranch(parent=None), rate=0.25)
    sd = sdj.StochasticDepth(MyBranch(parent=None), survival_prob=0.75, mode="sample",
                             scaling="train")
    v = dp.init(jax.random.key(1), x, deterministic=True)
    f = MyBranch().apply({"params": v["params"]["branch"]}, x)
    for seed in range(3):
        rngs = {"stochastic_depth": jax.random.key(seed)}
        y = dp.apply(v, x, deterministic=False, rngs=rngs)
        np.testing.assert_allclose(y, sd.apply(v, x, deterministic=False, rngs=rngs),
                                   rtol=1e-6)
        kept = [not np.allclose(row, 0.0) for row in y]
        assert sum(kept) == 6
        np.testing.assert_allclose(y[np.array(kept)], f[np.array(kept)] / 0.75, rtol=1e-5)
    np.testing.assert_allclose(dp.apply(v, x, deterministic=True), f, rtol=1e-6)


def test_drop_path_refuses_a_survival_probability_given_positionally():
    with pytest.raises(TypeError, match="takes the drop rate by keyword"):
        sdj.DropPath(MyBranch(parent=None), 0.9)


IMAGES = jax.random.normal(jax.random.key(4), (2, 5, 5, 2))


@pytest.mark.parametrize("kind", ["A", "A-avg"])
def test_parameter_free_shortcuts_subsample_or_average_then_pad_channels_at_the_end(kind):
    y = sdj.Shortcut(4, strides=2, kind=kind).apply({}, IMAGES, train=True)
    x = np.asarray(IMAGES)
    if kind == "A":
        want = x[:, ::2, ::2, :]
    else:  # 2x2 windows; the odd side's last one averages the pixels it has
        padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)), constant_values=np.nan)
        windows = padded.reshape(2, 3, 2, 3, 2, 2)
        want = np.nanmean(windows, axis=(2, 4))
    assert y.shape == (2, 3, 3, 4)
    np.testing.assert_allclose(y[..., :2], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(y[..., 2:], 0.0)


def _block_outputs(block, variables, seeds, **kw):
    return [block.apply(variables, IMAGES, 0.5, rngs={"stochastic_depth": jax.random.key(s)},
                        **kw) for s in seeds]


def test_block_evaluates_one_sampled_sub_network_when_stochastic():
    block = sdj.BasicBlock(2)
    v = block.init(jax.random.key(0), IMAGES, train=False)
    closed, opened = (block.apply(v, IMAGES, 0.5, gate=jnp.bool_(g), train=False,
                                  stochastic=True) for g in (False, True))
    sampled = _block_outputs(block, v, range(8), train=False, stochastic=True)
    assert all(np.allclose(y, closed) or np.allclose(y, opened) for y in sampled)
    assert any(np.allclose(y, closed) for y in sampled)
    assert any(np.allclose(y, opened) for y in sampled)
    for y in _block_outputs(block, v, range(2), train=False):  # stochastic=None: train's
        np.testing.assert_allclose(y, block.apply(v, IMAGES, 0.5, train=False), rtol=1e-6)
    with pytest.raises(ValueError, match="Monte-Carlo depth"):
        block.apply(v, IMAGES, 0.5, train=False, stochastic=True)


def test_block_defaults_preact_adds_no_activation_bottleneck_projects():
    preact = sdj.PreActBlock(2)
    y = preact.apply(preact.init(jax.random.key(0), IMAGES, train=False), IMAGES, train=False)
    assert (y < 0).any()  # no ReLU after the addition
    bottleneck = sdj.BottleneckBlock(2)
    v = bottleneck.init(jax.random.key(0), IMAGES, train=False)
    assert set(v["params"]["shortcut"]) == {"conv", "bn"}  # 'B': a projection
    assert bottleneck.apply(v, IMAGES, train=False).shape == (2, 5, 5, 8)


@pytest.mark.parametrize("cls, zeroed", [(sdj.BasicBlock, ("bn2", "scale")),
                                         (sdj.PreActBlock, ("conv2", "kernel"))])
def test_zero_init_last_starts_the_branch_at_zero(cls, zeroed):
    block = cls(2, zero_init_last=True)
    v = block.init(jax.random.key(0), IMAGES, train=False)
    branch = v["params"]["stochastic_depth"]["branch"]
    np.testing.assert_array_equal(branch[zeroed[0]][zeroed[1]], 0.0)
    others = [a for path, a in jax.tree_util.tree_leaves_with_path(branch)
              if "kernel" in jax.tree_util.keystr(path) and zeroed[0] not in
              jax.tree_util.keystr(path)]
    assert others and all(np.abs(a).sum() > 0 for a in others)
    y = block.apply(v, IMAGES, train=True, mutable=["batch_stats"])[0]
    want = jax.nn.relu(IMAGES) if cls is sdj.BasicBlock else IMAGES
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


def test_branch_dropout_drops_in_training_only():
    block = sdj.BasicBlock(2, dropout_rate=0.5)
    v = block.init(jax.random.key(0), IMAGES, train=False)
    plain = sdj.BasicBlock(2).apply(v, IMAGES, train=False)
    np.testing.assert_allclose(block.apply(v, IMAGES, train=False), plain, rtol=1e-6)

    def trained(seed):
        return block.apply(v, IMAGES, train=True, rngs={"dropout": jax.random.key(seed)},
                           mutable=["batch_stats"])[0]

    assert not np.allclose(trained(0), trained(1))


def test_strided_block_skips_in_training():
    # The branch's declared output (output_struct) must be the strided one for the cond.
    block = sdj.BasicBlock(4, strides=2)
    v = block.init(jax.random.key(0), IMAGES, train=False)
    ys = [block.apply(v, IMAGES, 0.5, train=True, mutable=["batch_stats"],
                      rngs={"stochastic_depth": jax.random.key(s)})[0] for s in range(4)]
    assert all(y.shape == (2, 3, 3, 4) for y in ys)


def test_deleted_block_returns_what_the_block_with_its_gate_closed_does():
    x = IMAGES.astype(jnp.bfloat16)
    full, deleted = sdj.BasicBlock(4, strides=2), sdj.BasicBlock(4, strides=2, has_branch=False)
    v = full.init(jax.random.key(0), x, train=False)
    closed = full.apply(v, x, 0.5, gate=jnp.bool_(False), train=False)
    y = deleted.apply({}, x, train=False)
    assert y.dtype == closed.dtype == jnp.float32
    np.testing.assert_allclose(y, closed, rtol=1e-6)


def test_wrapper_initialised_with_a_gate_at_evaluation_has_the_branch_parameters():
    sd = sdj.StochasticDepth(MyBranch(parent=None), survival_prob=0.5)
    for gate in (True, False):
        v = sd.init(jax.random.key(1), X, deterministic=True, gate=jnp.bool_(gate))
        jax.tree_util.tree_map(np.testing.assert_array_equal, v,
                               sd.init(jax.random.key(1), X, deterministic=True))
