"""The request handler behind tierserve's plain HTTP servers (the local API, the GPU server).

A subclass says how to ``respond``; this class reads the body within a bound, turns an
unexpected failure into a JSON 500 that leaks nothing, and writes the response.
"""

from __future__ import annotations

from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler
from typing import Any

from tierserve.telemetry import logger

MAX_BODY_BYTES = 64 * 1024 * 1024
JSON = {"Content-Type": "application/json"}
HOP_BY_HOP = {"content-length", "transfer-encoding", "connection"}


class OipRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle's algorithm on, the second waits for
    # the client's delayed ACK (40 ms on Linux) on every keep-alive request.
    disable_nagle_algorithm = True
    max_body_bytes = MAX_BODY_BYTES

    def respond(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, Mapping[str, str], bytes]:
        raise NotImplementedError

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.max_body_bytes:
            self.close_connection = True  # the body stays unread
            limit_mb = self.max_body_bytes // (1024 * 1024)
            self.send_payload(413, JSON, f'{{"error": "request body over {limit_mb} MB"}}'.encode())
            return
        body = self.rfile.read(length) if length else b""
        try:
            status, headers, payload = self.respond(self.command, self.path, dict(self.headers.items()), body)
        except Exception:
            logger.exception("request failed", extra={"server": self.server_version})
            status, headers, payload = 500, JSON, b'{"error": "internal error; see the server log"}'
        self.send_payload(status, headers, payload)

    def send_payload(self, status: int, headers: Mapping[str, str], payload: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("http request", extra={"server": self.server_version, "line": format % args})
