"""The GPU tier seen from another process: a model behind a SageMaker real-time endpoint.

:class:`SageMakerModel` implements the model interface (``metadata``, ``ready``,
``predict``), so the S3 worker serves a heavy model exactly as it serves a warm onnxruntime
session; only ``predict`` differs: one ``InvokeEndpoint`` call carrying an OIP request.

Wire contract with the GPU server (``functions/gpu_server``, ``POST /invocations``):

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

Failures become typed errors here, at the boundary::

    ModelError 413 from the container     -> PayloadTooLarge
    ModelError 404 from the container     -> ModelNotFound (the endpoint serves other models)
    ModelError 408/429 from the container -> UpstreamTimeout / UpstreamUnavailable
    ModelError other 4xx                  -> BadRequest (the container's message)
    ModelError 5xx, ModelNotReady,
      throttling, 5xx, lost connections   -> UpstreamUnavailable   (retryable)
    read/connect timeouts                 -> UpstreamTimeout       (retryable)
    unknown endpoint, access denied       -> ModelUnavailable      (fix the deployment)
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tierserve.catalog import Manifest
from tierserve.errors import (
    BadRequest,
    ModelNotFound,
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
from tierserve.settings import MB
from tierserve.store import error_code

MODEL_ATTRIBUTE = "model"  # names the model, for an endpoint that serves several
# SageMaker real-time endpoints refuse request bodies over 6 MB and answer within 60 s.
DEFAULT_MAX_PAYLOAD_BYTES = 6 * MB
CONNECT_TIMEOUT_S = 3
READ_TIMEOUT_S = 65
MAX_ATTEMPTS = 3  # in all, the first included
MAX_MESSAGE_CHARS = 500

_RETRYABLE_CODES = {
    "ThrottlingException",
    "Throttling",
    "ServiceUnavailable",
    "InternalFailure",
    "InternalDependencyException",
    "ModelNotReadyException",
    "RequestTimeout",
}
_DENIED_CODES = {"AccessDeniedException", "AccessDenied", "UnrecognizedClientException"}


class SageMakerModel:
    """A model served by the SageMaker endpoint ``endpoint_name``; nothing is loaded here."""

    def __init__(
        self,
        manifest: Manifest,
        endpoint_name: str,
        *,
        client_factory: Callable[[], Any] | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self.manifest = manifest
        self.endpoint_name = endpoint_name
        self.max_payload_bytes = max_payload_bytes
        self._client_factory = client_factory or default_sagemaker_client

    def metadata(self) -> dict[str, Any]:
        return model_metadata(self.manifest, sagemaker_endpoint=self.endpoint_name)

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
        try:
            response = self._client_factory().invoke_endpoint(
                EndpointName=self.endpoint_name,
                Body=request.body,
                ContentType=BINARY_CONTENT_TYPE,
                Accept=f"{BINARY_CONTENT_TYPE}, application/json",
                CustomAttributes=f"{HEADER_LENGTH}={length}, {MODEL_ATTRIBUTE}={self.manifest.name}",
            )
            body = response["Body"].read()
        except Exception as error:  # botocore's tree is wide; translate it in one place
            raise sagemaker_error(error, self.endpoint_name) from error
        return self._decode(body, response)

    def _decode(self, body: bytes, response: Mapping[str, Any]) -> dict[str, np.ndarray]:
        attributes = parse_custom_attributes(response.get("CustomAttributes"))
        length = header(attributes, HEADER_LENGTH)
        try:
            return decode_infer_response(body, {HEADER_LENGTH: length} if length else None)
        except (BadRequest, KeyError, TypeError, ValueError) as error:
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


def sagemaker_error(error: Exception, endpoint: str) -> TierserveError:
    """Translate a botocore error from InvokeEndpoint into the tierserve error it means."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        code = error_code(error)
        message = str((response.get("Error") or {}).get("Message", ""))[:MAX_MESSAGE_CHARS]
        status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        if code == "ModelError":
            return _container_error(response, endpoint)
        if code in _RETRYABLE_CODES or status >= 500 or status == 429:
            return UpstreamUnavailable(
                f"the GPU endpoint {endpoint} is unavailable ({code or status}); retry shortly"
            )
        if code in _DENIED_CODES or status == 403:
            return ModelUnavailable(
                f"calling the GPU endpoint {endpoint} is denied: the role must allow "
                "sagemaker:InvokeEndpoint on it"
            )
        return ModelUnavailable(
            f"SageMaker refused the call to the GPU endpoint {endpoint} ({code or status}: {message}); "
            "check TIERSERVE_GPU_ENDPOINTS and that the endpoint is InService"
        )
    name = type(error).__name__
    if "Timeout" in name:
        return UpstreamTimeout(f"the GPU endpoint {endpoint} did not answer in time; retry")
    return UpstreamUnavailable(f"the GPU endpoint {endpoint} cannot be reached ({name}); retry shortly")


def _container_error(response: Mapping[str, Any], endpoint: str) -> TierserveError:
    status = int(response.get("OriginalStatusCode") or 0)
    message = _container_message(response.get("OriginalMessage"))
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


def _container_message(original: Any) -> str:
    """The ``error`` field of the container's OIP error body, or its text."""
    if not original:
        return ""
    text = str(original)
    try:
        document = json.loads(text)
    except ValueError:
        return text[:MAX_MESSAGE_CHARS]
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        return document["error"][:MAX_MESSAGE_CHARS]
    return text[:MAX_MESSAGE_CHARS]


_client: Any = None
_client_lock = threading.Lock()


def default_sagemaker_client() -> Any:
    """One sagemaker-runtime client per process, created on first use.

    Bounded retries (standard mode: throttling, 5xx and dropped connections) and explicit
    timeouts: SageMaker gives an invocation 60 s. Honours AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME.
    """
    global _client
    with _client_lock:
        if _client is None:
            import boto3
            from botocore.config import Config

            _client = boto3.client(
                "sagemaker-runtime",
                config=Config(
                    retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
                    connect_timeout=CONNECT_TIMEOUT_S,
                    read_timeout=READ_TIMEOUT_S,
                    max_pool_connections=16,
                ),
            )
        return _client


def clear_clients() -> None:
    """Forget the process's sagemaker-runtime client (tests call this between set-ups)."""
    global _client
    with _client_lock:
        _client = None
