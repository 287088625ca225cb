"""Flax modules and models: gates, eval scaling, dropped blocks, scan, parameter counts."""
import contextlib
import functools
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import stochastic_depth_jax as sdj
from compiled import count, with_conditionals

X = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))


def tiny(**kw):
    kw.setdefault("depth", 8)
    kw.setdefault("width", 4)
    kw.setdefault("num_classes", 3)
    return sdj.CifarResNet(**kw)


def init(model, x=X):
    variables = model.init({"params": jax.random.key(1)}, x, train=False)
    # Non-trivial running statistics, so evaluation really uses them.
    stats = jax.tree_util.tree_map(
        lambda v: v + 0.1 * jax.random.uniform(jax.random.key(v.size), v.shape),
        variables["batch_stats"])
    return {"params": variables["params"], "batch_stats": stats}


@functools.partial(jax.jit, static_argnums=0)
def _train_apply(model, variables, key, gates, x):
    rngs = {} if key is None else {"stochastic_depth": key}
    return model.apply(variables, x, train=True, rngs=rngs, gates=gates, mutable=["batch_stats"])


def train_apply(model, variables, key=None, gates=None, x=X):
    return _train_apply(model, variables, key, gates, x)


@functools.partial(jax.jit, static_argnums=0)
def eval_apply(model, variables, x=X):
    return model.apply(variables, x, train=False)


def skipping_conditionals(model):
    """The fewest conditionals the compiled gradient of a skipping ``model`` keeps when its
    gates are an argument: one forward and one backward per block outside a scan, and per
    scanned stage (the loop's body holds one). Gates made from constants inside ``jit``
    leave the scanned stages' only: XLA folds the others into straight-line code."""
    sizes = model.stage_sizes_()
    scanned = [bool(lengths) for lengths in model.compact_lengths(1)]
    unscanned = sum(1 if scan else n for n, scan in zip(sizes, scanned))
    return 2 * (unscanned + sum(scanned))


# ---- parameter counts (He et al. 2016, Table 6) and depth validation --------------------

@pytest.mark.parametrize("depth, millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85),
                                             (110, 1.7), (1202, 19.4)])
def test_parameter_counts_match_resnet_paper(depth, millions):
    model = sdj.CifarResNet(depth=depth, num_classes=10)
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)},
                                               jnp.zeros((1, 32, 32, 3)), train=False))
    n = sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]))
    digits = 1 if millions >= 1 else 2
    assert round(n / 1e6, digits) == millions


@pytest.mark.parametrize("depth", [111, 21, 2, 0, "110"])
def test_bad_depth_names_valid_depths(depth):
    with pytest.raises(ValueError, match=r"6n\+2"):
        sdj.CifarResNet(depth=depth)


@pytest.mark.parametrize("kw, match", [
    (dict(final_survival_prob=0.0), "final_survival_prob"),
    (dict(final_survival_prob=1.5), "final_survival_prob"),
    (dict(mode="layer"), "mode"),
    (dict(scaling="inverted"), "scaling"),
    (dict(block="wide"), "block"),
    (dict(shortcut="C"), "shortcut"),
    (dict(survival_rule="cosine"), "linear"),
    (dict(remat="some"), "remat"),
])
def test_bad_model_options(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_valid_depths():
    assert sdj.valid_cifar_depths(120)[:3] == [8, 14, 20]
    assert 110 in sdj.valid_cifar_depths() and 1202 in sdj.valid_cifar_depths()


# ---- gates ---------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _sown_gates(model, variables, key):
    _, state = model.apply(variables, X, train=True, rngs={"stochastic_depth": key},
                           mutable=["batch_stats", "intermediates"])
    return state["intermediates"]["gates"][0]


def _gates_of(model, variables, key):
    return np.asarray(_sown_gates(model, variables, key))


def test_same_key_same_gates_and_outputs_different_keys_differ():
    model = tiny(depth=20)
    v = init(model)
    k = jax.random.key(7)
    y1, _ = train_apply(model, v, k)
    y2, _ = train_apply(model, v, k)
    np.testing.assert_array_equal(y1, y2)
    patterns = {tuple(_gates_of(model, v, jax.random.key(i))) for i in range(8)}
    assert len(patterns) > 1
    assert _gates_of(model, v, k).tolist() == _gates_of(model, v, k).tolist()


def test_model_gate_frequencies_match_linear_decay():
    model = tiny(depth=20)  # L = 9 blocks
    v = init(model)
    n = 1500
    keys = jax.random.split(jax.random.key(3), n)
    gates = jax.jit(jax.vmap(lambda k: model.apply(
        v, X[:1], train=True, rngs={"stochastic_depth": k},
        mutable=["batch_stats", "intermediates"])[1]["intermediates"]["gates"][0]))(keys)
    freq = np.asarray(gates).mean(0)
    probs = model.survival_probs()
    assert np.all(np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / n) + 1e-9)


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_trainer_step_gates_are_redrawn_every_step_and_reproducible(mode):
    # The trainer's gates for step s come from the run's gate key with s folded in: a new
    # draw every step (the same gates every step would train one fixed sub-network), and
    # the same draw for the same step (exact resume).
    from stochastic_depth_jax.training import step as step_lib
    model = tiny(depth=20, mode=mode)  # L = 9 blocks
    key = jax.random.key(0)
    draws = [np.asarray(step_lib.step_gates(model, key, s, 4)) for s in range(8)]
    assert len({d.tobytes() for d in draws}) > 1
    np.testing.assert_array_equal(draws[3], step_lib.step_gates(model, key, 3, 4))


def test_constant_depth_needs_no_key():
    model = tiny(final_survival_prob=1.0)
    v = init(model)
    y, _ = train_apply(model, v)  # no 'stochastic_depth' rng given
    assert y.shape == (4, 3)


def test_missing_rng_is_reported():
    model = tiny()
    with pytest.raises(Exception, match="stochastic_depth"):
        train_apply(model, init(model))


# ---- evaluation equals the expected-depth network --------------------------------------------

def _bn(x, p, s, eps=1e-5):
    return (x - s["mean"]) / jnp.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


