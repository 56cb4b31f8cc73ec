"""The Open Inference Protocol (KServe v2 REST): requests into arrays, arrays into responses.

Wire types stay apart from compute: this module knows JSON, the binary tensor data
extension and datatypes; it never runs a model. A request is validated against the
model's signature (names, datatypes, shapes, sizes, finiteness) before anything runs.

JSON goes through one pair, :func:`loads` and :func:`dumps`, built on orjson (several times
faster than the standard library on tensors; ``bench/tensor_encoding.py``). Where orjson
refuses a body the standard library would take, the standard library decides, so what the
protocol takes and answers stays what it was:

- ``NaN``, ``Infinity`` and ``-Infinity`` are read (a model whose manifest allows non-finite
  inputs takes them; any other answers that the input "contains NaN or infinity");
- numbers past a double (``1e400``) are read as infinity; integers too long for Python (over
  4,300 digits) are a bad request;
- lone surrogates (``"\\ud800"``) are read as such; UTF-16 and UTF-32 bodies are decoded;
- a body nested too deeply to parse is a bad request that says so;
- a key given twice keeps its last value (as both parsers do);
- integers past 64 bits are read as the nearest double, as a float tensor takes them; an
  integer tensor refuses them as out of its range.

Responses write non-finite floats as ``null``, numbers of FP32 and FP16 tensors in their
shortest form (the same value once read back), and text as UTF-8; a string orjson cannot
write (a lone surrogate echoed from a request id) is written by the standard library, escaped.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import reprlib
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from tierserve import __version__
from tierserve.catalog import Manifest, TensorSpec
from tierserve.errors import BadRequest, PayloadTooLarge, UnsupportedEncoding
from tierserve.settings import MAX_REQUEST_MB_ENV

HEADER_LENGTH = "inference-header-content-length"
CONTENT_ENCODING = "content-encoding"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
EXTENSIONS = ("binary_tensor_data",)
# The REST API's binaryMediaTypes, for the CDK app and the local API alike (the local API
# applies API Gateway's rule to it: tierserve.tools.local.apigw.is_binary_media_type). A request
# body whose Content-Type matches reaches the function base64-encoded, byte for byte, and a
# response the function marks isBase64Encoded goes out as bytes when the request's first Accept
# matches. "*/*" matches every type, and requests without a Content-Type or an Accept: no
# client's headers can mangle a body either way (tritonclient's sync client sends neither).
# Why, with sources: docs/architecture.md, "Binary bodies".
BINARY_MEDIA_TYPES: tuple[str, ...] = ("*/*",)
# The request Content-Encodings every tier decodes (API Gateway's own list: gzip, deflate,
# identity); "deflate" is the zlib format (RFC 9110), as tritonclient sends it.
CONTENT_ENCODINGS: tuple[str, ...] = ("gzip", "deflate", "identity")
_CODING_ALIASES = {"x-gzip": "gzip"}
_ZLIB_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_CODING_MAGIC = {"gzip": "it does not start with gzip's magic bytes", "deflate": "it is not zlib data"}
# An OIP request body starts with its JSON header: a body that does was not compressed (or a
# gateway in front already decompressed it, as API Gateway does, leaving the header in place).
_JSON_START = re.compile(rb"[ \t\r\n]*\{")
ROUTE_HELP = (
    "routes: GET /v2, /v2/health/{live,ready}, /v2/models/{model}[/versions/{v}][/ready]; POST .../infer"
)

# v2 datatype -> numpy dtype (little-endian on the wire). Data, not branches.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype("object"),
}
UNSUPPORTED_DATATYPES = {"BF16": "BF16 tensors cannot be passed to onnxruntime from Python; send FP32"}

ONNX_TO_DATATYPE: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
    "tensor(bfloat16)": "BF16",
}


# How much of a client's value an error message quotes: enough to recognise it, never the
# whole of a 5 MB name or a million-entry shape.
ECHO_LIMIT = 80
_ECHO = reprlib.Repr()
_ECHO.maxlevel, _ECHO.maxstring, _ECHO.maxother, _ECHO.maxlong = 3, ECHO_LIMIT, ECHO_LIMIT, ECHO_LIMIT
_ECHO.maxlist = _ECHO.maxtuple = _ECHO.maxdict = 8


def _short(value: Any, limit: int = ECHO_LIMIT) -> str:
    """``value`` as an error message quotes it: its repr, cut to at most ``limit`` characters
    (depth- and length-bounded, so a hostile value costs nothing to quote)."""
    text = _ECHO.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def loads(data: bytes | str) -> Any:
    """Parse one JSON document: orjson, or the standard library where orjson refuses it (see
    the module docstring for what that keeps).

    Raises:
        The standard library's errors: ``json.JSONDecodeError``, ``UnicodeDecodeError``,
        ``RecursionError`` (nested too deeply), ``ValueError`` (an integer of over 4,300 digits).
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def dumps(document: Any) -> bytes:
    """Compact JSON as UTF-8 bytes: orjson, with numpy arrays and scalars written natively
    (non-finite floats as ``null``). A document orjson cannot write (a string with a lone
    surrogate, an integer past 64 bits) is written by :func:`stdlib_dumps`."""
    try:
        return orjson.dumps(document, default=_plain, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError:
        return stdlib_dumps(document)


def stdlib_dumps(document: Any) -> bytes:
    """What :func:`dumps` writes, by the standard library alone (ASCII, numpy arrays as lists):
    the fallback, and the baseline the benchmark measures against."""
    return json.dumps(document, separators=(",", ":"), default=_plain).encode()


def _plain(value: Any) -> Any:
    """A numpy value the JSON writers do not take as it is, as plain Python."""
    if isinstance(value, np.ndarray):
        flat = value.reshape(-1)
        if flat.dtype.kind == "f" and not np.isfinite(flat).all():
            return [v if math.isfinite(v) else None for v in flat.tolist()]
        return flat.tolist()
    if isinstance(value, np.generic):
        item = value.item()
        return None if isinstance(item, float) and not math.isfinite(item) else item
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def datatype_of(array: np.ndarray) -> str:
    """The v2 datatype of a numpy array (object and string arrays are BYTES)."""
    if array.dtype.kind in "OUS":
        return "BYTES"
    for name, dtype in DATATYPES.items():
        if dtype.kind == array.dtype.kind and dtype.itemsize == array.dtype.itemsize:
            return name
    raise BadRequest(f"numpy dtype {array.dtype} has no v2 datatype")


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferenceRequest:
    """A validated request: arrays keyed by input name, and what to send back."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: tuple[RequestedOutput, ...] | None = None
    binary_outputs: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)

    def output_names(self) -> list[str] | None:
        return None if self.outputs is None else [o.name for o in self.outputs]


@dataclass(frozen=True)
class EncodedResponse:
    body: bytes
    headers: dict[str, str]


def header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """Case-insensitive header lookup (API Gateway, http.server and clients disagree on case)."""
    if not headers:
        return None
    wanted = name.lower()
    return next((v for k, v in headers.items() if k.lower() == wanted), None)


# ---------------------------------------------------------------- requests


def parse_infer_request(
    body: bytes,
    headers: Mapping[str, str] | None,
    manifest: Manifest,
    *,
    max_bytes: int,
) -> InferenceRequest:
    """Parse a v2 infer request (JSON or binary extension) and validate it against ``manifest``.

    A body with a ``Content-Encoding`` is decompressed first (:func:`decode_content`), never
    past ``max_bytes``.

    Raises:
        PayloadTooLarge: the body is over ``max_bytes`` (decompressed, where it was compressed).
        UnsupportedEncoding: a Content-Encoding other than gzip, deflate or identity.
        BadRequest: anything malformed or not fitting the model's signature; the message
            names the problem and the fix.
    """
    body = decode_content(body, headers, max_bytes)
    if len(body) > max_bytes:
        raise PayloadTooLarge(
            f"request body is {len(body):,} bytes, over the limit of {max_bytes:,}: "
            f"split the batch into smaller requests, or send it as a job (POST /v2/models/{manifest.name}/jobs "
            "with no body answers an upload URL for inputs of any size)"
        )
    document, binary = _split_body(body, header(headers, HEADER_LENGTH))
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest('request needs a non-empty "inputs" list of tensors: {"inputs": [{"name": ...}]}')
    specs = {spec.name: spec for spec in manifest.inputs}
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for raw in raw_inputs:
        name, array, offset = _decode_input(raw, specs, binary, offset, manifest.allow_non_finite)
        if name in inputs:
            raise BadRequest(f"input {_short(name)} appears twice: send each input once")
        inputs[name] = array
    if offset != len(binary):
        raise BadRequest(
            f"binary section has {len(binary) - offset} bytes that no input claims: "
            "check each input's binary_data_size"
        )
    _check_complete(inputs, specs)
    parameters = _parameters(document.get("parameters"), "the request", '{"binary_data_output": true}')
    return InferenceRequest(
        inputs=inputs,
        id=_request_id(document.get("id")),
        outputs=_requested_outputs(document.get("outputs"), manifest.outputs),
        binary_outputs=_flag(parameters, "binary_data_output", "the request"),
        parameters=parameters,
    )


def decode_content(body: bytes, headers: Mapping[str, str] | None, max_bytes: int) -> bytes:
    """``body`` with its ``Content-Encoding`` undone: every transport's one request-body decoder.

    gzip (``x-gzip``), deflate (the zlib format) and identity are decoded, in the reverse of the
    order listed, never past ``max_bytes`` of output. A body that already starts with the JSON
    header is taken as it is whatever the header says: API Gateway decompresses a request
    before its integration and passes the ``Content-Encoding`` header on (docs/architecture.md,
    "Compressed requests"), and neither a gzip nor a zlib stream can start with ``{``.

    Raises:
        UnsupportedEncoding: a coding other than those (415, naming what is accepted).
        PayloadTooLarge: the body decompresses past ``max_bytes`` (TIERSERVE_MAX_REQUEST_MB).
        BadRequest: the body is not data of the coding it names: corrupt, cut off, or followed
            by bytes that belong to no stream.
    """
    value = header(headers, CONTENT_ENCODING)
    if value is None:
        return body
    codings = [_CODING_ALIASES.get(c, c) for c in (part.strip().lower() for part in value.split(",")) if c]
    unknown = [c for c in codings if c not in CONTENT_ENCODINGS]
    if unknown:
        raise UnsupportedEncoding(
            f"Content-Encoding {_short(', '.join(unknown))} is not accepted: compress the request "
            f"with {' or '.join(CONTENT_ENCODINGS[:2])}, or send it uncompressed "
            f"(accepted: {', '.join(CONTENT_ENCODINGS)})"
        )
    for coding in reversed(codings):
        if coding != "identity" and not _JSON_START.match(body):
            body = _decompress(body, coding, max_bytes)
    return body


def _decompress(body: bytes, coding: str, max_bytes: int) -> bytes:
    """One coding undone, the output bounded: a bomb is refused at ``max_bytes`` + 1 bytes."""
    if not body:
        raise BadRequest(
            f"Content-Encoding is {coding} but the request body is empty: send the compressed body"
        )
    chunks: list[bytes] = []
    size = 0
    pending = body
    decompressor = zlib.decompressobj(_ZLIB_WBITS[coding])
    try:
        while pending:
            piece = decompressor.decompress(pending, max_bytes + 1 - size)
            size += len(piece)
            if size > max_bytes:
                raise PayloadTooLarge(
                    f"the request body decompresses to more than {max_bytes:,} bytes, the limit "
                    f"({MAX_REQUEST_MB_ENV}): split the batch into smaller requests"
                )
            chunks.append(piece)
            if not decompressor.eof:
                pending = decompressor.unconsumed_tail
                continue
            pending = decompressor.unused_data
            if pending and coding == "gzip" and pending.startswith(b"\x1f\x8b"):
                decompressor = zlib.decompressobj(_ZLIB_WBITS[coding])  # gzip allows several members
            elif pending:
                raise BadRequest(
                    f"the {coding} request body is followed by {len(pending):,} bytes that are not part of "
                    "it: send exactly one compressed body"
                )
    except zlib.error:
        raise BadRequest(
            f"Content-Encoding is {coding} but the body is not {coding} data ({_CODING_MAGIC[coding]}, "
            "or it is corrupt): compress the body as the header says, or drop the header"
        ) from None
    if not decompressor.eof:
        raise BadRequest(
            f"the {coding} request body is cut off before its end: send the whole compressed body"
        )
    return b"".join(chunks)


def _parameters(value: Any, owner: str, example: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f'{owner}: "parameters" must be an object, e.g. {example}')
    return value


def _flag(parameters: Mapping[str, Any], key: str, owner: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{owner}: {key} must be true or false (a JSON boolean), got {_short(value)}")
    return value


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    json_length = len(body)
    if header_length is not None:
        try:
            json_length = int(header_length)
        except ValueError:
            raise BadRequest(
                f"Inference-Header-Content-Length must be an integer, got {_short(header_length)}"
            ) from None
        if not 0 < json_length <= len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length {json_length} does not fit a body of {len(body)} bytes: "
                "it must be the byte length of the JSON part"
            )
    if not body:
        raise BadRequest('request body is empty: send a v2 infer request, e.g. {"inputs": [...]}')
    try:
        document = loads(body[:json_length])
    except RecursionError:
        raise BadRequest(
            "request body is nested too deeply to parse: send tensor data flat (row-major) "
            "or nested once per dimension"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest(
            f"request body is not valid JSON ({_short(str(error), 200)}); "
            "for binary tensors set Inference-Header-Content-Length"
        ) from None
    except ValueError:  # Python refuses to convert an integer of over 4,300 digits
        raise BadRequest(
            "request body has an integer with too many digits to be any datatype: send values in range"
        ) from None
    if not isinstance(document, dict):
        raise BadRequest('request body must be a JSON object with an "inputs" list')
    return document, body[json_length:]


def _request_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest('"id" must be a string')
    return value


def _decode_input(
    raw: Any,
    specs: Mapping[str, TensorSpec],
    binary: bytes,
    offset: int,
    allow_non_finite: bool,
) -> tuple[str, np.ndarray, int]:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise BadRequest('each input must be an object with "name", "shape", "datatype" and "data"')
    name = raw["name"]
    spec = _spec_for(name, specs)
    shape = _shape(raw.get("shape"), name)
    datatype = _datatype(raw.get("datatype"), name, spec)
    _check_shape(shape, spec)
    parameters = _parameters(raw.get("parameters"), f"input {_short(name)}", '{"binary_data_size": 16}')
    binary_size = parameters.get("binary_data_size")
    if binary_size is not None:
        if not isinstance(binary_size, int) or isinstance(binary_size, bool) or binary_size < 0:
            raise BadRequest(
                f"input {_short(name)}: binary_data_size must be a byte count (a whole number, 0 or more), "
                f"got {_short(binary_size)}"
            )
        if offset + binary_size > len(binary):
            raise BadRequest(
                f"input {_short(name)}: binary_data_size {binary_size} runs past the end of the binary "
                "section"
            )
        array = decode_binary(binary[offset : offset + binary_size], datatype, shape, name)
        offset += binary_size
    elif "data" in raw:
        array = decode_json(raw["data"], datatype, shape, name)
    else:
        raise BadRequest(f'input {_short(name)} has neither "data" nor a binary_data_size parameter')
    _check_finite(array, name, allow_non_finite)
    return name, array, offset


def request_from_arrays(
    inputs: Mapping[str, np.ndarray], manifest: Manifest, *, request_id: str | None = None
) -> InferenceRequest:
    """Validate arrays decoded elsewhere (an ``.npy`` file, rows of a ``.jsonl`` file) against
    ``manifest`` with the same checks :func:`parse_infer_request` applies: input names,
    datatype, rank and fixed dimensions, no empty dimension, finiteness.

    Raises:
        BadRequest: the arrays do not fit the model's signature; the message says how.
    """
    specs = {spec.name: spec for spec in manifest.inputs}
    checked: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        spec = _spec_for(name, specs)
        array = np.asarray(value)
        _check_shape(_shape(list(array.shape), name), spec)
        _datatype(datatype_of(array), name, spec)
        _check_finite(array, name, manifest.allow_non_finite)
        checked[name] = array
    _check_complete(checked, specs)
    return InferenceRequest(inputs=checked, id=request_id)


def _spec_for(name: str, specs: Mapping[str, TensorSpec]) -> TensorSpec:
    spec = specs.get(name)
    if spec is None:
        raise BadRequest(f"unknown input {_short(name)}: the model's inputs are {list(specs)}")
    return spec


def _check_complete(inputs: Mapping[str, np.ndarray], specs: Mapping[str, TensorSpec]) -> None:
    missing = [n for n in specs if n not in inputs]
    if missing:
        raise BadRequest(f"missing input(s) {missing}: the model needs {list(specs)}")


def _check_finite(array: np.ndarray, name: str, allow_non_finite: bool) -> None:
    if not allow_non_finite and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise BadRequest(
            f"input {_short(name)} contains NaN or infinity; send finite values "
            "(this model does not accept them)"
        )


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise BadRequest(f'input {_short(name)}: "shape" must be a list of integers, e.g. [1, 4]')
    if any(d < 0 for d in value):
        raise BadRequest(f"input {_short(name)}: shape {_short(value)} has a negative dimension")
    if any(d == 0 for d in value):
        raise BadRequest(
            f"input {_short(name)}: shape {_short(value)} is empty (a zero dimension); send at least one row"
        )
    return tuple(value)


def _datatype(value: Any, name: str, spec: TensorSpec) -> str:
    if isinstance(value, str) and value in UNSUPPORTED_DATATYPES:
        raise BadRequest(f"input {_short(name)}: {UNSUPPORTED_DATATYPES[value]}")
    if not isinstance(value, str) or value not in DATATYPES:
        raise BadRequest(
            f"input {_short(name)}: datatype {_short(value)} is not a v2 datatype; "
            f"use one of {list(DATATYPES)}"
        )
    if value != spec.datatype:
        raise BadRequest(f"input {_short(name)} has datatype {value} but the model expects {spec.datatype}")
    return value


def _check_shape(shape: tuple[int, ...], spec: TensorSpec) -> None:
    if len(shape) != len(spec.shape):
        raise BadRequest(
            f"input {spec.name!r} has shape {_short(list(shape))} but the model expects rank "
            f"{len(spec.shape)} {list(spec.shape)} (-1 is any size)"
        )
    for got, want in zip(shape, spec.shape, strict=True):
        if want >= 0 and got != want:
            raise BadRequest(
                f"input {spec.name!r} has shape {_short(list(shape))} but the model expects "
                f"{list(spec.shape)} (-1 is any size)"
            )


def decode_json(data: Any, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """Turn JSON ``data`` (flat row-major or nested once per dimension) into an array of ``shape``.

    Raises:
        BadRequest: data nested deeper than ``shape`` has dimensions, ragged, of the wrong
            kind (strings, nulls, booleans for a numeric datatype) or out of the datatype's
            range, or a value count that does not match ``shape``.
    """
    count = math.prod(shape)
    depth = _nesting(data)
    if depth > max(len(shape), 1):
        raise BadRequest(
            f"input {_short(name)}: data is nested too deeply ({depth} levels for shape "
            f"{_short(list(shape))}): send it flat (row-major) or nested once per dimension"
        )
    if datatype == "BYTES":
        flat = _flatten_bytes(data, name)
    else:
        try:
            array = np.asarray(data)
        except (ValueError, RecursionError):
            raise BadRequest(
                f"input {_short(name)}: nested data is ragged; every row needs the same length"
            ) from None
        if datatype != "BOOL" and array.dtype.kind in "iuf" and _has_booleans(data, array.ndim):
            raise BadRequest(_booleans_message(name, datatype))
        flat = _coerce(array.reshape(-1), datatype, name)
    if len(flat) != count:
        raise BadRequest(
            f"input {_short(name)} has {len(flat)} values but shape {_short(list(shape))} needs {count}: "
            "fix the shape or the data"
        )
    return flat.reshape(shape)


def _nesting(data: Any) -> int:
    """How deeply ``data`` nests lists, following first elements (deeper rows elsewhere are
    ragged, which numpy reports)."""
    depth = 0
    while isinstance(data, list):
        depth += 1
        if not data:
            break
        data = data[0]
    return depth


def _has_booleans(data: Any, depth: int) -> bool:
    """True when JSON ``true``/``false`` hide among numbers (numpy reads them as 1 and 0).
    ``depth`` is the nesting numpy found; flattening and the type scan run in C."""
    items = data if isinstance(data, list) else [data]
    for _ in range(depth - 1):
        items = list(itertools.chain.from_iterable(items))
    return bool in set(map(type, items))


def _booleans_message(name: str, datatype: str) -> str:
    return f"input {_short(name)} is {datatype}: send numbers; true/false are only for BOOL inputs"


def _flatten_bytes(data: Any, name: str) -> np.ndarray:
    items: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            items.append(item)
        else:
            raise BadRequest(
                f"input {_short(name)} is BYTES: its data must be strings, got {type(item).__name__}"
            )
    return np.array(items, dtype=object)


def _coerce(values: np.ndarray, datatype: str, name: str) -> np.ndarray:
    dtype = DATATYPES[datatype]
    kind = values.dtype.kind
    if kind not in "biuf":
        raise BadRequest(
            f"input {_short(name)} is {datatype}: its data must be numbers, not {_json_kind(values)}"
        )
    if dtype.kind == "b":
        if kind != "b":
            raise BadRequest(f"input {_short(name)} is BOOL: send true/false")
        return values
    if kind == "b":
        raise BadRequest(_booleans_message(name, datatype))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        # An integer past 64 bits reaches here as a float (orjson reads it as the nearest double).
        whole = kind != "f" or bool(np.all(np.isfinite(values)) and np.all(values == np.trunc(values)))
        if values.size and whole and (values.min() < info.min or values.max() > info.max):
            raise BadRequest(
                f"input {_short(name)} has values outside the {datatype} range [{info.min}, {info.max}]"
            )
        if kind == "f":
            raise BadRequest(f"input {_short(name)} is {datatype}: send whole numbers, not decimals")
    elif dtype.itemsize < 8:  # FP16, FP32: a JSON number can be finite and still too large
        return _narrowed(values, dtype, datatype, name)
    return values.astype(dtype, copy=False)


def _narrowed(values: np.ndarray, dtype: np.dtype, datatype: str, name: str) -> np.ndarray:
    """``values`` cast to ``dtype``. A finite number the cast turns into infinity is too large
    for it: say so, rather than blame the client for an infinity it did not send. (A number
    just past the largest finite one that rounds down to it, such as FP32's largest written in
    its shortest form, ``3.4028235e38``, is in range.)"""
    with np.errstate(over="ignore"):
        narrowed = values.astype(dtype, copy=False)
    overflowed = np.isinf(narrowed)
    if overflowed.any() and np.isfinite(values[overflowed]).any():
        largest = float(np.finfo(dtype).max)
        raise BadRequest(
            f"input {_short(name)} has values outside the {datatype} range [{-largest:g}, {largest:g}]: "
            "scale them into range"
        )
    return narrowed


def _json_kind(values: np.ndarray) -> str:
    return "strings" if values.dtype.kind in "US" else "mixed or null values"


def decode_binary(raw: bytes, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """Turn a tensor's bytes from the binary extension into an array of ``shape``."""
    count = math.prod(shape)
    if datatype == "BYTES":
        items = _unpack_bytes(raw, name)
        if len(items) != count:
            raise BadRequest(
                f"input {_short(name)} has {len(items)} BYTES elements but shape {_short(list(shape))} "
                f"needs {count}"
            )
        return np.array(items, dtype=object).reshape(shape)
    dtype = DATATYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise BadRequest(
            f"input {_short(name)}: shape {_short(list(shape))} of {datatype} needs "
            f"{count * dtype.itemsize} bytes but binary_data_size is {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _unpack_bytes(raw: bytes, name: str) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BadRequest(f"input {_short(name)}: BYTES element length prefix is cut off")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BadRequest(f"input {_short(name)}: BYTES element of {length} bytes runs past the tensor")
        items.append(raw[offset : offset + length])
        offset += length
    return items


def _requested_outputs(value: Any, specs: Sequence[TensorSpec]) -> tuple[RequestedOutput, ...] | None:
    if value is None:
        return None
    known = [spec.name for spec in specs]
    if not isinstance(value, list):
        raise BadRequest('"outputs" must be a list like [{"name": "probabilities"}]')
    requested: dict[str, RequestedOutput] = {}
    for raw in value:
        if not isinstance(raw, dict) or raw.get("name") not in known:
            name = raw.get("name") if isinstance(raw, dict) else raw
            raise BadRequest(f"unknown output {_short(name)}: the model's outputs are {known}")
        name = raw["name"]
        if name in requested:
            raise BadRequest(f"output {name!r} is asked for twice: list each output once")
        parameters = _parameters(raw.get("parameters"), f"output {name!r}", '{"binary_data": true}')
        requested[name] = RequestedOutput(name, _flag(parameters, "binary_data", f"output {name!r}"))
    return tuple(requested.values())


# ---------------------------------------------------------------- responses


def encode_infer_response(
    request: InferenceRequest,
    outputs: Mapping[str, np.ndarray],
    *,
    model_name: str,
    model_version: str,
) -> EncodedResponse:
    """Encode outputs as JSON, or with the binary extension for outputs that ask for it."""
    wanted = request.outputs or tuple(RequestedOutput(n, request.binary_outputs) for n in outputs)
    chunks: list[bytes] = []
    tensors = [
        _encode_tensor(w.name, np.asarray(outputs[w.name]), w.binary or request.binary_outputs, chunks)
        for w in wanted
    ]
    document: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": tensors}
    if request.id is not None:
        document["id"] = request.id
    return _encoded_body(document, chunks)


def _encode_tensor(name: str, array: np.ndarray, binary: bool, chunks: list[bytes]) -> dict[str, Any]:
    """One tensor's JSON description; with ``binary`` its bytes go to ``chunks`` instead of ``data``."""
    tensor: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
    if binary:
        chunk = encode_binary(array)
        tensor["parameters"] = {"binary_data_size": len(chunk)}
        chunks.append(chunk)
    else:
        tensor["data"] = _json_data(array)
    return tensor


def _encoded_body(document: dict[str, Any], chunks: list[bytes]) -> EncodedResponse:
    """JSON alone, or the JSON header followed by the binary chunks (the binary extension)."""
    head = dumps(document)
    if not chunks:
        return EncodedResponse(head, {"Content-Type": JSON_CONTENT_TYPE})
    return EncodedResponse(
        head + b"".join(chunks),
        {"Content-Type": BINARY_CONTENT_TYPE, "Inference-Header-Content-Length": str(len(head))},
    )


def _json_data(array: np.ndarray) -> list[Any] | np.ndarray:
    """A tensor's ``data``: text as a list of strings; numbers as a flat, contiguous,
    native-endian array, which :func:`dumps` writes without making Python numbers of it."""
    flat = array.reshape(-1)
    if flat.dtype.kind in "OSU":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    return np.ascontiguousarray(flat, dtype=flat.dtype.newbyteorder("="))


def encode_binary(array: np.ndarray) -> bytes:
    """One tensor as the binary extension sends it: raw little-endian, BYTES length-prefixed."""
    if datatype_of(array) == "BYTES":
        parts = []
        for value in array.reshape(-1):
            data = value if isinstance(value, bytes) else str(value).encode()
            parts.append(struct.pack("<I", len(data)) + data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def decode_infer_response(body: bytes, headers: Mapping[str, str] | None) -> dict[str, np.ndarray]:
    """Client side: outputs of a v2 response (JSON or binary) as arrays keyed by name."""
    document, binary = _split_body(body, header(headers, HEADER_LENGTH))
    arrays, offset = {}, 0
    for tensor in document.get("outputs", []):
        shape = tuple(tensor["shape"])
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arrays[tensor["name"]] = decode_binary(
                binary[offset : offset + size], tensor["datatype"], shape, ""
            )
            offset += size
        elif tensor["datatype"] == "BYTES":
            arrays[tensor["name"]] = np.array(tensor["data"], dtype=object).reshape(shape)
        else:  # numpy reads a null as NaN for a float datatype
            arrays[tensor["name"]] = np.asarray(tensor["data"], dtype=DATATYPES[tensor["datatype"]]).reshape(
                shape
            )
    return arrays


def encode_infer_request(
    inputs: Mapping[str, np.ndarray],
    *,
    binary: bool = False,
    binary_outputs: bool = False,
    request_id: str | None = None,
    outputs: Sequence[str] | None = None,
) -> EncodedResponse:
    """Client side: build a v2 infer request body (and headers) from arrays."""
    chunks: list[bytes] = []
    tensors = [_encode_tensor(name, np.asarray(array), binary, chunks) for name, array in inputs.items()]
    document: dict[str, Any] = {"inputs": tensors}
    if request_id is not None:
        document["id"] = request_id
    if outputs is not None:
        document["outputs"] = [{"name": n, "parameters": {"binary_data": binary_outputs}} for n in outputs]
    if binary_outputs:
        document["parameters"] = {"binary_data_output": True}
    return _encoded_body(document, chunks)


# ---------------------------------------------------------------- metadata


def server_metadata() -> dict[str, Any]:
    return {"name": "tierserve", "version": __version__, "extensions": list(EXTENSIONS)}


def model_metadata(
    manifest: Manifest, *, platform: str = "onnxruntime_onnx", **parameters: Any
) -> dict[str, Any]:
    """The OIP model metadata document, from the manifest (no model load needed)."""
    document: dict[str, Any] = {
        "name": manifest.name,
        "versions": [manifest.version],
        "platform": platform,
        "inputs": [spec.to_dict() for spec in manifest.inputs],
        "outputs": [spec.to_dict() for spec in manifest.outputs],
    }
    document["parameters"] = {"quantization": manifest.quantization, "format": manifest.format, **parameters}
    return document
