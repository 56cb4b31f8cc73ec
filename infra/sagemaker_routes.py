"""SageMakerModelRoutes: the OIP routes of one GPU-tier model, without any function.

    GET  /v2/models/{name}[/versions/{v}]          mock: the manifest's model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready    mock: ready (the API deploys after the
                                                   endpoint is InService)
    POST /v2/models/{name}[/versions/{v}]/infer    SageMaker runtime InvokeEndpoint
    ANY  /v2/models/{name}/{proxy+}                mock 404 naming the version it serves

``infer`` is an AWS service integration with a role that only API Gateway may assume, for
this account, and that may call only this model's endpoint and inference component; every
call names the component (``X-Amzn-SageMaker-Inference-Component``, a constant of the
integration). The body passes through as the caller's bytes (no mapping template, no content
conversion: under the ``*/*`` binary media type every body is binary), and so does the
endpoint's answer.

The binary tensor extension through SageMaker: ``InvokeEndpoint`` hands the container only
the body, ``Content-Type``, ``Accept`` and ``X-Amzn-SageMaker-Custom-Attributes``, and API
Gateway can only copy a header into another (a mapping template would need a text body,
which a binary request is not). So the caller's ``Inference-Header-Content-Length`` is copied
as it is into the custom attributes, and the container's custom attributes back into
``Inference-Header-Content-Length`` (see docs/architecture.md, "GPU tier infrastructure").

SageMaker's errors become OIP errors by the status InvokeEndpoint answers. Their mapping
templates see the error body as text (``CONVERT_TO_TEXT``: base64 of the bytes, since every
body is binary here), which the ModelError and ValidationError templates decode before
reading it. The cold edge: while the model has no copy running, SageMaker answers 400
``ValidationError`` "... has no capacity to process this request"; the caller gets 503 with
``Retry-After`` and a message that says the model is starting from zero, how long that takes,
and where work that can wait goes (the async jobs route).
"""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Duration
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_iam as iam
from constructs import Construct

from infra.api import InferenceApi, error_body, vtl_safe_json
from infra.config import API_GATEWAY_TIMEOUT_SECONDS
from infra.trust import service_principal
from tierserve.catalog import Manifest
from tierserve.protocol import HEADER_LENGTH, ROUTE_HELP, model_metadata
from tierserve.sagemaker_model import NO_CAPACITY_MARKER

SAGEMAKER_RUNTIME_SERVICE = "runtime.sagemaker"
SAGEMAKER_CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
# InvokeEndpoint's InferenceComponentName travels in this header (botocore's service model).
SAGEMAKER_INFERENCE_COMPONENT = "X-Amzn-SageMaker-Inference-Component"
HEADER_LENGTH_HEADER = "-".join(part.capitalize() for part in HEADER_LENGTH.split("-"))
SAGEMAKER_REQUEST_HEADERS = (HEADER_LENGTH_HEADER, "Content-Type", "Accept")
RETRY_AFTER = "Retry-After"
# Selection patterns match the HTTP status InvokeEndpoint answers (disjoint, so the order of
# the integration responses does not matter). ModelError (424) carries the container's own
# status and message; 413 is SageMaker's payload limit; 400 is ValidationError, the answer for
# a component with no copy running (and for names SageMaker does not know); every other
# 4xx/5xx is SageMaker refusing or failing (throttling, endpoint not InService, access) and
# retryable for a caller.
MODEL_ERROR_PATTERN = "424"
PAYLOAD_TOO_LARGE_PATTERN = "413"
VALIDATION_ERROR_PATTERN = "400"
UPSTREAM_ERROR_PATTERN = r"4(0[1-9]|1[0-24-9]|2[0-35-9]|[3-9]\d)|5\d{2}"
SAGEMAKER_ERROR_STATUSES = ("400", "413", "503", "504")
JSON_CONTENT = {"method.response.header.Content-Type": "'application/json'"}
# The async jobs route (infra/jobs.py): where work that can wait, or does not fit, goes.
JOBS_ROUTE = "POST /v2/models/{name}/jobs"


@dataclass(frozen=True)
class ColdStart:
    """What a caller is told while a model has no copy running: it takes about ``minutes`` to
    start one, and to retry after ``retry_after_s`` (``Retry-After``)."""

    minutes: int
    retry_after_s: int


