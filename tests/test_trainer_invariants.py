"""Trainer invariants that a slip in the step, the evaluation or the loop would break while
every run still trains and every evaluation still repeats itself bit for bit: the
evaluation's numbers do not depend on its batch size (padding masked, every block active,
the running BatchNorm statistics), training updates those statistics, the epoch sums
restart at an epoch's first step and give the epoch's means, the configured label smoothing
reaches the loss, compact mode draws the gates of the state's step, a non-finite loss is
reported at the step it happened (the first, an infinite one too), the model gets the
step's dropout and gate keys, one step is SGD with weight decay on the batch's mean loss and
its sums hold the gradient's norms, and select_best_by='train' chooses among the evaluated
epochs (also on resuming an earlier version's best that no evaluation measured)."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs` lives at the repository root, beside train.py.

from configs import load_config  # noqa: E402
from trainer_steps import train_steps  # noqa: E402
from stochastic_depth_jax import data  # noqa: E402
from stochastic_depth_jax.data.splits import Split  # noqa: E402
from stochastic_depth_jax.training import distributed, evaluate  # noqa: E402
from stochastic_depth_jax.training import setup as setup_lib  # noqa: E402

TINY = ["--config.progress_bar=false", "--config.write_tensorboard=false",
        "--config.write_plots=false"]


@pytest.fixture(scope="module")
def stepped(tmp_path_factory):
    """cifar10:smoke on one device, trained one step past its first epoch."""
    workdir = str(tmp_path_factory.mktemp("steps"))
    config = load_config("cifar10:smoke", TINY)
    mesh = distributed.make_mesh(jax.devices()[:1])
    ds = setup_lib.load_data(config, workdir)
    steps = data.steps_per_epoch(len(ds.train), config.batch_size) + 1
    setup, _, _, state = train_steps(config, workdir, mesh, steps)
    return setup, ds, state, steps


def _evaluate(setup, state, split, batch_size, ds):
    return evaluate.evaluate_split(setup.eval_step, state, split, batch_size=batch_size,
                                   mean=ds.mean, std=ds.std)


def test_evaluation_does_not_depend_on_its_batch_size(stepped):
    """Padded copies of example 0 count nowhere, and no example's logits depend on the
    others of its batch (train=False: no batch statistics, no gates drawn). Example 0 is
    given a label the model gets wrong, so padding counted as errors shows."""
    setup, ds, state, _ = stepped
    test = ds.test
    single = Split(test.images[:1], test.labels[:1])
    wrong = [c for c in range(ds.num_classes)
             if _evaluate(setup, state, data.put_on_devices(
                 Split(single.images, np.array([c], np.int32)), setup.mesh), 1, ds)["error"]]
    labels = test.labels.copy()
    labels[0] = wrong[0]
    split = data.put_on_devices(Split(test.images, labels), setup.mesh)
    n = len(split)
    whole = _evaluate(setup, state, split, n, ds)
    assert whole["count"] == n and whole["error"] > 0
    for batch_size in (7, 24, n + 5):
        assert n % batch_size, (n, batch_size)  # a padded last batch
        result = _evaluate(setup, state, split, batch_size, ds)
        assert result["count"] == n
        assert result["error"] == whole["error"], batch_size
        assert result["loss"] == pytest.approx(whole["loss"], rel=1e-5), batch_size


def test_training_updates_the_batchnorm_running_statistics(stepped):
    setup, ds, state, _ = stepped
    initial = jax.device_get(setup.init_state(ds.image_shape).batch_stats)
    trained = jax.device_get(state.batch_stats)
    assert jax.tree.leaves(trained)
    for before, after in zip(jax.tree.leaves(initial), jax.tree.leaves(trained)):
        assert not np.allclose(before, after), "a BatchNorm statistic never moved"


def test_the_epoch_sums_restart_at_an_epochs_first_step(stepped):
    setup, _, state, steps = stepped
    sums = jax.device_get(state.sums)
    assert int(state.step) == steps == setup.steps_per_epoch + 1
    assert (sums["steps"], sums["examples"]) == (1, setup.config.batch_size)


def test_the_epoch_record_divides_the_errors_by_the_examples_and_the_loss_by_the_steps(
        stepped):
    """train_error is a fraction of the epoch's examples (it was once errors per step, up to
    the batch size), train_loss the mean of the steps' batch means."""
    from types import SimpleNamespace

    from stochastic_depth_jax.training import loop

    setup, _, state, _ = stepped
    sums = jax.device_get(state.sums)
    record = loop._epoch_sums(SimpleNamespace(state=state))
    assert record["train_error"] == pytest.approx(sums["errors"] / setup.config.batch_size)
    assert 0.0 <= record["train_error"] <= 1.0
    assert record["train_loss"] == pytest.approx(sums["loss"] / sums["steps"])


