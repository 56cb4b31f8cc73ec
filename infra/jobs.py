"""AsyncJobs: every model's jobs routes, a tierserve extension of the Open Inference Protocol.

    POST /v2/models/{name}/jobs, POST /v2/models/{name}/versions/{v}/jobs, GET /v2/models/{name}/jobs/{id}
        -> one jobs function (the inference image with ``jobs.handler``) for every model of
           both tiers: it writes the job into the data bucket, presigns the upload and the
           result, and reads the status back; it loads no model
    jobs/{model}/{caller}/{id}/{version}/input.{ext}
        -> the S3 pipeline's notification (``jobs/`` with each ``/input.{ext}`` suffix, added
           by :class:`~infra.s3_pipeline.InferencePipeline`) -> the worker -> output.json or
           error.json beside the input

The routes are methods of the API like every other (its auth mode, throttling, validator). The
data bucket keeps the jobs for ``jobs_expiry_days`` (a lifecycle rule of
:class:`~infra.s3_pipeline.DataStore`); presigned URLs live ``jobs_url_expiry_seconds`` and
name exactly one key. No CORS rule: the clients are SDKs, the CLI and curl, not browsers
(docs/architecture.md, "Async jobs").
"""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Duration, Stack
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra.api import InferenceApi
from infra.config import API_GATEWAY_TIMEOUT_SECONDS
from infra.nag import acknowledge, wildcard_resource_finding
from infra.tierserve_function import TierserveFunction
from tierserve.catalog import Manifest
from tierserve.settings import (
    DATA_BUCKET_ENV,
    ERROR_PREFIX,
    JOB_INPUT_NAME,
    JOB_RECORD_NAME,
    JOB_RESULT_NAMES,
    JOBS_PREFIX,
    JOBS_URL_EXPIRES_S_ENV,
    MAX_INPUT_MB_ENV,
    OUTPUT_PREFIX,
)

JOBS_HANDLER = "jobs.handler"
# What API Gateway may invoke the jobs function for: these methods and paths of this API's stage,
# every model's (one permission each, however many models).
JOB_ROUTE_PATTERNS = {
    "Create": ("POST", "/v2/models/*/jobs"),
    "CreateVersion": ("POST", "/v2/models/*/versions/*/jobs"),
    "Status": ("GET", "/v2/models/*/jobs/*"),
}
JOBS_MEMORY_MB = 512  # no model: S3 calls, and an inline result of at most the response limit
JOBS_EPHEMERAL_MB = 1024  # the image's /tmp floor plus the cache's headroom; nothing is cached
# Key patterns under jobs/ (IAM's * spans slashes): a job's record, its input, its results.
RECORDS = f"{JOBS_PREFIX}/*/{JOB_RECORD_NAME}"
INPUTS = f"{JOBS_PREFIX}/*/{JOB_INPUT_NAME}.*"
OUTPUTS = f"{JOBS_PREFIX}/*/{JOB_RESULT_NAMES[OUTPUT_PREFIX]}"
ERRORS = f"{JOBS_PREFIX}/*/{JOB_RESULT_NAMES[ERROR_PREFIX]}"


def jobs_environment(
    data_bucket: s3.IBucket, *, url_expiry_seconds: int, max_input_mb: int
) -> dict[str, str]:
    """The jobs function's variables beyond the models'."""
    return {
        DATA_BUCKET_ENV: data_bucket.bucket_name,
        JOBS_URL_EXPIRES_S_ENV: str(url_expiry_seconds),
        MAX_INPUT_MB_ENV: str(max_input_mb),
    }


def grant_jobs_function(role: iam.IRole, bucket: s3.IBucket) -> None:
    """What the jobs function may do in the data bucket, and nothing else there: write a job's
    record and input (the presigned PUT is signed with this role, so it is this grant); read
    records, inputs and results (the status, the inline result, the presigned GET); list only
    under ``jobs/`` (a job's folder is its status)."""
    arns = {pattern: bucket.arn_for_objects(pattern) for pattern in (RECORDS, INPUTS, OUTPUTS, ERRORS)}
    statements = [
        iam.PolicyStatement(actions=["s3:PutObject"], resources=[arns[RECORDS], arns[INPUTS]]),
        iam.PolicyStatement(actions=["s3:GetObject"], resources=list(arns.values())),
        iam.PolicyStatement(
            actions=["s3:ListBucket"],
            resources=[bucket.bucket_arn],
            conditions={"StringLike": {"s3:prefix": [f"{JOBS_PREFIX}/*"]}},
        ),
    ]
    for statement in statements:
        role.add_to_principal_policy(statement)
    reasons = {
        arns[RECORDS]: "Writes and reads jobs/{model}/{caller}/{id}/job.json: the id is 128 random bits "
        "chosen per job, so the key cannot be known at synth.",
        arns[INPUTS]: "Writes a job's inline input, and signs the presigned PUT of an uploaded one, at "
        "jobs/{model}/{caller}/{id}/{version}/input.{ext}; per-job keys, as above.",
        arns[OUTPUTS]: "Reads a job's output.json (inline in the status, or through a presigned GET it "
        "signs); per-job keys, as above.",
        arns[ERRORS]: "Reads a job's error.json, the pipeline's reason it failed; per-job keys, as above.",
    }
    for arn, reason in reasons.items():
        acknowledge(role, wildcard_resource_finding(role, arn), reason)


