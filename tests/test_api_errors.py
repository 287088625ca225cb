"""Library mistakes a user makes in their own code: each is one clear error (or warning)."""
import dataclasses
import re
import warnings

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import stochastic_depth_jax as sdj
from stochastic_depth_jax import nnx_layers, ops, vit

X = jax.random.normal(jax.random.key(0), (8, 4, 6))
F = lambda h: jnp.tanh(h) + 1.0  # noqa: E731
VIT = dict(size="ti", depth=2, patch_size=4, width=32, num_heads=2, drop_path_rate=0.2)


class Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(x.shape[-1])(x)


class NnxDense(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(6, 6, rngs=rngs)

    def __call__(self, x):
        return self.dense(x)


@pytest.mark.parametrize("p", [[0.5], (0.5,), "0.5", None, True])
def test_a_survival_prob_that_is_not_one_float_is_refused_everywhere(p):
    message = r"survival_prob must be a float in \(0, 1\]"
    with pytest.raises(ValueError, match=message):
        ops.stochastic_depth(F, X, survival_prob=p, key=jax.random.key(1))
    sd = sdj.StochasticDepth(Dense(parent=None), survival_prob=p)
    with pytest.raises(ValueError, match=message):
        sd.init(jax.random.key(0), X, deterministic=True)
    with pytest.raises(ValueError, match=message):
        nnx_layers.StochasticDepth(NnxDense(nnx.Rngs(0)), p)
    with pytest.raises(ValueError, match=r"DropPath rate must be a float in \[0, 1\)"):
        nnx_layers.DropPath(NnxDense(nnx.Rngs(0)), p)


def test_out_of_range_values_print_as_plain_numbers():
    with pytest.raises(ValueError, match=r"got 0\.0\.$"):
        ops.check_survival_prob(np.float64(0.0))


def test_a_key_that_is_not_a_prng_key_is_refused():
    with pytest.raises(TypeError, match="key must be a PRNG key"):
        ops.stochastic_depth(F, X, survival_prob=0.5, key=0)
    # Typed and raw keys both work.
    ops.stochastic_depth(F, X, survival_prob=0.5, key=jax.random.key(0))
    ops.stochastic_depth(F, X, survival_prob=0.5, key=jax.random.PRNGKey(0))


def test_sample_mode_needs_a_batch_axis():
    with pytest.raises(ValueError, match="x needs a batch axis at batch_axis=0"):
        ops.stochastic_depth(F, jnp.float32(1.0), survival_prob=0.5, key=jax.random.key(0),
                             mode="sample")


@pytest.mark.parametrize("batch, p, groups", [(1, 0.5, 1), (8, 0.5, 8), (3, 0.9, 1)])
def test_groups_too_small_to_drop_anything_warn(batch, p, groups):
    x = jnp.ones((batch, 3))
    with pytest.warns(UserWarning, match="Drop path is off"):
        y = ops.stochastic_depth(F, x, survival_prob=p, key=jax.random.key(0), mode="sample",
                                 groups=groups)
    assert np.all(np.asarray(y) != 0)  # indeed nobody was dropped


def test_ordinary_rounding_does_not_warn():
    # DeiT's linear rule gives tiny rates to the first blocks; rounding them away is expected.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.stochastic_depth(F, jnp.ones((16, 3)), survival_prob=0.99, key=jax.random.key(0),
                             mode="sample")
        ops.stochastic_depth(F, jnp.ones((16, 3)), survival_prob=0.5, key=jax.random.key(0),
                             mode="sample", groups=2)


def test_missing_gate_rng_names_the_stream_and_the_fix():
    sd = sdj.StochasticDepth(Dense(parent=None), survival_prob=0.5)
    variables = sd.init(jax.random.key(0), X, deterministic=True)
    with pytest.raises(ValueError, match=r"rngs=\{'stochastic_depth': "):
        sd.apply(variables, X, deterministic=False)
    model = sdj.CifarResNet(depth=8, num_classes=3)
    images = jnp.zeros((2, 8, 8, 3))
    v = model.init(jax.random.key(0), images, train=False)
    with pytest.raises(ValueError, match="rng stream 'stochastic_depth'"):
        model.apply(v, images, train=True, mutable=["batch_stats"])
    vit = sdj.ViT(num_classes=3, **VIT)
    v = vit.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)), train=False)
    with pytest.raises(ValueError, match="rng stream 'stochastic_depth'"):
        vit.apply(v, jnp.zeros((2, 16, 16, 3)), train=True)


def test_nnx_rngs_without_the_stream_and_bad_rngs_are_clear_errors():
    sd = nnx_layers.DropPath(NnxDense(nnx.Rngs(0)), 0.5)
    with pytest.raises(ValueError, match="has no 'stochastic_depth' stream"):
        sd(X, rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match="has no 'stochastic_depth' stream"):
        nnx_layers.DropPath(NnxDense(nnx.Rngs(0)), 0.5, rngs=nnx.Rngs(params=0))
    with pytest.raises(TypeError, match="rngs must be nnx.Rngs, an nnx.RngStream or a PRNG key"):
        sd(X, rngs=3)
    # A seed or a key where the module takes a stream: the message named only the type.
    for given, name in ((0, "int"), (jax.random.key(0), "a PRNG key")):
        with pytest.raises(TypeError, match=rf"got {name}: build it with "
                                            rf"rngs=nnx.Rngs\(stochastic_depth=seed\)"):
            nnx_layers.DropPath(NnxDense(nnx.Rngs(0)), 0.5, rngs=given)


