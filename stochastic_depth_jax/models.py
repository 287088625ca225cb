"""The paper's networks: CIFAR ResNets of depth 6n+2 and bottleneck ImageNet ResNets.

Every residual block l = 1..L (counted over the whole network, as the paper) survives a
training mini-batch with probability p_l from :mod:`stochastic_depth_jax.schedules`. All L
gates are drawn at once from one key of the ``'stochastic_depth'`` rng stream, so the
scanned and unrolled forms of a model see the same gates for the same key.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings
from typing import Any, Iterator, Sequence

import flax.linen as nn
from flax.linen import transforms as linen_transforms
import jax
import jax.numpy as jnp
import numpy as np

from stochastic_depth_jax import buckets as buckets_lib
from stochastic_depth_jax import layers, ops, schedules
from stochastic_depth_jax.conv import Conv, stock_convs_under_forward_mode
from stochastic_depth_jax.kept_loop import kept_loop

__all__ = [
    "CifarResNet",
    "WideResNet",
    "ResNet",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "ResidualStages",
    "CIFAR_BLOCKS",
    "INITIALIZATIONS",
    "IMPLEMENTATIONS",
    "valid_cifar_depths",
]

Array = Any
ModuleDef = Any

CIFAR_BLOCKS = {"basic": layers.BasicBlock, "preact": layers.PreActBlock}

# ``implementation`` of the ResNets: the op's (``'skip'``: ``lax.cond`` per block, ``'mask'``)
# or ``'loop'``: each scanned stage runs its kept blocks in one loop of dynamic length
# (:func:`stochastic_depth_jax.kept_loop.kept_loop`), the other blocks masked.
LOOP = "loop"
IMPLEMENTATIONS = tuple(ops.IMPLEMENTATIONS) + (LOOP,)

# A stage with at least this many identical blocks is scanned when ``scan=None``.
AUTO_SCAN_MIN_BLOCKS = 8

# ``initialization`` of the ResNets: 'ours' (He on fan-out, BatchNorm scales 1, Flax's Dense)
# or 'official' (the official Torch code's, github.com/yueatsprograms/Stochastic_Depth:
# nninit's He on fan-in, cudnn.torch's BatchNorm scales uniform in [0, 1), nn.Linear's
# weight and bias uniform in +-1/sqrt(fan_in)).
INITIALIZATIONS = ("ours", "official")
_FAN_IN_KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _torch_linear_init(fan_in: int):
    """Torch's ``nn.Linear`` reset, for weight and bias alike: uniform in +-1/sqrt(fan_in)
    (the bias's bound comes from the layer's inputs, which its shape does not show)."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def valid_cifar_depths(limit: int = 1202) -> list[int]:
    """Depths 6n + 2 (n >= 1) up to ``limit``: 8, 14, 20, ..., 110, ..., 1202."""
    return [6 * n + 2 for n in range(1, (limit - 2) // 6 + 1)]


class _ScanBody(nn.Module):
    """One scanned block: carry ``x``, per-iteration inputs ``(p_l,)`` or ``(p_l, gate_l)``.

    ``preact``: the carry is the previous block's output before its activation; the block
    applies that activation first and returns its own output before activation (see
    :meth:`ResidualStages._preact_policy`).
    """

    block: ModuleDef
    train: bool
    constant: bool
    stochastic: bool | None = None
    preact: bool = False

    @nn.compact
    def __call__(self, x: Array, inputs: tuple) -> tuple[Array, None]:
        if self.preact:
            block = self.block(name="block", post_activation=False)
            x = block.act(x)
        else:
            block = self.block(name="block")
        kw = {"train": self.train, "stochastic": self.stochastic}
        if self.constant:
            return block(x, 1.0, None, **kw), None
        prob = inputs[0]
        gate = inputs[1] if len(inputs) > 1 else None
        return block(x, prob, gate, **kw), None


class _KeptLoop(nn.Module):
    """A scanned stage run as one loop over its kept blocks only (``implementation='loop'``).

    Reads the stage's stacked parameters and statistics (the layout ``_scanned_body``
    creates, under the same name) and runs :func:`kept_loop` over them: the kept blocks in
    order, each applied functionally, with open gates; the dropped ones not at all, forward
    or backward. Written back: the kept blocks' statistics (training only). ``policy``: each
    block rematerialised under this checkpoint policy (the block's ``remat``), so the loop
    stores per block only what the policy saves.
    """

    block: ModuleDef  # one scanned block, implementation 'mask' (gates are open here)
    train: bool
    policy: Any = None

    @nn.compact
    def __call__(self, x: Array, probs: Array, gates: Array) -> Array:
        params = self.variables["params"]["block"]
        stats = self.variables.get("batch_stats", {}).get("block", {})
        block = self.block(parent=None)
        train, open_gate = self.train, jnp.ones((), jnp.bool_)

        def block_fn(p, s, v, prob):
            variables = {"params": p, "batch_stats": s} if s else {"params": p}
            y, new = block.apply(variables, v, prob, open_gate, train=train, stochastic=True,
                                 mutable=["batch_stats"])
            return y, new.get("batch_stats", {})

        if self.policy is not None:
            # The loop already keeps XLA from merging recomputation across blocks.
            block_fn = jax.checkpoint(block_fn, policy=self.policy, prevent_cse=False)
        y, new_stats = kept_loop(block_fn, params, stats, x, probs, gates)
        if stats and train:  # as a scanned BatchNorm does, refused if not mutable
            self.put_variable("batch_stats", "block", new_stats)
        return y


def _scanned_body(length: int, unroll: bool = False, policy: Any = None) -> ModuleDef:
    """``_ScanBody`` scanned ``length`` times, parameters and statistics stacked on axis 0;
    ``unroll``: every iteration inlined (straight-line code, no loop); ``policy``: each
    iteration rematerialised under this checkpoint policy (None: not)."""
    body = _ScanBody
    if policy is not None:
        body = nn.remat(_ScanBody, policy=policy, prevent_cse=False)  # the scan prevents CSE
    return nn.scan(
        body,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True, "dropout": True},  # each block its own dropout mask
        length=length,
        in_axes=0,
        # jax keeps a loop for unroll=True at length 1; any unroll > length inlines all.
        unroll=length + 1 if unroll else 1,
    )


class ResidualStages(nn.Module):
    """Runs stages of residual blocks, scanning over the identical blocks of each stage.

    The first block of a stage (which may change width or stride) runs on its own; the
    remaining ``n - 1`` identical blocks run under ``nn.scan`` when scanning, so compile time
    does not grow with depth. Scanned and unrolled forms hold the same parameters, stacked
    along a leading axis in the scanned form. A scanned stage of post-activation blocks
    (:class:`layers.ResidualBlock`) with ``remat`` ``'convs'`` or ``'full'`` carries
    pre-activations (:meth:`_preact_policy`): the same outputs, but the stage's first block
    returns (and ``capture_intermediates`` records) its output before its activation. The
    scanned (or looped) blocks record no intermediates: where one would (a ``sow``, or
    ``capture_intermediates=True``), a warning says so.

    Attributes:
      stage_sizes: blocks per stage.
      stage_features: branch width per stage.
      stage_strides: stride of each stage's first block.
      block: a block class or partial taking ``(features, strides)``.
      scan: scan stages with at least ``AUTO_SCAN_MIN_BLOCKS`` blocks when None.
      scan_unroll: inline every iteration of each scan (``unroll`` past its length): the
        same parameters, stacked layout and results, but straight-line code with no loop
        (on GPU, nothing for the host to drive block by block); compile time then
        grows with depth.
      keep: bool ``[L]`` or None; blocks marked False are deleted (a pruned model): no
        parameters, no compute. A deleted first block of a stage keeps its shortcut; the
        kept blocks of a scanned stage form a shorter scan (same stacked layout).
      loop: with batch gates (one per block) in a stochastic pass, run each scanned stage's
        kept blocks in one loop of dynamic length (:class:`_KeptLoop`) instead of scanning
        every block: no conditional, no padding, one program whatever the gates. The
        blocks should mask (``implementation='mask'``): a stage's first block and the
        blocks of unscanned stages run as they are. Blocks must draw no randomness.
    """

    stage_sizes: Sequence[int]
    stage_features: Sequence[int]
    stage_strides: Sequence[int]
    block: ModuleDef
    scan: bool | None = None
    keep: Sequence[bool] | None = None
    scan_unroll: bool = False
    loop: bool = False

    @nn.compact
    @stock_convs_under_forward_mode  # its scans trace their bodies on their own
    def __call__(self, x: Array, probs: np.ndarray, gates: Array | None, *, train: bool,
                 constant: bool, buckets: Sequence[int] | None = None,
                 stochastic: bool | None = None) -> Array:
        """``x`` ``[batch, H, W, C]``; ``probs`` float ``[L]``; ``gates`` ``[L]``/``[L, batch]``.

        ``stochastic`` (default ``train``): gate the blocks as in training (see
        :meth:`layers.ResidualBlock.__call__`).
        """
        keep = np.ones(sum(self.stage_sizes), bool) if self.keep is None else np.asarray(self.keep)
        self._check_variables_fit(keep)
        self._check_probs_and_gates(probs, gates, constant)
        call_kw = {"train": train, "stochastic": stochastic}
        start = 0
        for i, (n, feats, stride) in enumerate(
            zip(self.stage_sizes, self.stage_features, self.stage_strides)
        ):
            for s in {stride, 1}:  # the stage's first block and its others
                _check_block(self.block(feats, s, parent=None))
            p0 = 1.0 if constant else float(probs[start])
            g0 = None if gates is None else gates[start]
            # Compact mode runs no conditional: the stage's first block is masked instead
            # (as are the blocks of a stage too short to scan, below).
            kw = {} if buckets is None else {"implementation": "mask"}
            if not keep[start]:
                kw["has_branch"] = False
            scanned = n > 1 and self._scanned(n - 1)
            carry_preact = scanned and buckets is None and not self.loop
            policy = self._preact_policy(feats, stride) if carry_preact else None
            if policy is not None:  # the stage carries pre-activations
                kw["post_activation"] = False
            first = self.block(feats, stride, name=f"stage{i + 1}_block1", **kw)
            with _traced_flags_refused(first):
                x = first(x, p0, g0, **call_kw)
            kept = start + 1 + np.flatnonzero(keep[start + 1:start + n])  # in order
            # A slice when none is removed: the unpruned program is unchanged (no gather).
            rest = slice(start + 1, start + n) if len(kept) == n - 1 else kept
            if scanned:
                if len(kept):
                    bucket = None if buckets is None else buckets[i]
                    with _traced_flags_refused(first):
                        x = self._scan_stage(i, len(kept), feats, x, probs[rest], gates,
                                             rest, call_kw, constant, bucket, policy)
                if policy is not None:
                    x = first.act(x)
            else:  # in compact mode masked too: no conditional anywhere
                masked = {} if buckets is None else {"implementation": "mask"}
                for j in kept - start:
                    p = 1.0 if constant else float(probs[start + j])
                    g = None if gates is None else gates[start + j]
                    blk = self.block(feats, 1, name=f"stage{i + 1}_block{j + 1}", **masked)
                    with _traced_flags_refused(blk):
                        x = blk(x, p, g, **call_kw)
            start += n
        return x

    def _check_variables_fit(self, keep: np.ndarray) -> None:
        """ValueError where the parameters given are not those of this layout's blocks: a
        pruned model's (``keep``) applied to the full model's variables ran silently where
        the deleted blocks were unscanned, as if they were not there (their parameters
        ignored: another network's output); the other mismatches failed in Flax or in
        ``scan`` without naming the cause."""
        if self.is_initializing() or self.is_mutable_collection("params"):
            return
        params = self.variables.get("params")
        if not params:
            return
        problems, expected, start = [], set(), 0
        for i, n in enumerate(self.stage_sizes):
            stage = f"stage{i + 1}"
            expected.add(f"{stage}_block1")
            first = params.get(f"{stage}_block1", {})
            if self._names_branch(i) and ("stochastic_depth" in first) != bool(keep[start]):
                problems.append(_misfit(start, bool(keep[start])))
            kept_rest = int(keep[start + 1:start + n].sum())
            # Only the library's blocks surely hold parameters (a user's may hold none).
            known = self._names_branch(i, stride=1)
            if n > 1 and self._scanned(n - 1):
                expected.add(f"{stage}_scan")
                if not known:
                    start += n
                    continue
                leaves = jax.tree_util.tree_leaves(params.get(f"{stage}_scan", {}))
                held = int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 0
                if held != kept_rest:  # stacked: only their count tells
                    problems.append(f"{stage}_scan stacks {held} block{'s' * (held != 1)} "
                                    f"where it runs {kept_rest}")
            else:
                for j in range(1, n):
                    expected.add(f"{stage}_block{j + 1}")
                    if known and (f"{stage}_block{j + 1}" in params) != bool(keep[start + j]):
                        problems.append(_misfit(start + j, bool(keep[start + j])))
            start += n
        problems += [f"parameters of {name}, which it does not have" for name in params
                     if name.startswith("stage") and name not in expected]
        if problems:
            if self.keep is not None:
                fix = ("a pruned model takes the variables pruning.prune returned with it: "
                       "pruned, pruned_variables = pruning.prune(model, variables, keep)")
            else:
                fix = ("a pruned model's variables (pruning.prune's or load_pruned's) go "
                       "with the pruned model returned with them (keep=...), and another "
                       "depth's with a model of that depth")
            raise ValueError(f"The variables do not fit the model's blocks "
                             f"({'; '.join(problems)}): {fix}.")

    def _check_probs_and_gates(self, probs: Any, gates: Any, constant: bool) -> None:
        """ValueError unless ``probs`` (unless ``constant``) and ``gates`` hold one entry per
        block, and ``probs`` values in (0, 1]: a short one failed with an IndexError or in
        ``scan``, short gates of an unrolled stage were read clamped (the last gate given
        reused), and a 0 or 1.5 in a scanned stage made the outputs NaN, silently."""
        L = sum(self.stage_sizes)
        if not constant and not isinstance(probs, jax.core.Tracer):  # a list too
            ops.check_probs_are_numbers(probs, "ResidualStages probs")
            values = np.asarray(probs, np.float64)
            if values.shape != (L,):
                raise ValueError(f"ResidualStages probs must hold one survival probability "
                                 f"per block, shape ({L},), got shape {values.shape}.")
            bad = np.flatnonzero(~((values > 0) & (values <= 1)))
            if len(bad):
                raise ValueError(f"ResidualStages probs must be survival probabilities in "
                                 f"(0, 1], got {values[bad[0]]} for block {bad[0]} (0-based); "
                                 f"e.g. sdj.linear_decay({L}, 0.5).")
        if gates is not None and (np.ndim(gates) == 0 or np.shape(gates)[0] != L):
            raise ValueError(f"ResidualStages gates must hold one gate per block on their "
                             f"first axis ({L}), got shape {np.shape(gates)}.")

    def _names_branch(self, i: int, stride: int | None = None) -> bool:
        """Whether stage ``i``'s first block (``stride``: its blocks of that stride) is one
        of the library's blocks, whose branch's parameters are under ``'stochastic_depth'``
        (a deleted one has none)."""
        stride = self.stage_strides[i] if stride is None else stride
        block = self.block(self.stage_features[i], stride, parent=None)
        return (isinstance(block, layers.ResidualBlock)
                and type(block).__call__ is layers.ResidualBlock.__call__)

    def compact_buckets(self, gates: np.ndarray, multiple: int = 4,
                        lengths: Sequence[Sequence[int]] | None = None) -> tuple[int, ...]:
        """Static scan lengths for :meth:`__call__`'s ``buckets`` from host-side gates.

        Args:
          gates: bool ``[L]`` (e.g. ``np.asarray(draw_gates(key, probs))``).
          multiple: round each stage's kept count up to a multiple of this, so that few
            distinct programs get compiled (each one costs a compilation; surplus slots
            cost masked compute).
          lengths: instead of ``multiple``, the lengths each stage may use, one sorted
            sequence per stage (see :meth:`compact_lengths`); the kept count is rounded up
            to the shortest that holds it.

        Returns:
          one length per stage, for its scanned blocks (0 for an unscanned stage).
        """
        return buckets_lib.stage_buckets(gates, self.stage_sizes, self._scanned_stages(),
                                         multiple, lengths)

    def compact_lengths(self, probs: np.ndarray, count: int) -> tuple[tuple[int, ...], ...]:
        """Per stage, the ``count`` scan lengths of least expected padding for ``probs``.

        Args:
          probs: every block's survival probability, ``[L]``.
          count: lengths (compiled programs) allowed per scanned stage.

        Returns:
          one sorted tuple per stage (empty for an unscanned stage), for
          :meth:`compact_buckets`'s ``lengths`` (see :mod:`stochastic_depth_jax.buckets`).
        """
        return buckets_lib.stage_lengths(probs, self.stage_sizes, self._scanned_stages(), count)

    def _scanned_stages(self) -> tuple[bool, ...]:
        """Per stage: are its blocks after the first one scanned?"""
        return tuple(n > 1 and self._scanned(n - 1) for n in self.stage_sizes)

    def _scanned(self, num_identical: int) -> bool:
        if self.scan is None:
            return num_identical >= AUTO_SCAN_MIN_BLOCKS
        return bool(self.scan)

    def _preact_policy(self, feats: int, stride: int) -> Any:
        """The checkpoint policy under which a scanned stage carries pre-activations, or None.

        With a post-activation block (``act(shortcut + b f)``) whose branch is
        rematerialised (``remat`` ``'convs'`` or ``'full'``), each block's activation moves to
        the start of the next one (the stage's first block returns its output before the
        activation; the stage applies the last one), and each scanned block runs under
        ``remat`` with that policy. The scan then stacks, per block, only its input and the
        convolution outputs the policy keeps: the activation's mask is recomputed from the
        input in the backward pass instead of being stacked (and zero-filled every step), as
        are the stacked copies of the gates and weights. The same numbers: ``act`` is applied
        to the same values, once each. What differs: the stage's first block returns (and
        ``capture_intermediates`` records) its output before the activation.

        Only for blocks known to honour ``post_activation``: the stage's first block (of
        stride ``stride``) and its scanned ones must be :class:`layers.ResidualBlock` instances
        (the library's blocks, or a subclass changing only fields) whose ``__call__`` is
        ``ResidualBlock.__call__``. A subclass that overrides ``__call__`` runs as written
        (its activation inside the block, no carry): nothing tells that it applies ``act``
        only where ``post_activation`` says, and if it does not, the carry would apply it
        twice. Both must also have the same ``act``: each scanned block applies its own to
        the carried value, which is the previous block's output.
        """
        first, probe = (self.block(feats, s, parent=None) for s in (stride, 1))
        if not all(isinstance(b, layers.ResidualBlock) and b.post_activation
                   and type(b).__call__ is layers.ResidualBlock.__call__ for b in (first, probe)):
            return None
        if first.act != probe.act:  # each scanned block applies the previous block's act
            return None
        return layers.REMAT_POLICIES.get(probe.remat)

    def _scan_stage(self, i, length, feats, x, probs, gates, rest, call_kw, constant, bucket,
                    policy=None):
        name = f"stage{i + 1}_scan"
        self._warn_if_scanned_blocks_record(name, feats, x, call_kw)
        if bucket is not None and not self.is_initializing():
            return self._compact_stage(name, length, feats, x, probs, gates[rest], bucket)
        stochastic = call_kw["train"] if call_kw["stochastic"] is None else call_kw["stochastic"]
        if (self.loop and stochastic and not constant and gates is not None and gates.ndim == 1
                and not self.is_initializing()):
            block = functools.partial(self.block, feats, 1)
            policy = layers.REMAT_POLICIES.get(getattr(block(parent=None), "remat", "none"))
            body = _KeptLoop(block=block, train=call_kw["train"], policy=policy, name=name)
            return body(x, jnp.asarray(probs, jnp.float32), gates[rest])
        stage = _scanned_body(length, self.scan_unroll, policy)
        inputs: tuple = () if constant else (jnp.asarray(probs, jnp.float32),)
        if gates is not None:
            inputs = inputs + (gates[rest],)
        body = stage(block=functools.partial(self.block, feats, 1), train=call_kw["train"],
                     constant=constant, stochastic=call_kw["stochastic"],
                     preact=policy is not None, name=name)
        x, _ = body(x, inputs)
        return x

    def _warn_if_scanned_blocks_record(self, name: str, feats: int, x: Array,
                                       call_kw: dict) -> None:
        """Warns where the scanned blocks would record intermediates (a ``sow``, or
        ``capture_intermediates=True``) with ``'intermediates'`` mutable: ``nn.scan`` drops
        them (and ``implementation='loop'``, whose blocks run in a loop of traced length
        with only the kept ones computed, records none either), which was silent."""
        if self.is_initializing() or not self.is_mutable_collection("intermediates"):
            return
        capture = layers.capturing_intermediates()
        block = self.block(feats, 1, parent=None)
        slot = lambda tree: jax.tree_util.tree_map(lambda a: a[0], tree)
        variables = {k: slot(self.variables[k][name]["block"]) for k in self.variables
                     if k in ("params", "batch_stats") and name in self.variables[k]}
        rngs = {k: jax.random.key(0) for k in ("params", "dropout", "stochastic_depth")}

        def recorded(variables, v):
            return block.apply(variables, v, jnp.float32(1.0), jnp.ones((), jnp.bool_),
                               **call_kw, mutable=True, rngs=rngs,
                               capture_intermediates=capture)[1]

        try:
            records = "intermediates" in jax.eval_shape(recorded, variables, x)
        except Exception:  # noqa: BLE001 - a block this probe cannot run: no warning
            return
        if records:
            warnings.warn(
                "The blocks after each stage's first in a scanned stage record no "
                "intermediates (sow, capture_intermediates): nn.scan drops them, and "
                "implementation='loop' records none either; scan=False with 'skip' or "
                "'mask' records every block's.", stacklevel=2)

    def _compact_stage(self, name, length, feats, x, probs, gates, bucket):
        """Scans over the kept blocks only, gathered to the front (``bucket`` slots).

        The kept blocks' parameters and statistics are gathered into a scan of static
        length ``bucket`` >= number kept; surplus slots run masked (gate 0, statistics left
        unchanged). No conditional is executed (with ``scan_unroll`` no loop either:
        straight-line code); the price is ``bucket - kept`` wasted blocks.
        """
        _check_bucket_holds(name, bucket, gates)
        order = jnp.argsort(jnp.logical_not(gates), stable=True)  # kept first, in order
        idx = order[:bucket]
        valid = jnp.arange(bucket) < jnp.sum(gates.astype(jnp.int32))
        probs_g = jnp.asarray(probs, jnp.float32)[idx]
        saved = {}

        def gather(tree):
            return jax.tree_util.tree_map(lambda a: a[idx], tree)

        def gather_stats(tree):
            saved["old"] = tree
            return gather(tree)

        def scatter(tree):  # only valid slots write their statistics back, as they are
            # Padding slots aim past the end (each at its own index: all are unique) and are
            # dropped, their blocks' statistics kept bit for bit (inf or NaN ones too).
            def put(old, new):
                slots = jnp.where(valid, idx, old.shape[0] + jnp.arange(bucket))
                return old.at[slots].set(new, mode="drop", unique_indices=True)
            return jax.tree_util.tree_map(put, saved["old"], tree)

        stage = _scanned_body(bucket, self.scan_unroll)
        stage = nn.map_variables(stage, "params", trans_in_fn=gather)
        stage = nn.map_variables(stage, "batch_stats", trans_in_fn=gather_stats,
                                 trans_out_fn=scatter, mutable=True)
        block = functools.partial(self.block, feats, 1, implementation="mask")
        body = stage(block=block, train=True, constant=False, name=name)
        x, _ = body(x, (probs_g, valid))
        return x


_BUCKETS_FITTED = contextvars.ContextVar("buckets_fitted", default=False)


@contextlib.contextmanager
def buckets_fitted() -> Iterator[None]:
    """Traces compact mode without :func:`_check_bucket_holds`'s run-time check, for a
    caller that computed the buckets from the very gates it passes (the trainer's steps):
    its programs keep no conditional, compact mode's point (a conditional splits CUDA
    graphs on GPU). A trace-time setting: a function traced both inside and outside it
    keeps whichever trace JAX cached first."""
    token = _BUCKETS_FITTED.set(True)
    try:
        yield
    finally:
        _BUCKETS_FITTED.reset(token)


def _check_bucket_holds(name: str, bucket: int, gates: Array) -> None:
    """Where ``gates`` are traced (under ``jit``): a compiled check that the scan's ``bucket``
    slots hold the blocks they keep, raising when the program runs if not.

    Buckets computed for other gates (other draws, a schedule's own) ran only the first
    ``bucket`` kept blocks and dropped the others, silently: another network's output and
    gradients. Host-side gates are checked before tracing (:func:`buckets.check_buckets`);
    traced ones only at run time: a host callback, made only when they do not fit, whose
    error (``ValueError``) JAX raises from the call (``JaxRuntimeError``) or the next read
    of its results. Not under :func:`buckets_fitted`.

    The callback checks the count again: under ``vmap`` over the gates the conditional
    becomes a select, both of its branches run, and the callback with them (one call per
    draw), for buckets that fit too."""
    if not isinstance(gates, jax.core.Tracer) or _BUCKETS_FITTED.get():
        return
    kept = jnp.sum(jnp.asarray(gates).astype(jnp.int32))

    def refuse(count: Any) -> None:
        if int(count) > bucket:
            raise ValueError(
                f"Compact mode: {name} keeps {int(count)} blocks but its bucket scans only "
                f"{bucket}: the others would not run; compute buckets from the gates passed "
                "(model.compact_buckets(gates) on the host) for each call.")

    jax.lax.cond(kept > bucket, lambda k: jax.debug.callback(refuse, k), lambda k: None, kept)


def _check_block(block: nn.Module) -> None:
    """ValueError if ``block`` is one of the library's blocks (a class whose ``__call__`` is
    :meth:`layers.ResidualBlock.__call__`) wrapped in Flax's lifted ``nn.remat``, or a
    subclass of one that keeps its ``__call__`` (``class MyBlock(nn.remat(BasicBlock))``).

    Such a class traces every argument of ``__call__`` that its ``static_argnums`` does not
    name, and those name positional arguments only: the stage passes ``train`` by keyword
    (the library's blocks take it keyword-only), so the block would see a tracer where it
    needs a Python bool, and fail deep in init or the first gradient
    (``TracerBoolConversionError``). The library's blocks checkpoint through their own
    ``remat`` field instead, inside the skipping ``cond``, so that only the branches that
    survive are rematerialised. A block with a ``__call__`` of its own is let through: one
    that does not branch on ``train`` in Python works under ``nn.remat``, and nothing here
    tells whether it does. Other lifted transforms are checked as the block runs
    (:func:`_traced_flags_refused`).
    """
    lifted = _lifted_library_block(block)
    if lifted is None or lifted[0] != "Checkpoint":
        return
    _, named, base = lifted
    raise ValueError(f"ResidualStages got block={named}, which traces the block's keyword "
                     f"argument train (static_argnums names positional arguments only); use "
                     f"{base}'s own remat='convs' or remat='full' field instead, which "
                     f"rematerialises only the branches that survive.")


@contextlib.contextmanager
def _traced_flags_refused(block: nn.Module) -> Iterator[None]:
    """Runs blocks of ``block``'s class (a stage's first block, its unrolled or scanned
    others: each call, as a deleted first block runs only its shortcut, which may not
    branch). One of the library's blocks under a Flax lifted transform that traces its
    keyword arguments (``nn.jit(BasicBlock)``) fails on ``train``, a Python bool it
    branches on, with JAX's ``TracerBoolConversionError`` in init: a ValueError here, in
    one line naming the fix. Under ``nn.jit(BasicBlock, static_argnames=('train',
    'stochastic'))`` it works, and runs as it is: which arguments a transform made static
    is not told from outside, so this waits for the failure (JAX's, or the blocks' own
    check of their flags), unlike :func:`_check_block`."""
    try:
        yield
    except (jax.errors.ConcretizationTypeError, ops.TracedFlagError):
        lifted = _lifted_library_block(block)
        if lifted is None:
            raise
        transform, named, base = lifted
        static = (f", or nn.jit({base}, static_argnames=('train', 'stochastic'))"
                  if transform == "Jit" else "")
        raise ValueError(f"ResidualStages got block={named}, which traces the block's "
                         f"keyword arguments train and stochastic, Python values it branches "
                         f"on; pass {base} itself and jit the function that applies the "
                         f"model{static}.") from None


def _lifted_library_block(block: nn.Module) -> tuple[str, str, str] | None:
    """For one of the library's blocks whose ``__call__`` is a Flax lifted transform's
    (``nn.remat``, ``nn.jit``, ...) of :meth:`layers.ResidualBlock.__call__`, also in a
    user's subclass that keeps that ``__call__``: the transform's class-name prefix
    ('Checkpoint', 'Jit', ...), the block as errors name it ('nn.jit(BasicBlock)') and the
    library class's name. None for any other block: a class that defines a ``__call__`` of
    its own is the user's to run as written."""
    cls = type(block)
    owner = next((c for c in cls.__mro__ if "__call__" in vars(c)), None)
    if owner is None or owner.__module__ != linen_transforms.__name__:
        return None
    base = owner.__mro__[1]
    if not (owner.__name__.endswith(base.__name__) and issubclass(base, layers.ResidualBlock)
            and base.__call__ is layers.ResidualBlock.__call__):
        return None
    transform = owner.__name__[:-len(base.__name__)]
    lifted = f"nn.{'remat' if transform == 'Checkpoint' else transform.lower()}({base.__name__})"
    named = lifted if cls is owner else f"{cls.__name__} (a subclass of {lifted})"
    return transform, named, base.__name__


@functools.lru_cache(maxsize=None)
def _scanned_stages(stage_sizes: tuple[int, ...], scan: bool | None) -> tuple[bool, ...]:
    """``ResidualStages._scanned_stages`` for a layout, built once (a module costs ~0.1 ms)."""
    return ResidualStages(stage_sizes=stage_sizes, stage_features=(), stage_strides=(),
                          block=None, scan=scan, parent=None)._scanned_stages()


def _check_dropout_rate(rate: Any) -> None:
    """ValueError unless ``rate`` is a number in [0, 1): a string ('0.3') failed in Flax's
    dropout with a bare TypeError, and a bool passed as the rate it is not (False: 0)."""
    ok = not isinstance(rate, (bool, np.bool_, str, bytes)) and np.ndim(rate) == 0
    try:
        ok = ok and 0.0 <= float(rate) < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"dropout_rate must be in [0, 1) (a number, e.g. 0.3; 0: no dropout), "
                         f"got {rate!r}.")


