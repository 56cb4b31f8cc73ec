"""InferenceApi in a bare stack: OIP routes per model, mocks, errors in OIP shape, auth modes."""

from __future__ import annotations

import json
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk.assertions import Annotations, Match

from infra.api import (
    HEADER_LENGTH_HEADER,
    MODEL_ERROR_PATTERN,
    PAYLOAD_TOO_LARGE_PATTERN,
    SAGEMAKER_CUSTOM_ATTRIBUTES,
    UPSTREAM_ERROR_PATTERN,
    InferenceApi,
)
from infra.gpu_tier import endpoint_arn
from tierserve.catalog import MB

MODELS = ("iris", "resnet-50")
GPU_MODEL = "big-llm"
GPU_ENDPOINT = "tierserve-big-llm"


@pytest.fixture(scope="module")
def gpu_manifest(manifest_factory):
    return manifest_factory(GPU_MODEL, "7", 2048 * MB)


def build(make_app, gpu_manifest, *, auth: str = "iam", manage_cloudwatch_role: bool = True) -> cdk.Stack:
    stack = cdk.Stack(make_app(), f"Api{auth.title().replace('_', '')}")
    api = InferenceApi(
        stack,
        "Api",
        auth=auth,
        throttle_rate_limit=50,
        throttle_burst_limit=100,
        log_retention=logs.RetentionDays.ONE_MONTH,
        manage_cloudwatch_role=manage_cloudwatch_role,
    )
    for name in MODELS:
        function = lambda_.Function(
            stack,
            f"Fn-{name}",
            runtime=lambda_.Runtime.PYTHON_3_13,
            handler="index.handler",
            code=lambda_.Code.from_inline("def handler(event, context):\n    return {}\n"),
            description=name,
        )
        api.add_lambda_model(name, function)
    api.add_sagemaker_model(
        GPU_MODEL,
        manifest=gpu_manifest,
        endpoint_name=GPU_ENDPOINT,
        endpoint_arn=endpoint_arn(stack, GPU_ENDPOINT),
    )
    return stack


@pytest.fixture(scope="module")
def iam_stack(make_app, gpu_manifest):
    return build(make_app, gpu_manifest)


@pytest.fixture(scope="module")
def iam_api(iam_stack, template_of):
    return template_of(iam_stack)


@pytest.fixture(scope="module")
def api_key_api(make_app, gpu_manifest, template_of):
    return template_of(build(make_app, gpu_manifest, auth="api_key"))


@pytest.fixture(scope="module")
def open_stack(make_app, gpu_manifest):
    return build(make_app, gpu_manifest, auth="none", manage_cloudwatch_role=False)


def paths(template) -> dict[str, str]:
    """Resource logical id -> full path, rebuilt from PathPart/ParentId (the root is '')."""
    parts = {k: r["Properties"] for k, r in template.find_resources("AWS::ApiGateway::Resource").items()}

    def path_of(ref: dict[str, Any]) -> str:
        if "Ref" not in ref:
            return ""  # Fn::GetAtt RestApi.RootResourceId
        props = parts[ref["Ref"]]
        return f"{path_of(props['ParentId'])}/{props['PathPart']}"

    return {logical_id: path_of({"Ref": logical_id}) for logical_id in parts}


def methods(template) -> dict[tuple[str, str], dict[str, Any]]:
    """(HTTP method, path) -> the method's properties."""
    by_id = paths(template)
    found = {}
    for method in template.find_resources("AWS::ApiGateway::Method").values():
        props = method["Properties"]
        resource = props["ResourceId"]
        path = by_id[resource["Ref"]] if "Ref" in resource else ""
        found[(props["HttpMethod"], path)] = props
    return found


def route(template, method: str, path: str) -> tuple[str, str]:
    """The (method, resource path) API Gateway picks for a request: static over variable
    segments, a greedy {proxy+} last, ANY when no exact method."""
    table = methods(template)
    resources = {tuple(p.strip("/").split("/")) for _, p in table}

    def score(candidate: tuple[str, ...]) -> tuple[int, ...] | None:
        segments = tuple(path.strip("/").split("/"))
        ranks = []
        for i, part in enumerate(candidate):
            if part == "{proxy+}":
                return (*ranks, 0) if len(segments) > i else None
            if i >= len(segments):
                return None
            if part == segments[i]:
                ranks.append(2)
            elif part.startswith("{"):
                ranks.append(1)
            else:
                return None
        return (*tuple(ranks), 3) if len(candidate) == len(segments) else None

    scored = [(score(c), c) for c in resources]
    best = max((s, c) for s, c in scored if s is not None)[1]
    resource = "/" + "/".join(best)
    return (method if (method, resource) in table else "ANY"), resource


