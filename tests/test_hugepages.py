"""Huge pages for the allocator: when a command starts again with them, and that it does so
as the same process with the same command (stochastic_depth_jax/hugepages.py)."""

import os
import struct
import subprocess
import sys
import textwrap

import pytest

from stochastic_depth_jax import hugepages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX, GLIBC, MADVISE = "linux", (2, 36), "madvise"


def reason(environ=None, platform=LINUX, glibc=GLIBC, mode=MADVISE, secure=False):
    return hugepages.reason_not_to({} if environ is None else environ, platform, glibc, mode,
                                   secure)


def test_restarts_only_where_it_helps():
    assert reason() is None
    assert reason({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) is None  # another tunable
    assert reason(platform="darwin") == "not Linux (darwin)"
    assert reason(glibc=None) == "not glibc"
    assert reason(glibc=(2, 34)) == "glibc 2.34 has no glibc.malloc.hugetlb (2.35 and later)"
    assert reason(glibc=(3, 0)) is None
    assert "'always'" in reason(mode="always")  # every large block is huge already
    assert "'never'" in reason(mode="never")
    assert reason(mode=None) == "the kernel's transparent huge page mode is unknown"
    assert reason(secure=True) == ("a set-user-ID or file-capabilities process, whose glibc "
                                   "drops glibc.malloc.hugetlb")


@pytest.mark.parametrize("tunables", ["glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=1",
                                      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"])
def test_a_users_setting_is_kept(tunables):
    assert reason({"GLIBC_TUNABLES": tunables}) == "GLIBC_TUNABLES already sets glibc.malloc.hugetlb"


def test_environment_adds_the_tunable_to_the_others():
    env = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert hugepages.environment(env) == {
        "PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    assert hugepages.environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"  # not changed in place


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"),
                                        ("[always] madvise never\n", "always"),
                                        ("always madvise [never]\n", "never"),
                                        ("always madvise never\n", None), ("", None)])
def test_thp_mode(tmp_path, text, mode):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert hugepages.thp_mode(str(path)) == mode
    assert hugepages.thp_mode(str(tmp_path / "missing")) is None


def test_glibc_version_is_this_pythons():
    version = hugepages.glibc_version()
    if sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
        assert version is not None and version >= (2, 17)
    else:
        assert version is None


SCRIPT = textwrap.dedent("""\
    import os, runpy, sys
    print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
    runpy.run_path({module!r})["restart_with_huge_pages"](__file__)
    print("running", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:],
          runpy.run_path({module!r})["active"]())
""")


def _script(tmp_path, name, template):
    """``template`` written to ``tmp_path/name`` with this checkout's hugepages.py as its
    ``module``, and this environment without ``GLIBC_TUNABLES`` to run it in."""
    script = tmp_path / name
    script.write_text(template.format(module=os.path.join(REPO, "stochastic_depth_jax",
                                                          "hugepages.py")))
    return script, {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}


def _run_script(tmp_path, env_tunables=None, *python_options):
    script, env = _script(tmp_path, "command.py", SCRIPT)
    if env_tunables is not None:
        env["GLIBC_TUNABLES"] = env_tunables
    args = [sys.executable, *python_options, str(script), "a b", "--flag=c"]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=True)
    return [line.split(" ", 1) for line in out.stdout.splitlines()], env


def test_a_command_starts_again_as_the_same_process_with_huge_pages(tmp_path):
    lines, env = _run_script(tmp_path, None, "-u")
    if hugepages.reason_not_to(env) is not None:  # this system: nothing to gain, nothing done
        assert [kind for kind, _ in lines] == ["start", "running"]
        assert lines[1][1].endswith("None ['a b', '--flag=c'] False")
        return
    # The command ran twice in one process: before and after its restart.
    assert [kind for kind, _ in lines] == ["start", "start", "running"]
    pid = lines[0][1].split()[0]
    assert lines[0][1] == f"{pid} None"
    assert lines[1][1] == f"{pid} glibc.malloc.hugetlb=1"
    assert lines[2][1] == f"{pid} glibc.malloc.hugetlb=1 ['a b', '--flag=c'] True"


def test_a_users_choice_is_not_overridden(tmp_path):
    lines, _ = _run_script(tmp_path, "glibc.malloc.hugetlb=0")
    assert [kind for kind, _ in lines] == ["start", "running"]
    assert lines[1][1].endswith("glibc.malloc.hugetlb=0 ['a b', '--flag=c'] False")


def test_a_script_run_in_process_does_not_restart_its_runner(tmp_path, monkeypatch):
    """A test running a command's file with runpy (sys.argv[0] = that file) must not
    execute pytest's own command again."""
    script = tmp_path / "command.py"
    script.write_text("")
    monkeypatch.setattr(sys, "argv", [str(script)])
    assert not hugepages.runs(str(script))
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("would start pytest again"))
    hugepages.restart_with_huge_pages(str(script))


