"""The statistic: the population stability index (PSI) of each feature against its baseline.

    PSI = sum over bins of (a - e) * ln(a / e)

where ``e`` is a bin's share of the baseline rows and ``a`` its share of the window's rows
(both floored at :data:`FLOOR`, so an empty bin counts as rare rather than infinite). The
usual reading, used here: under 0.1 *stable*, 0.1 to 0.25 *moderate* (worth a look), 0.25 and
over *drift* (the alarm's default threshold, context ``drift_psi_threshold``). PSI is a
symmetrised Kullback-Leibler divergence over the baseline's deciles, so it reads the same on
every feature whatever its scale, and it needs only the baseline's bins, not its rows.

A window of few rows has a PSI of about (bins - 1) / rows even without drift (0.09 at 100
rows, 10 bins): under ``min_rows`` a feature's verdict is *too few rows* and it raises no alarm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tierserve.drift.baseline import Baseline, FeatureBins

FLOOR = 1e-4
MODERATE = 0.1
DRIFT = 0.25
DEFAULT_MIN_ROWS = 100
STABLE, WATCH, DRIFTED, TOO_FEW, MISSING = "stable", "moderate", "drift", "too few rows", "not captured"


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """PSI of two distributions over the same bins (fractions, each summing to 1)."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), FLOOR)
    a = np.maximum(np.asarray(actual, dtype=np.float64), FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's comparison: its PSI (None when it could not be judged) and verdict."""

    bins: FeatureBins
    rows: int
    psi: float | None
    verdict: str
    actual: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature": self.bins.name,
            "input": self.bins.input,
            "rows": self.rows,
            "psi": None if self.psi is None else round(self.psi, 6),
            "verdict": self.verdict,
            "edges": list(self.bins.edges),
            "baseline": list(self.bins.fractions),
            "window": list(self.actual),
        }


def verdict_of(value: float, threshold: float) -> str:
    if value >= threshold:
        return DRIFTED
    return WATCH if value >= min(MODERATE, threshold) else STABLE


def compare(
    baseline: Baseline,
    columns: Mapping[str, tuple[str, np.ndarray]],
    *,
    threshold: float = DRIFT,
    min_rows: int = DEFAULT_MIN_ROWS,
) -> list[FeatureDrift]:
    """Each baseline feature against its values in ``columns`` (from
    :func:`tierserve.drift.baseline.feature_columns` over the window's rows)."""
    results = []
    for bins in baseline.features:
        _, values = columns.get(bins.name, ("", np.empty(0)))
        finite = values[np.isfinite(values)] if values.size else values
        if finite.size == 0:
            results.append(FeatureDrift(bins, 0, None, MISSING, ()))
            continue
        actual = bins.counts(finite) / finite.size
        rounded = tuple(round(float(a), 6) for a in actual)
        if finite.size < min_rows:
            results.append(FeatureDrift(bins, int(finite.size), None, TOO_FEW, rounded))
            continue
        value = psi(np.asarray(bins.fractions), actual)
        value = 0.0 if math.isclose(value, 0.0, abs_tol=1e-12) else value
        results.append(FeatureDrift(bins, int(finite.size), value, verdict_of(value, threshold), rounded))
    return results
