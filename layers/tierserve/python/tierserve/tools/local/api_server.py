"""The local API: real HTTP on 127.0.0.1, handing real API Gateway proxy events to the
same Lambda handler that runs in AWS.

The HTTP front is the GPU server's (:mod:`tierserve.asgi`: uvicorn, JSON for every refusal,
bounded heads, bodies and waits). In AWS each model has its own function, so here each model
has its own execution environment: its own handler (``functions``), which serves one request
at a time, as one Lambda execution environment does, while the other models' environments
serve theirs; one model's slow load never holds up another. Requests no model claims (health,
server metadata, an unknown model) go to ``handler``, an environment of their own. Models
routed to an upstream (the GPU tier's server process) are forwarded over HTTP instead,
concurrently, as API Gateway forwards them to SageMaker.

The local API is a long-lived process, so it answers Triton's statistics extension
(:mod:`tierserve.stats`) for its Lambda-tier models, whose execution environments all count in
this process; a GPU-tier model's statistics are its GPU server's, forwarded, and
``/v2/models/stats`` merges both.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any

from tierserve.asgi import ServerLimits, ServerThread, bind, build_server, serve_until_stopped
from tierserve.errors import (
    MethodNotAllowed,
    RouteNotFound,
    TierserveError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tierserve.jobs.routes import is_jobs_path
from tierserve.protocol import decode_content, header
from tierserve.routes import HttpRequest, HttpResponse, Router, error_response
from tierserve.settings import DEFAULT_MAX_REQUEST_MB, MAX_REQUEST_MB, MB, ModelRef
from tierserve.stats import STATS_ROUTES, StatisticsEndpoint
from tierserve.tools.local.apigw import (
    LocalLambdaContext,
    proxy_event,
    proxy_response_body,
    proxy_response_headers,
)

LambdaHandler = Callable[[dict[str, Any], Any], dict[str, Any]]
# An upstream's base URL, or what forwards a request to it (a process that scales to zero:
# tools/local/cold_gpu.py), raising a TierserveError (503 + Retry-After while it starts).
Upstream = str | Callable[[HttpRequest], HttpResponse]
UPSTREAM_TIMEOUT_S = 60
FORWARDED_HEADERS = {"content-type", "inference-header-content-length"}
LIMITS = ServerLimits(threads=32)  # one at a time per environment; forwarded requests run side by side
DRAIN_TIMEOUT_S = 5.0  # a developer's Ctrl-C should not wait on a stuck client for long


class ExecutionEnvironment:
    """One Lambda execution environment: ``handler``, called one request at a time."""

    def __init__(self, handler: LambdaHandler) -> None:
        self.handler = handler
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        with self._lock:
            return self.handler(event, context)


class LocalApi:
    """Serve on ``host:port`` (bound at once: a busy port fails here): each model of
    ``functions`` (model name -> its handler) in its own execution environment, ``upstreams``
    (model name -> base URL, or a function that forwards to it) forwarded, every model's jobs
    routes through ``jobs`` (the jobs function, both tiers), and everything else through
    ``handler``; ``limits`` bound what a request may be. ``served`` are the Lambda-tier models
    whose statistics it answers."""

    def __init__(
        self,
        handler: LambdaHandler,
        *,
        functions: Mapping[str, LambdaHandler] | None = None,
        host: str = "127.0.0.1",
        port: int = 3000,
        upstreams: Mapping[str, Upstream] | None = None,
        jobs: LambdaHandler | None = None,
        memory_mb: int = 2048,
        limits: ServerLimits = LIMITS,
        served: Sequence[ModelRef] = (),
    ) -> None:
        self.handler = handler
        self.jobs = ExecutionEnvironment(jobs) if jobs is not None else None
        self.statistics = StatisticsEndpoint.of_models(tuple(served))
        self._stats_router = Router((STATS_ROUTES, self.statistics), max_response_bytes=64 * MB)
        self.upstreams = dict(upstreams or {})
        self.memory_mb = memory_mb
        self._default = ExecutionEnvironment(handler)
        self.environments = {name: ExecutionEnvironment(f) for name, f in (functions or {}).items()}
        # The handler's own limit (its environment is this process's): decompression stops there.
        self.max_request_bytes = int(MAX_REQUEST_MB.read(os.environ, DEFAULT_MAX_REQUEST_MB) * MB)
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

    def wait(self) -> None:
        """Until the server started by :meth:`start` stops."""
        if self._thread is not None:
            self._thread.join()

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
        """One request: forwarded to its model's upstream, or through the Lambda handler of its
        model's execution environment, its body decompressed first and its response encoded as
        API Gateway does."""
        try:  # API Gateway decompresses before any integration (and keeps the header)
            request = replace(
                request, body=decode_content(request.body, request.headers, self.max_request_bytes)
            )
        except TierserveError as error:
            return error_response(error)
        model = model_in(request.path)
        upstream = self.upstreams.get(model or "")
        jobs = self.jobs is not None and is_jobs_path(request.path)
        if upstream is not None and not jobs:
            if isinstance(upstream, str):
                return forward(upstream, request)
            try:
                return upstream(request)
            except TierserveError as error:  # e.g. a model starting from zero: 503 + Retry-After
                return error_response(error)
        statistics = self._statistics(request)
        if statistics is not None:
            return statistics
        environment = self.environments.get(model or "", self._default)
        if jobs and self.jobs is not None:
            environment = self.jobs
        event = proxy_event(request.method, request.target or request.path, request.headers, request.body)
        result = environment(event, LocalLambdaContext(memory_limit_in_mb=self.memory_mb))
        body = proxy_response_body(result, header(request.headers, "accept"))
        return HttpResponse(int(result["statusCode"]), body, proxy_response_headers(result))

    def _statistics(self, request: HttpRequest) -> HttpResponse | None:
        """The statistics routes' answer, or None for any other request."""
        try:
            route, target, params = self._stats_router.find(request.method, request.path)
        except (MethodNotAllowed, RouteNotFound):
            return None
        response = self._stats_router.run(route, target, params, request)
        if params or response.status != 200:
            return response
        document = json.loads(response.body)  # every model: the GPU servers' too
        # A GPU server started by its first request (--gpu-idle-s) is asked through its own
        # model's route; asking every model's statistics must not start one.
        for upstream in sorted({u for u in self.upstreams.values() if isinstance(u, str)}):
            answer = forward(upstream, HttpRequest("GET", "/v2/models/stats", {}, b"", "/v2/models/stats"))
            if answer.status != 200:
                return answer
            document["model_stats"] += json.loads(answer.body)["model_stats"]
        return HttpResponse.json(document)


def model_in(path: str) -> str | None:
    """The model a path names (``/v2/models/{model}/...``), or None."""
    parts = path.strip("/").split("/")
    return parts[2] if len(parts) >= 3 and parts[:2] == ["v2", "models"] else None


def forward(
    base_url: str, request: HttpRequest, forwarded_headers: Collection[str] = FORWARDED_HEADERS
) -> HttpResponse:
    """Send one request to an upstream OIP server, its target as the client sent it, with the
    headers named in ``forwarded_headers`` (lower case); the upstream's failures become OIP
    errors (503 unreachable, 504 too slow)."""
    if not base_url.startswith(("http://127.", "http://localhost")):
        raise ValueError(f"upstream {base_url!r} must be a loopback http URL")
    keep = {k: v for k, v in request.headers.items() if k.lower() in forwarded_headers}
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
