"""A raw HTTP/1.1 client over a socket on 127.0.0.1: sends bytes exactly as given (malformed
ones included) and reads one response, so tests see what a server really writes."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

READ_TIMEOUT_S = 30  # a server that waits on the client instead of answering fails the test here


@dataclass
class Reply:
    status_line: str
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> str:
        """The ``{"error": ...}`` message, after checking the reply is the JSON error contract."""
        assert self.headers.get("content-type") == "application/json", (self.status_line, self.headers)
        document = self.json()
        assert set(document) == {"error"} and isinstance(document["error"], str), document
        return document["error"]


def connect(port: int, timeout: float = READ_TIMEOUT_S) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_reply(connection: socket.socket, *, head: bool = False) -> Reply:
    """One response from ``connection``: the status line, the headers and (unless it answers a
    HEAD request) the body its Content-Length frames."""
    reader = connection.makefile("rb")
    status_line = reader.readline().decode("latin-1").rstrip("\r\n")
    assert status_line.startswith("HTTP/1.1 "), f"no status line: {status_line!r}"
    headers: dict[str, str] = {}
    while (line := reader.readline().decode("latin-1").rstrip("\r\n")) != "":
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b"" if head else reader.read(int(headers["content-length"]))
    return Reply(status_line, int(status_line.split()[1]), headers, body)


def exchange(port: int, raw: bytes, *, head: bool = False, timeout: float = READ_TIMEOUT_S) -> Reply:
    """Send ``raw`` on a fresh connection and read one response."""
    with connect(port, timeout) as connection:
        connection.sendall(raw)
        return read_reply(connection, head=head)


def get(path: str, headers: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode()


def post(path: str, body: bytes, headers: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body
