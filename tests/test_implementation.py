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
    model = _model()
    assert model.implementation == "auto"
    r = implementation.resolve(model, platform)
    assert (r.implementation, r.compact_multiple, r.requested, r.platform) == (
        impl, multiple, "auto", platform)
    assert r.reason and set(r.to_json()) == {"implementation", "compact_multiple", "requested",
                                             "platform", "reason"}


def test_explicit_choices_and_multiples_are_kept_on_every_platform():
    for platform in ("cpu", "gpu", "tpu"):
        r = implementation.resolve(_model("--config.model.implementation=skip"), platform)
        assert (r.implementation, r.compact_multiple) == ("skip", 0)
        r = implementation.resolve(_model("--config.model.implementation=mask"), platform)
        assert (r.implementation, r.compact_multiple) == ("mask", 0)
        r = implementation.resolve(_model("--config.model.compact_multiple=2"), platform)
        assert (r.implementation, r.compact_multiple) == ("skip", 2)


def test_auto_with_per_example_gates_never_picks_compact_mode():
    r = implementation.resolve(_model("--config.model.mode=sample"), "gpu")
    assert (r.implementation, r.compact_multiple) == ("skip", 0)
    assert "sample" in r.reason


def test_unknown_implementation_fails_clearly():
    with pytest.raises(ValueError, match="model.implementation='fastest'"):
        config_lib.validate(load_config("cifar10:smoke",
                                        ["--config.model.implementation=fastest"]))
