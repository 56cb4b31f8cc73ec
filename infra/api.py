"""InferenceApi: one REST API speaking the Open Inference Protocol for every deployed model.

Routes (all under the stage URL):

    GET  /v2, /v2/health/live, /v2/health/ready        mock integrations (no function runs)
    ANY  /v2/models/{name}[/...]                        Lambda tier: the model's function (proxy)
    GET  /v2/models/{name}[/versions/{v}][/ready]       GPU tier: mocks built from the manifest
    POST /v2/models/{name}[/versions/{v}]/infer         GPU tier: SageMaker runtime InvokeEndpoint
    ANY  /v2/models/{model}[/...]  (unknown models)     mock 404 naming the deployed models

Each deployed model gets a static ``{name}`` resource with a ``{proxy+}`` child, so the
handler sees ``/v2/models/{name}/[versions/{v}/]{ready,infer}`` and API Gateway never runs a
function for a model it does not serve. A sibling variable resource answers every other model
name with an OIP 404 instead of API Gateway's default 403 "Missing Authentication Token".

Errors raised by API Gateway itself (auth, throttling, timeouts, unknown paths) are gateway
responses rewritten into the OIP shape ``{"error": "..."}``. With IAM auth, an unsigned
request and a request for a path that does not exist are the same gateway response
(MISSING_AUTHENTICATION_TOKEN), raised before routing; it stays a 403 whose message names
both causes, rather than a 404 that would send a caller with a missing signature hunting for
a typo. With ``api_key`` or ``none`` it can only mean an unknown path and becomes a 404.

Tiers plug in per model: :meth:`InferenceApi.add_lambda_model` (one Lambda proxy for every
route of the model) and :meth:`InferenceApi.add_sagemaker_model` (no function at all: metadata
and readiness are mocks rendered at synth from the manifest, and ``infer`` is an AWS service
integration that calls SageMaker runtime ``InvokeEndpoint`` with a role that may call only
that endpoint). Only the deployed version has routes; any other path under a GPU model is a
mock 404 naming the version it serves.

The binary tensor extension through SageMaker: ``InvokeEndpoint`` hands the container only
the body, ``Content-Type``, ``Accept`` and ``X-Amzn-SageMaker-Custom-Attributes``, and API
Gateway can only copy a header into another (a mapping template would need a text body,
which a binary request is not). So the caller's ``Inference-Header-Content-Length`` is copied
as it is into the custom attributes, and the container's custom attributes back into
``Inference-Header-Content-Length`` (see docs/architecture.md, "GPU tier infrastructure").
"""

from __future__ import annotations

import json
from typing import Any

import jsii
from aws_cdk import Annotations, ArnFormat, Duration, IResolvable, IResolveContext, RemovalPolicy, Token
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from infra.config import API_GATEWAY_TIMEOUT_SECONDS, AuthMode
from infra.nag import acknowledge, wildcard_resource_finding
from tierserve.catalog import Manifest
from tierserve.protocol import HEADER_LENGTH, model_metadata, server_metadata
from tierserve.routes import ROUTE_HELP

BINARY_MEDIA_TYPES = ["application/octet-stream"]
# Content types a mock integration accepts; others get a 415 through DEFAULT_4XX.
MOCK_CONTENT_TYPES = ("application/json", "application/octet-stream")
ERROR_TEMPLATE = '{"error": $context.error.messageString}'
MAX_LISTED_MODELS = 20  # in the unknown-model 404; keeps the message readable

# The GPU tier's SageMaker runtime integration.
SAGEMAKER_RUNTIME_SERVICE = "runtime.sagemaker"
SAGEMAKER_CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
HEADER_LENGTH_HEADER = "-".join(part.capitalize() for part in HEADER_LENGTH.split("-"))
SAGEMAKER_REQUEST_HEADERS = (HEADER_LENGTH_HEADER, "Content-Type", "Accept")
# Selection patterns match the HTTP status InvokeEndpoint answers (disjoint, so the order of
# the integration responses does not matter). ModelError (424) carries the container's own
# status and message; 413 is SageMaker's payload limit; every other 4xx/5xx is SageMaker
# refusing or failing (throttling, endpoint not InService, access) and retryable for a caller.
MODEL_ERROR_PATTERN = "424"
PAYLOAD_TOO_LARGE_PATTERN = "413"
UPSTREAM_ERROR_PATTERN = r"4(0\d|1[0-24-9]|2[0-35-9]|[3-9]\d)|5\d{2}"
SAGEMAKER_ERROR_STATUSES = ("400", "413", "503", "504")


