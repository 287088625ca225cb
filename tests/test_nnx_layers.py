"""Native NNX drop path and ViT: they train, and match the Linen modules exactly."""
import dataclasses
import functools
import os
import subprocess
import sys
import types
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import FrozenDict

import stochastic_depth_jax as sdj
from stochastic_depth_jax import nnx_layers, ops, vit
from twins import assert_nnx_matches_linen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X = jax.random.normal(jax.random.key(2), (8, 16, 16, 3))
TINY = dict(size="ti", depth=2, patch_size=4, width=32, num_heads=2, drop_path_rate=0.4)


def _perturbed(params, scale=0.1):
    """Random non-zero parameters (the head starts at zero, which would hide differences)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    return jax.tree.unflatten(
        treedef, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.mark.parametrize("pool, implementation", [("token", "skip"), ("gap", "mask")])
def test_nnx_vit_matches_linen_for_same_params_and_key(pool, implementation):
    linen = vit.ViT(num_classes=5, pool=pool, implementation=implementation, **TINY)
    init = jax.jit(lambda key: linen.init(key, X, train=False))
    params = _perturbed(init(jax.random.key(0))["params"])
    model = nnx_layers.ViT(5, image_size=16, pool=pool, implementation=implementation,
                           rngs=nnx.Rngs(params=1, stochastic_depth=2), **TINY)
    nnx_layers.load_linen_params(model, params)
    assert_nnx_matches_linen(linen, params, model, X)



def test_nnx_wrapper_matches_linen_wrapper():
    class LinenBranch(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.tanh(nn.Dense(3)(x))

    x = X.reshape(8, -1, 3)
    sd_linen = sdj.StochasticDepth(LinenBranch(parent=None), survival_prob=0.5, mode="sample",
                                   scaling="train")
    params = sd_linen.init(jax.random.key(0), x, deterministic=True)["params"]
    dense = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    dense.kernel[...] = params["branch"]["Dense_0"]["kernel"]
    dense.bias[...] = params["branch"]["Dense_0"]["bias"]
    sd_nnx = nnx_layers.StochasticDepth(lambda v: jnp.tanh(dense(v)), 0.5, mode="sample",
                                        scaling="train")
    key = jax.random.key(3)
    gate = ops.draw_gate(key, 0.5, mode="sample", batch_size=8)
    expected = sd_linen.apply({"params": params}, x, deterministic=False, gate=gate)
    np.testing.assert_allclose(sd_nnx(x, rngs=key), expected, rtol=1e-6)
    np.testing.assert_allclose(sd_nnx(x, deterministic=True),
                               sd_linen.apply({"params": params}, x, deterministic=True),
                               rtol=1e-6)


def test_nnx_vit_trains_with_the_stochastic_depth_stream():
    model = nnx_layers.ViT(4, image_size=16, rngs=nnx.Rngs(params=0, stochastic_depth=1),
                           **{**TINY, "drop_path_rate": 0.3})
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
    labels = jnp.arange(8) % 4

    @nnx.jit
    def train_step(model, optimizer):
        def loss_fn(model):
            logits = model(X)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(12)]
    assert losses[-1] < 0.75 * losses[0], losses
    # The stream advances: two training calls drop different examples.
    forward = nnx.jit(lambda m, x: m(x))
    assert not np.allclose(forward(model, X), forward(model, X))
    model.eval()
    np.testing.assert_array_equal(forward(model, X), forward(model, X))


@pytest.mark.parametrize("implementation", ["skip", "mask"])
def test_nnx_batch_mode_keeps_batchnorm_stats_when_dropped(implementation):
    bn_rngs = nnx.Rngs(0)

    class Branch(nnx.Module):
        def __init__(self):
            self.bn = nnx.BatchNorm(3, rngs=bn_rngs)

        def __call__(self, x):
            return self.bn(x)

    x = X.reshape(8, -1, 3) + 1.0
    sd = nnx_layers.StochasticDepth(Branch(), 0.5, mode="batch", implementation=implementation,
                                    rngs=nnx.Rngs(stochastic_depth=0))
    before = np.asarray(sd.branch.bn.mean[...])
    y_closed = sd(x, gate=jnp.bool_(False))
    np.testing.assert_array_equal(y_closed, 0.0)
    np.testing.assert_array_equal(sd.branch.bn.mean[...], before)
    np.testing.assert_array_equal(sd.branch.bn.var[...], 1.0)
    y_open = sd(x, gate=jnp.bool_(True))
    assert np.abs(np.asarray(y_open)).sum() > 0
    assert not np.array_equal(sd.branch.bn.mean[...], before)
    # Gates drawn from keys, also under nnx.jit: a dropping key leaves the statistics as they
    # were, a keeping key updates them.
    gates = {bool(ops.draw_gate(jax.random.key(s), 0.5)): s for s in range(32)}
    forward = nnx.jit(lambda m, v, key: m(v, rngs=key))
    for kept, seed in sorted(gates.items()):
        before = np.asarray(sd.branch.bn.mean[...])
        y = forward(sd, x, jax.random.key(seed))
        assert bool(np.any(np.asarray(y) != 0)) == kept
        assert (not np.array_equal(sd.branch.bn.mean[...], before)) == kept


@pytest.mark.parametrize("mode,implementation,gate", [
    ("batch", "skip", False), ("batch", "skip", True), ("batch", "mask", False),
    ("sample", "mask", [True, False] * 4)])
def test_nnx_gate_at_evaluation_matches_linen(mode, implementation, gate):
    class LinenBranch(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.tanh(nn.Dense(3)(x)) + 1.0

    x = X.reshape(8, -1, 3)
    gate = jnp.asarray(gate)
    sd_linen = sdj.StochasticDepth(LinenBranch(parent=None), survival_prob=0.5, mode=mode,
                                   implementation=implementation)
    params = sd_linen.init(jax.random.key(0), x, deterministic=True)["params"]

    class NnxBranch(nnx.Module):
        def __init__(self):
            self.dense = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
            self.dense.kernel[...] = params["branch"]["Dense_0"]["kernel"]
            self.dense.bias[...] = params["branch"]["Dense_0"]["bias"]

        def __call__(self, v):
            return jnp.tanh(self.dense(v)) + 1.0

    sd_nnx = nnx_layers.StochasticDepth(NnxBranch(), 0.5, mode=mode,
                                        implementation=implementation)
    expected = sd_linen.apply({"params": params}, x, deterministic=True, gate=gate)
    got = sd_nnx(x, deterministic=True, gate=gate)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    closed = ~np.broadcast_to(np.asarray(gate), (8,))
    np.testing.assert_array_equal(np.asarray(got)[closed], 0.0)
    assert np.all(np.asarray(got)[~closed] != 0)


@pytest.mark.parametrize("mode,implementation", [
    ("batch", "skip"), ("batch", "mask"), ("sample", "skip"), ("sample", "mask")])
def test_nnx_plain_function_branch_matches_the_core_op(mode, implementation):
    """A branch that is a plain function (no NNX state) works in every mode, eagerly and
    under ``nnx.jit``, with the core op's values and input gradients for the same key."""
    x = X.reshape(8, -1, 3)

    def branch(v):
        return jnp.tanh(v) * 2.0 + 1.0

    sd = nnx_layers.StochasticDepth(branch, 0.5, mode=mode, implementation=implementation,
                                    scaling="train")
    jitted = nnx.jit(lambda m, v, k: m(v, rngs=k))
    kept = set()
    for seed in range(8):
        key = jax.random.key(seed)
        expected = sdj.stochastic_depth(branch, x, survival_prob=0.5, key=key, mode=mode,
                                        implementation=implementation, scaling="train")
        np.testing.assert_allclose(sd(x, rngs=key), expected, rtol=1e-6)
        # Compiled against eager: XLA's fused tanh may differ in the last bits (jax 0.12.1:
        # 2.4e-7 apart, values of order 1), so an absolute tolerance of the same order.
        np.testing.assert_allclose(jitted(sd, x, key), expected, rtol=1e-6, atol=1e-6)
        grad = jax.grad(lambda v: jnp.sum(sd(v, rngs=key) ** 2))(x)
        want = jax.grad(lambda v: jnp.sum(sdj.stochastic_depth(
            branch, v, survival_prob=0.5, key=key, mode=mode, implementation=implementation,
            scaling="train") ** 2))(x)
        np.testing.assert_allclose(grad, want, rtol=1e-6)
        kept.add(bool(np.any(np.asarray(expected) != 0)))
    assert kept == {True} if mode == "sample" else kept == {True, False}
    np.testing.assert_allclose(sd(x, deterministic=True), branch(x), rtol=1e-6)  # train scaling