def test_nnx_stochastic_depth_given_a_drop_rate_names_survival_prob():
    # Was Python's "got an unexpected keyword argument 'rate'", naming no fix.
    with pytest.raises(TypeError, match=r"StochasticDepth takes survival_prob .* not a drop "
                                        r"rate \(rate=0.1\): StochasticDepth\(branch, "
                                        r"survival_prob=0.9\), or DropPath\(branch, rate=0.1\)"):
        nnx_layers.StochasticDepth(NnxDense(nnx.Rngs(0)), rate=0.1)
    with pytest.raises(TypeError, match=r"survival_prob=0.8\)"):
        nnx_layers.StochasticDepth(NnxDense(nnx.Rngs(0)), drop_path_rate=0.2)
    with pytest.raises(TypeError, match=r"DropPath takes the drop rate as rate=, not "
                                        r"drop_rate=: DropPath\(branch, rate=0.1\)"):
        nnx_layers.DropPath(NnxDense(nnx.Rngs(0)), drop_rate=0.1)

    class MyDrop(nnx_layers.DropPath):  # a user's subclass: DropPath's advice, which works
        pass
    with pytest.raises(TypeError, match=r"^MyDrop takes the drop rate as rate=, not "
                                        r"drop_path_rate=: MyDrop\(branch, rate=0.2\)\.$"):
        MyDrop(NnxDense(nnx.Rngs(0)), drop_path_rate=0.2)
    MyDrop(NnxDense(nnx.Rngs(0)), rate=0.2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'survivalprob'"):
        nnx_layers.StochasticDepth(NnxDense(nnx.Rngs(0)), survivalprob=0.9)


def test_linen_wrappers_given_a_drop_rate_by_another_name_say_what_to_write():
    # Was Python's "got an unexpected keyword argument 'rate'", naming no fix (NNX named it).
    with pytest.raises(TypeError, match=r"^StochasticDepth takes survival_prob .* not a drop "
                                        r"rate \(rate=0.1\): StochasticDepth\(branch, "
                                        r"survival_prob=0.9\), or DropPath\(branch, rate=0.1\)"):
        sdj.StochasticDepth(Dense(parent=None), rate=0.1)
    with pytest.raises(TypeError, match=r"\(drop_path_rate=0.2\): .*survival_prob=0.8\)"):
        sdj.StochasticDepth(Dense(parent=None), drop_path_rate=0.2)
    with pytest.raises(TypeError, match=r"^DropPath takes the drop rate as rate=, not "
                                        r"drop_rate=: DropPath\(branch, rate=0.1\)\.$"):
        sdj.DropPath(Dense(parent=None), drop_rate=0.1)
    with pytest.raises(TypeError, match=r"DropPath\(branch, rate=r\) for each layer's"):
        sdj.DropPath(Dense(parent=None), drop_path_rate=np.linspace(0.0, 0.5, 20))

    class MyDrop(sdj.DropPath):  # a user's subclass, and a lifted one, are covered too
        pass
    # DropPath's advice, not StochasticDepth's: MyDrop(branch, survival_prob=0.9) is refused.
    with pytest.raises(TypeError, match=r"^MyDrop takes the drop rate as rate=, not "
                                        r"drop_prob=: MyDrop\(branch, rate=0.1\)\.$"):
        MyDrop(Dense(parent=None), drop_prob=0.1)
    MyDrop(Dense(parent=None), rate=0.1)  # what it says to write builds
    # Its survival_prob too (was 'DropPath takes ...': DropPath would drop the subclass).
    for given in ({"survival_prob": 0.9}, {}):
        with pytest.raises(TypeError, match=r"^MyDrop takes the drop rate by keyword, "
                                            r"MyDrop\(branch, rate=\.\.\.\), but got "):
            MyDrop(Dense(parent=None), *([] if given else [0.9]), **given)
    with pytest.raises(TypeError, match=r"^CheckpointDropPath takes the drop rate as rate=, "
                                        r"not drop_rate=: CheckpointDropPath\(branch, rate=0.2"):
        nn.remat(sdj.DropPath)(Dense(parent=None), drop_rate=0.2)
    with pytest.raises(TypeError, match=r"takes survival_prob .*\(rate=0.3\)"):
        nn.remat(sdj.StochasticDepth)(Dense(parent=None), rate=0.3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'survivalprob'"):
        sdj.StochasticDepth(Dense(parent=None), survivalprob=0.9)
    # No field added: the module's attributes are as before, and it still builds and runs.
    assert [f.name for f in dataclasses.fields(sdj.DropPath)] == [
        "branch", "survival_prob", "mode", "scaling", "implementation", "remat",
        "rng_collection", "reroute_convs", "groups", "batch_axis", "rate", "parent", "name"]
    sd = sdj.DropPath(Dense(parent=None), rate=0.5)
    variables = sd.init(jax.random.key(0), X, deterministic=True)
    assert sd.apply(variables, X, deterministic=True).shape == X.shape


def test_nnx_drop_rate_schedule_given_as_one_argument_is_a_one_line_error():
    # A whole schedule: the message spanned lines with the array's repr and suggested
    # DropPath(branch, rate=array([...])), itself refused.
    schedule = np.linspace(0.0, 0.5, 20)
    for cls, want in ((nnx_layers.StochasticDepth, r"drop_path_rate= a schedule of 20 rates\)"
                                                   r": StochasticDepth\(branch, survival_prob"
                                                   r"=1 - r\), or DropPath\(branch, rate=r\)"),
                      (nnx_layers.DropPath, r"DropPath\(branch, rate=r\) for each layer's")):
        for given in (schedule, jnp.asarray(schedule), list(schedule)):
            with pytest.raises(TypeError, match=want) as info:
                cls(NnxDense(nnx.Rngs(0)), drop_path_rate=given)
            assert "\n" not in str(info.value)
    # A JAX scalar is shown as its number, not as Array(0.1, dtype=float32).
    with pytest.raises(TypeError, match=r"\(rate=0.1\): .*DropPath\(branch, rate=0.1\) for"):
        nnx_layers.StochasticDepth(NnxDense(nnx.Rngs(0)), rate=jnp.float32(0.1))


def test_nnx_drop_path_given_a_survival_prob_names_rate():
    # Was Python's "got multiple values for argument 'survival_prob'".
    with pytest.raises(TypeError, match=r"DropPath takes the drop rate, not survival_prob: "
                                        r"DropPath\(branch, rate=0.1\)"):
        nnx_layers.DropPath(NnxDense(nnx.Rngs(0)), survival_prob=0.9)

    class MyDrop(nnx_layers.DropPath):  # a user's subclass: its own name, as for drop_rate=
        pass
    with pytest.raises(TypeError, match=r"^MyDrop takes the drop rate, not survival_prob: "
                                        r"MyDrop\(branch, rate=0.1\), or "):
        MyDrop(NnxDense(nnx.Rngs(0)), survival_prob=0.9)
    MyDrop(NnxDense(nnx.Rngs(0)), rate=0.1)  # what it says to write builds


def test_drop_path_subclass_given_a_bad_rate_is_named():
    """A subclass's rate out of [0, 1) (or traced) was refused as "DropPath rate must be
    ...": the line names the class the user built (Linen and NNX)."""
    class MyDrop(nnx_layers.DropPath):
        pass

    class MyLinenDrop(sdj.DropPath):
        pass

    with pytest.raises(ValueError, match=r"^MyDrop rate must be a float in \[0, 1\), got 1.5"):
        MyDrop(NnxDense(nnx.Rngs(0)), rate=1.5)
    with pytest.raises(ValueError, match=r"^MyLinenDrop rate must be a float in \[0, 1\)"):
        MyLinenDrop(Dense(parent=None), rate=1.0)
    with pytest.raises(ValueError, match=r"^MyDrop rate must be known when the model is built"):
        jax.jit(lambda r: MyDrop(NnxDense(nnx.Rngs(0)), rate=r) and r)(0.1)


def test_bad_model_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="dtype must be a floating-point dtype"):
        sdj.CifarResNet(depth=8, num_classes=3, dtype="float8").init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)), train=False)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_vit_images_must_tile_into_patches_and_match_the_model(api):
    if api == "linen":
        model = sdj.ViT(num_classes=3, **{**VIT, "patch_size": 5})
        with pytest.raises(ValueError, match=r"32x32 images do not tile into 5x5 patches"):
            model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False)
        model = sdj.ViT(num_classes=3, **VIT)
        v = model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)), train=False)
        run = lambda x: model.apply(v, x, train=False)  # noqa: E731
    else:
        with pytest.raises(ValueError, match=r"32x32 images do not tile into 5x5 patches"):
            nnx_layers.ViT(3, image_size=32, rngs=nnx.Rngs(0), **{**VIT, "patch_size": 5})
        model = nnx_layers.ViT(3, image_size=16, rngs=nnx.Rngs(0), **VIT)
        run = lambda x: model(x, deterministic=True)  # noqa: E731
    with pytest.raises(ValueError, match=r"32x32 images with patch 4 give 65 tokens, but this "
                                         r"model's position embedding has 17"):
        run(jnp.zeros((2, 32, 32, 3)))
    assert run(jnp.zeros((2, 16, 16, 3))).shape == (2, 3)


def test_load_linen_params_checks_depth_and_accepts_the_variables_dict():
    images = jnp.zeros((2, 16, 16, 3))
    linen = sdj.ViT(num_classes=3, **VIT)
    variables = linen.init(jax.random.key(0), images, train=False)
    for depth in (1, 3):
        other = nnx_layers.ViT(3, image_size=16, rngs=nnx.Rngs(0), **{**VIT, "depth": depth})
        before = jax.tree.leaves(nnx.state(other, nnx.Param))
        with pytest.raises(ValueError, match=f"Linen parameters have 2 blocks, the NNX ViT "
                                             f"{depth}"):
            nnx_layers.load_linen_params(other, variables["params"])
        after = jax.tree.leaves(nnx.state(other, nnx.Param))
        assert all(np.array_equal(a, b) for a, b in zip(before, after))  # nothing copied
    same = nnx_layers.ViT(3, image_size=16, rngs=nnx.Rngs(1), **VIT)
    nnx_layers.load_linen_params(same, variables)  # the whole variables dict is fine too
    np.testing.assert_array_equal(same.pos_embed[...], variables["params"]["pos_embed"])
    gap = nnx_layers.ViT(3, image_size=16, rngs=nnx.Rngs(1), **{**VIT, "pool": "gap"})
    with pytest.raises(ValueError, match="no counterpart in the NNX ViT|NNX shape"):
        nnx_layers.load_linen_params(gap, variables["params"])


def test_a_whole_schedule_as_survival_prob_is_refused_everywhere():
    probs = sdj.linear_decay(4, 0.5)
    message = r"one block's survival probability \(a scalar\).*index the schedule per block"
    with pytest.raises(ValueError, match=message):
        ops.stochastic_depth(F, X, survival_prob=probs, deterministic=True)
    with pytest.raises(ValueError, match=message):  # traced, e.g. passed into jit
        jax.jit(lambda p: ops.stochastic_depth(F, X, survival_prob=p, key=jax.random.key(1)))(
            jnp.asarray(probs))
    sd = sdj.StochasticDepth(Dense(parent=None), survival_prob=0.5)
    variables = sd.init(jax.random.key(0), X, deterministic=True)
    with pytest.raises(ValueError, match=message):
        sd.apply(variables, X, deterministic=False, survival_prob=jnp.asarray(probs),
                 rngs={"stochastic_depth": jax.random.key(1)})
    with pytest.raises(ValueError, match=message):
        nnx_layers.StochasticDepth(NnxDense(nnx.Rngs(0)), probs)
    # One block's entry, concrete or traced, works.
    jax.jit(lambda p: ops.stochastic_depth(F, X, survival_prob=p, key=jax.random.key(1)))(
        jnp.asarray(probs)[2])


def test_the_op_split_in_two_checks_its_rates_as_the_op_does():
    # gated_branch with the whole schedule would broadcast it over the last axis (here 4
    # blocks over 4 channels) and scale silently; a rate of 0 divided by zero in Python.
    x = X[:, 0]
    gate = jnp.bool_(True)
    probs = sdj.linear_decay(4, 0.5)
    with pytest.raises(ValueError, match=r"one block's survival probability \(a scalar\)"):
        ops.gated_branch(F, jnp.ones((8, 4)), gate, probs, scaling="train")
    for p in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"survival_prob must be in \(0, 1\]"):
            ops.gated_branch(F, x, gate, p, scaling="train")
    # draw_gates given drop rates (0 at the first block) would drop those blocks always.
    for bad, value in ((vit.drop_path_rates(4, 0.1), "0.0"), ([0.5, 1.5], "1.5"),
                       ([float("nan")], "nan")):
        with pytest.raises(ValueError, match=rf"survival probabilities must be in \(0, 1\], "
                                             rf"got {value} at index \d+;.*1 - rates"):
            sdj.draw_gates(jax.random.key(0), bad)
    # Good schedules and traced ones (the caller's to check) pass.
    gates = sdj.draw_gates(jax.random.key(0), 1.0 - vit.drop_path_rates(4, 0.1))
    assert gates.shape == (4,) and bool(gates[0])
    jax.jit(lambda p: sdj.draw_gates(jax.random.key(0), p))(jnp.asarray(probs))
    jax.jit(lambda p: ops.gated_branch(F, x, gate, p))(jnp.asarray(probs)[1])


@pytest.mark.parametrize("bad, got", [([True, True, True, True], "bools (bool)"),
                                      (np.ones(4, bool), "bools (bool)"),
                                      (["0.5", "0.5", "0.5", "0.5"], "text (<U3)")])
def test_a_schedule_of_bools_or_text_is_refused(bad, got):
    # A gate mask or keep= passed as the schedule read True as 1.0: every block kept always,
    # silently; text was parsed as numbers.
    with pytest.raises(ValueError, match=rf"^survival probabilities must be numbers in "
                                         rf"\(0, 1\], got {re.escape(got)}; a gate mask"):
        sdj.draw_gates(jax.random.key(0), bad)
    x = jnp.ones((2, 8, 8, 4))
    stages = sdj.models.ResidualStages((4,), (4,), (1,), block=sdj.layers.BasicBlock)
    v = stages.init(jax.random.key(0), x, np.full(4, 0.5), None, train=False, constant=False)
    with pytest.raises(ValueError, match=rf"^ResidualStages probs must be numbers in "
                                         rf"\(0, 1\], got {re.escape(got)}"):
        stages.apply(v, x, bad, None, train=False, constant=False)


def test_an_integer_gate_is_refused_with_the_bool_fix():
    sd = sdj.StochasticDepth(Dense(parent=None), survival_prob=0.5)
    variables = sd.init(jax.random.key(0), X, deterministic=True)
    for gate in (jnp.array(1), np.int64(1)):
        with pytest.raises(TypeError, match=r"must be a bool scalar.*astype\(bool\)"):
            sd.apply(variables, X, deterministic=False, gate=gate)
    with pytest.raises(TypeError, match=r"must be a bool scalar.*astype\(bool\)"):
        nnx_layers.StochasticDepth(NnxDense(nnx.Rngs(0)), 0.5)(X, gate=jnp.array(1))
    with pytest.raises(TypeError, match=r"bool \[batch\] mask.*astype\(bool\)"):
        ops.gated_branch(F, X, jnp.ones(8, jnp.int32), 0.5, mode="sample")
    model = sdj.CifarResNet(depth=8, num_classes=3, width=4)
    images = jnp.zeros((2, 8, 8, 3))
    model_vars = model.init(jax.random.key(0), images, train=False)
    with pytest.raises(TypeError, match=r"gates must be bool.*gates\.astype\(bool\)"):
        model.apply(model_vars, images, train=True, gates=np.array([1, 0, 1]),
                    mutable=["batch_stats"])
    # The bool gates the message asks for work.
    model.apply(model_vars, images, train=True, gates=np.array([1, 0, 1]).astype(bool),
                mutable=["batch_stats"])


def test_an_integer_branch_output_is_refused_not_truncated():
    ints = jnp.ones((2,), jnp.int32)
    with pytest.raises(TypeError, match="must be floating point, got int32"):
        ops.stochastic_depth(lambda h: h * 2, ints, survival_prob=0.8, deterministic=True)
    with pytest.raises(TypeError, match="must be floating point, got int32"):
        ops.stochastic_depth(lambda h: h * 2, ints, survival_prob=0.8, key=jax.random.key(0),
                             scaling="train")
    y = ops.stochastic_depth(lambda h: h * 2, ints.astype(jnp.float32), survival_prob=0.8,
                             deterministic=True)
    np.testing.assert_allclose(y, [1.6, 1.6], rtol=1e-6)


@pytest.mark.parametrize("one", [np.float32(1.0), np.float64(1.0), jnp.float32(1.0),
                                 np.asarray(1.0)])
def test_a_concrete_one_of_any_scalar_type_draws_no_key(one):
    np.testing.assert_allclose(ops.stochastic_depth(F, X, survival_prob=one), F(X), rtol=1e-6)
    sd = nnx_layers.StochasticDepth(NnxDense(nnx.Rngs(0)), one)
    np.testing.assert_allclose(sd(X), sd(X, deterministic=True), rtol=1e-6)


def test_concrete_jax_scalars_are_range_checked_and_accepted_as_rates():
    with pytest.raises(ValueError, match=r"survival_prob must be in \(0, 1\], got 1\.5"):
        ops.stochastic_depth(F, X, survival_prob=jnp.float32(1.5), deterministic=True)
    np.testing.assert_allclose(vit.drop_path_rates(4, jnp.float32(0.1)),
                               vit.drop_path_rates(4, 0.1), rtol=1e-6)
    drop = nnx_layers.DropPath(NnxDense(nnx.Rngs(0)), rate=jnp.float32(0.1))
    assert abs(drop.survival_prob - 0.9) < 1e-6
    with pytest.raises(ValueError, match="drop_path_rate must be in"):
        vit.drop_path_rates(4, jnp.float32(1.0))


@pytest.mark.parametrize("p", [jnp.float32(0.5), jnp.float32(1.0), np.float32(0.5)])
def test_a_concrete_array_rate_is_a_static_attribute_of_the_nnx_wrapper(p):
    # A JAX scalar attribute was NNX state, traced under nnx.jit: a drop-path subset there
    # was refused as a traced rate, and a rate of 1 drew a key (needing rngs) that eager
    # calls did not draw.
    sd = nnx_layers.StochasticDepth(NnxDense(nnx.Rngs(0)), p, mode="sample")
    assert isinstance(sd.survival_prob, float) and "survival_prob" not in nnx.state(sd)
    key = jax.random.key(1)
    call = nnx.jit(lambda m, x: m(x, rngs=key) if float(p) < 1 else m(x))
    np.testing.assert_allclose(call(sd, X), sd(X, rngs=key), rtol=1e-6, atol=1e-6)


def test_a_traced_train_flag_is_a_clear_error_everywhere():
    # A train flag passed to jax.jit as an ordinary argument arrives traced; Python's `if`
    # cannot read it. Each API says so and names static_argnames, not TracerBoolConversion.
    message = r"deterministic \(or train\) must be a Python bool.*static_argnames"
    key = jax.random.key(1)
    with pytest.raises(TypeError, match=message):
        jax.jit(lambda d: ops.stochastic_depth(F, X, survival_prob=0.5, key=key,
                                               deterministic=d))(True)
    sd = sdj.StochasticDepth(Dense(parent=None), survival_prob=0.5)
    v = sd.init(jax.random.key(0), X, deterministic=True)
    with pytest.raises(TypeError, match=message):
        jax.jit(lambda d: sd.apply(v, X, deterministic=d))(True)
    images = jnp.zeros((2, 16, 16, 3))
    model = sdj.ViT(num_classes=3, **VIT)
    with pytest.raises(TypeError, match=message):
        jax.jit(lambda t: model.init(jax.random.key(0), images, train=t))(False)
    nnx_sd = nnx_layers.StochasticDepth(NnxDense(nnx.Rngs(0)), 0.5)
    with pytest.raises(TypeError, match=message):
        nnx.jit(lambda m, d: m(X, deterministic=d))(nnx_sd, True)
    # nn.remat around the wrapper traces its keyword-only flag: the error names the way out.
    remat_sd = nn.remat(sdj.StochasticDepth)(Dense(parent=None), survival_prob=0.5)
    # StochasticDepth(remat=...) rematerialises batch-mode skipping only, which it says.
    with pytest.raises(TypeError, match=r"nn.remat and jax.checkpoint trace keyword arguments"
                                        r".*nn.remat\(MyBranch\).*remat='full'\) \(batch-mode "
                                        r"skipping only: drop path and 'mask' run the branch"):
        remat_sd.init(jax.random.key(0), X, deterministic=True)



