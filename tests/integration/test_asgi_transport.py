"""The HTTP transport both servers share (tierserve.asgi: uvicorn and its ASGI app) over real
sockets on 127.0.0.1, with responders of the tests' own: requests reach the responder
concurrently, a failing responder is a JSON 500 that leaks nothing, a header HTTP cannot carry
never breaks an answer, accepted connections send without Nagle's delay, and the drain lets in-flight requests finish or, past its timeout,
answers them 503 and says it did not drain."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from support.rawhttp import connect, exchange, get, read_reply
from tierserve.asgi import ServerLimits, ServerThread, bind, build_server
from tierserve.errors import INTERNAL_ERROR_MESSAGE
from tierserve.routes import HttpRequest, HttpResponse

Responder = Callable[[HttpRequest], HttpResponse]


@pytest.fixture
def start() -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def run(respond: Responder, *, drain_timeout_s: float = 30.0, **limits: float) -> ServerThread:
        server = build_server(
            respond, name="test", limits=ServerLimits(**limits), drain_timeout_s=drain_timeout_s
        )
        thread = ServerThread(server, bind("127.0.0.1", 0), name="test-http").start()
        started.append(thread)
        return thread

    yield run
    for thread in started:
        thread.stop()


def test_requests_reach_the_responder_concurrently(start):
    meet = threading.Barrier(8, timeout=20)  # breaks (a 500) unless 8 requests are inside at once

    def respond(request: HttpRequest) -> HttpResponse:
        meet.wait()
        return HttpResponse.json({"path": request.path})

    port = start(respond).address[1]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: exchange(port, get(f"/{i}")), range(8)))
    assert [r.status for r in replies] == [200] * 8
    assert sorted(r.json()["path"] for r in replies) == [f"/{i}" for i in range(8)]


def test_a_failing_responder_is_a_json_500_that_leaks_nothing(start):
    def respond(_request: HttpRequest) -> HttpResponse:
        raise RuntimeError("/secret/internals")

    reply = exchange(start(respond).address[1], get("/boom"))
    assert reply.status == 500
    assert reply.error() == INTERNAL_ERROR_MESSAGE


def test_a_header_http_cannot_carry_is_dropped_not_fatal(start):
    def respond(_request: HttpRequest) -> HttpResponse:
        headers = {
            "Content-Type": "application/json",
            "X-Bad": "a\r\nInjected: 1",
            "X-Nice": "é€",
            "X-Ok": "1",
        }
        return HttpResponse(200, b"{}", headers)

    reply = exchange(start(respond).address[1], get("/"))
    assert reply.status == 200 and reply.body == b"{}"
    assert reply.headers["x-ok"] == "1"
    assert "x-bad" not in reply.headers and "injected" not in reply.headers and "x-nice" not in reply.headers


def test_the_request_reaches_the_responder_as_sent(start):
    seen: list[HttpRequest] = []

    def respond(request: HttpRequest) -> HttpResponse:
        seen.append(request)
        return HttpResponse.json({})

    port = start(respond).address[1]
    raw = b"POST /v2/models/a%20b/infer?x=1 HTTP/1.1\r\nHost: x\r\nX-Two: a\r\nX-Two: b\r\nContent-Length: 3\r\n\r\nabc"
    assert exchange(port, raw).status == 200
    (request,) = seen
    assert (request.method, request.path, request.target) == (
        "POST",
        "/v2/models/a b/infer",
        "/v2/models/a%20b/infer?x=1",
    )
    assert request.body == b"abc" and request.headers["x-two"] == "a, b"


def test_stopping_lets_in_flight_requests_finish_and_closes_idle_connections(start):
    inside, release = threading.Event(), threading.Event()

    def respond(request: HttpRequest) -> HttpResponse:
        if request.path == "/slow":
            inside.set()
            release.wait(20)
        return HttpResponse.json({"path": request.path})

    served = start(respond)
    idle = connect(served.address[1])
    idle.sendall(get("/fast"))
    assert read_reply(idle).status == 200  # a keep-alive connection, now idle
    with connect(served.address[1]) as busy:
        busy.sendall(get("/slow"))
        assert inside.wait(20)
        stopping = threading.Thread(target=served.stop)
        stopping.start()
        assert idle.recv(1) == b""  # the idle connection is closed at once
        release.set()
        reply = read_reply(busy)
    stopping.join(30)
    idle.close()
    assert reply.status == 200 and reply.closes
    assert served.drained is True


def test_a_drain_that_times_out_answers_503_and_says_it_did_not_drain(start):
    inside, release = threading.Event(), threading.Event()

    def respond(_request: HttpRequest) -> HttpResponse:
        inside.set()
        release.wait(20)
        return HttpResponse.json({})

    served = start(respond, drain_timeout_s=0.5)
    try:
        with connect(served.address[1]) as busy:
            busy.sendall(get("/stuck"))
            assert inside.wait(20)
            served.stop()
            reply = read_reply(busy)
    finally:
        release.set()
    assert reply.status == 503 and "stopped before this request finished" in reply.error()
    assert served.drained is False


def test_accepted_connections_send_without_waiting_for_acks(start):
    # A response goes out in two sends (head, body): with Nagle's algorithm on, the second would
    # wait for the client's delayed ACK, 40 ms on every keep-alive request.
    served = start(lambda _request: HttpResponse.json({}))
    with connect(served.address[1]) as connection:
        connection.sendall(get("/"))
        assert read_reply(connection).status == 200
        (protocol,) = served.server.server_state.connections
        accepted = protocol.transport.get_extra_info("socket")
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
