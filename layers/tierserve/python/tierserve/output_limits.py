"""Output limits: what a response may reveal of a model's scores (the manifest's
``output_limits``), against extraction of the model by querying it.

    round   each value of a limited output rounded to that many decimals (half to even)
    top_k   in each row (the last axis) the k largest values kept, the others set to 0;
            ties at the k-th value keep the lowest indices

The limited outputs are those ``outputs`` names, or every FP16/FP32/FP64 output. Shapes and
datatypes stay what the signature says, so every client and the metadata keep working.
The trade-off: a caller gets less to fit a copy on (fewer digits, no ranking beyond k), and
loses the same: calibrated probabilities for thresholds, the full ranking for re-ranking or
ensembles, and exact values (rounding to 2 decimals turns 0.004 into 0). A row's
probabilities no longer sum to 1 after ``top_k``.

:func:`apply` is called where outputs leave the core (the data plane, the S3 pipeline, the
stream worker), so every tier answers alike; it is idempotent, so a GPU-tier answer limited
by the GPU server and limited again by the S3 pipeline is the same answer.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tierserve.catalog import FLOAT_DATATYPES, Manifest, OutputLimits


def limited_outputs(manifest: Manifest) -> frozenset[str]:
    """The names of the outputs ``manifest``'s limits apply to (none without limits)."""
    limits = manifest.output_limits
    if limits is None:
        return frozenset()
    if limits.outputs:
        return frozenset(limits.outputs)
    return frozenset(spec.name for spec in manifest.outputs if spec.datatype in FLOAT_DATATYPES)


def apply(manifest: Manifest, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``outputs`` with ``manifest``'s output limits applied (new arrays; the inputs are untouched)."""
    limits = manifest.output_limits
    if limits is None:
        return dict(outputs)
    names = limited_outputs(manifest)
    return {
        name: limit(array, limits) if name in names and _floating(array) else array
        for name, array in outputs.items()
    }


def limit(array: np.ndarray, limits: OutputLimits) -> np.ndarray:
    """One output's values: the top ``k`` of each row, then rounded."""
    result = np.array(array, copy=True)
    if limits.top_k is not None and result.ndim >= 1 and limits.top_k < result.shape[-1]:
        result = _top_k(result, limits.top_k)
    if limits.round is not None:
        result = np.round(result, limits.round).astype(array.dtype, copy=False)
    return result


def _top_k(array: np.ndarray, k: int) -> np.ndarray:
    # A stable sort of the negated values: the largest first, ties in index order (NaN last).
    order = np.argsort(-array, axis=-1, kind="stable")
    keep = np.zeros(array.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :k], True, axis=-1)
    return np.where(keep, array, np.zeros((), dtype=array.dtype))


def _floating(array: np.ndarray) -> bool:
    return isinstance(array, np.ndarray) and np.issubdtype(array.dtype, np.floating)
