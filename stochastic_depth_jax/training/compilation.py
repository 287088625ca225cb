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
* a path: that directory (a URL, ``gs://bucket/dir``, is left to JAX as it is);
* ``''``: no persistent cache.

:func:`choose` decides a run's cache, :func:`for_recorded_run` the cache of a trained run
for a script that works on it (``evaluate.py``, from the run's ``run.json``) and
:func:`from_jax_setting` the cache JAX's own setting gives a script without the field (the
benchmarks), by the same rules; what they decide is said once, where the work starts
(:meth:`Cache.announce`; a sweep's runs, once in all: :func:`said_once`). A directory that
cannot be created, or that this user cannot enter (mode 600), is one error naming the field
where the user gave the path, and the cache off, said in one warning, for ``'auto'``, a
run's record and JAX's setting: a read-only or missing home directory must not stop a run
that never asked for the cache. A directory that exists but cannot be written (another
user's, a read-only mount, a cache shared read-only) is used to load programs, said in one
warning; JAX's own warning for each program it then cannot store is dropped
(:func:`cache_dir_in_use`). A new default directory (a jaxlib upgrade) names the other
jaxlib versions' directories beside it, with their sizes, once: no run of this jaxlib reads
them again, but another environment or machine may, so they are not deleted.

JAX caches only programs that took at least ``jax_persistent_cache_min_compile_time_secs``
(default 1 s) to compile. The cache is trusted code: do not share its directory with users
you do not trust.

A multi-process job on the CPU backend runs without the cache from jaxlib 0.12.1 on
(:func:`cache_hazard`): there a program loaded from the cache can wait forever in its first
cross-process all-reduce.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import os
import platform
import re
import sys
import tempfile
import threading
import warnings
from typing import Any, Iterator, TextIO

import jax
from jax.experimental.compilation_cache import compilation_cache

from stochastic_depth_jax import errors, files, logs

__all__ = ["cache_dir_for", "cache_hazard", "Cache", "choose", "for_recorded_run",
           "from_jax_setting", "host_tag", "said_once", "use_cache_dir", "cache_dir_in_use",
           "CompileStats"]

# Event names JAX's monitoring reports (jax._src.dispatch / compiler); stable since 0.4.
_COMPILE = "/jax/core/compile/backend_compile_duration"  # one per program (hit or miss)
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


def cache_dir_for(setting: str | None, environ: Any = os.environ) -> str:
    """The cache directory ``config.compilation_cache_dir=setting`` means ('' = none)."""
    if not setting:
        return ""
    if _remote(setting):  # JAX opens gs://... itself (etils.epath); abspath made it local
        return setting
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


@dataclasses.dataclass
class Cache:
    """The persistent cache a run or an evaluation uses (``path``; '' = none), and why not,
    or read-only, where it was asked for: :func:`choose` (a run's ``compilation_cache_dir``)
    or :func:`from_jax_setting` (JAX's own ``jax_compilation_cache_dir``) decide it without
    a word; :meth:`announce` then says so once, where the work starts (a finished run that
    has nothing to train says nothing about a cache it does not use), and :meth:`in_use`
    points JAX at it while a block runs.

    Attributes:
      path: the directory JAX is pointed at, '' for none.
      off_because: why a cache that was asked for is off (a job that must not use it, a
        directory that cannot be created or entered).
      read_only_because: why programs cannot be stored in ``path``; those it holds load.
    """

    path: str = ""
    off_because: str | None = None
    read_only_because: str | None = None
    _notices: list[tuple[str, bool]] = dataclasses.field(default_factory=list, repr=False)

    def announce(self, out: TextIO | None = None) -> None:
        """Says, on process 0 and once, what the caller should know: the cache is off or
        read-only (warnings), or off for this job, or other jaxlib versions' caches take
        space (a new default directory): lines on ``out`` (default stdout; ``evaluate.py``'s
        stdout is its JSON alone)."""
        notices, self._notices = self._notices, []
        if jax.process_index() != 0:
            return
        said = _SAID.get()
        if said is not None:  # said_once(): each notice the first time only
            notices = [notice for notice in notices if notice[0] not in said]
            said.update(text for text, _ in notices)
        for text, as_warning in notices:
            if as_warning:
                warnings.warn(text, logs.RunWarning)
            else:
                print(text, file=out or sys.stdout, flush=True)

    def in_use(self) -> contextlib.AbstractContextManager[None]:
        """:func:`cache_dir_in_use` for this cache (JAX's per-program warning for each one
        it cannot store dropped where it is read-only)."""
        return cache_dir_in_use(self.path, read_only=bool(self.read_only_because))

    def to_json(self) -> dict[str, Any]:
        """``cache_dir`` (None: off), and ``cache_off_because`` or
        ``cache_read_only_because`` where they apply (``summary.json``'s fields)."""
        record: dict[str, Any] = {"cache_dir": self.path or None}
        if self.off_because:
            record["cache_off_because"] = self.off_because
        if self.read_only_because:
            record["cache_read_only_because"] = self.read_only_because
        return record


# The notices said in a said_once() block (None outside one).
_SAID: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("said", default=None)


@contextlib.contextmanager
def said_once() -> Iterator[None]:
    """While the block runs, :meth:`Cache.announce` says each of its notices the first time
    only: a sweep trains its runs one after another with the same cache, whose warning (off,
    read-only) was repeated before every run."""
    token = _SAID.set(set())
    try:
        yield
    finally:
        _SAID.reset(token)


def choose(setting: str, environ: Any = os.environ, recorded: bool = False) -> Cache:
    """The cache of a run whose ``config.compilation_cache_dir`` is ``setting``
    (:func:`cache_dir_for`). A path the user gave that cannot be created or entered raises
    ``errors.ConfigError`` naming the field, before anything trains; under ``'auto'`` (a
    place the user did not choose: a read-only or missing home) the cache is off instead.
    ``recorded``: ``setting`` is a trained run's, read from its ``run.json``
    (:func:`for_recorded_run`). Call once the job's processes have joined."""
    path = cache_dir_for(setting, environ)
    if setting != "auto":
        field = f"compilation_cache_dir={setting!r}"
    elif environ.get("JAX_COMPILATION_CACHE_DIR"):
        field = "JAX_COMPILATION_CACHE_DIR (which compilation_cache_dir='auto' uses)"
    else:
        field = "the default directory (compilation_cache_dir='auto')"
    where = "JAX_COMPILATION_CACHE_DIR or " * ("JAX_COMPILATION_CACHE_DIR" in field)
    fix = (f"set {where}--config.compilation_cache_dir to a directory this user can write "
           "to keep compiled programs, or --config.compilation_cache_dir='' to turn the "
           "cache off")
    default = setting == "auto" and not where
    if recorded:  # no --config here: the record is the run's
        field += " (the run's setting)" * (setting != "auto")
        fix = ("make it a directory this user can write" if setting != "auto" else
               "set JAX_COMPILATION_CACHE_DIR to a directory this user can write"
               ) + " to keep compiled programs"
    return _settle(path, field, fix, given=setting != "auto" and not recorded,
                   default=default)


def for_recorded_run(setting: str | None, environ: Any = os.environ) -> Cache:
    """The cache of a trained run whose ``run.json`` records ``compilation_cache_dir`` as
    ``setting``, for a script that works on the run (``evaluate.py``): the programs the run
    and earlier evaluations compiled load from the cache the run used, instead of compiling
    again on every call. As :func:`choose`, except that a recorded path that cannot be
    created or entered (now) is off with one warning, not an error: the record is not the
    user's to change there. ``None`` (no ``run.json`` to read it from, which the evaluation
    then reports) or a relative path (relative to where the run started, which the record
    does not say: from elsewhere it would make a stray empty directory): JAX's own setting
    (:func:`from_jax_setting`). Call once the job's processes have joined."""
    if setting is None or (setting not in ("", "auto") and not _remote(setting)
                           and not os.path.isabs(os.path.expanduser(setting))):
        return from_jax_setting()
    return choose(setting, environ, recorded=True)


def from_jax_setting() -> Cache:
    """The cache JAX's own setting (``JAX_COMPILATION_CACHE_DIR``, or
    ``jax.config.update('jax_compilation_cache_dir', ...)``) chose for a script that has no
    field of its own (a benchmark): off where it cannot be created or entered, or for a
    job that must not use it; read-only where it cannot be written. Call once the job's
    processes have joined."""
    path = jax.config.jax_compilation_cache_dir or ""
    return _settle(path, "JAX_COMPILATION_CACHE_DIR (jax_compilation_cache_dir)",
                   "set JAX_COMPILATION_CACHE_DIR to a directory this user can write to keep "
                   "compiled programs, or unset it to turn the cache off", given=False)


def _remote(path: str) -> bool:
    """Whether ``path`` is a URL (``gs://bucket/dir``), which JAX opens itself."""
    return "://" in path


def _settle(path: str, field: str, fix: str, given: bool, default: bool = False) -> Cache:
    """:class:`Cache` at ``path`` ('' = none), named ``field`` in what it says. A remote
    one (``gs://``) is JAX's to open: the checks below would make local directories."""
    if not path:
        return Cache()
    hazard = cache_hazard(jax.default_backend(), jax.process_count())
    if hazard:
        return Cache("", off_because=hazard,
                     _notices=[(f"Persistent compilation cache off: {hazard}.", False)])
    if _remote(path):
        return Cache(path)
    new = not os.path.isdir(path)
    problem = _unusable(path)
    if problem:
        if given:
            raise errors.ConfigError(
                f"{field}: {problem}; give a directory this user can write, or "
                "--config.compilation_cache_dir='' to turn the cache off.")
        why = f"{field}: {problem}"
        return Cache("", off_because=why,
                     _notices=[(f"Persistent compilation cache off: {why}; {fix}.", True)])
    cache = Cache(path)
    cache.read_only_because = _not_writable(path)
    if cache.read_only_because:
        cache._notices.append((
            f"Persistent compilation cache read-only: {cache.read_only_because}; programs "
            f"found there are loaded, the others compiled and not kept; {fix}.", True))
    if new and default and jax.process_index() == 0:  # sizes: read once, said once
        cache._notices += [(text, False) for text in [_other_versions(path)] if text]
    return cache


def _unusable(path: str) -> str | None:
    """Why no program can be loaded from or stored in ``path``, after creating it where it
    is missing: ``'cannot create <path> (<reason>)'``, ``'cannot enter <path> (...)'``; None
    where it can be used, at least read-only.

    Without this, ``os.makedirs`` failed in :func:`use_cache_dir` and the run stopped with
    the workdir's advice ("use another --workdir"); a directory this user may list but not
    enter (mode 600) was called read-only, "programs found there are loaded", while JAX
    warned, with its source line, for every program it then could not look up."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        return f"cannot create {path} ({e.strerror or e})"
    if not os.access(path, os.X_OK):
        return (f"cannot enter {path} (no search permission: mode "
                f"{os.stat(path).st_mode & 0o777:o}), so nothing can be loaded from it or "
                "stored in it")
    return None


def _not_writable(path: str) -> str | None:
    """``'cannot write to <path> (Permission denied)'`` where no file can be created in the
    directory ``path``, else None. The permission bits do not tell (ACLs, read-only mounts,
    root), so a file is created (and removed)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return f"cannot write to {path} ({e.strerror or e})"
    return None


# The name host_tag() gives a default cache directory.
_HOST_TAG = re.compile(r"jaxlib(?P<version>[^-]+)-[^-]+-[0-9a-f]{12}")


def _other_versions(path: str) -> str | None:
    """One line naming the default cache directories of other jaxlib versions beside the
    new one at ``path`` (an upgrade leaves the old one behind, which no run of this jaxlib
    reads again) with their sizes; None where there are none. They are named, not deleted:
    another environment on this machine, or another machine sharing this home, may still
    use them."""
    parent, ours = os.path.split(os.path.normpath(path))
    version = _HOST_TAG.fullmatch(ours)
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return None
    others = [n for n in names if (m := _HOST_TAG.fullmatch(n)) and version
              and m["version"] != version["version"] and os.path.isdir(os.path.join(parent, n))]
    if not others:
        return None
    sizes = {n: _size(os.path.join(parent, n)) for n in others}
    listed = ", ".join(f"{n} ({_megabytes(sizes[n])})" for n in others)
    many = len(others) > 1
    whose = (f"{len(others)} other jaxlib versions' directories in {parent} hold" if many
             else f"another jaxlib version's directory in {parent} holds")
    them = "them" if many else "it"
    return (f"Persistent compilation cache: new directory {path} for this jaxlib; {whose} "
            f"{_megabytes(sum(sizes.values()))} that this jaxlib does not read: {listed}. "
            f"Delete {them} if no other environment, or machine sharing this home, still "
            f"uses {them}.")


def _size(path: str) -> int:
    """Bytes in the files under ``path`` (those that can be read)."""
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


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
    """Points JAX's persistent compilation cache at ``path`` ('' turns it off); JAX creates
    the directory when it first compiles. Nothing is created here: restoring a session's own
    setting that cannot be created (:func:`from_jax_setting` turned it off) failed after the
    work was done, with the workdir's advice. Its entries are written whole and a damaged
    one is replaced (:func:`_keep_entries_whole`)."""
    _keep_entries_whole()
    current = jax.config.jax_compilation_cache_dir or ""
    if path == current:
        return
    compilation_cache.set_cache_dir(path or None)
    # JAX opens the cache once per process; re-open it at the new place on the next compile.
    compilation_cache.reset_cache()


def _keep_entries_whole() -> None:
    """Makes JAX open a local cache directory as :func:`_whole_entries_class`'s from now on (once
    per process; JAX opens its cache on the next compile after :func:`use_cache_dir`).

    JAX writes an entry in place: a process killed while writing it, or a disk filling up,
    left it cut short under its final name, which JAX never writes again (it skips a key
    that has an entry). Every later run then warned "Error reading persistent compilation
    cache entry ... incomplete or truncated stream" and compiled the program again, for
    good. Where this JAX's cache is not as expected (its internals change between
    versions), it is left as it is."""
    try:
        from jax._src import compilation_cache as jax_cache
        from jax._src import lru_cache
    except ImportError:
        return
    opener = getattr(jax_cache, "get_file_cache", None)
    needed = (getattr(jax_cache, "decompress_executable", None),
              getattr(jax_cache, "compress_executable", None),
              getattr(jax_cache, "CacheInterface", None), getattr(lru_cache, "LRUCache", None))
    if opener is None or getattr(opener, "_keeps_entries_whole", False) or None in needed:
        return

    def get_file_cache(path, *args, **kwargs):
        opened = opener(path, *args, **kwargs)
        if (opened is None or type(opened[0]) is not lru_cache.LRUCache or _remote(str(path))
                or getattr(opened[0], "eviction_enabled", True)):
            return opened  # JAX's checks (check_contents), its size limit, a URL: as is
        return _whole_entries_class(jax_cache)(opened[0], str(path)), opened[1]

    get_file_cache._keeps_entries_whole = True
    jax_cache.get_file_cache = get_file_cache


@functools.cache
def _whole_entries_class(jax_cache):
    """The cache of :func:`_keep_entries_whole`, defined on first use as a subclass of this
    JAX's cache interface (JAX may check that its cache is one)."""

    class WholeEntries(jax_cache.CacheInterface):
        """JAX's file cache in a local directory, except that an entry is written whole
        (beside its name, then renamed onto it: :func:`files.atomic_write`) and one that
        does not decompress (cut short by an earlier JAX's writer) is removed when read, so
        its program is compiled and stored whole again, said in one warning."""

        def __init__(self, base, path: str):
            self._base, self._directory = base, path
            self._header = jax_cache.compress_executable(b"")[:1]
            files.remove_abandoned_temporaries(path, lambda name: name.endswith(_ENTRY))

        @property
        def _path(self):
            return self._base._path

        @_path.setter
        def _path(self, value):
            self._base._path = value

        def get(self, key: str):
            value = self._base.get(key)
            if value is None:
                return None
            try:
                jax_cache.decompress_executable(value)
            except MemoryError:
                raise  # the entry may be whole: JAX warns and compiles
            except Exception as error:  # noqa: BLE001  zlib's and zstd's errors differ
                if not _compressed_as(value, self._header):
                    return value  # another JAX's compression: as JAX does (it warns)
                entry = os.path.join(self._directory, key + _ENTRY)
                if _remove_if_size(entry, len(value)):
                    warnings.warn(f"Persistent compilation cache: removed the damaged entry "
                                  f"{entry} ({type(error).__name__}: {error}; a process "
                                  "stopped while writing it, or a full disk); its program is "
                                  "compiled and stored again.", logs.RunWarning)
                return None
            return value

        def put(self, key: str, value: bytes) -> None:
            entry = os.path.join(self._directory, key + _ENTRY)
            if os.path.exists(entry):  # as JAX: the first writer's entry stays
                return
            with files.atomic_write(entry, "wb") as f:
                f.write(value)

    return WholeEntries


# The suffix of JAX's cache entries' file names (jax._src.lru_cache).
_ENTRY = "-cache"


def _compressed_as(value: bytes, header: bytes) -> bool:
    """Whether the entry ``value`` starts as this JAX's compression starts (``header``: zlib's
    0x78 or zstd's 0x28), or is too short to tell. JAX's cache key names zlib where Python
    3.14's zstd compresses, so a JAX on another Python sharing the directory finds entries
    under its keys that it cannot decompress: whole ones, not to be removed."""
    return value[:len(header)] == header[:len(value)]


def _remove_if_size(entry: str, size: int) -> bool:
    """Removes ``entry`` if it still holds ``size`` bytes, the damaged content read (not a
    whole entry renamed onto it meanwhile, nor one an in-place writer went on writing);
    whether it was removed."""
    with contextlib.suppress(OSError):
        if os.stat(entry).st_size == size:
            os.remove(entry)
            return True
    return False


@contextlib.contextmanager
def cache_dir_in_use(path: str, read_only: bool = False) -> Iterator[None]:
    """Points JAX's persistent compilation cache at ``path`` ('' = off) while the block runs,
    then back where it was: a run called from Python (a notebook, a sweep in one process)
    leaves the session's ``jax_compilation_cache_dir`` as it found it. ``read_only``
    (:class:`Cache` says why, once): JAX's warning for each program it cannot store there
    is dropped while the block runs."""
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
      this_thread: count only what the thread that entered the block compiles (JAX reports
        each compile in the thread doing it): the seconds that thread was stalled, without
        another thread's compiles meanwhile (an asynchronous checkpoint's, a user's).
    """

    programs: int = 0
    compile_s: float = 0.0
    cache_hits: int = 0
    trace_and_lower_s: float = 0.0
    this_thread: bool = dataclasses.field(default=False, kw_only=True)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._thread: int | None = None

    def _counts(self) -> bool:
        return not self.this_thread or threading.get_ident() == self._thread

    def _on_duration(self, event: str, seconds: float, **_: Any) -> None:
        if not self._counts():
            return
        with self._lock:
            if event == _COMPILE:
                self.programs += 1
                self.compile_s += seconds
            elif event in (_TRACE, _LOWER):
                self.trace_and_lower_s += seconds

    def _on_event(self, event: str, **_: Any) -> None:
        if event == _CACHE_HIT and self._counts():
            with self._lock:
                self.cache_hits += 1

    def __enter__(self) -> "CompileStats":
        self._thread = threading.get_ident()
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
