"""Per-example drop path that really skips: mode='sample', implementation='skip'."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stochastic_depth_jax as sdj
from stochastic_depth_jax import ops
from stochastic_depth_jax.training import distributed

B, D = 16, 5
X = jax.random.normal(jax.random.key(0), (B, 3, D))
W = jax.random.normal(jax.random.key(1), (D, D))


def branch(x, w=W):
    return jnp.tanh(x @ w) + 1.0  # never exactly 0, so kept rows are visible


class LinenBranch(nn.Module):
    """``branch`` with learned weights, for the Linen wrapper."""

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(D)(x)) + 1.0


@pytest.mark.parametrize("batch, p, groups, k", [
    (16, 0.7, 1, 11),  # round(11.2)
    (64, 0.6, 1, 38),  # round(38.4)
    (64, 0.6, 8, 5),  # round(4.8) per group of 8
    (10, 0.01, 1, 1),  # at least one example runs the branch
    (16, 0.99, 1, 16),  # rounds to the whole batch: nothing dropped
    (16, 1.0, 2, 8),
])
def test_subset_size_rounds_to_nearest(batch, p, groups, k):
    assert ops.subset_size(batch, p, groups) == k


@pytest.mark.parametrize("p, groups", [(0.5, 1), (0.7, 2), (0.3, 4)])
def test_subset_has_exactly_k_distinct_examples_per_group(p, groups):
    k = ops.subset_size(B, p, groups)
    for seed in range(5):
        idx = np.asarray(ops.draw_subset(jax.random.key(seed), B, p, groups))
        assert idx.shape == (groups, k)
        for row in idx:
            assert len(set(row.tolist())) == k and row.min() >= 0 and row.max() < B // groups
        y = ops.stochastic_depth(branch, X, survival_prob=p, key=jax.random.key(seed),
                                 mode="sample", groups=groups)
        kept = np.any(np.asarray(y) != 0, axis=(1, 2))
        assert kept.sum() == groups * k
        assert np.all(kept.reshape(groups, -1).sum(1) == k)  # k in every group


def test_branch_runs_only_on_the_subset():
    shapes = []

    def recording(x):
        shapes.append(x.shape)
        return branch(x)

    jax.jit(lambda k: ops.stochastic_depth(recording, X, survival_prob=0.25, key=k,
                                           mode="sample"))(jax.random.key(0))
    assert shapes == [(4, 3, D)]


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint32])
@pytest.mark.parametrize("rows", [[[3, 1]], [[1, 1]], [[0, 16]], [[-1, 2]]])
def test_concrete_subset_indices_out_of_contract_are_refused(rows, dtype):
    """Unsorted, repeated or out-of-range indices (jax.random.choice's, say) passed as a gate:
    the gather and scatter are told the rows are sorted and unique, so the result was
    undefined; concrete ones are refused in one line, draw_subset's pass."""
    x = jnp.ones((16, D))
    with pytest.raises(ValueError, match=r"^Subset indices must be sorted within each row, "
                       r"without repeats, and in \[0, 16\) .*ops.draw_subset"):
        ops.subset_branch(branch, x, jnp.asarray(np.asarray(rows).astype(dtype)))
    # Unsigned indices in reverse passed: their differences wrapped around to positive.
    with pytest.raises(ValueError, match=r"^Subset indices must be sorted"):
        ops.gated_branch(branch, x, np.asarray(rows).astype(dtype), 0.5, mode="sample")
    good = ops.draw_subset(jax.random.key(0), 16, 0.5)
    np.testing.assert_allclose(ops.subset_branch(branch, x, good)[np.asarray(good)[0]],
                               branch(x[np.asarray(good)[0]]), rtol=1e-6)


def test_subset_indices_as_a_list_work_and_a_flat_row_is_refused():
    """A Python list failed with "'list' object has no attribute 'shape'", and a flat row
    of indices with an unpacking error."""
    x = jnp.ones((16, D))
    good = ops.draw_subset(jax.random.key(0), 16, 0.5)
    np.testing.assert_array_equal(ops.subset_branch(branch, x, np.asarray(good).tolist()),
                                  ops.subset_branch(branch, x, good))
    with pytest.raises(ValueError, match=r"^Subset indices must be int \[groups, k\] .*got "
                       r"shape \(8,\): for one group pass indices\[None\]\.$"):
        ops.subset_branch(branch, x, good[0])


def test_inclusion_frequency_within_five_sigma_of_survival():
    """Over N keys each example is kept with probability k / n (within 1 / (2n) of p)."""
    n, p, num_keys = 16, 0.7, 4000
    k = ops.subset_size(n, p)
    keys = jax.random.split(jax.random.key(3), num_keys)
    idx = jax.vmap(lambda key: ops.draw_subset(key, n, p))(keys)  # [N, 1, k]
    masks = jax.vmap(lambda i: ops.subset_mask(i, n))(idx)
    freq = np.asarray(masks, np.float64).mean(0)
    q = k / n
    assert abs(q - p) <= 1 / (2 * n)
    sigma = np.sqrt(q * (1 - q) / num_keys)
    assert np.all(np.abs(freq - q) < 5 * sigma), (freq, q, sigma)
    # The subsets differ between keys (not a fixed set).
    assert len({tuple(np.asarray(i).ravel()) for i in idx[:50]}) > 40


@pytest.mark.parametrize("scaling", ["test", "train"])
def test_excluded_examples_get_exactly_the_shortcut_and_no_branch_gradient(scaling):
    key = jax.random.key(7)
    gate = np.asarray(ops.subset_mask(ops.draw_subset(key, B, 0.5), B))

    def block(w, x):
        return x + ops.stochastic_depth(lambda v: branch(v, w), x, survival_prob=0.5, key=key,
                                        mode="sample", scaling=scaling)

    y = block(W, X)
    np.testing.assert_array_equal(np.asarray(y)[~gate], np.asarray(X)[~gate])
    # Gradient of the excluded examples' outputs: nothing reaches the branch weights, and the
    # input gets exactly the shortcut's identity gradient.
    dropped = jnp.asarray(~gate, jnp.float32)[:, None, None]
    gw, gx = jax.grad(lambda w, x: jnp.sum(block(w, x) * dropped), argnums=(0, 1))(W, X)
    np.testing.assert_array_equal(gw, 0.0)
    np.testing.assert_array_equal(gx, np.broadcast_to(np.asarray(dropped), X.shape))


@pytest.mark.parametrize("scaling", ["test", "train"])
@pytest.mark.parametrize("groups", [1, 4])
def test_skip_equals_mask_for_the_same_subset(scaling, groups):
    p = 0.6
    idx = ops.draw_subset(jax.random.key(11), B, p, groups)
    k_over_n = idx.shape[1] / (B // groups)
    gate = ops.subset_mask(idx, B)

    def loss(w, x, implementation):
        g = idx if implementation == "skip" else gate
        # The mask form's train scaling 1/p equals n/k when p is the kept fraction k/n.
        y = ops.gated_branch(lambda v: branch(v, w), x, g, k_over_n, mode="sample",
                             scaling=scaling, implementation=implementation)
        return jnp.sum(jnp.sin(x + y)), y

    (l_s, y_s), g_s = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(W, X, "skip")
    (l_m, y_m), g_m = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(W, X, "mask")
    np.testing.assert_allclose(y_s, y_m, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(l_s, l_m, rtol=1e-6)
    for a, b in zip(g_s, g_m):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if scaling == "train":  # kept examples are scaled by n / k (DINOv2's B / k)
        kept = np.asarray(gate)
        np.testing.assert_allclose(np.asarray(y_s)[kept],
                                   np.asarray(branch(X))[kept] / k_over_n, rtol=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
def test_train_scaling_of_subsets_is_n_over_k_not_one_over_p(groups):
    # p = 0.7 keeps k = round(0.7 n) examples per group: the kept fraction k / n differs
    # from p, and only n / k makes the training expectation exactly f(x) (module docstring).
    p = 0.7
    n, k = B // groups, ops.subset_size(B, p, groups)
    assert not np.isclose(n / k, 1 / p)
    key = jax.random.key(5)
    kept = np.asarray(ops.subset_mask(ops.draw_subset(key, B, p, groups), B))
    y = ops.stochastic_depth(branch, X, survival_prob=p, key=key, mode="sample",
                             scaling="train", groups=groups)
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(branch(X))[kept] * n / k,
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(y)[~kept], 0.0)


@pytest.mark.parametrize("scaling, factor", [("test", 0.6), ("train", 1.0)])
def test_evaluation_is_deterministic_and_scaled(scaling, factor):
    run = jax.jit(lambda x: ops.stochastic_depth(branch, x, survival_prob=0.6, deterministic=True,
                                                 mode="sample", scaling=scaling))
    y1, y2 = run(X), run(X)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_allclose(y1, factor * branch(X), rtol=1e-6)


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5, float("nan")])
def test_bad_survival_prob_is_a_clear_error(p):
    with pytest.raises(ValueError, match="survival_prob must be in"):
        ops.stochastic_depth(branch, X, survival_prob=p, key=jax.random.key(0), mode="sample")


def test_traced_survival_prob_with_subsets_is_a_clear_error():
    f = jax.jit(lambda p: ops.stochastic_depth(branch, X, survival_prob=p, key=jax.random.key(0),
                                               mode="sample"))
    with pytest.raises(ValueError, match="static Python float.*implementation='mask'"):
        f(0.5)


def test_groups_must_split_the_batch():
    with pytest.raises(ValueError, match="groups=3"):
        ops.stochastic_depth(branch, X, survival_prob=0.5, key=jax.random.key(0), mode="sample",
                             groups=3)


def test_linen_wrapper_uses_the_op_subset():
    sd = sdj.StochasticDepth(LinenBranch(parent=None), survival_prob=0.5, mode="sample",
                             scaling="train", groups=2)
    variables = sd.init(jax.random.key(0), X, deterministic=True)
    key = jax.random.key(4)
    y = sd.apply(variables, X, deterministic=False, rngs={"stochastic_depth": key})
    idx = ops.draw_subset(jax.random.key(9), B, 0.5, 2)
    y_gate = sd.apply(variables, X, deterministic=False, gate=idx)
    f = lambda v: sd.apply(variables, v, method=lambda m, v: m.branch(v))
    expected = ops.subset_branch(f, X, idx, 2.0)
    np.testing.assert_allclose(y_gate, expected, rtol=1e-6)
    kept = np.any(np.asarray(y) != 0, axis=(1, 2))
    assert kept.sum() == 8 and np.all(kept.reshape(2, -1).sum(1) == 4)


COLLECTIVE = re.compile(r"= (\S+) (all-gather|all-to-all|collective-permute|all-reduce)"
                        r"(?:-start)?\(")


def _collectives(groups):
    mesh = distributed.make_mesh()
    x = jax.device_put(jnp.ones((64, 4, D)), distributed.batch_sharded(mesh))
    w = jax.device_put(W, distributed.replicated(mesh))

    def loss(w, x, key):
        y = ops.stochastic_depth(lambda v: jnp.tanh(v @ w), x, survival_prob=0.6, key=key,
                                 mode="sample", scaling="train", groups=groups)
        return jnp.sum((x + y) ** 2)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(w, x, jax.random.key(0)).compile()
    return COLLECTIVE.findall(hlo.as_text())


def test_sharded_subsets_move_no_activations_between_devices():
    assert jax.device_count() == 8
    for groups in (8, 16):
        found = _collectives(groups)
        # Only the weight gradient's all-reduce (f32[5,5]) and scalars: no all-gather,
        # all-to-all or permute, and no all-reduce of activation shapes.
        assert {op for _, op in found} <= {"all-reduce"}, found
        assert all(re.fullmatch(r"f32\[(5,5)?\](\{.*\})?", shape) for shape, _ in found), found
    # One group over 8 devices does move activations: the check above can fail.
    found = _collectives(1)
    assert any(not re.fullmatch(r"f32\[(5,5)?\](\{.*\})?", s) for s, _ in found), found


def test_batchnorm_in_a_subset_branch_normalises_over_the_subset():
    class Branch(nn.Module):
        @nn.compact
        def __call__(self, x):
            return sdj.BatchNorm()(x, train=True)

    x = jax.random.normal(jax.random.key(5), (B, D)) * 3.0 + 1.0
    sd = sdj.StochasticDepth(Branch(parent=None), survival_prob=0.5, mode="sample")
    variables = sd.init(jax.random.key(0), x, deterministic=True)
    idx = ops.draw_subset(jax.random.key(6), B, 0.5)
    y, updates = sd.apply(variables, x, deterministic=False, gate=idx, mutable=["batch_stats"])
    kept = np.asarray(ops.subset_mask(idx, B))
    sub = np.asarray(x)[kept]
    # Kept rows are normalised with the subset's own mean and variance, not the batch's.
    expected = (sub - sub.mean(0)) / np.sqrt(sub.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y)[kept], expected, rtol=1e-4, atol=1e-5)
    new_mean = updates["batch_stats"]["branch"]["BatchNorm_0"]["mean"]
    np.testing.assert_allclose(new_mean, 0.1 * sub.mean(0), rtol=1e-5)


