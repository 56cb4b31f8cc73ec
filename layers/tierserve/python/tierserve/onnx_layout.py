"""The loader's own layout of a verified ONNX model: its weights memory-mapped where they lie.

    write_graph(model_file, graph_file)   # graph_file: the model, its large weights by reference
    onnxruntime.InferenceSession(str(graph_file), ...)

onnxruntime parses an ``.onnx`` file by copying every initializer out of the protobuf; given
external data instead, it memory-maps the weights and reads them in place. So the loader writes,
next to the verified ``model.onnx`` in the model's private folder, a small ``graph.onnx``: the
same model, each large initializer's ``raw_data`` replaced by an external-data reference to its
own bytes inside ``model.onnx`` (location ``model.onnx``, the offset and length where they lie).
Nothing is copied; the references are the loader's, computed from the verified file, never a
path an artifact declares: an artifact that declares external data itself is refused.

ONNX is protobuf; this reads and writes its wire format directly (varints, length-delimited
fields), for the three messages it touches (ModelProto, GraphProto, TensorProto), because the
``onnx`` package is not in the Lambda image.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

from tierserve.errors import ArtifactRejected

WEIGHTS_FILE = "model.onnx"
GRAPH_FILE = "graph.onnx"
# Initializers smaller than this stay inline: a reference costs more than it saves.
MIN_EXTERNAL_BYTES = 4096

_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_RAW_DATA = 9  # TensorProto.raw_data
_TENSOR_EXTERNAL_DATA = 13  # TensorProto.external_data
_TENSOR_DATA_LOCATION = 14  # TensorProto.data_location
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class NotOnnx(ValueError):
    """The bytes are not the protobuf an ONNX model is (the caller opens the file as it is)."""


def write_graph(model_file: Path, graph_file: Path, name: str) -> int:
    """Write ``graph_file``, the model in ``model_file`` with its large weights referenced in
    place, and return how many initializers now point into ``model_file``. ``name`` names the
    model in messages.

    Raises:
        ArtifactRejected: the model declares external data of its own.
        NotOnnx: the file is not an ONNX protobuf this can read.
    """
    with model_file.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        view = memoryview(data)
        try:
            parts, moved = _model(view, name)
            graph_file.write_bytes(b"".join(parts))
        finally:
            view.release()
    return moved


def _model(data: memoryview, name: str) -> tuple[list[bytes], int]:
    parts: list[bytes] = []
    moved = 0
    seen_graph = False
    for number, wire, start, value_start, end in _fields(data, 0, len(data)):
        if number == _MODEL_GRAPH and wire == _LENGTH:
            if seen_graph:
                raise NotOnnx("two graphs")
            seen_graph = True
            graph, moved = _graph(data, value_start, end, name)
            parts += [_key(_MODEL_GRAPH, _LENGTH), _varint(sum(len(p) for p in graph)), *graph]
        else:
            parts.append(bytes(data[start:end]))
    if not seen_graph:
        raise NotOnnx("no graph")
    return parts, moved


def _graph(data: memoryview, begin: int, finish: int, name: str) -> tuple[list[bytes], int]:
    parts: list[bytes] = []
    moved = 0
    for number, wire, start, value_start, end in _fields(data, begin, finish):
        if number == _GRAPH_INITIALIZER and wire == _LENGTH:
            tensor = _tensor(data, value_start, end, name)
            if tensor is not None:
                parts += [_key(_GRAPH_INITIALIZER, _LENGTH), _varint(len(tensor)), tensor]
                moved += 1
                continue
        parts.append(bytes(data[start:end]))
    return parts, moved


def _tensor(data: memoryview, begin: int, finish: int, name: str) -> bytes | None:
    """The initializer with its ``raw_data`` as a reference into the weights file, or None to
    keep it as it is (small, or its values in typed fields)."""
    kept: list[bytes] = []
    raw: tuple[int, int] | None = None
    for number, wire, start, value_start, end in _fields(data, begin, finish):
        if number in (_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION):
            if (
                number == _TENSOR_DATA_LOCATION
                and wire == _VARINT
                and _read_varint(data, value_start)[0] == 0
            ):
                continue  # DEFAULT: the data is inline after all
            raise ArtifactRejected(
                f"{name} declares ONNX external data (weights in another file): tierserve artifacts "
                "carry their weights inside them; package the model again with `tierserve package`, "
                "which inlines them"
            )
        if number == _TENSOR_RAW_DATA and wire == _LENGTH:
            raw = (value_start, end - value_start)
        else:
            kept.append(bytes(data[start:end]))
    if raw is None or raw[1] < MIN_EXTERNAL_BYTES:
        return None
    offset, length = raw
    for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
        entry = _string_field(1, key) + _string_field(2, value)
        kept += [_key(_TENSOR_EXTERNAL_DATA, _LENGTH), _varint(len(entry)), entry]
    kept += [_key(_TENSOR_DATA_LOCATION, _VARINT), _varint(_EXTERNAL)]
    return b"".join(kept)


def _fields(data: memoryview, begin: int, finish: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(field number, wire type, field start, value start, field end)`` of each field in
    ``data[begin:finish]``; for length-delimited fields the value is the payload."""
    position = begin
    while position < finish:
        start = position
        key, position = _read_varint(data, position)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise NotOnnx("field number 0")
        if wire == _VARINT:
            _, end = _read_varint(data, position)
            value_start = position
        elif wire == _LENGTH:
            length, value_start = _read_varint(data, position)
            end = value_start + length
        elif wire == _FIXED64:
            value_start, end = position, position + 8
        elif wire == _FIXED32:
            value_start, end = position, position + 4
        else:
            raise NotOnnx(f"wire type {wire}")
        if end > finish:
            raise NotOnnx("a field runs past its message")
        yield number, wire, start, value_start, end
        position = end


def _read_varint(data: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    for index in range(position, min(position + 10, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    raise NotOnnx("a varint runs past the data")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _string_field(number: int, text: str) -> bytes:
    encoded = text.encode()
    return _key(number, _LENGTH) + _varint(len(encoded)) + encoded
