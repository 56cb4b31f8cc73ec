"""The stacks, composed from the constructs, and the grants between them.

``TierserveStorage`` holds the model and data buckets and deploys first, so ops can upload
models before anything serves them; both buckets are retained. ``TierserveServing`` holds a
function per Lambda-tier model, a SageMaker endpoint per GPU instance type with every
GPU-tier model on it as an inference component, the API shell and each model's routes; it
imports the model bucket by its export and reads only each model's own manifest and artifact.
``TierservePipeline`` and ``TierserveBatch`` (only when the catalog has models) and
``TierserveStream`` (only when context ``stream`` names a catalog model) live in
:mod:`infra.data_stacks`; they deploy after the serving stack, whose GPU endpoints they call.
"""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Annotations, App, CfnOutput, Duration, Stack
from constructs import Construct

from infra.api import InferenceApi, KeyLimits
from infra.cdk_values import ARCHITECTURES, RETENTION, TAGS
from infra.config import API_GATEWAY_TIMEOUT_SECONDS, ConfigError, InfraConfig, gpu_instance_overrides
from infra.data_stacks import BatchStack, PipelineStack, StreamStack, stream_model
from infra.drift import add_capture
from infra.gpu_instances import INSTANCE_SPECS, ComputeRequirements, check_fits, needs_volume_key
from infra.jobs import AsyncJobs
from infra.lambda_routes import LambdaModelRoutes
from infra.lambda_tier import LambdaModelFunction
from infra.limits import image_limits, lambda_model_limits, model_key_limits
from infra.model_store import ModelStore
from infra.monitoring import AlarmPolicy, GpuModel, LambdaModel, Monitoring
from infra.rollout import LambdaRollouts, gpu_rolling_update, strategy
from infra.s3_pipeline import DEFAULT_JOBS_EXPIRY_DAYS, DataStore
from infra.sagemaker_inference import (
    CopyScaling,
    GpuEndpoint,
    GpuModelComponent,
    InstanceScaling,
    gpu_server_image,
    gpu_volume_key,
    instance_slug,
)
from infra.sagemaker_routes import ColdStart, SageMakerModelRoutes
from tierserve.catalog import Catalog, CatalogEntry, tier_for
from tierserve.settings import GpuTarget

STORAGE_STACK = "TierserveStorage"
SERVING_STACK = "TierserveServing"
PIPELINE_STACK = "TierservePipeline"
BATCH_STACK = "TierserveBatch"
STREAM_STACK = "TierserveStream"


