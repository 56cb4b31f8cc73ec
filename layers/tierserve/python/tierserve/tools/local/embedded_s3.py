"""An S3 on 127.0.0.1 for the local API and the tests: moto's server, real HTTP.

boto3 clients find it through ``AWS_ENDPOINT_URL_S3``, so the code under test is the code
that runs in Lambda; nothing is patched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

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


class EmbeddedS3:
    """Start with ``start()``, stop with ``stop()``; ``env`` points boto3 at it."""

    def __init__(self, port: int = 0) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
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
