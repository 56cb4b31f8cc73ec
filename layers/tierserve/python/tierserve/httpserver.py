"""The request handler behind tierserve's plain HTTP servers (the local API, the GPU server).

A subclass says how to ``respond``; this class reads the body within a bound, turns an
unexpected failure into a JSON 500 that leaks nothing, and writes the response.

A body is framed by one ``Content-Length`` (a whole number of bytes, at most
``max_body_bytes``) or absent; chunked transfer encoding is refused. A request framed any
other way gets a JSON 400 or 413 and its connection is closed, its body left unread.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler
from typing import Any

from tierserve.errors import BadRequest, PayloadTooLarge, TierserveError, to_http
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
        try:
            body = self.read_body()
        except TierserveError as error:
            self.close_connection = True  # what the client sent after the headers stays unread
            self.send_payload(*error_response(error))
            return
        try:
            status, headers, payload = self.respond(self.command, self.path, dict(self.headers.items()), body)
        except Exception as error:
            logger.exception("request failed", extra={"server": self.server_version})
            status, headers, payload = error_response(error)
        self.send_payload(status, headers, payload)

    def read_body(self) -> bytes:
        """The request body as its one ``Content-Length`` frames it, never more than
        ``max_body_bytes``.

        Raises:
            BadRequest: a Transfer-Encoding, a Content-Length that is not a whole number of
                bytes or disagrees with another, or a body cut short.
            PayloadTooLarge: a Content-Length over ``max_body_bytes``.
        """
        if self.headers.get("Transfer-Encoding") is not None:
            raise BadRequest(
                "chunked or other Transfer-Encoding bodies are not supported: "
                "send the body in one piece with a Content-Length header"
            )
        values = {value.strip() for value in self.headers.get_all("Content-Length") or ()}
        if not values:
            return b""
        text = values.pop()
        if values or not _DIGITS.fullmatch(text):
            raise BadRequest(
                "Content-Length must be a whole number of bytes, given once: send the exact size of the body"
            )
        limit = self.max_body_bytes
        digits = text.lstrip("0") or "0"  # int() refuses over 4,300 digits, leading zeros too
        if len(digits) > len(str(limit)) or int(digits) > limit:
            raise PayloadTooLarge(
                f"request body is over this server's limit of {limit:,} bytes: "
                "split the batch into smaller requests"
            )
        length = int(digits)
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            raise BadRequest(
                f"the body ended after {len(body):,} of the {length:,} bytes its Content-Length says"
            )
        return body

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


_DIGITS = re.compile(r"[0-9]+")


def error_response(error: BaseException) -> tuple[int, Mapping[str, str], bytes]:
    """A typed error as its JSON response; anything else as a 500 that leaks nothing."""
    status, document = to_http(error)
    return status, JSON, json.dumps(document).encode()
