"""S3-triggered inference: the data bucket, and the queue, worker and alarm that serve it.

``inputs/{model}/{path}`` put in the data bucket -> S3 ``ObjectCreated`` notification
(prefix ``inputs/``) -> SQS queue (dead-letter queue after ``pipeline_max_receive_count``
receives) -> the worker Lambda (``functions/inference/worker.py``: a
:class:`~infra.tierserve_function.TierserveFunction`, the API's image with ``worker.handler``)
-> ``outputs/{model}/{path}.json`` or ``errors/{model}/{path}.json``.
Results never land under ``inputs/``: the notification cannot loop, and the worker's role
may not write there.

:class:`DataStore` holds the bucket (in the storage stack, retained, next to the model
bucket); :class:`InferencePipeline` holds what processes it (stateless, in its own stack).

Queue encryption is SSE-SQS (SQS-managed keys): S3 can deliver notifications to it without
a key policy, where a KMS queue would need a customer-managed key whose policy lets
``s3.amazonaws.com`` use it (the AWS-managed ``aws/sqs`` key cannot be shared with S3). The
messages hold object keys and ETags, not data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aws_cdk import Annotations, CfnResource, Duration, RemovalPolicy, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_event_sources as event_sources
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_notifications as s3_notifications
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from infra.jobs import grant_job_results
from infra.model_store import SharedBucketStore, private_bucket
from infra.monitoring import notify, queue_not_empty_alarm
from infra.nag import acknowledge, wildcard_resource_finding
from infra.sagemaker_inference import component_arn, endpoint_arn
from infra.tierserve_function import TierserveFunction
from infra.trust import confine_trust
from tierserve.catalog import LAMBDA_MIN_MEMORY_MB, Manifest, lambda_memory_mb
from tierserve.settings import (
    DATA_BUCKET_ENV,
    ERROR_PREFIX,
    GPU_ENDPOINTS_ENV,
    INPUT_PREFIX,
    JOB_INPUT_SUFFIXES,
    JOBS_PREFIX,
    MAX_INPUT_MB_ENV,
    OUTPUT_PREFIX,
    GpuTarget,
)

WORKER_HANDLER = "worker.handler"
# AWS: a queue's visibility timeout at least 6x the function timeout (plus the batching
# window), so a batch that is retried inside the function is not redelivered meanwhile.
VISIBILITY_TIMEOUT_FACTOR = 6
DLQ_RETENTION = Duration.days(14)  # SQS's longest: time to find the cause and redrive
QUEUE_RETENTION = Duration.days(4)
ACCESS_LOG_PREFIX = "data-bucket/"
NONCURRENT_VERSION_EXPIRY = Duration.days(30)
DEFAULT_JOBS_EXPIRY_DAYS = 3
MIN_EVENT_SOURCE_CONCURRENCY = 2  # the event source mapping's MaximumConcurrency starts at 2
NOTIFICATIONS_HANDLER_ID = "BucketNotificationsHandler"  # CDK's singleton in each stack
BASIC_EXECUTION_POLICY = "arn:<AWS::Partition>:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"


class DataStore(SharedBucketStore):
    """The data bucket: private, SSE-S3, TLS-only, versioned, access logged, retained.

    Versioned because the worker reads exactly the version an event announced and records it
    in the result; old versions expire after 30 days. Async jobs (``jobs/``) expire after
    ``jobs_expiry_days``, their old versions a day later, and their leftover delete markers are
    removed. Attributes: ``bucket``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        access_log_bucket: s3.IBucket,
        removal_policy: RemovalPolicy = RemovalPolicy.RETAIN,
        jobs_expiry_days: int = DEFAULT_JOBS_EXPIRY_DAYS,
    ) -> None:
        super().__init__(scope, construct_id)
        self.bucket = private_bucket(
            self,
            "Bucket",
            removal_policy=removal_policy,
            versioned=True,
            server_access_logs_bucket=access_log_bucket,
            server_access_logs_prefix=ACCESS_LOG_PREFIX,
            lifecycle_rules=[
                s3.LifecycleRule(
                    abort_incomplete_multipart_upload_after=Duration.days(7),
                    noncurrent_version_expiration=NONCURRENT_VERSION_EXPIRY,
                ),
                *jobs_lifecycle_rules(jobs_expiry_days),
            ],
        )


def jobs_lifecycle_rules(expiry_days: int) -> list[s3.LifecycleRule]:
    """Async jobs are transient: every object under ``jobs/`` expires ``expiry_days`` after it
    was written, its noncurrent versions a day after that; a second rule removes the delete
    markers expiry leaves (S3 takes no ``ExpiredObjectDeleteMarker`` beside ``Days`` in one rule)."""
    return [
        s3.LifecycleRule(
            id="jobs-expire",
            prefix=f"{JOBS_PREFIX}/",
            expiration=Duration.days(expiry_days),
            noncurrent_version_expiration=Duration.days(1),
            abort_incomplete_multipart_upload_after=Duration.days(1),
        ),
        s3.LifecycleRule(
            id="jobs-delete-markers", prefix=f"{JOBS_PREFIX}/", expired_object_delete_marker=True
        ),
    ]


