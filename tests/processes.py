"""Running several local processes at once in tests (multi-process JAX jobs)."""

import socket
import subprocess
import time


def free_address() -> str:
    """``'127.0.0.1:<port>'`` with a port free for a test's coordinator, and kept from others.

    A port merely released (bound to port 0, then closed) could be handed by the kernel to
    the next bind to port 0 (a test in the other pytest-xdist worker, another job's
    listener) in the seconds before this job's coordinator binds it. Here the port is left
    in TIME_WAIT for a minute: binds to port 0 skip it and a plain bind of it is refused,
    while a server that reuses addresses, as gRPC's (the coordinator's) does, binds it.
    """
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        address = listener.getsockname()
        with socket.create_connection(address):
            accepted, _ = listener.accept()
            accepted.close()  # Closed first, this end of the connection waits in TIME_WAIT.
    return f"127.0.0.1:{address[1]}"


def start_all(commands, *, env, cwd=None) -> list[subprocess.Popen]:
    """Starts every command at once, stdout and stderr combined into one text pipe each."""
    return [
        subprocess.Popen(
            cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for cmd in commands
    ]


def finish_all(procs, *, timeout) -> list[tuple[int, str, float]]:
    """Waits for every process; returns ``(exit status, output, seconds until it ended)``
    of each. A process still running after ``timeout`` seconds (a hang) fails the test,
    with every process's output; all are killed on the way out."""
    start, results = time.monotonic(), []
    try:
        for p in procs:
            try:
                out = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))[0]
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                texts = [q.communicate()[0][-2000:] for q in procs]
                raise AssertionError(f"still running after {timeout} s: {texts}") from None
            results.append((p.returncode, out, time.monotonic() - start))
    finally:
        for p in procs:
            p.kill()
    return results


def run_together(commands, *, env, cwd=None, timeout=300) -> list[str]:
    """Starts every command at once, waits for all, asserts each exited with 0.

    Returns each process's combined stdout and stderr; processes still running after
    ``timeout`` seconds (a hang) are killed and the test fails.
    """
    results = finish_all(start_all(commands, env=env, cwd=cwd), timeout=timeout)
    for status, text, _ in results:
        assert status == 0, text[-4000:]
    return [text for _, text, _ in results]
