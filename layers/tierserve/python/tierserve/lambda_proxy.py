"""The Lambda transport: API Gateway's proxy integration in front of the route table.

:func:`build_resolver` registers :data:`tierserve.routes.ROUTES` on a powertools REST
resolver; each route's result is encoded here, and measured as Lambda sends it: a binary
body goes out base64-encoded and a JSON body as an escaped string inside the proxy
envelope, so a response under the raw limit may still be over Lambda's payload limit
(where API Gateway would answer a bare 502). An unmatched method on a known path is a
405 naming the methods it takes, an unknown path a 404, both from the same table.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from typing import Any

from tierserve.audit import api_gateway_caller
from tierserve.dataplane import DataPlane
from tierserve.protocol import JSON_CONTENT_TYPE, EncodedResponse
from tierserve.routes import ROUTES, HttpRequest, HttpResponse, Route, Router

# What Lambda's proxy integration wraps around a body (status, headers, the JSON envelope).
PROXY_ENVELOPE_BYTES = 1024


def sent_size(encoded: EncodedResponse) -> int:
    """The bytes ``encoded`` takes in a Lambda proxy response: a binary body is base64-encoded
    (4 bytes per 3), a JSON body is a string in the envelope (each quote and backslash escaped)."""
    body = encoded.body
    if encoded.headers.get("Content-Type") == JSON_CONTENT_TYPE:
        size = len(body) + body.count(b'"') + body.count(b"\\")
    else:
        size = 4 * math.ceil(len(body) / 3)
    return size + PROXY_ENVELOPE_BYTES


def build_resolver(dataplane: DataPlane) -> Any:
    """A powertools ``APIGatewayRestResolver`` serving every OIP route through ``dataplane``,
    inference responses bounded by ``TIERSERVE_MAX_RESPONSE_MB`` as Lambda sends them."""
    from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response

    app = APIGatewayRestResolver()
    router = Router(
        (ROUTES, dataplane),
        max_response_bytes=dataplane.registry.settings.max_response_bytes,
        measure=sent_size,
        tier="lambda",
    )

    def current_request() -> HttpRequest:
        event = app.current_event
        raw = event.body or ""
        body = base64.b64decode(raw) if event.is_base64_encoded else raw.encode()
        context = event.get("requestContext") or {}
        return HttpRequest(
            event.http_method,
            event.path,
            dict(event.headers or {}),
            body,
            caller=api_gateway_caller(context),
            request_id=str(context.get("requestId") or ""),
        )

    def to_powertools(response: HttpResponse) -> Response:
        content_type = response.headers.get("Content-Type", JSON_CONTENT_TYPE)
        extra = {k: v for k, v in response.headers.items() if k != "Content-Type"}
        body: bytes | str = response.body if content_type != JSON_CONTENT_TYPE else response.body.decode()
        return Response(status_code=response.status, content_type=content_type, body=body, headers=extra)

    def view(route: Route) -> Callable[..., Response]:
        def handle(**params: str) -> Response:
            return to_powertools(router.run(route, dataplane, params, current_request()))

        return handle

    for route in ROUTES:
        app.route(rule=route.rule, method=route.method)(view(route))

    @app.not_found
    def not_found(_error: Exception) -> Response:
        return to_powertools(router.serve(current_request()))  # the table's 405 or 404

    return app