def _conv(x, k, stride=1):
    return lax.conv_general_dilated(x, k, (stride, stride), ((1, 1), (1, 1)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _shortcut_a(h, stride, kind):
    """Option-A shortcut by hand: the paper's 2x2 average pooling ('A-avg') or subsampling
    ('A'; most versions of the official code), then zero channels (appended by the
    caller)."""
    if stride == 1 or kind == "A":
        return h[:, ::stride, ::stride, :]
    b, height, width, c = h.shape
    return h.reshape(b, height // 2, 2, width // 2, 2, c).mean((2, 4))


def _reference_eval(variables, probs, scale_eval, kind="A-avg"):
    """Hand-written ResNet-8 evaluation: every block runs, residual scaled by p_l."""
    p, s = variables["params"], variables["batch_stats"]
    h = jax.nn.relu(_bn(_conv(X, p["stem_conv"]["kernel"]), p["stem_bn"], s["stem_bn"]))
    for i, stride in enumerate((1, 2, 2)):
        name = f"stage{i + 1}_block1"
        bp = p["stages"][name]["stochastic_depth"]["branch"]
        bs = s["stages"][name]["stochastic_depth"]["branch"]
        f = jax.nn.relu(_bn(_conv(h, bp["conv1"]["kernel"], stride), bp["bn1"], bs["bn1"]))
        f = _bn(_conv(f, bp["conv2"]["kernel"]), bp["bn2"], bs["bn2"])
        short = _shortcut_a(h, stride, kind)
        short = jnp.pad(short, ((0, 0), (0, 0), (0, 0), (0, f.shape[-1] - h.shape[-1])))
        h = jax.nn.relu(short + (probs[i] if scale_eval else 1.0) * f)
    h = h.mean((1, 2))
    return h @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.mark.parametrize("scaling", ["test", "train"])
def test_eval_output_is_expected_depth_network(scaling):
    model = tiny(scaling=scaling)
    v = init(model)
    got = eval_apply(model, v)
    want = _reference_eval(v, model.survival_probs(), scale_eval=scaling == "test")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, _reference_eval(v, model.survival_probs(),
                                                scale_eval=scaling != "test"), atol=1e-4)


def _bn_batch(x, p, eps=1e-5):
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _reference_train(variables, gates, kind):
    """Hand-written ResNet-8 training forward, as the official ResidualDrop.lua: a closed
    gate skips the branch, and the block outputs relu(shortcut(h)): on a downsampling block
    the pooled, zero-padded shortcut still runs. BatchNorm on the batch's statistics."""
    p = variables["params"]
    h = jax.nn.relu(_bn_batch(_conv(X, p["stem_conv"]["kernel"]), p["stem_bn"]))
    for i, stride in enumerate((1, 2, 2)):
        bp = p["stages"][f"stage{i + 1}_block1"]["stochastic_depth"]["branch"]
        short = _shortcut_a(h, stride, kind)
        width = bp["conv2"]["kernel"].shape[-1]
        short = jnp.pad(short, ((0, 0), (0, 0), (0, 0), (0, width - h.shape[-1])))
        if gates[i]:
            f = jax.nn.relu(_bn_batch(_conv(h, bp["conv1"]["kernel"], stride), bp["bn1"]))
            short = short + _bn_batch(_conv(f, bp["conv2"]["kernel"]), bp["bn2"])
        h = jax.nn.relu(short)
    h = h.mean((1, 2))
    return h @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.mark.parametrize("kind", ["A-avg", "A"])
@pytest.mark.parametrize("implementation", ["skip", "mask"])
def test_dropped_downsampling_block_keeps_its_shortcut_in_training(kind, implementation):
    """Paper Sec. 3 / the official code: a dropped block is its shortcut (then the ReLU), also
    where it downsamples (ResNet-8: each stage's only block is its first)."""
    model = tiny(shortcut=kind, implementation=implementation)
    v = init(model)
    for gates in ([1, 0, 0], [0, 1, 0], [1, 1, 1], [0, 0, 0]):
        logits, _ = train_apply(model, v, gates=jnp.array(gates, bool))
        np.testing.assert_allclose(logits, _reference_train(v, gates, kind), rtol=1e-5,
                                   atol=1e-5)
    assert not np.allclose(_reference_train(v, [1, 0, 0], kind),
                           _reference_train(v, [1, 1, 1], kind), atol=1e-4)


@pytest.mark.parametrize("kind", ["A-avg", "A"])
def test_option_a_shortcut_averages_as_the_paper_or_subsamples(kind):
    """'A-avg' (the default) is the paper's average-pooling shortcut; 'A', recorded by runs
    before it existed, still subsamples, so those runs evaluate as they trained."""
    model = tiny(shortcut=kind)
    v = init(model)
    probs = model.survival_probs()
    np.testing.assert_allclose(eval_apply(model, v), _reference_eval(v, probs, True, kind),
                               rtol=1e-5, atol=1e-5)
    other = {"A": "A-avg", "A-avg": "A"}[kind]
    assert not np.allclose(eval_apply(model, v), _reference_eval(v, probs, True, other),
                           atol=1e-4)
    assert sdj.CifarResNet().shortcut == "A-avg"
    # The Shortcut module on its own too (README: 'A-avg' is the default): it subsampled.
    x = jax.random.normal(jax.random.key(1), (1, 4, 4, 2))
    np.testing.assert_allclose(sdj.Shortcut(4, 2).apply({}, x, train=False)[..., :2],
                               x.reshape(1, 2, 2, 2, 2, 2).mean((2, 4)), rtol=1e-6)


def test_average_shortcut_on_odd_sides_matches_the_strided_branch():
    """An odd side: the branch's stride-2 output has ceil(side / 2) pixels, and so has the
    shortcut, whose last window averages the pixels it covers."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
    y = sdj.Shortcut(6, 2, "A-avg").apply({}, x, train=False)
    assert y.shape == (2, 3, 3, 6)
    np.testing.assert_allclose(y[:, 0, 0, :3], x[:, :2, :2].mean((1, 2)), rtol=1e-6)
    np.testing.assert_allclose(y[:, 2, 2, :3], x[:, 4, 4], rtol=1e-6)
    np.testing.assert_allclose(y[:, 1, 2, :3], x[:, 2:4, 4].mean(1), rtol=1e-6)
    assert not np.any(y[..., 3:])


# ---- a dropped block: zero gradients, unchanged statistics ---------------------------------

@pytest.mark.parametrize("scan", [False, True])
def test_dropped_block_has_zero_grads_and_unchanged_stats(scan):
    model = tiny(depth=20, scan=scan)  # 3 blocks per stage; stage 1 blocks 2-3 may be scanned
    v = init(model)
    gates = jnp.array([1, 0, 1, 1, 1, 0, 1, 1, 1], bool)

    def loss(params, gates):
        logits, upd = train_apply(model, {"params": params, "batch_stats": v["batch_stats"]},
                                  gates=gates)
        return jnp.sum(logits ** 2), upd

    grad = with_conditionals(jax.jit(jax.grad(loss, has_aux=True)), v["params"], gates,
                             at_least=skipping_conditionals(model))
    grads, upd = grad(v["params"], gates)
    stats = upd["batch_stats"]["stages"]
    old = v["batch_stats"]["stages"]
    g = grads["stages"]

    def blk(tree, stage, j):  # block j (1-based) of a stage, scanned or not
        if j == 1 or not scan:
            return tree[f"stage{stage}_block{j}"]
        return jax.tree_util.tree_map(lambda a: a[j - 2], tree[f"stage{stage}_scan"]["block"])

    dropped = [(1, 2), (2, 3)]  # gate index 1 -> stage 1 block 2; index 5 -> stage 2 block 3
    for st, j in dropped:
        for leaf in jax.tree_util.tree_leaves(blk(g, st, j)):
            np.testing.assert_array_equal(leaf, 0.0)
        jax.tree_util.tree_map(np.testing.assert_array_equal, blk(stats, st, j), blk(old, st, j))
    for st, j in [(1, 1), (1, 3), (3, 2)]:
        assert any(np.abs(np.asarray(l)).sum() > 0 for l in jax.tree_util.tree_leaves(blk(g, st, j)))
        assert not all(np.array_equal(a, b) for a, b in zip(
            jax.tree_util.tree_leaves(blk(stats, st, j)), jax.tree_util.tree_leaves(blk(old, st, j))))


# ---- scan == unrolled ---------------------------------------------------------------------

def _unstack_scanned(tree):
    """Converts scanned-model variables to the unrolled layout."""
    out = {}
    for name, sub in tree.items():
        if name.endswith("_scan"):
            stage = name[: -len("_scan")]
            n = jax.tree_util.tree_leaves(sub)[0].shape[0]
            for i in range(n):
                out[f"{stage}_block{i + 2}"] = jax.tree_util.tree_map(lambda a: a[i], sub["block"])
        elif isinstance(sub, dict):
            out[name] = _unstack_scanned(sub)
        else:
            out[name] = sub
    return out


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_scan_equals_unrolled(mode):
    scanned, unrolled = tiny(depth=20, scan=True, mode=mode), tiny(depth=20, scan=False, mode=mode)
    v = init(scanned)
    vu = {k: _unstack_scanned(flax.core.unfreeze(t)) for k, t in v.items()}
    assert (jax.tree_util.tree_structure(vu["params"]) ==
            jax.tree_util.tree_structure(unrolled.init({"params": jax.random.key(0)}, X,
                                                       train=False)["params"]))
    np.testing.assert_allclose(eval_apply(scanned, v), eval_apply(unrolled, vu),
                               rtol=1e-5, atol=1e-5)
    key = jax.random.key(11)
    ys, us = train_apply(scanned, v, key)
    yu, uu = train_apply(unrolled, vu, key)
    np.testing.assert_allclose(ys, yu, rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                           _unstack_scanned(flax.core.unfreeze(us["batch_stats"])),
                           uu["batch_stats"])


def _loss_and_grads(model, variables, gates):
    def loss(params):
        y, _ = model.apply({**variables, "params": params}, X, train=True, gates=gates,
                           mutable=["batch_stats"])
        return jnp.sum(y * jnp.arange(y.shape[-1]))
    return jax.value_and_grad(loss)(variables["params"])


_jit_loss_and_grads = jax.jit(_loss_and_grads, static_argnums=0)


def test_scan_stacks_one_residual_per_shape_and_no_masks():
    """A scanned stage's backward pass gets from its forward scan, per block, the block
    input and the kept convolution outputs, each stacked in a buffer of its own shape (no
    ReLU mask: it is recomputed from the next block's input), with the unrolled model's
    gradients."""
    scanned, unrolled = tiny(depth=20, scan=True), tiny(depth=20, scan=False)
    v = init(scanned)
    gates = jnp.array([True, True, False, True, False, True, True, True, False])
    jaxpr = jax.make_jaxpr(lambda p: _loss_and_grads(scanned, {**v, "params": p}, gates))(
        v["params"])
    forward = [e for e in jaxpr.eqns if e.primitive.name == "scan" and not e.params["reverse"]]
    assert len(forward) == 3  # one per stage, 2 scanned blocks each
    for eqn in forward:  # stacked: [length, batch, ...] (jax 0.12's scan has no num_carry)
        length = eqn.params["length"]
        assert length != X.shape[0]  # so that the carry, [batch, ...], is not counted
        stacked = [o.aval for o in eqn.outvars if o.aval.ndim >= 4 and o.aval.shape[0] == length]
        assert stacked and all(a.dtype == jnp.float32 for a in stacked), stacked
        assert len({a.shape for a in stacked}) == len(stacked), stacked
    vu = {k: _unstack_scanned(flax.core.unfreeze(t)) for k, t in v.items()}
    (ls, gs), (lu, gu) = (_jit_loss_and_grads(scanned, v, gates),
                          _jit_loss_and_grads(unrolled, vu, gates))
    np.testing.assert_allclose(ls, lu, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           _unstack_scanned(flax.core.unfreeze(gs)), gu)


def test_scanned_pre_activation_carry_applies_a_non_idempotent_act_once():
    """A scanned post-activation stage under remat carries pre-activations: each block's
    ``act`` moves to the next block's start. With an ``act`` that is not idempotent (unlike
    ReLU) applying it twice or not at all would show; scanned and unrolled stages agree in
    training (a closed gate included) and at evaluation."""
    def act(z):
        return jax.nn.relu(z) + 0.1 * z

    block = functools.partial(sdj.layers.BasicBlock, act=act, remat="convs")
    probs, gates = np.full(4, 0.7), jnp.array([True, False, True, True])
    outputs, v = {}, None
    for scan in (True, False):
        stages = sdj.models.ResidualStages(stage_sizes=(4,), stage_features=(3,),
                                           stage_strides=(1,), block=block, scan=scan)
        if v is None:  # the scanned stage's variables, then the same ones unrolled
            v = stages.init({"params": jax.random.key(1)}, X, probs, None, train=False,
                            constant=False)
        else:
            v = {k: _unstack_scanned(flax.core.unfreeze(t)) for k, t in v.items()}
        train, _ = stages.apply(v, X, probs, gates, train=True, constant=False,
                                mutable=["batch_stats"])
        outputs[scan] = (train, stages.apply(v, X, probs, None, train=False, constant=False))
    for a, b in zip(outputs[True], outputs[False]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class _OwnCallBlock(sdj.layers.ResidualBlock):
    """A user's block that overrides ``__call__`` and applies ``act`` whatever
    ``post_activation`` says."""

    @nn.compact
    def __call__(self, x, survival_prob=1.0, gate=None, *, train, stochastic=None):
        y = self.conv(self.features, (3, 3), name="conv")(x)
        return self.act(x + survival_prob * y)


def _own_call_if_strided(features, strides, **kw):
    """A block factory: a class with its own ``__call__`` for a stage's (strided) first
    block, the library's block for the stride-1 ones."""
    cls = _OwnCallBlock if strides != 1 else sdj.layers.BasicBlock
    return cls(features, strides, **kw)


def _other_act_if_strided(features, strides, **kw):
    """A block factory: the library's block throughout, a stage's (strided) first block
    with another ``act`` than its scanned ones."""
    if strides != 1:
        kw["act"] = jnp.tanh
    return sdj.layers.BasicBlock(features, strides, **kw)


@pytest.mark.parametrize("own_call, stride", [(_OwnCallBlock, 1), (_own_call_if_strided, 2),
                                              (_other_act_if_strided, 2)])
def test_scanned_stage_of_a_block_with_its_own_call_equals_unrolled(own_call, stride):
    """No pre-activation carry where a stage's first or scanned blocks override
    ``ResidualBlock.__call__`` (the carry would apply their non-idempotent ``act`` twice) or
    where the first block's ``act`` is not the scanned ones' (the carry would apply the
    wrong one): scanned and unrolled stages give the same outputs and gradients."""
    block = functools.partial(own_call, act=lambda z: jax.nn.relu(z) + 0.1 * z)
    probs, gates = np.full(4, 0.7), jnp.array([True, True, False, True])
    results, v = {}, None
    for scan in (True, False):
        stages = sdj.models.ResidualStages(stage_sizes=(4,), stage_features=(3,),
                                           stage_strides=(stride,), block=block, scan=scan)
        if v is None:  # the scanned stage's variables, then the same ones unrolled
            v = stages.init({"params": jax.random.key(1)}, X, probs, gates, train=False,
                            constant=False)
        else:
            v = {k: _unstack_scanned(flax.core.unfreeze(t)) for k, t in v.items()}

        def loss(params, stages=stages):
            y, _ = stages.apply({**v, "params": params}, X, probs, gates, train=True,
                                constant=False, mutable=["batch_stats"])
            return jnp.sum(y * jnp.arange(y.shape[-1])), y
        (_, y), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
        results[scan] = (y, _unstack_scanned(flax.core.unfreeze(g)) if scan else g)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4),
                           results[True], results[False])


