"""Drift: request capture on the serving side, and the scheduled job that compares it with the
packaging baseline.

- :func:`wire_capture` turns capture on where each model that context ``capture`` names is
  served (its API function on the Lambda tier, its inference component's container on the GPU
  tier: ``TIERSERVE_CAPTURE``, ``TIERSERVE_DATA_BUCKET``) and lets it put objects under
  ``capture/{model}/{version}/`` of the data bucket, and nothing else there.
- :func:`add_capture_retention` expires ``capture/`` after ``capture_retention_days``.
- :class:`DriftMonitoring` (in the pipeline stack) holds the drift function (the inference image,
  ``drift.handler``), an EventBridge rule that runs it every ``drift_window_hours`` over the last
  window, and an alarm per model on ``DriftMaxPSI`` (namespace ``Tierserve``, dimensions
  ``model``, ``version``, ``service``) at ``drift_psi_threshold``. Its role reads
  ``capture/*`` (and lists only that prefix), reads each captured model version's manifest and
  baseline (two keys each, no wildcard), and writes ``drift-reports/*``: nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from aws_cdk import Annotations, Duration, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from constructs import Construct

from infra.model_store import ModelStore, SharedBucketStore, model_objects_pattern
from infra.monitoring import notify
from infra.nag import acknowledge, wildcard_resource_finding
from infra.tierserve_function import METRICS_NAMESPACE, SERVICE_NAME, TierserveFunction
from tierserve.capture import CAPTURE_ENV, CAPTURE_PREFIX, CaptureRule, join_rules, parse_rules
from tierserve.catalog import Catalog, Manifest, manifest_key
from tierserve.drift.baseline import BASELINE_NAME
from tierserve.drift.job import DRIFT_MAX_PSI
from tierserve.drift.report import DRIFT_PREFIX
from tierserve.drift.settings import (
    DRIFT_MIN_ROWS_ENV,
    DRIFT_PSI_THRESHOLD_ENV,
    DRIFT_WINDOW_HOURS_ENV,
)
from tierserve.settings import DATA_BUCKET_ENV
from tierserve.tools.cdk_context import ConfigError, InfraConfig

DRIFT_HANDLER = "drift.handler"
DRIFT_MEMORY_MB = 1024
DRIFT_TIMEOUT = Duration.minutes(10)
DRIFT_EPHEMERAL_MB = 1024  # TierserveFunction keeps 512 MB of /tmp off its (unused) model cache


def capture_rules(capture: str, catalog: Catalog) -> dict[str, CaptureRule]:
    """Context ``capture`` as rules, for models the catalog holds.

    Raises:
        ValueError: it names a model the catalog does not hold (the message names the fix).
    """
    rules = {name: rule for name, rule in parse_rules(capture).items() if rule.rate > 0}
    strays = sorted(name for name in rules if catalog.get(name) is None)
    if strays:
        held = ", ".join(e.name for e in catalog) or "none"
        raise ValueError(
            f"cdk.json context 'capture' names {', '.join(strays)}, which the catalog does not hold "
            f"(it holds {held}): fix the name or remove the entry"
        )
    return rules


def add_capture_retention(bucket: s3.Bucket, *, days: int) -> None:
    """Captured requests are transient: ``capture/`` expires after ``days`` (its noncurrent
    versions a day later, the bucket being versioned)."""
    bucket.add_lifecycle_rule(
        id="CaptureRetention",
        prefix=f"{CAPTURE_PREFIX}/",
        expiration=Duration.days(days),
        noncurrent_version_expiration=Duration.days(1),
    )


class Server(Protocol):
    """Where a model is served, as capture needs it: an API function (``lambda_.Function``) or a
    GPU model's inference component (``infra.sagemaker_inference.GpuModelComponent``)."""

    @property
    def role(self) -> iam.IRole | None: ...

    def add_environment(self, key: str, value: str) -> Any: ...


