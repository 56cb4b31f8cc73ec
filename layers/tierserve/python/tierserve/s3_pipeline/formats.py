"""Input formats of the S3 pipeline: ``.json`` (a v2 infer request), ``.bin`` (a v2 infer
request in the binary tensor data extension, its JSON header's length in the object's metadata
``inference-header-content-length``), ``.npy`` (one tensor) and ``.jsonl`` (one row per line,
streamed in batches), each read within its size bounds and validated by the protocol's own
checks, so a file and an HTTP request get the same messages.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

from tierserve.catalog import Manifest
from tierserve.errors import BadRequest, PayloadTooLarge, TierserveError
from tierserve.protocol import (
    HEADER_LENGTH,
    InferenceRequest,
    RequestedOutput,
    decode_json,
    dumps,
    loads,
    parse_infer_request,
    request_from_arrays,
)
from tierserve.s3_pipeline.errors import data_error
from tierserve.s3_pipeline.events import InputKey
from tierserve.s3_pipeline.settings import PipelineSettings
from tierserve.settings import INPUT_FORMATS, MAX_INPUT_MB_ENV, MAX_JSONL_MB_ENV, MAX_ROWS_ENV, MB

FORMATS = INPUT_FORMATS
READ_CHUNK_BYTES = 1 * MB
Batches = Iterator[tuple[InferenceRequest, int]]


def check_format(key: InputKey) -> str:
    """The input's format, from its extension.

    Raises:
        BadRequest: not one of :data:`FORMATS`.
    """
    if key.format not in FORMATS:
        raise BadRequest(
            f"{key.path!r} has no supported extension: name inputs .json (a v2 infer request), "
            ".bin (one in the binary extension), .npy (one tensor) or .jsonl (one row per line)"
        )
    return key.format


def read_input(
    key: InputKey,
    body: Any,
    size: int,
    where: str,
    manifest: Manifest,
    settings: PipelineSettings,
    *,
    metadata: Mapping[str, str] | None = None,
) -> tuple[InferenceRequest, Batches]:
    """An input file's request (what to answer: id, outputs) and its model batches
    ``(request, rows)``: one for ``.json``, ``.bin`` and ``.npy``, streamed row batches for
    ``.jsonl``. ``metadata`` is the object's S3 user metadata (a ``.bin`` input's header length).

    Raises:
        BadRequest / PayloadTooLarge: the file is malformed, does not fit the model, or is over
            its limit (the message names the limit's variable).
        TierserveError: reading the body from S3 failed (retryable).
    """
    fmt = check_format(key)
    if fmt == ".jsonl":
        check_size(size, settings.max_jsonl_bytes, MAX_JSONL_MB_ENV)
        chunks = _guarded(iter(lambda: body.read(READ_CHUNK_BYTES), b""), where)
        lines = iter_lines(chunks, settings.max_input_bytes)
        rows = iter_row_batches(
            lines, manifest, batch_size=settings.row_batch_size, max_rows=settings.max_rows
        )
        return InferenceRequest(inputs={}), _decoded(rows)
    limit = settings.max_input_bytes
    check_size(size, limit, MAX_INPUT_MB_ENV)
    data = _read_limited(body, limit, where)
    with decoding():
        if fmt == ".npy":
            request = decode_npy(data, manifest, max_bytes=limit)
        else:
            headers = _binary_headers(metadata, where) if fmt == ".bin" else None
            request = json_outputs(parse_infer_request(data, headers, manifest, max_bytes=limit))
    return request, iter([(request, 0)])


def _binary_headers(metadata: Mapping[str, str] | None, where: str) -> dict[str, str]:
    """The header length of a ``.bin`` input, from its S3 metadata (``x-amz-meta-*``)."""
    found = {k.lower(): v for k, v in (metadata or {}).items()}.get(HEADER_LENGTH)
    if found is None:
        raise BadRequest(
            f"{where} is a .bin request without its JSON header's length: put it with the metadata "
            f"{HEADER_LENGTH} (x-amz-meta-{HEADER_LENGTH}: N), or send JSON as a .json file"
        )
    return {HEADER_LENGTH: found}


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
        value = loads(line)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(
            f"line {number} is not valid JSON: a .jsonl file holds one JSON row per line"
        ) from None
    except RecursionError:
        raise BadRequest(
            f"line {number} is nested too deeply to decode: a row nests lists only as deep as the input's shape"
        ) from None
    return row_values(value, f"line {number}", single, names)


def row_values(value: Any, where: str, single: str | None, names: list[str]) -> dict[str, Any]:
    """One row, decoded from JSON, as ``{input name: value}``: an object naming exactly the
    model's inputs, or for a single-input model (``single``) the value itself.

    Raises:
        BadRequest: neither (the message starts with ``where``: "line 3", "the record").
    """
    if isinstance(value, dict):
        unknown = [k for k in value if k not in names]
        missing = [n for n in names if n not in value]
        if unknown or missing:
            raise BadRequest(
                f"{where}: a row needs exactly the model's inputs {names}"
                + (f"; unknown {unknown}" if unknown else "")
                + (f"; missing {missing}" if missing else "")
            )
        return value
    if single is not None and value is not None:
        return {single: value}
    raise BadRequest(
        f"{where}: a row must be an object {{input name: value}}"
        + (" or the value of the model's one input" if single else f"; the model's inputs are {names}")
    )


def _row_batch(rows: list[tuple[int, dict[str, Any]]], manifest: Manifest) -> InferenceRequest:
    first, last = rows[0][0], rows[-1][0]
    where = f"line {first}" if first == last else f"lines {first}-{last}"
    try:
        return rows_request([row for _, row in rows], manifest)
    except BadRequest as error:
        raise BadRequest(f"{where}: {error.message}") from None


def rows_request(rows: list[dict[str, Any]], manifest: Manifest) -> InferenceRequest:
    """Rows (each ``{input name: value}``, one sample without the batch dimension) stacked
    along the first dimension into one validated request.

    Raises:
        BadRequest: ragged rows, or rows that do not fit the signature.
    """
    arrays = {}
    for spec in manifest.inputs:
        values = [row[spec.name] for row in rows]
        try:
            sample_shape = np.shape(values[0])
        except ValueError:
            raise BadRequest(f"input {spec.name!r}: nested data is ragged") from None
        arrays[spec.name] = decode_json(values, spec.datatype, (len(values), *sample_shape), spec.name)
    return request_from_arrays(arrays, manifest)


def iter_lines(chunks: Iterable[bytes], max_line_bytes: int) -> Iterator[bytes]:
    """Lines (without their ``\\n`` / ``\\r\\n``) of a stream of chunks; memory holds at most
    one line and one chunk.

    Raises:
        PayloadTooLarge: a line is longer than ``max_line_bytes``, wherever the chunks split
            it; refused before more than ``max_line_bytes`` of it is held.
    """
    pending = bytearray()
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            last = chunk[end - 1 : end] if end > start else pending[-1:]
            _check_line(len(pending) + end - start, max_line_bytes, last == b"\r")
            pending += chunk[start:end]
            yield bytes(pending).rstrip(b"\r")
            pending.clear()
            start = end + 1
        if start < len(chunk):  # the rest may end in the "\r" of a "\r\n" the next chunk completes
            _check_line(len(pending) + len(chunk) - start, max_line_bytes, chunk.endswith(b"\r"))
            pending += chunk[start:]
    if pending:
        yield bytes(pending).rstrip(b"\r")


def _check_line(length: int, max_line_bytes: int, carriage_return: bool) -> None:
    """``length`` bytes of one line, the last a ``\\r`` (not counted) when ``carriage_return``."""
    if length - carriage_return > max_line_bytes:
        raise PayloadTooLarge(
            f"a line of the .jsonl file is over {max_line_bytes:,} bytes: split the row, or send it "
            f"as a .npy or .json file (the limit is {MAX_INPUT_MB_ENV})"
        )


def join_batches(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    try:
        return {name: np.concatenate([part[name] for part in parts], axis=0) for name in parts[0]}
    except ValueError:
        raise BadRequest(
            "the model's outputs have no batch dimension to join .jsonl batches along: "
            "send the rows as one .json v2 infer request"
        ) from None


def json_outputs(request: InferenceRequest) -> InferenceRequest:
    """An output file is JSON: ignore requests for binary outputs."""
    outputs = (
        None if request.outputs is None else tuple(RequestedOutput(o.name, False) for o in request.outputs)
    )
    return dataclasses.replace(request, outputs=outputs, binary_outputs=False)


def check_size(size: int, limit: int, variable: str) -> None:
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
        check_size(len(data), limit, MAX_INPUT_MB_ENV)
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
            raise data_error(error, where) from error
        yield chunk


@contextmanager
def decoding() -> Iterator[None]:
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
    """``batches``, each decoded under :func:`decoding`."""
    while True:
        with decoding():
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def with_parameters(response: bytes, parameters: Mapping[str, Any]) -> bytes:
    """The encoded JSON response object with ``"parameters"`` (what it answers) added as its
    last member, without parsing it back: the response of a 100,000-row file is large."""
    if not (response.startswith(b"{") and response.endswith(b"}")):
        raise ValueError("the response to add parameters to is not one JSON object")
    encoded = dumps(dict(parameters))
    return b"".join((response[:-1], b',"parameters":', encoded, b"}"))