class _MyRematBlock(nn.remat(sdj.layers.BasicBlock)):
    """A user's subclass of ``nn.remat(BasicBlock)`` that keeps its ``__call__``."""
    remat: str = "convs"


_REMAT_REFUSED = (r"which traces the block's keyword argument train .*; use BasicBlock's own "
                  r"remat='convs' or remat='full' field instead, which rematerialises only "
                  r"the branches that survive\.")
_JIT_REFUSED = (r"which traces the block's keyword arguments train and stochastic, Python "
                r"values it branches on; pass BasicBlock itself and jit the function that "
                r"applies the model, or nn.jit\(BasicBlock, static_argnames=\('train', "
                r"'stochastic'\)\)\.")


@pytest.mark.parametrize("scan, block, named, refused", [
    (True, nn.remat(sdj.layers.BasicBlock), "nn.remat(BasicBlock)", _REMAT_REFUSED),
    (False, nn.remat(functools.partial(sdj.layers.BasicBlock, remat="none")),
     "nn.remat(BasicBlock)", _REMAT_REFUSED),
    (True, _MyRematBlock, "_MyRematBlock (a subclass of nn.remat(BasicBlock))", _REMAT_REFUSED),
    (False, nn.jit(sdj.layers.BasicBlock), "nn.jit(BasicBlock)", _JIT_REFUSED),
])
def test_a_library_block_under_nn_remat_or_nn_jit_is_refused_in_one_line(scan, block, named,
                                                                           refused):
    """``ResidualStages(block=nn.remat(BasicBlock))`` failed in the first gradient with a
    ``TracerBoolConversionError``: Flax's lifted remat traces the blocks' keyword-only
    ``train`` (its ``static_argnums`` name positional arguments only). Refused up front, in
    one line naming the block's own ``remat`` field, at init and in a gradient alike. So did
    a user's subclass of ``nn.remat(BasicBlock)``, and ``nn.jit(BasicBlock)`` (which traces
    ``train`` unless told it is static), in init: now the same kind of line."""
    x, probs = jnp.ones((2, 8, 8, 16)), np.linspace(1, 0.5, 9)
    gates = jnp.array([True, False] * 4 + [True])
    layout = dict(stage_sizes=(9,), stage_features=(16,), stage_strides=(1,), scan=scan)
    stages = sdj.models.ResidualStages(block=block, **layout)
    refused = rf"^ResidualStages got block={re.escape(named)}, {refused}"
    with pytest.raises(ValueError, match=refused):
        stages.init(jax.random.key(0), x, probs, None, train=False, constant=False)
    v = sdj.models.ResidualStages(block=sdj.layers.BasicBlock, **layout).init(
        jax.random.key(0), x, probs, None, train=False, constant=False)

    def loss(params):
        y, _ = stages.apply({**v, "params": params}, x, probs, gates, train=True,
                            constant=False, mutable=["batch_stats"])
        return jnp.sum(y)
    with pytest.raises(ValueError, match=refused):
        jax.grad(loss)(v["params"])


