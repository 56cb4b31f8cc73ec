"""One drift run: a model version's baseline against its last window of capture.

    report = check_model(s3, ref, model_bucket="models-b", data_bucket="data-b", window=timedelta(hours=24))
    write_report(s3, "data-b", report)      # drift-reports/{model}/{version}/{time}/report.json, psi.png
    emit_metrics(report)                    # DriftMaxPSI, DriftFeaturesOver, DriftRows (EMF, model dimension)

The scheduled function (``functions/inference/drift.py``) runs it for every model its
``TIERSERVE_MODELS`` names; ``tierserve drift MODEL`` runs it from a terminal (the local stack's
embedded S3 or a deployed bucket). The baseline is read from beside the manifest and checked
against the digest the manifest records for it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

from tierserve import aws
from tierserve.catalog import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, ManifestError
from tierserve.drift.baseline import (
    BASELINE_NAME,
    MAX_BASELINE_BYTES,
    Baseline,
    BaselineError,
    feature_columns,
)
from tierserve.drift.psi import DEFAULT_MIN_ROWS, DRIFT, DRIFTED, compare
from tierserve.drift.report import DriftReport, render_png
from tierserve.drift.window import Progress, read_window
from tierserve.settings import DEFAULT_MODEL_PREFIX, ModelRef

DRIFT_MAX_PSI = "DriftMaxPSI"
DRIFT_FEATURES_OVER = "DriftFeaturesOver"
DRIFT_ROWS = "DriftRows"
DRIFT_NOT_CHECKED = "DriftNotChecked"  # a run that could not compare (no baseline, S3 refused)
DEFAULT_WINDOW = dt.timedelta(hours=24)


class DriftError(RuntimeError):
    """A drift run that cannot compare; the message names what to fix."""


def _get(s3: Any, bucket: str, key: str, limit: int, what: str, fix: str) -> bytes:
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read(limit + 1)
    except Exception as error:
        failure = aws.classify(error)
        if failure.kind == "gone":
            raise DriftError(f"s3://{bucket}/{key} does not exist: {fix}") from None
        if failure.kind == "denied":
            raise DriftError(
                f"s3://{bucket}/{key} cannot be read (access denied): give this role s3:GetObject on it"
            ) from None
        raise DriftError(
            f"s3://{bucket}/{key} could not be read ({failure.code or failure.kind}): try again"
        ) from None
    if len(body) > limit:
        raise DriftError(f"{what} s3://{bucket}/{key} is over {limit:,} bytes: package the model again")
    return body


def load_baseline(s3: Any, bucket: str, ref: ModelRef, prefix: str = DEFAULT_MODEL_PREFIX) -> Baseline:
    """The baseline beside ``ref``'s manifest, verified against the manifest's digest of it.

    Raises:
        DriftError: no manifest, no baseline, a digest that does not match, or a bad file.
    """
    folder = f"{prefix.strip('/')}/{ref.name}/{ref.version}".lstrip("/")
    text = _get(
        s3,
        bucket,
        f"{folder}/{MANIFEST_NAME}",
        MAX_MANIFEST_BYTES,
        "the manifest",
        f"upload {ref} (tierserve upload)",
    )
    try:
        manifest = Manifest.from_json(text)
    except ManifestError as error:
        raise DriftError(f"s3://{bucket}/{folder}/{MANIFEST_NAME} is not a valid manifest: {error}") from None
    digest = manifest.extra.get("baseline")
    if not isinstance(digest, dict):
        raise DriftError(
            f"{ref} was packaged without a baseline: package it again with --inputs FILE or --baseline FILE "
            "(real inputs), then upload it as a new version"
        )
    data = _get(
        s3,
        bucket,
        f"{folder}/{BASELINE_NAME}",
        MAX_BASELINE_BYTES,
        "the baseline",
        "upload the package again (tierserve upload)",
    )
    if hashlib.sha256(data).hexdigest() != digest.get("sha256") or len(data) != digest.get("bytes"):
        raise DriftError(
            f"s3://{bucket}/{folder}/{BASELINE_NAME} does not match the digest its manifest records: "
            "upload the package again (tierserve upload)"
        )
    try:
        baseline = Baseline.from_json(data, what=f"s3://{bucket}/{folder}/{BASELINE_NAME}")
    except BaselineError as error:
        raise DriftError(str(error)) from None
    if (baseline.model, baseline.version) != (ref.name, ref.version):
        raise DriftError(
            f"the baseline of {ref} says it is {baseline.model}@{baseline.version}: package it again"
        )
    return baseline


def check_model(
    s3: Any,
    ref: ModelRef,
    *,
    model_bucket: str,
    data_bucket: str,
    model_prefix: str = DEFAULT_MODEL_PREFIX,
    window: dt.timedelta = DEFAULT_WINDOW,
    until: dt.datetime | None = None,
    threshold: float = DRIFT,
    min_rows: int = DEFAULT_MIN_ROWS,
    progress: Progress | None = None,
) -> DriftReport:
    """Compare ``ref``'s capture of the last ``window`` (up to ``until``, default now) with its baseline."""
    baseline = load_baseline(s3, model_bucket, ref, model_prefix)
    until = until or dt.datetime.now(dt.UTC)
    since = until - window
    inputs = sorted({f.input for f in baseline.features})
    try:
        captured = read_window(s3, data_bucket, ref, inputs, since=since, until=until, progress=progress)
    except Exception as error:
        raise _read_error(error, data_bucket, ref) from None
    features = compare(
        baseline, feature_columns(inputs, captured.arrays), threshold=threshold, min_rows=min_rows
    )
    notes = []
    if captured.requests == 0:
        notes.append(
            f"nothing captured for {ref} in this window: turn capture on for it (context capture, "
            "TIERSERVE_CAPTURE) or widen --window"
        )
    elif captured.rows < min_rows:
        notes.append(
            f"{captured.rows} rows is under the {min_rows} a verdict needs: widen the window or raise the rate"
        )
    if captured.truncated:
        notes.append("the window held more than one run reads; its newest requests were compared")
    if captured.skipped_lines:
        notes.append(
            f"{captured.skipped_lines} captured lines were not requests of this model and were skipped"
        )
    return DriftReport(
        ref=ref,
        since=since,
        until=until,
        threshold=threshold,
        requests=captured.requests,
        rows=captured.rows,
        features=tuple(features),
        baseline_rows=baseline.rows,
        notes=tuple(notes),
    )


