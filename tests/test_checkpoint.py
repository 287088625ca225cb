"""Checkpoints: round trip, keep-k, best, corruption and interruption recovery."""

import asyncio
import errno
import gc
import glob
import json
import logging
import os
import shutil
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import warned
from processes import free_address, run_together
from stochastic_depth_jax import logs
from stochastic_depth_jax.training import checkpoint as ckpt_lib
from stochastic_depth_jax.training import distributed
from stochastic_depth_jax.training import state as state_lib


class _Tiny(nn.Module):
    features: int = 4

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(self.features, (3, 3), name="stem_conv")(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(x.mean((1, 2)))


def _state(mesh, features=4, seed=0):
    opt = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, 0.9, nesterov=True))
    key = jax.random.key(seed, impl="rbg")  # threefry init compiles slowly on XLA:CPU.
    return state_lib.create_train_state(
        _Tiny(features), opt, (8, 8, 3), key, distributed.replicated(mesh)
    )


def _abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def _with_step(state, step, mesh):
    shift = jax.tree.map(lambda x: x + step if x.dtype == jnp.float32 else x, state.params)
    return state.replace(
        step=jax.device_put(jnp.int32(step), distributed.replicated(mesh)), params=shift
    )


@pytest.fixture
def mesh():
    return distributed.make_mesh()


def _save_steps(workdir, mesh, steps, keep=2):
    ckpts = ckpt_lib.Checkpoints(workdir, keep=keep)
    base = _state(mesh)
    for s in steps:
        ckpts.save("latest", s, _with_step(base, s, mesh), {"epoch": s})
    ckpts.close()
    return base


def _data_files(step_dir):
    """The OCDBT data files of a step (array chunks; several copies may exist)."""
    return glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)


