"""The persistent compilation cache setting and the per-run compilation count."""
import os
import re
import shutil
import sys
import warnings

import jax
import jaxlib
import jax.numpy as jnp
import pytest

from configs import load_config
from stochastic_depth_jax import errors, logs
from stochastic_depth_jax.training import compilation, loop
from processes import finish_all, free_address, start_all
import warned

WORKER = os.path.join(os.path.dirname(__file__), "workers", "cached_collective.py")


def test_cache_dir_setting():
    env = {"XDG_CACHE_HOME": "/x/cache"}
    assert compilation.cache_dir_for("", env) == ""
    assert compilation.cache_dir_for("auto", env) == os.path.join(
        "/x/cache/stochastic_depth_jax/jax", compilation.host_tag())
    assert compilation.cache_dir_for("auto", {**env, "JAX_COMPILATION_CACHE_DIR": "/y"}) == "/y"
    assert compilation.cache_dir_for("rel/dir", env) == os.path.abspath("rel/dir")


def test_a_remote_cache_is_left_to_jax(tmp_path, monkeypatch):
    """JAX's cache takes gs://bucket/dir (with etils[epath]; TPU pods share one so): the
    field made it ./gs:/bucket/dir, a local directory created in the current one; JAX's own
    setting (evaluate.py) is not checked as a local directory either."""
    monkeypatch.chdir(tmp_path)
    env = {"XDG_CACHE_HOME": "/x/cache"}
    assert compilation.cache_dir_for("gs://bucket/jax", env) == "gs://bucket/jax"
    assert compilation.cache_dir_for("auto", {**env, "JAX_COMPILATION_CACHE_DIR":
                                              "gs://b/c"}) == "gs://b/c"
    cache = compilation.choose("gs://bucket/jax", env)
    assert (cache.path, cache.off_because, cache.read_only_because) == (
        "gs://bucket/jax", None, None)
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", "gs://bucket/jax")
    try:
        assert compilation.from_jax_setting().path == "gs://bucket/jax"
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    assert os.listdir(tmp_path) == []  # nothing made locally


def test_the_default_cache_is_per_jaxlib_and_cpu_kind(tmp_path):
    """Machines sharing a home directory (NFS) get one cache per CPU kind: XLA:CPU refuses a
    program compiled for other CPU features (error lines, then a compile), or worse."""
    def tag(flags, mhz="2000.0", model="AMD EPYC"):
        path = tmp_path / f"cpuinfo{len(os.listdir(tmp_path))}"
        cores = "".join(f"processor\t: {i}\nmodel name\t: {model}\ncpu MHz\t\t: {mhz}\n"
                        f"flags\t\t: {flags}\n\n" for i in range(2))
        path.write_text(cores)
        return compilation.host_tag(str(path))

    base = tag("fpu sse avx2")
    assert base.startswith(f"jaxlib{jaxlib.__version__}-")
    assert tag("avx2 sse fpu", mhz="3400.1") == base  # the clock and flag order don't count
    assert tag("fpu sse avx2 avx512f") != base  # another CPU's features do
    assert tag("fpu sse avx2", model="Intel Xeon") != base
    assert tag("") != base and compilation.host_tag(str(tmp_path / "missing"))  # no cpuinfo


def test_second_compile_of_a_program_loads_it_from_the_cache(tmp_path):
    before = jax.config.jax_compilation_cache_dir or ""
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        compilation.use_cache_dir(str(tmp_path / "cache"))
        x = jnp.arange(7.0)
        f = lambda v: jnp.sin(v) * 3.25 + 0.5  # noqa: E731  (a program no other test compiles)
        with compilation.CompileStats() as first:
            jax.jit(f)(x).block_until_ready()
        jax.clear_caches()  # forget the in-memory executable; the disk cache remains
        with compilation.CompileStats() as second:
            jax.jit(f)(x).block_until_ready()
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
        compilation.use_cache_dir(before)
    assert first.programs >= 1 and first.cache_hits == 0 and first.compile_s > 0
    assert second.programs == first.programs and second.cache_hits >= 1
    assert os.listdir(tmp_path / "cache")



