"""An S3 on 127.0.0.1 for the local API and the tests: moto's server, real HTTP.

boto3 clients find it through ``AWS_ENDPOINT_URL_S3``, so the code under test is the code
that runs in Lambda; nothing is patched.

moto accepts any presigned URL: it checks neither its signature nor its expiry. S3 checks
both, and the jobs routes rely on it (a URL names exactly one key, for minutes), so a small
WSGI front (:class:`PresignedUrlCheck`) does what S3 documents for a SigV4 query-signed
request before moto sees it: past ``X-Amz-Date`` + ``X-Amz-Expires`` it is 403 AccessDenied
"Request has expired"; a signature that is not the one the local credentials give for that
method, path, query and signed headers is 403 SignatureDoesNotMatch. Requests signed in
their headers (every SDK call) pass as before.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from tierserve import aws

LOCAL_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "tierserve-local",
    "AWS_SECRET_ACCESS_KEY": "tierserve-local",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def endpoint_env(endpoint: str, sagemaker_runtime: str | None = None) -> dict[str, str]:
    """The variables that point boto3's S3, SQS and Kinesis clients (and never AWS) at
    ``endpoint``, and its SageMaker runtime client at ``sagemaker_runtime`` (the local stack's,
    when it has one)."""
    env = {
        **LOCAL_CREDENTIALS,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ENDPOINT_URL_SQS": endpoint,
        "AWS_ENDPOINT_URL_KINESIS": endpoint,
    }
    if sagemaker_runtime:
        env["AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"] = sagemaker_runtime
    return env


SIGV4_TIMESTAMP = "%Y%m%dT%H%M%SZ"
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class PresignedUrlCheck:
    """A WSGI front for ``app`` (moto's) that refuses presigned S3 URLs as S3 does: expired, or
    signed with anything but ``secrets`` (access key id -> secret key) for what is requested.
    ``clock`` is the time now (seconds since the epoch)."""

    def __init__(
        self, app: WsgiApp, secrets: Mapping[str, str], clock: Callable[[], float] | None = None
    ) -> None:
        import time

        self.app = app
        self.secrets = dict(secrets)
        self.clock = clock or time.time

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        query = str(environ.get("QUERY_STRING") or "")
        if "X-Amz-Signature=" not in query:
            return self.app(environ, start_response)
        refusal = self.refusal(environ, query)
        if refusal is None:
            return self.app(environ, start_response)
        code, message = refusal
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error>"
        ).encode()
        start_response(
            "403 Forbidden", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
        )
        return [body]

    def refusal(self, environ: Mapping[str, Any], query: str) -> tuple[str, str] | None:
        """Why S3 would refuse this query-signed request (its error code and message), or None."""
        pairs = [pair.partition("=") for pair in query.split("&") if pair]
        params = {unquote(k): unquote(v) for k, _, v in pairs}
        try:
            signed_at = datetime.strptime(params["X-Amz-Date"], SIGV4_TIMESTAMP).replace(tzinfo=UTC)
            expires_s = int(params["X-Amz-Expires"])
            access_key, date, region, service, _ = params["X-Amz-Credential"].split("/")
        except (KeyError, ValueError):
            return (
                "AuthorizationQueryParametersError",
                "X-Amz-Date, X-Amz-Expires and X-Amz-Credential are required",
            )
        secret = self.secrets.get(access_key)
        if secret is None:
            return "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."
        if self.clock() > signed_at.timestamp() + expires_s:
            return "AccessDenied", "Request has expired"
        canonical_query = "&".join(sorted(f"{k}={v}" for k, _, v in pairs if k != "X-Amz-Signature"))
        names = params.get("X-Amz-SignedHeaders", "host").split(";")
        canonical_headers = "".join(f"{name}:{' '.join(_header(environ, name).split())}\n" for name in names)
        path = str(environ.get("REQUEST_URI") or environ.get("RAW_URI") or environ.get("PATH_INFO", "/"))
        request = "\n".join(
            [
                str(environ.get("REQUEST_METHOD", "GET")).upper(),
                path.split("?", 1)[0],
                canonical_query,
                canonical_headers,
                ";".join(names),
                "UNSIGNED-PAYLOAD",
            ]
        )
        scope = f"{date}/{region}/{service}/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", params["X-Amz-Date"], scope, hashlib.sha256(request.encode()).hexdigest()]
        )
        key = f"AWS4{secret}".encode()
        for part in (date, region, service, "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, params.get("X-Amz-Signature", "")):
            return (
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )
        return None


def _header(environ: Mapping[str, Any], name: str) -> str:
    if name == "content-type":
        return str(environ.get("CONTENT_TYPE") or "")
    if name == "content-length":
        return str(environ.get("CONTENT_LENGTH") or "")
    return str(environ.get("HTTP_" + name.upper().replace("-", "_")) or "")


def _moto_server(port: int) -> Any:
    """moto's threaded server with :class:`PresignedUrlCheck` in front of its app."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    class CheckedMotoServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = PresignedUrlCheck(
                DomainDispatcherApplication(create_backend_app),
                {LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"]: LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]},
            )
            self._server = make_server(
                self._ip_address, self._port, app, True, request_handler=MotoRequestHandler
            )
            self._server_ready_event.set()
            self._server.serve_forever()

    return CheckedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)


class EmbeddedS3:
    """Start with ``start()``, stop with ``stop()``; ``env`` points boto3 at it."""

    def __init__(self, port: int = 0) -> None:
        self._server = _moto_server(port)
        self.endpoint = ""

    def start(self) -> EmbeddedS3:
        # moto's server logs every request through werkzeug; the local API's output is for people.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()

    @property
    def env(self) -> Mapping[str, str]:
        return endpoint_env(self.endpoint)

    def apply_env(self) -> None:
        """Point this process's boto3 clients at the embedded S3 (and never at AWS)."""
        os.environ.update(self.env)

    def client(self, service: str = "s3") -> Any:
        """A new client for ``service`` at the embedded server, with the local credentials and
        the service's policy (:func:`tierserve.aws.new_client`): its own, so a test may hang
        hooks on it. The code under test reaches the server through ``env`` instead."""
        return aws.new_client(service, endpoint_url=self.endpoint, **_credentials())


def embedded_client(endpoint: str, service: str = "s3") -> Any:
    """This process's client for the embedded server at ``endpoint`` (:func:`tierserve.aws.client`),
    for a command that talks to a running ``tierserve local`` (``local put``)."""
    return aws.client(service, endpoint_url=endpoint, **_credentials())


def _credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": LOCAL_CREDENTIALS["AWS_DEFAULT_REGION"],
    }