def test_round_trip_keep_and_best(tmp_path, mesh):
    base = _save_steps(tmp_path, mesh, [1, 2, 3], keep=2)
    ckpts = ckpt_lib.Checkpoints(tmp_path, keep=2)
    assert ckpts.steps("latest") == [2, 3]
    ckpts.save("best", 2, _with_step(base, 2, mesh), {"epoch": 2})
    ckpts.wait()
    state, meta = ckpts.restore("latest", _abstract(base))
    want = _with_step(base, 3, mesh)
    assert meta["step"] == 3 and meta["epoch"] == 3
    jax.tree.map(np.testing.assert_array_equal, state, want)
    best, meta = ckpts.restore("best", _abstract(base))
    assert meta["step"] == 2 and int(best.step) == 2
    assert ckpts.save("latest", 3, want, {}) is False  # An existing step is never rewritten.
    ckpts.close()


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_file", "delete_meta"])
def test_corrupt_latest_is_skipped_with_warning(tmp_path, mesh, damage):
    base = _save_steps(tmp_path, mesh, [1, 2, 3], keep=3)
    step_dir = os.path.join(tmp_path, "checkpoints", "3")
    for target in _data_files(step_dir):
        if damage == "truncate":
            os.truncate(target, os.path.getsize(target) // 2)
        elif damage == "flip_byte":  # Silent bit rot: no error from the reader, wrong values.
            data = bytearray(open(target, "rb").read())
            for i in range(len(data) // 4, len(data), max(1, len(data) // 16)):
                data[i] ^= 0xFF
            open(target, "wb").write(bytes(data))
        elif damage == "delete_file":
            os.remove(target)
    if damage == "delete_meta":
        os.remove(os.path.join(step_dir, "meta", "metadata"))
    ckpts = ckpt_lib.Checkpoints(tmp_path, keep=3)
    with pytest.warns(ckpt_lib.CheckpointCorruptWarning, match="step 3") as caught:
        state, meta = ckpts.restore("latest", _abstract(base))
    assert meta["step"] == 2 and int(state.step) == 2
    # One line: the step, the underlying error's summary and what happens next; the
    # exception it was raised from is kept for --debug.
    [warning] = warned.of(caught, ckpt_lib.CheckpointCorruptWarning)
    assert "\n" not in str(warning) and len(str(warning)) < 800
    assert str(warning).endswith("falling back to the previous checkpoint.")
    assert "moved to " + os.path.join(str(tmp_path), "checkpoints_corrupt") in str(warning)
    assert warning.__cause__ is not None
    jax.tree.map(np.testing.assert_array_equal, state, _with_step(base, 2, mesh))
    assert ckpts.steps("latest") == [1, 2]  # Moved aside, not deleted:
    assert len(os.listdir(os.path.join(tmp_path, "checkpoints_corrupt"))) == 1
    assert ckpts.save("latest", 3, _with_step(base, 3, mesh), {})  # Step 3 can be redone.
    ckpts.close()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _reads_as_orbax_fails_them(texts, collect_in_read):
    """Fails as Orbax's restore of a damaged checkpoint: reads of arrays in concurrent tasks
    on an event loop of its own, each failing with one of ``texts``; the first failure is
    raised, the loop closed with the others' errors never retrieved. Those tasks are
    collected in the read where ``collect_in_read``, else held by the error raised (as
    Orbax's are, till whenever)."""

    async def read(text):
        raise ValueError(text)

    async def read_all():
        tasks = [asyncio.get_running_loop().create_task(read(t)) for t in texts]
        await asyncio.sleep(0)
        return tasks

    loop = asyncio.new_event_loop()
    tasks = loop.run_until_complete(read_all())
    loop.close()
    error = ValueError(f"OUT_OF_RANGE: {texts[0]}")
    if collect_in_read:
        del tasks
        gc.collect()
    else:
        error.held = tasks
    return error


@pytest.mark.parametrize("collect_in_read", [True, False])
def test_the_other_failed_reads_of_a_damaged_checkpoint_print_nothing(tmp_path, mesh,
                                                                       collect_in_read):
    """Orbax reads a state's arrays in concurrent tasks and raises the first failure; the
    others fail too, and asyncio printed each with its traceback whenever it collected them
    (often at exit, after the results): pages of tracebacks after the one-line warning, in
    some runs. Now nothing, and the logging configuration is left as it was; a lost task
    error about anything else is still printed."""
    base = _save_steps(tmp_path, mesh, [1, 2])
    ckpts = ckpt_lib.Checkpoints(tmp_path)
    read = 'Error reading "params.Dense_0.{}/.zarray" in OCDBT database at local file "{}"'
    step = os.path.join(tmp_path, "checkpoints", "2", "state", "")
    other = read.format("bias", os.path.join(tmp_path, "checkpoints", "20", "state", ""))
    manager = ckpts._managers["latest"]
    original = manager.restore

    def restore(s, args=None):
        if s == 2 and "state" in args:
            raise _reads_as_orbax_fails_them(
                [read.format("kernel", step), read.format("bias", step), other],
                collect_in_read)
        return original(s, args=args)

    manager.restore = restore
    seen = _Records()
    asyncio_logger = logging.getLogger("asyncio")
    filters = list(asyncio_logger.filters)
    asyncio_logger.addHandler(seen)
    try:
        with pytest.warns(ckpt_lib.CheckpointCorruptWarning, match="step 2"):
            _, meta = ckpts.restore("latest", _abstract(base))
        gc.collect()
    finally:
        asyncio_logger.removeHandler(seen)
    ckpts.close()
    assert meta["step"] == 1
    assert [str(r.exc_info[1]) for r in seen.records] == [other]
    assert asyncio_logger.filters == filters


def test_a_checkpoint_whose_bits_differ_from_its_checksum_is_skipped(tmp_path, mesh):
    """Damage that reads back without an error (bits changed since the save) is caught by
    the checksum stored at save time alone: such a step is skipped and moved aside, and
    the one before it restored, never the changed values."""
    base = _save_steps(tmp_path, mesh, [1, 2])
    path = os.path.join(tmp_path, "checkpoints", "2", "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    meta["checksum"] = int(meta["checksum"]) + 1  # as if the saved bits had changed since
    with open(path, "w") as f:
        json.dump(meta, f)
    ckpts = ckpt_lib.Checkpoints(tmp_path)
    with pytest.warns(ckpt_lib.CheckpointCorruptWarning, match="step 2.*checksum mismatch"):
        state, meta = ckpts.restore("latest", _abstract(base))
    assert meta["step"] == 1 and ckpts.steps("latest") == [1]
    jax.tree.map(np.testing.assert_array_equal, state, _with_step(base, 1, mesh))
    ckpts.close()


def test_full_disk_in_a_background_save_raises_one_workdir_error(tmp_path, mesh):
    """Orbax raises a background save's failure at the next save, wait or close, as the
    ValueError TensorStore raised; a full disk is named, other errors pass unchanged. A
    close after the failure was raised does not raise it again: the same save's other
    writes, whose error Orbax keeps until the close, met the same full disk."""
    from stochastic_depth_jax import errors

    full = ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "x/_sharding": Failed to write 18298 '
        "bytes to file 15: No space left on device [os_error_code='28']"
    )

    def fail(error):
        def raise_it(*args, **kwargs):
            raise error

        return raise_it

    for call in ("close", "wait"):
        ckpts = ckpt_lib.Checkpoints(tmp_path, keep=2)
        latest = ckpts._managers["latest"]
        latest.wait_until_finished = latest.close = fail(full)
        with pytest.raises(errors.WorkdirError) as info:
            getattr(ckpts, call)()
        message = str(info.value)
        assert message.startswith(f"Cannot write {tmp_path}/checkpoints (No space left on device)")
        assert "free some space" in message
        # A Python caller calls again; the command-line tools print their own line.
        assert message.endswith(": call the function with the same arguments again to resume "
                                "from the newest.")
        assert info.value.command_line == message.replace(
            "call the function with the same arguments", "run the same command")
        assert info.value.__cause__ is full
        if call == "close":  # Its managers closed for good.
            del latest.wait_until_finished, latest.close
            ckpts.close()
    ckpts.close()  # After the wait's: said once.
    latest.wait_until_finished = fail(RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        ckpts.wait()
    del latest.wait_until_finished, latest.close
    ckpts.close()


def _unfinished(tmp_path, directory, step, source):
    """An async save of ``step`` killed before its commit: only a temporary directory (here
    with the whole state, as when killed between writing and committing)."""
    target = os.path.join(tmp_path, directory, f"{step}.orbax-checkpoint-tmp-123")
    shutil.copytree(source, target)
    return sorted(os.listdir(target))


def test_an_unfinished_save_is_set_aside_with_a_warning(tmp_path, mesh, monkeypatch):
    monkeypatch.setattr(ckpt_lib.time, "time", lambda: 1234.5)
    base = _save_steps(tmp_path, mesh, [1, 2])
    files = _unfinished(tmp_path, "checkpoints", 3, os.path.join(tmp_path, "checkpoints", "2"))
    ckpt_lib.Checkpoints(tmp_path, read_only=True).steps()  # An evaluation moves nothing.
    with pytest.warns(logs.RunWarning) as caught:
        ckpts = ckpt_lib.Checkpoints(tmp_path)
    moved = os.path.join(tmp_path, "checkpoints_unfinished", "latest-3-1234")
    assert warned.messages(caught, logs.RunWarning) == [
        f"An unfinished save of step 3 in {os.path.join(tmp_path, 'checkpoints')} (interrupted "
        f"before it was committed) was moved to {moved}; the newest committed checkpoint "
        "(step 2) is used instead."]
    assert sorted(os.listdir(moved)) == files  # kept whole, not deleted
    assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["1", "2"]
    _, meta = ckpts.restore("latest", _abstract(base))
    assert meta["step"] == 2
    ckpts.close()


def test_only_the_newest_unfinished_save_is_kept(tmp_path, mesh, monkeypatch):
    """A run preempted during many saves does not pile up a state's worth of disk each time:
    the newest unfinished save replaces the older ones, and the warning says so."""
    monkeypatch.setattr(ckpt_lib.time, "time", lambda: 1234.5)
    _save_steps(tmp_path, mesh, [1])
    step_dir = os.path.join(tmp_path, "checkpoints", "1")
    _unfinished(tmp_path, "checkpoints", 3, step_dir)
    with pytest.warns(logs.RunWarning):
        ckpt_lib.Checkpoints(tmp_path).close()
    for step in (4, 5):  # two left by one interruption (an older one never cleaned up)
        _unfinished(tmp_path, "checkpoints", step, step_dir)
    with pytest.warns(logs.RunWarning) as caught:
        ckpt_lib.Checkpoints(tmp_path).close()
    [message] = warned.messages(caught, logs.RunWarning)
    moved = os.path.join(tmp_path, "checkpoints_unfinished", "latest-5-1234")
    assert message.startswith(f"An unfinished save of step 5 in {os.path.join(tmp_path, 'checkpoints')}"
                              f" (interrupted before it was committed) was moved to {moved}, "
                              "replacing 2 older unfinished saves (deleted: only the newest is "
                              "kept); "), message
    assert os.listdir(os.path.join(tmp_path, "checkpoints_unfinished")) == ["latest-5-1234"]
    assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["1"]


def test_orbax_s_cleanup_of_temporary_directories_ends_before_the_checkpoints_are_used(
        tmp_path, monkeypatch):
    """Orbax cleans up earlier temporary directories in a background thread that only its next
    save waited for: a manager closed without saving left it running, and it deleted a later
    writer's new temporary directory (seen as a flaky failure of the test above)."""
    import asyncio

    from orbax.checkpoint._src.path import temporary_paths
    cleanup = temporary_paths.cleanup_temporary_paths
    ended = []

    async def slow_cleanup(*args, **kwargs):
        await asyncio.sleep(0.5)
        await cleanup(*args, **kwargs)
        ended.append(True)

    monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow_cleanup)
    ckpts = ckpt_lib.Checkpoints(tmp_path)
    assert ended == [True, True]  # 'latest' and 'best', before anything is read or written
    ckpts.close()
    ckpt_lib.Checkpoints(tmp_path, read_only=True).close()  # a reader removes nothing
    assert ended == [True, True]


def test_only_unfinished_saves_say_the_run_starts_from_step_0(tmp_path, mesh):
    """A run killed during its first saves: nothing committed, nothing lost silently."""
    _save_steps(tmp_path / "done", mesh, [1])
    step_dir = os.path.join(tmp_path, "done", "checkpoints", "1")
    for directory in ("checkpoints", "checkpoints_best"):
        _unfinished(tmp_path / "run", directory, 4, step_dir)
    with pytest.warns(logs.RunWarning) as caught:
        ckpts = ckpt_lib.Checkpoints(tmp_path / "run")
    latest, best = warned.messages(caught, logs.RunWarning)
    assert latest.endswith("no checkpoint was committed before it, so training starts from "
                           "step 0.")
    assert "checkpoints_best (interrupted" in best and best.endswith("; it is not used.")
    assert ckpts.steps("latest") == ckpts.steps("best") == []
    assert sorted(n.rsplit("-", 1)[0] for n in os.listdir(
        tmp_path / "run" / "checkpoints_unfinished")) == ["best-4", "latest-4"]
    ckpts.close()


def test_incompatible_state_raises_and_moves_nothing(tmp_path, mesh):
    _save_steps(tmp_path, mesh, [1])
    ckpts = ckpt_lib.Checkpoints(tmp_path)
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="fresh --workdir"):
        ckpts.restore("latest", _abstract(_state(mesh, features=8)))
    assert ckpts.steps("latest") == [1]
    ckpts.close()


def test_all_corrupt_raises_no_checkpoint(tmp_path, mesh):
    base = _save_steps(tmp_path, mesh, [1])
    for target in _data_files(os.path.join(tmp_path, "checkpoints", "1")):
        os.remove(target)
    ckpts = ckpt_lib.Checkpoints(tmp_path, read_only=True)
    with warnings.catch_warnings(record=True), pytest.raises(ckpt_lib.NoCheckpointError):
        ckpts.restore("latest", _abstract(base))
    assert ckpts.steps("latest") == [1]  # Read-only (evaluation) never moves files.


def test_checksum_is_independent_of_device_count(mesh):
    one = distributed.make_mesh(jax.devices()[:1])
    assert mesh.size == 8
    assert state_lib.checksum(_state(mesh)) == state_lib.checksum(_state(one))
    assert state_lib.checksum(_state(mesh)) != state_lib.checksum(_state(mesh, seed=1))


def test_two_processes_save_best_and_latest_at_the_same_steps(tmp_path):
    """The two managers' multi-host barriers must not collide (they once deadlocked)."""
    address = free_address()
    worker = os.path.join(os.path.dirname(__file__), "workers", "concurrent_saves.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    steps = 4
    run_together(
        [[sys.executable, worker, str(tmp_path), address, "2", str(i), str(steps)] for i in range(2)],
        env=env,
        timeout=240,
    )
    ckpts = ckpt_lib.Checkpoints(tmp_path, read_only=True)
    assert ckpts.steps("latest") == list(range(1, steps + 1))
    assert ckpts.steps("best") == [steps - 1, steps]  # 'best' keeps two.
    for kind in ("latest", "best"):
        assert ckpts.read_meta(kind, steps)["step"] == steps
    ckpts.close()


def _tensorstore_error(status, code=None):
    """A read failure as TensorStore raises it through Orbax: a ValueError whose text
    starts with its status and may end with the OS error's number."""
    text = (f'{status}: Error opening "zarr" driver: Error reading local file "x/d/ab12": '
            "Failed to open")
    return ValueError(text + (f" [os_error_code='{code}']" if code else ""))


def _raised_from(outer, inner, *, implicitly=False):
    """``outer`` raised from ``inner`` (``raise ... from``), or while handling it."""
    try:
        try:
            raise inner
        except OSError as e:
            if implicitly:
                raise outer
            raise outer from e
    except Exception as e:  # noqa: BLE001  The chained exception is what we want.
        return e


# Failures outside the checkpoint, as Orbax lets them reach us: each must leave it in place.
_ENVIRONMENT = {
    "permission": lambda: PermissionError(errno.EACCES, "Permission denied", "x/meta"),
    "tensorstore_eacces": lambda: _tensorstore_error("PERMISSION_DENIED", 13),
    "tensorstore_status": lambda: _tensorstore_error("PERMISSION_DENIED"),
    "wrapped_eio": lambda: _raised_from(ValueError("restore failed"),
                                        OSError(errno.EIO, "Input/output error")),
    "during_etimedout": lambda: _raised_from(RuntimeError("restore failed"),
                                             OSError(errno.ETIMEDOUT, "Timed out"),
                                             implicitly=True),
    "too_many_files": lambda: OSError(errno.EMFILE, "Too many open files"),
    # Restoring onto a busy accelerator or host: the checkpoint is fine.
    "memory_error": lambda: MemoryError(),
    "xla_out_of_memory": lambda: jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1073741824 bytes."),
    "tensorstore_cancelled": lambda: _tensorstore_error("CANCELLED"),
    "tensorstore_aborted": lambda: _tensorstore_error("ABORTED"),
}


def _failing_state_restore(ckpts, step, error):
    """Makes the restore of ``step``'s arrays raise ``error`` (its metadata still reads, as
    when only the array files are unreadable)."""
    manager = ckpts._managers["latest"]
    original = manager.restore

    def restore(s, args=None):
        if s == step and "state" in args:
            raise error
        return original(s, args=args)

    manager.restore = restore


@pytest.mark.parametrize(  # Training (moves damage aside) and evaluation (read-only) alike.
    "cause, read_only", [(c, i % 2 == 1) for i, c in enumerate(sorted(_ENVIRONMENT))])
def test_a_read_failing_outside_the_checkpoint_moves_nothing(tmp_path, mesh, cause, read_only):
    """No permission, an I/O error, a network filesystem's timeout...: one error naming the
    checkpoint, the cause and the fix; nothing moved aside, no fall-back to an older step
    (resuming from it would silently undo training)."""
    base = _save_steps(tmp_path, mesh, [1, 2])
    ckpts = ckpt_lib.Checkpoints(tmp_path, read_only=read_only)
    error = _ENVIRONMENT[cause]()
    _failing_state_restore(ckpts, 2, error)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ckpt_lib.CheckpointCorruptWarning)
        with pytest.raises(ckpt_lib.CheckpointAccessError) as info:
            ckpts.restore("latest", _abstract(base))
    message = str(info.value)
    assert message.startswith(f"Cannot read {tmp_path}/checkpoints/2 (")
    assert "\n" not in message and "no older checkpoint was used" in message
    assert message.endswith(": call the same function again once it is fixed.")
    assert info.value.__cause__ is error  # --debug shows the library's traceback
    assert ckpts.steps("latest") == [1, 2]
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints_corrupt"))
    ckpts.close()


def test_a_restore_broken_by_another_process_leaving_the_job_moves_nothing(tmp_path, mesh):
    """Orbax's restore waits for every process in a collective, which fails (Gloo) where
    another process failed instead of restoring: it was taken for damage, and the newest
    good checkpoint moved to checkpoints_corrupt/ without a word as the job stopped (the
    next start resumed from the one before)."""
    base = _save_steps(tmp_path, mesh, [1, 2])
    ckpts = ckpt_lib.Checkpoints(tmp_path)
    lost = jax.errors.JaxRuntimeError(
        "UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] "
        "Connection closed by peer [127.0.0.1]:15232")
    _failing_state_restore(ckpts, 2, lost)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ckpt_lib.CheckpointCorruptWarning)
        with pytest.raises(jax.errors.JaxRuntimeError) as info:
            ckpts.restore("latest", _abstract(base))
    assert info.value is lost  # Reported by the command-line tools as a lost process.
    assert ckpts.steps("latest") == [1, 2]
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints_corrupt"))
    ckpts.close()


