"""tierserve's HTTP servers (the GPU server, the local API): uvicorn over one small ASGI app.

A server is a *responder*, ``HttpRequest -> HttpResponse`` (a route table behind it,
synchronous), served by :func:`build_server`. This module is only the transport:

- uvicorn's event loop holds the connections (HTTP/1.1 keep-alive, pipelining, a listen
  backlog of :data:`LISTEN_BACKLOG`): an idle connection costs no thread, so hundreds of
  them never starve a request;
- the responder runs on a thread pool, so concurrent requests reach the model concurrently
  and the GPU server's batcher can merge them;
- every answer is a status line and ``{"error": ...}`` JSON, uvicorn's own refusals
  included (:class:`JsonErrorsProtocol`): a malformed request line or header (400), a
  method the parser does not know (405), a target over :attr:`ServerLimits.max_target_bytes`
  (414), headers over :attr:`ServerLimits.max_head_bytes` (431), a request head not complete
  within :attr:`ServerLimits.idle_timeout_s` of the connection going idle (408), a body over
  :attr:`ServerLimits.max_body_bytes` (413) or not arrived within
  :attr:`ServerLimits.body_timeout_s` (408); a refused request's connection is closed;
- graceful shutdown is uvicorn's: stop accepting, close idle connections, let in-flight
  requests finish (up to the drain timeout), then return; :attr:`OipServer.drained` says
  whether they all did. In the main thread SIGTERM and SIGINT start it
  (:func:`serve_until_stopped`); elsewhere :meth:`ServerThread.stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType
from typing import Any, ClassVar

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
)

from tierserve.errors import (
    BadRequest,
    HeadersTooLarge,
    MethodNotAllowed,
    ModelUnavailable,
    PayloadTooLarge,
    RequestTimeout,
    TierserveError,
    UriTooLong,
)
from tierserve.routes import HttpRequest, HttpResponse, error_response
from tierserve.telemetry import logger

Responder = Callable[[HttpRequest], HttpResponse]

LISTEN_BACKLOG = 2048
# The response carries its own length and connection; the server stamps date and server.
SERVER_OWNED_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}
PARSER_METHODS = ("GET", "POST")  # what a request whose method the parser refuses is told to use


@dataclass(frozen=True)
class ServerLimits:
    """What one server accepts. ``idle_timeout_s`` is both the keep-alive timeout and how long
    a connection may take to send a complete request head once it is open or idle."""

    max_body_bytes: int = 64 * 1024 * 1024
    max_target_bytes: int = 8 * 1024
    max_head_bytes: int = 64 * 1024
    idle_timeout_s: float = 60.0
    body_timeout_s: float = 60.0
    threads: int = 64


# ---------------------------------------------------------------- the protocol


class JsonErrorsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing in JSON what it would refuse in plain text, and
    bounding what it does not bound: the target, the head and the time to send a head."""

    limits: ClassVar[ServerLimits] = ServerLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # bytes received since the last request's headers were complete
        self._head_size = 0  # the current request's header lines, as parsed
        self._in_body = False  # between a request's headers and the end of its body
        self._refusal: TierserveError | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    @classmethod
    def with_limits(cls, limits: ServerLimits) -> type[JsonErrorsProtocol]:
        return type(cls.__name__, (cls,), {"limits": limits})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn writes a response's head and body in two sends: with Nagle's algorithm on, the
        # second waits for the client's delayed ACK (40 ms on Linux). asyncio turns it off only
        # for sockets it created itself, not for those accepted on a socket handed to it.
        with contextlib.suppress(OSError, AttributeError):
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if not self._in_body:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            return  # no protocol switches: the request is answered as plain HTTP
        except httptools.HttpParserError as error:
            self._refuse(self._refusal or parser_refusal(error, self.limits))
            return
        if not self._in_body and self._head_bytes > self.limits.max_head_bytes:
            # A head still incomplete past the limit (httptools would buffer it without end).
            self._refuse(self._headers_too_large())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_target_bytes:
            self._refusal = UriTooLong(
                f"the request target is over this server's limit of {self.limits.max_target_bytes:,} bytes: "
                "model names and versions are short; send data in the body"
            )
            raise self._refusal  # stops the parser; data_received answers it

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4  # as sent: "name: value\r\n"
        if self._head_size > self.limits.max_head_bytes:
            self._refusal = self._headers_too_large()
            raise self._refusal
        super().on_header(name, value)

    def _headers_too_large(self) -> HeadersTooLarge:
        return HeadersTooLarge(
            f"the request's headers are over this server's limit of {self.limits.max_head_bytes:,} bytes: "
            "send fewer or shorter headers"
        )

    def on_headers_complete(self) -> None:
        self._in_body = True
        self._head_bytes = 0
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def send_400_response(self, msg: str) -> None:  # any caller left in uvicorn answers in JSON too
        self._refuse(BadRequest(f"malformed HTTP request ({msg})"))

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.idle_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # closed already, or a request is being answered (its body has its own timeout)
        if self._head_bytes == 0:
            self.transport.close()  # idle: nothing to answer
            return
        self._refuse(
            RequestTimeout(
                f"the request's headers did not arrive within {self.limits.idle_timeout_s:g} s: "
                "send the whole request head at once"
            )
        )

    def _refuse(self, error: TierserveError) -> None:
        """Answer ``error`` on the raw transport and close the connection (what follows the
        refused request stays unread)."""
        self._cancel_head_timer()
        if self.transport.is_closing():
            return
        response = error_response(error)
        head = [STATUS_LINE[response.status]]
        for name, value in [*self.server_state.default_headers, *response_headers(response, close=True)]:
            head += [name, b": ", value, b"\r\n"]
        self.transport.write(b"".join([*head, b"\r\n", response.body]))
        self.transport.close()


