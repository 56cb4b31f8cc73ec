"""Every environment variable tierserve reads, and the settings object built from them.

Config flows one way: ``cdk.json`` context -> ``app.py`` -> construct parameters ->
function environment -> one :class:`Settings` per process, read once. An explicit
argument wins over the environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

MODEL_BUCKET_ENV = "TIERSERVE_MODEL_BUCKET"
MODEL_PREFIX_ENV = "TIERSERVE_MODEL_PREFIX"
MODEL_ROOT_ENV = "TIERSERVE_MODEL_ROOT"
MODELS_ENV = "TIERSERVE_MODELS"
PRELOAD_ENV = "TIERSERVE_PRELOAD"
MEMORY_BUDGET_ENV = "TIERSERVE_MEMORY_BUDGET_MB"
THREADS_ENV = "TIERSERVE_THREADS"
CACHE_DIR_ENV = "TIERSERVE_CACHE_DIR"
CACHE_MAX_MB_ENV = "TIERSERVE_CACHE_MAX_MB"
MAX_REQUEST_MB_ENV = "TIERSERVE_MAX_REQUEST_MB"
MAX_RESPONSE_MB_ENV = "TIERSERVE_MAX_RESPONSE_MB"
LAMBDA_MEMORY_ENV = "AWS_LAMBDA_FUNCTION_MEMORY_SIZE"
# The S3-triggered pipeline (tierserve/pipeline.py, read by its PipelineSettings).
DATA_BUCKET_ENV = "TIERSERVE_DATA_BUCKET"
GPU_ENDPOINTS_ENV = "TIERSERVE_GPU_ENDPOINTS"
ROW_BATCH_SIZE_ENV = "TIERSERVE_ROW_BATCH_SIZE"
MAX_INPUT_MB_ENV = "TIERSERVE_MAX_INPUT_MB"
MAX_ROWS_ENV = "TIERSERVE_MAX_ROWS"
MAX_JSONL_MB_ENV = "TIERSERVE_MAX_JSONL_MB"
WORKER_CONCURRENCY_ENV = "TIERSERVE_WORKER_CONCURRENCY"
# The GPU server (functions/gpu_server, read by tierserve.sagemaker_hosting.ServerSettings).
PORT_ENV = "SAGEMAKER_BIND_TO_PORT"
MODEL_DIR_ENV = "TIERSERVE_MODEL_DIR"
MAX_BATCH_SIZE_ENV = "TIERSERVE_MAX_BATCH_SIZE"
MAX_QUEUE_DELAY_MS_ENV = "TIERSERVE_MAX_QUEUE_DELAY_MS"
MAX_QUEUE_SIZE_ENV = "TIERSERVE_MAX_QUEUE_SIZE"
RUN_TIMEOUT_S_ENV = "TIERSERVE_RUN_TIMEOUT_S"
PROVIDERS_ENV = "TIERSERVE_PROVIDERS"
TRT_FP16_ENV = "TIERSERVE_TRT_FP16"
TRT_CACHE_DIR_ENV = "TIERSERVE_TRT_CACHE_DIR"
IO_BINDING_ENV = "TIERSERVE_IO_BINDING"
DRAIN_TIMEOUT_S_ENV = "TIERSERVE_DRAIN_TIMEOUT_S"

MB = 1024 * 1024
LAMBDA_MB_PER_VCPU = 1769
DEFAULT_FUNCTION_MEMORY_MB = 2048
DEFAULT_MODEL_PREFIX = "models"
DEFAULT_CACHE_DIR = "/tmp/tierserve"
DEFAULT_CACHE_MAX_MB = 1024
DEFAULT_MAX_REQUEST_MB = 6.0
# Lambda's synchronous response limit; API Gateway turns a larger one into a bare 502.
DEFAULT_MAX_RESPONSE_MB = 6.0
# What a function keeps for the runtime, numpy and request buffers, beyond the models.
RESERVED_MEMORY_MB = 384


@dataclass(frozen=True)
class ModelRef:
    """A model a process is configured to serve: ``name`` and its deployed ``version``."""

    name: str
    version: str

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Parse ``name@version``, e.g. ``ModelRef.parse("iris@3")``."""
        name, sep, version = text.strip().partition("@")
        if not sep or not name or not version:
            raise ValueError(f"model reference {text!r} must look like name@version, e.g. iris@1")
        return cls(name, version)

    @staticmethod
    def join(refs: Iterable[ModelRef]) -> str:
        """The ``TIERSERVE_MODELS`` value naming ``refs``: ``name@version,...``, which
        :meth:`Settings.from_env` reads back with :meth:`parse`, e.g. ``"iris@3,resnet@1"``."""
        return ",".join(str(ref) for ref in refs)

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Settings:
    """What one process needs to serve models, read once from the environment."""

    model_bucket: str | None = None
    model_root: str | None = None
    model_prefix: str = DEFAULT_MODEL_PREFIX
    models: tuple[ModelRef, ...] = ()
    preload: tuple[str, ...] = ()
    function_memory_mb: int = DEFAULT_FUNCTION_MEMORY_MB
    memory_budget_mb: int = DEFAULT_FUNCTION_MEMORY_MB - RESERVED_MEMORY_MB
    threads: int = 1
    cache_dir: Path = field(default_factory=lambda: Path(DEFAULT_CACHE_DIR))
    cache_max_mb: int = DEFAULT_CACHE_MAX_MB
    max_request_bytes: int = int(DEFAULT_MAX_REQUEST_MB * MB)
    max_response_bytes: int = int(DEFAULT_MAX_RESPONSE_MB * MB)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``); keyword overrides win."""
        env = os.environ if environ is None else environ
        memory_mb = int(env.get(LAMBDA_MEMORY_ENV) or DEFAULT_FUNCTION_MEMORY_MB)
        settings = cls(
            model_bucket=env.get(MODEL_BUCKET_ENV) or None,
            model_root=env.get(MODEL_ROOT_ENV) or None,
            model_prefix=(env.get(MODEL_PREFIX_ENV) or DEFAULT_MODEL_PREFIX).strip("/"),
            models=tuple(ModelRef.parse(t) for t in _split(env.get(MODELS_ENV, ""))),
            preload=tuple(_split(env.get(PRELOAD_ENV, ""))),
            function_memory_mb=memory_mb,
            memory_budget_mb=int(env.get(MEMORY_BUDGET_ENV) or max(memory_mb - RESERVED_MEMORY_MB, 128)),
            threads=int(env.get(THREADS_ENV) or threads_for_memory(memory_mb)),
            cache_dir=Path(env.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR),
            cache_max_mb=int(env.get(CACHE_MAX_MB_ENV) or DEFAULT_CACHE_MAX_MB),
            max_request_bytes=int(float(env.get(MAX_REQUEST_MB_ENV) or DEFAULT_MAX_REQUEST_MB) * MB),
            max_response_bytes=int(float(env.get(MAX_RESPONSE_MB_ENV) or DEFAULT_MAX_RESPONSE_MB) * MB),
        )
        return replace(settings, **overrides) if overrides else settings

    def model_ref(self, name: str) -> ModelRef | None:
        """The configured reference for ``name``, or None when this process does not serve it."""
        return next((ref for ref in self.models if ref.name == name), None)

    def should_preload(self, name: str) -> bool:
        return "*" in self.preload or name in self.preload


def threads_for_memory(memory_mb: int) -> int:
    """Lambda gives one vCPU per 1,769 MB; the host's core count says nothing about that."""
    return max(1, min(6, memory_mb // LAMBDA_MB_PER_VCPU))


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# The S3 pipeline's key layout: inputs/{model}/{path} -> outputs/ or errors/ (never under inputs/).
INPUT_PREFIX = "inputs"
OUTPUT_PREFIX = "outputs"
ERROR_PREFIX = "errors"

# Dynamic batching defaults of the GPU server; cdk.json's gpu_max_* context starts from these.
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_QUEUE_DELAY_MS = 5.0
