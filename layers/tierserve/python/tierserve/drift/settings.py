"""What the scheduled drift function reads, once per process, through the one settings reader."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass

from tierserve.drift.psi import DEFAULT_MIN_ROWS, DRIFT
from tierserve.settings import (
    DATA_BUCKET_ENV,
    DEFAULT_MODEL_PREFIX,
    MODEL_BUCKET,
    MODEL_PREFIX,
    MODELS,
    ModelRef,
    SettingsError,
    Variable,
    bucket,
    number,
    whole,
)

DRIFT_WINDOW_HOURS_ENV = "TIERSERVE_DRIFT_WINDOW_HOURS"
DRIFT_PSI_THRESHOLD_ENV = "TIERSERVE_DRIFT_PSI_THRESHOLD"
DRIFT_MIN_ROWS_ENV = "TIERSERVE_DRIFT_MIN_ROWS"
DEFAULT_WINDOW_HOURS = 24

DATA_BUCKET = bucket(DATA_BUCKET_ENV, unset="nothing to read: the drift function needs the data bucket")
WINDOW_HOURS = whole(DRIFT_WINDOW_HOURS_ENV, high=24 * 31, unset=f"the default, {DEFAULT_WINDOW_HOURS}")
PSI_THRESHOLD = number(DRIFT_PSI_THRESHOLD_ENV, unset=f"the default, {DRIFT:g}")
MIN_ROWS = whole(DRIFT_MIN_ROWS_ENV, unset=f"the default, {DEFAULT_MIN_ROWS}")
VARIABLES: tuple[Variable, ...] = (WINDOW_HOURS, PSI_THRESHOLD, MIN_ROWS)  # the data bucket: the pipeline's


@dataclass(frozen=True)
class DriftSettings:
    """The models to check, where their baselines and capture are, and how to judge them."""

    models: tuple[ModelRef, ...]
    model_bucket: str
    data_bucket: str
    model_prefix: str = DEFAULT_MODEL_PREFIX
    window: dt.timedelta = dt.timedelta(hours=DEFAULT_WINDOW_HOURS)
    threshold: float = DRIFT
    min_rows: int = DEFAULT_MIN_ROWS

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DriftSettings:
        """Raises:
        SettingsError: a bad value, or no model bucket or data bucket."""
        env = os.environ if environ is None else environ
        model_bucket, data_bucket = MODEL_BUCKET.read(env, None), DATA_BUCKET.read(env, None)
        for name, value in ((MODEL_BUCKET.name, model_bucket), (DATA_BUCKET.name, data_bucket)):
            if value is None:
                raise SettingsError(f"{name} is not set; the drift function needs it (the stack sets it)")
        return cls(
            models=MODELS.read(env, ()),
            model_bucket=str(model_bucket),
            data_bucket=str(data_bucket),
            model_prefix=MODEL_PREFIX.read(env, DEFAULT_MODEL_PREFIX),
            window=dt.timedelta(hours=WINDOW_HOURS.read(env, DEFAULT_WINDOW_HOURS)),
            threshold=PSI_THRESHOLD.read(env, DRIFT),
            min_rows=MIN_ROWS.read(env, DEFAULT_MIN_ROWS),
        )