def validation_error_template(name: str, cold_start: ColdStart) -> str:
    """Integration response template for SageMaker's 400 ValidationError: the component has no
    copy running (SageMaker's "... has no capacity to process this request") becomes the
    model-is-starting message; any other (an endpoint or component SageMaker does not know,
    a deployment in progress) is the generic retry-shortly message. Both are 503, with
    ``Retry-After`` (a header of the integration response, so it does not depend on VTL).
    The body arrives as base64 text, or as JSON should API Gateway ever class it as text."""
    jobs = JOBS_ROUTE.format(name=name)
    starting = error_body(
        f"model {name} is starting from zero: no copy of it was running, and SageMaker is starting "
        f"one on a GPU instance, which takes minutes (about {cold_start.minutes}). Retry after "
        f"{cold_start.retry_after_s} s (Retry-After), or send work that can wait to {jobs} "
        "(asynchronous jobs, served once the model is up)"
    )
    unavailable = error_body(f"the GPU endpoint of model {name} is unavailable or busy; retry shortly")
    return "\n".join(
        [
            '#set($raw = "$!input.body")',
            "#if($raw != \"\" && !$raw.startsWith('{'))#set($raw = $util.base64Decode($raw))#end",
            f"#if($raw.contains('{NO_CAPACITY_MARKER}')){starting}",
            f"#else{unavailable}#end",
        ]
    )


def model_error_template(name: str) -> str:
    """Integration response template for SageMaker's ModelError (424): the container answered
    an error, whose status and body SageMaker passes as OriginalStatusCode and OriginalMessage.

    The body arrives as base64 text (a binary body converted to text) or, should API Gateway
    ever class it as text, as the JSON itself; base64 never starts with ``{``, so the template
    decodes only the former. The container's 4xx answers reach the caller as 400 with the
    container's own OIP body (413 stays 413); its timeouts (408, 504) become 504, and 429 or
    5xx become 503 with a message of ours (a 5xx body may carry internals).
    """
    timeout = error_body(f"model {name} timed out on its GPU endpoint; retry, or send a smaller batch")
    refused = error_body(f"model {name} refused the request")
    failed = error_body(f"the GPU server of model {name} failed or is busy; retry shortly")
    return "\n".join(
        [
            '#set($status = "")#set($message = "")#set($raw = "$!input.body")',
            "#if($raw != \"\" && !$raw.startsWith('{'))#set($raw = $util.base64Decode($raw))#end",
            "#if($raw.startsWith('{'))#set($error = $util.parseJson($raw))",
            '#set($status = $error.OriginalStatusCode)#set($message = "$!error.OriginalMessage")#end',
            '#if("$!status" == "")#set($status = 502)#end',
            "#if($status == 413)#set($context.responseOverride.status = 413)",
            "#elseif($status == 408 || $status == 504)#set($context.responseOverride.status = 504)",
            "#elseif($status == 429 || $status >= 500)#set($context.responseOverride.status = 503)#end",
            "#if($status == 408 || $status == 504)" + timeout,
            "#elseif($status == 429 || $status >= 500)" + failed,
            "#elseif($message.startsWith('{\"error\"'))$message",
            "#else" + refused + "#end",
        ]
    )


