"""``eval_every_steps``: the validation error every N steps, mid-epoch included (the paper's
SVHN protocol), the test error and the 'best' checkpoint where it is the lowest so far;
validation.jsonl, timing, and a resume that keeps best and records consistent."""

import json
import os
import shutil
import sys
import time

import jax
import pytest

from configs import load_config
from processes import free_address, run_together
from stochastic_depth_jax.training import checkpoint as checkpoint_lib
from stochastic_depth_jax.training import loop, metrics

FLAGS = ["--config.progress_bar=false", "--config.write_tensorboard=false",
         "--config.write_plots=false", "--config.eval_every_steps=1"]
# cifar10:smoke: 4 steps an epoch, 2 epochs; 32 validation and 64 test images. The lowest
# validation error is at step 6, in the middle of epoch 2; step 3 is the best of epoch 1.
VAL_ERROR = {1: 0.5, 2: 0.4, 3: 0.2, 4: 0.3, 5: 0.25, 6: 0.1, 7: 0.3, 8: 0.35}
# Each evaluation's time on a fake clock (time.perf_counter moved on, no sleep), kept out of
# the epochs' training time: larger than any real step's time on a loaded machine.
EVAL_S = 1000.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "workers", "fake_evaluation.py")


def _test_error(step):
    return 0.6 + step / 100


@pytest.fixture
def fake_evaluation(monkeypatch):
    """Evaluations whose errors are set by the state's step (validation: ``VAL_ERROR``;
    test: ``_test_error``), each taking ``EVAL_S`` of ``time.perf_counter``'s (a fake
    clock); returns the (split, step) evaluated."""
    calls, offset, real_clock = [], [0.0], time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + offset[0])

    def evaluate_split(eval_step, state, split, **kwargs):
        step = int(loop._host(state.step))
        name = {32: "validation", 64: "test"}[len(split)]
        calls.append((name, step))
        offset[0] += EVAL_S
        error = VAL_ERROR[step] if name == "validation" else _test_error(step)
        return {"loss": 2 * error, "error": error, "count": len(split)}

    monkeypatch.setattr(loop.evaluate_lib, "evaluate_split", evaluate_split)
    return calls


def _without_times(records):
    return [{k: v for k, v in r.items() if k != "eval_time_s"} for r in records]