@pytest.mark.parametrize("flag", [None, "False"])
def test_a_train_flag_that_is_not_a_bool_is_refused_not_read_by_its_truth(flag):
    # deterministic=None (a user module's unset `deterministic: bool | None = None` passed
    # on) trained silently, and the string 'False' evaluated.
    message = r"deterministic must be a bool, got .*: pass True for evaluation"
    key = jax.random.key(1)
    with pytest.raises(TypeError, match=message):
        ops.stochastic_depth(F, X, survival_prob=0.5, key=key, deterministic=flag)
    sd = sdj.StochasticDepth(Dense(parent=None), survival_prob=0.5)
    v = sd.init(jax.random.key(0), X, deterministic=True)
    with pytest.raises(TypeError, match=message):
        sd.apply(v, X, deterministic=flag, rngs={"stochastic_depth": key})
    with pytest.raises(TypeError, match=message):
        nnx_layers.StochasticDepth(NnxDense(nnx.Rngs(0)), 0.5, deterministic=flag)(X, rngs=key)
    # Python, NumPy and concrete JAX bools are flags; an NNX call's None is the module's.
    for ok in (True, np.bool_(True), jnp.bool_(True)):
        np.testing.assert_allclose(ops.stochastic_depth(F, X, survival_prob=0.5,
                                                        deterministic=ok), 0.5 * F(X))
    nnx_layers.StochasticDepth(NnxDense(nnx.Rngs(0)), 0.5)(X, deterministic=None, rngs=key)


def test_a_per_example_gate_that_does_not_fit_the_batch_is_one_clear_error():
    # A bool gate of another length failed in the multiply ("mul got incompatible shapes
    # for broadcasting"), and a [batch, 1] gate passed by chance.
    message = r"A per-example gate must be bool \[batch\], one entry per example, got shape"
    for gate in (jnp.ones(7, bool), jnp.ones((8, 1), bool)):
        with pytest.raises(ValueError, match=message):
            ops.gated_branch(F, X, gate, 0.5, mode="sample")
        sd = sdj.StochasticDepth(Dense(parent=None), survival_prob=0.5, mode="sample")
        v = sd.init(jax.random.key(0), X, deterministic=True)
        for deterministic in (False, True):
            with pytest.raises(ValueError, match=message):
                sd.apply(v, X, deterministic=deterministic, gate=gate)
        nnx_sd = nnx_layers.StochasticDepth(NnxDense(nnx.Rngs(0)), 0.5, mode="sample")
        with pytest.raises(ValueError, match=message):
            nnx_sd(X, gate=gate)
    gate = jnp.arange(8) % 2 == 0
    np.testing.assert_allclose(ops.gated_branch(F, X, gate, 0.5, mode="sample"),
                               gate[:, None, None] * F(X))


def test_subset_indices_longer_than_a_group_are_one_clear_error():
    # k > n repeated examples in the gather and scatter (undefined results), silently.
    with pytest.raises(ValueError, match=r"Subset indices of shape \(2, 5\) keep k=5 examples "
                                         r"per group, but each of the 2 group\(s\) of the "
                                         r"batch of 8 has only n=4"):
        ops.gated_branch(F, X, jnp.zeros((2, 5), jnp.int32), 0.5, mode="sample")
    indices = ops.draw_subset(jax.random.key(0), 8, 0.5, groups=2)
    ops.gated_branch(F, X, indices, 0.5, mode="sample")


class _BatchNormBranch(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        return nn.BatchNorm(use_running_average=not train)(nn.Dense(x.shape[-1])(x))


class _Block(nn.Module):
    unbound: bool

    @nn.compact
    def __call__(self, x, train):
        branch = _BatchNormBranch(parent=None) if self.unbound else _BatchNormBranch()
        sd = sdj.StochasticDepth(branch, survival_prob=0.5, implementation="mask")
        return x + sd(x, train, deterministic=not train)


def test_a_masked_branch_whose_statistics_live_outside_the_wrapper_names_parent_none():
    # A branch made in the parent's compact method without parent=None is bound there; the
    # masked call that keeps a dropped branch's statistics failed with Flax's "pytree
    # structure error: different numbers of pytree children".
    rngs = {"stochastic_depth": jax.random.key(1)}
    block = _Block(unbound=False)
    v = block.init(jax.random.key(0), X, False)
    with pytest.raises(ValueError, match=r"its branch _BatchNormBranch is bound to _Block \(as "
                       r"_BatchNormBranch_0\): create it unbound, "
                       r"StochasticDepth\(_BatchNormBranch\(parent=None\), \.\.\.\)"):
        block.apply(v, X, True, rngs=rngs, mutable=["batch_stats"])
    block.apply(v, X, False)  # evaluation and training without statistics run as they are
    block.apply({"params": v["params"], "batch_stats": v["batch_stats"]}, X, False)
    unbound = _Block(unbound=True)
    unbound.apply(unbound.init(jax.random.key(0), X, False), X, True, rngs=rngs,
                  mutable=["batch_stats"])



@pytest.mark.parametrize("kwargs, name", [(dict(scaling="tset"), "scaling"),
                                          (dict(mode="samples"), "mode"),
                                          (dict(implementation="masked"), "implementation")])
def test_the_op_split_in_two_refuses_an_unknown_option_as_the_op_does(kwargs, name):
    # gated_branch took any other scaling for 'train' (1/p) and any other mode or
    # implementation for batch-mode skipping, silently.
    with pytest.raises(ValueError, match=f"Unknown stochastic-depth {name} "):
        ops.gated_branch(F, X, jnp.bool_(True), 0.5, **kwargs)
    if name == "scaling":
        for scale in (ops.train_scale, ops.eval_scale):
            with pytest.raises(ValueError, match="Unknown stochastic-depth scaling 'tset'"):
                scale(0.5, "tset")


_IMAGES = jnp.zeros((2, 8, 8, 4))
_FLAGGED = {  # the library's modules taking `train`, each with the positional inputs it needs
    "CifarResNet": (lambda: sdj.CifarResNet(depth=8, width=4, num_classes=3), ()),
    "WideResNet": (lambda: sdj.WideResNet(depth=10, widen_factor=1, width=4, num_classes=3), ()),
    "ResNet": (lambda: sdj.ResNet(stage_sizes=(1, 1), width=4, num_classes=3), ()),
    "BasicBlock": (lambda: sdj.BasicBlock(features=4), (0.5,)),
    "BatchNorm": (lambda: sdj.BatchNorm(), ()),
}


@pytest.mark.parametrize("name, flag", [(name, flag) for name in sorted(_FLAGGED)
                                         for flag in ("train", "stochastic")
                                         if (name, flag) != ("BatchNorm", "stochastic")])
def test_a_traced_train_flag_of_the_resnets_and_blocks_is_the_same_clear_error(name, flag):
    # The README promises the traced flag's TypeError for `train` too: the paper's ResNets,
    # their blocks and BatchNorm raised JAX's TracerBoolConversionError from inside the gate
    # logic instead, naming neither the flag nor static_argnames.
    make, args = _FLAGGED[name]
    module = make()

    def init(value):
        flags = {"train": value} if flag == "train" else {"train": False, "stochastic": value}
        return module.init(jax.random.key(0), _IMAGES, *args, **flags)
    with pytest.raises(TypeError, match=r"deterministic \(or train\) must be a Python bool"
                                        r".*static_argnames"):
        jax.jit(init)(True)


@pytest.mark.parametrize("name, flag", [
    (name, flag) for name in sorted(_FLAGGED) + ["ViT", "ConvNeXt"]
    for flag in ("train", "stochastic")
    if flag == "train" or name in ("CifarResNet", "BasicBlock")])
def test_a_train_flag_that_is_not_a_bool_is_refused_with_what_train_true_means(name, flag):
    # train=None (or 1) was told "deterministic (or train) must be a bool ...: pass True for
    # evaluation, False for training": for `train` the opposite of what True means.
    make, args = {**_FLAGGED, "ViT": (lambda: sdj.ViT(num_classes=3, **VIT), ()),
                  "ConvNeXt": (lambda: sdj.ConvNeXt(num_classes=3, depths=(1, 1, 1, 1),
                                                    dims=(4, 4, 4, 4), stem_stride=1), ())}[name]
    flags = {"train": None} if flag == "train" else {"train": False, "stochastic": 1}
    use = {"train": r"pass True for training, False for evaluation\.",
           "stochastic": r"pass True to gate the blocks as in training, False to run them all, "
                         r"or None \(the default\) to follow train\."}[flag]
    with pytest.raises(TypeError, match=f"^{flag} must be a bool, got {flags[flag]} "
                                        f"\\({type(flags[flag]).__name__}\\): {use}"):
        make().init(jax.random.key(0), _IMAGES, *args, **flags)

def test_per_layer_rates_made_under_nnx_vmap_are_refused_with_the_fix():
    # A traced attribute would leak out of nnx.vmap (UnexpectedTracerError at the first
    # training call); the error names the call-time survival_prob instead.
    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0, 0), out_axes=0)
    def make(p, rngs):
        return nnx_layers.StochasticDepth(NnxDense(rngs), p, rngs=rngs)

    with pytest.raises(ValueError, match=r"pass each layer's rate at call time, "
                                         r"sd\(x, survival_prob=p\)"):
        make(jnp.array([0.9, 0.5]), nnx.Rngs(params=0, stochastic_depth=1))


