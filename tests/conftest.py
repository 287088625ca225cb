"""Test set-up: eight simulated CPU devices, made before JAX starts its backend."""
import collections
import contextlib
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

# Memory one test worker may take: the worker (up to ~4.7 GiB by the end of a run, measured
# on the 2-core CI machine) and the train.py processes its tests start.
WORKER_MEMORY = 6 << 30
MAX_WORKERS = 8  # beyond this the longest test files, not the workers, set the run's time


def pytest_xdist_auto_num_workers(config):
    """How many worker processes ``-n auto`` (pyproject's addopts) starts: one per core this
    process may use, as many as the available memory holds (:data:`WORKER_MEMORY` each,
    under a container's limit too), at most :data:`MAX_WORKERS`, at least one. Most of a
    test's time is XLA compiling on one core, so two workers on two cores take about 0.6x
    the time of one process. ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still decides where set;
    ``-n N`` chooses N, ``-n 0`` runs the tests in this process."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # pytest-xdist's own hook reads it
    from stochastic_depth_jax.data import image_folder
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = image_folder.available_memory()
    fit = MAX_WORKERS if memory is None else memory // WORKER_MEMORY
    return max(1, min(cores or 1, fit, MAX_WORKERS))


# The test files that take longest, slowest first. Under pytest-xdist they are handed out
# before the others, so that none starts late and runs alone while the other workers idle:
# pytest-xdist's own order (most tests first) gave out test_readme.py's two tests (over a
# minute of compiling) among the last, test_train.py's 19 (the longest file) past the middle. The
# other files follow in that order. Beside each: its CPU seconds (user, with the commands it
# starts) run alone, `-n 0`, compilation cache warm, on a busy 2-core machine (2026-12-07).
SLOWEST_FILES = (
    "test_train.py",  # 205
    "test_benchmarks.py",  # 193
    "test_multihost_failures.py",  # 154
    "test_models.py",  # 88
    "test_readme.py",  # 69
    "test_kept_loop.py",  # 64
    "test_x64.py",  # 60
)


def pytest_configure(config):
    """pytest-xdist 3.8 and later hand test files out in the collection's order (that of
    :func:`slowest_files_first`) with ``loadscopereorder`` off; earlier versions sort them by
    test count whatever the order, and :data:`SLOWEST_FILES` only breaks ties."""
    if config.getoption("dist", "no") == "loadfile" and hasattr(config.option,
                                                                 "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    # Only in pytest-xdist's workers (`-n 0` keeps pytest's order), and not over the order
    # asked for by --failed-first or --new-first.
    if hasattr(config, "workerinput") and not (config.getoption("failedfirst", False)
                                               or config.getoption("newfirst", False)):
        items[:] = slowest_files_first(items)


def slowest_files_first(items):
    """``items`` (pytest's collected tests) reordered file by file: the files of
    :data:`SLOWEST_FILES` first, in its order, then the others, most tests first. Each file's
    tests stay together and in their order."""
    counts = collections.Counter(item.path for item in items)
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    return sorted(items, key=lambda item: (rank.get(item.path.name, len(rank)),
                                           -counts[item.path]))


@pytest.fixture(scope="session", autouse=True)
def _persistent_compilation_cache():
    """Every test compiles through the persistent compilation cache that ``train.py`` uses
    (``compilation_cache_dir='auto'``), so a program compiled by an earlier test or an earlier
    run of the suite is loaded instead of compiled again (the ResNet tests compile the same
    programs many times). The session's setting is restored afterwards. Set
    ``JAX_COMPILATION_CACHE_DIR`` to choose the directory."""
    from stochastic_depth_jax.training import compilation
    path = compilation.cache_dir_for("auto")
    # Created now, not at the first compile: a run started by a test (a subprocess) that
    # created it would print the note a new default directory gives (other jaxlib versions').
    with contextlib.suppress(OSError):
        os.makedirs(path, exist_ok=True)
    with compilation.cache_dir_in_use(path):
        yield
