"""The wrappers inside users' own NNX models, written the way the Flax NNX guides write them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import stochastic_depth_jax as sdj
from stochastic_depth_jax import convnext, nnx_layers, vit

X = jnp.zeros((4, 3))


class One(nnx.Module):
    """A branch whose output is 1 everywhere (with a parameter), so a layer's residual shows
    its gate times its scale."""

    def __init__(self, rngs):
        self.dense = nnx.Linear(3, 3, rngs=rngs)

    def __call__(self, x):
        return jnp.ones_like(x) + 0.0 * self.dense(x)


def test_nnx_rngs_with_only_a_default_seed_draws_gates_as_nnx_dropout_does():
    # nnx.Rngs(0), as every Flax NNX guide builds a model, serves any stream from 'default'
    # (nnx.Dropout draws its masks from it); the wrappers and models train with it too.
    rngs = nnx.Rngs(0)
    drop = nnx_layers.DropPath(One(rngs), rate=0.5, rngs=rngs)
    dropout = nnx.Dropout(0.5, rngs=rngs)
    x = jnp.zeros((8, 3))
    kept = [np.asarray(drop(x)[:, 0] != 0) for _ in range(4)]
    assert all(k.sum() == 4 for k in kept)                        # k = 4 of 8, each call
    assert len({tuple(k) for k in kept}) > 1                      # a fresh subset per call
    assert dropout(jnp.ones((8, 3))).shape == (8, 3)
    vit = nnx_layers.ViT(3, size="ti", depth=1, width=8, num_heads=2, patch_size=8,
                         image_size=16, drop_path_rate=0.5, rngs=nnx.Rngs(0))
    assert vit(jnp.zeros((4, 16, 16, 3))).shape == (4, 3)


def test_nnx_scanned_stack_takes_each_layers_rate_at_call_time():
    # Per-layer rates (the paper's linear decay) in a stack made with nnx.vmap and run with
    # nnx.scan: each layer's survival_prob is a scanned input. Evaluation scales layer l by
    # p_l; in training a layer with p = 1 is always kept and one with p ~ 0 always dropped.
    @nnx.split_rngs(splits=4)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return nnx_layers.StochasticDepth(One(rngs), rngs=rngs)

    stack = make(nnx.Rngs(params=0, stochastic_depth=1))

    @nnx.jit
    def residuals(stack, probs):
        @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def body(layer, h, p):
            y = layer(h, survival_prob=p)
            return h + y, y[0, 0]
        return body(stack, X, probs)[1]

    probs = jnp.asarray(sdj.linear_decay(4, 0.5))
    assert np.allclose(residuals(stack, jnp.array([1.0, 1e-7, 1.0, 1e-7])), [1, 0, 1, 0])
    stack.eval()
    np.testing.assert_allclose(residuals(stack, probs), probs, rtol=1e-6)


def test_nnx_view_and_view_info_see_the_wrappers_and_models():
    # nnx.view sets `deterministic` through set_view; nnx.view_info documents set_view from
    # its docstring's Args section (a set_view without one made it raise KeyError).
    rngs = nnx.Rngs(params=0, stochastic_depth=1)
    drop = nnx_layers.DropPath(One(rngs), rate=0.5, rngs=rngs)
    vit = nnx_layers.ViT(3, size="ti", depth=1, width=8, num_heads=2, patch_size=8,
                         image_size=16, drop_path_rate=0.5, rngs=rngs)
    cnx = nnx_layers.ConvNeXt(3, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), stem_stride=1,
                              drop_path_rate=0.5, rngs=rngs)
    for model, name in ((drop, "DropPath"), (vit, "ViT"), (cnx, "ConvNeXt")):
        info = nnx.view_info(model)
        assert f"{name}:\n  deterministic: bool | None = None\n" in info, info
        assert "evaluation" in info.split(f"{name}:")[1].split(":\n")[0], info
        evaluation = nnx.view(model, deterministic=True)
        assert evaluation.deterministic and not model.deterministic
    x = jnp.ones((8, 3))
    np.testing.assert_array_equal(nnx.view(drop, deterministic=True)(x), 1.0)


def test_a_block_built_from_a_default_seed_names_its_ways_to_gates():
    # The blocks draw only from a 'stochastic_depth' stream (or take gates from their model);
    # built from nnx.Rngs(0) a training call said "call with rngs=key", which they do not take.
    x, images = jnp.ones((4, 4, 8)), jnp.ones((4, 4, 4, 8))
    blocks = [nnx_layers.EncoderBlock(8, 2, 16, 0.5, rngs=nnx.Rngs(0)),
              nnx_layers.ConvNeXtBlock(8, 0.5, rngs=nnx.Rngs(0))]
    for block, x in zip(blocks, (x, images)):
        with pytest.raises(ValueError, match=f"{type(block).__name__} in training needs gates "
                                             "or a 'stochastic_depth' stream: build it with "
                                             r"nnx.Rngs\(params=..., stochastic_depth=seed\)"):
            block(x)
        assert block(x, deterministic=True).shape == x.shape
    key = jax.random.key(0)
    gates = vit.block_gates(key, 0, 0.5, mode="sample", implementation="skip", batch_size=4,
                            groups=1)
    assert blocks[0](jnp.ones((4, 4, 8)), gates).shape == (4, 4, 8)
    gate = convnext.block_gate(key, 0, 0.5, mode="sample", implementation="skip", batch_size=4,
                               groups=1)
    assert blocks[1](images, gate).shape == images.shape
    streamed = nnx_layers.ConvNeXtBlock(8, 0.5, rngs=nnx.Rngs(params=0, stochastic_depth=1))
    assert streamed(images).shape == images.shape
