"""Device-resident batches: order, augmentation, evaluation coverage, 1 vs 8 devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from stochastic_depth_jax import data, errors
from stochastic_depth_jax.data import order, splits

MEAN, STD = np.array([10.0, 20.0, 30.0], np.float32), np.array([2.0, 4.0, 8.0], np.float32)


def _mesh(n):
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n])


def _split(n, shape=(8, 8, 3), seed=0):
    """Random images; labels = example index, so batches reveal which examples they hold."""
    rng = np.random.default_rng(seed)
    return data.Split(rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
                      np.arange(n, dtype=np.int32))


@functools.partial(jax.jit, static_argnames=("batch_size", "augment"))
def _batch(dev, key, step, batch_size, augment):
    return data.train_batch(dev, key, step, batch_size=batch_size, mean=MEAN, std=STD,
                            augment=augment)


def test_devices_available():
    assert jax.device_count() == 8  # tests/conftest.py


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1000, 4097])
def test_order_is_a_permutation(n):
    got = np.asarray(order.permute(jax.random.key(3), jnp.arange(n), n))
    np.testing.assert_array_equal(np.sort(got), np.arange(n))


@pytest.mark.parametrize("n", [10000, 5000])
def test_order_is_well_mixed(n):
    """Uncorrelated with the stored order (an image folder's is sorted by class) and with
    the previous epoch's, at an even and an odd bit count of N (5000: 13 bits, each
    Feistel half rounded up; rounded down, the order kept a 0.43 correlation with the
    stored one). Of one Feistel round, an example's place kept its high bits from epoch to
    epoch: consecutive epochs' orders correlated at 0.6."""
    got = np.asarray(data.epoch_order(jax.random.key(0), 0, n))
    assert abs(np.corrcoef(got, np.arange(n))[0, 1]) < 0.05
    assert np.mean(got[1:] == got[:-1] + 1) < 0.01
    other = np.asarray(data.epoch_order(jax.random.key(0), 1, n))
    assert np.mean(got == other) < 0.01
    assert abs(np.corrcoef(got, other)[0, 1]) < 0.05


def test_train_batches_shapes_dtypes_and_epochs():
    dev = data.put_on_devices(_split(100), _mesh(1))
    key = jax.random.key(0)
    assert data.steps_per_epoch(100, 16) == 6
    epoch = [_batch(dev, key, s, 16, "flip_translate") for s in range(6)]
    images, labels = epoch[0]
    assert images.shape == (16, 8, 8, 3) and images.dtype == jnp.float32
    assert labels.shape == (16,) and labels.dtype == jnp.int32
    seen = np.concatenate([np.asarray(l) for _, l in epoch])
    assert len(set(seen.tolist())) == 96  # Full batches; the 4-example tail is dropped.
    np.testing.assert_array_equal(seen, np.asarray(data.epoch_order(key, 0, 100))[:96])
    next_epoch = np.asarray(_batch(dev, key, 6, 16, "none")[1])
    assert not np.array_equal(next_epoch, seen[:16])


def test_batches_are_a_function_of_key_and_step():
    dev = data.put_on_devices(_split(64), _mesh(1))
    a = _batch(dev, jax.random.key(1), 5, 8, "flip_translate")
    b = _batch(dev, jax.random.key(1), jnp.int32(5), 8, "flip_translate")
    c = _batch(dev, jax.random.key(2), 5, 8, "flip_translate")
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])


def test_no_augment_is_plain_normalisation():
    split = _split(40)
    dev = data.put_on_devices(split, _mesh(1))
    images, labels = _batch(dev, jax.random.key(0), 3, 8, "none")
    expected = (split.images[np.asarray(labels)].astype(np.float32) - MEAN) / STD
    np.testing.assert_allclose(images, expected, rtol=1e-6)


def test_translate_moves_pixels_and_fills_zeros():
    image = jnp.arange(1, 8 * 8 + 1, dtype=jnp.float32).reshape(8, 8, 1)
    out = np.asarray(data.translate(image, jnp.int32(2), jnp.int32(-3)))
    expected = np.zeros((8, 8, 1), np.float32)
    expected[2:, :5] = np.asarray(image)[:6, 3:]  # out[y, x] = image[y - 2, x + 3]
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(data.translate(image, jnp.int32(0), jnp.int32(0)), image)


