"""README's Python snippets run as written (in order, in one namespace, like a session)."""

import os
import re
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
sys.path.insert(0, REPO)  # The snippets run from the repository root, where `configs` is.


def _snippets():
    text = open(README).read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_snippets_run(monkeypatch, tmp_path):
    # The snippets' temporary directories (a training run's workdir) go where pytest
    # cleans up, not in the system's temporary directory, one more each run.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    snippets = _snippets()
    assert len(snippets) >= 4
    namespace = {"__name__": "readme"}
    for i, code in enumerate(snippets):
        try:
            exec(compile(code, f"README.md python snippet {i + 1}", "exec"), namespace)
        except Exception as e:  # noqa: BLE001  Say which snippet broke.
            raise AssertionError(f"README snippet {i + 1} fails: {e!r}\n{code}") from e


def test_readme_shard_map_snippets_run_on_one_device():
    """The shard_map snippets use every device JAX sees; the suite forces 8 CPU devices,
    a newcomer's CPU (or single GPU) has one, where they must run as well."""
    import subprocess

    import jax

    snippets = [s for s in _snippets() if "jax.shard_map" in s]
    assert len(snippets) == 2
    code = "\n".join(["import jax, jax.numpy as jnp", "import stochastic_depth_jax as sdj",
                      "key = jax.random.key(2)", *snippets,
                      "assert n_dev == 1, n_dev", "print('ran on', n_dev)"])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
                   "--xla_force_host_platform_device_count=8", ""))
    # Through the suite's compilation cache (conftest), as train.py's runs: a later run of
    # the suite loads its programs (10 s of CPU instead of 24 on a loaded 2-core machine).
    if jax.config.jax_compilation_cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ran on 1" in proc.stdout