def check_dtype(dtype: Any) -> None:
    """ValueError unless ``dtype`` is None or a floating-point dtype JAX knows."""
    if dtype is None:
        return
    try:
        ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"dtype must be a floating-point dtype (None = float32, 'bfloat16', "
                         f"'float16', 'float32'), got {dtype!r}.")


class _StochasticResNetBase(nn.Module):
    """Fields, survival schedule, gate drawing and validation shared by both model families.

    Attributes:
      final_survival_prob: p_L (paper: 0.5); 1.0 gives a constant-depth network.
      survival_rule: ``'linear'`` (paper) or ``'uniform'``.
      mode, scaling, implementation, remat: see :class:`layers.StochasticDepth`. With
        ``remat`` ``'convs'`` or ``'full'``, a scanned stage of post-activation blocks
        carries pre-activations (:meth:`ResidualStages._preact_policy`): what
        ``capture_intermediates`` records as the output of the stage's first block is then
        before its ``act`` (the scanned blocks record none, with or without).
      scan: scan identical blocks (None: when a stage has >= 8 of them).
      scan_unroll: inline the scans' iterations (see :class:`ResidualStages`).
      dtype: computation dtype (parameters stay float32). BatchNorm statistics, the pooled
        features and the head compute in float32 for bfloat16 or float16 and in float64 for
        ``'float64'`` (with ``jax_enable_x64``; without it JAX computes float64 in float32).
      conv, norm: convolution and normalisation modules (defaults: :class:`conv.Conv`,
        :class:`layers.BatchNorm`; inside ``jax.shard_map`` over the batch,
        ``functools.partial(layers.BatchNorm, axis_name=...)``).
      zero_init_last: each branch starts as zero: its last BatchNorm scale starts at 0, or
        in a pre-activation branch (``WideResNet``, ``block='preact'``), which ends in a
        convolution, that convolution's kernel (as timm's ResNetV2).
      dropout_rate: dropout between each branch's convolutions in training (Wide ResNets;
        rng stream ``'dropout'``); 0 (default) adds none.
      initialization: ``'ours'`` (default: convolutions He-initialised on fan-out,
        BatchNorm scales 1, Flax's ``Dense``) or ``'official'``, the official Torch code's
        (see :data:`INITIALIZATIONS`). Only the initial values differ.
      keep: None, or bool ``[L]`` (a pruned model, see :mod:`stochastic_depth_jax.pruning`):
        blocks marked False are deleted, with no parameters and no compute. Block indices,
        gates and survival probabilities stay those of the full model's L blocks, so a
        pruned model computes what the full one computes with those blocks' gates closed.
    """

    final_survival_prob: float = 0.5
    survival_rule: str = "linear"
    mode: str = "batch"
    scaling: str = "test"
    implementation: str = "skip"
    remat: str = "convs"
    scan: bool | None = None
    scan_unroll: bool = False
    dtype: Any = None
    conv: ModuleDef = Conv
    norm: ModuleDef = layers.BatchNorm
    zero_init_last: bool = False
    dropout_rate: float = 0.0
    keep: tuple[bool, ...] | None = None
    initialization: str = "ours"

    # The trainer draws every block's gates up front and passes them as ``gates=``.
    takes_gates = True

    @nn.nowrap
    def num_blocks(self) -> int:
        raise NotImplementedError

    def kept_blocks(self) -> np.ndarray:
        """bool ``[L]``: True for the blocks this model has (all of them unless pruned)."""
        if self.keep is None:
            return np.ones(self.num_blocks(), bool)
        return np.asarray(self.keep, bool)

    def survival_probs(self) -> np.ndarray:
        """p_l for l = 1..L, float64 ``[L]`` (all ones for constant depth)."""
        return schedules.survival_probabilities(
            self.survival_rule, self.num_blocks(), self.final_survival_prob
        )

    @nn.nowrap
    def _validate_sd(self) -> None:
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"Unknown implementation {self.implementation!r}; valid: "
                             f"{list(IMPLEMENTATIONS)}.")
        ops.validate_options(self.mode, self.scaling, self._block_implementation())
        _check_dropout_rate(self.dropout_rate)
        if self.implementation == LOOP and self.mode != "batch":
            raise ValueError(f"implementation='loop' needs mode='batch' (one gate per block), "
                             f"got mode={self.mode!r}; use 'skip' or 'mask' for it.")
        if self.implementation == LOOP and float(self.dropout_rate) > 0:
            raise ValueError(f"implementation='loop' runs blocks that draw no randomness; "
                             f"dropout_rate={self.dropout_rate} needs 'skip' or 'mask'.")
        if self.implementation == LOOP:
            self._check_loop_stages()
        if self.keep is not None:
            keep = tuple(bool(k) for k in np.ravel(np.asarray(self.keep)))
            if len(keep) != self.num_blocks():
                raise ValueError(f"keep must have one entry per block ({self.num_blocks()}), "
                                 f"got {len(keep)}.")
            object.__setattr__(self, "keep", keep)  # hashable, whatever sequence was given
        if self.initialization not in INITIALIZATIONS:
            raise ValueError(f"Unknown initialization {self.initialization!r}; valid: "
                             f"{list(INITIALIZATIONS)}.")
        schedules.survival_probabilities(self.survival_rule, 1, self.final_survival_prob)
        if self.remat not in layers.REMAT_POLICIES:
            raise ValueError(
                f"Unknown remat {self.remat!r}; valid: {sorted(layers.REMAT_POLICIES)}."
            )
        check_dtype(self.dtype)


    @nn.nowrap
    def _validate_sizes(self) -> None:
        """ValueError unless ``width`` and ``num_classes`` are positive integers: 0 failed
        in the initialisers with a bare ZeroDivisionError, a negative or fractional one in
        XLA's or JAX's shape checks."""
        for field in ("width", "num_classes"):
            value = _set_count(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                default = type(self).__dataclass_fields__[field].default
                raise ValueError(f"{type(self).__name__} {field} must be a positive integer "
                                 f"(default {default}), got {value!r}.")

    def _gates(self, x: Array, gates: Array | None, stochastic: bool,
               train: bool) -> tuple[Array | None, bool]:
        """Returns ``(gates, constant)``; draws gates from ``'stochastic_depth'`` if needed
        (``train=False``: for Monte-Carlo depth, which a missing stream's error names)."""
        constant = float(self.final_survival_prob) == 1.0 and gates is None
        if gates is None and (not stochastic or constant):
            return None, constant
        if gates is None:
            key = layers.gate_rng(self, monte_carlo=not train)
            gates = ops.draw_gates(key, self.survival_probs(), mode=self.mode,
                                   batch_size=x.shape[0])
        given = gates
        if not hasattr(gates, "dtype"):  # a list or tuple (of bools), as one writes a mask
            gates = _gates_array(gates)
        if jnp.result_type(gates) != jnp.bool_:
            fix = ("gates.astype(bool) (NumPy's binomial draws ints)" if given is gates
                   else "bools, e.g. np.asarray(gates, bool)")
            raise TypeError(f"gates must be bool (True where a block runs), got "
                            f"{jnp.result_type(gates)}; pass {fix}.")
        L = self.num_blocks()
        expected = [(L,)] if self.mode == "batch" else [(L, x.shape[0])]
        if self.mode == "sample" and not stochastic:
            expected.append((L,))  # a fixed sub-network at evaluation
        if tuple(gates.shape) not in expected:
            raise ValueError(f"gates must have shape {' or '.join(map(str, expected))} for "
                             f"mode={self.mode!r}, got {tuple(gates.shape)}.")
        # Visible with mutable=['intermediates'] (e.g. to log the sampled depth).
        self.sow("intermediates", "gates", gates)
        return gates, False

    @nn.nowrap
    def stage_sizes_(self) -> tuple[int, ...]:
        raise NotImplementedError

    def compact_buckets(self, gates: Any, multiple: int = 4,
                        lengths: Sequence[Sequence[int]] | None = None) -> tuple[int, ...]:
        """Static per-stage scan lengths for ``__call__(..., gates=g, buckets=...)``.

        Compact mode (``buckets`` given) gathers each stage's kept blocks to the front of a
        scan of static length and runs no conditional at all; see
        :meth:`ResidualStages.compact_buckets` (``multiple`` rounding, or the per-stage
        ``lengths`` of :meth:`compact_lengths`). ``gates`` must be on the host (NumPy).
        Host work only (tens of microseconds), called once per training step.
        """
        sizes = tuple(self.stage_sizes_())
        return buckets_lib.stage_buckets(gates, sizes, _scanned_stages(sizes, self.scan),
                                         multiple, lengths)

    def compact_lengths(self, count: int) -> tuple[tuple[int, ...], ...]:
        """Per stage, the ``count`` scan lengths of least expected padding under this model's
        survival probabilities (:func:`stochastic_depth_jax.buckets.optimal_lengths`)."""
        sizes = tuple(self.stage_sizes_())
        return buckets_lib.stage_lengths(self.survival_probs(), sizes,
                                         _scanned_stages(sizes, self.scan), count)

    def _check_images(self, x: Array) -> None:
        """ValueError unless ``x`` is a batch of images ``[batch, H, W, C]``: one image
        without its batch axis reached the stem convolution and failed there with JAX's
        "convolution requires lhs and rhs ndim to be equal"; a channels-first batch
        ``[N, 3, H, H]`` trained silently as 3 rows of H-channel images."""
        shape = tuple(jnp.shape(x))
        if len(shape) != 4:
            raise ValueError(f"{type(self).__name__} takes images [batch, height, width, "
                             f"channels], got shape {shape}; for one image pass x[None].")
        # Channels first (PyTorch's NCHW) ran: 3 rows of a 32-"channel" image, a wrong net.
        if shape[1] in (1, 3) and shape[2] == shape[3] > 4:
            raise ValueError(f"{type(self).__name__} takes images [batch, height, width, "
                             f"channels], got shape {shape}, which is channels-first "
                             f"(NCHW); pass x.transpose(0, 2, 3, 1).")

    @staticmethod
    def _check_flags(train: Any, stochastic: Any) -> None:
        """A ``train`` or ``stochastic`` passed to ``jax.jit`` as an ordinary argument
        arrives traced: refused with the op's one-line ``TypeError`` naming
        ``static_argnames``, not JAX's ``TracerBoolConversionError`` from the gate logic."""
        ops.check_deterministic(train, name="train")
        if stochastic is not None:
            ops.check_deterministic(stochastic, name="stochastic")

    def _check_buckets(self, buckets, gates, train, stochastic=None):
        if buckets is None:
            return None
        if not train or gates is None or self.mode != "batch":
            raise ValueError("buckets (compact mode) need train=True, mode='batch' and the "
                             "gates they were computed from (gates=...).")
        if stochastic is not None and not stochastic:  # compact mode always gates as in training
            raise ValueError("buckets (compact mode) gate the blocks as in training; "
                             "stochastic=False (p_l-scaled open blocks) needs buckets=None.")
        if self.keep is not None:
            raise ValueError("buckets (compact mode) cannot be used on a pruned model (keep=...).")
        if self.implementation == LOOP:
            raise ValueError("buckets (compact mode) and implementation='loop' are two ways to "
                             "run only the kept blocks: pass buckets=None, or use 'skip'.")
        sizes = tuple(self.stage_sizes_())
        if not hasattr(gates, "dtype"):  # a list, as _gates reads it: traced ones under jit
            gates = _gates_array(gates)
        # Checked where readable here: not traced (under jit), not spread over processes.
        readable = (not isinstance(gates, jax.core.Tracer)
                    and getattr(gates, "is_fully_addressable", True))
        host = gates if readable else None
        return buckets_lib.check_buckets(buckets, sizes, _scanned_stages(sizes, self.scan), host)

    @nn.nowrap
    def _check_loop_stages(self) -> None:
        """ValueError where ``implementation='loop'`` has nothing to loop over: it loops over
        the blocks after each stage's first in the scanned stages and masks every other
        block, so with no scanned stage every block would compute, under the name 'loop'."""
        sizes = tuple(self.stage_sizes_())
        if any(_scanned_stages(sizes, self.scan)):
            return
        fix = "pass scan=True" if max(sizes) > 1 else "use stages of 2 blocks or more, scan=True"
        auto = (f" (scan=None: stages of {AUTO_SCAN_MIN_BLOCKS + 1} blocks or more)"
                if self.scan is None else "")
        raise ValueError(f"implementation='loop' loops over the blocks after each stage's first "
                         f"in scanned stages, and stage sizes {sizes} with scan={self.scan!r} "
                         f"scan none{auto}, so every block would compute, masked; {fix}, or "
                         f"use 'skip'.")

    @nn.nowrap
    def _block_implementation(self) -> str:
        """The blocks' own implementation: ``'loop'`` masks the blocks outside the loops
        (each stage's first block, unscanned stages), as compact mode does: no conditional."""
        return "mask" if self.implementation == LOOP else self.implementation

    def _block(self, cls: ModuleDef, shortcut: str) -> ModuleDef:
        return functools.partial(
            cls, shortcut=shortcut, mode=self.mode, scaling=self.scaling,
            implementation=self._block_implementation(), remat=self.remat, conv=self.conv,
            norm=self._norm(), dtype=self.dtype, zero_init_last=self.zero_init_last,
            dropout_rate=self.dropout_rate, kernel_init=self._kernel_init(),
        )

    def _official(self) -> bool:
        return self.initialization == "official"

    def _kernel_init(self) -> Any:
        """Every convolution's initialiser (stem, branches, projection shortcuts)."""
        return _FAN_IN_KERNEL_INIT if self._official() else layers.conv_kernel_init

    def _norm(self) -> ModuleDef:
        """``norm``, its scales starting uniform in [0, 1) for the official initialisation
        (a zero-initialised last scale, ``zero_init_last``, stays zero)."""
        if not self._official():
            return self.norm
        return functools.partial(self.norm, scale_init=nn.initializers.uniform(1.0))

    def _head(self, x: Array, num_classes: int) -> Array:
        """The linear classifier on pooled features ``x`` ``[batch, C]``."""
        if not self._official():
            return nn.Dense(num_classes, name="head")(x)
        init = _torch_linear_init(x.shape[-1])
        return nn.Dense(num_classes, kernel_init=init, bias_init=init, name="head")(x)


def _misfit(block: int, kept: bool) -> str:
    """What the variables get wrong about ``block`` (0-based, over the full model)."""
    if kept:
        return f"no parameters for block {block}, which it runs"
    return f"parameters for block {block}, which it deletes"


def _set_count(model: nn.Module, field: str) -> Any:
    """``model``'s ``field``, set to a Python int where it held a NumPy integer (which the
    checks of ints refused); the value as it is otherwise."""
    value = getattr(model, field)
    if isinstance(value, np.integer):
        value = int(value)
        object.__setattr__(model, field, value)
    return value


def _gates_array(gates: Any) -> Array:
    """``gates`` given as a sequence (a list of bools), as an array: NumPy's where it holds
    Python or concrete values (read on the host, as a NumPy mask is), JAX's where it holds
    traced ones; a ValueError for a ragged one (JAX said "Cannot determine dtype")."""
    try:
        return np.asarray(gates)
    except jax.errors.TracerArrayConversionError:
        return jnp.asarray(gates)
    except ValueError:
        raise ValueError(f"gates must be one bool per block ([L], or [L, batch] for "
                         f"mode='sample'), got the ragged sequence {gates!r}.") from None


class CifarResNet(_StochasticResNetBase):
    """The paper's CIFAR/SVHN ResNet of depth 6n + 2 with stochastic depth.

    Three stages of n blocks (widths 16, 32, 64 times ``width / 16``; strides 1, 2, 2), a
    3x3 stem, global average pooling and a linear classifier. ResNet-110 has 54 blocks;
    the paper's SVHN net is ResNet-152 (75 blocks).

    Usage::

        model = CifarResNet(depth=110, num_classes=10)
        variables = model.init({'params': key}, x, train=False)
        logits, updates = model.apply(variables, x, train=True,
                                      rngs={'stochastic_depth': key}, mutable=['batch_stats'])
        logits = model.apply(variables, x, train=False)   # all blocks, residuals scaled by p_l

    Attributes:
      depth: 6n + 2 (20, 32, 44, 56, 110, 152, 1202, ...).
      num_classes: classifier outputs.
      final_survival_prob: p_L (paper: 0.5); 1.0 gives a constant-depth ResNet.
      survival_rule: ``'linear'`` (paper) or ``'uniform'``.
      mode, scaling, implementation, remat: see :class:`layers.StochasticDepth`.
      block: ``'basic'`` (paper) or ``'preact'``.
      shortcut: ``'A-avg'`` (paper: 2x2 average pooling + zero channels, parameter-free),
        ``'A'`` (subsampling + zero channels, as most versions of the official code; this
        library's default before ``'A-avg'``) or
        ``'B'`` (projection). See :class:`layers.Shortcut`.
      width: stem/first-stage width (16 in the paper).
      scan: scan identical blocks (None: when a stage has >= 8 of them).
      scan_unroll: inline the scans' iterations (see :class:`ResidualStages`).
      initialization: ``'ours'`` (default) or ``'official'``, the official Torch code's
        (:data:`INITIALIZATIONS`).
    """

    depth: int = 110
    num_classes: int = 10
    block: str = "basic"
    shortcut: str = "A-avg"
    width: int = 16

    def __post_init__(self) -> None:
        self._validate_depth()
        if self.block not in CIFAR_BLOCKS:
            raise ValueError(f"Unknown block {self.block!r}; valid: {sorted(CIFAR_BLOCKS)}.")
        if self.shortcut not in layers.SHORTCUTS:
            raise ValueError(f"Unknown shortcut {self.shortcut!r}; valid: {list(layers.SHORTCUTS)}.")
        self._validate_sd()
        self._validate_sizes()
        super().__post_init__()

    @nn.nowrap
    def _validate_depth(self) -> None:
        _set_count(self, "depth")  # NumPy's integers too (a sweep's np.arange): as ints
        if not isinstance(self.depth, int) or self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(
                f"CifarResNet depth must be 6n+2 with n >= 1 (e.g. 20, 32, 44, 56, 110, 152, "
                f"1202), got {self.depth!r}; nearest valid: "
                f"{_nearest(self.depth, valid_cifar_depths(max(1202, int(self.depth) + 6)))}."
            )

    @nn.nowrap
    def blocks_per_stage(self) -> int:
        """n = (depth - 2) / 6."""
        return (self.depth - 2) // 6

    @nn.nowrap
    def stage_widths(self) -> tuple[int, int, int]:
        """Branch widths of the three stages: ``width`` times 1, 2, 4."""
        return (self.width, 2 * self.width, 4 * self.width)

    @nn.nowrap
    def num_blocks(self) -> int:
        """L = 3n residual blocks."""
        return 3 * self.blocks_per_stage()

    @nn.nowrap
    def stage_sizes_(self) -> tuple[int, ...]:
        """Blocks per stage, (n, n, n)."""
        n = self.blocks_per_stage()
        return (n, n, n)

    @nn.compact
    def __call__(self, x: Array, *, train: bool, gates: Array | None = None,
                 buckets: Sequence[int] | None = None, stochastic: bool | None = None) -> Array:
        """Classifies images ``x`` ``[batch, H, W, C]`` into logits ``[batch, num_classes]``.

        Args:
          train: training mode (gated blocks, batch statistics).
          gates: optional bool ``[L]`` (``[L, batch]`` for ``mode='sample'``) overriding the
            drawn gates, e.g. to evaluate a fixed sub-network. With ``train=False`` the open
            blocks run scaled as at evaluation (p_l f) and the closed ones not at all: the
            network with those blocks removed.
          stochastic: gate as in training (default ``train``). ``train=False,
            stochastic=True`` runs one sub-network sampled from the ``'stochastic_depth'``
            stream (or ``gates``) with running BatchNorm statistics and training-time
            scaling: one member of the Monte-Carlo ensemble.

          buckets: compact mode (training, not ``stochastic=False``; ``mode='batch'``; explicit
            ``gates``): one static scan length per stage from :meth:`compact_buckets` of
            the same gates, held on the host. Each stage's kept blocks are gathered into a
            scan of that length and no conditional runs (each stage's first block, and every
            block of an unscanned stage, is masked: computed, its output multiplied by its
            gate); a distinct ``buckets`` tuple is a distinct compilation. Same outputs,
            gradients and statistics as skipping, but for dropout (``dropout_rate`` > 0): a
            kept block draws its mask by its slot in the gathered scan, so the masks are
            other draws.

        The training gates are sown as ``intermediates['gates']`` (read them with
        ``mutable=['batch_stats', 'intermediates']``).
        """
        self._check_flags(train, stochastic)
        self._check_images(x)
        buckets = self._check_buckets(buckets, gates, train, stochastic)  # before drawing gates
        stochastic = train if stochastic is None else stochastic
        gates, constant = self._gates(x, gates, stochastic, train)
        n = self.blocks_per_stage()
        w = self.width
        x = x.astype(self.dtype) if self.dtype is not None else x
        x = self.conv(w, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                      kernel_init=self._kernel_init(), dtype=self.dtype, name="stem_conv")(x)
        preact = self.block == "preact"
        if not preact:
            x = nn.relu(self._norm()(dtype=self.dtype, name="stem_bn")(x, train=train))
        stages = ResidualStages(
            stage_sizes=(n, n, n), stage_features=self.stage_widths(), stage_strides=(1, 2, 2),
            block=self._block(CIFAR_BLOCKS[self.block], self.shortcut), scan=self.scan,
            scan_unroll=self.scan_unroll, keep=self.keep, loop=self.implementation == LOOP,
            name="stages",
        )
        x = stages(x, self.survival_probs(), gates, train=train, constant=constant,
                   buckets=buckets, stochastic=stochastic)
        if preact:
            x = nn.relu(self._norm()(dtype=self.dtype, name="final_bn")(x, train=train))
        x = jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2))
        return self._head(x, self.num_classes)