def test_flip_translate_is_a_flip_and_a_bounded_shift():
    """Every output equals translate(image or its mirror, dy, dx) with |dy|, |dx| <= 4."""
    image = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8, 2)), jnp.float32)
    candidates = {(flip, dy, dx): np.asarray(data.translate(image[:, ::-1] if flip else image,
                                                            jnp.int32(dy), jnp.int32(dx)))
                  for flip in (0, 1) for dy in range(-4, 5) for dx in range(-4, 5)}
    keys = jax.random.split(jax.random.key(0), 300)
    outs = np.asarray(jax.jit(jax.vmap(data.flip_translate))(jnp.stack([image] * 300), keys))
    found = []
    for out in outs:
        match = [c for c, v in candidates.items() if np.array_equal(v, out)]
        assert match, "augmented image is not a flip + translation of the input"
        found.append(match[0])
    flips = np.mean([f for f, _, _ in found])
    assert 0.4 < flips < 0.6
    assert {dy for _, dy, _ in found} == set(range(-4, 5))
    assert {dx for _, _, dx in found} == set(range(-4, 5))


def test_translate_augment_is_flip_translate_s_shift_never_mirrored():
    """augment='translate' (digits, text): for every key the same shift as
    'flip_translate' draws, and no mirror, where 'flip_translate' mirrors about half."""
    split = _split(64)
    dev = data.put_on_devices(split, _mesh(1))
    plain, labels = _batch(dev, jax.random.key(0), 3, 64, "none")
    shifted, same_labels = _batch(dev, jax.random.key(0), 3, 64, "translate")
    both, _ = _batch(dev, jax.random.key(0), 3, 64, "flip_translate")
    np.testing.assert_array_equal(labels, same_labels)
    mirrored = 0
    for image, t, ft in zip(np.asarray(plain), np.asarray(shifted), np.asarray(both)):
        shifts = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                  if np.array_equal(data.translate(jnp.asarray(image), dy, dx), t)]
        assert shifts, "a 'translate' image is not a shift of the plain one"
        dy, dx = shifts[0]
        flipped = np.asarray(data.translate(jnp.asarray(image[:, ::-1]), dy, dx))
        assert np.array_equal(ft, t) or np.array_equal(ft, flipped)
        mirrored += not np.array_equal(ft, t)
    assert 16 < mirrored < 48  # flip_translate mirrors; translate, with its shifts, never


def test_augmentation_is_drawn_per_example_and_anew_each_epoch():
    """One image repeated over a batch comes out in many different flips and shifts; the
    same example is augmented otherwise in the next epochs (its draw depends on the step
    and its position, both new each epoch), yet again identically for the same step."""
    image = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8, 3)), jnp.float32)
    outs = np.asarray(data.augment_batch(jnp.stack([image] * 64), jax.random.key(0), 3,
                                         "flip_translate"))
    assert len({o.tobytes() for o in outs}) > 40  # 162 equally likely draws
    dev = data.put_on_devices(_split(64), _mesh(1))
    by_epoch = []
    for epoch in range(3):
        seen = {}
        for step in range(4 * epoch, 4 * epoch + 4):
            images, labels = map(np.asarray, _batch(dev, jax.random.key(7), step, 16,
                                                    "flip_translate"))
            seen.update({int(l): im.tobytes() for l, im in zip(labels, images)})
        by_epoch.append(seen)
    for later in by_epoch[1:]:
        assert sum(later[i] == by_epoch[0][i] for i in range(64)) <= 4
    again = np.asarray(_batch(dev, jax.random.key(7), 5, 16, "flip_translate")[0])
    assert again.tobytes() == b"".join(by_epoch[1][int(l)] for l in np.asarray(
        _batch(dev, jax.random.key(7), 5, 16, "none")[1]))


def test_the_same_batch_positions_are_augmented_anew_at_every_step():
    """Each step draws its own flips and shifts: drawn from the batch position alone, every
    step applied the same batch of augmentations, only dealt out to other images."""
    image = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8, 3)), jnp.float32)
    images, key = jnp.stack([image] * 64), jax.random.key(0)
    three, four = (np.asarray(data.augment_batch(images, key, step, "flip_translate"))
                   for step in (3, 4))
    assert sum(a.tobytes() == b.tobytes() for a, b in zip(three, four)) <= 8  # 162 draws


def test_load_dataset_takes_another_augmentation(tmp_path):
    """augment=None is the dataset's own (the paper's); a name overrides it for any dataset;
    a wrong one is one DataError line naming the choices."""
    data.testing.make_tfds_dataset("svhn", str(tmp_path), num_train=40, num_test=10,
                                   num_extra=20)
    load = functools.partial(data.load_dataset, "svhn", data_dir=str(tmp_path),
                             download=False, validation_size=0)
    assert load().augment == "none" == data.default_augment("svhn")
    assert load(augment="translate").augment == "translate"
    assert load(augment="auto").augment == "none"  # the config's word for None
    assert data.default_augment("cifar100") == "flip_translate"
    with pytest.raises(errors.DataError,
                       match=r"augment='flip'; valid: None or 'auto' \(the dataset's\) or "):
        load(augment="flip")


