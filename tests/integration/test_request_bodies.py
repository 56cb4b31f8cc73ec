"""Every request body reaches the model as the caller's bytes, or is refused: the Lambda
handler takes only bodies it can prove intact, and the handler and the GPU server decode
gzip and deflate within TIERSERVE_MAX_REQUEST_MB (415 for any other encoding)."""

from __future__ import annotations

import base64
import gzip
import json
import zlib

import numpy as np
import pytest

from support.common import BUCKET, load_event
from support.gpu import InProcessServer, request
from tierserve.protocol import decode_infer_response


def binary_event() -> tuple[dict, bytes]:
    event = load_event("infer-binary")
    return event, base64.b64decode(event["body"])


def as_text(event: dict, text: str) -> dict:
    """``event`` as API Gateway builds it when the body's type is not a binary media type."""
    return {**event, "body": text, "isBase64Encoded": False}


def with_body(event: dict, body: bytes, **headers: str) -> dict:
    return {
        **event,
        "body": base64.b64encode(body).decode(),
        "isBase64Encoded": True,
        "headers": {**event["headers"], **headers},
    }


def error_of(body: bytes) -> str:
    return json.loads(body)["error"]


def test_binary_tensors_that_reached_the_function_as_text_are_refused_naming_the_fix(invoke):
    event, raw = binary_event()
    mangled = raw.decode("utf-8", "replace")  # what API Gateway makes of them without */*
    status, _, body = invoke(as_text(event, mangled))
    assert status == 400, body
    assert "binaryMediaTypes" in error_of(body) and "*/*" in error_of(body)
    # Even if none of their bytes needed replacing, text is no proof they arrived intact.
    status, _, body = invoke(as_text(event, raw[:155].decode() + "\x00" * 32))
    assert status == 400 and "reached the function as text" in error_of(body)


def test_text_bodies_that_cannot_have_been_utf8_are_refused_not_parsed(invoke):
    event = load_event("infer-json")
    text = event["body"].replace('"req-1"', '"req-\ufffd"')
    status, _, body = invoke(as_text(event, text))
    assert status == 400 and "U+FFFD" in error_of(body)
    status, _, body = invoke(as_text(event, event["body"].replace('"req-1"', '"req-\udcff"')))
    assert status == 400 and "not valid UTF-8" in error_of(body)  # was a 500
    assert invoke(event)[0] == 200  # plain UTF-8 JSON as text is still served


def test_a_body_marked_base64_that_is_not_is_a_400(invoke):
    event = load_event("infer-binary")
    status, _, body = invoke({**event, "body": "not base64!"})
    assert status == 400 and "not base64" in error_of(body)


@pytest.mark.parametrize(("coding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_compressed_requests_are_served_like_plain_ones(invoke, coding, compress):
    event, raw = binary_event()
    plain = invoke(event)
    status, _, body = invoke(with_body(event, compress(raw), **{"Content-Encoding": coding}))
    assert status == 200, body
    assert body == plain[2]
    # As API Gateway delivers it: decompressed already, the header passed on.
    status, _, body = invoke(with_body(event, raw, **{"Content-Encoding": coding}))
    assert status == 200 and body == plain[2]


def test_other_encodings_are_415_and_bombs_413_naming_the_limit(invoke):
    event, raw = binary_event()
    status, _, body = invoke(with_body(event, raw, **{"Content-Encoding": "br"}))
    assert status == 415 and "accepted: gzip, deflate, identity" in error_of(body)
    bomb = gzip.compress(raw + b"\0" * (7 << 20))  # 7 MB of padding in 7 KB
    status, _, body = invoke(with_body(event, bomb, **{"Content-Encoding": "gzip"}))
    assert status == 413 and "TIERSERVE_MAX_REQUEST_MB" in error_of(body)


def test_the_gpu_server_decodes_with_the_same_rule(s3, uploaded_iris, tmp_path):
    server = InProcessServer(
        {
            "POWERTOOLS_METRICS_DISABLED": "true",
            "TIERSERVE_MODEL_BUCKET": BUCKET,
            "TIERSERVE_MODELS": "iris@1",
            "TIERSERVE_CACHE_DIR": str(tmp_path),
        }
    )
    try:
        assert server.host.wait_ready(30)
        event, raw = binary_event()
        headers = dict(event["headers"])
        path = "/v2/models/iris/infer"
        status, reply_headers, plain = request(server.port, "POST", path, raw, headers)
        assert status == 200
        for coding, compress in (("gzip", gzip.compress), ("deflate", zlib.compress)):
            status, _, body = request(
                server.port, "POST", path, compress(raw), {**headers, "Content-Encoding": coding}
            )
            assert status == 200 and body == plain
        outputs = decode_infer_response(plain, dict(reply_headers.items()))
        assert outputs["label"].tolist() == [0, 2] and np.isfinite(outputs["probabilities"]).all()
        status, _, body = request(server.port, "POST", path, raw, {**headers, "Content-Encoding": "zstd"})
        assert status == 415 and "accepted: gzip, deflate, identity" in error_of(body)
        bomb = gzip.compress(raw + b"\0" * (7 << 20))
        status, _, body = request(server.port, "POST", path, bomb, {**headers, "Content-Encoding": "gzip"})
        assert status == 413 and "TIERSERVE_MAX_REQUEST_MB" in error_of(body)
    finally:
        server.stop()
