"""Per-epoch example order as a keyed pseudo-random permutation, computed per batch.

`jax.random.permutation` sorts all N keys; inside every train step that costs
24 ms for CIFAR's 45k and ~0.4 s for SVHN's 600k on a CPU. A keyed Feistel
network is a bijection we can evaluate at just the batch's B positions: O(B) per
step, whatever N is, and still a pure function of (key, epoch, position).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Luby-Rackoff: 4 rounds already give a pseudo-random permutation; 6 for margin.
_ROUNDS = 6


def _mix32(x: jax.Array) -> jax.Array:
    """A well-mixing uint32 hash (Wellons' 'lowbias32'); uint32 ops wrap mod 2**32."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _half_bits(num_examples: int) -> int:
    """Bits per Feistel half: the smallest h with 4**h >= num_examples."""
    bits = max(1, (num_examples - 1).bit_length())
    return (bits + 1) // 2


def _feistel(x: jax.Array, round_keys: jax.Array, half: int) -> jax.Array:
    """A bijection of [0, 4**half) for uint32 x of any shape."""
    mask = jnp.uint32((1 << half) - 1)
    left, right = x >> half, x & mask
    for r in range(_ROUNDS):
        left, right = right, left ^ (_mix32(right ^ round_keys[r]) & mask)
    return (left << half) | right


def permute(key: jax.Array, positions: jax.Array, num_examples: int) -> jax.Array:
    """Images of `positions` under a key-defined permutation of [0, num_examples).

    Args:
      key: jax PRNG key selecting the permutation (e.g. fold_in(k, epoch)).
      positions: int [B], values in [0, num_examples).
      num_examples: N (static), N < 2**31.

    Returns:
      int32 [B]: distinct positions map to distinct examples, and
      positions 0..N-1 together map onto all of 0..N-1.
    """
    if not 0 < num_examples < 2**31:
        raise ValueError(f"num_examples must be in [1, 2**31), got {num_examples}.")
    half = _half_bits(num_examples)
    round_keys = jax.random.bits(key, (_ROUNDS,), jnp.uint32)

    def one(position):
        # Cycle walking: re-apply the bijection of [0, 4**half) until the value
        # lands in [0, N); this restricts it to a bijection of [0, N).
        first = _feistel(position.astype(jnp.uint32), round_keys, half)
        return jax.lax.while_loop(lambda y: y >= num_examples,
                                  lambda y: _feistel(y, round_keys, half), first)

    return jax.vmap(one)(positions).astype(jnp.int32)