class SageMakerModelRoutes(Construct):
    """The routes of GPU-tier model ``manifest.name``: mocks from the manifest, and ``infer``
    to ``InvokeEndpoint`` on ``endpoint_name`` naming ``component_name``, with a role that may
    invoke only ``endpoint_arn`` and ``component_arn`` (tokens, so the API deploys after the
    component is InService). ``cold_start`` says what a caller hears while the model has no
    copy running.

    Attributes: ``model_name``, ``resource`` (``/v2/models/{name}``), ``version_resource``
    (``.../versions/{version}``), ``role``, ``integration``, ``infer_methods``. Raises
    ValueError for a model that already has routes in ``api``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        api: InferenceApi,
        manifest: Manifest,
        endpoint_name: str,
        endpoint_arn: str,
        component_name: str,
        component_arn: str,
        cold_start: ColdStart,
    ) -> None:
        super().__init__(scope, construct_id)
        name = self.model_name = manifest.name
        self.resource = api.add_model_resource(name)
        self.role = iam.Role(
            self,
            "InvokeRole",
            assumed_by=service_principal(self, "apigateway.amazonaws.com"),
            description=f"API Gateway: invoke the inference component of model {name}, nothing else",
            inline_policies={
                "InvokeEndpoint": iam.PolicyDocument(
                    statements=[
                        iam.PolicyStatement(
                            actions=["sagemaker:InvokeEndpoint"], resources=[endpoint_arn, component_arn]
                        )
                    ]
                )
            },
        )
        self.integration = _invoke_endpoint(
            name,
            endpoint_name=endpoint_name,
            component_name=component_name,
            role=self.role,
            cold_start=cold_start,
        )
        metadata = vtl_safe_json(model_metadata(manifest))
        ready = vtl_safe_json({"name": name, "version": manifest.version, "ready": True})
        not_found = vtl_safe_json(
            {
                "error": f"model '{name}' has no such route or version here: it serves version "
                f"{manifest.version}; {ROUTE_HELP}"
            }
        )
        self.version_resource = self.resource.add_resource("versions").add_resource(manifest.version)
        self.infer_methods: list[apigw.Method] = []
        for base in (self.resource, self.version_resource):
            api.add_mock(base, "GET", 200, metadata)
            api.add_mock(base.add_resource("ready"), "GET", 200, ready)
            self.infer_methods.append(_infer_method(api, base.add_resource("infer"), self.integration))
        api.add_mock(self.resource.add_resource("{proxy+}"), "ANY", 404, not_found)


def _invoke_endpoint(
    name: str, *, endpoint_name: str, component_name: str, role: iam.IRole, cold_start: ColdStart
) -> apigw.AwsIntegration:
    """``InvokeEndpoint`` on ``component_name`` with the body passed through (no template, no
    conversion), the headers SageMaker forwards, and SageMaker's errors rewritten into OIP
    errors."""
    return apigw.AwsIntegration(
        service=SAGEMAKER_RUNTIME_SERVICE,
        path=f"endpoints/{endpoint_name}/invocations",
        integration_http_method="POST",
        options=apigw.IntegrationOptions(
            credentials_role=role,
            passthrough_behavior=apigw.PassthroughBehavior.WHEN_NO_TEMPLATES,
            timeout=Duration.seconds(API_GATEWAY_TIMEOUT_SECONDS),
            request_parameters={
                f"integration.request.header.{SAGEMAKER_INFERENCE_COMPONENT}": f"'{component_name}'",
                f"integration.request.header.{SAGEMAKER_CUSTOM_ATTRIBUTES}": (
                    f"method.request.header.{HEADER_LENGTH_HEADER}"
                ),
                "integration.request.header.Content-Type": "method.request.header.Content-Type",
                "integration.request.header.Accept": "method.request.header.Accept",
            },
            integration_responses=[
                apigw.IntegrationResponse(
                    status_code="200",
                    response_parameters={
                        "method.response.header.Content-Type": "integration.response.header.Content-Type",
                        f"method.response.header.{HEADER_LENGTH_HEADER}": (
                            f"integration.response.header.{SAGEMAKER_CUSTOM_ATTRIBUTES}"
                        ),
                    },
                ),
                _error_response(MODEL_ERROR_PATTERN, "400", model_error_template(name)),
                _error_response(
                    VALIDATION_ERROR_PATTERN,
                    "503",
                    validation_error_template(name, cold_start),
                    headers={f"method.response.header.{RETRY_AFTER}": f"'{cold_start.retry_after_s}'"},
                ),
                _error_response(
                    PAYLOAD_TOO_LARGE_PATTERN,
                    "413",
                    error_body(
                        f"the request for model {name} is over SageMaker's payload limit for one "
                        f"invocation (6 MB): send fewer rows per request, or send it as a job "
                        f"({JOBS_ROUTE.format(name=name)} answers an upload URL for inputs of any size)"
                    ),
                ),
                _error_response(
                    UPSTREAM_ERROR_PATTERN,
                    "503",
                    error_body(f"the GPU endpoint of model {name} is unavailable or busy; retry shortly"),
                ),
            ],
        ),
    )


def _error_response(
    pattern: str, status: str, template: str, *, headers: dict[str, str] | None = None
) -> apigw.IntegrationResponse:
    """An error answer in OIP JSON (and ``headers``, method response header -> value); the
    body reaches ``template`` as text."""
    return apigw.IntegrationResponse(
        selection_pattern=pattern,
        status_code=status,
        response_parameters={**JSON_CONTENT, **(headers or {})},
        response_templates={"application/json": template},
        content_handling=apigw.ContentHandling.CONVERT_TO_TEXT,
    )


def _infer_method(
    api: InferenceApi, resource: apigw.IResource, integration: apigw.Integration
) -> apigw.Method:
    header = "method.response.header.Content-Type"
    responses = [
        apigw.MethodResponse(
            status_code="200",
            response_parameters={header: True, f"method.response.header.{HEADER_LENGTH_HEADER}": True},
        ),
        *(
            apigw.MethodResponse(
                status_code=status,
                response_parameters={
                    header: True,
                    **({f"method.response.header.{RETRY_AFTER}": True} if status == "503" else {}),
                },
                response_models={"application/json": apigw.Model.EMPTY_MODEL},
            )
            for status in SAGEMAKER_ERROR_STATUSES
        ),
    ]
    return api.add_method(
        resource,
        "POST",
        integration,
        method_responses=responses,
        request_parameters={f"method.request.header.{h}": False for h in SAGEMAKER_REQUEST_HEADERS},
    )
