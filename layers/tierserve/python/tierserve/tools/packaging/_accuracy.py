"""How far a packaged model is from the original, and what it costs to load and run.

For every output, on the same inputs:
- float outputs: ``max_abs_diff`` and ``mean_rel_diff`` (mean |a - b| / mean |a|);
- classifiers (a float output [batch, classes] whose rows are probabilities, or whose name
  says prob/logit/score/class): ``top1``, the fraction of rows whose argmax agrees;
- other float outputs (embeddings, hidden states): ``cosine``, the mean cosine similarity of
  each row (flattened) to the original's, and its minimum ``cosine_min``;
- integer and boolean outputs (labels): ``agreement``, the fraction of equal elements.

A budget bounds them: every float output within ``max_abs_diff`` (when set), every
classifier and label output at or above ``min_top1``, every other float output at or above
``min_cosine``.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tierserve.catalog import TensorSpec
from tierserve.tools.packaging._feeds import iter_batches

DEFAULT_MIN_TOP1 = 0.98
DEFAULT_MIN_COSINE = 0.99
# Optimization alone reorders float math; fp16 rounds every weight; int8 is judged by
# top-1 and cosine, whose meaning does not depend on the outputs' scale.
DEFAULT_MAX_ABS_DIFF: dict[str, float | None] = {
    "none": 1e-3,
    "fp16": 1e-2,
    "int8-dynamic": None,
    "int8-static": None,
}
CLASSIFIER_NAME = re.compile(r"prob|logit|score|class", re.IGNORECASE)
LATENCY_RUNS = 30
LATENCY_SECONDS = 2.0
LOAD_RUNS = 3

Run = Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class Budget:
    max_abs_diff: float | None = None
    min_top1: float = DEFAULT_MIN_TOP1
    min_cosine: float = DEFAULT_MIN_COSINE

    @classmethod
    def default_for(cls, quantization: str) -> Budget:
        return cls(max_abs_diff=DEFAULT_MAX_ABS_DIFF.get(quantization))

    def to_dict(self) -> dict[str, float | None]:
        return {"max_abs_diff": self.max_abs_diff, "min_top1": self.min_top1, "min_cosine": self.min_cosine}


def collect(run: Run, feeds: Mapping[str, np.ndarray], inputs: Sequence[TensorSpec]) -> list[np.ndarray]:
    """Run every batch and join the outputs along the first axis."""
    parts = [run(batch) for batch in iter_batches(feeds, inputs)]
    return [np.concatenate(column) if column[0].ndim else column[0] for column in zip(*parts, strict=True)]


def compare(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], outputs: Sequence[TensorSpec]
) -> dict[str, dict[str, Any]]:
    """Per-output metrics (see the module docstring)."""
    return {
        spec.name: _metrics(np.asarray(a), np.asarray(b), spec.name)
        for spec, a, b in zip(outputs, reference, candidate, strict=True)
    }


def _metrics(a: np.ndarray, b: np.ndarray, name: str) -> dict[str, Any]:
    if a.shape != b.shape:
        return {"kind": "mismatch", "problem": f"shape {list(b.shape)} instead of {list(a.shape)}"}
    if a.dtype.kind not in "fc":
        return {"kind": "label", "agreement": _round(float(np.mean(a == b)) if a.size else 1.0)}
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    finite = np.isfinite(a64)
    result: dict[str, Any] = {}
    if np.any(np.isfinite(b64) != finite):
        result["non_finite_mismatch"] = int(np.sum(np.isfinite(b64) != finite))
    diff = np.abs(a64 - b64)[finite & np.isfinite(b64)]
    scale = float(np.mean(np.abs(a64[finite]))) if np.any(finite) else 0.0
    result["max_abs_diff"] = _round(float(diff.max()) if diff.size else 0.0)
    result["mean_rel_diff"] = _round(float(diff.mean()) / scale if diff.size and scale > 0 else 0.0)
    rows_a = a64.reshape(a64.shape[0], -1) if a64.ndim >= 2 else a64.reshape(1, -1)
    rows_b = b64.reshape(rows_a.shape)
    if _is_classifier(a64, name):
        result["kind"] = "classifier"
        result["top1"] = _round(float(np.mean(rows_a.argmax(axis=1) == rows_b.argmax(axis=1))))
    else:
        result["kind"] = "embedding"
    cosine = _cosine(np.nan_to_num(rows_a), np.nan_to_num(rows_b))
    result["cosine"] = _round(float(cosine.mean()))
    result["cosine_min"] = _round(float(cosine.min()))
    return result


def _is_classifier(values: np.ndarray, name: str) -> bool:
    if values.ndim != 2 or values.shape[1] < 2:
        return False
    if CLASSIFIER_NAME.search(name):
        return True
    sums = values.sum(axis=1)
    return bool(np.all(values >= 0) and np.allclose(sums, 1.0, atol=1e-3))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    return np.where(both_zero, 1.0, dots / np.where(norms == 0, 1.0, norms))


def violations(per_output: Mapping[str, Mapping[str, Any]], budget: Budget) -> list[str]:
    """What is over budget, one phrase per problem (empty when within budget)."""
    problems = []
    for name, metrics in per_output.items():
        if metrics.get("kind") == "mismatch":
            problems.append(f"{name}: {metrics['problem']}")
            continue
        if metrics.get("non_finite_mismatch"):
            problems.append(f"{name}: {metrics['non_finite_mismatch']} values became NaN or infinite")
        if budget.max_abs_diff is not None and metrics.get("max_abs_diff", 0.0) > budget.max_abs_diff:
            problems.append(f"{name}: max abs diff {metrics['max_abs_diff']:.3g} > {budget.max_abs_diff:g}")
        if "top1" in metrics and metrics["top1"] < budget.min_top1:
            problems.append(f"{name}: top-1 agreement {metrics['top1']:.2%} < {budget.min_top1:.2%}")
        if "agreement" in metrics and metrics["agreement"] < budget.min_top1:
            problems.append(f"{name}: label agreement {metrics['agreement']:.2%} < {budget.min_top1:.2%}")
        if metrics.get("kind") == "embedding" and metrics["cosine"] < budget.min_cosine:
            problems.append(f"{name}: cosine similarity {metrics['cosine']:.4f} < {budget.min_cosine:g}")
    return problems


def summary(per_output: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The worst value of each metric across outputs (what the table and the bench show)."""
    worst: dict[str, float] = {}
    for metrics in per_output.values():
        for key, pick in (("max_abs_diff", max), ("mean_rel_diff", max), ("top1", min), ("agreement", min)):
            if key in metrics:
                worst[key] = pick(worst.get(key, metrics[key]), metrics[key])
        if metrics.get("kind") == "embedding":
            worst["cosine"] = min(worst.get("cosine", metrics["cosine"]), metrics["cosine"])
    return worst


