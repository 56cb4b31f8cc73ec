"""Dynamic batching: concurrent requests to one model merged along the batch dimension.

    request threads                              the model's batcher thread
    predict(inputs), model idle, nobody waiting ─> runs at once, on its own thread (inline)
    predict(inputs), a run in flight ─> queue ─┐
    predict(inputs) ─> queue ──────────────────┼─> when the run ends: the queued requests of
    predict(inputs) ─> queue ──────────────────┘   the same shape, up to max_batch_size rows
                                                ─> concatenate ─> inner.predict ─> split
          <───────────── each request's own rows (or its own error) ──────────────┘

:class:`BatchingModel` implements the model interface, so the data plane does not know it
is there. **When a request waits** (the policy): batching can only pay where requests meet,
and they meet where the model is busy.

- A request that finds the model idle and no one waiting runs at once, on its caller's
  thread: no hand-off to another thread, no delay. A lone client pays nothing for batching.
- A request that arrives while a run is in flight waits for that run, in the queue; when
  the run ends, the queued requests run together.
- A run that met concurrency (it served several requests, or others queued up while it ran)
  holds the free model for companions afterwards: the clients it has just answered are on
  their way back, and one run for them and those waiting costs less than two. The hold ends
  once as many requests wait as that run met, or a batch is full, and lasts at most as long
  as the run took (holding longer would cost more than the second run it saves; a light
  model is hardly ever held) and at most ``max_queue_delay_ms``. Without that hold the
  clients of a busy model split into groups that take turns, each a smaller batch.

Guarantees:

- Only requests whose inputs have the same names, dtypes and non-batch dimensions, and that
  ask for the same outputs, share a run. Requests arrive validated (the data plane parses
  them against the signature before ``predict``), so a malformed request never reaches the
  queue.
- Runs of the model (inline or batched) never overlap one another: on a GPU, the next batch
  fills while the current one runs.
- A failed merged run is retried request by request: only the request that makes the model
  fail gets the error. A run whose outputs do not split back along the first dimension is
  retried the same way, so a result is never another request's rows.
- No request waits unboundedly: a queued request waits for the run in flight, a hold of at
  most ``max_queue_delay_ms``, and the runs ahead of it, whatever its shape; a full queue
  refuses new requests at once (:class:`~tierserve.errors.Overloaded`, 503).
  A request that has no result after ``max_queue_delay_ms + run_timeout_s`` gets a 503
  (:class:`~tierserve.errors.ModelUnavailable`), and a run going on for longer than
  ``run_timeout_s`` makes the model not ready (the GPU server's ``/ping`` says 503, so
  SageMaker replaces the instance).
- A batcher thread that dies (a ``BaseException`` out of the wrapped model) fails every
  request it leaves behind with a 503, refuses new ones, and the model is no longer ready;
  a ``BaseException`` out of an inline run does the same (its caller gets the 503).

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

from tierserve import audit
from tierserve.catalog import Manifest
from tierserve.errors import ModelUnavailable, Overloaded
from tierserve.model import Model, ModelFactory
from tierserve.settings import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE_DELAY_MS
from tierserve.stats import STATISTICS
from tierserve.telemetry import BATCH_ROWS, QUEUE_FULL, logger, record_count

DEFAULT_MAX_QUEUE_SIZE = 256
# Twice SageMaker's 60 s invocation timeout: a run still going after this is stuck, and nobody
# waits for its result any more.
DEFAULT_RUN_TIMEOUT_S = 120.0
# The batcher re-reads its clock at least this often while it waits for companions.
COMPANION_WAIT_SLICE_S = 0.05
# Runs without a hold after a hold that ended without its companions (see _end_run).
HOLD_BACKOFF_RUNS = 8


@dataclass(frozen=True)
class BatchingConfig:
    """``max_batch_size`` rows per run (1 turns batching off), ``max_queue_delay_ms`` the longest
    the free model is held for companions after a run that met concurrency (see the module
    docstring), ``max_queue_size`` requests waiting before new ones get 503,
    ``run_timeout_s`` the longest one run of the model may take before the model counts as
    stuck (not ready) and the requests waiting on it get 503."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue_delay_ms: float = DEFAULT_MAX_QUEUE_DELAY_MS
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    run_timeout_s: float = DEFAULT_RUN_TIMEOUT_S

    def __post_init__(self) -> None:
        if (
            self.max_batch_size < 1
            or self.max_queue_delay_ms < 0
            or self.max_queue_size < 1
            or self.run_timeout_s <= 0
        ):
            raise ValueError(
                "batching needs max_batch_size >= 1, max_queue_delay_ms >= 0, max_queue_size >= 1 and "
                f"run_timeout_s > 0, got {self.max_batch_size}, {self.max_queue_delay_ms}, "
                f"{self.max_queue_size}, {self.run_timeout_s}"
            )

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1

    @property
    def wait_timeout_s(self) -> float:
        """The longest a queued request waits for its result: its queue delay plus one run."""
        return self.max_queue_delay_ms / 1000 + self.run_timeout_s


