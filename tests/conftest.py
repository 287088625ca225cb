"""Test set-up: eight simulated CPU devices, made before JAX starts its backend."""
import os

# Must run before jax initialises a backend; conftest is imported before any test module.
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
