"""Running several local processes at once in tests (multi-process JAX jobs)."""

import socket
import subprocess


def free_address() -> str:
    """``'127.0.0.1:<port>'`` with a port free right now (for a test's coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def run_together(commands, *, env, cwd=None, timeout=300) -> list[str]:
    """Starts every command at once, waits for all, asserts each exited with 0.

    Returns each process's combined stdout and stderr; processes still running after
    ``timeout`` seconds (a hang) are killed and the test fails.
    """
    procs = [
        subprocess.Popen(
            cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for cmd in commands
    ]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-4000:]
    return outputs