def test_drop_path_subsets_under_a_symbolic_batch_say_what_to_do():
    # jax.export with a polymorphic batch: k is a shape, so subsets need a concrete batch
    # (before: a ConcretizationTypeError from inside subset_size); masking exports fine.
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 4, 6"), jnp.float32)
    key = jax.random.key(1)

    def export(implementation):
        def op(x, k):
            return ops.stochastic_depth(F, x, survival_prob=0.5, key=k, mode="sample",
                                        implementation=implementation)
        return jax.export.export(jax.jit(op))(spec, key)

    with pytest.raises(ValueError, match="needs a static batch size.*symbolic dimension b"):
        export("skip")
    assert export("mask").call(X, key).shape == X.shape


@pytest.mark.parametrize("batch", [np.int64(10), jnp.int32(10)])
def test_subset_size_takes_any_concrete_batch_size(batch):
    # Only a symbolic dimension is refused: a NumPy or JAX integer sizes a subset as an int.
    assert ops.subset_size(batch, 0.5) == ops.subset_size(10, 0.5)


class MaskedDense(nn.Module):
    @nn.compact
    def __call__(self, x, mask=None):
        x, mask = x if mask is None else (x, mask)  # the pair inside x, or two arguments
        return nn.Dense(x.shape[-1])(x) * mask[..., None]


class NnxMaskedDense(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(6, 6, rngs=rngs)

    def __call__(self, x, mask=None):
        x, mask = x if mask is None else (x, mask)  # the pair inside x, or two arguments
        return self.dense(x) * mask[..., None]


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_a_per_example_argument_beside_a_drop_path_subset_names_the_fix(api):
    # A drop-path subset runs the branch on k of the batch's examples of x; other arguments
    # go to the branch whole, so a per-example mask failed deep in the branch with a
    # broadcasting error. It is one line naming the argument and the fix now.
    mask = jnp.ones(X.shape[:2])
    message = (r"on the 4 of 8 examples .* argument args\[0\] \(shape \(8, 4\)\) has the "
               r"whole batch .* pass per-example arguments inside x")
    if api == "linen":
        sd = sdj.StochasticDepth(MaskedDense(parent=None), survival_prob=0.5, mode="sample")
        variables = sd.init(jax.random.key(0), X, mask, deterministic=True)
        run = lambda *a: sd.apply(variables, *a, deterministic=False,  # noqa: E731
                                  rngs={"stochastic_depth": jax.random.key(1)})
    else:
        drop = nnx_layers.DropPath(NnxMaskedDense(nnx.Rngs(0)), 0.5)
        run = nnx.jit(lambda *a: drop(*a, rngs=jax.random.key(1)))
    with pytest.raises(ValueError, match=message):
        run(X, mask)
    y = run((X, mask))  # the fix: the mask inside x is gathered with it
    assert y.shape == X.shape and int(np.sum(np.any(np.asarray(y) != 0, axis=(1, 2)))) == 4


class NnxBiasedDropout(nnx.Module):
    """A branch taking a per-head bias ``[heads, T, T]`` (8 heads, as long as the batch) that
    it uses whole, with the user's own bug: a Dropout without rngs."""

    def __init__(self, rngs):
        self.dense = nnx.Linear(6, 6, rngs=rngs)
        self.drop = nnx.Dropout(0.1)

    def __call__(self, x, bias):
        return self.drop(self.dense(x)) + jnp.mean(bias)


def test_another_error_of_a_drop_path_subset_passes_through_unchanged():
    # An argument as long as the batch (8 heads beside a batch of 8) that the branch uses
    # whole is no mistake: the branch's own error (the Dropout's missing rngs) is raised as
    # it is, not relabelled with the advice to move the bias inside x.
    drop = nnx_layers.DropPath(NnxBiasedDropout(nnx.Rngs(0)), 0.5)
    with pytest.raises(ValueError, match=r"^`deterministic` is False, but no `rngs`"):
        drop(X, jnp.zeros((8, 4, 4)), rngs=jax.random.key(1))


@pytest.mark.parametrize("name", ["CifarResNet", "WideResNet", "ResNet"])
@pytest.mark.parametrize("shape", [(8, 8, 4), (1, 2, 8, 8, 4)])
def test_images_without_a_batch_axis_are_one_clear_error(name, shape):
    # One image without its batch axis failed in the stem convolution with JAX's "convolution
    # requires lhs and rhs ndim to be equal, got 3 and 4".
    module = _FLAGGED[name][0]()
    message = (f"{name} takes images [batch, height, width, channels], got shape {shape}; "
               f"for one image pass x[None].")
    with pytest.raises(ValueError, match=re.escape(message)):
        module.init(jax.random.key(0), jnp.zeros(shape), train=False)


@pytest.mark.parametrize("name", ["CifarResNet", "WideResNet", "ResNet"])
def test_channels_first_images_are_one_clear_error(name):
    # PyTorch's NCHW batch [N, 3, 32, 32] ran as 3 rows of 32-"channel" images: a stem
    # built for 32 channels, trained on the wrong pixels, with no error.
    module = _FLAGGED[name][0]()
    message = (f"{name} takes images [batch, height, width, channels], got shape "
               f"(2, 3, 16, 16), which is channels-first (NCHW); pass x.transpose(0, 2, 3, 1).")
    with pytest.raises(ValueError, match=re.escape(message)):
        module.init(jax.random.key(0), jnp.zeros((2, 3, 16, 16)), train=False)
    module.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)), train=False)  # NHWC
    module.init(jax.random.key(0), jnp.zeros((2, 3, 3, 3)), train=False)  # tiny: NHWC


@pytest.mark.parametrize("sizes", [152, (3, 4.5, 6, 3), (3, 0), ()])
def test_resnet_stage_sizes_that_are_not_block_counts_are_one_clear_error(sizes):
    # A depth for stage_sizes failed with Python's "'int' object is not iterable", and a
    # fractional count was truncated silently.
    with pytest.raises(ValueError, match=r"stage_sizes must be a sequence of positive block "
                                         r"counts, one per stage, got .*; ResNet-152 is "
                                         r"stage_sizes=\(3, 8, 36, 3\)"):
        sdj.ResNet(stage_sizes=sizes)


_DROP_PATH_MODELS = {  # Linen and NNX, small, 16x16 images
    "ViT": lambda: sdj.ViT(num_classes=3, **VIT),
    "ConvNeXt": lambda: sdj.ConvNeXt(num_classes=3, depths=(1, 1, 1, 1), dims=(4, 4, 4, 4),
                                     stem_stride=2, drop_path_rate=0.2),
}


