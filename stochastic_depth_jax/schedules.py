"""Survival-probability schedules p_l for a network of L residual blocks.

Indexing follows the paper (Huang et al., 2016, Sec. 3, Eq. 4): blocks are counted
l = 1..L, so under linear decay the first block survives with probability just below 1
and the last with exactly ``p_L``. (timm and torchvision count from 0, which makes their
first block survive with probability exactly 1.)
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["linear_decay", "uniform", "survival_probabilities", "SCHEDULES"]


def _validate(num_blocks: int, final_survival_prob: float) -> None:
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)):
        raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}.")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
    if not _is_number(final_survival_prob):
        # float() read True as 1.0 (constant depth, silently; jnp.array(True) too) and '0.5'
        # as a number, which the model then recorded and compared as a string.
        raise ValueError(
            f"final_survival_prob must be a number in (0, 1] (e.g. 0.5), got "
            f"{final_survival_prob!r} ({type(final_survival_prob).__name__}).")
    if np.ndim(final_survival_prob):
        # A schedule (or a one-entry array) where p_L is meant: say so, not "not a number".
        raise ValueError(
            f"final_survival_prob must be one number, p_L (e.g. 0.5), got an array of shape "
            f"{np.shape(final_survival_prob)}; pass its value, e.g. float(p[-1]).")
    try:
        p = float(final_survival_prob)
    except (TypeError, ValueError):
        raise ValueError(
            f"final_survival_prob must be a number in (0, 1], got {final_survival_prob!r}."
        ) from None
    if math.isnan(p) or not 0.0 < p <= 1.0:
        raise ValueError(
            f"final_survival_prob must be in (0, 1] (the paper uses 0.5; 1.0 means constant "
            f"depth), got {final_survival_prob!r}."
        )


def _is_number(value: object) -> bool:
    """False for bools (Python, NumPy, or arrays of them such as ``jnp.array(True)``), text
    and complex values, whose ``float()`` is not the number meant (or is refused anyway)."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        return False
    dtype = getattr(value, "dtype", None)
    if dtype is None:  # a Python number, or something float() refuses
        return True
    try:
        kind = np.dtype(dtype).kind
    except TypeError:  # a dtype NumPy does not know (a PRNG key's): float() refuses it
        return True
    return kind not in "bUSc"


def linear_decay(num_blocks: int, final_survival_prob: float = 0.5) -> np.ndarray:
    """The paper's linear-decay rule, p_l = 1 - (l / L) (1 - p_L) for l = 1..L.

    Args:
      num_blocks: L, the number of residual blocks (54 for ResNet-110).
      final_survival_prob: p_L, survival probability of the last block; the paper uses 0.5.

    Returns:
      float64 array ``[num_blocks]``; entry ``l - 1`` is p_l.

    Raises:
      ValueError: if ``num_blocks < 1`` or ``final_survival_prob`` is not in (0, 1].
    """
    _validate(num_blocks, final_survival_prob)
    l = np.arange(1, num_blocks + 1, dtype=np.float64)
    return 1.0 - (l / num_blocks) * (1.0 - float(final_survival_prob))


def uniform(num_blocks: int, final_survival_prob: float = 0.5) -> np.ndarray:
    """The paper's uniform rule, p_l = p_L for every block (Sec. 3, compared in Fig. 8).

    Returns:
      float64 array ``[num_blocks]`` filled with ``final_survival_prob``.
    """
    _validate(num_blocks, final_survival_prob)
    return np.full((num_blocks,), float(final_survival_prob), dtype=np.float64)


SCHEDULES = {"linear": linear_decay, "uniform": uniform}


def survival_probabilities(
    rule: str, num_blocks: int, final_survival_prob: float
) -> np.ndarray:
    """Looks up a schedule by name (``'linear'`` or ``'uniform'``) and evaluates it.

    Returns:
      float64 array ``[num_blocks]`` of survival probabilities.

    Raises:
      ValueError: for an unknown rule name (the message lists the valid ones).
    """
    if rule not in SCHEDULES:
        raise ValueError(
            f"Unknown survival rule {rule!r}; valid rules are {sorted(SCHEDULES)}."
        )
    return SCHEDULES[rule](num_blocks, final_survival_prob)