@pytest.mark.parametrize("mode, implementation, groups", [
    ("sample", "skip", 1), ("sample", "skip", 4), ("sample", "mask", 1), ("batch", "skip", 1),
    ("batch", "mask", 1),
])
@pytest.mark.parametrize("scaling", ["test", "train"])
def test_shortcut_argument_equals_adding_the_shortcut_afterwards(mode, implementation, groups,
                                                                 scaling):
    # With subsets the kept outputs are scatter-added into the shortcut (one pass) instead of
    # scattered into zeros; values and gradients must be those of shortcut + gated residual.
    shortcut = 2.0 * X

    def loss(w, x, fused):
        kw = dict(survival_prob=0.6, key=jax.random.key(3), mode=mode, scaling=scaling,
                  implementation=implementation, groups=groups)
        f = lambda v: branch(v, w)
        if fused:
            y = ops.stochastic_depth(f, x, shortcut=2.0 * x, **kw)
        else:
            y = 2.0 * x + ops.stochastic_depth(f, x, **kw)
        return jnp.sum(jnp.sin(y)), y

    (l_f, y_f), g_f = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(W, X, True)
    (l_u, y_u), g_u = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(W, X, False)
    np.testing.assert_allclose(y_f, y_u, rtol=1e-6, atol=1e-6)
    assert not np.allclose(y_f, shortcut)  # the branch contributed
    for a, b in zip(g_f, g_u):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    e_f = ops.stochastic_depth(branch, X, survival_prob=0.6, deterministic=True,
                               scaling=scaling, shortcut=shortcut)
    e_u = shortcut + ops.stochastic_depth(branch, X, survival_prob=0.6, deterministic=True,
                                          scaling=scaling)
    np.testing.assert_allclose(e_f, e_u, rtol=1e-6)