def own_notifications_handler(scope: Construct, *, log_retention: logs.RetentionDays) -> None:
    """Hold CDK's deploy-time handler for bucket notifications to the stack's rules.

    CDK writes bucket notifications through a Lambda of its own, one per stack
    (``Custom::S3BucketNotifications``). Left alone, its logs go to a group Lambda creates on
    first run, which never expires, and its role trusts Lambda for any account. It gets a log
    group with ``log_retention``, the account condition on its trust, and the acknowledgment
    of the AWS managed basic execution policy its role carries; its other permission is
    s3:PutBucketNotification on this bucket only.
    """
    stack = Stack.of(scope)
    handler = next(c for c in stack.node.children if c.node.id.startswith(NOTIFICATIONS_HANDLER_ID))
    logs_id = f"{NOTIFICATIONS_HANDLER_ID}Logs"
    if stack.node.try_find_child(logs_id) is not None:
        return  # a second pipeline in this stack: the singleton is already held
    log_group = logs.LogGroup(stack, logs_id, retention=log_retention)
    function = handler.node.find_child("Resource")
    if not isinstance(function, CfnResource):
        raise TypeError(f"{function.node.path} is not the CloudFormation function CDK builds")
    function.add_property_override("LoggingConfig", {"LogGroup": log_group.log_group_name})
    role = handler.node.find_child("Role")
    if not isinstance(role, iam.Role):
        raise TypeError(f"{role.node.path} is not the role CDK builds for the handler")
    confine_trust(role)
    acknowledge(
        handler,
        f"AwsSolutions-IAM4[Policy::{BASIC_EXECUTION_POLICY}]",
        "CDK's own deploy-time handler for S3 bucket notifications (it runs only while "
        "CloudFormation deploys): AWSLambdaBasicExecutionRole lets it write its CloudWatch "
        "logs, and nothing else.",
    )


def invoke_arns(scope: Construct, targets: Mapping[str, GpuTarget]) -> list[str]:
    """What ``sagemaker:InvokeEndpoint`` on ``targets`` needs: each endpoint once, and each
    inference component (IAM checks both when a call names a component)."""
    endpoints = sorted({target.endpoint for target in targets.values()})
    components = sorted(t.component for t in targets.values() if t.component is not None)
    return [
        *(endpoint_arn(scope, name) for name in endpoints),
        *(component_arn(scope, name) for name in components),
    ]


def prefix_pattern(prefix: str) -> str:
    """Every key under ``prefix``: ``inputs`` -> ``inputs/*``."""
    return f"{prefix.strip('/')}/*"


def grant_data_bucket(role: iam.IRole, bucket: s3.IBucket) -> None:
    """What a function serving the data bucket's inputs may do there (the S3 worker's and the
    batch function's): read ``inputs/*`` (any version); read, write and delete ``outputs/*``
    and ``errors/*`` (the results' metadata is the idempotency and ordering record; writing
    one kind of result removes the other); list the bucket (the results of a batch, one page
    per model, and without it S3 answers a HeadObject for a result not written yet with 403
    instead of 404). Nothing may write under ``inputs/``."""
    inputs = bucket.arn_for_objects(prefix_pattern(INPUT_PREFIX))
    results = [bucket.arn_for_objects(prefix_pattern(p)) for p in (OUTPUT_PREFIX, ERROR_PREFIX)]
    statements = [
        iam.PolicyStatement(actions=["s3:GetObject", "s3:GetObjectVersion"], resources=[inputs]),
        iam.PolicyStatement(actions=["s3:GetObject", "s3:PutObject", "s3:DeleteObject"], resources=results),
        iam.PolicyStatement(actions=["s3:ListBucket"], resources=[bucket.bucket_arn]),
    ]
    for statement in statements:
        role.add_to_principal_policy(statement)
    reasons = {
        inputs: "Reads the inputs dropped under inputs/ (any key, any version the event names): the "
        "keys are chosen by whoever uploads them.",
        results[0]: "Writes outputs/{model}/{path}.json for inputs/{model}/{path} and reads it back "
        "(HeadObject) to skip duplicates: keys mirror the inputs' and cannot be listed ahead of time.",
        results[1]: "Writes errors/{model}/{path}.json for inputs that cannot be served and reads or "
        "removes it when a result replaces it: keys mirror the inputs' and cannot be listed ahead of time.",
    }
    for arn, reason in reasons.items():
        acknowledge(role, wildcard_resource_finding(role, arn), reason)