def grant_job_results(role: iam.IRole, bucket: s3.IBucket) -> None:
    """What the S3 worker may do with jobs: read their inputs (any version the event names);
    read, write and delete their results, beside each input. Never write an input or a record."""
    inputs = bucket.arn_for_objects(INPUTS)
    results = [bucket.arn_for_objects(OUTPUTS), bucket.arn_for_objects(ERRORS)]
    role.add_to_principal_policy(
        iam.PolicyStatement(actions=["s3:GetObject", "s3:GetObjectVersion"], resources=[inputs])
    )
    role.add_to_principal_policy(
        iam.PolicyStatement(actions=["s3:GetObject", "s3:PutObject", "s3:DeleteObject"], resources=results)
    )
    acknowledge(
        role,
        wildcard_resource_finding(role, inputs),
        "Reads the input of any job (jobs/{model}/{caller}/{id}/{version}/input.{ext}), as the event "
        "names it: ids are random per job.",
    )
    for arn in results:
        acknowledge(
            role,
            wildcard_resource_finding(role, arn),
            "Writes a job's result beside its input, and reads or removes it when the other kind "
            "replaces it (the pipeline's conditional writes): per-job keys.",
        )


class AsyncJobs(Construct):
    """The jobs function of every model in ``models`` (both tiers), with its grants on
    ``data_bucket``'s ``jobs/``; :meth:`add_model` gives a model its jobs routes in ``api``.

    Attributes: ``function``, ``alias`` (what the routes invoke), ``role``, ``log_group``,
    ``integration``, ``methods``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        api: InferenceApi,
        data_bucket: s3.IBucket,
        models: Sequence[Manifest],
        architecture: lambda_.Architecture,
        model_bucket_name: str,
        model_prefix: str,
        url_expiry_seconds: int,
        max_input_mb: int,
        log_retention: logs.RetentionDays,
        log_level: str,
    ) -> None:
        super().__init__(scope, construct_id)
        self._api = api
        made = TierserveFunction(
            self,
            "Function",
            handler=JOBS_HANDLER,
            architecture=architecture,
            models=models,
            model_bucket_name=model_bucket_name,
            model_prefix=model_prefix,
            memory_mb=JOBS_MEMORY_MB,
            timeout=Duration.seconds(API_GATEWAY_TIMEOUT_SECONDS),
            ephemeral_storage_mb=JOBS_EPHEMERAL_MB,
            log_retention=log_retention,
            log_level=log_level,
            environment=jobs_environment(
                data_bucket, url_expiry_seconds=url_expiry_seconds, max_input_mb=max_input_mb
            ),
            description=f"tierserve jobs: POST/GET /v2/models/{{model}}/jobs for {len(models)} model(s)",
            role_description="tierserve jobs: writes job records and inputs under jobs/, reads their results",
        )
        self.function, self.alias = made.function, made.alias
        self.role, self.log_group = made.role, made.log_group
        grant_jobs_function(self.role, data_bucket)
        # API Gateway invokes the alias, as every caller of a tierserve function does. A Lambda
        # proxy integration of our own, not LambdaIntegration: that adds a permission per method
        # (three per model), and a function's resource policy holds 20 KB, about 60 of them.
        stack = Stack.of(self)
        self.integration = apigw.Integration(
            type=apigw.IntegrationType.AWS_PROXY,
            integration_http_method="POST",
            uri=f"arn:{stack.partition}:apigateway:{stack.region}:lambda:path/2015-03-31/functions/"
            f"{self.alias.function_arn}/invocations",
        )
        for name, (method, path) in JOB_ROUTE_PATTERNS.items():
            self.alias.add_permission(
                f"ApiPermission{name}",
                principal=iam.ServicePrincipal("apigateway.amazonaws.com"),
                source_arn=api.rest_api.arn_for_execute_api(method, path, api.stage.stage_name),
            )
        self.methods: list[apigw.Method] = []

    def add_model(self, resource: apigw.IResource, version_resource: apigw.IResource) -> None:
        """``POST {resource}/jobs``, ``GET {resource}/jobs/{id}`` and ``POST {version_resource}/jobs``
        to the jobs function (``resource`` is ``/v2/models/{name}``)."""
        jobs = resource.add_resource("jobs")
        self.methods += [
            self._api.add_method(jobs, "POST", self.integration),
            self._api.add_method(jobs.add_resource("{id}"), "GET", self.integration),
            self._api.add_method(version_resource.add_resource("jobs"), "POST", self.integration),
        ]