def test_shortcut_promotes_dtypes_as_an_addition_would():
    idx = ops.draw_subset(jax.random.key(2), B, 0.5)
    f = lambda v: branch(v).astype(jnp.bfloat16)
    y = ops.subset_branch(f, X, idx, shortcut=X)  # float32 shortcut, bfloat16 branch
    expected = X + ops.subset_branch(f, X, idx)
    assert y.dtype == expected.dtype == jnp.float32
    np.testing.assert_allclose(y, expected, rtol=1e-6)


def test_shortcut_of_the_wrong_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"shortcut has shape \(16, 3\) but the branch output"):
        ops.stochastic_depth(branch, X, survival_prob=0.5, key=jax.random.key(0), mode="sample",
                             shortcut=X[..., 0])


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_wrappers_pass_the_shortcut_to_the_op(api):
    idx = ops.draw_subset(jax.random.key(9), B, 0.5, 2)
    if api == "linen":
        sd = sdj.StochasticDepth(LinenBranch(parent=None), survival_prob=0.5, mode="sample",
                                 scaling="train", groups=2)
        variables = sd.init(jax.random.key(0), X, deterministic=True)
        run = lambda **kw: sd.apply(variables, X, **kw)
    else:
        from flax import nnx

        class Branch(nnx.Module):
            def __init__(self, rngs):
                self.dense = nnx.Linear(D, D, rngs=rngs)

            def __call__(self, x):
                return jnp.tanh(self.dense(x)) + 1.0

        sd = sdj.nnx_layers.StochasticDepth(Branch(nnx.Rngs(0)), 0.5, mode="sample",
                                            scaling="train", groups=2)
        run = lambda **kw: sd(X, **kw)
    fused = run(deterministic=False, gate=idx, shortcut=X)
    plain = X + run(deterministic=False, gate=idx)
    np.testing.assert_allclose(fused, plain, rtol=1e-6)
    assert np.sum(np.any(np.asarray(fused) != np.asarray(X), axis=(1, 2))) == 8  # 4 per group
    np.testing.assert_allclose(run(deterministic=True, shortcut=X),
                               X + run(deterministic=True), rtol=1e-6)
    if api == "linen":  # subsets are training gates
        with pytest.raises(ValueError, match="subset indices as gate with deterministic=True"):
            run(deterministic=True, gate=idx)


def test_vit_and_convnext_gates_differ_between_branches_and_blocks():
    # Each gate folds in its own index: the ViT's attention and MLP branches of a block
    # (block_gates), and the ConvNeXt's blocks (block_gate with the block's index), are kept
    # independently, so with p = 0.5 two of them agree about half the time, not always.
    from stochastic_depth_jax import vit
    kw = dict(mode="batch", implementation="skip", batch_size=B, groups=1)
    keys = jax.random.split(jax.random.key(4), 1000)
    attn, mlp = jax.vmap(lambda k: vit.block_gates(k, 0, 0.5, **kw))(keys)
    first, second = jax.vmap(lambda k: (vit.block_gate(k, 0, 0.5, **kw),
                                        vit.block_gate(k, 1, 0.5, **kw)))(keys)
    bound = 5 * np.sqrt(0.25 / len(keys))
    for a, b in ((attn, mlp), (first, second)):
        agree = np.mean(np.asarray(a) == np.asarray(b))
        assert abs(agree - 0.5) <= bound, agree


def test_vit_fused_residual_matches_the_unfused_block():
    images = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
    kw = dict(num_classes=4, size="ti", depth=2, patch_size=8, drop_path_rate=0.5, groups=2)
    fused, plain = sdj.ViT(**kw), sdj.ViT(**kw, fused_residual=False)
    variables = fused.init(jax.random.key(1), images, train=False)

    def loss(params, model):
        logits = model.apply({"params": params}, images, train=True, key=jax.random.key(5))
        return jnp.sum(logits * jnp.arange(4.0)), logits

    (l_f, y_f), g_f = jax.value_and_grad(loss, has_aux=True)(variables["params"], fused)
    (l_u, y_u), g_u = jax.value_and_grad(loss, has_aux=True)(variables["params"], plain)
    np.testing.assert_allclose(y_f, y_u, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_u)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_linen_drop_path_takes_the_drop_rate_as_nnx_does():
    # timm's drop_path_rate=0.25 is survival 0.75: the same parameters and outputs.
    drop = sdj.DropPath(LinenBranch(parent=None), rate=0.25)
    sd = sdj.StochasticDepth(LinenBranch(parent=None), survival_prob=0.75, mode="sample",
                             scaling="train")
    variables = drop.init(jax.random.key(0), X, deterministic=True)
    key = jax.random.key(3)
    y = drop.apply(variables, X, deterministic=False, rngs={"stochastic_depth": key})
    np.testing.assert_array_equal(
        y, sd.apply(variables, X, deterministic=False, rngs={"stochastic_depth": key}))
    dropped = np.all(np.asarray(y) == 0.0, axis=(1, 2))
    assert dropped.sum() == B - ops.subset_size(B, 0.75)  # 4 of 16 dropped, not 12
    np.testing.assert_array_equal(drop.apply(variables, X, deterministic=True),
                                  sd.apply(variables, X, deterministic=True))


