"""What a Kinesis record may hold, the stream worker's settings, and how results are cut into
PutRecords calls (pure: no Kinesis, no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tierserve.catalog import Digest, Manifest, TensorSpec
from tierserve.errors import BadRequest, PayloadTooLarge
from tierserve.settings import SettingsError
from tierserve.streams import RecordId, StreamSettings, decode_record, error_document
from tierserve.streams.worker import PUT_RECORDS_MAX, PUT_RECORDS_MAX_BYTES, _chunks


def manifest(*inputs: TensorSpec) -> Manifest:
    digest = Digest("0" * 64, 1)
    return Manifest(
        name="iris",
        version="1",
        format="onnx",
        compression="zstd",
        artifact="model.onnx.zst",
        stored=digest,
        model=digest,
        inputs=inputs,
        outputs=(TensorSpec("out", "FP32", (-1,)),),
    )


IRIS = manifest(TensorSpec("input", "FP32", (-1, 4)))
TWO = manifest(TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "INT64", (-1,)))
LIMIT = 1024 * 1024


def test_a_row_is_a_request_of_one_row():
    request = decode_record(b"[5.1, 3.5, 1.4, 0.2]", IRIS, max_bytes=LIMIT)
    np.testing.assert_array_equal(request.inputs["input"], np.array([[5.1, 3.5, 1.4, 0.2]], np.float32))
    request = decode_record(json.dumps({"a": [1, 2], "b": 3}).encode(), TWO, max_bytes=LIMIT)
    assert request.inputs["a"].shape == (1, 2) and request.inputs["b"].tolist() == [3]


def test_a_v2_infer_request_is_taken_as_the_api_takes_it_with_json_outputs():
    body = {
        "id": "r-1",
        "inputs": [
            {"name": "input", "shape": [2, 4], "datatype": "FP32", "data": [[1, 2, 3, 4], [5, 6, 7, 8]]}
        ],
        "parameters": {"binary_data_output": True},
    }
    request = decode_record(json.dumps(body).encode(), IRIS, max_bytes=LIMIT)
    assert request.id == "r-1" and request.inputs["input"].shape == (2, 4) and not request.binary_outputs


@pytest.mark.parametrize(
    ("data", "model", "fragment"),
    [
        (b"{broken", IRIS, "the record is not valid JSON: a record holds a v2 infer request or one row"),
        (b"\xff\xfe", IRIS, "the record is not valid JSON"),
        (b"[1, 2, 3]", IRIS, "the record: input 'input' has shape [1, 3] but the model expects [-1, 4]"),
        (b'{"x": 1}', IRIS, "the record: a row needs exactly the model's inputs ['input']; unknown ['x']"),
        (
            b"[1, 2]",
            TWO,
            "the record: a row must be an object {input name: value}; the model's inputs are ['a', 'b']",
        ),
        (b"null", IRIS, "a row must be an object"),
        (b"[" * 5000 + b"]" * 5000, IRIS, "nested too deeply"),
        (
            b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}]}',
            IRIS,
            "FP32",
        ),
    ],
)
def test_a_record_the_model_cannot_take_is_a_bad_request_that_says_why(data, model, fragment):
    with pytest.raises(BadRequest) as raised:
        decode_record(data, model, max_bytes=LIMIT)
    assert fragment in raised.value.message


def test_a_record_over_the_limit_names_the_limits_variable():
    with pytest.raises(PayloadTooLarge, match="TIERSERVE_MAX_INPUT_MB"):
        decode_record(b"[" + b"1," * 100 + b"1]", IRIS, max_bytes=64)


def test_an_error_document_names_the_record_it_answers():
    record = RecordId("4959", "shardId-000000000001", "sensor-7")
    document = error_document(BadRequest("the record is not valid JSON"), "iris", record)
    assert document == {
        "error": "the record is not valid JSON",
        "status": 400,
        "model_name": "iris",
        "parameters": {
            "sequence_number": "4959",
            "shard_id": "shardId-000000000001",
            "partition_key": "sensor-7",
        },
    }


def test_the_stream_settings_need_an_output_stream_and_a_good_model_name():
    assert StreamSettings.from_env({"TIERSERVE_OUTPUT_STREAM": "tierserve-results"}) == StreamSettings(
        "tierserve-results", None
    )
    with pytest.raises(SettingsError, match="TIERSERVE_OUTPUT_STREAM is unset"):
        StreamSettings.from_env({})
    with pytest.raises(SettingsError, match="TIERSERVE_OUTPUT_STREAM='no/such' is not a Kinesis stream name"):
        StreamSettings.from_env({"TIERSERVE_OUTPUT_STREAM": "no/such"})
    with pytest.raises(SettingsError, match="TIERSERVE_STREAM_MODEL='a b' is not a model name"):
        StreamSettings.from_env({"TIERSERVE_OUTPUT_STREAM": "out", "TIERSERVE_STREAM_MODEL": "a b"})


def test_results_are_cut_into_put_records_calls_by_count_and_bytes_in_order():
    small = [("k", b"x")] * (PUT_RECORDS_MAX + 3)
    assert [(start, len(chunk)) for start, chunk in _chunks(small)] == [
        (0, PUT_RECORDS_MAX),
        (PUT_RECORDS_MAX, 3),
    ]
    big = [("k", b"x" * (PUT_RECORDS_MAX_BYTES // 2))] * 3
    assert [(start, len(chunk)) for start, chunk in _chunks(big)] == [(0, 1), (1, 1), (2, 1)]
    assert _chunks([]) == []