@pytest.mark.parametrize("shard", [False, True])
def test_one_two_and_eight_devices_give_identical_batches(shard):
    split = _split(101)  # 101 = not a multiple of 2 or 8: sharding pads to 102 or 104.
    one = data.put_on_devices(split, _mesh(1), shard=shard)
    for devices in (2, 8):
        many = data.put_on_devices(split, _mesh(devices), shard=shard)
        assert many.sharded == shard and len(many) == 101
        for step in (0, 7, 13):
            a = _batch(one, jax.random.key(4), step, 16, "flip_translate")
            b = _batch(many, jax.random.key(4), step, 16, "flip_translate")
            assert np.asarray(a[0]).tobytes() == np.asarray(b[0]).tobytes()
            np.testing.assert_array_equal(a[1], b[1])
            assert b[0].sharding.spec == P("data") and b[1].sharding.spec == P("data")
            assert np.asarray(b[1]).max() < 101  # Padding is never sampled.


def test_put_on_devices_chooses_sharding_by_size():
    split = _split(64)
    assert not data.put_on_devices(split, _mesh(8)).sharded
    assert data.put_on_devices(split, _mesh(8), shard_threshold_bytes=100).sharded
    with pytest.raises(errors.ConfigError, match="axis named 'data'"):
        data.put_on_devices(split, jax.make_mesh((8,), ("batch",)))


def test_a_sharded_split_is_padded_shard_by_shard_without_a_copy_of_it():
    """A split that does not divide by the devices (SVHN's 598,388 on 8) is padded with
    zero examples; a padded copy of the whole split made first held it twice in host
    memory while it was placed."""
    import tracemalloc
    split = _split(8 * 1000 + 1)
    tracemalloc.start()
    try:
        dev = data.put_on_devices(split, _mesh(8), shard=True)
        jax.block_until_ready(dev)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < split.images.nbytes / 2, peak
    images, labels = np.asarray(dev.images), np.asarray(dev.labels)
    assert images.shape[0] == labels.shape[0] == 8 * 1001 and len(dev) == len(split)
    np.testing.assert_array_equal(images[:len(split)], split.images)
    np.testing.assert_array_equal(labels[:len(split)], split.labels)
    assert not images[len(split):].any() and not labels[len(split):].any()


def test_train_batch_inside_a_sharded_train_step():
    """As the trainer uses it: inside its jit, with a traced step, output split over 'data'."""
    mesh = _mesh(8)
    dev = data.put_on_devices(_split(256), mesh, shard=True)

    @jax.jit
    def step_fn(dev, key, step):
        images, labels = data.train_batch(dev, key, step, batch_size=32, mean=MEAN, std=STD,
                                          augment="flip_translate")
        return jnp.sum(images ** 2, axis=(1, 2, 3)), labels

    per_example, labels = step_fn(dev, jax.random.key(0), jnp.int32(3))
    assert per_example.shape == (32,) and per_example.sharding.spec == P("data")


@pytest.mark.parametrize("devices, shard, batch_size", [
    (1, False, 16), (2, True, 16), (8, False, 16), (8, True, 16), (8, True, 24),
    (2, False, 104)])  # 104: one batch larger than the split
def test_eval_covers_every_example_exactly_once(devices, shard, batch_size):
    split = _split(101)
    dev = data.put_on_devices(split, _mesh(devices), shard=shard)
    counts = np.zeros(101, int)
    total = 0
    for images, labels, mask, indices in data.eval_batches(dev, batch_size=batch_size,
                                                           mean=MEAN, std=STD,
                                                           with_indices=True):
        assert images.shape == (batch_size, 8, 8, 3) and mask.dtype == jnp.bool_
        mask, labels = np.asarray(mask), np.asarray(labels)
        np.testing.assert_array_equal(labels[mask], indices[mask])
        np.testing.assert_allclose(
            np.asarray(images)[mask],
            (split.images[indices[mask]].astype(np.float32) - MEAN) / STD, rtol=1e-6)
        np.add.at(counts, labels[mask], 1)
        total += int(mask.sum())
    assert total == 101 and np.all(counts == 1)


