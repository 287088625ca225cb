"""The check that an NNX model and its Linen twin compute the same function."""
import jax
import numpy as np
from flax import nnx


def assert_nnx_matches_linen(linen, params, model, x, atol=1e-6):
    """``model`` (NNX, with ``params`` loaded) equals ``linen.apply({'params': params}, ...)``
    in training for two keys, and in evaluation; and the key matters (the check is not
    vacuous). Both models take ``(x, train/deterministic, key/rngs)`` as the ViT and
    ConvNeXt do."""
    linen_apply = jax.jit(linen.apply, static_argnames="train")
    nnx_apply = nnx.jit(lambda m, v, key, det: m(v, rngs=key, deterministic=det),
                        static_argnames="det")
    for seed in (5, 6):
        key = jax.random.key(seed)
        expected = linen_apply({"params": params}, x, train=True, key=key)
        np.testing.assert_allclose(nnx_apply(model, x, key, False), expected, rtol=1e-5,
                                   atol=atol)
    other = linen_apply({"params": params}, x, train=True, key=jax.random.key(7))
    assert not np.allclose(expected, other, atol=1e-4)  # the key matters
    np.testing.assert_allclose(nnx_apply(model, x, None, True),
                               linen_apply({"params": params}, x, train=False),
                               rtol=1e-5, atol=atol)
