"""The op, the Linen wrapper and a library block inside ``jax.shard_map`` (8 CPU devices): each
device runs its shard as the same code would alone, with the gates its key gives; a library
ResNet whose BatchNorm averages over the mapped axis trains as under ``jit``."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import stochastic_depth_jax as sdj

DEVICES = 8
B, D = 2 * DEVICES, 4
X = jax.random.normal(jax.random.key(0), (B, D))
W = jax.random.normal(jax.random.key(1), (D, D))


def _mesh():
    assert jax.device_count() == DEVICES
    return jax.make_mesh((DEVICES,), ("data",), axis_types=(AxisType.Auto,))


def _keys(local, *args):
    """A key that opens the batch-mode gate of ``local(X, *args, key)`` and one that closes it."""
    keys = {}
    for seed in range(32):
        key = jax.random.key(seed)
        keys.setdefault(bool(jnp.any(local(X, *args, key) != X)), key)
    return keys


def _per_shard(local, x, *args):
    """``local`` on each device's shard of ``x`` alone, concatenated: what shard_map computes."""
    return jnp.concatenate([local(s, *args) for s in jnp.split(x, DEVICES)])


def _loss(local, mapped):
    """Sum of squares of ``local`` over the batch, in shard_map (``mapped``) or shard by shard;
    its gradient with respect to the replicated weights is summed over the devices."""
    if mapped:
        fn = jax.shard_map(local, mesh=_mesh(), in_specs=(P("data"), P(), P()),
                           out_specs=P("data"))
    else:
        fn = lambda x, w, key: _per_shard(local, x, w, key)  # noqa: E731
    return jax.jit(jax.value_and_grad(lambda x, w, key: jnp.sum(fn(x, w, key) ** 2),
                                      argnums=(0, 1)))


def _close(got, want):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 got, want)


def _op(x, w, key, fold=False, **opts):
    if fold:  # a gate per device
        key = jax.random.fold_in(key, jax.lax.axis_index("data"))
    return sdj.stochastic_depth(lambda v: jnp.tanh(v @ w), x, survival_prob=0.5, key=key,
                                shortcut=x, **opts)


class Branch(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(D)(x))


SD = sdj.StochasticDepth(Branch(parent=None), survival_prob=0.5)


def _linen(x, w, key):
    params = {"branch": {"Dense_0": {"kernel": w, "bias": jnp.zeros((D,))}}}
    return SD.apply({"params": params}, x, deterministic=False, shortcut=x,
                    rngs={"stochastic_depth": key})


@pytest.mark.parametrize("open_", [True, False])
@pytest.mark.parametrize("local", [_op, _linen], ids=["op", "linen"])
def test_batch_mode_skipping_inside_shard_map_matches_each_shard_alone(local, open_):
    # One key for every device: one gate, the same everywhere, and the branch skipped (or run)
    # on every device. The skipped side's zeros must vary over the mesh axis as the branch's
    # output does, or the cond's two sides differ in type.
    key = _keys(local, W)[open_]
    got = _loss(local, mapped=True)(X, W, key)
    _close(got, _loss(local, mapped=False)(X, W, key))
    assert np.any(np.asarray(got[1][1]) != 0) == open_  # a closed gate: no weight gradient


class StatelessNorm(nn.Module):
    """A norm without running statistics (the library's BatchNorm without ``axis_name`` would
    differ by device)."""

    dtype: object = None
    scale_init: object = None

    @nn.compact
    def __call__(self, x, *, train):
        return nn.LayerNorm(dtype=self.dtype)(x)