# Damaged files, as the OS or a decoder reports them: each is skipped and moved aside.
_DAMAGE = {
    "tensorstore_data_loss": lambda: _tensorstore_error("DATA_LOSS"),
    "tensorstore_einval": lambda: _tensorstore_error("DATA_LOSS", errno.EINVAL),
    "ebadmsg": lambda: OSError(errno.EBADMSG, "Bad message"),
    "enodata": lambda: OSError(errno.ENODATA, "No data available"),
    "decoder_during_einval": lambda: _raised_from(ValueError("bad header"),
                                                  OSError(errno.EINVAL, "Invalid argument"),
                                                  implicitly=True),
}


@pytest.mark.parametrize("damage", sorted(_DAMAGE))
def test_damage_reported_in_the_same_words_is_still_damage(tmp_path, mesh, damage):
    """The control: damaged data (TensorStore's DATA_LOSS, an OS error that may mean
    corrupt data, a decoder failing while handling one) is skipped and moved."""
    base = _save_steps(tmp_path, mesh, [1, 2])
    ckpts = ckpt_lib.Checkpoints(tmp_path)
    _failing_state_restore(ckpts, 2, _DAMAGE[damage]())
    with pytest.warns(ckpt_lib.CheckpointCorruptWarning, match="step 2"):
        _, meta = ckpts.restore("latest", _abstract(base))
    assert meta["step"] == 1 and ckpts.steps("latest") == [1]
    ckpts.close()


