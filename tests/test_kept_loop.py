"""implementation='loop': each scanned stage's kept blocks in one loop of dynamic length.

The loop (:func:`kept_loop`) carries its own VJP, so every test compares values and
gradients with what JAX derives for the same blocks run by other means.
"""
import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stochastic_depth_jax as sdj
from compiled import with_conditionals
from stochastic_depth_jax.kept_loop import kept_loop

X = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
# depth 26: three scanned blocks after each stage's first one (scan=True).
GATES = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1], bool)


def _toy(n=5, d=3):
    k = jax.random.split(jax.random.key(3), 3)
    params = {"w": 0.4 * jax.random.normal(k[0], (n, d, d)), "b": jax.random.normal(k[1], (n, d))}
    stats = {"mean": jnp.arange(n, dtype=jnp.float32)}
    return params, stats, jax.random.normal(k[2], (2, d)), jnp.linspace(1.0, 0.5, n)


def _toy_block(p, s, x, prob):
    y = jnp.tanh(x @ p["w"] + p["b"]) * prob
    return x + y, {"mean": 0.9 * s["mean"] + 0.1 * jnp.mean(y)}


def _toy_reference(params, stats, x, probs, gates):
    """The kept blocks one after the other in Python (what lax.cond skipping computes)."""
    for j in np.flatnonzero(gates):
        p = jax.tree_util.tree_map(lambda a: a[j], params)
        x, s = _toy_block(p, {"mean": stats["mean"][j]}, x, probs[j])
        stats = {"mean": stats["mean"].at[j].set(s["mean"])}
    return x, stats


@pytest.mark.parametrize("gates", [[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1],
                                   [0, 0, 0, 0, 1]])
def test_kept_loop_equals_the_kept_blocks_run_one_by_one(gates):
    params, stats, x, probs = _toy()
    gates = np.array(gates, bool)

    def loss(fn, params, x, gates):
        y, new = fn(params, x, gates)
        return jnp.sum(jnp.sin(y)), new

    looped = jax.jit(jax.value_and_grad(
        lambda p, x, g: loss(lambda p, x, g: kept_loop(_toy_block, p, stats, x, probs, g),
                             p, x, g), argnums=(0, 1), has_aux=True))
    (l1, s1), g1 = looped(params, x, jnp.asarray(gates))
    (l2, s2), g2 = jax.value_and_grad(
        lambda p, x: loss(lambda p, x, g: _toy_reference(p, stats, x, probs, g), p, x, gates),
        argnums=(0, 1), has_aux=True)(params, x)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(close, (s1, g1), (s2, g2))
    dropped = ~gates
    assert np.all(np.asarray(g1[0]["w"])[dropped] == 0)  # a dropped block learns nothing
    np.testing.assert_array_equal(np.asarray(s1["mean"])[dropped],
                                  np.asarray(stats["mean"])[dropped])


def test_kept_loop_under_explicit_mesh_axes_equals_the_kept_blocks_run_one_by_one():
    # Under explicit axes a residual's type carries its sharding (the batch's here): the
    # loop's buffers of stored residuals must start with it, or the loop refuses its carry.
    params, stats, _, probs = _toy()
    gates = np.array([1, 0, 1, 1, 0], bool)
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Explicit,))
    x = jax.random.normal(jax.random.key(4), (jax.device_count(), 3))

    def loss(run, params, x):
        return jnp.sum(jnp.sin(run(params, stats, x, probs, gates)[0]))

    looped = lambda *a: kept_loop(_toy_block, *a[:4], jnp.asarray(a[4]))
    with jax.set_mesh(mesh):
        sharded = jax.device_put(x, jax.NamedSharding(mesh, jax.P("data")))
        got = jax.jit(jax.grad(functools.partial(loss, looped), argnums=(0, 1)))(params, sharded)
        got = jax.device_get(got)
    want = jax.grad(functools.partial(loss, _toy_reference), argnums=(0, 1))(params, x)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           got, want)


