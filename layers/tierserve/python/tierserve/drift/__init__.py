"""Drift: each input's baseline at packaging, a window of captured requests, and their PSI.

    baseline = build_baseline("iris", "1", manifest.inputs, rows, source="rows.npz")   # packaging
    report = check_model(s3, ModelRef("iris", "1"), model_bucket=..., data_bucket=...)  # the job
    print(report.table()); write_report(s3, data_bucket, report); emit_metrics(report)

``baseline.py`` the bins and the file beside the manifest; ``psi.py`` the statistic and its
verdicts; ``window.py`` reading capture back; ``report.py`` the JSON, the table and the PNG;
``job.py`` one run. Capture itself (on the serving side) is :mod:`tierserve.capture`.
"""

from tierserve.drift.baseline import (
    BASELINE_NAME,
    Baseline,
    BaselineError,
    build_baseline,
    read_baseline_rows,
)
from tierserve.drift.job import (
    DRIFT_FEATURES_OVER,
    DRIFT_MAX_PSI,
    DRIFT_NOT_CHECKED,
    DRIFT_ROWS,
    DriftError,
    check_model,
    emit_metrics,
    emit_not_checked,
    load_baseline,
    write_report,
)
from tierserve.drift.psi import DRIFT, MODERATE, psi
from tierserve.drift.report import DRIFT_PREFIX, DriftReport, render_png

__all__ = [
    "BASELINE_NAME",
    "DRIFT",
    "DRIFT_FEATURES_OVER",
    "DRIFT_MAX_PSI",
    "DRIFT_NOT_CHECKED",
    "DRIFT_PREFIX",
    "DRIFT_ROWS",
    "MODERATE",
    "Baseline",
    "BaselineError",
    "DriftError",
    "DriftReport",
    "build_baseline",
    "check_model",
    "emit_metrics",
    "emit_not_checked",
    "load_baseline",
    "psi",
    "read_baseline_rows",
    "render_png",
    "write_report",
]