def wire_capture(
    servers: Mapping[str, Server],
    manifests: Mapping[str, Manifest],
    rules: Mapping[str, CaptureRule],
    data_bucket: s3.IBucket,
) -> list[str]:
    """Turn capture on where each model ``rules`` names is served (model name -> its server);
    returns the models that capture. Each server may put objects under its own
    ``capture/{model}/{version}/`` only."""
    wired = []
    for name in sorted(rules):
        server = servers.get(name)
        if server is None:
            continue
        manifest = manifests[name]
        server.add_environment(CAPTURE_ENV, join_rules({name: rules[name]}))
        server.add_environment(DATA_BUCKET_ENV, data_bucket.bucket_name)
        arn = data_bucket.arn_for_objects(f"{CAPTURE_PREFIX}/{name}/{manifest.version}/*")
        role = server.role
        assert role is not None  # a TierserveFunction and a GPU component always have their role
        role.add_to_principal_policy(iam.PolicyStatement(actions=["s3:PutObject"], resources=[arn]))
        acknowledge(
            role,
            wildcard_resource_finding(role, arn),
            "Writes the batches of captured requests of its own model version: their keys are "
            "named by time and a random id, so only the version's prefix can be named.",
        )
        wired.append(name)
    return wired


class DriftMonitoring(Construct):
    """The scheduled drift job for ``models`` (those that capture) and its alarms.

    Attributes: ``function``, ``role``, ``rule``, ``alarms`` (model name -> alarm).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        models: Sequence[Manifest],
        data_bucket: s3.IBucket,
        model_bucket: s3.IBucket,
        model_prefix: str,
        architecture: lambda_.Architecture,
        window_hours: int,
        psi_threshold: float,
        min_rows: int,
        log_retention: logs.RetentionDays,
        log_level: str,
        alarm_topic: sns.ITopic | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        job = TierserveFunction(
            self,
            "Function",
            handler=DRIFT_HANDLER,
            architecture=architecture,
            models=models,
            model_bucket_name=model_bucket.bucket_name,
            model_prefix=model_prefix,
            memory_mb=DRIFT_MEMORY_MB,
            timeout=DRIFT_TIMEOUT,
            ephemeral_storage_mb=DRIFT_EPHEMERAL_MB,
            log_retention=log_retention,
            log_level=log_level,
            environment={
                DATA_BUCKET_ENV: data_bucket.bucket_name,
                DRIFT_WINDOW_HOURS_ENV: str(window_hours),
                DRIFT_PSI_THRESHOLD_ENV: f"{psi_threshold:g}",
                DRIFT_MIN_ROWS_ENV: str(min_rows),
            },
            description=f"tierserve drift: PSI of captured requests against the baseline, {len(models)} model(s)",
            role_description="tierserve drift: reads capture/ and the models' baselines, writes drift-reports/",
        )
        self.function, self.role = job.function, job.role
        self._grant(data_bucket, model_bucket, model_prefix, models)
        self.rule = events.Rule(
            self,
            "Schedule",
            schedule=events.Schedule.rate(Duration.hours(window_hours)),
            description=f"tierserve drift: every {window_hours} h, the last {window_hours} h of capture",
            targets=[targets.LambdaFunction(self.function, retry_attempts=2)],
        )
        self.alarms = {m.name: self._alarm(m, window_hours, psi_threshold, alarm_topic) for m in models}

    def _grant(
        self, data_bucket: s3.IBucket, model_bucket: s3.IBucket, prefix: str, models: Sequence[Manifest]
    ) -> None:
        captured = data_bucket.arn_for_objects(f"{CAPTURE_PREFIX}/*")
        reports = data_bucket.arn_for_objects(f"{DRIFT_PREFIX}/*")
        baselines = []
        for manifest in models:
            folder = model_objects_pattern(manifest.name, manifest.version, prefix=prefix).removesuffix("*")
            baselines += [
                model_bucket.arn_for_objects(manifest_key(prefix, manifest.name, manifest.version)),
                model_bucket.arn_for_objects(folder + BASELINE_NAME),
            ]
        statements = [
            iam.PolicyStatement(actions=["s3:GetObject"], resources=[captured, *baselines]),
            iam.PolicyStatement(
                actions=["s3:ListBucket"],
                resources=[data_bucket.bucket_arn],
                conditions={"StringLike": {"s3:prefix": [f"{CAPTURE_PREFIX}/*"]}},
            ),
            iam.PolicyStatement(actions=["s3:PutObject"], resources=[reports]),
        ]
        for statement in statements:
            self.role.add_to_principal_policy(statement)
        acknowledge(
            self.role,
            wildcard_resource_finding(self.role, captured),
            "Reads the batches of captured requests, whose keys are named by model, version, date, "
            "time and a random id when they are written: only the prefix can be named.",
        )
        acknowledge(
            self.role,
            wildcard_resource_finding(self.role, reports),
            "Writes a report and a plot per model and run under drift-reports/{model}/{version}/{time}/: "
            "keys named by the run's time.",
        )

    def _alarm(
        self, manifest: Manifest, window_hours: int, threshold: float, topic: sns.ITopic | None
    ) -> cloudwatch.Alarm:
        metric = cloudwatch.Metric(
            namespace=METRICS_NAMESPACE,
            metric_name=DRIFT_MAX_PSI,
            dimensions_map={"model": manifest.name, "version": manifest.version, "service": SERVICE_NAME},
            statistic="Maximum",
            period=Duration.hours(window_hours),
        )
        alarm = metric.create_alarm(
            self,
            f"Alarm-{manifest.name}",
            threshold=threshold,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            alarm_description=(
                f"{manifest.name}@{manifest.version}: an input feature's population stability index reached "
                f"{threshold:g} over the last {window_hours} h; read drift-reports/{manifest.name}/"
                f"{manifest.version}/ in the data bucket, or run `tierserve drift {manifest.name} --bucket ...`"
            ),
        )
        if topic is not None:
            notify(alarm, topic)
        else:
            Annotations.of(alarm).add_warning_v2(
                "tierserve:driftAlarmWithoutRecipient",
                f"the drift alarm of {manifest.name} notifies nobody: set cdk.json context alarm_email",
            )
        return alarm


def add_capture(
    *,
    data_store: SharedBucketStore,
    serving: Stack,
    servers: Mapping[str, Server],
    config: InfraConfig,
    catalog: Catalog,
) -> list[str]:
    """Capture's retention on the data bucket, and capture where the models context ``capture``
    names are served (model name -> API function or GPU component, in the ``serving`` stack);
    returns those.

    Raises:
        ConfigError: ``capture`` names a model the catalog does not hold.
    """
    add_capture_retention(data_store.bucket, days=config.capture_retention_days)
    try:
        rules = capture_rules(config.capture, catalog)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for name in sorted(set(rules) - set(servers)):
        Annotations.of(serving).add_warning_v2(
            "tierserve:captureNotServed",
            f"cdk.json context 'capture' names {name}, which no function or GPU endpoint of this app "
            "serves, so it is not captured",
        )
    if not set(rules) & set(servers):
        return []  # no import of the data bucket into the serving stack without a use for it
    manifests = {entry.name: entry.manifest for entry in catalog}
    return wire_capture(servers, manifests, rules, data_store.bucket_for(serving))


def add_drift_job(
    scope: Stack,
    *,
    captured: Sequence[str],
    config: InfraConfig,
    catalog: Catalog,
    model_store: ModelStore,
    data_store: SharedBucketStore,
    architecture: lambda_.Architecture,
    log_retention: logs.RetentionDays,
    alarm_topic: sns.ITopic | None,
) -> DriftMonitoring | None:
    """The scheduled drift job in ``scope`` over the ``captured`` models (none: no job)."""
    if not captured:
        return None
    return DriftMonitoring(
        scope,
        "Drift",
        models=[entry.manifest for entry in catalog if entry.name in captured],
        data_bucket=data_store.bucket_for(scope),
        model_bucket=model_store.bucket_for(scope),
        model_prefix=model_store.model_prefix,
        architecture=architecture,
        window_hours=config.drift_window_hours,
        psi_threshold=config.drift_psi_threshold,
        min_rows=config.drift_min_rows,
        log_retention=log_retention,
        log_level=config.log_level,
        alarm_topic=alarm_topic,
    )
