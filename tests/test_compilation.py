"""The persistent compilation cache setting and the per-run compilation count."""
import os

import jax
import jaxlib
import jax.numpy as jnp

from stochastic_depth_jax.training import compilation


def test_cache_dir_setting():
    env = {"XDG_CACHE_HOME": "/x/cache"}
    assert compilation.cache_dir_for("", env) == ""
    assert compilation.cache_dir_for("auto", env) == os.path.join(
        "/x/cache/stochastic_depth_jax/jax", compilation.host_tag())
    assert compilation.cache_dir_for("auto", {**env, "JAX_COMPILATION_CACHE_DIR": "/y"}) == "/y"
    assert compilation.cache_dir_for("rel/dir", env) == os.path.abspath("rel/dir")


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


def test_listeners_are_removed_on_exit():
    with compilation.CompileStats() as stats:
        pass
    jax.jit(lambda v: v * 5.5 - 1)(jnp.ones(3)).block_until_ready()
    assert stats.programs == 0