@pytest.mark.parametrize("scan", [True, False])
def test_nn_jit_of_a_library_block_is_refused_also_after_a_deleted_first_block(scan):
    """A pruned stage whose first block is deleted (``keep``) runs that block's shortcut
    only, which does not branch on ``train``: under ``nn.jit(BasicBlock)`` it passed, and
    the stage's next blocks (unrolled, or scanned) failed with JAX's
    ``TracerBoolConversionError``, not the one-line ValueError."""
    x, probs = jnp.ones((2, 8, 8, 16)), np.linspace(1, 0.5, 5)
    stages = sdj.models.ResidualStages(block=nn.jit(sdj.layers.BasicBlock), stage_sizes=(5,),
                                       stage_features=(16,), stage_strides=(1,), scan=scan,
                                       keep=[False, True, True, True, True])
    refused = rf"^ResidualStages got block=nn\.jit\(BasicBlock\), {_JIT_REFUSED}"
    with pytest.raises(ValueError, match=refused):
        stages.init(jax.random.key(0), x, probs, None, train=False, constant=False)


@pytest.mark.parametrize("scan", [True, False])
def test_a_library_block_under_nn_jit_with_static_train_runs_as_without(scan):
    """``nn.jit(BasicBlock, static_argnames=('train', 'stochastic'))`` works (only its
    ``train`` and ``stochastic`` need be Python values): not refused with the ``nn.jit``
    that traces them, it gives the same variables, values and gradients as ``BasicBlock``,
    in training and at evaluation."""
    x, probs = jnp.ones((2, 8, 8, 16)), np.linspace(1, 0.5, 5)
    gates = jnp.array([True, False, True, False, True])
    layout = dict(stage_sizes=(5,), stage_features=(16,), stage_strides=(1,), scan=scan)
    jitted = nn.jit(sdj.layers.BasicBlock, static_argnames=("train", "stochastic"))
    v = None
    results = []
    for block in (jitted, sdj.layers.BasicBlock):
        stages = sdj.models.ResidualStages(block=block, **layout)
        own = stages.init(jax.random.key(0), x, probs, None, train=False, constant=False)
        v = v or own  # one set of variables: nn.jit forks the init's random numbers
        assert jax.tree_util.tree_structure(own) == jax.tree_util.tree_structure(v)

        def loss(params, stages=stages):
            y, _ = stages.apply({**v, "params": params}, x, probs, gates, train=True,
                                constant=False, mutable=["batch_stats"])
            return jnp.sum(y ** 2)
        results.append((jax.value_and_grad(loss)(v["params"]),
                        stages.apply(v, x, probs, None, train=False, constant=False)))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4),
                           *results)


class _NoTrainBlock(nn.Module):
    """A user's block that does not branch on ``train`` in Python (LayerNorm, no dropout):
    it works under Flax's ``nn.remat``, which traces ``train``."""
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, survival_prob=1.0, gate=None, *, train, stochastic=None):
        y = nn.Conv(self.features, (3, 3), strides=self.strides)(nn.LayerNorm()(x))
        scale = survival_prob if gate is None else jnp.asarray(gate, x.dtype)
        return x + scale * y


@pytest.mark.parametrize("scan", [True, False])
def test_a_users_block_wrapped_in_nn_remat_runs_as_without(scan):
    """The refusal of ``nn.remat(BasicBlock)`` also refused every user block wrapped in
    ``nn.remat``, which worked before where the block does not branch on ``train``: such a
    block gives the same values and gradients as without ``nn.remat``."""
    x, probs = jnp.ones((2, 8, 8, 16)), np.linspace(1, 0.5, 9)
    gates = jnp.array([True, False] * 4 + [True])
    layout = dict(stage_sizes=(9,), stage_features=(16,), stage_strides=(1,), scan=scan)
    results = []
    for block in (nn.remat(_NoTrainBlock), _NoTrainBlock):
        stages = sdj.models.ResidualStages(block=block, **layout)
        v = stages.init(jax.random.key(0), x, probs, None, train=False, constant=False)

        def loss(params, stages=stages):
            return jnp.sum(stages.apply({"params": params}, x, probs, gates, train=True,
                                        constant=False) ** 2)
        results.append(jax.value_and_grad(loss)(v["params"]))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                           *results)


