"""Bulk inference: the ``TierserveBatch`` state machine and the batch function it runs.

    tierserve batch s3://data/inputs/iris/2026/ --model iris
      -> StartExecution {"reader": "prefix", "key": "inputs/iris/2026/", "model": "iris"}
      -> Choice on $.reader -> one Distributed Map per reader:
           ItemReader   ListObjectsV2 of the prefix | a CSV or JSON manifest under manifests/ |
                        an S3 Inventory manifest under inventory/
           ItemBatcher  batch_items_per_batch items, BatchInput {"model", "reader"}
           ItemProcessor the batch function (functions/inference/batch.py, the image every
                        tierserve function runs), retried on BatchItemsFailed and Lambda's
                        own transient errors
           MaxConcurrency, ToleratedFailurePercentage from context
           ResultWriter  batch-summaries/{map run}/manifest.json + SUCCEEDED_0.json / FAILED_0.json
      -> results where the S3 worker writes them: outputs/{model}/{path}.json, errors/...

The batch function is the S3 worker's twin: a :class:`~infra.tierserve_function.TierserveFunction`
with the worker's environment and data-bucket grants (``infra.s3_pipeline``), so results and
their idempotency are the pipeline's. The state machine's role may list ``inputs/`` only, read
``manifests/*`` and ``inventory/*``, write ``batch-summaries/*``, invoke the batch function,
and run and stop its own child executions; it logs every event (no execution data: inputs are
keys, but outputs may name them) to a log group with the configured retention, and is traced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aws_cdk import ArnFormat, Duration, Fn, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from constructs import Construct

from infra.nag import acknowledge, policy_wildcard_findings, wildcard_resource_finding
from infra.s3_pipeline import (
    grant_data_bucket,
    grant_invoke_endpoints,
    pipeline_function_environment,
    pipeline_memory_mb,
    prefix_pattern,
)
from infra.tierserve_function import TierserveFunction
from infra.trust import service_principal
from tierserve.batch import BATCH_RETRY, COLD_RETRY, READERS
from tierserve.catalog import Manifest
from tierserve.settings import INPUT_PREFIX, INVENTORY_PREFIX, MANIFEST_PREFIX, SUMMARY_PREFIX, GpuTarget

BATCH_HANDLER = "batch.handler"
# Lambda's own transient failures, retried with the batch's BatchItemsFailed (the batch is idempotent).
LAMBDA_TRANSIENT_ERRORS = (
    "Lambda.ServiceException",
    "Lambda.AWSLambdaException",
    "Lambda.SdkClientException",
    "Lambda.TooManyRequestsException",
)
MAP_LABEL = "Batches"


class BatchInference(Construct):
    """The batch function and the state machine that runs it over a data bucket.

    ``models`` are every model a run may serve (the batch function's ``TIERSERVE_MODELS``);
    those in ``gpu_endpoints`` run on their SageMaker endpoint. The stack grants the reads of
    each model's objects (``ModelStore.grant_read_model(batch.function, manifest)``).

    Attributes: ``function``, ``role`` (the function's), ``state_machine``,
    ``state_machine_role``, ``log_group`` (the state machine's), ``maps`` (reader -> its
    Distributed Map state).
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
        function_timeout: Duration,
        ephemeral_storage_mb: int,
        items_per_batch: int,
        max_concurrency: int,
        tolerated_failure_percentage: float,
        log_retention: logs.RetentionDays,
        log_level: str,
    ) -> None:
        super().__init__(scope, construct_id)
        self.data_bucket = data_bucket
        batch = TierserveFunction(
            self,
            "Function",
            handler=BATCH_HANDLER,
            architecture=architecture,
            models=models,
            model_bucket_name=model_bucket_name,
            model_prefix=model_prefix,
            memory_mb=pipeline_memory_mb(models, gpu_endpoints),
            timeout=function_timeout,
            ephemeral_storage_mb=ephemeral_storage_mb,
            log_retention=log_retention,
            log_level=log_level,
            environment=pipeline_function_environment(data_bucket, gpu_endpoints),
            description=f"tierserve batch function: a Distributed Map's batches of {INPUT_PREFIX}/ keys "
            f"for {len(models)} model(s)",
            role_description="tierserve batch function: reads inputs/, writes outputs/ and errors/, reads its models",
        )
        self.function, self.role = batch.function, batch.role
        grant_data_bucket(self.role, data_bucket)
        grant_invoke_endpoints(self.role, self, gpu_endpoints)
        self.log_group = logs.LogGroup(self, "StateMachineLogs", retention=log_retention)
        self.state_machine_role = iam.Role(
            self,
            "StateMachineRole",
            # Step Functions presents its state machine's ARN (its confused-deputy guidance).
            assumed_by=service_principal(
                self,
                "states.amazonaws.com",
                source_arn=Stack.of(self).format_arn(
                    service="states",
                    resource="stateMachine",
                    resource_name="*",
                    arn_format=ArnFormat.COLON_RESOURCE_NAME,
                ),
            ),
            description="tierserve batch state machine: lists inputs/, reads manifests, runs the batch function",
        )
        self.maps = {
            reader: self._map(reader, items_per_batch, max_concurrency, tolerated_failure_percentage)
            for reader in READERS
        }
        choice = sfn.Choice(
            self, "Reader", state_name="Reader", comment="which item reader the run asked for"
        )
        for reader, distributed_map in self.maps.items():
            choice.when(sfn.Condition.string_equals("$.reader", reader), distributed_map)
        choice.otherwise(
            sfn.Fail(
                self,
                "UnknownReader",
                error="tierserve.UnknownReader",
                cause=f"the execution input's reader must be one of {', '.join(READERS)} (tierserve batch writes it)",
            )
        )
        self.state_machine = sfn.StateMachine(
            self,
            "StateMachine",
            definition_body=sfn.DefinitionBody.from_chainable(choice),
            role=self.state_machine_role,
            state_machine_type=sfn.StateMachineType.STANDARD,
            tracing_enabled=True,
            logs=sfn.LogOptions(
                destination=self.log_group, level=sfn.LogLevel.ALL, include_execution_data=False
            ),
            comment="tierserve bulk inference: every input under a prefix (or in a manifest) through the batch function",
        )
        self._acknowledge()

    def _map(
        self, reader: str, items_per_batch: int, max_concurrency: int, tolerated_failure_percentage: float
    ) -> sfn.DistributedMap:
        """One Distributed Map for ``reader``: its item reader, the shared batching and limits,
        and the batch function as its item processor."""
        distributed_map = sfn.DistributedMap(
            self,
            f"Map-{reader}",
            state_name=f"Serve {reader}",
            label=f"{MAP_LABEL}{reader.capitalize()}",
            item_reader=self._item_reader(reader),
            item_batcher=sfn.ItemBatcher(
                max_items_per_batch=items_per_batch,
                # The run's model comes from its input; the bucket and the reader are this map's.
                batch_input={"bucket": self.data_bucket.bucket_name, "model.$": "$.model", "reader": reader},
            ),
            max_concurrency=max_concurrency,
            tolerated_failure_percentage=tolerated_failure_percentage,
            result_writer_v2=self._result_writer(),
            map_execution_type=sfn.StateMachineType.STANDARD,
        )
        serve = tasks.LambdaInvoke(
            self,
            f"ServeBatch-{reader}",
            state_name=f"Serve a batch ({reader})",
            lambda_function=self.function,
            payload_response_only=True,
            retry_on_service_exceptions=False,  # retried below, with the batch's own errors
        )
        serve.add_retry(
            errors=[*BATCH_RETRY.errors, *LAMBDA_TRANSIENT_ERRORS],
            interval=Duration.seconds(BATCH_RETRY.interval_s),
            max_attempts=BATCH_RETRY.max_attempts,
            backoff_rate=BATCH_RETRY.backoff_rate,
        )
        # Items that wait for a GPU model with no copy running: retried until a copy may be up.
        serve.add_retry(
            errors=list(COLD_RETRY.errors),
            interval=Duration.seconds(COLD_RETRY.interval_s),
            max_attempts=COLD_RETRY.max_attempts,
            backoff_rate=COLD_RETRY.backoff_rate,
            max_delay=Duration.seconds(COLD_RETRY.max_delay_s or 0),
        )
        distributed_map.item_processor(serve)
        return distributed_map

    def _result_writer(self) -> sfn.ResultWriterV2:
        """The map run's summary under batch-summaries/, permitted there only (CDK would grant
        the whole bucket and its listing)."""
        writing = iam.PolicyStatement(
            actions=[
                "s3:PutObject",
                "s3:GetObject",
                "s3:ListMultipartUploadParts",
                "s3:AbortMultipartUpload",
            ],
            resources=[self.data_bucket.arn_for_objects(prefix_pattern(SUMMARY_PREFIX))],
        )
        return _SummaryWriter([writing], bucket=self.data_bucket, prefix=SUMMARY_PREFIX)

    def _item_reader(self, reader: str) -> sfn.IItemReader:
        """The reader's ASL as CDK renders it, with its permissions narrowed to the prefix it
        reads (CDK would grant s3:GetObject on the whole bucket for a key given as a path)."""
        bucket, key = self.data_bucket, sfn.JsonPath.string_at("$.key")
        if reader == "prefix":
            listing = iam.PolicyStatement(
                actions=["s3:ListBucket"],
                resources=[bucket.bucket_arn],
                conditions={"StringLike": {"s3:prefix": [prefix_pattern(INPUT_PREFIX)]}},
            )
            return _PrefixReader([listing], bucket=bucket, prefix=key)
        folder = INVENTORY_PREFIX if reader == "inventory" else MANIFEST_PREFIX
        reading = iam.PolicyStatement(
            actions=["s3:GetObject"], resources=[bucket.arn_for_objects(prefix_pattern(folder))]
        )
        if reader == "csv":
            return _CsvReader([reading], bucket=bucket, key=key, csv_headers=sfn.CsvHeaders.use_first_row())
        if reader == "json":
            return _JsonReader([reading], bucket=bucket, key=key)
        return _InventoryReader([reading], bucket=bucket, key=key)

    def _acknowledge(self) -> None:
        """Each wildcard the state machine's role holds, by its exact finding, with its reason."""
        role, bucket = self.state_machine_role, self.data_bucket
        reasons = {
            bucket.arn_for_objects(prefix_pattern(MANIFEST_PREFIX)): "The CSV and JSON item readers read the "
            "manifest a run names (tierserve batch --manifest): any key under manifests/, never inputs or results.",
            bucket.arn_for_objects(
                prefix_pattern(INVENTORY_PREFIX)
            ): "The S3 Inventory item reader reads the "
            "manifest.json and data files S3 Inventory delivers under inventory/: keys S3 chooses.",
            bucket.arn_for_objects(prefix_pattern(SUMMARY_PREFIX)): "The ResultWriter writes each map run's "
            "summary under batch-summaries/{map run id}/: keys Step Functions chooses per run.",
            Fn.join(
                "", [self.function.function_arn, ":*"]
            ): "Invoking the batch function (CDK's LambdaInvoke "
            "grant): the function and its versions or aliases, no other function.",
        }
        for arn, reason in reasons.items():
            acknowledge(role, wildcard_resource_finding(role, arn), reason)
        acknowledge(
            role,
            "AwsSolutions-IAM5[Resource::*]",
            "Logging to CloudWatch Logs (logs:CreateLogDelivery and the other log-delivery actions) and X-Ray "
            "tracing support no resource-level permissions: the Step Functions docs require Resource '*'.",
        )
        distributed = self.state_machine.node.try_find_child("DistributedMapPolicy")
        if isinstance(distributed, iam.Policy):
            for finding in policy_wildcard_findings(distributed):
                acknowledge(
                    distributed,
                    finding,
                    "A Distributed Map starts, describes, stops and redrives the child executions of this "
                    "state machine only (CDK's DistributedMapPolicy): their names are chosen per map run.",
                )


class _ScopedReader:
    """An item reader (or result writer) whose permissions are the statements given, not CDK's."""

    _statements: list[iam.PolicyStatement]

    def provide_policy_statements(self) -> list[iam.PolicyStatement]:
        return list(self._statements)


class _PrefixReader(_ScopedReader, sfn.S3ObjectsItemReader):
    def __init__(self, statements: list[iam.PolicyStatement], **props: object) -> None:
        super().__init__(**props)
        self._statements = statements


class _CsvReader(_ScopedReader, sfn.S3CsvItemReader):
    def __init__(self, statements: list[iam.PolicyStatement], **props: object) -> None:
        super().__init__(**props)
        self._statements = statements


class _JsonReader(_ScopedReader, sfn.S3JsonItemReader):
    def __init__(self, statements: list[iam.PolicyStatement], **props: object) -> None:
        super().__init__(**props)
        self._statements = statements


class _InventoryReader(_ScopedReader, sfn.S3ManifestItemReader):
    def __init__(self, statements: list[iam.PolicyStatement], **props: object) -> None:
        super().__init__(**props)
        self._statements = statements


class _SummaryWriter(_ScopedReader, sfn.ResultWriterV2):
    def __init__(self, statements: list[iam.PolicyStatement], **props: object) -> None:
        super().__init__(**props)
        self._statements = statements
