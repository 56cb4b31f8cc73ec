"""Inputs for calibration and accuracy checks: a user's ``.npy``/``.npz`` file, or rows
generated from the model's signature.

Generated inputs: a dynamic batch dimension gets up to 256 rows (fewer for wide inputs),
other dynamic dimensions get 32; floats are standard normal; integer inputs whose name
says ``mask`` are ones, ``type``/``segment`` zeros, other integers uniform in [0, 100);
booleans are random. Everything is seeded, so two runs measure the same thing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from tierserve.catalog import TensorSpec
from tierserve.protocol import DATATYPES
from tierserve.tools.packaging._errors import InvalidModel

MAX_ROWS = 256
MIN_ROWS = 16
GENERATED_BYTES = 64 * 1024 * 1024
DYNAMIC_DIM = 32
# One row per run: dynamic int8 quantizes activations with one scale per tensor, so a row's
# result depends on the other rows of its batch; single rows measure what a single-row
# request gets, and make the measurement independent of how rows are grouped.
BATCH_ROWS = 1
MAX_FIXED_BATCH_RUNS = 16
INT_HIGH = 100

Feeds = dict[str, np.ndarray]


def load_calibration(path: Path, inputs: Sequence[TensorSpec]) -> Feeds:
    """Read calibration rows: ``.npy`` for a single-input model, ``.npz`` keyed by input name.

    Rows run along the first axis. Raises :class:`InvalidModel` naming what does not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidModel(f"calibration file {path} does not exist: give a .npy or .npz of model inputs")
    try:
        if path.suffix == ".npy":
            if len(inputs) != 1:
                names = ", ".join(i.name for i in inputs)
                raise InvalidModel(
                    f"calibration file {path} holds one array but the model has inputs {names}: "
                    "save them with numpy.savez(path, **{name: array})"
                )
            raw = {inputs[0].name: np.load(path, allow_pickle=False)}
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                raw = {key: archive[key] for key in archive.files}
        else:
            raise InvalidModel(
                f"calibration file {path} must be .npy (one input) or .npz (arrays named by input)"
            )
    except (ValueError, OSError) as error:
        raise InvalidModel(f"calibration file {path} cannot be read as numpy data ({error})") from None
    feeds: Feeds = {}
    for spec in inputs:
        if spec.name not in raw:
            raise InvalidModel(
                f"calibration file {path} has no array for input {spec.name!r} (has {sorted(raw)})"
            )
        array = raw[spec.name]
        if array.ndim != len(spec.shape):
            raise InvalidModel(
                f"calibration array {spec.name!r} has {array.ndim} dimensions; the model expects {len(spec.shape)} "
                f"{list(spec.shape)}"
            )
        for axis, (have, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
            if want != -1 and axis > 0 and have != want:
                raise InvalidModel(
                    f"calibration array {spec.name!r} has shape {list(array.shape)}; the model expects {list(spec.shape)}"
                )
        feeds[spec.name] = array.astype(_dtype(spec), copy=False)
    rows = {a.shape[0] for a in feeds.values() if a.ndim}
    if len(rows) > 1:
        raise InvalidModel(
            f"calibration arrays in {path} have different row counts {sorted(rows)}: give each the same"
        )
    for spec in inputs:
        count, batch = feeds[spec.name].shape[0] if spec.shape else 0, spec.shape[0] if spec.shape else -1
        if batch not in (-1, 0) and (count < batch or count % batch):
            raise InvalidModel(
                f"calibration array {spec.name!r} has {count} rows; the model takes batches of exactly {batch}: "
                f"give a multiple of {batch}"
            )
    return feeds


def generate_inputs(inputs: Sequence[TensorSpec], rows: int | None = None, seed: int = 0) -> Feeds:
    """Seeded inputs shaped by the signature (see the module docstring for the rules)."""
    rng = np.random.default_rng(seed)
    row_bytes = sum(
        int(np.prod([DYNAMIC_DIM if d == -1 else d for d in spec.shape[1:]] or [1])) * _itemsize(spec)
        for spec in inputs
    )
    if rows is None:
        rows = int(max(MIN_ROWS, min(MAX_ROWS, GENERATED_BYTES // max(row_bytes, 1))))
    feeds: Feeds = {}
    for spec in inputs:
        shape = [DYNAMIC_DIM if d == -1 else d for d in spec.shape]
        if shape:
            first = spec.shape[0]
            shape[0] = (
                rows if first == -1 else first * max(1, min(rows // max(first, 1), MAX_FIXED_BATCH_RUNS))
            )
        feeds[spec.name] = _random(spec, tuple(shape), rng)
    return feeds


def _random(spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dtype = _dtype(spec)
    lowered = spec.name.lower()
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        if "mask" in lowered:
            return np.ones(shape, dtype)
        if "type" in lowered or "segment" in lowered:
            return np.zeros(shape, dtype)
        return rng.integers(0, INT_HIGH, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    raise InvalidModel(
        f"cannot generate inputs for {spec.name!r} ({spec.datatype}): pass --calibration FILE.npz with real inputs"
    )


def _dtype(spec: TensorSpec) -> np.dtype:
    dtype = DATATYPES.get(spec.datatype)
    if dtype is None:
        raise InvalidModel(f"input {spec.name!r} has datatype {spec.datatype}, which tierserve cannot feed")
    return dtype


def _itemsize(spec: TensorSpec) -> int:
    dtype = DATATYPES.get(spec.datatype)
    return 8 if dtype is None or dtype.kind == "O" else dtype.itemsize


def row_count(feeds: Mapping[str, np.ndarray]) -> int:
    return max((a.shape[0] for a in feeds.values() if a.ndim), default=1)


def iter_batches(feeds: Mapping[str, np.ndarray], inputs: Sequence[TensorSpec]) -> Iterator[Feeds]:
    """Feeds cut into runs the model accepts: BATCH_ROWS row(s) for a dynamic batch dimension,
    exactly the fixed size otherwise, everything at once when the inputs share no batch axis."""
    specs = {s.name: s for s in inputs}
    firsts = {specs[n].shape[0] if n in specs and specs[n].shape else None for n in feeds}
    if not feeds or None in firsts or len(firsts) > 1:
        yield dict(feeds)
        return
    first = firsts.pop()
    step = BATCH_ROWS if first == -1 else int(first)  # type: ignore[arg-type]
    rows = row_count(feeds)
    stop = rows if first == -1 else rows - step + 1
    for start in range(0, stop, step):
        yield {name: array[start : start + step] for name, array in feeds.items()}


def first_row(feeds: Mapping[str, np.ndarray], inputs: Sequence[TensorSpec]) -> Feeds:
    """One run's worth of input (batch 1, or the model's fixed batch): for latency."""
    return next(iter_batches({n: a[: _one(n, inputs)] if a.ndim else a for n, a in feeds.items()}, inputs))


def _one(name: str, inputs: Sequence[TensorSpec]) -> int:
    spec = next((s for s in inputs if s.name == name), None)
    return 1 if spec is None or not spec.shape or spec.shape[0] == -1 else spec.shape[0]
