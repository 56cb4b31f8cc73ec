"""API Gateway's binary rule as the local API applies it: a request is binary by its
Content-Type, a response by the request's first Accept, both against binaryMediaTypes; a
text body is never decoded with replacement characters."""

from __future__ import annotations

import base64

import pytest

from tierserve.tools.local.apigw import is_binary_media_type, proxy_event, proxy_response_body

OCTET = ("application/octet-stream",)


@pytest.mark.parametrize(
    ("value", "types", "binary"),
    [
        (None, ("*/*",), True),  # tritonclient's sync client: no Content-Type, no Accept
        ("", ("*/*",), True),
        ("application/json; charset=utf-8", ("*/*",), True),
        (None, OCTET, False),
        ("application/octet-stream", OCTET, True),
        ("Application/Octet-Stream; x=1", OCTET, True),
        ("application/json", OCTET, False),
        ("image/png", ("image/*",), True),
        ("text/png", ("image/*",), False),
        ("image/png,*/*;q=0.8", ("image/png",), True),  # the first Accept decides
        ("image/webp,image/png", ("image/png",), False),
        ("*/*", OCTET, False),  # a wildcard Accept matches no concrete type
        ("image/*", ("image/png",), False),
        ("random/test", ("*/test",), False),  # a wildcard type in the setting matches nothing
    ],
)
def test_media_type_rule(value, types, binary):
    assert is_binary_media_type(value, types) is binary


def test_a_binary_request_is_base64_encoded_byte_for_byte():
    body = b'{"inputs":[]}' + bytes(range(256))
    event = proxy_event("POST", "/v2/models/m/infer", {}, body)  # no Content-Type, as tritonclient
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == body


def test_a_text_body_that_is_not_utf8_is_never_decoded_with_replacement_characters():
    body = b'{"inputs":[]}\xff\xfe'
    event = proxy_event(
        "POST", "/v2/models/m/infer", {"Content-Type": "text/plain"}, body, binary_media_types=OCTET
    )
    assert event["isBase64Encoded"] is False
    assert "\ufffd" not in event["body"]
    assert event["body"].encode("utf-8", "surrogateescape") == body  # undecodable, not replaced


def test_a_base64_response_is_bytes_only_for_a_binary_accept():
    payload = b"\x00\x01binary"
    response = {"body": base64.b64encode(payload).decode(), "isBase64Encoded": True}
    assert proxy_response_body(response) == payload  # no Accept, under */*
    assert proxy_response_body(response, "application/octet-stream", OCTET) == payload
    # What API Gateway sends a client without Accept when the setting is narrower: the base64 text.
    assert proxy_response_body(response, None, OCTET) == response["body"].encode()
    assert proxy_response_body({"body": '{"a":1}', "isBase64Encoded": False}, None, OCTET) == b'{"a":1}'
