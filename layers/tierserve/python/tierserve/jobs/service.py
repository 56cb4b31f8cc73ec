"""The jobs routes' operations: create a job (its input inline, or an upload URL), and read its
status, from S3 alone.

A job is its folder (:mod:`tierserve.jobs.keys`): the record written at creation (version,
format, until when an upload may arrive), the input (written here, or PUT by the caller
through the presigned URL), and the result the S3 pipeline's worker writes for that input (an
output, or an error document with the reason). Status is one listing of the folder, read in
this order:

    output exists          succeeded: the OIP response inline when it fits the response
                           limit, else a presigned GET URL of it and its expiry
    error exists           failed: the pipeline's reason and its status code
    input exists           pending (queued or running: S3 cannot tell them apart)
    upload URL expired     failed: nothing was uploaded in time
    otherwise              pending, awaiting the upload

No table, no lock: the worker's conditional writes already decide which result is current.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from tierserve import aws
from tierserve.errors import (
    BadRequest,
    JobNotFound,
    PayloadTooLarge,
    TierserveError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tierserve.jobs.keys import ID_PATTERN, JobKeys, caller_of, input_object_key, new_job_id
from tierserve.jobs.settings import JobsSettings
from tierserve.protocol import BINARY_CONTENT_TYPE, HEADER_LENGTH, JSON_CONTENT_TYPE, EncodedResponse, header
from tierserve.registry import ModelRegistry
from tierserve.routes import HttpRequest, HttpResponse
from tierserve.s3_pipeline.events import InputKey, PoisonMessage, parse_input_key
from tierserve.settings import (
    ERROR_PREFIX,
    INPUT_FORMATS,
    MAX_INPUT_MB_ENV,
    MAX_JSONL_MB_ENV,
    MAX_REQUEST_MB_ENV,
    OUTPUT_PREFIX,
    ModelRef,
)
from tierserve.telemetry import logger, record_count

DEFAULT_UPLOAD_FORMAT = ".json"
UPLOAD_CONTENT_TYPE = BINARY_CONTENT_TYPE
HEADER_LENGTH_PATTERN = re.compile(r"^[0-9]{1,12}$")  # S3 metadata is ASCII; a length is digits
UPLOAD_FIELDS = ("format", "bytes", "inference_header_content_length")
# What a status document adds around an inline result (ids, times, keys); a result that leaves
# less room than this is not even read: its URL is answered.
STATUS_OVERHEAD_BYTES = 2048
MAX_ERROR_DOCUMENT_BYTES = 64 * 1024
LIST_MAX_KEYS = 10  # a job's folder: its record, input, and one result (two while one replaces the other)
Measure = Callable[[EncodedResponse], int]
# Metrics of the jobs function (namespace Tierserve, like tierserve.telemetry's): jobs created,
# inline or by upload, and status reads that found a job.
JOBS_CREATED = "JobsCreated"
JOB_STATUS_READS = "JobStatusReads"


@dataclass(frozen=True)
class Upload:
    """What a caller asked to upload: its format, and optionally its exact size (then signed:
    S3 refuses another) and, for ``.bin``, its JSON header's length (signed as metadata)."""

    format: str = DEFAULT_UPLOAD_FORMAT
    bytes: int | None = None
    header_length: int | None = None

    @classmethod
    def parse(cls, value: Any) -> Upload:
        """``true`` or ``{"format": "npy", "bytes": N, "inference_header_content_length": N}``.

        Raises:
            BadRequest: anything else, with the accepted shape.
        """
        if value is True:
            return cls()
        if not isinstance(value, dict) or set(value) - set(UPLOAD_FIELDS):
            raise BadRequest(
                '"upload" must be true or an object with some of '
                f'{", ".join(UPLOAD_FIELDS)}, e.g. {{"upload": {{"format": "npy", "bytes": 1048576}}}}'
            )
        fmt = str(value.get("format", DEFAULT_UPLOAD_FORMAT)).lower()
        fmt = fmt if fmt.startswith(".") else f".{fmt}"
        if fmt not in INPUT_FORMATS:
            raise BadRequest(
                f"upload format {value.get('format')!r} is not one the pipeline reads: use one of "
                f"{', '.join(f.lstrip('.') for f in INPUT_FORMATS)}"
            )
        size = _count(value, "bytes", low=1)
        header_length = _count(value, "inference_header_content_length", low=0)
        if (fmt == ".bin") != (header_length is not None):
            raise BadRequest(
                'a "bin" upload (the binary tensor extension) needs "inference_header_content_length", '
                "the length of its JSON header, and only a bin upload takes it"
            )
        return cls(fmt, size, header_length)