def _read_error(error: BaseException, bucket: str, ref: ModelRef) -> DriftError:
    failure = aws.classify(error)
    where = f"s3://{bucket}/capture/{ref.name}/{ref.version}/"
    if failure.kind == "gone":
        return DriftError(
            f"the data bucket {bucket} does not exist: give the deployed data bucket (--bucket)"
        )
    if failure.kind == "denied":
        return DriftError(
            f"{where} cannot be listed or read (access denied): give this role s3:ListBucket and s3:GetObject there"
        )
    return DriftError(f"reading {where} failed ({failure.code or failure.kind}): check the network and retry")


def write_report(s3: Any, bucket: str, report: DriftReport) -> tuple[str, str]:
    """Put the report's JSON and PNG in ``bucket``; returns their keys."""
    report_key, plot_key = report.keys()
    s3.put_object(
        Bucket=bucket, Key=report_key, Body=report.to_json().encode(), ContentType="application/json"
    )
    s3.put_object(Bucket=bucket, Key=plot_key, Body=render_png(report), ContentType="image/png")
    return report_key, plot_key


def _model_metrics(ref: ModelRef) -> Any:
    from aws_lambda_powertools.metrics import EphemeralMetrics

    from tierserve.telemetry import NAMESPACE, SERVICE

    metrics = EphemeralMetrics(namespace=NAMESPACE, service=SERVICE)
    metrics.add_dimension(name="model", value=ref.name)
    metrics.add_dimension(name="version", value=ref.version)
    return metrics


def emit_not_checked(ref: ModelRef) -> None:
    """``DriftNotChecked`` = 1 for ``ref``: the run could not compare (the alarm on
    ``DriftMaxPSI`` sees no data then, so this is what says the job is blind)."""
    from aws_lambda_powertools.metrics import MetricUnit

    metrics = _model_metrics(ref)
    metrics.add_metric(name=DRIFT_NOT_CHECKED, unit=MetricUnit.Count, value=1)
    metrics.flush_metrics()


def emit_metrics(report: DriftReport) -> None:
    """One EMF document per model: ``DriftMaxPSI`` (when a feature was judged), ``DriftFeaturesOver``
    and ``DriftRows``, with ``model`` and ``version`` dimensions (namespace ``Tierserve``)."""
    from aws_lambda_powertools.metrics import MetricUnit

    metrics = _model_metrics(report.ref)
    if report.max_psi is not None:
        metrics.add_metric(name=DRIFT_MAX_PSI, unit=MetricUnit.NoUnit, value=round(report.max_psi, 6))
    metrics.add_metric(
        name=DRIFT_FEATURES_OVER,
        unit=MetricUnit.Count,
        value=sum(f.verdict == DRIFTED for f in report.features),
    )
    metrics.add_metric(name=DRIFT_ROWS, unit=MetricUnit.Count, value=report.rows)
    metrics.flush_metrics()
