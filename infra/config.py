"""The CDK app's settings: ``cdk.json`` context validated once into :class:`InfraConfig`.

The reader lives in :mod:`tierserve.tools.cdk_context`, so that ``tierserve local`` and the
packaging tools read ``cdk.json`` through the same validated parsing as ``cdk synth``; this
module is its name inside the CDK app.
"""

from __future__ import annotations

from tierserve.tools.cdk_context import (
    API_GATEWAY_TIMEOUT_SECONDS,
    ARCHITECTURES,
    AUTH_MODES,
    GPU_MAX_INSTANCES,
    LAMBDA_MAX_TIMEOUT_SECONDS,
    LOG_LEVELS,
    LOG_RETENTION_DAYS,
    SQS_MAX_BATCH_WITHOUT_WINDOW,
    Architecture,
    AuthMode,
    ConfigError,
    InfraConfig,
    gpu_instance_overrides,
)

__all__ = [
    "API_GATEWAY_TIMEOUT_SECONDS",
    "ARCHITECTURES",
    "AUTH_MODES",
    "GPU_MAX_INSTANCES",
    "LAMBDA_MAX_TIMEOUT_SECONDS",
    "LOG_LEVELS",
    "LOG_RETENTION_DAYS",
    "SQS_MAX_BATCH_WITHOUT_WINDOW",
    "Architecture",
    "AuthMode",
    "ConfigError",
    "InfraConfig",
    "gpu_instance_overrides",
]