class StorageStack(Stack):
    """The model bucket, the data bucket, and their access-log bucket.

    Attributes: ``model_store``, ``data_store``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        jobs_expiry_days: int = DEFAULT_JOBS_EXPIRY_DAYS,
        **kwargs: object,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            description="tierserve: model artifacts and pipeline data (S3)",
            tags=TAGS,
            **kwargs,
        )
        self.model_store = ModelStore(self, "ModelStore")
        self.data_store = DataStore(
            self,
            "DataStore",
            access_log_bucket=self.model_store.access_log_bucket,
            jobs_expiry_days=jobs_expiry_days,
        )
        CfnOutput(
            self,
            "ModelBucketName",
            value=self.model_store.bucket.bucket_name,
            description=f"Upload models to s3://<bucket>/{self.model_store.model_prefix}/<name>/<version>/",
        )
        CfnOutput(
            self,
            "DataBucketName",
            value=self.data_store.bucket.bucket_name,
            description="Put inputs under s3://<bucket>/inputs/<model>/; results appear under outputs/ and errors/",
        )


class ServingStack(Stack):
    """A function per Lambda-tier model, an endpoint per GPU instance type hosting the GPU-tier
    models as inference components, the API shell, and each model's routes in it.

    Attributes: ``api``, ``lambda_models`` (model name -> :class:`LambdaModelFunction`),
    ``gpu_endpoints`` (instance type -> :class:`GpuEndpoint`), ``gpu_models`` (model name ->
    :class:`GpuModelComponent`), ``routes`` (model name -> :class:`LambdaModelRoutes` or
    :class:`SageMakerModelRoutes`), ``jobs`` (:class:`AsyncJobs`: every model's jobs routes and
    their function; None without ``data_store`` or models), ``monitoring``
    (:class:`~infra.monitoring.Monitoring`: the dashboard, every model's alarms, and
    ``monitoring.topic``, where every alarm of the app publishes), ``rollouts``
    (:class:`~infra.rollout.LambdaRollouts`: a CodeDeploy deployment group per Lambda-tier model).

    Raises:
        ConfigError: a GPU-tier model cannot fit its instance type, or ``gpu_instance_types``
            names a model that is not on the GPU tier.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: InfraConfig,
        catalog: Catalog,
        model_store: ModelStore,
        data_store: DataStore | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            description="tierserve: inference API, functions and GPU endpoints",
            tags=TAGS,
            **kwargs,
        )
        self.api = InferenceApi(
            self,
            "Api",
            auth=config.auth,
            throttle_rate_limit=config.throttle_rate_limit,
            throttle_burst_limit=config.throttle_burst_limit,
            log_retention=RETENTION[config.log_retention_days],
            manage_cloudwatch_role=config.api_cloudwatch_role,
            key_limits=key_limits(config),
            waf_rate_limit=config.waf_rate_limit if config.waf else None,
        )
        self.lambda_models: dict[str, LambdaModelFunction] = {}
        self.gpu_endpoints: dict[str, GpuEndpoint] = {}
        self.gpu_models: dict[str, GpuModelComponent] = {}
        self.routes: dict[str, LambdaModelRoutes | SageMakerModelRoutes] = {}
        self._add_lambda_models(config, catalog, model_store)
        self._add_gpu_models(config, catalog, model_store)
        self.jobs: AsyncJobs | None = None
        if data_store is not None and catalog.entries:
            self.jobs = self._add_jobs(config, catalog, model_store, data_store)
        self.monitoring = self._monitor(config, pipeline_stack=PIPELINE_STACK if catalog.entries else None)
        self.rollouts = self._roll_out(config)
        self._warn(config)

        CfnOutput(
            self, "ApiUrl", value=self.api.url, description="Open Inference Protocol base URL (append v2/...)"
        )
        CfnOutput(
            self,
            "DashboardName",
            value=self.monitoring.dashboard.dashboard_name,
            description="The CloudWatch dashboard: a row per model, the API and the S3 pipeline",
        )
        if self.api.api_key is not None:
            CfnOutput(
                self,
                "ApiKeyId",
                value=self.api.api_key.key_id,
                description="aws apigateway get-api-key --include-value --api-key <this id>",
            )

    def _add_lambda_models(self, config: InfraConfig, catalog: Catalog, model_store: ModelStore) -> None:
        entries = catalog.by_tier("lambda", config.lambda_max_model_mb)
        limits = [*model_key_limits(config, [e.name for e in entries]), *(image_limits() if entries else [])]
        errors = [limit.message for limit in limits if limit.error]
        errors += version_tier_errors(catalog, config)
        for entry in entries:  # every model's errors at once, not the first one's
            for version in (entry, *catalog.others_of(entry.name)):
                errors += [
                    limit.message for limit in lambda_model_limits(version.manifest, config) if limit.error
                ]
        if errors:
            raise ConfigError("\n".join(errors))
        if not entries:
            return
        bucket = model_store.bucket_for(self)
        functions = Construct(self, "LambdaModels")
        routes = Construct(self, "LambdaRoutes")
        for entry in entries:
            model = LambdaModelFunction(
                functions,
                entry.name,
                manifest=entry.manifest,
                config=config,
                architecture=ARCHITECTURES[config.lambda_architecture],
                model_bucket_name=bucket.bucket_name,
                model_prefix=model_store.model_prefix,
                log_retention=RETENTION[config.log_retention_days],
                other_versions=[e.manifest for e in catalog.others_of(entry.name)],
            )
            for manifest in model.manifests:
                model_store.grant_read_model(model.function, manifest)
            self.routes[entry.name] = LambdaModelRoutes(
                routes,
                entry.name,
                api=self.api,
                model_name=entry.name,
                function=model.alias,
                version=entry.version,
            )
            self.lambda_models[entry.name] = model

    def _add_jobs(
        self, config: InfraConfig, catalog: Catalog, model_store: ModelStore, data_store: DataStore
    ) -> AsyncJobs:
        """One jobs function for every model, and each model's jobs routes beside its OIP routes."""
        jobs = AsyncJobs(
            self,
            "Jobs",
            api=self.api,
            data_bucket=data_store.bucket_for(self),
            models=[entry.manifest for entry in catalog],
            architecture=ARCHITECTURES[config.lambda_architecture],
            model_bucket_name=model_store.bucket_for(self).bucket_name,
            model_prefix=model_store.model_prefix,
            url_expiry_seconds=config.jobs_url_expiry_seconds,
            max_input_mb=config.max_input_mb,
            log_retention=RETENTION[config.log_retention_days],
            log_level=config.log_level,
        )
        for routes in self.routes.values():
            assert routes.version_resource is not None  # both route constructs are given the version
            jobs.add_model(routes.resource, routes.version_resource)
        return jobs

    @property
    def gpu_targets(self) -> dict[str, GpuTarget]:
        """Model name -> the endpoint and component that serve it (what the S3 worker calls)."""
        return {name: component.target for name, component in self.gpu_models.items()}

    def _add_gpu_models(self, config: InfraConfig, catalog: Catalog, model_store: ModelStore) -> None:
        entries = catalog.by_tier("gpu", config.lambda_max_model_mb)
        placement = gpu_placement(entries, config)
        if not placement:
            return
        image = gpu_server_image(self)
        # Instance types with local NVMe storage (the default g5 included) are encrypted by the
        # instance's hardware, and SageMaker refuses a KMS key for them: no key then.
        volume_key = gpu_volume_key(self) if any(needs_volume_key(t) for t in placement) else None
        bucket = model_store.bucket_for(self)
        endpoints = Construct(self, "GpuEndpoints")
        models = Construct(self, "GpuModels")
        routes = Construct(self, "GpuRoutes")
        cold_start = ColdStart(
            minutes=config.gpu_cold_start_minutes, retry_after_s=config.gpu_retry_after_seconds
        )
        for instance_type, placed in placement.items():
            endpoint = GpuEndpoint(
                endpoints,
                instance_slug(instance_type),
                instance_type=instance_type,
                image=image,
                scaling=InstanceScaling(
                    initial=config.gpu_initial_instance_count,
                    minimum=config.gpu_min_instances,
                    maximum=config.gpu_max_instances,
                ),
                routing_strategy=config.gpu_routing_strategy,
                volume_key=volume_key if needs_volume_key(instance_type) else None,
                log_retention=RETENTION[config.log_retention_days],
            )
            self.gpu_endpoints[instance_type] = endpoint
            for entry, requirements in placed:
                component = GpuModelComponent(
                    models,
                    entry.name,
                    endpoint=endpoint,
                    manifest=entry.manifest,
                    requirements=requirements,
                    scaling=copy_scaling(config),
                    startup_timeout=Duration.seconds(config.gpu_startup_timeout_seconds),
                    model_bucket_name=bucket.bucket_name,
                    model_prefix=model_store.model_prefix,
                    max_batch_size=config.gpu_max_batch_size,
                    max_queue_delay_ms=config.gpu_max_queue_delay_ms,
                    log_level=config.log_level,
                )
                model_store.grant_read_model(component.role, entry.manifest)
                self.routes[entry.name] = SageMakerModelRoutes(
                    routes,
                    entry.name,
                    api=self.api,
                    manifest=entry.manifest,
                    endpoint_name=endpoint.endpoint_name,
                    endpoint_arn=endpoint.endpoint_arn,
                    component_name=component.component_name,
                    component_arn=component.component_arn,
                    cold_start=cold_start,
                )
                self.gpu_models[entry.name] = component
            self._warn_unchecked(endpoint)

    def _monitor(self, config: InfraConfig, *, pipeline_stack: str | None) -> Monitoring:
        """The dashboard and every model's alarms, publishing to the one alarm topic.

        Raises:
            ConfigError: ``latency_budget_ms`` or ``rollout_overrides`` names a model the
                catalog does not serve.
        """
        served = {*self.lambda_models, *self.gpu_models}
        for key in ("latency_budget_ms", "rollout_overrides"):
            strays = sorted({name for name, _ in getattr(config, key)} - served)
            if strays:
                raise ConfigError(
                    f"cdk.json context {key!r} names {', '.join(strays)}, which the catalog does not serve "
                    f"(models: {', '.join(sorted(served)) or 'none'}); fix the name or remove the entry"
                )
        return Monitoring(
            self,
            "Monitoring",
            alarm_email=config.alarm_email or None,
            policy=AlarmPolicy(
                error_rate_percent=config.error_rate_percent,
                latency_budget_ms=dict(config.latency_budget_ms),
                default_latency_budget_ms=config.latency_budget_default_ms,
                no_capacity_minutes=config.gpu_cold_start_minutes + 5,
            ),
            api_name=self.api.rest_api.rest_api_name,
            stage_name=self.api.stage.stage_name,
            lambda_models=[
                LambdaModel(
                    name, m.manifest.version, m.function, m.alias, tuple(v.version for v in m.manifests[1:])
                )
                for name, m in self.lambda_models.items()
            ],
            gpu_models=[
                GpuModel(name, c.manifest.version, c.component_name) for name, c in self.gpu_models.items()
            ],
            pipeline_stack=pipeline_stack,
        )

    def _roll_out(self, config: InfraConfig) -> LambdaRollouts | None:
        """A new default version of each model reaches traffic by its strategy and rolls back
        on its alarms: CodeDeploy on a Lambda-tier model's alias, a rolling update of a GPU-tier
        model's component."""
        for name, component in self.gpu_models.items():
            gpu_rolling_update(
                component.component,
                strategy=strategy(config.rollout_for(name)),
                alarms=self.monitoring.alarms[name].rollback,
                startup_timeout=Duration.seconds(config.gpu_startup_timeout_seconds),
            )
        if not self.lambda_models:
            return None
        rollouts = LambdaRollouts(self, "Rollouts")
        for name, model in self.lambda_models.items():
            rollouts.add(
                name,
                alias=model.alias,
                strategy=strategy(config.rollout_for(name)),
                alarms=self.monitoring.alarms[name].rollback,
            )
        return rollouts

    def _warn_unchecked(self, endpoint: GpuEndpoint) -> None:
        if endpoint.instance_type not in INSTANCE_SPECS:
            Annotations.of(endpoint).add_warning_v2(
                "tierserve:gpuInstanceTypeUnchecked",
                f"{endpoint.instance_type} is not in tierserve's table of GPU instance types "
                "(infra.gpu_instances.INSTANCE_SPECS): synth cannot check that a copy of each model "
                "fits one instance; a copy that does not fit fails the deploy when SageMaker places it",
            )

    def _warn(self, config: InfraConfig) -> None:
        if config.lambda_timeout_seconds > API_GATEWAY_TIMEOUT_SECONDS:
            Annotations.of(self).add_warning_v2(
                "tierserve:timeoutOverApiLimit",
                f"lambda_timeout_seconds={config.lambda_timeout_seconds} is over API Gateway's "
                f"{API_GATEWAY_TIMEOUT_SECONDS} s integration timeout: API callers get a 504 first",
            )


