"""AWS plumbing in one place: the boto3 clients, the time a call may take, and what a
botocore error means.

**Clients.** One client per service (and endpoint) per process, created on first use, so
moto can start before any client exists; each service has one retry and timeout policy
(:data:`POLICIES`). :func:`clear_clients` forgets them all (the tests' autouse fixture).

    aws.client("s3").get_object(Bucket=..., Key=...)

**Time.** Inside :func:`within` a :class:`Deadline` (a Lambda invocation's remaining time,
less a margin) bounds every call made on that thread: the client handed out has the
longest read timeout of its service's ladder that still fits, and an attempt (the first or
a retry) that could outlast the deadline is not started: the call raises :class:`OutOfTime`
instead. botocore cannot change a client's timeouts per call, so the clients are cached per
rung of the ladder: a handful per service, not one per call.

**Errors.** :func:`classify` reads whatever a boto3 call raised as one :class:`Failure` of
one kind, the same way for every caller:

    gone         NoSuchKey, NoSuchVersion, NoSuchBucket, NotFound, 404
    changed      PreconditionFailed, 412: not the version the call was conditioned on
    raced        ConditionalRequestConflict, 409: a concurrent conditional write won
    denied       AccessDenied, 403, 401, missing, expired or invalid credentials
    throttled    SlowDown, Throttling, ThrottlingException, TooManyRequests, 429
    unavailable  5xx, InternalError, ServiceUnavailable, ModelNotReady, connections lost or refused
    timeout      read and connect timeouts, RequestTimeout, 408, 504, OutOfTime
    refused      any other answer: the service refused this request (ValidationError, ModelError, ...)
    unreadable   anything else a call raised: an answer botocore could not parse, or no botocore error

The owner of a resource turns a failure into the error its caller sees and names the
setting to fix: :mod:`tierserve.store` for model artifacts, :mod:`tierserve.s3_pipeline`
for data inputs and results, :mod:`tierserve.sagemaker_model` for GPU endpoints, the
packaging tools for uploads.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from botocore import exceptions as botocore_errors

from tierserve.errors import UpstreamTimeout

Kind = Literal[
    "gone", "changed", "raced", "denied", "throttled", "unavailable", "timeout", "refused", "unreadable"
]
RETRYABLE_KINDS: frozenset[str] = frozenset({"throttled", "unavailable", "timeout", "unreadable"})
MAX_MESSAGE_CHARS = 500


# ---------------------------------------------------------------- policies and clients


@dataclass(frozen=True)
class Policy:
    """How long one call to a service may take: connect and read timeouts (seconds) and
    attempts in all (the first included), retried in botocore's standard mode (throttling,
    5xx, timeouts and dropped connections, with jittered exponential backoff)."""

    connect_timeout_s: float
    read_timeout_s: float
    attempts: int
    max_pool_connections: int = 16

    def read_timeouts(self) -> tuple[float, ...]:
        """The ladder of read timeouts a deadline may choose from, longest first: the policy's
        own, then powers of two below it down to half a second."""
        rungs = [2.0**power for power in range(6, -2, -1) if 2.0**power < self.read_timeout_s]
        return (self.read_timeout_s, *rungs)


# SageMaker gives an invocation 60 s; S3 answers within a few seconds or is in trouble; SQS
# long polls wait up to 20 s (the local stack's poller). Step Functions, CloudFormation and
# Kinesis answer control and record calls within seconds (the batch CLI, the stream worker).
POLICIES: Mapping[str, Policy] = {
    "s3": Policy(connect_timeout_s=3, read_timeout_s=10, attempts=3),
    "sagemaker-runtime": Policy(connect_timeout_s=3, read_timeout_s=65, attempts=3),
    "sqs": Policy(connect_timeout_s=3, read_timeout_s=30, attempts=3),
    "stepfunctions": Policy(connect_timeout_s=3, read_timeout_s=10, attempts=3),
    "cloudformation": Policy(connect_timeout_s=3, read_timeout_s=10, attempts=3),
    "kinesis": Policy(connect_timeout_s=3, read_timeout_s=10, attempts=3),
}

_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


def client(service: str, *, endpoint_url: str | None = None, **credentials: str) -> Any:
    """This process's client for ``service`` (a key of :data:`POLICIES`), created on
    first use with the service's :data:`POLICIES` entry.

    ``endpoint_url`` and ``credentials`` (``aws_access_key_id``, ``aws_secret_access_key``,
    ``region_name``) are for the local stack; everywhere else botocore's own settings apply
    (``AWS_ENDPOINT_URL_S3``, ``AWS_PROFILE``, ...). Within a :func:`within` block the read
    timeout fits the time left.

    Raises:
        OutOfTime: the deadline leaves no time for even one attempt.
    """
    policy = POLICIES[service]
    connect_s, read_s = _timeouts_for(service, policy, current_deadline())
    key = (service, endpoint_url, tuple(sorted(credentials.items())), connect_s, read_s)
    with _clients_lock:
        found = _clients.get(key)
        if found is None:
            found = _clients[key] = _new_client(service, policy, connect_s, read_s, endpoint_url, credentials)
        return found


def new_client(service: str, *, endpoint_url: str | None = None, **credentials: str) -> Any:
    """A client of its own for ``service``, with the service's policy, that no one else is
    handed: for a harness that hangs event hooks on its client. Everything else uses :func:`client`."""
    policy = POLICIES[service]
    return _new_client(
        service, policy, policy.connect_timeout_s, policy.read_timeout_s, endpoint_url, credentials
    )


def s3_client() -> Any:
    """:func:`client` for S3: the default client factory of the store and the pipeline."""
    return client("s3")


def sagemaker_runtime_client() -> Any:
    """:func:`client` for the SageMaker runtime (``InvokeEndpoint``)."""
    return client("sagemaker-runtime")


def clear_clients() -> None:
    """Forget every client (tests call this between moto set-ups and endpoint changes; a
    restored SnapStart environment, whose pooled connections are dead, gets new ones)."""
    with _clients_lock:
        _clients.clear()


def close_clients() -> None:
    """Close every client's pooled connections, then forget the clients: nothing of ours holds a
    connection afterwards (what a SnapStart snapshot must not capture)."""
    with _clients_lock:
        made = list(_clients.values())
        _clients.clear()
    for found in made:
        with contextlib.suppress(Exception):  # a client that cannot close has nothing left to close
            found.close()


def _new_client(
    service: str,
    policy: Policy,
    connect_s: float,
    read_s: float,
    endpoint_url: str | None,
    credentials: Mapping[str, str],
) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=connect_s,
        read_timeout=read_s,
        retries={"mode": "standard", "total_max_attempts": policy.attempts},
        max_pool_connections=policy.max_pool_connections,
        # Presigned URLs (the jobs routes') in SigV4, as every request already is: botocore would
        # otherwise presign S3 URLs with SigV2, which S3 refuses in newer regions.
        **({"signature_version": "s3v4"} if service == "s3" else {}),
    )
    made = boto3.client(service, endpoint_url=endpoint_url, config=config, **credentials)
    # Every attempt, retries included, must fit in the time left (see within()).
    made.meta.events.register("before-send", partial(_refuse_late_attempt, attempt_s=connect_s + read_s))
    return made


# ---------------------------------------------------------------- deadlines


# Lambda's init phase, by AWS_LAMBDA_INITIALIZATION_TYPE: 10 s on demand; SnapStart and
# provisioned concurrency allow 130 s or the function timeout, whichever is higher.
INIT_SECONDS: Mapping[str, float] = {"on-demand": 10.0, "snap-start": 130.0, "provisioned-concurrency": 130.0}
# What an API invocation keeps of its remaining time to answer (an error is a few bytes).
RESPONSE_MARGIN_S = 2.0
# What the rest of the init (imports before, the runtime's own work after) keeps of that.
INIT_MARGIN_S = 2.0


class OutOfTime(UpstreamTimeout):
    """The invocation has no time left for this call (or this work); the caller reports it
    as a transient failure, so the work is delivered again."""


@dataclass(frozen=True)
class Deadline:
    """When calls made on its behalf must have finished (``at``, a :func:`time.monotonic`
    value), and when its owner must have answered (``hard_at``, later by half the margin)."""

    at: float
    hard_at: float

    @classmethod
    def after(cls, seconds: float, margin_s: float = 0.0) -> Deadline:
        """A deadline ``seconds`` from now, less ``margin_s`` for calls (half of it for the owner)."""
        now = time.monotonic()
        return cls(at=now + seconds - margin_s, hard_at=now + seconds - margin_s / 2)

    @classmethod
    def for_invocation(cls, context: Any, margin_s: float = 5.0) -> Deadline:
        """A Lambda invocation's deadline: its remaining time (``get_remaining_time_in_millis``)
        less a margin for reporting the result: ``margin_s``, or a fifth of the time left when
        that is less."""
        remaining_s = max(0.0, context.get_remaining_time_in_millis() / 1000)
        return cls.after(remaining_s, min(margin_s, remaining_s / 5))

    @classmethod
    def for_init(cls, initialization_type: str | None, margin_s: float = INIT_MARGIN_S) -> Deadline | None:
        """The deadline of Lambda's init phase, for work done there (a model preload): 10 s
        on demand, and at least 130 s with SnapStart or provisioned concurrency (the limit is
        130 s or the function timeout, whichever is higher), less ``margin_s`` for the rest of
        the init. None outside Lambda (``initialization_type`` unset): nothing bounds it."""
        seconds = INIT_SECONDS.get(initialization_type or "")
        return None if seconds is None else cls.after(seconds, margin_s)

    def remaining(self) -> float:
        """Seconds left for calls (negative once past)."""
        return self.at - time.monotonic()

    def check(self, doing: str) -> None:
        """Raise :class:`OutOfTime` when the deadline has passed, before ``doing`` starts."""
        if self.remaining() <= 0:
            raise OutOfTime(f"no time left in this invocation for {doing}; it will be delivered again")


_deadline: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "tierserve_deadline", default=None
)


@contextlib.contextmanager
def within(deadline: Deadline | None) -> Iterator[None]:
    """Bound the AWS calls of this thread (and of its context) by ``deadline``; None bounds
    nothing. Threads do not inherit it: enter it on the thread that makes the calls."""
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)


def current_deadline() -> Deadline | None:
    return _deadline.get()


def check_deadline(doing: str) -> None:
    """:meth:`Deadline.check` for the current deadline, if any."""
    deadline = current_deadline()
    if deadline is not None:
        deadline.check(doing)


def _timeouts_for(service: str, policy: Policy, deadline: Deadline | None) -> tuple[float, float]:
    """``(connect, read)`` timeouts for one call: the policy's, or the longest rung of its
    ladder whose worst attempt (connect plus read) fits in the time left."""
    if deadline is None:
        return policy.connect_timeout_s, policy.read_timeout_s
    left = deadline.remaining()
    for read_s in policy.read_timeouts():
        connect_s = min(policy.connect_timeout_s, read_s)
        if connect_s + read_s <= left:
            return connect_s, read_s
    raise OutOfTime(f"no time left in this invocation for a call to {service}; it will be delivered again")


def _refuse_late_attempt(attempt_s: float, **_: Any) -> None:
    deadline = current_deadline()
    if deadline is not None and deadline.remaining() < attempt_s:
        # Raised inside botocore's send: not retryable, so the call ends here with this error.
        raise OutOfTime(
            f"no time left in this invocation for another attempt of {attempt_s:g} s; "
            "it will be delivered again"
        )


# ---------------------------------------------------------------- errors


@dataclass(frozen=True)
class Failure:
    """What a failed call means: its :data:`Kind`, the service's error ``code`` (else the HTTP
    status as text, else the exception's class name), the HTTP ``status`` (0 without an
    answer) and the service's ``message`` (one bounded, printable line; may be empty)."""

    kind: Kind
    code: str
    status: int = 0
    message: str = ""

    @property
    def retryable(self) -> bool:
        """True when the same call may succeed later: throttled, unavailable, timeout, unreadable."""
        return self.kind in RETRYABLE_KINDS

    @property
    def bucket_missing(self) -> bool:
        """The bucket itself does not exist (a ``gone`` that no upload of an object fixes)."""
        return self.code == "NoSuchBucket"

    @property
    def answered(self) -> bool:
        """The service answered (an HTTP status came back), as opposed to no connection."""
        return self.status > 0


