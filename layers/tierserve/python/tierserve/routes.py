"""The OIP route table, and what every HTTP transport shares: matching, encoding, errors.

    ROUTES          the Open Inference Protocol routes: method, rule, data-plane operation
    Router          route tables bound to their targets (a DataPlane, the GPU server's host);
                    ``serve(request)`` matches, runs the operation and encodes its result
    encode_result   a data-plane result as HTTP: a document as JSON, an InferResult as JSON or
                    the binary extension, refused (413) past the response limit
    error_response  any exception as its ``{"error": ...}`` response (:func:`errors.to_http`)

The table is data: each route names its operation as a callable, called with the target
first and the path parameters as keywords (and ``body=``, ``headers=`` where the route takes
a body). The Lambda transport registers the same table on a powertools resolver
(:mod:`tierserve.lambda_proxy`); the GPU server adds SageMaker's ``/ping`` and
``/invocations`` (:mod:`tierserve.sagemaker_hosting`). One table, so every transport answers
the same routes, with the same 404 and 405.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tierserve import audit
from tierserve.dataplane import DataPlane, Document, InferResult
from tierserve.errors import MethodNotAllowed, PayloadTooLarge, RouteNotFound, TierserveError, to_http
from tierserve.protocol import (
    JSON_CONTENT_TYPE,
    ROUTE_HELP,
    EncodedResponse,
    InferenceRequest,
    dumps,
    encode_infer_response,
)
from tierserve.settings import MAX_RESPONSE_MB_ENV
from tierserve.telemetry import logger

ECHO_LIMIT = 120  # how much of a client's path an error message quotes


@dataclass(frozen=True)
class HttpRequest:
    """One request as a transport hands it over: ``path`` decoded, without the query;
    ``target`` as sent (path and query, percent-encoded), for a transport that forwards it;
    ``caller`` and ``request_id`` as the transport knows them, for the audit record
    (:mod:`tierserve.audit`; empty: unknown, and the audit names it or makes an id);
    ``context`` API Gateway's ``requestContext`` (the stage, the domain), where the Lambda
    transport carried it."""

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    target: str = ""
    caller: str = ""
    request_id: str = ""
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": JSON_CONTENT_TYPE})

    @classmethod
    def json(cls, document: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> HttpResponse:
        body = dumps(document)
        return cls(status, body, {"Content-Type": JSON_CONTENT_TYPE, **(headers or {})})


# What an operation may return: a JSON document, an inference, or (a transport's own route,
# such as /invocations) a response it encoded itself.
Result = Document | InferResult | HttpResponse


@dataclass(frozen=True)
class Route:
    """``method rule`` (``<name>`` marks a path parameter) runs ``operation(target, **params)``,
    plus ``body=`` and ``headers=`` when ``takes_body``, or ``request=`` (the whole
    :class:`HttpRequest`) when ``takes_request``; an ``audited`` route is an inference,
    recorded once per request (:func:`tierserve.audit.http_inference`)."""

    method: str
    rule: str
    operation: Callable[..., Result]
    takes_body: bool = False
    takes_request: bool = False
    audited: bool = False

    def call(self, target: Any, params: Mapping[str, str], request: HttpRequest) -> Result:
        if self.takes_request:
            return self.operation(target, **params, request=request)
        if self.takes_body:
            return self.operation(target, **params, body=request.body, headers=request.headers)
        return self.operation(target, **params)


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v2/health/live", DataPlane.live),
    Route("GET", "/v2/health/ready", DataPlane.ready),
    Route("GET", "/v2", DataPlane.server_metadata),
    Route("GET", "/v2/models/<model>", DataPlane.model_metadata),
    Route("GET", "/v2/models/<model>/versions/<version>", DataPlane.model_metadata),
    Route("GET", "/v2/models/<model>/ready", DataPlane.model_ready),
    Route("GET", "/v2/models/<model>/versions/<version>/ready", DataPlane.model_ready),
    Route("POST", "/v2/models/<model>/infer", DataPlane.infer, takes_body=True, audited=True),
    Route(
        "POST", "/v2/models/<model>/versions/<version>/infer", DataPlane.infer, takes_body=True, audited=True
    ),
)


def _compile(rule: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"<(\w+)>", r"(?P<\1>[^/]+)", rule) + "/?$")


def echo(path: str) -> str:
    """``path`` as an error message quotes it: at most :data:`ECHO_LIMIT` characters."""
    return path if len(path) <= ECHO_LIMIT else path[: ECHO_LIMIT - 3] + "..."


class Router:
    """Route tables bound to their targets, matched in order; ``help`` ends a 404's message.

    ``max_response_bytes`` bounds an inference's encoded response as ``measure`` counts it (the
    body's length; the Lambda transport counts what its proxy integration sends). ``tier``
    names the serving tier in the audit records of its inferences.
    """

    def __init__(
        self,
        *tables: tuple[Sequence[Route], Any],
        max_response_bytes: int,
        measure: Callable[[EncodedResponse], int] | None = None,
        help: str = ROUTE_HELP,
        tier: str = "http",
    ) -> None:
        self.tier = tier
        self._routes = [
            (route, _compile(route.rule), target) for routes, target in tables for route in routes
        ]
        self.max_response_bytes = max_response_bytes
        self.measure = measure or (lambda encoded: len(encoded.body))
        self.help = help

    def find(self, method: str, path: str) -> tuple[Route, Any, dict[str, str]]:
        """The route for ``method path``, its target and path parameters.

        Raises:
            MethodNotAllowed: routes match the path, none for this method (405, ``Allow``).
            RouteNotFound: no route matches the path (404).
        """
        allowed: list[str] = []
        for route, pattern, target in self._routes:
            found = pattern.match(path)
            if found is None:
                continue
            if route.method == method.upper():
                return route, target, found.groupdict()
            if route.method not in allowed:
                allowed.append(route.method)
        if allowed:
            raise MethodNotAllowed(
                f"{echo(method)} is not allowed on {echo(path)}; use {', '.join(allowed)}", tuple(allowed)
            )
        raise RouteNotFound(f"no route for {echo(method)} {echo(path)}; {self.help}")

    def serve(self, request: HttpRequest) -> HttpResponse:
        """Answer ``request``: its route's result encoded, or the error it raised."""
        try:
            route, target, params = self.find(request.method, request.path)
            return self.run(route, target, params, request)
        except Exception as error:
            return error_response(error)

    def run(self, route: Route, target: Any, params: Mapping[str, str], request: HttpRequest) -> HttpResponse:
        """Run a matched route and encode its result; any error becomes its response. An
        audited route's request is recorded (who, which model, status, latency)."""
        return self._recorded(route, params, request, lambda: self._run(route, target, params, request))

    def refuse(
        self, route: Route, params: Mapping[str, str], request: HttpRequest, error: BaseException
    ) -> HttpResponse:
        """Answer a matched request refused before its route could run (its body could not be
        read as sent) with ``error``, recorded as :meth:`run` records the route's own answers."""
        return self._recorded(route, params, request, lambda: error_response(error))

    def _recorded(
        self,
        route: Route,
        params: Mapping[str, str],
        request: HttpRequest,
        answer: Callable[[], HttpResponse],
    ) -> HttpResponse:
        if not route.audited:
            return answer()
        with audit.http_inference(
            caller=request.caller,
            request_id=request.request_id,
            tier=self.tier,
            model=params.get("model"),
            version=params.get("version"),
        ) as record:
            response = answer()
            record.status = response.status
        return response

    def _run(
        self, route: Route, target: Any, params: Mapping[str, str], request: HttpRequest
    ) -> HttpResponse:
        try:
            return encode_result(route.call(target, params, request), self.max_response_bytes, self.measure)
        except Exception as error:
            return error_response(error)


