"""The audit trail: one structured log record per inference, on every tier.

    who       ``caller``: the identity API Gateway authenticated (``iam:{userArn}``,
              ``api_key:{apiKeyId}``, ``authorizer:{principalId}``), ``local`` on the local
              API, ``sagemaker`` or ``direct`` on the GPU server (SageMaker hands the container
              no caller), ``s3:{principalId}`` for an S3 input (who uploaded it)
    what      ``model``, ``version`` (the version that served it, once resolved), ``tier``
    how       ``status`` (the HTTP status; for S3 inputs the result's), ``latency_ms``
    which     ``request_id`` (API Gateway's request id on the Lambda tier: the function's
              other lines carry it as ``correlation_id``), the input ``key`` for S3 inputs

Never tensor data: the record is built from the request's context and the result's
status, not from its body. Each record is one JSON line on stdout in powertools' log shape,
written whatever ``POWERTOOLS_LOG_LEVEL`` says (an audit trail the log level could silence
would not be one), with ``"audit": "inference"`` to select them in CloudWatch Logs Insights.

An HTTP inference is recorded around its route (:func:`http_inference`, which
:class:`tierserve.routes.Router` opens for audited routes); the data plane names the model
version that serves it (:func:`served`) and adds its timings. Closing the record also counts
the request in the model's metrics (:mod:`tierserve.telemetry`) and, where a long-lived server
keeps them, in its statistics (:mod:`tierserve.stats` observes the records).
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from tierserve.telemetry import (
    INFERENCE_CLIENT_ERRORS,
    INFERENCE_LATENCY_MS,
    INFERENCE_REQUESTS,
    INFERENCE_SERVER_ERRORS,
    SERVICE,
    Versioned,
    logger,
    record_count,
    record_ms,
)

AUDIT_MARK = "inference"
AUDIT_MESSAGE = "inference"
MAX_FIELD = 256  # an identity or a model name from a request is quoted at most this long
# Callers that name nobody: unauthenticated (auth=none), or a transport that is not told who
# called (SageMaker hands the GPU server no identity). Nothing may be kept per caller for them.
UNIDENTIFIED = frozenset({"anonymous", "sagemaker", "direct", "unknown", "s3:unknown", ""})
# Where a SageMaker caller (or a client of the GPU server) may name its request.
REQUEST_ID_HEADERS = ("x-amzn-sagemaker-inference-id", "x-amzn-requestid", "x-request-id")


_write_lock = threading.Lock()


def write_line(fields: Mapping[str, Any]) -> None:
    """One audit line on ``sys.stdout`` (as it is now, as ``print`` writes EMF lines): the
    fields of a powertools JSON log line (``level``, ``message``, ``timestamp``, ``service``)
    and ``fields``, None values left out.

    Written here, not through ``logging``: with the stdlib logger and powertools' formatter
    (caller location, record attributes, its JSON) the handler's warm overhead over
    ``session.run`` was 0.49-0.72 ms p50 against 0.24-0.43 ms before issue 11; written here,
    0.35-0.41 ms (``python -m bench warm_overhead``, bench/README.md)."""
    line = {
        "level": "INFO",
        "message": AUDIT_MESSAGE,
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "service": SERVICE,
        **{k: v for k, v in fields.items() if v is not None},
    }
    text = orjson.dumps(line, default=str).decode() + "\n"
    with _write_lock:
        sys.stdout.write(text)
        sys.stdout.flush()


@dataclass
class InferenceRecord:
    """One inference as it is audited and counted; the data plane fills in what it learns.

    ``served`` is the model version that answered (None until resolved: an unknown model has
    none, and only served versions become metric dimensions). Durations are nanoseconds:
    ``queue_ns`` waiting for a batch, ``input_ns`` decoding and checking the request,
    ``infer_ns`` running the model, ``output_ns`` encoding the response; ``executed`` is False
    where a batcher counted the model's run itself.
    """

    caller: str
    request_id: str
    tier: str
    model: str | None = None
    version: str | None = None
    served: Versioned | None = None
    status: int = 0
    latency_ms: float = 0.0
    rows: int = 0
    queue_ns: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0
    executed: bool = True
    cache: str | None = None  # "hit" or "miss" where the model's response cache was asked

    def as_log(self) -> dict[str, Any]:
        """The fields of the audit line (no tensor data: names, ids, status and time only)."""
        fields: dict[str, Any] = {
            "audit": AUDIT_MARK,
            "caller": self.caller,
            "model": self.model,
            "version": self.version,
            "status": self.status,
            "latency_ms": round(self.latency_ms, 3),
            "request_id": self.request_id,
            "tier": self.tier,
        }
        if self.cache is not None:
            fields["cache"] = self.cache
        return fields


_current: ContextVar[InferenceRecord | None] = ContextVar("tierserve_inference", default=None)
# What else counts finished inferences of served models: tierserve.stats, where a process
# imports it (the GPU server, the local API); a Lambda function keeps no statistics.
_observers: list[Callable[[InferenceRecord, int], None]] = []


def observe(observer: Callable[[InferenceRecord, int], None]) -> None:
    """Call ``observer(record, elapsed_ns)`` for each finished inference of a served model."""
    if observer not in _observers:
        _observers.append(observer)


def current() -> InferenceRecord | None:
    """The inference being served on this thread, if a transport opened one."""
    return _current.get()


def served(model: Versioned) -> None:
    """The data plane names the model version that serves the current inference."""
    record = _current.get()
    if record is not None:
        record.served, record.model, record.version = model, model.name, model.version


@contextmanager
def http_inference(
    *, caller: str, request_id: str, tier: str, model: str | None, version: str | None
) -> Iterator[InferenceRecord]:
    """Record one HTTP inference: the block serves it and sets ``status``; on the way out the
    record is logged, counted in its model's metrics and in :mod:`tierserve.stats`."""
    record = InferenceRecord(
        caller=bounded(caller) or "unknown",
        request_id=bounded(request_id) or str(uuid.uuid4()),
        tier=tier,
        model=bounded(model),
        version=bounded(version),
    )
    token = _current.set(record)
    started = time.perf_counter_ns()
    try:
        yield record
    finally:
        _current.reset(token)
        elapsed_ns = time.perf_counter_ns() - started
        record.latency_ms = elapsed_ns / 1e6
        finish(record, elapsed_ns)


