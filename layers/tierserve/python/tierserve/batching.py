"""Dynamic batching: concurrent requests to one model merged along the batch dimension.

    request threads                          the model's batcher thread
    predict(inputs) ─> queue (bounded) ─┐
    predict(inputs) ─> queue ───────────┼─> wait up to max_queue_delay_ms for rows of the
    predict(inputs) ─> queue ───────────┘   same shape, up to max_batch_size rows
                                            ─> concatenate ─> inner.predict ─> split
          <───────────── each request's own rows (or its own error) ──────────────┘

:class:`BatchingModel` implements the model interface, so the data plane does not know it
is there. Guarantees:

- Only requests whose inputs have the same names, dtypes and non-batch dimensions, and that
  ask for the same outputs, share a run. Requests arrive validated (the data plane parses
  them against the signature before ``predict``), so a malformed request never reaches the
  queue.
- A failed merged run is retried request by request: only the request that makes the model
  fail gets the error. A run whose outputs do not split back along the first dimension is
  retried the same way, so a result is never another request's rows.
- No request waits unboundedly: the oldest queued request runs at most
  ``max_queue_delay_ms`` after it arrived plus the runs ahead of it, whatever its shape;
  a full queue refuses new requests at once (:class:`~tierserve.errors.Overloaded`, 503).

A model merges only where every input and output has a dynamic first dimension
(:func:`batchable`); requests bigger than ``max_batch_size``, and requests whose inputs
disagree on their first dimension, run on their own.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tierserve.catalog import Manifest
from tierserve.config import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE_DELAY_MS
from tierserve.errors import ModelUnavailable, Overloaded
from tierserve.model import Model, ModelFactory
from tierserve.telemetry import BATCH_ROWS, QUEUE_FULL, logger, record_count

DEFAULT_MAX_QUEUE_SIZE = 256


@dataclass(frozen=True)
class BatchingConfig:
    """``max_batch_size`` rows per run (1 turns batching off), ``max_queue_delay_ms`` the longest
    a request waits for others, ``max_queue_size`` requests waiting before new ones get 503."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue_delay_ms: float = DEFAULT_MAX_QUEUE_DELAY_MS
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue_delay_ms < 0 or self.max_queue_size < 1:
            raise ValueError(
                "batching needs max_batch_size >= 1, max_queue_delay_ms >= 0 and max_queue_size >= 1, "
                f"got {self.max_batch_size}, {self.max_queue_delay_ms}, {self.max_queue_size}"
            )

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1


@dataclass
class BatchStats:
    """Counters since the model loaded (tests and benchmarks read them; logs too)."""

    requests: int = 0  # requests that went through the queue
    runs: int = 0  # runs of the wrapped model made by the batcher (retries included)
    merged_runs: int = 0  # runs that held more than one request
    largest_run_requests: int = 0
    largest_run_rows: int = 0
    split_retries: int = 0  # merged runs that failed and were retried request by request
    rejected: int = 0  # requests refused because the queue was full
    direct: int = 0  # requests over max_batch_size, run outside the queue


def batchable(manifest: Manifest) -> bool:
    """True when every input and output has a dynamic first dimension, taken as a batch of
    independent rows, and the manifest does not opt out (``"extra": {"dynamic_batching": false}``
    for a model whose first dimension is something else, a sequence for instance)."""
    if manifest.extra.get("dynamic_batching") is False:
        return False
    return all(spec.shape and spec.shape[0] < 0 for spec in (*manifest.inputs, *manifest.outputs))


