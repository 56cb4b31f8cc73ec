"""Both HTTP servers tierserve runs, the GPU server and the local API, over raw sockets on
127.0.0.1: every answer is a status line and ``{"error": ...}`` JSON, whatever a client sends
(a malformed request line, a method no route takes, oversized headers or targets, control or
non-ASCII bytes in the path, bodies too large, framed oddly or never finished); hundreds of
idle connections do not keep a request waiting."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from support.common import make_handler
from support.gpu import InProcessServer
from support.rawhttp import connect, exchange, get, post, read_reply
from tierserve.asgi import ServerLimits
from tierserve.protocol import decode_infer_response, encode_infer_request
from tierserve.tools.local.api_server import LIMITS as LOCAL_LIMITS
from tierserve.tools.local.api_server import LocalApi
from tierserve.tools.packaging import PackagedModel, package_model

GPU_MODEL = "gpu-iris"  # served by the GPU server; the local API forwards it there
BODY_LIMIT = 16 * 1024
QUICK = ServerLimits(max_body_bytes=BODY_LIMIT, idle_timeout_s=1, body_timeout_s=1)
ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
KINDS = ["gpu", "local"]


@dataclass
class Served:
    kind: str
    port: int


@pytest.fixture(scope="module")
def gpu_package(iris_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> PackagedModel:
    return package_model(iris_onnx, name=GPU_MODEL, version="1", out_dir=tmp_path_factory.mktemp("gpu-pkg"))


@pytest.fixture
def serve(request, gpu_package, tmp_path) -> Iterator[Callable[..., Served]]:
    """``serve(kind, limits)``: the GPU server on the gpu-iris package, or the local API with the
    Lambda handler serving iris (from the embedded S3) and gpu-iris forwarded to a GPU server."""
    stops: list[Callable[[], None]] = []

    def start_gpu(limits: ServerLimits | None) -> InProcessServer:
        environ = {
            "TIERSERVE_MODEL_DIR": str(gpu_package.artifact.parent),
            "TIERSERVE_CACHE_DIR": str(tmp_path / "gpu-cache"),
            "POWERTOOLS_METRICS_DISABLED": "true",
        }
        gpu = InProcessServer(environ, limits=limits)
        stops.append(gpu.stop)
        assert gpu.host.wait_ready(30)
        return gpu

    def start(kind: str, limits: ServerLimits | None = QUICK) -> Served:
        if kind == "gpu":
            return Served(kind, start_gpu(limits).port)
        request.getfixturevalue("uploaded_iris")  # the embedded S3 with iris@1 for the handler
        handler = make_handler(request.getfixturevalue("monkeypatch"), tmp_path / "cache")
        upstream = start_gpu(None)
        upstreams = {GPU_MODEL: f"http://127.0.0.1:{upstream.port}"}
        api = LocalApi(handler, port=0, upstreams=upstreams, limits=limits or LOCAL_LIMITS).start()
        stops.append(api.stop)
        return Served(kind, int(api.url.rsplit(":", 1)[1]))

    yield start
    for stop in reversed(stops):
        stop()


def infer_body() -> tuple[bytes, dict[str, str]]:
    encoded = encode_infer_request({"input": ROWS})
    return encoded.body, encoded.headers


@pytest.mark.parametrize("kind", KINDS)
def test_requests_on_one_keep_alive_connection_are_answered_in_turn(kind, serve):
    served = serve(kind)
    body, _ = infer_body()
    models = [GPU_MODEL] * 3 if kind == "gpu" else ["iris", GPU_MODEL, "iris"]  # handler, forwarded
    with connect(served.port) as connection:
        for model in models:
            connection.sendall(post(f"/v2/models/{model}/infer", body, "Content-Type: application/json\r\n"))
            reply = read_reply(connection)
            assert reply.status == 200, reply.body
            assert not reply.closes
            assert decode_infer_response(reply.body, reply.headers)["label"].tolist() == [0, 2]


MALFORMED = {
    "http-version": b"GET /v2 HTTP/9.9\r\nHost: x\r\n\r\n",
    "bare-newlines": b"GET /v2 HTTP/1.1\nHost: x\n\n",
    "header-without-colon": b"GET /v2 HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "control-byte-in-header": b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Trace: a\x01b\r\n\r\n",
    "chunk-size": b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "unknown-transfer-coding": b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_a_malformed_request_is_a_json_400_and_its_connection_closes(kind, serve, raw):
    reply = exchange(serve(kind).port, raw)
    assert reply.status == 400, reply.body
    assert "malformed" in reply.error()
    assert reply.closes


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "PATCH", "PUT", "DELETE", "PROPFIND"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_method_no_route_takes_is_a_405_naming_the_ones_it_takes(kind, serve, method):
    served = serve(kind)
    for path, allowed in [
        ("/v2/health/live", "GET"),
        ("/v2/models/iris/infer", "POST"),  # on the local API, the Lambda handler's model
        (f"/v2/models/{GPU_MODEL}/infer", "POST"),  # ... and the one it forwards
        (f"/v2/models/{GPU_MODEL}", "GET"),
    ]:
        raw = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
        reply = exchange(served.port, raw, head=method == "HEAD")
        assert reply.status == 405, (path, reply.body)
        assert reply.headers["allow"] == allowed, path
        assert reply.headers["content-type"] == "application/json"
        if method != "HEAD":  # a HEAD answer has no body, by HTTP
            assert reply.error().endswith(f"use {allowed}"), path


@pytest.mark.parametrize("raw", [b"BREW /v2 HTTP/1.1\r\n\r\n", b"garbage\r\n\r\n"], ids=["brew", "garbage"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_method_the_parser_does_not_know_is_a_405_too(kind, serve, raw):
    reply = exchange(serve(kind).port, raw)
    assert reply.status == 405 and reply.headers["allow"] == "GET, POST"
    assert "use GET or POST" in reply.error()
    assert reply.closes


@pytest.mark.parametrize("kind", KINDS)
def test_headers_over_the_limit_are_a_json_431(kind, serve):
    served = serve(kind)
    one_huge = get("/v2/health/live", "X-Big: " + "a" * 100_000 + "\r\n")
    many = get("/v2/health/live", "".join(f"X-{i}: {'b' * 20}\r\n" for i in range(5_000)))
    for raw in (one_huge, many):
        reply = exchange(served.port, raw)
        assert reply.status == 431, reply.body
        assert "headers are over this server's limit of 65,536 bytes" in reply.error()
        assert reply.closes


@pytest.mark.parametrize("kind", KINDS)
def test_a_target_over_the_limit_is_a_json_414(kind, serve):
    reply = exchange(serve(kind).port, get("/v2/models/" + "m" * 20_000))
    assert reply.status == 414, reply.body
    assert "request target is over this server's limit of 8,192 bytes" in reply.error()


@pytest.mark.parametrize(
    "path",
    [
        f"/v2/models/{GPU_MODEL}\x01/ready".encode(),
        f"/v2/models/{GPU_MODEL}/versions/é/ready".encode(),
        f"/v2/models/{GPU_MODEL}\x7f".encode(),
        f"/v2/models/{GPU_MODEL}/versions/1\t/ready".encode(),
        "/v2/models/iris/versions/é".encode(),
    ],
    ids=["control", "non-ascii", "delete", "tab", "lambda-tier-non-ascii"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_a_control_or_non_ascii_byte_in_the_path_is_a_json_400(kind, serve, path):
    reply = exchange(serve(kind).port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.status == 400, reply.body
    assert "percent-encode" in reply.error()


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        (f"/v2/models/{GPU_MODEL}/versions/%C3%A9/ready", "deployed version"),
        (f"/v2/models/{GPU_MODEL}%01/ready", "is not served here"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_percent_encoded_bytes_reach_the_route_and_get_its_404(kind, serve, path, fragment):
    reply = exchange(serve(kind).port, get(path))
    assert reply.status == 404, reply.body
    assert fragment in reply.error()


@pytest.mark.parametrize("kind", KINDS)
def test_a_body_over_the_limit_is_a_json_413_and_never_read(kind, serve):
    served = serve(kind)
    for length in (str(BODY_LIMIT + 1), "1" + "0" * 30, "0" * 5000 + str(BODY_LIMIT + 1)):
        raw = f"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()
        reply = exchange(served.port, raw + b"x" * 10)
        assert reply.status == 413, (length[:40], reply.body)
        assert f"over this server's limit of {BODY_LIMIT:,} bytes" in reply.error()
        assert reply.closes
    chunk = b"x" * 4096
    chunked = b"".join(b"1000\r\n" + chunk + b"\r\n" for _ in range(5)) + b"0\r\n\r\n"
    raw = b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    reply = exchange(served.port, raw + chunked)
    assert reply.status == 413 and reply.closes, reply.body


@pytest.mark.parametrize("value", ["-1", "abc", "1e3", "0x10", "", "5, 5"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_content_length_that_is_not_a_byte_count_is_a_json_400(kind, serve, value):
    raw = f"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {value}\r\n\r\n".encode()
    reply = exchange(serve(kind).port, raw + b"x" * 10)
    assert reply.status == 400, reply.body
    assert "Content-Length" in reply.error()
    assert reply.closes


@pytest.mark.parametrize("kind", KINDS)
def test_a_chunked_body_is_read_whole(kind, serve):
    served = serve(kind)
    body, _ = infer_body()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:])) + b"0\r\n\r\n"
    for model in ("iris", GPU_MODEL):
        raw = f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        reply = exchange(served.port, raw.encode() + chunked)
        if kind == "gpu" and model == "iris":
            assert reply.status == 404  # the GPU server serves gpu-iris only
            continue
        assert reply.status == 200, reply.body
        assert json.loads(reply.body)["outputs"][0]["name"] in {"label", "probabilities"}


@pytest.mark.parametrize("kind", KINDS)
def test_a_request_that_never_arrives_whole_is_a_json_408(kind, serve):
    served = serve(kind)
    for raw in (
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n",  # the head never ends
        b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",  # nor the body
    ):
        reply = exchange(served.port, raw)  # the read timeout bounds the wait: 30 s
        assert reply.status == 408, reply.body
        assert "did not arrive within 1 s" in reply.error()
        assert reply.closes
    with connect(served.port) as idle:  # a connection that sends nothing is closed, unanswered
        assert idle.recv(1) == b""


@pytest.mark.parametrize("kind", KINDS)
def test_300_idle_connections_do_not_keep_a_request_waiting(kind, serve):
    served = serve(kind, None)  # the servers' own limits (a minute or more of idleness allowed)
    idle: list[socket.socket] = []
    try:
        for index in range(300):
            connection = connect(served.port)
            if index % 2:  # half send the start of a request head and stall
                connection.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
            idle.append(connection)
        body, _ = infer_body()
        model = GPU_MODEL if kind == "gpu" else "iris"
        reply = exchange(
            served.port, post(f"/v2/models/{model}/infer", body, "Content-Type: application/json\r\n")
        )
        assert reply.status == 200, reply.body
        assert decode_infer_response(reply.body, reply.headers)["label"].tolist() == [0, 2]
    finally:
        for connection in idle:
            connection.close()
