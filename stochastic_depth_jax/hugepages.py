"""Transparent huge pages for the memory a training process allocates, on Linux with glibc.

Why: XLA:CPU allocates each step's buffers (for a ResNet-110 step, hundreds of MB: the
scans' stacked residuals, the gradient temporaries) with glibc's ``malloc``, which takes
blocks that large straight from the kernel (``mmap``) and gives them back (``munmap``) when
freed. So every step writes to fresh memory, and the kernel maps it in 4 KiB pages, one
page fault each: about 5 million minor faults in 75 s of ResNet-110 steps on a 2-core CPU.
glibc's tunable ``glibc.malloc.hugetlb=1`` (glibc >= 2.35) makes ``malloc`` advise the
kernel to back such blocks with transparent huge pages (2 MiB): 28x fewer faults, and steps
about 4% faster with skipping, 10% at constant depth (README, "Huge pages").

A tunable is read once, when the process starts; it cannot be switched on from inside
Python. :func:`restart_with_huge_pages` therefore executes the same command again in the
same process (same pid, arguments, and environment plus the tunable) before anything heavy
is imported. ``train.py``, ``evaluate.py``, ``sweep.py`` and the benchmarks call it first,
running this file by its path (``runpy.run_path``) rather than importing it: importing it
would import the package, whose ``__init__`` imports JAX, which the new process would import
again.

It changes nothing where it would not help: not on other systems or C libraries, not where
the kernel's huge pages are ``never`` (none to have) or ``always`` (every large block is
huge already), and not when ``GLIBC_TUNABLES`` already names ``glibc.malloc.hugetlb`` (the
user's choice: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=0`` turns this off).

Importable without JAX, NumPy or the rest of the package: standard library only.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping

__all__ = ["TUNABLE", "THP_MODE_FILE", "reason_not_to", "environment", "active",
           "restart_with_huge_pages", "hint"]

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def glibc_version() -> tuple[int, int] | None:
    """``(major, minor)`` of the running glibc, or None (another C library, or not Linux)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode (``'always'``, ``'madvise'``, ``'never'``),
    the bracketed word of ``path``; None when it cannot be read."""
    try:
        with open(path) as f:
            words = f.read().split()
    except OSError:
        return None
    chosen = [w[1:-1] for w in words if w.startswith("[") and w.endswith("]")]
    return chosen[0] if len(chosen) == 1 else None


def _named(tunables: str) -> str | None:
    """The value ``GLIBC_TUNABLES``' text gives :data:`TUNABLE`, or None if it names none."""
    for item in filter(None, tunables.split(":")):
        name, _, value = item.partition("=")
        if name == TUNABLE:
            return value
    return None


def reason_not_to(environ: Mapping[str, str] | None = None, platform: str | None = None,
                  glibc: tuple[int, int] | None | str = "running", mode: str | None | bool = True
                  ) -> str | None:
    """Why this process should not restart with huge pages, or None if it should.

    The arguments stand in for the running system in tests: ``environ`` (``os.environ``),
    ``platform`` (``sys.platform``), ``glibc`` (:func:`glibc_version`), ``mode``
    (:func:`thp_mode`).
    """
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if not platform.startswith("linux"):
        return f"not Linux ({platform})"
    if _named(environ.get("GLIBC_TUNABLES", "")) is not None:
        return f"GLIBC_TUNABLES already sets {TUNABLE}"
    glibc = glibc_version() if glibc == "running" else glibc
    if glibc is None:
        return "not glibc"
    if tuple(glibc) < MIN_GLIBC:
        return f"glibc {glibc[0]}.{glibc[1]} has no {TUNABLE} (2.35 and later)"
    mode = thp_mode() if mode is True else mode
    if mode != "madvise":
        return (f"the kernel's transparent huge pages are {mode!r}, not 'madvise'"
                if mode else "the kernel's transparent huge page mode is unknown")
    return None


def environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (``os.environ``) with :data:`TUNABLE` ``=1`` added to ``GLIBC_TUNABLES``
    (kept: the tunables it already sets)."""
    env = dict(os.environ if environ is None else environ)
    tunables = env.get("GLIBC_TUNABLES", "")
    env["GLIBC_TUNABLES"] = ":".join(filter(None, (tunables, f"{TUNABLE}=1")))
    return env


def active(environ: Mapping[str, str] | None = None) -> bool:
    """Does this process allocate with huge pages: did it start with :data:`TUNABLE` set
    non-zero, on a system where that takes effect? (Recorded in ``run.json`` and in the
    benchmarks' tables.)"""
    environ = os.environ if environ is None else environ
    value = _named(environ.get("GLIBC_TUNABLES", ""))
    if value in (None, "", "0"):
        return False
    glibc = glibc_version()
    return bool(sys.platform.startswith("linux") and glibc and glibc >= MIN_GLIBC
                and thp_mode() in ("madvise", "always"))


def runs(script: str) -> bool:
    """Is this process the command ``python [options] <script> [arguments]``? (Not, for
    example, a test running ``script`` in-process with ``runpy``: its command is pytest's.)"""
    argv = getattr(sys, "orig_argv", None)
    if not argv or not sys.argv or sys.argv[0] in ("", "-", "-c") or sys.argv[0] not in argv[1:]:
        return False
    try:
        return os.path.samefile(sys.argv[0], script)
    except OSError:
        return False


def restart_with_huge_pages(script: str) -> None:
    """Execute this process's command again with huge pages (see the module docstring), or
    return at once if that would not help (:func:`reason_not_to`) or the command is not
    ``python <script> ...`` (:func:`runs`; ``script``: the caller's ``__file__``). Call it
    before importing anything heavy: what ran before it runs again."""
    if reason_not_to() is not None or not sys.executable or not runs(script):
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, environment())
    except OSError:  # could not start again (e.g. the interpreter moved): run as is
        return


_hinted = False


def hint() -> str | None:
    """For a CPU run in a process that did not start with huge pages where they would help
    (a notebook, the user's own program calling ``train_and_evaluate``): one line saying how
    to have them, the first time it is asked in the process; None otherwise."""
    global _hinted
    if _hinted or active() or reason_not_to() is not None:
        return None
    _hinted = True
    return (f"This process allocates memory in 4 KiB pages: start Python with "
            f"GLIBC_TUNABLES={TUNABLE}=1 (as train.py does by itself) for faster CPU steps "
            f"(README, \"Huge pages\").")