@pytest.mark.parametrize("make, error, message", [
    (lambda b: sdj.DropPath(b, 0.1), TypeError,
     r"DropPath takes the drop rate by keyword.*drop rate of 0.1 write rate=0.1, for a "
     r"survival probability of 0.1 rate=0.9\.$"),
    (lambda b: sdj.DropPath(b, survival_prob=0.9), TypeError, r"rate=0.1\.$"),
    (lambda b: sdj.DropPath(b, rate=1.0), ValueError, r"DropPath rate must be a float in \[0, 1\)"),
    (lambda b: sdj.DropPath(b, rate=-0.1), ValueError, r"in \[0, 1\), got -0.1"),
])
def test_linen_drop_path_refuses_a_survival_prob_or_a_bad_rate(make, error, message):
    with pytest.raises(error, match=message):
        make(LinenBranch(parent=None))


def test_a_traced_drop_path_rate_is_refused_naming_the_call_s_survival_prob():
    """A DropPath built under jit with a traced rate was told 'must be a float in [0, 1)',
    which it may well be: the rate is a field, fixed when the model is built; a varying
    one goes to the call as survival_prob=1 - rate. Linen and NNX alike."""
    expected = ("DropPath rate must be known when the model is built, got a traced value; "
                "pass a rate that varies under jit to the call instead, as "
                "survival_prob=1 - rate.")

    def linen(rate):
        sdj.DropPath(LinenBranch(parent=None), rate=rate)
        return rate

    def nnx_drop_path(rate):
        sdj.nnx_layers.DropPath(lambda v: v + 1.0, rate)
        return rate

    for build in (linen, nnx_drop_path):
        with pytest.raises(ValueError) as caught:
            jax.jit(build)(0.1)
        assert str(caught.value) == expected


def _remat_message(name):
    return (rf"^{name} got a traced train flag \(nn\.remat, or nn\.jit without "
            rf"static_argnames, traces keyword arguments\), which it must read in Python: to "
            rf"rematerialise, apply {name} itself with remat=True \(each block's branches "
            rf"recomputed in the backward pass\), and under nn\.jit pass "
            rf"static_argnames='train'\.$")


@pytest.mark.parametrize("block", [lambda **kw: sdj.vit.EncoderBlock(2, 16, 0.5, **kw),
                                   lambda **kw: sdj.convnext.ConvNeXtBlock(0.5, **kw)])
def test_a_vit_or_convnext_block_under_nn_remat_is_refused_in_one_line(block):
    """``nn.remat(EncoderBlock)`` (the usual way to save memory in a transformer) traces the
    block's keyword-only ``train``: JAX's ``TracerBoolConversionError`` followed, naming
    neither the block nor a fix. ``train=None`` evaluated and ``train='False'`` trained,
    silently. Now one line each, naming the block's own ``remat=True``, which gives the
    block's outputs and gradients."""
    name = type(block()).__name__
    shape = (8, 16, 8) if name == "EncoderBlock" else (8, 4, 4, 8)
    x = jax.random.normal(jax.random.key(0), shape)
    variables = block().init(jax.random.key(1), x, train=False)
    rngs = {"stochastic_depth": jax.random.key(2)}
    with pytest.raises(TypeError) as caught:  # JAX may append a note on its traceback below
        remat_block = nn.remat(type(block()))
        args = (2, 16, 0.5) if name == "EncoderBlock" else (0.5,)
        remat_block(*args).apply(variables, x, train=True, rngs=rngs)
    assert re.match(_remat_message(name), str(caught.value).splitlines()[0]), str(caught.value)
    for flag, text in ((None, "None"), ("False", "'False'")):
        with pytest.raises(TypeError, match=rf"^train must be a bool, got {text} "):
            block().apply(variables, x, train=flag, rngs=rngs)
    if name == "EncoderBlock":
        gates = sdj.vit.block_gates(jax.random.key(3), 0, 0.5, mode="sample",
                                    implementation="skip", batch_size=8, groups=1)
    else:
        gates = sdj.vit.block_gate(jax.random.key(3), 0, 0.5, mode="sample",
                                   implementation="skip", batch_size=8, groups=1)

    def loss(params, model):
        y = model.apply({"params": params}, x, gates, train=True)
        return jnp.sum(jnp.sin(y)), y

    (_, y), g = jax.value_and_grad(loss, has_aux=True)(variables["params"], block())
    (_, y_r), g_r = jax.value_and_grad(loss, has_aux=True)(variables["params"],
                                                           block(remat=True))
    np.testing.assert_allclose(y_r, y, rtol=1e-6, atol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           g_r, g)


def _fields(module):
    """``module``'s dataclass fields, to build the same module under a Linen transform."""
    return {f: getattr(module, f) for f in module.__dataclass_fields__
            if f not in ("parent", "name")}


def _small_model(name, **kw):
    """A ViT or ConvNeXt small enough for a test, with drop path, and 16x16 images for it."""
    if name == "ViT":
        return sdj.ViT(num_classes=5, size="ti", patch_size=4, width=32, depth=3, num_heads=2,
                       drop_path_rate=0.4, **kw)
    return sdj.ConvNeXt(num_classes=5, depths=(2, 1), dims=(8, 16), stem_stride=2,
                        drop_path_rate=0.4, **kw)


def _random_head(kernel):
    """A random head kernel shaped like ``kernel``: the ViT's starts at zero, so every
    gradient below the head was zero, with and without remat alike."""
    return jax.random.normal(jax.random.key(4), kernel.shape, kernel.dtype)


def _assert_same_gradients(got, expected):
    """``got`` equals ``expected`` to float rounding (relative to each array's largest
    entry), and the comparison reaches the blocks: a block parameter's gradient is nonzero."""
    flat = jax.tree_util.tree_flatten_with_path(expected)[0]
    assert any("blocks" in jax.tree_util.keystr(path) and np.any(np.asarray(leaf) != 0)
               for path, leaf in flat)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-6 + 1e-5 * float(np.max(np.abs(b)))), got, expected)


def _backward_of(loss, params):
    """(outputs, gradients, bytes of the residuals the backward pass keeps: those its
    ``jax.vjp`` closes over, parameters included) of ``loss(params) -> (scalar, outputs)``."""
    _, backward, y = jax.vjp(loss, params, has_aux=True)
    saved = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(backward))
    return y, backward(jnp.float32(1.0))[0], saved


def _assert_remat_keeps_less(plain, remat):
    """The same outputs and gradients, under half the residuals kept for the backward pass."""
    (y, g, saved), (y_r, g_r, saved_r) = plain, remat
    np.testing.assert_allclose(y_r, y, rtol=1e-6, atol=1e-6)
    _assert_same_gradients(g_r, g)
    assert saved_r < 0.5 * saved, (saved_r, saved)


@pytest.mark.parametrize("name, mode", [("ViT", "sample"), ("ViT", "batch"),
                                        ("ConvNeXt", "sample")])
