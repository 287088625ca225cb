"""NNX users wrap the Linen model with flax.nnx.bridge."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import bridge

import stochastic_depth_jax as sdj


def test_nnx_bridge_trains_and_evaluates():
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    model = bridge.ToNNX(sdj.CifarResNet(depth=8, width=4, num_classes=3),
                         rngs=nnx.Rngs(params=0, stochastic_depth=1))
    bridge.lazy_init(model, x, train=False)
    before = jax.tree_util.tree_leaves(nnx.state(model, nnx.BatchStat))
    logits = model(x, train=True, mutable=["batch_stats"])
    after = jax.tree_util.tree_leaves(nnx.state(model, nnx.BatchStat))
    assert logits.shape == (4, 3)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))  # stats updated
    y1, y2 = model(x, train=False), model(x, train=False)
    np.testing.assert_array_equal(y1, y2)

    def loss(m):
        return jnp.mean(m(x, train=True, mutable=["batch_stats"]) ** 2)

    grads = nnx.grad(loss)(model)
    assert any(np.abs(np.asarray(g)).sum() > 0 for g in jax.tree_util.tree_leaves(grads))
