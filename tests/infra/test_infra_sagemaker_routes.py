"""SageMakerModelRoutes in a bare stack: a GPU-tier model's mocks from its manifest, and
``infer`` to SageMaker runtime InvokeEndpoint naming the model's inference component, with a
role that may call only that endpoint and component, and the cold edge in OIP shape."""

from __future__ import annotations

import json
import re
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import aws_logs as logs
from aws_cdk.assertions import Template

from infra.api import InferenceApi
from infra.sagemaker_inference import component_arn, endpoint_arn
from infra.sagemaker_routes import (
    HEADER_LENGTH_HEADER,
    MODEL_ERROR_PATTERN,
    PAYLOAD_TOO_LARGE_PATTERN,
    SAGEMAKER_CUSTOM_ATTRIBUTES,
    SAGEMAKER_INFERENCE_COMPONENT,
    UPSTREAM_ERROR_PATTERN,
    VALIDATION_ERROR_PATTERN,
    ColdStart,
    SageMakerModelRoutes,
)
from support.rest_api import methods, route
from tierserve.catalog import MB

GPU_MODEL = "big-llm"
GPU_ENDPOINT = "tierserve-g5-xlarge"
GPU_COMPONENT = "tierserve-big-llm-g5-xlarge"
COLD_START = ColdStart(minutes=8, retry_after_s=45)


def routes_for(stack: cdk.Stack, construct_id: str, api: InferenceApi, manifest, name: str = GPU_COMPONENT):
    return SageMakerModelRoutes(
        stack,
        construct_id,
        api=api,
        manifest=manifest,
        endpoint_name=GPU_ENDPOINT,
        endpoint_arn=endpoint_arn(stack, GPU_ENDPOINT),
        component_name=name,
        component_arn=component_arn(stack, name),
        cold_start=COLD_START,
    )


@pytest.fixture(scope="module")
def gpu_manifest(manifest_factory):
    return manifest_factory(GPU_MODEL, "7", 2048 * MB)


def shell(stack: cdk.Stack) -> InferenceApi:
    return InferenceApi(
        stack,
        "Api",
        auth="iam",
        throttle_rate_limit=50,
        throttle_burst_limit=100,
        log_retention=logs.RetentionDays.ONE_MONTH,
    )


@pytest.fixture(scope="module")
def stack(make_app, gpu_manifest) -> cdk.Stack:
    stack = cdk.Stack(make_app(), "GpuRoutes")
    routes_for(stack, "Routes", shell(stack), gpu_manifest)
    return stack


@pytest.fixture(scope="module")
def template(stack, template_of):
    return template_of(stack)


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/v2/models/big-llm", ("GET", "/v2/models/big-llm")),
        ("GET", "/v2/models/big-llm/ready", ("GET", "/v2/models/big-llm/ready")),
        ("POST", "/v2/models/big-llm/infer", ("POST", "/v2/models/big-llm/infer")),
        ("GET", "/v2/models/big-llm/versions/7", ("GET", "/v2/models/big-llm/versions/7")),
        ("GET", "/v2/models/big-llm/versions/7/ready", ("GET", "/v2/models/big-llm/versions/7/ready")),
        ("POST", "/v2/models/big-llm/versions/7/infer", ("POST", "/v2/models/big-llm/versions/7/infer")),
        ("POST", "/v2/models/big-llm/versions/8/infer", ("ANY", "/v2/models/big-llm/{proxy+}")),
        ("GET", "/v2/models/big-llm/stats", ("ANY", "/v2/models/big-llm/{proxy+}")),
    ],
)
def test_every_oip_route_of_a_gpu_model_reaches_its_resource(template, method, path, expected):
    assert route(template, method, path) == expected


def infer_methods(template) -> list[dict[str, Any]]:
    table = methods(template)
    return [table[("POST", f"/v2/models/{GPU_MODEL}{v}/infer")] for v in ("", "/versions/7")]


