"""Test set-up: eight simulated CPU devices, made before JAX starts its backend."""
import os

# Must run before jax initialises a backend; conftest is imported before any test module.
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# The commands the tests start (train.py, evaluate.py, the benchmarks) keep 4 KiB pages:
# run as commands they would start again with huge pages for malloc
# (stochastic_depth_jax/hugepages.py), and with that the suite's hundreds of short commands
# took CI from about 18 to 24 minutes. The tests of that restart give it an environment
# without this setting.
_tunables = os.environ.get("GLIBC_TUNABLES", "")
if "glibc.malloc.hugetlb" not in _tunables:
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, (_tunables, "glibc.malloc.hugetlb=0")))

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _persistent_compilation_cache():
    """Every test compiles through the persistent compilation cache that ``train.py`` uses
    (``compilation_cache_dir='auto'``), so a program compiled by an earlier test or an earlier
    run of the suite is loaded instead of compiled again (the ResNet tests compile the same
    programs many times). The session's setting is restored afterwards. Set
    ``JAX_COMPILATION_CACHE_DIR`` to choose the directory."""
    from stochastic_depth_jax.training import compilation
    with compilation.cache_dir_in_use(compilation.cache_dir_for("auto")):
        yield
