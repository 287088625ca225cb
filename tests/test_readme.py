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


def test_readme_quick_start_test_command_is_what_ci_runs():
    """The Quick start's test command is CI's (.ci/run), so what a newcomer runs is what CI
    checks (CI adds only pip's -q)."""
    text = open(README).read()
    quick = text.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    line = next(line for line in quick.splitlines() if "pytest" in line)
    install, run = (part.split("#")[0].strip() for part in line.split("&&"))
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert run in ci, (run, ci)
    assert install in [line.replace("pip install -q", "pip install") for line in ci], (install, ci)


def _version(text):
    """``'2.0.0'`` and ``'2.0'`` and ``'2'`` as one: the release's numbers, trailing 0s cut."""
    numbers = [int(n) for n in text.split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers)


def _name(text):
    """A distribution's name as pip compares them (``Pillow``, ``array_record``)."""
    return re.sub(r"[-_.]+", "-", text).lower()


def test_readme_tested_versions_state_pyproject_s_bounds():
    """'Tested versions' states the allowed ranges and the lowest versions the suite passed
    on: a bound changed in pyproject.toml alone would leave it naming other versions."""
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    lowest = {}
    for requirement in requirements:
        match = re.fullmatch(r"([\w.-]+)>=([\d.]+)(,<[\d.]+)?", requirement.replace(" ", ""))
        assert match, f"{requirement!r}: not 'name>=lowest[,<limit]', as the README states them"
        lowest[_name(match[1])] = _version(match[2])
    section = open(README).read().split("### Tested versions", 1)[1].split("\n## ", 1)[0]
    allows = re.search(r"The package allows (.*?) accordingly", section, re.S)[1]
    stated = set(re.findall(r"`([^`]+)`", allows))
    assert stated <= set(project["dependencies"]), stated - set(project["dependencies"])
    listed = re.search(r"lowest allowed version: (.*?)\)", section, re.S)[1]
    readme = {_name(name): _version(version)
              for name, version in re.findall(r"([\w-]+) ([\d.]+)", " ".join(listed.split()))}
    for requirement in stated:  # jax, flax, optax, orbax: their bounds are in 'allows'
        readme[_name(requirement.split(">=")[0])] = _version(re.split("[>=,<]+", requirement)[1])
    assert readme == lowest


def test_readme_lists_every_config():
    """Training's 'Configs' list names every config train.py accepts, and no other: a config
    added or renamed in configs/ alone would be missing from, or wrong in, the README."""
    import configs

    text = open(README).read()
    block = text.split("**Configs**", 1)[1].split("\n\n", 2)[1]  # the list after its intro
    listed = set()
    for item in re.findall(r"^- (.*?):", block, flags=re.M):
        listed |= set(re.findall(r"`([\w:]+)`", item))
    assert listed == set(configs.CONFIGS), listed ^ set(configs.CONFIGS)