def test_model_remat_gives_the_same_values_and_gradients_and_saves_less(name, mode):
    """``ViT(remat=True)`` / ``ConvNeXt(remat=True)``: each block's branches under
    ``nn.remat`` (timm's ``set_grad_checkpointing``), which ``nn.remat(ViT)`` could not give
    (it traces ``train``). The same parameters (names included), outputs and gradients; the
    backward pass keeps less: the residuals its ``jax.vjp`` closes over (parameters
    included; deterministic, as the compiled memory figure may not be)."""
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
    model, remat = _small_model(name, mode=mode), _small_model(name, mode=mode, remat=True)
    variables = model.init(jax.random.key(1), x, train=False)
    assert jax.tree_util.tree_structure(remat.init(jax.random.key(1), x, train=False)) == \
        jax.tree_util.tree_structure(variables)
    params, head = variables["params"], variables["params"]["head"]
    params = dict(params, head=dict(head, kernel=_random_head(head["kernel"])))
    runs = []
    for m in (model, remat):
        def loss(params, m=m):
            y = m.apply({"params": params}, x, train=True,
                        rngs={"stochastic_depth": jax.random.key(2)})
            return jnp.sum(jnp.sin(y)), y

        runs.append(_backward_of(loss, params))
    _assert_remat_keeps_less(*runs)  # measured: 0.18-0.23


# Tiny NNX models of each kind, for the remat tests.
_NNX_TINY = {"ViT": dict(size="ti", patch_size=4, image_size=16, width=32, depth=2, num_heads=2),
             "ConvNeXt": dict(depths=(2, 1), dims=(8, 16), stem_stride=2)}


