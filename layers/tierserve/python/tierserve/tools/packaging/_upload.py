"""Put a package into S3: artifact first, manifest last, nothing twice.

    result = upload_package(packaged, client, "my-bucket", "models", progress=Progress(...))

Layout (README, "How a model is served"):
``s3://{bucket}/{prefix}/{name}/{version}/{artifact, baseline.json, manifest.json}`` (the drift
baseline only when the manifest records one). A reader never finds a manifest without its artifact. In S3 the artifact is named by its
content, ``model-{first 16 hex of its sha256}.onnx.zst`` (:func:`stored_artifact_name`),
and the manifest written there names it; so two uploads racing for one version never write
the same artifact key, and whichever manifest wins names bytes that are there.

Versions are immutable: a version that already holds the same model is left alone once the
artifact its manifest names is checked to be there, whole (else the same bytes are sent
again, or the upload is refused); one that holds another model is refused. An artifact
already there with the same sha256 (a previous upload stopped before its manifest) is not
sent again. The manifest is written only if absent (``If-None-Match: *``), so two racing
uploads cannot both claim a version.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TextIO
from urllib.parse import urlparse, urlsplit

from tierserve import aws
from tierserve.catalog import MANIFEST_NAME, Manifest, ManifestError
from tierserve.drift.baseline import BASELINE_NAME
from tierserve.settings import DEFAULT_MODEL_PREFIX
from tierserve.tools.packaging._artifact import PackagedModel, package_file
from tierserve.tools.packaging._errors import (
    BucketForbidden,
    BucketNotFound,
    BucketUnreachable,
    InvalidModel,
    UploadFailed,
    VersionConflict,
)

MiB = 1024 * 1024
SHA256_METADATA = "sha256"


def transfer_config(threshold_mib: int = 16, chunk_mib: int = 16, concurrency: int = 4) -> Any:
    """boto3's managed transfer: multipart above ``threshold_mib``, parts sent in parallel."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=threshold_mib * MiB,
        multipart_chunksize=chunk_mib * MiB,
        max_concurrency=concurrency,
        use_threads=True,
    )


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        """``s3://bucket/prefix``; ``s3://bucket`` alone means the functions' default prefix, ``models``."""
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise UploadFailed(
                f"{uri!r} is not an S3 location: write it as s3://BUCKET/PREFIX, e.g. s3://my-models/models"
            )
        return cls(parsed.netloc, parsed.path.strip("/") or DEFAULT_MODEL_PREFIX)

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))

    def uri(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.key(*parts)}"


def stored_artifact_name(manifest: Manifest) -> str:
    """The artifact's name in S3, from its content: ``model.onnx.zst`` becomes
    ``model-{first 16 hex of the stored sha256}.onnx.zst`` (a name that has it already is kept)."""
    stem, dot, suffix = manifest.artifact.partition(".")
    tag = f"-{manifest.stored.sha256[:16]}"
    return manifest.artifact if stem.endswith(tag) else f"{stem}{tag}{dot}{suffix}"


@dataclass(frozen=True)
class UploadResult:
    """What happened: ``uploaded`` False when the version already held this model (and nothing
    was sent); ``manifest`` is the one in S3, which names the artifact as it is stored there."""

    uploaded: bool
    artifact_sent: bool
    manifest: Manifest
    manifest_uri: str