def test_auto_scan_for_deep_nets():
    v = jax.eval_shape(lambda: sdj.CifarResNet(depth=56).init(
        {"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)), train=False))
    assert "stage1_scan" in v["params"]["stages"]
    v = jax.eval_shape(lambda: sdj.CifarResNet(depth=20).init(
        {"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)), train=False))
    assert "stage1_block3" in v["params"]["stages"]


# ---- implementations agree ------------------------------------------------------------------

def test_skip_mask_and_remat_agree():
    """One gradient of skipping (remat 'convs', 'full', 'none') and of masking. The gates
    are an argument of the compiled gradient: made inside it, from constants, they let XLA
    fold every skipping conditional into straight-line code, and the test compared masking
    with a program that did not branch."""
    base = tiny(depth=20)
    v = init(base)
    gates = jnp.array([1, 0, 1, 1, 1, 0, 0, 1, 1], bool)

    def grads(model):
        def loss(params, gates):
            y, _ = train_apply(model, {"params": params, "batch_stats": v["batch_stats"]},
                               gates=gates)
            return jnp.sum(y ** 2)
        branches = skipping_conditionals(model) if model.implementation == "skip" else 0
        return with_conditionals(jax.jit(jax.grad(loss)), v["params"], gates,
                                 at_least=branches)(v["params"], gates)

    ref = grads(base)
    for kw in (dict(implementation="mask"), dict(remat="full"), dict(remat="none")):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                               grads(tiny(depth=20, **kw)), ref)


def test_preact_and_shortcut_b_and_bf16_run():
    for model in (tiny(block="preact"), tiny(shortcut="B"), tiny(dtype=jnp.bfloat16)):
        v = init(model)
        y, _ = train_apply(model, v, jax.random.key(0))
        assert y.shape == (4, 3) and np.all(np.isfinite(np.asarray(y, np.float32)))


@pytest.mark.parametrize("block", [sdj.BasicBlock, sdj.PreActBlock, sdj.BottleneckBlock])
def test_a_block_without_dtype_skips_on_a_bfloat16_input(block):
    """With ``dtype=None`` a block's convolutions promote a bfloat16 input to their float32
    parameters' dtype, but the skipping ``cond`` shaped its closed side as bfloat16:
    "cond branches must have equal output types" for any user's bf16 activations."""
    x = jax.random.normal(jax.random.key(3), (4, 6, 6, 2)).astype(jnp.bfloat16)
    outs = {}
    for implementation in ("skip", "mask"):
        b = block(4, 2, implementation=implementation)
        v = b.init(jax.random.key(0), x, train=False)
        for gate in (True, False):
            y, _ = b.apply(v, x, 0.5, jnp.asarray(gate), train=True, mutable=["batch_stats"])
            outs[implementation, gate] = y
    for gate in (True, False):
        assert outs["skip", gate].dtype == outs["mask", gate].dtype == jnp.float32
        np.testing.assert_allclose(outs["skip", gate], outs["mask", gate], atol=1e-5)
    # The average-pooling shortcut keeps its input's dtype (its pool's count division
    # returned float32), as the subsampling one does.
    for kind in ("A-avg", "A"):
        assert sdj.Shortcut(4, 2, kind).apply({}, x, train=False).dtype == jnp.bfloat16


class _Bf16Conv(nn.Module):
    """A user's convolution: bfloat16 kernel and compute, and no ``param_dtype`` field."""

    features: int
    kernel_size: tuple = (3, 3)
    strides: tuple = (1, 1)
    padding: object = "SAME"
    use_bias: bool = False
    kernel_init: object = nn.initializers.lecun_normal()
    dtype: object = None

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", self.kernel_init,
                       (*self.kernel_size, x.shape[-1], self.features), jnp.bfloat16)
        return lax.conv_general_dilated(x.astype(jnp.bfloat16), k, self.strides, self.padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class _FlaxBatchNorm(nn.Module):
    """A user's norm: Flax's BatchNorm, whose output promotes to its float32 parameters."""

    dtype: object = None
    scale_init: object = nn.initializers.ones

    @nn.compact
    def __call__(self, x, *, train):
        return nn.BatchNorm(use_running_average=not train, dtype=self.dtype,
                            scale_init=self.scale_init)(x)


@pytest.mark.parametrize("kw", [
    {"conv": _Bf16Conv},
    {"conv": functools.partial(sdj.conv.Conv, param_dtype=jnp.bfloat16),
     "norm": _FlaxBatchNorm},
])
@pytest.mark.parametrize("block", [sdj.BasicBlock, sdj.PreActBlock])
def test_a_block_of_a_users_conv_or_norm_skips_as_it_masks(kw, block):
    """The skipping ``cond`` shapes its closed side by a dtype rule of the library's own
    convolutions and norm; a user's with other rules (a bfloat16 kernel without a
    ``param_dtype`` field; Flax's BatchNorm, promoting to float32) failed with "cond
    branches must have equal output types", where masking ran; so did a deleted block's
    output, unlike the block with its gate closed."""
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jax.random.normal(jax.random.key(3), (4, 6, 6, 4)).astype(dtype)
        outs = {}
        for implementation in ("skip", "mask"):
            b = block(4, 1, implementation=implementation, **kw)
            v = b.init(jax.random.key(0), x, train=False)
            for gate in (True, False):
                outs[implementation, gate], _ = b.apply(
                    v, x, 0.5, jnp.asarray(gate), train=True, mutable=["batch_stats"])
        for gate in (True, False):
            assert outs["skip", gate].dtype == outs["mask", gate].dtype
            np.testing.assert_allclose(np.asarray(outs["skip", gate], np.float32),
                                       np.asarray(outs["mask", gate], np.float32),
                                       rtol=1e-2, atol=1e-2)  # bfloat16 roundings
        deleted = block(4, 1, has_branch=False, **kw).apply({}, x, train=False)
        assert deleted.dtype == outs["skip", False].dtype


def test_imagenet_resnet_runs_and_scans():
    model = sdj.ResNet(stage_sizes=(1, 2, 1, 1), width=4, num_classes=5, scan=True)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    v = model.init({"params": jax.random.key(1)}, x, train=False)
    y, _ = train_apply(model, v, jax.random.key(2), x=x)
    assert y.shape == (2, 5)
    assert model.num_blocks() == 5
    assert sdj.ResNet50().num_blocks() == 16 and sdj.ResNet152().num_blocks() == 50



@pytest.mark.parametrize("make, count", [("ResNet50", 25_557_032), ("ResNet101", 44_549_160)])
def test_imagenet_resnets_have_torchvisions_parameter_counts(make, count):
    # The README names these counts (torchvision's, 1000 classes); ResNet-152's is checked
    # by its snippet. Scanned and unrolled stages hold the same parameters.
    for scan in (True, False):
        model = getattr(sdj, make)(scan=scan)
        shapes = jax.eval_shape(lambda: model.init(  # noqa: B023
            jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
        assert sum(a.size for a in jax.tree.leaves(shapes["params"])) == count

# ---- compact mode: kept blocks gathered into static-length scans, no conditionals ---------


def _gated_grad(model, v):
    """jit of ``params, gates, buckets -> ((sum(y^2), batch-stat updates), grads)`` of
    ``model`` training on X (buckets static: None for lax.cond skipping). The gates are an
    argument, as the trainer's: made from constants inside the program, XLA folds
    skipping's conditionals (all but the scanned stages') into straight-line code."""
    def run(params, gates, buckets):
        y, upd = model.apply({"params": params, "batch_stats": v["batch_stats"]}, X,
                             train=True, gates=gates, buckets=buckets, mutable=["batch_stats"])
        return jnp.sum(y ** 2), upd

    return jax.jit(jax.value_and_grad(run, has_aux=True), static_argnums=2)


def test_compact_mode_equals_skipping():
    model = tiny(depth=26, scan=True)  # n = 4: three scanned blocks per stage
    v = init(model)
    gates = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1], bool)
    grad = _gated_grad(model, v)
    skip = with_conditionals(grad, v["params"], gates, None,
                             at_least=skipping_conditionals(model))
    (l_skip, u_skip), g_skip = skip(v["params"], gates)  # one program, whatever the multiple
    for multiple, want in ((1, (2, 2, 1)), (2, (2, 2, 2))):
        buckets = model.compact_buckets(gates, multiple)
        assert buckets == want
        (l_comp, u_comp), g_comp = grad(v["params"], gates, buckets)
        np.testing.assert_allclose(l_comp, l_skip, rtol=1e-5)
        close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        jax.tree_util.tree_map(close, g_comp, g_skip)
        jax.tree_util.tree_map(close, u_comp, u_skip)  # dropped blocks' stats unchanged too


def test_compact_mode_equals_masking_for_every_block_kept_none_and_a_stage_dropped():
    """The extreme draws: every block kept, none, a whole stage dropped (its first block
    too), a stage keeping only its first block. ResNet-14 scanned has one scanned block per
    stage, so every draw is one program (buckets (1, 1, 1), a padding slot wherever that
    block is dropped) and the gates are an argument: two compilations in all."""
    model = tiny(depth=14, scan=True)
    v = init(model)
    grad, masked = _gated_grad(model, v), _gated_grad(tiny(depth=14, scan=True,
                                                          implementation="mask"), v)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for gates in ([1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 1, 1],
                  [1, 0, 1, 0, 1, 0]):
        gates = np.array(gates, bool)
        assert model.compact_buckets(gates, 4) == (1, 1, 1)
        (loss, upd), g = grad(v["params"], jnp.asarray(gates), (1, 1, 1))
        (loss_m, upd_m), g_m = masked(v["params"], jnp.asarray(gates), None)
        close(loss, loss_m)
        jax.tree_util.tree_map(close, g, g_m)
        jax.tree_util.tree_map(close, upd, upd_m)
        # A dropped block's running statistics come back bit for bit.
        for stage, kept in enumerate(gates[1::2]):
            stats = lambda t: t["batch_stats"]["stages"][f"stage{stage + 1}_scan"]  # noqa: B023
            same = jax.tree_util.tree_map(np.array_equal, stats(upd), stats(v))
            assert all(jax.tree_util.tree_leaves(same)) != kept, (gates, stage)


def test_compact_mode_writes_statistics_back_exactly():
    """Compact mode wrote each slot's statistics back as ``old + (new - old) * valid``: a kept
    block's came back rounded to the old value's precision (1 absolute at 1e8, where the
    batch's own statistic is about 1), and a padding slot's inf came back NaN (inf * 0).
    Masking (the same arithmetic in a scan of every block) gives the batch's statistics and
    keeps a dropped block's inf; compact mode now gives them bit for bit. With momentum 1 a
    running statistic is the batch's own."""
    norm = functools.partial(sdj.BatchNorm, momentum=1.0)
    model = tiny(depth=26, scan=True, norm=norm)  # three scanned blocks per stage
    gates = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1], bool)
    buckets = model.compact_buckets(gates, 2)
    assert buckets == (2, 2, 2)  # stage 3 keeps one: its padding slot is a dropped block
    kept = jnp.asarray(gates.reshape(3, 4)[:, 1:])  # per stage, its scanned blocks
    v = init(model)

    def extreme(path, a):  # scanned: 1e8 where kept, inf where dropped
        stage = [k.key for k in path if str(k.key).endswith("_scan")]
        if not stage:
            return a
        rows = kept[int(stage[0][5]) - 1].reshape((-1,) + (1,) * (a.ndim - 1))
        return jnp.where(rows, jnp.full_like(a, 1e8), jnp.inf)

    v["batch_stats"] = jax.tree_util.tree_map_with_path(extreme, v["batch_stats"])

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def run(model, buckets, v, gates):
        return model.apply(v, X, train=True, gates=gates, buckets=buckets,
                           mutable=["batch_stats"])[1]["batch_stats"]

    gates = jnp.asarray(gates)  # an argument: skipping really branches
    compact = run(model, buckets, v, gates)
    masked = run(tiny(depth=26, scan=True, norm=norm, implementation="mask"), None, v, gates)
    # Forward only: one conditional per stage's first block and per scanned stage.
    skipped = with_conditionals(run, model, None, v, gates,
                                at_least=skipping_conditionals(model) // 2)(v, gates)
    jax.tree_util.tree_map(np.testing.assert_array_equal, compact, masked)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           compact, skipped)
    stage3 = compact["stages"]["stage3_scan"]["block"]["stochastic_depth"]["branch"]
    assert all(np.all(np.isinf(stat[:2])) and np.all(np.abs(stat[2]) < 1e3)
               for bn in stage3.values() for stat in bn.values())


def test_compact_mode_masks_unscanned_stages_instead_of_branching():
    """Compact mode promises no conditional: a stage too short to scan (scan=None, ResNet-20
    to -44, WRN-28) ran its blocks under lax.cond, the model's 'skip', while run.json said
    compact mode. Its blocks are masked, with the same results."""
    model = tiny(depth=20)  # scan=None: two blocks after each stage's first, none scanned
    v = init(model)
    gates = np.array([1, 0, 1, 1, 1, 0, 0, 1, 1], bool)
    assert model.compact_buckets(gates, 4) == (0, 0, 0)

    grad = _gated_grad(model, v)
    assert "stablehlo.case" not in grad.lower(v["params"], gates, (0, 0, 0)).as_text()
    skip = with_conditionals(grad, v["params"], gates, None,
                             at_least=skipping_conditionals(model))
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    jax.tree_util.tree_map(close, grad(v["params"], gates, (0, 0, 0)), skip(v["params"], gates))


def test_scan_unroll_inlines_every_scan_and_changes_nothing_else():
    """Same parameters, losses, gradients and statistics, with skipping and in compact mode;
    the lowered gradient has no loop (and still one conditional per gated block when
    skipping)."""
    looped, inlined = tiny(depth=26, scan=True), tiny(depth=26, scan=True, scan_unroll=True)
    v = init(looped)
    assert (jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(init(inlined)))
    gates = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1], bool)
    for buckets in (None, looped.compact_buckets(gates, 1)):
        results = {}
        for name, model in (("looped", looped), ("inlined", inlined)):
            def run(params, gates, buckets, model=model):
                y, upd = model.apply({"params": params, "batch_stats": v["batch_stats"]}, X,
                                     train=True, gates=gates, buckets=buckets,
                                     mutable=["batch_stats"])
                return jnp.sum(y ** 2), upd
            grad = jax.jit(jax.value_and_grad(run, has_aux=True), static_argnums=2)
            # Compact mode's run-time bucket check is a conditional; the trainer, whose
            # buckets come from its gates as here, traces without it.
            with sdj.models.buckets_fitted() if buckets else contextlib.nullcontext():
                lowered = grad.lower(v["params"], jnp.asarray(gates), buckets)
            hlo = lowered.as_text()
            loops = hlo.count("stablehlo.while")
            assert (loops == 0) if name == "inlined" else (loops > 0), (name, buckets, loops)
            assert ("stablehlo.case" in hlo) == (buckets is None)
            # The gates are an argument, so skipping's conditionals survive XLA (inlined:
            # one forward and one backward per block); compact mode has none.
            program = lowered.compile()
            kept = count(program, "conditional")
            if buckets is None:
                least = 2 * 12 if name == "inlined" else skipping_conditionals(model)
                assert kept >= least, (name, kept)
            else:
                assert kept == 0, (name, kept)
            results[name] = program(v["params"], jnp.asarray(gates))
        close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        jax.tree_util.tree_map(close, results["inlined"], results["looped"])


def test_compact_lengths_fit_the_schedule_and_give_the_same_training():
    model = tiny(depth=26, scan=True)  # three scanned blocks per stage
    lengths = model.compact_lengths(2)
    assert len(lengths) == 3 and all(ls[-1] == 3 and list(ls) == sorted(set(ls)) and ls[0] >= 1
                                     for ls in lengths)
    gates = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1], bool)  # kept: 2, 2, 1
    buckets = model.compact_buckets(gates, lengths=lengths)
    assert all(b == min(x for x in ls if x >= k) for b, ls, k in zip(buckets, lengths, (2, 2, 1)))
    v = init(model)

    def run(buckets):
        y, upd = model.apply(v, X, train=True, gates=jnp.asarray(gates), buckets=buckets,
                             mutable=["batch_stats"])
        return y, upd

    y_skip, u_skip = run(None)
    y_comp, u_comp = run(buckets)
    np.testing.assert_allclose(y_comp, y_skip, rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           u_comp, u_skip)
    # An unscanned stage has no lengths and a bucket of 0.
    assert tiny(depth=26, scan=False).compact_lengths(2) == ((), (), ())