def parser_refusal(error: httptools.HttpParserError, limits: ServerLimits) -> TierserveError:
    """What to tell a client whose request the HTTP parser refused (its reason is llhttp's,
    never the client's bytes)."""
    if str(error) == "Content-Length overflow":  # more digits than any body this server takes
        return body_too_large(limits.max_body_bytes)
    if isinstance(error, httptools.HttpParserInvalidMethodError):
        return MethodNotAllowed(
            f"the request's method is not one this server takes: use {' or '.join(PARSER_METHODS)}",
            PARSER_METHODS,
        )
    if isinstance(error, httptools.HttpParserCallbackError):
        return BadRequest("malformed HTTP request: the request line or a header could not be read")
    if isinstance(error, httptools.HttpParserInvalidURLError):
        return BadRequest(
            f"malformed request target ({error}): percent-encode spaces, control and non-ASCII "
            "characters in the path (e.g. %20, %C3%A9)"
        )
    return BadRequest(
        f"malformed HTTP request ({error}): send 'METHOD /path HTTP/1.1', headers, and a body "
        "framed by Content-Length or chunked encoding"
    )


# ---------------------------------------------------------------- the app


class _ClientGone(Exception):
    """The client closed the connection before its request arrived whole."""


class OipApp:
    """The ASGI app: reads a request within the limits, runs ``respond`` on the thread pool,
    writes its response. ``abandoned`` counts requests a drain timeout cut short."""

    def __init__(self, respond: Responder, limits: ServerLimits) -> None:
        self.respond = respond
        self.limits = limits
        self.executor = ThreadPoolExecutor(limits.threads, thread_name_prefix="tierserve-http")
        self.abandoned = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # lifespan is off and websockets are not served
        try:
            response, close = await self._answer(scope, receive)
        except Exception as error:  # never uvicorn's plain-text 500
            response, close = error_response(error), True
        except asyncio.CancelledError:
            # The drain timed out with this request still running: answer it, and end the task
            # here (re-raised, uvicorn would log the cancellation as an application error).
            self.abandoned += 1
            stopped = ModelUnavailable("the server stopped before this request finished: retry")
            with contextlib.suppress(Exception):
                await _send(send, error_response(stopped), close=True)
            return
        if response is not None:
            await _send(send, response, close)

    async def _answer(self, scope: dict[str, Any], receive: Any) -> tuple[HttpResponse | None, bool]:
        headers = request_headers(scope["headers"])
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                body = await read_body(receive, headers, self.limits.max_body_bytes)
        except _ClientGone:
            return None, True
        except TimeoutError:
            late = RequestTimeout(
                f"the request body did not arrive within {self.limits.body_timeout_s:g} s: "
                "send it at once, with the exact Content-Length"
            )
            return error_response(late), True
        except TierserveError as error:  # over the limit: the rest of the body stays unread
            return error_response(error), True
        request = HttpRequest(scope["method"], scope["path"], headers, body, request_target(scope))
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, self.respond, request), False
        except Exception as error:
            return error_response(error), False

    def close(self) -> None:
        """Stop the thread pool (threads still running a request finish it)."""
        self.executor.shutdown(wait=False, cancel_futures=True)


def request_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """ASGI's header list as a dict (lower-case names; a repeated header's values joined)."""
    headers: dict[str, str] = {}
    for name, value in raw:
        key, text = name.decode("latin-1"), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def request_target(scope: dict[str, Any]) -> str:
    """The path and query as the client sent them (the parser let only ASCII through)."""
    target = scope["raw_path"].decode("latin-1")
    query = scope.get("query_string") or b""
    return f"{target}?{query.decode('latin-1')}" if query else target


