"""The local API's binary rule is the deployed API's: both read the REST API's
binaryMediaTypes from the synthesized template's own setting, and under it the standard
clients' requests and responses are bytes, whatever headers each one sends."""

from __future__ import annotations

import aws_cdk as cdk
import pytest
from aws_cdk import aws_logs as logs

from infra.api import InferenceApi
from tierserve.tools.local import apigw

# What each standard client sends (read from their sources: tritonclient 2.73's sync client on
# geventhttpclient sets neither header; its asyncio client on aiohttp, Accept */* and, for a
# bytes body, Content-Type application/octet-stream; kserve 0.21's InferenceRESTClient on httpx,
# Accept */* and Content-Type application/json, or application/octet-stream for binary tensors).
CLIENTS = {
    "tritonclient.http": {"Content-Type": None, "Accept": None},
    "tritonclient.http.aio": {"Content-Type": "application/octet-stream", "Accept": "*/*"},
    "kserve json": {"Content-Type": "application/json", "Accept": "*/*"},
    "kserve binary": {"Content-Type": "application/octet-stream", "Accept": "*/*"},
    "curl": {"Content-Type": "application/x-www-form-urlencoded", "Accept": "*/*"},
}


@pytest.fixture(scope="module")
def deployed_types(make_app, template_of, find) -> list[str]:
    stack = cdk.Stack(make_app(), "BinaryBodies")
    InferenceApi(
        stack,
        "Api",
        auth="iam",
        throttle_rate_limit=50,
        throttle_burst_limit=100,
        log_retention=logs.RetentionDays.ONE_MONTH,
        manage_cloudwatch_role=False,
    )
    (api,) = find(template_of(stack), "AWS::ApiGateway::RestApi")
    return api["Properties"]["BinaryMediaTypes"]


def test_the_local_api_applies_the_deployed_setting(deployed_types):
    assert list(apigw.BINARY_MEDIA_TYPES) == deployed_types


@pytest.mark.parametrize("client", CLIENTS)
def test_every_standard_client_gets_bytes_both_ways_under_the_deployed_setting(deployed_types, client):
    sent = CLIENTS[client]
    body = b'{"inputs": []}\xff\xfe\x00\x80'  # a JSON header, then tensor bytes that are not UTF-8
    headers = {k: v for k, v in sent.items() if v is not None}
    event = apigw.proxy_event("POST", "/v2/models/m/infer", headers, body, binary_media_types=deployed_types)
    assert event["isBase64Encoded"] is True
    assert (
        apigw.proxy_response_body(
            {"body": event["body"], "isBase64Encoded": True}, sent["Accept"], deployed_types
        )
        == body
    )