def test_drop_path_rate_and_missing_keys_are_clear_errors():
    with pytest.raises(ValueError, match=r"rate must be a float in \[0, 1\)"):
        nnx_layers.DropPath(lambda v: v, 1.0)
    with pytest.raises(ValueError, match="survival_prob must be in"):
        nnx_layers.StochasticDepth(lambda v: v, 0.0)
    sd = nnx_layers.DropPath(lambda v: v + 1.0, 0.5)
    # A model evaluated without model.eval() is told that way out too.
    with pytest.raises(ValueError, match=r"DropPath in training needs rngs: .* \(to evaluate: "
                                         r"model.eval\(\), or deterministic=True\)"):
        sd(X)
    with pytest.raises(ValueError, match="drop_path_rate must be in"):
        nnx_layers.ViT(3, image_size=16, rngs=nnx.Rngs(0), **{**TINY, "drop_path_rate": 1.2})


class _ClosureBlock(nnx.Module):
    """A user's block whose branch is a function closing over its own layers."""

    def __init__(self, rngs, mode="batch", bn=False):
        self.conv = nnx.Conv(3, 3, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(3, rngs=rngs) if bn else None
        self.sd = nnx_layers.StochasticDepth(
            (lambda v: self.bn(self.conv(v))) if bn else (lambda v: self.conv(v)), 0.5,
            mode=mode)

    def __call__(self, x, key):
        return x + self.sd(x, rngs=key)


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_nnx_function_branch_closing_over_modules_is_refused_under_transforms(mode):
    """nnx.grad / nnx.jit copy the wrapper but not what its function branch closes over:
    the closed-over conv's gradient was silently zero (and nnx.jit kept its old values)."""
    block = _ClosureBlock(nnx.Rngs(0), mode)
    key = next(jax.random.key(s) for s in range(32)
               if mode == "sample" or bool(ops.draw_gate(jax.random.key(s), 0.5)))  # kept

    def loss(m):
        return jnp.sum(m(X, key) ** 2)

    assert block(X, key).shape == X.shape  # eagerly, outside any transform: it runs
    for transform in (nnx.grad(loss), nnx.jit(nnx.grad(loss))):
        with pytest.raises(ValueError, match=r"function that uses NNX state \(Conv\) made "
                                             r"outside the NNX transform.*nnx.Sequential"):
            transform(block)

    # Built inside the transform, the function sees the transform's copy: no error, and
    # the gradient is the one of the same block with a Module branch.
    class OnTheFly(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 3, (3, 3), rngs=rngs)

        def __call__(self, x, key):
            return x + nnx_layers.StochasticDepth(lambda v: self.conv(v), 0.5, mode=mode)(
                x, rngs=key)

    class AsModule(nnx.Module):
        def __init__(self, rngs):
            self.sd = nnx_layers.StochasticDepth(nnx.Sequential(nnx.Conv(3, 3, (3, 3),
                                                                         rngs=rngs)),
                                                 0.5, mode=mode)

        def __call__(self, x, key):
            return x + self.sd(x, rngs=key)

    got = nnx.jit(nnx.grad(loss))(OnTheFly(nnx.Rngs(0)))["conv"]["kernel"][...]
    want = nnx.jit(nnx.grad(loss))(AsModule(nnx.Rngs(0)))["sd"]["branch"]["layers"][0]
    assert float(jnp.abs(got).sum()) > 0
    want = want["kernel"][...]  # computed by the rerouted conv, `got` by XLA's: rounding
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))
    # The original wrapper under a plain JAX transform (a gradient for the input only)
    # computes with the layers' values as intended: not refused.
    grad_x = jax.grad(lambda v: jnp.sum(block(v, key) ** 2))(X)
    assert float(jnp.abs(grad_x).sum()) > 0