def test_compact_mode_needs_gates_and_training():
    model = tiny(depth=26, scan=True)
    v = init(model)
    with pytest.raises(ValueError, match="buckets"):
        model.apply(v, X, train=False, buckets=(1, 1, 1))
    with pytest.raises(ValueError, match="buckets"):
        model.apply(v, X, train=True, buckets=(1, 1, 1), rngs={"stochastic_depth": jax.random.key(0)},
                    mutable=["batch_stats"])
    # train=True, stochastic=False runs the open blocks scaled by p_l; compact mode gated them
    # as in training instead (another network's output, silently).
    with pytest.raises(ValueError, match=r"stochastic=False \(p_l-scaled open blocks\) needs "
                       r"buckets=None"):
        model.apply(v, X, train=True, stochastic=False, gates=np.ones(12, bool),
                    buckets=(3, 3, 3), mutable=["batch_stats"])


def test_mask_implementation_keeps_dropped_block_statistics():
    model = tiny(implementation="mask")
    v = init(model)
    gates = jnp.array([1, 0, 1], bool)
    _, upd = train_apply(model, v, gates=gates)
    dropped = upd["batch_stats"]["stages"]["stage2_block1"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, dropped,
                           v["batch_stats"]["stages"]["stage2_block1"])


# ---- initialisation: ours (the default) and the official Torch code's -------------------