def integration_function(template, props) -> str:
    """The Description of the function a Lambda proxy integration invokes."""
    uri = json.dumps(props["Integration"]["Uri"])
    functions = template.find_resources("AWS::Lambda::Function")
    (description,) = [f["Properties"]["Description"] for k, f in functions.items() if f'"{k}"' in uri]
    return description


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/v2/models/iris", ("GET", "/v2/models/iris")),
        ("GET", "/v2/models/iris/ready", ("ANY", "/v2/models/iris/{proxy+}")),
        ("POST", "/v2/models/iris/infer", ("ANY", "/v2/models/iris/{proxy+}")),
        ("GET", "/v2/models/resnet-50/versions/1.2", ("ANY", "/v2/models/resnet-50/{proxy+}")),
        ("GET", "/v2/models/resnet-50/versions/1.2/ready", ("ANY", "/v2/models/resnet-50/{proxy+}")),
        ("POST", "/v2/models/resnet-50/versions/1.2/infer", ("ANY", "/v2/models/resnet-50/{proxy+}")),
        ("GET", "/v2/models/nope", ("GET", "/v2/models/{model}")),
        ("POST", "/v2/models/nope/versions/1/infer", ("ANY", "/v2/models/{model}/{proxy+}")),
        ("GET", "/v2/health/live", ("GET", "/v2/health/live")),
        ("GET", "/v2/health/ready", ("GET", "/v2/health/ready")),
        ("GET", "/v2", ("GET", "/v2")),
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
def test_every_oip_route_reaches_the_right_resource(iam_api, method, path, expected):
    assert route(iam_api, method, path) == expected


def test_each_models_routes_invoke_its_own_function(iam_api):
    table = methods(iam_api)
    for name in MODELS:
        for key in (("GET", f"/v2/models/{name}"), ("ANY", f"/v2/models/{name}/{{proxy+}}")):
            assert table[key]["Integration"]["Type"] == "AWS_PROXY"
            assert integration_function(iam_api, table[key]) == name


def test_the_model_list_is_on_the_api(iam_stack):
    api = next(c for c in iam_stack.node.children if isinstance(c, InferenceApi))
    assert api.model_names == [*MODELS, GPU_MODEL]
    with pytest.raises(ValueError, match="already has routes"):
        api.add_model("iris", cdk.aws_apigateway.MockIntegration())


def render_unknown_model(template_text: str, model: str) -> dict[str, Any]:
    """Apply the VTL the way API Gateway would for a plain model name."""
    first, _, body = template_text.partition("\n")
    assert first.startswith("#set($model = $util.escapeJavaScript($input.params('model'))")
    return json.loads(body.replace("$model", model))


def test_unknown_models_get_an_oip_404_naming_the_deployed_ones(iam_api):
    table = methods(iam_api)
    for key in (("GET", "/v2/models/{model}"), ("ANY", "/v2/models/{model}/{proxy+}")):
        props = table[key]
        assert props["Integration"]["Type"] == "MOCK"
        (response,) = props["Integration"]["IntegrationResponses"]
        assert response["StatusCode"] == "404"
        assert [r["StatusCode"] for r in props["MethodResponses"]] == ["404"]
        body = render_unknown_model(response["ResponseTemplates"]["application/json"], "nope")
        assert body["error"].startswith("model 'nope' is not deployed here; GET /v2/models/iris")
        assert "deployed: iris, resnet-50, big-llm" in body["error"]
        request = props["Integration"]["RequestTemplates"]
        assert json.loads(request["application/json"]) == {"statusCode": 404}
        assert json.loads(request["application/octet-stream"]) == {"statusCode": 404}