@pytest.mark.parametrize("implementation", ["skip", "mask"])
def test_nnx_function_branch_with_batchnorm_in_batch_mode_is_refused(implementation):
    """'skip' failed with NNX's "Cannot mutate BatchStat from a different trace level";
    'mask' updated the statistics of dropped blocks."""
    block = _ClosureBlock(nnx.Rngs(0), "batch", bn=True)
    block.sd.implementation = implementation
    dropped = next(jax.random.key(s) for s in range(32)
                   if not bool(ops.draw_gate(jax.random.key(s), 0.5)))
    with pytest.raises(ValueError, match=r"uses NNX modules with running state "
                                         r"\(BatchNorm\).*nnx.Module"):
        block(X, dropped)
    np.testing.assert_array_equal(block.bn.mean[...], 0.0)
    # Evaluation and per-example subsets (the branch runs on the kept examples) still run.
    assert block.sd(X, deterministic=True).shape == X.shape
    sample = _ClosureBlock(nnx.Rngs(0), "sample", bn=True)
    assert sample(X, dropped).shape == X.shape


def test_nnx_call_time_rngs_mistakes_are_one_line_errors():
    sd = nnx_layers.StochasticDepth(lambda v: v + 1.0, 0.5)
    with pytest.raises(TypeError, match=r"one key, not a dict of streams \(Linen's apply "
                                        r"form\): pass rngs=key"):
        sd(X, rngs={"stochastic_depth": jax.random.key(0)})
    # Keys split per layer but broadcast (not scanned over) reached jax's "bernoulli accepts
    # a single key, but was given a key array of shape (4,)".
    for keys in (jax.random.split(jax.random.key(0), 4),
                 jax.random.split(jax.random.PRNGKey(0), 4)):
        with pytest.raises(TypeError, match=r"one PRNG key, got 4 keys .*in_axes=0"):
            sd(X, rngs=keys)
    for bad in ({"stochastic_depth": jax.random.key(0)}, jnp.ones((3, 3)),
                jax.random.split(jax.random.key(0), 4),
                list(jax.random.split(jax.random.key(0), 2)), (jax.random.key(0),)):
        with pytest.raises(TypeError) as info:
            sd(X, rngs=bad)
        assert "\n" not in str(info.value)  # an array's repr spans lines
    with pytest.raises(TypeError, match=r"PRNG key \(jax.random.key\(seed\)\), got a list of 2\.$"):
        sd(X, rngs=list(jax.random.split(jax.random.key(0), 2)))
    assert sd(X, rngs=jax.random.PRNGKey(1)).shape == X.shape


def test_nnx_model_saved_and_restored_with_orbax_resumes_the_same_gates(tmp_path):
    """Parameters, BatchNorm statistics and the gate stream's position survive an Orbax round
    trip: the restored model draws the gates the original draws next."""
    import orbax.checkpoint as ocp

    class Branch(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 3, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(3, rngs=rngs)

        def __call__(self, v):
            return nnx.relu(self.bn(self.conv(v)))

    def build(seed):
        rngs = nnx.Rngs(params=seed, stochastic_depth=seed + 1)
        return nnx_layers.StochasticDepth(Branch(rngs), 0.5, rngs=rngs)

    model = build(0)
    forward = nnx.jit(lambda m, v: m(v, shortcut=v))
    for _ in range(3):
        forward(model, X)  # advances the stream, updates the statistics of kept steps
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", nnx.state(model))
    checkpointer.wait_until_finished()
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(7)))
    restored = nnx.merge(graphdef, checkpointer.restore(tmp_path / "ckpt", abstract))
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Not(nnx.RngKey))),
                    jax.tree.leaves(nnx.state(restored, nnx.Not(nnx.RngKey)))):
        np.testing.assert_array_equal(a, b)
    outs = [(forward(model, X), forward(restored, X)) for _ in range(6)]
    kept = [bool(np.any(np.asarray(a) != np.asarray(X))) for a, _ in outs]
    assert len(set(kept)) == 2  # both kept and dropped steps were compared
    for a, b in outs:
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.branch.bn.mean[...], restored.branch.bn.mean[...])


