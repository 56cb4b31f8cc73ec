"""The local API's own behaviour over real HTTP on 127.0.0.1: each model has its own execution
environment, which takes one request at a time as a Lambda execution environment does, while
the other models' environments, and the models it forwards to their GPU server, run side by
side; an upstream that is down is a JSON 503."""

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


def port_of(api: LocalApi) -> int:
    return int(api.url.rsplit(":", 1)[1])


def test_each_environment_serves_one_request_at_a_time(apis):
    front, small, large = RecordingHandler(), RecordingHandler(), RecordingHandler()
    api = LocalApi(front, functions={"small": small, "large": large}, port=0).start()
    apis.append(api)
    paths = [f"/v2/models/{m}/infer" for m in ("small", "large", "unknown")] + ["/v2/health/ready"]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: exchange(port_of(api), post(paths[i % 4], b"{}")), range(32)))
    assert [r.status for r in replies] == [200] * 32
    assert [r.json()["path"] for r in replies] == [paths[i % 4] for i in range(32)]
    assert (small.most_inside, large.most_inside, front.most_inside) == (1, 1, 1)


class MeetingHandler(RecordingHandler):
    """Answers only once ``meet``'s other parties call too: it breaks (and the test fails)
    unless the environments run side by side."""

    def __init__(self, meet: threading.Barrier) -> None:
        super().__init__()
        self.meet = meet

    def __call__(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        self.meet.wait()
        return super().__call__(event, context)


def test_the_models_environments_and_the_front_run_side_by_side(apis):
    """A model that is slow (a cold load) never holds up another model, nor health."""
    meet = threading.Barrier(3, timeout=20)
    api = LocalApi(
        MeetingHandler(meet), functions={"a": MeetingHandler(meet), "b": MeetingHandler(meet)}, port=0
    ).start()
    apis.append(api)
    requests = [post("/v2/models/a/infer", b"{}"), post("/v2/models/b/infer", b"{}"), get("/v2/health/live")]
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda raw: exchange(port_of(api), raw), requests))
    assert [r.status for r in replies] == [200] * 3


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
