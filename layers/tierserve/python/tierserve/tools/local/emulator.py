"""A Lambda handler run the way Lambda runs it, on the host: the Lambda Runtime Interface
Emulator (the binary ``sam local invoke`` puts in its container) drives ``awslambdaric``
(the runtime client of the AWS Python base image) over the Runtime API, with no Docker.

The emulator ships inside the ``aws-sam-cli`` wheel; :func:`install_emulator` extracts just
that binary into the virtualenv (``make setup`` calls it), so none of SAM's dependencies
come along. Both addresses the emulator opens are bound to 127.0.0.1 (its default is
0.0.0.0:8080).

    with LambdaEmulator.start("api.handler", env) as function:
        response = function.invoke(json.loads(Path("events/infer-json.json").read_text()))
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tierserve.tools.local.processes import CORE_PATH, REPO_ROOT, free_port, stop_process, wait_for

SAM_CLI_WHEEL = "aws-sam-cli==1.170.0"  # carries the emulator; only its binary is extracted
EMULATOR_NAME = "aws-lambda-rie"
FUNCTIONS_PATH = REPO_ROOT / "functions" / "inference"
INVOKE_PATH = "/2015-03-31/functions/function/invocations"
START_TIMEOUT_S = 30.0
INVOKE_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 1024
LAMBDA_ERROR_KEYS = frozenset({"errorType", "errorMessage", "requestId", "stackTrace"})


def emulator_path() -> Path:
    """Where :func:`install_emulator` puts the binary: next to this Python's executables."""
    return Path(sys.prefix) / "bin" / EMULATOR_NAME


def _wheel_member() -> str:
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower()
    )
    if sys.platform != "linux" or arch is None:
        raise RuntimeError(
            f"the Lambda Runtime Interface Emulator runs on Linux x86_64 or arm64, not "
            f"{sys.platform} {platform.machine()}: use `sam local invoke` (Docker) or `make run`"
        )
    return f"samcli/local/rapid/{EMULATOR_NAME}-{arch}"


def install_emulator(target: Path | None = None) -> Path:
    """Download the ``aws-sam-cli`` wheel (no dependencies) and extract the emulator to
    ``target`` (default :func:`emulator_path`). Does nothing when it is already there."""
    target = target or emulator_path()
    if target.exists():
        return target
    member = _wheel_member()
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", folder, SAM_CLI_WHEEL],
            check=True,
        )
        (wheel,) = Path(folder).glob("aws_sam_cli-*.whl")
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, partial.open("wb") as out:
            shutil.copyfileobj(source, out)
        partial.chmod(0o755)
        partial.replace(target)
    return target


class FunctionError(RuntimeError):
    """The handler raised: ``payload`` is Lambda's error document (``errorType``,
    ``errorMessage``, ``stackTrace``)."""

    def __init__(self, payload: Mapping[str, Any], log_path: Path) -> None:
        super().__init__(
            f"the function raised {payload.get('errorType')}: {str(payload.get('errorMessage')).strip()}; "
            f"see {log_path}"
        )
        self.payload = dict(payload)


def is_error_payload(payload: Any) -> bool:
    """Lambda's shape for a handler that raised (the emulator answers it with a 200)."""
    return (
        isinstance(payload, dict)
        and {"errorType", "errorMessage"} <= payload.keys()
        and payload.keys() <= LAMBDA_ERROR_KEYS
    )


@dataclass
class LambdaEmulator:
    """One emulated function: ``invoke`` sends an event, returns the handler's result."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @classmethod
    def start(
        cls,
        handler: str,
        environ: Mapping[str, str],
        *,
        log_path: Path,
        memory_mb: int = DEFAULT_MEMORY_MB,
        timeout: float = START_TIMEOUT_S,
    ) -> LambdaEmulator:
        """Start the emulator for ``handler`` (``module.function`` under functions/inference)
        with ``environ`` added to this process's environment.

        Raises:
            RuntimeError: no emulator installed (the message says how), or it did not listen
                within ``timeout``.
        """
        binary = emulator_path()
        if not binary.exists():
            raise RuntimeError(f"no {binary}: run `make setup` (it installs the emulator)")
        port = free_port()
        env = {
            **os.environ,
            **environ,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory_mb),
            "PYTHONPATH": os.pathsep.join([str(FUNCTIONS_PATH), str(CORE_PATH)]),
        }
        command = [
            str(binary),
            "--runtime-interface-emulator-address",
            f"127.0.0.1:{port}",
            "--runtime-api-address",
            f"127.0.0.1:{free_port()}",
            sys.executable,
            "-m",
            "awslambdaric",
            handler,
        ]
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, env=env, cwd=FUNCTIONS_PATH, stdout=log, stderr=subprocess.STDOUT
            )
        emulator = cls(process, f"http://127.0.0.1:{port}", log_path)
        try:
            wait_for(process, partial(_listening, port), timeout, "the Lambda emulator", log_path)
        except BaseException:
            emulator.stop()
            raise
        return emulator

    def invoke(self, event: Mapping[str, Any], timeout: float = INVOKE_TIMEOUT_S) -> Any:
        """One synchronous invocation: the handler's return value, decoded from JSON.

        Raises:
            FunctionError: the handler raised.
            RuntimeError: the function could not run (init failure, no answer within
                ``timeout``, the emulator gone); the message names the log.
        """
        request = urllib.request.Request(  # noqa: S310 - our own loopback URL
            self.url + INVOKE_PATH,
            data=json.dumps(event).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - loopback
                payload = json.loads(response.read())
        except urllib.error.HTTPError as error:
            payload = error.read().decode("utf-8", "replace")
            raise RuntimeError(
                f"the function failed ({error.code}): {payload}; see {self.log_path}"
            ) from None
        except (urllib.error.URLError, OSError) as error:  # timeouts included
            reason = getattr(error, "reason", error)
            raise RuntimeError(f"the function gave no answer ({reason}); see {self.log_path}") from None
        if is_error_payload(payload):
            raise FunctionError(payload, self.log_path)
        return payload

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        stop_process(self.process, timeout)

    def __enter__(self) -> LambdaEmulator:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


if __name__ == "__main__":
    print(install_emulator())
