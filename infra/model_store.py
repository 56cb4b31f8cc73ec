"""ModelStore: the S3 bucket that holds every model version, and its access-log bucket.

Layout (README, "How a model is served"): ``s3://{bucket}/{prefix}/{name}/{version}/``
holds the compressed model and ``manifest.json``. Functions and endpoints read only their own
model version's two objects, the manifest and the artifact it names (the catalog carries the
manifest, so both keys are known at synth: :meth:`ModelStore.grant_read_model`). Other
stacks import the bucket by a named export (:class:`SharedBucketStore`, which the pipeline's
data bucket uses too).

Encryption is SSE-S3 (S3-managed keys), deliberately not KMS: models are not secrets here,
access is already narrowed per model version by IAM and TLS-only by bucket policy, and SSE-S3
keeps cold starts off KMS (no ``kms:Decrypt`` per fetch, no KMS request quota or cost, no
key policy to share with a SageMaker role later). S3 server access logging also only
delivers to SSE-S3 buckets. Pass to KMS with a bucket key if models become confidential.
"""

from __future__ import annotations

from typing import Any

from aws_cdk import CfnOutput, Duration, Fn, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from constructs import Construct, IConstruct

from infra.nag import acknowledge
from tierserve.catalog import NAME_PATTERN, VERSION_PATTERN, Manifest, ManifestError, manifest_key
from tierserve.settings import DEFAULT_MODEL_PREFIX

IAM_WILDCARDS = frozenset("*?")


class SharedBucketStore(Construct):
    """A construct owning one ``bucket`` that constructs in other stacks use.

    Subclasses set ``self.bucket``; other stacks get it through :meth:`bucket_for`, which
    imports it by a named CloudFormation export instead of CDK's automatic, hash-named one:
    a stable contract ops scripts and later stacks can import, and readable ARNs in IAM
    policies and their cdk-nag findings.
    """

    bucket: s3.Bucket

    def __init__(self, scope: Construct, construct_id: str) -> None:
        super().__init__(scope, construct_id)
        self._export_name: str | None = None

    @property
    def export_name(self) -> str:
        """The export other stacks import the bucket name by (created on first use):
        ``{stack}-{construct id}-BucketName``."""
        if self._export_name is None:
            self._export_name = f"{Stack.of(self).stack_name}-{self.node.id}-BucketName"
            CfnOutput(
                self,
                "BucketNameExport",
                value=self.bucket.bucket_name,
                export_name=self._export_name,
                description=f"{self.node.id} bucket name, imported by the stacks that use it",
            )
        return self._export_name

    def bucket_for(self, consumer: IConstruct) -> s3.IBucket:
        """The bucket as ``consumer``'s stack sees it: itself in its own stack, else imported by
        :attr:`export_name` (the consuming stack then deploys after this one)."""
        stack = Stack.of(consumer)
        if stack.node.path == Stack.of(self).node.path:
            return self.bucket
        import_id = f"{self.node.id}Bucket"
        existing = stack.node.try_find_child(import_id)
        if existing is not None:
            return existing  # type: ignore[return-value]
        stack.add_stack_dependency(Stack.of(self), f"imports the {self.node.id} bucket name")
        return s3.Bucket.from_bucket_name(stack, import_id, Fn.import_value(self.export_name))


def private_bucket(
    scope: Construct, construct_id: str, *, removal_policy: RemovalPolicy, **extra: Any
) -> s3.Bucket:
    """A bucket with tierserve's baseline: SSE-S3, no public access, owner-enforced, TLS 1.2+ only."""
    return s3.Bucket(
        scope,
        construct_id,
        encryption=s3.BucketEncryption.S3_MANAGED,
        block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
        object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
        enforce_ssl=True,
        minimum_tls_version=1.2,
        removal_policy=removal_policy,
        **extra,
    )