class WideResNet(CifarResNet):
    """Wide ResNet WRN-d-k (Zagoruyko & Komodakis, 2016) with stochastic depth.

    The CIFAR ResNet above with pre-activation blocks, projection shortcuts and stages
    ``k`` times wider: a 16-channel 3x3 stem, three stages of n blocks of widths 16k, 32k,
    64k (strides 1, 2, 2), BN-ReLU, average pooling and a linear classifier. Depth counts
    as in the WRN paper, d = 6n + 4 (WRN-28-10: n = 4, 36.5M parameters; WRN-16-4: n = 2).
    Same blocks, stages, gates and pruning as :class:`CifarResNet`. One difference from
    the WRN paper: a projection shortcut here reads the block input, not its
    pre-activation (as :class:`layers.PreActBlock` does everywhere in this library), and
    is followed by BatchNorm (``'B'``, as :class:`layers.Shortcut`; the WRN code's is a
    bare 1x1 convolution).

    Attributes:
      depth: 6n + 4 (16, 22, 28, 40, ...).
      widen_factor: k (10 for WRN-28-10).
      width: stem width and the base of the stage widths (16).
    """

    depth: int = 28
    widen_factor: int = 10
    block: str = "preact"
    shortcut: str = "B"

    @nn.nowrap
    def _validate_depth(self) -> None:
        _set_count(self, "depth")
        if not isinstance(self.depth, int) or self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (e.g. 16, 22, 28, 40), "
                             f"got {self.depth!r}.")
        widen = _set_count(self, "widen_factor")
        if not isinstance(widen, int) or isinstance(widen, bool) or widen < 1:
            raise ValueError(f"widen_factor must be an integer >= 1, got {self.widen_factor!r}.")

    @nn.nowrap
    def blocks_per_stage(self) -> int:
        """n = (depth - 4) / 6."""
        return (self.depth - 4) // 6

    @nn.nowrap
    def stage_widths(self) -> tuple[int, int, int]:
        """``width * widen_factor`` times 1, 2, 4 (160, 320, 640 for WRN-28-10)."""
        w = self.width * self.widen_factor
        return (w, 2 * w, 4 * w)


