"""The S3 pipeline's orchestration: one S3 object announced by SQS to its one result.

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
  endpoint down or slow, or no time left before the invocation's deadline:
  :class:`~tierserve.aws.OutOfTime`) or a message that can never be read (:class:`PoisonMessage`). The
  worker reports the message as a batch item failure; SQS redelivers it and moves it to the
  dead-letter queue after ``maxReceiveCount`` receives. Nothing is written, until the last
  receive the queue allows: then :meth:`Pipeline.give_up` writes each unanswered input's
  error document, marked as given up (so a job reads ``failed`` and says why), and a redrive
  that serves the input replaces it.

**Requests.** The common path, a new input, costs what a bare GET-run-PUT worker pays: one
GetObject, one conditional PutObject (``If-None-Match: *``), and for the other kind of result
one listing per batch (:meth:`Pipeline.index_messages`) instead of a HeadObject per input.
The results are looked at first (HeadObject) only when there is something to compare with (a
listing found one) or the input is large enough (:data:`LOOK_FIRST_BYTES`) that reading and
running it twice would cost more than a look; otherwise the conditional write carries the
decision, and a refused write looks and decides again (a duplicate or stale delivery).

Events are parsed in :mod:`~tierserve.s3_pipeline.events`, files decoded in
:mod:`~tierserve.s3_pipeline.formats`, results written in :mod:`~tierserve.s3_pipeline.results`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from tierserve import audit, aws, output_limits
from tierserve.catalog import Manifest
from tierserve.errors import ModelNotFound, TierserveError, is_retryable, to_http
from tierserve.model import Model
from tierserve.protocol import InferenceRequest, dumps, encode_infer_response
from tierserve.registry import ModelRegistry
from tierserve.s3_pipeline.errors import data_error
from tierserve.s3_pipeline.events import InputKey, PoisonMessage, S3Object, parse_input_key, parse_message
from tierserve.s3_pipeline.formats import check_format, join_batches, read_input, with_parameters
from tierserve.s3_pipeline.results import (
    KINDS,
    Known,
    Outcome,
    ResultIndex,
    ResultKind,
    ResultStore,
    skipped,
    why_skip,
)
from tierserve.s3_pipeline.settings import PipelineSettings
from tierserve.sagemaker_model import SageMakerModel
from tierserve.settings import (
    DATA_BUCKET_ENV,
    ERROR_PREFIX,
    INPUT_PREFIX,
    OUTPUT_PREFIX,
    GpuTarget,
    ModelRef,
    Settings,
)
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

# Inputs this large look at their results before they are read: a duplicate delivery would
# otherwise read and run them again only to have its write refused (a HeadObject is cheaper).
LOOK_FIRST_BYTES = 1024 * 1024
LISTING_THREADS = 2  # listings of a batch's results, beside the records' own threads


class _Skip(Exception):
    """The record needs no result (the input is gone or changed since the event)."""


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
        s3_client_factory: Callable[[], Any] = aws.s3_client,
        remote_factory: Callable[[Manifest, GpuTarget], Model] = SageMakerModel.serving,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self._s3 = s3_client_factory
        self._remote_factory = remote_factory
        self._remote: dict[ModelRef, Model] = {}
        self.results = ResultStore(
            s3_client_factory, clock, DATA_BUCKET_ENV if settings.data_bucket else None
        )
        self._listing_pool: ThreadPoolExecutor | None = None
        self._listing_pool_lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Pipeline:
        """The worker's pipeline: one :class:`Settings` and one :class:`PipelineSettings`, read once.
        Nothing touches S3 until the first message."""
        return cls(ModelRegistry(Settings.from_env(environ)), PipelineSettings.from_env(environ))

    def index_messages(self, bodies: Iterable[str], deadline: aws.Deadline | None = None) -> ResultIndex:
        """Start listing, in the background, the error results of the inputs a batch of SQS
        message bodies announces (an output, the common result, is written conditionally
        and needs no look): what :meth:`handle_message` then knows without a HeadObject.
        Bodies that do not parse are left to :meth:`handle_message` to fail."""
        return self.index_inputs(_announced(bodies), (ERROR_PREFIX,), deadline)

    def index_inputs(
        self, items: Iterable[S3Object], kinds: Iterable[ResultKind], deadline: aws.Deadline | None = None
    ) -> ResultIndex:
        """Start listing the results of ``kinds`` for ``items`` (see :class:`ResultIndex`)."""
        inputs = []
        for item in items:
            try:
                key = parse_input_key(item.key)
            except PoisonMessage:
                continue
            if key is not None:
                inputs.append((self.settings.data_bucket or item.bucket, key))
        return self.results.index(inputs, tuple(kinds), self._listings(), deadline)

    def _listings(self) -> ThreadPoolExecutor:
        with self._listing_pool_lock:
            if self._listing_pool is None:
                self._listing_pool = ThreadPoolExecutor(
                    LISTING_THREADS, thread_name_prefix="tierserve-listing"
                )
            return self._listing_pool

    def handle_message(
        self, body: str, deadline: aws.Deadline | None = None, index: ResultIndex | None = None
    ) -> list[Outcome]:
        """Serve every object an SQS message body announces; raise if the message must be retried.

        With a ``deadline`` (the invocation's), every S3 and SageMaker call fits before it,
        and work that cannot is refused with :class:`~tierserve.aws.OutOfTime` (retryable).
        ``index`` is what :meth:`index_messages` listed for the batch the message came in.

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
            with aws.within(deadline):
                return [self.handle(item, index) for item in objects]
        except (PoisonMessage, TierserveError):
            raise  # logged where they were raised
        except Exception:
            logger.exception("unexpected failure: the message will be retried, then dead-lettered")
            raise

    def give_up(self, body: str, error: TierserveError, deliveries: int) -> list[Outcome]:
        """The last delivery the queue allows met a transient fault (``error``): write the error
        document of every input of the message that no result answers yet, marked as given up
        (:mod:`~tierserve.s3_pipeline.results`), so its owner, or a job's status, learns why
        nothing came while the message goes to the dead-letter queue."""
        outcomes = []
        for item in parse_message(body):
            key = parse_input_key(item.key)
            if key is None:
                continue
            bucket = self.settings.data_bucket or item.bucket
            model_label = self._model_label(key.model, key.version)
            recorded = self.results.recorded(bucket, key)
            if why_skip(item, recorded.values(), model_label):
                continue
            document = self._error_document(item, key, error)
            document["error"] = (
                f"{document['error']} (gave up after {deliveries} deliveries; the message is in the "
                "dead-letter queue: redrive it once the fault has passed, and a result replaces this "
                "error, or upload the input again)"
            )
            outcomes.append(
                self.results.write(
                    bucket,
                    item,
                    key,
                    ERROR_PREFIX,
                    dumps(document),
                    Known.looked(recorded),
                    model_label,
                    gave_up=True,
                )
            )
        return outcomes

    @tracer.capture_method(capture_response=False)
    def handle(
        self, item: S3Object, index: ResultIndex | None = None, *, look_first: bool = False
    ) -> Outcome:
        """One S3 object to its one result (see the module docstring); ``index`` says which of
        its results exist, where a listing of its batch covered them. With ``look_first`` (a
        bulk run, where a rerun finds most results current), or for an input of
        :data:`LOOK_FIRST_BYTES` or more, the results the index does not rule out are looked at
        before the input is read.

        Each input is counted by how it ended (``PipelineOutput``, ``PipelineError``,
        ``PipelineSkipped``, with its model's dimensions where the key names a served model),
        and one that ran or was refused gets its audit record (:mod:`tierserve.audit`)."""
        started = time.perf_counter()
        status = 503  # raised: retried
        try:
            outcome = self._handle(item, index, look_first=look_first)
        except Exception as error:
            status = to_http(error)[0] if isinstance(error, TierserveError) else 500
            raise
        else:
            status = {"output": 200, "skipped": 0}.get(outcome.status, outcome.http_status or 400)
            return outcome
        finally:
            ref = self._served_ref(item.key)
            if status == 200:
                record_count(PIPELINE_OUTPUT, model=ref)
            elif status == 0:
                record_count(PIPELINE_SKIPPED, model=ref)
            elif status < 500:
                record_count(PIPELINE_ERROR, model=ref)
            if status:
                audit.log_s3_inference(
                    caller=f"s3:{item.principal or 'unknown'}",
                    key=item.key,
                    model=ref,
                    status=status,
                    latency_ms=(time.perf_counter() - started) * 1000,
                )

    def _handle(self, item: S3Object, index: ResultIndex | None, *, look_first: bool) -> Outcome:
        try:
            key = parse_input_key(item.key)
        except PoisonMessage as error:
            logger.error("poison record: failing it so SQS moves it to the DLQ", extra={"reason": str(error)})
            raise
        if key is None:
            return skipped(item, f"not under {INPUT_PREFIX}/{{model}}/: not an input")
        bucket = self.settings.data_bucket or item.bucket
        model_label = self._model_label(key.model, key.version)
        if look_first or item.size >= LOOK_FIRST_BYTES:
            # Looking first pays when results are likely current (a rerun) or the input is large.
            listed = {kind: index.exists(bucket, kind, key) if index else None for kind in KINDS}
            absent = [kind for kind, found in listed.items() if found is False]
            recorded = self.results.recorded(bucket, key, [k for k in KINDS if k not in absent])
            reason = why_skip(item, recorded.values(), model_label)
            if reason:
                self.results.remove_stale(bucket, item, key, recorded, model_label)
                return skipped(item, reason)
            known = Known.looked(recorded)
        else:  # the write decides; the listing is asked once the result is written
            known = Known(listed=partial(index.exists, bucket, key=key) if index else None)
        try:
            served = self._serve(item, key)
        except _Skip as skip:
            return skipped(item, str(skip))
        except TierserveError as error:
            if is_retryable(error):
                logger.warning(
                    "transient failure: the message will be retried",
                    extra={"key": item.key, "error": error.message},
                )
                raise
            reason = dumps(self._error_document(item, key, error))
            outcome = self.results.write(bucket, item, key, ERROR_PREFIX, reason, known, model_label)
            return dataclasses.replace(outcome, http_status=to_http(error)[0])
        return self.results.write(bucket, served.item, key, OUTPUT_PREFIX, served.body, known, model_label)

    # -------------------------------------------------- serving

    def _served_ref(self, key: str) -> ModelRef | None:
        """The served model an input key names, or None (not an input, or no model served here)."""
        try:
            parsed = parse_input_key(key)
            return None if parsed is None else self.registry.resolve(parsed.model, parsed.version)
        except (PoisonMessage, ModelNotFound):
            return None

    def _model_label(self, name: str, version: str | None = None) -> str:
        try:
            return str(self.registry.resolve(name, version))
        except ModelNotFound:
            return ""

    def model_for(self, ref: ModelRef) -> Model:
        """What serves ``ref``: its warm session here, or its GPU endpoint (``TIERSERVE_GPU_ENDPOINTS``)."""
        return self._model(ref, self.registry.manifest(ref))

    def _model(self, ref: ModelRef, manifest: Manifest) -> Model:
        target = self.settings.gpu_endpoints.get(ref.name)
        if target is None:
            return self.registry.get(ref)
        if ref not in self._remote:
            self._remote[ref] = self._remote_factory(manifest, target)
        return self._remote[ref]

    def _serve(self, item: S3Object, key: InputKey) -> _Served:
        check_format(key)  # before any S3 call: a .csv needs no GET to be refused
        ref = self.registry.resolve(key.model, key.version)
        manifest = self.registry.manifest(ref)
        response = self._get(item)
        body = response["Body"]
        item = _as_read(item, response)
        try:
            where = f"s3://{item.bucket}/{item.key}"
            size = int(response.get("ContentLength") or 0)
            request, batches = read_input(
                key, body, size, where, manifest, self.settings, metadata=response.get("Metadata")
            )
            outputs, rows = self._run(ref, manifest, batches, request.output_names())
        finally:
            body.close()
        if key.format == ".jsonl":
            record_count(PIPELINE_ROWS, rows, model=ref)
        encoded = encode_infer_response(request, outputs, model_name=ref.name, model_version=ref.version)
        parameters = self._input_parameters(item, key, rows if key.format == ".jsonl" else None)
        return _Served(with_parameters(encoded.body, parameters), rows, item)

    def _run(
        self,
        ref: ModelRef,
        manifest: Manifest,
        batches: Iterable[tuple[InferenceRequest, int]],
        output_names: list[str] | None,
    ) -> tuple[dict[str, np.ndarray], int]:
        parts, rows, model = [], 0, None
        for request, count in batches:
            aws.check_deadline(f"running {ref} on rows after the first {rows:,}")
            model = model or self._model(ref, manifest)
            with stopwatch() as elapsed:
                parts.append(model.predict(request.inputs, output_names))
            record_ms(INFERENCE_MS, elapsed[0], model=ref)
            rows += count
        return output_limits.apply(manifest, join_batches(parts)), rows

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
            kind = aws.classify(error).kind
            if kind == "gone":
                raise _Skip("the input no longer exists") from None
            if kind == "changed":
                raise _Skip("the input was overwritten after this event; its own event serves it") from None
            raise data_error(error, f"s3://{item.bucket}/{item.key}") from error

    def describe_input(self, item: S3Object) -> S3Object:
        """``item`` with the ETag, size and version id its input has now (one HeadObject); as it
        is when the input is gone (serving it then skips it)."""
        try:
            head = self._s3().head_object(Bucket=item.bucket, Key=item.key)
        except Exception as error:
            if aws.classify(error).kind == "gone":
                return item
            raise data_error(error, f"s3://{item.bucket}/{item.key}") from error
        return _as_read(dataclasses.replace(item, size=int(head.get("ContentLength") or item.size)), head)

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


def _announced(bodies: Iterable[str]) -> Iterator[S3Object]:
    for body in bodies:
        try:
            yield from parse_message(body)
        except PoisonMessage:
            continue


def _as_read(item: S3Object, response: Mapping[str, Any]) -> S3Object:
    """``item`` with the ETag and version id of what GetObject returned, where the event lacked them."""
    version = item.version_id or response.get("VersionId")
    return dataclasses.replace(
        item,
        etag=item.etag or str(response.get("ETag", "")).strip('"') or None,
        version_id=version if version and version != "null" else None,
    )
