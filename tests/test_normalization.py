"""config.normalization: 'channel' (per-channel mean and std) and 'pixel' (the official Torch
code's mean image and global std): the statistics, the translation's fill, and a 'pixel'
smoke run through training, evaluation, export and a refused resume."""

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs` and the scripts live at the repository root.

import evaluate as evaluate_cli  # noqa: E402
import stochastic_depth_jax as sdj  # noqa: E402
import train as train_cli  # noqa: E402
from cli_output import one_line_error  # noqa: E402
from configs import load_config  # noqa: E402
from stochastic_depth_jax.data import augment, splits  # noqa: E402
from stochastic_depth_jax.training import config as config_lib  # noqa: E402
from stochastic_depth_jax.training import evaluate, loop  # noqa: E402

TINY = ["--config.progress_bar=false", "--config.write_tensorboard=false",
        "--config.write_plots=false", "--config.fake_data.num_train=48",
        "--config.fake_data.num_test=16", "--config.validation_size=16",
        "--config.batch_size=16", "--config.eval_batch_size=16", "--config.num_epochs=1",
        "--config.model.depth=8"]


def _split(n=7, seed=0):
    rng = np.random.default_rng(seed)
    return splits.Split(rng.integers(0, 256, (n, 5, 6, 3), dtype=np.uint8),
                        np.zeros(n, np.int32))


def test_stats_equal_numpy():
    split = _split()
    pixels = split.images.astype(np.float64)
    mean, std = splits.pixel_stats(split)
    assert mean.shape == (5, 6, 3) and std.shape == ()
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, pixels.std(), rtol=1e-6)
    mean, std = splits.channel_stats(split)
    np.testing.assert_allclose(mean, pixels.mean((0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, pixels.std((0, 1, 2)), rtol=1e-6)


def test_stats_of_more_images_than_one_chunk_count_every_image():
    """The statistics are counted in chunks of about ``_STATS_CHUNK_BYTES`` of pixels (SVHN's
    600k without a float copy): CIFAR's 45k span dozens. Of 2 chunks + 3 images, a chunk
    that drops or repeats an image at its ends shows."""
    rng = np.random.default_rng(1)
    shape = (32, 32, 3)
    n = 2 * (splits._STATS_CHUNK_BYTES // int(np.prod(shape))) + 3
    split = splits.Split(rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
                         np.zeros(n, np.int32))
    pixels = split.images.astype(np.float64)
    for stats, axes in ((splits.channel_stats, (0, 1, 2)), (splits.pixel_stats, None)):
        mean, std = stats(split)
        np.testing.assert_allclose(mean, pixels.mean(0 if axes is None else axes), rtol=1e-6)
        np.testing.assert_allclose(std, pixels.std(axes), rtol=1e-6)


def _exact_channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std from integer sums (exact), each rounded once."""
    values = images.reshape(-1, images.shape[-1]).astype(np.int64)
    mean = values.sum(0) / len(values)
    std = np.sqrt(np.square(values).sum(0) / len(values) - mean**2)
    return mean.astype(np.float32), std.astype(np.float32)


def _exact_pixel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean image and the global std from integer sums (exact), each rounded once."""
    values = images.astype(np.int64)
    mean = values.sum(0) / len(values)
    std = np.sqrt(np.square(values).sum() / values.size - mean.mean() ** 2)
    return mean.astype(np.float32), np.float32(std)


def test_stats_hold_less_than_a_copy_of_the_pixels_and_are_exact():
    """Large images (128 x 128 here; an image folder's may be 224 x 224 or more) are counted
    without a float copy of them: chunks of 8192 images in float64 took 16 times their
    pixels (10 GB of work arrays for 224 x 224 images, where the folder itself fits in
    memory). The sums are exact integers: the same statistics as before, to the bit."""
    import tracemalloc
    rng = np.random.default_rng(2)
    split = splits.Split(rng.integers(0, 256, (300, 128, 128, 3), dtype=np.uint8),
                         np.zeros(300, np.int32))
    for stats, exact in ((splits.channel_stats, _exact_channel_stats),
                         (splits.pixel_stats, _exact_pixel_stats)):
        tracemalloc.start()
        try:
            mean, std = stats(split)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < split.images.nbytes, (stats.__name__, peak)
        want_mean, want_std = exact(split.images)
        np.testing.assert_array_equal(mean, want_mean)
        np.testing.assert_array_equal(std, want_std)


def test_translation_fills_with_the_mean_at_each_pixel():
    split = _split()
    mean, std = splits.pixel_stats(split)
    image = augment.normalize(jnp.asarray(split.images[0]), mean, std)
    shifted = np.asarray(augment.translate(image, jnp.int32(2), jnp.int32(-3)))
    # Uncovered rows (top 2) and columns (right 3) are 0 normalised: the mean at that pixel.
    pixels = shifted * std + mean
    np.testing.assert_allclose(pixels[:2], mean[:2], atol=1e-3)
    np.testing.assert_allclose(pixels[:, -3:], mean[:, -3:], atol=1e-3)
    # Normalised before the shift (as the official code): the rest moves as normalised.
    np.testing.assert_array_equal(shifted[2:, :-3], np.asarray(image)[:-2, 3:])


def test_an_unknown_normalization_is_one_line(capsys, tmp_path):
    line = one_line_error(capsys, train_cli.main, [
        "--config", "cifar10:smoke", "--workdir", str(tmp_path / "w"),
        "--config.normalization=image"])
    assert line == "error: Invalid config: normalization='image'; valid: ['channel', 'pixel']"
    assert not os.path.exists(tmp_path / "w")


def test_a_config_recorded_before_the_field_is_unchanged():
    new = json.loads(load_config("cifar10:smoke", []).to_json())
    assert new["normalization"] == "channel"  # the default: what a run before it did
    old = {k: v for k, v in new.items() if k != "normalization"}
    assert config_lib.config_changes(config_lib.with_absent_defaults(old), new) == {}


def _json(path):
    with open(path) as f:
        return json.load(f)


def test_a_pixel_run_trains_evaluates_exports_and_refuses_another_normalization(
        capsys, tmp_path):
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(load_config("cifar10:smoke", TINY + [
        "--config.normalization=pixel"]), workdir)
    data = _json(os.path.join(workdir, "run.json"))["data"]
    assert np.shape(data["mean"]) == (32, 32, 3) and np.shape(data["std"]) == ()
    # evaluate.py: restore, check_same_data against recomputed statistics, evaluate.
    out = str(tmp_path / "eval.json")
    evaluate_cli.main(["--workdir", workdir, "--output", out])
    assert _json(out)["count"] == 16
    run = evaluate.restore_run(workdir, "latest")
    np.testing.assert_allclose(run.mean, data["mean"], rtol=1e-6)
    # The export keeps the mean image, and it reproduces the export's test error.
    exported = str(tmp_path / "pruned")
    evaluate_cli.main(["--workdir", workdir, "--remove", "1", "--repeats", "1",
                       "--throughput-batch", "4", "--export", exported])
    model, variables, meta = sdj.load_pruned(exported)
    mean, std = np.float32(meta["input"]["mean"]), np.float32(meta["input"]["std"])
    assert mean.shape == (32, 32, 3) and std.shape == ()
    x = (np.asarray(run.ds.test.images, np.float32) - mean) / std
    logits = model.apply(variables, x, train=False)
    error = float(np.mean(np.argmax(logits, -1) != np.asarray(run.ds.test.labels)))
    assert error == pytest.approx(meta["error"]["test"]["pruned"], abs=1e-6)
    # Resuming with the other normalization: one line, run.json untouched.
    before = _json(os.path.join(workdir, "run.json"))
    line = one_line_error(capsys, train_cli.main, ["--config", "cifar10:smoke", "--workdir",
                                                   workdir, *TINY, "--config.num_epochs=2"])
    assert line == ("error: This run was trained with normalization='pixel' (run.json's data records "
                    "its statistics) and this config has normalization='channel': set "
                    "--config.normalization=pixel as it trained, or train in a fresh --workdir.")
    assert _json(os.path.join(workdir, "run.json")) == before


def test_a_run_recorded_before_the_field_evaluates_as_channel(tmp_path):
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(load_config("cifar10:smoke", TINY), workdir)
    path = os.path.join(workdir, "run.json")
    meta = _json(path)
    assert np.shape(meta["data"]["mean"]) == (3,) and np.shape(meta["data"]["std"]) == (3,)
    before = evaluate_cli.run(evaluate_cli.parse_args(["--workdir", workdir, "--output",
                                                       str(tmp_path / "a.json")]))
    del meta["config"]["normalization"]
    with open(path, "w") as f:
        json.dump(meta, f)
    after = evaluate_cli.run(evaluate_cli.parse_args(["--workdir", workdir, "--output",
                                                      str(tmp_path / "b.json")]))
    assert {k: after[k] for k in ("error", "loss", "count")} == {
        k: before[k] for k in ("error", "loss", "count")}