def encode_result(
    result: Result, max_response_bytes: int, measure: Callable[[EncodedResponse], int]
) -> HttpResponse:
    """A data-plane result as its 200 response.

    Raises:
        PayloadTooLarge: an inference's response over ``max_response_bytes`` as ``measure``
            counts it.
    """
    if isinstance(result, HttpResponse):
        return result
    if isinstance(result, InferResult):
        started = time.perf_counter_ns()
        encoded = encode_infer(result)
        record = audit.current()
        if record is not None:
            record.output_ns = time.perf_counter_ns() - started
        check_response_size(measure(encoded), result.request, max_response_bytes, result.model.name)
        return HttpResponse(200, encoded.body, encoded.headers)
    return HttpResponse.json(result)


def encode_infer(result: InferResult) -> EncodedResponse:
    """An inference in the wire form its request asked for (JSON, or the binary extension)."""
    return encode_infer_response(
        result.request, result.outputs, model_name=result.model.name, model_version=result.model.version
    )


def check_response_size(
    size: int, request: InferenceRequest, max_bytes: int, model: str | None = None
) -> None:
    """Refuse a response of ``size`` bytes over ``max_bytes``, with what the client can change
    (past Lambda's or SageMaker's limit the client would get a bare 502 instead), the async
    jobs route of ``model`` among them.

    Raises:
        PayloadTooLarge: the response is over the limit.
    """
    if size <= max_bytes:
        return
    all_binary = request.binary_outputs or (
        request.outputs is not None and all(o.binary for o in request.outputs)
    )
    fixes = [] if all_binary else ['ask for binary outputs ("parameters": {"binary_data_output": true})']
    fixes += ['ask for fewer outputs ("outputs": [{"name": ...}])', "send fewer rows per request"]
    if model is not None:
        fixes.append(f"or run it as a job (POST /v2/models/{model}/jobs), whose result has no such limit")
    raise PayloadTooLarge(
        f"the response would be {size:,} bytes, over the limit of {max_bytes:,} ({MAX_RESPONSE_MB_ENV}): "
        + ", ".join(fixes)
    )


def error_response(error: BaseException) -> HttpResponse:
    """``error`` as its OIP error response (a 500 leaks nothing and is logged with its trace)."""
    status, document = to_http(error)
    if status == 500:
        logger.exception("request failed", extra={"status": status})
    elif status > 500:
        logger.warning("request failed", extra={"status": status, "error": document["error"]})
    return HttpResponse.json(document, status, error.headers if isinstance(error, TierserveError) else None)