def test_kept_loop_over_no_block_is_the_identity():
    """A stack of no block (n = 0: every block of it pruned away) failed in JAX's slicing
    ("slice_sizes must be less than or equal to operand shape"); it returns its input and
    its (empty) statistics, as lax.scan over no block does, also under grad and jit."""
    params, stats, x, probs = _toy(n=0)
    gates = jnp.zeros((0,), bool)
    y, new = jax.jit(lambda p, x: kept_loop(_toy_block, p, stats, x, probs, gates))(params, x)
    np.testing.assert_array_equal(y, x)
    assert jax.tree_util.tree_map(jnp.shape, new) == {"mean": (0,)}
    dp, dx = jax.grad(lambda p, x: jnp.sum(kept_loop(_toy_block, p, stats, x, probs,
                                                     gates)[0] ** 2), argnums=(0, 1))(params, x)
    np.testing.assert_allclose(dx, 2 * x)
    assert jax.tree_util.tree_map(jnp.shape, dp) == {"w": (0, 3, 3), "b": (0, 3)}


def test_kept_loop_takes_survival_probabilities_as_a_list():
    """A list of floats was refused as n leaves of shape ()."""
    params, stats, x, probs = _toy()
    gates = jnp.asarray([1, 0, 1, 1, 0], bool)
    want = kept_loop(_toy_block, params, stats, x, probs, gates)
    got = kept_loop(_toy_block, params, stats, x, [float(p) for p in probs], gates)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


def test_kept_loop_refuses_what_it_cannot_loop_over():
    params, stats, x, probs = _toy()
    with pytest.raises(ValueError, match="one bool gate per block"):
        kept_loop(_toy_block, params, stats, x, probs, jnp.ones(5))
    with pytest.raises(ValueError, match="stacked on axis 0 with 4 slots"):
        kept_loop(_toy_block, params, stats, x, probs, jnp.ones(4, bool))
    with pytest.raises(ValueError, match="must return its input's shape"):
        kept_loop(lambda p, s, v, q: (v[:, :2], s), params, stats, x, probs, jnp.ones(5, bool))
    # A pytree input failed with an AttributeError deep in the loop.
    with pytest.raises(ValueError, match="^kept_loop: x must be one array .*got dict"):
        kept_loop(_toy_block, params, stats, {"x": x}, probs, jnp.ones(5, bool))
    # A Python number is one array (it ran before the pytree check refused it).
    y, _ = kept_loop(lambda p, s, v, q: (v * q, s), params, stats, 2.0, probs, jnp.ones(5, bool))
    np.testing.assert_allclose(y, 2.0 * np.prod(np.asarray(probs)), rtol=1e-6)


def _model(**kw):
    kw = {"depth": 26, "width": 4, "num_classes": 3, "scan": True, **kw}
    return sdj.CifarResNet(**kw)


def _train(model, variables, gates, stochastic=None, train=True):
    """Loss, statistics and gradients. The gates are an argument of the compiled program, so
    that skipping runs its conditionals (made from constants inside it, XLA folds those of
    the stages' first blocks into straight-line code): one forward and one backward per
    stage's first block and per scanned stage."""
    def run(params, gates):
        y, upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, X,
                             train=train, stochastic=stochastic, gates=gates,
                             mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), upd
    args = (variables["params"], jnp.asarray(gates))
    branches = 12 if model.implementation == "skip" else 0
    return with_conditionals(jax.jit(jax.value_and_grad(run, has_aux=True)), *args,
                             at_least=branches)(*args)


def _assert_close(a, b):
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5),
                           a, b)


@pytest.mark.parametrize("kw", [{"remat": "convs"}, {"remat": "none"}, {"remat": "full"},
                                {"block": "preact"}, {"shortcut": "B"}])
def test_loop_trains_like_skipping(kw):
    """Loss, every gradient and the running statistics (dropped blocks' unchanged)."""
    skip, loop = _model(**kw), _model(implementation="loop", **kw)
    v = skip.init({"params": jax.random.key(1)}, X, train=False)
    (l1, u1), g1 = _train(loop, v, GATES)
    (l2, u2), g2 = _train(skip, v, GATES)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    _assert_close((g1, u1), (g2, u2))


def test_loop_in_bfloat16_is_as_close_to_float32_as_skipping():
    """bf16 programs round differently, so loop and skip differ by bf16's rounding: each is
    compared with the float32 network instead."""
    v = _model().init({"params": jax.random.key(1)}, X, train=False)

    def logits(**kw):
        y, _ = jax.jit(lambda v: _model(**kw).apply(v, X, train=True, gates=jnp.asarray(GATES),
                                                    mutable=["batch_stats"]))(v)
        return np.asarray(y, np.float32)

    exact = logits()
    skip_err = np.abs(logits(dtype=jnp.bfloat16) - exact).max()
    loop_err = np.abs(logits(dtype=jnp.bfloat16, implementation="loop") - exact).max()
    assert 0 < skip_err < 0.1 and loop_err <= 2 * skip_err + 0.01, (loop_err, skip_err)
    (_, _), grads = _train(_model(dtype=jnp.bfloat16, implementation="loop"), v, GATES)
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))


