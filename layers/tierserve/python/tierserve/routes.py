"""The OIP route table, and the two ways tierserve serves it over HTTP.

The table is data: ``(method, rule, data-plane operation)``. The Lambda API handler
registers it on a powertools REST resolver; the GPU server and other plain HTTP servers
use :func:`dispatch`. One table, so every transport answers the same routes.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from typing import Any

from tierserve.dataplane import DataPlane, HttpResponse
from tierserve.protocol import ROUTE_HELP

ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/v2/health/live", "live"),
    ("GET", "/v2/health/ready", "ready"),
    ("GET", "/v2", "server_metadata"),
    ("GET", "/v2/models/<model>", "model_metadata"),
    ("GET", "/v2/models/<model>/versions/<version>", "model_metadata"),
    ("GET", "/v2/models/<model>/ready", "model_ready"),
    ("GET", "/v2/models/<model>/versions/<version>/ready", "model_ready"),
    ("POST", "/v2/models/<model>/infer", "infer"),
    ("POST", "/v2/models/<model>/versions/<version>/infer", "infer"),
)


def _compile(rule: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"<(\w+)>", r"(?P<\1>[^/]+)", rule) + "/?$")


_COMPILED = tuple((method, _compile(rule), endpoint) for method, rule, endpoint in ROUTES)


def match(method: str, path: str) -> tuple[str, dict[str, str]] | HttpResponse:
    """The operation and path parameters for a request, or the 404/405 response to send."""
    allowed = []
    for route_method, pattern, endpoint in _COMPILED:
        found = pattern.match(path)
        if found:
            if route_method == method.upper():
                return endpoint, found.groupdict()
            allowed.append(route_method)
    if allowed:
        return HttpResponse.json(
            {"error": f"{method} is not allowed on {path}; use {', '.join(allowed)}"}, 405
        )
    return HttpResponse.json({"error": f"no route for {method} {path}; {ROUTE_HELP}"}, 404)


def dispatch(
    dataplane: DataPlane, method: str, path: str, headers: Mapping[str, str], body: bytes
) -> HttpResponse:
    """Serve one plain-HTTP request through the route table."""
    routed = match(method, path)
    if isinstance(routed, HttpResponse):
        return routed
    endpoint, params = routed
    return dataplane.call(endpoint, params, body, headers)


def build_resolver(dataplane: DataPlane) -> Any:
    """A powertools ``APIGatewayRestResolver`` serving every OIP route through ``dataplane``."""
    from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response

    app = APIGatewayRestResolver()

    def to_powertools(response: HttpResponse) -> Response:
        content_type = response.headers.get("Content-Type", "application/json")
        extra = {k: v for k, v in response.headers.items() if k != "Content-Type"}
        body: bytes | str = response.body if content_type != "application/json" else response.body.decode()
        return Response(status_code=response.status, content_type=content_type, body=body, headers=extra)

    def view(endpoint: str) -> Callable[..., Response]:
        def handle(**params: str) -> Response:
            event = app.current_event
            raw = event.body or ""
            body = base64.b64decode(raw) if event.is_base64_encoded else raw.encode()
            return to_powertools(dataplane.call(endpoint, params, body, dict(event.headers or {})))

        return handle

    for method, rule, endpoint in ROUTES:
        app.route(rule=rule, method=method)(view(endpoint))

    @app.not_found
    def not_found(_error: Exception) -> Response:
        event = app.current_event
        return to_powertools(
            HttpResponse.json({"error": f"no route for {event.http_method} {event.path}; {ROUTE_HELP}"}, 404)
        )

    return app