def score(per_output: Mapping[str, Mapping[str, Any]]) -> tuple[float, float]:
    """Compare candidates: (the worst top-1, label agreement or embedding cosine; then the worst
    cosine of any float output), higher is better, 1.0 is identical. NaNs or a shape mismatch
    score (-1, -1)."""
    primary, cosine = 1.0, 1.0
    for metrics in per_output.values():
        if metrics.get("kind") == "mismatch" or metrics.get("non_finite_mismatch"):
            return (-1.0, -1.0)
        for key in ("top1", "agreement"):
            if key in metrics:
                primary = min(primary, metrics[key])
        if "cosine" in metrics:
            cosine = min(cosine, metrics["cosine"])
            if metrics.get("kind") == "embedding":
                primary = min(primary, metrics["cosine"])
    return (primary, cosine)


@dataclass(frozen=True)
class Timing:
    """Median session creation time and median batch-1 latency, in milliseconds."""

    load_ms: float
    latency_ms: float

    def to_dict(self) -> dict[str, float]:
        return {"load_ms": round(self.load_ms, 2), "latency_ms": round(self.latency_ms, 3)}


def time_model(open_session: Callable[[], Any], one_row: Mapping[str, np.ndarray]) -> tuple[Timing, Any]:
    """Open the session LOAD_RUNS times and time batch-1 runs on the last one."""
    loads, session = [], None
    for _ in range(LOAD_RUNS):
        start = time.perf_counter()
        session = open_session()
        loads.append((time.perf_counter() - start) * 1000)
    feed = dict(one_row)
    for _ in range(3):
        session.run(None, feed)
    latencies: list[float] = []
    deadline = time.perf_counter() + LATENCY_SECONDS
    while len(latencies) < LATENCY_RUNS and (len(latencies) < 5 or time.perf_counter() < deadline):
        start = time.perf_counter()
        session.run(None, feed)
        latencies.append((time.perf_counter() - start) * 1000)
    return Timing(statistics.median(loads), statistics.median(latencies)), session


def _round(value: float) -> float:
    return float(f"{value:.6g}")