@pytest.mark.parametrize("wrap", ["remat", "cond", "vmap"])
def test_nnx_function_branch_built_in_call_runs_inside_an_inner_nnx_transform(wrap):
    """A function built in __call__ whose wrapper then runs in nnx.remat / nnx.cond /
    nnx.vmap uses the layers of the enclosing nnx.jit / nnx.grad (traced values JAX closes
    over correctly): it was refused as if the layers came from outside every transform."""
    key = next(jax.random.key(s) for s in range(32)
               if bool(ops.draw_gate(jax.random.key(s), 0.5)))  # kept

    class Block(nnx.Module):
        def __init__(self, rngs, function):
            self.conv = nnx.Conv(3, 3, (3, 3), rngs=rngs)
            self.function = function

        def __call__(self, x):
            sd = nnx_layers.StochasticDepth(
                (lambda v: self.conv(v)) if self.function else nnx.Sequential(self.conv), 0.5)
            call = lambda s, v: s(v, rngs=key)  # noqa: E731
            if wrap == "remat":
                return x + nnx.remat(call)(sd, x)
            if wrap == "cond":
                return x + nnx.cond(True, call, lambda s, v: v, sd, x)
            return x + nnx.vmap(call, in_axes=(None, 0))(sd, x[None])[0]

    step = nnx.jit(nnx.grad(lambda m: jnp.sum(m(X) ** 2)))
    got = step(Block(nnx.Rngs(0), True))["conv"]["kernel"][...]
    want = step(Block(nnx.Rngs(0), False))["conv"]["kernel"][...]
    assert float(jnp.abs(want).sum()) > 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("implementation", ["skip", "mask"])
