"""The pinned CDK CLI stays offline: no telemetry, no notices, no version check, no AWS account.

Telemetry (cdk-cli-telemetry.us-east-1.api.aws) and notices (cli.cdk.dev-tools.aws.dev) are
AWS hosts the CLI contacts on every command unless told not to; cdk.json tells it, for every
command, and ``make synth`` adds the environment that also keeps the version check and the
account lookup (STS, EC2 metadata) from running. The proof is a proxy on 127.0.0.1 that
records every connection: ``make synth`` sends it none, while the same CLI with telemetry
switched back on does, so the silence is not a CLI that ignores the proxy.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.stacks import SERVING_STACK, STORAGE_STACK

CLI_TIMEOUT_S = 300
# The CLI sends telemetry from a detached process after the command returns (within a second
# here): wait this long for a late connection before calling a command quiet.
QUIET_WAIT_S = 3
CONTROL_WAIT_S = 20
OLD_AS_IS = ("-o", ".venv/.installed-stamp", "-o", "node_modules/.package-lock.json")


@pytest.fixture(scope="module")
def cdk_cli(repo_root: Path) -> Path:
    cli = repo_root / "node_modules" / ".bin" / "cdk"
    if not cli.exists():
        pytest.skip("the pinned CDK CLI is not installed here: run `npm ci` (make synth does) to test it")
    return cli


class RecordingProxy:
    """A TCP listener on 127.0.0.1 that records the first line of every connection (an HTTP
    proxy's CONNECT host:port or request line) and closes it: nothing gets through."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self.requests: list[str] = []
        self._arrived = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(2)
                try:
                    first = connection.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
                except OSError:
                    first = "(no request line)"
                self.requests.append(first)
                self._arrived.set()

    def wait(self, seconds: float = QUIET_WAIT_S) -> list[str]:
        """The requests so far, after waiting up to ``seconds`` for a first one."""
        self._arrived.wait(seconds)
        return self.requests

    def env(self) -> dict[str, str]:
        """This process's environment with every proxy variable pointing here, and no CI
        marker (so the CLI's own CI detection cannot be what keeps it quiet)."""
        env = {k: v for k, v in os.environ.items() if k.lower() not in {"no_proxy", "ci"}}
        for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
            env[name] = self.url
        env.pop("CDK_DISABLE_CLI_TELEMETRY", None)
        return env


@pytest.fixture
def proxy() -> Iterator[RecordingProxy]:
    with RecordingProxy() as recorder:
        yield recorder


def run_cli(cli: Path, cwd: Path, proxy: RecordingProxy, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(cli), *args], cwd=cwd, env=proxy.env(), capture_output=True, text=True, timeout=CLI_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_cdk_json_turns_telemetry_and_notices_off_for_every_command(repo_root):
    cdk_json = json.loads((repo_root / "cdk.json").read_text())
    assert cdk_json["notices"] is False
    assert cdk_json["context"]["cli-telemetry"] is False


def test_the_cli_reads_telemetry_off_from_cdk_json(cdk_cli, repo_root, proxy):
    done = run_cli(cdk_cli, repo_root, proxy, "cli-telemetry", "--status")
    assert "CLI Telemetry is disabled" in done.stdout + done.stderr


@pytest.mark.slow
def test_make_synth_contacts_nothing(repo_root, cdk_cli, proxy, tmp_path):
    out = tmp_path / "cdk.out"
    synth_args = f"-c catalog={tmp_path / 'none.json'} -o {out}"
    done = subprocess.run(
        # -o: take the virtualenv and node_modules as they are (never install from a test)
        ["make", "--no-print-directory", *OLD_AS_IS, "synth", f"SYNTH_ARGS={synth_args}"],
        cwd=repo_root,
        env=proxy.env(),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert {p.name for p in out.glob("*.template.json")} == {
        f"{STORAGE_STACK}.template.json",
        f"{SERVING_STACK}.template.json",
    }
    assert proxy.wait() == [], "make synth reached for the network"


def test_a_plain_cli_command_posts_no_telemetry_and_would_without_cdk_json(cdk_cli, repo_root):
    """`cdk context` with cdk.json's settings sends nothing; the same command with telemetry
    switched back on (-c cli-telemetry=true) reaches for the AWS telemetry host through the
    proxy. So the CLI does use the proxy here, and cdk.json is what keeps it quiet."""
    with RecordingProxy() as quiet:
        run_cli(cdk_cli, repo_root, quiet, "context")
        assert quiet.wait() == []
    with RecordingProxy() as control:
        run_cli(cdk_cli, repo_root, control, "context", "-c", "cli-telemetry=true")
        assert any("cdk-cli-telemetry" in request for request in control.wait(CONTROL_WAIT_S)), (
            control.requests
        )