def test_loop_has_one_program_and_no_conditional_for_every_gate_draw():
    model = _model(implementation="loop")
    v = model.init({"params": jax.random.key(1)}, X, train=False)

    def run(params, gates):
        y, _ = model.apply({"params": params, "batch_stats": v["batch_stats"]}, X, train=True,
                           gates=gates, mutable=["batch_stats"])
        return jnp.sum(y)

    grad = jax.jit(jax.grad(run))
    rng = np.random.default_rng(0)
    for _ in range(3):
        grad(v["params"], jnp.asarray(rng.random(12) < 0.5))
    assert grad._cache_size() == 1
    hlo = grad.lower(v["params"], jnp.asarray(GATES)).as_text()
    assert "stablehlo.while" in hlo and "stablehlo.case" not in hlo


def test_loop_evaluates_like_skipping():
    """Evaluation (every block, scaled) and one Monte-Carlo member (train=False,
    stochastic=True: running statistics, the loop over the kept blocks)."""
    skip, loop = _model(), _model(implementation="loop")
    v = skip.init({"params": jax.random.key(1)}, X, train=False)
    np.testing.assert_allclose(loop.apply(v, X, train=False), skip.apply(v, X, train=False),
                               rtol=1e-5, atol=1e-6)
    (l1, _), g1 = _train(loop, v, GATES, stochastic=True, train=False)
    (l2, _), g2 = _train(skip, v, GATES, stochastic=True, train=False)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    _assert_close(g1, g2)


def test_loop_in_other_residual_stages():
    """The ImageNet ResNet, and a pruned CIFAR model (a shorter stacked scan)."""
    resnet = dict(stage_sizes=(1, 4, 1, 1), width=4, num_classes=5, scan=True)
    gates = np.array([1, 1, 0, 1, 1, 0, 1], bool)
    skip, loop = sdj.ResNet(**resnet), sdj.ResNet(implementation="loop", **resnet)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    v = skip.init({"params": jax.random.key(1)}, x, train=False)
    outs = [m.apply(v, x, train=True, gates=jnp.asarray(gates), mutable=["batch_stats"])
            for m in (loop, skip)]
    _assert_close(*outs)
    keep = tuple(np.arange(12) % 4 != 2)
    skip, loop = _model(keep=keep), _model(keep=keep, implementation="loop")
    v = skip.init({"params": jax.random.key(1)}, X, train=False)
    (l1, u1), g1 = _train(loop, v, GATES)
    (l2, u2), g2 = _train(skip, v, GATES)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    _assert_close((g1, u1), (g2, u2))


@pytest.mark.parametrize("kw, message", [
    ({"mode": "sample"}, "implementation='loop' needs mode='batch'"),
    ({"dropout_rate": 0.3}, "implementation='loop' runs blocks that draw no randomness"),
    ({"implementation": "fastest"}, "Unknown implementation 'fastest'; valid: .*'loop'"),
    # No scanned stage: every block would compute (masked) under the name 'loop'.
    ({"depth": 20, "scan": None}, r"stage sizes \(3, 3, 3\) with scan=None scan none .*; "
     r"pass scan=True, or use 'skip'\.$"),
    # scan=False: no word about scan=None's threshold, which does not apply.
    ({"depth": 56, "scan": False}, r"with scan=False scan none, so every block would compute, "
     r"masked; pass scan=True"),
])
def test_loop_refuses_what_it_cannot_run(kw, message):
    kw.setdefault("implementation", "loop")
    with pytest.raises(ValueError, match=message):
        _model(**kw)


def test_loop_and_compact_buckets_are_refused_together():
    model = _model(implementation="loop")
    v = model.init({"params": jax.random.key(1)}, X, train=False)
    with pytest.raises(ValueError, match="buckets .* and implementation='loop'"):
        model.apply(v, X, train=True, gates=jnp.asarray(GATES), buckets=(3, 3, 3),
                    mutable=["batch_stats"])


_STATS_DIFFERENTIATED = "^kept_loop: the statistics it returns are differentiated"


