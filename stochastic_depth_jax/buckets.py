"""Compact mode's scan lengths: which static lengths a stage's kept-block count rounds up to.

Compact mode (``CifarResNet(...)(x, gates=g, buckets=b)``) gathers each stage's kept blocks
into a scan of static length; each distinct tuple of per-stage lengths is one compiled
program, and every slot beyond the kept count is a wasted (masked) block. Two ways to pick the
lengths a stage may use:

* ``multiple`` m: the kept count rounded up to a multiple of m (m, 2m, ..., capped at the
  stage's block count; 0 kept runs a scan of 1). Simple, blind to the schedule.
* ``count`` c (:func:`optimal_lengths`): the c lengths that minimise the expected padding
  for the stage's survival probabilities. The kept count K of blocks with probabilities
  p_1..p_n is Poisson-binomial; its exact distribution gives
  ``E[len(K) - K]`` for any set of lengths, minimised by dynamic programming. The lengths
  crowd where K is likely. ResNet-110, p_L 0.5, c = 3: stage 1 gets 15, 16, 17, stage 2
  12, 14, 17, stage 3 9, 12, 17; that pads 2.5 blocks a step where multiple 4 pads 3.7,
  with 27 programs (all of them used in the first epoch) against multiple 4's 52 over 500
  epochs, of which 9 first appear in epochs 2 and 3 and stall those epochs to compile.
  Multiple 4 stays the GPU default until a GPU measures fitted lengths.
  ``benchmarks/compact_buckets.py`` counts both exactly for a run's own gate draws.

Lengths are >= 1 (a scan of length 0 is not a program worth a separate compilation), and the
longest is always the stage's block count, so every draw has a length.
"""

from __future__ import annotations

import numpy as np

__all__ = ["kept_count_pmf", "expected_padding", "optimal_lengths", "round_up",
           "round_to_multiple", "expected_blocks",
           "stage_lengths", "stage_buckets", "check_buckets"]


def kept_count_pmf(probs) -> np.ndarray:
    """P(K = k) for k = 0..n, K the number of n independent blocks kept; float64 ``[n + 1]``.

    Args:
      probs: survival probabilities ``[n]``, each in [0, 1].
    """
    pmf = np.ones(1)
    for p in np.asarray(probs, np.float64).ravel():
        pmf = np.convolve(pmf, [1.0 - p, p])
    return pmf


def expected_padding(pmf: np.ndarray, lengths) -> float:
    """``E[round_up(K, lengths) - K]`` for K with distribution ``pmf`` ``[n + 1]``."""
    ks = np.arange(len(pmf))
    return float(sum(p * (round_up(int(k), lengths) - k) for k, p in zip(ks, pmf) if p > 0))


def optimal_lengths(probs, count: int) -> tuple[int, ...]:
    """The ``count`` scan lengths (sorted, all in 1..n, the last n) of least expected padding.

    Args:
      probs: survival probabilities of the stage's scanned blocks, ``[n]``, n >= 1.
      count: how many lengths (programs per stage) to allow, >= 1; capped at n.

    Returns:
      the lengths; fewer than ``count`` when some would never be used.
    """
    if int(count) < 1:
        raise ValueError(f"count must be >= 1, got {count!r}.")
    pmf = kept_count_pmf(probs)
    n = len(pmf) - 1
    if n < 1:
        raise ValueError("optimal_lengths needs at least one block.")
    count = min(int(count), n)
    # cost[a][b]: every k in a..b rounded up to max(b, 1); tops are 1..n, k = 0 joins the first.
    cum_p, cum_kp = np.cumsum(pmf), np.cumsum(pmf * np.arange(n + 1))

    def cost(a: int, b: int) -> float:  # sum over k in [a, b] of p_k (b - k)
        p = cum_p[b] - (cum_p[a - 1] if a else 0.0)
        kp = cum_kp[b] - (cum_kp[a - 1] if a else 0.0)
        return b * p - kp

    inf = float("inf")
    # best[j][b]: least padding covering k = 0..b with j lengths, the largest being b.
    best = np.full((count + 1, n + 1), inf)
    back = np.zeros((count + 1, n + 1), int)
    for b in range(1, n + 1):
        best[1][b] = cost(0, b)
    for j in range(2, count + 1):
        for b in range(j, n + 1):
            for a in range(j - 1, b):
                v = best[j - 1][a] + cost(a + 1, b)
                if v < best[j][b]:
                    best[j][b], back[j][b] = v, a
    j = int(np.argmin(best[1:, n])) + 1  # a smaller count can tie (unused lengths)
    out, b = [], n
    while j >= 1:
        out.append(b)
        b, j = back[j][b], j - 1
    return tuple(sorted({int(b) for b in out}))