def version_tier_errors(catalog: Catalog, config: InfraConfig) -> list[str]:
    """Why the catalog's other versions cannot be served: a GPU-tier model serves its default
    version alone (one inference component; a new default rolls its copies over), and every
    version of a Lambda-tier model must be on the Lambda tier (one function serves them)."""
    errors = []
    for entry in catalog:
        others = catalog.others_of(entry.name)
        tier = tier_for(entry.manifest, config.lambda_max_model_mb)
        if others and tier == "gpu":
            errors.append(
                f"catalog lists versions {', '.join(e.version for e in others)} of {entry.name} beside its default "
                f"{entry.version}, but {entry.name} is on the GPU tier, which serves one version per model (its "
                "inference component): remove them, or make the one to serve the default"
            )
        elif tier == "lambda":
            strays = [
                e.version for e in others if tier_for(e.manifest, config.lambda_max_model_mb) != "lambda"
            ]
            if strays:
                errors.append(
                    f"versions {', '.join(strays)} of {entry.name} are on the GPU tier while its default "
                    f"{entry.version} is on the Lambda tier, and one function serves every version: keep the "
                    "versions of a model on one tier (lambda_max_model_mb, or a manifest's tier)"
                )
    return errors


def gpu_placement(
    entries: list[CatalogEntry], config: InfraConfig
) -> dict[str, list[tuple[CatalogEntry, ComputeRequirements]]]:
    """The GPU-tier models of the catalog by instance type (one endpoint each), with what one
    copy of each needs.

    Raises:
        ConfigError: ``gpu_instance_types`` names a model that is not on the GPU tier, a copy
            cannot fit one instance of its type, or the endpoint's instances cannot hold a
            model's most copies.
    """
    names = {entry.name for entry in entries}
    strays = sorted(set(gpu_instance_overrides(config.gpu_instance_types)) - names)
    if strays:
        raise ConfigError(
            f"cdk.json context 'gpu_instance_types' names {', '.join(strays)}, which the catalog does not "
            f"put on the GPU tier (GPU-tier models: {', '.join(sorted(names)) or 'none'}); fix the name "
            "or remove the entry"
        )
    placement: dict[str, list[tuple[CatalogEntry, ComputeRequirements]]] = {}
    for entry in entries:
        instance_type = config.gpu_instance_type_of(entry.name)
        requirements = ComputeRequirements.of(
            entry.manifest,
            memory_headroom=config.gpu_memory_headroom,
            base_memory_mb=config.gpu_base_memory_mb,
            cpu_cores=config.gpu_cpu_cores_per_copy,
        )
        check_fits(
            entry.name,
            requirements,
            instance_type,
            max_copies=config.gpu_max_copies,
            max_instances=config.gpu_max_instances,
        )
        placement.setdefault(instance_type, []).append((entry, requirements))
    return placement