def test_a_stale_handle_while_the_writer_rotates_the_step_away_is_not_an_error(tmp_path, mesh):
    """Evaluating while training writes, on NFS: the step being read is deleted by the
    writer's rotation and the read fails with ESTALE. The listing changed, so the reader lists
    again and reads the step that exists: no access error, no warning, nothing moved."""
    base = _save_steps(tmp_path, mesh, [1, 2])
    ckpts = ckpt_lib.Checkpoints(tmp_path, read_only=True)
    stale = OSError(errno.ESTALE, "Stale file handle")
    original = ckpts._managers["latest"].restore

    def restore(s, args=None):
        if s == 2 and "state" in args:
            shutil.rmtree(os.path.join(tmp_path, "checkpoints", "2"))  # the writer's rotation
            raise stale
        return original(s, args=args)

    ckpts._managers["latest"].restore = restore
    with warnings.catch_warnings():
        warnings.simplefilter("error", ckpt_lib.CheckpointCorruptWarning)
        _, meta = ckpts.restore("latest", _abstract(base))
    assert meta["step"] == 1 and ckpts.steps("latest") == [1]
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints_corrupt"))
    ckpts.close()


def test_unlistable_checkpoints_directory_is_one_error(tmp_path, mesh, monkeypatch):
    """Refused before Orbax lists it (its background listing would log a traceback)."""
    _save_steps(tmp_path, mesh, [1])
    real_listdir = os.listdir

    def listdir(path):
        if os.path.basename(os.path.normpath(path)) == "checkpoints":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_listdir(path)

    monkeypatch.setattr(ckpt_lib.os, "listdir", listdir)
    with pytest.raises(ckpt_lib.CheckpointAccessError, match=r"Cannot read .*/checkpoints \("):
        ckpt_lib.Checkpoints(tmp_path, read_only=True)