def test_health_and_server_metadata_are_answered_without_a_function(iam_api):
    from tierserve.protocol import server_metadata

    table = methods(iam_api)
    expected = {
        "/v2": server_metadata(),
        "/v2/health/live": {"live": True},
        "/v2/health/ready": {"ready": True},
    }
    for path, body in expected.items():
        props = table[("GET", path)]
        assert props["Integration"]["Type"] == "MOCK"
        (response,) = props["Integration"]["IntegrationResponses"]
        assert response["StatusCode"] == "200"
        assert json.loads(response["ResponseTemplates"]["application/json"]) == body
    assert server_metadata() == {
        "name": "tierserve",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data"],
    }


def test_iam_auth_and_the_validator_on_every_method(iam_api):
    (validator_id,) = iam_api.find_resources(
        "AWS::ApiGateway::RequestValidator",
        {"Properties": {"ValidateRequestBody": True, "ValidateRequestParameters": True}},
    )
    for props in methods(iam_api).values():
        assert props["AuthorizationType"] == "AWS_IAM"
        assert props.get("ApiKeyRequired") in (None, False)
        assert props["RequestValidatorId"] == {"Ref": validator_id}


def test_stage_throttles_traces_and_logs(iam_api, find):
    (stage,) = find(iam_api, "AWS::ApiGateway::Stage")
    props = stage["Properties"]
    (setting,) = props["MethodSettings"]
    assert setting["HttpMethod"] == "*" and setting["ResourcePath"] == "/*"
    assert (setting["ThrottlingRateLimit"], setting["ThrottlingBurstLimit"]) == (50, 100)
    assert setting["MetricsEnabled"] is True
    assert setting["LoggingLevel"] == "ERROR"
    assert props["TracingEnabled"] is True
    line = props["AccessLogSetting"]["Format"]
    # What API Gateway writes: $context.error.messageString arrives already quoted.
    access_log = json.loads(line.replace("$context.error.messageString", '"Forbidden"'))
    assert access_log["requestId"] == "$context.requestId"
    assert access_log["status"] == "$context.status"
    assert access_log["errorMessage"] == "Forbidden"


def test_binary_tensors_pass_as_binary(iam_api, find):
    (api,) = find(iam_api, "AWS::ApiGateway::RestApi")
    assert api["Properties"]["BinaryMediaTypes"] == ["application/octet-stream"]
    assert api["Properties"]["EndpointConfiguration"] == {"Types": ["REGIONAL"]}


def gateway_responses(template) -> dict[str, dict[str, Any]]:
    found = template.find_resources("AWS::ApiGateway::GatewayResponse").values()
    return {r["Properties"]["ResponseType"]: r["Properties"] for r in found}


def test_gateway_errors_are_oip_json(iam_api):
    responses = gateway_responses(iam_api)
    for default in ("DEFAULT_4XX", "DEFAULT_5XX"):
        assert responses[default]["ResponseTemplates"] == {
            "application/json": '{"error": $context.error.messageString}'
        }
        assert "StatusCode" not in responses[default], "each error keeps its own status"
    assert responses["RESOURCE_NOT_FOUND"]["StatusCode"] == "404"
    for response_type in ("RESOURCE_NOT_FOUND", "REQUEST_TOO_LARGE", "INTEGRATION_TIMEOUT"):
        body = json.loads(responses[response_type]["ResponseTemplates"]["application/json"])
        assert set(body) == {"error"}


def test_with_iam_a_missing_signature_stays_403_and_says_both_causes(iam_api):
    response = gateway_responses(iam_api)["MISSING_AUTHENTICATION_TOKEN"]
    assert response["StatusCode"] == "403"
    message = json.loads(response["ResponseTemplates"]["application/json"])["error"]
    assert "not signed" in message and "no route" in message and "SigV4" in message


def test_without_iam_an_unknown_path_is_a_404(api_key_api):
    response = gateway_responses(api_key_api)["MISSING_AUTHENTICATION_TOKEN"]
    assert response["StatusCode"] == "404"
    assert json.loads(response["ResponseTemplates"]["application/json"])["error"].startswith("no route")


def test_api_key_mode_requires_a_key_and_throttles_the_plan(api_key_api, find):
    for props in methods(api_key_api).values():
        assert props["ApiKeyRequired"] is True
        assert props["AuthorizationType"] == "NONE"
    (plan,) = find(api_key_api, "AWS::ApiGateway::UsagePlan")
    assert plan["Properties"]["Throttle"] == {"RateLimit": 50, "BurstLimit": 100}
    assert len(plan["Properties"]["ApiStages"]) == 1
    assert len(find(api_key_api, "AWS::ApiGateway::ApiKey")) == 1
    assert len(find(api_key_api, "AWS::ApiGateway::UsagePlanKey")) == 1