@dataclass
class BatchStats:
    """Counters since the model loaded (tests and benchmarks read them; logs too). Waits are
    measured by the model's clock."""

    requests: int = 0  # requests that ran inline or went through the queue (not direct ones)
    inline: int = 0  # of those, run at once on their caller's thread: model idle, nobody waiting
    runs: int = 0  # runs of the wrapped model, inline ones and retries included (not direct ones)
    merged_runs: int = 0  # runs that held more than one request
    largest_run_requests: int = 0
    largest_run_rows: int = 0
    split_retries: int = 0  # merged runs that failed and were retried request by request
    rejected: int = 0  # requests refused because the queue was full
    direct: int = 0  # requests over max_batch_size, or whose inputs disagree on rows: run alone
    held_for_companions: int = 0  # batches held back to wait for companions
    holds_cut_short: int = 0  # holds that ended before their companions came (holds pause)
    longest_queue_wait_s: float = 0.0  # from a queued request's arrival to the start of its run
    total_queue_wait_s: float = 0.0


def batchable(manifest: Manifest) -> bool:
    """True when every input and output has a dynamic first dimension, taken as a batch of
    independent rows, and the manifest does not opt out (``"extra": {"dynamic_batching": false}``
    for a model whose first dimension is something else, a sequence for instance)."""
    if manifest.extra.get("dynamic_batching") is False:
        return False
    return all(spec.shape and spec.shape[0] < 0 for spec in (*manifest.inputs, *manifest.outputs))


