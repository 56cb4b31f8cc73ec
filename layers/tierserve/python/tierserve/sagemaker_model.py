"""The GPU tier seen from another process: a model behind a SageMaker real-time endpoint.

:class:`SageMakerModel` implements the model interface (``metadata``, ``ready``,
``predict``), so the S3 worker serves a heavy model exactly as it serves a warm onnxruntime
session; only ``predict`` differs: one ``InvokeEndpoint`` call carrying an OIP request.

Wire contract with the GPU server (``functions/gpu_server``, ``POST /invocations``):

- addressing: ``EndpointName``, and on an endpoint that hosts models as inference components
  the model's ``InferenceComponentName`` (the ``X-Amzn-SageMaker-Inference-Component``
  header) on every call; where both come from: ``TIERSERVE_GPU_ENDPOINTS``
  (:class:`tierserve.settings.GpuTarget`).
- request: ``Content-Type: application/octet-stream``; the body is an OIP binary request (the
  JSON header, then the tensors' bytes) asking for binary outputs; the header's byte length
  travels in ``CustomAttributes`` as ``inference-header-content-length=N``, beside
  ``model=NAME`` for endpoints that serve several models (SageMaker hands them to the
  container as ``X-Amzn-SageMaker-Custom-Attributes``; a SageMaker caller cannot set
  ``Inference-Header-Content-Length`` itself).
- response: an OIP response. Binary outputs come with the same attribute in the container's
  ``X-Amzn-SageMaker-Custom-Attributes`` response header; without it the body is read as
  plain JSON.
- errors: the container answers ``{"error": message}`` with the OIP status; SageMaker turns
  any non-2xx into ``ModelError`` (424) carrying ``OriginalStatusCode`` and ``OriginalMessage``.

Every answer becomes a typed error here, at the boundary (read by
:func:`tierserve.aws.classify`; the container's status and body are untrusted)::

    ModelError 413 from the container     -> PayloadTooLarge
    ModelError 404 from the container     -> ModelNotFound (the endpoint serves other models)
    ModelError 408/429 from the container -> UpstreamTimeout / UpstreamUnavailable
    ModelError other 4xx                  -> BadRequest (the container's message, one bounded line)
    ValidationError "... has no capacity
      to process this request"           -> ModelStarting  (no copy is running: scaled to zero,
                                             or scaling out; retry after ``retry_after_s``)
    ModelError 5xx or no valid status,
      ModelNotReady, throttling, 5xx,
      lost connections, answers that
      cannot be parsed                    -> UpstreamUnavailable   (retryable)
    read/connect timeouts, OutOfTime      -> UpstreamTimeout       (retryable)
    unknown endpoint, access denied       -> ModelUnavailable      (fix the deployment)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tierserve import aws
from tierserve.catalog import Manifest
from tierserve.errors import (
    BadRequest,
    ModelNotFound,
    ModelStarting,
    ModelUnavailable,
    PayloadTooLarge,
    TierserveError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tierserve.protocol import (
    BINARY_CONTENT_TYPE,
    HEADER_LENGTH,
    decode_infer_response,
    encode_infer_request,
    header,
    model_metadata,
)
from tierserve.settings import GPU_ENDPOINTS_ENV, MB, GpuTarget

MODEL_ATTRIBUTE = "model"  # names the model, for an endpoint that serves several
# SageMaker real-time endpoints refuse request bodies over 6 MB (timeouts and retries:
# tierserve.aws.POLICIES["sagemaker-runtime"]).
DEFAULT_MAX_PAYLOAD_BYTES = 6 * MB
# A container's error body longer than this is not parsed for its "error" text, only cut.
MAX_PARSED_BODY_CHARS = 64 * 1024
# SageMaker's answer while an inference component has no copy (HTTP 400, ValidationError):
# "Inference Component has no capacity to process this request. ApplicationAutoScaling may be
# in-progress (if configured) or try to increase the capacity by invoking
# UpdateInferenceComponentRuntimeConfig API." (docs/gpu-tier.md, "The cold edge", has the sources.)
NO_CAPACITY_CODE = "ValidationError"
NO_CAPACITY_MARKER = "no capacity"
# How long a copy takes to start from zero on SageMaker (a GPU instance, the image, the model):
# minutes. What the worker says, and when it suggests trying again.
DEFAULT_COLD_START_MINUTES = 10
DEFAULT_RETRY_AFTER_S = 60


class SageMakerModel:
    """A model served by the SageMaker endpoint ``endpoint_name`` (as the inference component
    ``component_name``, when the endpoint hosts components); nothing is loaded here.

    ``cold_start_minutes`` and ``retry_after_s`` go into the :class:`ModelStarting` raised
    while the model has no copy running.
    """

    def __init__(
        self,
        manifest: Manifest,
        endpoint_name: str,
        *,
        component_name: str | None = None,
        client_factory: Callable[[], Any] | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        cold_start_minutes: int = DEFAULT_COLD_START_MINUTES,
        retry_after_s: int = DEFAULT_RETRY_AFTER_S,
    ) -> None:
        self.manifest = manifest
        self.endpoint_name = endpoint_name
        self.component_name = component_name
        self.max_payload_bytes = max_payload_bytes
        self.cold_start_minutes = cold_start_minutes
        self.retry_after_s = retry_after_s
        self._client_factory = client_factory or aws.sagemaker_runtime_client

    @classmethod
    def serving(cls, manifest: Manifest, target: GpuTarget, **options: Any) -> SageMakerModel:
        """The model ``manifest`` at ``target`` (from ``TIERSERVE_GPU_ENDPOINTS``), e.g.
        ``SageMakerModel.serving(manifest, GpuTarget("tierserve-g5-xlarge", "tierserve-big-g5-xlarge"))``."""
        return cls(manifest, target.endpoint, component_name=target.component, **options)

    def metadata(self) -> dict[str, Any]:
        where = {"sagemaker_endpoint": self.endpoint_name}
        if self.component_name is not None:
            where["sagemaker_inference_component"] = self.component_name
        return model_metadata(self.manifest, **where)

    def ready(self) -> bool:
        """True: SageMaker routes only to InService endpoints and says so when it cannot
        (probing would need ``sagemaker:DescribeEndpoint`` for no gain)."""
        return True

    def predict(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model on the endpoint: one InvokeEndpoint with an OIP binary request.

        Raises:
            PayloadTooLarge: the encoded request is over the endpoint's payload limit.
            BadRequest: the container refused the input (its message is kept).
            ModelStarting: the model has no copy running (scaled to zero, or scaling out);
                retry after its ``retry_after_s``.
            UpstreamUnavailable / UpstreamTimeout: SageMaker or the container failed or was
                slow; retry later.
            ModelUnavailable: the endpoint does not exist or may not be called.
        """
        request = encode_infer_request(inputs, binary=True, binary_outputs=True, outputs=output_names)
        if len(request.body) > self.max_payload_bytes:
            raise PayloadTooLarge(
                f"the request for {self.manifest.name} is {len(request.body):,} bytes, over the GPU "
                f"endpoint's limit of {self.max_payload_bytes:,}: send fewer rows per file "
                "(or lower TIERSERVE_ROW_BATCH_SIZE for .jsonl)"
            )
        length = request.headers.get("Inference-Header-Content-Length", str(len(request.body)))
        address = {"EndpointName": self.endpoint_name}
        if self.component_name is not None:
            address["InferenceComponentName"] = self.component_name
        try:
            response = self._client_factory().invoke_endpoint(
                **address,
                Body=request.body,
                ContentType=BINARY_CONTENT_TYPE,
                Accept=f"{BINARY_CONTENT_TYPE}, application/json",
                CustomAttributes=f"{HEADER_LENGTH}={length}, {MODEL_ATTRIBUTE}={self.manifest.name}",
            )
            body = response["Body"].read()
        except Exception as error:  # botocore's tree is wide; aws.classify reads it
            raise sagemaker_error(
                error,
                str(GpuTarget(self.endpoint_name, self.component_name)),
                model=self.manifest.name,
                cold_start_minutes=self.cold_start_minutes,
                retry_after_s=self.retry_after_s,
            ) from error
        return self._decode(body, response)

    def _decode(self, body: bytes, response: Mapping[str, Any]) -> dict[str, np.ndarray]:
        attributes = parse_custom_attributes(response.get("CustomAttributes"))
        length = header(attributes, HEADER_LENGTH)
        try:
            return decode_infer_response(body, {HEADER_LENGTH: length} if length else None)
        except (
            BadRequest,
            KeyError,
            TypeError,
            ValueError,
            ArithmeticError,
            RecursionError,
            MemoryError,
        ) as error:
            # Our request was valid (the container accepted it): a reply we cannot read is a
            # fault of the upstream, not of the input.
            raise UpstreamUnavailable(
                f"the GPU endpoint {self.endpoint_name} sent a response that is not an OIP "
                f"response ({type(error).__name__}); check the GPU server's version"
            ) from None