def test_infer_calls_invoke_endpoint_with_the_callers_bytes(template):
    for props in infer_methods(template):
        integration = props["Integration"]
        assert integration["Type"] == "AWS"
        assert integration["IntegrationHttpMethod"] == "POST"
        uri = json.dumps(integration["Uri"])
        assert f":runtime.sagemaker:path/endpoints/{GPU_ENDPOINT}/invocations" in uri
        assert integration["TimeoutInMillis"] <= 29_000
        assert integration["PassthroughBehavior"] == "WHEN_NO_TEMPLATES"
        assert "RequestTemplates" not in integration, "a template would need a text body"
        assert "ContentHandling" not in integration, "every body is binary under */*: passed as it is"


def test_infer_names_the_models_inference_component_on_every_call(template):
    for props in infer_methods(template):
        request = props["Integration"]["RequestParameters"]
        assert request[f"integration.request.header.{SAGEMAKER_INFERENCE_COMPONENT}"] == f"'{GPU_COMPONENT}'"
    assert SAGEMAKER_INFERENCE_COMPONENT == "X-Amzn-SageMaker-Inference-Component"


def test_the_component_header_is_the_one_botocore_sends_for_inference_component_name():
    import boto3

    client = boto3.client("sagemaker-runtime", region_name="us-east-1")
    shape = client.meta.service_model.operation_model("InvokeEndpoint").input_shape
    assert shape.members["InferenceComponentName"].serialization == {
        "location": "header",
        "name": SAGEMAKER_INFERENCE_COMPONENT,
    }


