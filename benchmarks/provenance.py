"""What every benchmark table records about where and with what code it was measured.

Importable without JAX (``bench_torch.py`` runs in an environment that may have only torch):
only :func:`machine_line` touches JAX.
"""

import datetime
import functools
import os
import platform
import re
import runpy
import shlex
import subprocess
import tempfile

# Set by gpu_suite.py for each part it runs (the part's name): the suite's sizes are those of
# the recorded GPU tables, so its tables are not marked as smoke runs.
SUITE_PART_ENV = "SDJ_GPU_SUITE_PART"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Flags whose value is an interpreter: outside the repository, what matters to rerun the
# command is what it has (its versions are in the table), not where it is on this machine.
INTERPRETERS = {"--torch-python": "<python with torch>"}
# The benchmarks' flags whose value is a path, by their name: --out, --step-out, --json,
# --plot, --images-dir, --torch-python... (a value such as --variants a/b is not one).
PATH_FLAG = re.compile(r"--([a-z]+-)*(out|json|plot|dir|python)")


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
    git = ["git", "-C", REPO]
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
    """``python benchmarks/<script> <argv>``, quoted so that it can be pasted into a shell
    at the repository's root, with the paths in it written as :func:`portable_path` does:
    the values of the flags whose name says they are paths (:data:`PATH_FLAG`), also a bare
    file name (read from where the command ran), and any absolute path."""
    words, flag = ["python", f"benchmarks/{script}"], None
    for arg in argv:
        name, eq, value = arg.partition("=")  # --flag=value
        if not (eq and arg.startswith("--")):
            name, eq, value = flag, "", arg
        placeholder = INTERPRETERS.get(name)
        # An interpreter named without a directory is looked up on PATH: not a path.
        path = bool(value) and (os.path.isabs(value) or bool(
            name and PATH_FLAG.fullmatch(name) and (os.sep in value or not placeholder)))
        words.append((shlex.quote(name + eq) if eq else "")
                     + (portable_path(value, placeholder) if path else shlex.quote(value)))
        flag = arg
    return " ".join(words)


def portable_path(path: str, placeholder: str | None = None) -> str:
    """``path`` (absolute, or relative to the working directory) quoted for a shell,
    written so that it reads the same from any machine: inside the repository relative to
    its root (where :func:`command_line` runs), else ``placeholder`` if given, else under
    the temporary directory ``'<tmp>/...'``, under the home directory ``~/...``, anywhere
    else whole (a data set's place matters to rerun the command)."""
    path = os.path.abspath(path)
    # Its directory resolved, not the file: a venv's python links to the system's.
    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    within = _relative_to(real, REPO)
    if within is not None:
        return shlex.quote(within)
    # A placeholder is quoted too: bare, a shell reads `<tmp>/x` as redirections (from a
    # file 'tmp', into '/x'), not as a word.
    if placeholder:
        return shlex.quote(placeholder)
    tmp = _relative_to(real, tempfile.gettempdir())
    if tmp is not None and not _is_root(tempfile.gettempdir()):
        return shlex.quote("<tmp>" if tmp == "." else f"<tmp>/{tmp}")
    home = _relative_to(real, os.path.expanduser("~"))
    if home is not None and not _is_root(os.path.expanduser("~")):
        return "~" if home == "." else f"~/{shlex.quote(home)}"  # ~ unquoted: expanded
    return shlex.quote(path)


def _is_root(directory: str) -> bool:
    """Whether ``directory`` is the file system's root (it holds every path: no place)."""
    return os.path.dirname(directory) == directory


def _relative_to(path: str, root: str) -> str | None:
    """``path`` relative to the directory ``root`` (resolved), or None if outside it."""
    root = os.path.realpath(root)
    if path != root and not path.startswith(root.rstrip(os.sep) + os.sep):
        return None
    return os.path.relpath(path, root)


# The flags that set how often a benchmark times the same thing, not what it times (the
# network, images, batch): the table says how many, and the recorded tables were run with
# other counts than the defaults (--rounds 7, 10), so they are not sizes to warn about.
REPEATS = ("rounds", "warmup")


def size_changes(parser, args, sizes) -> list[str]:
    """``--flag value (default D)`` for each of ``sizes`` (argument dests; a dict maps each
    to how its default reads where that is not the parser's) that ``args`` sets to something
    else than ``parser``'s default. Call it before the script fills in defaults of its own.
    A repetition count (:data:`REPEATS`) is never named, even where ``sizes`` lists it."""
    shown = sizes if isinstance(sizes, dict) else {}
    changed = []
    for dest in (d for d in sizes if d not in REPEATS):
        default, value = parser.get_default(dest), getattr(args, dest)
        if value != default:
            changed.append(f"--{dest.replace('_', '-')} {value} (default "
                           f"{shown.get(dest) or default})")
    return changed


@functools.lru_cache(maxsize=None)
def hugepages() -> dict:
    """``stochastic_depth_jax/hugepages.py``'s names, run from its file (importing the
    package would import JAX)."""
    return runpy.run_path(os.path.join(REPO, "stochastic_depth_jax", "hugepages.py"))


def allocator() -> str:
    """``malloc huge pages on``, or ``off`` and why (``stochastic_depth_jax/hugepages.py``):
    on the CPU, steps are measurably faster with them."""
    if hugepages()["active"]():
        return "malloc huge pages on"
    return f"malloc huge pages off ({hugepages()['reason_not_to']() or 'not restarted with them'})"


def run_label(script: str, argv, changed=()) -> str:
    """The line every table ends its header with: when, the code, the allocator's huge pages
    (:func:`allocator`), the exact command, and, for a run at other sizes than the script's
    defaults (the recorded tables' sizes), a warning that names them, so that a smoke run is
    never read as a recorded measurement.
    A part of ``gpu_suite.py`` (``$SDJ_GPU_SUITE_PART``) says so instead: its sizes, set in
    the suite, are those of the recorded GPU tables (45,000 images an epoch, 20 rounds)."""
    line = (f"Run {datetime.datetime.now():%Y-%m-%d %H:%M}; code {code_version()}; "
            f"{allocator()}; command: `{command_line(script, argv)}`.")
    part = os.environ.get(SUITE_PART_ENV)
    if part:  # the suite's parts set the sizes its recorded tables are measured at
        line += f" Run by gpu_suite.py, part {part}: the sizes of the recorded GPU tables."
    elif changed:
        line += (f" **Not the default sizes** ({'; '.join(changed)}): not comparable with "
                 f"tables measured at the defaults.")
    return line
