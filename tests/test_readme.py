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


# The README's figures and the results files they are copied from. Each figure is compared
# with its file's value rounded as the README rounds it, so an edit to either that leaves
# them disagreeing (a re-run's table pasted without its file, a file replaced) fails here.

def _read(*parts):
    with open(os.path.join(REPO, *parts)) as f:
        return f.read()


def _table(text, marker):
    """The first Markdown table from the line holding ``marker`` in ``text`` on (the marker
    may be in its header): its body rows as lists of cells, bold and code marks removed (the
    README bolds its headline figures)."""
    assert marker in text, f"{marker!r} not found"
    start = text.rfind("\n", 0, text.index(marker)) + 1
    rows = []
    for line in text[start:].splitlines():
        if line.startswith("|"):
            rows.append([c.strip().replace("**", "").replace("`", "")
                         for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    assert len(rows) > 2, f"no table after {marker!r}"
    return rows[2:]  # without the header and its |---| line


def _agrees(readme, measured):
    """A README figure (``'3411'``, ``'0.658'``, ``'7,087'``, ``'0.81x'``) is ``measured``
    rounded to the README's decimals."""
    readme = readme.replace(",", "").rstrip("x")
    decimals = len(readme.split(".")[1]) if "." in readme else 0
    return abs(float(readme) - float(measured)) <= 0.5 * 10 ** -decimals + 1e-9


def _check(pairs):
    wrong = [(r, m) for r, m in pairs if not _agrees(r, m)]
    assert not wrong, f"README figure vs its results file: {wrong}"
    assert pairs


def test_readme_cpu_train_step_table_is_its_step_cpu_run():
    """Results' CPU train-step table is the step_cpu.md run it names ('run of HH:MM')."""
    readme = open(README).read()
    intro = readme.split("**2-core CPU, 2026-12-05**", 1)[1].split("| variant", 1)[0]
    run = re.search(r"run of\s+(\d\d:\d\d)", intro)[1]
    measured = {row[0]: row for row in
                _table(_read("benchmarks", "results", "step_cpu.md"), f"Run 2026-12-05 {run};")}
    pairs = []
    for label, ms, img_s, ratio in _table(readme, "**2-core CPU, 2026-12-05**"):
        variant = ("mask" if "mask" in label else "skip-remat-convs" if "'convs'" in label
                   else "skip" if "'none'" in label else "constant")
        row = measured[variant]
        pairs += [(ms, row[1]), (img_s, row[3]), (ratio, row[4])]
    _check(pairs)


def test_readme_gpu_vs_torch_table_is_vs_torch_gpu():
    readme = open(README).read()
    measured = {row[0]: row for row in _table(_read("benchmarks", "results", "vs_torch_gpu.md"),
                                              "## Ours vs PyTorch")}
    pairs = []
    for row in _table(readme, "**NVIDIA H200, ours and PyTorch side by side**"):
        file_row = measured[row[0]]  # fp32, bf16
        eager, compiled = row[5].split(" / "), row[6].split(" / ")
        pairs += [(row[1], file_row[1]), (row[2], file_row[2]), (row[3], file_row[3]),
                  (row[4], file_row[10]), (eager[0], file_row[6]), (eager[1], file_row[7]),
                  (compiled[0], file_row[8]), (compiled[1], file_row[9]),
                  (row[7], file_row[11]), (row[8], file_row[12])]
    _check(pairs)


def test_readme_h100_compact_table_is_step_gpu_run_5():
    readme = open(README).read()
    run5 = _read("benchmarks", "results", "step_gpu.md").split("### Run 5", 1)[1]
    run5 = run5.split("### Run 6", 1)[0]
    pairs = []
    for batch, constant, cond, mask, compact in _table(readme, "**Compact mode on the H100**"):
        rows = {r[0]: r for r in _table(run5, f"batch {batch}, float32")}
        pairs += [(constant, rows["constant"][1]), (cond, rows["skip-remat-convs"][4]),
                  (compact, rows["compact"][4])]
        if mask:
            pairs.append((mask, rows["mask"][4]))
    _check(pairs)


def test_readme_stage_costs_are_the_last_stage_costs_run():
    readme = open(README).read()
    last = _read("benchmarks", "results", "stage_costs_cpu.md").rsplit("## Where", 1)[1]
    stages = _table(last, "| stage |")
    readme_stages = _table(readme, "| stage | ms per block")
    assert len(readme_stages) == len(stages) == 3
    pairs = []
    for (_, ms, share), file_row in zip(readme_stages, stages):
        pairs += [(ms, file_row[4]), (share, file_row[3])]
    variants = {r[0]: r for r in _table(last, "| variant |")}
    floor = re.search(r"\*\*([\d.]+)\*\* of constant depth", last)[1]
    for row in _table(readme, "| variant | blocks run per stage |"):
        if row[0] == "floor":
            pairs.append((row[4].split()[0], floor))
            continue
        name = {"lax.cond skipping": "skip", "compact, multiple 4": "compact",
                "compact, 3 fitted lengths": "lengths-3"}[row[0]]
        file_row = variants[name]
        assert row[1] == file_row[1], (row, file_row)
        pairs += [(row[2], file_row[5]), (row[3], file_row[6]), (row[4], file_row[7])]
    _check(pairs)


def test_readme_pruned_inference_figures_are_prune_cpu():
    readme = open(README).read()
    text = " ".join(readme.split("`python benchmarks/bench_prune.py`", 1)[1].split())
    ratios = re.search(r"at \*\*([\d.]+x), ([\d.]+x) and ([\d.]+x)\*\*", text).groups()
    speeds = re.search(r"\((\d+) -> (\d+), (\d+), (\d+) img/s;", text).groups()
    rows = _table(_read("benchmarks", "results", "prune_cpu.md"), "| blocks removed |")
    assert [r[0] for r in rows] == ["0", "14", "27", "40"]
    _check(list(zip(ratios, [r[5] for r in rows[1:]])) + list(zip(speeds, [r[4] for r in rows])))


def test_readme_depth_curve_figures_are_its_json():
    """The smoke-sized depth curve's parameters and images/s are its recorded points."""
    import json

    name = "depth_curve_survival.json"
    readme = " ".join(open(README).read().split())
    text = readme.split("the exported models go from", 1)[1]
    assert name in text.split(";")[0], f"its figures do not cite docs/depth_on_demand/{name}"
    points = {p["blocks_kept"]: p for p in
              json.loads(_read("docs", "depth_on_demand", name))["points"]}
    params = re.search(r"([\d,]+) parameters \((\d) blocks\) to ([\d,]+) \((\d) blocks\) "
                       r"and ([\d,]+) \(none\)", text).groups()
    speeds = re.search(r"([\d,]+) with all (\d) blocks, ([\d,]+) with (\d), ([\d,]+) with "
                       r"none", text).groups()
    pairs = []
    for found, key in ((params, "num_params"), (speeds, "images_per_s")):
        for value, kept in zip(found[::2], [*found[1::2], "0"]):
            pairs.append((value, points[int(kept)][key]))
    _check(pairs)


def test_readme_names_only_results_files_that_exist():
    """A figure's cited table is a file in the repository (a renamed or removed results file
    would leave the README's figures with no source)."""
    readme = open(README).read()
    cited = set(re.findall(r"(?:benchmarks/results|docs)/[\w./-]+\.(?:md|json|log|png)", readme))
    bare = r"`(\w+_(?:cpu|gpu)\.md|data\.md|train\.md|gpu_suite_[\d-]+\.log)`"
    cited |= {"benchmarks/results/" + name for name in re.findall(bare, readme)}
    assert len(cited) > 5
    missing = sorted(p for p in cited if not os.path.exists(os.path.join(REPO, p)))
    assert not missing, missing


def test_readme_compact_buckets_table_is_its_results_file():
    """The scan-length counts are exact (no machine figures): the README's table is the
    file's, row for row."""
    readme = _table(open(README).read(), "| scan lengths | blocks computed / all |")
    measured = _table(_read("benchmarks", "results", "compact_buckets.md"), "| scan lengths |")
    assert readme == measured


def test_readme_gpu_drop_path_table_is_drop_path_gpu():
    readme = open(README).read()
    measured = {row[0]: row for row in
                _table(_read("benchmarks", "results", "drop_path_gpu.md"), "| variant |")}
    header = "| variant | skip ms | mask ms |"
    none = re.search(r"no drop path \(([\d.]+) ms\)", readme.split(header, 1)[1])[1]
    pairs = [(none, measured["none"][1])]
    for name, skip_ms, mask_ms, ratios, skip_mask, _target in _table(readme, header):
        skip, mask = measured[name + " skip"], measured[name + " mask"]
        skip_none, mask_none = ratios.split(" / ")
        pairs += [(skip_ms, skip[1]), (mask_ms, mask[1]), (skip_none, skip[4]),
                  (mask_none, mask[4]), (skip_mask, skip[5])]
    _check(pairs)


def test_readme_cpu_drop_path_table_is_drop_path_cpu():
    """The CPU ViT table is one run of drop_path_cpu.md (the one whose no-drop-path step it
    quotes), every rate's skip, mask and unfused figures from it."""
    readme = open(README).read()
    rows = _table(readme, "| variant | median ms/step | / no drop path | skip / mask |")
    assert rows[0][0] == "none"
    run = next(section for section in _read("benchmarks", "results", "drop_path_cpu.md")
               .split("\n## ") if f"| none | {rows[0][1]} |" in section)
    measured = {row[0]: row for row in _table(run, "| variant |")}
    pairs = [(rows[0][1], measured["none"][1])]
    for name, ms, ratios, skip_mask, unfused_mask in rows[1:]:
        name = name.replace(" skip / mask / unfused", "")
        kinds = [measured[f"{name} {kind}"] for kind in ("skip", "mask", "skip-unfused")]
        pairs += [(value, row[1]) for value, row in zip(ms.split(" / "), kinds)]
        pairs += [(value, row[4]) for value, row in zip(ratios.split(" / "), kinds)]
        pairs += [(skip_mask, kinds[0][5]), (unfused_mask, kinds[2][5])]
    _check(pairs)
