"""JAX's persistent compilation cache for runs, and a count of what a run compiled.

A resumed or repeated run finds its programs in the cache instead of compiling them again
(compact mode compiles one program per bucket tuple, so this matters most there). The
directory is ``config.compilation_cache_dir``:

* ``'auto'`` (default): ``JAX_COMPILATION_CACHE_DIR`` if set, else
  ``$XDG_CACHE_HOME/stochastic_depth_jax/jax/<host>`` (``~/.cache/...`` without
  XDG_CACHE_HOME), where ``<host>`` (:func:`host_tag`) names the jaxlib version, the machine
  and its CPU features: a home directory shared by machines of different CPUs (a cluster's
  NFS home) or an upgraded jaxlib does not load programs compiled for the other one (XLA:CPU
  refuses them with error lines and compiles again; a jaxlib change has crashed loads);
* a path: that directory;
* ``''``: no persistent cache.

A directory that cannot be created (:func:`off_if_unwritable`) is one error naming the field
where the user gave the path, and the cache off, said in one warning, for ``'auto'``: a
read-only or missing home directory must not stop a run that never asked for the cache. A
directory that exists but cannot be written (:func:`read_only`: another user's, a read-only
mount, a cache shared read-only) is used to load programs, said in one warning; JAX's own
warning for each program it then cannot store is dropped (:func:`cache_dir_in_use`).

JAX caches only programs that took at least ``jax_persistent_cache_min_compile_time_secs``
(default 1 s) to compile. The cache is trusted code: do not share its directory with users
you do not trust.

A multi-process job on the CPU backend runs without the cache from jaxlib 0.12.1 on
(:func:`cache_hazard`): there a program loaded from the cache can wait forever in its first
cross-process all-reduce.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import platform
import re
import tempfile
import threading
import warnings
from typing import Any, Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache

from stochastic_depth_jax import errors, logs

__all__ = ["cache_dir_for", "cache_hazard", "off_if_hazardous", "off_if_unwritable", "read_only",
           "host_tag", "use_cache_dir", "cache_dir_in_use", "CompileStats"]

# Event names JAX's monitoring reports (jax._src.dispatch / compiler); stable since 0.4.
_COMPILE = "/jax/core/compile/backend_compile_duration"  # one per program (hit or miss)
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


def cache_dir_for(setting: str | None, environ: Any = os.environ) -> str:
    """The cache directory ``config.compilation_cache_dir=setting`` means ('' = none)."""
    if not setting:
        return ""
    if setting != "auto":
        return os.path.abspath(os.path.expanduser(setting))
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "stochastic_depth_jax", "jax", host_tag())


# jaxlib 0.12.1 (first seen 2026-12-06; 0.12.0.1 and earlier are fine): in a job of several
# processes on the CPU backend, an executable loaded from the persistent cache can hang in
# its first cross-process all-reduce, every process waiting in Gloo's receive; the same
# program compiled afresh runs. Seen with the train step and with two processes summing a
# sharded array times 2, whether one or both of them loaded it (a plain sum, and
# multihost_utils' broadcast and all-gather, ran). Releases after 0.12.1 count as affected
# until one is seen to work (tests/test_compilation.py runs that check against the installed
# jaxlib).
_CPU_JOB_CACHE_HANGS_FROM = (0, 12, 1)


def _release(version: str) -> tuple[int, ...]:
    """The version's leading dotted numbers, so a pre-release or local build ranks with its
    release, not below it: ``'0.12.0.1'`` -> ``(0, 12, 0, 1)``; ``'0.12.2rc1'``,
    ``'0.12.2+local'`` -> ``(0, 12, 2)``; ``'0.13.0.dev20270101'`` -> ``(0, 13, 0)``."""
    numbers = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(n) for n in numbers.group().split(".")) if numbers else ()


def cache_hazard(platform: str, process_count: int, jaxlib_version: str | None = None
                 ) -> str | None:
    """Why a job on ``platform`` with ``process_count`` processes must not use the persistent
    compilation cache with this jaxlib (``jaxlib_version``, default the installed one), or
    None where it may."""
    if jaxlib_version is None:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    if (platform == "cpu" and process_count > 1
            and _release(jaxlib_version) >= _CPU_JOB_CACHE_HANGS_FROM):
        return (f"jaxlib {jaxlib_version} can hang a job of several processes on the CPU in "
                "the first cross-process all-reduce of a program loaded from the persistent "
                "compilation cache, so this job compiles its programs instead")
    return None


def off_if_hazardous(path: str) -> tuple[str, str | None]:
    """``(path, None)`` where this job may use the cache at ``path`` ('' = none); otherwise
    ``('', why)`` (:func:`cache_hazard` for this job's backend and processes), after process
    0 has said so in one line. Call once the job's processes have joined."""
    why = cache_hazard(jax.default_backend(), jax.process_count()) if path else None
    if not why:
        return path, None
    if jax.process_index() == 0:
        print(f"Persistent compilation cache off: {why}.", flush=True)
    return "", why


def off_if_unwritable(path: str, setting: str) -> tuple[str, str | None]:
    """``(path, None)`` where the cache directory ``path`` ('' = none) exists or could be
    created; otherwise, for ``setting`` 'auto' (a place the user did not choose: a home
    directory that is read-only or missing), ``('', why)`` after process 0 has warned that
    the run goes on without the cache. A path the user gave (``setting``) that cannot be
    created raises ``errors.ConfigError`` naming the field, before anything trains.

    Without this, ``os.makedirs`` failed in :func:`use_cache_dir` and the run stopped with
    the workdir's advice ("use another --workdir"), which does not help."""
    if not path:
        return path, None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        problem = f"cannot create {path} ({e.strerror or e})"
        if setting != "auto":
            raise errors.ConfigError(
                f"compilation_cache_dir={setting!r}: {problem}; give a directory this user "
                "can write, or --config.compilation_cache_dir='' to turn the cache off.") from e
        why = f"the default directory (compilation_cache_dir='auto') {problem}"
        if jax.process_index() == 0:
            warnings.warn(f"Persistent compilation cache off: {why}; set "
                          "--config.compilation_cache_dir to a directory this user can write "
                          "to keep compiled programs, or '' to silence this.", logs.RunWarning)
        return "", why
    return path, None


def read_only(path: str) -> str | None:
    """Why programs cannot be stored in the existing cache directory ``path`` (``'cannot
    write to <path> (Permission denied)'``), after process 0 has said so in one warning;
    None where a file could be created there (and was removed), or ``path`` is '' (off).

    The permission bits do not tell (ACLs, read-only mounts, root), so a file is created.
    Such a cache still serves the programs it holds; without this, JAX warned with its
    source line for every program it could not store, and the run's last line said that
    its programs were cached there."""
    if not path:
        return None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        why = f"cannot write to {path} ({e.strerror or e})"
    else:
        return None
    if jax.process_index() == 0:
        warnings.warn(f"Persistent compilation cache read-only: {why}; programs found there "
                      "are loaded, the others compiled and not kept; set "
                      "--config.compilation_cache_dir to a directory this user can write to "
                      "keep them, or '' to turn the cache off.", logs.RunWarning)
    return why


# JAX's warning for each program it could not store in the cache (jax._src.compiler).
_WRITE_FAILED = "Error writing persistent compilation cache entry"


def _cpu_features(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model and feature flags as the OS lists them ('' where it does not)."""
    try:
        with open(cpuinfo) as f:
            lines = f.read().splitlines()
    except OSError:  # macOS, Windows: the processor's name is what there is
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    seen: dict[str, str] = {}
    for line in lines:  # the first processor's entries (all cores of a host share them)
        key, _, value = line.partition(":")
        if key.strip() in wanted and key.strip() not in seen:
            seen[key.strip()] = " ".join(sorted(value.split()))
    return repr(sorted(seen.items()))


def host_tag(cpuinfo: str = "/proc/cpuinfo") -> str:
    """``jaxlib<version>-<machine>-<digest of the CPU's model and features>``: the part of
    the default cache directory that keeps programs compiled by one jaxlib on one kind of
    CPU apart from the others'."""
    import jaxlib

    digest = hashlib.sha256(_cpu_features(cpuinfo).encode()).hexdigest()[:12]
    return f"jaxlib{jaxlib.__version__}-{platform.machine() or 'unknown'}-{digest}"


def use_cache_dir(path: str) -> None:
    """Points JAX's persistent compilation cache at ``path`` ('' turns it off)."""
    current = jax.config.jax_compilation_cache_dir or ""
    if path == current:
        return
    if path:
        os.makedirs(path, exist_ok=True)
    compilation_cache.set_cache_dir(path or None)
    # JAX opens the cache once per process; re-open it at the new place on the next compile.
    compilation_cache.reset_cache()


@contextlib.contextmanager
def cache_dir_in_use(path: str, read_only: bool = False) -> Iterator[None]:
    """Points JAX's persistent compilation cache at ``path`` ('' = off) while the block runs,
    then back where it was: a run called from Python (a notebook, a sweep in one process)
    leaves the session's ``jax_compilation_cache_dir`` as it found it. ``read_only``
    (:func:`read_only` said why, once): JAX's warning for each program it cannot store
    there is dropped while the block runs."""
    previous = jax.config.jax_compilation_cache_dir or ""
    use_cache_dir(path)
    try:
        with warnings.catch_warnings() if read_only else contextlib.nullcontext():
            if read_only:
                warnings.filterwarnings("ignore", message=_WRITE_FAILED)
            yield
    finally:
        use_cache_dir(previous)


@dataclasses.dataclass
class CompileStats:
    """Counts XLA compilations while active (a context manager)::

        with CompileStats() as stats:
            ...  # train
        stats.to_json()  # {'programs': 3, 'compile_s': 12.1, 'cache_hits': 0, ...}

    Attributes:
      programs: programs obtained from the backend (compiled, or loaded from the cache).
      compile_s: seconds spent on them (compiling or loading).
      cache_hits: how many of them came from the persistent cache.
      trace_and_lower_s: seconds spent tracing and lowering to MLIR.
    """

    programs: int = 0
    compile_s: float = 0.0
    cache_hits: int = 0
    trace_and_lower_s: float = 0.0

    def __post_init__(self):
        self._lock = threading.Lock()

    def _on_duration(self, event: str, seconds: float, **_: Any) -> None:
        with self._lock:
            if event == _COMPILE:
                self.programs += 1
                self.compile_s += seconds
            elif event in (_TRACE, _LOWER):
                self.trace_and_lower_s += seconds

    def _on_event(self, event: str, **_: Any) -> None:
        if event == _CACHE_HIT:
            with self._lock:
                self.cache_hits += 1

    def __enter__(self) -> "CompileStats":
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc: Any) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)

    def to_json(self) -> dict[str, Any]:
        """The counts, seconds rounded to milliseconds."""
        return {"programs": self.programs, "compile_s": round(self.compile_s, 3),
                "cache_hits": self.cache_hits,
                "trace_and_lower_s": round(self.trace_and_lower_s, 3)}