def pipeline_function_environment(
    data_bucket: s3.IBucket, gpu_endpoints: Mapping[str, GpuTarget]
) -> dict[str, str]:
    """The variables a function serving the data bucket reads beyond the models' (the S3
    worker's, the batch function's): where results go, and which models run on an endpoint."""
    return {DATA_BUCKET_ENV: data_bucket.bucket_name, **gpu_endpoints_environment(gpu_endpoints)}


def gpu_endpoints_environment(gpu_endpoints: Mapping[str, GpuTarget]) -> dict[str, str]:
    """``TIERSERVE_GPU_ENDPOINTS`` for the models that run on an endpoint (none: no variable)."""
    return {GPU_ENDPOINTS_ENV: GpuTarget.join(gpu_endpoints)} if gpu_endpoints else {}


def pipeline_memory_mb(models: Sequence[Manifest], gpu_endpoints: Mapping[str, GpuTarget]) -> int:
    """Memory for a function that runs ``models`` itself, but those on GPU endpoints."""
    in_function = [m for m in models if m.name not in gpu_endpoints]
    return max([lambda_memory_mb(m) for m in in_function], default=LAMBDA_MIN_MEMORY_MB)


def grant_invoke_endpoints(role: iam.IRole, scope: Construct, gpu_endpoints: Mapping[str, GpuTarget]) -> None:
    """``sagemaker:InvokeEndpoint`` on the named GPU endpoints and their components, and no other."""
    if gpu_endpoints:
        role.add_to_principal_policy(
            iam.PolicyStatement(
                actions=["sagemaker:InvokeEndpoint"], resources=invoke_arns(scope, gpu_endpoints)
            )
        )