@pytest.fixture(scope="module")
def initialized():
    """Parameters of a ResNet-8 of width 16 (64 features into a 10-way head, as ResNet-110's)
    from the default model and from ``initialization='official'``, same key."""
    x = jnp.zeros((1, 8, 8, 3))
    models = {"ours": sdj.CifarResNet(depth=8, width=16, num_classes=10),
              "official": sdj.CifarResNet(depth=8, width=16, num_classes=10,
                                          initialization="official")}
    return {name: model.init({"params": jax.random.key(0)}, x, train=False)["params"]
            for name, model in models.items()}


def _named(params, leaf):
    """``{path: array}`` of the leaves called ``leaf`` ('kernel', 'scale', ...)."""
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(params) if p[-1].key == leaf}


def test_official_initialization_is_the_torch_codes(initialized):
    params = initialized["official"]
    convs = {k: v for k, v in _named(params, "kernel").items() if "head" not in k}
    assert len(convs) == 7  # stem + 2 per block
    for path, k in convs.items():  # nninit.kaiming: N(0, sqrt(2 / (k * k * in_channels)))
        kh, kw, c_in, _ = k.shape
        np.testing.assert_allclose(k.std(), np.sqrt(2 / (kh * kw * c_in)), rtol=0.12, err_msg=path)
    # The stem: fan-in 27 against fan-out 144, a 2.3x larger std than the default's.
    assert params["stem_conv"]["kernel"].std() > 1.8 * initialized["ours"]["stem_conv"]["kernel"].std()
    scales = np.concatenate(list(_named(params, "scale").values()))  # cudnn.torch: uniform()
    assert len(scales) == 240 and 0 <= scales.min() and scales.max() < 1
    assert abs(scales.mean() - 0.5) < 0.1 and scales.std() > 0.2
    for path, b in _named(params, "bias").items():
        if "head" not in path:
            assert not b.any(), path  # BatchNorm biases 0
    bound = 1 / 8  # nn.Linear: weight and bias uniform in +-1/sqrt(64)
    w, b = np.asarray(params["head"]["kernel"]), np.asarray(params["head"]["bias"])
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound and b.any()
    assert np.abs(w).max() > 0.95 * bound and abs(w.std() - bound / np.sqrt(3)) < 0.1 * bound


def test_default_initialization_is_unchanged(initialized):
    ours, official = initialized["ours"], initialized["official"]
    assert sdj.CifarResNet().initialization == "ours"
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(official)
    for path, k in _named(ours, "kernel").items():
        if "head" in path:
            continue
        kh, kw, _, c_out = k.shape  # He on fan-out
        np.testing.assert_allclose(k.std(), np.sqrt(2 / (kh * kw * c_out)), rtol=0.12, err_msg=path)
        # Where fan-in equals fan-out the draws are the official ones bit for bit: the same
        # keys reach the same initialisers, nothing else moved.
        same = k.shape[2] == c_out
        assert np.array_equal(k, _named(official, "kernel")[path]) == same, path
    assert all((s == 1).all() for s in _named(ours, "scale").values())
    assert not np.asarray(ours["head"]["bias"]).any()
    with pytest.raises(ValueError, match=r"Unknown initialization 'torch'; valid: \['ours', "
                                         r"'official'\]"):
        sdj.CifarResNet(initialization="torch")


