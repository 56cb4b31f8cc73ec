"""Triton's statistics extension, where the serving process lives long: the GPU server and the
local API.

    GET /v2/models/stats                              every served model
    GET /v2/models/{model}/stats                      one model (its served version)
    GET /v2/models/{model}/versions/{version}/stats   one model version

The answer is Triton's JSON (``{"model_stats": [...]}``, each with ``inference_count``,
``execution_count``, ``last_inference`` in ms since the epoch, and ``inference_stats`` of
``{"count", "ns"}`` pairs: ``success``, ``fail``, ``queue``, ``compute_input``,
``compute_infer``, ``compute_output``, ``cache_hit``, ``cache_miss``; ``batch_stats`` per batch
size), so tritonclient's ``get_inference_statistics`` reads it. As Triton counts them:
``inference_count`` is rows (each row of a batched request is an inference),
``execution_count`` runs of the model (the GPU server's batcher merges several requests into
one run), ``success`` and ``fail`` whole requests end to end; ``queue`` is the time a request
waited for its batch, ``compute_input`` decoding and checking it, ``compute_infer`` the model's
run, ``compute_output`` encoding the response. A response cache hit counts as a success and
an inference, not as an execution.

Figures are kept per process since this module was imported (:data:`STATISTICS`), fed by the
audit record of each inference (:mod:`tierserve.audit`); the GPU server and the local API
import it, a Lambda function does not and keeps none. A Lambda execution environment is short-lived and one
of many, so the Lambda tier does not answer these routes: its fleet-wide figures are the
``Tierserve`` metrics on the dashboard.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tierserve import audit
from tierserve.audit import InferenceRecord
from tierserve.errors import ModelNotFound
from tierserve.routes import Route
from tierserve.settings import ModelRef
from tierserve.telemetry import Versioned

Document = dict[str, Any]
DURATIONS = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)
BATCH_DURATIONS = ("compute_input", "compute_infer", "compute_output")


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, int(ns))

    def as_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class _ModelFigures:
    inference_count: int = 0
    execution_count: int = 0
    last_inference: int = 0
    durations: dict[str, _Duration] = field(default_factory=lambda: {name: _Duration() for name in DURATIONS})
    batches: dict[int, dict[str, _Duration]] = field(default_factory=dict)

    def executed(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.execution_count += 1
        figures = self.batches.setdefault(batch_size, {name: _Duration() for name in BATCH_DURATIONS})
        figures["compute_input"].add(input_ns)
        figures["compute_infer"].add(infer_ns)
        figures["compute_output"].add(output_ns)


class Statistics:
    """Per model version, what its inferences did since this process started (thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], _ModelFigures] = {}
        self._clock = clock

    def _figures(self, model: Versioned) -> _ModelFigures:
        return self._models.setdefault((model.name, model.version), _ModelFigures())

    def record(self, record: InferenceRecord, elapsed_ns: int) -> None:
        """Count one finished inference of ``record.served``."""
        assert record.served is not None
        with self._lock:
            figures = self._figures(record.served)
            durations = figures.durations
            if not 200 <= record.status < 400:
                durations["fail"].add(elapsed_ns)
                return
            durations["success"].add(elapsed_ns)
            figures.inference_count += max(record.rows, 1)
            figures.last_inference = int(self._clock() * 1000)
            if record.cache == "hit":
                durations["cache_hit"].add(record.input_ns + record.output_ns)
                return
            if record.cache == "miss":
                durations["cache_miss"].add(0)
            durations["queue"].add(record.queue_ns)
            durations["compute_input"].add(record.input_ns)
            durations["compute_infer"].add(record.infer_ns)
            durations["compute_output"].add(record.output_ns)
            if record.executed:
                figures.executed(max(record.rows, 1), record.input_ns, record.infer_ns, record.output_ns)

    def executed(self, model: Versioned, batch_size: int, infer_ns: int) -> None:
        """Count one run of ``model`` that a batcher made for several requests."""
        with self._lock:
            self._figures(model).executed(batch_size, 0, infer_ns, 0)

    def model_stat(self, ref: ModelRef) -> Document:
        """Triton's ``model_stat`` for ``ref`` (zeros if it never ran)."""
        with self._lock:
            figures = self._models.get((ref.name, ref.version)) or _ModelFigures()
            return {
                "name": ref.name,
                "version": ref.version,
                "last_inference": figures.last_inference,
                "inference_count": figures.inference_count,
                "execution_count": figures.execution_count,
                "inference_stats": {name: d.as_json() for name, d in figures.durations.items()},
                "batch_stats": [
                    {"batch_size": size, **{name: d.as_json() for name, d in batch.items()}}
                    for size, batch in sorted(figures.batches.items())
                ],
            }

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


STATISTICS = Statistics()
audit.observe(STATISTICS.record)  # from the import on: the processes that answer statistics


class StatisticsEndpoint:
    """The statistics routes over the models a server serves: ``resolve(name, version)`` the
    served version (or :class:`ModelNotFound`), ``models()`` every served one."""

    def __init__(
        self,
        resolve: Callable[[str, str | None], ModelRef],
        models: Callable[[], Sequence[ModelRef]],
        statistics: Statistics = STATISTICS,
    ) -> None:
        self._resolve = resolve
        self._models = models
        self.statistics = statistics

    @classmethod
    def of_models(cls, refs: Sequence[ModelRef], statistics: Statistics = STATISTICS) -> StatisticsEndpoint:
        """Over a fixed list of served models (the local API's Lambda-tier models)."""
        by_name = {ref.name: ref for ref in refs}

        def resolve(name: str, version: str | None) -> ModelRef:
            ref = by_name.get(name)
            if ref is None:
                served = ", ".join(str(r) for r in refs) or "none"
                raise ModelNotFound(f"model {name!r} is not served here; models served: {served}")
            if version is not None and version != ref.version:
                raise ModelNotFound(
                    f"version {version!r} of model {name!r} is not deployed; deployed version: {ref.version}"
                )
            return ref

        return cls(resolve, lambda: tuple(refs), statistics)

    def every_model(self) -> Document:
        """``GET /v2/models/stats``."""
        return {"model_stats": [self.statistics.model_stat(ref) for ref in self._models()]}

    def one_model(self, model: str, version: str | None = None) -> Document:
        """``GET /v2/models/{model}[/versions/{version}]/stats``.

        Raises:
            ModelNotFound: the model (or that version) is not served here (404).
        """
        return {"model_stats": [self.statistics.model_stat(self._resolve(model, version))]}


# Before the OIP routes in a router: /v2/models/stats would otherwise read as a model named "stats".
STATS_ROUTES: tuple[Route, ...] = (
    Route("GET", "/v2/models/stats", StatisticsEndpoint.every_model),
    Route("GET", "/v2/models/<model>/stats", StatisticsEndpoint.one_model),
    Route("GET", "/v2/models/<model>/versions/<version>/stats", StatisticsEndpoint.one_model),
)