@pytest.mark.parametrize("seed", [3, jnp.array(3), np.uint32(3)])
def test_a_seed_where_a_gate_key_belongs_is_refused_by_every_drawing_function(seed):
    # The op refused it, but draw_gates, draw_gate, draw_subset and the models' `key=`
    # passed it to JAX: "invalid PRNG key data: expected key_data to have ndim, shape, and
    # dtype attributes" (or "expected key_data.ndim >= 1"), not saying a key was wanted.
    message = r"^key must be a PRNG key, e\.g\. jax\.random\.fold_in\(jax\.random\.key\(seed\)"
    probs = sdj.linear_decay(4, 0.5)
    with pytest.raises(TypeError, match=message):
        sdj.draw_gates(seed, probs)
    with pytest.raises(TypeError, match=message):
        sdj.draw_gate(seed, 0.5)
    with pytest.raises(TypeError, match=message):
        sdj.draw_subset(seed, 8, 0.5)
    images = jnp.zeros((4, 16, 16, 3))
    for make in _DROP_PATH_MODELS.values():
        model = make()
        variables = model.init(jax.random.key(0), images, train=False)
        with pytest.raises(TypeError, match=message):
            model.apply(variables, images, train=True, key=seed)
        model.apply(variables, images, train=True, key=jax.random.key(1))
    # Typed keys of any implementation and raw threefry keys still work.
    for key in (jax.random.key(0), jax.random.key(0, impl="rbg"), jax.random.PRNGKey(0)):
        assert sdj.draw_gates(key, probs).shape == (4,)
        assert sdj.draw_gate(key, 0.5, mode="sample", batch_size=8).shape == (1, 4)


@pytest.mark.parametrize("p", [1.5, 0.0])
@pytest.mark.parametrize("mode, implementation", [("batch", "skip"), ("sample", "mask")])
def test_draw_gate_checks_its_rate_as_the_op_does(p, mode, implementation):
    # draw_gate drew a gate that is always open (p = 1.5) or always closed (p = 0.0, the
    # first block's drop rate of drop_path_rates passed as p) without a word; the op, its
    # subsets and draw_gates refuse them.
    with pytest.raises(ValueError, match=r"survival_prob must be in \(0, 1\]"):
        sdj.draw_gate(jax.random.key(0), p, mode=mode, implementation=implementation,
                      batch_size=8)


@pytest.mark.parametrize("name", sorted(_DROP_PATH_MODELS) + ["NNX ViT", "NNX ConvNeXt"])
def test_vit_and_convnext_name_channels_first_images(name):
    # A PyTorch batch [N, 3, 16, 16] was told "3x16 images do not tile into 4x4 patches ...
    # resize or crop the images" (ConvNeXt: "do not divide into this ConvNeXt's stages"):
    # the wrong fix. The ResNets name the layout; so do these now, in both APIs.
    nchw, nhwc = jnp.zeros((4, 3, 16, 16)), jnp.zeros((4, 16, 16, 3))
    model = name.split()[-1]
    message = re.escape(f"{model} takes images [batch, height, width, channels], got shape "
                        f"(4, 3, 16, 16), which is channels-first (NCHW); pass "
                        f"x.transpose(0, 2, 3, 1).")
    if name.startswith("NNX"):
        rngs = nnx.Rngs(params=0, stochastic_depth=1)
        module = (nnx_layers.ViT(3, image_size=16, rngs=rngs, **VIT) if model == "ViT" else
                  nnx_layers.ConvNeXt(3, depths=(1, 1, 1, 1), dims=(4, 4, 4, 4),
                                      stem_stride=2, rngs=rngs))
        with pytest.raises(ValueError, match=message):
            module(nchw)
        assert module(nhwc).shape == (4, 3)
        return
    with pytest.raises(ValueError, match=message):
        _DROP_PATH_MODELS[name]().init(jax.random.key(0), nchw, train=False)
    with pytest.raises(ValueError, match=re.escape("got shape (16, 16, 3); for one image pass "
                                                   "x[None].")):
        _DROP_PATH_MODELS[name]().init(jax.random.key(0), nhwc[0], train=False)
    _DROP_PATH_MODELS[name]().init(jax.random.key(0), nhwc, train=False)


@pytest.mark.parametrize("field", ["width", "depth", "num_heads"])
def test_a_zero_vit_dimension_is_refused_not_replaced_by_the_size(field):
    # `width or 192`: ViT(size='ti', depth=0) built ti's 12 blocks without a word.
    dims = dict(size="ti", patch_size=4, width=32, depth=2, num_heads=2)
    with pytest.raises(ValueError, match=f"^{field} must be an integer >= 1 \\(None: the "
                                         f"size's\\), got 0\\."):
        sdj.ViT(num_classes=3, **{**dims, field: 0}).init(
            jax.random.key(0), jnp.zeros((2, 16, 16, 3)), train=False)
    with pytest.raises(ValueError, match=f"^{field} must be an integer >= 1"):
        nnx_layers.ViT(3, image_size=16, rngs=nnx.Rngs(0), **{**dims, field: 0})
    assert vit.vit_dims("ti", depth=None) == (192, 12, 3)


def test_a_vit_width_that_heads_do_not_divide_and_non_square_images_are_refused():
    """A width of 100 in 3 heads failed reshaping the attention's q/k/v; images 16 high and
    14 wide tile in height but not in width, whose last 2 pixel columns the patch
    convolution would drop without a word."""
    with pytest.raises(ValueError, match=r"^ViT width 100 does not divide into 3 heads\.$"):
        vit.vit_dims("ti", width=100)
    assert vit.vit_dims("ti", width=99) == (99, 12, 3)
    model = sdj.ViT(num_classes=3, **VIT)
    for shape in ((2, 16, 14, 3), (2, 14, 16, 3)):
        side = f"{shape[1]}x{shape[2]}"
        with pytest.raises(ValueError, match=f"^{side} images do not tile into 4x4 patches"):
            model.init(jax.random.key(0), jnp.zeros(shape), train=False)
    with pytest.raises(ValueError, match=r"^16x10 images do not divide into this ConvNeXt's "):
        sdj.ConvNeXt(num_classes=3, depths=(1, 1), dims=(4, 8), stem_stride=2).init(
            jax.random.key(0), jnp.zeros((2, 16, 10, 3)), train=False)


@pytest.mark.parametrize("name", ["ViT", "ConvNeXt"])
def test_nnx_models_name_in_channels_for_images_of_other_channels(name):
    # Grayscale images into a model built for 3 channels (in_channels's default) failed in
    # JAX's convolution: "lhs feature dimension size divided by feature_group_count must
    # equal the rhs input feature dimension size, but 1 // 1 != 3".
    def make(**kw):
        rngs = nnx.Rngs(params=0, stochastic_depth=1)
        if name == "ViT":
            return nnx_layers.ViT(3, image_size=16, rngs=rngs, **VIT, **kw)
        return nnx_layers.ConvNeXt(3, depths=(1, 1, 1, 1), dims=(4, 4, 4, 4), stem_stride=2,
                                   rngs=rngs, **kw)
    gray = jnp.zeros((4, 16, 16, 1))
    with pytest.raises(ValueError, match=re.escape(
            f"This {name} was built for 3-channel images (in_channels=3), got images of shape "
            f"(4, 16, 16, 1) with 1: build it with in_channels=1.")):
        make()(gray)
    assert make(in_channels=1)(gray).shape == (4, 3)


def test_nnx_vit_names_image_size_for_images_of_another_size():
    # The NNX ViT sizes its position embedding when built (image_size=224 unless told); CIFAR
    # images into the default were told only to "build a new model for this size".
    vit_nnx = nnx_layers.ViT(3, rngs=nnx.Rngs(params=0, stochastic_depth=1), **VIT)
    with pytest.raises(ValueError, match=r"32x32 images with patch 4 give 65 tokens, but this "
                                         r"model's position embedding has 3137: use the image "
                                         r"size the model was built for, or build it with "
                                         r"image_size=32\."):
        vit_nnx(jnp.zeros((2, 32, 32, 3)))


