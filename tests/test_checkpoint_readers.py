"""Reading checkpoints while a training run writes them: the newest committed step that
still exists is read, and a step the writer rotates away meanwhile is not taken for damage."""

import threading
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from stochastic_depth_jax.training import checkpoint as ckpt_lib
from stochastic_depth_jax.training import distributed
from stochastic_depth_jax.training import state as state_lib


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(4, (3, 3), name="stem_conv")(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(x.mean((1, 2)))


@pytest.fixture(scope="module")
def base():
    mesh = distributed.make_mesh()
    opt = optax.sgd(0.1, 0.9)
    state = state_lib.create_train_state(
        _Net(), opt, (8, 8, 3), jax.random.key(0, impl="rbg"), distributed.replicated(mesh)
    )
    return mesh, state


def _at_step(base, step):
    """The base state with every float parameter shifted by ``step`` (tells steps apart)."""
    mesh, state = base
    params = jax.tree.map(lambda x: x + step if x.dtype == jnp.float32 else x, state.params)
    step_array = jax.device_put(jnp.int32(step), distributed.replicated(mesh))
    return state.replace(step=step_array, params=params)


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def _assert_is_step(state, meta, base):
    step = int(meta["step"])
    assert int(state.step) == step
    want = _at_step(base, step).params
    jax.tree.map(lambda a, b: jnp.array_equal(a, b) or pytest.fail(f"step {step} differs"),
                 state.params, want)


def test_reader_reads_latest_while_a_writer_saves_and_rotates(tmp_path, base):
    """As ``evaluate.py --checkpoint latest`` during training: the reader opens the
    checkpoints, spends a while (loading data, building the model), then restores."""
    workdir = str(tmp_path)
    writer = ckpt_lib.Checkpoints(workdir, keep=2, async_save=True)
    writer.save("latest", 1, _at_step(base, 1), {"epoch": 1})
    writer.wait()
    stop, saved = threading.Event(), [1]

    def write():
        step = 1
        while not stop.is_set():
            step += 1
            writer.save("latest", step, _at_step(base, step), {"epoch": step})
            saved.append(step)
        writer.wait()

    thread = threading.Thread(target=write)
    thread.start()
    read = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ckpt_lib.CheckpointCorruptWarning)
            for _ in range(3):
                reader = ckpt_lib.Checkpoints(workdir, read_only=True)
                opened_with = reader.steps("latest")
                before = len(saved)
                while len(saved) < before + 4:  # The writer rotates every step listed above.
                    time.sleep(0.02)
                state, meta = reader.restore("latest", _abstract(base[1]))
                reader.close()
                assert int(meta["step"]) > max(opened_with)  # Not a stale listing's step.
                _assert_is_step(state, meta, base)
                read.append(int(meta["step"]))
    finally:
        stop.set()
        thread.join()
        writer.close()
    assert read == sorted(read) and len(set(read)) == 3


def test_step_deleted_between_listing_and_reading_is_not_damage(tmp_path, base, monkeypatch):
    """The newest listed step vanishes (the writer saved a newer one and rotated) just as the
    reader starts on it: the reader lists again and reads the new newest step, and warns
    about nothing."""
    workdir = str(tmp_path)
    writer = ckpt_lib.Checkpoints(workdir, keep=2, async_save=False)
    for step in (1, 2):
        writer.save("latest", step, _at_step(base, step), {"epoch": step})
    reader = ckpt_lib.Checkpoints(workdir, read_only=True)
    original, calls = reader.read_meta, []

    def read_meta(kind, step):
        calls.append(step)
        if step == 2 and len(calls) == 1:  # The writer gets in first: saves 3, 4; 2 goes.
            for new in (3, 4):
                writer.save("latest", new, _at_step(base, new), {"epoch": new})
            assert writer.steps("latest") == [3, 4]
        return original(kind, step)

    monkeypatch.setattr(reader, "read_meta", read_meta)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ckpt_lib.CheckpointCorruptWarning)
        state, meta = reader.restore("latest", _abstract(base[1]))
    assert calls == [2, 4] and meta["step"] == 4
    _assert_is_step(state, meta, base)
    writer.close()
    reader.close()
