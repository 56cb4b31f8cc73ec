"""Request Content-Encoding, the one decoder every tier uses: gzip and deflate (zlib) decoded
within TIERSERVE_MAX_REQUEST_MB, a body a gateway already decoded taken as it is, anything
else refused with the status and a message that says what to send."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest

from tierserve.catalog import Digest, Manifest, TensorSpec
from tierserve.errors import BadRequest, PayloadTooLarge, UnsupportedEncoding
from tierserve.protocol import decode_content, encode_infer_request, parse_infer_request

BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
).encode()
IRIS = Manifest(
    name="m",
    version="1",
    format="onnx",
    compression="zstd",
    artifact="model.onnx.zst",
    stored=Digest("0" * 64, 1),
    model=Digest("0" * 64, 1),
    inputs=(TensorSpec("x", "FP32", (-1, 4)),),
    outputs=(TensorSpec("y", "FP32", (-1, 3)),),
)


@pytest.mark.parametrize(
    ("coding", "compress"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("GZIP", gzip.compress),
        ("deflate", zlib.compress),  # HTTP's deflate is the zlib format, as tritonclient sends it
        ("identity", lambda body: body),
        ("gzip, deflate", lambda body: zlib.compress(gzip.compress(body))),  # applied in order listed
    ],
)
def test_accepted_codings_are_decoded(coding, compress):
    assert decode_content(compress(BODY), {"Content-Encoding": coding}, 1 << 20) == BODY


def test_no_header_leaves_the_body_alone():
    assert decode_content(b"\x1f\x8b not touched", {}, 1 << 20) == b"\x1f\x8b not touched"


def test_a_body_a_gateway_already_decompressed_is_taken_as_it_is():
    """API Gateway decompresses before its integration and passes the header on."""
    assert decode_content(b"  \n" + BODY, {"content-encoding": "gzip"}, 1 << 20) == b"  \n" + BODY


def test_several_gzip_members_are_one_body():
    assert (
        decode_content(
            gzip.compress(BODY[:10]) + gzip.compress(BODY[10:]), {"Content-Encoding": "gzip"}, 1 << 20
        )
        == BODY
    )


def test_a_bomb_is_refused_at_the_limit_naming_the_setting():
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB of zeros in about 64 KB
    with pytest.raises(PayloadTooLarge, match=r"more than 1,048,576 bytes.*TIERSERVE_MAX_REQUEST_MB"):
        decode_content(bomb, {"Content-Encoding": "gzip"}, 1 << 20)
    assert (
        len(decode_content(gzip.compress(b"\0" * (1 << 20)), {"Content-Encoding": "gzip"}, 1 << 20))
        == 1 << 20
    )


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, br"])
def test_other_codings_are_415_listing_what_is_accepted(coding):
    with pytest.raises(UnsupportedEncoding, match="accepted: gzip, deflate, identity") as raised:
        decode_content(BODY, {"Content-Encoding": coding}, 1 << 20)
    assert raised.value.status_code == 415


@pytest.mark.parametrize(
    ("coding", "body", "fragment"),
    [
        ("gzip", b"\x00 not gzip", "not gzip data"),
        ("deflate", gzip.compress(BODY), "not deflate data"),  # gzip sent as deflate
        ("gzip", gzip.compress(BODY)[:-6], "cut off"),
        ("gzip", gzip.compress(BODY) + b"trailing", "followed by 8 bytes"),
        ("deflate", b"", "empty"),
    ],
)
def test_a_body_that_is_not_what_its_coding_says_is_a_400(coding, body, fragment):
    with pytest.raises(BadRequest, match=fragment):
        decode_content(body, {"Content-Encoding": coding}, 1 << 20)


def test_a_compressed_binary_request_parses_like_the_plain_one():
    encoded = encode_infer_request({"x": np.arange(8, dtype=np.float32).reshape(2, 4)}, binary=True)
    plain = parse_infer_request(encoded.body, encoded.headers, IRIS, max_bytes=1 << 20)
    headers = {**encoded.headers, "Content-Encoding": "gzip"}
    packed = parse_infer_request(gzip.compress(encoded.body), headers, IRIS, max_bytes=1 << 20)
    np.testing.assert_array_equal(packed.inputs["x"], plain.inputs["x"])