def test_nnx_function_branch_with_a_frozen_batchnorm_trains_in_batch_mode(implementation):
    """A BatchNorm with use_running_average=True (frozen, as in fine-tuning) never updates:
    a function branch using it was refused as if a dropped block would update it."""
    class Block(nnx.Module):
        def __init__(self, rngs, function):
            self.conv = nnx.Conv(3, 3, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(3, use_running_average=True, rngs=rngs)
            self.bn.mean[...] = jnp.full((3,), 0.5)
            branch = (lambda v: self.bn(self.conv(v))) if function else nnx.Sequential(
                self.conv, self.bn)
            self.sd = nnx_layers.StochasticDepth(branch, 0.5, implementation=implementation)

        def __call__(self, x, key):
            return x + self.sd(x, rngs=key)

    for seed in range(4):  # kept and dropped gates
        key = jax.random.key(seed)
        got = Block(nnx.Rngs(0), True)(X, key)
        np.testing.assert_allclose(got, Block(nnx.Rngs(0), False)(X, key), rtol=1e-6)
    assert len({bool(ops.draw_gate(jax.random.key(s), 0.5)) for s in range(4)}) == 2


def _block_over(branch, key):
    """A module holding a conv whose StochasticDepth wraps ``branch(self.conv)``, made in
    ``__init__`` or, with ``in_call``, in ``__call__`` (from the layers nnx.jit passes in)."""

    class Block(nnx.Module):
        def __init__(self, rngs, in_call=False):
            self.conv = nnx.Conv(3, 3, (3, 3), rngs=rngs)
            self.in_call = in_call
            self.sd = None if in_call else nnx_layers.StochasticDepth(branch(self.conv), 0.5)

        def __call__(self, x):
            sd = nnx_layers.StochasticDepth(branch(self.conv), 0.5) if self.in_call else self.sd
            return x + sd(x, rngs=key)

    return Block


@pytest.mark.parametrize("kind", ["partial", "checkpoint", "made_by_a_function", "nnx_remat",
                                  "nnx_remat_of_the_module"])
def test_nnx_function_branch_wrapping_outside_layers_is_refused_under_transforms(kind):
    """functools.partial(self.conv), jax.checkpoint(lambda v: self.conv(v)) and a function
    made by another closing over the layers got a zero gradient silently: only a function's
    own closure was read. So did nnx.remat(lambda v: self.conv(v)) and nnx.remat(self.conv):
    the six wrappers nnx.remat stacks hid the function beyond the depth read."""
    key = next(jax.random.key(s) for s in range(32)
               if bool(ops.draw_gate(jax.random.key(s), 0.5)))  # kept

    def branch(conv):
        if kind == "partial":
            return functools.partial(conv)
        if kind == "checkpoint":
            return jax.checkpoint(lambda v: conv(v))
        if kind == "nnx_remat":
            return nnx.remat(lambda v: conv(v))
        if kind == "nnx_remat_of_the_module":
            return nnx.remat(conv)
        return (lambda f: (lambda v: jnp.tanh(f(v))))(lambda v: conv(v))

    Block = _block_over(branch, key)

    step = nnx.jit(nnx.grad(lambda m: jnp.sum(m(X) ** 2)))
    with pytest.raises(ValueError, match=r"uses NNX state \(Conv\) made outside the NNX"):
        step(Block(nnx.Rngs(0), False))
    # Built in __call__ (the layers nnx.jit passes in): runs, with a non-zero gradient.
    assert float(jnp.abs(step(Block(nnx.Rngs(0), True))["conv"]["kernel"][...]).sum()) > 0


@pytest.mark.parametrize("frozen", ["diff_state", "variable"])
def test_nnx_function_branch_over_a_frozen_outside_layer_names_the_module_fix(frozen):
    """A frozen pretrained layer closed over by a function branch (left out by nnx.grad's
    DiffState, or held as nnx.Variable) was refused with "gradients would be zero", which
    reads as wrong for it. It is still refused (nnx.jit compiles its values in: weights
    loaded after the first step never reach it, and which state a filter leaves out cannot
    be told); the line now says so and names the fix for frozen layers, which works."""
    key = next(jax.random.key(s) for s in range(32)
               if bool(ops.draw_gate(jax.random.key(s), 0.5)))  # kept

    class Model(nnx.Module):
        def __init__(self, rngs, function):
            self.backbone = nnx.Conv(3, 3, (3, 3), rngs=rngs)
            if frozen == "variable":
                self.backbone.kernel = nnx.Variable(self.backbone.kernel[...])
                self.backbone.bias = nnx.Variable(self.backbone.bias[...])
            self.head = nnx.Conv(3, 3, (1, 1), rngs=rngs)
            # The fix: the frozen layer itself as the branch (shared with self.backbone).
            branch = (lambda v: self.backbone(v)) if function else self.backbone
            self.sd = nnx_layers.StochasticDepth(branch, 0.5)

        def __call__(self, x):
            return self.head(x + self.sd(x, rngs=key))

    trained = nnx.All(nnx.Param, nnx.PathContains("head"))
    step = nnx.jit(nnx.grad(lambda m: jnp.sum(m(X) ** 2), argnums=nnx.DiffState(0, trained)))
    with pytest.raises(ValueError, match=r"^StochasticDepth's branch .* \(Conv\) made outside.*"
                                         r"frozen layers too: weights loaded later would not "
                                         r"reach them.*frozen layers as well, kept out of "
                                         r"training by nnx.grad's filter \(argnums=nnx.DiffState"):
        step(Model(nnx.Rngs(0), True))
    model = Model(nnx.Rngs(0), False)
    grads = step(model)
    assert set(grads) == {"head"}
    model.backbone.kernel[...] = 3 * model.backbone.kernel[...]  # "pretrained", loaded late
    loaded = nnx.Conv(3, 3, (3, 3), rngs=nnx.Rngs(0))
    loaded.kernel[...] = model.backbone.kernel[...]
    loaded.bias[...] = model.backbone.bias[...]

    def want(head):
        return jnp.sum(head(X + loaded(X)) ** 2)

    np.testing.assert_allclose(step(model)["head"]["kernel"][...],
                               nnx.grad(want)(model.head)["kernel"][...], rtol=1e-5)


def _your_decorator(f):
    """A user's own pass-through decorator (as for logging or timing)."""
    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        return f(*args, **kwargs)
    return wrapped


def _reaching_itself(conv):
    """A function whose closure holds itself (it names itself): a cycle to walk once."""
    def f(v, again=False):
        return f(v) if again else conv(v)
    return f


class _Helper:
    """A plain class of the user's with __call__, holding a layer."""

    def __init__(self, conv):
        self.conv = conv

    def __call__(self, v):
        return self.conv(v)

    def forward(self, v):
        return jnp.tanh(self.conv(v))


@pytest.mark.parametrize("levels", [5, 8, "cycle", "global_helper", "callable_object",
                                    "method_of_a_helper", "default_argument",
                                    "keyword_default", "list", "dict"])
def test_nnx_function_branch_under_many_user_decorators_is_still_refused(levels):
    """A function branch reached through more than 4 levels of the user's own functions (5
    nested functools.wraps decorators) was not read: the closed-over conv, made outside
    nnx.jit, got a zero gradient silently; so did one read through a global helper, or a
    callable object the function calls, a method of a plain object (helper.forward), or a
    default argument (lambda v, conv=conv: conv(v), as written in a loop), or a plain list
    or dict of layers (lambda v: layers[0](v)).
    Functions and such objects are read to any depth now, each once (a function whose
    closure holds itself is no loop)."""
    key = next(jax.random.key(s) for s in range(32)
               if bool(ops.draw_gate(jax.random.key(s), 0.5)))  # kept

    def branch(conv):
        if levels == "cycle":
            return _reaching_itself(conv)
        if levels == "global_helper":
            return lambda v: _stem_helper(v)
        if levels == "callable_object":
            helper = _Helper(conv)
            return lambda v: jnp.tanh(helper(v))
        if levels == "method_of_a_helper":
            return _Helper(conv).forward
        if levels == "default_argument":
            return lambda v, layer=conv: layer(v)
        if levels == "keyword_default":
            return lambda v, *, layer=conv: layer(v)
        if levels == "list":
            layers = [jnp.tanh, (conv,)]
            return lambda v: layers[1][0](layers[0](v))
        if levels == "dict":
            named = {"conv": conv}
            return lambda v: named["conv"](v)
        f = lambda v: conv(v)  # noqa: E731
        for _ in range(levels):
            f = _your_decorator(f)
        return f

    Block = _block_over(branch, key)

    block = Block(nnx.Rngs(0))
    assert block(X).shape == X.shape  # eagerly it runs (nothing to copy)
    step = nnx.jit(nnx.grad(lambda m: jnp.sum(m(X) ** 2)))
    with pytest.raises(ValueError, match=r"^StochasticDepth's branch is a function that "
                                         r"uses NNX state \(Conv\) made outside"):
        step(block)
    if levels != "global_helper":  # built in __call__ (nnx.jit's layers): it trains
        assert float(jnp.abs(step(Block(nnx.Rngs(0), True))["conv"]["kernel"][...]).sum()) > 0


def test_nnx_function_branch_passes_over_plain_values_it_closes_over():
    """A function branch closing over a lookup table (a list of numbers, strings, arrays)
    had every item read as an object that might hold layers (a list of a million numbers:
    seconds each call, eagerly too): plain values are passed over; a layer among them is
    still found."""
    conv = nnx.Conv(3, 3, (3, 3), rngs=nnx.Rngs(0))
    table = list(range(10_000)) + [0.5, "name", None, np.ones(2), np.float32(1), jnp.ones(2)]
    assert nnx_layers._function_parts(lambda v: v * table[3]) == []
    with_a_layer = table + [conv]
    assert nnx_layers._used_nnx_state(lambda v: with_a_layer[-1](v)) == [conv]


def _training_step_or_refusal(branch):
    """A block over ``branch(conv)`` (built in __init__), one nnx.jit(nnx.grad) step: the
    conv's gradient, or the wrapper's refusal."""
    key = next(jax.random.key(s) for s in range(32)
               if bool(ops.draw_gate(jax.random.key(s), 0.5)))  # kept

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 3, (3, 3), rngs=rngs)
            self.sd = nnx_layers.StochasticDepth(branch(self.conv), 0.5)

        def __call__(self, x):
            return self.sd(self.conv(x), rngs=key)

    return nnx.jit(nnx.grad(lambda m: jnp.sum(m(X) ** 2)))(Block(nnx.Rngs(0)))