def round_up(kept: int, lengths) -> int:
    """The shortest of ``lengths`` that holds ``kept`` blocks (at least the shortest length)."""
    for length in lengths:
        if length >= kept:
            return int(length)
    raise ValueError(f"{kept} kept blocks exceed the longest scan length {max(lengths)}.")


def round_to_multiple(kept: int, multiple: int, limit: int) -> int:
    """``kept`` rounded up to a multiple of ``multiple``, capped at ``limit``, at least 1."""
    return max(1, min(limit, -(-kept // multiple) * multiple))


def stage_buckets(gates, stage_sizes, scanned, multiple: int = 4, lengths=None) -> tuple[int, ...]:
    """Per stage, the static scan length for its kept blocks after the first (0 if unscanned).

    Args:
      gates: bool ``[L]``, host-side.
      stage_sizes: blocks per stage (summing to L); scanned: per stage, bool.
      multiple: round each kept count up to a multiple of this (capped at the stage's
        scanned block count, at least 1) ...
      lengths: ... or, if given, to the shortest of the stage's ``lengths[i]`` that holds it.
    """
    if lengths is None:
        if not isinstance(multiple, (int, np.integer)) or multiple < 1:
            raise ValueError(f"multiple must be an integer >= 1, got {multiple!r}.")
    else:
        _check_lengths(lengths, stage_sizes, scanned)
    gates = np.asarray(gates, bool)
    if gates.shape != (sum(stage_sizes),):  # e.g. mode='sample' gates, or another model's
        raise ValueError(f"gates must be one per block, shape ({sum(stage_sizes)},) (compact "
                         f"mode needs mode='batch'), got shape {gates.shape}.")
    out, start = [], 0
    for i, (n, scan) in enumerate(zip(stage_sizes, scanned)):
        if not scan:
            out.append(0)
        else:
            kept = int(gates[start + 1:start + n].sum())
            out.append(_scan_length(kept, n, multiple, None if lengths is None else lengths[i]))
        start += n
    return tuple(out)


def _scan_length(kept: int, n: int, multiple: int, lengths) -> int:
    """The scan length of a stage of ``n`` blocks keeping ``kept`` after its first: rounded
    up to one of the stage's ``lengths``, or else to a ``multiple`` (0: ``kept`` itself, as
    ``implementation='loop'`` runs it)."""
    if lengths is not None:
        return round_up(kept, lengths)
    return round_to_multiple(kept, multiple, n - 1) if multiple else kept


def expected_blocks(probs, stage_sizes, scanned, multiple: int = 0, lengths=None) -> float:
    """The residual blocks a training step is expected to compute where each scanned
    stage's kept blocks after its first are gathered into a scan (compact mode, or
    ``implementation='loop'``), and each stage's first block and every block of an
    unscanned stage compute in full (masked): per scanned stage, 1 + E[its scan length]
    over the kept count's distribution (:func:`kept_count_pmf`), the scan length as
    :func:`stage_buckets` rounds it (``multiple`` or ``lengths``; ``multiple=0`` and no
    ``lengths``: the kept count itself, the loop's).

    Args:
      probs: every block's survival probability, ``[L]``.
      stage_sizes: blocks per stage (summing to L); scanned: per stage, bool.
      multiple, lengths: as :func:`stage_buckets`'s.
    """
    probs = np.asarray(probs, np.float64)
    total, start = 0.0, 0
    for i, (n, scan) in enumerate(zip(stage_sizes, scanned)):
        if not scan:
            total += n
        else:
            pmf = kept_count_pmf(probs[start + 1:start + n])
            stage = None if lengths is None else lengths[i]
            total += 1 + sum(p * _scan_length(k, n, multiple, stage) for k, p in enumerate(pmf))
        start += n
    return float(total)


def stage_lengths(probs, stage_sizes, scanned, count: int) -> tuple[tuple[int, ...], ...]:
    """Per stage, :func:`optimal_lengths` for its blocks after the first (``()`` if unscanned).

    Args:
      probs: every block's survival probability, ``[L]``.
      stage_sizes: blocks per stage (summing to L); scanned: per stage, bool.
      count: lengths (compiled programs) allowed per scanned stage.
    """
    probs = np.asarray(probs, np.float64)
    out, start = [], 0
    for n, scan in zip(stage_sizes, scanned):
        out.append(optimal_lengths(probs[start + 1:start + n], count) if scan else ())
        start += n
    return tuple(out)


_FIX = "compute them with model.compact_lengths(c) for this model"


def _check_lengths(lengths, stage_sizes, scanned) -> None:
    """ValueError unless ``lengths`` has one sorted tuple per stage, each scanned stage's in
    1..n-1 and ending at n-1 (n the stage's block count), an unscanned stage's empty."""
    if len(lengths) != len(stage_sizes):
        raise ValueError(f"lengths has {len(lengths)} entries for {len(stage_sizes)} stages; "
                         f"{_FIX}.")
    for i, (ls, n, scan) in enumerate(zip(lengths, stage_sizes, scanned)):
        if any(not _is_count(v) for v in ls):  # 16.5 read as 16
            raise ValueError(f"lengths[{i}]={tuple(ls)} must be integer scan lengths; {_FIX}.")
        ls = tuple(int(v) for v in ls)
        want = f"sorted lengths in 1..{n - 1} ending at {n - 1}" if scan else "no lengths"
        ok = (ls == tuple(sorted(set(ls))) and ls and ls[0] >= 1 and ls[-1] == n - 1
              if scan else not ls)
        if not ok:
            raise ValueError(f"lengths[{i}]={ls} but stage {i + 1} needs {want}; {_FIX}.")


def _is_count(value) -> bool:
    """Whether ``value`` is an integer (Python, NumPy, a 0-d integer array; not a bool):
    ``int()`` would round a float down to a shorter scan."""
    if isinstance(value, (bool, np.bool_)):
        return False
    dtype = getattr(value, "dtype", None)
    return isinstance(value, (int, np.integer)) or (
        dtype is not None and np.ndim(value) == 0 and np.issubdtype(dtype, np.integer))


def check_buckets(buckets, stage_sizes, scanned, gates=None) -> tuple[int, ...]:
    """``buckets`` as ints; ValueError unless one per stage, in 1..n-1 (0 if unscanned), and,
    for host-side ``gates`` (bool ``[L]``; None or traced: not checked), each holding its
    stage's kept count: a shorter scan would silently run only the first kept blocks."""
    if any(not _is_count(b) for b in buckets):  # 2.9 ran as 2: one kept block not run
        raise ValueError(f"buckets must be integer scan lengths, got {tuple(buckets)}; compute "
                         "them with model.compact_buckets(gates, ...).")
    buckets = tuple(int(b) for b in buckets)
    if len(buckets) != len(stage_sizes):
        raise ValueError(f"buckets has {len(buckets)} entries for {len(stage_sizes)} stages; "
                         "compute them with model.compact_buckets(gates, ...).")
    for i, (b, n, scan) in enumerate(zip(buckets, stage_sizes, scanned)):
        if (scan and not 1 <= b <= n - 1) or (not scan and b != 0):
            want = f"1..{n - 1}" if scan else "0 (the stage is not scanned)"
            raise ValueError(f"buckets[{i}]={b} but stage {i + 1} needs {want}; compute them "
                             "with model.compact_buckets(gates, ...).")
    if gates is not None:
        _check_buckets_hold(buckets, stage_sizes, scanned, np.asarray(gates))
    return buckets


def _check_buckets_hold(buckets, stage_sizes, scanned, gates: np.ndarray) -> None:
    """ValueError where a scanned stage keeps more blocks (after its first) than its bucket."""
    if gates.shape != (sum(stage_sizes),):
        return  # the model refuses the gates' shape itself
    start = 0
    for i, (b, n, scan) in enumerate(zip(buckets, stage_sizes, scanned)):
        kept = int(np.count_nonzero(gates[start + 1:start + n]))
        if scan and kept > b:
            raise ValueError(f"buckets[{i}]={b} but the gates keep {kept} of stage {i + 1}'s "
                             f"scanned blocks (a scan of {b} would drop the rest); compute "
                             "buckets from these gates with model.compact_buckets(gates, ...).")
        start += n