def test_load_linen_params_refuses_an_nnx_model_with_parameters_the_linen_one_lacks():
    # A Linen ConvNeXt without layer scale (layer_scale_init=0) loaded into the NNX default
    # (1e-6): every Linen parameter found its place, the NNX gammas kept 1e-6, and the two
    # models gave different logits without a word.
    images = jax.random.normal(jax.random.key(5), (2, 16, 16, 3))
    tiny = dict(depths=(1, 1, 1, 1), dims=(4, 4, 4, 4), stem_stride=2)
    linen = sdj.ConvNeXt(3, layer_scale_init=0.0, **tiny)
    variables = linen.init(jax.random.key(0), images, train=False)
    scaled = nnx_layers.ConvNeXt(3, rngs=nnx.Rngs(0), **tiny)
    before = jax.tree.leaves(nnx.state(scaled, nnx.Param))
    with pytest.raises(ValueError, match=re.escape(
            "The NNX ConvNeXt has parameters the Linen model lacks (blocks/0/drop_path/branch/"
            "gamma, blocks/1/drop_path/branch/gamma, blocks/2/drop_path/branch/gamma, ...): "
            "build it as the Linen one (pool, layer_scale_init, architecture).")):
        nnx_layers.load_linen_params(scaled, variables["params"])
    after = jax.tree.leaves(nnx.state(scaled, nnx.Param))
    assert all(np.array_equal(a, b) for a, b in zip(before, after))  # nothing copied
    plain = nnx_layers.ConvNeXt(3, layer_scale_init=0.0, rngs=nnx.Rngs(0), **tiny)
    nnx_layers.load_linen_params(plain, variables["params"])
    np.testing.assert_allclose(plain(images, deterministic=True),
                               linen.apply(variables, images, train=False), atol=1e-6)


def test_every_public_callable_has_its_own_docstring():
    # help(sdj.ResNet152) showed functools.partial's docstring ("partial(func, *args,
    # **keywords) - new function with partial application ..."), nothing about the model.
    for name in sdj.__all__:
        obj = getattr(sdj, name)
        if not callable(obj) or isinstance(obj, type) and issubclass(obj, Warning):
            continue
        doc = obj.__doc__ or ""
        assert doc.strip() and doc != type(obj).__doc__, name
    assert "stage_sizes=(3, 8, 36, 3)" in sdj.ResNet152.__doc__


def test_a_branch_of_the_other_flax_api_or_a_class_is_refused_in_one_line():
    # An NNX branch in the Linen wrapper ran as a constant closure: init gave {} and its
    # parameters were never trained. A Linen branch in the NNX wrapper failed at its first
    # call with "Can't call compact methods on unbound modules"; a class instead of an
    # instance with "Could not convert Dense(features=Array(...".
    with pytest.raises(TypeError, match=r"StochasticDepth \(Linen\) got an NNX module \(Linear\)"
                                        r".*use stochastic_depth_jax\.nnx_layers\."
                                        r"StochasticDepth \(or DropPath\) for NNX branches\."):
        sdj.StochasticDepth(nnx.Linear(6, 6, rngs=nnx.Rngs(0)), survival_prob=0.8).init(
            jax.random.key(0), X, deterministic=True)
    with pytest.raises(TypeError, match=r"got the class Dense as its branch, not a module: "
                                        r"pass an instance, e\.g\. StochasticDepth\(Dense\("
                                        r"\.\.\., parent=None\)\)\."):
        sdj.StochasticDepth(nn.Dense, survival_prob=0.8).init(jax.random.key(0), X,
                                                              deterministic=True)
    for make in (nnx_layers.StochasticDepth, nnx_layers.DropPath):
        with pytest.raises(TypeError, match=r"StochasticDepth \(NNX\) got a Linen module "
                                            r"\(Dense\) as its branch: use sdj\.StochasticDepth "
                                            r"\(Linen\) inside Linen models, or convert it, "
                                            r"flax\.nnx\.bridge\.ToNNX"):
            make(nn.Dense(6), 0.2, rngs=nnx.Rngs(0))
        with pytest.raises(TypeError, match=r"got the class Linear as its branch, not a module: "
                                            r"pass an instance, e\.g\. Linear\(\.\.\., "
                                            r"rngs=rngs\)\."):
            make(nnx.Linear, 0.2, rngs=nnx.Rngs(0))
    # Functions and modules of the wrapper's own API still work, in both.
    sdj.StochasticDepth(F, survival_prob=0.8).apply({}, X, deterministic=False,
                                                    rngs={"stochastic_depth": jax.random.key(1)})
    nnx_layers.DropPath(F, 0.2, rngs=nnx.Rngs(0))(X)
    nnx_layers.DropPath(NnxDense(nnx.Rngs(0)), 0.2, rngs=nnx.Rngs(0))(X)


def test_nnx_wrapper_in_a_plain_lax_scan_over_a_closed_over_model_names_nnx_scan():
    # Was NNX's "Cannot mutate RngCount (Param, BatchStat) from a different trace level",
    # naming neither the scan nor the fix.
    class NnxNormed(nnx.Module):
        def __init__(self, rngs):
            self.dense, self.bn = nnx.Linear(6, 6, rngs=rngs), nnx.BatchNorm(6, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.dense(x))

    keys = jax.random.split(jax.random.key(0), 3)
    for make, per_call_key in ((lambda: nnx_layers.StochasticDepth(
            NnxDense(nnx.Rngs(0)), 0.5, rngs=nnx.Rngs(stochastic_depth=1)), False),
            (lambda: nnx_layers.StochasticDepth(NnxNormed(nnx.Rngs(0)), 0.5), True),
            (lambda: nnx_layers.DropPath(NnxNormed(nnx.Rngs(0)), 0.5), True)):
        model = make()

        @nnx.jit
        def run(model, xs, keys):
            def body(total, x_key):
                x, key = x_key
                return total + model(x, rngs=key if per_call_key else None).sum(), None
            return jax.lax.scan(body, 0.0, (xs, keys))[0]

        with pytest.raises(flax.errors.TraceContextError,
                           match=rf"^{type(model).__name__} ran inside a JAX transform \(jax.lax"
                                 r".scan, .*: use NNX's transform instead \(nnx.scan, ") as info:
            run(model, jnp.stack([X[:, 0]] * 3), keys)
        assert "\n" not in str(info.value) and "https://" not in str(info.value)
        assert str(info.value).endswith("from a different trace level).")
    # What updates nothing (an evaluation) still runs there, as before.
    model.eval()
    assert run(model, jnp.stack([X[:, 0]] * 3), keys).shape == ()


def test_nnx_wrapper_closed_over_by_nnx_jit_names_passing_the_model():
    """nnx.jit(lambda x: model(x)), the model closed over (a common first try), was told to
    "use NNX's transform instead (nnx.scan, ...)", which it did: the line says to pass the
    model to the transform, which runs and advances the model's key counter."""
    model = nnx_layers.DropPath(NnxDense(nnx.Rngs(0)), 0.5, rngs=nnx.Rngs(stochastic_depth=1))
    x = X[:, 0]
    for closing_over in (nnx.jit(lambda v: model(v)), nnx.grad(lambda v: model(v).sum())):
        with pytest.raises(flax.errors.TraceContextError,
                           match=r"^DropPath ran inside a JAX transform .*or an NNX one not "
                                 r"given the model\).*and pass it the model as an argument "
                                 r"\(one closed over, by nnx.jit too, is not carried\)"):
            closing_over(x)
    assert nnx.jit(lambda m, v: m(v))(model, x).shape == x.shape
    assert int(model.rngs.count[...]) == 1


def test_nnx_wrapper_merged_from_a_state_not_differentiated_names_merge_with_copy():
    # jax.grad / jax.jacfwd of the input only, the model merged inside from a state they do
    # not differentiate: nnx.merge reuses the state's Variables, the wrapper's nnx.cond
    # cannot write its branch back into them, and the line named "nnx.merge it inside the
    # function", which is what was done. It names copy=True now, which runs.
    key = next(jax.random.key(s) for s in range(32)
               if bool(ops.draw_gate(jax.random.key(s), 0.5)))  # kept
    graphdef, state = nnx.split(nnx_layers.StochasticDepth(NnxDense(nnx.Rngs(0)), 0.5))

    def loss(copy):
        return lambda s, x: jnp.sum(nnx.merge(graphdef, s, copy=copy)(x, rngs=key) ** 2)

    line = (r"^StochasticDepth ran inside a JAX transform .*jax.grad, .*merge it inside the "
            r"function with nnx\.merge\(graphdef, state, copy=True\) \(without copy=True a "
            r"state closed over, or one jax.grad / jax.jacfwd do not differentiate, keeps")
    for transform in (jax.grad, jax.jacfwd):
        with pytest.raises(flax.errors.TraceContextError, match=line):
            transform(loss(False), argnums=1)(state, X)
    got = jax.grad(loss(True), argnums=1)(state, X)
    model = nnx.merge(graphdef, state)
    want = nnx.grad(lambda m, x: jnp.sum(m(x, rngs=key) ** 2), argnums=1)(model, X)
    assert float(jnp.abs(want).sum()) > 0
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("transform", ["jit", "scan"])
def test_nnx_wrapper_merged_from_a_closed_over_state_names_merge_with_copy(transform):
    """The state split outside and closed over by a jax.jit or jax.lax.scan body that merges
    it: the line named copy=True only for jax.grad / jax.jacfwd of the input only, and
    "nnx.merge it inside the function", which is what was done. copy=True runs there too."""
    key = next(jax.random.key(s) for s in range(32)
               if bool(ops.draw_gate(jax.random.key(s), 0.5)))  # kept
    graphdef, state = nnx.split(nnx_layers.StochasticDepth(NnxDense(nnx.Rngs(0)), 0.5))

    def run(copy):
        def forward(x):
            return nnx.merge(graphdef, state, copy=copy)(x, rngs=key)
        if transform == "jit":
            return jax.jit(forward)(X)
        return jax.lax.scan(lambda c, x: (c, forward(x)), 0, X[None])[1][0]

    with pytest.raises(flax.errors.TraceContextError,
                       match=r"nnx\.merge\(graphdef, state, copy=True\) \(without copy=True "
                             r"a state closed over, .*keeps the variables of the level outside; "
                             r"with it, return nnx.state\(copy\) and nnx.update the model, or "
                             r"the copy's key counters and BatchNorm statistics are lost\)"):
        run(False)
    np.testing.assert_allclose(run(True), nnx.merge(graphdef, state)(X, rngs=key), rtol=1e-5)