class InferencePipeline(Construct):
    """Queue, dead-letter queue, worker, notification and dead-letter alarm for a data bucket.

    ``models`` are every model the worker serves (its ``TIERSERVE_MODELS``: the manifests give
    the signatures); those in ``gpu_endpoints`` (model name -> endpoint and inference
    component) run there, which the worker may invoke (and nothing else of SageMaker), the
    others in the worker.
    The stack grants the reads of each model's objects
    (``ModelStore.grant_read_model(pipeline.worker, manifest)``). The dead-letter alarm publishes
    to ``alarm_topic`` (the app's one alarm topic); without one, synth warns.

    Attributes: ``queue``, ``dead_letter_queue``, ``worker``, ``worker_alias`` (what the event
    source invokes), ``role``, ``log_group``,
    ``alarm``, ``alarm_topic`` (as given), ``data_bucket``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        data_bucket: s3.IBucket,
        models: Sequence[Manifest],
        gpu_endpoints: Mapping[str, GpuTarget],
        architecture: lambda_.Architecture,
        model_bucket_name: str,
        model_prefix: str,
        worker_timeout: Duration,
        max_receive_count: int,
        batch_size: int,
        batching_window: Duration,
        reserved_concurrency: int | None,
        ephemeral_storage_mb: int,
        log_retention: logs.RetentionDays,
        log_level: str,
        alarm_topic: sns.ITopic | None = None,
        max_input_mb: int | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        unknown = sorted(set(gpu_endpoints) - {m.name for m in models})
        if unknown:
            raise ValueError(f"GPU endpoints given for models the pipeline does not serve: {unknown}")
        self.data_bucket = data_bucket
        self.dead_letter_queue, self.queue = self._queues(
            worker_timeout=worker_timeout,
            batching_window=batching_window,
            max_receive_count=max_receive_count,
        )
        data_bucket.add_event_notification(
            s3.EventType.OBJECT_CREATED,
            s3_notifications.SqsDestination(self.queue),
            s3.NotificationKeyFilter(prefix=f"{INPUT_PREFIX}/"),
        )
        for suffix in JOB_INPUT_SUFFIXES:  # async jobs' inputs; their records and results never match
            data_bucket.add_event_notification(
                s3.EventType.OBJECT_CREATED,
                s3_notifications.SqsDestination(self.queue),
                s3.NotificationKeyFilter(prefix=f"{JOBS_PREFIX}/", suffix=suffix),
            )
        own_notifications_handler(self, log_retention=log_retention)

        worker = self._worker(
            models=models,
            gpu_endpoints=gpu_endpoints,
            architecture=architecture,
            model_bucket_name=model_bucket_name,
            model_prefix=model_prefix,
            timeout=worker_timeout,
            reserved_concurrency=reserved_concurrency,
            ephemeral_storage_mb=ephemeral_storage_mb,
            log_retention=log_retention,
            log_level=log_level,
            max_input_mb=max_input_mb,
        )
        self.worker, self.role, self.log_group = worker.function, worker.role, worker.log_group
        self.worker_alias = worker.alias
        # The event source invokes the published version behind the alias, never $LATEST.
        self.worker_alias.add_event_source(
            event_sources.SqsEventSource(
                self.queue,
                batch_size=batch_size,
                max_batching_window=batching_window if batching_window.to_seconds() > 0 else None,
                report_batch_item_failures=True,
                # With a reservation, the poller never starts more batches than may run: a
                # throttled batch would count a receive towards the dead-letter queue.
                max_concurrency=(
                    reserved_concurrency
                    if reserved_concurrency and reserved_concurrency >= MIN_EVENT_SOURCE_CONCURRENCY
                    else None
                ),
            )
        )
        grant_data_bucket(self.role, self.data_bucket)
        grant_job_results(self.role, self.data_bucket)
        grant_invoke_endpoints(self.role, self, gpu_endpoints)
        if gpu_endpoints:
            # An input whose GPU model has no copy running waits in the queue: its visibility is
            # extended (the event source's grant), or on its last receive a delayed copy of it is
            # sent (tierserve/s3_pipeline/cold.py), so it is never dead-lettered for a cold GPU.
            self.queue.grant_send_messages(self.role)

        self.alarm_topic = alarm_topic
        self.alarm = self._dead_letter_alarm()

    def _queues(
        self, *, worker_timeout: Duration, batching_window: Duration, max_receive_count: int
    ) -> tuple[sqs.Queue, sqs.Queue]:
        """The dead-letter queue and the inputs queue that moves a message there after
        ``max_receive_count`` receives."""
        dead_letters = sqs.Queue(
            self,
            "DeadLetters",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=DLQ_RETENTION,
        )
        visibility = Duration.seconds(
            VISIBILITY_TIMEOUT_FACTOR * worker_timeout.to_seconds() + batching_window.to_seconds()
        )
        inputs = sqs.Queue(
            self,
            "Inputs",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            visibility_timeout=visibility,
            retention_period=QUEUE_RETENTION,
            dead_letter_queue=sqs.DeadLetterQueue(queue=dead_letters, max_receive_count=max_receive_count),
        )
        return dead_letters, inputs

    def _dead_letter_alarm(self) -> cloudwatch.Alarm:
        """Any message in the dead-letter queue, published to ``alarm_topic`` (tierserve's one
        alarm topic, whose construct warns when nobody is subscribed), or a synth warning that
        the alarm has no action."""
        alarm = queue_not_empty_alarm(
            self,
            "DeadLettersAlarm",
            self.dead_letter_queue,
            "tierserve pipeline: inputs failed every delivery and wait in the dead-letter queue; "
            "read the worker's logs, fix the cause, then redrive (aws sqs start-message-move-task)",
        )
        if self.alarm_topic is not None:
            notify(alarm, self.alarm_topic)
        else:
            Annotations.of(self).add_warning_v2(
                "tierserve:deadLetterAlarmWithoutRecipient",
                "the dead-letter alarm has no alarm topic: it goes off when inputs fail every delivery, but "
                "nobody is told. Pass the app's alarm topic (infra.monitoring.Monitoring.topic), or add an "
                "action to the alarm yourself.",
            )
        return alarm

    def _worker(
        self,
        *,
        models: Sequence[Manifest],
        gpu_endpoints: Mapping[str, GpuTarget],
        architecture: lambda_.Architecture,
        model_bucket_name: str,
        model_prefix: str,
        timeout: Duration,
        reserved_concurrency: int | None,
        ephemeral_storage_mb: int,
        log_retention: logs.RetentionDays,
        log_level: str,
        max_input_mb: int | None = None,
    ) -> TierserveFunction:
        """The worker, sized for the largest model it runs itself (GPU-tier models run on
        their endpoints, named in ``TIERSERVE_GPU_ENDPOINTS``)."""
        return TierserveFunction(
            self,
            "Worker",
            handler=WORKER_HANDLER,
            architecture=architecture,
            models=models,
            model_bucket_name=model_bucket_name,
            model_prefix=model_prefix,
            memory_mb=pipeline_memory_mb(models, gpu_endpoints),
            timeout=timeout,
            ephemeral_storage_mb=ephemeral_storage_mb,
            log_retention=log_retention,
            log_level=log_level,
            environment={
                **pipeline_function_environment(self.data_bucket, gpu_endpoints),
                **({MAX_INPUT_MB_ENV: str(max_input_mb)} if max_input_mb else {}),
            },
            reserved_concurrency=reserved_concurrency or None,
            description=f"tierserve S3 worker: {INPUT_PREFIX}/ -> {OUTPUT_PREFIX}/, {ERROR_PREFIX}/ "
            f"for {len(models)} model(s)",
            role_description="tierserve S3 worker: reads inputs/, writes outputs/ and errors/, reads its models",
        )
