"""Which real-skipping implementation a run uses: ``model.implementation='auto'`` resolved.

Resolved once at start-up from the platform the run's devices are on, and recorded (value
and reason) in ``run.json``:

* CPU: ``lax.cond`` skipping (``'skip'``, no compact mode): it pays there (ResNet-110,
  batch 128, 2-core CPU: skip/constant 0.75-0.78) with one compiled program, where compact
  mode compiles one per bucket tuple.
* GPU and TPU: compact mode (``'skip'`` with ``compact_multiple`` 4): kept blocks gathered
  into static-length scans, no conditionals. On an H100 a ``conditional`` splits the step's
  CUDA graphs and reads its predicate to the host, so ``lax.cond`` skipping measured
  0.98-1.03x constant depth while compact mode measured 0.85x (multiple 4; multiples 2 and
  1 measured slower per step). Three scan lengths per stage fitted to the schedule
  (``compact_lengths=3``) pad 2.5 blocks a step where multiple 4 pads 3.7 (ResNet-110;
  exact, from the gate distribution, :mod:`stochastic_depth_jax.buckets`) and compile 27
  programs, all used in the first epoch; they become the default if a GPU measures them
  faster (not measured yet). TPU was not measured; it gets compact mode for the same reason
  (a ``conditional`` is a host-visible control-flow boundary there too).

Compact mode gathers the kept blocks of scanned stages only and masks every other block, so
'auto' picks it only where the config scans a stage (``scans_a_stage``); with none (ResNet-20
to -44, WRN-28 at ``scan=None``) it resolves to ``lax.cond`` skipping, saying why.

``'skip'`` and ``'mask'`` are used as given (with ``compact_multiple`` / ``compact_lengths``
as configured). With ``'auto'``, a ``compact_multiple`` or ``compact_lengths`` > 0 asks for
that compact mode on every platform; both 0 let the platform decide.

At constant depth (p_L = 1; a drop-path model at rate 0) nothing is dropped: the record
says no compact mode whatever was asked (the train step compacts nothing there), and the
network runs as a plain one.

One exception: the ResNets (:data:`MASKED_SAMPLE_MODELS`) draw all gates up front, so with
``mode='sample'`` their per-example gates are Bernoulli masks whatever was asked for; that
resolves to ``'mask'`` (which computes exactly the same), so the record says what runs.
``describe`` says in words what the resolved implementation does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from stochastic_depth_jax import buckets, models, ops, schedules

__all__ = [
    "IMPLEMENTATIONS",
    "DROP_PATH_IMPLEMENTATIONS",
    "DEFAULT_COMPACT_MULTIPLE",
    "MASKED_SAMPLE_MODELS",
    "COMPACT_MODELS",
    "Resolved",
    "resolve",
    "describe",
    "scans_a_stage",
    "expected_blocks",
]

# What model.implementation accepts: the op's implementations plus 'auto' (drop-path models),
# and for the ResNets also 'loop' (each scanned stage's kept blocks in one loop).
DROP_PATH_IMPLEMENTATIONS = ("auto",) + tuple(ops.IMPLEMENTATIONS)
IMPLEMENTATIONS = DROP_PATH_IMPLEMENTATIONS + (models.LOOP,)
# Kept-block counts rounded up to this multiple in compact mode when 'auto' picks it and
# both compact knobs are 0 (H100: 4 measured fastest of 1, 2, 4 over 20-round step
# benchmarks, every program compiled before timing).
DEFAULT_COMPACT_MULTIPLE = 4

# config.model.name of the models that draw every block's gate before the forward pass
# (CifarResNet, WideResNet): a per-example draw has no static size there, so mode='sample'
# masks (layers.StochasticDepth / ops.gated_branch apply a bool [batch] gate as a mask).
MASKED_SAMPLE_MODELS = ("cifar_resnet", "wide_resnet")
# config.model.name of the models with compact mode (scanned stages of identical blocks).
COMPACT_MODELS = ("cifar_resnet", "wide_resnet")
_MASKED_SAMPLE_WHY = ("mode='sample': per-example gates are masked in the ResNets (gates are "
                      "drawn up front; every block computes on every example)")

_WHY = {
    "cpu": "CPU: lax.cond skipping measured fastest (ResNet-110 skip/constant ~0.78)",
    "gpu": ("GPU: conditionals split CUDA graphs (H100: cond skipping 0.98-1.03x constant "
            "depth); compact mode (static-length scans of kept blocks) measured 0.85x (H100), "
            "0.94x fp32 / 0.92x bf16 (H200)"),
    "tpu": ("TPU: not measured; compact mode as on GPU, as it avoids conditionals "
            "(host-visible control flow)"),
}


@dataclasses.dataclass(frozen=True)
class Resolved:
    """The implementation a run uses.

    Attributes:
      implementation: ``'skip'`` or ``'mask'`` (``CifarResNet.implementation``).
      compact_multiple: > 0 selects compact mode with this bucket multiple; 0 = off.
      compact_lengths: > 0 selects compact mode with this many scan lengths per stage,
        chosen for the survival probabilities; 0 = off (at most one of the two is > 0).
      requested: the configured ``model.implementation``.
      platform: the platform it was resolved for (``'cpu'``, ``'gpu'``, ``'tpu'``, ...).
      reason: why, in words (recorded in ``run.json``).
    """

    implementation: str
    compact_multiple: int
    requested: str
    platform: str
    reason: str
    compact_lengths: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of the fields."""
        return dataclasses.asdict(self)