_CODE_KINDS: Mapping[str, Kind] = {
    **dict.fromkeys(("NoSuchKey", "NoSuchVersion", "NoSuchBucket", "NotFound", "NoSuchUpload"), "gone"),
    **dict.fromkeys(("PreconditionFailed",), "changed"),
    **dict.fromkeys(("ConditionalRequestConflict",), "raced"),
    **dict.fromkeys(
        (
            "AccessDenied",
            "AccessDeniedException",
            "AllAccessDisabled",
            "AccountProblem",
            "ExpiredToken",
            "ExpiredTokenException",
            "InvalidAccessKeyId",
            "InvalidClientTokenId",
            "InvalidToken",
            "SignatureDoesNotMatch",
            "UnrecognizedClientException",
        ),
        "denied",
    ),
    **dict.fromkeys(
        (
            "SlowDown",
            "Throttling",
            "ThrottlingException",
            "TooManyRequestsException",
            "RequestLimitExceeded",
            "ProvisionedThroughputExceededException",
        ),
        "throttled",
    ),
    **dict.fromkeys(
        (
            "InternalError",
            "InternalFailure",
            "InternalDependencyException",
            "InternalServerError",
            "ServiceUnavailable",
            "ServiceUnavailableException",
            "ModelNotReadyException",
        ),
        "unavailable",
    ),
    **dict.fromkeys(("RequestTimeout", "RequestTimeoutException", "OutOfTime"), "timeout"),
}
_STATUS_KINDS: Mapping[int, Kind] = {
    401: "denied",
    403: "denied",
    404: "gone",
    408: "timeout",
    409: "raced",
    412: "changed",
    429: "throttled",
    504: "timeout",
}
_EXCEPTION_KINDS: tuple[tuple[tuple[type[BaseException], ...], Kind], ...] = (
    ((botocore_errors.ReadTimeoutError, botocore_errors.ConnectTimeoutError, TimeoutError), "timeout"),
    (
        (
            botocore_errors.NoCredentialsError,
            botocore_errors.PartialCredentialsError,
            botocore_errors.CredentialRetrievalError,
        ),
        "denied",
    ),
    (
        (
            botocore_errors.ConnectionError,
            botocore_errors.HTTPClientError,
            botocore_errors.IncompleteReadError,  # the answer was cut short
            botocore_errors.ChecksumError,  # or damaged in transit
            botocore_errors.FlexibleChecksumError,
            ConnectionError,
        ),
        "unavailable",
    ),
    ((botocore_errors.BotoCoreError,), "refused"),  # a request botocore itself refused to send
)
# boto3's managed transfers (upload_file) keep only the text of the ClientError they wrap.
_CODE_IN_TEXT = re.compile(r"An error occurred \((\w+)\)")


