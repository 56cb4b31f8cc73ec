"""The GPU server as its container runs it: the image's entrypoint (cuda_compat.sh) starting
the ``serve`` executable, on CPU, configured by environment variables only; and SIGTERM
draining in-flight requests before exiting 0."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from support.gpu import SERVE, request
from tierserve.protocol import decode_infer_response, encode_infer_request
from tierserve.tools.local.processes import free_port

ENTRYPOINT = SERVE.parent / "cuda_compat.sh"
ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERSERVE_")}
    env.pop("PYTHONPATH", None)  # serve finds the core by itself, as from a checkout
    return {**env, "POWERTOOLS_METRICS_DISABLED": "true", **extra}


@pytest.fixture
def start_serve(tmp_path) -> Iterator:
    processes: list[subprocess.Popen] = []

    def start(model_dir: Path, **extra: str) -> tuple[subprocess.Popen, int, Path]:
        port = free_port()
        env = child_env(
            SAGEMAKER_BIND_TO_PORT=str(port),
            TIERSERVE_MODEL_DIR=str(model_dir),
            TIERSERVE_CACHE_DIR=str(tmp_path / "cache"),
            **extra,
        )
        log_path = tmp_path / f"serve-{port}.log"
        log = log_path.open("wb")
        process = subprocess.Popen(
            [str(ENTRYPOINT), sys.executable, str(SERVE)], env=env, stdout=log, stderr=log
        )
        processes.append(process)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()[-3000:]
            try:
                if request(port, "GET", "/ping")[0] == 200:
                    return process, port, log_path
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("serve was not ready within 60 s")

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_image_command_answers_ping_and_invocations_on_cpu(iris_package, start_serve):
    assert os.access(SERVE, os.X_OK) and SERVE.read_text().startswith("#!/usr/bin/env python3")
    assert os.access(ENTRYPOINT, os.X_OK)
    process, port, _ = start_serve(iris_package.artifact.parent)
    encoded = encode_infer_request({"input": ROWS})
    status, headers, body = request(port, "POST", "/invocations", encoded.body, encoded.headers)
    assert status == 200, body
    assert decode_infer_response(body, headers)["label"].tolist() == [0, 2]
    metadata = json.loads(request(port, "GET", "/v2/models/iris")[2])
    assert metadata["parameters"]["execution_providers"] == ["CPUExecutionProvider"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(iris_package, start_serve):
    # A long queue delay holds the requests inside the server when SIGTERM arrives.
    process, port, log = start_serve(
        iris_package.artifact.parent,
        TIERSERVE_MAX_QUEUE_DELAY_MS="1500",
        TIERSERVE_DRAIN_TIMEOUT_S="15",
        POWERTOOLS_LOG_LEVEL="INFO",
    )
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # a keep-alive connection...
    idle.request("GET", "/v2/health/live")
    assert idle.getresponse().read() == b'{"live":true}'  # ...left idle: it must not hold the exit
    encoded = encode_infer_request({"input": ROWS})
    sent = threading.Barrier(9)

    def call(_: int) -> tuple[int, bytes]:
        sent.wait()
        status, _headers, body = request(port, "POST", "/v2/models/iris/infer", encoded.body, encoded.headers)
        return status, body

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call, i) for i in range(8)]
        sent.wait()
        time.sleep(0.5)  # the requests are in the server's queue now
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(OSError):  # no new connections once shutdown began
            request(port, "GET", "/ping")
        results = [future.result(timeout=30) for future in futures]
    assert [status for status, _ in results] == [200] * 8, results
    assert all(decode_infer_response(body, None)["label"].tolist() == [0, 2] for _, body in results)
    # The drain closed the idle keep-alive connection instead of waiting for it: EOF, no response.
    idle.sock.settimeout(30)
    assert idle.sock.recv(1) == b""
    idle.close()
    assert process.wait(30) == 0
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    stopped = [record for record in records if record.get("message") == "GPU server stopped"]
    # A held idle connection would have run the drain out of time (drained false).
    assert [record["drained"] for record in stopped] == [True], stopped
