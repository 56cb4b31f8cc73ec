"""SageMaker's runtime API on 127.0.0.1: ``POST /endpoints/{EndpointName}/invocations``, what
boto3's ``invoke_endpoint`` calls, in front of GPU server containers.

``tierserve local`` points the S3 worker at it (``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``, with
``TIERSERVE_GPU_ENDPOINTS`` naming each gpu-tier model an inference component of one local
endpoint), so the worker reaches each model's GPU server process through the client it uses in
AWS (:class:`tierserve.sagemaker_model.SageMakerModel`). The tests' SageMaker double
(``tests/support/sagemaker.py``) is this runtime with faults added.

What it plays of SageMaker, and only that:

- addressing: an endpoint that hosts inference components takes only calls that name one of
  them (``X-Amzn-SageMaker-Inference-Component``); an unknown endpoint or component is a
  ``ValidationError``; a component with no copy running (``cold``) gets SageMaker's
  no-capacity answer.
- the container gets ``Content-Type``, ``Accept`` and ``X-Amzn-SageMaker-Custom-Attributes``
  at ``POST /invocations``; the caller gets back its body, its ``Content-Type`` and its custom
  attributes, nothing else.
- a container's non-2xx answer becomes ``ModelError`` (424) carrying ``OriginalStatusCode`` and
  ``OriginalMessage``. SageMaker's own errors are its status, ``x-amzn-ErrorType`` and a JSON
  body, which botocore turns into a ``ClientError`` with that code.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from tierserve.asgi import ServerLimits, ServerThread, bind, build_server
from tierserve.routes import HttpRequest, HttpResponse
from tierserve.sagemaker_hosting import CUSTOM_ATTRIBUTES

# A container: what answers POST /invocations behind an endpoint (the GPU server's host, or a
# forward to its process).
Container = Callable[[HttpRequest], HttpResponse]
# SageMaker's own error: its status, its x-amzn-ErrorType and its JSON body.
SageMakerError = tuple[int, str, dict[str, Any]]

COMPONENT_HEADER = "X-Amzn-SageMaker-Inference-Component"
# The request headers SageMaker hands the container; the rest of the caller's stay with SageMaker.
FORWARDED = ("Content-Type", "Accept", CUSTOM_ATTRIBUTES)
# SageMaker's answer, verbatim, to a call for an inference component with no copy running
# (docs/gpu-tier.md, "The cold edge", names the sources).
NO_CAPACITY_MESSAGE = (
    "Inference Component has no capacity to process this request. ApplicationAutoScaling may be "
    "in-progress (if configured) or try to increase the capacity by invoking "
    "UpdateInferenceComponentRuntimeConfig API."
)
DRAIN_TIMEOUT_S = 5.0


def container_error(status: int, body: str) -> SageMakerError:
    """SageMaker's ``ModelError`` around the container's ``status`` and response ``body``."""
    side = "client" if status < 500 else "server"
    return (
        424,
        "ModelError",
        {
            "ErrorCode": f"{side.upper()}_ERROR_FROM_MODEL",
            "Message": f"Received {side} error ({status}) from primary",
            "OriginalStatusCode": status,
            "OriginalMessage": body,
            "LogStreamArn": "arn:aws:logs:us-east-1:000000000000:log-group:/aws/sagemaker/Endpoints/x",
        },
    )


def model_error(status: int, message: str) -> SageMakerError:
    """What SageMaker sends when the container answered ``status`` with an OIP error."""
    return container_error(status, json.dumps({"error": message}))


def service_error(status: int, code: str, message: str = "service error") -> SageMakerError:
    """One of SageMaker's own errors (``ValidationError``, ``ServiceUnavailable``, ...)."""
    return status, code, {"message": message}


def no_capacity() -> SageMakerError:
    """What SageMaker answers while the named inference component has no copy running."""
    return service_error(400, "ValidationError", NO_CAPACITY_MESSAGE)


def error_reply(failure: SageMakerError) -> HttpResponse:
    """``failure`` as SageMaker sends it."""
    status, code, document = failure
    return HttpResponse(
        status,
        json.dumps(document).encode(),
        {"x-amzn-ErrorType": code, "Content-Type": "application/json"},
    )


