"""Lambda handler: every Open Inference Protocol route for the model(s) this function serves.

A thin adapter: powertools decorators for logs (with the request id), metrics (cold
start) and traces; the route table, the data plane and the Lambda transport live in the
tierserve core.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from tierserve.dataplane import DataPlane
from tierserve.lambda_proxy import build_resolver
from tierserve.registry import ModelRegistry
from tierserve.settings import Settings, exit_on_bad_settings
from tierserve.telemetry import log_metrics, logger, tracer

with exit_on_bad_settings():  # a bad variable is one line in the init log, not a traceback
    registry = ModelRegistry(Settings.from_env())
app = build_resolver(DataPlane(registry))
registry.preload()


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST)
@tracer.capture_lambda_handler(capture_response=False)
@log_metrics(models=registry.settings.models)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