def test_the_configured_label_smoothing_reaches_the_training_loss(tmp_path, monkeypatch):
    from stochastic_depth_jax.training import step as step_lib

    smoothing = []
    cross_entropy = step_lib.cross_entropy

    def spy(logits, labels, label_smoothing=0.0):
        smoothing.append(label_smoothing)
        return cross_entropy(logits, labels, label_smoothing)

    monkeypatch.setattr(step_lib, "cross_entropy", spy)
    config = load_config("cifar10:smoke", TINY + ["--config.label_smoothing=0.1"])
    train_steps(config, str(tmp_path), distributed.make_mesh(jax.devices()[:1]), steps=1)
    assert smoothing == [0.1]


def test_compact_mode_in_the_trainer_draws_the_gates_of_the_states_step(tmp_path, monkeypatch):
    """The loop gives compact mode the step as a host number (the gates are drawn on the
    host): it must be the state's own, which the skipping step folds into the gate key;
    one off, a GPU run ('auto' picks compact mode there) drew other gates than the same run
    on a CPU."""
    from stochastic_depth_jax.training import step as step_lib
    from stochastic_depth_jax.training import train_and_evaluate

    given = []
    call = step_lib.CompactTrainStep.__call__

    def spy(self, state, split, step):
        given.append((step, int(jax.device_get(state.step))))
        return call(self, state, split, step)

    monkeypatch.setattr(step_lib.CompactTrainStep, "__call__", spy)
    flags = TINY + ["--config.num_epochs=1", "--config.max_steps=2", "--config.model.depth=14",
                    "--config.model.scan=True", "--config.model.compact_multiple=1",
                    "--config.lr_boundaries_epochs=()"]
    train_and_evaluate(load_config("cifar10:smoke", flags), str(tmp_path))
    assert given and all(host == device for host, device in given), given


def test_a_non_finite_loss_is_named_at_its_step_before_the_epochs_end(tmp_path):
    """The step records the first step whose loss is not finite; the loop checks it at
    each log step. Without that record a diverged run went on to the epoch's end, where
    only the parameters' check at the save stopped it."""
    from stochastic_depth_jax.training import loop

    config = load_config("cifar10:smoke", TINY + [  # the first update overflows
        "--config.learning_rate=1e30", "--config.lr_schedule=constant",
        "--config.log_every_steps=1"])
    with pytest.raises(loop.NonFiniteLossError,
                       match=r"^Non-finite training loss at step \d+ \(epoch 1\)"):
        loop.train_and_evaluate(config, str(tmp_path))


def test_dropout_keys_are_not_gate_keys_and_change_every_step():
    """Dropout masks (Wide ResNets) must be independent of the block gates and redrawn each
    step: a dropout key equal to a step's gate key (or to one step's for every step) would
    correlate them, and no training test tells."""
    from stochastic_depth_jax.training import step as step_lib

    keys = step_lib.StepKeys.from_seed(0)
    bits = lambda k: tuple(np.asarray(jax.random.key_data(k)).ravel().tolist())  # noqa: E731
    gate = {bits(jax.random.fold_in(keys.gates, s)) for s in range(16)}
    dropout = {bits(step_lib.dropout_key(keys, s)) for s in range(16)}
    assert len(dropout) == 16 and not gate & dropout
    assert bits(keys.gates) not in dropout and bits(keys.data) not in dropout


