"""Huge pages for the allocator: when a command starts again with them, and that it does so
as the same process with the same command (stochastic_depth_jax/hugepages.py)."""

import os
import subprocess
import sys
import textwrap

import pytest

from stochastic_depth_jax import hugepages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX, GLIBC, MADVISE = "linux", (2, 36), "madvise"


def reason(environ=None, platform=LINUX, glibc=GLIBC, mode=MADVISE):
    return hugepages.reason_not_to({} if environ is None else environ, platform, glibc, mode)


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


def _run_script(tmp_path, env_tunables=None, *python_options):
    script = tmp_path / "command.py"
    script.write_text(SCRIPT.format(module=os.path.join(REPO, "stochastic_depth_jax",
                                                        "hugepages.py")))
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
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