def _compile_twice_with_entries_cut_short(cache, f, x):
    """Compiles ``f`` with the cache at ``cache`` (every program stored), cuts its entries
    short as a writer stopped midway leaves them, then compiles it twice more (the
    in-memory executables forgotten each time). Returns the three CompileStats and the
    warnings of the second compile."""
    before = jax.config.jax_compilation_cache_dir or ""
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    stats = []
    try:
        compilation.use_cache_dir(str(cache))
        for attempt in range(3):
            if attempt == 1:
                for entry in cache.iterdir():
                    entry.write_bytes(entry.read_bytes()[:100])
            jax.clear_caches()
            with warnings.catch_warnings(record=True) as caught, \
                    compilation.CompileStats() as compiled:
                warnings.simplefilter("always")
                jax.jit(f)(x).block_until_ready()
            stats.append(compiled)
            if attempt == 1:
                second = [str(w.message) for w in caught]
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
        compilation.use_cache_dir(before)
    return stats, second


def test_a_cache_entry_cut_short_is_replaced_with_one_warning(tmp_path):
    """JAX writes an entry in place and never again once it exists: one a killed process
    or a full disk cut short made every later run warn ("Error reading persistent
    compilation cache entry ... incomplete or truncated stream") and compile again."""
    cache = tmp_path / "cache"
    f = lambda v: jnp.cos(v) * 1.75 - 0.25  # noqa: E731  (a program no other test compiles)
    (first, second, third), warned_ = _compile_twice_with_entries_cut_short(
        cache, f, jnp.arange(5.0))
    assert first.cache_hits == 0 and second.cache_hits == 0
    assert warned_ and all(w.startswith("Persistent compilation cache: removed the damaged "
                                        f"entry {cache}{os.sep}") for w in warned_)
    assert not any("Error reading" in w for w in warned_)
    assert third.cache_hits == third.programs >= 1  # stored whole again, and loaded
    assert not [e for e in os.listdir(cache) if not e.endswith("-cache")]  # no temporaries


