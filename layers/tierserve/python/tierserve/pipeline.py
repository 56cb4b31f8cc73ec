"""Inference on files put into S3: ``inputs/{model}/{path}`` -> ``outputs/{model}/{path}.json``.

Transport-free: the Lambda worker (``functions/inference/worker.py``) hands each SQS message
body to :meth:`Pipeline.handle_message`, and so does the local poller. For every S3 record
the message carries, exactly one of these happens:

- **output**: the model ran; ``outputs/{model}/{path}.json`` holds an OIP response (one
  PutObject, deterministic bytes).
- **error**: the input cannot be served (malformed, wrong signature, unknown model, too
  large); ``errors/{model}/{path}.json`` holds the reason. Retrying would not help, so the
  message is done.
- **skipped**: nothing to do: an ``s3:TestEvent``, a key outside ``inputs/``, a folder
  marker, an input deleted or overwritten since the event, an older event than the result
  already written (S3 ``sequencer``), or a duplicate delivery of one already served.
- **raised**: a transient fault (:func:`tierserve.errors.is_retryable`: S3 or the GPU
  endpoint down or slow) or a message that can never be read (:class:`PoisonMessage`). The
  worker reports the message as a batch item failure; SQS redelivers it and moves it to the
  dead-letter queue after ``maxReceiveCount`` receives. Nothing is written.

Idempotent and ordered: each result object records, in its S3 metadata, the input's
sequencer, ETag and version id and the model that served it. A result is written with a
conditional PutObject (``If-None-Match: *`` or ``If-Match`` on the result seen at the start),
so a concurrent or older delivery can never overwrite a newer result, and a redelivery after
a crash rewrites the same bytes or is recognised as a duplicate. An input has one result:
writing an output removes a stale error for the same path, and the other way round; a
duplicate delivery that finds the older result of the other kind still there (the writer
died before removing it) removes it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import unquote_plus

import numpy as np

from tierserve.catalog import Manifest
from tierserve.config import (
    DATA_BUCKET_ENV,
    ERROR_PREFIX,
    GPU_ENDPOINTS_ENV,
    INPUT_PREFIX,
    MAX_INPUT_MB_ENV,
    MAX_JSONL_MB_ENV,
    MAX_ROWS_ENV,
    MB,
    OUTPUT_PREFIX,
    ROW_BATCH_SIZE_ENV,
    WORKER_CONCURRENCY_ENV,
    ModelRef,
    Settings,
)
from tierserve.errors import (
    BadRequest,
    ModelNotFound,
    PayloadTooLarge,
    TierserveError,
    UpstreamUnavailable,
    is_retryable,
    to_http,
)
from tierserve.model import Model
from tierserve.protocol import (
    InferenceRequest,
    RequestedOutput,
    decode_json,
    encode_infer_response,
    parse_infer_request,
    request_from_arrays,
)
from tierserve.remote import SageMakerModel
from tierserve.sessions import ModelRegistry
from tierserve.store import default_s3_client, error_code, s3_error
from tierserve.telemetry import (
    INFERENCE_MS,
    PIPELINE_ERROR,
    PIPELINE_OUTPUT,
    PIPELINE_ROWS,
    PIPELINE_SKIPPED,
    logger,
    record_count,
    record_ms,
    stopwatch,
    tracer,
)

RESULT_SUFFIX = ".json"
FORMATS = (".json", ".jsonl", ".npy")
TEST_EVENT = "s3:TestEvent"
MAX_KEY_BYTES = 1024

DEFAULT_ROW_BATCH_SIZE = 64
DEFAULT_MAX_INPUT_MB = 64.0
DEFAULT_MAX_ROWS = 100_000
DEFAULT_MAX_JSONL_MB = 256.0
# Records of one SQS batch served at once: the work is mostly waiting on S3.
DEFAULT_WORKER_CONCURRENCY = 8

# What a result object records about the input it answers (S3 user metadata, x-amz-meta-*).
META_SEQUENCER = "tierserve-sequencer"
META_INPUT_ETAG = "tierserve-input-etag"
META_INPUT_VERSION = "tierserve-input-version-id"
META_MODEL = "tierserve-model"
META_PROCESSED_AT = "tierserve-processed-at"

WRITE_ATTEMPTS = 4
READ_CHUNK_BYTES = 1 * MB
_GONE_CODES = {"NoSuchKey", "NoSuchVersion", "NoSuchBucket", "404"}
_CHANGED_CODES = {"PreconditionFailed", "412"}
_RACE_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}

ResultKind = Literal["outputs", "errors"]


class PoisonMessage(Exception):
    """A message that can never succeed (not an S3 event, or a key that cannot name a result).

    The worker reports it as failed, so SQS moves it to the dead-letter queue; nothing is written.
    """


class _Skip(Exception):
    """The record needs no result (the input is gone or changed since the event)."""


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class PipelineSettings:
    """What the worker reads beyond :class:`~tierserve.config.Settings`, once per process."""

    data_bucket: str | None = None
    gpu_endpoints: Mapping[str, str] = field(default_factory=dict)
    row_batch_size: int = DEFAULT_ROW_BATCH_SIZE
    max_input_bytes: int = int(DEFAULT_MAX_INPUT_MB * MB)
    max_rows: int = DEFAULT_MAX_ROWS
    max_jsonl_bytes: int = int(DEFAULT_MAX_JSONL_MB * MB)
    concurrency: int = DEFAULT_WORKER_CONCURRENCY

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> PipelineSettings:
        """Read the ``TIERSERVE_*`` pipeline variables (see ``docs/s3-inference.md``); overrides win."""
        env = os.environ if environ is None else environ
        settings = cls(
            data_bucket=env.get(DATA_BUCKET_ENV) or None,
            gpu_endpoints=parse_endpoints(env.get(GPU_ENDPOINTS_ENV, "")),
            row_batch_size=int(env.get(ROW_BATCH_SIZE_ENV) or DEFAULT_ROW_BATCH_SIZE),
            max_input_bytes=int(float(env.get(MAX_INPUT_MB_ENV) or DEFAULT_MAX_INPUT_MB) * MB),
            max_rows=int(env.get(MAX_ROWS_ENV) or DEFAULT_MAX_ROWS),
            max_jsonl_bytes=int(float(env.get(MAX_JSONL_MB_ENV) or DEFAULT_MAX_JSONL_MB) * MB),
            concurrency=int(env.get(WORKER_CONCURRENCY_ENV) or DEFAULT_WORKER_CONCURRENCY),
        )
        settings = dataclasses.replace(settings, **overrides) if overrides else settings
        if min(settings.row_batch_size, settings.max_rows, settings.concurrency) < 1:
            raise ValueError(
                f"{ROW_BATCH_SIZE_ENV}, {MAX_ROWS_ENV} and {WORKER_CONCURRENCY_ENV} must be positive"
            )
        return settings


def parse_endpoints(text: str) -> dict[str, str]:
    """``"big=big-endpoint,huge=huge-endpoint"`` -> ``{"big": "big-endpoint", ...}``."""
    endpoints = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, endpoint = (s.strip() for s in part.partition("="))
        if not sep or not name or not endpoint:
            raise ValueError(f"{GPU_ENDPOINTS_ENV} entry {part!r} must look like model=endpoint-name")
        endpoints[name] = endpoint
    return endpoints


# ---------------------------------------------------------------- events and keys


@dataclass(frozen=True)
class S3Object:
    """One ``ObjectCreated`` record: which object, and which version of it."""

    bucket: str
    key: str
    size: int = 0
    etag: str | None = None
    version_id: str | None = None
    sequencer: str | None = None


def parse_message(body: str) -> list[S3Object]:
    """The S3 objects an SQS message body announces (S3 -> SQS, or S3 -> SNS -> SQS).

    An ``s3:TestEvent`` announces nothing; records other than ``ObjectCreated:*`` are
    ignored. Keys arrive URL-encoded (a space as ``+``) and are decoded here.

    Raises:
        PoisonMessage: the body is not an S3 event notification.
    """
    try:
        document = json.loads(body)
    except (TypeError, ValueError):
        raise PoisonMessage("the message body is not JSON, so not an S3 event notification") from None
    if not isinstance(document, dict):
        raise PoisonMessage("the message body is not a JSON object, so not an S3 event notification")
    if document.get("Type") == "Notification" and isinstance(document.get("Message"), str):
        return parse_message(document["Message"])
    if document.get("Event") == TEST_EVENT:
        return []
    records = document.get("Records")
    if not isinstance(records, list) or not records:
        raise PoisonMessage('the message has no "Records": not an S3 event notification')
    objects = []
    for record in records:
        try:
            if record.get("eventSource") != "aws:s3":
                raise PoisonMessage(f"record from {record.get('eventSource')!r}, not aws:s3")
            if not str(record.get("eventName", "")).startswith("ObjectCreated:"):
                logger.info(
                    "ignoring an S3 event that creates nothing", extra={"event": record.get("eventName")}
                )
                continue
            s3 = record["s3"]
            item = s3["object"]
            objects.append(
                S3Object(
                    bucket=str(s3["bucket"]["name"]),
                    key=unquote_plus(str(item["key"])),
                    size=int(item.get("size") or 0),
                    etag=str(item["eTag"]).strip('"') if item.get("eTag") else None,
                    version_id=str(item["versionId"]) if item.get("versionId") else None,
                    sequencer=str(item["sequencer"]) if item.get("sequencer") else None,
                )
            )
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise PoisonMessage(f"an S3 record without {error}: not an S3 event notification") from None
    return objects


@dataclass(frozen=True)
class InputKey:
    """``inputs/{model}/{path}`` split into its model and path, and where its results go."""

    model: str
    path: str

    @property
    def format(self) -> str:
        dot = self.path.rfind(".")
        return self.path[dot:].lower() if dot > self.path.rfind("/") else ""

    def result_key(self, kind: ResultKind) -> str:
        return f"{kind}/{self.model}/{self.path}{RESULT_SUFFIX}"


def parse_input_key(key: str) -> InputKey | None:
    """The model and path of an input key; None for keys that are not inputs (outside
    ``inputs/``, or a folder marker ending in ``/``).

    Raises:
        PoisonMessage: the key has ``..``, ``.`` or empty parts, no path, or is too long
            for its result key; no result can be named for it.
    """
    parts = key.split("/")
    if parts[0] != INPUT_PREFIX or key.endswith("/"):
        return None
    if len(parts) < 3 or any(part in ("", ".", "..") for part in parts):
        raise PoisonMessage(
            f"input key {key!r} must be {INPUT_PREFIX}/{{model}}/{{path}} without empty, '.' or '..' parts"
        )
    parsed = InputKey(parts[1], "/".join(parts[2:]))
    if len(parsed.result_key(OUTPUT_PREFIX).encode()) > MAX_KEY_BYTES:
        raise PoisonMessage(f"input key {key[:80]!r}... is too long to name its output (1,024 bytes at most)")
    return parsed


def compare_sequencers(a: str, b: str) -> int:
    """Order two S3 ``sequencer`` values of one key: -1, 0 or 1.

    As S3 documents it: hexadecimal strings, possibly of different lengths; pad the shorter
    on the right with zeros, then compare lexicographically.
    """
    width = max(len(a), len(b))
    left, right = a.upper().ljust(width, "0"), b.upper().ljust(width, "0")
    return (left > right) - (left < right)


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Recorded:
    """A result object already in the bucket, and what its metadata says it answers."""

    kind: ResultKind
    etag: str
    sequencer: str | None
    input_etag: str | None
    input_version: str | None
    model: str | None
    processed_at: str | None = None  # ISO 8601, UTC, milliseconds: strings order in time

    @classmethod
    def from_head(cls, kind: ResultKind, head: Mapping[str, Any]) -> Recorded:
        meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        return cls(
            kind=kind,
            etag=str(head.get("ETag", "")),
            sequencer=meta.get(META_SEQUENCER) or None,
            input_etag=meta.get(META_INPUT_ETAG) or None,
            input_version=meta.get(META_INPUT_VERSION) or None,
            model=meta.get(META_MODEL),
            processed_at=meta.get(META_PROCESSED_AT) or None,
        )


@dataclass(frozen=True)
class Outcome:
    """How one input ended: ``output`` or ``error`` (and the result's key), or ``skipped``."""

    status: Literal["output", "error", "skipped"]
    key: str
    result_key: str | None = None
    reason: str = ""


def why_skip(item: S3Object, recorded: Iterable[Recorded], model: str) -> str | None:
    """Why ``item`` needs no new result given the results already written, or None.

    Older than a result (by sequencer): stale. Same input version served by the same model:
    a duplicate delivery. Without sequencers (an unversioned bucket's events carry one; moto's
    do not) the input's ETag and version id identify the version.
    """
    recorded = list(recorded)
    newer = _newer(item, recorded)
    if newer is not None:
        return f"stale: {newer.kind} already answers a newer version of the input"
    answer = _answer(item, recorded, model)
    if answer is not None:
        return f"duplicate delivery: {answer.kind} already answers this version"
    return None


def stale_other_result(item: S3Object, recorded: Iterable[Recorded], model: str) -> Recorded | None:
    """On a duplicate delivery of ``item``, the result of the other kind when it is older than
    the one answering ``item``: its writer died between writing the newer result and removing
    this one. None when ``item`` is no duplicate, or when the other result may be the newer.

    Older means: an older input version (by sequencer), or, for the same version or without
    sequencers, written earlier (by the processed-at time the result records).
    """
    recorded = list(recorded)
    answer = None if _newer(item, recorded) else _answer(item, recorded, model)
    if answer is None:
        return None
    other = next((r for r in recorded if r.kind != answer.kind), None)
    if other is None:
        return None
    if answer.sequencer and other.sequencer:
        order = compare_sequencers(other.sequencer, answer.sequencer)
        if order:
            return other if order < 0 else None
    if answer.processed_at and other.processed_at and other.processed_at < answer.processed_at:
        return other
    return None


def _newer(item: S3Object, recorded: Iterable[Recorded]) -> Recorded | None:
    """A result that answers a newer version of the input than ``item`` (by sequencer)."""
    for result in recorded:
        if item.sequencer and result.sequencer and compare_sequencers(item.sequencer, result.sequencer) < 0:
            return result
    return None


def _answer(item: S3Object, recorded: Iterable[Recorded], model: str) -> Recorded | None:
    """The result that answers exactly this version of the input, served by ``model``."""
    for result in recorded:
        if result.model != model:
            continue
        if item.sequencer and result.sequencer:
            if compare_sequencers(item.sequencer, result.sequencer) == 0:
                return result
        elif item.etag and result.input_etag == item.etag and result.input_version == item.version_id:
            return result
    return None


# ---------------------------------------------------------------- decoding inputs


def decode_npy(data: bytes, manifest: Manifest, *, max_bytes: int | None = None) -> InferenceRequest:
    """One tensor saved with ``numpy.save`` (never unpickled), for a single-input model.

    The header is checked before any array is allocated: its shape must fit the model's input,
    and its size (shape times item size) must be what the file holds and at most ``max_bytes``,
    so a small file that declares a huge array costs nothing.

    Raises:
        BadRequest: not a .npy file, an object (pickled) array, a header that does not match
            the data that follows it, or a tensor that does not fit the model.
        PayloadTooLarge: the header declares more than ``max_bytes`` of data.
    """
    if len(manifest.inputs) != 1:
        raise BadRequest(
            f"a .npy file holds one tensor but {manifest.name} has inputs "
            f"{[spec.name for spec in manifest.inputs]}: send a .json v2 infer request instead"
        )
    spec = manifest.inputs[0]
    stream = io.BytesIO(data)
    shape, dtype = _npy_header(stream)
    declared = math.prod(shape) * dtype.itemsize
    if max_bytes is not None and declared > max_bytes:
        raise PayloadTooLarge(
            f"the .npy header declares shape {list(shape)}: {declared:,} bytes, over the limit of "
            f"{max_bytes:,}: split it into smaller files (the limit is {MAX_INPUT_MB_ENV})"
        )
    if len(shape) != len(spec.shape) or any(
        w >= 0 and g != w for g, w in zip(shape, spec.shape, strict=True)
    ):
        raise BadRequest(
            f"the .npy tensor has shape {list(shape)} but input {spec.name!r} expects "
            f"{list(spec.shape)} (-1 is any size)"
        )
    present = len(data) - stream.tell()
    if present != declared:
        raise BadRequest(
            f"the .npy file holds {present:,} bytes of data, not the {declared:,} bytes its header "
            f"declares for shape {list(shape)}: write it with numpy.save"
        )
    try:
        array = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as error:
        raise _not_npy(error) from None
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("="))
    return request_from_arrays({manifest.inputs[0].name: array}, manifest)