def test_no_auth_is_open_and_says_so_loudly(open_stack, template_of, find):
    template = template_of(open_stack)
    for props in methods(template).values():
        assert props["AuthorizationType"] == "NONE"
        assert props.get("ApiKeyRequired") in (None, False)
    assert find(template, "AWS::ApiGateway::ApiKey") == []
    Annotations.from_stack(open_stack).has_warning("*", Match.string_like_regexp("auth=none"))


def test_account_logging_role_is_inline_and_optional(iam_api, open_stack, template_of, find):
    (account,) = find(iam_api, "AWS::ApiGateway::Account")
    assert "CloudWatchRoleArn" in account["Properties"]
    trust = {"Statement": [Match.object_like({"Principal": {"Service": "apigateway.amazonaws.com"}})]}
    (role,) = find(
        iam_api,
        "AWS::IAM::Role",
        {
            "AssumeRolePolicyDocument": Match.object_like(trust),
            "Policies": [Match.object_like({"PolicyName": "PushLogs"})],
        },
    )
    assert "ManagedPolicyArns" not in role["Properties"]
    assert [p["PolicyName"] for p in role["Properties"]["Policies"]] == ["PushLogs"]
    (statement,) = role["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
    assert sorted(statement["Action"]) == [  # writes only: nothing that reads the logs back
        "logs:CreateLogGroup",
        "logs:CreateLogStream",
        "logs:DescribeLogGroups",
        "logs:DescribeLogStreams",
        "logs:PutLogEvents",
    ]
    assert role["DeletionPolicy"] == "Retain", "other APIs in the account keep logging"
    assert find(template_of(open_stack), "AWS::ApiGateway::Account") == []


# ---- the GPU tier: SageMaker runtime integration and mocks ------------------------------


def gpu_infer_methods(template) -> list[dict[str, Any]]:
    table = methods(template)
    return [table[("POST", f"/v2/models/{GPU_MODEL}{v}/infer")] for v in ("", "/versions/7")]


def test_gpu_infer_calls_invoke_endpoint_on_its_endpoint(iam_api):
    for props in gpu_infer_methods(iam_api):
        integration = props["Integration"]
        assert integration["Type"] == "AWS"
        assert integration["IntegrationHttpMethod"] == "POST"
        uri = json.dumps(integration["Uri"])
        assert f":runtime.sagemaker:path/endpoints/{GPU_ENDPOINT}/invocations" in uri
        assert integration["TimeoutInMillis"] <= 29_000
        assert integration["PassthroughBehavior"] == "WHEN_NO_TEMPLATES"
        assert "RequestTemplates" not in integration, "a template would break binary bodies"
        assert "ContentHandling" not in integration, "bodies pass through as they are"


def test_gpu_integration_role_may_only_invoke_that_endpoint(iam_api):
    roles = iam_api.find_resources("AWS::IAM::Role")
    for props in gpu_infer_methods(iam_api):
        role = roles[props["Integration"]["Credentials"]["Fn::GetAtt"][0]]["Properties"]
        assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {
            "Service": "apigateway.amazonaws.com"
        }
        assert "ManagedPolicyArns" not in role
        (policy,) = role["Policies"]
        (statement,) = policy["PolicyDocument"]["Statement"]
        assert statement["Action"] == "sagemaker:InvokeEndpoint"
        assert statement["Effect"] == "Allow"
        assert json.dumps(statement["Resource"]).endswith(f':endpoint/{GPU_ENDPOINT}"]]}}')
    attached = [
        p
        for p in iam_api.find_resources("AWS::IAM::Policy").values()
        if "SageMaker" in json.dumps(p["Properties"]["Roles"])
    ]
    assert attached == [], "nothing else attached to the invoke role"


def test_gpu_infer_maps_the_binary_header_length_both_ways(iam_api):
    for props in gpu_infer_methods(iam_api):
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
        assert "ContentHandling" not in ok and "ResponseTemplates" not in ok, "binary responses pass through"


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
    import re

    patterns = {
        "400 (container's 4xx; overridden for 408/413/429/5xx)": MODEL_ERROR_PATTERN,
        "413": PAYLOAD_TOO_LARGE_PATTERN,
        "503": UPSTREAM_ERROR_PATTERN,
    }
    for status in range(400, 600):
        matching = [name for name, p in patterns.items() if re.fullmatch(p, str(status))]
        assert len(matching) == 1, (status, matching)
    for status in range(200, 400):
        assert not any(re.fullmatch(p, str(status)) for p in patterns.values())


def test_gpu_errors_become_oip_errors(iam_api):
    for props in gpu_infer_methods(iam_api):
        responses = {r.get("SelectionPattern"): r for r in props["Integration"]["IntegrationResponses"]}
        assert responses[MODEL_ERROR_PATTERN]["StatusCode"] == "400"
        assert responses[PAYLOAD_TOO_LARGE_PATTERN]["StatusCode"] == "413"
        assert responses[UPSTREAM_ERROR_PATTERN]["StatusCode"] == "503"
        for pattern in (PAYLOAD_TOO_LARGE_PATTERN, UPSTREAM_ERROR_PATTERN):
            body = json.loads(responses[pattern]["ResponseTemplates"]["application/json"])
            assert set(body) == {"error"} and GPU_MODEL in body["error"]
        model_error = responses[MODEL_ERROR_PATTERN]["ResponseTemplates"]["application/json"]
        assert "$input.path('$.OriginalStatusCode')" in model_error
        assert "#elseif($message.startsWith('{\"error\"'))$message" in model_error, (
            "the container's own message"
        )
        for status in ("413", "504", "503"):
            assert f"$context.responseOverride.status = {status}" in model_error
        declared = {r["StatusCode"] for r in props["MethodResponses"]}
        assert declared == {"200", "400", "413", "503", "504"}


def test_gpu_metadata_and_ready_are_mocks_from_the_manifest(iam_api, gpu_manifest):
    from tierserve.protocol import model_metadata

    table = methods(iam_api)
    expected = {
        "": model_metadata(gpu_manifest),
        "/ready": {"name": GPU_MODEL, "version": "7", "ready": True},
    }
    for base in (f"/v2/models/{GPU_MODEL}", f"/v2/models/{GPU_MODEL}/versions/7"):
        for suffix, body in expected.items():
            props = table[("GET", base + suffix)]
            assert props["Integration"]["Type"] == "MOCK"
            (response,) = props["Integration"]["IntegrationResponses"]
            assert response["StatusCode"] == "200"
            assert json.loads(response["ResponseTemplates"]["application/json"]) == body
    metadata = expected[""]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]