def test_best_is_the_mid_epoch_step_of_lowest_validation_error_and_resume_keeps_it(
        fake_evaluation, tmp_path):
    workdir = str(tmp_path / "run")
    summary = loop.train_and_evaluate(load_config("cifar10:smoke", FLAGS), workdir)
    # The paper's number: the test error at the step of the lowest validation error.
    assert summary["best"] == {"metric": "val_error", "value": 0.1, "epoch": 1.5, "step": 6,
                               "val_error": 0.1, "test_error": _test_error(6)}
    assert 6 in checkpoint_lib.Checkpoints(workdir, read_only=True).steps("best")
    # The test split only where the validation error improved, and at each epoch's end.
    assert sorted(s for name, s in fake_evaluation if name == "test") == [1, 2, 3, 4, 6, 8]
    assert sorted(s for name, s in fake_evaluation if name == "validation") == list(range(1, 9))
    # evaluate.py's result names that checkpoint's epoch as it is, not truncated to 1.
    result = loop.evaluate_lib.evaluate_checkpoint(workdir, "best", split="validation")
    assert (result["step"], result["epoch"], result["error"]) == (6, 1.5, 0.1)
    validation = metrics.read_metrics(workdir, metrics.VALIDATION_FILE)
    assert [(r["step"], r["epoch"], r["val_error"], r.get("test_error")) for r in validation] == [
        (s, s / 4, VAL_ERROR[s], _test_error(s) if s in (1, 2, 3, 4, 6, 8) else None)
        for s in range(1, 9)]
    epochs = metrics.read_metrics(workdir)
    assert [r["epoch"] for r in epochs] == [1, 2]  # still one record per epoch
    for record in epochs:  # 4 or 5 evaluations an epoch: timed apart from the training
        assert record["eval_time_s"] >= 4 * EVAL_S
        assert record["epoch_time_s"] < record["eval_time_s"] - 2 * EVAL_S
    # Killed after step 6's best and records, before the checkpoint at step 8 committed:
    # the run resumes at step 4, drops the records after it and reaches the same best.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))
    os.remove(os.path.join(resumed, loop.SUMMARY_FILE))
    with pytest.warns(UserWarning) as caught:
        again = loop.train_and_evaluate(load_config("cifar10:smoke", FLAGS), resumed)
    dropped = [str(w.message) for w in caught if "validation.jsonl" in str(w.message)]
    assert [m.split(": ", 1)[1] for m in dropped] == [
        "kept the records of steps 1-4 that match the restored checkpoint (step 4); dropped 4 "
        "other record(s) (steps 5-8); they are kept in "
        f"{os.path.join(resumed, metrics.VALIDATION_FILE)}.dropped."]
    assert again["best"] == summary["best"]
    assert not os.path.exists(os.path.join(resumed, checkpoint_lib.SUPERSEDED_DIR))
    assert _without_times(metrics.read_metrics(resumed, metrics.VALIDATION_FILE)) == (
        _without_times(validation))
    with open(os.path.join(resumed, loop.SUMMARY_FILE)) as f:
        assert json.load(f)["best"] == summary["best"]
    # The same, resumed with eval_every_steps turned off: step 6's best checkpoint is
    # evaluated again when reached (it was not: the best was step 3's, while
    # checkpoints_best/, which evaluate.py's 'best' reads, held step 6 as its newest).
    shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))
    os.remove(os.path.join(workdir, loop.SUMMARY_FILE))
    off = load_config("cifar10:smoke", FLAGS[:-1] + ["--config.eval_every_steps=0"])
    with pytest.warns(UserWarning):
        assert loop.train_and_evaluate(off, workdir)["best"] == summary["best"]


def test_validation_is_evaluated_at_the_multiples_of_eval_every_steps(fake_evaluation,
                                                                        tmp_path):
    """Every 3 steps (3 and 6) and at each epoch's end (4 and 8); the other tests evaluate
    at every step, where any step is a multiple."""
    config = load_config("cifar10:smoke", FLAGS[:-1] + ["--config.eval_every_steps=3"])
    loop.train_and_evaluate(config, str(tmp_path))
    assert sorted(s for name, s in fake_evaluation if name == "validation") == [3, 4, 6, 8]
    validation = metrics.read_metrics(str(tmp_path), metrics.VALIDATION_FILE)
    assert [r["step"] for r in validation] == [3, 4, 6, 8]


def test_mid_epoch_validation_is_on_the_tensorboard_curves_too(fake_evaluation, monkeypatch,
                                                               tmp_path):
    """TensorBoard had the epochs' records only: the evaluations between them were missing
    from its val_error curve (validation.jsonl and the plots had them)."""
    import tensorboardX

    scalars = []
    original = tensorboardX.SummaryWriter.add_scalar
    monkeypatch.setattr(tensorboardX.SummaryWriter, "add_scalar",
                        lambda self, tag, value, global_step=None, **kw: (
                            scalars.append((tag, global_step, value)),
                            original(self, tag, value, global_step=global_step, **kw))[1])
    flags = [f for f in FLAGS if "tensorboard" not in f] + ["--config.write_tensorboard=true"]
    loop.train_and_evaluate(load_config("cifar10:smoke", flags), str(tmp_path / "run"))
    val = sorted({(step, value) for tag, step, value in scalars if tag == "val_error"})
    assert val == [(s, VAL_ERROR[s]) for s in range(1, 9)]
    assert sorted(s for tag, s, _ in scalars if tag == "test_error") == [1, 2, 3, 4, 6, 8]


