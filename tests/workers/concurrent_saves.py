"""One process of a multi-process job that saves 'best' and 'latest' at the same steps.

Run as ``python concurrent_saves.py WORKDIR ADDRESS NUM_PROCESSES PROCESS_ID STEPS``; used by
``tests/test_checkpoint.py``. Each step is saved asynchronously by both managers at once,
as the trainer does whenever validation improves at a checkpointing epoch.
"""

import sys

import jax
import jax.numpy as jnp
import optax

from stochastic_depth_jax.training import checkpoint as ckpt_lib
from stochastic_depth_jax.training import distributed
from stochastic_depth_jax.training import state as state_lib


def main(workdir: str, address: str, num_processes: int, process_id: int, steps: int) -> None:
    distributed.initialize(
        coordinator_address=address,
        num_processes=num_processes,
        process_id=process_id,
        coordinator_bind_address=address,
    )
    mesh = distributed.make_mesh()
    model = _tiny_model()
    state = state_lib.create_train_state(
        model, optax.sgd(0.1), (4, 4, 3), jax.random.key(0), distributed.replicated(mesh)
    )
    ckpts = ckpt_lib.Checkpoints(workdir, keep=steps)
    for step in range(1, steps + 1):
        state = state.replace(
            step=jax.device_put(jnp.int32(step), distributed.replicated(mesh)),
            params=jax.tree.map(lambda x: x + 1.0, state.params),
        )
        for kind in ("best", "latest"):
            ckpts.save(kind, step, state, {"epoch": step})
    ckpts.close()
    print("saved", ckpts.steps("latest"), ckpts.steps("best"), flush=True)


def _tiny_model():
    import flax.linen as nn

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return nn.Dense(3)(x.mean((1, 2)))

    return Tiny()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