def _npy_header(stream: io.BytesIO) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a .npy header declares (format 1.0 or 2.0); nothing is allocated."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(
                f"format version {version[0]}.{version[1]} is not one numpy.save writes for a tensor"
            )
    except (ValueError, EOFError, OSError) as error:
        raise _not_npy(error) from None
    if dtype.hasobject:
        raise _not_npy(ValueError("an object array"))
    return tuple(int(d) for d in shape), dtype


def _not_npy(error: Exception) -> BadRequest:
    reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    return BadRequest(
        f"not a valid .npy file ({reason}); write it with numpy.save, with no object (pickled) arrays"
    )


def iter_row_batches(
    lines: Iterable[bytes], manifest: Manifest, *, batch_size: int, max_rows: int
) -> Iterator[tuple[InferenceRequest, int]]:
    """Rows of a ``.jsonl`` file as validated model batches: ``(request, rows in it)``.

    Each line is one row: an object ``{input_name: value}`` (a value is one sample: a number,
    a string or a nested list, without the batch dimension), or, for a single-input model,
    the value itself. Rows are stacked along the first dimension, ``batch_size`` at a time;
    blank lines are skipped. Lines are consumed as they come: memory holds one batch.

    Raises:
        BadRequest: a line that is not a row, or rows that do not fit the signature (the
            message names the line).
        PayloadTooLarge: more than ``max_rows`` rows.
    """
    specs = manifest.inputs
    for spec in specs:
        if not spec.shape or spec.shape[0] not in (-1, 1):
            raise BadRequest(
                f".jsonl rows are stacked along the first dimension, but input {spec.name!r} has shape "
                f"{list(spec.shape)}: send a .json v2 infer request instead"
            )
    if any(spec.shape[0] == 1 for spec in specs):
        batch_size = 1
    single = specs[0].name if len(specs) == 1 else None
    rows: list[tuple[int, dict[str, Any]]] = []
    count = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        count += 1
        if count > max_rows:
            raise PayloadTooLarge(
                f"the .jsonl file has more than {max_rows:,} rows: split it into smaller files "
                f"(the limit is {MAX_ROWS_ENV})"
            )
        rows.append((number, _parse_row(line, number, single, [s.name for s in specs])))
        if len(rows) == batch_size:
            yield _row_batch(rows, manifest), len(rows)
            rows = []
    if rows:
        yield _row_batch(rows, manifest), len(rows)
    if count == 0:
        raise BadRequest("the .jsonl file has no rows: write one JSON row per line")


