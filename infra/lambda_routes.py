"""LambdaModelRoutes: every OIP route of one Lambda-tier model, proxied to its function.

``GET /v2/models/{name}`` and ``ANY /v2/models/{name}/{proxy+}`` are Lambda proxy
integrations of the model's function alias (``live``: a published version, SnapStart's or
provisioned concurrency's; never ``$LATEST``), whose integration URI and invoke permissions
name the alias. The function answers ``ready``, ``infer`` and the
``versions/{version}/...`` forms itself (the core's route table), so the handler sees the
path the caller sent. With ``version``, ``versions/{version}`` is a resource of its own (the
jobs routes hang ``jobs`` under it), so everything beside it under ``versions`` is routed to
the function explicitly (``ANY`` on ``versions``, ``versions/{proxy+}``, ``versions/{version}``
and ``versions/{version}/{proxy+}``) rather than left to API Gateway's matching of a partial
static path against the model's ``{proxy+}``. Under the ``*/*`` binary media type every request body reaches the
function base64-encoded (``isBase64Encoded``), byte for byte; the function's base64 body goes
back as bytes, any other body as text.
"""

from __future__ import annotations

from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_lambda as lambda_
from constructs import Construct

from infra.api import InferenceApi


class LambdaModelRoutes(Construct):
    """``/v2/models/{model_name}`` and everything under it, to ``function`` (Lambda proxy): the
    model function's alias, so the integration and its permissions are alias-qualified.

    Attributes: ``model_name``, ``resource`` (``/v2/models/{model_name}``), ``proxy_resource``
    (its ``{proxy+}``), ``version_resource`` (``.../versions/{version}``, None without
    ``version``), ``integration``, ``methods``. Raises ValueError for a model that already has
    routes in ``api``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        api: InferenceApi,
        model_name: str,
        function: lambda_.IFunction,
        version: str | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self.model_name = model_name
        self.integration = apigw.LambdaIntegration(function, proxy=True, allow_test_invoke=False)
        self.resource = api.add_model_resource(model_name)
        self.proxy_resource = self.resource.add_resource("{proxy+}")
        self.methods = [
            api.add_method(self.resource, "GET", self.integration),
            api.add_method(
                self.proxy_resource,
                "ANY",
                self.integration,
                request_parameters={"method.request.path.proxy": True},
            ),
        ]
        self.version_resource: apigw.Resource | None = None
        if version is not None:
            versions = self.resource.add_resource("versions")
            self.version_resource = versions.add_resource(version)
            for parent in (versions, self.version_resource):
                self.methods += [
                    api.add_method(parent, "ANY", self.integration),
                    api.add_method(
                        parent.add_resource("{proxy+}"),
                        "ANY",
                        self.integration,
                        request_parameters={"method.request.path.proxy": True},
                    ),
                ]