def upload_package(
    packaged: PackagedModel,
    client: Any,
    bucket: str,
    prefix: str = DEFAULT_MODEL_PREFIX,
    progress: Callable[[int], None] | None = None,
    config: Any = None,
) -> UploadResult:
    """Upload the artifact, then the manifest. See the module docstring for the rules.

    Raises:
        InvalidModel: the artifact is a symlink or not a plain file of the package folder.
        VersionConflict: the version holds a different model (or another tier override).
        BucketNotFound / BucketForbidden / BucketUnreachable / UploadFailed: S3's answer,
            as one line that says what to do.
    """
    package_file(packaged.directory, packaged.artifact.name)  # no symlink out of the package is sent
    where = S3Location(bucket, prefix.strip("/"))
    manifest = replace(packaged.manifest, artifact=stored_artifact_name(packaged.manifest))
    manifest_uri = where.uri(manifest.key_prefix, MANIFEST_NAME)
    manifest_key = where.key(manifest.key_prefix, MANIFEST_NAME)
    artifact_key = where.key(manifest.key_prefix, manifest.artifact)
    try:
        existing = _existing_manifest(client, bucket, manifest_key)
        if existing is not None:
            if existing.model.sha256 == manifest.model.sha256 and existing.tier == manifest.tier:
                return _already_there(packaged, existing, client, where, progress, config)
            raise VersionConflict(
                f"{where.uri(manifest.key_prefix)} already holds a different {manifest.name}@{manifest.version} "
                f"(model sha256 {existing.model.sha256[:12]}…, tier {existing.tier or 'by size'}): versions are "
                "immutable, package it as a new --version"
            )
        send = not _artifact_present(client, bucket, artifact_key, manifest)
        if send:
            _send_artifact(packaged, client, bucket, artifact_key, progress, config)
        elif progress is not None:
            progress(manifest.stored.bytes)
        _send_baseline(packaged, client, bucket, where.key(manifest.key_prefix, BASELINE_NAME))
        client.put_object(
            Bucket=bucket,
            Key=manifest_key,
            Body=manifest.to_json().encode(),
            ContentType="application/json",
            ChecksumAlgorithm="SHA256",
            IfNoneMatch="*",  # S3's conditional write: two racing uploads cannot both write a version
        )
    except VersionConflict:
        raise
    except Exception as error:
        if aws.classify(error).kind in ("changed", "raced"):
            raise VersionConflict(
                f"another upload wrote {where.uri(manifest.key_prefix, MANIFEST_NAME)} while this one ran: "
                "run the upload again to see whether it holds the same model"
            ) from None
        raise upload_error(error, where) from None
    return UploadResult(True, send, manifest, manifest_uri)


def _already_there(
    packaged: PackagedModel,
    existing: Manifest,
    client: Any,
    where: S3Location,
    progress: Callable[[int], None] | None,
    config: Any,
) -> UploadResult:
    """The version holds this model: left alone if the artifact its manifest names is there
    with the stored size (and sha256, where recorded); else sent again when this package has
    those very bytes.

    Raises:
        VersionConflict: the artifact is missing or other bytes, and this package cannot repair it.
    """
    manifest_uri = where.uri(existing.key_prefix, MANIFEST_NAME)
    artifact_key = where.key(existing.key_prefix, existing.artifact)
    if _artifact_present(client, where.bucket, artifact_key, existing, digest_required=False):
        return UploadResult(False, False, existing, manifest_uri)
    if packaged.manifest.stored != existing.stored:
        raise VersionConflict(
            f"{manifest_uri} holds this model but the artifact it names, s3://{where.bucket}/{artifact_key}, "
            f"is missing or is not the {existing.stored.bytes:,} bytes it names: upload the package with "
            f"stored sha256 {existing.stored.sha256[:12]}… to repair it, or package a new --version"
        )
    _send_artifact(packaged, client, where.bucket, artifact_key, progress, config)
    return UploadResult(True, True, existing, manifest_uri)


def _send_artifact(
    packaged: PackagedModel,
    client: Any,
    bucket: str,
    key: str,
    progress: Callable[[int], None] | None,
    config: Any,
) -> None:
    client.upload_file(
        str(packaged.artifact),
        bucket,
        key,
        ExtraArgs={
            "ChecksumAlgorithm": "SHA256",
            "ContentType": "application/octet-stream",
            "Metadata": {SHA256_METADATA: packaged.manifest.stored.sha256},
        },
        Callback=progress,
        Config=config or transfer_config(),
    )


def _send_baseline(packaged: PackagedModel, client: Any, bucket: str, key: str) -> None:
    """The drift baseline beside the manifest (before it), when the manifest records one; the
    file must be the one the manifest's digest names."""
    digest = packaged.manifest.extra.get("baseline")
    if not isinstance(digest, dict):
        return
    path = package_file(packaged.directory, BASELINE_NAME)
    body = path.read_bytes()
    if hashlib.sha256(body).hexdigest() != digest.get("sha256"):
        raise InvalidModel(f"{path} is not the baseline its manifest records: package the model again")
    client.put_object(
        Bucket=bucket, Key=key, Body=body, ContentType="application/json", ChecksumAlgorithm="SHA256"
    )


def upload(
    packaged: PackagedModel,
    client: Any,
    bucket: str,
    prefix: str = DEFAULT_MODEL_PREFIX,
    progress: Callable[[int], None] | None = None,
    config: Any = None,
) -> bool:
    """Upload a package (see :func:`upload_package`); False when the version already held it.

    The manifest in S3 names the artifact by its content, not as the package folder does:
    callers that need it (to register it, or to find the artifact) use :func:`upload_package`.
    """
    return upload_package(packaged, client, bucket, prefix, progress, config).uploaded


