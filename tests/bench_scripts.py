"""Imports a script of benchmarks/ for a test, as the scripts import each other."""

import importlib
import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


def load(name: str):
    """The module ``benchmarks/<name>.py`` (imported once per test session)."""
    sys.path.insert(0, BENCHMARKS)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(BENCHMARKS)
