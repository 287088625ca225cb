"""Depth on demand: removal orders, the exported pruned model (equal outputs, fewer
parameters, Orbax round trip), Monte-Carlo depth, the Wide ResNet, and for tiny training
runs the p_L sweep's resume, the figures' sources and the evaluate.py flags."""

import functools
import json
import os
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs` and the scripts live at the repository root.

import stochastic_depth_jax as sdj  # noqa: E402
from configs import load_config  # noqa: E402
from stochastic_depth_jax import errors, pruning  # noqa: E402
from stochastic_depth_jax.training import depth, figures, metrics, sweep  # noqa: E402

X = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
TINY = ["--config.progress_bar=false", "--config.write_tensorboard=false",
        "--config.write_plots=false", "--config.fake_data.num_train=48",
        "--config.fake_data.num_test=16", "--config.validation_size=16",
        "--config.batch_size=16", "--config.eval_batch_size=16", "--config.num_epochs=2"]


@functools.partial(jax.jit, static_argnums=0)
def _eval(model, variables, gates=None):
    return model.apply(variables, X, train=False, gates=gates)


def _variables(model):
    v = model.init({"params": jax.random.key(1)}, X, train=False)
    stats = jax.tree.map(lambda a: a + 0.2 * jax.random.uniform(jax.random.key(a.size), a.shape),
                         v["batch_stats"])  # non-trivial running statistics
    return {"params": v["params"], "batch_stats": stats}


# ---- removal orders ------------------------------------------------------------------------

def test_survival_order_removes_lowest_probability_deepest_first():
    linear = sdj.CifarResNet(depth=20, final_survival_prob=0.5)
    assert pruning.survival_order(linear) == list(range(8, -1, -1))
    uniform = sdj.CifarResNet(depth=20, survival_rule="uniform", final_survival_prob=0.5)
    assert pruning.survival_order(uniform) == list(range(8, -1, -1))  # ties: deepest first
    assert pruning.removal_order("survival", linear) == list(range(8, -1, -1))


def test_greedy_order_takes_the_cheapest_block_each_time():
    model = sdj.CifarResNet(depth=20)
    cost = np.array([5.0, 1.0, 7.0, 0.5, 3.0, 2.0, 9.0, 4.0, 6.0])
    calls = []

    def error_of(keep):
        calls.append(keep.copy())
        removed = ~keep
        # Interaction: once block 3 is gone, block 6 costs nothing.
        return float(cost[removed].sum() - (9.0 if removed[3] and removed[6] else 0.0))

    order = pruning.removal_order("greedy", model, error_of=error_of)
    assert order == [3, 6, 1, 5, 4, 7, 0, 8, 2]
    assert len(calls) == 9 * 10 // 2
    # An export's search (--remove k) stops after k removals: the full order's first k,
    # ties included (all equal after block 3: the deeper block first, as in the full search).
    flat = lambda keep: 0.0 if not keep[3] else 1.0  # noqa: E731
    for k in range(10):
        calls.clear()
        assert pruning.removal_order("greedy", model, error_of=error_of,
                                     max_removed=k) == order[:k]
        assert len(calls) == sum(range(9, 9 - k, -1))
        assert (pruning.removal_order("greedy", model, error_of=flat, max_removed=k)
                == pruning.removal_order("greedy", model, error_of=flat)[:k])


def test_a_pruned_model_is_ordered_and_curved_by_the_blocks_it_has():
    """A pruned model's (a loaded export's) orders began with its deleted blocks, and its
    depth curve counted them as kept: its first points repeated the model as it is."""
    model = sdj.CifarResNet(depth=20, width=4, num_classes=3)
    pruned, pvars = pruning.prune(model, _variables(model), pruning.keep_mask(9, [8, 7]))
    assert pruning.survival_order(pruned) == [6, 5, 4, 3, 2, 1, 0]
    assert pruning.greedy_order(pruned, lambda keep: 0.0) == [6, 5, 4, 3, 2, 1, 0]  # ties
    with pytest.raises(ValueError, match=r"blocks \[8\] are already deleted from this "
                                         r"pruned model; it has blocks \[0, 1, 2, 3, 4, 5, 6\]"):
        pruning.list_order(pruned, [6, 8])
    evaluator = pruning.SubNetworkEvaluator(pruned, pvars, lambda: [(X, jnp.zeros(4, jnp.int32),
                                                                     jnp.ones(4, bool))])
    points = pruning.depth_curve(pruned, pvars, [6, 5], evaluators={"test": evaluator},
                                 image_shape=(8, 8, 3), throughput_batch=2, repeats=1,
                                 measure_every=9)
    assert [p["blocks_kept"] for p in points] == [7, 6, 5]
    # Measured every 9 points and at both ends: the last point too.
    assert ["num_params" in p and "images_per_s" in p for p in points] == [True, False, True]


def test_list_order_and_bad_orders():
    model = sdj.CifarResNet(depth=20)
    assert pruning.removal_order("list", model, blocks=[0, 8, 4]) == [0, 8, 4]
    with pytest.raises(ValueError, match=r"distinct indices in \[0, 9\)") as e:
        pruning.removal_order("list", model, blocks=[9])
    # A Python caller is told the argument, evaluate.py's user the flag.
    assert "blocks=[8, 7]" in str(e.value) and "--blocks 8,7" in e.value.command_line
    with pytest.raises(ValueError, match="distinct"):
        pruning.removal_order("list", model, blocks=[1, 1])
    # A non-integer was truncated (2.5 removed block 2, True block 1); NumPy and 0-d JAX
    # integers are the indices they hold.
    for blocks in ([2.5], [True], [np.float64(3.0)]):
        with pytest.raises(ValueError, match=r"distinct indices in \[0, 9\)"):
            pruning.removal_order("list", model, blocks=blocks)
    assert pruning.removal_order("list", model, blocks=[np.int64(3), jnp.array(2)]) == [3, 2]
    with pytest.raises(ValueError, match=r"needs the blocks .*blocks=\[8, 7, 6\]") as e:
        pruning.removal_order("list", model)
    assert "--blocks 8,7,6" in e.value.command_line
    with pytest.raises(ValueError, match="valid: \\['survival', 'greedy', 'list'\\]"):
        pruning.removal_order("random", model)


# ---- the pruned model ----------------------------------------------------------------------

@pytest.mark.parametrize("kw, removed", [
    (dict(depth=14, scan=True), [5, 2, 1]),
    (dict(depth=20, scan=False, block="preact", shortcut="B"), [8, 7, 3, 4]),
])
def test_pruned_model_equals_full_model_with_blocks_removed(kw, removed, tmp_path):
    model = sdj.CifarResNet(width=4, num_classes=3, **kw)
    variables = _variables(model)
    full = functools.partial(_eval, model)
    L = model.num_blocks()
    # All gates open is the ordinary evaluation (every block, scaled by p_l).
    np.testing.assert_allclose(full(variables, jnp.ones(L, bool)), full(variables), atol=1e-5)
    # Removed: the deepest blocks, a stage's first block (stride 2, shortcut), scanned ones.
    keep = pruning.keep_mask(L, removed)
    pruned, pvars = pruning.prune(model, variables, keep)
    out = _eval(pruned, pvars)
    np.testing.assert_allclose(out, full(variables, jnp.asarray(keep)), atol=1e-5)
    assert not np.allclose(out, full(variables), atol=1e-3)
    assert pruning.param_count(pvars) < pruning.param_count(variables)
    # Saved and loaded on its own: same definition, same outputs.
    pruning.save_pruned(str(tmp_path / "pruned"), pruned, pvars, {"removed": removed})
    loaded, lvars, meta = pruning.load_pruned(str(tmp_path / "pruned"))
    assert loaded == pruned and meta == {"removed": removed}
    np.testing.assert_array_equal(_eval(loaded, lvars), out)
    # Pruning further composes with the first cut.
    again, avars = pruning.prune(pruned, pvars, pruning.keep_mask(L, [0]))
    np.testing.assert_allclose(_eval(again, avars),
                               full(variables, jnp.asarray(keep & pruning.keep_mask(L, [0]))),
                               atol=1e-5)


def test_a_bfloat16_model_prunes_a_scanned_stages_first_block():
    """A deleted first block of a stage returned its shortcut in float32 ('A-avg' pools in
    float32) where the scanned blocks after it carry bfloat16: pruning a bf16 ResNet-56 or
    deeper (a depth curve reaches the stage's first block) failed in ``lax.scan`` with
    "carry input and carry output must have equal types"."""
    model = sdj.CifarResNet(depth=14, width=4, num_classes=3, scan=True, dtype="bfloat16")
    variables = _variables(model)
    keep = pruning.keep_mask(6, [2])  # stage 2's first block, before its scanned one
    pruned, pvars = pruning.prune(model, variables, keep)
    out = _eval(pruned, pvars)
    np.testing.assert_allclose(out, _eval(model, variables, jnp.asarray(keep)), atol=2e-2)
    assert not np.allclose(out, _eval(model, variables), atol=2e-2)


def test_pruning_a_pruned_scanned_stage_takes_the_blocks_it_still_has():
    """A pruned model's scan stack holds only its kept blocks: pruning it further indexes
    that stack by the kept blocks' places among them. ResNet-26's third stage scans blocks
    9-11; with 9 deleted its stack holds 10 and 11, and deleting 11 (or a block of another
    stage) then keeps 10's parameters, not 11's."""
    model = sdj.CifarResNet(depth=26, width=4, num_classes=3, scan=True)
    variables = _variables(model)
    pruned, pvars = pruning.prune(model, variables, pruning.keep_mask(12, [9]))
    for more in ([11], [0]):
        keep = pruning.keep_mask(12, [9, *more])
        again, avars = pruning.prune(pruned, pvars, keep)
        np.testing.assert_allclose(_eval(again, avars), _eval(model, variables, jnp.asarray(keep)),
                                   atol=1e-5)
        _, direct = pruning.prune(model, variables, keep)
        jax.tree.map(np.testing.assert_array_equal, avars, direct)


def test_pruned_scanned_stage_holds_only_kept_blocks():
    model = sdj.CifarResNet(depth=20, width=4, num_classes=3, scan=True)
    variables = _variables(model)
    stack = variables["params"]["stages"]["stage3_scan"]  # blocks 7 and 8, stacked
    assert jax.tree.leaves(stack)[0].shape[0] == 2
    _, pvars = pruning.prune(model, variables, pruning.keep_mask(9, [7]))
    kept = pvars["params"]["stages"]["stage3_scan"]
    jax.tree.map(lambda full, one: np.testing.assert_array_equal(full[1:], one), stack, kept)
    _, pvars = pruning.prune(model, variables, pruning.keep_mask(9, [7, 8]))
    assert "stage3_scan" not in pvars["params"]["stages"]  # nothing left to scan


def test_save_pruned_takes_numpy_metadata_and_writes_nothing_it_cannot_record(tmp_path):
    # A keep mask or a float32 error in the metadata (what pruning's own functions hand
    # out) is recorded as JSON lists and numbers; json.dump raised TypeError after the
    # variables and part of model.json were written, so the retry found a non-empty
    # directory. Anything JSON cannot hold is refused in one line before anything is written.
    model = sdj.CifarResNet(depth=8, width=4, num_classes=3)
    variables = _variables(model)
    keep = pruning.keep_mask(3, [2])
    pruned, pvars = pruning.prune(model, variables, keep)
    out = str(tmp_path / "numpy")
    pruning.save_pruned(out, pruned, pvars, {"keep": keep, "error": np.float32(0.25),
                                             "blocks": np.int64(2),
                                             "jnp_error": jnp.mean(jnp.float32([0.5, 0.0])),
                                             "jnp_keep": jnp.asarray(keep)})
    assert pruning.load_pruned(out)[2] == {"keep": [True, True, False], "error": 0.25,
                                           "blocks": 2, "jnp_error": 0.25,
                                           "jnp_keep": [True, True, False]}
    bad = str(tmp_path / "bad")
    with pytest.raises(errors.ConfigError, match="metadata must be JSON-serialisable.*type object"):
        pruning.save_pruned(bad, pruned, pvars, {"model": object()})
    assert not os.path.exists(bad)
    # The input normalisation is both halves or none: a mean alone recorded "std": null.
    for half in (dict(mean=[125.3, 123.0, 113.9]), dict(std=[63.0, 62.1, 66.7])):
        with pytest.raises(errors.ConfigError, match=r"^save_pruned needs both mean and std, "
                                                     r"or neither\.$"):
            pruning.save_pruned(bad, pruned, pvars, **half)
        assert not os.path.exists(bad)


def test_bad_keep_is_refused():
    with pytest.raises(ValueError, match="one entry per block \\(9\\)"):
        sdj.CifarResNet(depth=20, keep=(True, False))
    # prune's keep is over the full model's blocks, also for a pruned model (a keep over
    # its kept blocks only failed in NumPy broadcasting).
    model = sdj.CifarResNet(depth=14, width=4, num_classes=3)
    pruned, pvars = pruning.prune(model, _variables(model), pruning.keep_mask(6, [5, 4]))
    with pytest.raises(ValueError, match=r"one entry per block of the full model \(6;.*"
                                         r"got shape \(4,\)"):
        pruning.prune(pruned, pvars, [True, True, False, True])


def test_prune_names_variables_that_are_not_the_models():
    """The parameters alone (a train state's ``params``), variables without their
    ``'batch_stats'`` or another model's failed in ``prune`` with a bare ``KeyError``."""
    model = sdj.CifarResNet(depth=14, width=4, num_classes=3)
    variables, keep = _variables(model), pruning.keep_mask(6, [5])
    other = _variables(sdj.CifarResNet(depth=8, width=4, num_classes=3))
    for given, missing in ((variables["params"], r"\['params'\]\['stem_conv'\]"),
                           ({"params": variables["params"]}, r"\['batch_stats'\]"),
                           (other, r"\['batch_stats'\]\['stages'\]\['stage1_block2'\]")):
        with pytest.raises(ValueError, match=rf"prune found no variables{missing}.*pass the "
                                             r"full model's variables as model.init returns"):
            pruning.prune(model, given, keep)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("removed", [[1], [3], [2, 5]])
def test_pruned_and_full_variables_are_not_mixed_up(scan, removed):
    """A pruned model applied to the full model's variables ran silently where the deleted
    blocks were unscanned (their parameters ignored: another network's outputs); the full
    model given the pruned variables failed in Flax ("Could not find parameter"), and
    scanned stages in ``scan`` ("length argument ... disagrees"). Each is one line naming
    what does not fit and ``prune``'s returned variables; each model runs with its own."""
    model = sdj.CifarResNet(depth=20, width=4, num_classes=3, scan=scan)
    variables = _variables(model)
    pruned, pvars = pruning.prune(model, variables, pruning.keep_mask(9, removed))
    fix = ("a pruned model takes the variables pruning.prune returned with it: pruned, "
           "pruned_variables = pruning.prune(model, variables, keep).")
    refused = r"^The variables do not fit the model's blocks \(.*\): "
    with pytest.raises(ValueError, match=refused + re.escape(fix)):
        _eval(pruned, variables)
    with pytest.raises(ValueError, match=refused + "a pruned model's variables"):
        _eval(model, pvars)
    with pytest.raises(ValueError, match=refused):  # in training too
        pruned.apply(variables, X, train=True, mutable=["batch_stats"],
                     rngs={"stochastic_depth": jax.random.key(0)})
    np.testing.assert_allclose(_eval(pruned, pvars),
                               _eval(model, variables, jnp.asarray(pruning.keep_mask(9, removed))),
                               atol=1e-5)


def test_the_message_names_the_blocks_that_do_not_fit():
    model = sdj.CifarResNet(depth=20, width=4, num_classes=3, scan=False)
    variables = _variables(model)
    pruned, pvars = pruning.prune(model, variables, pruning.keep_mask(9, [0, 5]))
    with pytest.raises(ValueError, match=r"\(parameters for block 0, which it deletes; "
                                         r"parameters for block 5, which it deletes\)"):
        _eval(pruned, variables)
    with pytest.raises(ValueError, match=r"\(no parameters for block 0, which it runs; no "
                                         r"parameters for block 5, which it runs\)"):
        _eval(model, pvars)
    scanned = model.clone(scan=True)
    _, spvars = pruning.prune(scanned, _variables(scanned), pruning.keep_mask(9, [7]))
    with pytest.raises(ValueError, match=r"\(stage3_scan stacks 1 block where it runs 2\)"):
        _eval(scanned, spvars)


@pytest.mark.parametrize("scan", [False, True])
def test_another_depths_variables_are_refused(scan):
    """A ResNet-20 given a ResNet-26's variables ran silently when unscanned (each stage's
    fourth block ignored)."""
    model, deeper = (sdj.CifarResNet(depth=d, width=4, num_classes=3, scan=scan)
                     for d in (20, 26))
    with pytest.raises(ValueError, match=r"^The variables do not fit the model's blocks.*"
                                         r"another depth's with a model of that depth"):
        _eval(model, _variables(deeper))


def test_keep_mask_checks_its_indices():
    # The top-level name is the pruning module's function.
    assert sdj.keep_mask is pruning.keep_mask
    np.testing.assert_array_equal(sdj.keep_mask(4, [3, 0]), [False, True, True, False])
    np.testing.assert_array_equal(sdj.keep_mask(4, np.array([1])), [True, False, True, True])
    np.testing.assert_array_equal(sdj.keep_mask(4, jnp.array([2])), [True, True, False, True])
    np.testing.assert_array_equal(sdj.keep_mask(np.int64(2), []), [True, True])
    # Out of range (a 1-based block number, a negative index NumPy would wrap) and non-integer
    # indices were an IndexError, or silently removed another block; now one line naming them.
    for removed, shown in [([4], "[4]"), ([-1], "[-1]"), ([1, 2.5], "[2.5]"),
                           ([True], "[True]"), (np.array([1.0]), "[1.0]")]:
        with pytest.raises(ValueError, match=r"0-based integer indices in \[0, 4\), got "
                                             + re.escape(shown) + r"; e.g. keep_mask\(4, \[3\]\)"):
            sdj.keep_mask(4, removed)
    # A block named twice removed one block fewer than the list names (and a record of the
    # list, an export's metadata, claimed both): one line naming it.
    for removed in ([2, 2], jnp.array([3, 1, 3]), [np.int64(0), 0]):
        with pytest.raises(ValueError, match=r"^keep_mask's removed blocks must be distinct, "
                                             r"got \[\d\] more than once in \[.*\]; name each "
                                             r"block once\.$"):
            sdj.keep_mask(4, removed)
    for num_blocks in (0, 4.0, True):
        with pytest.raises(ValueError, match="num_blocks is the full model's block count"):
            sdj.keep_mask(num_blocks, [])


def test_keep_mask_takes_0d_integer_arrays_as_the_indices_they_hold():
    # A list of jnp.argmin results, or of an index array's elements, worked before keep_mask
    # checked its indices, and was then refused as "not integer indices"; a 0-d bool or
    # float array is still refused, as its scalar is.
    order = jnp.argsort(jnp.array([0.3, 0.1, 0.2, 0.9]))
    np.testing.assert_array_equal(sdj.keep_mask(4, list(order)[:2]), [True, False, False, True])
    np.testing.assert_array_equal(sdj.keep_mask(4, [np.array(3), jnp.argmin(jnp.arange(4))]),
                                  [False, True, True, False])
    np.testing.assert_array_equal(sdj.keep_mask(jnp.int32(3), [np.int64(1)]), [True, False, True])
    for removed, shown in [([np.array(True)], "[True]"), ([jnp.array(1.0)], "[1.0]")]:
        with pytest.raises(ValueError, match=r"0-based integer indices in \[0, 4\), got "
                                             + re.escape(shown)):
            sdj.keep_mask(4, removed)


# ---- Monte-Carlo depth ---------------------------------------------------------------------

def _batches(n=2):
    labels = jnp.arange(4) % 3
    return lambda: [(X * (i + 1), labels, jnp.ones(4, bool)) for i in range(n)]


def test_a_mask_keeping_every_block_is_the_model_as_evaluated():
    """The depth curve's first point and an export's 'full' error ran the gated program,
    which rounds otherwise (~1e-6 in the logits): an example or two could differ from the
    model's own evaluation. A mask of another length is refused, not run as the model."""
    model = sdj.CifarResNet(depth=8, width=4, num_classes=3)
    labels, mask = jnp.arange(8) % 3, jnp.ones(8, bool)
    plain = jax.jit(lambda v, x: pruning._sums(model.apply(v, x, train=False), labels, mask))
    for seed in range(4):  # the gated program's loss differed in its last bits for 1 of 4
        x = jax.random.normal(jax.random.key(seed), (8, 8, 8, 3))
        variables = model.init({"params": jax.random.key(seed + 1)}, x, train=False)
        evaluator = pruning.SubNetworkEvaluator(model, variables, lambda: [(x, labels, mask)])
        assert evaluator(np.ones(3, bool)) == pruning._metrics(np.asarray(plain(variables, x)))
    with pytest.raises(ValueError, match=r"keep has one entry per block of the full model "
                                         r"\(3\), got 8; e.g. pruning.keep_mask\(3, removed\)"):
        evaluator(np.ones(8, bool))
    # Where the two programs round alike, they are still two: the model as evaluated for
    # the mask keeping every block, the gated one (a second compilation) for the others.
    from stochastic_depth_jax.training import compilation

    fresh = sdj.CifarResNet(depth=8, width=4, num_classes=3, final_survival_prob=0.55)
    evaluator = pruning.SubNetworkEvaluator(fresh, variables, lambda: [(x, labels, mask)])
    evaluator(np.ones(3, bool))
    with compilation.CompileStats() as stats:
        evaluator(np.array([True, False, True]))
    assert stats.programs >= 1


def test_the_evaluators_of_one_model_share_their_compilations():
    """A depth curve's validation and test evaluators each compiled the same two programs
    (all blocks, and gated), twice the compilation of the model's evaluation."""
    from stochastic_depth_jax.training import compilation

    model = sdj.CifarResNet(depth=8, width=4, num_classes=3, final_survival_prob=0.7)
    variables = _variables(model)
    keeps = [np.ones(3, bool), np.array([True, False, True])]
    first = pruning.SubNetworkEvaluator(model, variables, _batches())
    results = [first(keep) for keep in keeps]
    again = sdj.CifarResNet(depth=8, width=4, num_classes=3, final_survival_prob=0.7)
    second = pruning.SubNetworkEvaluator(again, variables, _batches())  # equal, not the same
    with compilation.CompileStats() as stats:
        assert [second(keep) for keep in keeps] == results
    assert stats.programs == 0


@pytest.mark.parametrize("model", [
    sdj.ViT(depth=2, width=8, num_heads=2, patch_size=4, num_classes=3),
    sdj.ConvNeXt(num_classes=3, depths=(1, 1, 1, 1), dims=(4, 4, 4, 4), stem_stride=1)])
def test_a_sub_network_evaluator_refuses_a_drop_path_model(model):
    """It took the model, then the first call failed inside apply with a TypeError
    ("unexpected keyword argument 'gates'") and a JAX traceback."""
    with pytest.raises(errors.ConfigError, match="block-wise stochastic depth.*got a "
                       + type(model).__name__):
        pruning.SubNetworkEvaluator(model, {}, lambda: [])


def test_mc_evaluation_of_a_constant_depth_net_is_deterministic():
    model = sdj.CifarResNet(depth=8, width=4, num_classes=3, final_survival_prob=1.0)
    r = pruning.mc_evaluate(model, _variables(model), _batches(), samples=3,
                            key=jax.random.key(0))
    assert r["mc"]["error"] == r["deterministic"]["error"] == r["member_mean_error"]
    assert r["mc"]["loss"] == pytest.approx(r["deterministic"]["loss"], rel=1e-5)
    assert r["count"] == 8


def test_mc_evaluation_averages_sampled_sub_networks():
    model = sdj.CifarResNet(depth=20, width=4, num_classes=3, final_survival_prob=0.2)
    variables = _variables(model)
    key = jax.random.key(3)
    one = pruning.mc_evaluate(model, variables, _batches(1), samples=1, key=key)
    # One sample: the member whose gates are draw_gates(fold_in(key, 0)), unscaled.
    gates = sdj.draw_gates(jax.random.fold_in(key, 0), model.survival_probs())
    assert not bool(jnp.all(gates))
    logits = model.apply(variables, X, train=False, stochastic=True, gates=gates)
    expected = float(jnp.mean(jnp.argmax(logits, -1) != jnp.arange(4) % 3))
    assert one["mc"]["error"] == one["member_mean_error"] == expected
    many = pruning.mc_evaluate(model, variables, _batches(1), samples=6, key=key)
    assert many["deterministic"] == one["deterministic"]
    # The members' mean error is a count over samples * examples, shown exactly: it was
    # float32's (0.8999999761581421 for 576 / 640).
    wrong = many["member_mean_error"] * many["samples"] * many["count"]
    assert many["member_mean_error"] == round(wrong) / (many["samples"] * many["count"])
    assert many["mc"]["loss"] != one["mc"]["loss"]
    with pytest.raises(ValueError, match="samples must be >= 1"):
        pruning.mc_evaluate(model, variables, _batches(1), samples=0, key=key)


# ---- Wide ResNet ---------------------------------------------------------------------------

def test_wide_resnet_config_and_size():
    c = load_config("cifar100_wrn")
    assert (c.model.name, c.model.depth, c.model.widen_factor) == ("wide_resnet", 28, 10)
    assert (c.weight_decay, c.num_epochs, tuple(c.lr_boundaries_epochs), c.lr_decay_factor) == (
        5e-4, 200, (60, 120, 160), 0.2)
    assert c.nesterov and c.learning_rate == 0.1 and c.batch_size == 128
    model = sdj.WideResNet(depth=28, widen_factor=10, num_classes=100)
    shapes = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x, train=False),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    assert round(pruning.param_count(shapes) / 1e6, 1) == 36.5  # WRN paper: 36.5M
    assert model.num_blocks() == 12
    with pytest.raises(ValueError, match="6n\\+4"):
        load_config("cifar100_wrn", ["--config.model.depth=26"])
    with pytest.raises(ValueError, match="6n\\+4"):
        sdj.WideResNet(depth=20)


# ---- runs: sweep resume, figures, evaluate.py flags ----------------------------------------

@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
    """A 2-run sweep (depth 8, p_L 0.5 and 1.0); run B was interrupted after one step."""
    root = str(tmp_path_factory.mktemp("sweep"))
    runs = [(name, load_config("cifar10:smoke", TINY + extra))
            for name, extra in sweep.plan([8], [0.5, 1.0])]
    assert [n for n, _ in runs] == ["depth8_pL0.5", "depth8_pL1"]
    from stochastic_depth_jax.training import loop

    partial = runs[1][1].copy_and_resolve_references()
    partial.max_steps = 1
    loop.train_and_evaluate(partial, os.path.join(root, runs[1][0]))
    first_record = metrics.read_metrics(os.path.join(root, runs[1][0]))[0]
    with pytest.warns(UserWarning, match="changed config: max_steps: 1 -> 0"):
        status = sweep.run_sweep(runs, root)
    return root, runs, status, first_record


def test_sweep_resumes_and_skips_finished_runs(sweep_root):
    root, runs, status, first_record = sweep_root
    assert status == {"depth8_pL0.5": "started", "depth8_pL1": "resumed"}
    b = os.path.join(root, "depth8_pL1")
    run_json = json.load(open(os.path.join(b, "run.json")))
    assert run_json["start_step"] == 1  # continued from the interrupted run's checkpoint
    # The interrupted run's record of its step (epoch 0.5, its checkpoint's) is kept.
    assert [r["epoch"] for r in metrics.read_metrics(b)][:2] == [0.5, 1] and all(
        sweep.is_finished(os.path.join(root, n), c) for n, c in runs)

    def must_not_train(config, workdir):
        raise AssertionError(f"finished run {workdir} trained again")

    again = sweep.run_sweep(runs, root, train=must_not_train)
    assert set(again.values()) == {"skipped (finished)"}
    assert first_record["step"] == 1


def test_sweep_figures_carry_their_sources(sweep_root):
    root, runs, _, _ = sweep_root
    collected = sweep.collect(root)
    assert [(r["depth"], r["p_last"], r["finished"]) for r in collected] == [
        (8, 0.5, True), (8, 1.0, True)]
    outputs = sweep.write_figures(collected, os.path.join(root, "figures"))
    workdirs = [os.path.join(root, n) for n, _ in runs]
    for key in ("fig8", "fig7", "fig3"):
        png = outputs[key]
        assert os.path.getsize(png) > 0 and figures.read_sources(png) == workdirs
        sidecar = json.load(open(os.path.splitext(png)[0] + ".json"))
        assert sidecar["sources"] == workdirs and sidecar["data"]
    fig8 = json.load(open(os.path.join(root, "figures", "fig8_error_vs_p_last.json")))
    assert [p for p, _ in fig8["data"]["8"]] == [0.5, 1.0]
    assert [e for _, e in fig8["data"]["8"]] == [r["test_error"] for r in collected]
    fig3 = json.load(open(os.path.join(root, "figures", "fig3_error_curves.json")))
    for r in collected:  # Fig. 3 plots each epoch's test error and training loss
        assert fig3["data"][r["name"]]["test_error_percent"] == [
            [m["epoch"], pytest.approx(100 * m["test_error"])] for m in r["records"]]
        assert [e for e, _ in fig3["data"][r["name"]]["train_loss"]] == [
            m["epoch"] for m in r["records"]]
    table = open(outputs["training_time"]).read()
    assert "depth8_pL0.5" in table and "| 1.00 |" in table and workdirs[0] in table


def test_depth_curve_and_export_from_a_run(sweep_root, tmp_path, capsys, monkeypatch):
    root, _, _, _ = sweep_root
    workdir = os.path.join(root, "depth8_pL0.5")
    import builtins

    import evaluate as evaluate_script

    opened, real_open = [], builtins.open

    def spy(path, mode="r", *args, **kwargs):  # what is opened for writing in the workdir
        if isinstance(path, str) and path.startswith(workdir) and set(mode) & set("wax"):
            opened.append(os.path.basename(path).split(".tmp")[0])
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    evaluate_script.main(["--workdir", workdir, "--depth-curve", "--order", "survival",
                          "--repeats", "1", "--throughput-batch", "4"])
    monkeypatch.undo()
    # Each written once (the JSON was written three times: the figure's sidecar, then the
    # curve over it, then evaluate.py's copy), through a file renamed onto it once whole.
    assert sorted(opened) == ["depth_curve_survival.json", "depth_curve_survival.png"]
    assert not [n for n in os.listdir(workdir) if ".tmp" in n]
    curve = json.load(open(os.path.join(workdir, "depth_curve_survival.json")))
    assert curve["order"] == [2, 1, 0] and [p["blocks_kept"] for p in curve["points"]] == [3, 2, 1, 0]
    # Printed as a table, a row per point (the JSON, ~16 lines a point, is in the file).
    printed = capsys.readouterr().out.splitlines()
    rows = [line.split(" | ") for line in printed if line[:3] in ("| 3", "| 2", "| 1", "| 0")]
    assert [(r[0], r[1], r[3]) for r in rows] == [
        (f"| {p['blocks_kept']}", str(p["removed"][-1]) if p["removed"] else "-",
         f"{100 * p['test_error']:.2f}%") for p in curve["points"]]
    assert printed[-1] == (f"Written: {curve['json']} (every number) and {curve['png']}.")
    assert len(printed) == len(curve["points"]) + 4
    params = [p["num_params"] for p in curve["points"]]
    assert params == sorted(params, reverse=True) and params[0] > params[-1]
    assert all(p["images_per_s"] > 0 for p in curve["points"])
    png = os.path.join(workdir, "depth_curve_survival.png")
    assert workdir in figures.read_sources(png)[0]
    # The first point is the ordinary evaluation of the same checkpoint.
    from stochastic_depth_jax.training import evaluate

    plain = evaluate.evaluate_checkpoint(workdir, "best")
    assert curve["points"][0]["test_error"] == pytest.approx(plain["error"],
                                                             abs=1.01 / plain["count"])
    assert curve["points"][0]["test_loss"] == pytest.approx(plain["loss"], rel=1e-5)
    # Export with two blocks removed; the saved model reproduces the curve's point.
    out = str(tmp_path / "pruned")
    with pytest.raises(errors.ConfigError, match=r"^remove must be a number of blocks in "
                                                 r"\[0, 2\], got 99") as e:
        depth.export_pruned_run(workdir, out, remove=99)
    assert e.value.command_line.startswith("--remove must be") and not os.path.exists(out)
    record = depth.export_pruned_run(workdir, out, remove=2, repeats=1, throughput_batch=4)
    assert record["removed"] == [2, 1] and record["num_params"]["pruned"] < record[
        "num_params"]["full"]
    model, variables, meta = pruning.load_pruned(out)
    assert model.kept_blocks().tolist() == [True, False, False] and meta["removed"] == [2, 1]
    assert record["error"]["test"]["pruned"] == curve["points"][2]["test_error"]


def test_a_greedy_export_searches_only_the_blocks_it_removes(sweep_root, tmp_path,
                                                             monkeypatch, capsys):
    """export --order greedy --remove N searched the whole greedy order (L^2 / 2
    validation evaluations: ResNet-110's 1485 for --remove 5, which needs 260), silently,
    and refused a --remove out of range only after that search."""
    root, _, _, _ = sweep_root
    workdir = os.path.join(root, "depth8_pL0.5")  # 3 blocks
    calls = []
    error = pruning.SubNetworkEvaluator.error
    monkeypatch.setattr(pruning.SubNetworkEvaluator, "error",
                        lambda self, keep: calls.append(tuple(keep)) or error(self, keep))
    with pytest.raises(errors.ConfigError, match=r"remove must be a number of blocks in "
                                                 r"\[0, 2\], got 4 \(order 'greedy'\)"):
        depth.export_pruned_run(workdir, str(tmp_path / "none"), order="greedy", remove=4)
    assert calls == [] and not os.path.exists(tmp_path / "none")
    record = depth.export_pruned_run(workdir, str(tmp_path / "one"), order="greedy", remove=1,
                                     repeats=1, throughput_batch=4, progress=print)
    assert len(calls) == 3  # one removal: each of the 3 blocks tried once, not 3 + 2 + 1
    assert len(record["removed"]) == 1 and record["blocks_kept"] == 2
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(f"greedy order: removed block {record['removed'][0]} (1 of 1), "
                           "validation error ")


@pytest.mark.parametrize("order, kw", [("survival", dict(remove=3)),
                                       ("greedy", dict(remove=3)),
                                       ("list", dict(blocks=[2, 0, 1])),
                                       ("list", dict(blocks=[2, 0, 1], remove=3))])
def test_an_export_keeps_at_least_one_block(sweep_root, tmp_path, order, kw):
    """--remove L (or --blocks naming all L blocks) exported the stem, the shortcuts and the
    classifier alone, with no residual block, measured and saved as a pruned network; it is
    refused in one line naming the most that can be removed, and nothing is written."""
    root, _, _, _ = sweep_root
    workdir = os.path.join(root, "depth8_pL0.5")  # 3 blocks
    out = str(tmp_path / "pruned")
    with pytest.raises(errors.ConfigError) as e:
        depth.export_pruned_run(workdir, out, order=order, repeats=1, throughput_batch=4, **kw)
    line = e.value.command_line
    assert "\n" not in line and not os.path.exists(out)
    if "remove" in kw:
        assert line == (f"--remove must be a number of blocks in [0, 2], got 3 (order "
                        f"{order!r}); removing all 3 would leave no residual block, only the "
                        "stem and classifier.")
    else:
        assert line == ("--blocks names all 3 blocks of the model; an export keeps at least "
                        "one (it would be the stem and classifier alone): name at most 2, or "
                        "add --remove 2.")
    record = depth.export_pruned_run(workdir, out, order=order, repeats=1, throughput_batch=4,
                                     **{**kw, "remove": 2})
    assert record["blocks_kept"] == 1 and len(record["removed"]) == 2


def test_a_depth_curve_without_matplotlib_is_refused_before_any_work(sweep_root, capsys,
                                                                    monkeypatch):
    """Without matplotlib the curve was computed, then lost in a traceback: its numbers are
    written with its figure (the PNG's sidecar)."""
    import evaluate as evaluate_script
    from stochastic_depth_jax.training import evaluate

    workdir = os.path.join(sweep_root[0], "depth8_pL0.5")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # its import fails
    monkeypatch.setattr(evaluate, "restore_run", lambda *a, **k: pytest.fail("restored"))
    with pytest.raises(SystemExit) as info:
        evaluate_script.main(["--workdir", workdir, "--depth-curve", "--order", "list",
                              "--blocks", "1"])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "Traceback" not in err
    [line] = err.splitlines()
    assert line.startswith("error: --depth-curve draws depth_curve_list.png, but matplotlib "
                           "cannot be imported (")
    assert line.endswith("); install it (pip install matplotlib) and run again. Nothing was "
                         "computed.")


def test_dropout_acts_in_training_only_with_its_own_rng_stream():
    x = X[:2]
    model = sdj.CifarResNet(depth=14, width=4, num_classes=3, scan=True, dropout_rate=0.5,
                            final_survival_prob=0.5)
    plain = model.clone(dropout_rate=0.0)
    variables = model.init({"params": jax.random.key(1)}, x, train=False)
    gates = jnp.array([1, 1, 0, 1, 1, 1], bool)

    @jax.jit
    def train(key):
        return model.apply(variables, x, train=True, gates=gates, rngs={"dropout": key},
                           mutable=["batch_stats"])[0]

    a, b = train(jax.random.key(0)), train(jax.random.key(1))
    np.testing.assert_array_equal(a, train(jax.random.key(0)))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(_eval(model, variables), _eval(plain, variables))
    with pytest.raises(ValueError, match="dropout_rate must be in \\[0, 1\\)"):
        sdj.CifarResNet(depth=8, dropout_rate=1.0)


def test_mc_members_of_a_sample_mode_model_are_fixed_networks_whatever_the_batch():
    """A mode='sample' model's members drew one gate column per position in the batch, so
    its Monte-Carlo figures changed with the evaluation batch size; now member i is one
    network for every example: the figures of 8 examples in one batch and in two equal."""
    model = sdj.CifarResNet(depth=20, width=4, num_classes=3, final_survival_prob=0.2,
                            mode="sample")
    variables = _variables(model)
    images = jnp.concatenate([X, X * 2])
    labels = jnp.arange(8) % 3
    whole = lambda: [(images, labels, jnp.ones(8, bool))]
    halves = lambda: [(images[:4], labels[:4], jnp.ones(4, bool)),
                      (images[4:], labels[4:], jnp.ones(4, bool))]
    run = functools.partial(pruning.mc_evaluate, model, variables, samples=3,
                            key=jax.random.key(5))
    one, two = run(whole), run(halves)
    assert one["mc"]["error"] == two["mc"]["error"]
    assert one["member_mean_error"] == two["member_mean_error"]
    assert one["mc"]["loss"] == pytest.approx(two["mc"]["loss"], rel=1e-5)
    # Member 0 is the network of draw_gates(fold_in(key, 0)), as in batch mode.
    gates = sdj.draw_gates(jax.random.fold_in(jax.random.key(5), 0), model.survival_probs())
    logits = model.apply(variables, images, train=False, stochastic=True,
                         gates=jnp.broadcast_to(gates[:, None], gates.shape + (8,)))
    member = pruning.mc_evaluate(model, variables, whole, samples=1, key=jax.random.key(5))
    assert member["mc"]["error"] == float(jnp.mean(jnp.argmax(logits, -1) != labels))


class _FreeBlock(nn.Module):
    """A user's block holding parameters only where it changes width."""
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, p=1.0, g=None, *, train, stochastic=None):
        if x.shape[-1] != self.features:
            x = nn.Dense(self.features)(x)
        return x + 0.5 * jnp.tanh(x)


@pytest.mark.parametrize("scan", [False, True])
def test_a_users_blocks_without_parameters_are_not_refused(scan):
    # Taken for missing ("no parameters for block 1, which it runs", "stage1_scan stacks 0
    # blocks where it runs 2"): only the library's blocks surely hold parameters.
    stages = sdj.models.ResidualStages((3, 3), (4, 8), (1, 1), block=_FreeBlock, scan=scan)
    x, probs = jnp.ones((2, 4, 4, 3)), np.ones(6)
    v = stages.init(jax.random.key(0), x, probs, None, train=False, constant=True)
    assert stages.apply(v, x, probs, None, train=False, constant=True).shape == (2, 4, 4, 8)


def test_an_export_refuses_variables_saved_with_another_definition(tmp_path):
    """Two exports keeping as many blocks of a scanned stage, but not the same ones: their
    variables have the same shapes, and one's variables/ beside the other's model.json
    loaded and ran silently (the blocks' survival probabilities and order of the other
    definition: another network's outputs). Refused now in one line naming the kept
    blocks; an export read whole loads as before."""
    import shutil

    model = sdj.CifarResNet(depth=26, width=4, num_classes=3, scan=True)  # 3 scanned a stage
    variables = _variables(model)
    L = model.num_blocks()
    for removed in (1, 2):
        pruned, pvars = pruning.prune(model, variables, pruning.keep_mask(L, [removed]))
        pruning.save_pruned(str(tmp_path / f"without{removed}"), pruned, pvars)
    loaded, lvars, _ = pruning.load_pruned(str(tmp_path / "without2"))
    out = _eval(loaded, lvars)
    shutil.rmtree(tmp_path / "without2" / "variables")
    shutil.copytree(tmp_path / "without1" / "variables", tmp_path / "without2" / "variables")
    with pytest.raises(errors.CheckpointError, match=re.escape(
            f"{tmp_path / 'without2' / 'variables'} does not hold the variables saved with "
            f"{tmp_path / 'without2' / 'model.json'} (which keeps blocks [0, 1, 3, 4, 5, 6, "
            "7, 8, 9, 10, 11]): another export's (other blocks kept?) or damaged; copy an "
            "export's model.json and variables/ together, or export again.")):
        pruning.load_pruned(str(tmp_path / "without2"))
    loaded, lvars, _ = pruning.load_pruned(str(tmp_path / "without1"))
    assert not np.allclose(_eval(loaded, lvars), out, atol=1e-3)


def test_an_export_of_bfloat16_variables_loads_as_before(tmp_path):
    """load_pruned restores the variables in the model's dtypes (float32), casting saved
    bfloat16 ones; the checksum recorded was of the bfloat16 bits, so every such export
    was refused as another export's variables. It is of the variables as loaded now."""
    model = sdj.CifarResNet(depth=26, width=4, num_classes=3, scan=True)
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), _variables(model))
    pruning.save_pruned(str(tmp_path / "half"), model, half)
    loaded, lvars, _ = pruning.load_pruned(str(tmp_path / "half"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.float32(b)), lvars, half)
    assert {a.dtype for a in jax.tree.leaves(lvars)} == {np.dtype(np.float32)}


def test_an_export_saved_before_the_checksum_was_recorded_loads(tmp_path):
    """model.json files written before ``variables_checksum`` existed have none: their
    variables load unchecked, as before."""
    model = sdj.CifarResNet(depth=26, width=4, num_classes=3, scan=True)
    variables = _variables(model)
    path = pruning.save_pruned(str(tmp_path / "old"), model, variables)
    with open(os.path.join(path, pruning.MODEL_FILE)) as f:
        record = json.load(f)
    record["variables_checksum"] += 1  # a wrong one is refused ...
    with open(os.path.join(path, pruning.MODEL_FILE), "w") as f:
        json.dump(record, f)
    with pytest.raises(errors.CheckpointError, match="does not hold the variables saved"):
        pruning.load_pruned(path)
    del record["variables_checksum"]  # ... none is not
    with open(os.path.join(path, pruning.MODEL_FILE), "w") as f:
        json.dump(record, f)
    _, loaded, _ = pruning.load_pruned(path)
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