def test_kept_loop_differentiates_the_survival_probabilities():
    """A block scaled by its probability (1 / p for scaling='train') has a gradient with
    respect to it; the loop's VJP returned zeros for ``probs``, silently, where JAX derives
    it for the blocks run one by one. A loss of the statistics alone (the output unused)
    has zero gradients."""
    params, stats, x, probs = _toy()
    for gates in ([1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]):
        gates = np.array(gates, bool)

        def loss(run, params, x, probs):
            return jnp.sum(jnp.sin(run(params, stats, x, probs, gates)[0]))

        looped = lambda *a: kept_loop(_toy_block, *a[:4], jnp.asarray(a[4]))
        got = jax.jit(jax.grad(functools.partial(loss, looped), argnums=(0, 1, 2)))(
            params, x, probs)
        want = jax.grad(functools.partial(loss, _toy_reference), argnums=(0, 1, 2))(
            params, x, probs)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
        assert np.all(np.asarray(got[2])[~gates] == 0)  # a dropped block's p: no effect
    stats_loss = lambda p, q: jnp.sum(kept_loop(_toy_block, p, stats, x, q, gates)[1]["mean"])
    with pytest.warns(UserWarning, match=_STATS_DIFFERENTIATED):
        grads = jax.grad(stats_loss, argnums=(0, 1))(params, probs)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(grads))


def test_kept_loop_gradients_of_probabilities_and_statistics_under_explicit_mesh_axes():
    """The cotangent of an unused output (a loss of the statistics alone) is made as zeros
    typed as the output (sharded as the batch), and the probabilities' gradient matches."""
    params, stats, _, probs = _toy()
    gates = np.array([1, 0, 1, 1, 0], bool)
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Explicit,))
    x = jax.random.normal(jax.random.key(4), (jax.device_count(), 3))
    looped = lambda p, x, q: kept_loop(_toy_block, p, stats, x, q, jnp.asarray(gates))
    out = lambda p, x, q: jnp.sum(jnp.sin(looped(p, x, q)[0]))
    stat = lambda p, x, q: jnp.sum(looped(p, x, q)[1]["mean"])
    with jax.set_mesh(mesh):
        sharded = jax.device_put(x, jax.NamedSharding(mesh, jax.P("data")))
        got = jax.device_get(jax.jit(jax.grad(out, argnums=2))(params, sharded, probs))
        with pytest.warns(UserWarning, match=_STATS_DIFFERENTIATED):
            zeros = jax.jit(jax.grad(stat, argnums=(0, 1, 2)))(params, sharded, probs)
        zeros = jax.device_get(zeros)
    want = jax.grad(lambda q: jnp.sum(jnp.sin(_toy_reference(params, stats, x, q, gates)[0])))(
        probs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert all(np.all(g == 0) for g in jax.tree_util.tree_leaves(zeros))


def test_kept_loop_differentiates_params_with_integer_leaves():
    """An integer leaf among the parameters (each block's index, say) has no gradient: the
    loop's VJP added its float0 cotangent into the slot buffers and failed with a dtype
    error; now the float leaves' gradients match the blocks run one by one, jit or not."""
    params, stats, x, probs = _toy()
    params = {**params, "index": jnp.arange(5)}
    gates = np.array([1, 0, 1, 1, 0], bool)

    def block(p, s, v, prob):
        return _toy_block({"w": p["w"], "b": p["b"] + 0.1 * p["index"]}, s, v, prob)

    def reference(p, v):
        for j in np.flatnonzero(gates):
            v, _ = block(jax.tree_util.tree_map(lambda a: a[j], p), {"mean": 0.0}, v, probs[j])
        return jnp.sum(jnp.sin(v))

    looped = lambda p, v: jnp.sum(jnp.sin(
        kept_loop(block, p, stats, v, probs, jnp.asarray(gates))[0]))
    want = jax.grad(reference, argnums=(0, 1), allow_int=True)(params, x)
    for run in (jax.grad(looped, argnums=(0, 1), allow_int=True),
                jax.jit(jax.grad(looped, argnums=(0, 1), allow_int=True))):
        got = run(params, x)
        assert got[0]["index"].dtype == jax.dtypes.float0
        for a, b in [(got[0]["w"], want[0]["w"]), (got[0]["b"], want[0]["b"]), (got[1], want[1])]:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _close(got, want):
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           got, want)


