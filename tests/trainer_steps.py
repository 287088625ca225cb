"""A few trainer steps, for tests that compare runs step by step (devices, implementations)."""
import jax
import numpy as np

import compiled
from stochastic_depth_jax import data
from stochastic_depth_jax.training import setup as setup_lib
from stochastic_depth_jax.training import step as step_lib


def train_steps(config, workdir, mesh, steps=3, conditionals=0):
    """Builds the run ``config`` describes on ``mesh`` and takes ``steps`` train steps.

    ``conditionals``: the compiled step (not in compact mode) must keep at least this many
    (skipping's: see ``compiled.with_conditionals``).

    Returns ``(setup, losses, params0, state)``: the setup, the per-step mean losses
    ``[steps]`` (from the on-device epoch sums), the initial parameters on the host and the
    final train state.
    """
    ds = setup_lib.load_data(config, workdir)
    setup = setup_lib.build_for_dataset(config, ds, mesh)
    state = setup.init_state(ds.image_shape)
    params0 = jax.device_get(state.params)
    split = data.put_on_devices(ds.train, mesh)
    if conditionals:
        compiled.with_conditionals(setup.train_step, state, split, at_least=conditionals)
    losses, previous = [], 0.0
    for step in range(steps):
        if isinstance(setup.train_step, step_lib.CompactTrainStep):
            state = setup.train_step(state, split, step)
        else:
            state = setup.train_step(state, split)
        total = float(np.asarray(state.sums["loss"].addressable_data(0)))
        losses.append(total - previous)
        previous = total
    return setup, np.array(losses), params0, state
