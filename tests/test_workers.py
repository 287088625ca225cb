"""How many worker processes the suite starts (``-n auto``: conftest's rule)."""
import os

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