@pytest.mark.parametrize("name", ["checkpoints", "checkpoints_best"])
def test_an_unwritable_checkpoint_directory_is_refused_before_training(tmp_path, mesh,
                                                                      monkeypatch, name):
    """A checkpoint directory this user may not write in (its modes, a copy of another
    user's run): the run trained until its first save of that kind failed, then Orbax's save
    threads held the process for 5 minutes, printing their tracebacks. Refused at the start
    now, in one line naming it; an evaluation still reads it."""
    from stochastic_depth_jax import errors

    _save_steps(tmp_path, mesh, [1])
    denied = os.path.join(str(tmp_path), name)
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):  # as chmod a-w would, also for root
        if os.path.dirname(os.path.abspath(path)) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(ckpt_lib.os, "mkdir", mkdir)
    with pytest.raises(errors.WorkdirError) as info:
        ckpt_lib.Checkpoints(tmp_path)
    assert str(info.value) == (
        f"Cannot write {denied} (Permission denied): no permission to write there; give this "
        "user write access to resume the run there (chmod/chown), or use another --workdir.")
    assert sorted(os.listdir(denied)) == (["1"] if name == "checkpoints" else [])
    ckpts = ckpt_lib.Checkpoints(tmp_path, read_only=True)
    assert ckpts.steps("latest") == [1]
    ckpts.close()


def test_a_write_probe_left_by_a_killed_run_is_no_obstacle(tmp_path, mesh):
    """A run killed between creating and removing its write probe in checkpoints/ left it
    behind. Its name was the process index and pid, which a container gives the next run
    again: that run was refused, 'Cannot write .../checkpoints (File exists): a file is in
    the way of the directory; use another --workdir' (a fresh start). Now it resumes, and
    the leftover is neither a step nor in the way of saves, rotation or restores."""
    base = _save_steps(tmp_path, mesh, [1])
    for pid in (os.getpid(), 1):
        os.mkdir(os.path.join(str(tmp_path), "checkpoints",
                              f".write-test-{jax.process_index()}-{pid}"))
    ckpts = ckpt_lib.Checkpoints(tmp_path, keep=2)
    assert ckpts.steps("latest") == [1]
    for s in (2, 3):
        ckpts.save("latest", s, _with_step(base, s, mesh), {"epoch": s})
    ckpts.wait()
    assert ckpts.steps("latest") == [2, 3]
    state, meta = ckpts.restore("latest", _abstract(base))
    assert meta["epoch"] == 3 and int(state.step) == 3
    ckpts.close()
    assert sorted(n for n in os.listdir(os.path.join(str(tmp_path), "checkpoints"))
                  if n.isdigit()) == ["2", "3"]


def test_checkpoints_linked_to_a_disk_not_mounted_are_one_error(tmp_path, mesh):
    """checkpoints/ a link to another disk, not mounted: training said 'File exists ... a file
    is in the way ...; use another --workdir', which starts afresh."""
    _save_steps(tmp_path / "disk", mesh, [1])
    os.symlink(tmp_path / "disk" / "checkpoints", tmp_path / "checkpoints")
    os.rename(tmp_path / "disk", tmp_path / "unmounted")
    with pytest.raises(ckpt_lib.CheckpointAccessError, match=r"Cannot write .*/checkpoints: "
                       r"it is a symbolic link to .*/disk/checkpoints, which does not exist "
                       r"\(its filesystem not mounted, or moved\?\): mount it or mend the "
                       r"link to resume the run, or use another --workdir\.$"):
        ckpt_lib.Checkpoints(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "unmounted"]  # nothing created


