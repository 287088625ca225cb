"""The framework-free op: gates, scaling, real skipping, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stochastic_depth_jax as sdj
from stochastic_depth_jax import ops

X = jnp.arange(12.0).reshape(3, 4) / 10.0
W = jnp.linspace(-1.0, 1.0, 16).reshape(4, 4)


def branch(x, w=W):
    return jnp.tanh(x @ w)


def test_gate_frequencies_match_probs_per_block():
    probs = sdj.linear_decay(12, 0.5)
    n = 8000
    keys = jax.random.split(jax.random.key(0), n)
    gates = jax.vmap(lambda k: sdj.draw_gates(k, probs))(keys)
    freq = np.asarray(gates).mean(0)
    # Each frequency is a mean of n Bernoulli(p_l): 5 standard deviations is a bound a
    # correct sampler fails with probability < 1e-5 per block.
    bound = 5 * np.sqrt(probs * (1 - probs) / n) + 1e-9
    assert np.all(np.abs(freq - probs) <= bound), (freq, probs)


def test_gates_of_different_blocks_are_independent():
    # Per-block frequencies alone pass a sampler that reuses one uniform for every block
    # (block j kept whenever block i with p_i <= p_j is): the joint frequencies must be p_i p_j.
    probs = sdj.uniform(6, 0.5)
    n = 4000
    keys = jax.random.split(jax.random.key(2), n)
    gates = np.asarray(jax.vmap(lambda k: sdj.draw_gates(k, probs))(keys), np.float64)
    joint = gates.T @ gates / n
    off = ~np.eye(len(probs), dtype=bool)
    both = np.outer(probs, probs)[off]
    bound = 5 * np.sqrt(both * (1 - both) / n)
    assert np.all(np.abs(joint[off] - both) <= bound), joint


def test_sample_mode_gates_per_example():
    # Each block's row follows its own p (a draw with one p for every row passed a uniform
    # schedule).
    probs = np.array([0.9, 0.6, 0.3])
    g = sdj.draw_gates(jax.random.key(1), probs, mode="sample", batch_size=4000)
    assert g.shape == (3, 4000)
    bound = 5 * np.sqrt(probs * (1 - probs) / 4000)
    assert np.all(np.abs(np.asarray(g).mean(1) - probs) < bound), np.asarray(g).mean(1)
    with pytest.raises(ValueError, match="batch_size"):
        sdj.draw_gates(jax.random.key(1), np.full(3, 0.5), mode="sample")


@pytest.mark.parametrize("scaling, eval_factor", [("test", 0.7), ("train", 1.0)])
def test_deterministic_scaling(scaling, eval_factor):
    y = sdj.stochastic_depth(branch, X, survival_prob=0.7, deterministic=True, scaling=scaling)
    np.testing.assert_allclose(y, eval_factor * branch(X), rtol=1e-6)


@pytest.mark.parametrize("scaling, train_factor", [("test", 1.0), ("train", 1 / 0.7)])
def test_training_output_is_gate_times_branch(scaling, train_factor):
    seen = set()
    for i in range(12):
        key = jax.random.key(i)
        gate = bool(jax.random.bernoulli(key, 0.7))
        seen.add(gate)
        y = sdj.stochastic_depth(branch, X, survival_prob=0.7, key=key, scaling=scaling)
        np.testing.assert_allclose(y, gate * train_factor * branch(X), rtol=1e-6)
    assert seen == {True, False}


def test_bfloat16_outputs_are_scaled_by_p_not_by_p_rounded_to_bfloat16():
    # The factor was cast to the output's dtype first: bf16(0.9907) = 0.9922, so every
    # evaluated bf16 branch of a linear-decay ResNet-110 was scaled by up to 0.2% more or
    # less than p_l, the same way for every element (a bias, not rounding noise).
    dtype = jnp.bfloat16
    x = jax.random.uniform(jax.random.key(0), (256, 256), minval=1.0, maxval=2.0).astype(dtype)
    exact = x.astype(jnp.float32)
    for p, scaling in ((1.0 - 1.0 / 108.0, "test"), (0.9, "train"), (1.0 - 3.0 / 108.0, "test")):
        y = ops.gated_branch(lambda h: h, x, jnp.bool_(True), p, scaling=scaling)  # kept
        y_eval = sdj.stochastic_depth(lambda h: h, x, survival_prob=p, deterministic=True,
                                      scaling=scaling)
        for out, factor in ((y, 1.0 / p if scaling == "train" else 1.0),
                            (y_eval, p if scaling == "test" else 1.0)):
            assert out.dtype == dtype
            ratio = float(jnp.mean(out.astype(jnp.float32)) / jnp.mean(exact))
            assert abs(ratio / factor - 1.0) < 4e-4, (p, scaling, ratio, factor)


def test_expectation_matches_eval_for_both_scalings():
    keys = jax.random.split(jax.random.key(3), 4000)
    for scaling in ("test", "train"):
        ys = jax.vmap(lambda k: sdj.stochastic_depth(branch, X, survival_prob=0.6, key=k,
                                                     scaling=scaling))(keys)
        ev = sdj.stochastic_depth(branch, X, survival_prob=0.6, deterministic=True,
                                  scaling=scaling)
        # E[b f] = p f (paper, 'test') and E[b f / p] = f ('train'): both equal eval.
        np.testing.assert_allclose(ys.mean(0), ev, atol=0.05)


def test_survival_one_never_draws_a_key():
    y = sdj.stochastic_depth(branch, X, survival_prob=1.0, key=None)
    np.testing.assert_allclose(y, branch(X))


def test_missing_key_is_a_clear_error():
    with pytest.raises(ValueError, match="key"):
        sdj.stochastic_depth(branch, X, survival_prob=0.5)


def test_only_an_exact_one_skips_the_draw():
    # p = 0.995 drops one mini-batch in 200: it needs a key and sometimes closes the gate.
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        sdj.stochastic_depth(branch, X, survival_prob=0.995)
    keys = jax.random.split(jax.random.key(0), 8000)
    ys = jax.vmap(lambda k: sdj.stochastic_depth(lambda h: h, jnp.ones(()), survival_prob=0.995,
                                                 key=k))(keys)
    closed = int(np.sum(np.asarray(ys) == 0))
    assert 40 - 5 * np.sqrt(40) <= closed <= 40 + 5 * np.sqrt(40), closed


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="layer"), "mode"),
    (dict(scaling="never"), "scaling"),
    (dict(implementation="fast"), "implementation"),
    (dict(survival_prob=0.0), "survival_prob"),
    (dict(survival_prob=1.5), "survival_prob"),
])
def test_bad_options(kwargs, match):
    args = dict(survival_prob=0.5, key=jax.random.key(0))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sdj.stochastic_depth(branch, X, **args)


def test_skip_and_mask_agree_in_value_and_gradient():
    for i in range(6):
        key = jax.random.key(i)

        def loss(w, impl):
            y = sdj.stochastic_depth(lambda x: branch(x, w), X, survival_prob=0.5, key=key,
                                     implementation=impl)
            return jnp.sum((X + y) ** 2)

        np.testing.assert_allclose(loss(W, "skip"), loss(W, "mask"), rtol=1e-6)
        np.testing.assert_allclose(jax.grad(loss)(W, "skip"), jax.grad(loss)(W, "mask"),
                                   rtol=1e-6, atol=1e-7)


def _find_key(p, want):
    for i in range(100):
        k = jax.random.key(i)
        if bool(jax.random.bernoulli(k, p)) == want:
            return k
    raise AssertionError


def test_dropped_branch_runs_neither_forward_nor_backward():
    calls = {"fwd": 0, "bwd": 0}

    @jax.custom_vjp
    def probe(x):
        return x

    def probe_fwd(x):
        jax.debug.callback(lambda: calls.__setitem__("fwd", calls["fwd"] + 1))
        return x, None

    def probe_bwd(_, g):
        jax.debug.callback(lambda: calls.__setitem__("bwd", calls["bwd"] + 1))
        return (g,)

    probe.defvjp(probe_fwd, probe_bwd)

    def loss(w, key):
        y = sdj.stochastic_depth(lambda x: probe(branch(x, w)), X, survival_prob=0.5, key=key)
        return jnp.sum(X + y)

    grad = jax.jit(jax.grad(loss))
    g = grad(W, _find_key(0.5, False))
    jax.block_until_ready(g)
    jax.effects_barrier()
    assert calls == {"fwd": 0, "bwd": 0}
    np.testing.assert_array_equal(g, 0.0)
    jax.block_until_ready(grad(W, _find_key(0.5, True)))
    jax.effects_barrier()
    assert calls == {"fwd": 1, "bwd": 1}


def test_mask_implementation_runs_branch_even_when_dropped():
    calls = []

    def counting(x):
        jax.debug.callback(lambda: calls.append(1))
        return branch(x)

    y = jax.jit(lambda k: sdj.stochastic_depth(counting, X, survival_prob=0.5, key=k,
                                               implementation="mask"))(_find_key(0.5, False))
    jax.block_until_ready(y)
    jax.effects_barrier()
    np.testing.assert_array_equal(y, 0.0)
    assert len(calls) == 1


@pytest.mark.parametrize("scaling", ["test", "train"])
def test_a_bool_per_example_gate_is_applied_as_a_mask_under_skip(scaling):
    # A Bernoulli [batch] gate has no static size to skip with: gated_branch masks it, as
    # documented, whatever the implementation (a cond on it would fail).
    gate = jnp.array([True, False, True])
    y = ops.gated_branch(branch, X, gate, 0.5, mode="sample", scaling=scaling,
                         implementation="skip")
    factor = 2.0 if scaling == "train" else 1.0
    np.testing.assert_allclose(y, factor * np.asarray(gate)[:, None] * branch(X), rtol=1e-6)


def test_sample_mode_mask_implementation_masks_examples():
    key = jax.random.key(5)
    y = sdj.stochastic_depth(branch, X, survival_prob=0.5, key=key, mode="sample",
                             implementation="mask")
    gate = jax.random.bernoulli(key, 0.5, (X.shape[0],))
    np.testing.assert_allclose(y, np.asarray(gate)[:, None] * branch(X), rtol=1e-6)


def test_validate_options_lists_valid_values():
    with pytest.raises(ValueError, match=r"\['batch', 'sample'\]"):
        ops.validate_options("row", "test")


@pytest.mark.parametrize("implementation, mode", [("skip", "batch"), ("mask", "batch"),
                                                  ("mask", "sample")])
@pytest.mark.parametrize("scaling", ["test", "train"])
def test_a_traced_rate_out_of_range_gives_nan_at_the_first_training_step(
        implementation, mode, scaling):
    # A concrete rate out of (0, 1] is refused; a traced one cannot be (a drop-rate schedule,
    # 0 at the first block, scanned in as survival probabilities): it made the block never
    # run (p <= 0) or always run (p > 1), silently. Now training gives NaN at once.
    def train(p, key):
        return sdj.stochastic_depth(branch, X, survival_prob=p, key=key, mode=mode,
                                    scaling=scaling, implementation=implementation)

    def train_w(w, p, key):
        return sdj.stochastic_depth(lambda h: branch(h, w), X, survival_prob=p, key=key,
                                    mode=mode, scaling=scaling, implementation=implementation)

    step = jax.jit(train)
    def split(p, key):  # the op in two: draw_gate, then gated_branch
        batch = X.shape[0] if mode == "sample" else None
        gate = sdj.draw_gate(key, p, mode=mode, implementation=implementation,
                             batch_size=batch)
        return sdj.gated_branch(branch, X, gate, p, mode=mode, scaling=scaling,
                                implementation=implementation)

    for p in (0.0, -0.5, 1.5, float("nan")):
        for seed in range(3):
            assert np.isnan(step(p, jax.random.key(seed))).all(), (p, seed)
            assert np.isnan(jax.jit(split)(p, jax.random.key(seed))).all(), (p, seed)
    for p in (0.3, 1.0):  # in range: the concrete rate's output and gradient
        key = jax.random.key(4)
        np.testing.assert_allclose(step(p, key), train(p, key), rtol=1e-5, atol=1e-7)
        grad = jax.jit(jax.grad(lambda w, p: train_w(w, p, key).sum()))
        np.testing.assert_allclose(grad(W, p), jax.grad(
            lambda w: train_w(w, p, key).sum())(W), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("implementation", ["skip", "mask"])
def test_wrappers_give_nan_for_a_traced_rate_out_of_range(implementation):
    import flax.linen as nn
    from flax import nnx
    from stochastic_depth_jax import nnx_layers

    class Dense(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(x)

    sd = sdj.StochasticDepth(Dense(parent=None), implementation=implementation)
    variables = sd.init(jax.random.key(0), X, deterministic=True)
    linen = jax.jit(lambda p: sd.apply(variables, X, deterministic=False, survival_prob=p,
                                       rngs={"stochastic_depth": jax.random.key(1)}))
    nsd = nnx_layers.StochasticDepth(nnx.Linear(4, 4, rngs=nnx.Rngs(0)),
                                     implementation=implementation,
                                     rngs=nnx.Rngs(stochastic_depth=1))
    nnx_step = nnx.jit(lambda m, p: m(X, survival_prob=p))
    for p in (0.0, 2.0):
        assert np.isnan(linen(p)).all() and np.isnan(nnx_step(nsd, p)).all()
    assert np.isfinite(linen(0.5)).all() and np.isfinite(nnx_step(nsd, 0.5)).all()


NOT_REAL_NUMBERS = {"jnp-true": jnp.array(True), "np-true": np.array(True),
                    "jnp-false": jnp.array(False), "np-text": np.array("0.9"),
                    "np-complex": np.complex64(0.9), "complex": 0.9 + 0j,
                    "key": jax.random.key(0)}


@pytest.mark.parametrize("name", NOT_REAL_NUMBERS)
def test_a_survival_prob_that_is_a_bool_array_or_not_a_real_number_is_refused(name):
    # Python bools were refused, but jnp.array(True) passed as 1.0: the block kept always.
    p = NOT_REAL_NUMBERS[name]
    with pytest.raises(ValueError, match=r"^survival_prob must be a float in \(0, 1\], got "
                                         r"(.|\n)*; pass one block's probability"):
        sdj.stochastic_depth(branch, X, survival_prob=p, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"^survival_prob must be a float in \(0, 1\]"):
        ops.draw_gate(jax.random.key(0), p)
    with pytest.raises(ValueError, match=r"^DropPath rate must be a float in \[0, 1\)"):
        ops.check_drop_rate(p)


def test_a_traced_bool_survival_prob_or_schedule_is_refused():
    # Its dtype is known while tracing: a traced True kept the block always, silently.
    with pytest.raises(ValueError, match=r"^survival_prob must be a float in \(0, 1\]"):
        jax.jit(lambda p: sdj.stochastic_depth(branch, X, survival_prob=p,
                                               key=jax.random.key(0)))(jnp.array(True))
    with pytest.raises(ValueError, match=r"^survival probabilities must be numbers in "
                                         r"\(0, 1\], got bools"):
        jax.jit(lambda p: sdj.draw_gates(jax.random.key(0), p))(jnp.ones(3, bool))
    with pytest.raises(ValueError, match=r"^survival probabilities must be numbers in "
                                         r"\(0, 1\], got complex numbers"):
        sdj.draw_gates(jax.random.key(0), np.full(3, 0.5 + 0j))


@pytest.mark.parametrize("p", [np.array(1), jnp.array(1), jnp.bfloat16(0.5), np.float32(0.5),
                               np.float16(0.5), 1], ids=repr)
def test_integer_and_low_precision_survival_probs_still_work(p):
    y = sdj.stochastic_depth(branch, X, survival_prob=p, deterministic=True)
    np.testing.assert_allclose(y, float(p) * branch(X), rtol=1e-6)
    assert ops.check_drop_rate(1 - p) == pytest.approx(1 - float(p))


@pytest.mark.parametrize("dtype, p", [(jnp.bfloat16, 255 / 256), (jnp.bfloat16, 253 / 256),
                                      (jnp.float16, 1 - 2.0 ** -11)])
@pytest.mark.parametrize("mode, implementation", [("batch", "skip"), ("sample", "mask")])
def test_a_low_precision_survival_prob_is_drawn_with_its_own_probability(dtype, p, mode,
                                                                          implementation):
    # The draw compared p with uniforms of p's dtype, multiples of 2^-7 in bfloat16: p =
    # 255/256 (exact in bfloat16) never closed a gate, 253/256 was kept as 254/256.
    p_low = dtype(p)
    assert float(p_low) == p
    batch = 1 if mode == "batch" else 8
    keys = jax.random.split(jax.random.key(7), 100000 // batch)
    gates = jax.vmap(lambda k: ops.draw_gate(k, p_low, mode=mode, batch_size=batch,
                                             implementation=implementation))(keys)
    draws = np.asarray(gates).size
    closed = draws - int(np.asarray(gates).sum())
    expected = draws * (1 - p)
    assert draws == 100000
    assert abs(closed - expected) <= 5 * np.sqrt(expected), (closed, expected)


def test_raw_keys_of_both_lengths_are_keys():
    # jax.random.PRNGKey gives uint32 [2] (threefry) or [4] (jax_default_prng_impl='rbg').
    for raw in (jax.random.key_data(jax.random.key(0)),
                jax.random.key_data(jax.random.key(0, impl="rbg"))):
        ops.check_key(raw)
    for bad in (jnp.zeros(3, jnp.uint32), jnp.zeros(2, jnp.int32), 0):
        with pytest.raises(TypeError, match="key must be a PRNG key"):
            ops.check_key(bad)


def test_gates_do_not_depend_on_how_the_draw_is_sharded():
    # Gates come from the key alone: drawn into 8 devices' shards they are the ones drawn on
    # one device (runs on 1 and 8 devices train on the same gates).
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((8,), ("data",))
    key = jax.random.key(5)
    draws = {
        "sample gates": (lambda k: sdj.draw_gates(k, sdj.linear_decay(6, 0.5), mode="sample",
                                                  batch_size=64), P(None, "data")),
        "mask gate": (lambda k: ops.draw_gate(k, 0.6, mode="sample", implementation="mask",
                                              batch_size=64), P("data")),
        "subsets": (lambda k: ops.draw_subset(k, 64, 0.7, groups=8), P("data", None)),
    }
    for name, (draw, spec) in draws.items():
        sharded = jax.jit(draw, out_shardings=NamedSharding(mesh, spec))(key)
        assert len(sharded.sharding.device_set) == 8
        np.testing.assert_array_equal(sharded, draw(key), err_msg=name)