def test_gpu_unknown_routes_and_versions_are_oip_404s(iam_api):
    props = methods(iam_api)[("ANY", f"/v2/models/{GPU_MODEL}/{{proxy+}}")]
    assert props["Integration"]["Type"] == "MOCK"
    (response,) = props["Integration"]["IntegrationResponses"]
    assert response["StatusCode"] == "404"
    message = json.loads(response["ResponseTemplates"]["application/json"])["error"]
    assert "serves version 7" in message


def test_mock_bodies_cannot_be_read_as_vtl(make_app, manifest_factory):
    """Tensor names may hold $ or #, which VTL would read as references or directives."""
    stack = cdk.Stack(make_app(), "OddNames")
    api = InferenceApi(
        stack,
        "Api",
        auth="iam",
        throttle_rate_limit=1,
        throttle_burst_limit=1,
        log_retention=logs.RetentionDays.ONE_DAY,
    )
    odd = manifest_factory("odd", "1", 10)
    data = odd.to_dict()
    data["inputs"] = [{"name": "x$y##z", "datatype": "FP32", "shape": [-1]}]
    odd = type(odd).from_dict(data)
    api.add_sagemaker_model(
        "odd",
        manifest=odd,
        endpoint_name="tierserve-odd",
        endpoint_arn="arn:aws:sagemaker:r:1:endpoint/tierserve-odd",
    )
    from aws_cdk.assertions import Template

    template = Template.from_stack(stack)
    props = methods(template)[("GET", "/v2/models/odd")]
    text = props["Integration"]["IntegrationResponses"][0]["ResponseTemplates"]["application/json"]
    assert "$" not in text and "#" not in text
    assert json.loads(text)["inputs"][0]["name"] == "x$y##z"
