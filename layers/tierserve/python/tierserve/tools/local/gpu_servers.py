"""The GPU tier on a developer machine: the GPU server (``functions/gpu_server/serve``) as a
local process on 127.0.0.1, one per gpu-tier model, on whatever providers this machine has
(CPU without a GPU). The local API forwards that model's routes to it, as API Gateway
forwards them to the SageMaker endpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tierserve.settings import MODELS_ENV, ModelRef
from tierserve.tools.local.processes import CORE_PATH, REPO_ROOT, free_port, stop_process, wait_for

SERVE = REPO_ROOT / "functions" / "gpu_server" / "serve"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


@dataclass
class GpuServerProcess:
    """One running ``serve`` process; ``url`` is its base URL, ``log_path`` its output."""

    ref: ModelRef
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @classmethod
    def start(
        cls,
        ref: ModelRef,
        environ: Mapping[str, str],
        *,
        log_dir: Path,
        timeout: float = START_TIMEOUT_S,
    ) -> GpuServerProcess:
        """Start ``serve`` for ``ref`` on a free loopback port and return once ``/ping`` says
        200 (the model is loaded and warmed).

        Raises:
            RuntimeError: the process exited or was not ready within ``timeout``; the message
                names its log.
        """
        port = free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"gpu-server-{ref.name}.log"
        env = {
            **os.environ,
            **environ,
            MODELS_ENV: ModelRef.join([ref]),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(CORE_PATH), os.environ.get("PYTHONPATH")])),
        }
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, str(SERVE), "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = cls(ref, process, f"http://127.0.0.1:{port}", log_path)
        try:
            server.wait_ready(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def wait_ready(self, timeout: float) -> None:
        wait_for(self.process, self.ping, timeout, f"the GPU server for {self.ref}", self.log_path)

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as response:  # noqa: S310 - loopback
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (the server drains and exits 0), then SIGKILL after ``timeout``."""
        return stop_process(self.process, timeout)


def start_gpu_servers(
    refs: list[ModelRef], environ: Mapping[str, str], *, log_dir: Path
) -> list[GpuServerProcess]:
    """One ready GPU server per model, started in turn; on a failure the started ones stop."""
    servers: list[GpuServerProcess] = []
    try:
        for ref in refs:
            servers.append(GpuServerProcess.start(ref, environ, log_dir=log_dir))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers
