"""The data plane: every OIP operation, independent of the transport that carried it.

Lambda's API handler, the GPU server and the local API are thin adapters over one
:class:`DataPlane`; they translate their event into a call here and the result back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tierserve.errors import PayloadTooLarge, to_http
from tierserve.protocol import (
    JSON_CONTENT_TYPE,
    EncodedResponse,
    InferenceRequest,
    encode_infer_response,
    model_metadata,
    parse_infer_request,
    server_metadata,
)
from tierserve.registry import ModelRegistry
from tierserve.settings import MAX_RESPONSE_MB_ENV
from tierserve.telemetry import INFERENCE_MS, logger, record_ms, stopwatch, tracer

# What Lambda's proxy integration wraps around a body (status, headers, the JSON envelope).
PROXY_ENVELOPE_BYTES = 1024


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": JSON_CONTENT_TYPE})

    @classmethod
    def json(cls, document: Any, status: int = 200) -> HttpResponse:
        return cls(status, json.dumps(document, separators=(",", ":")).encode())

    @classmethod
    def from_error(cls, error: BaseException) -> HttpResponse:
        status, document = to_http(error)
        if status == 500:
            logger.exception("request failed", extra={"status": status})
        elif status > 500:
            logger.warning("request failed", extra={"status": status, "error": document["error"]})
        return cls.json(document, status)


def sent_size(encoded: EncodedResponse) -> int:
    """The bytes ``encoded`` takes in a Lambda proxy response: a binary body is base64-encoded
    (4 bytes per 3), a JSON body is a string in the envelope (each quote and backslash escaped)."""
    body = encoded.body
    if encoded.headers.get("Content-Type") == JSON_CONTENT_TYPE:
        size = len(body) + body.count(b'"') + body.count(b"\\")
    else:
        size = 4 * math.ceil(len(body) / 3)
    return size + PROXY_ENVELOPE_BYTES


def check_response_size(encoded: EncodedResponse, request: InferenceRequest, max_bytes: int) -> None:
    """Refuse a response over ``max_bytes`` as sent, with what the client can change; past
    Lambda's limit API Gateway would answer a bare 502 instead.

    Raises:
        PayloadTooLarge: the response is over the limit.
    """
    size = sent_size(encoded)
    if size <= max_bytes:
        return
    all_binary = request.binary_outputs or (
        request.outputs is not None and all(o.binary for o in request.outputs)
    )
    fixes = [] if all_binary else ['ask for binary outputs ("parameters": {"binary_data_output": true})']
    fixes += ['ask for fewer outputs ("outputs": [{"name": ...}])', "send fewer rows per request"]
    raise PayloadTooLarge(
        f"the response would be {size:,} bytes, over the limit of {max_bytes:,} ({MAX_RESPONSE_MB_ENV}): "
        + ", ".join(fixes)
    )


class DataPlane:
    """Health, metadata, readiness and inference over a :class:`ModelRegistry`."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def live(self) -> HttpResponse:
        return HttpResponse.json({"live": True})

    def ready(self) -> HttpResponse:
        return HttpResponse.json({"ready": True})

    def server_metadata(self) -> HttpResponse:
        return HttpResponse.json(server_metadata())

    def model_metadata(self, model: str, version: str | None = None) -> HttpResponse:
        ref = self.registry.resolve(model, version)
        loaded = self.registry.loaded(ref)
        if loaded is not None:
            return HttpResponse.json(loaded.metadata())
        return HttpResponse.json(model_metadata(self.registry.manifest(ref)))

    def model_ready(self, model: str, version: str | None = None) -> HttpResponse:
        """Ready means loaded: asking loads the model, so a readiness probe also warms it."""
        ref = self.registry.resolve(model, version)
        self.registry.get(ref)
        return HttpResponse.json({"name": ref.name, "version": ref.version, "ready": True})

    @tracer.capture_method(capture_response=False)
    def infer(
        self, model: str, body: bytes, headers: Mapping[str, str] | None, version: str | None = None
    ) -> HttpResponse:
        ref = self.registry.resolve(model, version)
        manifest = self.registry.manifest(ref)
        request = parse_infer_request(
            body, headers, manifest, max_bytes=self.registry.settings.max_request_bytes
        )
        loaded = self.registry.get(ref)
        with stopwatch() as elapsed:
            outputs = loaded.predict(request.inputs, request.output_names())
        record_ms(INFERENCE_MS, elapsed[0])
        encoded = encode_infer_response(request, outputs, model_name=ref.name, model_version=ref.version)
        check_response_size(encoded, request, self.registry.settings.max_response_bytes)
        return HttpResponse(200, encoded.body, encoded.headers)

    def call(
        self, endpoint: str, params: Mapping[str, str], body: bytes, headers: Mapping[str, str]
    ) -> HttpResponse:
        """Run one route's operation; any error becomes its OIP error response."""
        try:
            if endpoint == "infer":
                return self.infer(params["model"], body, headers, params.get("version"))
            return getattr(self, endpoint)(**params)
        except Exception as error:
            return HttpResponse.from_error(error)