def _checksum(ckpts, kind, step):
    return ckpts.read_meta(kind, step)["checksum"]


def test_an_earlier_best_that_a_changed_resume_does_not_reproduce_is_set_aside(
        fake_evaluation, monkeypatch, tmp_path):
    """Resumed with another learning rate after a kill between a 'best' and a 'latest'
    save, the earlier session's 'best' at step 6 held the old weights while this session's
    records (and summary.json's best) described new ones; and a new best at step 5 was not
    saved at all (Orbax saves no step below its newest)."""
    monkeypatch.setitem(globals(), "EVAL_S", 0.0)
    first = str(tmp_path / "first")
    loop.train_and_evaluate(load_config("cifar10:smoke", FLAGS), first)
    ckpts = checkpoint_lib.Checkpoints(first, read_only=True)
    assert ckpts.steps("best") == [3, 6] and ckpts.steps("latest") == [4, 8]
    old_best = _checksum(ckpts, "best", 6)
    shutil.rmtree(os.path.join(first, "checkpoints", "8"))  # killed before step 8's 'latest'
    os.remove(os.path.join(first, loop.SUMMARY_FILE))
    val_error = dict(VAL_ERROR)
    changed = FLAGS + ["--config.learning_rate=0.5", "--config.checkpoint_every_steps=1",
                       "--config.keep_checkpoints=5"]

    def resume(name, flags, val_errors):
        workdir = str(tmp_path / name)
        shutil.copytree(first, workdir)
        monkeypatch.setitem(globals(), "VAL_ERROR", {**val_error, **val_errors})
        with pytest.warns(UserWarning) as caught:
            summary = loop.train_and_evaluate(load_config("cifar10:smoke", flags), workdir)
        [moved] = [str(w.message) for w in caught if "checkpoints_superseded" in str(w.message)]
        [aside] = os.listdir(os.path.join(workdir, checkpoint_lib.SUPERSEDED_DIR))
        assert aside.startswith("best-6-") and aside in moved and "step 6," in moved
        with open(os.path.join(workdir, checkpoint_lib.SUPERSEDED_DIR, aside, "meta",
                               "metadata")) as f:
            assert json.load(f)["checksum"] == old_best  # moved whole, not lost
        return summary, checkpoint_lib.Checkpoints(workdir, read_only=True), moved

    # Step 6 improves again: its 'best' is this session's weights, as its 'latest' is.
    summary, ckpts, moved = resume("again", changed, {})
    assert summary["best"]["step"] == 6 and ckpts.steps("best") == [3, 6]
    assert _checksum(ckpts, "best", 6) == _checksum(ckpts, "latest", 6) != old_best
    assert ckpts.read_meta("best", 6)["best"] == summary["best"]
    assert "(changed: " in moved and "learning_rate" in moved.split("(changed: ")[1]
    # A new best at step 5 and none at 6: the newest 'best' is step 5's, this session's.
    summary, ckpts, _ = resume("earlier", changed, {5: 0.15, 6: 0.3})
    assert summary["best"]["step"] == 5 and ckpts.steps("best") == [3, 5]
    assert _checksum(ckpts, "best", 5) == _checksum(ckpts, "latest", 5)
    # Resumed to end before step 6: the best it reports is step 3's, the newest 'best'.
    summary, ckpts, moved = resume("shorter", FLAGS + ["--config.num_epochs=1"], {})
    assert summary["best"]["step"] == 3 and ckpts.steps("best") == [3]
    assert "after this run's end (step 4)" in moved


