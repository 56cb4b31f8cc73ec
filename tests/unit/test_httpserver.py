"""The plain HTTP request handler over a real socket on 127.0.0.1: how it frames request bodies
(Content-Length only, within a bound) and that every refusal is a JSON error."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator, Mapping
from http.server import ThreadingHTTPServer

import pytest

from tierserve.errors import INTERNAL_ERROR_MESSAGE
from tierserve.httpserver import OipRequestHandler

LIMIT = 1024
READ_TIMEOUT_S = 30  # a handler waiting on the client instead of answering fails the test here


class EchoServer:
    """An ``OipRequestHandler`` that answers with the length of the body it was given."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        server = self

        class Handler(OipRequestHandler):
            max_body_bytes = LIMIT

            def respond(
                self, method: str, path: str, headers: dict[str, str], body: bytes
            ) -> tuple[int, Mapping[str, str], bytes]:
                server.bodies.append(body)
                if path == "/boom":
                    raise RuntimeError("secret internals")
                return 200, {"Content-Type": "application/json"}, json.dumps({"length": len(body)}).encode()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[EchoServer]:
    started = EchoServer()
    yield started
    started.stop()


def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes, socket.socket]:
    """Send ``raw`` as is (the connection stays open for writing) and read one response."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S)
    connection.sendall(raw)
    return (*read_response(connection), connection)


def read_response(connection: socket.socket) -> tuple[int, dict[str, str], bytes]:
    reader = connection.makefile("rb")
    status = int(reader.readline().split()[1])
    headers = {}
    while (line := reader.readline().decode("latin-1").strip()) != "":
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, reader.read(int(headers["content-length"]))


def post(headers: str, body: bytes = b"") -> bytes:
    return f"POST /infer HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode() + body


def error_of(body: bytes) -> str:
    return json.loads(body)["error"]


def test_a_body_with_content_length_is_read_and_the_connection_kept(server):
    status, headers, body, connection = exchange(server.port, post("Content-Length: 5\r\n", b"hello"))
    assert status == 200 and json.loads(body) == {"length": 5}
    assert headers.get("connection") != "close"
    connection.sendall(post("Content-Length: 2\r\n", b"hi"))  # keep-alive: a second request
    status, _, body = read_response(connection)
    connection.close()
    assert status == 200 and json.loads(body) == {"length": 2}


@pytest.mark.parametrize("value", ["-1", "abc", "1e3", "0x10", "", "5, 5"])
def test_a_content_length_that_is_not_a_byte_count_is_a_400(server, value):
    # Body bytes follow and the client keeps the connection open: nothing may wait for more.
    status, headers, body, connection = exchange(server.port, post(f"Content-Length: {value}\r\n", b"x" * 10))
    connection.close()
    assert status == 400, body
    assert headers["content-type"] == "application/json"
    assert "Content-Length must be a whole number of bytes" in error_of(body)
    assert headers["connection"] == "close"
    assert server.bodies == []


def test_conflicting_content_lengths_are_a_400(server):
    status, _, body, connection = exchange(
        server.port, post("Content-Length: 5\r\nContent-Length: 3\r\n", b"hello")
    )
    connection.close()
    assert status == 400 and "Content-Length" in error_of(body)
    assert server.bodies == []


def test_chunked_bodies_are_refused_with_a_json_error(server):
    chunked = b"5\r\nhello\r\n0\r\n\r\n"
    status, headers, body, connection = exchange(server.port, post("Transfer-Encoding: chunked\r\n", chunked))
    connection.close()
    assert status in (400, 411), body
    assert "Content-Length" in error_of(body) and "chunked" in error_of(body)
    assert headers["connection"] == "close"
    assert server.bodies == []


@pytest.mark.parametrize(
    "length",
    [str(LIMIT + 1), "1" + "0" * 30, "9" * 5000, "0" * 5000 + "1025"],
    ids=["over", "huge", "5000-digits", "leading-zeros"],
)
def test_a_body_over_the_limit_is_a_413_and_never_read(server, length):
    status, headers, body, connection = exchange(
        server.port, post(f"Content-Length: {length}\r\n", b"x" * 10)
    )
    connection.close()
    assert status == 413, body
    assert f"over this server's limit of {LIMIT:,} bytes" in error_of(body)
    assert headers["connection"] == "close"
    assert server.bodies == []


@pytest.mark.parametrize("length", [str(LIMIT), "000" + str(LIMIT)])
def test_a_body_at_the_limit_is_read_whole(server, length):
    status, _, body, connection = exchange(server.port, post(f"Content-Length: {length}\r\n", b"x" * LIMIT))
    connection.close()
    assert status == 200 and json.loads(body) == {"length": LIMIT}


def test_a_failing_responder_is_a_json_500_that_leaks_nothing(server):
    raw = b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n"
    status, headers, body, connection = exchange(server.port, raw)
    connection.close()
    assert status == 500 and headers["content-type"] == "application/json"
    assert error_of(body) == INTERNAL_ERROR_MESSAGE  # no internals