class _Slotted:
    """A plain holder with ``__slots__`` (no ``__dict__``)."""
    __slots__ = ("conv", "scale")

    def __init__(self, conv, scale=0.5):
        self.conv, self.scale = conv, scale


@dataclasses.dataclass
class _Layers:
    conv: nnx.Conv


@dataclasses.dataclass(slots=True)
class _SlottedLayers:
    conv: nnx.Conv


@pytest.mark.parametrize("holder", ["namespace", "dataclass", "slots", "slots_dataclass",
                                    "frozen_dict", "mapping_proxy"])
def test_nnx_function_branch_over_layers_in_a_plain_holder_is_refused(holder):
    """lambda v: layers.conv(v), ``layers`` a SimpleNamespace or a dataclass of outside
    layers, trained them with a zero gradient under nnx.jit/nnx.grad, without a word: the
    attributes the code names of a plain object are read as if closed over themselves.
    So did a holder with __slots__ (no __dict__ to read) and Flax's FrozenDict or another
    mapping that is not a dict (its items were not read)."""
    def branch(conv):
        if holder in ("frozen_dict", "mapping_proxy"):
            held = {"conv": conv}
            held = FrozenDict(held) if holder == "frozen_dict" else types.MappingProxyType(held)
            return lambda v: jnp.tanh(held["conv"](v))
        layers = {"namespace": types.SimpleNamespace, "dataclass": _Layers, "slots": _Slotted,
                  "slots_dataclass": _SlottedLayers}[holder](conv=conv)
        return lambda v: jnp.tanh(layers.conv(v))

    with pytest.raises(ValueError, match=r"^StochasticDepth's branch is a function that "
                                         r"uses NNX state \(Conv\) made outside"):
        _training_step_or_refusal(branch)


class _Settings:
    """A plain object of the user's holding a model it reads settings from."""

    def __init__(self, model):
        self.model, self.scale = model, 0.5

    def act(self, v):
        return jnp.tanh(v) * self.scale if self.model.use_tanh else v

    def __call__(self, v):
        return self.act(v) if self.model.use_tanh else v


@pytest.mark.parametrize("holder", ["slots", "frozen_dict"])
def test_nnx_function_branch_over_settings_in_a_slotted_holder_or_frozen_dict_trains(holder):
    """A holder with __slots__ or a FrozenDict (whose attributes and items are read now)
    refuses nothing it holds that is not NNX state: plain settings, and an outside module
    read for a setting only."""
    outside = nnx.Linear(3, 3, rngs=nnx.Rngs(1))
    outside.use_tanh = True
    slotted, frozen = _Slotted(outside, scale=0.5), FrozenDict(scale=0.5, act="tanh", n=(1,))

    def step(v):
        if holder == "slots":
            return jnp.tanh(v) * slotted.scale if slotted.conv.use_tanh else v
        return getattr(jnp, frozen["act"])(v) * frozen["scale"]

    grads = _training_step_or_refusal(lambda conv: step)
    assert float(jnp.abs(grads["conv"]["kernel"][...]).sum()) > 0


@pytest.mark.parametrize("how", ["method", "callable_object"])
def test_nnx_function_branch_reading_a_setting_of_an_outside_module_trains(how):
    """A plain object's method (settings.act) or __call__ reading a Python setting of an
    outside module (self.model.use_tanh), not its state, was refused as using that module's
    state: the object's attributes are read through the names its code reads, as a module
    closed over directly is."""
    outside = nnx.Linear(3, 3, rngs=nnx.Rngs(1))
    outside.use_tanh = True
    settings = _Settings(outside)
    grads = _training_step_or_refusal(
        lambda conv: settings.act if how == "method" else settings)
    assert float(jnp.abs(grads["conv"]["kernel"][...]).sum()) > 0


def test_nnx_wrapper_called_eagerly_does_not_walk_its_graph(monkeypatch):
    """Every call walked the wrapper's graph first (~1 ms eagerly, where a failed call has
    no other trace level to name): the walk is taken under a transform only, where the
    refusals it serves still name the wrapper (test_api_errors)."""
    walks = []
    walk = nnx_layers._trace_states
    monkeypatch.setattr(nnx_layers, "_trace_states", lambda node: walks.append(node) or
                        walk(node))
    sd = nnx_layers.StochasticDepth(nnx.Sequential(nnx.Linear(3, 3, rngs=nnx.Rngs(0))), 0.5,
                                    rngs=nnx.Rngs(stochastic_depth=1))
    x = X.reshape(-1, 3)
    for deterministic in (False, True):
        sd(x, deterministic=deterministic)
    assert walks == []
    nnx.jit(lambda m: m(x))(sd)
    assert walks  # under a transform: taken