def _count(value: Mapping[str, Any], name: str, *, low: int) -> int | None:
    found = value.get(name)
    if found is None:
        return None
    if not isinstance(found, int) or isinstance(found, bool) or found < low:
        raise BadRequest(f'"{name}" must be a whole number of bytes, {low} or more; got {found!r}')
    return found


class Jobs:
    """The jobs of the models ``settings`` names, kept in its data bucket. ``measure`` counts a
    response as its transport sends it (the Lambda transport's :func:`~tierserve.lambda_proxy.sent_size`)."""

    def __init__(
        self,
        settings: JobsSettings,
        *,
        s3_client_factory: Callable[[], Any] = aws.s3_client,
        measure: Measure | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.registry = ModelRegistry(settings.models)  # resolves names and versions; loads nothing
        self._s3 = s3_client_factory
        self._measure = measure or (lambda encoded: len(encoded.body))
        self._clock = clock

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **options: Any) -> Jobs:
        """The jobs function's service, its settings read once (see :class:`JobsSettings`)."""
        return cls(JobsSettings.from_env(environ), **options)

    @property
    def bucket(self) -> str:
        return self.settings.data_bucket

    # -------------------------------------------------- POST .../jobs

    def create(self, model: str, request: HttpRequest, version: str | None = None) -> HttpResponse:
        """A new job for ``model`` (``version``, or the deployed one): 202 with its id, status
        and URL; its input is the body (a v2 infer request, JSON or binary), or, for no body or
        ``{"upload": ...}``, an ``upload`` object with the presigned PUT that takes it.

        Raises:
            ModelNotFound: no such model or version.
            BadRequest, PayloadTooLarge: a body that is neither, or over its limit.
            TierserveError: S3 refused or failed (503 / 504).
        """
        ref = self.registry.resolve(model, version)
        keys = JobKeys(ref.name, caller_of(request.caller), new_job_id())
        body = request.body
        header_length = header(request.headers, HEADER_LENGTH)
        if header_length is not None:
            length = header_length.strip()
            if not HEADER_LENGTH_PATTERN.match(length) or int(length) > len(body):
                raise BadRequest(
                    f"{HEADER_LENGTH} {header_length[:40]!r} is not the length of the body's JSON header: "
                    f"a whole number of bytes, at most the body's {len(body):,}"
                )
            return self._inline(ref, keys, request, body, ".bin", {HEADER_LENGTH: length})
        if not body.strip():
            return self._upload(ref, keys, request, Upload())
        document = _json_object(body)
        if "upload" in document and "inputs" not in document:
            return self._upload(ref, keys, request, Upload.parse(document["upload"]))
        return self._inline(ref, keys, request, body, ".json", {})

    def _inline(
        self,
        ref: ModelRef,
        keys: JobKeys,
        request: HttpRequest,
        body: bytes,
        fmt: str,
        metadata: Mapping[str, str],
    ) -> HttpResponse:
        limit = self.settings.models.max_request_bytes
        if len(body) > limit:
            raise PayloadTooLarge(
                f"the job's body is {len(body):,} bytes, over the limit of {limit:,} ({MAX_REQUEST_MB_ENV}): "
                'POST with no body (or {"upload": {"format": ...}}) for an upload URL that takes any size'
            )
        key = keys.input(ref.version, fmt)
        content_type = BINARY_CONTENT_TYPE if fmt == ".bin" else JSON_CONTENT_TYPE
        # The input first: a record without its input would read "pending" until the job
        # expired; an input whose record failed is served, unseen, and expires with its folder.
        self._put(input_object_key(key), body, content_type, dict(metadata))
        self._write_record(ref, keys, fmt, upload_expires_at=None)
        logger.info("job created", extra={"job": keys.id, "model": str(ref), "input": "inline"})
        record_count(JOBS_CREATED)
        return self._accepted(ref, keys, request, {})

    def _upload(self, ref: ModelRef, keys: JobKeys, request: HttpRequest, upload: Upload) -> HttpResponse:
        limit, variable = self._input_limit(upload.format)
        if upload.bytes is not None and upload.bytes > limit:
            raise PayloadTooLarge(
                f"the upload would be {upload.bytes:,} bytes, over the limit of {limit:,} for "
                f"{upload.format} inputs ({variable}): split it into several jobs"
            )
        expires_s = self.settings.url_expires_s
        expires_at = self._clock() + expires_s
        key = input_object_key(keys.input(ref.version, upload.format))
        # Signed, so the exact headers the upload must carry: S3 refuses any other value.
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "ContentType": UPLOAD_CONTENT_TYPE}
        headers: dict[str, str] = {"Content-Type": UPLOAD_CONTENT_TYPE}
        if upload.bytes is not None:
            params["ContentLength"] = upload.bytes
            headers["Content-Length"] = str(upload.bytes)
        if upload.header_length is not None:
            params["Metadata"] = {HEADER_LENGTH: str(upload.header_length)}
            headers[f"x-amz-meta-{HEADER_LENGTH}"] = str(upload.header_length)
        url = self._s3().generate_presigned_url(
            "put_object", Params=params, ExpiresIn=expires_s, HttpMethod="PUT"
        )
        self._write_record(ref, keys, upload.format, upload_expires_at=_iso(expires_at))
        logger.info("job created", extra={"job": keys.id, "model": str(ref), "input": "upload"})
        record_count(JOBS_CREATED)
        described = {
            "url": url,
            "method": "PUT",
            "headers": headers,
            "expires_at": _iso(expires_at),
            "expires_in_s": expires_s,
            "format": upload.format.lstrip("."),
            "max_bytes": limit,
        }
        return self._accepted(ref, keys, request, {"upload": described})

    def _input_limit(self, fmt: str) -> tuple[int, str]:
        if fmt == ".jsonl":
            return self.settings.pipeline.max_jsonl_bytes, MAX_JSONL_MB_ENV
        return self.settings.pipeline.max_input_bytes, MAX_INPUT_MB_ENV

    def _accepted(
        self, ref: ModelRef, keys: JobKeys, request: HttpRequest, extra: Mapping[str, Any]
    ) -> HttpResponse:
        url = job_url(request, keys.model, keys.id)
        document = {
            "id": keys.id,
            "status": "pending",
            "model_name": ref.name,
            "model_version": ref.version,
            "result": url,
            **extra,
        }
        return HttpResponse.json(document, 202, {"Location": url})

    def _write_record(self, ref: ModelRef, keys: JobKeys, fmt: str, *, upload_expires_at: str | None) -> None:
        record = {
            "id": keys.id,
            "model_name": ref.name,
            "model_version": ref.version,
            "format": fmt,
            "created_at": _iso(self._clock()),
            **({"upload_expires_at": upload_expires_at} if upload_expires_at else {}),
        }
        self._put(keys.record, json.dumps(record).encode(), JSON_CONTENT_TYPE, {}, if_none_match=True)

    # -------------------------------------------------- GET .../jobs/{id}

    def status(self, model: str, job_id: str, request: HttpRequest) -> HttpResponse:
        """The job's status (see the module docstring), for the caller who created it: one
        listing of the job's folder, then the result (or the record, before an upload).

        Raises:
            JobNotFound: no such job for this caller and model (never says which).
            ModelNotFound: the model is not served here.
            TierserveError: S3 refused or failed (503 / 504).
        """
        self.registry.resolve(model)
        keys = JobKeys(model, caller_of(request.caller), job_id)
        listed = self._list(keys.folder) if ID_PATTERN.match(job_id) else {}
        if keys.record not in listed:
            raise JobNotFound(
                f"no job {job_id[:64]!r} of model {model!r} for this caller: it was never created, it "
                "expired, or it was created with other credentials (a job is seen only by its creator)"
            )
        document: dict[str, Any] = {
            "id": keys.id,
            "model_name": model,
            "created_at": _iso_of(listed[keys.record]),
        }
        key = next((found for name in listed if (found := _job_input(name)) is not None), None)
        if key is None:
            return self._awaiting_upload(keys, document)
        document["model_version"] = key.version
        output, error = key.result_key(OUTPUT_PREFIX), key.result_key(ERROR_PREFIX)
        if output in listed:
            return self._succeeded(document, output, listed[output])
        if error in listed:
            return self._failed(document, error, listed[error])
        return HttpResponse.json({**document, "status": "pending", "input": "received"})

    def _awaiting_upload(self, keys: JobKeys, document: dict[str, Any]) -> HttpResponse:
        record = self._record(keys)
        document = {**document, "model_version": record.get("model_version")}
        expires_at = record.get("upload_expires_at")
        if expires_at and _iso(self._clock()) > str(expires_at):
            return HttpResponse.json(
                {
                    **document,
                    "status": "failed",
                    "error": f"no input was uploaded before the upload URL expired at {expires_at}: "
                    "create a new job",
                    "error_status": 400,
                }
            )
        return HttpResponse.json({**document, "status": "pending", "input": "awaiting upload"})

    def _succeeded(self, document: dict[str, Any], result_key: str, item: Mapping[str, Any]) -> HttpResponse:
        document = {**document, "status": "succeeded", "finished_at": _iso_of(item)}
        size = int(item.get("Size") or 0)
        limit = self.settings.models.max_response_bytes
        if size + STATUS_OVERHEAD_BYTES <= limit:
            body = self._get(result_key)
            inline = json.dumps(document, separators=(",", ":")).encode()[:-1] + b',"result":' + body + b"}"
            if self._measure(EncodedResponse(inline, {"Content-Type": JSON_CONTENT_TYPE})) <= limit:
                return HttpResponse(200, inline, {"Content-Type": JSON_CONTENT_TYPE})
        expires_s = self.settings.url_expires_s
        url = self._s3().generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": result_key}, ExpiresIn=expires_s
        )
        return HttpResponse.json(
            {
                **document,
                "result_url": url,
                "result_expires_at": _iso(self._clock() + expires_s),
                "result_bytes": size,
            }
        )

    def _failed(self, document: dict[str, Any], error_key: str, item: Mapping[str, Any]) -> HttpResponse:
        reason: dict[str, Any] = {}
        if int(item.get("Size") or 0) <= MAX_ERROR_DOCUMENT_BYTES:
            try:
                found = json.loads(self._get(error_key))
                reason = found if isinstance(found, dict) else {}
            except (ValueError, _Gone):
                reason = {}
        return HttpResponse.json(
            {
                **document,
                "status": "failed",
                "finished_at": _iso_of(item),
                "error": reason.get("error", "the pipeline recorded an error it did not describe"),
                "error_status": reason.get("status", 400),
            }
        )

    # -------------------------------------------------- S3

    def _list(self, folder: str) -> dict[str, Mapping[str, Any]]:
        """The job's objects (key -> its listing entry); a folder holds four at most."""
        try:
            page = self._s3().list_objects_v2(Bucket=self.bucket, Prefix=folder, MaxKeys=LIST_MAX_KEYS)
        except Exception as error:
            raise self._error(error, folder, "s3:ListBucket") from error
        return {str(item["Key"]): item for item in page.get("Contents", [])}

    def _record(self, keys: JobKeys) -> dict[str, Any]:
        try:
            record = json.loads(self._get(keys.record))
        except (ValueError, _Gone):
            record = None
        return record if isinstance(record, dict) else {}

    def _get(self, key: str) -> bytes:
        try:
            response = self._s3().get_object(Bucket=self.bucket, Key=key)
            with response["Body"] as stream:
                return stream.read()
        except Exception as error:
            if aws.classify(error).kind == "gone":
                raise _Gone(key) from None
            raise self._error(error, key, "s3:GetObject") from error

    def _put(
        self,
        key: str,
        body: bytes,
        content_type: str,
        metadata: dict[str, str],
        *,
        if_none_match: bool = False,
    ) -> None:
        condition = {"IfNoneMatch": "*"} if if_none_match else {}
        try:
            self._s3().put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentType=content_type,
                Metadata=metadata,
                **condition,
            )
        except Exception as error:
            raise self._error(error, key, "s3:PutObject") from error

    def _error(self, error: BaseException, key: str, permission: str) -> TierserveError:
        if isinstance(error, TierserveError):
            return error
        failure = aws.classify(error)
        where = f"s3://{self.bucket}/{key}"
        if failure.kind == "denied":
            return UpstreamUnavailable(
                f"access to {where} is denied ({failure.code}): the jobs function's role must allow "
                f"{permission} there"
            )
        if failure.kind == "timeout":
            return UpstreamTimeout(f"S3 did not answer in time for {where}; retry")
        return UpstreamUnavailable(f"S3 is unavailable for {where} ({failure.code}); retry shortly")


