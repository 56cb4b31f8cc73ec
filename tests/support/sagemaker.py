"""A loopback double of the SageMaker runtime API (``POST /endpoints/{name}/invocations``).

SageMaker's part is the local stack's own runtime (:mod:`tierserve.tools.local.sagemaker_runtime`:
addressing by endpoint and inference component, the headers it hands the container and back,
``ModelError`` around a container's non-2xx answer); behind each endpoint runs the GPU server's
real host (:class:`tierserve.sagemaker_hosting.ModelHost`, what ``functions/gpu_server`` serves
on ``/invocations``), so the worker's client (``tierserve.sagemaker_model``) and the container
(``tierserve.sagemaker_hosting``) meet end to end. What the double adds are faults and a record:
``cold`` components have no copy running and get SageMaker's no-capacity answer
(:func:`no_capacity`); ``fail_with`` makes it answer the errors SageMaker itself sends (its
status, ``x-amzn-ErrorType`` and JSON body) instead, ``reply_with`` any raw answer (status,
headers, body bytes: a hostile one); ``delay_s`` makes it slow (a stalled endpoint, until it is
stopped); ``calls`` lists what each call sent and what the container answered.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tierserve.routes import HttpResponse
from tierserve.sagemaker_hosting import CUSTOM_ATTRIBUTES, ModelHost, ServerSettings, build_registry
from tierserve.sagemaker_model import parse_custom_attributes
from tierserve.settings import CACHE_DIR_ENV, MODEL_DIR_ENV
from tierserve.tools.local.sagemaker_runtime import (
    COMPONENT_HEADER,
    NO_CAPACITY_MESSAGE,
    SageMakerError,
    SageMakerRuntime,
    container_error,
    error_reply,
    model_error,
    no_capacity,
    service_error,
)

__all__ = [
    "NO_CAPACITY_MESSAGE",
    "SageMakerDouble",
    "container_error",
    "model_error",
    "no_capacity",
    "service_error",
    "start_container",
]


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


class SageMakerDouble(SageMakerRuntime):
    """SageMaker runtime on 127.0.0.1 for ``endpoints`` (endpoint name -> a started host)."""

    def __init__(
        self, endpoints: Mapping[str, ModelHost], *, components: Mapping[str, str] | None = None
    ) -> None:
        super().__init__({name: host.respond for name, host in endpoints.items()}, components=components)
        self.endpoints = dict(endpoints)
        self.fail_with: SageMakerError | None = None
        self.fail_times = 0  # 0: fail every call while fail_with is set
        self.reply_with: tuple[int, dict[str, str], bytes] | None = None
        self.delay_s = 0.0
        self._stopped = threading.Event()
        self.calls: list[dict[str, Any]] = []
        self._serving = self.serve()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._serving.address[1]}"

    def stop(self) -> None:
        self._stopped.set()  # a delayed answer gives up
        self._serving.stop()

    def _failure(self) -> SageMakerError | None:
        if self.fail_with is None:
            return None
        failure = self.fail_with
        if self.fail_times:
            self.fail_times -= 1
            if self.fail_times == 0:
                self.fail_with = None
        return failure

    def invoke(self, endpoint: str, headers: Mapping[str, str], body: bytes) -> HttpResponse:
        call = {
            "endpoint": endpoint,
            "component": headers.get(COMPONENT_HEADER.lower()),
            "headers": dict(headers),
            "body": body,
            "attributes": parse_custom_attributes(headers.get(CUSTOM_ATTRIBUTES.lower())),
        }
        self.calls.append(call)
        if self.delay_s:
            self._stopped.wait(self.delay_s)
        if self.reply_with is not None:
            status, reply, payload = self.reply_with
            return HttpResponse(status, payload, dict(reply))
        failure = self._failure()
        if failure is not None:
            return error_reply(failure)
        response, container = self.forward(endpoint, headers, body)
        if container is not None:
            call["container"] = container
        return response
