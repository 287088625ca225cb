"""64-bit JAX (``jax_enable_x64``, e.g. ``JAX_ENABLE_X64=1``): the library and the trainer work
and draw what they draw without it. Each test switches x64 on in a ``jax.enable_x64``
context, so nothing leaks into other tests."""
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs` lives at the repository root, beside train.py.

import stochastic_depth_jax as sdj  # noqa: E402
from compiled import with_conditionals  # noqa: E402
from configs import load_config  # noqa: E402
from stochastic_depth_jax import convnext, data, nnx_layers, ops, vit  # noqa: E402
from stochastic_depth_jax.training import evaluate, loop, metrics, optim, step  # noqa: E402

TINY = ["--config.progress_bar=false", "--config.write_tensorboard=false",
        "--config.write_plots=false"]


def _both(fn):
    """``fn()`` without and with x64, as host arrays."""
    with jax.enable_x64(False):
        a = jax.device_get(fn())
    with jax.enable_x64(True):
        b = jax.device_get(fn())
    return a, b


def _assert_same(a, b):
    jax.tree.map(lambda x, y: (np.testing.assert_array_equal(x, y),
                               np.testing.assert_equal(np.asarray(x).dtype, np.asarray(y).dtype)),
                 a, b)


def test_training_batches_are_the_same_with_x64():
    """translate() failed under x64 (a Python 0 start index became int64)."""
    rng = np.random.default_rng(0)
    split = data.Split(rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8),
                       np.arange(40, dtype=np.int32))
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:1])

    def batches():
        dev = data.put_on_devices(split, mesh)
        return [data.train_batch(dev, jax.random.key(3), s, batch_size=16, mean=[10., 20., 30.],
                                 std=[2., 4., 8.], augment=a)
                for s in (0, 5) for a in ("flip_translate", "translate")]

    _assert_same(*_both(batches))


def test_gates_from_a_key_are_the_same_with_x64():
    """A Python-float p drew float64 uniforms under x64: other gates from the same key."""
    keys = jax.random.split(jax.random.key(1), 64)

    def gates():
        return [jax.vmap(lambda k: ops.draw_gate(k, 0.5))(keys),
                jax.vmap(lambda k: ops.draw_gate(k, np.float64(0.7), mode="sample",
                                                 implementation="mask", batch_size=8))(keys),
                jax.vmap(lambda k: ops.draw_subset(k, 16, 0.5, groups=2))(keys),
                jax.vmap(lambda k: ops.draw_gates(k, [0.9, 0.6, 0.5]))(keys)]

    a, b = _both(gates)
    _assert_same(a, b)
    assert 0 < a[0].sum() < len(keys)  # both outcomes occur: the comparison means something

    def layer():  # the Linen wrapper draws from its rng stream with p a Python float
        sd = sdj.StochasticDepth(nn.Dense(4, parent=None), survival_prob=0.5)
        x = jnp.ones((2, 4), jnp.float32)
        variables = sd.init(jax.random.key(0), x, deterministic=True)
        return [sd.apply(variables, x, deterministic=False, rngs={"stochastic_depth": k})
                for k in keys[:16]]

    _assert_same(*_both(layer))


def test_dropout_masks_are_the_same_with_x64():
    """A Wide ResNet's dropout (``model.dropout_rate``) drew its masks with flax's Dropout,
    which compares float64 uniforms with its Python-float keep probability under x64: other
    masks from the same key, so the run was not the run without x64. Without x64 the masks
    are still flax's, bit for bit."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    keys = jax.random.split(jax.random.key(2), 8)

    def block(dropout=None):
        if dropout is not None:  # as the code before: flax's Dropout, named as ours is
            return [dropout(rate, deterministic=False)(x) for rate in (0.1, 0.3, 0.7)]
        blk = sdj.layers.ResidualBlock(features=4, branch_cls=sdj.layers.BasicBranch,
                                       dropout_rate=0.3)
        variables = blk.init(jax.random.key(1), x, train=False)
        return [blk.apply(variables, x, train=True, rngs={"dropout": k},
                          mutable=["batch_stats"])[0] for k in keys]

    a, b = _both(block)
    _assert_same(a, b)
    assert not np.array_equal(a[0], a[1])  # the keys draw different masks

    class Both(nn.Module):  # one module path and rng for flax's Dropout and ours
        dropout: type

        @nn.compact
        def __call__(self):
            return block(self.dropout)

    with jax.enable_x64(False):
        for k in keys[:2]:
            _assert_same(Both(nn.Dropout).apply({}, rngs={"dropout": k}),
                         Both(sdj.layers.Dropout).apply({}, rngs={"dropout": k}))


@pytest.mark.parametrize("schedule, extra", [
    ("step", dict(lr_boundaries_epochs=(2, 3), warmup_epochs=1)),
    ("warmup_cosine", dict(warmup_epochs=1)),
    ("constant", {}),
])
def test_lr_schedules_are_float32_and_the_same_with_x64(schedule, extra):
    """Under x64 the rates were float64: 0.1 * 0.1 then differs from float32's 0.01."""
    fields = dict(learning_rate=0.1, lr_decay_factor=0.1, lr_boundaries_epochs=(),
                  warmup_epochs=0, num_epochs=4, lr_schedule=schedule)
    config = ml_collections.ConfigDict({**fields, **extra})
    counts = np.arange(0, 45, dtype=np.int32)

    def rates():
        fn = optim.make_lr_schedule(config, 10)
        return jax.jit(jax.vmap(fn))(counts), [fn(int(c)) for c in (0, 15, 33)]

    a, b = _both(rates)
    _assert_same(a, b)
    assert a[0].dtype == np.float32
    assert len(set(a[0].tolist())) > 1 or schedule == "constant"


def test_label_smoothed_loss_stays_float32_with_x64():
    """The one-hot targets were float64 under x64, and with them the epoch sums, which then
    no longer matched the compiled train step's types."""
    with jax.enable_x64(True):
        logits = jnp.ones((4, 10), jnp.float32)
        loss = step.cross_entropy(logits, jnp.arange(4), label_smoothing=0.1)
    assert loss.dtype == jnp.float32


def test_the_loss_of_float64_logits_stays_float64():
    """A float64 model (x64 on, ``dtype='float64'``) gets its loss in float64, smoothed or
    not: cast down to float32 first, its logits would lose the digits the float64 run
    computed them with. Logits 1e-12 apart tell the two apart."""
    with jax.enable_x64(True):
        logits = jnp.array([[0.0, 1e-12]], jnp.float64)
        for smoothing in (0.0, 0.1):
            loss = step.cross_entropy(logits, jnp.array([1]), label_smoothing=smoothing)
            assert loss.dtype == jnp.float64, smoothing
            ties = step.cross_entropy(jnp.zeros((1, 2), jnp.float64), jnp.array([1]),
                                      label_smoothing=smoothing)
            assert loss[0] < ties[0], smoothing


def test_vit_and_convnext_parameters_are_float32_with_x64():
    """The ViT's class token and position embedding and the ConvNeXt's layer scale were
    float64 (other values) under x64: a checkpoint of the other mode did not fit."""
    x = jnp.zeros((2, 16, 16, 3), jnp.float32)

    def params():
        v = vit.ViT(num_classes=3, depth=1, width=8, num_heads=2, patch_size=8, pool="token")
        c = convnext.ConvNeXt(num_classes=3, depths=(1, 1), dims=(8, 16))
        n = nnx_layers.ViT(3, image_size=16, patch_size=8, width=8, depth=1,
                           num_heads=2, pool="token", rngs=nnx_layers.nnx.Rngs(0))
        return (v.init(jax.random.key(0), x, train=False),
                c.init(jax.random.key(0), x, train=False),
                [n.cls[...], n.pos_embed[...]])

    a, b = _both(params)
    _assert_same(a, b)
    assert {leaf.dtype for leaf in jax.tree.leaves(a)} == {np.dtype(np.float32)}


def test_float64_batchnorm_and_resnet_compute_in_float64():
    """With x64 a float64 model computes in float64: BatchNorm's statistics and the pooled
    features were float32, whatever the dtype (bfloat16 keeps float32 statistics)."""
    with jax.enable_x64(True):
        # Spread 1e-6 around 1e4: float32 statistics see a constant.
        v = np.linspace(-1.0, 1.0, 16)
        x = jnp.asarray(1e4 + 1e-6 * v, jnp.float64)[:, None]
        bn = sdj.BatchNorm(epsilon=0.0)
        variables = bn.init(jax.random.key(0), x, train=False)
        y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(y[:, 0], (v - v.mean()) / v.std(), rtol=0, atol=1e-5)
        assert updates["batch_stats"]["mean"].dtype == jnp.float32  # kept as parameters are
        half = bn.apply(variables, x.astype(jnp.bfloat16), train=True, mutable=["batch_stats"])
        assert half[0].dtype == jnp.bfloat16

        model = sdj.CifarResNet(depth=8, width=4, num_classes=3, dtype=jnp.float64)
        images = jnp.ones((2, 8, 8, 3), jnp.float32)
        variables = model.init(jax.random.key(0), images, train=False)
        for train in (True, False):
            def apply(variables, images):
                return model.apply(variables, images, train=train, mutable=["batch_stats"],
                                   rngs={"stochastic_depth": jax.random.key(1)})
            jaxpr = jax.make_jaxpr(apply)(variables, images)
            assert jaxpr.out_avals[0].dtype == jnp.float64
            narrow = _float32_arrays(jaxpr.jaxpr)
            assert not narrow, narrow  # activations (rank >= 2) all float64


def test_skipping_masking_compact_mode_and_the_loop_agree_in_float64():
    """In float32 two of these programs can round a ReLU input within float32 rounding of 0
    to opposite signs, and then one example's gradient there flows in one and not in the
    other: with seed 1, one device and the scanned ResNet-26 of tests/test_train.py, the
    third batch holds one at -1.4e-6 (stage 3, third block, after bn1) that skipping rounds
    to >= 0 and masking does not; the stems then differ by 1.1e-4 after 3 steps. Beyond such
    flips the four implementations compute the same thing, which float64 shows to 1e-12 (a
    dropped block's statistics updated, a gate applied twice or a scale off would not hide
    there). The gates are traced, so skipping runs its conditionals, and close a stage's
    first block and leave compact mode a padding slot."""
    gates = np.array([0, 1, 0, 1, 1, 1, 1, 0, 1, 0, 0, 1], bool)  # kept (scanned): 2, 2, 1
    with jax.enable_x64(True):
        kw = dict(depth=26, width=4, num_classes=3, scan=True, dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3), jnp.float64)
        base = sdj.CifarResNet(**kw)
        variables = jax.tree.map(lambda a: a.astype(jnp.float64),
                                 base.init(jax.random.key(1), x, train=False))
        stats = variables.pop("batch_stats")
        stats = jax.tree.map(lambda a: (a + 0.5).astype(jnp.float32), stats)  # as kept

        def run(model, buckets=None, conditionals=0):
            def loss(params, gates):
                y, upd = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                     gates=gates, buckets=buckets, mutable=["batch_stats"])
                return jnp.sum(y ** 2), upd
            args = (variables["params"], jnp.asarray(gates))
            grad = with_conditionals(jax.jit(jax.value_and_grad(loss, has_aux=True)), *args,
                                     at_least=conditionals)
            return jax.device_get(grad(*args))

        # A conditional forward and backward per stage's first block and per scanned stage.
        skip = run(base, conditionals=12)
        others = {"mask": run(sdj.CifarResNet(**kw, implementation="mask")),
                  "compact": run(base, base.compact_buckets(gates, 2)),
                  "loop": run(sdj.CifarResNet(**kw, implementation="loop"))}
    (loss, upd), grads = skip
    assert jax.tree.leaves(grads)[0].dtype == np.float64
    for name, ((loss_o, upd_o), grads_o) in others.items():
        np.testing.assert_allclose(loss_o, loss, rtol=1e-12, err_msg=name)
        jax.tree.map(lambda a, b: np.testing.assert_array_less(  # noqa: B023
            np.max(np.abs(a - b)), 1e-12 * np.max(np.abs(b)) + 1e-300), grads_o, grads)
        # Running statistics are kept in float32: one rounding of float64 values.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), upd_o, upd)


def test_float64_running_statistics_skip_as_they_mask():
    """Running statistics given in float64 (with x64, e.g. every variable cast to float64)
    failed in skipping's conditional, "cond branches must have equal output types": a kept
    block wrote them back in float32, a dropped one returned them unchanged, and masking
    returned some in float32 and some in float64. They stay float64 now, and skipping,
    masking, compact mode and the loop agree."""
    gates = np.array([0, 1, 1, 0, 1, 1], bool)  # a dropped first block and a scanned one
    with jax.enable_x64(True):
        kw = dict(depth=14, width=4, num_classes=3, scan=True, dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3), jnp.float64)
        base = sdj.CifarResNet(**kw)
        variables = jax.tree.map(lambda a: (a + 0.5).astype(jnp.float64),
                                 base.init(jax.random.key(1), x, train=False))

        def run(model, buckets=None, conditionals=0):
            def apply(variables, gates):
                return model.apply(variables, x, train=True, gates=gates, buckets=buckets,
                                   mutable=["batch_stats"])
            args = (variables, jnp.asarray(gates))
            return jax.device_get(with_conditionals(jax.jit(apply), *args,
                                                    at_least=conditionals)(*args))

        skip = run(base, conditionals=6)  # one per block: 3 first ones, 3 scanned stages
        others = {"mask": run(sdj.CifarResNet(**kw, implementation="mask")),
                  "compact": run(base, base.compact_buckets(gates, 1)),
                  "loop": run(sdj.CifarResNet(**kw, implementation="loop"))}
    assert {leaf.dtype for leaf in jax.tree.leaves(skip)} == {np.dtype(np.float64)}
    for name, other in others.items():
        def same(a, b, name=name):
            np.testing.assert_equal(a.dtype, b.dtype, err_msg=name)
            np.testing.assert_allclose(a, b, rtol=1e-12, err_msg=name)
        jax.tree.map(same, other, skip)
    dropped = skip[1]["batch_stats"]["stages"]["stage1_block1"]
    jax.tree.map(np.testing.assert_array_equal, dropped,
                 variables["batch_stats"]["stages"]["stage1_block1"])


def _float32_arrays(jaxpr, found=None):
    """(primitive, type) of every float32 array of rank >= 2 a jaxpr (or a sub-jaxpr)
    computes."""
    found = set() if found is None else found
    for eqn in jaxpr.eqns:
        for out in eqn.outvars:
            if getattr(out.aval, "dtype", None) == jnp.float32 and out.aval.ndim >= 2:
                found.add((eqn.primitive.name, str(out.aval)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    _float32_arrays(sub, found)
    return found


def _records(workdir):
    return [{k: v for k, v in r.items() if not k.endswith(("time_s", "per_s"))}
            for r in metrics.read_metrics(workdir)]


def test_training_with_x64_is_training_without(tmp_path):
    """A short run (label smoothing, warm-up and cosine rates) under x64 logs what the same
    run logs without it, and its checkpoint evaluates the same. It failed in translate()."""
    config = load_config("cifar10:smoke", TINY + ["--config.label_smoothing=0.1",
                                                  "--config.lr_schedule=warmup_cosine",
                                                  "--config.warmup_epochs=1"])
    with jax.enable_x64(False):
        loop.train_and_evaluate(config, str(tmp_path / "x32"))
    with jax.enable_x64(True):
        loop.train_and_evaluate(config, str(tmp_path / "x64"))
        evaluated = evaluate.evaluate_checkpoint(str(tmp_path / "x64"), "latest")
    assert _records(tmp_path / "x64") == _records(tmp_path / "x32")
    assert evaluated["error"] == _records(tmp_path / "x32")[-1]["test_error"]
