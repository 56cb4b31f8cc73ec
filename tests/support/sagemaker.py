"""A loopback double of the SageMaker runtime API (``POST /endpoints/{name}/invocations``).

By default it plays a GPU server honestly: it reads the OIP binary request the way the
container receives it (the header length in ``X-Amzn-SageMaker-Custom-Attributes``), runs a
real model and answers with binary outputs. ``fail_with`` makes it answer the errors
SageMaker itself sends (its status, ``x-amzn-ErrorType`` and JSON body), including
``ModelError`` wrapping a container's own status; ``delay_s`` makes it slow.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tierserve.errors import to_http
from tierserve.protocol import HEADER_LENGTH, encode_infer_response, parse_infer_request
from tierserve.remote import parse_custom_attributes

CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"


def model_error(status: int, message: str) -> tuple[int, str, dict[str, Any]]:
    """What SageMaker sends when the container answered ``status`` with an OIP error."""
    return (
        424,
        "ModelError",
        {
            "ErrorCode": "CLIENT_ERROR_FROM_MODEL" if status < 500 else "SERVER_ERROR_FROM_MODEL",
            "Message": f"Received {'client' if status < 500 else 'server'} error ({status}) from primary",
            "OriginalStatusCode": status,
            "OriginalMessage": json.dumps({"error": message}),
            "LogStreamArn": "arn:aws:logs:us-east-1:000000000000:log-group:/aws/sagemaker/Endpoints/x",
        },
    )


def service_error(status: int, code: str, message: str = "service error") -> tuple[int, str, dict[str, Any]]:
    return status, code, {"message": message}


class SageMakerDouble:
    def __init__(self, model_for: Callable[[str], Any] | None = None) -> None:
        self.model_for = model_for
        self.fail_with: tuple[int, str, dict[str, Any]] | None = None
        self.fail_times = 0  # 0: fail every call while fail_with is set
        self.delay_s = 0.0
        self.calls: list[dict[str, Any]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _failure(self) -> tuple[int, str, dict[str, Any]] | None:
        if self.fail_with is None:
            return None
        failure = self.fail_with
        if self.fail_times:
            self.fail_times -= 1
            if self.fail_times == 0:
                self.fail_with = None
        return failure

    def _invoke(
        self, endpoint: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        attributes = parse_custom_attributes(headers.get(CUSTOM_ATTRIBUTES.lower()))
        self.calls.append({"endpoint": endpoint, "headers": headers, "body": body, "attributes": attributes})
        if self.delay_s:
            time.sleep(self.delay_s)
        failure = self._failure()
        if failure is not None:
            status, code, document = failure
            return (
                status,
                {"x-amzn-ErrorType": code, "Content-Type": "application/json"},
                json.dumps(document).encode(),
            )
        model = self.model_for(endpoint)
        try:
            request = parse_infer_request(
                body, {HEADER_LENGTH: attributes.get(HEADER_LENGTH)}, model.manifest, max_bytes=6 << 20
            )
            outputs = model.predict(request.inputs, request.output_names())
        except Exception as error:
            status, document = to_http(error)
            wrapped, code, payload = model_error(status, document["error"])
            return (
                wrapped,
                {"x-amzn-ErrorType": code, "Content-Type": "application/json"},
                json.dumps(payload).encode(),
            )
        encoded = encode_infer_response(
            request, outputs, model_name=model.manifest.name, model_version=model.manifest.version
        )
        reply = {"Content-Type": encoded.headers["Content-Type"]}
        if HEADER_LENGTH in {k.lower() for k in encoded.headers}:
            reply[CUSTOM_ATTRIBUTES] = f"{HEADER_LENGTH}={encoded.headers['Inference-Header-Content-Length']}"
        return 200, reply, encoded.body

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                parts = self.path.strip("/").split("/")
                endpoint = parts[1] if len(parts) == 3 and parts[0] == "endpoints" else ""
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, reply, payload = double._invoke(endpoint, headers, body)
                self.send_response(status)
                for name, value in reply.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client gave up (a timeout test)
                    self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        return Handler
