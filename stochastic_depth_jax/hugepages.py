"""Transparent huge pages for the memory a training process allocates, on Linux with glibc.

Why: XLA:CPU allocates each step's buffers (for a ResNet-110 step, hundreds of MB: the
scans' stacked residuals, the gradient temporaries) with glibc's ``malloc``, which takes
blocks that large straight from the kernel (``mmap``) and gives them back (``munmap``) when
freed. So every step writes to fresh memory, and the kernel maps it in 4 KiB pages, one
page fault each: about 5 million minor faults in 75 s of ResNet-110 steps on a 2-core CPU.
glibc's tunable ``glibc.malloc.hugetlb=1`` (glibc >= 2.35) makes ``malloc`` advise the
kernel to back such blocks with transparent huge pages (2 MiB): 28x fewer faults, and steps
3-15% faster with skipping, 8-14% at constant depth (README, "Huge pages").

A tunable is read once, when the process starts; it cannot be switched on from inside
Python. :func:`restart_with_huge_pages` therefore executes the same command again in the
same process (same pid, arguments, and environment plus the tunable) before anything heavy
is imported, if the process is that command, ``python [options] <script>`` (not, e.g., under
``python -m pdb``, which would start again whole: :func:`runs`). ``train.py``,
``evaluate.py``, ``sweep.py`` (through ``startup.py``) and the benchmarks call it first,
running this file by its path (``runpy.run_path``) rather than importing it: importing it
would import the package, whose ``__init__`` imports JAX, which the new process would import
again.

It changes nothing where it would not help: not on other systems or C libraries, not where
the kernel's huge pages are ``never`` (none to have) or ``always`` (every large block is
huge already), not in a set-user-ID or file-capabilities interpreter (whose glibc drops the
tunable: it would start again without it, forever), and not when ``GLIBC_TUNABLES`` already
names ``glibc.malloc.hugetlb`` (the user's choice: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=0``
turns this off).

Importable without JAX, NumPy or the rest of the package: standard library only.
"""

from __future__ import annotations

import os
import struct
import sys
from typing import Mapping

__all__ = ["TUNABLE", "THP_MODE_FILE", "reason_not_to", "environment", "active",
           "restart_with_huge_pages", "secure_execution", "hint"]

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb
AUXV_FILE = "/proc/self/auxv"  # the auxiliary vector the kernel gave this process
AT_SECURE = 23  # its key for secure execution (<elf.h>)


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


def secure_execution(path: str = AUXV_FILE) -> bool:
    """Does this process run in secure-execution mode (``AT_SECURE``: a set-user-ID or
    set-group-ID interpreter, or one with file capabilities)? glibc then drops
    :data:`TUNABLE` from ``GLIBC_TUNABLES`` as the process starts, so a restart with it
    would start without it, and restart again, forever."""
    if os.getuid() != os.geteuid() or os.getgid() != os.getegid():
        return True
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    pair = struct.calcsize("@LL")
    for key, value in struct.iter_unpack("@LL", data[:len(data) - len(data) % pair]):
        if key == AT_SECURE:
            return value != 0
    return False


def _named(tunables: str) -> str | None:
    """The value ``GLIBC_TUNABLES``' text gives :data:`TUNABLE`, or None if it names none."""
    for item in filter(None, tunables.split(":")):
        name, _, value = item.partition("=")
        if name == TUNABLE:
            return value
    return None


def reason_not_to(environ: Mapping[str, str] | None = None, platform: str | None = None,
                  glibc: tuple[int, int] | None | str = "running", mode: str | None | bool = True,
                  secure: bool | None = None) -> str | None:
    """Why this process should not restart with huge pages, or None if it should.

    The arguments stand in for the running system in tests: ``environ`` (``os.environ``),
    ``platform`` (``sys.platform``), ``glibc`` (:func:`glibc_version`), ``mode``
    (:func:`thp_mode`), ``secure`` (:func:`secure_execution`).
    """
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if not platform.startswith("linux"):
        return f"not Linux ({platform})"
    if _named(environ.get("GLIBC_TUNABLES", "")) is not None:
        return f"GLIBC_TUNABLES already sets {TUNABLE}"
    if secure_execution() if secure is None else secure:
        return f"a set-user-ID or file-capabilities process, whose glibc drops {TUNABLE}"
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


def active() -> bool:
    """Does this process's ``malloc`` get huge pages for its large blocks? (Recorded in
    ``run.json`` and in the benchmarks' tables.) Yes where the kernel's mode is ``always``
    (every large block is huge already); elsewhere, asked of the kernel rather than read from
    ``GLIBC_TUNABLES`` (which glibc reads only as the process starts, may ignore, or applies
    the last of): does a fresh block of ``malloc`` have huge pages advised or mapped
    (:func:`_advised`)?"""
    if not sys.platform.startswith("linux"):
        return False
    return thp_mode() == "always" or _advised()


def _advised(size: int = 64 << 20) -> bool:
    """Did ``malloc`` ask the kernel for huge pages (``MADV_HUGEPAGE``: ``glibc.malloc.hugetlb
    =1``; ``MAP_HUGETLB``: ``=2``) for a block of ``size`` bytes? The kernel's flags for the
    block's mapping say (``VmFlags`` ``hg`` / ``ht`` in ``/proc/self/smaps``). 64 MiB: above
    glibc's largest ``mmap`` threshold (32 MiB), so mapped afresh; never touched, so free."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        block = libc.malloc(size)
    except (ImportError, OSError, AttributeError):
        return False
    if not block:
        return False
    try:
        return bool(_vm_flags(block) & {"hg", "ht"})
    finally:
        libc.free(block)


def _vm_flags(address: int, path: str = "/proc/self/smaps") -> set[str]:
    """The kernel's flags (``VmFlags``) for the mapping of this process that holds
    ``address``; empty where ``path`` cannot be read."""
    inside = False
    try:
        with open(path) as f:
            for line in f:
                first = line.split(" ", 1)[0]
                if "-" in first and not first.endswith(":"):  # a mapping's first line
                    start, end = (int(a, 16) for a in first.split("-"))
                    inside = start <= address < end
                elif inside and line.startswith("VmFlags:"):
                    return set(line.split()[1:])
    except (OSError, ValueError):
        pass
    return set()


def _script_index(argv: list[str]) -> int | None:
    """Where the script is in the interpreter's command line ``argv`` (``sys.orig_argv``):
    the first word after the interpreter's options; None for ``-c``, ``-m``, ``-`` (stdin)
    or no script at all."""
    i = 1
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return i + 1 if i + 1 < len(argv) and argv[i + 1] != "-" else None
        if word == "--check-hash-based-pycs":
            i += 2
            continue
        if word == "-" or word.startswith("--"):  # stdin; --help, --version
            return None
        if not word.startswith("-"):
            return i
        for j, letter in enumerate(word[1:], 1):
            if letter in "cm":  # a command or a module: no script
                return None
            if letter in "WX":  # a value: the rest of this word, or the next one
                if j == len(word) - 1:
                    i += 1
                break
        i += 1
    return None


def runs(script: str) -> bool:
    """Is this process the command ``python [options] <script> [arguments]``? (Not, for
    example, a test running ``script`` in-process with ``runpy``: its command is pytest's;
    nor ``python -m pdb <script>`` or another program running it, whose restart would
    start that program again: a debugger's breakpoints lost.)"""
    argv = getattr(sys, "orig_argv", None)
    at = _script_index(argv) if argv else None
    if at is None or argv[at:] != sys.argv:
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
