"""The GPU tier's SageMaker container: HTTP on port 8080 (``SAGEMAKER_BIND_TO_PORT``).

A thin adapter: a threaded HTTP server hands ``(method, path, headers, body)`` to
:class:`tierserve.sagemaker_hosting.ModelHost` (``/ping``, ``/invocations`` and every OIP route) and
writes back what it answers. What this file adds is the transport:

- one thread per connection, HTTP/1.1 keep-alive, a listen backlog sized for bursts;
- graceful shutdown on SIGTERM (what ``docker stop`` and SageMaker send): stop accepting,
  let in-flight requests finish (up to ``TIERSERVE_DRAIN_TIMEOUT_S``), close idle
  keep-alive connections, then exit 0.

Run it as SageMaker does, ``serve`` (the executable next to this file), or
``python functions/gpu_server/serve --port 8081`` locally.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

from tierserve.httpserver import OipRequestHandler
from tierserve.sagemaker_hosting import ModelHost, ServerSettings, build_host
from tierserve.telemetry import logger

IDLE_TIMEOUT_S = 120  # a keep-alive connection with no request for this long is closed
LISTEN_BACKLOG = 1024
EXIT_CONFIG = 2


class DrainingHTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` that knows which connections are mid-request, so shutdown can
    wait for those and close the idle ones."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.draining = False
        self._lock = threading.Condition()
        self._busy: dict[socket.socket, bool] = {}  # connection -> mid-request
        self._served: set[socket.socket] = set()  # connections that completed a request

    def process_request(self, request: Any, client_address: Any) -> None:
        # Registered here, in the accepting thread, so a drain that starts after
        # serve_forever returns sees every accepted connection.
        with self._lock:
            self._busy[request] = False
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._busy.pop(request, None)
            self._served.discard(request)
            self._lock.notify_all()
        super().shutdown_request(request)

    def request_started(self, connection: socket.socket) -> None:
        with self._lock:
            self._busy[connection] = True

    def request_finished(self, connection: socket.socket) -> bool:
        """Mark ``connection`` idle; True when it should close (the server is draining)."""
        with self._lock:
            if connection in self._busy:
                self._busy[connection] = False
                self._served.add(connection)
            return self.draining

    def drain(self, timeout: float) -> bool:
        """Wait for in-flight requests; close keep-alive connections as they go idle.

        A connection that has not sent its first request yet is given until ``timeout``:
        its client connected to send one. Returns False when ``timeout`` ran out first.
        """
        with self._lock:
            self.draining = True
            deadline = time.monotonic() + timeout
            while self._busy:
                for connection, busy in self._busy.items():
                    if not busy and connection in self._served:
                        _stop_reading(connection)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(min(remaining, 0.05))
            return True


def _stop_reading(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):  # the handler's blocked read returns EOF and it exits
        connection.shutdown(socket.SHUT_RD)


def make_handler(host: ModelHost) -> type[BaseHTTPRequestHandler]:
    class Handler(OipRequestHandler):
        server_version = "tierserve-gpu"
        timeout = IDLE_TIMEOUT_S
        server: DrainingHTTPServer

        def parse_request(self) -> bool:
            self.server.request_started(self.connection)
            return super().parse_request()

        def handle_one_request(self) -> None:
            try:
                super().handle_one_request()
            finally:
                if self.server.request_finished(self.connection):
                    self.close_connection = True

        def respond(
            self, method: str, path: str, headers: dict[str, str], body: bytes
        ) -> tuple[int, Mapping[str, str], bytes]:
            response = host.respond(method, path, headers, body)
            return response.status, response.headers, response.body

        def send_payload(self, status: int, headers: Mapping[str, str], payload: bytes) -> None:
            if self.server.draining:
                self.close_connection = True
            super().send_payload(status, headers, payload)

    return Handler


def serve(host: ModelHost, address: tuple[str, int]) -> int:
    """Listen on ``address``, load the models in the background, serve until SIGTERM or
    SIGINT, drain, and return the exit status (0)."""
    httpd = DrainingHTTPServer(address, make_handler(host))
    host.start()
    install_signal_handlers(httpd)
    logger.info("GPU server listening", extra={"address": f"{address[0]}:{httpd.server_address[1]}"})
    run(httpd, host)
    return 0


def install_signal_handlers(httpd: DrainingHTTPServer) -> None:
    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("stopping: no new connections; draining in-flight requests", extra={"signal": signum})
        stop(httpd)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def stop(httpd: DrainingHTTPServer) -> None:
    """Make ``serve_forever`` return (from any thread, a signal handler included)."""
    threading.Thread(target=httpd.shutdown, name="tierserve-shutdown", daemon=True).start()


def run(httpd: DrainingHTTPServer, host: ModelHost) -> bool:
    """Serve until :func:`stop`, then stop accepting, drain and close the host; True when
    every in-flight request finished within the drain timeout."""
    try:
        httpd.serve_forever(poll_interval=0.1)
    finally:
        httpd.socket.close()  # new connections are refused from here on
        drained = httpd.drain(host.server.drain_timeout_s)
        host.close()
        logger.info("GPU server stopped", extra={"drained": drained})
    return drained


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="serve",
        description="tierserve GPU server: the SageMaker hosting contract (/ping, /invocations) and the "
        "Open Inference Protocol over one model. Configured by environment variables (docs/gpu-tier.md).",
    )
    every_interface = "0.0.0.0"  # noqa: S104 - SageMaker reaches the container from outside
    parser.add_argument("--host", default=every_interface, help="interface to bind (default all)")
    parser.add_argument("--port", type=int, default=None, help="default $SAGEMAKER_BIND_TO_PORT or 8080")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        host = build_host()
    except Exception as error:  # a configuration that can never serve: say so and exit
        message = getattr(error, "message", None) or str(error)
        logger.error("GPU server cannot start", extra={"error": message})
        print(f"serve: {message}", file=sys.stderr)
        return EXIT_CONFIG
    port = args.port if args.port is not None else host.server.port
    return serve(host, (args.host, port))


__all__ = ["DrainingHTTPServer", "ServerSettings", "main", "make_handler", "run", "serve", "stop"]