def _platform_kind(platform: str) -> str:
    # jax reports 'cuda'/'rocm' for some device objects and 'gpu' as a backend name.
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def resolve(model: ml_collections.ConfigDict, platform: str) -> Resolved:
    """Resolves ``model.implementation`` and the compact-mode knobs for ``platform``.

    Args:
      model: the ``config.model`` block (``implementation``, ``compact_multiple``,
        ``compact_lengths``, ``mode``).
      platform: ``jax.devices()[0].platform`` of the run's devices.

    Raises:
      ValueError: ``model.implementation`` is not one of :data:`IMPLEMENTATIONS`.
    """
    impl, multiple = model.implementation, int(model.get("compact_multiple", 0))
    lengths = int(model.get("compact_lengths", 0))
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"model.implementation={impl!r}; valid: {list(IMPLEMENTATIONS)}")
    kind = _platform_kind(platform)
    if is_constant_depth(model):  # the train step compacts nothing here: say so
        return Resolved("skip" if impl == "auto" else impl, 0, impl, platform,
                        "nothing is dropped (constant depth or no drop path): every block "
                        "runs, no skipping or compact mode")
    if model.mode == "sample" and model.get("name", "cifar_resnet") in MASKED_SAMPLE_MODELS:
        return Resolved("mask", 0, impl, platform, _MASKED_SAMPLE_WHY)
    if impl != "auto" or multiple or lengths:
        how = (f"compact mode, multiple {multiple}" if multiple else
               f"compact mode, {lengths} lengths per stage" if lengths else
               "kept blocks in one loop per stage" if impl == models.LOOP else "no compact mode")
        if (multiple or lengths) and model.get("name", "cifar_resnet") in COMPACT_MODELS \
                and not scans_a_stage(model):
            how += ("; no stage is scanned (model.scan=True scans stages of 2 blocks or more), "
                    "so every block is masked")
        return Resolved("skip" if impl == "auto" else impl, multiple, impl, platform,
                        f"configured ({how})", lengths)
    if model.mode != "batch":
        return Resolved("skip", 0, impl, platform,
                        f"{kind.upper()}: mode={model.mode!r} has per-example gates, which "
                        "compact mode cannot gather; 'skip' runs each branch on its subset")
    if kind == "cpu" or kind not in _WHY:
        why = _WHY["cpu"] if kind == "cpu" else f"{platform}: not measured; CPU's choice"
        return Resolved("skip", 0, impl, platform, why)
    name = model.get("name", "cifar_resnet")
    if name not in COMPACT_MODELS:
        return Resolved("skip", 0, impl, platform,
                        f"{kind.upper()}: model {name!r} has no compact mode (only "
                        f"{', '.join(COMPACT_MODELS)}); lax.cond skipping")
    if not scans_a_stage(model):
        return Resolved("skip", 0, impl, platform, f"{kind.upper()}: {_no_scan(model)}")
    return Resolved("skip", DEFAULT_COMPACT_MULTIPLE, impl, platform, _WHY[kind])


