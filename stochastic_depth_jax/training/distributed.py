"""Multi-host start-up (``jax.distributed.initialize``) and the data-parallel mesh.

Every process runs the same program over a global mesh of all devices; the global batch
is split along the mesh axis ``'data'`` and parameters are replicated.

* TPU pods and SLURM / Open MPI clusters: ``initialize(auto=True)`` lets JAX detect the
  coordinator, process count and id from the environment.
* Anything else (several GPU hosts by hand, local tests): pass ``coordinator_address``
  (``host:port`` of process 0), ``num_processes`` and ``process_id`` on every process.
"""

from __future__ import annotations

import os
import sys
import threading

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from stochastic_depth_jax import errors

__all__ = [
    "initialize",
    "make_mesh",
    "replicated",
    "batch_sharded",
    "check_batch_size",
    "DATA_AXIS",
    "is_primary",
]

DATA_AXIS = "data"


def initialize(
    *,
    auto: bool = False,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    coordinator_bind_address: str | None = None,
    timeout_s: int = 300,
) -> None:
    """Joins a multi-process JAX job; does nothing for a single-process run.

    Args:
      auto: detect the cluster (TPU pod, SLURM, Open MPI) from the environment.
      coordinator_address: ``'host:port'`` of process 0 (manual launch).
      num_processes: total processes (manual launch).
      process_id: this process's index in ``[0, num_processes)`` (manual launch).
      coordinator_bind_address: address process 0 listens on (default: all interfaces);
        ``'127.0.0.1:port'`` keeps a local test off the network.
      timeout_s: how long to wait for every process to join before giving up.

    Must run before anything touches a JAX device.

    Raises:
      errors.DistributedError: incomplete arguments, or the processes did not all join
        within ``timeout_s`` (the message says which address and how many were expected).
    """
    manual = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in manual):
        if any(v is None for v in manual):
            raise errors.DistributedError(
                "A manual multi-process launch needs all of --coordinator_address, "
                f"--num_processes and --process_id; got {manual}."
            )
        print(
            f"Process {process_id} of {num_processes}: joining the job at "
            f"{coordinator_address} (waiting up to {timeout_s} s for all processes).",
            file=sys.stderr,
            flush=True,
        )
        _initialize(
            f"the {num_processes} processes did not all join at {coordinator_address}",
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            coordinator_bind_address=coordinator_bind_address,
            initialization_timeout=timeout_s,
        )
    elif auto:
        _initialize("the cluster's processes did not all join", initialization_timeout=timeout_s)


def _initialize(what: str, **kwargs) -> None:
    """``jax.distributed.initialize`` with a watchdog that ends a stuck start with a message.

    When processes are missing, XLA aborts the process with a C++ stack trace after its own
    timeout; the watchdog fires first (XLA's timeout is set later) and exits with one line.
    """
    timeout = kwargs["initialization_timeout"]
    message = (
        f"error: multi-process start failed: {what} within {timeout} s. Start every process "
        "with the same coordinator address and --num_processes, each with its own "
        "--process_id, or raise --init_timeout."
    )
    done = threading.Event()

    def watchdog():
        if not done.wait(timeout):
            print(message, file=sys.stderr, flush=True)
            os._exit(1)  # The main thread is blocked inside XLA: nothing else can stop it.

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        jax.distributed.initialize(**dict(kwargs, initialization_timeout=timeout + 60))
    except Exception as e:  # noqa: BLE001  XLA raises plain RuntimeError/XlaRuntimeError.
        raise errors.DistributedError(message.removeprefix("error: ") + f" ({e})") from e
    finally:
        done.set()


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh ``('data',)`` over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.sharding.Mesh(
        np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimiser state)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``'data'``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, name: str = "batch_size") -> None:
    """Raises ``errors.ConfigError`` unless ``batch_size`` divides evenly over the mesh's devices."""
    if batch_size % mesh.size:
        raise errors.ConfigError(
            f"{name}={batch_size} does not divide by the {mesh.size} devices of the mesh "
            f"({jax.process_count()} process(es)); use a multiple of {mesh.size}, e.g. "
            f"--config.{name}={max(mesh.size, batch_size // mesh.size * mesh.size)}."
        )


def is_primary() -> bool:
    """True on process 0, the one that writes logs, JSON and plots."""
    return jax.process_index() == 0