def test_select_best_by_train_chooses_among_the_evaluated_epochs(tmp_path):
    """select_best_by='train' with eval_every_epochs=2: every epoch has a training error, but
    only the evaluated ones a test error. The best (summary, 'best' checkpoint) is the lowest
    training error among those, with its test error, never an epoch no evaluation measured."""
    from stochastic_depth_jax.training import loop, metrics

    workdir = str(tmp_path / "run")
    summary = loop.train_and_evaluate(load_config("cifar10:smoke", TINY + [
        "--config.select_best_by=train", "--config.eval_every_epochs=2",
        "--config.num_epochs=3", "--config.lr_boundaries_epochs=()"]), workdir)
    records = metrics.read_metrics(workdir)
    evaluated = [r for r in records if "test_error" in r]
    assert [r["epoch"] for r in evaluated] == [2, 3]
    # The case at issue: a lower training error at epoch 1, which no evaluation measured.
    assert records[0]["train_error"] < min(r["train_error"] for r in evaluated)
    chosen = min(evaluated, key=lambda r: r["train_error"])
    best = summary["best"]
    assert (best["epoch"], best["step"], best["value"], best["test_error"]) == (
        chosen["epoch"], chosen["step"], chosen["train_error"], chosen["test_error"])
    steps = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints_best"))
             if n.isdigit()]
    # The newest 'best' is the best; every one saved is of an evaluated epoch.
    assert max(steps) == chosen["step"] and set(steps) <= {r["step"] for r in evaluated}