@pytest.mark.parametrize("name", ["ViT", "ConvNeXt"])
def test_nnx_model_remat_gives_the_same_values_and_gradients_and_saves_less(name):
    """The NNX twins' ``remat=True``: each branch under ``nnx.remat``; the same outputs and
    gradients, fewer residuals kept for the backward pass; a string is refused."""
    from flax import nnx
    from stochastic_depth_jax import nnx_layers
    cls = getattr(nnx_layers, name)
    kw = _NNX_TINY[name]
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
    runs = []
    for remat in (False, True):
        model = cls(5, drop_path_rate=0.4, remat=remat,
                    rngs=nnx.Rngs(params=0, stochastic_depth=1), **kw)
        model.head.kernel[...] = _random_head(model.head.kernel[...])
        graph, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params, graph=graph, rest=rest):
            y = nnx.merge(graph, params, rest)(x, rngs=jax.random.key(3))
            return jnp.sum(jnp.sin(y)), y

        runs.append(_backward_of(loss, params))
    _assert_remat_keeps_less(*runs)  # measured: 0.23
    with pytest.raises(TypeError, match=rf"^{name} remat must be a bool .*, got 'full'\.$"):
        cls(5, remat="full", rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize("name", ["ViT", "ConvNeXt"])
def test_nnx_model_remat_runs_in_a_jax_transform_that_closes_over_the_model(name):
    """An NNX model closed over by ``jax.jit`` (evaluation) or ``jax.grad`` in its input
    (saliency, adversarial examples; call-time keys) runs with ``remat=False``; with
    ``remat=True``, ``nnx.remat`` wrote the unchanged parameters back into the model from
    inside the outer trace ("Cannot mutate Param from a different trace level"), and the
    model failed from then on with "'ConvNeXtBranch' object has no attribute 'remat'".
    Now the same values as without remat, and the model still runs after."""
    from flax import nnx
    from stochastic_depth_jax import nnx_layers
    cls = getattr(nnx_layers, name)
    kw = _NNX_TINY[name]
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    runs = []
    for remat in (False, True):
        model = cls(5, drop_path_rate=0.4, remat=remat, rngs=nnx.Rngs(params=0), **kw)
        model.head.kernel[...] = _random_head(model.head.kernel[...])
        logits = jax.jit(lambda v, model=model: model(v, deterministic=True))(x)
        saliency = jax.grad(lambda v, model=model: jnp.sum(jnp.sin(
            model(v, rngs=jax.random.key(3)))))(x)
        runs.append((logits, saliency, model(x, deterministic=True)))
    for got, expected in zip(runs[1], runs[0]):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.any(np.asarray(runs[0][1]) != 0)


@pytest.mark.parametrize("name", ["ViT", "ConvNeXt"])
def test_model_remat_takes_a_bool_and_nn_remat_of_the_model_names_it(name):
    """``nn.remat(ViT)`` got the wrapper's general message, which told the user to wrap a
    branch they do not build; a ResNet-style ``remat='full'`` (or ``'none'``, read as
    True) had no check."""
    x = jnp.ones((2, 16, 16, 3))
    variables = _small_model(name).init(jax.random.key(1), x, train=False)
    rngs = {"stochastic_depth": jax.random.key(2)}
    with pytest.raises(TypeError) as caught:
        nn.remat(type(_small_model(name)))(**_fields(_small_model(name))).apply(
            variables, x, train=True, rngs=rngs)
    assert re.match(_remat_message(name), str(caught.value).splitlines()[0]), str(caught.value)
    for bad in ("none", "full"):
        with pytest.raises(TypeError, match=rf"^{name} remat must be a bool \(True: recompute "
                                            rf"each block's branches .*, got '{bad}'\.(\n|$)"):
            _small_model(name, remat=bad).init(jax.random.key(1), x, train=False)


@pytest.mark.parametrize("name", ["ViT", "ConvNeXt", "EncoderBlock", "ConvNeXtBlock"])
def test_nn_vmap_of_a_model_or_block_names_how_to_pass_train(name):
    """Linen's ``nn.vmap`` drops keyword arguments: Python's "missing 1 required
    keyword-only argument: 'train'" named no way through. Now one line naming a mapped
    function that passes ``train``, which works (same logits as the model, example by
    example); a plain call without ``train`` names it."""
    if name in ("ViT", "ConvNeXt"):
        model, x = _small_model(name), jnp.ones((3, 2, 16, 16, 3))
    elif name == "EncoderBlock":
        model, x = sdj.vit.EncoderBlock(2, 16, 0.5), jnp.ones((3, 2, 5, 8))
    else:
        model, x = sdj.convnext.ConvNeXtBlock(0.5), jnp.ones((3, 2, 4, 4, 8))
    mapped = nn.vmap(type(model), variable_axes={"params": None},
                     split_rngs={"params": False, "stochastic_depth": True})
    with pytest.raises(TypeError) as caught:
        mapped(**_fields(model)).init(jax.random.key(0), x)
    assert str(caught.value).splitlines()[0] == (  # JAX may add a note below
        f"{name} got no train flag: nn.vmap drops keyword arguments; map a function that "
        f"passes it, nn.vmap(lambda m, x: m(x, train=train), variable_axes={{'params': "
        f"None}}, split_rngs={{'params': False, 'stochastic_depth': True}})(model, x) in a "
        f"parent module, or jax.vmap over model.apply.")
    with pytest.raises(TypeError, match=rf"^{name} needs train=True \(training\) or "
                                        rf"train=False \(evaluation\)\.(\n|$)"):
        model.init(jax.random.key(0), x[0])

    class Mapped(nn.Module):  # the fix the line names
        train: bool

        @nn.compact
        def __call__(self, v):
            inner = type(model)(**_fields(model), name="inner")
            return nn.vmap(lambda m, u: m(u, train=self.train), variable_axes={"params": None},
                           split_rngs={"params": False, "stochastic_depth": True})(inner, v)

    variables = Mapped(False).init(jax.random.key(0), x)
    y = Mapped(False).apply(variables, x)
    alone = model.apply({"params": variables["params"]["inner"]}, x[1], train=False)
    np.testing.assert_allclose(y[1], alone, rtol=1e-6, atol=1e-6)
    assert Mapped(True).apply(variables, x, rngs={"stochastic_depth": jax.random.key(1)}
                              ).shape == y.shape


@pytest.mark.parametrize("block", [lambda: sdj.vit.EncoderBlock(2, 16, 0.5),
                                   lambda: sdj.convnext.ConvNeXtBlock(0.5)])
def test_a_block_s_train_traced_by_jax_jit_gets_the_fix_for_jax_jit(block):
    """``jax.jit(block.apply)(variables, x, train=True)`` traces ``train`` too, with no
    Linen transform around the block: its refusal blamed nn.remat / nn.jit and told the user
    to "apply the block itself", which they were. The general message, naming
    ``static_argnames='train'`` for ``jax.jit``, is the one; under ``nn.remat`` the
    block's own (test above)."""
    name = type(block()).__name__
    x = jax.random.normal(jax.random.key(0), (8, 16, 8) if name == "EncoderBlock"
                          else (8, 4, 4, 8))
    variables = block().init(jax.random.key(1), x, train=False)
    rngs = {"stochastic_depth": jax.random.key(2)}
    with pytest.raises(ops.TracedFlagError) as caught:
        jax.jit(block().apply)(variables, x, train=True, rngs=rngs)
    first = str(caught.value).splitlines()[0]
    assert "jax.jit(step, static_argnames='train')" in first, first
    assert f"apply {name} itself" not in first, first
    assert jax.jit(block().apply, static_argnames="train")(
        variables, x, train=True, rngs=rngs).shape == x.shape


def _scan_message(name):
    """The one line ``nn.scan`` of ``name`` (a model or a block) gets: the fix that works."""
    if name in ("ViT", "ConvNeXt"):
        fix = ("scan a function that passes it, nn.scan(lambda m, c, x: (c, m(x, "
               "train=train)), variable_broadcast='params', split_rngs={'params': False, "
               "'stochastic_depth': True})(model, None, xs)")
    else:
        fix = ("scan a function that passes it and returns (carry, output), nn.scan(lambda m, "
               "x, _: (m(x, train=train), None), variable_axes={'params': 0}, split_rngs="
               "{'params': True, 'stochastic_depth': True}, length=depth)(block, x, None)")
    return f"{name} got no train flag: nn.scan drops keyword arguments; {fix} in a parent module."


@pytest.mark.filterwarnings("ignore:kwargs are not supported in scan")  # Flax's, on train
@pytest.mark.parametrize("name", ["ViT", "ConvNeXt", "EncoderBlock", "ConvNeXtBlock"])
def test_nn_scan_of_a_model_or_block_names_how_to_pass_train(name):
    """``nn.scan(EncoderBlock, ...)`` (a stack of blocks, the usual way to compile a deep
    transformer once) drops keyword arguments as ``nn.vmap`` does: a user who passed
    ``train=False`` was told to pass ``train=True`` or ``train=False``. Now one line naming
    a scanned function that passes it, which works: a stack of blocks gives the blocks'
    outputs one after the other; a model scanned over batches, its logits batch by batch."""
    if name in ("ViT", "ConvNeXt"):
        model, x = _small_model(name), jax.random.normal(jax.random.key(0), (2, 2, 16, 16, 3))
        axes = dict(variable_broadcast="params")  # one model's parameters for every batch
        split, length = {"params": False, "stochastic_depth": True}, None
    elif name == "EncoderBlock":
        model, x = sdj.vit.EncoderBlock(2, 16, 0.5), jax.random.normal(jax.random.key(0),
                                                                       (2, 5, 8))
        axes = dict(variable_axes={"params": 0})  # a stack of blocks
        split, length = {"params": True, "stochastic_depth": True}, 3
    else:
        model = sdj.convnext.ConvNeXtBlock(0.5, layer_scale_init=1.0)  # 1e-6: drops unseen
        x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
        axes = dict(variable_axes={"params": 0})
        split, length = {"params": True, "stochastic_depth": True}, 3
    scanned = nn.scan(type(model), **axes, split_rngs=split, length=length or 2)
    with pytest.raises(TypeError) as caught:
        scanned(**_fields(model)).init(jax.random.key(0), x, train=False)
    assert str(caught.value).splitlines()[0] == _scan_message(name)  # JAX may add a note

    class Scanned(nn.Module):  # the fix the line names
        train: bool

        @nn.compact
        def __call__(self, v):
            inner = type(model)(**_fields(model), name="inner")
            if length is None:
                return nn.scan(lambda m, c, u: (c, m(u, train=self.train)), **axes,
                               split_rngs=split)(inner, None, v)[1]
            return nn.scan(lambda m, u, _: (m(u, train=self.train), None), **axes,
                           split_rngs=split, length=length)(inner, v, None)[0]

    variables = Scanned(False).init(jax.random.key(0), x)
    y = Scanned(False).apply(variables, x)
    params = variables["params"]["inner"]
    if length is None:  # one model, batch by batch
        expected = jnp.stack([model.apply({"params": params}, v, train=False) for v in x])
    else:  # block i has the scanned parameters' slice i
        expected = x
        for i in range(length):
            expected = model.apply({"params": jax.tree.map(lambda a, i=i: a[i], params)},
                                   expected, train=False)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    trained = Scanned(True).apply(variables, x, rngs={"stochastic_depth": jax.random.key(1)})
    assert trained.shape == y.shape and np.all(np.isfinite(trained))
    if length is not None:  # (a model's zero or 1e-6-scaled start hides its drops)
        assert not np.allclose(trained, y)


def _vit(**kw):
    """A two-block ViT with drop path for 16x16 images (``_small_model``'s, shallower)."""
    return sdj.ViT(num_classes=5, size="ti", patch_size=4, width=32, depth=2, num_heads=2,
                   drop_path_rate=0.4, **kw)


def _gammas(params):
    """``{path: gamma}`` of every layer scale in ``params``."""
    return {jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if getattr(path[-1], "key", None) == "gamma"}


def test_vit_layer_scale_is_off_by_default_and_adds_timm_s_gammas():
    """LayerScale (CaiT, DINOv2; timm's ``init_values``) is off by default: the parameters
    and outputs of a ViT without it (None or 0) are the default's, bit for bit. With it,
    each branch gets a float32 ``gamma`` of the model width started at the value: ViT-S/16
    counts timm's 22,050,664 parameters without and 22,059,880 with ``init_values``."""
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
    rngs = {"stochastic_depth": jax.random.key(2)}
    default = _vit()
    variables = default.init(jax.random.key(1), x, train=False)
    assert not _gammas(variables)
    for off in (None, 0, 0.0):
        model = _vit(layer_scale_init=off)
        assert jax.tree_util.tree_all(jax.tree.map(
            np.array_equal, model.init(jax.random.key(1), x, train=False), variables))
        for train in (True, False):
            np.testing.assert_array_equal(
                model.apply(variables, x, train=train, rngs=rngs),
                default.apply(variables, x, train=train, rngs=rngs))
    scaled = _vit(layer_scale_init=1e-5).init(jax.random.key(1), x, train=False)
    gammas = _gammas(scaled)
    assert sorted(gammas) == [f"['params']['blocks_{i}']['{b}']['branch']['gamma']"
                              for i in (0, 1) for b in ("attn", "mlp")]
    for gamma in gammas.values():
        assert gamma.dtype == jnp.float32 and gamma.shape == (32,)
        np.testing.assert_array_equal(gamma, np.float32(1e-5))
    from stochastic_depth_jax import pruning
    assert pruning.param_count(scaled) == pruning.param_count(variables) + 2 * 2 * 32
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    for init, count in ((None, 22_050_664), (1e-5, 22_059_880)):
        vit_s = sdj.ViT(num_classes=1000, size="s", patch_size=16, layer_scale_init=init)
        shapes = jax.eval_shape(lambda v, m=vit_s: m.init(jax.random.key(0), v, train=False),
                                images)
        assert pruning.param_count(shapes) == count


@pytest.mark.parametrize("remat", [False, True])
def test_vit_layer_scale_scales_each_branch_before_drop_path(remat):
    """timm's and DINOv2's block is ``x + drop_path(ls(branch(norm(x))))``: gamma scales a
    branch's output channel by channel, and the residual stream is not scaled. So a block
    with layer scale gamma equals one without whose last layer of each branch (``proj``,
    ``fc2``) has its output channels multiplied by gamma: in training (per-example subsets,
    kept examples scaled by n / k) and evaluation, with and without remat."""
    x = jax.random.normal(jax.random.key(0), (8, 5, 16))
    block = sdj.vit.EncoderBlock(2, 32, 0.5, remat=remat, layer_scale_init=0.5)
    params = block.init(jax.random.key(1), x, train=False)["params"]
    params = jax.tree_util.tree_map_with_path(  # gamma per channel, not one value
        lambda path, a: jax.random.uniform(jax.random.key(len(str(path))), a.shape, a.dtype,
                                           0.2, 2.0)
        if getattr(path[-1], "key", None) == "gamma" else a, params)
    plain = jax.tree.map(lambda a: a, params)
    for branch, last in (("attn", ("attn", "proj")), ("mlp", ("fc2",))):
        inner = plain[branch]["branch"]
        gamma = inner.pop("gamma")
        layer = inner
        for name in last:
            layer = layer[name]
        layer["kernel"], layer["bias"] = layer["kernel"] * gamma, layer["bias"] * gamma
    unscaled = sdj.vit.EncoderBlock(2, 32, 0.5, remat=remat)
    gates = sdj.vit.block_gates(jax.random.key(3), 0, 0.5, mode="sample",
                                implementation="skip", batch_size=8, groups=1)
    for train, g in ((True, gates), (False, (None, None))):
        y = block.apply({"params": params}, x, g, train=train)
        np.testing.assert_allclose(y, unscaled.apply({"params": plain}, x, g, train=train),
                                   rtol=1e-5, atol=1e-5)
    dropped = ~np.isin(np.arange(8), np.asarray(gates[0]).ravel()) & \
        ~np.isin(np.arange(8), np.asarray(gates[1]).ravel())
    y = block.apply({"params": params}, x, gates, train=True)
    np.testing.assert_array_equal(np.asarray(y)[dropped], np.asarray(x)[dropped])


def test_nnx_vit_layer_scale_matches_linen_and_refuses_a_model_without_it():
    """The NNX ViT's layer scale has the Linen one's names and values: loaded, the same
    logits for the same key; a Linen ViT with layer scale does not load into an NNX ViT
    without it (nor the other way round), rather than dropping or keeping gammas."""
    from flax import nnx
    from stochastic_depth_jax import nnx_layers
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
    linen = _vit(layer_scale_init=0.1)
    params = linen.init(jax.random.key(1), x, train=False)["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a * 3.0 if getattr(path[-1], "key", None) in ("gamma", "kernel") else a,
        params)
    kw = dict(size="ti", patch_size=4, image_size=16, width=32, depth=2, num_heads=2,
              drop_path_rate=0.4)
    model = nnx_layers.ViT(5, layer_scale_init=1e-5, rngs=nnx.Rngs(params=0), **kw)
    assert all(float(g[0]) == np.float32(1e-5) for g in _gammas(
        nnx.to_pure_dict(nnx.state(model, nnx.Param))).values())
    nnx_layers.load_linen_params(model, params)
    key = jax.random.key(3)
    expected = linen.apply({"params": params}, x, train=True, rngs={"stochastic_depth": key})
    np.testing.assert_allclose(model(x, rngs=key), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"gamma of the Linen model has no counterpart"):
        nnx_layers.load_linen_params(nnx_layers.ViT(5, rngs=nnx.Rngs(params=0), **kw), params)
    bare = _vit().init(jax.random.key(1), x, train=False)["params"]
    with pytest.raises(ValueError, match=r"has parameters the Linen model lacks \(blocks/0/"):
        nnx_layers.load_linen_params(model, bare)


@pytest.mark.parametrize("value", ["1e-5", True, (1e-5,), float("nan"), float("inf")])
def test_a_vit_layer_scale_init_that_is_not_a_number_is_one_clear_error(value):
    """As the ConvNeXt's: a string failed in the initialiser, True started every gamma at 1,
    NaN made every output NaN. One line, Linen (model and block) and NNX."""
    from flax import nnx
    from stochastic_depth_jax import nnx_layers
    message = (f"layer_scale_init must be a number (ViT: e.g. 1e-5, as DINOv2) or 0 or None "
               f"(no layer scale), got {value!r}.")
    x = jnp.zeros((2, 16, 16, 3))
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):  # JAX adds a note
        _vit(layer_scale_init=value).init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        sdj.vit.EncoderBlock(2, 16, layer_scale_init=value).init(
            jax.random.key(0), jnp.zeros((2, 5, 8)), train=False)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        nnx_layers.ViT(5, size="ti", patch_size=4, image_size=16, width=32, depth=2,
                       num_heads=2, layer_scale_init=value, rngs=nnx.Rngs(params=0))


