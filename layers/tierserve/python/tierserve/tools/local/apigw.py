"""API Gateway REST proxy events and Lambda contexts, built the way AWS builds them.

The local API and the tests hand these to the real handler, so what runs locally is what
runs behind API Gateway, under the binary media types the CDK app gives the REST API
(:data:`tierserve.protocol.BINARY_MEDIA_TYPES`, read here, never copied):

- a request body whose Content-Type is binary (:func:`is_binary_media_type`) reaches the
  handler base64-encoded; any other as text, which API Gateway re-encodes as UTF-8 (bytes
  that are not UTF-8 are replaced there; here they stay undecodable, so the handler refuses
  the body either way, and no replacement character is ever made);
- a response the handler marks ``isBase64Encoded`` goes out as bytes only when the request's
  first Accept is binary, and as its base64 text otherwise (:func:`proxy_response_body`).

The rule, with its sources: docs/architecture.md, "Binary bodies".
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tierserve.protocol import BINARY_MEDIA_TYPES


def is_binary_media_type(value: str | None, binary_media_types: Sequence[str] | None = None) -> bool:
    """Whether API Gateway takes a Content-Type (a request) or Accept (a response) ``value`` as
    binary: its first media type, parameters dropped, against ``binary_media_types`` (default:
    :data:`BINARY_MEDIA_TYPES`, the REST API's).

    ``*/*`` matches every value, and a missing one; ``type/*`` any subtype of that type; any
    other entry only itself. A wildcard in the value matches no concrete entry (``Accept: */*``
    is not ``image/png``), and an entry like ``*/json`` matches nothing (LocalStack's tests,
    run against AWS, show both). Sources: docs/architecture.md, "Binary bodies".
    """
    media_type = (value or "").split(",")[0].split(";")[0].strip().lower()
    kind, _, subtype = media_type.partition("/")
    for entry in BINARY_MEDIA_TYPES if binary_media_types is None else binary_media_types:
        entry_kind, _, entry_subtype = entry.strip().lower().partition("/")
        if (entry_kind, entry_subtype) == ("*", "*"):
            return True
        if not media_type or entry_kind == "*":
            continue
        if entry_kind == kind and entry_subtype in ("*", subtype):
            return True
    return False


def proxy_event(
    method: str,
    url: str,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    *,
    stage: str = "local",
    source_ip: str = "127.0.0.1",
    binary_media_types: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A REST API (v1) Lambda proxy event for one HTTP request, its body base64-encoded when
    its Content-Type is one of ``binary_media_types`` (:func:`is_binary_media_type`)."""
    parts = urlsplit(url)
    headers = dict(headers or {})
    binary = is_binary_media_type(_header(headers, "content-type") or None, binary_media_types)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()} or None
    request_id = str(uuid.uuid4())
    return {
        "resource": "/{proxy+}",
        "path": parts.path,
        "httpMethod": method.upper(),
        "headers": headers or None,
        "multiValueHeaders": {k: [v] for k, v in headers.items()} or None,
        "queryStringParameters": query,
        "multiValueQueryStringParameters": {k: [v] for k, v in (query or {}).items()} or None,
        "pathParameters": {"proxy": parts.path.lstrip("/")},
        "stageVariables": None,
        "requestContext": {
            "resourcePath": "/{proxy+}",
            "httpMethod": method.upper(),
            "path": f"/{stage}{parts.path}",
            "stage": stage,
            "requestId": request_id,
            "extendedRequestId": request_id,
            "requestTimeEpoch": int(time.time() * 1000),
            "protocol": "HTTP/1.1",
            "identity": {
                "sourceIp": source_ip,
                "userAgent": _header(headers, "user-agent"),
                **caller_identity(headers),
            },
            "accountId": "000000000000",
            "apiId": "local",
        },
        "body": _event_body(body, binary) if body else None,
        "isBase64Encoded": bool(body) and binary,
    }


# SigV4's Authorization header: AWS4-HMAC-SHA256 Credential=AKID/date/region/service/aws4_request, ...
_CREDENTIAL = re.compile(r"Credential=([A-Za-z0-9]+)/")


def caller_identity(headers: Mapping[str, str]) -> dict[str, str]:
    """Who the caller is, as API Gateway would put it in ``requestContext.identity`` once its
    auth let the request in: an API key's id (``x-api-key``: a digest of the key stands in for
    the id API Gateway would look up) or a SigV4 signer's access key (a stand-in ``userArn``).
    Locally nothing is verified: this only keeps two callers' jobs apart, as in AWS."""
    api_key = _header(headers, "x-api-key")
    if api_key:
        return {"apiKey": api_key, "apiKeyId": "local-" + hashlib.sha256(api_key.encode()).hexdigest()[:10]}
    signed = _CREDENTIAL.search(_header(headers, "authorization"))
    if signed:
        access_key = signed.group(1)
        return {"accessKey": access_key, "userArn": f"arn:aws:iam::000000000000:user/{access_key}"}
    return {}


def _event_body(body: bytes, binary: bool) -> str:
    """The body as the event carries it: base64, or text. Bytes that are not UTF-8 stay what
    they were, as lone surrogates (``surrogateescape``), which the handler refuses as text
    that cannot have been UTF-8; API Gateway would replace them with U+FFFD, which it refuses
    too. Nothing is ever decoded with replacement characters here."""
    return base64.b64encode(body).decode() if binary else body.decode("utf-8", "surrogateescape")


def _header(headers: Mapping[str, str], name: str) -> str:
    return next((v for k, v in headers.items() if k.lower() == name), "")


def proxy_response_body(
    response: Mapping[str, Any],
    accept: str | None = None,
    binary_media_types: Sequence[str] | None = None,
) -> bytes:
    """The body bytes API Gateway sends for a Lambda proxy response to a request whose Accept
    header is ``accept``: a body marked ``isBase64Encoded`` is decoded when that Accept is
    binary (:func:`is_binary_media_type`), and sent as its base64 text otherwise."""
    body = response.get("body") or ""
    if response.get("isBase64Encoded") and is_binary_media_type(accept, binary_media_types):
        return base64.b64decode(body)
    return body.encode("utf-8", "surrogateescape")


def proxy_response_headers(response: Mapping[str, Any]) -> dict[str, str]:
    headers = dict(response.get("headers") or {})
    for name, values in (response.get("multiValueHeaders") or {}).items():
        headers[name] = ", ".join(values)
    return headers


@dataclass
class LocalLambdaContext:
    """What Lambda passes as ``context``; powertools reads these attributes."""

    function_name: str = "tierserve-local"
    memory_limit_in_mb: int = 2048
    timeout_ms: int = 29_000
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    function_version: str = "$LATEST"
    log_group_name: str = "/aws/lambda/tierserve-local"
    log_stream_name: str = "local"
    _started: float = field(default_factory=time.monotonic)

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:us-east-1:000000000000:function:{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, self.timeout_ms - int((time.monotonic() - self._started) * 1000))