class _Gone(Exception):
    """The object does not exist."""


def _json_object(body: bytes) -> dict[str, Any]:
    from tierserve.protocol import loads

    try:
        document = loads(body)
    except (ValueError, RecursionError):
        document = None
    if not isinstance(document, dict):
        raise BadRequest(
            'a job\'s body is a v2 infer request ({"inputs": [...]}, JSON or the binary extension), '
            '{"upload": true | {"format": ...}} for an upload URL, or nothing (an upload of a .json request)'
        )
    return document


def _job_input(key: str) -> InputKey | None:
    try:
        return parse_input_key(key)
    except PoisonMessage:
        return None


def _iso_of(item: Mapping[str, Any]) -> str | None:
    """When a listed object was written (its ``LastModified``), as the document's times read."""
    modified = item.get("LastModified")
    return _iso(modified.timestamp()) if isinstance(modified, datetime) else None


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def job_url(request: HttpRequest, model: str, job_id: str) -> str:
    """The job's status URL as its caller reaches it: behind API Gateway the stage (or a custom
    domain's base path) comes before the resource path, as ``requestContext.path`` shows; with
    no ``Host`` header, the path alone."""
    path = f"/v2/models/{quote(model, safe='')}/jobs/{job_id}"
    host = header(request.headers, "host")
    if not host:
        return path
    proto = header(request.headers, "x-forwarded-proto") or "http"
    prefix = ""
    if request.context.get("domainName"):
        full = str(request.context.get("path") or "")
        prefix = full[: -len(request.path)] if request.path and full.endswith(request.path) else ""
    return f"{proto}://{host}{prefix}{path}"
