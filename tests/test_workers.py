"""How many worker processes the suite starts (``-n auto``: conftest's rule), and the order in
which they are given the test files."""
import os
import pathlib
import types

import pytest

import conftest
from stochastic_depth_jax.data import image_folder

GiB = 1 << 30


@pytest.mark.parametrize("cores, memory, workers", [
    (2, 20 * GiB, 2),     # the CI machine: one per core
    (16, 20 * GiB, 3),    # memory holds three
    (64, 500 * GiB, 8),   # at most eight
    (16, None, 8),        # memory unknown: cores, at most eight
    (4, 1 * GiB, 1),      # too little memory for two: one worker, not none
])
def test_one_worker_per_core_as_many_as_memory_holds(monkeypatch, cores, memory, workers):
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(image_folder, "available_memory", lambda: memory)
    assert conftest.pytest_xdist_auto_num_workers(None) == workers


def test_the_environment_variable_is_left_to_pytest_xdist(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "5")
    assert conftest.pytest_xdist_auto_num_workers(None) is None


def test_the_slowest_files_go_first_each_files_tests_together_and_in_order():
    slowest, slower = conftest.SLOWEST_FILES[:2]
    tests = [("test_few.py", "a"), ("test_many.py", "a"), ("test_many.py", "b"),
             (slower, "a"), (slowest, "a"), (slowest, "b")]
    items = [types.SimpleNamespace(path=pathlib.Path("tests", name), name=test)
             for name, test in tests]
    assert [(item.path.name, item.name) for item in conftest.slowest_files_first(items)] == [
        (slowest, "a"), (slowest, "b"), (slower, "a"), ("test_many.py", "a"),
        ("test_many.py", "b"), ("test_few.py", "a")]


def test_the_slowest_files_named_are_test_files():
    here = os.path.dirname(os.path.abspath(__file__))
    assert len(set(conftest.SLOWEST_FILES)) == len(conftest.SLOWEST_FILES) > 1
    for name in conftest.SLOWEST_FILES:
        assert name.startswith("test_") and os.path.isfile(os.path.join(here, name)), name


@pytest.mark.parametrize("dist, reorder", [("loadfile", False), ("loadscope", True),
                                           ("no", True)])
def test_pytest_xdist_hands_out_test_files_in_that_order(dist, reorder):
    # pytest-xdist (3.8 on) sorts them, most tests first, unless loadscopereorder is off.
    option = types.SimpleNamespace(dist=dist, loadscopereorder=True)
    config = types.SimpleNamespace(
        option=option, getoption=lambda name, default=None: getattr(option, name, default))
    conftest.pytest_configure(config)
    assert option.loadscopereorder is reorder