class _Pending:
    """One request in the queue and, once run, its result or its error."""

    __slots__ = ("done", "enqueued", "error", "inputs", "key", "output_names", "result", "rows", "started")

    def __init__(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None, rows: int, enqueued: float
    ) -> None:
        self.inputs = dict(inputs)
        self.output_names = list(output_names) if output_names else None
        self.rows = rows
        self.enqueued = enqueued
        self.started = enqueued  # when its run began (the batcher sets it)
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
    """Wraps a model; ``predict`` calls from many threads are merged into fewer, larger runs
    where they meet (see the module docstring for when a request waits).

    One run at a time: a request that finds the model idle runs on its caller's thread, and
    one batcher thread per model runs the queued ones. Requests that run on their own (over
    ``max_batch_size``, or inputs that disagree on their rows) run on their caller's thread
    outside that order and may overlap a run (an onnxruntime session allows concurrent runs).

    :meth:`close` drains the queue and stops the thread; the registry calls it when it evicts
    the model, so the thread lets go of the session (and its GPU memory).
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
        self._unavailable = f"{inner.manifest.name} is shutting down or was unloaded: retry the request"
        self._run_started: float | None = None  # when the current run (inline or batched) began
        # After a run that met concurrency: until when the free model is held for companions,
        # and how many requests the batcher waits for (see _end_run).
        self._hold_until: float | None = None
        self._wanted = 0
        self._holds_off_for = 0  # runs left without holds, after a hold that came back short
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
        """False once closed, when the batcher thread died, or while a run has gone on for
        longer than ``run_timeout_s`` (stuck); otherwise the wrapped model's readiness."""
        with self._cond:
            if self._closed or not self._thread.is_alive():
                return False
            started = self._run_started
        if started is not None and self._clock() - started > self.config.run_timeout_s:
            return False
        return self.inner.ready()

    def stats_snapshot(self) -> dict[str, int | float]:
        with self._cond:
            return asdict(self.stats)

    def predict(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run ``inputs`` (already validated against the signature): at once when the model is
        idle and no one waits, else merged with the compatible requests queued meanwhile.

        Raises:
            Overloaded: the queue is full.
            ModelUnavailable: the model is closed, its batcher died, or no result came within
                ``config.wait_timeout_s``.
            Whatever the wrapped model raises for these inputs alone.
        """
        rows = _rows(inputs)
        if rows is None or rows > self.config.max_batch_size:
            with self._cond:
                self.stats.direct += 1
            return self.inner.predict(inputs, output_names)
        with self._cond:
            if self._closed:
                raise ModelUnavailable(self._unavailable)
            alone = self._run_started is None and not self._queue and not self._holding()
            if alone:  # nothing to merge with, nothing to wait for
                self.stats.requests += 1
                self.stats.inline += 1
                self._start_run(1, rows)
            else:
                pending = self._enqueue(inputs, output_names, rows)
        if alone:
            record_count(BATCH_ROWS, rows, model=self.manifest)
            return self._run_inline(inputs, output_names)
        return self._wait(pending)

    def close(self, timeout: float = 30.0) -> None:
        """Run what is queued, then stop the batcher thread (waiting up to ``timeout`` seconds
        for it); later requests get 503. Closing twice is harmless."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ------------------------------------------------------------ request threads

    def _enqueue(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None, rows: int
    ) -> _Pending:
        """Queue a request (the lock held). Raises Overloaded when the queue is full."""
        if len(self._queue) >= self.config.max_queue_size:
            self.stats.rejected += 1
            record_count(QUEUE_FULL, model=self.manifest)
            raise Overloaded(
                f"{len(self._queue)} requests already wait for {self.manifest.name}, the limit of "
                "TIERSERVE_MAX_QUEUE_SIZE: retry with backoff, or add instances to the endpoint"
            )
        pending = _Pending(inputs, output_names, rows, self._clock())
        self._queue.append(pending)
        self.stats.requests += 1
        self._cond.notify_all()
        return pending

    def _run_inline(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        try:
            return self.inner.predict(inputs, output_names)
        except Exception:
            raise
        except BaseException as error:  # what would have ended the batcher ends the model here too
            self._stop_for_good(error, [])
            raise ModelUnavailable(self._unavailable) from error
        finally:
            with self._cond:
                self._end_run(1)

    def _wait(self, pending: _Pending) -> dict[str, np.ndarray]:
        if not pending.done.wait(self.config.wait_timeout_s):
            with self._cond:
                if pending in self._queue:  # never picked up: nobody will run it now
                    self._queue.remove(pending)
            raise ModelUnavailable(
                f"{self.manifest.name} gave no result within {self.config.wait_timeout_s:g} s (a run is "
                "stuck or the queue is too long); retry, on another instance if it persists"
            )
        record = audit.current()
        if record is not None:  # the statistics' queue time; the batcher counts the run
            record.queue_ns, record.executed = int((pending.started - pending.enqueued) * 1e9), False
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    # ------------------------------------------------------------ both (the lock held)

    def _start_run(self, requests: int, rows: int) -> None:
        self._run_started = self._clock()
        self.stats.runs += 1
        if requests > 1:
            self.stats.merged_runs += 1
        self.stats.largest_run_requests = max(self.stats.largest_run_requests, requests)
        self.stats.largest_run_rows = max(self.stats.largest_run_rows, rows)

    def _end_run(self, requests: int) -> None:
        """A run of ``requests`` requests ended. If it met concurrency (it served several, or
        requests queued up while it ran), the free model is held for companions: the clients
        it has just answered are on their way back, and merging them with those waiting makes
        one run instead of two. The hold lasts at most as long as that run took (holding any
        longer costs more than a second run would) and at most ``max_queue_delay_ms``."""
        now = self._clock()
        started = self._run_started if self._run_started is not None else now
        self._run_started = None
        concurrent = requests + len(self._queue)
        self._hold_until = None
        if self._holds_off_for:
            self._holds_off_for -= 1
        elif concurrent > 1:
            self._hold_until = now + min(self.config.max_queue_delay_ms / 1000, now - started)
            self._wanted = concurrent
        self._cond.notify_all()

    def _holding(self) -> bool:
        return self._hold_until is not None and self._clock() < self._hold_until

    # ------------------------------------------------------------ the batcher thread

    def _serve(self) -> None:
        batch: list[_Pending] = []
        try:
            while batch := self._next_batch() or []:  # empty once closed and drained
                try:
                    self._run(batch)
                except Exception as error:  # a bug in merging or splitting: fail this run only
                    for pending in batch:
                        if not pending.done.is_set():
                            pending.finish(error=error)
                finally:
                    with self._cond:
                        self._end_run(len(batch))
        except BaseException as error:  # the thread ends here: leave nobody waiting
            self._stop_for_good(error, batch)

    def _stop_for_good(self, error: BaseException, batch: list[_Pending]) -> None:
        """The batcher thread is dying: fail its run and the queue with a 503, refuse new requests."""
        reason = (
            f"the batcher of {self.manifest.name} stopped ({type(error).__name__}); this instance is not "
            "ready any more: retry, on another instance"
        )
        logger.error(reason, exc_info=(type(error), error, error.__traceback__))
        with self._cond:
            self._closed = True
            self._unavailable = reason
            stranded = [*batch, *self._queue]
            self._queue.clear()
            self._run_started = None
            self._cond.notify_all()  # the batcher, if it lives, sees it is closed and ends
        for pending in stranded:
            if not pending.done.is_set():
                pending.finish(error=ModelUnavailable(reason))

    def _next_batch(self) -> list[_Pending] | None:
        """Once the model is free and requests wait: the queued requests that fit with the
        oldest, in arrival order (the others keep their place for the next run), after the
        hold for companions where the last run opened one (:meth:`_end_run`)."""
        with self._cond:
            while not self._queue or self._run_started is not None:
                if self._closed and not self._queue:
                    return None
                self._cond.wait()
            first = self._queue[0]
            if self._holding() and not self._closed:
                self._hold_for_companions(first)
            self._hold_until = None  # this batch took the hold
            batch, kept, rows = [], deque(), 0
            for pending in self._queue:
                if pending.key == first.key and rows + pending.rows <= self.config.max_batch_size:
                    batch.append(pending)
                    rows += pending.rows
                else:
                    kept.append(pending)
            self._queue = kept
            self._start_run(len(batch), rows)
            for pending in batch:
                waited = self._run_started - pending.enqueued  # type: ignore[operator]
                self.stats.total_queue_wait_s += waited
                self.stats.longest_queue_wait_s = max(self.stats.longest_queue_wait_s, waited)
                pending.started = self._run_started
        record_count(BATCH_ROWS, rows, model=self.manifest)
        return batch

    def _hold_for_companions(self, first: _Pending) -> None:
        """Wait (the lock held) until as many requests compatible with ``first`` wait as the
        hold wants, their rows fill a batch, the hold ends, or the model closes. Counted in
        ``held_for_companions`` when it first waits."""
        held = False
        while not self._closed:
            compatible = [p for p in self._queue if p.key == first.key]
            if (
                len(compatible) >= self._wanted
                or sum(p.rows for p in compatible) >= self.config.max_batch_size
            ):
                break
            remaining = (self._hold_until or 0.0) - self._clock()
            if remaining <= 0:
                # They did not come back in time (the clients, or the CPU they share with the
                # model, are slower than a run): holding only idles the model. Stop for a while.
                self._holds_off_for = HOLD_BACKOFF_RUNS
                self.stats.holds_cut_short += 1
                break
            if not held:
                held = True
                self.stats.held_for_companions += 1
            # In slices: a clock that is not time.monotonic (tests) moves without notifying.
            self._cond.wait(min(remaining, COMPANION_WAIT_SLICE_S))

    def _run(self, batch: list[_Pending]) -> None:
        if len(batch) == 1:
            self._run_alone(batch[0])
            return
        first = batch[0]
        try:
            merged = {name: np.concatenate([p.inputs[name] for p in batch]) for name in first.inputs}
            started = time.perf_counter_ns()
            outputs = self.inner.predict(merged, first.output_names)
            STATISTICS.executed(self.manifest, sum(p.rows for p in batch), time.perf_counter_ns() - started)
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
        started = time.perf_counter_ns()
        try:
            result = self.inner.predict(pending.inputs, pending.output_names)
        except Exception as error:
            pending.finish(error=error)
            return
        STATISTICS.executed(self.manifest, pending.rows, time.perf_counter_ns() - started)
        pending.finish(result=result)


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