def test_a_new_best_that_diverged_sets_no_earlier_best_aside(fake_evaluation, monkeypatch,
                                                            tmp_path):
    """Resumed with another learning rate, a new best at step 5 whose parameters were
    non-finite moved the earlier session's 'best' at step 6 to checkpoints_superseded/, then
    was refused: the run ended with neither, and a restart with the earlier config (which
    reproduces step 6) found its best moved aside."""
    monkeypatch.setitem(globals(), "EVAL_S", 0.0)
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(load_config("cifar10:smoke", FLAGS), workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))  # killed before step 8's 'latest'
    os.remove(os.path.join(workdir, loop.SUMMARY_FILE))
    monkeypatch.setitem(globals(), "VAL_ERROR", {**VAL_ERROR, 5: 0.15})
    finite = loop.state_lib.all_finite
    monkeypatch.setattr(loop.state_lib, "all_finite",
                        lambda state: int(loop._host(state.step)) != 5 and finite(state))
    with pytest.raises(loop.NonFiniteLossError, match="non-finite by step 5"):
        loop.train_and_evaluate(
            load_config("cifar10:smoke", FLAGS + ["--config.learning_rate=0.5"]), workdir)
    assert not os.path.exists(os.path.join(workdir, checkpoint_lib.SUPERSEDED_DIR))
    assert checkpoint_lib.Checkpoints(workdir, read_only=True).steps("best") == [3, 6]


def test_two_processes_resumed_take_the_same_decisions_on_the_earlier_bests(
        fake_evaluation, monkeypatch, tmp_path):
    """Resumed unchanged on 2 processes before a 'best' rotated away (step 5) and those after
    it (6, 7): process 1 read metrics.jsonl after process 0 had dropped its records after the
    restored step, so it alone took step 5 as evaluated otherwise and set 6 and 7 aside; the
    job stopped with ``AssertionError: sync_global_devices name mismatch``."""
    val_error = {**VAL_ERROR, 5: 0.15, 6: 0.1, 7: 0.05}
    monkeypatch.setitem(globals(), "VAL_ERROR", val_error)
    monkeypatch.setitem(globals(), "EVAL_S", 0.0)
    workdir = str(tmp_path / "run")
    summary = loop.train_and_evaluate(load_config("cifar10:smoke", FLAGS), workdir)
    assert checkpoint_lib.Checkpoints(workdir, read_only=True).steps("best") == [6, 7]
    shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))  # killed before step 8's 'latest'
    os.remove(os.path.join(workdir, loop.SUMMARY_FILE))
    address = free_address()
    args = [sys.executable, WORKER, "--config", "cifar10:smoke", *FLAGS, "--workdir", workdir,
            "--coordinator_address", address, "--coordinator_bind_address", address,
            "--num_processes", "2"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONUNBUFFERED="1", VAL_ERROR=json.dumps(val_error))
    run_together([args + ["--process_id", str(i)] for i in range(2)], env=env, cwd=REPO,
                 timeout=120)
    # (Those set aside here were the 8 devices' weights of this process's first session.)
    ckpts = checkpoint_lib.Checkpoints(workdir, read_only=True)
    assert ckpts.steps("best") == [6, 7]
    with open(os.path.join(workdir, loop.SUMMARY_FILE)) as f:
        assert json.load(f)["best"] == summary["best"] == ckpts.read_meta("best", 7)["best"]


