"""A loopback HTTP proxy in front of the embedded S3 that can be switched off.

While ``down`` it answers every request with 503 SlowDown (what S3 itself says under
load), so botocore's retries run for real and then give up; while ``stalled`` it reads each
request and answers nothing (until it is stopped), as a hung S3 would; with
``trickle_bytes_per_s`` it sends the headers at once and then the body at that rate, slowly
enough that every read gets a byte before any socket timeout; ``slow_paths`` limits stalling
and trickling to paths that contain it (the artifact, say, not the manifest). With
``hold_path`` set, requests whose path contains it wait until ``release()`` and then pass
through (one slow object, the rest of S3 at its speed). Switched back, requests pass through unchanged. Tests use it to prove that a fault is reported and
then recovered from, and that a hung or trickling dependency cannot outlast a deadline.
"""

from __future__ import annotations

import http.client
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FlakyProxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.down = False
        self.down_paths: str | None = None  # down only for paths that contain it (one bucket)
        self.stalled = False
        self.trickle_bytes_per_s: float | None = None
        self.slow_paths: str | None = None
        self.delay_s = 0.0  # before each answer: concurrent requests then overlap
        self.ranges: list[str] = []  # the Range header of each GET that had one
        # (time.monotonic(), bytes trickled so far) as each ranged GET came
        self.range_arrivals: list[tuple[float, int]] = []
        self.trickled = 0  # body bytes sent at the trickle rate, all answers together
        self.in_flight = self.max_in_flight = 0
        self._count_lock = threading.Lock()
        self._released = threading.Event()
        self.requests = 0
        self.fail_next = 0
        self.hold_path = ""
        self.held = threading.Semaphore(0)  # released once per request that is being held
        self._hold_released = threading.Event()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def release(self) -> None:
        """Let the held requests (and every later one) through."""
        self._hold_released.set()

    def stop(self) -> None:
        self._released.set()
        self._hold_released.set()
        self._server.shutdown()
        self._server.server_close()

    def _should_fail(self, path: str) -> bool:
        self.requests += 1
        if self.down and (self.down_paths is None or self.down_paths in path):
            return True
        if self.fail_next > 0:
            self.fail_next -= 1
            return True
        return False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self) -> None:
                with proxy._count_lock:
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                    if self.headers.get("Range"):
                        proxy.ranges.append(self.headers["Range"])
                        proxy.range_arrivals.append((time.monotonic(), proxy.trickled))
                try:
                    self._answer()
                finally:
                    with proxy._count_lock:
                        proxy.in_flight -= 1

            def _answer(self) -> None:
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.hold_path and proxy.hold_path in self.path and not proxy._hold_released.is_set():
                    proxy.held.release()
                    proxy._hold_released.wait(120)
                slow = proxy.slow_paths is None or proxy.slow_paths in self.path
                if proxy.stalled and slow:
                    proxy.requests += 1
                    proxy._released.wait(120)  # no answer at all: the client's timeout must end it
                    self.close_connection = True
                    return
                if proxy._should_fail(self.path):
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                connection = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"{proxy.upstream_host}:{proxy.upstream_port}"
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in {"content-length", "transfer-encoding", "connection"}:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if proxy.trickle_bytes_per_s and slow:
                    self._trickle(payload, proxy.trickle_bytes_per_s)
                else:
                    self.wfile.write(payload)
                connection.close()

            def _trickle(self, payload: bytes, rate: float) -> None:
                # Twenty writes a second, in pieces of at most 16 KB: at a few MB/s the rate
                # holds within each megabyte the client reads, as S3's does.
                piece = max(1, min(int(rate / 20), 16 * 1024))
                for start in range(0, len(payload), piece):
                    if proxy._released.is_set():
                        break
                    try:
                        self.wfile.write(payload[start : start + piece])
                        self.wfile.flush()
                    except OSError:  # the client gave up
                        break
                    with proxy._count_lock:
                        proxy.trickled += len(payload[start : start + piece])
                    time.sleep(piece / rate)
                self.close_connection = True

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

            def log_message(self, *args: object) -> None:
                pass

        return Handler


class _QuietServer(ThreadingHTTPServer):
    """A client that leaves mid-answer (a reader that cut its stream, or shut it at a deadline)
    is what some tests do on purpose: not a traceback on the test's output."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]