def test_the_train_step_gives_the_model_the_steps_dropout_and_gate_keys():
    """The train step's rngs: 'dropout' is dropout_key(keys, step), 'stochastic_depth' the
    step's gate key. A step passing the gate key (or step 0's key) as 'dropout' still trains
    and the dropout_key test above still passes: a model that records the bits of each
    stream in its batch_stats tells."""
    import flax.linen as nn
    import jax.numpy as jnp
    import optax
    from stochastic_depth_jax.training import state as state_lib
    from stochastic_depth_jax.training import step as step_lib

    class KeyRecorder(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            logits = nn.Conv(3, (1, 1), name="stem_conv")(x).mean((1, 2))
            for stream in ("dropout", "stochastic_depth"):
                bits = self.variable("batch_stats", stream, jnp.zeros, (4,), jnp.uint32)
                if train:
                    bits.value = jax.random.bits(self.make_rng(stream), (4,), jnp.uint32)
            return logits

    model, keys = KeyRecorder(), step_lib.StepKeys.from_seed(3)
    mesh = distributed.make_mesh(jax.devices()[:1])
    train_step = step_lib.make_train_step(
        model, optax.sgd(0.1), keys=keys, mesh=mesh, batch_size=4, steps_per_epoch=2,
        mean=np.zeros(3, np.float32), std=np.ones(3, np.float32), augment="none")
    rng = np.random.default_rng(0)
    split = data.put_on_devices(Split(rng.integers(0, 256, (8, 4, 4, 3), np.uint8),
                                      rng.integers(0, 3, 8).astype(np.int32)), mesh)
    state = state_lib.create_train_state(model, optax.sgd(0.1), (4, 4, 3), keys.init,
                                         distributed.replicated(mesh))
    x, params = np.zeros((1, 4, 4, 3), np.float32), jax.device_get(state.params)
    for step in range(2):
        state = train_step(state, split)  # donates the state
        _, expected = model.apply(  # the same module's bits, given the keys it should get
            {"params": params, "batch_stats": {}}, x, train=True, mutable=["batch_stats"],
            rngs={"dropout": step_lib.dropout_key(keys, step),
                  "stochastic_depth": jax.random.fold_in(keys.gates, step)})
        got = jax.device_get(state.batch_stats)
        for stream in ("dropout", "stochastic_depth"):
            np.testing.assert_array_equal(got[stream], expected["batch_stats"][stream],
                                          err_msg=f"{stream} at step {step}")


def _strip_best_evaluation(workdir):
    """Makes a run's checkpoints read as an earlier version's, whose select_best_by='train'
    best could be an epoch no evaluation measured: their best without val/test errors."""
    for kind in ("checkpoints", "checkpoints_best"):
        for step in os.listdir(os.path.join(workdir, kind)):
            path = os.path.join(workdir, kind, step, "meta", "metadata")
            with open(path) as f:
                meta = json.load(f)
            for key in ("val_error", "test_error"):
                meta["best"].pop(key, None)
            with open(path, "w") as f:
                json.dump(meta, f)


def test_resumed_unevaluated_best_is_evaluated_or_chosen_again(tmp_path):
    """A run resumed from an earlier version's checkpoint whose best (select_best_by='train')
    has no test error: kept while no lower training error came, it ended the run as 'Best
    by training error: epoch 1' with no test error. Its 'best' checkpoint is evaluated on
    resume; where it is gone, the best is chosen again among this session's evaluations."""
    import shutil
    import warnings

    from stochastic_depth_jax.training import loop, metrics

    common = TINY + ["--config.select_best_by=train", "--config.lr_boundaries_epochs=()"]
    first = str(tmp_path / "first")
    loop.train_and_evaluate(load_config("cifar10:smoke", common + [
        "--config.num_epochs=3", "--config.max_steps=5"]), first)
    epoch1 = metrics.read_metrics(first)[0]
    assert epoch1["step"] == 4 and "test_error" in epoch1
    _strip_best_evaluation(first)
    gone = str(tmp_path / "gone")
    shutil.copytree(first, gone)
    shutil.rmtree(os.path.join(gone, "checkpoints_best", "4"))
    resumed = load_config("cifar10:smoke", common + ["--config.eval_every_epochs=2",
                                                     "--config.num_epochs=3"])
    best = loop.train_and_evaluate(resumed, first)["best"]
    later = [r for r in metrics.read_metrics(first) if r["step"] > 5]
    # The case at issue: no later evaluated epoch has a lower training error.
    assert [r["epoch"] for r in later] == [2, 3]
    assert epoch1["train_error"] < min(r["train_error"] for r in later)
    assert (best["step"], best["value"]) == (4, epoch1["train_error"])
    assert (best["test_error"], best["val_error"]) == (epoch1["test_error"],
                                                       epoch1["val_error"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        best = loop.train_and_evaluate(resumed, gone)["best"]
    assert any("cannot be read to measure it" in str(w.message) for w in caught)
    chosen = min(later, key=lambda r: r["train_error"])
    assert (best["step"], best["test_error"]) == (chosen["step"], chosen["test_error"])


def test_a_finished_run_s_unevaluated_best_is_evaluated_when_it_is_run_again(tmp_path):
    """A finished run of an earlier version whose best (select_best_by='train') has no test
    error, run again ('Nothing to train'): it went on reporting that best without one, in
    summary.json too. Its 'best' checkpoint is evaluated and the errors added to
    summary.json, nothing else changed; where that checkpoint is gone, or the config run
    again holds out another validation split (its errors would be of other images), a
    warning says so and summary.json stays as it was."""
    import shutil
    import warnings

    from stochastic_depth_jax.training import loop, metrics

    config = load_config("cifar10:smoke", TINY + ["--config.select_best_by=train",
                                                  "--config.lr_boundaries_epochs=()"])
    first = str(tmp_path / "first")
    measured = loop.train_and_evaluate(config, first)["best"]
    assert measured["step"] == 4 and "test_error" in measured
    _strip_best_evaluation(first)
    path = os.path.join(first, loop.SUMMARY_FILE)
    with open(path) as f:
        summary = json.load(f)
    unmeasured = {k: v for k, v in measured.items() if k not in ("val_error", "test_error")}
    summary["best"] = unmeasured
    with open(path, "w") as f:
        json.dump(summary, f)
    gone = str(tmp_path / "gone")
    shutil.copytree(first, gone)
    shutil.rmtree(os.path.join(gone, "checkpoints_best", "4"))
    other = str(tmp_path / "other")
    shutil.copytree(first, other)
    records = metrics.read_metrics(first)
    assert loop.train_and_evaluate(config, first)["best"] == measured
    with open(path) as f:
        assert json.load(f) == {**summary, "best": measured}
    assert metrics.read_metrics(first) == records
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert loop.train_and_evaluate(config, gone)["best"] == unmeasured
    assert any("cannot be read to measure it: it stays without a test error" in str(w.message)
               for w in caught)
    with open(os.path.join(gone, loop.SUMMARY_FILE)) as f:
        assert json.load(f) == summary
    resplit = load_config("cifar10:smoke", TINY + ["--config.select_best_by=train",
                                                   "--config.lr_boundaries_epochs=()",
                                                   "--config.validation_size=31"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert loop.train_and_evaluate(resplit, other)["best"] == unmeasured
    assert any("this config's data or splits are not those run.json records" in str(w.message)
               for w in caught)
    with open(os.path.join(other, loop.SUMMARY_FILE)) as f:
        assert json.load(f) == summary


def test_a_finished_run_s_best_is_measured_only_by_the_model_it_trained(tmp_path):
    """Run again with another model.final_survival_prob (which scales the blocks at test
    time), a finished run's unmeasured best was evaluated by that other network and its
    errors written into summary.json as the run's, beside a run.json that still records
    the p_L it trained with. Now a warning names the change and summary.json stays as it
    was; run again as it trained, the errors are the ones that training measured, and a
    third run leaves summary.json as the second wrote it."""
    import warnings

    from stochastic_depth_jax.training import loop

    flags = TINY + ["--config.select_best_by=train", "--config.lr_boundaries_epochs=()"]
    workdir = str(tmp_path / "run")
    measured = loop.train_and_evaluate(load_config("cifar10:smoke", flags), workdir)["best"]
    _strip_best_evaluation(workdir)
    path = os.path.join(workdir, loop.SUMMARY_FILE)
    with open(path) as f:
        summary = json.load(f)
    summary["best"] = {k: v for k, v in measured.items() if k not in ("val_error", "test_error")}
    with open(path, "w") as f:
        json.dump(summary, f)
    other = load_config("cifar10:smoke", flags + ["--config.model.final_survival_prob=0.1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert loop.train_and_evaluate(other, workdir)["best"] == summary["best"]
    assert any("this config's model is not the one run.json records (model.final_survival_"
               "prob: 0.5 -> 0.1; run it again with the config it trained with to measure "
               "it): it stays without a test error." in str(w.message) for w in caught), caught
    with open(path) as f:
        assert json.load(f) == summary
    assert loop.train_and_evaluate(load_config("cifar10:smoke", flags), workdir)["best"] \
        == measured
    with open(path) as f:
        rewritten = f.read()
    assert json.loads(rewritten) == {**summary, "best": measured}
    assert loop.train_and_evaluate(load_config("cifar10:smoke", flags), workdir)["best"] \
        == measured
    with open(path) as f:
        assert f.read() == rewritten


def test_every_process_measures_a_finished_run_s_best_as_process_0_decides(monkeypatch,
                                                                         tmp_path):
    """A host whose view of the shared workdir lags cannot read run.json: it skipped the
    measurement (collective evaluations) that process 0, reading it, entered, and the job
    hung. Every process now takes process 0's reading; only process 0 writes."""
    import types

    from stochastic_depth_jax.training import loop

    best = {"metric": "train_error", "value": 0.5, "epoch": 1, "step": 4}
    calls = []

    def measure(run, chosen, shape):
        calls.append(chosen["step"])
        return {**chosen, "val_error": 0.25, "test_error": 0.5}

    def unreadable(workdir):
        raise OSError("run.json is not there yet on this host")

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(loop.multihost_utils, "broadcast_one_to_all", lambda flag: np.bool_(True))
    monkeypatch.setattr(loop.evaluate_lib, "read_run_json", unreadable)
    monkeypatch.setattr(loop, "_measured_best", measure)
    run = types.SimpleNamespace(workdir=str(tmp_path), splits={"test": None})
    ds = types.SimpleNamespace(image_shape=(32, 32, 3))
    summary = loop._finished_best_measured(run, {"steps": 8, "best": best}, ds)
    assert calls == [4] and summary["best"]["test_error"] == 0.5
    assert os.listdir(tmp_path) == []  # process 0 writes summary.json


def test_an_unreadable_unevaluated_best_is_warned_once_for_the_job(monkeypatch):
    """Every process of a job resumes the run: each warned that the earlier version's best
    cannot be measured, one line per process, where the job's other warnings are process
    0's alone. Every process still drops that best, so all choose the same one."""
    import types
    import warnings

    import jax

    from stochastic_depth_jax.training import checkpoint as checkpoint_lib
    from stochastic_depth_jax.training import loop

    def restore(kind, abstract, step):
        raise checkpoint_lib.NoCheckpointError(f"No {kind} checkpoint at step {step}")

    monkeypatch.setattr(loop.setup_lib, "abstract_state", lambda setup, shape: None)
    for process, lines in ((0, 1), (1, 0)):
        monkeypatch.setattr(jax, "process_index", lambda: process)
        run = types.SimpleNamespace(
            best={"metric": "train_error", "value": 0.5, "epoch": 1, "step": 4},
            splits={"test": None}, setup=None, ckpts=types.SimpleNamespace(restore=restore))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loop._measure_unevaluated_best(run, (32, 32, 3))
        assert run.best is None
        assert sum("cannot be read to measure it" in str(w.message)
                   for w in caught) == lines, (process, caught)


def test_two_train_steps_are_sgd_with_weight_decay_on_the_mean_loss_and_sum_their_metrics():
    """Two steps of a tiny model, against the same steps written out: the loss is the mean
    cross-entropy of the step's batch (augmented as configured), the update is
    ``p - lr (g + wd p)`` (the weight decay reads the state's parameters), and the epoch
    sums add up the steps' losses, their misclassified examples and the first
    convolution's gradient norms (Fig. 7), of the gradient, not of the update (they differ
    by the factor lr here)."""
    import flax.linen as nn
    import optax
    from stochastic_depth_jax.training import state as state_lib
    from stochastic_depth_jax.training import step as step_lib

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(3)(nn.Conv(4, (3, 3), name="stem_conv")(x).mean((1, 2)))

    lr, wd, batch = 0.1, 0.5, 4
    model, keys = Tiny(), step_lib.StepKeys.from_seed(1)
    optimizer = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr))
    mesh = distributed.make_mesh(jax.devices()[:1])
    mean, std = np.full(3, 100.0, np.float32), np.full(3, 50.0, np.float32)
    train_step = step_lib.make_train_step(
        model, optimizer, keys=keys, mesh=mesh, batch_size=batch, steps_per_epoch=2,
        mean=mean, std=std, augment="flip_translate")
    rng = np.random.default_rng(0)
    split = data.put_on_devices(Split(rng.integers(0, 256, (8, 4, 4, 3), np.uint8),
                                      rng.integers(0, 3, 8).astype(np.int32)), mesh)
    state = state_lib.create_train_state(model, optimizer, (4, 4, 3), keys.init,
                                         distributed.replicated(mesh))
    params = jax.device_get(state.params)
    want = {"loss": 0.0, "errors": 0, "grad_l2": 0.0, "grad_mean_abs": 0.0}
    for step in range(2):
        images, labels = data.train_batch(split, keys.data, step, batch_size=batch,
                                          mean=mean, std=std, augment="flip_translate")

        def loss_fn(p):
            logits = model.apply({"params": p}, images)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return ce, logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        g = np.asarray(grads["stem_conv"]["kernel"])
        want["loss"] += float(loss)
        want["errors"] += int(np.sum(np.argmax(logits, -1) != labels))
        want["grad_l2"] += float(np.sqrt(np.sum(g ** 2)))
        want["grad_mean_abs"] += float(np.mean(np.abs(g)))
        params = jax.tree.map(lambda p, g: p - lr * (g + wd * p), params, grads)
        state = train_step(state, split)
    state = jax.device_get(state)
    for got, expected in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert 2 * want["errors"] != 2 * batch  # so a count of the correct ones would show
    sums = state.sums
    assert (sums["steps"], sums["examples"], sums["errors"]) == (2, 2 * batch, want["errors"])
    for name in ("loss", "grad_l2", "grad_mean_abs"):
        assert sums[name] == pytest.approx(want[name], rel=1e-5), name


def test_the_epoch_sums_keep_the_first_non_finite_step_inf_included():
    """``nonfinite_step`` is the first step whose loss was not finite (+inf as NaN: a true
    class's logit overflowing to -inf gives an infinite cross-entropy), kept through
    later ones, and kept across an epoch's restart of the sums."""
    from stochastic_depth_jax.training import state as state_lib
    from stochastic_depth_jax.training import step as step_lib

    sums, g = state_lib.zero_sums(), jnp.ones((2,))
    for step, loss in enumerate([1.0, np.inf, np.nan, 2.0, 3.0]):
        sums = step_lib._accumulate(sums, jnp.int32(step), 3, jnp.float32(loss),
                                    jnp.float32(1.0), 4, g)
        assert int(sums["nonfinite_step"]) == (-1 if step < 1 else 1), step
    assert float(sums["loss"]) == 5.0 and int(sums["steps"]) == 2  # restarted at step 3


def test_a_steps_gates_are_drawn_from_the_step_folded_into_the_gate_key():
    """The documented draw, ``draw_gates(fold_in(gate_key, step), p_l)``: the key every other
    model draws its own gates from (the 'stochastic_depth' stream), and what a run resumed
    from an earlier version's checkpoint must draw again. Another fold (the step plus one)
    still trains, and compact mode, drawing with this function, would agree with it."""
    import stochastic_depth_jax as sdj
    from stochastic_depth_jax.ops import draw_gates
    from stochastic_depth_jax.training import step as step_lib

    key = jax.random.key(7)
    for mode in ("batch", "sample"):
        model = sdj.CifarResNet(depth=20, width=4, num_classes=3, mode=mode)
        for step in (0, 5):
            want = draw_gates(jax.random.fold_in(key, step), model.survival_probs(),
                              mode=mode, batch_size=4)
            np.testing.assert_array_equal(step_lib.step_gates(model, key, step, 4), want)