def scans_a_stage(model: ml_collections.ConfigDict) -> bool:
    """Whether a ResNet config (:data:`COMPACT_MODELS`) scans any stage: compact mode gathers
    the kept blocks of scanned stages only and masks every other block."""
    return any(models._scanned_stages(_stage_sizes(model), model.get("scan")))


def expected_blocks(model: ml_collections.ConfigDict, resolved: Resolved) -> float:
    """The residual blocks a training step of a ResNet config (``model``, resolved as
    ``resolved``) is expected to compute: every block with ``'mask'``; the sum of the
    survival probabilities with ``lax.cond`` skipping (ResNet-110 at p_L 0.5: 0.75 of its
    54 blocks; at p_L 0.1, 0.54); in compact mode and ``'loop'``, each stage's first block
    and unscanned stages in full plus the scans' expected lengths, compact mode's padded
    as its buckets are (:func:`stochastic_depth_jax.buckets.expected_blocks`)."""
    sizes = _stage_sizes(model)
    if resolved.implementation == "mask":
        return float(sum(sizes))
    probs = schedules.survival_probabilities(model.survival_rule, sum(sizes),
                                             model.final_survival_prob)
    if not (resolved.compact_multiple or resolved.compact_lengths
            or resolved.implementation == models.LOOP):
        return float(probs.sum())
    scanned = models._scanned_stages(sizes, model.get("scan"))
    lengths = (buckets.stage_lengths(probs, sizes, scanned, resolved.compact_lengths)
               if resolved.compact_lengths else None)
    return buckets.expected_blocks(probs, sizes, scanned, resolved.compact_multiple, lengths)


def total_blocks(model: ml_collections.ConfigDict) -> int:
    """The residual blocks of a ResNet config's network (``model``): those an evaluation
    computes, every one active."""
    return sum(_stage_sizes(model))


def _stage_sizes(model: ml_collections.ConfigDict) -> tuple[int, int, int]:
    wide = model.get("name", "cifar_resnet") == "wide_resnet"
    n = (models.WideResNet if wide else models.CifarResNet)(depth=model.depth).blocks_per_stage()
    return (n, n, n)


def _no_scan(model: ml_collections.ConfigDict) -> str:
    """Why 'auto' does not pick compact mode for a config that scans no stage."""
    n = _stage_sizes(model)[0]
    fix = ("model.scan=True scans them" if n > 1 else
           "a depth with 2 or more blocks per stage and model.scan=True would scan them")
    return (f"model.depth={model.depth} ({n} block{'s' * (n > 1)} per stage) with model.scan="
            f"{model.get('scan')!r} scans no stage, so compact mode would gather nothing and "
            f"mask every block; lax.cond skipping ({fix})")


def is_constant_depth(model: ml_collections.ConfigDict) -> bool:
    """True for a ResNet config with p_L = 1, or a drop-path one (ViT, ConvNeXt) with
    drop_path_rate 0: no block is ever dropped, nothing to skip."""
    return (model.get("final_survival_prob", None) == 1.0
            or model.get("drop_path_rate", None) == 0)


def describe(resolved: Resolved, model: ml_collections.ConfigDict) -> str:
    """What ``resolved`` does with ``model``'s gates, in a few words (the start-up line)."""
    if is_constant_depth(model):
        if "drop_path_rate" in model:
            return "none needed: no drop path (drop_path_rate=0, every block runs on every example)"
        return "none needed: constant depth (final_survival_prob=1.0, every block runs)"
    if resolved.compact_multiple:
        return (f"compact mode (kept blocks gathered into static-length scans, multiple "
                f"{resolved.compact_multiple})")
    if resolved.compact_lengths:
        return (f"compact mode (kept blocks gathered into static-length scans, "
                f"{resolved.compact_lengths} lengths per stage chosen for the schedule)")
    if resolved.implementation == models.LOOP:
        return ("loop (each scanned stage's kept blocks in one device loop of dynamic "
                "length: one program, no padding; the other blocks masked)")
    if resolved.implementation == "mask":
        return "mask (every block computes; dropped outputs are multiplied by 0)"
    if model.mode == "sample":
        return "skip (per-example subsets: each block runs only on the examples it keeps)"
    return "skip (lax.cond: a dropped block computes nothing, forward or backward)"
