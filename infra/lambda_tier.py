"""The Lambda tier: one container function per small model (a :class:`TierserveFunction`).

One model per function keeps memory sized to the model (``lambda_memory_mb``), scaling and
cold starts independent, and IAM narrowed to that model's artifact. The image, environment,
log group, role, published version and ``live`` alias are
:class:`infra.tierserve_function.TierserveFunction`'s, shared with the S3 worker; this module
adds what is per model: memory, the preload, SnapStart or provisioned concurrency, /tmp and
the disk cache, and the limits the model must fit (:mod:`infra.limits`: an error stops synth,
a warning is printed).

Cold starts: with SnapStart (context ``snapstart``, on by default) each published version runs
its init once, the preload included, and new environments resume from that snapshot (the
session warm, the model never fetched again). Lambda bills SnapStart for Python: the snapshot's
cache for as long as the version is live (per GB-second of its memory, at least three hours)
and each restore (per GB restored); ``snapstart: false`` trades that for an init (and a model
fetch) in every new environment. Provisioned concurrency (``provisioned_concurrency``, per model)
keeps environments initialized instead, billed while they exist; a model has one or the other.
"""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Annotations, Duration
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from infra.config import ConfigError, InfraConfig
from infra.limits import Limit, cache_mb, lambda_model_limits, tmp_mb
from infra.tierserve_function import INFERENCE_HANDLER, TierserveFunction
from tierserve.catalog import Manifest, ManifestError, lambda_memory_mb
from tierserve.settings import PRELOAD_ENV, ModelRef


class LambdaModelFunction(TierserveFunction):
    """One container function serving one model from the model bucket: its default version
    (``manifest``: the unversioned routes, the preload) and ``other_versions`` of it beside
    (reached under ``/versions/{v}``, loaded on first use), all listed in ``TIERSERVE_MODELS``
    with the default first. Memory is the largest version's.

    Attributes: ``function``, ``version``, ``alias`` (what callers invoke), ``role``,
    ``log_group``, ``manifest``, ``manifests`` (every version served, the default first),
    ``model_name``, ``limits`` (the findings of its checks). The stack grants the read of each
    version's objects (``ModelStore.grant_read_model``).

    Raises:
        ConfigError: the model cannot be served as configured (every error, one per line).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        manifest: Manifest,
        config: InfraConfig,
        architecture: lambda_.Architecture,
        model_bucket_name: str,
        model_prefix: str,
        log_retention: logs.RetentionDays,
        other_versions: Sequence[Manifest] = (),
    ) -> None:
        ref = ModelRef(manifest.name, manifest.version)
        manifests = [manifest, *other_versions]
        strays = [f"{m.name}@{m.version}" for m in other_versions if m.name != manifest.name]
        if strays:
            raise ValueError(f"other versions of {manifest.name} must be {manifest.name}'s, not {strays}")
        self.limits: list[Limit] = [limit for m in manifests for limit in lambda_model_limits(m, config)]
        errors = [limit.message for limit in self.limits if limit.error]
        if errors:
            raise ConfigError("\n".join(errors))
        snapstart = config.snapstart_for(manifest.name)
        try:
            memory_mb = max(lambda_memory_mb(m) for m in manifests)
        except ManifestError as error:  # also a limit above; kept for a caller that skips them
            raise ConfigError(str(error)) from None
        served = ", ".join(m.version for m in other_versions)
        super().__init__(
            scope,
            construct_id,
            handler=INFERENCE_HANDLER,
            architecture=architecture,
            models=manifests,
            model_bucket_name=model_bucket_name,
            model_prefix=model_prefix,
            memory_mb=memory_mb,
            timeout=Duration.seconds(config.lambda_timeout_seconds),
            ephemeral_storage_mb=tmp_mb(config, manifest.name),
            cache_max_mb=cache_mb(config, manifest.name),
            fetch_connections=config.fetch_connections,
            log_retention=log_retention,
            log_level=config.log_level,
            # SnapStart snapshots the init: the preload is what makes the snapshot worth taking.
            environment={PRELOAD_ENV: manifest.name} if config.preload or snapstart else None,
            description=f"tierserve Lambda tier: serves model {ref} ({manifest.model.bytes:,} bytes)"
            + (f", and versions {served}" if served else ""),
            role_description=f"tierserve function for model {manifest.name}: logs, traces, reads its model",
            snapstart=snapstart,
            provisioned_concurrency=config.provisioned_concurrency_for(manifest.name),
        )
        self.manifest = manifest
        self.manifests = manifests
        self.model_name = manifest.name
        for limit in self.limits:
            Annotations.of(self).add_warning_v2(f"tierserve:{limit.code}", limit.message)