class ModelStore(SharedBucketStore):
    """A private, versioned, TLS-only, retained bucket for model artifacts.

    Attributes: ``bucket``, ``access_log_bucket``, ``model_prefix``.

    Example::

        store = ModelStore(stack, "ModelStore")
        store.grant_read_model(function, manifest)  # models/iris/3/manifest.json and its artifact only
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        model_prefix: str = DEFAULT_MODEL_PREFIX,
        access_log_bucket: s3.IBucket | None = None,
        removal_policy: RemovalPolicy = RemovalPolicy.RETAIN,
    ) -> None:
        super().__init__(scope, construct_id)
        self.model_prefix = model_prefix.strip("/")
        self.access_log_bucket = access_log_bucket or self._access_log_bucket(removal_policy)
        self.bucket = private_bucket(
            self,
            "Bucket",
            removal_policy=removal_policy,
            versioned=True,
            server_access_logs_bucket=self.access_log_bucket,
            server_access_logs_prefix="model-bucket/",
            lifecycle_rules=[s3.LifecycleRule(abort_incomplete_multipart_upload_after=Duration.days(7))],
        )

    def _access_log_bucket(self, removal_policy: RemovalPolicy) -> s3.Bucket:
        bucket = private_bucket(self, "AccessLogs", removal_policy=removal_policy)
        acknowledge(
            bucket,
            "AwsSolutions-S1",
            "This bucket is the server access log target of the model and data buckets; logging its "
            "own access would log the log deliveries themselves, without end.",
        )
        return bucket

    def grant_read_model(self, grantee: iam.IGrantable, manifest: Manifest) -> iam.Grant:
        """Let ``grantee`` read the manifest and the artifact of ``manifest``'s model version,
        and nothing else in the bucket."""
        consumer = grantee if isinstance(grantee, Construct) else grantee.grant_principal
        return grant_model_read(self.bucket_for(consumer), grantee, manifest, prefix=self.model_prefix)


def model_objects_pattern(name: str, version: str, *, prefix: str = DEFAULT_MODEL_PREFIX) -> str:
    """The object keys of one version of model ``name``: ``{prefix}/{name}/{version}/*``."""
    if not NAME_PATTERN.match(name):
        raise ValueError(f"model name {name!r} must be lowercase letters, digits and dashes")
    if not VERSION_PATTERN.match(version):
        raise ValueError(f"model version {version!r} must be letters, digits, '.', '_' or '-'")
    return "/".join(part for part in (prefix.strip("/"), name, version, "*") if part)


def model_object_keys(manifest: Manifest, *, prefix: str = DEFAULT_MODEL_PREFIX) -> tuple[str, str]:
    """The two objects a model version is: ``{prefix}/{name}/{version}/manifest.json`` and the
    artifact the manifest names next to it.

    Raises ValueError (a :class:`ManifestError`) for a manifest whose name, version or
    artifact could reach other keys, IAM's wildcards ``*`` and ``?`` included.
    """
    manifest.validate()
    if IAM_WILDCARDS & set(manifest.artifact):
        raise ManifestError(f"artifact {manifest.artifact!r} must not contain IAM wildcards (* or ?)")
    folder = model_objects_pattern(manifest.name, manifest.version, prefix=prefix).removesuffix("*")
    return manifest_key(prefix, manifest.name, manifest.version), folder + manifest.artifact


def grant_model_read(
    bucket: s3.IBucket,
    grantee: iam.IGrantable,
    manifest: Manifest,
    *,
    prefix: str = DEFAULT_MODEL_PREFIX,
) -> iam.Grant:
    """Grant ``s3:GetObject`` on exactly the manifest and the artifact of ``manifest``'s model
    version, and ``s3:ListBucket`` limited to that version's folder.

    A missing manifest or artifact is never a 404 for the client: the store maps S3's NoSuchKey
    to a 503 that says to upload the model or fix the deployed version, and AccessDenied (what
    S3 answers for a missing key to a caller it does not let list the bucket) to a 503 that
    names the role's permissions (``tierserve.store.artifact_error``). The listing reveals key names
    under the version's folder, never bytes; it is what lets S3 tell a missing key (404) from
    a forbidden one.
    """
    objects_arns = [bucket.arn_for_objects(key) for key in model_object_keys(manifest, prefix=prefix)]
    grant = iam.Grant.add_to_principal(grantee=grantee, actions=["s3:GetObject"], resource_arns=objects_arns)
    iam.Grant.add_to_principal(
        grantee=grantee,
        actions=["s3:ListBucket"],
        resource_arns=[bucket.bucket_arn],
        conditions={
            "StringLike": {
                "s3:prefix": [model_objects_pattern(manifest.name, manifest.version, prefix=prefix)]
            }
        },
    )
    return grant
