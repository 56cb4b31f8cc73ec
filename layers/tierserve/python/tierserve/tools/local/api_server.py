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

from tierserve.httpserver import OipRequestHandler
from tierserve.tools.local.apigw import (
    LocalLambdaContext,
    proxy_event,
    proxy_response_body,
    proxy_response_headers,
)

LambdaHandler = Callable[[dict[str, Any], Any], dict[str, Any]]
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
    class Handler(OipRequestHandler):
        server_version = "tierserve-local"

        def respond(
            self, method: str, path: str, headers: dict[str, str], body: bytes
        ) -> tuple[int, Mapping[str, str], bytes]:
            return api.respond(method, path, headers, body)

    return Handler
