"""Child processes of the local stack (GPU servers, the Lambda emulator): start, wait until
they answer, stop them cleanly."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[6]
CORE_PATH = REPO_ROOT / "layers" / "tierserve" / "python"
STOP_TIMEOUT_S = 15.0


def wait_for(
    process: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float, what: str, log_path: Path
) -> None:
    """Poll ``ready`` until it says True.

    Raises:
        RuntimeError: ``process`` exited first, or ``timeout`` passed; the message names ``log_path``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}; see {log_path}")
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} was not ready after {timeout:.0f} s; see {log_path}")


def stop_process(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited after ``timeout``; its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def free_port() -> int:
    """A loopback port nothing listens on now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