_IMPORTED_UNDER_JIT = """
import jax
from flax import nnx


def lazy(x):
    import stochastic_depth_jax  # noqa: F401  the first import, under a trace
    return x


jax.jit(lazy)(1.0)
from stochastic_depth_jax import conv, nnx_layers  # noqa: E402
walks, reads = [], []
walk, read = nnx_layers._trace_states, conv._call_tree
nnx_layers._trace_states = lambda node: walks.append(node) or walk(node)
conv._call_tree = lambda args, kwargs: reads.append(args) or read(args, kwargs)
sd = nnx_layers.StochasticDepth(nnx.Sequential(nnx.Linear(3, 3, rngs=nnx.Rngs(0))), 0.5,
                                rngs=nnx.Rngs(stochastic_depth=1))
for deterministic in (False, True):
    sd(jax.numpy.ones((4, 3)), deterministic=deterministic)
eager = (len(walks), len(reads))
nnx.jit(lambda m: m(jax.numpy.ones((4, 3))))(sd)
print(eager, len(walks) > 0, len(reads) > 0)
"""


def test_nnx_wrapper_imported_under_a_trace_still_walks_nothing_eagerly():
    """The package first imported inside a jitted function (a lazy import) took that trace
    for the eager one: every eager call then walked the wrapper's graph and read its state
    (~1 ms each, as under a transform). The eager trace is taken in a new thread."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _IMPORTED_UNDER_JIT], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "(0, 0) True True"  # walked under nnx.jit only


# A layer among the module's globals (as a notebook's), named as the block's attribute below.
stem = nnx.Conv(3, 3, (3, 3), rngs=nnx.Rngs(7))


def _stem_helper(v):
    """A global helper of the user's over the global layer."""
    return jnp.tanh(stem(v))


@pytest.mark.parametrize("reads_global", [False, True])
def test_nnx_function_branch_reading_an_attribute_named_as_a_global_layer(reads_global):
    """lambda v: self.stem(v), built in __call__ under nnx.jit, was refused ("made outside the
    NNX transform it runs in") when the module's globals held a layer named stem: the names
    a function reads as attributes were taken for globals it reads. A function reading the
    global layer itself is still refused."""
    key = next(jax.random.key(s) for s in range(32)
               if bool(ops.draw_gate(jax.random.key(s), 0.5)))  # kept

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.stem = nnx.Conv(3, 3, (3, 3), rngs=rngs)

        def __call__(self, x):
            branch = (lambda v: stem(v)) if reads_global else (lambda v: self.stem(v))
            return x + nnx_layers.StochasticDepth(branch, 0.5)(x, rngs=key)

    step = nnx.jit(nnx.grad(lambda m: jnp.sum(m(X) ** 2)))
    if reads_global:
        with pytest.raises(ValueError, match=r"^StochasticDepth's branch is a function that "
                                             r"uses NNX state \(Conv\) made outside"):
            step(Block(nnx.Rngs(0)))
    else:
        assert float(jnp.abs(step(Block(nnx.Rngs(0)))["stem"]["kernel"][...]).sum()) > 0


@pytest.mark.parametrize("built_in_call", [False, True])
def test_nnx_branch_that_is_a_callable_object_holding_outside_layers_is_refused(built_in_call):
    """An instance of a plain class with __call__ (not an nnx.Module) holding self.conv,
    built in __init__, got a zero gradient under nnx.jit silently: only functions, partials
    and modules were read. Built in __call__ (nnx.jit's layers) it trains, rerouted."""
    key = next(jax.random.key(s) for s in range(32)
               if bool(ops.draw_gate(jax.random.key(s), 0.5)))  # kept

    class Branch:
        def __init__(self, conv):
            self.conv = conv

        def __call__(self, v):
            return jnp.tanh(self.conv(v))

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 3, (3, 3), rngs=rngs)
            self.sd = nnx_layers.StochasticDepth(Branch(self.conv), 0.5)

        def __call__(self, x):
            sd = (nnx_layers.StochasticDepth(Branch(self.conv), 0.5, reroute_convs="always")
                  if built_in_call else self.sd)
            return x + sd(x, rngs=key)

    step = nnx.jit(nnx.grad(lambda m: jnp.sum(m(X) ** 2)))
    if not built_in_call:  # named as what it is (was "is a function")
        with pytest.raises(ValueError, match=r"^StochasticDepth's branch is an object of "
                                             r"class Branch \(not an nnx.Module\) that "
                                             r"uses NNX state \(Conv\) made outside"):
            step(Block(nnx.Rngs(0)))
        return
    model = Block(nnx.Rngs(0))
    jaxpr = str(jax.make_jaxpr(lambda x: nnx.merge(*nnx.split(model))(x))(X))
    assert "custom_vjp" in jaxpr  # the conv it holds is rerouted, as a Module branch's
    assert float(jnp.abs(step(model)["conv"]["kernel"][...]).sum()) > 0


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_vit_qkv_kernel_starts_as_the_original_s_three_xavier_kernels(api):
    """The original JAX ViT (Flax's ``MultiHeadDotProductAttention`` with Xavier-uniform
    kernels) draws q, k and v as three ``[width, width]`` kernels, U(+-sqrt(3 / width)).
    Ours is one fused ``[width, 3 * width]`` Dense: Xavier over it counted a fan-out of
    ``3 * width``, U(+-sqrt(1.5 / width)), every qkv weight 1/sqrt(2) of the original's."""
    width = 96
    kw = dict(size="ti", patch_size=4, width=width, depth=2, num_heads=2)
    if api == "linen":
        params = vit.ViT(10, **kw).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                                        train=False)["params"]
        blocks = [params[f"blocks_{i}"]["attn"]["branch"]["attn"] for i in range(2)]
        kernels = [b["qkv"]["kernel"] for b in blocks]
    else:
        model = nnx_layers.ViT(10, **kw, image_size=16, rngs=nnx.Rngs(params=0))
        kernels = [b.attn.branch.attn.qkv.kernel[...] for b in model.blocks]
    reference = nn.MultiHeadDotProductAttention(
        2, kernel_init=nn.initializers.xavier_uniform()).init(
            jax.random.key(1), jnp.zeros((1, 4, width)), jnp.zeros((1, 4, width)))["params"]
    bound = np.sqrt(3.0 / width)  # the original's q, k and v alike
    assert np.abs(reference["query"]["kernel"]).max() == pytest.approx(bound, rel=0.01)
    for part in range(3):  # q, k, v: the fused kernel's column thirds (attend's layout)
        drawn = np.concatenate([np.ravel(k[:, part * width:(part + 1) * width])
                                for k in kernels])
        assert np.abs(drawn).max() <= bound * (1 + 1e-6)
        assert np.abs(drawn).max() == pytest.approx(bound, rel=0.01)
        assert np.std(drawn) == pytest.approx(bound / np.sqrt(3.0), rel=0.03)
    proj = (model.blocks[0].attn.branch.attn.proj.kernel[...] if api == "nnx"
            else blocks[0]["proj"]["kernel"])
    assert np.abs(proj).max() == pytest.approx(bound, rel=0.01)  # [width, width]: unchanged