def classify(error: BaseException) -> Failure:
    """What ``error`` (anything a boto3 call raised, or an exception chained to one) means.

    Never raises, whatever the error holds.
    """
    chain = list(_chain(error))
    for seen in chain:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            return _from_response(response)
    for seen in chain:
        if isinstance(seen, OutOfTime):
            return Failure("timeout", "OutOfTime", 0, bounded_text(str(seen)))
        for types, kind in _EXCEPTION_KINDS:
            if isinstance(seen, types):
                return Failure(kind, type(seen).__name__)
    for seen in chain:
        match = _CODE_IN_TEXT.search(str(seen)[:2000])
        if match:
            return Failure(_kind(match.group(1), 0), match.group(1))
    return Failure("unreadable", type(error).__name__)


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = error
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited and len(visited) < 16:
        visited.add(id(seen))
        yield seen
        seen = seen.__cause__ or seen.__context__


def _from_response(response: Mapping[str, Any]) -> Failure:
    details = response.get("Error")
    details = details if isinstance(details, dict) else {}
    metadata = response.get("ResponseMetadata")
    status = http_status(metadata.get("HTTPStatusCode") if isinstance(metadata, dict) else None)
    code = details.get("Code")
    code = bounded_text(code, 100) if isinstance(code, str) else ""
    code = code or (str(status) if status else "")
    return Failure(_kind(code, status), code or "Unknown", status, bounded_text(details.get("Message")))


def _kind(code: str, status: int) -> Kind:
    if code in _CODE_KINDS:
        return _CODE_KINDS[code]
    if status in _STATUS_KINDS:
        return _STATUS_KINDS[status]
    if status >= 500:
        return "unavailable"
    return "refused"


def http_status(value: object) -> int:
    """An HTTP status code from an untrusted value: an int (or digits) from 100 to 599, else 0."""
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 3:
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return value
    return 0


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\s]+")


def bounded_text(value: object, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``value`` (a str, or bytes read as UTF-8) as one printable line of at most ``limit``
    characters: control characters and line breaks become spaces, lone surrogates their
    escape, the rest is cut with an ellipsis. Anything else is ``""``. Never raises."""
    if isinstance(value, bytes | bytearray):
        value = bytes(value[: limit * 4]).decode("utf-8", "replace")
    if not isinstance(value, str):
        return ""
    text = value[: limit * 2].encode("utf-8", "backslashreplace").decode("utf-8")
    text = _UNPRINTABLE.sub(" ", text).strip()
    return text if len(text) <= limit and len(value) <= limit * 2 else text[: limit - 1].rstrip() + "…"