def finish(record: InferenceRecord, elapsed_ns: int) -> None:
    """Log ``record`` and count it: its model's request, error and latency metrics (served
    versions only), and for the observers (:func:`observe`)."""
    write_line(record.as_log())
    model = record.served
    record_count(INFERENCE_REQUESTS, model=model)
    if 400 <= record.status < 500:
        record_count(INFERENCE_CLIENT_ERRORS, model=model)
    elif record.status >= 500:
        record_count(INFERENCE_SERVER_ERRORS, model=model)
    record_ms(INFERENCE_LATENCY_MS, record.latency_ms, model=model)
    if model is not None:
        for observer in _observers:
            observer(record, elapsed_ns)


def log_s3_inference(
    *, caller: str, key: str, model: Versioned | None, status: int, latency_ms: float, request_id: str = ""
) -> None:
    """The audit line of one S3 input served by the pipeline (its result's status); the
    request id is the Lambda invocation's (the function's other lines say
    ``function_request_id``) unless given."""
    invocation = str(logger.get_current_keys().get("function_request_id") or "")
    record = InferenceRecord(
        caller=bounded(caller) or "s3:unknown",
        request_id=bounded(request_id or invocation) or "",
        tier="s3",
        model=model.name if model else None,
        version=model.version if model else None,
        status=status,
        latency_ms=latency_ms,
    )
    write_line({**record.as_log(), "key": bounded(key, 1024)})


def api_gateway_caller(request_context: Mapping[str, Any] | None) -> str:
    """Who called, from an API Gateway REST proxy event's ``requestContext``: the API key's
    id, the IAM principal, an authorizer's principal, ``local`` for the local API's events,
    or ``anonymous`` (``auth=none``)."""
    context = request_context or {}
    identity = context.get("identity") or {}
    authorizer = context.get("authorizer") or {}
    if identity.get("apiKeyId"):
        return f"api_key:{identity['apiKeyId']}"
    if identity.get("userArn"):
        return f"iam:{identity['userArn']}"
    if isinstance(authorizer, Mapping) and authorizer.get("principalId"):
        return f"authorizer:{authorizer['principalId']}"
    if context.get("apiId") == "local":
        return "local"
    return "anonymous"


def identified(caller: str) -> bool:
    """Whether ``caller`` names an identity (an IAM principal, an API key, ``local``)."""
    return caller not in UNIDENTIFIED


def request_id_from(headers: Mapping[str, str]) -> str:
    """The id a SageMaker caller or a direct client gave its request, or a new one."""
    lowered = {k.lower(): v for k, v in headers.items()}
    for name in REQUEST_ID_HEADERS:
        if lowered.get(name):
            return lowered[name]
    return str(uuid.uuid4())


def bounded(value: str | None, limit: int = MAX_FIELD) -> str | None:
    """``value`` cut to ``limit`` characters (identities and names come from requests)."""
    if value is None:
        return None
    return value if len(value) <= limit else value[: limit - 3] + "..."