def parse_custom_attributes(value: str | None) -> dict[str, str]:
    """``"a=1, b=2"`` (or ``;``-separated) as a dict; parts without ``=`` are ignored.

    A bare integer is the binary header's length: API Gateway can copy the client's
    ``Inference-Header-Content-Length`` into the custom attributes but cannot prefix it.
    """
    if (value or "").strip().isdigit():
        return {HEADER_LENGTH: value.strip()}  # type: ignore[union-attr]
    pairs: dict[str, str] = {}
    for part in (value or "").replace(";", ",").split(","):
        name, sep, item = part.partition("=")
        if sep and name.strip():
            pairs[name.strip()] = item.strip()
    return pairs


def sagemaker_error(
    error: BaseException,
    endpoint: str,
    *,
    model: str = "",
    cold_start_minutes: int = DEFAULT_COLD_START_MINUTES,
    retry_after_s: int = DEFAULT_RETRY_AFTER_S,
) -> TierserveError:
    """The error for ``error``, raised by InvokeEndpoint on ``endpoint`` (``name`` or
    ``name/component``; classified by :func:`tierserve.aws.classify`) for ``model``. Never
    raises, whatever the answer held; a tierserve error passes through unchanged."""
    if isinstance(error, TierserveError):
        return error
    failure = aws.classify(error)
    if failure.code == NO_CAPACITY_CODE and NO_CAPACITY_MARKER in failure.message.lower():
        return ModelStarting(
            f"{f'model {model}' if model else 'the model'} is starting from zero: no copy of it was running on its GPU endpoint "
            f"({endpoint}), and SageMaker is starting one, which takes minutes (about "
            f"{cold_start_minutes}). Retry after {retry_after_s} s",
            retry_after_s=retry_after_s,
        )
    if failure.code == "ModelError":
        response = getattr(error, "response", None)
        return _container_error(response if isinstance(response, dict) else {}, endpoint)
    if failure.kind in ("throttled", "unavailable") and failure.answered:
        return UpstreamUnavailable(
            f"the GPU endpoint {endpoint} is unavailable ({failure.code}); retry shortly"
        )
    if failure.kind in ("throttled", "unavailable"):
        return UpstreamUnavailable(
            f"the GPU endpoint {endpoint} cannot be reached ({failure.code}); retry shortly"
        )
    if failure.kind == "timeout":
        return UpstreamTimeout(f"the GPU endpoint {endpoint} did not answer in time ({failure.code}); retry")
    if failure.kind == "unreadable":
        return UpstreamUnavailable(
            f"the GPU endpoint {endpoint} sent an answer that cannot be read ({failure.code}); "
            "check the GPU server's logs, then retry"
        )
    if failure.kind == "denied":
        return ModelUnavailable(
            f"calling the GPU endpoint {endpoint} is denied ({failure.code}): the role must allow "
            "sagemaker:InvokeEndpoint on it"
        )
    detail = f"{failure.code}: {failure.message}" if failure.message else failure.code
    return ModelUnavailable(
        f"SageMaker refused the call to the GPU endpoint {endpoint} ({detail}); "
        f"check {GPU_ENDPOINTS_ENV} and that the endpoint (and the inference component) is InService"
    )


