"""Lambda handler: every Open Inference Protocol route for the model(s) this function serves.

A thin adapter: powertools decorators for logs (with the request id), metrics (cold
start) and traces; the route table, the data plane and the Lambda transport live in the
tierserve core. The init preloads the model (with SnapStart, once per published version)
and registers the SnapStart hooks (``tierserve.snapstart``).
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from tierserve import aws
from tierserve.capture import Capture
from tierserve.dataplane import DataPlane
from tierserve.lambda_proxy import build_resolver
from tierserve.registry import ModelRegistry
from tierserve.settings import Settings, exit_on_bad_settings
from tierserve.snapstart import register_hooks
from tierserve.telemetry import log_metrics, logger, tracer

with exit_on_bad_settings():  # a bad variable is one line in the init log, not a traceback
    registry = ModelRegistry(Settings.from_env())
    capture = Capture.from_env()  # None unless TIERSERVE_CAPTURE names a model
app = build_resolver(DataPlane(registry, capture=capture))
registry.preload()  # with SnapStart, the snapshot holds the warm session
# Before the snapshot: close connections; after a restore: new clients, new seeds, a restore
# counted about the function's default model version.
register_hooks(registry.settings.models[0] if registry.settings.models else None)


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST)
@tracer.capture_lambda_handler(capture_response=False)
@log_metrics(models=registry.settings.models)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    try:
        # A cold load (and every S3 call) must end in time to answer: the invocation's remaining time.
        with aws.within(aws.Deadline.for_invocation(context, aws.RESPONSE_MARGIN_S)):
            return app.resolve(event, context)
    finally:
        if capture is not None:
            capture.end_invocation()  # wakes the writer when a batch is due; never waits
