"""What the S3 pipeline's worker reads beyond the model settings, once per process."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tierserve.settings import (
    DATA_BUCKET_ENV,
    GPU_ENDPOINTS_ENV,
    MAX_INPUT_MB_ENV,
    MAX_JSONL_MB_ENV,
    MAX_ROWS_ENV,
    MB,
    ROW_BATCH_SIZE_ENV,
    WORKER_CONCURRENCY_ENV,
)

DEFAULT_ROW_BATCH_SIZE = 64
DEFAULT_MAX_INPUT_MB = 64.0
DEFAULT_MAX_ROWS = 100_000
DEFAULT_MAX_JSONL_MB = 256.0
# Records of one SQS batch served at once: the work is mostly waiting on S3.
DEFAULT_WORKER_CONCURRENCY = 8


@dataclass(frozen=True)
class PipelineSettings:
    """What the worker reads beyond :class:`~tierserve.settings.Settings`, once per process."""

    data_bucket: str | None = None
    gpu_endpoints: Mapping[str, str] = field(default_factory=dict)
    row_batch_size: int = DEFAULT_ROW_BATCH_SIZE
    max_input_bytes: int = int(DEFAULT_MAX_INPUT_MB * MB)
    max_rows: int = DEFAULT_MAX_ROWS
    max_jsonl_bytes: int = int(DEFAULT_MAX_JSONL_MB * MB)
    concurrency: int = DEFAULT_WORKER_CONCURRENCY

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> PipelineSettings:
        """Read the ``TIERSERVE_*`` pipeline variables (see ``docs/s3-inference.md``); overrides win."""
        env = os.environ if environ is None else environ
        settings = cls(
            data_bucket=env.get(DATA_BUCKET_ENV) or None,
            gpu_endpoints=parse_endpoints(env.get(GPU_ENDPOINTS_ENV, "")),
            row_batch_size=int(env.get(ROW_BATCH_SIZE_ENV) or DEFAULT_ROW_BATCH_SIZE),
            max_input_bytes=int(float(env.get(MAX_INPUT_MB_ENV) or DEFAULT_MAX_INPUT_MB) * MB),
            max_rows=int(env.get(MAX_ROWS_ENV) or DEFAULT_MAX_ROWS),
            max_jsonl_bytes=int(float(env.get(MAX_JSONL_MB_ENV) or DEFAULT_MAX_JSONL_MB) * MB),
            concurrency=int(env.get(WORKER_CONCURRENCY_ENV) or DEFAULT_WORKER_CONCURRENCY),
        )
        settings = dataclasses.replace(settings, **overrides) if overrides else settings
        if min(settings.row_batch_size, settings.max_rows, settings.concurrency) < 1:
            raise ValueError(
                f"{ROW_BATCH_SIZE_ENV}, {MAX_ROWS_ENV} and {WORKER_CONCURRENCY_ENV} must be positive"
            )
        return settings


def parse_endpoints(text: str) -> dict[str, str]:
    """``"big=big-endpoint,huge=huge-endpoint"`` -> ``{"big": "big-endpoint", ...}``."""
    endpoints = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, endpoint = (s.strip() for s in part.partition("="))
        if not sep or not name or not endpoint:
            raise ValueError(f"{GPU_ENDPOINTS_ENV} entry {part!r} must look like model=endpoint-name")
        endpoints[name] = endpoint
    return endpoints