def _container_error(response: Mapping[str, Any], endpoint: str) -> TierserveError:
    """The container's own answer, wrapped by SageMaker in ``ModelError``: its status (an
    untrusted value, 0 when it is no status) and its OIP error body (any text)."""
    status = aws.http_status(response.get("OriginalStatusCode"))
    message = container_message(response.get("OriginalMessage"))
    if status == 413:
        return PayloadTooLarge(message or "the GPU server refused the request as too large")
    if status == 404:
        return ModelNotFound(message or f"the GPU server behind {endpoint} does not serve this model")
    if status == 408:
        return UpstreamTimeout(f"the GPU server behind {endpoint} timed out; retry")
    if status == 429:
        return UpstreamUnavailable(f"the GPU server behind {endpoint} is busy; retry shortly")
    if 400 <= status < 500:
        return BadRequest(message or f"the GPU server refused the input ({status})")
    if status == 504:
        return UpstreamTimeout(f"the GPU server behind {endpoint} timed out ({status}); retry")
    return UpstreamUnavailable(f"the GPU server behind {endpoint} failed ({status or 'no status'}); retry")


def container_message(original: object) -> str:
    """The ``error`` text of the container's OIP error body, else the body's text: one bounded,
    printable line whatever the body is (huge, nested past any depth, not UTF-8, JSON whose
    ``error`` is no string). Only a body of at most :data:`MAX_PARSED_BODY_CHARS` is parsed."""
    if isinstance(original, bytes | bytearray):
        original = bytes(original[:MAX_PARSED_BODY_CHARS]).decode("utf-8", "replace")
    if not isinstance(original, str) or not original:
        return ""
    document: Any = None
    if len(original) <= MAX_PARSED_BODY_CHARS:
        try:
            document = json.loads(original)
        except (ValueError, RecursionError):  # ValueError covers bad JSON and huge integers
            document = None
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        return aws.bounded_text(document["error"])
    return aws.bounded_text(original)
