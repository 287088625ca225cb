"""model.implementation='auto' resolves per platform; explicit choices are kept."""
import pytest

from configs import load_config
from stochastic_depth_jax.training import config as config_lib
from stochastic_depth_jax.training import implementation


def _model(*overrides):
    return load_config("cifar10:smoke", list(overrides)).model


@pytest.mark.parametrize("platform, impl, multiple", [
    ("cpu", "skip", 0),
    ("gpu", "skip", implementation.DEFAULT_COMPACT_MULTIPLE),
    ("cuda", "skip", implementation.DEFAULT_COMPACT_MULTIPLE),
    ("tpu", "skip", implementation.DEFAULT_COMPACT_MULTIPLE),
])
def test_auto_is_the_default_and_resolves_per_platform(platform, impl, multiple):
    model = _model("--config.model.depth=56")  # scanned stages (9 blocks each)
    assert model.implementation == "auto"
    r = implementation.resolve(model, platform)
    assert (r.implementation, r.compact_multiple, r.compact_lengths, r.requested,
            r.platform) == (impl, multiple, 0, "auto", platform)
    assert r.reason and set(r.to_json()) == {"implementation", "compact_multiple", "requested",
                                             "platform", "reason", "compact_lengths"}


@pytest.mark.parametrize("name, overrides, blocks", [
    ("cifar10:smoke", ["--config.model.depth=20"], "3 blocks"),
    ("cifar100_wrn", [], "4 blocks"),  # WRN-28-10, the config's own default
    ("cifar10:smoke", [], "1 block"),
])
def test_auto_picks_no_compact_mode_where_no_stage_is_scanned(name, overrides, blocks):
    """Compact mode gathers the kept blocks of scanned stages only; with none (scan=None and
    fewer than 9 blocks a stage) it masks every block. 'auto' recorded compact mode on a
    GPU there while each block ran under lax.cond."""
    model = load_config(name, overrides).model
    for platform in ("gpu", "tpu"):
        r = implementation.resolve(model, platform)
        assert (r.implementation, r.compact_multiple, r.compact_lengths) == ("skip", 0, 0)
        assert f"({blocks} per stage) with model.scan=None scans no stage" in r.reason
        assert implementation.describe(r, model).startswith("skip (lax.cond")
    scanned = load_config(name, overrides + ["--config.model.scan=True"]).model
    assert implementation.resolve(scanned, "gpu").compact_multiple == (blocks != "1 block") * 4
    explicit = load_config(name, overrides + ["--config.model.compact_multiple=2"]).model
    r = implementation.resolve(explicit, "gpu")  # as asked, and said what it does
    assert r.compact_multiple == 2 and r.reason.endswith("so every block is masked)")


def test_explicit_choices_and_multiples_are_kept_on_every_platform():
    for platform in ("cpu", "gpu", "tpu"):
        r = implementation.resolve(_model("--config.model.implementation=skip"), platform)
        assert (r.implementation, r.compact_multiple) == ("skip", 0)
        r = implementation.resolve(_model("--config.model.implementation=mask"), platform)
        assert (r.implementation, r.compact_multiple) == ("mask", 0)
        r = implementation.resolve(_model("--config.model.compact_multiple=2"), platform)
        assert (r.implementation, r.compact_multiple, r.compact_lengths) == ("skip", 2, 0)
        r = implementation.resolve(_model("--config.model.compact_lengths=3"), platform)
        assert (r.implementation, r.compact_multiple, r.compact_lengths) == ("skip", 0, 3)
        assert "3 lengths per stage" in r.reason
        assert "3 lengths per stage" in implementation.describe(r, _model())