def _parse_row(line: bytes, number: int, single: str | None, names: list[str]) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(
            f"line {number} is not valid JSON: a .jsonl file holds one JSON row per line"
        ) from None
    except RecursionError:
        raise BadRequest(
            f"line {number} is nested too deeply to decode: a row nests lists only as deep as the input's shape"
        ) from None
    if isinstance(value, dict):
        unknown = [k for k in value if k not in names]
        missing = [n for n in names if n not in value]
        if unknown or missing:
            raise BadRequest(
                f"line {number}: a row needs exactly the model's inputs {names}"
                + (f"; unknown {unknown}" if unknown else "")
                + (f"; missing {missing}" if missing else "")
            )
        return value
    if single is not None and value is not None:
        return {single: value}
    raise BadRequest(
        f"line {number}: a row must be an object {{input name: value}}"
        + (" or the value of the model's one input" if single else f"; the model's inputs are {names}")
    )


def _row_batch(rows: list[tuple[int, dict[str, Any]]], manifest: Manifest) -> InferenceRequest:
    first, last = rows[0][0], rows[-1][0]
    where = f"line {first}" if first == last else f"lines {first}-{last}"
    try:
        arrays = {}
        for spec in manifest.inputs:
            values = [row[spec.name] for _, row in rows]
            try:
                sample_shape = np.shape(values[0])
            except ValueError:
                raise BadRequest(f"input {spec.name!r}: nested data is ragged") from None
            arrays[spec.name] = decode_json(values, spec.datatype, (len(values), *sample_shape), spec.name)
        return request_from_arrays(arrays, manifest)
    except BadRequest as error:
        raise BadRequest(f"{where}: {error.message}") from None


