"""Lambda handler: the scheduled drift check (an EventBridge rule invokes it).

A thin adapter: for each model its ``TIERSERVE_MODELS`` names, the last window of captured
requests against the baseline beside the manifest (``tierserve.drift``), a report and a plot
in the data bucket under ``drift-reports/``, and the ``DriftMaxPSI`` metric (model dimension)
that the stack alarms on. One model that cannot be checked (no baseline, nothing captured)
is logged and reported in the answer; the others still run.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from tierserve import aws
from tierserve.drift import DriftError, check_model, emit_metrics, emit_not_checked, write_report
from tierserve.drift.settings import DriftSettings
from tierserve.settings import exit_on_bad_settings
from tierserve.telemetry import logger, tracer

with exit_on_bad_settings():  # a bad variable is one line in the init log, not a traceback
    settings = DriftSettings.from_env()


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    s3 = aws.client("s3")
    results: dict[str, Any] = {}
    for ref in settings.models:
        try:
            report = check_model(
                s3,
                ref,
                model_bucket=settings.model_bucket,
                data_bucket=settings.data_bucket,
                model_prefix=settings.model_prefix,
                window=settings.window,
                threshold=settings.threshold,
                min_rows=settings.min_rows,
            )
            report_key, plot_key = write_report(s3, settings.data_bucket, report)
        except DriftError as error:
            logger.warning("drift: model not checked", extra={"model": str(ref), "reason": str(error)})
            emit_not_checked(ref)
            results[str(ref)] = {"error": str(error)}
            continue
        emit_metrics(report)
        logger.info(
            "drift checked",
            extra={
                "model": str(ref),
                "verdict": report.verdict,
                "max_psi": report.max_psi,
                "report": report_key,
            },
        )
        results[str(ref)] = {
            "verdict": report.verdict,
            "max_psi": report.max_psi,
            "report": report_key,
            "plot": plot_key,
        }
    return {"models": results}