@pytest.mark.parametrize("secure", [0, 1])
def test_secure_execution_is_the_kernels_at_secure(tmp_path, secure):
    """A set-user-ID or file-capabilities interpreter (``AT_SECURE``): its glibc drops the
    tunable, so the restarted process started again without it, forever."""
    auxv = tmp_path / "auxv"
    auxv.write_bytes(b"".join(struct.pack("@LL", k, v) for k, v in
                              [(6, 4096), (hugepages.AT_SECURE, secure), (0, 0)]))
    assert hugepages.secure_execution(str(auxv)) is bool(secure)
    assert hugepages.secure_execution(str(tmp_path / "missing")) is False
    assert hugepages.secure_execution() is False  # this test's own process


@pytest.mark.parametrize("argv, at", [
    (["py", "s.py", "a"], 1), (["py", "-u", "-X", "dev", "s.py"], 4), (["py", "-Xdev", "s.py"], 2),
    (["py", "-uW", "ignore", "s.py"], 3), (["py", "-Wignore", "s.py"], 2),
    (["py", "--check-hash-based-pycs", "never", "s.py"], 3), (["py", "--", "s.py"], 2),
    (["py", "-m", "pdb", "s.py"], None), (["py", "-um", "cProfile", "s.py"], None),
    (["py", "-c", "code", "s.py"], None), (["py", "-", "s.py"], None), (["py", "-u"], None),
    (["py", "--version"], None)])
def test_the_script_is_the_first_word_after_the_interpreters_options(argv, at):
    assert hugepages._script_index(argv) == at


def test_a_program_running_the_script_is_not_started_again(tmp_path):
    """``python -m pdb train.py`` (or any program running the script in its own process)
    was restarted whole: a second debugger prompt, its breakpoints and the commands piped
    to it lost. Only ``python [options] <script>`` restarts."""
    script = tmp_path / "command.py"
    script.write_text(SCRIPT.format(module=os.path.join(REPO, "stochastic_depth_jax",
                                                        "hugepages.py")))
    wrapper = tmp_path / "wrapper.py"  # as pdb and cProfile run a script: in __main__
    wrapper.write_text("import runpy, sys\nprint('wrapper ran', flush=True)\n"
                       "sys.argv[:] = sys.argv[1:]\n"
                       "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, str(wrapper), str(script), "a b"], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    lines = [line.split(" ", 1) for line in out.stdout.splitlines()]
    assert [kind for kind, _ in lines] == ["wrapper", "start", "running"]
    assert lines[2][1].endswith("None ['a b'] False")


MEASURE = textwrap.dedent("""\
    import ctypes, os, re, runpy, sys
    active = runpy.run_path({module!r})["active"]
    if len(sys.argv) > 1:  # set in Python: after glibc read its tunables
        os.environ["GLIBC_TUNABLES"] = sys.argv[1]
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 64 << 20
    ctypes.memset(libc.malloc(size), 1, size)
    with open("/proc/self/smaps_rollup") as f:
        kib = re.findall(r"(?:AnonHugePages|Private_Hugetlb):\\s+(\\d+) kB", f.read())
    print(active(), sum(map(int, kib)) > 0)
""")


@pytest.mark.parametrize("tunables, in_python", [
    ("", False), ("glibc.malloc.hugetlb=1", False),
    ("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", False),
    ("glibc.malloc.hugetlb=1", True),  # a notebook's os.environ: too late
    ("glibc.malloc.hugetlb=1:glibc.malloc.hugetlb=0", False),  # the last one counts
    ("glibc.malloc.hugetlb=0:glibc.malloc.hugetlb=1", False),
    ("glibc.malloc.hugetlb=yes", False),  # not a number: ignored
    ("glibc.malloc.hugetlb=2", False),  # MAP_HUGETLB: only where pages are reserved
])
def test_active_says_whether_malloc_gets_huge_pages(tmp_path, tunables, in_python):
    """``devices.huge_pages`` and the tables' ``Run`` line said "on" for tunables glibc did
    not apply (set after the start, overridden, not a number, no reserved pages): measured,
    a 64 MiB block of ``malloc`` gets huge pages exactly where :func:`active` says so."""
    if not os.path.exists("/proc/self/smaps_rollup"):
        pytest.skip("no /proc/self/smaps_rollup to measure with")
    script, env = _script(tmp_path, "measure.py", MEASURE)
    if tunables and not in_python:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, str(script), *([tunables] if in_python else [])],
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    said, measured = out.stdout.split()
    assert said == measured, f"active() says {said}, measured {measured}"