async def read_body(receive: Any, headers: dict[str, str], limit: int) -> bytes:
    """The request body, however it is framed, never more than ``limit`` bytes.

    Raises:
        PayloadTooLarge: the declared or the received length is over ``limit``.
    """
    too_large = body_too_large(limit)
    declared = headers.get("content-length")  # the parser lets only digits through
    if declared is not None:
        digits = declared.strip().lstrip("0") or "0"  # int() refuses past 4,300 digits
        if len(digits) > len(str(limit)) or int(digits) > limit:
            raise too_large
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def body_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"request body is over this server's limit of {limit:,} bytes: split the batch into smaller requests"
    )


def response_headers(response: HttpResponse, *, close: bool) -> list[tuple[bytes, bytes]]:
    """The response's headers as uvicorn writes them, with its length (and ``connection:
    close``); a header HTTP cannot carry is dropped and logged rather than failing the answer."""
    pairs = []
    for name, value in response.headers.items():
        if name.lower() in SERVER_OWNED_HEADERS:
            continue
        try:
            pair = (name.lower().encode("latin-1"), value.encode("latin-1"))
        except UnicodeEncodeError:
            pair = (b"", b"\n")
        if HEADER_RE.search(pair[0]) or not pair[0] or HEADER_VALUE_RE.search(pair[1]):
            logger.warning("response header dropped: not valid in HTTP", extra={"header": name[:80]})
            continue
        pairs.append(pair)
    pairs.append((b"content-length", str(len(response.body)).encode()))
    if close:
        pairs.append((b"connection", b"close"))
    return pairs


async def _send(send: Any, response: HttpResponse, close: bool) -> None:
    headers = response_headers(response, close=close)
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


# ---------------------------------------------------------------- the server


class OipServer(uvicorn.Server):
    """uvicorn's server over an :class:`OipApp`; ``drained`` after it returns."""

    def __init__(self, config: uvicorn.Config, app: OipApp) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            logger.info("stopping: no new connections; draining in-flight requests", extra={"signal": sig})
        super().handle_exit(sig, frame)

    @property
    def drained(self) -> bool:
        """True unless the drain timeout cut a request short."""
        return self.app.abandoned == 0


def build_server(
    respond: Responder, *, name: str, limits: ServerLimits = ServerLimits(), drain_timeout_s: float = 30.0
) -> OipServer:
    """A server for ``respond`` (not yet serving: see :func:`serve_until_stopped`,
    :class:`ServerThread`); ``name`` goes into the ``Server`` header."""
    app = OipApp(respond, limits)
    config = uvicorn.Config(
        app,
        http=JsonErrorsProtocol.with_limits(limits),
        ws="none",
        lifespan="off",
        loop="auto",  # uvloop where it is installed (the GPU server image), else asyncio
        interface="asgi3",
        log_config=None,  # tierserve's logger says what matters; uvicorn's stays quiet
        access_log=False,
        proxy_headers=False,
        server_header=False,
        headers=[("Server", name)],
        backlog=LISTEN_BACKLOG,
        timeout_keep_alive=limits.idle_timeout_s,  # type: ignore[arg-type] - a float works
        timeout_graceful_shutdown=drain_timeout_s,  # type: ignore[arg-type]
    )
    return OipServer(config, app)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), bound now so a busy port fails
    before anything else starts.

    Raises:
        OSError: the address is in use or not this machine's.
    """
    return socket.create_server((host, port), backlog=LISTEN_BACKLOG)


def serve_until_stopped(server: OipServer, sock: socket.socket) -> bool:
    """Serve on ``sock`` in this thread until SIGTERM or SIGINT (or ``should_exit``), drain, and
    return :attr:`OipServer.drained`."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # uvicorn handles both signals while it serves and raises the one it got again once it
        # has drained, for the handler that was there before. With this one there, a drained
        # server returns (and the process exits 0) instead of dying of its own signal, and a
        # signal that comes before uvicorn listens for it still stops the server.
        def stop(_signum: int, _frame: FrameType | None) -> None:
            server.should_exit = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.app.close()
    return server.drained


class ServerThread:
    """A server on a background thread (the local API, tests); ``stop()`` drains it."""

    def __init__(self, server: OipServer, sock: socket.socket, *, name: str) -> None:
        self.server = server
        self.address: tuple[str, int] = sock.getsockname()[:2]
        self.drained: bool | None = None
        self.thread = threading.Thread(target=self._run, args=(sock,), name=name, daemon=True)

    def _run(self, sock: socket.socket) -> None:
        self.drained = serve_until_stopped(self.server, sock)

    def start(self, timeout: float = 30.0) -> ServerThread:
        """Start serving; returns once the server accepts connections.

        Raises:
            RuntimeError: it did not start within ``timeout``.
        """
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server on {self.address[0]}:{self.address[1]} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop accepting, drain in-flight requests, and wait for the thread (the drain timeout
        bounds the wait)."""
        self.server.should_exit = True
        self.thread.join(float(self.server.config.timeout_graceful_shutdown or 30) + 10)
