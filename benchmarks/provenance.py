"""What every benchmark table records about where and with what code it was measured."""

import os
import platform
import subprocess

import jax


def machine_line() -> str:
    """Backend, device kind and count, host CPU, Python and jax versions, on one line."""
    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (f"backend {jax.default_backend()} ({dev.device_kind}, {jax.device_count()} device(s)); "
            f"host CPU {cpu}, {os.cpu_count()} cores; python {platform.python_version()}; "
            f"jax {jax.__version__}")


def code_version() -> str:
    """The git commit measured (or $CODE_VERSION outside a checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("CODE_VERSION", "unknown (no git; set CODE_VERSION)")