@pytest.mark.parametrize("overrides, message", [
    (["--config.model.compact_lengths=-1"], "model.compact_lengths=-1 must be an integer >= 0"),
    (["--config.model.compact_lengths=2", "--config.model.compact_multiple=4"],
     "set one of them to 0"),
    (["--config.model.compact_lengths=2", "--config.model.mode=sample"],
     "need model.mode='batch'"),
])
def test_bad_compact_lengths_fail_clearly(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_lib.validate(load_config("cifar10:smoke", overrides))


def test_scan_unroll_must_be_a_bool():
    config = load_config("cifar10:smoke")
    with config.unlocked():
        del config.model["scan_unroll"]
        config.model.scan_unroll = 1  # e.g. written so in a user's config file
    with pytest.raises(ValueError, match="model.scan_unroll=1 must be True or False"):
        config_lib.validate(config)


def test_auto_with_per_example_gates_never_picks_compact_mode():
    vit = load_config("cifar10_vit:smoke", ["--config.model.implementation=auto"]).model
    for model in (_model("--config.model.mode=sample"), vit):
        r = implementation.resolve(model, "gpu")
        assert (r.compact_multiple, r.compact_lengths) == (0, 0) and "sample" in r.reason


@pytest.mark.parametrize("name", ["cifar10_vit:smoke", "cifar10_convnext:smoke"])
def test_auto_never_picks_compact_mode_for_models_without_it(name):
    """Batch-mode gates in a ViT or ConvNeXt on a GPU: lax.cond skipping, not a compact mode
    the model does not have (that once failed at start-up with a misleading message)."""
    model = load_config(name, ["--config.model.mode=batch",
                               "--config.model.implementation=auto"]).model
    for platform in ("gpu", "tpu"):
        r = implementation.resolve(model, platform)
        assert (r.implementation, r.compact_multiple, r.compact_lengths) == ("skip", 0, 0)
        assert "has no compact mode" in r.reason
        assert implementation.describe(r, model).startswith("skip (lax.cond")


def test_unknown_implementation_fails_clearly():
    with pytest.raises(ValueError, match="model.implementation='fastest'"):
        config_lib.validate(load_config("cifar10:smoke",
                                        ["--config.model.implementation=fastest"]))
    # Compact mode is a knob, not an implementation name: the message says which.
    with pytest.raises(ValueError, match=r"model.implementation='compact' is not a name: "
                       r"compact mode is model.compact_multiple=4 \(or model.compact_lengths=3\)"):
        config_lib.validate(load_config("cifar10:smoke",
                                        ["--config.model.implementation=compact"]))


@pytest.mark.parametrize("name", ["cifar10:smoke", "cifar100_wrn:smoke"])
@pytest.mark.parametrize("requested", ["auto", "skip", "mask"])
def test_sample_mode_resnets_resolve_to_the_masking_they_run(name, requested):
    """The ResNets draw every gate up front, so per-example gates are masks whatever was
    asked for: the record (run.json) and the start-up line say so."""
    model = load_config(name, ["--config.model.mode=sample",
                               f"--config.model.implementation={requested}"]).model
    for platform in ("cpu", "gpu"):
        r = implementation.resolve(model, platform)
        assert (r.implementation, r.compact_multiple, r.requested) == ("mask", 0, requested)
        assert "masked in the ResNets" in r.reason
        assert implementation.describe(r, model).startswith("mask (every block computes")


def test_vit_sample_mode_says_it_runs_per_example_subsets():
    model = load_config("cifar10_vit:smoke").model  # mode='sample', implementation='skip'
    for platform in ("cpu", "gpu"):
        r = implementation.resolve(model, platform)
        assert (r.implementation, r.compact_multiple) == ("skip", 0)
        assert implementation.describe(r, model).startswith("skip (per-example subsets")
    auto = load_config("cifar10_vit:smoke", ["--config.model.implementation=auto"]).model
    r = implementation.resolve(auto, "cpu")
    assert "lax.cond" not in r.reason and "subset" in r.reason  # Not the batch-mode reason.
    batch = _model()
    r = implementation.resolve(batch, "cpu")
    assert implementation.describe(r, batch).startswith("skip (lax.cond")


def test_constant_depth_says_nothing_is_skipped():
    model = _model("--config.model.final_survival_prob=1.0")
    for platform in ("cpu", "gpu"):
        text = implementation.describe(implementation.resolve(model, platform), model)
        assert text.startswith("none needed: constant depth") and "compact" not in text


@pytest.mark.parametrize("override", [[], ["--config.model.compact_multiple=2"],
                                      ["--config.model.compact_lengths=3"]])
def test_constant_depth_records_no_compact_mode(override):
    """The train step compacts nothing at p_L = 1 (a plain network); run.json recorded
    compact mode there on a GPU ('auto' and explicit), which read as if it ran."""
    model = _model("--config.model.final_survival_prob=1.0", *override)
    for platform in ("cpu", "gpu", "tpu"):
        r = implementation.resolve(model, platform)
        assert (r.implementation, r.compact_multiple, r.compact_lengths) == ("skip", 0, 0)
        assert "nothing is dropped" in r.reason
    mask = _model("--config.model.final_survival_prob=1.0", "--config.model.implementation=mask")
    assert implementation.resolve(mask, "gpu").implementation == "mask"


@pytest.mark.parametrize("name", ["cifar10_vit:smoke", "cifar10_convnext:smoke"])
def test_no_drop_path_says_nothing_is_skipped(name):
    """drop_path_rate=0 (a baseline) said 'skip (per-example subsets: each block runs only on
    the examples it keeps)' at start-up, and why that implementation was chosen."""
    model = load_config(name, ["--config.model.drop_path_rate=0"]).model
    for platform in ("cpu", "gpu"):
        text = implementation.describe(implementation.resolve(model, platform), model)
        assert text.startswith("none needed: no drop path") and "subset" not in text
    assert implementation.is_constant_depth(model)
    assert not implementation.is_constant_depth(load_config(name).model)


def test_loop_is_kept_and_described_on_every_platform():
    model = _model("--config.model.implementation=loop", "--config.model.depth=56")  # scanned
    for platform in ("cpu", "gpu", "tpu"):
        r = implementation.resolve(model, platform)
        assert (r.implementation, r.compact_multiple, r.compact_lengths) == ("loop", 0, 0)
        assert "one loop per stage" in r.reason
        assert implementation.describe(r, model).startswith("loop (each scanned stage's kept")


@pytest.mark.parametrize("overrides, message", [
    (["--config.model.compact_multiple=4"], "set model.compact_multiple=4 and "
     "model.compact_lengths=0 to 0"),
    (["--config.model.mode=sample"], "'loop' needs model.mode='batch'"),
    (["--config.model.dropout_rate=0.3"], "model.dropout_rate=0.3 needs implementation 'skip'"),
    # No scanned stage: nothing to loop over, every block would compute (masked).
    (["--config.model.depth=20"], r"model.depth=20 \(3 blocks per stage\) with model.scan=None "
     r"scans none \(None: stages of 9 blocks or more\), .*: set model.scan=True, or use "
     r"implementation 'skip'$"),
    # The parenthesis gives the rule of the scan value given (it named None's for True).
    (["--config.model.scan=True"], r"model.depth=8 \(1 block per stage\) with model.scan=True "
     r"scans none \(True: stages of 2 blocks or more\), .*: use model.depth=14 or more with "
     r"model.scan=True"),
    (["--config.model.depth=20", "--config.model.scan=False"], r"model.scan=False scans none, "
     r"so every block would compute, masked: set model.scan=True"),
])
def test_loop_with_what_it_cannot_run_fails_clearly(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_lib.validate(load_config("cifar10:smoke",
                                        ["--config.model.implementation=loop", *overrides]))


@pytest.mark.parametrize("name", ["cifar10_vit:smoke", "cifar10_convnext:smoke"])
def test_drop_path_models_refuse_loop(name):
    message = ("model.implementation='loop' loops over a ResNet's scanned stages; "
               "'(vit|convnext)' takes one of \\['auto', 'skip', 'mask'\\]$")
    with pytest.raises(ValueError, match=message):
        config_lib.validate(load_config(name, ["--config.model.implementation=loop"]))