def test_a_new_best_before_the_earlier_bests_of_a_changed_session_is_saved(
        fake_evaluation, monkeypatch, tmp_path):
    """Resumed at step 2 with the lr drop moved from epoch 2 to epoch 1: steps 3 and 4 train
    as before, 5 and 6 otherwise. Step 3, a new best evaluated as before, was not saved
    (below the earlier 'best' steps 5 and 6), which the checksums then set aside: 'best'
    was empty while summary.json's best was step 3. Started afresh (killed before the
    first 'latest'), the earlier 'best' steps stayed, with the earlier session's weights."""
    monkeypatch.setitem(globals(), "EVAL_S", 0.0)
    monkeypatch.setitem(globals(), "VAL_ERROR", {**VAL_ERROR, 5: 0.15})
    flags = FLAGS + ["--config.checkpoint_every_steps=1", "--config.keep_checkpoints=8"]
    first = str(tmp_path / "first")
    loop.train_and_evaluate(load_config("cifar10:smoke", flags + [
        "--config.lr_boundaries_epochs=(2,)"]), first)
    assert checkpoint_lib.Checkpoints(first, read_only=True).steps("best") == [5, 6]
    os.remove(os.path.join(first, loop.SUMMARY_FILE))
    monkeypatch.setitem(globals(), "VAL_ERROR", {**VAL_ERROR, 5: 0.3, 6: 0.3})
    for name, latest in (("resumed", [2]), ("afresh", [])):
        workdir = str(tmp_path / name)
        shutil.copytree(first, workdir)
        for step in set(range(1, 9)) - set(latest):
            shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
        with pytest.warns(UserWarning) as caught:
            summary = loop.train_and_evaluate(load_config("cifar10:smoke", flags), workdir)
        ckpts = checkpoint_lib.Checkpoints(workdir, read_only=True)
        assert summary["best"]["step"] == 3 and ckpts.steps("best")[-1:] == [3], name
        assert _checksum(ckpts, "best", 3) == _checksum(ckpts, "latest", 3), name
        assert ckpts.read_meta("best", 3)["best"] == summary["best"]
        [moved] = [str(w.message) for w in caught
                   if checkpoint_lib.SUPERSEDED_DIR in str(w.message)]
        assert "steps 5, 6," in moved and "with a changed config, has a new best at step " in moved


def test_checkpoint_saves_within_an_epoch_are_not_training_time(monkeypatch, tmp_path):
    # A synchronous save writes while the clock runs; each mid-epoch save here moves the
    # clock on by 1000 s, which the epoch's time and images/s must not include.
    offset, real_clock, real_save = [0.0], time.perf_counter, loop._save

    def save(run, kind, extra=None):
        real_save(run, kind, extra)
        offset[0] += 1000.0

    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + offset[0])
    monkeypatch.setattr(loop, "_save", save)
    config = load_config("cifar10:smoke", FLAGS[:3] + ["--config.checkpoint_every_steps=1"])
    loop.train_and_evaluate(config, str(tmp_path / "run"))
    records = metrics.read_metrics(str(tmp_path / "run"))
    assert offset[0] >= 8000  # three saves within each epoch and one at its end, two epochs
    assert len(records) == 2
    for record in records:
        assert record["epoch_time_s"] < 1000 and record["images_per_s"] > 128 / 1000


def test_the_steps_a_checkpoint_save_waits_for_are_training_time(monkeypatch, tmp_path):
    # Steps run asynchronously: each takes 1000 s (on this fake clock) once the host waits
    # for it. A save waits for the steps dispatched before it (it reads the state); that
    # wait is training, and was counted as the save's (the epoch's time was that of its
    # last step alone, its images/s 4x too high).
    offset, pending, real_clock = [0.0], [0], time.perf_counter
    real_host, real_compile = loop._host, loop._compile_train_step
    real_block = jax.block_until_ready

    def wait(tree):
        offset[0] += 1000.0 * pending[0]
        pending[0] = 0
        return tree

    def compile_train_step(run):
        compiled = real_compile(run)

        def step(*args):
            pending[0] += 1
            return compiled(*args)
        return step

    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + offset[0])
    monkeypatch.setattr(loop, "_host", lambda tree: real_host(wait(tree)))
    monkeypatch.setattr(jax, "block_until_ready", lambda tree: real_block(wait(tree)))
    monkeypatch.setattr(loop, "_compile_train_step", compile_train_step)
    config = load_config("cifar10:smoke", FLAGS[:3] + ["--config.checkpoint_every_steps=1",
                                                       "--config.log_every_steps=4"])
    loop.train_and_evaluate(config, str(tmp_path / "run"))
    records = metrics.read_metrics(str(tmp_path / "run"))
    assert len(records) == 2  # two epochs of 4 steps, saved after steps 1 to 3 of each
    for record in records:
        assert 4000 <= record["epoch_time_s"] < 5000, record
