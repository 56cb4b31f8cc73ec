"""The Lambda tier: one container function per small model (a :class:`TierserveFunction`).

One model per function keeps memory sized to the model (``lambda_memory_mb``), scaling and
cold starts independent, and IAM narrowed to that model's artifact. The image, environment,
log group and role are :class:`infra.tierserve_function.TierserveFunction`'s, shared with the
S3 worker; this module adds what is per model: memory, the /tmp check and the preload.
"""

from __future__ import annotations

from aws_cdk import Annotations, Duration
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from infra.tierserve_function import INFERENCE_HANDLER, TMP_HEADROOM_MB, TierserveFunction
from tierserve.catalog import MB, Manifest, lambda_memory_mb
from tierserve.settings import PRELOAD_ENV, ModelRef


class LambdaModelFunction(TierserveFunction):
    """One container function serving one model version from the model bucket.

    Attributes: ``function``, ``role``, ``log_group``, ``manifest``, ``model_name``.
    The stack grants the read of the model version's objects (``ModelStore.grant_read_model``).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        manifest: Manifest,
        architecture: lambda_.Architecture,
        model_bucket_name: str,
        model_prefix: str,
        timeout: Duration,
        ephemeral_storage_mb: int,
        log_retention: logs.RetentionDays,
        log_level: str,
        preload: bool,
    ) -> None:
        ref = ModelRef(manifest.name, manifest.version)
        super().__init__(
            scope,
            construct_id,
            handler=INFERENCE_HANDLER,
            architecture=architecture,
            models=[manifest],
            model_bucket_name=model_bucket_name,
            model_prefix=model_prefix,
            memory_mb=lambda_memory_mb(manifest),
            timeout=timeout,
            ephemeral_storage_mb=ephemeral_storage_mb,
            log_retention=log_retention,
            log_level=log_level,
            environment={PRELOAD_ENV: manifest.name} if preload else None,
            description=f"tierserve Lambda tier: serves model {ref} ({manifest.model.bytes:,} bytes)",
            role_description=f"tierserve function for model {manifest.name}: logs, traces, reads its model",
        )
        self.manifest = manifest
        self.model_name = manifest.name
        if manifest.model.bytes > self.cache_max_mb * MB:
            Annotations.of(self).add_warning_v2(
                "tierserve:modelLargerThanTmp",
                f"model {ref} decompresses to {manifest.model.bytes / MB:.0f} MB, more than the "
                f"{self.cache_max_mb} MB its function can cache in /tmp (lambda_ephemeral_storage_mb "
                f"less {TMP_HEADROOM_MB} MB); raise lambda_ephemeral_storage_mb",
            )
