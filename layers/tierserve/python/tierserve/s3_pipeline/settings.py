"""What the S3 pipeline's worker reads beyond the model settings, once per process, through
the one settings reader (:mod:`tierserve.settings`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tierserve.settings import (
    COLD_RETRY_S_ENV,
    DATA_BUCKET_ENV,
    GPU_ENDPOINTS,
    MAX_INPUT_MB_ENV,
    MAX_JSONL_MB_ENV,
    MAX_ROWS_ENV,
    MB,
    ROW_BATCH_SIZE_ENV,
    WORKER_CONCURRENCY_ENV,
    GpuTarget,
    Variable,
    bucket,
    number,
    whole,
)

DEFAULT_ROW_BATCH_SIZE = 64
DEFAULT_MAX_INPUT_MB = 64.0
DEFAULT_MAX_ROWS = 100_000
DEFAULT_MAX_JSONL_MB = 256.0
# Records of one SQS batch served at once: the work is mostly waiting on S3.
DEFAULT_WORKER_CONCURRENCY = 8
MAX_WORKER_CONCURRENCY = 64
DEFAULT_COLD_RETRY_S = 60.0


DATA_BUCKET = bucket(DATA_BUCKET_ENV, unset="writing each result beside its input (the event's bucket)")
ROW_BATCH_SIZE = whole(ROW_BATCH_SIZE_ENV, unset=f"the default, {DEFAULT_ROW_BATCH_SIZE}")
MAX_INPUT_MB = number(MAX_INPUT_MB_ENV, unit="MB", unset=f"the default, {DEFAULT_MAX_INPUT_MB:g}")
MAX_ROWS = whole(MAX_ROWS_ENV, unset=f"the default, {DEFAULT_MAX_ROWS:,}")
MAX_JSONL_MB = number(MAX_JSONL_MB_ENV, unit="MB", unset=f"the default, {DEFAULT_MAX_JSONL_MB:g}")
COLD_RETRY_S = number(
    COLD_RETRY_S_ENV,
    unit="s",
    zero=True,
    unset="the default, 60 (doubling per cold delivery, at most 300)",
)
WORKER_CONCURRENCY = whole(
    WORKER_CONCURRENCY_ENV, high=MAX_WORKER_CONCURRENCY, unset=f"the default, {DEFAULT_WORKER_CONCURRENCY}"
)
VARIABLES: tuple[Variable, ...] = (
    DATA_BUCKET,
    GPU_ENDPOINTS,
    ROW_BATCH_SIZE,
    MAX_INPUT_MB,
    MAX_ROWS,
    MAX_JSONL_MB,
    WORKER_CONCURRENCY,
    COLD_RETRY_S,
)


@dataclass(frozen=True)
class PipelineSettings:
    """What the worker reads beyond :class:`~tierserve.settings.Settings`, once per process."""

    data_bucket: str | None = None
    # GPU-tier models and where they answer (tierserve.settings.GPU_ENDPOINTS)
    gpu_endpoints: Mapping[str, GpuTarget] = field(default_factory=dict)
    row_batch_size: int = DEFAULT_ROW_BATCH_SIZE
    max_input_bytes: int = int(DEFAULT_MAX_INPUT_MB * MB)
    max_rows: int = DEFAULT_MAX_ROWS
    max_jsonl_bytes: int = int(DEFAULT_MAX_JSONL_MB * MB)
    concurrency: int = DEFAULT_WORKER_CONCURRENCY
    # the first wait of an input whose GPU-tier model has no copy running (s3_pipeline/cold.py)
    cold_retry_s: float = DEFAULT_COLD_RETRY_S

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> PipelineSettings:
        """Read the ``TIERSERVE_*`` pipeline variables (see ``docs/s3-inference.md``); overrides win.

        Raises:
            SettingsError: a variable of :data:`VARIABLES` holds a value it cannot have.
        """
        env = os.environ if environ is None else environ
        settings = cls(
            data_bucket=DATA_BUCKET.read(env, None),
            gpu_endpoints=GPU_ENDPOINTS.read(env, {}),
            row_batch_size=ROW_BATCH_SIZE.read(env, DEFAULT_ROW_BATCH_SIZE),
            max_input_bytes=int(MAX_INPUT_MB.read(env, DEFAULT_MAX_INPUT_MB) * MB),
            max_rows=MAX_ROWS.read(env, DEFAULT_MAX_ROWS),
            max_jsonl_bytes=int(MAX_JSONL_MB.read(env, DEFAULT_MAX_JSONL_MB) * MB),
            concurrency=WORKER_CONCURRENCY.read(env, DEFAULT_WORKER_CONCURRENCY),
            cold_retry_s=COLD_RETRY_S.read(env, DEFAULT_COLD_RETRY_S),
        )
        return dataclasses.replace(settings, **overrides) if overrides else settings