def key_limits(config: InfraConfig) -> KeyLimits:
    """Each API key's throttle and quota under ``auth=api_key`` (the ``api_key_*`` keys)."""
    return KeyLimits(
        rate_limit=config.api_key_rate_limit,
        burst_limit=config.api_key_burst_limit,
        quota=config.api_key_quota,
        quota_period=config.api_key_quota_period,
    )


def copy_scaling(config: InfraConfig) -> CopyScaling:
    """Every GPU-tier model's copy autoscaling, from the ``gpu_*_copies`` and scaling keys."""
    return CopyScaling(
        initial=config.gpu_initial_copies,
        minimum=config.gpu_min_copies,
        maximum=config.gpu_max_copies,
        invocations_per_copy=config.gpu_invocations_per_copy,
        scale_out_cooldown=Duration.seconds(config.gpu_scale_out_cooldown_seconds),
        scale_in_cooldown=Duration.seconds(config.gpu_scale_in_cooldown_seconds),
        idle_minutes=config.gpu_scale_in_idle_minutes,
    )


@dataclass(frozen=True)
class TierserveStacks:
    storage: StorageStack
    serving: ServingStack
    pipeline: PipelineStack | None
    batch: BatchStack | None = None
    stream: StreamStack | None = None


def build_stacks(app: App, *, config: InfraConfig, catalog: Catalog) -> TierserveStacks:
    """Every stack in ``app``; the pipeline and the batch stack only when the catalog has a model to
    serve, the stream stack only when context ``stream`` names one.

    Raises:
        ConfigError: ``stream`` names a model the catalog does not hold.
    """
    storage = StorageStack(app, STORAGE_STACK, jobs_expiry_days=config.jobs_expiry_days)
    serving = ServingStack(
        app,
        SERVING_STACK,
        config=config,
        catalog=catalog,
        model_store=storage.model_store,
        data_store=storage.data_store,
    )
    captured = add_capture(
        data_store=storage.data_store,
        serving=serving,
        servers={
            **{name: model.function for name, model in serving.lambda_models.items()},
            **serving.gpu_models,
        },
        config=config,
        catalog=catalog,
    )
    pipeline = batch = None
    if catalog.entries:
        pipeline = PipelineStack(
            app,
            PIPELINE_STACK,
            config=config,
            catalog=catalog,
            model_store=storage.model_store,
            data_store=storage.data_store,
            gpu_endpoints=serving.gpu_targets,
            captured=captured,
            alarm_topic=serving.monitoring.alarm_topic,
        )
        pipeline.add_stack_dependency(serving, "invokes the GPU endpoints the serving stack creates")
        batch = BatchStack(
            app,
            BATCH_STACK,
            config=config,
            catalog=catalog,
            model_store=storage.model_store,
            data_store=storage.data_store,
            gpu_endpoints=serving.gpu_targets,
        )
        batch.add_stack_dependency(serving, "invokes the GPU endpoints the serving stack creates")
    stream = None
    manifest = stream_model(config, catalog)
    if manifest is not None:
        stream = StreamStack(
            app,
            STREAM_STACK,
            config=config,
            manifest=manifest,
            model_store=storage.model_store,
            gpu_endpoints=serving.gpu_targets,
            alarm_topic=serving.monitoring.alarm_topic,
        )
        stream.add_stack_dependency(serving, "invokes the GPU endpoint the serving stack creates")
    return TierserveStacks(storage=storage, serving=serving, pipeline=pipeline, batch=batch, stream=stream)