def _error_body(message: str) -> str:
    return json.dumps({"error": message})


def _vtl_safe_json(document: Any) -> str:
    """``document`` as JSON that a mapping template outputs as it is: ``$`` and ``#`` (VTL's
    references and directives) can only occur inside JSON strings, where their unicode
    escapes mean the same to every JSON reader."""
    return json.dumps(document).replace("$", "\\u0024").replace("#", "\\u0023")


def _model_error_template(name: str) -> str:
    """Integration response template for SageMaker's ModelError (424): the container answered
    an error, whose status and body SageMaker passes as OriginalStatusCode and OriginalMessage.

    The container's 4xx answers reach the caller as 400 with the container's own OIP body
    (413 stays 413); its timeouts (408, 504) become 504, and 429 or 5xx become 503 with a
    message of ours (a 5xx body may carry internals).
    """
    timeout = _error_body(f"model {name} timed out on its GPU endpoint; retry, or send a smaller batch")
    refused = _error_body(f"model {name} refused the request")
    failed = _error_body(f"the GPU server of model {name} failed or is busy; retry shortly")
    return "\n".join(
        [
            "#set($status = $input.path('$.OriginalStatusCode'))",
            "#set($message = \"$!input.path('$.OriginalMessage')\")",
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


@jsii.implements(IResolvable)
class _UnknownModelTemplate:
    """The 404 body for a model this API does not serve, listing the models it does.

    A token resolved at synth, so models added after the API was built are listed too (an
    ``IResolvable``: jsii cannot call a Python ``Lazy`` producer on every path CDK resolves
    it). The path parameter is escaped for JSON; escapeJavaScript also turns ' into \\',
    which JSON rejects, so the template undoes that.
    """

    def __init__(self, api: InferenceApi) -> None:
        self._api = api

    @property
    def creation_stack(self) -> list[str]:
        return []

    @property
    def type_hint(self) -> None:
        return None

    def to_string(self) -> str:
        return "tierserve-unknown-model-template"

    def resolve(self, context: IResolveContext) -> str:
        names = self._api.model_names
        if names:
            deployed = ", ".join(names[:MAX_LISTED_MODELS])
            if len(names) > MAX_LISTED_MODELS:
                deployed += f" and {len(names) - MAX_LISTED_MODELS} more"
            hint = f"GET /v2/models/{names[0]} for a deployed model's metadata (deployed: {deployed})"
        else:
            hint = "no models are deployed yet (add them to the catalog and redeploy)"
        return (
            "#set($model = $util.escapeJavaScript($input.params('model')).replaceAll(\"\\\\'\", \"'\"))\n"
            + json.dumps({"error": f"model '$model' is not deployed here; {hint}"})
        )


class InferenceApi(Construct):
    """The OIP REST API: health and metadata by mocks, models routed to their tier.

    Attributes: ``rest_api``, ``stage``, ``url``, ``access_log_group``, ``auth``,
    ``api_key`` and ``usage_plan`` (api_key auth only, else None).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        auth: AuthMode,
        throttle_rate_limit: float,
        throttle_burst_limit: int,
        log_retention: logs.RetentionDays,
        manage_cloudwatch_role: bool = True,
        stage_name: str = "prod",
    ) -> None:
        super().__init__(scope, construct_id)
        self.auth = auth
        self._models: dict[str, apigw.Resource] = {}

        self.access_log_group = logs.LogGroup(self, "AccessLogs", retention=log_retention)
        self.rest_api = apigw.RestApi(
            self,
            "RestApi",
            description="tierserve: Open Inference Protocol (KServe v2) for every deployed model",
            endpoint_types=[apigw.EndpointType.REGIONAL],
            binary_media_types=BINARY_MEDIA_TYPES,
            cloud_watch_role=False,
            deploy_options=apigw.StageOptions(
                stage_name=stage_name,
                throttling_rate_limit=throttle_rate_limit,
                throttling_burst_limit=throttle_burst_limit,
                tracing_enabled=True,
                metrics_enabled=True,
                logging_level=apigw.MethodLoggingLevel.ERROR,
                data_trace_enabled=False,
                access_log_destination=apigw.LogGroupLogDestination(self.access_log_group),
                access_log_format=_access_log_format(),
            ),
        )
        # The stack outputs the URL under a readable name; drop RestApi's hashed duplicate.
        self.rest_api.node.try_remove_child("Endpoint")
        self.stage = self.rest_api.deployment_stage
        self.url = self.rest_api.url
        if manage_cloudwatch_role:
            self._account_logging_role()
        self._validator = self.rest_api.add_request_validator(
            "Validator", validate_request_body=True, validate_request_parameters=True
        )

        self.api_key: apigw.IApiKey | None = None
        self.usage_plan: apigw.UsagePlan | None = None
        if auth == "api_key":
            self.usage_plan = self.rest_api.add_usage_plan(
                "UsagePlan",
                description="tierserve callers: throttled like the stage",
                throttle=apigw.ThrottleSettings(
                    rate_limit=throttle_rate_limit, burst_limit=throttle_burst_limit
                ),
                api_stages=[apigw.UsagePlanPerApiStage(api=self.rest_api, stage=self.stage)],
            )
            self.api_key = self.rest_api.add_api_key("ApiKey", description="tierserve caller key")
            self.usage_plan.add_api_key(self.api_key)

        self._models_root = self._add_server_routes()
        self._add_gateway_responses()
        self._acknowledge_auth_rules()

    # ---- models -------------------------------------------------------------------------

    @property
    def model_names(self) -> list[str]:
        """The models with routes, in the order they were added."""
        return list(self._models)

    def add_lambda_model(self, name: str, function: lambda_.IFunction) -> apigw.Resource:
        """Route ``/v2/models/{name}`` and everything under it to ``function`` (Lambda proxy)."""
        return self.add_model(name, apigw.LambdaIntegration(function, proxy=True, allow_test_invoke=False))

    def add_model(self, name: str, integration: apigw.Integration) -> apigw.Resource:
        """Route model ``name`` to ``integration``: GET on ``/v2/models/{name}``, ANY below it.

        The building block for a tier whose backend answers every route; returns the model's
        resource. Raises ValueError for a model that already has routes.
        """
        resource = self._model_resource(name)
        self._method(resource, "GET", integration)
        proxy = resource.add_resource("{proxy+}")
        self._method(proxy, "ANY", integration, request_parameters={"method.request.path.proxy": True})
        return resource

    def add_sagemaker_model(
        self, name: str, *, manifest: Manifest, endpoint_name: str, endpoint_arn: str
    ) -> apigw.Resource:
        """Route GPU-tier model ``name`` to its SageMaker endpoint.

        ``GET /v2/models/{name}[/versions/{version}]`` and ``.../ready`` are mocks rendered
        from ``manifest`` (the endpoint is InService before the API deploys, as the endpoint
        ARN token orders them); ``POST .../infer`` calls ``InvokeEndpoint`` on
        ``endpoint_name`` with a role that may call only ``endpoint_arn``; anything else under
        the model is a 404 naming the served version. Raises ValueError for a model that
        already has routes.
        """
        if manifest.name != name:
            raise ValueError(f"manifest {manifest.name!r} is not model {name!r}")
        resource = self._model_resource(name)
        scope = Construct(self._sagemaker_models_scope(), name)
        role = iam.Role(
            scope,
            "InvokeRole",
            assumed_by=iam.ServicePrincipal("apigateway.amazonaws.com"),
            description=f"API Gateway: invoke the GPU endpoint of model {name}, nothing else",
            inline_policies={
                "InvokeEndpoint": iam.PolicyDocument(
                    statements=[
                        iam.PolicyStatement(actions=["sagemaker:InvokeEndpoint"], resources=[endpoint_arn])
                    ]
                )
            },
        )
        infer = self._sagemaker_integration(name, endpoint_name=endpoint_name, role=role)
        metadata = _vtl_safe_json(model_metadata(manifest))
        ready = _vtl_safe_json({"name": name, "version": manifest.version, "ready": True})
        not_found = _vtl_safe_json(
            {
                "error": f"model '{name}' has no such route or version here: it serves version "
                f"{manifest.version}; {ROUTE_HELP}"
            }
        )
        version = resource.add_resource("versions").add_resource(manifest.version)
        for base in (resource, version):
            self._mock(base, "GET", 200, metadata)
            self._mock(base.add_resource("ready"), "GET", 200, ready)
            self._sagemaker_method(base.add_resource("infer"), infer)
        self._mock(resource.add_resource("{proxy+}"), "ANY", 404, not_found)
        return resource

    def _model_resource(self, name: str) -> apigw.Resource:
        if name in self._models:
            raise ValueError(f"model {name!r} already has routes in this API")
        resource = self._models_root.add_resource(name)
        self._models[name] = resource
        return resource

    def _sagemaker_models_scope(self) -> Construct:
        existing = self.node.try_find_child("SageMakerModels")
        return existing if isinstance(existing, Construct) else Construct(self, "SageMakerModels")

    def _sagemaker_integration(
        self, name: str, *, endpoint_name: str, role: iam.IRole
    ) -> apigw.AwsIntegration:
        """``InvokeEndpoint`` with the body passed through (binary stays binary: no template),
        the headers SageMaker forwards, and SageMaker's errors rewritten into OIP errors."""
        json_content = {"method.response.header.Content-Type": "'application/json'"}
        return apigw.AwsIntegration(
            service=SAGEMAKER_RUNTIME_SERVICE,
            path=f"endpoints/{endpoint_name}/invocations",
            integration_http_method="POST",
            options=apigw.IntegrationOptions(
                credentials_role=role,
                passthrough_behavior=apigw.PassthroughBehavior.WHEN_NO_TEMPLATES,
                timeout=Duration.seconds(API_GATEWAY_TIMEOUT_SECONDS),
                request_parameters={
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
                    apigw.IntegrationResponse(
                        selection_pattern=MODEL_ERROR_PATTERN,
                        status_code="400",
                        response_parameters=json_content,
                        response_templates={"application/json": _model_error_template(name)},
                    ),
                    apigw.IntegrationResponse(
                        selection_pattern=PAYLOAD_TOO_LARGE_PATTERN,
                        status_code="413",
                        response_parameters=json_content,
                        response_templates={
                            "application/json": _error_body(
                                f"the request for model {name} is over SageMaker's payload limit for one "
                                "invocation (6 MB): send fewer rows per request"
                            )
                        },
                    ),
                    apigw.IntegrationResponse(
                        selection_pattern=UPSTREAM_ERROR_PATTERN,
                        status_code="503",
                        response_parameters=json_content,
                        response_templates={
                            "application/json": _error_body(
                                f"the GPU endpoint of model {name} is unavailable or busy; retry shortly"
                            )
                        },
                    ),
                ],
            ),
        )

    def _sagemaker_method(self, resource: apigw.IResource, integration: apigw.Integration) -> apigw.Method:
        header = "method.response.header.Content-Type"
        responses = [
            apigw.MethodResponse(
                status_code="200",
                response_parameters={header: True, f"method.response.header.{HEADER_LENGTH_HEADER}": True},
            ),
            *(
                apigw.MethodResponse(
                    status_code=status,
                    response_parameters={header: True},
                    response_models={"application/json": apigw.Model.EMPTY_MODEL},
                )
                for status in SAGEMAKER_ERROR_STATUSES
            ),
        ]
        return self._method(
            resource,
            "POST",
            integration,
            method_responses=responses,
            request_parameters={f"method.request.header.{h}": False for h in SAGEMAKER_REQUEST_HEADERS},
        )

    # ---- construction -------------------------------------------------------------------

    def _method(
        self,
        resource: apigw.IResource,
        http_method: str,
        integration: apigw.Integration,
        *,
        method_responses: list[apigw.MethodResponse] | None = None,
        request_parameters: dict[str, bool] | None = None,
    ) -> apigw.Method:
        """Add a method with this API's auth mode and request validator."""
        return resource.add_method(
            http_method,
            integration,
            authorization_type=apigw.AuthorizationType.IAM
            if self.auth == "iam"
            else apigw.AuthorizationType.NONE,
            api_key_required=self.auth == "api_key",
            request_validator=self._validator,
            request_parameters=request_parameters,
            method_responses=method_responses,
        )

    def _mock(self, resource: apigw.IResource, http_method: str, status: int, body: str) -> apigw.Method:
        integration = apigw.MockIntegration(
            request_templates={ct: json.dumps({"statusCode": status}) for ct in MOCK_CONTENT_TYPES},
            passthrough_behavior=apigw.PassthroughBehavior.NEVER,
            content_handling=apigw.ContentHandling.CONVERT_TO_TEXT,
            integration_responses=[
                apigw.IntegrationResponse(
                    status_code=str(status), response_templates={"application/json": body}
                )
            ],
        )
        responses = [
            apigw.MethodResponse(
                status_code=str(status), response_models={"application/json": apigw.Model.EMPTY_MODEL}
            )
        ]
        return self._method(resource, http_method, integration, method_responses=responses)

    def _add_server_routes(self) -> apigw.Resource:
        """Health and server metadata; returns ``/v2/models``, where model routes go."""
        v2 = self.rest_api.root.add_resource("v2")
        self._mock(v2, "GET", 200, json.dumps(server_metadata()))
        health = v2.add_resource("health")
        self._mock(health.add_resource("live"), "GET", 200, json.dumps({"live": True}))
        self._mock(health.add_resource("ready"), "GET", 200, json.dumps({"ready": True}))

        models = v2.add_resource("models")
        unknown = models.add_resource("{model}")
        not_found = Token.as_string(_UnknownModelTemplate(self))
        self._mock(unknown, "GET", 404, not_found)
        self._mock(unknown.add_resource("{proxy+}"), "ANY", 404, not_found)
        return models

    def _add_gateway_responses(self) -> None:
        if self.auth == "iam":
            unrouted_status = "403"
            unrouted_body = _error_body(
                "the request is not signed, or no route matches its path: this API needs requests signed "
                f"with AWS SigV4 (service 'execute-api', auth mode 'iam'); {ROUTE_HELP}"
            )
        else:
            unrouted_status = "404"
            unrouted_body = _error_body(f"no route matches this path; {ROUTE_HELP}")
        responses = {
            "MissingToken": (apigw.ResponseType.MISSING_AUTHENTICATION_TOKEN, unrouted_status, unrouted_body),
            "NotFound": (
                apigw.ResponseType.RESOURCE_NOT_FOUND,
                "404",
                _error_body(f"no route matches this path; {ROUTE_HELP}"),
            ),
            "TooLarge": (
                apigw.ResponseType.REQUEST_TOO_LARGE,
                "413",
                _error_body(
                    "the request body is over API Gateway's 10 MB limit; send tensors with the binary "
                    "tensor data extension, or split the batch"
                ),
            ),
            "Timeout": (
                apigw.ResponseType.INTEGRATION_TIMEOUT,
                "504",
                _error_body(
                    f"the model did not answer within API Gateway's {API_GATEWAY_TIMEOUT_SECONDS} s limit; "
                    "retry (the first request may load the model), or send a smaller batch"
                ),
            ),
            "Default4xx": (apigw.ResponseType.DEFAULT_4_XX, None, ERROR_TEMPLATE),
            "Default5xx": (apigw.ResponseType.DEFAULT_5_XX, None, ERROR_TEMPLATE),
        }
        for response_id, (response_type, status, template) in responses.items():
            self.rest_api.add_gateway_response(
                response_id,
                type=response_type,
                status_code=status,
                templates={"application/json": template},
            )

    def _account_logging_role(self) -> None:
        """The account's API Gateway CloudWatch role, which execution and access logs need.

        An inline policy scoped to this account and region instead of the AWS managed
        AmazonAPIGatewayPushToCloudWatchLogs. The setting is one per account and region:
        turn ``api_cloudwatch_role`` off where another stack already manages it. Retained,
        so deleting this stack does not break other APIs' logging.
        """
        log_groups_arn = self.rest_api.stack.format_arn(
            service="logs", resource="log-group", resource_name="*", arn_format=ArnFormat.COLON_RESOURCE_NAME
        )
        role = iam.Role(
            self,
            "CloudWatchRole",
            assumed_by=iam.ServicePrincipal("apigateway.amazonaws.com"),
            description="API Gateway account setting: push execution and access logs to CloudWatch Logs",
            inline_policies={
                "PushLogs": iam.PolicyDocument(
                    statements=[
                        iam.PolicyStatement(
                            actions=[
                                "logs:CreateLogGroup",
                                "logs:CreateLogStream",
                                "logs:DescribeLogGroups",
                                "logs:DescribeLogStreams",
                                "logs:PutLogEvents",
                            ],
                            resources=[log_groups_arn],
                        )
                    ]
                )
            },
        )
        role.apply_removal_policy(RemovalPolicy.RETAIN)
        account = apigw.CfnAccount(self, "Account", cloud_watch_role_arn=role.role_arn)
        account.apply_removal_policy(RemovalPolicy.RETAIN)
        self.rest_api.deployment_stage.node.add_dependency(account)
        acknowledge(
            role,
            wildcard_resource_finding(role, log_groups_arn),
            "The account-wide API Gateway role writes execution logs to groups API Gateway names per "
            "API and stage (API-Gateway-Execution-Logs_{api-id}/{stage}) and access logs to each API's "
            "group, for every API in the account and region; scoped to this account and region.",
        )

    def _acknowledge_auth_rules(self) -> None:
        if self.auth == "iam":
            reason = (
                "Callers are AWS principals authorized by IAM (SigV4, context auth=iam), not end "
                "users with Cognito tokens."
            )
        elif self.auth == "api_key":
            reason = (
                "Callers are identified by API key and usage plan (context auth=api_key); "
                "use auth=iam for IAM-authorized callers."
            )
        else:
            reason = (
                "Context auth=none deliberately leaves this API open (a warning says so at synth); "
                "use auth=iam or auth=api_key for anything reachable by others."
            )
        acknowledge(self.rest_api, "AwsSolutions-COG4", reason)
        acknowledge(
            self.stage,
            "AwsSolutions-APIG3",
            "No WAF web ACL by default: stage throttling (context throttle_rate_limit and "
            "throttle_burst_limit) caps every caller, and with auth=iam or auth=api_key API Gateway "
            "rejects unauthenticated requests before any integration runs. Attach a web ACL to this "
            "stage when the API is public (auth=none).",
        )
        if self.auth != "iam":
            acknowledge(self.rest_api, "AwsSolutions-APIG4", reason)
        if self.auth == "none":
            Annotations.of(self).add_warning_v2(
                "tierserve:apiWithoutAuth",
                "context auth=none: every model in this API can be called by anyone on the internet who "
                "finds its URL (only throttling limits them). Use auth=iam (the default) or auth=api_key.",
            )


def _access_log_format() -> apigw.AccessLogFormat:
    """One JSON object per request. The error message goes in as ``messageString``, which
    API Gateway quotes and escapes itself, so a message with quotes cannot break the line."""
    fields = json.dumps(
        {
            "requestId": "$context.requestId",
            "extendedRequestId": "$context.extendedRequestId",
            "requestTime": "$context.requestTime",
            "ip": "$context.identity.sourceIp",
            "caller": "$context.identity.caller",
            "userArn": "$context.identity.userArn",
            "apiKeyId": "$context.identity.apiKeyId",
            "httpMethod": "$context.httpMethod",
            "resourcePath": "$context.resourcePath",
            "path": "$context.path",
            "protocol": "$context.protocol",
            "status": "$context.status",
            "responseLength": "$context.responseLength",
            "responseLatency": "$context.responseLatency",
            "integrationLatency": "$context.integrationLatency",
            "integrationStatus": "$context.integrationStatus",
            "errorType": "$context.error.responseType",
            "xrayTraceId": "$context.xrayTraceId",
        }
    )
    return apigw.AccessLogFormat.custom(fields[:-1] + ', "errorMessage": $context.error.messageString}')
