"""The local API: real HTTP on 127.0.0.1, handing real API Gateway proxy events to the
same Lambda handler that runs in AWS.

Like one Lambda execution environment, the handler serves one request at a time. Models
routed to an upstream (the GPU tier, issue 4) are forwarded over HTTP instead.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tierserve.local.apigw import LocalLambdaContext, proxy_event, proxy_response_body, proxy_response_headers
from tierserve.telemetry import logger

LambdaHandler = Callable[[dict[str, Any], Any], dict[str, Any]]
MAX_BODY_BYTES = 64 * 1024 * 1024
UPSTREAM_TIMEOUT_S = 60


class LocalApi:
    """Serve ``handler`` on ``host:port``; ``upstreams`` maps model names to base URLs."""

    def __init__(
        self,
        handler: LambdaHandler,
        *,
        host: str = "127.0.0.1",
        port: int = 3000,
        upstreams: Mapping[str, str] | None = None,
        memory_mb: int = 2048,
    ) -> None:
        self.handler = handler
        self.upstreams = dict(upstreams or {})
        self.memory_mb = memory_mb
        self._handler_lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), _request_handler(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalApi:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="tierserve-local-api", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def respond(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        upstream = self._upstream_for(url)
        if upstream is not None:
            return forward(upstream, method, url, headers, body)
        event = proxy_event(method, url, headers, body)
        context = LocalLambdaContext(memory_limit_in_mb=self.memory_mb)
        with self._handler_lock:
            result = self.handler(event, context)
        return int(result["statusCode"]), proxy_response_headers(result), proxy_response_body(result)

    def _upstream_for(self, url: str) -> str | None:
        parts = url.split("?")[0].strip("/").split("/")
        if len(parts) >= 3 and parts[:2] == ["v2", "models"]:
            return self.upstreams.get(parts[2])
        return None


def forward(
    base_url: str, method: str, url: str, headers: Mapping[str, str], body: bytes
) -> tuple[int, dict[str, str], bytes]:
    """Send one request to an upstream OIP server; its failures become OIP errors."""
    keep = {
        k: v for k, v in headers.items() if k.lower() in {"content-type", "inference-header-content-length"}
    }
    if not base_url.startswith(("http://127.", "http://localhost")):
        raise ValueError(f"upstream {base_url!r} must be a loopback http URL")
    request = urllib.request.Request(  # noqa: S310 - checked above: a loopback http URL
        base_url.rstrip("/") + url, data=body or None, method=method, headers=keep
    )
    try:
        with urllib.request.urlopen(request, timeout=UPSTREAM_TIMEOUT_S) as response:  # noqa: S310
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()
    except TimeoutError:
        return (
            504,
            {"Content-Type": "application/json"},
            b'{"error": "the GPU tier did not answer in time; retry"}',
        )
    except OSError:
        return (
            503,
            {"Content-Type": "application/json"},
            b'{"error": "the GPU tier is unavailable; retry shortly"}',
        )


def _request_handler(api: LocalApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "tierserve-local"
        # Keep-alive responses are written in two parts; without this Nagle holds the second ~40 ms.
        disable_nagle_algorithm = True

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._send(413, {"Content-Type": "application/json"}, b'{"error": "request body over 64 MB"}')
                return
            body = self.rfile.read(length) if length else b""
            try:
                status, headers, payload = api.respond(
                    self.command, self.path, dict(self.headers.items()), body
                )
            except Exception:
                logger.exception("local API failed to serve a request")
                status, headers, payload = (
                    500,
                    {"Content-Type": "application/json"},
                    b'{"error": "internal error"}',
                )
            self._send(status, headers, payload)

        def _send(self, status: int, headers: Mapping[str, str], payload: bytes) -> None:
            self.send_response(status)
            skip = {"content-length", "transfer-encoding", "connection"}
            for name, value in headers.items():
                if name.lower() not in skip:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("local API request", extra={"line": format % args})

    return Handler