def test_kept_loop_in_forward_mode_equals_the_kept_blocks_run_one_by_one():
    """jax.jvp and jax.jacfwd failed with JAX's "can't apply forward-mode autodiff (jvp) to
    a custom_vjp function"; forward mode now differentiates the plain loop, jit or not."""
    params, stats, x, probs = _toy()
    gates = np.array([1, 0, 1, 1, 0], bool)
    looped = lambda p, v, q, g, s=stats: kept_loop(_toy_block, p, s, v, q, g)
    reference = lambda p, v, q, s=stats: _toy_reference(p, s, v, q, gates)
    primals = (params, x, probs, stats)  # a tangent of the statistics reaches the new ones
    tangents = jax.tree_util.tree_map(jnp.cos, primals)
    got = jax.jvp(lambda p, v, q, s: looped(p, v, q, jnp.asarray(gates), s), primals, tangents)
    _close(got, jax.jvp(reference, primals, tangents))
    got = jax.jit(jax.jacfwd(looped, argnums=(0, 1, 2)))(params, x, probs, jnp.asarray(gates))
    _close(got, jax.jacfwd(reference, argnums=(0, 1, 2))(params, x, probs))


def test_kept_loop_under_linearize_equals_the_kept_blocks_run_one_by_one():
    """jax.linearize was taken for reverse mode (its tracers are a VJP's): the loop's own
    VJP ran, and its linear function failed with JAX's "can't apply forward-mode autodiff
    (jvp) to a custom_vjp function". It now differentiates the plain loop, jit or not (a
    gradient keeps the loop's own VJP: the test after next)."""
    params, stats, x, probs = _toy()
    gates = np.array([1, 0, 1, 1, 0], bool)
    looped = lambda p, v: kept_loop(_toy_block, p, stats, v, probs, jnp.asarray(gates))[0]
    reference = lambda p, v: _toy_reference(p, stats, v, probs, gates)[0]
    tangents = jax.tree_util.tree_map(jnp.cos, (params, x))
    linearized = lambda f: lambda p, v: jax.linearize(f, p, v)[1](*tangents)
    want = linearized(reference)(params, x)
    assert float(jnp.abs(want).max()) > 0
    _close(linearized(looped)(params, x), want)
    _close(jax.jit(linearized(looped))(params, x), want)


def test_kept_loop_second_derivatives_or_one_line_naming_what_works():
    """Reverse over reverse with traced gates failed after tracing with JAX's error
    suggesting lax.scan (misleading: the user wrote no loop); now one line names forward
    over reverse, which works under jit, as does grad of grad with concrete gates."""
    params, stats, x, probs = _toy()
    gates = np.array([1, 0, 1, 1, 0], bool)

    def loss(v, g):
        return jnp.sum(jnp.sin(kept_loop(_toy_block, params, stats, v, probs, g)[0]))

    reference = lambda v: jnp.sum(jnp.sin(_toy_reference(params, stats, v, probs, gates)[0]))
    grad_sum = lambda f: lambda v, *g: jnp.sum(jax.grad(f)(v, *g))
    with pytest.raises(ValueError, match=r"^kept_loop: reverse mode .* with gates traced under "
                       r"jit .*; use forward over reverse \(jax\.hessian"):
        jax.jit(jax.grad(grad_sum(loss)))(x, jnp.asarray(gates))
    with pytest.raises(ValueError, match="^kept_loop: reverse mode"):  # grad of jvp
        jax.jit(jax.grad(lambda v, g: jnp.sum(
            jax.jvp(lambda u: loss(u, g), (v,), (v,))[1])))(x, jnp.asarray(gates))
    _close(jax.jit(jax.hessian(loss))(x, jnp.asarray(gates)), jax.hessian(reference)(x))
    _close(jax.grad(grad_sum(loss))(x, jnp.asarray(gates)), jax.grad(grad_sum(reference))(x))