def test_vm_flags_are_the_mapping_holding_the_address(tmp_path):
    smaps = tmp_path / "smaps"
    smaps.write_text("1000-3000 rw-p 00000000 00:00 0 \nSize:  8 kB\nVmFlags: rd wr mr\n"
                     "3000-5000 rw-p 00000000 00:00 0    [heap]\nSize:  8 kB\n"
                     "VmFlags: rd wr hg\n")
    assert hugepages._vm_flags(0x2fff, str(smaps)) == {"rd", "wr", "mr"}
    assert hugepages._vm_flags(0x3000, str(smaps)) == {"rd", "wr", "hg"}
    assert hugepages._vm_flags(0x5000, str(smaps)) == set()
    assert hugepages._vm_flags(0x3000, str(tmp_path / "missing")) == set()


def test_output_written_before_the_restart_is_kept(tmp_path):
    """What the command printed before its restart, still in Python's buffer (a pipe's
    output is block-buffered), is written before the process is replaced, not lost."""
    script = tmp_path / "command.py"
    script.write_text(textwrap.dedent(f"""\
        import runpy
        print("before")
        runpy.run_path({os.path.join(REPO, "stochastic_depth_jax", "hugepages.py")!r})[
            "restart_with_huge_pages"](__file__)
        print("after")
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "PYTHONUNBUFFERED")}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    restarted = hugepages.reason_not_to(env) is None
    assert out == ["before", "before", "after"] if restarted else ["before", "after"]


def test_hint_once_where_huge_pages_would_help(monkeypatch):
    monkeypatch.setattr(hugepages, "_hinted", False)
    monkeypatch.setattr(hugepages, "active", lambda: False)
    monkeypatch.setattr(hugepages, "reason_not_to", lambda: None)
    line = hugepages.hint()
    assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in line and "\n" not in line
    assert hugepages.hint() is None  # once per process
    monkeypatch.setattr(hugepages, "_hinted", False)
    monkeypatch.setattr(hugepages, "reason_not_to", lambda: "not Linux (darwin)")
    assert hugepages.hint() is None  # nothing to gain
    monkeypatch.setattr(hugepages, "reason_not_to", lambda: None)
    monkeypatch.setattr(hugepages, "active", lambda: True)
    assert hugepages.hint() is None  # has them


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "sweep.py"])
def test_a_script_run_without_its_file_runs_as_it_is(script):
    """`python -c "exec(open('train.py').read())"`, which ran the script before it started
    again with huge pages, stopped with a NameError: its code has no ``__file__``, from
    which the restart finds hugepages.py and tells the script's command. It runs as it is,
    without the restart."""
    code = f"import sys; sys.argv = [{script!r}, '--help']; exec(open({script!r}).read())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: {script} "), out.stdout
