"""Lambda handler: the async jobs routes of every model, both tiers (``POST .../jobs``,
``GET .../jobs/{id}``).

A thin adapter: powertools decorators for logs (with the request id), metrics (cold start)
and traces; the jobs service (:mod:`tierserve.jobs`) writes each job into the data bucket,
where the S3 pipeline's worker serves it, and reads its status back. It loads no model.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from tierserve.jobs import JOB_ROUTES, JOBS_HELP, Jobs
from tierserve.lambda_proxy import build_route_resolver, sent_size
from tierserve.settings import exit_on_bad_settings
from tierserve.telemetry import logger, metrics, tracer

with exit_on_bad_settings():  # a bad variable is one line in the init log, not a traceback
    jobs = Jobs.from_env(measure=sent_size)
app = build_route_resolver(JOB_ROUTES, jobs, jobs.settings.models.max_response_bytes, help=JOBS_HELP)


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