def test_kept_loop_under_grad_inside_other_transforms_takes_reverse_mode():
    """The mode is read from the tracers where the loop is traced: a gradient taken through
    vmap, checkpoint, shard_map or an inner jit (gates traced under jit) must still take the
    loop's own VJP. Taken for forward mode, the plain loop of dynamic length would be
    reversed, which JAX refuses ("Reverse-mode differentiation does not work for
    lax.while_loop"), and the trainer's step would fail. No warning either: the statistics
    are an auxiliary output."""
    params, stats, x, probs = _toy()
    gates = np.array([1, 0, 1, 1, 0], bool)

    def loss(p, v, g):
        y, new = kept_loop(_toy_block, p, stats, v, probs, g)
        return jnp.sum(jnp.sin(y)), new

    mesh = jax.make_mesh((1,), ("d",), devices=jax.devices()[:1])
    mapped = jax.shard_map(loss, mesh=mesh, in_specs=(jax.P(), jax.P(), jax.P()),
                           out_specs=(jax.P(), jax.P()))
    batched = lambda p, v, g: jax.tree_util.tree_map(
        lambda a: a[0], jax.vmap(loss, in_axes=(None, 0, None))(p, v[None], g))
    want = jax.grad(lambda p: jnp.sum(jnp.sin(_toy_reference(p, stats, x, probs, gates)[0])))(
        params)
    for name, wrapped in [("vmap", batched), ("checkpoint", jax.checkpoint(loss)),
                          ("shard_map", mapped), ("jit", jax.jit(loss))]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got, _ = jax.jit(jax.grad(wrapped, has_aux=True))(params, x, jnp.asarray(gates))
        jax.tree_util.tree_map(
            lambda a, b, name=name: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6,
                                                                err_msg=name), got, want)


def test_kept_loop_warns_where_its_statistics_are_differentiated():
    """A loss on the returned statistics got their part of the gradient dropped, silently;
    returned as an auxiliary output (as the trainer does) they warn of nothing."""
    params, stats, x, probs = _toy()
    gates = jnp.asarray([1, 0, 1, 1, 0], bool)

    def loss(p, on_stats):
        y, new = kept_loop(_toy_block, p, stats, x, probs, gates)
        return jnp.sum(y) + (jnp.sum(new["mean"]) if on_stats else 0.0), new

    with pytest.warns(UserWarning, match=_STATS_DIFFERENTIATED + r".*has_aux=True"):
        jax.jit(jax.grad(lambda p: loss(p, True)[0]))(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.jit(jax.grad(lambda p: loss(p, False), has_aux=True))(params)


def test_loop_model_in_forward_mode_equals_skipping():
    """A ResNet with implementation='loop' (and convolutions without their own VJP)
    differentiates in forward mode: as skipping does, jvp with respect to the input."""
    conv = functools.partial(sdj.conv.Conv, implementation="xla")
    skip, loop = _model(depth=14, conv=conv), _model(depth=14, conv=conv, implementation="loop")
    v = skip.init({"params": jax.random.key(1)}, X, train=False)
    gates = jnp.asarray([1, 0, 1, 1, 1, 0], bool)

    def run(model):
        f = lambda x: model.apply(v, x, train=True, gates=gates,
                                  mutable=["batch_stats"])[0]
        return jax.jit(lambda x: jax.jvp(f, (x,), (jnp.cos(x),)))(X)

    _close(run(loop), run(skip))


class _SowingBlock(sdj.layers.BasicBlock):
    @nn.compact
    def __call__(self, x, survival_prob=1.0, gate=None, *, train, stochastic=None):
        self.sow("intermediates", "mean", jnp.mean(x))
        return super().__call__(x, survival_prob, gate, train=train, stochastic=stochastic)


@pytest.mark.parametrize("loop", [False, True])
def test_scanned_blocks_that_record_intermediates_warn(loop):
    """A scanned (or looped) block's sow, or capture_intermediates, recorded nothing,
    silently; it warns now. Reading only the model's own sown gates warns of nothing."""
    block = functools.partial(_SowingBlock, implementation="mask" if loop else "skip")
    stages = sdj.models.ResidualStages(stage_sizes=(4,), stage_features=(3,),
                                       stage_strides=(1,), block=block, scan=True, loop=loop)
    probs, gates = np.full(4, 0.7), jnp.array([True, True, False, True])
    v = stages.init({"params": jax.random.key(1)}, X, probs, gates, train=False, constant=False)
    run = functools.partial(stages.apply, v, X, probs, gates, train=True, constant=False)
    with pytest.warns(UserWarning, match=r"^The blocks after each stage's first in a scanned "
                      r"stage record no intermediates .*; scan=False with 'skip' or 'mask'"):
        _, state = run(mutable=["batch_stats", "intermediates"])
    assert list(state["intermediates"]) == ["stage1_block1"]  # the unscanned first block
    model = _model(implementation="loop" if loop else "skip")
    v = model.init({"params": jax.random.key(1)}, X, train=False)
    with pytest.warns(UserWarning, match="record no intermediates"):
        model.apply(v, X, train=True, gates=jnp.asarray(GATES), capture_intermediates=True,
                    mutable=["batch_stats", "intermediates"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.apply(v, X, train=True, gates=jnp.asarray(GATES),
                    mutable=["batch_stats", "intermediates"])
