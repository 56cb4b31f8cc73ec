"""Typed errors and the one table that maps them to HTTP status codes.

Every failure a client can see is one of these. Handlers never invent status codes:
they call :func:`to_http` on whatever reached them.

    TierserveError (500)
    ├── BadRequest (400)            the request is malformed or does not fit the signature
    ├── ModelNotFound (404)         unknown model or version
    ├── RouteNotFound (404)         no route for the path
    ├── JobNotFound (404)           no such job for this caller (another caller's is the same 404)
    ├── MethodNotAllowed (405)      a route that takes other methods (``Allow`` names them)
    ├── RequestTimeout (408)        the request did not arrive in time
    ├── PayloadTooLarge (413)       request body over the configured limit
    ├── UriTooLong (414)            the request target is over the server's limit
    ├── UnsupportedEncoding (415)   a Content-Encoding the servers do not decode
    ├── HeadersTooLarge (431)       the request's headers are over the server's limit
    ├── ModelUnavailable (503)      the artifact cannot be fetched, verified or loaded
    │   └── ArtifactRejected (503)  digest mismatch, decompression bomb, corrupt archive
    ├── UpstreamUnavailable (503)   S3, SageMaker or another dependency refused or failed
    ├── Overloaded (503)            a model's queue is full, or loads in flight hold the memory
    │   │                           budget; retry with backoff
    │   └── ModelStarting (503)     the model has no copy running (scaled to zero, or scaling
    │                               out): retry after ``retry_after_s`` (``Retry-After``)
    └── UpstreamTimeout (504)       a dependency did not answer in time
"""

from __future__ import annotations

from http import HTTPStatus


class TierserveError(Exception):
    """Base class: a message safe to show a client, its HTTP status, and the headers an
    answer carries beside the status (``Allow`` for a 405)."""

    status_code: int = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(TierserveError):
    status_code = HTTPStatus.BAD_REQUEST


class ModelNotFound(TierserveError):
    status_code = HTTPStatus.NOT_FOUND


class RouteNotFound(TierserveError):
    status_code = HTTPStatus.NOT_FOUND


class JobNotFound(TierserveError):
    """No job of that id for this model and caller: never created, expired, or another
    caller's. One answer for all three, so an id says nothing about whether it exists."""

    status_code = HTTPStatus.NOT_FOUND


class MethodNotAllowed(TierserveError):
    """The path has routes, none for this method; ``allowed`` are the methods it takes."""

    status_code = HTTPStatus.METHOD_NOT_ALLOWED

    def __init__(self, message: str, allowed: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allowed = allowed

    @property
    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)}


class RequestTimeout(TierserveError):
    status_code = HTTPStatus.REQUEST_TIMEOUT


class PayloadTooLarge(TierserveError):
    status_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UriTooLong(TierserveError):
    status_code = HTTPStatus.REQUEST_URI_TOO_LONG


class UnsupportedEncoding(TierserveError):
    status_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class HeadersTooLarge(TierserveError):
    status_code = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE


class ModelUnavailable(TierserveError):
    status_code = HTTPStatus.SERVICE_UNAVAILABLE


class ArtifactRejected(ModelUnavailable):
    """The stored artifact is corrupt or hostile; it is never cached."""


class UpstreamUnavailable(TierserveError):
    status_code = HTTPStatus.SERVICE_UNAVAILABLE


class UpstreamTimeout(TierserveError):
    status_code = HTTPStatus.GATEWAY_TIMEOUT


class Overloaded(TierserveError):
    """Busy, not broken: too many requests wait for one model (the GPU server's bounded
    batching queue), or loads in flight hold the whole memory budget."""

    status_code = HTTPStatus.SERVICE_UNAVAILABLE


class ModelStarting(Overloaded):
    """Busy in the longest way: the model has no copy running (a GPU-tier model scaled to zero,
    or still scaling out), and one is starting; the caller may retry after ``retry_after_s``
    seconds (the ``Retry-After`` a transport sends). Retryable, and no fault of the input."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


INTERNAL_ERROR_MESSAGE = (
    "internal error while serving the request; it has been logged with the request id. "
    "Retry, and report the request id if it persists"
)


def to_http(error: BaseException) -> tuple[int, dict[str, str]]:
    """Map any exception to an OIP error body: ``(status, {"error": message})``.

    Typed errors keep their message; anything else becomes a 500 that leaks no internals.
    """
    if isinstance(error, TierserveError):
        return int(error.status_code), {"error": error.message}
    return int(HTTPStatus.INTERNAL_SERVER_ERROR), {"error": INTERNAL_ERROR_MESSAGE}


def is_retryable(error: BaseException) -> bool:
    """True for faults that may pass (a dependency down or slow), false for bad input
    and for artifacts that will never load."""
    return isinstance(error, (UpstreamUnavailable, UpstreamTimeout, Overloaded))
