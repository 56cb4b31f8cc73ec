"""API Gateway REST proxy events and Lambda contexts, built the way AWS builds them.

The local API and the tests hand these to the real handler, so what runs locally is what
runs behind API Gateway. Bodies of a binary media type arrive base64-encoded, as they do
when the REST API lists ``application/octet-stream`` in its binary media types.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

BINARY_MEDIA_TYPES = ("application/octet-stream",)


def proxy_event(
    method: str,
    url: str,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    *,
    stage: str = "local",
    source_ip: str = "127.0.0.1",
) -> dict[str, Any]:
    """A REST API (v1) Lambda proxy event for one HTTP request."""
    parts = urlsplit(url)
    headers = dict(headers or {})
    content_type = _header(headers, "content-type")
    binary = content_type.split(";")[0].strip() in BINARY_MEDIA_TYPES
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
        "body": (base64.b64encode(body).decode() if binary else body.decode("utf-8", "replace"))
        if body
        else None,
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


def _header(headers: Mapping[str, str], name: str) -> str:
    return next((v for k, v in headers.items() if k.lower() == name), "")


def proxy_response_body(response: Mapping[str, Any]) -> bytes:
    """The body bytes of a Lambda proxy response."""
    body = response.get("body") or ""
    return base64.b64decode(body) if response.get("isBase64Encoded") else body.encode()


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