def iter_lines(chunks: Iterable[bytes], max_line_bytes: int) -> Iterator[bytes]:
    """Lines (without their ``\\n`` / ``\\r\\n``) of a stream of chunks; memory holds at most
    one line and one chunk."""
    pending = bytearray()
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            pending += chunk[start:end]
            yield bytes(pending).rstrip(b"\r")
            pending.clear()
            start = end + 1
        pending += chunk[start:]
        if len(pending) > max_line_bytes:
            raise PayloadTooLarge(f"a line of the .jsonl file is over {max_line_bytes:,} bytes")
    if pending:
        yield bytes(pending).rstrip(b"\r")


def _join_batches(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    try:
        return {name: np.concatenate([part[name] for part in parts], axis=0) for name in parts[0]}
    except ValueError:
        raise BadRequest(
            "the model's outputs have no batch dimension to join .jsonl batches along: "
            "send the rows as one .json v2 infer request"
        ) from None


# ---------------------------------------------------------------- the pipeline


@dataclass
class _Served:
    body: bytes  # the output file: the OIP response with the input's parameters
    rows: int
    item: S3Object  # the version actually read


class Pipeline:
    """Serve S3 inputs with the models of one process: warm onnxruntime sessions from
    ``registry``, or SageMaker endpoints for the models ``settings.gpu_endpoints`` names."""

    def __init__(
        self,
        registry: ModelRegistry,
        settings: PipelineSettings,
        *,
        s3_client_factory: Callable[[], Any] = default_s3_client,
        remote_factory: Callable[[Manifest, str], Model] = SageMakerModel,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self._s3 = s3_client_factory
        self._remote_factory = remote_factory
        self._remote: dict[ModelRef, Model] = {}
        self._clock = clock

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Pipeline:
        """The worker's pipeline: one :class:`Settings` and one :class:`PipelineSettings`, read once.
        Nothing touches S3 until the first message."""
        return cls(ModelRegistry(Settings.from_env(environ)), PipelineSettings.from_env(environ))

    def handle_message(self, body: str) -> list[Outcome]:
        """Serve every object an SQS message body announces; raise if the message must be retried.

        Raises:
            PoisonMessage: the message can never succeed (report it; SQS dead-letters it).
            TierserveError: a retryable fault (report it; SQS redelivers it).
            Exception: anything unexpected (report it, as above).
        """
        try:
            objects = parse_message(body)
        except PoisonMessage as error:
            logger.error(
                "poison message: failing it so SQS moves it to the DLQ", extra={"reason": str(error)}
            )
            raise
        try:
            return [self.handle(item) for item in objects]
        except (PoisonMessage, TierserveError):
            raise  # logged where they were raised
        except Exception:
            logger.exception("unexpected failure: the message will be retried, then dead-lettered")
            raise

    @tracer.capture_method(capture_response=False)
    def handle(self, item: S3Object) -> Outcome:
        """One S3 object to its one result (see the module docstring)."""
        try:
            key = parse_input_key(item.key)
        except PoisonMessage as error:
            logger.error("poison record: failing it so SQS moves it to the DLQ", extra={"reason": str(error)})
            raise
        if key is None:
            return self._skipped(item, f"not under {INPUT_PREFIX}/{{model}}/: not an input")
        bucket = self.settings.data_bucket or item.bucket
        model_label = self._model_label(key.model)
        recorded = self._recorded(bucket, key)
        reason = why_skip(item, recorded.values(), model_label)
        if reason:
            self._remove_stale(bucket, item, key, recorded, model_label)
            return self._skipped(item, reason)
        try:
            served = self._serve(item, key)
        except _Skip as skip:
            return self._skipped(item, str(skip))
        except TierserveError as error:
            if is_retryable(error):
                logger.warning(
                    "transient failure: the message will be retried",
                    extra={"key": item.key, "error": error.message},
                )
                raise
            reason = _dumps(self._error_document(item, key, error))
            return self._write(bucket, item, key, ERROR_PREFIX, reason, recorded, model_label)
        return self._write(bucket, served.item, key, OUTPUT_PREFIX, served.body, recorded, model_label)

    # -------------------------------------------------- serving

    def _model_label(self, name: str) -> str:
        try:
            return str(self.registry.resolve(name))
        except ModelNotFound:
            return ""

    def _model(self, ref: ModelRef, manifest: Manifest) -> Model:
        endpoint = self.settings.gpu_endpoints.get(ref.name)
        if endpoint is None:
            return self.registry.get(ref)
        if ref not in self._remote:
            self._remote[ref] = self._remote_factory(manifest, endpoint)
        return self._remote[ref]

    def _serve(self, item: S3Object, key: InputKey) -> _Served:
        if key.format not in FORMATS:
            raise BadRequest(
                f"{key.path!r} has no supported extension: name inputs .json (a v2 infer request), "
                ".npy (one tensor) or .jsonl (one row per line)"
            )
        ref = self.registry.resolve(key.model)
        manifest = self.registry.manifest(ref)
        response = self._get(item)
        body = response["Body"]
        item = _as_read(item, response)
        try:
            where = f"s3://{item.bucket}/{item.key}"
            size = int(response.get("ContentLength") or 0)
            if key.format == ".jsonl":
                _check_size(size, self.settings.max_jsonl_bytes, MAX_JSONL_MB_ENV)
                chunks = _guarded(iter(lambda: body.read(READ_CHUNK_BYTES), b""), where)
                batches = _decoded(
                    iter_row_batches(
                        iter_lines(chunks, self.settings.max_input_bytes),
                        manifest,
                        batch_size=self.settings.row_batch_size,
                        max_rows=self.settings.max_rows,
                    )
                )
                request = InferenceRequest(inputs={})
            else:
                limit = self.settings.max_input_bytes
                _check_size(size, limit, MAX_INPUT_MB_ENV)
                data = _read_limited(body, limit, where)
                with _decoding():
                    if key.format == ".npy":
                        request = decode_npy(data, manifest, max_bytes=limit)
                    else:
                        request = _json_outputs(parse_infer_request(data, None, manifest, max_bytes=limit))
                batches = iter([(request, 0)])
            outputs, rows = self._run(ref, manifest, batches, request.output_names())
        finally:
            body.close()
        if key.format == ".jsonl":
            record_count(PIPELINE_ROWS, rows)
        encoded = encode_infer_response(request, outputs, model_name=ref.name, model_version=ref.version)
        parameters = self._input_parameters(item, key, rows if key.format == ".jsonl" else None)
        return _Served(_with_parameters(encoded.body, parameters), rows, item)

    def _run(
        self,
        ref: ModelRef,
        manifest: Manifest,
        batches: Iterable[tuple[InferenceRequest, int]],
        output_names: list[str] | None,
    ) -> tuple[dict[str, np.ndarray], int]:
        parts, rows, model = [], 0, None
        for request, count in batches:
            model = model or self._model(ref, manifest)
            with stopwatch() as elapsed:
                parts.append(model.predict(request.inputs, output_names))
            record_ms(INFERENCE_MS, elapsed[0])
            rows += count
        return _join_batches(parts), rows

    def _get(self, item: S3Object) -> Mapping[str, Any]:
        """GetObject for exactly the version the event announced: by version id, or, in an
        unversioned bucket, only while the ETag still matches (else a newer event follows)."""
        params: dict[str, Any] = {"Bucket": item.bucket, "Key": item.key}
        if item.version_id:
            params["VersionId"] = item.version_id
        elif item.etag:
            params["IfMatch"] = f'"{item.etag}"'
        try:
            return self._s3().get_object(**params)
        except Exception as error:
            code = error_code(error)
            if code in _GONE_CODES:
                raise _Skip("the input no longer exists") from None
            if code in _CHANGED_CODES:
                raise _Skip("the input was overwritten after this event; its own event serves it") from None
            raise s3_error(error, f"s3://{item.bucket}/{item.key}") from error

    def _input_parameters(self, item: S3Object, key: InputKey, rows: int | None) -> dict[str, Any]:
        parameters: dict[str, Any] = {"input_bucket": item.bucket, "input_key": item.key}
        if item.etag:
            parameters["input_etag"] = item.etag
        if item.version_id:
            parameters["input_version_id"] = item.version_id
        if key.format:
            parameters["input_format"] = key.format.lstrip(".")
        if rows is not None:
            parameters["rows"] = rows
        return parameters

    def _error_document(self, item: S3Object, key: InputKey, error: TierserveError) -> dict[str, Any]:
        status, payload = to_http(error)
        document: dict[str, Any] = {"error": payload["error"], "status": status, "model_name": key.model}
        document["parameters"] = self._input_parameters(item, key, None)
        return document

    # -------------------------------------------------- results

    def _recorded(self, bucket: str, key: InputKey) -> dict[ResultKind, Recorded]:
        found: dict[ResultKind, Recorded] = {}
        for kind in (OUTPUT_PREFIX, ERROR_PREFIX):
            result_key = key.result_key(kind)
            try:
                head = self._s3().head_object(Bucket=bucket, Key=result_key)
            except Exception as error:
                if error_code(error) in _GONE_CODES:
                    continue
                raise s3_error(error, f"s3://{bucket}/{result_key}", "reading") from error
            found[kind] = Recorded.from_head(kind, head)
        return found

    def _write(
        self,
        bucket: str,
        item: S3Object,
        key: InputKey,
        kind: ResultKind,
        body: bytes,
        recorded: dict[ResultKind, Recorded],
        model_label: str,
    ) -> Outcome:
        """Write the result only if the results seen are still there (a conditional PutObject);
        on a race, look again and decide again. Then remove the other kind of result."""
        result_key = key.result_key(kind)
        metadata = {
            META_SEQUENCER: item.sequencer or "",
            META_INPUT_ETAG: item.etag or "",
            META_INPUT_VERSION: item.version_id or "",
            META_MODEL: model_label,
            META_PROCESSED_AT: datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="milliseconds"),
        }
        for _ in range(WRITE_ATTEMPTS):
            mine = recorded.get(kind)
            condition = {"IfMatch": mine.etag} if mine else {"IfNoneMatch": "*"}
            try:
                self._s3().put_object(
                    Bucket=bucket,
                    Key=result_key,
                    Body=body,
                    ContentType="application/json",
                    Metadata=metadata,
                    **condition,
                )
            except Exception as error:
                if error_code(error) not in _RACE_CODES:
                    raise s3_error(error, f"s3://{bucket}/{result_key}", "writing") from error
                recorded = self._recorded(bucket, key)
                reason = why_skip(item, recorded.values(), model_label)
                if reason:
                    self._remove_stale(bucket, item, key, recorded, model_label)
                    return self._skipped(item, reason)
                continue
            self._remove_other(bucket, key, kind, recorded)
            return self._finished(item, kind, result_key)
        raise UpstreamUnavailable(f"results for {item.key} kept changing while being written; retry")

    def _remove_other(
        self, bucket: str, key: InputKey, kind: ResultKind, recorded: dict[ResultKind, Recorded]
    ) -> None:
        other_kind: ResultKind = ERROR_PREFIX if kind == OUTPUT_PREFIX else OUTPUT_PREFIX
        other = recorded.get(other_kind)
        if other is None:
            return
        other_key = key.result_key(other_kind)
        try:
            self._s3().delete_object(Bucket=bucket, Key=other_key, IfMatch=other.etag)
        except Exception as error:
            if error_code(error) not in _RACE_CODES | _GONE_CODES:
                raise s3_error(error, f"s3://{bucket}/{other_key}", "deleting") from error

    def _remove_stale(
        self,
        bucket: str,
        item: S3Object,
        key: InputKey,
        recorded: dict[ResultKind, Recorded],
        model_label: str,
    ) -> None:
        """On a duplicate delivery, finish what its first delivery began: remove the older result
        of the other kind (see :func:`stale_other_result`)."""
        stale = stale_other_result(item, recorded.values(), model_label)
        if stale is None:
            return
        kept: ResultKind = OUTPUT_PREFIX if stale.kind == ERROR_PREFIX else ERROR_PREFIX
        logger.info(
            "removing an older result left beside the one that answers the input",
            extra={"key": item.key, "removed": key.result_key(stale.kind)},
        )
        self._remove_other(bucket, key, kept, recorded)

    # -------------------------------------------------- outcomes

    def _finished(self, item: S3Object, kind: ResultKind, result_key: str) -> Outcome:
        if kind == OUTPUT_PREFIX:
            record_count(PIPELINE_OUTPUT)
            logger.info("input served", extra={"key": item.key, "result": result_key})
            return Outcome("output", item.key, result_key)
        record_count(PIPELINE_ERROR)
        logger.info("input cannot be served; reason written", extra={"key": item.key, "result": result_key})
        return Outcome("error", item.key, result_key)

    def _skipped(self, item: S3Object, reason: str) -> Outcome:
        record_count(PIPELINE_SKIPPED)
        logger.info("input skipped", extra={"key": item.key, "reason": reason})
        return Outcome("skipped", item.key, None, reason)


def _as_read(item: S3Object, response: Mapping[str, Any]) -> S3Object:
    """``item`` with the ETag and version id of what GetObject returned, where the event lacked them."""
    version = item.version_id or response.get("VersionId")
    return dataclasses.replace(
        item,
        etag=item.etag or str(response.get("ETag", "")).strip('"') or None,
        version_id=version if version and version != "null" else None,
    )


def _json_outputs(request: InferenceRequest) -> InferenceRequest:
    """An output file is JSON: ignore requests for binary outputs."""
    outputs = (
        None if request.outputs is None else tuple(RequestedOutput(o.name, False) for o in request.outputs)
    )
    return dataclasses.replace(request, outputs=outputs, binary_outputs=False)


def _check_size(size: int, limit: int, variable: str) -> None:
    if size > limit:
        raise PayloadTooLarge(
            f"the input is {size:,} bytes, over the limit of {limit:,}: split it into smaller files "
            f"(the limit is {variable})"
        )


def _read_limited(body: Any, limit: int, where: str) -> bytes:
    """The whole body, refusing it as soon as it passes ``limit`` bytes."""
    data = bytearray()
    for chunk in _guarded(iter(lambda: body.read(READ_CHUNK_BYTES), b""), where):
        data += chunk
        _check_size(len(data), limit, MAX_INPUT_MB_ENV)
    return bytes(data)


def _guarded(chunks: Iterator[bytes], where: str) -> Iterator[bytes]:
    """Reading the body can fail mid-stream (connection reset, timeout): a retryable fault."""
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        except TierserveError:
            raise
        except Exception as error:
            raise s3_error(error, where) from error
        yield chunk


@contextmanager
def _decoding() -> Iterator[None]:
    """Faults of decoding that the same input raises on every delivery become its error file,
    not retries that end in the dead-letter queue without a reason."""
    try:
        yield
    except RecursionError:
        raise BadRequest(
            "the input is nested too deeply to decode: nest lists only as deep as the input's shape"
        ) from None
    except MemoryError:
        raise PayloadTooLarge(
            f"the input is too large to decode in this function's memory: split it into smaller files "
            f"(or lower {MAX_INPUT_MB_ENV})"
        ) from None
    except UnicodeError:
        raise BadRequest(
            "the input is not valid Unicode (bytes that are not UTF-8, or an unpaired surrogate such as "
            "\\ud800): fix the text"
        ) from None


def _decoded(batches: Iterator[tuple[InferenceRequest, int]]) -> Iterator[tuple[InferenceRequest, int]]:
    """``batches``, each decoded under :func:`_decoding`."""
    while True:
        with _decoding():
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def _with_parameters(response: bytes, parameters: Mapping[str, Any]) -> bytes:
    """The encoded JSON response object with ``"parameters"`` added as its last member, without
    parsing it back: the response of a 100,000-row file is large."""
    if not (response.startswith(b"{") and response.endswith(b"}")):
        raise ValueError("the response to add parameters to is not one JSON object")
    return b"".join((response[:-1], b',"parameters":', _dumps(parameters), b"}"))


def _dumps(document: Mapping[str, Any]) -> bytes:
    # ASCII: a lone surrogate (a JSON "\ud800" escape) stays escaped instead of failing to encode.
    return json.dumps(document, separators=(",", ":")).encode()


__all__ = [
    "Outcome",
    "Pipeline",
    "PipelineSettings",
    "PoisonMessage",
    "S3Object",
    "compare_sequencers",
    "decode_npy",
    "iter_lines",
    "iter_row_batches",
    "parse_input_key",
    "parse_message",
    "stale_other_result",
    "why_skip",
]
