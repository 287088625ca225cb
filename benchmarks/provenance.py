"""What every benchmark table records about where and with what code it was measured.

Importable without JAX (``bench_torch.py`` runs in an environment that may have only torch):
only :func:`machine_line` touches JAX.
"""

import datetime
import os
import platform
import shlex
import subprocess

# Set by gpu_suite.py for each part it runs (the part's name): the suite's sizes are those of
# the recorded GPU tables, so its tables are not marked as smoke runs.
SUITE_PART_ENV = "SDJ_GPU_SUITE_PART"


def machine_line() -> str:
    """Backend, device kind and count, host CPU, Python and jax versions, on one line."""
    import jax

    dev = jax.devices()[0]
    return (f"backend {jax.default_backend()} ({dev.device_kind}, {jax.device_count()} device(s)); "
            f"host CPU {cpu_name()}, {os.cpu_count()} cores; python {platform.python_version()}; "
            f"jax {jax.__version__}")


def cpu_name() -> str:
    """The host CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            return names[0]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_version() -> str:
    """The git commit measured, with ``+ uncommitted changes`` where the package, the
    configs or the benchmarks differ from it (or $CODE_VERSION outside a checkout). The
    tables in ``benchmarks/results`` are not code: a table appended there by an earlier run
    does not mark the next run's code as changed."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = ["git", "-C", repo]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "stochastic_depth_jax",
                                "benchmarks", "configs", ":(exclude)benchmarks/results"],
                               capture_output=True).returncode
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("CODE_VERSION", "unknown (no git; set CODE_VERSION)")
    return commit + (" + uncommitted changes" if dirty else "")


def command_line(script: str, argv) -> str:
    """``python benchmarks/<script> <argv>``, quoted so that it can be pasted into a shell."""
    return shlex.join(["python", f"benchmarks/{script}", *argv])


def size_changes(parser, args, sizes) -> list[str]:
    """``--flag value (default D)`` for each of ``sizes`` (argument dests; a dict maps each
    to how its default reads where that is not the parser's) that ``args`` sets to something
    else than ``parser``'s default. Call it before the script fills in defaults of its own."""
    shown = sizes if isinstance(sizes, dict) else {}
    changed = []
    for dest in sizes:
        default, value = parser.get_default(dest), getattr(args, dest)
        if value != default:
            changed.append(f"--{dest.replace('_', '-')} {value} (default "
                           f"{shown.get(dest) or default})")
    return changed


def run_label(script: str, argv, changed=()) -> str:
    """The line every table ends its header with: when, the code, the exact command, and,
    for a run at other sizes than the script's defaults (the recorded tables' sizes), a
    warning that names them, so that a smoke run is never read as a recorded measurement.
    A part of ``gpu_suite.py`` (``$SDJ_GPU_SUITE_PART``) says so instead: its sizes, set in
    the suite, are those of the recorded GPU tables (45,000 images an epoch, 20 rounds)."""
    line = (f"Run {datetime.datetime.now():%Y-%m-%d %H:%M}; code {code_version()}; command: "
            f"`{command_line(script, argv)}`.")
    part = os.environ.get(SUITE_PART_ENV)
    if part:  # the suite's parts set the sizes its recorded tables are measured at
        line += f" Run by gpu_suite.py, part {part}: the sizes of the recorded GPU tables."
    elif changed:
        line += (f" **Not the default sizes** ({'; '.join(changed)}): not comparable with "
                 f"tables measured at the defaults.")
    return line
