"""``tierserve local`` with a model on each tier: the gpu-tier model is served by a GPU server
process (CPU provider) that the local API forwards to; the lambda-tier model by the handler.
And the command as users run it: SIGTERM stops it and its GPU server process, and removes its
state file."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from functools import partial
from pathlib import Path

import numpy as np

from tierserve.protocol import decode_infer_response, encode_infer_request
from tierserve.tools.local import samples
from tierserve.tools.local import stack as local_stack
from tierserve.tools.local.state import STATE_FILE


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, dict(response.headers.items()), response.read()


def test_the_local_api_forwards_a_gpu_tier_model_to_its_server_process(tmp_path, restore_environ):
    chosen = (
        local_stack.Sample("small", "1", partial(samples.mlp, features=4, hidden=8, layers=2, classes=3)),
        local_stack.Sample("tiny-gpu", "1", partial(samples.convnet, channels=4, classes=5), tier="gpu"),
    )
    stack = local_stack.start(tmp_path, port=0, chosen=chosen)
    try:
        assert [str(s.ref) for s in stack.gpu_servers] == ["tiny-gpu@1"]
        assert stack.api.upstreams == {"tiny-gpu": stack.gpu_servers[0].url}
        url = stack.api.url
        gpu_metadata = json.loads(http("GET", f"{url}/v2/models/tiny-gpu")[2])
        assert gpu_metadata["parameters"]["execution_providers"] == ["CPUExecutionProvider"]
        assert "dynamic_batching" in gpu_metadata["parameters"]  # answered by the GPU server
        encoded = encode_infer_request({"image": np.zeros((2, 3, 224, 224), np.float32)}, binary=True)
        status, headers, body = http("POST", f"{url}/v2/models/tiny-gpu/infer", encoded.body, encoded.headers)
        assert status == 200
        assert decode_infer_response(body, headers)["probabilities"].shape == (2, 5)
        small_metadata = json.loads(http("GET", f"{url}/v2/models/small")[2])
        assert "dynamic_batching" not in small_metadata["parameters"]  # the Lambda handler's answer
        assert "forwarded to its GPU server process" in local_stack.describe(stack)
        assert stack.captured == ["small", "tiny-gpu"]  # both tiers capture for drift
        process = stack.gpu_servers[0].process
    finally:
        stack.stop()
    assert process.returncode == 0  # SIGTERM, drained, exited cleanly


TIERSERVE = [sys.executable, "-c", "from tierserve.tools.cli import main; raise SystemExit(main())"]


def children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc: Linux, as CI)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_sigterm_stops_tierserve_local_and_its_gpu_server_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERSERVE_", "AWS_"))}
    log_path = tmp_path / "local.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*TIERSERVE, "local", "--port", "0", "--work-dir", str(tmp_path / "work")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    gpu_servers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while "serving the Open Inference Protocol" not in log_path.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        gpu_servers.extend(children_of(process.pid))
        assert len(gpu_servers) == 1, gpu_servers  # convnet-xl's
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()[-3000:]
        assert "tierserve local: stopping" in log_path.read_text()
        assert not (tmp_path / "work" / STATE_FILE).exists()  # the other commands see it stopped
        assert not Path(f"/proc/{gpu_servers[0]}").exists()  # drained and reaped, not orphaned
    finally:
        process.kill()
        for pid in gpu_servers:  # only if still that GPU server (pids are reused)
            with contextlib.suppress(OSError):
                if b"gpu_server/serve" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