class _Pending:
    """One request in the queue and, once run, its result or its error."""

    __slots__ = ("done", "enqueued", "error", "inputs", "key", "output_names", "result", "rows")

    def __init__(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None, rows: int, enqueued: float
    ) -> None:
        self.inputs = dict(inputs)
        self.output_names = list(output_names) if output_names else None
        self.rows = rows
        self.enqueued = enqueued
        self.key = (
            tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in self.inputs.items())),
            tuple(self.output_names) if self.output_names else None,
        )
        self.done = threading.Event()
        self.result: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None

    def finish(self, result: dict[str, np.ndarray] | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class BatchingModel:
    """Wraps a model; ``predict`` calls from many threads are merged into fewer, larger runs.

    One batcher thread per model runs the wrapped model, so runs never overlap: on a GPU,
    the next batch fills while the current one runs.
    """

    def __init__(
        self, inner: Model, config: BatchingConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.inner = inner
        self.config = config
        self.stats = BatchStats()
        self._clock = clock
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(
            target=self._serve, name=f"tierserve-batcher-{inner.manifest.name}", daemon=True
        )
        self._thread.start()

    @property
    def manifest(self) -> Manifest:
        return self.inner.manifest

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(getattr(self.inner, "providers", ()))

    def metadata(self) -> dict[str, Any]:
        document = self.inner.metadata()
        document.setdefault("parameters", {})["dynamic_batching"] = {
            "max_batch_size": self.config.max_batch_size,
            "max_queue_delay_ms": self.config.max_queue_delay_ms,
        }
        return document

    def ready(self) -> bool:
        return self.inner.ready() and self._thread.is_alive()

    def stats_snapshot(self) -> dict[str, int]:
        with self._cond:
            return asdict(self.stats)

    def predict(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run ``inputs`` (already validated against the signature), merged with whatever
        compatible requests arrive within the queue delay.

        Raises:
            Overloaded: the queue is full.
            ModelUnavailable: the model is shutting down.
            Whatever the wrapped model raises for these inputs alone.
        """
        rows = _rows(inputs)
        if rows is None or rows > self.config.max_batch_size:
            with self._cond:
                self.stats.direct += 1
            return self.inner.predict(inputs, output_names)
        pending = _Pending(inputs, output_names, rows, self._clock())
        with self._cond:
            if self._closed:
                raise ModelUnavailable(f"{self.manifest.name} is shutting down; retry on another instance")
            if len(self._queue) >= self.config.max_queue_size:
                self.stats.rejected += 1
                record_count(QUEUE_FULL)
                raise Overloaded(
                    f"{len(self._queue)} requests already wait for {self.manifest.name}, the limit of "
                    "TIERSERVE_MAX_QUEUE_SIZE: retry with backoff, or add instances to the endpoint"
                )
            self._queue.append(pending)
            self.stats.requests += 1
            self._cond.notify_all()
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def close(self, timeout: float = 30.0) -> None:
        """Run what is queued, then stop the batcher thread; later requests get 503."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------ the batcher thread

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except BaseException as error:  # never leave a caller waiting
                for pending in batch:
                    if not pending.done.is_set():
                        pending.finish(error=error)
                if not isinstance(error, Exception):
                    raise

    def _next_batch(self) -> list[_Pending] | None:
        """Wait for the oldest request's delay (or a full batch), then take the queued requests
        that fit with it, in arrival order; the others keep their place for the next run."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue[0]
            deadline = first.enqueued + self.config.max_queue_delay_ms / 1000
            while not self._closed:
                rows = sum(p.rows for p in self._queue if p.key == first.key)
                remaining = deadline - self._clock()
                if rows >= self.config.max_batch_size or remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch, kept, rows = [], deque(), 0
            for pending in self._queue:
                if pending.key == first.key and rows + pending.rows <= self.config.max_batch_size:
                    batch.append(pending)
                    rows += pending.rows
                else:
                    kept.append(pending)
            self._queue = kept
            self.stats.runs += 1
            if len(batch) > 1:
                self.stats.merged_runs += 1
            self.stats.largest_run_requests = max(self.stats.largest_run_requests, len(batch))
            self.stats.largest_run_rows = max(self.stats.largest_run_rows, rows)
        record_count(BATCH_ROWS, rows)
        return batch

    def _run(self, batch: list[_Pending]) -> None:
        if len(batch) == 1:
            self._run_alone(batch[0])
            return
        first = batch[0]
        try:
            merged = {name: np.concatenate([p.inputs[name] for p in batch]) for name in first.inputs}
            outputs = self.inner.predict(merged, first.output_names)
            results = _split(outputs, [p.rows for p in batch])
        except Exception as error:
            logger.warning(
                "a merged run failed; running its requests one by one so only the culprit fails",
                extra={"model": self.manifest.name, "requests": len(batch), "error": type(error).__name__},
            )
            with self._cond:
                self.stats.split_retries += 1
                self.stats.runs += len(batch)
            for pending in batch:
                self._run_alone(pending)
            return
        for pending, result in zip(batch, results, strict=True):
            pending.finish(result=result)

    def _run_alone(self, pending: _Pending) -> None:
        try:
            pending.finish(result=self.inner.predict(pending.inputs, pending.output_names))
        except Exception as error:
            pending.finish(error=error)


def _rows(inputs: Mapping[str, np.ndarray]) -> int | None:
    """The request's row count, or None when its inputs disagree on the first dimension (the
    signature allows it; stacking such requests would misalign their rows): it runs alone."""
    sizes = {int(array.shape[0]) for array in inputs.values() if np.ndim(array)}
    return sizes.pop() if len(sizes) == 1 else None


def _split(outputs: Mapping[str, np.ndarray], rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Each request's rows of every output; refuses outputs that are not one row per input row."""
    total = sum(rows)
    for name, array in outputs.items():
        if np.ndim(array) == 0 or array.shape[0] != total:
            raise ValueError(
                f"output {name!r} has shape {np.shape(array)}, not {total} rows: cannot split it"
            )
    bounds = np.cumsum([0, *rows])
    return [
        {name: array[start:stop] for name, array in outputs.items()}
        for start, stop in itertools.pairwise(bounds)
    ]


def batching_factory(inner: ModelFactory, config: BatchingConfig) -> ModelFactory:
    """Wrap what ``inner`` builds in a :class:`BatchingModel` where the model can be batched
    and batching is on; otherwise serve it as it is."""

    def build(manifest: Manifest, session: Any, timings: Any) -> Model:
        model = inner(manifest, session, timings)
        if not config.enabled:
            return model
        if not batchable(manifest):
            logger.info(
                "dynamic batching is off for this model: an input or output has no dynamic first dimension",
                extra={"model": f"{manifest.name}@{manifest.version}"},
            )
            return model
        return BatchingModel(model, config)

    return build