def test_nnx_merge_with_copy_advice_keeps_the_counters_and_statistics_it_names():
    """The line's copy=True advice did not say that the copy's updates (its key counter,
    BatchNorm statistics) stay in the copy: it says now to return its state and update the
    model, and doing so keeps them."""
    class Normed(nnx.Module):
        def __init__(self, rngs):
            self.dense, self.bn = nnx.Linear(6, 6, rngs=rngs), nnx.BatchNorm(6, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.dense(x))

    model = nnx_layers.DropPath(Normed(nnx.Rngs(0)), 0.5, rngs=nnx.Rngs(stochastic_depth=1))
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        copy = nnx.merge(graphdef, state, copy=True)
        return copy(x), nnx.state(copy)

    _, new = forward(state, X[:, 0])
    assert int(model.rngs.count[...]) == 0  # lost unless returned
    nnx.update(model, new)
    assert int(model.rngs.count[...]) == 1
    assert float(jnp.abs(model.branch.bn.mean[...]).sum()) > 0


def test_nnx_branch_running_its_own_plain_scan_gets_nnx_words_not_the_wrappers_line():
    """A branch whose own code runs a plain jax.lax.scan over its BatchNorm (NNX refuses the
    update) was said to be the wrapper's doing, "StochasticDepth ran inside a JAX
    transform", though the wrapper ran outside every transform: NNX's own error is left."""
    class ScanningBranch(nnx.Module):
        def __init__(self, rngs):
            self.dense, self.bn = nnx.Linear(6, 6, rngs=rngs), nnx.BatchNorm(6, rngs=rngs)

        def __call__(self, x):
            return jax.lax.scan(lambda c, v: (c, self.bn(self.dense(v))), 0, x[None])[1][0]

    key = next(jax.random.key(s) for s in range(32)
               if bool(ops.draw_gate(jax.random.key(s), 0.5)))  # kept
    for implementation in ("skip", "mask"):
        sd = nnx_layers.StochasticDepth(ScanningBranch(nnx.Rngs(0)), 0.5,
                                        implementation=implementation)
        for call in (lambda m: m(X, rngs=key), nnx.jit(lambda m: m(X, rngs=key))):
            with pytest.raises(flax.errors.TraceContextError) as info:
                call(sd)
            assert not isinstance(info.value, nnx_layers._TransformError)
            assert str(info.value).startswith("Cannot mutate BatchStat from a different trace")


@pytest.mark.parametrize("name", ["CifarResNet", "WideResNet", "ResNet", "BasicBlock"])
def test_monte_carlo_depth_without_its_rng_names_the_stream_not_training(name):
    # train=False, stochastic=True samples a sub-network at test time: a missing stream was
    # reported as training's, with the advice to evaluate with train=False, which was given.
    module, args = _FLAGGED[name]
    module = module()
    x = jnp.zeros((2, 8, 8, 4 if name == "BasicBlock" else 3))
    v = module.init(jax.random.key(0), x, *args, train=False)
    message = ("Monte-Carlo depth (train=False, stochastic=True) samples a sub-network from "
               "the rng stream 'stochastic_depth', which apply() was not given: pass "
               "rngs={'stochastic_depth': key} to apply() (a new key per sample, e.g. "
               "jax.random.fold_in(key, i)), or stochastic=False for the deterministic "
               "network.")
    with pytest.raises(ValueError) as caught:
        module.apply(v, x, *args, train=False, stochastic=True)
    assert str(caught.value) == message
    # With the stream, it runs; in training the message stays training's.
    module.apply(v, x, *args, train=False, stochastic=True,
                 rngs={"stochastic_depth": jax.random.key(1)})
    with pytest.raises(ValueError, match=r"^Training \(train=True"):
        module.apply(v, x, *args, train=True, mutable=["batch_stats"])


_SIZED = {"CifarResNet": (sdj.CifarResNet, dict(depth=8), 16, 10),
          "WideResNet": (sdj.WideResNet, dict(depth=10, widen_factor=1), 16, 10),
          "ResNet": (sdj.ResNet, dict(stage_sizes=(1, 1)), 64, 1000)}


@pytest.mark.parametrize("name", sorted(_SIZED))
@pytest.mark.parametrize("field", ["width", "num_classes"])
@pytest.mark.parametrize("value", [0, -4, 2.5, 4.0, True, "8"])
def test_a_width_or_class_count_that_is_not_a_positive_integer_is_one_clear_error(
        name, field, value):
    # 0 failed in the initialisers with a bare "ZeroDivisionError: float division by zero",
    # a negative or fractional one in XLA's or JAX's shape checks; True ran as 1.
    cls, kw, width, classes = _SIZED[name]
    default = width if field == "width" else classes
    message = f"{name} {field} must be a positive integer (default {default}), got {value!r}."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        cls(**kw, **{field: value})


@pytest.mark.parametrize("name", sorted(_SIZED))
def test_numpy_integer_sizes_are_taken_as_the_ints_they_hold(name):
    # A depth from np.arange (a sweep) was refused as not 6n+2 with itself as the nearest
    # valid depth; widen_factor, width and num_classes are kept as Python ints too.
    cls, kw, _, _ = _SIZED[name]
    if "depth" in kw:
        kw = {**kw, "depth": np.int64(kw["depth"])}
    if name == "WideResNet":
        kw = {**kw, "widen_factor": np.int64(1)}
        with pytest.raises(ValueError, match=r"^widen_factor must be an integer >= 1, got True"):
            cls(**{**kw, "widen_factor": True})  # ran as 1
    model = cls(**kw, width=np.int64(4), num_classes=np.int32(3))
    fields = ["width", "num_classes"] + [f for f in ("depth", "widen_factor") if f in kw]
    assert all(type(getattr(model, f)) is int for f in fields)
    assert model == cls(**{k: int(v) if k != "stage_sizes" else v for k, v in kw.items()},
                        width=4, num_classes=3)


@pytest.mark.parametrize("name", sorted(_SIZED))
@pytest.mark.parametrize("value", ["0.5", True, np.True_, b"0.5"])
def test_a_survival_prob_that_is_not_a_number_is_one_clear_error(name, value):
    # '0.5' was read by float() and kept as the string (recorded so, compared so); True was
    # read as 1.0: constant depth, silently.
    cls, kw, _, _ = _SIZED[name]
    message = (f"final_survival_prob must be a number in (0, 1] (e.g. 0.5), got {value!r} "
               f"({type(value).__name__}).")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        cls(**kw, final_survival_prob=value)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        sdj.linear_decay(4, value)


@pytest.mark.parametrize("name", sorted(_SIZED))
@pytest.mark.parametrize("value", ["0.3", False, True, None, (0.3,)])
def test_a_dropout_rate_that_is_not_a_number_is_one_clear_error(name, value):
    # '0.3' failed in Flax's dropout with a bare TypeError; False ran as no dropout.
    cls, kw, _, _ = _SIZED[name]
    message = (f"dropout_rate must be in [0, 1) (a number, e.g. 0.3; 0: no dropout), "
               f"got {value!r}.")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        cls(**kw, dropout_rate=value)
