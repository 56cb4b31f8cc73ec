"""The data plane: every OIP operation, independent of the transport that carried it.

Each operation returns a typed result or raises a typed error (:mod:`tierserve.errors`);
it never builds an HTTP response. Metadata and health answer a JSON document (a ``dict``),
inference an :class:`InferResult` (the validated request and the output arrays). The
transports encode them: the Lambda proxy integration (:mod:`tierserve.lambda_proxy`), the GPU
server and the local API (through :mod:`tierserve.routes`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tierserve.capture import Capture
from tierserve.errors import ModelUnavailable
from tierserve.protocol import InferenceRequest, model_metadata, parse_infer_request, server_metadata
from tierserve.registry import ModelRegistry
from tierserve.settings import ModelRef
from tierserve.telemetry import INFERENCE_MS, record_ms, stopwatch, tracer

Document = dict[str, Any]


@dataclass(frozen=True)
class InferResult:
    """One inference: the model that ran, the validated request (what it asked to get back)
    and the output arrays by name."""

    model: ModelRef
    request: InferenceRequest
    outputs: Mapping[str, np.ndarray]


class DataPlane:
    """Health, metadata, readiness and inference over a :class:`ModelRegistry`.

    ``readiness`` says why the server cannot serve yet (``None`` when it can); the GPU
    server passes its warm-up state, so ``ready()`` refuses until its models are warm.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        readiness: Callable[[], str | None] | None = None,
        capture: Capture | None = None,
    ) -> None:
        self.registry = registry
        self._readiness = readiness
        self.capture = capture  # drift: a sample of requests to S3 (tierserve.capture), never in the way

    def live(self) -> Document:
        return {"live": True}

    def ready(self) -> Document:
        """Raises:
        ModelUnavailable: ``readiness`` gave a reason (503, the reason in the message)."""
        reason = self._readiness() if self._readiness is not None else None
        if reason is not None:
            raise ModelUnavailable(f"not ready: {reason}")
        return {"ready": True}

    def server_metadata(self) -> Document:
        return server_metadata()

    def model_metadata(self, model: str, version: str | None = None) -> Document:
        """The loaded model's metadata, or the manifest's (it does not load the model)."""
        ref = self.registry.resolve(model, version)
        loaded = self.registry.loaded(ref)
        if loaded is not None:
            return loaded.metadata()
        return model_metadata(self.registry.manifest(ref))

    def model_ready(self, model: str, version: str | None = None) -> Document:
        """Ready means loaded: asking loads the model, so a readiness probe also warms it."""
        ref = self.registry.resolve(model, version)
        self.registry.get(ref)
        return {"name": ref.name, "version": ref.version, "ready": True}

    @tracer.capture_method(capture_response=False)
    def infer(
        self, model: str, body: bytes, headers: Mapping[str, str] | None, version: str | None = None
    ) -> InferResult:
        """Parse ``body`` against the model's signature and run it.

        Raises:
            ModelNotFound, BadRequest, PayloadTooLarge, ModelUnavailable, Overloaded: as the
                registry, the protocol and the model raise them.
        """
        ref = self.registry.resolve(model, version)
        manifest = self.registry.manifest(ref)
        request = parse_infer_request(
            body, headers, manifest, max_bytes=self.registry.settings.max_request_bytes
        )
        loaded = self.registry.get(ref)
        with stopwatch() as elapsed:
            outputs = loaded.predict(request.inputs, request.output_names())
        record_ms(INFERENCE_MS, elapsed[0])
        if self.capture is not None:
            self.capture.offer(ref, request.inputs, outputs)
        return InferResult(ref, request, outputs)