def test_the_command_line_tools_print_their_own_words_for_a_checkpoint_error(capsys):
    """What to do next differs between Python and a shell: ``str()`` tells a Python caller
    to call the function again, the command-line tools print "run the same command"."""
    from stochastic_depth_jax.training import cli

    error = ckpt_lib._access_error(
        "w/checkpoints/2", PermissionError(errno.EACCES, "Permission denied", "w"))
    assert str(error).endswith(": call the same function again once it is fixed.")

    def main():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        cli.run_reporting_errors(main, debug=False)
    assert exit_info.value.code == 1
    line = str(error).replace("call the same function", "run the same command")
    assert capsys.readouterr().err == f"error: {line}\n"


def test_moving_aside_never_reuses_a_name(tmp_path, mesh, monkeypatch):
    """Two skips of the same step within one second (here: a clock stuck at one second) get
    two names; a folder already there is neither merged into nor nested in."""
    monkeypatch.setattr(ckpt_lib.time, "time", lambda: 1234.5)
    base = _save_steps(tmp_path, mesh, [1, 2])
    earlier = os.path.join(tmp_path, "checkpoints_corrupt", "latest-2-1234")
    os.makedirs(earlier)
    open(os.path.join(earlier, "kept"), "w").close()
    moved = []
    for _ in range(2):
        ckpts = ckpt_lib.Checkpoints(tmp_path)
        if 2 not in ckpts.steps("latest"):
            ckpts.save("latest", 2, _with_step(base, 2, mesh), {"epoch": 2})
            ckpts.wait()
        os.remove(os.path.join(tmp_path, "checkpoints", "2", "meta", "metadata"))
        with pytest.warns(ckpt_lib.CheckpointCorruptWarning) as caught:
            ckpts.restore("latest", _abstract(base))
        [message] = warned.messages(caught, ckpt_lib.CheckpointCorruptWarning)
        moved.append(message.split("moved to ")[1].split(";")[0])
        ckpts.close()
    assert moved == [earlier + ".1", earlier + ".2"]
    assert os.listdir(earlier) == ["kept"]  # untouched
    step_files = sorted(os.listdir(os.path.join(tmp_path, "checkpoints", "1")))
    assert [sorted(os.listdir(path)) for path in moved] == [step_files] * 2  # not nested


def _no_space_in_unfinished_meta(monkeypatch):
    """A full disk met by a background save: writing its 'meta' item (into Orbax's
    temporary directory) fails with ENOSPC, as TensorStore's writes then do."""
    from etils import epath

    path_type = type(epath.Path("/"))
    real_write_text = path_type.write_text

    def write_text(self, *args, **kwargs):
        if "orbax-checkpoint-tmp" in str(self) and self.name == "metadata":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(path_type, "write_text", write_text)


def test_a_save_failed_on_a_full_disk_leaves_nothing_behind(tmp_path, mesh, monkeypatch):
    """The save's temporary directory (part of a state, on the disk that ran out of space)
    was left in checkpoints/; the next run moved it to checkpoints_unfinished/, where it
    kept the space, as a save 'interrupted before it was committed'. The failing run now
    removes it and says so; the committed checkpoints stay as they were."""
    from stochastic_depth_jax import errors

    base = _save_steps(tmp_path, mesh, [1])
    directory = os.path.join(str(tmp_path), "checkpoints")
    step_files = sorted(os.listdir(os.path.join(directory, "1")))
    ckpts = ckpt_lib.Checkpoints(tmp_path, keep=2)
    _no_space_in_unfinished_meta(monkeypatch)
    with pytest.raises(errors.WorkdirError) as info:
        ckpts.save("latest", 2, _with_step(base, 2, mesh), {"epoch": 2})
        ckpts.wait()
    assert str(info.value).startswith(
        f"Cannot write {directory} (No space left on device): free some space or use another "
        "--workdir. The checkpoints saved before are kept; the failed save of step 2 was "
        "removed: call ")
    assert sorted(os.listdir(directory)) == ["1"]
    assert sorted(os.listdir(os.path.join(directory, "1"))) == step_files
    monkeypatch.undo()
    ckpts.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to set aside
        ckpts = ckpt_lib.Checkpoints(tmp_path, keep=2)
    state, meta = ckpts.restore("latest", _abstract(base))
    assert meta["step"] == 1
    jax.tree.map(np.testing.assert_array_equal, state, _with_step(base, 1, mesh))
    ckpts.close()
    assert not os.path.exists(os.path.join(str(tmp_path), ckpt_lib.UNFINISHED_DIR))


def test_write_access_lost_mid_run_fails_the_save_at_once(tmp_path, mesh, monkeypatch):
    """Write permission on checkpoints/ lost between two saves (its modes changed, a
    filesystem gone read-only): Orbax created the step's directory in a background thread,
    and the save's other threads waited 5 minutes for it, printing their tracebacks, before
    the process could exit. The save now fails at once, in one error, and leaves no thread
    behind."""
    import threading

    from stochastic_depth_jax import errors

    base = _save_steps(tmp_path, mesh, [1])
    ckpts = ckpt_lib.Checkpoints(tmp_path, keep=2)
    directory = os.path.join(str(tmp_path), "checkpoints")
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):  # as chmod a-w would, also for root
        if os.path.dirname(os.path.abspath(path)) == directory:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    before = set(threading.enumerate())
    monkeypatch.setattr(ckpt_lib.os, "mkdir", mkdir)
    with pytest.raises(errors.WorkdirError, match=rf"^Cannot write {directory} \(Permission "
                       r"denied\): no permission to write there; "):
        ckpts.save("latest", 2, _with_step(base, 2, mesh), {"epoch": 2})
    monkeypatch.undo()
    left = [t for t in set(threading.enumerate()) - before if not t.daemon]
    for thread in left:  # a save's threads that end on their own
        thread.join(timeout=60)
    assert [t.name for t in left if t.is_alive()] == []
    ckpts.close()
    assert ckpt_lib.Checkpoints(tmp_path, read_only=True).steps("latest") == [1]