def _existing_manifest(client: Any, bucket: str, key: str) -> Manifest | None:
    try:
        raw = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as error:
        if object_missing(error):
            return None
        raise
    try:
        return Manifest.from_json(raw)
    except (ValueError, ManifestError):
        raise VersionConflict(
            f"s3://{bucket}/{key} exists but is not a valid manifest: remove it, or package a new --version"
        ) from None


def _artifact_present(
    client: Any, bucket: str, key: str, manifest: Manifest, *, digest_required: bool = True
) -> bool:
    """The artifact is there with the manifest's stored size and sha256. With
    ``digest_required=False`` an object that records no sha256 passes on its size (an artifact
    a manifest in S3 names, which another tool may have put there)."""
    head = _head(client, bucket, key)
    if head is None or head.get("ContentLength") != manifest.stored.bytes:
        return False
    recorded = head.get("Metadata", {}).get(SHA256_METADATA)
    return recorded == manifest.stored.sha256 or (recorded is None and not digest_required)


def _head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        return dict(client.head_object(Bucket=bucket, Key=key))
    except Exception as error:
        if object_missing(error):
            return None
        raise


def object_missing(error: BaseException) -> bool:
    """The object is not there (the bucket is: a missing bucket is :class:`BucketNotFound`)."""
    failure = aws.classify(error)
    return failure.kind == "gone" and not failure.bucket_missing


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def upload_error(error: BaseException, where: S3Location) -> UploadFailed:
    """One line for what S3 (or the network) said, and what to do about it
    (classified by :func:`tierserve.aws.classify`)."""
    if isinstance(error, UploadFailed):
        return error
    failure = aws.classify(error)
    target = f"s3://{where.bucket}/{where.prefix}"
    if failure.bucket_missing:
        return BucketNotFound(
            f"bucket {where.bucket} does not exist: deploy the model store first (cdk deploy) or fix the s3:// location"
        )
    if failure.kind == "denied" and not failure.answered:
        return BucketForbidden(
            f"no AWS credentials to upload to {target} ({failure.code}): run `aws configure` or set AWS_PROFILE"
        )
    if failure.kind == "denied":
        return BucketForbidden(
            f"access to {target} is denied ({failure.code}): the credentials in use need s3:GetObject, "
            "s3:PutObject and s3:ListBucket there (check AWS_PROFILE and the bucket policy)"
        )
    if failure.retryable:
        url = str(getattr(error, "kwargs", {}).get("endpoint_url") or "")
        if not failure.answered and urlsplit(url).hostname in LOOPBACK_HOSTS:
            return BucketUnreachable(
                f"cannot reach S3 for {target} at {url}: nothing answers there, so the `tierserve local` "
                "it names is not running: start `tierserve local` (its banner prints the endpoint to "
                "export), or unset AWS_ENDPOINT_URL_S3 to upload to AWS"
            )
        endpoint = f" ({failure.code})" if failure.answered else ""
        return BucketUnreachable(
            f"cannot reach S3 for {target}{endpoint}: check the network, the region and AWS_ENDPOINT_URL_S3, then retry"
        )
    return UploadFailed(
        f"S3 refused the upload to {target} ({failure.code}): fix the cause and run the upload again"
    )


class Progress:
    """A small progress bar on stderr for boto3's transfer callbacks (called from threads).

    On a terminal it redraws one line; elsewhere (CI logs) it prints only the final line.
    """

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total, self.label = max(total, 1), label
        self.stream = stream or sys.stderr
        self.sent = 0
        self._lock = threading.Lock()
        self._start = time.perf_counter()
        self._drawn = 0.0
        self._interactive = bool(getattr(self.stream, "isatty", lambda: False)())

    def __call__(self, count: int) -> None:
        with self._lock:
            self.sent = min(self.total, self.sent + count)
            now = time.perf_counter()
            if self._interactive and (now - self._drawn > 0.1 or self.sent == self.total):
                self._drawn = now
                self.stream.write("\r" + self._line())
                self.stream.flush()

    def _line(self) -> str:
        width = 30
        done = int(width * self.sent / self.total)
        elapsed = max(time.perf_counter() - self._start, 1e-6)
        rate = self.sent / elapsed / 1e6
        return (
            f"{self.label} [{'#' * done}{'.' * (width - done)}] {self.sent / 1e6:,.1f}/{self.total / 1e6:,.1f} MB "
            f"{rate:,.1f} MB/s"
        )

    def close(self, note: str = "") -> None:
        with self._lock:
            prefix = "\r" if self._interactive else ""
            self.stream.write(prefix + self._line() + (f" {note}" if note else "") + "\n")
            self.stream.flush()
