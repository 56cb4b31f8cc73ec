"""The Lambda transport: API Gateway's proxy integration in front of the route table.

:func:`build_resolver` registers :data:`tierserve.routes.ROUTES` on a powertools REST
resolver; each route's result is encoded here, and measured as Lambda sends it: a binary
body goes out base64-encoded and a JSON body as an escaped string inside the proxy
envelope, so a response under the raw limit may still be over Lambda's payload limit
(where API Gateway would answer a bare 502). An unmatched method on a known path is a
405 naming the methods it takes, an unknown path a 404, both from the same table.

A request body is taken only when it is provably the caller's bytes (:func:`request_body`):
under ``binaryMediaTypes`` ``*/*`` API Gateway base64-encodes every body; a text body
(``isBase64Encoded`` false) has been re-encoded as UTF-8 on its way, which keeps JSON but
mangles binary tensors, so one that carries the binary extension's header or cannot have
been UTF-8 is refused with a 400 that names the fix, never parsed.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tierserve.audit import api_gateway_caller
from tierserve.dataplane import DataPlane
from tierserve.errors import BadRequest
from tierserve.protocol import BINARY_MEDIA_TYPES, HEADER_LENGTH, JSON_CONTENT_TYPE, EncodedResponse, header
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


def request_body(body: str | None, is_base64_encoded: bool, headers: Mapping[str, str] | None) -> bytes:
    """The request body of a proxy event as the caller sent it, or a refusal.

    Raises:
        BadRequest: a base64 body that is not base64; a text body that carries
            ``Inference-Header-Content-Length`` (binary tensors that reached the function as
            text) or holds what UTF-8 text cannot (U+FFFD, API Gateway's mark for bytes that
            were not UTF-8, or lone surrogates).
    """
    if not body:
        return b""
    if is_base64_encoded:
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("the request body is marked isBase64Encoded but is not base64") from None
    fix = (
        f"list {', '.join(BINARY_MEDIA_TYPES)} in the REST API's binaryMediaTypes "
        "(tierserve.protocol.BINARY_MEDIA_TYPES, as the CDK app does), so every body arrives base64-encoded"
    )
    if header(headers, HEADER_LENGTH) is not None:
        raise BadRequest(
            "a binary request (Inference-Header-Content-Length) reached the function as text "
            f"(isBase64Encoded false), so its tensor bytes may have been changed on the way: {fix}; "
            "or send the tensors as JSON"
        )
    if "\ufffd" in body:
        raise BadRequest(
            "the request body reached the function as text with U+FFFD, the mark of bytes that were "
            f"not UTF-8 and were replaced on the way: {fix}; or send UTF-8 JSON"
        )
    try:
        return body.encode()
    except UnicodeEncodeError:
        raise BadRequest(
            f"the request body reached the function as text that is not valid UTF-8: {fix}"
        ) from None


def build_resolver(dataplane: DataPlane) -> Any:
    """A powertools ``APIGatewayRestResolver`` serving every OIP route through ``dataplane``,
    inference responses bounded by ``TIERSERVE_MAX_RESPONSE_MB`` as Lambda sends them."""
    return build_route_resolver(ROUTES, dataplane, dataplane.registry.settings.max_response_bytes)


def build_route_resolver(
    routes: Sequence[Route], target: Any, max_response_bytes: int, *, help: str | None = None
) -> Any:
    """A powertools ``APIGatewayRestResolver`` serving ``routes`` on ``target`` (the OIP routes on
    a data plane, the jobs routes on :class:`tierserve.jobs.Jobs`), responses bounded by
    ``max_response_bytes`` as Lambda sends them, each request with API Gateway's
    ``requestContext`` (the caller's identity); ``help`` ends a 404's message."""
    from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response

    app = APIGatewayRestResolver()
    router = Router(
        (routes, target),
        max_response_bytes=max_response_bytes,
        measure=sent_size,
        **({"help": help} if help else {}),
        tier="lambda",
    )

    def current_request(*, with_body: bool = True) -> HttpRequest:
        """The event as a request; ``with_body=False``: its envelope alone (who, where), for
        a refusal of a body that cannot be read as sent."""
        event = app.current_event
        headers = dict(event.headers or {})
        body = request_body(event.body, event.is_base64_encoded, headers) if with_body else b""
        context = event.get("requestContext") or {}
        return HttpRequest(
            event.http_method,
            event.path,
            headers,
            body,
            caller=api_gateway_caller(context),
            request_id=str(context.get("requestId") or ""),
            context=context,
        )

    def to_powertools(response: HttpResponse) -> Response:
        content_type = response.headers.get("Content-Type", JSON_CONTENT_TYPE)
        extra = {k: v for k, v in response.headers.items() if k != "Content-Type"}
        body: bytes | str = response.body if content_type != JSON_CONTENT_TYPE else response.body.decode()
        return Response(status_code=response.status, content_type=content_type, body=body, headers=extra)

    def view(route: Route) -> Callable[..., Response]:
        def handle(**params: str) -> Response:
            try:
                request = current_request()
            except BadRequest as error:  # still an inference attempt: audited like one
                return to_powertools(router.refuse(route, params, current_request(with_body=False), error))
            return to_powertools(router.run(route, target, params, request))

        return handle

    for route in routes:
        app.route(rule=route.rule, method=route.method)(view(route))

    @app.not_found
    def not_found(_error: Exception) -> Response:
        event = app.current_event  # the table's 405 or 404, which never read the body
        return to_powertools(
            router.serve(
                HttpRequest(
                    event.http_method,
                    event.path,
                    dict(event.headers or {}),
                    context=event.get("requestContext") or {},
                )
            )
        )

    return app