def test_the_invoke_role_is_api_gateways_for_this_account_and_that_component_only(template):
    roles = template.find_resources("AWS::IAM::Role")
    for props in infer_methods(template):
        role = roles[props["Integration"]["Credentials"]["Fn::GetAtt"][0]]["Properties"]
        (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
        assert trust["Principal"] == {"Service": "apigateway.amazonaws.com"}
        assert trust["Condition"] == {"StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}}
        assert "ManagedPolicyArns" not in role
        (policy,) = role["Policies"]
        (statement,) = policy["PolicyDocument"]["Statement"]
        assert statement["Action"] == "sagemaker:InvokeEndpoint"
        assert statement["Effect"] == "Allow"
        resources = sorted(json.dumps(r) for r in statement["Resource"])
        assert len(resources) == 2, "the endpoint (IAM requires it) and the component, nothing else"
        assert resources[0].endswith(f':endpoint/{GPU_ENDPOINT}"]]}}')
        assert resources[1].endswith(f':inference-component/{GPU_COMPONENT}"]]}}')
    attached = [
        p
        for p in template.find_resources("AWS::IAM::Policy").values()
        if "InvokeRole" in json.dumps(p["Properties"]["Roles"])
    ]
    assert attached == [], "nothing else attached to the invoke role"


def test_infer_maps_the_binary_header_length_both_ways(template):
    for props in infer_methods(template):
        request = props["Integration"]["RequestParameters"]
        assert request[f"integration.request.header.{SAGEMAKER_CUSTOM_ATTRIBUTES}"] == (
            f"method.request.header.{HEADER_LENGTH_HEADER}"
        )
        assert request["integration.request.header.Content-Type"] == "method.request.header.Content-Type"
        assert props["RequestParameters"][f"method.request.header.{HEADER_LENGTH_HEADER}"] is False
        (ok,) = [r for r in props["Integration"]["IntegrationResponses"] if "SelectionPattern" not in r]
        assert ok["StatusCode"] == "200"
        assert ok["ResponseParameters"][f"method.response.header.{HEADER_LENGTH_HEADER}"] == (
            f"integration.response.header.{SAGEMAKER_CUSTOM_ATTRIBUTES}"
        )
        assert "ContentHandling" not in ok and "ResponseTemplates" not in ok, "answers pass through"


def test_header_names_are_the_gpu_servers():
    from tierserve.protocol import HEADER_LENGTH
    from tierserve.sagemaker_hosting import CUSTOM_ATTRIBUTES

    assert SAGEMAKER_CUSTOM_ATTRIBUTES == CUSTOM_ATTRIBUTES
    assert HEADER_LENGTH_HEADER.lower() == HEADER_LENGTH


def test_the_gpu_server_reads_the_header_length_as_api_gateway_sends_it():
    from tierserve.protocol import HEADER_LENGTH
    from tierserve.sagemaker_hosting import invocation_headers
    from tierserve.sagemaker_model import parse_custom_attributes

    sent = {SAGEMAKER_CUSTOM_ATTRIBUTES: "123", "Content-Type": "application/octet-stream"}
    headers = invocation_headers(sent, parse_custom_attributes(sent[SAGEMAKER_CUSTOM_ATTRIBUTES]))
    assert {k.lower(): v for k, v in headers.items()}[HEADER_LENGTH] == "123"


def test_selection_patterns_are_disjoint_and_cover_every_error():
    patterns = {
        "400 (container's 4xx; overridden for 408/413/429/5xx)": MODEL_ERROR_PATTERN,
        "413": PAYLOAD_TOO_LARGE_PATTERN,
        "503 with Retry-After (ValidationError: no capacity, or unknown names)": VALIDATION_ERROR_PATTERN,
        "503": UPSTREAM_ERROR_PATTERN,
    }
    for status in range(400, 600):
        matching = [name for name, p in patterns.items() if re.fullmatch(p, str(status))]
        assert len(matching) == 1, (status, matching)
    for status in range(200, 400):
        assert not any(re.fullmatch(p, str(status)) for p in patterns.values())


def test_sagemaker_errors_become_oip_errors_read_as_text(template):
    for props in infer_methods(template):
        responses = {r.get("SelectionPattern"): r for r in props["Integration"]["IntegrationResponses"]}
        assert responses[MODEL_ERROR_PATTERN]["StatusCode"] == "400"
        assert responses[PAYLOAD_TOO_LARGE_PATTERN]["StatusCode"] == "413"
        assert responses[VALIDATION_ERROR_PATTERN]["StatusCode"] == "503"
        assert responses[UPSTREAM_ERROR_PATTERN]["StatusCode"] == "503"
        for pattern in (
            MODEL_ERROR_PATTERN,
            PAYLOAD_TOO_LARGE_PATTERN,
            VALIDATION_ERROR_PATTERN,
            UPSTREAM_ERROR_PATTERN,
        ):
            # Under */* SageMaker's JSON error is binary: the template gets it as (base64) text.
            assert responses[pattern]["ContentHandling"] == "CONVERT_TO_TEXT"
        for pattern in (PAYLOAD_TOO_LARGE_PATTERN, UPSTREAM_ERROR_PATTERN):
            body = json.loads(responses[pattern]["ResponseTemplates"]["application/json"])
            assert set(body) == {"error"} and GPU_MODEL in body["error"]
        too_large = json.loads(responses[PAYLOAD_TOO_LARGE_PATTERN]["ResponseTemplates"]["application/json"])
        assert f"POST /v2/models/{GPU_MODEL}/jobs" in too_large["error"]  # the 413 names the jobs route
        model_error = responses[MODEL_ERROR_PATTERN]["ResponseTemplates"]["application/json"]
        assert "$util.base64Decode($raw)" in model_error and "$util.parseJson($raw)" in model_error
        assert "!$raw.startsWith('{')" in model_error, "decodes base64 only: JSON text is read as it is"
        assert "$error.OriginalStatusCode" in model_error and "$!error.OriginalMessage" in model_error
        assert "#elseif($message.startsWith('{\"error\"'))$message" in model_error, (
            "the container's own message"
        )
        for status in ("413", "504", "503"):
            assert f"$context.responseOverride.status = {status}" in model_error
        declared = {r["StatusCode"]: r for r in props["MethodResponses"]}
        assert set(declared) == {"200", "400", "413", "503", "504"}


def test_a_model_with_no_copy_running_is_a_503_that_says_it_is_starting(template):
    """SageMaker's answer while a component has no copy: 400 ValidationError "Inference Component
    has no capacity to process this request. ..." (docs/gpu-tier.md, "The cold edge")."""
    for props in infer_methods(template):
        responses = {r.get("SelectionPattern"): r for r in props["Integration"]["IntegrationResponses"]}
        cold = responses[VALIDATION_ERROR_PATTERN]
        assert cold["StatusCode"] == "503"
        assert cold["ResponseParameters"]["method.response.header.Retry-After"] == "'45'"
        assert cold["ResponseParameters"]["method.response.header.Content-Type"] == "'application/json'"
        template_text = cold["ResponseTemplates"]["application/json"]
        assert "$util.base64Decode($raw)" in template_text, "SageMaker's error body arrives as base64"
        assert "#if($raw.contains('no capacity'))" in template_text
        starting, other = re.findall(r'\{"error": "[^"]*"\}', template_text)
        message = json.loads(starting)["error"]
        assert f"model {GPU_MODEL} is starting from zero" in message
        assert "about 8" in message and "minutes" in message and "Retry after 45 s" in message
        assert f"POST /v2/models/{GPU_MODEL}/jobs" in message, "where work that can wait goes"
        assert "retry shortly" in json.loads(other)["error"], "other ValidationErrors: the generic 503"
        assert "$" not in starting and "#" not in starting
        declared = {r["StatusCode"]: r for r in props["MethodResponses"]}
        assert declared["503"]["ResponseParameters"]["method.response.header.Retry-After"] is True


def test_metadata_and_ready_are_mocks_from_the_manifest(template, gpu_manifest):
    from tierserve.protocol import model_metadata

    table = methods(template)
    expected = {
        "": model_metadata(gpu_manifest),
        "/ready": {"name": GPU_MODEL, "version": "7", "ready": True},
    }
    for base in (f"/v2/models/{GPU_MODEL}", f"/v2/models/{GPU_MODEL}/versions/7"):
        for suffix, body in expected.items():
            props = table[("GET", base + suffix)]
            assert props["Integration"]["Type"] == "MOCK"
            assert props["Integration"]["ContentHandling"] == "CONVERT_TO_TEXT"
            (response,) = props["Integration"]["IntegrationResponses"]
            assert response["StatusCode"] == "200"
            assert response["ContentHandling"] == "CONVERT_TO_TEXT"
            assert json.loads(response["ResponseTemplates"]["application/json"]) == body
    assert expected[""]["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]


def test_unknown_routes_and_versions_are_oip_404s(template):
    props = methods(template)[("ANY", f"/v2/models/{GPU_MODEL}/{{proxy+}}")]
    assert props["Integration"]["Type"] == "MOCK"
    (response,) = props["Integration"]["IntegrationResponses"]
    assert response["StatusCode"] == "404"
    message = json.loads(response["ResponseTemplates"]["application/json"])["error"]
    assert "serves version 7" in message


def test_routes_expose_their_parts_and_refuse_a_second_registration(stack, gpu_manifest):
    (routes,) = [c for c in stack.node.children if isinstance(c, SageMakerModelRoutes)]
    assert routes.model_name == GPU_MODEL
    assert routes.version_resource.path == f"/v2/models/{GPU_MODEL}/versions/7"
    assert len(routes.infer_methods) == 2
    api = next(c for c in stack.node.children if isinstance(c, InferenceApi))
    assert api.model_names == [GPU_MODEL]
    with pytest.raises(ValueError, match="already has routes"):
        routes_for(stack, "Again", api, gpu_manifest)


def test_mock_bodies_cannot_be_read_as_vtl(make_app, manifest_factory):
    """Tensor names may hold $ or #, which VTL would read as references or directives."""
    stack = cdk.Stack(make_app(), "OddNames")
    odd = manifest_factory("odd", "1", 10)
    data = odd.to_dict()
    data["inputs"] = [{"name": "x$y##z", "datatype": "FP32", "shape": [-1]}]
    odd = type(odd).from_dict(data)
    routes_for(stack, "Routes", shell(stack), odd, name="tierserve-odd-g5-xlarge")
    props = methods(Template.from_stack(stack))[("GET", "/v2/models/odd")]
    text = props["Integration"]["IntegrationResponses"][0]["ResponseTemplates"]["application/json"]
    assert "$" not in text and "#" not in text
    assert json.loads(text)["inputs"][0]["name"] == "x$y##z"
