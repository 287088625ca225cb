"""The ViT config through the generic trainer: trains, device-count invariant, resumes exactly
(ConvNeXt too), clear errors."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs` lives at the repository root, beside train.py.

from configs import load_config  # noqa: E402
from stochastic_depth_jax import ViT, errors, pruning  # noqa: E402
from stochastic_depth_jax.training import train_and_evaluate  # noqa: E402
from stochastic_depth_jax.training import config as config_lib  # noqa: E402
from stochastic_depth_jax.training import distributed, plots  # noqa: E402
from stochastic_depth_jax.training import setup as setup_lib  # noqa: E402
from trainer_steps import train_steps  # noqa: E402

TINY = ["--config.progress_bar=false", "--config.write_tensorboard=false"]


def _train(config, workdir, mesh, steps=3):
    setup, losses, params0, state = train_steps(config, workdir, mesh, steps)
    return setup, losses, params0, jax.device_get(state.params)


def test_smoke_vit_trains_through_the_trainer_same_on_one_and_eight_devices(tmp_path):
    config = load_config("cifar10_vit:smoke", TINY)
    assert config.model.groups == 8 and config.model.implementation == "skip"
    setup, eight, p0, p8 = _train(config, str(tmp_path), distributed.make_mesh())
    assert isinstance(setup.model, ViT) and setup.model.drop_path_rate == 0.3
    assert np.all(np.isfinite(eight))
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p8)))
    # groups=8 fixes the subsets whatever the device count: 1 and 8 devices train the same.
    _, one, _, p1 = _train(config, str(tmp_path), distributed.make_mesh(jax.devices()[:1]))
    np.testing.assert_allclose(eight, one, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), p8, p1)


def test_a_run_says_what_it_trains_at_start_up(tmp_path, capsys):
    """Nothing printed named the model, its size or the data's splits: a ViT smoke run and a
    ResNet-110 one looked alike until the curves were drawn."""
    config = load_config("cifar10_vit:smoke", TINY + [
        "--config.max_steps=1", "--config.write_plots=false", "--config.checkpoint_every_epochs=0"])
    train_and_evaluate(config, str(tmp_path))
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("Training ")]
    model = setup_lib.build_model(config, 10, distributed.make_mesh())
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                            jnp.zeros((1, 32, 32, 3)))
    assert line == (f"Training {plots.run_title(config)}: {pruning.param_count(shapes):,} "
                    "parameters; 128 training, 32 validation, 64 test images.")
    assert "ViT-Ti/4 depth 2 width 32 num_heads 2, drop path 0.3" in line


def test_vit_schedule_and_label_smoothing_come_from_the_config():
    config = load_config("cifar10_vit:smoke", TINY)
    assert config.optimizer == "adamw" and config.label_smoothing == 0.1
    schedule = setup_lib.optim.make_lr_schedule(config, steps_per_epoch=4)
    lrs = [float(schedule(s)) for s in (0, 2, 4, 6, 8)]
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1e-3)  # warm-up over epoch 1
    assert lrs[1] == pytest.approx(5e-4) and lrs[4] == pytest.approx(0.0, abs=1e-12)


def test_groups_not_a_multiple_of_devices_is_a_clear_error(tmp_path):
    config = load_config("cifar10_vit:smoke", TINY + ["--config.model.groups=4"])
    with pytest.raises(ValueError, match="model.groups=4 is not a multiple of the 8 devices"):
        setup_lib.build_model(config, 10, distributed.make_mesh())


@pytest.mark.parametrize("spec", ["cifar10_vit:smoke", "cifar10_convnext:smoke"])
def test_groups_not_a_multiple_of_devices_is_refused_before_the_data_is_prepared(
        monkeypatch, tmp_path, spec):
    """Refused only once the model was built: after the data's download and preparation
    (real CIFAR: minutes, to learn of a config mistake), where the batch sizes that do not
    divide over the devices are refused before any."""
    def load_data(*args, **kwargs):
        raise AssertionError("the data was prepared before the config was checked")

    monkeypatch.setattr(setup_lib, "load_data", load_data)
    config = load_config(spec, TINY + ["--config.model.groups=4"])
    with pytest.raises(errors.ConfigError, match="model.groups=4 is not a multiple of the 8"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("--config.model.size=xl", "model.size='xl'"),
    ("--config.model.drop_path_rate=1.0", "drop_path_rate must be in"),
    ("--config.model.groups=5", "model.groups=5 must be"),
    ("--config.model.name=resnet", "model.name='resnet'"),
    ("--config.label_smoothing=1.0", "label_smoothing=1.0"),
])
def test_bad_vit_config_fails_at_load(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("cifar10_vit:smoke", TINY + [override])


@pytest.mark.parametrize("spec, override, message", [
    ("cifar10_vit:smoke", "--config.model.patch_size=3",
     "model.patch_size=3 does not fit cifar10: 32x32 images do not tile into 3x3 patches"),
    ("cifar10_convnext:smoke", "--config.model.stem_stride=3",
     "model.stem_stride=3 does not fit cifar10: 32x32 images do not divide into this "
     "ConvNeXt's stages"),
])
def test_a_model_that_does_not_fit_the_images_is_refused_before_anything_is_written(
        tmp_path, spec, override, message):
    """The images' sides are known once the data is loaded: a patch size or stem stride
    that does not divide them was a traceback from the model's initialisation, and left
    the workdir behind with its empty checkpoint folders."""
    workdir = tmp_path / "run"
    with pytest.raises(errors.ConfigError, match=message):
        train_and_evaluate(load_config(spec, TINY + [override]), str(workdir))
    assert not workdir.exists()


@pytest.mark.parametrize("stem_stride, side, fix", [
    (2, 24, "or use stem_stride=1."),  # 24 = 1 * 8 * 3: a smaller stem fits
    (4, 80, "or use stem_stride=2."),  # the largest that fits (3 does not), not 1
    (1, 20, "or use fewer stages (depths, dims)."),  # no stem stride fits 20 with 4 stages
    (2, 20, "or use fewer stages (depths, dims)."),
])
def test_a_convnext_that_does_not_fit_the_images_is_told_a_fix_that_fits(stem_stride, side,
                                                                        fix):
    """The line naming model.stem_stride said "or use a smaller stem_stride" at stem_stride=1,
    and where no smaller one fits: the stage count (a multiple of 8 for four stages) was the
    constraint it never named."""
    config = load_config("cifar10_convnext:smoke", [f"--config.model.stem_stride={stem_stride}"])
    model = setup_lib.build_model(config, 10, distributed.make_mesh())
    with pytest.raises(errors.ConfigError, match=f"model.stem_stride={stem_stride} does not fit"
                       ) as e:
        setup_lib.check_image_shape(config, model, "image_folder:x", (side, side, 3))
    assert str(e.value).endswith("; resize or crop the images, " + fix)


def test_resnet_only_options_are_refused_for_the_vit():
    with pytest.raises(ValueError, match="Unknown config field 'model.compact_multiple'"):
        load_config("cifar10_vit:smoke", TINY + ["--config.model.compact_multiple=4"])
    assert set(config_lib.MODEL_VALIDATORS) == set(setup_lib.MODEL_BUILDERS)


def _checksum_and_records(workdir):
    """The last 'latest' checkpoint's checksum (every bit of the state) and the records of
    metrics.jsonl and validation.jsonl, without the per-session timings."""
    from stochastic_depth_jax.training import checkpoint, metrics

    ckpts = checkpoint.Checkpoints(workdir, read_only=True)
    try:
        checksum = ckpts.read_meta("latest", ckpts.steps("latest")[-1])["checksum"]
    finally:
        ckpts.close()
    records = [[{k: v for k, v in r.items() if not k.endswith("_s") and k != "images_per_s"}
                for r in metrics.read_metrics(workdir, name)]
               for name in (metrics.METRICS_FILE, metrics.VALIDATION_FILE)]
    return checksum, records


@pytest.mark.parametrize("name", ["cifar10_vit:smoke", "cifar10_convnext:smoke"])
def test_a_drop_path_run_stopped_mid_epoch_resumes_to_the_uninterrupted_runs_weights(
        tmp_path, monkeypatch, name):
    """As the ResNet's (test_train.py): SIGTERM during a mid-epoch evaluation (step 3 of 4,
    eval_every_steps) saves that step; the resumed session ends with the same weights,
    records and best as one run (AdamW, warm-up + cosine, per-example drop-path subsets)."""
    import signal

    from stochastic_depth_jax.training import evaluate, stopping

    config = load_config(name, TINY + ["--config.write_plots=false",
                                       "--config.eval_every_steps=3",
                                       f"--config.compilation_cache_dir={tmp_path / 'cache'}"])
    full = train_and_evaluate(config, str(tmp_path / "full"))
    evaluate_split = evaluate.evaluate_split

    def signalled(*args, **kwargs):  # the first evaluation: step 3's validation split
        monkeypatch.setattr(evaluate, "evaluate_split", evaluate_split)
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate_split(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_split", signalled)
    with pytest.raises(stopping.Stopped, match="stopped by SIGTERM at step 3 "):
        train_and_evaluate(config, str(tmp_path / "stopped"))
    resumed = train_and_evaluate(config, str(tmp_path / "stopped"))
    assert resumed["steps"] == full["steps"] == 8 and resumed["best"] == full["best"]
    assert (_checksum_and_records(str(tmp_path / "stopped"))
            == _checksum_and_records(str(tmp_path / "full")))


@pytest.mark.parametrize("spec", ["cifar10_vit:smoke", "cifar10_convnext:smoke"])
def test_model_remat_reaches_the_vit_and_convnext_with_the_resnets_meaning(spec):
    """``model.remat`` was a ResNet field only: ``--config.model.remat=full`` on a ViT was an
    unknown field, and ``remat=True`` of the models unreachable from train.py. It takes the
    ResNets' words that mean something for these models: 'none' (default, every activation
    kept) and 'full' (each block's branches recomputed from their input); 'convs', which
    keeps a ResNet's convolution outputs, and anything else are refused in one line. A
    run.json written before the field builds the model without remat."""
    mesh = distributed.make_mesh()
    config = load_config(spec, TINY)
    assert config.model.remat == "none"
    assert setup_lib.build_model(config, 10, mesh).remat is False
    assert setup_lib.build_model(load_config(spec, TINY + ["--config.model.remat=full"]), 10,
                                 mesh).remat is True
    name = "ViT" if "vit" in spec else "ConvNeXt"
    for bad in ("convs", "true"):
        with pytest.raises(errors.ConfigError) as caught:
            load_config(spec, TINY + [f"--config.model.remat={bad}"])
        assert str(caught.value) == (
            f"Invalid config: model.remat='{bad}': a {name} takes 'none' (keep every "
            f"activation for the backward pass) or 'full' (recompute each block's branches "
            f"from their input in the backward pass); 'convs' (keep the convolution outputs) "
            f"is the ResNets' only")
    older = config.copy_and_resolve_references()
    del older.model["remat"]
    assert setup_lib.build_model(config_lib.validate(older, recorded=True), 10,
                                 mesh).remat is False


def test_vit_layer_scale_and_remat_train_through_the_trainer(tmp_path):
    """``model.layer_scale_init`` (LayerScale, DINOv2's 1e-5) reaches the ViT; its titles
    name it; bad values are refused in one line. With ``model.remat='full'`` the same
    losses as without (the same computation, recomputed in the backward pass)."""
    config = load_config("cifar10_vit:smoke", TINY)
    assert config.model.layer_scale_init is None
    mesh = distributed.make_mesh()
    assert setup_lib.build_model(config, 10, mesh).layer_scale_init is None
    scaled = load_config("cifar10_vit:smoke", TINY + ["--config.model.layer_scale_init=0.1"])
    assert setup_lib.build_model(scaled, 10, mesh).layer_scale_init == 0.1
    assert "ViT-Ti/4 depth 2 width 32 num_heads 2 layer scale 0.1, drop path" in \
        plots.run_title(scaled)
    assert "layer scale" not in plots.run_title(config)
    for bad in ("-1", "nan"):
        with pytest.raises(errors.ConfigError, match=r"^Invalid config: model\.layer_scale_"
                           r"init=(-1\.0|nan) must be a number >= 0 \(1e-5 as DINOv2; 0 or "
                           r"None: no layer scale\)$"):
            load_config("cifar10_vit:smoke", TINY + [f"--config.model.layer_scale_init={bad}"])
    older = config.copy_and_resolve_references()
    del older.model["layer_scale_init"]
    assert setup_lib.build_model(config_lib.validate(older, recorded=True), 10,
                                 mesh).layer_scale_init is None
    one = distributed.make_mesh(jax.devices()[:1])
    _, plain, _, p_plain = _train(scaled, str(tmp_path), one, steps=2)
    remat = load_config("cifar10_vit:smoke", TINY + ["--config.model.layer_scale_init=0.1",
                                                     "--config.model.remat=full"])
    setup, losses, _, p_remat = _train(remat, str(tmp_path), one, steps=2)
    assert setup.model.remat is True and np.all(np.isfinite(losses))
    np.testing.assert_allclose(losses, plain, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 p_remat, p_plain)


def test_resuming_a_vit_with_another_layer_scale_start_is_refused(tmp_path):
    """``model.layer_scale_init`` only starts the gammas, which a resumed run restores as
    trained: another value resumed, and run.json and the curves' title ('layer scale 0.1
    then layer scale 0.5 from epoch 2') said the network changed. Refused in one line
    naming the way to resume, before anything is written; None and 0 are the same."""
    workdir = str(tmp_path)
    scaled = ["--config.model.layer_scale_init=0.1", "--config.warmup_epochs=0"]
    train_and_evaluate(load_config("cifar10_vit:smoke",
                                   TINY + scaled + ["--config.num_epochs=1"]), workdir)
    files = ("run.json", "metrics.jsonl", "summary.json")
    before = {f: open(os.path.join(workdir, f), "rb").read() for f in files}
    resumed = load_config("cifar10_vit:smoke", TINY + scaled + [
        "--config.num_epochs=2", "--config.model.layer_scale_init=0.5"])
    with pytest.raises(errors.ConfigError, match=(
            r"^The run in .* started its layer scales at model.layer_scale_init=0.1 \(run.json\) "
            r"and this config has 0.5: its gammas are restored as trained, so the new value "
            r"would only mislabel the run. Resume it with --config.model.layer_scale_init=0.1, "
            r"or train in a fresh --workdir.$")):
        train_and_evaluate(resumed, workdir)
    assert before == {f: open(os.path.join(workdir, f), "rb").read() for f in files}
