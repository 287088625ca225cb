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