@pytest.mark.parametrize("open_", [True, False])
def test_a_library_block_skips_inside_shard_map(open_):
    # The library's branches declare their output (output_struct), which must say it varies
    # over the mesh axis as the input does.
    block = sdj.BasicBlock(4, norm=StatelessNorm)
    x = jax.random.normal(jax.random.key(3), (B, 4, 4, 4))
    variables = block.init(jax.random.key(4), x, 0.5, train=False)

    def local(x, key):
        return block.apply(variables, x, 0.5, train=True, rngs={"stochastic_depth": key})

    keys = {}
    for seed in range(32):  # a closed gate leaves relu(x)
        key = jax.random.key(seed)
        keys.setdefault(bool(jnp.any(local(x, key) != jax.nn.relu(x))), key)
    key = keys[open_]
    mapped = jax.shard_map(local, mesh=_mesh(), in_specs=(P("data"), P()), out_specs=P("data"))
    _close(jax.jit(mapped)(x, key), _per_shard(local, x, key))


def test_a_library_block_with_batchnorm_masks_inside_shard_map():
    # Each device's BatchNorm statistics differ, which a skipping cond's closed side cannot
    # match; 'mask' runs the block, normalising each shard as it would alone.
    block = sdj.BasicBlock(4, implementation="mask")
    x = jax.random.normal(jax.random.key(3), (B, 4, 4, 4))
    variables = block.init(jax.random.key(4), x, 0.5, train=False)

    def local(x, key):
        return block.apply(variables, x, 0.5, train=True, rngs={"stochastic_depth": key},
                           mutable=["batch_stats"])[0]

    key = jax.random.key(0)
    mapped = jax.shard_map(local, mesh=_mesh(), in_specs=(P("data"), P()), out_specs=P("data"))
    _close(jax.jit(mapped)(x, key), _per_shard(local, x, key))


@pytest.mark.parametrize("local", [_op, _linen], ids=["op", "linen"])
def test_a_batch_gate_that_differs_between_devices_is_refused_with_the_fix(local):
    # Skipping with a gate per device would hang the backward pass: the replicated weights'
    # gradient is summed across devices inside the cond, where only open devices arrive.
    def per_device(x, w, key):
        return local(x, w, jax.random.fold_in(key, jax.lax.axis_index("data")))

    with pytest.raises(ValueError, match=r"differs between shard_map devices.*"
                                         r"implementation='mask'"):
        _loss(per_device, mapped=True)(X, W, jax.random.key(0))


def test_kept_loop_refuses_gates_that_differ_between_devices_with_the_fix():
    # Each device would loop over its own kept blocks, while the replicated weights'
    # gradient is summed across the devices once per block inside the loop.
    ws, probs = jnp.stack([W, W]), jnp.ones(2)

    def local(x, w, key):
        gates = jax.random.bernoulli(jax.random.fold_in(key, jax.lax.axis_index("data")), 0.5,
                                     (2,))
        return sdj.kept_loop(lambda w, s, v, p: (v + jnp.tanh(v @ w), s), w, {}, x, probs,
                             gates)[0]

    with pytest.raises(ValueError, match=r"gates that differ between shard_map devices.*"
                                         r"implementation='mask'"):
        _loss(local, mapped=True)(X, ws, jax.random.key(0))


def test_a_per_device_batch_gate_masks_inside_shard_map():
    def local(x, w, key):
        return _op(x, w, key, fold=True, implementation="mask")

    def alone(x, w, key):  # device i's key, as axis_index gives it
        return jnp.concatenate([
            _op(s, w, jax.random.fold_in(key, i), implementation="mask")
            for i, s in enumerate(jnp.split(x, DEVICES))])

    key = jax.random.key(5)
    got = _loss(local, mapped=True)(X, W, key)
    want = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(alone(x, w, key) ** 2),
                                      argnums=(0, 1)))(X, W)
    _close(got, want)
    rows = np.asarray(jnp.any(_loss_out(local, key) != X, axis=1)).reshape(DEVICES, -1)
    assert len({bool(r[0]) for r in rows}) == 2  # the devices' gates differ


def _loss_out(local, key):
    fn = jax.shard_map(local, mesh=_mesh(), in_specs=(P("data"), P(), P()), out_specs=P("data"))
    return jax.jit(fn)(X, W, key)