def _nearest(depth: Any, valid: list[int]) -> list[int]:
    try:
        d = float(depth)
    except (TypeError, ValueError):
        return valid[:3]
    return sorted(sorted(valid, key=lambda v: abs(v - d))[:2])


class ResNet(_StochasticResNetBase):
    """Bottleneck ImageNet-style ResNet (He et al., 2016) with stochastic depth.

    7x7/2 stem, 3x3/2 max-pool, four stages of bottleneck blocks (widths 64..512, outputs
    4x), each stage's stride in its first block's 3x3 convolution and projection shortcuts
    where the shape changes, as torchvision and fb.resnet.torch (the paper's ImageNet code):
    the same parameter counts. Use :data:`ResNet50`, :data:`ResNet101`, :data:`ResNet152`.
    Input ``[batch, H, W, 3]``; output logits ``[batch, num_classes]``.
    """

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    num_classes: int = 1000
    width: int = 64

    def __post_init__(self) -> None:
        _check_stage_sizes(self.stage_sizes)
        self._validate_sd()
        self._validate_sizes()
        super().__post_init__()

    @nn.nowrap
    def num_blocks(self) -> int:
        """L, the total number of bottleneck blocks."""
        return int(sum(self.stage_sizes))

    @nn.nowrap
    def stage_sizes_(self) -> tuple[int, ...]:
        """Blocks per stage."""
        return tuple(int(n) for n in self.stage_sizes)

    @nn.compact
    def __call__(self, x: Array, *, train: bool, gates: Array | None = None,
                 buckets: Sequence[int] | None = None, stochastic: bool | None = None) -> Array:
        """See :meth:`CifarResNet.__call__`."""
        self._check_flags(train, stochastic)
        self._check_images(x)
        buckets = self._check_buckets(buckets, gates, train, stochastic)  # before drawing gates
        stochastic = train if stochastic is None else stochastic
        gates, constant = self._gates(x, gates, stochastic, train)
        x = x.astype(self.dtype) if self.dtype is not None else x
        x = self.conv(self.width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                      use_bias=False, kernel_init=self._kernel_init(), dtype=self.dtype,
                      name="stem_conv")(x)
        x = nn.relu(self._norm()(dtype=self.dtype, name="stem_bn")(x, train=train))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        k = len(self.stage_sizes)
        stages = ResidualStages(
            stage_sizes=tuple(self.stage_sizes),
            stage_features=tuple(self.width * 2**i for i in range(k)),
            stage_strides=(1,) + (2,) * (k - 1),
            block=self._block(layers.BottleneckBlock, "B"), scan=self.scan, keep=self.keep,
            scan_unroll=self.scan_unroll, loop=self.implementation == LOOP, name="stages",
        )
        x = stages(x, self.survival_probs(), gates, train=train, constant=constant,
                   buckets=buckets, stochastic=stochastic)
        x = jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2))
        return self._head(x, self.num_classes)