def test_eval_plan_counts():
    indices, mask = data.eval_plan(10, 4)
    assert indices.shape == (3, 4) and mask.sum() == 10
    np.testing.assert_array_equal(np.sort(indices[mask]), np.arange(10))


def test_bad_arguments_name_the_fix():
    """The project's errors (one line, no traceback from the command-line tools), still
    ValueErrors for callers that catch those; they were plain ValueErrors."""
    with pytest.raises(errors.DataError, match="use a batch_size from 1 to 10"):
        data.steps_per_epoch(10, 16)
    with pytest.raises(errors.ConfigError, match="batch_size must be positive"):
        data.eval_plan(10, 0)
    dev = data.put_on_devices(_split(40), _mesh(1))
    with pytest.raises(errors.ConfigError, match="flip_translate"):
        _batch(dev, jax.random.key(0), 0, 8, "cutout")


@pytest.mark.parametrize("images, labels, expected", [
    (np.zeros((2, 4, 4, 3), np.float32), np.arange(2), "must be uint8 [N, H, W, C] pixels"),
    (np.zeros((2, 4, 4), np.uint8), np.arange(2), "grayscale [N, H, W]: x[..., None]"),
    (np.zeros((2, 4, 4, 3), np.uint8), np.array([0.0, 1.7]), "integer class indices, got float64"),
    (np.zeros((2, 4, 4, 3), np.uint8), np.array([0, -1]), "class indices from 0, got -1"),
])
def test_a_split_of_what_the_pipeline_would_misread_is_one_line_naming_the_fix(
        images, labels, expected):
    """Float labels were truncated to int32 on the devices (1.7 trained as class 1), and a
    negative one trained as no class (a one-hot of zeros), silently."""
    with pytest.raises(errors.DataError, match=r"^Split\.") as raised:
        data.Split(images, labels)
    assert expected in str(raised.value) and "\n" not in str(raised.value)


def test_a_split_given_lists_holds_arrays_that_split_and_place_as_arrays_do():
    """Labels given as a list passed the checks (which read them as an array) and were kept
    as the list: holding validation out failed with a TypeError's traceback."""
    images = np.arange(8 * 2 * 2 * 3, dtype=np.uint8).reshape(8, 2, 2, 3)
    split = data.Split(images, [0, 1] * 4)
    assert isinstance(split.labels, np.ndarray) and split.images is images
    train, validation = splits.holdout(split, 0.5, 0, "per_class")
    assert sorted(validation.labels.tolist()) == [0, 0, 1, 1]
    assert np.asarray(data.put_on_devices(train, _mesh(1)).labels).dtype == np.int32
    with pytest.raises(errors.DataError, match=r"^Split\.images must be uint8 .* got int64"):
        data.Split(images.tolist(), [0, 1] * 4)


def test_image_folder_end_to_end(tmp_path):
    root = data.testing.make_image_folder(str(tmp_path / "f"), classes=2, per_class_train=12,
                                          per_class_test=3, size=(16, 16))
    ds = data.load_dataset(f"image_folder:{root}", validation_size=4)
    dev = data.put_on_devices(ds.train, _mesh(8))
    batch = jax.jit(functools.partial(data.train_batch, batch_size=8, mean=ds.mean,
                                      std=ds.std, augment=ds.augment))
    images, labels = batch(dev, jax.random.key(0), 0)
    assert images.shape == (8, 16, 16, 3) and set(np.asarray(labels).tolist()) <= {0, 1}
    # Its labels are its class directories: another label set is refused, not ignored.
    with pytest.raises(errors.DataError, match="label='coarse' is not available for an image"):
        data.load_dataset(f"image_folder:{root}", label="coarse")


def test_training_keeps_no_host_copy_of_the_data(tmp_path, monkeypatch):
    """The trainer kept load_dataset's host copy of every split alive for the whole run,
    though it trains and evaluates on the device copies: on a CPU, twice the data in memory
    (on a GPU, a needless host copy; 1.9 GB for SVHN)."""
    import gc

    from configs import load_config
    from stochastic_depth_jax.training import loop

    alive = []
    end_of_epoch = loop._end_of_epoch

    def count_host_copies(*args, **kwargs):
        gc.collect()
        alive.append(sum(isinstance(o, (data.Dataset, data.Split)) for o in gc.get_objects()))
        return end_of_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "_end_of_epoch", count_host_copies)
    config = load_config("cifar10:smoke", [
        "--config.num_epochs=1", "--config.lr_boundaries_epochs=()", "--config.write_plots=false",
        "--config.write_tensorboard=false", "--config.progress_bar=false"])
    loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert alive == [0]