@pytest.mark.parametrize("groups", [1, 2])
def test_a_subset_is_the_k_smallest_of_the_key_s_float32_uniforms(groups):
    # The documented draw, pinned: another one (the k largest, or another key) keeps the same
    # distribution but gives other subsets from the same key, so a resumed run would differ.
    key = jax.random.key(3)
    k = ops.subset_size(12, 0.5, groups)
    scores = np.asarray(jax.random.uniform(key, (groups, 12 // groups), jnp.float32))
    want = np.sort(np.argsort(scores, axis=-1)[:, :k], axis=-1)
    np.testing.assert_array_equal(ops.draw_subset(key, 12, 0.5, groups), want)


def test_a_subset_of_every_example_runs_without_gather_or_scatter():
    x = jnp.ones((4, 3))
    whole = str(jax.make_jaxpr(lambda v: ops.subset_branch(jnp.tanh, v, jnp.arange(4)[None]))(x))
    assert "gather" not in whole and "scatter" not in whole, whole
    part = str(jax.make_jaxpr(lambda v: ops.subset_branch(jnp.tanh, v, jnp.arange(2)[None]))(x))
    assert "gather" in part and "scatter" in part  # the check above can fail


def test_drop_path_rates_are_timm_s_linspace_the_paper_s_eq_4_or_uniform():
    """timm's VisionTransformer and ConvNeXt drop ``torch.linspace(0, rate, depth)`` (0 at the
    first block, the rate at the last; DeiT-S: 0.1), the default rule; the paper's Eq. 4
    drops ``l / L * rate`` at block l = 1..L. Without a rate nothing is dropped (timm's
    default drop_path_rate is 0)."""
    np.testing.assert_allclose(sdj.drop_path_rates(4, 0.3), [0.0, 0.1, 0.2, 0.3], atol=1e-12)
    np.testing.assert_allclose(sdj.drop_path_rates(4, 0.4, "paper"), [0.1, 0.2, 0.3, 0.4],
                               atol=1e-12)
    np.testing.assert_array_equal(sdj.drop_path_rates(3, 0.2, "uniform"), [0.2, 0.2, 0.2])
    np.testing.assert_array_equal(sdj.drop_path_rates(1, 0.5), [0.0])  # linspace(0, r, 1)
    deit_s = sdj.ViT(num_classes=1000, size="s", drop_path_rate=0.1)
    np.testing.assert_allclose(1.0 - deit_s.survival_probs(), np.linspace(0.0, 0.1, 12))
    for model in (sdj.ViT(num_classes=3), sdj.ConvNeXt(num_classes=3)):
        assert np.all(model.survival_probs() == 1.0), model.survival_probs()


def test_attend_is_each_head_s_softmax_of_scaled_query_key_products_times_values():
    """:func:`vit.attend` against attention written out (timm's qkv layout ``[batch,
    tokens, 3, heads, head_dim]``): 2 heads of 4 channels, 5 tokens."""
    qkv = jax.random.normal(jax.random.key(0), (2, 5, 3 * 8))
    q, k, v = (a[:, :, 0].transpose(0, 2, 1, 3) for a in  # each [batch, heads, tokens, 4]
               np.split(np.asarray(qkv, np.float64).reshape(2, 5, 3, 2, 4), 3, axis=2))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(4.0)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = (weights @ v).transpose(0, 2, 1, 3).reshape(2, 5, 8)
    np.testing.assert_allclose(sdj.vit.attend(qkv, 2), expected, rtol=1e-5, atol=1e-5)


def test_vit_block_i_branch_j_draws_from_fold_in_of_key_i_then_j():
    """The documented key derivation, which the NNX ViT shares (so the twin comparison
    cannot see it change): block i's branch j (0: attention, 1: MLP) draws its subset from
    ``fold_in(fold_in(key, i), j)``."""
    kw = dict(mode="sample", implementation="skip", batch_size=8, groups=1)
    key = jax.random.key(7)
    for i in (0, 3):
        gates = sdj.vit.block_gates(key, i, 0.5, **kw)
        for j, gate in enumerate(gates):
            block_key = jax.random.fold_in(jax.random.fold_in(key, i), j)
            np.testing.assert_array_equal(gate, ops.draw_gate(block_key, 0.5, **kw))
    assert sdj.vit.block_gates(None, 0, 0.5, **kw) == (None, None)


# The ConvNeXt's layer scale starts at 1e-6, which hides its drops from the logits.
_VISIBLE_BRANCHES = {"ViT": {}, "ConvNeXt": {"layer_scale_init": 1.0}}


@pytest.mark.parametrize("name", ["ViT", "ConvNeXt"])
def test_evaluation_ignores_a_key_passed_to_the_model(name):
    """``train=False`` runs every block (unscaled, 'train' scaling) whatever ``key`` is given:
    a key is the drop-path stream of training, not a sub-network to evaluate."""
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
    model = _small_model(name, **_VISIBLE_BRANCHES[name])
    params = model.init(jax.random.key(1), x, train=False)["params"]
    params = {**params, "head": {**params["head"],
                                 "kernel": _random_head(params["head"]["kernel"])}}
    run = jax.jit(lambda p, k, train: model.apply({"params": p}, x, train=train, key=k),
                  static_argnames="train")
    key = jax.random.key(3)
    evaluated = run(params, None, False)
    np.testing.assert_allclose(run(params, key, False), evaluated, rtol=1e-5, atol=1e-5)
    assert not np.allclose(run(params, key, True), evaluated, atol=1e-4)  # the key drops


@pytest.mark.parametrize("name", ["ViT", "ConvNeXt"])
def test_the_stochastic_depth_stream_gives_the_model_one_key_per_forward_pass(name):
    """With ``rngs={'stochastic_depth': k}`` the model draws one key (its
    ``make_rng('stochastic_depth')``) and derives every block's gates from it, as with
    ``key=``; at a largest rate of 0.3, as at any other, not a key per block from Flax."""
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
    model = _small_model(name, **_VISIBLE_BRANCHES[name]).clone(drop_path_rate=0.3)
    params = model.init(jax.random.key(1), x, train=False)["params"]
    variables = {"params": {**params, "head": {**params["head"], "kernel": _random_head(
        params["head"]["kernel"])}}}
    rngs = {"stochastic_depth": jax.random.key(3)}
    key = model.bind(variables, rngs=rngs).make_rng("stochastic_depth")
    streamed = model.apply(variables, x, train=True, rngs=rngs)
    np.testing.assert_array_equal(streamed, model.apply(variables, x, train=True, key=key))
    assert not np.allclose(streamed, model.apply(variables, x, train=False), atol=1e-4)