def _check_stage_sizes(sizes: Any) -> None:
    """ValueError unless ``sizes`` is a non-empty sequence of positive integers. A depth
    given instead (``stage_sizes=152``) failed in Python's iteration ("'int' object is not
    iterable"), and a fractional count was truncated silently."""
    valid = (isinstance(sizes, Sequence) and not isinstance(sizes, str) and len(sizes) > 0
             and all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1
                     for n in sizes))
    if not valid:
        raise ValueError(f"stage_sizes must be a sequence of positive block counts, one per "
                         f"stage, got {sizes!r}; ResNet-152 is stage_sizes=(3, 8, 36, 3) "
                         f"(sdj.ResNet152), ResNet-50 (3, 4, 6, 3).")


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3))
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3))


def _named_resnet_doc(name: str, sizes: tuple[int, ...], params: str) -> str:
    # help(sdj.ResNet152) showed functools.partial's own docstring.
    blocks = sum(sizes)
    return (f"{name}: :class:`ResNet` with ``stage_sizes={sizes}``, {blocks} bottleneck blocks "
            f"(p_l decays linearly over all {blocks}), torchvision's {params} parameters for "
            f"1000 classes. Takes ResNet's other fields, e.g. ``{name}(num_classes=10)``.")


ResNet50.__doc__ = _named_resnet_doc("ResNet50", (3, 4, 6, 3), "25,557,032")
ResNet101.__doc__ = _named_resnet_doc("ResNet101", (3, 4, 23, 3), "44,549,160")
ResNet152.__doc__ = _named_resnet_doc("ResNet152", (3, 8, 36, 3), "60,192,808") + (
    " The paper's ImageNet network (Sec. 4).")