def test_a_cache_entry_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails midway (a full disk) leaves no entry under the program's key."""
    import builtins

    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            self._f.write(bytes(data)[:10])
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

    def full_disk(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        return FullDisk(opened) if str(file).startswith(str(tmp_path)) and "w" in mode \
            else opened

    before = jax.config.jax_compilation_cache_dir or ""
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    monkeypatch.setattr(builtins, "open", full_disk)
    try:
        compilation.use_cache_dir(str(tmp_path / "cache"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = jax.jit(lambda v: jnp.tan(v) * 0.625)(jnp.arange(3.0))  # noqa: E731
    finally:
        monkeypatch.undo()
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
        compilation.use_cache_dir(before)
    assert y.shape == (3,)  # the run went on
    assert any("Error writing persistent compilation cache entry" in str(w.message)
               for w in caught)
    assert os.listdir(tmp_path / "cache") == []



def _whole_entries(directory):
    """The cache the trainer's cache setting makes JAX open in ``directory``."""
    from jax._src import compilation_cache as jax_cache
    from jax._src import lru_cache

    return compilation._whole_entries_class(jax_cache)(
        lru_cache.LRUCache(str(directory), max_size=-1), str(directory)), jax_cache


def test_an_entry_in_another_jaxs_compression_is_left_as_jax_leaves_it(tmp_path):
    """JAX's cache key names zlib where Python 3.14's zstd compresses: a JAX on another
    Python, sharing the directory, finds whole entries it cannot decompress under its keys.
    They were removed as damaged, each environment removing the other's."""
    cache, jax_cache = _whole_entries(tmp_path)
    ours = jax_cache.compress_executable(b"\0\0\0\1program")
    theirs = (b"\x28\xb5\x2f\xfd" if ours[:1] == b"\x78" else b"\x78\x9c") + b"program"
    (tmp_path / "k-cache").write_bytes(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.get("k") == theirs  # JAX then warns and compiles, as without the cache
    assert (tmp_path / "k-cache").read_bytes() == theirs


def test_a_damaged_entry_replaced_while_read_is_kept(tmp_path, monkeypatch):
    """Only the damaged content that was read is removed, not a whole entry renamed onto it
    (or finished by an in-place writer) meanwhile."""
    cache, jax_cache = _whole_entries(tmp_path)
    whole = jax_cache.compress_executable(b"\0\0\0\1" + os.urandom(4096))
    (tmp_path / "k-cache").write_bytes(whole)
    monkeypatch.setattr(cache._base, "get", lambda key: whole[:100])  # read cut short
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.get("k") is None  # compiled, not loaded
    assert (tmp_path / "k-cache").read_bytes() == whole


def test_an_entry_that_cannot_be_decompressed_for_want_of_memory_is_kept(tmp_path,
                                                                          monkeypatch):
    """Running out of memory says nothing about the entry."""
    cache, jax_cache = _whole_entries(tmp_path)
    whole = jax_cache.compress_executable(b"\0\0\0\1program")
    (tmp_path / "k-cache").write_bytes(whole)

    def no_memory(value):
        raise MemoryError()

    monkeypatch.setattr(jax_cache, "decompress_executable", no_memory)
    with pytest.raises(MemoryError):  # JAX warns and compiles
        cache.get("k")
    assert (tmp_path / "k-cache").read_bytes() == whole


def test_a_truncated_entry_read_alone_is_removed(tmp_path):
    cache, jax_cache = _whole_entries(tmp_path)
    whole = jax_cache.compress_executable(b"\0\0\0\1" + os.urandom(4096))
    for cut in (0, 1, 100):
        (tmp_path / "k-cache").write_bytes(whole[:cut])
        with pytest.warns(logs.RunWarning, match="removed the damaged entry"):
            assert cache.get("k") is None
        assert not (tmp_path / "k-cache").exists()


def test_a_jax_whose_cache_internals_differ_keeps_its_own_cache(monkeypatch):
    """JAX's internals change between versions: without what the whole-entry writes need,
    JAX's cache is left as it is, and nothing fails."""
    from jax._src import compilation_cache as jax_cache

    def own(path):
        return None

    monkeypatch.setattr(jax_cache, "get_file_cache", own)
    monkeypatch.delattr(jax_cache, "decompress_executable")
    compilation.use_cache_dir(jax.config.jax_compilation_cache_dir or "")
    assert jax_cache.get_file_cache is own


def test_listeners_are_removed_on_exit():
    with compilation.CompileStats() as stats:
        pass
    jax.jit(lambda v: v * 5.5 - 1)(jnp.ones(3)).block_until_ready()
    assert stats.programs == 0


def test_cache_hazard_rule():
    hazard = compilation.cache_hazard
    assert hazard("cpu", 2, "0.12.1") and "jaxlib 0.12.1" in hazard("cpu", 2, "0.12.1")
    assert hazard("cpu", 8, "0.12.2") and hazard("cpu", 2, "0.13.0.dev20270101")
    # Release candidates and local builds rank with their release, not below it.
    for affected in ("0.12.1rc0", "0.12.2rc1", "0.12.1+cuda", "0.12.1.dev20261201+abc1234"):
        assert hazard("cpu", 2, affected), affected
    assert hazard("cpu", 2, "0.12.0rc1") is None
    for ok in ("0.12.0.1", "0.12.0", "0.11.2", "0.10.2", "0.7.0"):
        assert hazard("cpu", 2, ok) is None, ok
    assert hazard("cpu", 1, "0.12.1") is None  # one process: no cross-process all-reduce
    assert hazard("gpu", 2, "0.12.1") is None and hazard("tpu", 4, "0.12.1") is None


def _two_process_sum(cache: str, timeout: float, may_hang: bool = False,
                     worker: tuple[str, ...] = (WORKER,)) -> list[str] | None:
    """Each process's ``sum .. hits ..`` line; with ``may_hang``, None where the job was
    still running after ``timeout`` seconds (then killed) with every process past its
    ``ready`` line: hung in the program it compiled or loaded. Any other failure, a hang
    before that too (a process that never joined the job), fails the test with the output."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")  # the rule checked is the CPU's
    address = free_address()
    procs = start_all([[sys.executable, *worker, str(i), address, cache] for i in range(2)],
                      env=env)
    try:
        results = finish_all(procs, timeout=timeout)
    except AssertionError as e:
        if may_hang and "still running" in str(e) and str(e).count("ready hits") == 2:
            return None
        raise
    lines = []
    for status, text, _ in results:
        assert status == 0, text[-3000:]
        lines += re.findall(r"^sum .*$", text, re.M)
    return lines


def test_only_a_hang_in_the_program_counts_as_the_jaxlibs(tmp_path):
    """A job that hangs before its program runs (here one process fails before joining and
    the other waits for it) fails the check instead of passing for the jaxlib's hang."""
    stuck = ("import sys, time; print('joining', flush=True); "
             "sys.exit(3) if sys.argv[1] == '1' else time.sleep(60)")
    try:
        result = _two_process_sum(str(tmp_path), timeout=5, may_hang=True, worker=("-c", stuck))
    except AssertionError as e:
        assert "still running" in str(e) and "joining" in str(e), e
    else:
        raise AssertionError(f"taken for a hang in the program: {result}")


def test_cache_hazard_matches_this_jaxlib(tmp_path):
    """The installed jaxlib either runs a two-process CPU job's all-reduce loaded from the
    persistent cache, and cache_hazard lets such jobs use the cache, or hangs there, and
    cache_hazard keeps the cache off for them. Fails when a jaxlib release fixes (or brings)
    the hang and the rule does not follow."""
    cache = str(tmp_path / "cache")
    first = _two_process_sum(cache, timeout=300)
    assert first == ["sum 12 hits 0"] * 2, first  # compiled; process 0 writes the cache
    assert os.listdir(cache)
    second = _two_process_sum(cache, timeout=120, may_hang=True)
    hazard = compilation.cache_hazard("cpu", 2)
    if second is None:
        assert hazard, (f"jaxlib {jaxlib.__version__} hangs a two-process CPU job on a program "
                        "loaded from the cache, but cache_hazard lets such jobs use it")
    else:
        # Process 0 loads what it wrote (process 1 may compile: its cache key can differ).
        assert re.fullmatch(r"sum 12 hits [1-9]\d*", second[0]), second
        assert len(second) == 2 and second[1].startswith("sum 12 hits"), second
        assert hazard is None, (f"jaxlib {jaxlib.__version__} runs a two-process CPU job on a "
                                "program loaded from the cache: narrow _CPU_JOB_CACHE_HANGS_FROM")


def test_a_cache_hazard_keeps_the_run_off_the_cache_and_says_why(tmp_path, monkeypatch, capsys):
    asked = []
    monkeypatch.setattr(compilation, "cache_hazard",
                        lambda platform, processes: asked.append((platform, processes))
                        or "a known hang")
    cache, before = tmp_path / "cache", jax.config.jax_compilation_cache_dir
    config = load_config("cifar10:smoke", [
        "--config.progress_bar=false", "--config.write_tensorboard=false",
        "--config.write_plots=false", "--config.num_epochs=1", "--config.max_steps=1",
        f"--config.compilation_cache_dir={cache}"])
    summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert asked == [(jax.default_backend(), 1)]
    assert summary["compilation"]["cache_dir"] is None and not cache.exists()
    assert summary["compilation"]["cache_off_because"] == "a known hang"
    assert summary["compilation"]["cache_hits"] == 0 and summary["compilation"]["programs"]
    out = capsys.readouterr().out
    assert "Persistent compilation cache off: a known hang.\n" in out
    assert "loaded from the persistent cache, which is off)" in out
    assert jax.config.jax_compilation_cache_dir == before  # the session's setting, restored


def _one_step(tmp_path, cache_dir):
    return load_config("cifar10:smoke", [
        "--config.progress_bar=false", "--config.write_tensorboard=false",
        "--config.write_plots=false", "--config.num_epochs=1", "--config.max_steps=1",
        f"--config.compilation_cache_dir={cache_dir}"])


def test_an_unwritable_default_cache_trains_without_it(tmp_path, monkeypatch):
    """'auto' under a home that cannot hold it (read-only, missing, a file in the way) stopped
    the run, the default config included, with the workdir's advice ("use another
    --workdir"); the cache is an optimisation the user did not ask for: one warning, and
    the run trains without it."""
    (tmp_path / "file").write_text("")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    before = jax.config.jax_compilation_cache_dir
    with pytest.warns(logs.RunWarning, match=r"Persistent compilation cache off: the default "
                      r"directory \(compilation_cache_dir='auto'\): cannot create .*file.* "
                      r"\(Not a directory\); set --config.compilation_cache_dir"):
        summary = loop.train_and_evaluate(_one_step(tmp_path, "auto"), str(tmp_path / "run"))
    assert summary["compilation"]["cache_dir"] is None and summary["compilation"]["programs"]
    assert "cannot create" in summary["compilation"]["cache_off_because"]
    assert jax.config.jax_compilation_cache_dir == before


def test_an_unwritable_cache_path_is_one_error_naming_the_field(tmp_path):
    """A path the user gave that cannot be created: the field and its fix, not "use another
    --workdir"; nothing is left in the workdir."""
    (tmp_path / "file").write_text("")
    cache, workdir = tmp_path / "file" / "cache", tmp_path / "run"
    with pytest.raises(errors.ConfigError, match=re.escape(
            f"compilation_cache_dir='{cache}': cannot create {cache} (Not a directory); give "
            "a directory this user can write, or --config.compilation_cache_dir='' to turn "
            "the cache off.")):
        loop.train_and_evaluate(_one_step(tmp_path, cache), str(workdir))
    assert not workdir.exists()


def _unwritable_dir(tmp_path):
    """An existing directory in which this process cannot create a file: one without write
    permission, or, where permissions do not stop this user (root), Linux's
    /proc/self/fdinfo."""
    path = tmp_path / "shared_cache"
    path.mkdir()
    path.chmod(0o500)
    try:
        (path / "probe").write_text("")
    except OSError:
        return str(path)
    (path / "probe").unlink()
    return "/proc/self/fdinfo"


def test_a_read_only_cache_is_used_and_said_once(tmp_path, capsys):
    """A cache directory that exists but cannot be written (another user's, a read-only
    mount) passed the check: JAX warned, with its source line, for every program it could
    not store, and the run's last line said its programs were cached there. Now one warning
    says the cache is read-only; it still serves what it holds."""
    cache = _unwritable_dir(tmp_path)
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # every program
    try:
        with pytest.warns(Warning) as caught:
            summary = loop.train_and_evaluate(_one_step(tmp_path, cache), str(tmp_path / "run"))
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
    texts = warned.messages(caught, Warning)
    assert not [m for m in texts if m.startswith("Error writing persistent compilation cache")]
    assert [m for m in texts if "compilation cache" in m] == [
        f"Persistent compilation cache read-only: cannot write to {cache} "
        f"({summary['compilation']['cache_read_only_because'].split(' (', 1)[1]}; programs "
        "found there are loaded, the others compiled and not kept; set "
        "--config.compilation_cache_dir to a directory this user can write to keep compiled "
        "programs, or --config.compilation_cache_dir='' to turn the cache off."]
    assert summary["compilation"]["cache_dir"] == cache and summary["compilation"]["programs"]
    assert f"loaded from the read-only persistent cache at {cache});" in capsys.readouterr().out

    # Started again, the run has nothing to train: it warned that the cache was read-only
    # (programs "compiled and not kept") before saying so, and compiles nothing to keep.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = loop.train_and_evaluate(_one_step(tmp_path, cache), str(tmp_path / "run"))
    assert again == summary and "Nothing to train" in capsys.readouterr().out
    assert not [w for w in caught if "compilation cache" in str(w.message)]


def test_a_jax_cache_setting_that_cannot_be_created_is_left_as_found(tmp_path, monkeypatch):
    """JAX_COMPILATION_CACHE_DIR (which 'auto' uses) under a file: the run trained without the
    cache, then failed restoring the session's setting, which tried to create it: "use
    another --workdir", and no summary.json. Now the run finishes, its summary says why the
    cache was off, and the session's setting is as it was."""
    from jax.experimental.compilation_cache import compilation_cache

    (tmp_path / "file").write_text("")
    bad, before = str(tmp_path / "file" / "cache"), jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", bad)
    jax.config.update("jax_compilation_cache_dir", bad)  # as JAX reads the variable
    try:
        with pytest.warns(logs.RunWarning) as caught:
            summary = loop.train_and_evaluate(_one_step(tmp_path, "auto"),
                                              str(tmp_path / "run"))
        assert jax.config.jax_compilation_cache_dir == bad
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()
    assert summary["compilation"]["cache_dir"] is None
    assert summary["compilation"]["cache_off_because"] == (
        "JAX_COMPILATION_CACHE_DIR (which compilation_cache_dir='auto' uses): cannot create "
        f"{bad} (Not a directory)")
    assert [m for m in warned.messages(caught, logs.RunWarning) if "compilation" in m] == [
        f"Persistent compilation cache off: {summary['compilation']['cache_off_because']}; "
        "set JAX_COMPILATION_CACHE_DIR or --config.compilation_cache_dir to a directory this "
        "user can write to keep compiled programs, or --config.compilation_cache_dir='' to "
        "turn the cache off."]
    assert (tmp_path / "run" / "summary.json").is_file()


def _unenterable(monkeypatch, path):
    """``path``, made a directory this user may list but not enter (mode 600), as the
    cache's check sees it: permissions do not stop root, so os.access says so."""
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o600)
    real_access = os.access

    def access(p, mode, *args, **kwargs):
        if os.path.abspath(p) == os.path.abspath(path) and mode & os.X_OK:
            return False
        return real_access(p, mode, *args, **kwargs)

    monkeypatch.setattr(compilation.os, "access", access)
    return str(path)


def test_a_cache_directory_that_cannot_be_entered_is_not_called_read_only(tmp_path,
                                                                          monkeypatch):
    """Mode 600 (listable, not searchable): the write check failed and the warning said
    "read-only ... programs found there are loaded", but nothing there can be loaded, and
    JAX warned for every program it then could not look up. A path the user gave is one
    error naming the field, before anything trains; under 'auto' the cache is off."""
    given = _unenterable(monkeypatch, tmp_path / "given")
    with pytest.raises(errors.ConfigError, match=re.escape(
            f"compilation_cache_dir='{given}': cannot enter {given} (no search permission: "
            "mode 600), so nothing can be loaded from it or stored in it; give a directory "
            "this user can write, or --config.compilation_cache_dir='' to turn the cache "
            "off.")):
        loop.train_and_evaluate(_one_step(tmp_path, given), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()

    auto = _unenterable(monkeypatch, tmp_path / "xdg" / "stochastic_depth_jax" / "jax"
                        / compilation.host_tag())
    cache = compilation.choose("auto", {"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert cache.path == "" and cache.read_only_because is None
    assert cache.off_because.startswith(
        f"the default directory (compilation_cache_dir='auto'): cannot enter {auto} ")
    with pytest.warns(logs.RunWarning) as caught:
        cache.announce()
        cache.announce()  # said once
    assert warned.messages(caught, logs.RunWarning) == [
        f"Persistent compilation cache off: {cache.off_because}; set "
        "--config.compilation_cache_dir to a directory this user can write to keep compiled "
        "programs, or --config.compilation_cache_dir='' to turn the cache off."]


def test_a_new_default_directory_names_other_jaxlib_versions_once(tmp_path, capsys):
    """An upgraded jaxlib gets a new default directory; the old version's (hundreds of MB
    after a while) was never read again nor named anywhere. The first run of the new one
    names them with their sizes, once; nothing is deleted (another environment, or a
    machine sharing this home, may still use them), and another CPU's directory of this
    jaxlib is not named."""
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    parent = tmp_path / "stochastic_depth_jax" / "jax"
    ours = compilation.host_tag()
    old = parent / "jaxlib0.0.1-x86_64-0123456789ab"
    (old / "sub").mkdir(parents=True)
    (old / "a-cache").write_bytes(b"x" * 1_500_000)
    (old / "sub" / "b").write_bytes(b"x" * 500_000)
    (parent / "jaxlib0.0.2-aarch64-abcdef012345").mkdir()
    sibling = ours[:-12] + ("0" * 12 if not ours.endswith("0" * 12) else "1" * 12)
    (parent / sibling).mkdir()  # this jaxlib on another kind of CPU
    (parent / "notes").mkdir()  # not ours
    compilation.choose("auto", env).announce()
    assert capsys.readouterr().out == (
        f"Persistent compilation cache: new directory {parent / ours} for this jaxlib; 2 "
        f"other jaxlib versions' directories in {parent} hold 2.0 MB that this jaxlib does "
        "not read: jaxlib0.0.1-x86_64-0123456789ab (2.0 MB), jaxlib0.0.2-aarch64-"
        "abcdef012345 (0.0 MB). Delete them if no other environment, or machine sharing "
        "this home, still uses them.\n")
    assert old.is_dir() and (parent / sibling).is_dir()
    compilation.choose("auto", env).announce()  # the directory exists now: not again
    assert capsys.readouterr().out == ""

    shutil.rmtree(parent / ours)
    shutil.rmtree(parent / "jaxlib0.0.2-aarch64-abcdef012345")
    compilation.choose("auto", env).announce()
    assert capsys.readouterr().out == (
        f"Persistent compilation cache: new directory {parent / ours} for this jaxlib; "
        f"another jaxlib version's directory in {parent} holds 2.0 MB that this jaxlib does "
        "not read: jaxlib0.0.1-x86_64-0123456789ab (2.0 MB). Delete it if no other "
        "environment, or machine sharing this home, still uses it.\n")