# The library's BatchNorm with axis_name='data' inside shard_map: the statistics of the whole
# batch, as under jit, so a library ResNet trains there as it does under jit.
SYNCED_BN = functools.partial(sdj.layers.BatchNorm, axis_name="data")
IMAGES = jax.random.normal(jax.random.key(6), (B, 8, 8, 3))
LABELS = jax.random.randint(jax.random.key(7), (B,), 0, 3)


def _resnet(**kw):
    return sdj.CifarResNet(depth=8, width=4, num_classes=3, **kw)


def _train_step(model, gates, mapped, check_vma=True):
    """Loss, gradients and new batch_stats of one training step of ``model`` on IMAGES, in
    shard_map over 'data' (the loss the devices' mean, so its gradient is the whole batch's;
    without ``check_vma`` JAX sums no replicated gradient, so the gradients are averaged)
    or under jit on the whole batch."""
    def step(variables, x, y):
        def loss(params):
            logits, updates = model.apply({**variables, "params": params}, x, train=True,
                                          gates=gates, mutable=["batch_stats"])
            ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
            return (jax.lax.pmean(ce, "data") if mapped else ce), updates["batch_stats"]

        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        if not check_vma:
            grads = jax.lax.pmean(grads, "data")
        return value, grads, stats

    if mapped:
        step = jax.shard_map(step, mesh=_mesh(), in_specs=(P(), P("data"), P("data")),
                             out_specs=P(), check_vma=check_vma)
    return jax.jit(step)


@pytest.mark.parametrize("gates", [None, (True,) * 3, (False, True, False)],
                         ids=["constant_depth", "gates_open", "gates_closed"])
def test_a_library_resnet_with_synced_batchnorm_trains_inside_shard_map_as_under_jit(gates):
    # Without axis_name each device normalised its own shard and its running statistics
    # differed by device, which a skipping cond refuses (its closed side's do not).
    p_L = 1.0 if gates is None else 0.5
    synced = _resnet(final_survival_prob=p_L, norm=SYNCED_BN)
    plain = _resnet(final_survival_prob=p_L)
    given = None if gates is None else jnp.array(gates)
    variables = plain.init(jax.random.key(8), IMAGES, train=False)
    got = _train_step(synced, given, mapped=True)(variables, IMAGES, LABELS)
    _close(got, _train_step(plain, given, mapped=False)(variables, IMAGES, LABELS))
    for stage, gate in enumerate(gates or (), start=1):
        block = f"stage{stage}_block1"  # a closed block skipped: its statistics unchanged
        same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), got[2]["stages"][block],
                            variables["batch_stats"]["stages"][block])
        assert all(jax.tree.leaves(same)) != gate


def test_implementation_loop_with_synced_batchnorm_trains_inside_shard_map_as_under_jit():
    # The loop's buffers of stored residuals start as zeros, which shard_map types as
    # replicated, while the residuals computed from a device's shard vary over 'data': they
    # must start varying, or the loop's carry changes type (JAX refuses the loop).
    kw = dict(depth=14, scan=True, final_survival_prob=0.5)  # one looped block per stage
    looped = sdj.CifarResNet(width=4, num_classes=3, implementation="loop", norm=SYNCED_BN, **kw)
    plain = sdj.CifarResNet(width=4, num_classes=3, **kw)
    gates = jnp.array([True, True, True, False, False, True])
    variables = plain.init(jax.random.key(8), IMAGES, train=False)
    got = _train_step(looped, gates, mapped=True)(variables, IMAGES, LABELS)
    _close(got, _train_step(plain, gates, mapped=False)(variables, IMAGES, LABELS))


