"""The v2 protocol: every datatype both ways, JSON and binary, and every validation rule."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tierserve.catalog import Digest, Manifest, TensorSpec
from tierserve.errors import BadRequest, PayloadTooLarge
from tierserve.protocol import (
    DATATYPES,
    InferenceRequest,
    decode_infer_response,
    encode_infer_request,
    encode_infer_response,
    parse_infer_request,
)

DIGEST = Digest("0" * 64, 1)
MAX = 1 << 20


def manifest(*inputs: TensorSpec, allow_non_finite: bool = False) -> Manifest:
    return Manifest(
        name="m",
        version="1",
        format="onnx",
        compression="zstd",
        artifact="model.onnx.zst",
        stored=DIGEST,
        model=DIGEST,
        inputs=inputs,
        outputs=(TensorSpec("y", "FP32", (-1, 3)), TensorSpec("label", "INT64", (-1,))),
        allow_non_finite=allow_non_finite,
    )


X = TensorSpec("x", "FP32", (-1, 4))
IRIS = manifest(X)


def body(*inputs: dict, **extra: object) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def x_input(**overrides: object) -> dict:
    return {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": list(range(8)), **overrides}


def parse(raw: bytes, spec: Manifest = IRIS, headers: dict | None = None) -> InferenceRequest:
    return parse_infer_request(raw, headers, spec, max_bytes=MAX)


def test_flat_and_nested_json_give_the_same_array():
    flat = parse(body(x_input())).inputs["x"]
    nested = parse(body(x_input(data=[[0, 1, 2, 3], [4, 5, 6, 7]]))).inputs["x"]
    assert flat.dtype == np.float32 and flat.shape == (2, 4)
    np.testing.assert_array_equal(flat, nested)


@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d != "BYTES"])
@pytest.mark.parametrize("binary", [False, True])
def test_every_numeric_datatype_round_trips(datatype, binary):
    dtype = DATATYPES[datatype]
    values = np.array([[True, False], [False, True]]) if datatype == "BOOL" else np.arange(4).reshape(2, 2)
    array = values.astype(dtype)
    spec = manifest(TensorSpec("t", datatype, (-1, 2)))
    encoded = encode_infer_request({"t": array}, binary=binary)
    request = parse(encoded.body, spec, encoded.headers)
    assert request.inputs["t"].dtype == dtype
    np.testing.assert_array_equal(request.inputs["t"], array)
    response = encode_infer_response(request, {"y": array}, model_name="m", model_version="1")
    np.testing.assert_array_equal(decode_infer_response(response.body, response.headers)["y"], array)


@pytest.mark.parametrize("binary", [False, True])
def test_bytes_round_trip(binary):
    spec = manifest(TensorSpec("text", "BYTES", (-1,)))
    words = np.array(["héllo", "", "world"], dtype=object)
    encoded = encode_infer_request({"text": words}, binary=binary)
    request = parse(encoded.body, spec, encoded.headers)
    decoded = [v.decode() if isinstance(v, bytes) else v for v in request.inputs["text"]]
    assert decoded == ["héllo", "", "world"]


def test_binary_outputs_when_asked_per_request_and_per_output():
    request = parse(body(x_input(), parameters={"binary_data_output": True}))
    outputs = {"y": np.ones((2, 3), np.float32), "label": np.array([1, 2])}
    response = encode_infer_response(request, outputs, model_name="m", model_version="1")
    assert response.headers["Content-Type"] == "application/octet-stream"
    head = json.loads(response.body[: int(response.headers["Inference-Header-Content-Length"])])
    assert [o["parameters"]["binary_data_size"] for o in head["outputs"]] == [24, 16]
    decoded = decode_infer_response(response.body, response.headers)
    np.testing.assert_array_equal(decoded["label"], [1, 2])

    only_label = parse(body(x_input(), outputs=[{"name": "label", "parameters": {"binary_data": True}}]))
    response = encode_infer_response(only_label, outputs, model_name="m", model_version="1")
    assert list(decode_infer_response(response.body, response.headers)) == ["label"]


def test_id_is_echoed_and_outputs_filter_applies():
    request = parse(body(x_input(), id="abc", outputs=[{"name": "y"}]))
    response = encode_infer_response(
        request, {"y": np.zeros((2, 3), np.float32)}, model_name="m", model_version="1"
    )
    document = json.loads(response.body)
    assert document["id"] == "abc" and [o["name"] for o in document["outputs"]] == ["y"]
    assert document["outputs"][0]["shape"] == [2, 3]


def test_fp16_json_and_binary():
    spec = manifest(TensorSpec("h", "FP16", (-1,)))
    array = np.array([0.5, 1.5, -2.0], np.float16)
    for binary in (False, True):
        encoded = encode_infer_request({"h": array}, binary=binary)
        np.testing.assert_array_equal(parse(encoded.body, spec, encoded.headers).inputs["h"], array)


def test_multiple_binary_inputs_are_sliced_in_order():
    # Dynamic first dimensions need not agree: the model, not the protocol, knows if they are one batch.
    spec = manifest(TensorSpec("a", "INT32", (-1,)), TensorSpec("b", "FP64", (-1,)))
    encoded = encode_infer_request(
        {"a": np.array([1, 2], np.int32), "b": np.array([3.5, 4.5, 5.5])}, binary=True
    )
    request = parse(encoded.body, spec, encoded.headers)
    assert request.inputs["a"].tolist() == [1, 2] and request.inputs["b"].tolist() == [3.5, 4.5, 5.5]


BAD_REQUESTS = [
    (b"", "empty"),
    (b"[1, 2]", "JSON object"),
    (b"{not json", "not valid JSON"),
    (body(), 'non-empty "inputs"'),
    (json.dumps({"inputs": [x_input()], "id": 5}).encode(), '"id" must be a string'),
    (body(x_input(name="z")), "unknown input 'z'"),
    (body(x_input(), x_input()), "appears twice"),
    (body(x_input(datatype="FP64")), "expects FP32"),
    (body(x_input(datatype="FLOAT")), "not a v2 datatype"),
    (body(x_input(datatype="BF16")), "BF16"),
    (body(x_input(shape=[8])), "rank 2"),
    (body(x_input(shape=[2, 5])), "expects [-1, 4]"),
    (body(x_input(shape=[0, 4], data=[])), "empty"),
    (body(x_input(shape=[2, -4])), "negative"),
    (body(x_input(shape="2x4")), "list of integers"),
    (body(x_input(data=[1, 2, 3])), "needs 8"),
    (body(x_input(data=[[1, 2, 3, 4], [5, 6]])), "ragged"),
    (body(x_input(data=["a"] * 8)), "must be numbers"),
    (body(x_input(data=[None] * 8)), "must be numbers"),
    (body({"name": "x", "shape": [2, 4], "datatype": "FP32"}), 'neither "data"'),
    (body(x_input(), outputs=[{"name": "nope"}]), "unknown output"),
    (body(x_input(), outputs="y"), '"outputs" must be a list'),
    (body(x_input(), parameters=[1]), '"parameters" must be an object'),
    (b'{"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [NaN,1,2,3,4,5,6,7]}]}', "NaN"),
]


@pytest.mark.parametrize(("raw", "fragment"), BAD_REQUESTS, ids=[f for _, f in BAD_REQUESTS])
def test_bad_requests_say_what_is_wrong(raw, fragment):
    with pytest.raises(BadRequest) as caught:
        parse(raw)
    assert fragment in caught.value.message


def test_missing_input_names_the_expected_ones():
    spec = manifest(X, TensorSpec("mask", "BOOL", (-1, 4)))
    with pytest.raises(BadRequest, match=r"missing input\(s\) \['mask'\]"):
        parse(body(x_input()), spec)


@pytest.mark.parametrize(
    ("datatype", "data", "fragment"),
    [
        ("INT64", [1.5], "whole numbers"),
        ("INT8", [300], "outside the INT8 range"),
        ("BOOL", [1], "true/false"),
    ],
)
def test_integer_and_bool_inputs_are_not_silently_coerced(datatype, data, fragment):
    spec = manifest(TensorSpec("t", datatype, (1,)))
    with pytest.raises(BadRequest, match=fragment):
        parse(body({"name": "t", "shape": [1], "datatype": datatype, "data": data}), spec)


def test_non_finite_allowed_when_the_model_says_so():
    raw = b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [Infinity, 1, 2, 3]}]}'
    assert np.isinf(parse(raw, manifest(X, allow_non_finite=True)).inputs["x"][0, 0])


def test_binary_non_finite_is_rejected_too():
    encoded = encode_infer_request({"x": np.array([[np.nan, 1, 2, 3]], np.float32)}, binary=True)
    with pytest.raises(BadRequest, match="NaN"):
        parse(encoded.body, IRIS, encoded.headers)


def test_request_over_the_limit_is_413():
    with pytest.raises(PayloadTooLarge, match="split the batch"):
        parse_infer_request(body(x_input()), None, IRIS, max_bytes=10)


@pytest.mark.parametrize(
    ("header_value", "fragment"),
    [("abc", "must be an integer"), ("0", "does not fit"), ("99999", "does not fit")],
)
def test_bad_header_length(header_value, fragment):
    with pytest.raises(BadRequest, match=fragment):
        parse(body(x_input()), headers={"Inference-Header-Content-Length": header_value})


def test_binary_size_must_match_shape():
    encoded = encode_infer_request({"x": np.zeros((2, 4), np.float32)}, binary=True)
    head_length = int(encoded.headers["Inference-Header-Content-Length"])
    truncated = encoded.body[:-4]
    with pytest.raises(BadRequest, match="runs past"):
        parse(truncated, headers={"inference-header-content-length": str(head_length)})
    extra = encoded.body + b"\0\0\0\0"
    with pytest.raises(BadRequest, match="no input claims"):
        parse(extra, headers={"INFERENCE-HEADER-CONTENT-LENGTH": str(head_length)})


def test_binary_declared_shape_vs_byte_size():
    document = {
        "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]
    }
    head = json.dumps(document).encode()
    with pytest.raises(BadRequest, match="needs 32 bytes"):
        parse(head + b"\0" * 16, headers={"Inference-Header-Content-Length": str(len(head))})


def test_cut_off_bytes_element():
    spec = manifest(TensorSpec("text", "BYTES", (1,)))
    document = {
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]
    }
    head = json.dumps(document).encode()
    with pytest.raises(BadRequest, match="runs past the tensor"):
        parse(head + b"\x09\0\0\0ab", spec, {"Inference-Header-Content-Length": str(len(head))})


def test_non_finite_outputs_become_null_in_json():
    request = parse(body(x_input()))
    response = encode_infer_response(
        request, {"y": np.array([np.nan, 1.0], np.float32)}, model_name="m", model_version="1"
    )
    assert json.loads(response.body)["outputs"][0]["data"] == [None, 1.0]


def nested(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


@pytest.mark.parametrize("depth", [100_000, 900, 3], ids=["past-json", "past-numpy", "past-rank"])
def test_deeply_nested_data_is_a_bad_request(depth):
    raw = b'{"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": ' + nested(depth) + b"}]}"
    with pytest.raises(BadRequest, match="nested too deeply"):
        parse(raw)


def test_deeply_nested_bytes_data_is_a_bad_request():
    spec = manifest(TensorSpec("text", "BYTES", (-1,)))
    data = b"[" * 500 + b'"a"' + b"]" * 500
    raw = b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ' + data + b"}]}"
    with pytest.raises(BadRequest, match="nested too deeply"):
        parse(raw, spec)


def test_deeply_nested_parameters_are_a_bad_request():
    raw = body(x_input())[:-1] + b', "parameters": {"p": ' + nested(100_000) + b"}}"
    with pytest.raises(BadRequest, match="nested too deeply"):
        parse(raw)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"outputs": [{"name": "label", "parameters": [1]}]}, '"parameters" must be an object'),
        ({"outputs": [{"name": "label", "parameters": {"binary_data": "yes"}}]}, "true or false"),
        ({"outputs": [{"name": "label", "parameters": {"binary_data": 1}}]}, "true or false"),
        ({"outputs": [{"name": "label"}, {"name": "label"}]}, "asked for twice"),
        ({"parameters": {"binary_data_output": "no"}}, "true or false"),
        ({"parameters": {"binary_data_output": 0}}, "true or false"),
    ],
)
def test_output_options_must_be_well_typed(extra, fragment):
    with pytest.raises(BadRequest, match=fragment):
        parse(body(x_input(), **extra))


def test_binary_flags_that_are_real_booleans_are_honoured():
    request = parse(
        body(
            x_input(),
            outputs=[{"name": "label", "parameters": {"binary_data": False}}],
            parameters={"binary_data_output": False},
        )
    )
    assert request.binary_outputs is False and request.outputs[0].binary is False


@pytest.mark.parametrize(
    "data",
    [[True, 1, 1, 1, 1, 1, 1, 1], [[1, 1, 1, 1], [1, 1, 1.5, False]], [True] * 8],
    ids=["mixed-int", "nested-mixed-float", "all-bool"],
)
def test_json_booleans_are_refused_for_numeric_inputs(data):
    with pytest.raises(BadRequest, match=r"true/false.*only for BOOL"):
        parse(body(x_input(data=data)))


def test_input_parameters_must_be_an_object():
    with pytest.raises(BadRequest, match='"parameters" must be an object'):
        parse(body(x_input(parameters=[1])))


def test_binary_data_size_must_be_a_number_not_a_boolean():
    head = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": True}}
            ]
        }
    ).encode()
    spec = manifest(TensorSpec("x", "FP32", (-1,)))
    with pytest.raises(BadRequest, match="binary_data_size must be"):
        parse(head + b"\0\0\0\0", spec, {"Inference-Header-Content-Length": str(len(head))})


@pytest.mark.parametrize(
    ("datatype", "value"), [("FP32", 1e39), ("FP32", -1e39), ("FP16", 70000), ("FP16", 1e6)]
)
def test_finite_values_too_large_for_the_datatype_are_out_of_range(datatype, value):
    spec = manifest(TensorSpec("t", datatype, (1,)), allow_non_finite=True)
    with pytest.raises(BadRequest) as caught:
        parse(body({"name": "t", "shape": [1], "datatype": datatype, "data": [value]}), spec)
    assert f"outside the {datatype} range" in caught.value.message
    assert "NaN" not in caught.value.message


def test_largest_finite_fp32_is_accepted():
    largest = float(np.finfo(np.float32).max)
    assert parse(body(x_input(data=[largest] * 8))).inputs["x"].max() == np.float32(largest)


HUGE = "n" * 5_000_000
LONG_ECHOES = [
    body(x_input(name=HUGE)),
    body(x_input(shape=[1] * 1_500_000)),
    body(x_input(shape=[2, 4, *(["x"] * 100_000)])),
    body(x_input(shape=[-1] * 100_000)),
    body(x_input(datatype=HUGE)),
    body(x_input(datatype=[HUGE])),
    body(x_input(), outputs=[{"name": HUGE}]),
    body(x_input(), outputs=[[HUGE] * 10]),
    body(x_input(), outputs=[json.loads(nested(900))]),
    body(x_input(), outputs=[{"name": "y"}, {"name": "y", "x": HUGE}]),
]


@pytest.mark.parametrize("raw", LONG_ECHOES, ids=range(len(LONG_ECHOES)))
def test_errors_echo_client_values_bounded(raw):
    with pytest.raises(BadRequest) as caught:
        parse_infer_request(raw, None, IRIS, max_bytes=len(raw))
    assert len(caught.value.message) < 400, caught.value.message[:400]


def test_an_integer_too_long_for_python_is_a_bad_request():
    with pytest.raises(BadRequest, match="too many digits"):
        parse(body(x_input())[:-1] + b', "extra": ' + b"1" * 5000 + b"}")


# ---------------------------------------------------------------- the JSON pair (orjson, stdlib fallback)


def test_fp32_numbers_are_written_in_their_shortest_form_and_read_back_exactly():
    array = np.array([[0.1, 1 / 3, -2.5e-8, 3.4028235e38]], np.float32)
    encoded = encode_infer_request({"x": array})
    assert b"0.1," in encoded.body and b"0.10000000149011612" not in encoded.body
    spec = manifest(TensorSpec("x", "FP32", (-1, 4)))
    np.testing.assert_array_equal(parse(encoded.body, spec).inputs["x"], array)


def test_non_finite_outputs_come_back_as_nan_on_the_client():
    request = parse(body(x_input()))
    outputs = {"y": np.array([np.nan, np.inf, 1.0], np.float32), "label": np.array([3], np.int64)}
    response = encode_infer_response(request, outputs, model_name="m", model_version="1")
    assert json.loads(response.body)["outputs"][0]["data"] == [None, None, 1.0]
    decoded = decode_infer_response(response.body, response.headers)
    assert np.isnan(decoded["y"][:2]).all() and decoded["y"][2] == 1.0
    assert decoded["label"].tolist() == [3]


@pytest.mark.parametrize(
    "array",
    [
        np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2],  # not contiguous
        np.array([1, 2, 3], dtype=">i4"),  # big-endian
        np.array([1.5, -2.0], dtype=">f8"),
        np.array([np.nan, 2.0], dtype=np.float16),
        np.array([True, False]),
        np.array([2**64 - 1], dtype=np.uint64),
    ],
    ids=["strided", "big-endian-int", "big-endian-float", "fp16-nan", "bool", "uint64-max"],
)
def test_every_array_layout_is_written_as_the_standard_library_would_read_it(array):
    request = InferenceRequest(inputs={})
    response = encode_infer_response(request, {"y": array}, model_name="m", model_version="1")
    expected = [None if isinstance(v, float) and v != v else v for v in array.reshape(-1).tolist()]
    assert json.loads(response.body)["outputs"][0]["data"] == expected


def test_a_lone_surrogate_in_the_id_is_read_and_echoed_escaped():
    request = parse(body(x_input())[:-1] + b', "id": "\\ud800-7"}')
    assert request.id == "\ud800-7"
    response = encode_infer_response(
        request, {"y": np.zeros((1, 3), np.float32)}, model_name="m", model_version="1"
    )
    assert b'"\\ud800-7"' in response.body
    assert json.loads(response.body)["id"] == "\ud800-7"


def test_a_key_given_twice_keeps_its_last_value():
    raw = b'{"inputs": [{"name": "z"}], "inputs": [' + json.dumps(x_input()).encode() + b"]}"
    assert parse(raw).inputs["x"].shape == (2, 4)


def test_utf16_bodies_are_still_decoded():
    assert parse(body(x_input()).decode().encode("utf-16")).inputs["x"].shape == (2, 4)


@pytest.mark.parametrize(
    ("datatype", "literal", "fragment"),
    [
        ("FP32", b"1e400", "NaN or infinity"),
        ("INT64", b"18446744073709551616", "outside the INT64 range"),
        ("UINT64", b"-1", "outside the UINT64 range"),
        ("INT64", b"1e30", "outside the INT64 range"),
        ("INT64", b"2.5", "whole numbers"),
    ],
)
def test_numbers_past_a_double_or_a_datatype_are_refused(datatype, literal, fragment):
    spec = manifest(TensorSpec("t", datatype, (1,)))
    raw = b'{"inputs": [{"name": "t", "shape": [1], "datatype": "%s", "data": [%s]}]}' % (
        datatype.encode(),
        literal,
    )
    with pytest.raises(BadRequest, match=fragment):
        parse(raw, spec)


def test_integers_past_64_bits_are_read_as_the_nearest_double_by_a_float_tensor():
    spec = manifest(TensorSpec("t", "FP64", (1,)))
    raw = b'{"inputs": [{"name": "t", "shape": [1], "datatype": "FP64", "data": [18446744073709551616]}]}'
    assert parse(raw, spec).inputs["t"].tolist() == [2.0**64]


def test_the_json_pair_falls_back_to_the_standard_library_where_orjson_refuses():
    from tierserve.protocol import dumps, loads, stdlib_dumps

    assert loads(b"[NaN, Infinity]")[1] == float("inf")
    assert loads('{"a": "\\ud800"}') == {"a": "\ud800"}
    assert dumps({"a": "\ud800"}) == stdlib_dumps({"a": "\ud800"}) == b'{"a":"\\ud800"}'
    assert dumps({"big": 2**70}) == b'{"big":1180591620717411303424}'
    document = {"x": np.array([np.nan, 0.5], np.float32), "n": np.int64(3), "f": np.float32(np.inf)}
    expected = {"x": [None, 0.5], "n": 3, "f": None}
    assert json.loads(dumps(document)) == json.loads(stdlib_dumps(document)) == expected