class SageMakerRuntime:
    """``InvokeEndpoint`` for ``containers``: each keyed by the endpoint it serves, or, on an
    endpoint that hosts inference components, by its component; ``components`` maps each
    component to its endpoint (a component without a container of its own is served by its
    endpoint's). Serve it with :meth:`serve`, or answer requests with :meth:`respond`."""

    def __init__(
        self, containers: Mapping[str, Container], *, components: Mapping[str, str] | None = None
    ) -> None:
        self.containers = dict(containers)
        self.components = dict(components or {})
        self.cold: set[str] = set()  # components with no copy running

    def respond(self, request: HttpRequest) -> HttpResponse:
        """One HTTP request to the runtime API (only ``POST /endpoints/{name}/invocations``)."""
        parts = request.path.strip("/").split("/")
        if (
            request.method != "POST"
            or len(parts) != 3
            or parts[0] != "endpoints"
            or parts[2] != "invocations"
        ):
            return error_reply(
                service_error(
                    404, "UnknownOperationException", "The action or operation requested is invalid."
                )
            )
        headers = {name.lower(): value for name, value in request.headers.items()}
        return self.invoke(urllib.parse.unquote(parts[1]), headers, request.body)

    def invoke(self, endpoint: str, headers: Mapping[str, str], body: bytes) -> HttpResponse:
        """One ``InvokeEndpoint`` (``headers`` with lower-case names)."""
        return self.forward(endpoint, headers, body)[0]

    def forward(
        self, endpoint: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[HttpResponse, HttpResponse | None]:
        """One ``InvokeEndpoint``: SageMaker's answer, and the container's (None when SageMaker
        answered alone)."""
        component = headers.get(COMPONENT_HEADER.lower())
        refused = self.refusal(endpoint, component)
        if refused is not None:
            return error_reply(refused), None
        container = self.containers.get(component or "") or self.containers[endpoint]
        forwarded = {name: headers[name.lower()] for name in FORWARDED if name.lower() in headers}
        response = container(HttpRequest("POST", "/invocations", forwarded, body, "/invocations"))
        if not 200 <= response.status < 300:
            failure = container_error(response.status, response.body.decode("utf-8", "replace"))
            return error_reply(failure), response
        returned = {name.lower(): value for name, value in response.headers.items()}
        reply = {
            name: returned[name.lower()]
            for name in ("Content-Type", CUSTOM_ATTRIBUTES)
            if name.lower() in returned
        }
        return HttpResponse(200, response.body, reply), response

    def refusal(self, endpoint: str, component: str | None) -> SageMakerError | None:
        """SageMaker's own refusal of a call to ``endpoint`` (naming ``component``), if any."""
        hosted = {name for name, where in self.components.items() if where == endpoint}
        if not hosted and endpoint not in self.containers:
            return service_error(
                400, "ValidationError", f"Endpoint {endpoint} of account 000000000000 not found."
            )
        if not hosted and component is None:
            return None  # an endpoint without components
        if component not in hosted:
            return service_error(
                400, "ValidationError", f"Inference Component {component} not found on endpoint {endpoint}."
            )
        return no_capacity() if component in self.cold else None

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> ServerThread:
        """Serve the runtime API on ``host:port`` (0: a free port) on a background thread;
        returns once it accepts connections. Its URL: ``http://{host}:{thread.address[1]}``."""
        server = build_server(
            self.respond,
            name="sagemaker-runtime-local",
            limits=ServerLimits(),
            drain_timeout_s=DRAIN_TIMEOUT_S,
        )
        return ServerThread(server, bind(host, port), name="sagemaker-runtime-local").start()


def container_at(base_url: str) -> Container:
    """The container of a GPU server process at ``base_url``: each call a ``POST /invocations``
    to it over HTTP (a process that does not answer: a 503 or 504, which SageMaker's part wraps
    in ``ModelError`` like any other failure of the container)."""
    from tierserve.tools.local.api_server import forward

    keep = frozenset(name.lower() for name in FORWARDED)
    return lambda request: forward(base_url, request, keep)
