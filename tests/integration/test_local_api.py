"""The local API's own behaviour over real HTTP on 127.0.0.1: like one Lambda execution
environment it hands the handler one request at a time, while the models it forwards to their
GPU server run side by side; an upstream that is down is a JSON 503."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from support.rawhttp import exchange, get, post
from tierserve.asgi import ServerLimits, ServerThread, bind, build_server
from tierserve.routes import HttpRequest, HttpResponse
from tierserve.tools.local.api_server import LocalApi
from tierserve.tools.local.processes import free_port


class RecordingHandler:
    """A Lambda handler that notes how many invocations overlap and echoes the event."""

    def __init__(self) -> None:
        self.inside = 0
        self.most_inside = 0
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any], _context: Any) -> dict[str, Any]:
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        time.sleep(0.02)  # long enough for concurrent requests to collide if let through together
        with self._lock:
            self.inside -= 1
        body = {"path": event["path"], "method": event["httpMethod"], "body": event["body"]}
        return {"statusCode": 200, "headers": {"Content-Type": "application/json"}, "body": json.dumps(body)}


@pytest.fixture
def apis() -> Iterator[list[Any]]:
    running: list[Any] = []
    yield running
    for api in running:
        api.stop()


def test_the_handler_serves_one_request_at_a_time(apis):
    handler = RecordingHandler()
    api = LocalApi(handler, port=0).start()
    apis.append(api)
    port = int(api.url.rsplit(":", 1)[1])
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: exchange(port, post(f"/v2/models/m{i}/infer", b"{}")), range(16)))
    assert [r.status for r in replies] == [200] * 16
    assert {r.json()["path"] for r in replies} == {f"/v2/models/m{i}/infer" for i in range(16)}
    assert handler.most_inside == 1


def test_forwarded_models_run_side_by_side_and_keep_their_body_and_target(apis):
    meet = threading.Barrier(4, timeout=20)  # breaks (a 500) unless 4 forwarded requests overlap
    seen: list[HttpRequest] = []

    def upstream(request: HttpRequest) -> HttpResponse:
        seen.append(request)
        meet.wait()
        return HttpResponse(
            200, request.body, {"Content-Type": "application/octet-stream", "X-Upstream": "1"}
        )

    gpu = ServerThread(
        build_server(upstream, name="gpu", limits=ServerLimits()), bind("127.0.0.1", 0), name="gpu"
    )
    apis.append(gpu.start())
    api = LocalApi(
        RecordingHandler(), port=0, upstreams={"big": f"http://127.0.0.1:{gpu.address[1]}"}
    ).start()
    apis.append(api)
    port = int(api.url.rsplit(":", 1)[1])
    payload = bytes(range(256))
    request = post(
        "/v2/models/big/versions/%C3%A9/infer?x=1", payload, "Content-Type: application/octet-stream\r\n"
    )
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: exchange(port, request), range(4)))
    assert [r.status for r in replies] == [200] * 4
    assert all(r.body == payload and r.headers["x-upstream"] == "1" for r in replies)
    assert {r.target for r in seen} == {"/v2/models/big/versions/%C3%A9/infer?x=1"}


def test_an_upstream_that_is_down_is_a_json_503(apis):
    api = LocalApi(RecordingHandler(), port=0, upstreams={"big": f"http://127.0.0.1:{free_port()}"}).start()
    apis.append(api)
    reply = exchange(int(api.url.rsplit(":", 1)[1]), get("/v2/models/big"))
    assert reply.status == 503
    assert "GPU tier is unavailable" in reply.error()


def test_binary_bodies_reach_the_handler_base64_encoded(apis):
    api = LocalApi(RecordingHandler(), port=0).start()
    apis.append(api)
    payload = b"\x00\xff" * 10
    raw = post("/v2/models/m/infer", payload, "Content-Type: application/octet-stream\r\n")
    reply = exchange(int(api.url.rsplit(":", 1)[1]), raw)
    assert reply.status == 200
    assert base64.b64decode(reply.json()["body"]) == payload