@pytest.mark.parametrize("name", ["checkpoints", "checkpoints_best"])
def test_a_step_that_cannot_be_deleted_is_refused_before_training(tmp_path, mesh,
                                                                  monkeypatch, name):
    """A step copied read-only (or another user's) in a workdir this user may write in:
    training went on until the first rotation had to delete it, then stopped naming only
    checkpoints/ (writable), and again one epoch later on every restart. Refused at the
    start now, naming the directory, with nothing written into the checkpoint to find
    out; an evaluation still reads it."""
    from stochastic_depth_jax import errors

    ckpts = ckpt_lib.Checkpoints(tmp_path, keep=2)
    base = _state(mesh)
    for kind in ("latest", "best"):
        ckpts.save(kind, 1, _with_step(base, 1, mesh), {"epoch": 1})
    ckpts.close()
    step_dir = os.path.join(str(tmp_path), name, "1")
    denied = os.path.join(step_dir, "state")
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # as chmod -R a-w would, also for root
        if os.path.abspath(path) == denied and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(ckpt_lib.os, "access", access)
    listing = sorted(os.listdir(denied))
    with pytest.raises(errors.WorkdirError) as info:
        ckpt_lib.Checkpoints(tmp_path)
    assert str(info.value) == (
        f"Cannot write {denied} (Permission denied): no permission to write there; give this "
        "user write access to resume the run there (chmod/chown), or use another --workdir. "
        "Training deletes old checkpoints as it saves new ones, so every directory in "
        f"{step_dir} must be writable.")
    assert sorted(os.listdir(denied)) == listing  # nothing written there
    ckpts = ckpt_lib.Checkpoints(tmp_path, read_only=True)
    assert ckpts.steps("latest") == ckpts.steps("best") == [1]
    ckpts.close()


@pytest.mark.parametrize("where", ["step", "inside"])
def test_a_step_that_cannot_be_listed_is_refused_before_training(tmp_path, mesh, monkeypatch,
                                                                 where):
    """A step directory of mode 0o300 (write and enter, not read) passed the start-up
    check, which asked only for write access, and os.walk skipped what it could not list:
    the run trained until it restored or rotated that step. Refused at the start now,
    naming the directory and the access it lacks."""
    from stochastic_depth_jax import errors

    ckpts = ckpt_lib.Checkpoints(tmp_path, keep=2)
    ckpts.save("latest", 1, _with_step(_state(mesh), 1, mesh), {"epoch": 1})
    ckpts.close()
    step_dir = os.path.join(str(tmp_path), "checkpoints", "1")
    denied = step_dir if where == "step" else os.path.join(step_dir, "state")
    real_access, real_scandir = os.access, os.scandir

    def access(path, mode, *args, **kwargs):  # as chmod 300 would, also for root
        if os.path.abspath(path) == denied and mode & os.R_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(ckpt_lib.os, "access", access)
    with pytest.raises(errors.WorkdirError) as info:
        ckpt_lib.Checkpoints(tmp_path)
    expected = (
        f"Cannot read {denied} (Permission denied): this user may not read it (a workdir "
        "copied from another user, or its modes changed): give it read access (chmod/chown) "
        "or work on a copy you own. Training restores its checkpoints and deletes old ones "
        f"as it saves new ones, so every directory in {step_dir} must be readable and "
        "writable.")
    assert str(info.value) == expected

    def scandir(path="."):  # as listing it fails for another user than root
        if os.path.abspath(path) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(ckpt_lib.os, "access", real_access)
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(errors.WorkdirError) as info:
        ckpt_lib.Checkpoints(tmp_path)
    assert str(info.value) == expected


@pytest.mark.parametrize("name", ["checkpoints", "checkpoints_best"])
def test_a_step_linked_to_another_runs_checkpoint_is_refused_before_training(tmp_path, mesh,
                                                                             name):
    """A step that is a symbolic link (to another run's checkpoint, to resume from it) was
    rotated away like any other: on a host with 4 CPU cores or more, Orbax's deleter
    emptied the directory it links to (the other run's checkpoint lost), then failed on the
    link in a traceback. Refused at the start now, naming the link; the other run's
    checkpoint is untouched and an evaluation still reads it."""
    from stochastic_depth_jax import errors

    other = os.path.join(str(tmp_path), "other")
    ckpts = ckpt_lib.Checkpoints(other, keep=2)
    base = _state(mesh)
    for kind in ("latest", "best"):
        ckpts.save(kind, 1, _with_step(base, 1, mesh), {"epoch": 1})
    ckpts.close()
    target = os.path.join(other, name, "1")
    files = sorted(os.path.relpath(os.path.join(p, f), target)
                   for p, _, names in os.walk(target) for f in names)
    run = os.path.join(str(tmp_path), "run")
    shutil.copytree(other, run)  # the other kind's steps are plain copies
    link = os.path.join(run, name, "1")
    shutil.rmtree(link)
    os.symlink(target, link)
    with pytest.raises(errors.WorkdirError) as info:
        ckpt_lib.Checkpoints(run, keep=1)
    assert str(info.value) == (
        f"{link} is a symbolic link to {target}: training deletes old checkpoints as it saves "
        f"new ones, which would delete the files there; replace the link with a copy (rm "
        f"{link} && cp -r {target} {link}), or use another --workdir.")
    assert sorted(os.path.relpath(os.path.join(p, f), target)
                  for p, _, names in os.walk(target) for f in names) == files
    ckpts = ckpt_lib.Checkpoints(run, read_only=True)
    assert ckpts.steps("latest") == ckpts.steps("best") == [1]
    ckpts.close()