def test_official_initialization_of_a_scanned_stage_is_per_block():
    """A scanned stage stacks its blocks' kernels ``[blocks, k, k, in, out]``: each block's
    fan-in is k * k * in, not counting the stacking axis (which would shrink the std by
    sqrt(blocks))."""
    model = sdj.CifarResNet(depth=20, width=8, num_classes=10, scan=True,
                            initialization="official")
    key = jax.random.key(0, impl="rbg")  # compiles faster than threefry on CPU
    params = model.init({"params": key}, jnp.zeros((1, 8, 8, 3)), train=False)
    stacked = {k: v for k, v in _named(params["params"], "kernel").items() if "_scan" in k}
    assert len(stacked) == 6  # conv1, conv2 of each stage's scan
    for path, k in stacked.items():
        blocks, kh, kw, c_in, _ = k.shape
        assert blocks >= 2, path
        np.testing.assert_allclose(k.std(axis=(1, 2, 3, 4)), np.sqrt(2 / (kh * kw * c_in)),
                                   rtol=0.15, err_msg=path)


@pytest.mark.parametrize("make", [
    functools.partial(sdj.WideResNet, depth=10, widen_factor=1),
    functools.partial(tiny, block="preact"),
    tiny,
])
def test_zero_init_last_starts_every_branch_at_zero(make):
    """``zero_init_last=True`` did nothing to a pre-activation branch (``WideResNet``,
    ``block='preact'``), which has no BatchNorm at its end: now its last convolution starts
    at zero (as timm's ResNetV2), so every block starts as its shortcut, and still learns."""
    model = make(width=4, num_classes=3, zero_init_last=True, scan=True)
    v = model.init({"params": jax.random.key(1)}, X, train=False)
    v = {"params": v["params"], "batch_stats": v["batch_stats"]}
    closed = jnp.zeros(model.num_blocks(), bool)
    np.testing.assert_allclose(eval_apply(model, v), _eval_gated(model, v, closed), atol=1e-6)
    plain = make(width=4, num_classes=3, scan=True)  # without: the branches start non-zero
    pv = plain.init({"params": jax.random.key(1)}, X, train=False)
    assert not np.allclose(eval_apply(plain, pv), _eval_gated(plain, pv, closed), atol=1e-3)

    def loss(params):
        logits, _ = model.apply({**v, "params": params}, X, train=True, mutable=["batch_stats"],
                                gates=~closed)
        return jnp.sum(logits ** 2)

    grads = jax.grad(loss)(v["params"])["stages"]
    for name, block in grads.items():  # every branch learns (its last layer, at first)
        branch = block["stochastic_depth"]["branch"]
        assert max(np.abs(np.asarray(g)).max() for g in jax.tree_util.tree_leaves(branch)) > 0


@functools.partial(jax.jit, static_argnums=0)
def _eval_gated(model, variables, gates):
    return model.apply(variables, X, train=False, gates=gates)


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_gates_given_as_a_list_are_the_mask_they_hold(mode):
    """A list of bools, as one writes a fixed sub-network, failed with JAX's "Cannot
    determine dtype of [True, ...]"; it is the bool mask it holds, at evaluation, in
    training and under ``jit``. A list of ints, a wrong length and a ragged list are one
    line each."""
    model = tiny(mode=mode)
    v = init(model)
    mask = [True, False, True]
    if mode == "sample":
        mask = [[True, False, True, True]] * 3
    gates = jnp.asarray(mask)
    kw = dict(train=False, stochastic=True)
    want = model.apply(v, X, gates=gates, **kw)
    np.testing.assert_array_equal(model.apply(v, X, gates=mask, **kw), want)
    np.testing.assert_array_equal(model.apply(v, X, gates=tuple(mask), **kw), want)
    jitted = jax.jit(lambda v, g: model.apply(v, X, gates=g, **kw))
    np.testing.assert_array_equal(jitted(v, mask), jitted(v, gates))
    train = lambda g: model.apply(v, X, train=True, gates=g, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, train(mask), train(gates))
    with pytest.raises(TypeError, match=r"^gates must be bool \(True where a block runs\), "
                                        r"got int\d+; pass bools, e.g\. np\.asarray\(gates, "
                                        r"bool\)\."):
        model.apply(v, X, gates=[1, 0, 1], train=False)
    with pytest.raises(ValueError, match=r"^gates must have shape \(3,.*got \(2,\)\."):
        model.apply(v, X, gates=[True, False], train=False)
    with pytest.raises(ValueError, match=r"^gates must be one bool per block.*ragged"):
        model.apply(v, X, gates=[[True], [True, False]], train=False)


def test_compact_mode_takes_gates_given_as_a_list_under_jit():
    """A list of bools passed to a jitted step (each a traced scalar there) with
    ``buckets=`` failed in the buckets' host-side check with JAX's
    TracerArrayConversionError; it trains as the same gates given as an array."""
    model = tiny(depth=20, scan=True)
    v = init(model)
    mask = [True, False, True, True, True, False, True, False, True]
    buckets = model.compact_buckets(np.asarray(mask))
    assert all(buckets)  # every stage's blocks after its first run gathered in a scan

    @functools.partial(jax.jit, static_argnums=1)
    def step(gates, buckets):
        return model.apply(v, X, train=True, gates=gates, buckets=buckets,
                           mutable=["batch_stats"])

    jax.tree.map(np.testing.assert_array_equal, step(mask, buckets),
                 step(jnp.asarray(mask), buckets))


@pytest.mark.parametrize("scan", [False, True])
def test_residual_stages_check_their_probabilities_and_gates(scan):
    """``ResidualStages`` used on its own: a survival probability of 0 or 1.5 in a scanned
    stage made its outputs NaN without an error, gates too short for an unrolled stage were
    read clamped (the last one reused), and short ``probs`` failed with an IndexError or in
    ``scan``. Each is one line."""
    x, probs = jnp.ones((2, 8, 8, 4)), np.array([1.0, 0.8, 0.6])
    stages = sdj.models.ResidualStages((3,), (4,), (1,), block=sdj.layers.BasicBlock,
                                       scan=scan)
    v = stages.init(jax.random.key(0), x, probs, None, train=False, constant=False)
    run = functools.partial(stages.apply, v, x, train=False, constant=False)
    for bad, value in ((0.0, "0.0"), (1.5, "1.5")):
        with pytest.raises(ValueError, match=rf"^ResidualStages probs must be survival "
                                             rf"probabilities in \(0, 1\], got {value} for "
                                             rf"block 2 \(0-based\)"):
            run(np.array([1.0, 0.8, bad]), None)
    for wrong in (probs[:2], np.append(probs, 0.4)):
        with pytest.raises(ValueError, match=r"^ResidualStages probs must hold one survival "
                                             r"probability per block, shape \(3,\)"):
            run(wrong, None)
    with pytest.raises(ValueError, match=r"^ResidualStages gates must hold one gate per "
                                         r"block on their first axis \(3\), got shape \(2,\)"):
        run(probs, jnp.array([True, False]))
    np.testing.assert_array_equal(run(list(probs), None), run(probs, None))  # a list works


@pytest.mark.parametrize("make", [
    lambda: tiny(depth=20), lambda: sdj.WideResNet(depth=10, widen_factor=1, width=4,
                                                    num_classes=3),
    lambda: sdj.ResNet(stage_sizes=(1, 1), width=8, num_classes=3)])
def test_tabulate_summarises_the_models(make):
    """``model.tabulate`` failed with a bare AssertionError from Flax: it records each
    wrapped method call, and the validation methods ran (wrapped) in ``__post_init__``,
    before the module has a scope."""
    model = make()
    table = model.tabulate(jax.random.key(0), X, train=False, depth=1, console_kwargs={
        "width": 200, "force_terminal": False})
    assert type(model).__name__ in table and "stages" in table and "head" in table
