"""One process of a two-process CPU job that sums a sharded array across the processes,
with JAX's persistent compilation cache on. Arguments: process id, coordinator address,
cache directory. Run the job twice with one directory and the second run loads the program
the first compiled (only process 0 writes the cache). Prints ``ready hits <count>`` once the
program is compiled or loaded, then ``sum <value> hits <count>``.
On jaxlib 0.12.1 the second run hangs (``jnp.sum(x)`` alone does not; ``x * 2.0`` does).
"""

import sys

import jax

process_id, address, cache = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_compilation_cache_dir", cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
hits = []
jax.monitoring.register_event_listener(
    lambda event, **_: hits.append(event) if event.endswith("/cache_hits") else None)
jax.distributed.initialize(address, num_processes=2, process_id=process_id)

import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

mesh = jax.make_mesh((jax.device_count(),), ("d",))
local = jnp.arange(float(jax.local_device_count())) + process_id * jax.local_device_count()
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
program = jax.jit(lambda x: jnp.sum(x * 2.0), out_shardings=NamedSharding(mesh, P()))
program = program.lower(x).compile()
print(f"ready hits {len(hits)}", flush=True)  # A hang after this line is in the program.
print(f"sum {float(program(x)):g} hits {len(hits)}", flush=True)