_BY_ATTRIBUTE = {
    "value": lambda conv: lambda v: v @ conv.kernel.value[1, 1],
    "index": lambda conv: lambda v: v @ conv.kernel[...][1, 1],
    "lax_conv": lambda conv: lambda v: jax.lax.conv_general_dilated(
        v, conv.kernel[...], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
}


@pytest.mark.parametrize("how", sorted(_BY_ATTRIBUTE))
def test_nnx_function_branch_using_an_outside_layer_s_kernel_is_refused(how):
    """lambda v: v @ conv.kernel.value (or conv.kernel[...], or the kernel given to
    jax.lax.conv), conv built in __init__, failed under nnx.jit/nnx.grad with an IndexError
    from inside NNX (the wrapper took nnx.state of the Param it found): refused in one line
    like a closed-over layer. Built in __call__ (nnx.jit's layers) it trains."""
    key = next(jax.random.key(s) for s in range(32)
               if bool(ops.draw_gate(jax.random.key(s), 0.5)))  # kept

    class Block(nnx.Module):
        def __init__(self, rngs, in_call):
            self.conv, self.in_call = nnx.Conv(3, 3, (3, 3), rngs=rngs), in_call
            self.sd = nnx_layers.StochasticDepth(_BY_ATTRIBUTE[how](self.conv), 0.5)

        def __call__(self, x):
            sd = (nnx_layers.StochasticDepth(_BY_ATTRIBUTE[how](self.conv), 0.5)
                  if self.in_call else self.sd)
            return x + sd(x, rngs=key)

    assert Block(nnx.Rngs(0), False)(X).shape == X.shape  # eagerly: it runs
    step = nnx.jit(nnx.grad(lambda m: jnp.sum(m(X) ** 2)))
    with pytest.raises(ValueError, match=r"^StochasticDepth's branch is a function that "
                                         r"uses NNX state \(Param\) made outside"):
        step(Block(nnx.Rngs(0), False))
    assert float(jnp.abs(step(Block(nnx.Rngs(0), True))["conv"]["kernel"][...]).sum()) > 0


def test_nnx_drop_path_takes_the_drop_rate_and_scales_inverted_by_default():
    # DropPath(rate=r) is StochasticDepth(1 - r, mode='sample', scaling='train'): the same
    # rows, the same 1 / p, from the same key.
    x = X.reshape(8, -1, 3)
    dense = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    dp = nnx_layers.DropPath(dense, 0.25)
    sd = nnx_layers.StochasticDepth(dense, 0.75, mode="sample", scaling="train")
    f = dense(x)
    for seed in range(3):
        y = dp(x, rngs=jax.random.key(seed))
        np.testing.assert_allclose(y, sd(x, rngs=jax.random.key(seed)), rtol=1e-6)
        kept = np.array([not np.allclose(row, 0.0) for row in y])
        assert kept.sum() == 6
        np.testing.assert_allclose(y[kept], f[kept] / 0.75, rtol=1e-5)
    np.testing.assert_allclose(dp(x, deterministic=True), f, rtol=1e-6)


def _tiny_linen_params():
    linen = vit.ViT(num_classes=5, **TINY)
    return jax.jit(lambda key: linen.init(key, X, train=False))(jax.random.key(0))["params"]


def test_load_linen_params_refuses_other_shapes_or_extra_parameters_and_copies_nothing():
    params = _tiny_linen_params()
    for kw, message in (({"mlp_ratio": 2}, "NNX shape"),
                        ({"layer_scale_init": 1e-6}, "has parameters the Linen model lacks")):
        model = nnx_layers.ViT(5, image_size=16, rngs=nnx.Rngs(params=1), **TINY, **kw)
        before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
        with pytest.raises(ValueError, match=message):
            nnx_layers.load_linen_params(model, params)
        jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), before)
    # layer_scale_init=0 is no layer scale, as in Linen: nothing extra, the load works.
    model = nnx_layers.ViT(5, image_size=16, rngs=nnx.Rngs(params=1), layer_scale_init=0.0,
                           **TINY)
    nnx_layers.load_linen_params(model, params)
    np.testing.assert_array_equal(model.pos_embed[...], params["pos_embed"])