def test_a_save_thread_whose_save_failed_does_not_wait_for_the_others():
    """Orbax's save thread syncs with the other processes in a ``finally``, also after its
    save failed (the job then hung: see test_multihost_failures): it raises that failure
    instead. A caller saving while it handles an error of its own still syncs."""
    import threading

    synced = []
    sync = ckpt_lib._barrier_unless_failed(lambda **kwargs: synced.append(kwargs["key"]))
    full = OSError(errno.ENOSPC, "No space left on device")
    raised = []

    def save_thread():
        try:
            try:
                raise full
            finally:
                sync(key="set_value_start", timeout_ms=1)
        except OSError as e:
            raised.append(e)

    thread = threading.Thread(target=save_thread)
    thread.start()
    thread.join()
    assert raised == [full] and synced == []
    try:
        raise KeyboardInterrupt  # a caller saving at a Ctrl-C, say
    except KeyboardInterrupt:
        sync(key="a", timeout_ms=1)
    try:
        raise RuntimeError("the caller's own")
    except RuntimeError:
        sync(key="b", timeout_ms=1)
    sync(key="c", timeout_ms=1)
    assert synced == ["a", "b", "c"]
    # A trainer run in a worker thread (not the main one) makes its managers there, and
    # saves there while handling an error of its own: it syncs too.
    synced.clear()

    def worker():
        sync = ckpt_lib._barrier_unless_failed(lambda **kwargs: synced.append(kwargs["key"]))
        try:
            raise RuntimeError("the caller's own")
        except RuntimeError:
            sync(key="d", timeout_ms=1)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert synced == ["d"]


def _read_left_in_flight(about):
    """Fails as Orbax's restore of a damaged checkpoint with a read still in flight: a task
    failed naming ``about`` and one awaiting a TensorStore read, on an event loop closed
    when the failure is raised. Returns the error (holding the tasks, as Orbax's does) and
    the read's promise: setting its result finishes the read, on a closed loop."""
    import tensorstore as ts

    promise, pending = ts.Promise.new()

    async def fail():
        raise ValueError(f"DATA_LOSS: Error reading {about}")

    async def wait():
        return await pending

    async def read_all():
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(fail()), loop.create_task(wait())]
        tasks[1]._log_destroy_pending = False  # as nobody ever awaits it: not our subject
        await asyncio.sleep(0.01)
        return tasks

    loop = asyncio.new_event_loop()
    tasks = loop.run_until_complete(read_all())
    loop.close()
    error = ValueError(f"OUT_OF_RANGE: Error reading {about}")
    error.held = tasks
    return error, promise


def test_reads_finishing_after_a_damaged_checkpoints_loop_closed_print_nothing(tmp_path, mesh):
    """Orbax closes the event loop of a failed restore with reads still in flight; each one,
    finishing later on a TensorStore thread (after the restore returned, on a large
    checkpoint), failed to hand its result to the closed loop and printed "Exception
    ignored ... Event loop is closed" to library callers. Now nothing is printed, whenever
    they finish; the caller's unraisable hook is its own again after the restore, and a
    read finishing on the closed loop of another read still reports."""
    base = _save_steps(tmp_path, mesh, [1, 2])
    ckpts = ckpt_lib.Checkpoints(tmp_path)
    manager = ckpts._managers["latest"]
    original = manager.restore
    promises = []

    def restore(s, args=None):
        if s == 2 and "state" in args:
            error, promise = _read_left_in_flight(
                os.path.join(tmp_path, "checkpoints", "2", "state", ""))
            promises.append(promise)
            raise error
        return original(s, args=args)

    manager.restore = restore
    reports = []
    hook = sys.unraisablehook
    sys.unraisablehook = reports.append
    try:
        with pytest.warns(ckpt_lib.CheckpointCorruptWarning, match="step 2"):
            _, meta = ckpts.restore("latest", _abstract(base))
        assert sys.unraisablehook == reports.append
        promises[0].set_result(None)  # The read in flight finishes now.
        _, other = _read_left_in_flight(os.path.join(tmp_path, "elsewhere", ""))
        other.set_result(None)  # Not a read of the restore: reported.
    finally:
        sys.unraisablehook = hook
    ckpts.close()
    assert meta["step"] == 1
    assert [str(r.exc_value) for r in reports] == ["Event loop is closed"]


def test_restores_ending_out_of_order_leave_no_hook_holding_reports(tmp_path):
    """Restores in two threads (or a hook someone else installs during one) end out of the
    order they began: the second restored the first's hook after the first had ended, and
    it held back every later "Event loop is closed" report, never printed. Now a block's
    hook passes every report on once its block ended, and is skipped when the caller's
    hook is put back."""
    reports = []
    hook = sys.unraisablehook
    sys.unraisablehook = reports.append
    try:
        first = logs.lost_task_errors_dropped(str(tmp_path / "a"))
        second = logs.lost_task_errors_dropped(str(tmp_path / "b"))
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)  # The first thread's restore returns first.
        _, read = _read_left_in_flight(str(tmp_path / "elsewhere"))
        read.set_result(None)  # Another thread's report meanwhile: not the blocks'.
        second.__exit__(None, None, None)
        assert sys.unraisablehook == reports.append
        assert [str(r.exc_value) for r in reports] == ["Event loop is closed"]
        _, read = _read_left_in_flight(str(tmp_path / "later"))
        read.set_result(None)
        assert sys.unraisablehook == reports.append
    finally:
        sys.unraisablehook = hook
    assert [str(r.exc_value) for r in reports] == ["Event loop is closed"] * 2
