"""A loopback double of the SageMaker runtime API (``POST /endpoints/{name}/invocations``).

Behind each endpoint runs the GPU server's real host (:class:`tierserve.sagemaker_hosting.ModelHost`,
what ``functions/gpu_server`` serves on ``/invocations``), so the worker's client
(``tierserve.sagemaker_model``) and the container (``tierserve.sagemaker_hosting``) meet end to end. The double
plays only SageMaker's part: it hands the container the headers SageMaker forwards, passes
back its ``Content-Type`` and ``X-Amzn-SageMaker-Custom-Attributes``, wraps a container's
non-2xx answer in ``ModelError`` (424, ``OriginalStatusCode``, ``OriginalMessage``) and
refuses unknown endpoints. With ``components`` (inference component -> endpoint) it is an
endpoint that hosts components: a call must name one of them
(``X-Amzn-SageMaker-Inference-Component``), as SageMaker requires; ``cold`` components have no
copy running and get SageMaker's no-capacity answer (:func:`no_capacity`). ``fail_with`` makes
it answer the errors SageMaker itself sends (its status, ``x-amzn-ErrorType`` and JSON body)
instead, ``reply_with`` any raw answer (status, headers, body bytes: a hostile one);
``delay_s`` makes it slow (a stalled endpoint, until it is stopped).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tierserve.routes import HttpRequest
from tierserve.sagemaker_hosting import CUSTOM_ATTRIBUTES, ModelHost, ServerSettings, build_registry
from tierserve.sagemaker_model import parse_custom_attributes
from tierserve.settings import CACHE_DIR_ENV, MODEL_DIR_ENV

# The request headers SageMaker hands the container; the rest of the caller's stay with SageMaker.
FORWARDED = ("Content-Type", "Accept", CUSTOM_ATTRIBUTES)
COMPONENT_HEADER = "x-amzn-sagemaker-inference-component"
# SageMaker's answer, verbatim, to a call for an inference component with no copy running
# (docs/gpu-tier.md, "The cold edge", names the sources).
NO_CAPACITY_MESSAGE = (
    "Inference Component has no capacity to process this request. ApplicationAutoScaling may be "
    "in-progress (if configured) or try to increase the capacity by invoking "
    "UpdateInferenceComponentRuntimeConfig API."
)


def start_container(model_dir: Path, cache_dir: Path, **environ: str) -> ModelHost:
    """The GPU server's host for the package in ``model_dir`` (its SageMaker model directory),
    loaded and warmed up: what answers behind an InService endpoint. ``close()`` it after."""
    env = {MODEL_DIR_ENV: str(model_dir), CACHE_DIR_ENV: str(cache_dir), **environ}
    settings = ServerSettings.from_env(env)
    host = ModelHost(build_registry(settings, env), settings, retry_s=(0.2, 0.5)).start()
    if not host.wait_ready(60):
        host.close()
        raise RuntimeError(f"the container did not become ready: {host.ping().body.decode()}")
    return host


def model_error(status: int, message: str) -> tuple[int, str, dict[str, Any]]:
    """What SageMaker sends when the container answered ``status`` with an OIP error."""
    return container_error(status, json.dumps({"error": message}))


def container_error(status: int, body: str) -> tuple[int, str, dict[str, Any]]:
    """SageMaker's ``ModelError`` around the container's ``status`` and response ``body``."""
    return (
        424,
        "ModelError",
        {
            "ErrorCode": "CLIENT_ERROR_FROM_MODEL" if status < 500 else "SERVER_ERROR_FROM_MODEL",
            "Message": f"Received {'client' if status < 500 else 'server'} error ({status}) from primary",
            "OriginalStatusCode": status,
            "OriginalMessage": body,
            "LogStreamArn": "arn:aws:logs:us-east-1:000000000000:log-group:/aws/sagemaker/Endpoints/x",
        },
    )


def service_error(status: int, code: str, message: str = "service error") -> tuple[int, str, dict[str, Any]]:
    return status, code, {"message": message}


def no_capacity() -> tuple[int, str, dict[str, Any]]:
    """What SageMaker answers while the named inference component has no copy running."""
    return service_error(400, "ValidationError", NO_CAPACITY_MESSAGE)


def _error_reply(failure: tuple[int, str, dict[str, Any]]) -> tuple[int, dict[str, str], bytes]:
    status, code, document = failure
    return (
        status,
        {"x-amzn-ErrorType": code, "Content-Type": "application/json"},
        json.dumps(document).encode(),
    )


class SageMakerDouble:
    """SageMaker runtime on 127.0.0.1 for ``endpoints`` (endpoint name -> a started host)."""

    def __init__(
        self, endpoints: Mapping[str, ModelHost], *, components: Mapping[str, str] | None = None
    ) -> None:
        self.endpoints = dict(endpoints)
        self.components = dict(components or {})
        self.cold: set[str] = set()
        self.fail_with: tuple[int, str, dict[str, Any]] | None = None
        self.fail_times = 0  # 0: fail every call while fail_with is set
        self.reply_with: tuple[int, dict[str, str], bytes] | None = None
        self.delay_s = 0.0
        self._stopped = threading.Event()
        self.calls: list[dict[str, Any]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._stopped.set()  # a delayed answer gives up
        self._server.shutdown()
        self._server.server_close()

    def _failure(self) -> tuple[int, str, dict[str, Any]] | None:
        if self.fail_with is None:
            return None
        failure = self.fail_with
        if self.fail_times:
            self.fail_times -= 1
            if self.fail_times == 0:
                self.fail_with = None
        return failure

    def _invoke(
        self, endpoint: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        call = {
            "endpoint": endpoint,
            "component": headers.get(COMPONENT_HEADER),
            "headers": headers,
            "body": body,
            "attributes": parse_custom_attributes(headers.get(CUSTOM_ATTRIBUTES.lower())),
        }
        self.calls.append(call)
        if self.delay_s:
            self._stopped.wait(self.delay_s)
        if self.reply_with is not None:
            return self.reply_with
        failure = self._failure()
        if failure is not None:
            return _error_reply(failure)
        host = self.endpoints.get(endpoint)
        if host is None:
            return _error_reply(
                service_error(
                    400, "ValidationError", f"Endpoint {endpoint} of account 000000000000 not found."
                )
            )
        refused = self._component_refusal(endpoint, call["component"])
        if refused is not None:
            return _error_reply(refused)
        forwarded = {name: headers[name.lower()] for name in FORWARDED if name.lower() in headers}
        response = host.respond(HttpRequest("POST", "/invocations", forwarded, body))
        call["container"] = response
        if not 200 <= response.status < 300:
            return _error_reply(container_error(response.status, response.body.decode("utf-8", "replace")))
        reply = {name: value for name, value in response.headers.items() if name.lower() == "content-type"}
        attributes = {k.lower(): v for k, v in response.headers.items()}.get(CUSTOM_ATTRIBUTES.lower())
        if attributes is not None:
            reply[CUSTOM_ATTRIBUTES] = attributes
        return 200, reply, response.body

    def _component_refusal(
        self, endpoint: str, component: str | None
    ) -> tuple[int, str, dict[str, Any]] | None:
        hosted = {name for name, where in self.components.items() if where == endpoint}
        if not hosted and component is None:
            return None  # an endpoint without components
        if component not in hosted:
            return service_error(
                400, "ValidationError", f"Inference Component {component} not found on endpoint {endpoint}."
            )
        return no_capacity() if component in self.cold else None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                parts = self.path.strip("/").split("/")
                endpoint = parts[1] if len(parts) == 3 and parts[0] == "endpoints" else ""
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, reply, payload = double._invoke(endpoint, headers, body)
                self.send_response(status)
                for name, value in reply.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client gave up (a timeout test)
                    self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        return Handler