def test_synced_batchnorm_without_vma_checks_trains_as_under_jit_with_averaged_gradients():
    # README: with check_vma=False JAX does not sum a replicated parameter's gradient over
    # the devices (each device's differs, and their sum is not jit's): their pmean is jit's,
    # BatchNorm's pmean and the CPU conv's custom gradient included.
    synced = _resnet(final_survival_prob=1.0, norm=SYNCED_BN)
    variables = synced.init(jax.random.key(8), IMAGES, train=False)
    got = _train_step(synced, None, mapped=True, check_vma=False)(variables, IMAGES, LABELS)
    want = _train_step(_resnet(final_survival_prob=1.0), None, mapped=False)
    _close(got, want(variables, IMAGES, LABELS))


def test_synced_batchnorm_outside_its_mapped_axis_says_so():
    bn = SYNCED_BN()
    x = jax.random.normal(jax.random.key(9), (B, D))
    variables = bn.init(jax.random.key(0), x, train=True)

    def apply(x):
        return bn.apply(variables, x, train=True, mutable=["batch_stats"])[0]

    with pytest.raises(ValueError, match=r"axis_name='data'.* not bound here.*shard_map"):
        jax.jit(apply)(x)
    wrong = jax.shard_map(lambda x: sdj.layers.BatchNorm(axis_name="batch").apply(
        variables, x, train=True, mutable=["batch_stats"])[0], mesh=_mesh(),
        in_specs=P("data"), out_specs=P("data"))
    with pytest.raises(ValueError, match=r"axis_name='batch'.* not bound here"):  # JAX: ''
        jax.jit(wrong)(x)


def test_synced_batchnorm_over_a_sub_axis_gives_each_group_its_statistics():
    # README: statistics over groups of devices (what Flax's axis_index_groups does under
    # pmap; shard_map does not implement it) come from a mesh axis of their own: over 'bn'
    # each group of 4 devices normalises by its own 8 examples, over ('group', 'bn') by all.
    mesh = jax.make_mesh((2, DEVICES // 2), ("group", "bn"), axis_types=(AxisType.Auto,) * 2)
    x = jax.random.normal(jax.random.key(10), (B, D)) * 3.0 + 1.0
    variables = sdj.layers.BatchNorm().init(jax.random.key(0), x, train=False)

    def mapped(axis_name, stats_spec):
        def local(x):
            return sdj.layers.BatchNorm(axis_name=axis_name).apply(
                variables, x, train=True, mutable=["batch_stats"])
        return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(("group", "bn")),
                                     out_specs=(P(("group", "bn")), stats_spec)))(x)

    def alone(x):
        return sdj.layers.BatchNorm().apply(variables, x, train=True, mutable=["batch_stats"])

    groups = [alone(half) for half in jnp.split(x, 2)]
    y, stats = mapped("bn", P("group"))  # the running statistics differ by group
    _close(y, jnp.concatenate([g[0] for g in groups]))
    _close(stats, jax.tree.map(lambda *g: jnp.concatenate(g), *[g[1] for g in groups]))
    y, stats = mapped(("group", "bn"), P())
    _close((y, stats), alone(x))


def test_the_cpu_friendly_conv_gives_a_replicated_kernel_its_summed_gradient_inside_shard_map():
    # Its custom gradient returned the kernel's gradient varying over 'data' for a kernel
    # that does not, which JAX refused (the library's ResNets could not train there on CPU).
    x = jax.random.normal(jax.random.key(10), (B, 6, 6, 3))
    w = jax.random.normal(jax.random.key(11), (3, 3, 3, 4))

    def loss(x, w, mapped):
        y = sdj.conv.conv2d(x, w, (2, 2), ((1, 1), (1, 1)))
        return jax.lax.psum(jnp.sum(y ** 2), "data") if mapped else jnp.sum(y ** 2)

    grad = jax.grad(loss, argnums=(0, 1))
    mapped = jax.shard_map(functools.partial(grad, mapped=True), mesh=_mesh(),
                           in_specs=(P("data"), P()), out_specs=(P("data"), P()))
    _close(jax.jit(mapped)(x, w), jax.jit(functools.partial(grad, mapped=False))(x, w))
