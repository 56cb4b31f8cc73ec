"""The local API: real HTTP on 127.0.0.1, handing real API Gateway proxy events to the
same Lambda handler that runs in AWS.

The HTTP front is the GPU server's (:mod:`tierserve.asgi`: uvicorn, JSON for every refusal,
bounded heads, bodies and waits). Like one Lambda execution environment, the handler serves
one request at a time. Models routed to an upstream (the GPU tier's server process) are
forwarded over HTTP instead, concurrently, as API Gateway forwards them to SageMaker.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from tierserve.asgi import ServerLimits, ServerThread, bind, build_server, serve_until_stopped
from tierserve.errors import TierserveError, UpstreamTimeout, UpstreamUnavailable
from tierserve.protocol import decode_content, header
from tierserve.routes import HttpRequest, HttpResponse, error_response
from tierserve.settings import DEFAULT_MAX_REQUEST_MB, MAX_REQUEST_MB, MB
from tierserve.tools.local.apigw import (
    LocalLambdaContext,
    proxy_event,
    proxy_response_body,
    proxy_response_headers,
)

LambdaHandler = Callable[[dict[str, Any], Any], dict[str, Any]]
UPSTREAM_TIMEOUT_S = 60
FORWARDED_HEADERS = {"content-type", "inference-header-content-length"}
LIMITS = ServerLimits(threads=32)  # the handler takes one at a time; forwarded requests run side by side
DRAIN_TIMEOUT_S = 5.0  # a developer's Ctrl-C should not wait on a stuck client for long


class LocalApi:
    """Serve ``handler`` on ``host:port`` (bound at once: a busy port fails here);
    ``upstreams`` maps model names to base URLs; ``limits`` bound what a request may be."""

    def __init__(
        self,
        handler: LambdaHandler,
        *,
        host: str = "127.0.0.1",
        port: int = 3000,
        upstreams: Mapping[str, str] | None = None,
        memory_mb: int = 2048,
        limits: ServerLimits = LIMITS,
    ) -> None:
        self.handler = handler
        self.upstreams = dict(upstreams or {})
        self.memory_mb = memory_mb
        # The handler's own limit (its environment is this process's): decompression stops there.
        self.max_request_bytes = int(MAX_REQUEST_MB.read(os.environ, DEFAULT_MAX_REQUEST_MB) * MB)
        self._handler_lock = threading.Lock()
        self._socket = bind(host, port)
        self._server = build_server(
            self.respond, name="tierserve-local", limits=limits, drain_timeout_s=DRAIN_TIMEOUT_S
        )
        self._thread: threading.Thread | None = None
        self._serving: ServerThread | None = None

    @property
    def url(self) -> str:
        host, port = self._socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalApi:
        """Serve on a background thread; returns once it accepts connections."""
        self._serving = ServerThread(self._server, self._socket, name="tierserve-local-api").start()
        self._thread = self._serving.thread
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until SIGTERM or SIGINT (then drain)."""
        serve_until_stopped(self._server, self._socket)

    def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, and wait for the server."""
        if self._serving is not None:
            self._serving.stop()
        else:
            self._socket.close()

    def respond(self, request: HttpRequest) -> HttpResponse:
        """One request: forwarded to its model's upstream, or through the Lambda handler, its
        body decompressed first and its response encoded as API Gateway does."""
        try:  # API Gateway decompresses before any integration (and keeps the header)
            request = replace(
                request, body=decode_content(request.body, request.headers, self.max_request_bytes)
            )
        except TierserveError as error:
            return error_response(error)
        upstream = self._upstream_for(request.path)
        if upstream is not None:
            return forward(upstream, request)
        event = proxy_event(request.method, request.target or request.path, request.headers, request.body)
        context = LocalLambdaContext(memory_limit_in_mb=self.memory_mb)
        with self._handler_lock:
            result = self.handler(event, context)
        body = proxy_response_body(result, header(request.headers, "accept"))
        return HttpResponse(int(result["statusCode"]), body, proxy_response_headers(result))

    def _upstream_for(self, path: str) -> str | None:
        parts = path.strip("/").split("/")
        if len(parts) >= 3 and parts[:2] == ["v2", "models"]:
            return self.upstreams.get(parts[2])
        return None


def forward(base_url: str, request: HttpRequest) -> HttpResponse:
    """Send one request to an upstream OIP server, its target as the client sent it; the
    upstream's failures become OIP errors (503 unreachable, 504 too slow)."""
    if not base_url.startswith(("http://127.", "http://localhost")):
        raise ValueError(f"upstream {base_url!r} must be a loopback http URL")
    keep = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
    upstream = urllib.request.Request(  # noqa: S310 - checked above: a loopback http URL
        base_url.rstrip("/") + (request.target or request.path),
        data=request.body or None,
        method=request.method,
        headers=keep,
    )
    try:
        with urllib.request.urlopen(upstream, timeout=UPSTREAM_TIMEOUT_S) as response:  # noqa: S310
            return HttpResponse(response.status, response.read(), dict(response.headers.items()))
    except urllib.error.HTTPError as error:
        return HttpResponse(error.code, error.read(), dict(error.headers.items()))
    except TimeoutError:
        return error_response(UpstreamTimeout("the GPU tier did not answer in time; retry"))
    except OSError:
        return error_response(UpstreamUnavailable("the GPU tier is unavailable; retry shortly"))
