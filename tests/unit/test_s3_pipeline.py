"""The S3 pipeline's pure parts: messages and keys, ordering, input decoding, limits, and
the SageMaker error table. No S3, no model: tests/integration/test_worker.py runs them."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import numpy as np
import pytest
from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

from support.common import load_event
from tierserve.aws import OutOfTime
from tierserve.catalog import Digest, Manifest, TensorSpec
from tierserve.errors import (
    BadRequest,
    ModelStarting,
    ModelUnavailable,
    PayloadTooLarge,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tierserve.protocol import request_from_arrays
from tierserve.s3_pipeline import (
    InputKey,
    PipelineSettings,
    PoisonMessage,
    Recorded,
    S3Object,
    compare_sequencers,
    decode_npy,
    iter_lines,
    iter_row_batches,
    parse_input_key,
    parse_message,
    stale_other_result,
    why_skip,
)
from tierserve.s3_pipeline.errors import data_error
from tierserve.s3_pipeline.results import (
    META_GAVE_UP,
    META_INPUT_ETAG,
    META_MODEL,
    META_PROCESSED_AT,
    META_SEQUENCER,
)
from tierserve.sagemaker_model import parse_custom_attributes, sagemaker_error
from tierserve.settings import GpuTarget, SettingsError, parse_gpu_targets


def manifest(*inputs: TensorSpec, name: str = "m") -> Manifest:
    digest = Digest("0" * 64, 1)
    return Manifest(
        name=name,
        version="1",
        format="onnx",
        compression="zstd",
        artifact="model.onnx.zst",
        stored=digest,
        model=digest,
        inputs=inputs,
        outputs=(TensorSpec("out", "FP32", (-1,)),),
    )


IRIS = manifest(TensorSpec("input", "FP32", (-1, 4)), name="iris")
TWO_INPUTS = manifest(TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "INT64", (-1,)))


def s3_body(key: str = "inputs/iris/x.json", **object_fields) -> str:
    body = json.loads(load_event("sqs-s3-put")["Records"][0]["body"])
    body["Records"][0]["s3"]["object"].update({"key": key, **object_fields})
    return json.dumps(body)


# ---------------------------------------------------------------- messages


def test_the_sample_event_parses_and_its_key_is_url_decoded():
    [item] = parse_message(load_event("sqs-s3-put")["Records"][0]["body"])
    assert item == S3Object(
        bucket="tierserve-data",
        key="inputs/iris/2026/my sample.json",
        size=86,
        etag="0123456789abcdef0123456789abcdef",
        version_id=None,
        sequencer="0067A1B2C3D4E5F600",
        principal="AWS:EXAMPLE",  # who put it: the audit record's caller
    )


def test_percent_encoded_keys_are_decoded():
    [item] = parse_message(s3_body("inputs/iris/a%2Bb%C3%A9+c.json"))
    assert item.key == "inputs/iris/a+bé c.json"


def test_the_s3_test_event_announces_nothing():
    assert parse_message(load_event("sqs-s3-test-event")["Records"][0]["body"]) == []


def test_an_sns_envelope_is_unwrapped():
    envelope = {"Type": "Notification", "MessageId": "x", "Message": s3_body("inputs/iris/y.json")}
    assert [o.key for o in parse_message(json.dumps(envelope))] == ["inputs/iris/y.json"]


def test_records_that_create_nothing_are_ignored():
    body = json.loads(s3_body())
    body["Records"][0]["eventName"] = "ObjectRemoved:Delete"
    assert parse_message(json.dumps(body)) == []


@pytest.mark.parametrize(
    "body",
    [
        "this is not json",
        "",
        "[1, 2]",
        '{"hello": "world"}',
        '{"Records": []}',
        '{"Records": [{"eventSource": "aws:sqs"}]}',
        '{"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "s3": {}}]}',
        '{"Records": ["nope"]}',
    ],
    ids=["garbage", "empty", "array", "other-json", "no-records", "not-s3", "no-object", "not-a-record"],
)
def test_a_body_that_is_not_an_s3_event_is_poison(body):
    with pytest.raises(PoisonMessage):
        parse_message(body)


# ---------------------------------------------------------------- keys


def test_input_keys_name_their_results():
    key = parse_input_key("inputs/iris/2026/01/batch.JSONL")
    assert key == InputKey("iris", "2026/01/batch.JSONL")
    assert key.format == ".jsonl"
    assert key.result_key("outputs") == "outputs/iris/2026/01/batch.JSONL.json"
    assert key.result_key("errors") == "errors/iris/2026/01/batch.JSONL.json"
    assert InputKey("iris", "v1.2/noext").format == ""


@pytest.mark.parametrize("key", ["outputs/iris/x.json", "models/iris/1/manifest.json", "inputs/iris/", "x"])
def test_keys_that_are_not_inputs_are_none(key):
    assert parse_input_key(key) is None


@pytest.mark.parametrize(
    "key",
    ["inputs/iris/../x.json", "inputs/iris//x.json", "inputs//x.json", "inputs/iris", "inputs/./x/y.json"],
)
def test_keys_with_dot_dot_or_empty_parts_are_poison(key):
    with pytest.raises(PoisonMessage, match="without empty"):
        parse_input_key(key)


def test_a_key_too_long_for_its_output_is_poison():
    with pytest.raises(PoisonMessage, match="too long"):
        parse_input_key("inputs/iris/" + "a" * 1010)


# ---------------------------------------------------------------- ordering


@pytest.mark.parametrize(
    ("a", "b", "order"),
    [
        ("0055AED6DCD90281E5", "0055AED6DCD90281E6", -1),
        ("0055aed6dcd90281e6", "0055AED6DCD90281E5", 1),
        ("0055AED6DCD90281E5", "0055AED6DCD90281E5", 0),
        ("0055AED6DCD90281E5", "0055AED6DCD90281E500", 0),  # right-padded with zeros
        ("0055AED6DCD90281E5", "0055AED6DCD90281E501", -1),
    ],
)
def test_sequencers_compare_as_s3_documents(a, b, order):
    assert compare_sequencers(a, b) == order


def recorded(sequencer=None, etag="e1", version=None, model="iris@1", kind="outputs", processed_at=None):
    return Recorded(kind, '"r"', sequencer, etag, version, model, processed_at)


def test_an_older_event_than_the_result_is_stale():
    item = S3Object("b", "k", etag="e1", sequencer="0A")
    assert "stale" in why_skip(item, [recorded(sequencer="0B", etag="e2")], "iris@1")
    assert "stale" in why_skip(item, [recorded(sequencer="0B", model="iris@2")], "iris@1")


def test_the_same_version_served_by_the_same_model_is_a_duplicate():
    assert "duplicate" in why_skip(S3Object("b", "k", etag="e1", sequencer="0A"), [recorded("0A")], "iris@1")
    assert "duplicate" in why_skip(S3Object("b", "k", etag="e1"), [recorded()], "iris@1")
    assert "duplicate" in why_skip(S3Object("b", "k", etag="e1"), [recorded(kind="errors", model="")], "")


def test_an_error_written_on_giving_up_answers_no_version_but_a_newer_one_still_makes_it_stale():
    """A transient fault's last delivery wrote it: a redrive, or a bulk rerun that looks first,
    serves the input again; an older event is still stale beside it."""
    gave_up = Recorded.from_head(
        "errors",
        {
            "ETag": '"g"',
            "Metadata": {
                META_SEQUENCER: "0A",
                META_INPUT_ETAG: "e1",
                META_MODEL: "iris@1",
                META_GAVE_UP: "true",
            },
        },
    )
    assert gave_up.gave_up
    assert why_skip(S3Object("b", "k", etag="e1", sequencer="0A"), [gave_up], "iris@1") is None
    assert why_skip(S3Object("b", "k", etag="e1"), [gave_up], "iris@1") is None
    assert "stale" in why_skip(S3Object("b", "k", etag="e0", sequencer="09"), [gave_up], "iris@1")


def test_a_listed_item_without_a_version_id_is_its_etag():
    # A bulk run lists inputs (ETags, no version ids); the worker recorded the version it read.
    assert "duplicate" in why_skip(S3Object("b", "k", etag="e1"), [recorded(version="v1")], "iris@1")
    assert why_skip(S3Object("b", "k", etag="e2"), [recorded(version="v1")], "iris@1") is None


@pytest.mark.parametrize(
    ("item", "result", "model"),
    [
        (S3Object("b", "k", etag="e2", sequencer="0B"), recorded("0A"), "iris@1"),  # newer
        (S3Object("b", "k", etag="e1", sequencer="0A"), recorded("0A"), "iris@2"),  # new model version
        (S3Object("b", "k", etag="e2"), recorded(), "iris@1"),  # other bytes, no sequencers
        (S3Object("b", "k", etag="e1", version_id="v2"), recorded(version="v1"), "iris@1"),
    ],
    ids=["newer-event", "redeployed-model", "other-etag", "other-version"],
)
def test_other_versions_or_models_are_served_again(item, result, model):
    assert why_skip(item, [result], model) is None


def test_results_record_when_they_were_written():
    head = {
        "ETag": '"x"',
        "Metadata": {META_SEQUENCER: "0A", META_PROCESSED_AT: "2026-01-01T00:00:00.000+00:00"},
    }
    result = Recorded.from_head("errors", head)
    assert (result.sequencer, result.processed_at) == ("0A", "2026-01-01T00:00:00.000+00:00")


EARLIER, LATER = "2026-01-01T00:00:00.000+00:00", "2026-01-01T00:00:05.000+00:00"


@pytest.mark.parametrize(
    ("item", "answer", "other"),
    [
        (
            S3Object("b", "k", etag="e2", sequencer="0B"),
            recorded("0B", etag="e2", processed_at=LATER),
            recorded("0A", kind="errors", model="", processed_at=EARLIER),
        ),
        (
            S3Object("b", "k", etag="e2"),
            recorded(etag="e2", processed_at=LATER),
            recorded(etag="e1", kind="errors", model="", processed_at=EARLIER),
        ),
        (
            S3Object("b", "k", etag="e1", sequencer="0A"),
            recorded("0A", processed_at=LATER),
            recorded("0A", kind="errors", processed_at=EARLIER),
        ),
    ],
    ids=["older-by-sequencer", "earlier-without-sequencers", "same-version-earlier"],
)
def test_a_duplicate_delivery_finds_the_older_result_of_the_other_kind_stale(item, answer, other):
    assert "duplicate" in why_skip(item, [answer, other], "iris@1")
    assert stale_other_result(item, [answer, other], "iris@1") == other


@pytest.mark.parametrize(
    ("item", "answer", "other"),
    [
        (  # the other result answers a newer version: the delivery is stale, not a duplicate
            S3Object("b", "k", etag="e1", sequencer="0A"),
            recorded("0A", processed_at=EARLIER),
            recorded("0B", etag="e2", kind="errors", processed_at=LATER),
        ),
        (  # no sequencers: the other result was written later, so it may answer a newer version
            S3Object("b", "k", etag="e1"),
            recorded(processed_at=EARLIER),
            recorded(etag="e2", kind="errors", processed_at=LATER),
        ),
        (  # nothing says which is older
            S3Object("b", "k", etag="e1"),
            recorded(),
            recorded(etag="e2", kind="errors"),
        ),
        (  # not a duplicate at all
            S3Object("b", "k", etag="e3"),
            recorded(processed_at=LATER),
            recorded(etag="e2", kind="errors", processed_at=EARLIER),
        ),
    ],
    ids=["newer-by-sequencer", "later-without-sequencers", "no-times", "not-a-duplicate"],
)
def test_a_result_that_may_be_newer_is_never_stale(item, answer, other):
    assert stale_other_result(item, [answer, other], "iris@1") is None


# ---------------------------------------------------------------- .npy


def npy(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)
    return buffer.getvalue()


def test_npy_is_one_validated_tensor():
    rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    request = decode_npy(npy(rows), IRIS)
    np.testing.assert_array_equal(request.inputs["input"], rows)


def test_big_endian_npy_is_converted():
    rows = np.arange(8, dtype=">f4").reshape(2, 4)
    array = decode_npy(npy(rows), IRIS).inputs["input"]
    assert array.dtype == np.dtype("<f4") or array.dtype.isnative
    np.testing.assert_array_equal(array, rows)


@pytest.mark.parametrize(
    ("data", "model", "fragment"),
    [
        (npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), IRIS, "no object (pickled) arrays"),
        (b"PK\x03\x04 an npz archive", IRIS, "not a valid .npy"),
        (b"", IRIS, "not a valid .npy"),
        (npy(np.zeros((2, 4), np.float64)), IRIS, "expects FP32"),
        (npy(np.zeros((2, 3), np.float32)), IRIS, "expects [-1, 4]"),
        (npy(np.zeros((0, 4), np.float32)), IRIS, "empty"),
        (npy(np.full((1, 4), np.nan, np.float32)), IRIS, "NaN"),
        (npy(np.zeros((2, 2), np.float32)), TWO_INPUTS, "send a .json v2 infer request"),
    ],
    ids=["pickle", "npz", "empty-file", "dtype", "shape", "zero-rows", "nan", "two-inputs"],
)
def test_bad_npy_is_a_bad_request(data, model, fragment):
    with pytest.raises(BadRequest) as raised:
        decode_npy(data, model)
    assert fragment in raised.value.message


def npy_header(shape: tuple[int, ...], descr: str = "<f4", version: tuple[int, int] = (1, 0)) -> bytes:
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    if version == (1, 0):
        np.lib.format.write_array_header_1_0(buffer, header)
    else:
        np.lib.format.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_an_npy_header_declaring_more_than_the_limit_is_refused_before_allocating(version):
    data = npy_header((10**12, 4), version=version) + bytes(32)
    with pytest.raises(PayloadTooLarge, match="16,000,000,000,000 bytes, over the limit of 1,048,576"):
        decode_npy(data, IRIS, max_bytes=1 << 20)
    with pytest.raises(BadRequest, match="holds 32 bytes of data, not the 16,000,000,000,000 bytes"):
        decode_npy(data, IRIS)  # without a limit: the bytes present decide


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (npy_header((3, 4)) + bytes(2 * 4 * 4), "holds 32 bytes of data, not the 48"),
        (npy_header((2, 4)) + bytes(3 * 4 * 4), "holds 48 bytes of data, not the 32"),
        (npy_header((2, 4, 1)) + bytes(2 * 4 * 4), "expects [-1, 4]"),
        (npy_header((2, 5)) + bytes(2 * 5 * 4), "expects [-1, 4]"),
        (npy_header((2, 4), version=(2, 0)) + bytes(2 * 4 * 4)[:-1], "holds 31 bytes"),
    ],
    ids=["truncated", "trailing", "rank", "fixed-dimension", "v2-truncated"],
)
def test_an_npy_header_that_does_not_fit_the_bytes_or_the_signature_is_a_bad_request(data, fragment):
    with pytest.raises(BadRequest) as raised:
        decode_npy(data, IRIS, max_bytes=1 << 20)
    assert fragment in raised.value.message


def test_request_from_arrays_checks_names_like_parse_infer_request():
    with pytest.raises(BadRequest, match="unknown input 'x'"):
        request_from_arrays({"x": np.zeros((1, 4), np.float32)}, IRIS)
    with pytest.raises(BadRequest, match=r"missing input\(s\) \['b'\]"):
        request_from_arrays({"a": np.zeros((1, 2), np.float32)}, TWO_INPUTS)


# ---------------------------------------------------------------- .jsonl


def lines(*rows: object) -> list[bytes]:
    return [row if isinstance(row, bytes) else json.dumps(row).encode() for row in rows]


def test_rows_are_batched_along_the_first_dimension():
    rows = [[float(i), 1.0, 2.0, 3.0] for i in range(10)]
    batches = list(iter_row_batches(lines(*rows), IRIS, batch_size=4, max_rows=100))
    assert [count for _, count in batches] == [4, 4, 2]
    assert [r.inputs["input"].shape for r, _ in batches] == [(4, 4), (4, 4), (2, 4)]
    joined = np.concatenate([r.inputs["input"] for r, _ in batches])
    np.testing.assert_array_equal(joined, np.asarray(rows, np.float32))


def test_object_rows_feed_several_inputs_and_blank_lines_are_skipped():
    rows = lines({"a": [1, 2], "b": 7}, b"", b"   ", {"a": [3.5, 4], "b": 8})
    [(request, count)] = list(iter_row_batches(rows, TWO_INPUTS, batch_size=64, max_rows=10))
    assert count == 2
    assert request.inputs["a"].dtype == np.float32 and request.inputs["a"].shape == (2, 2)
    assert request.inputs["b"].tolist() == [7, 8] and request.inputs["b"].dtype == np.int64


@pytest.mark.parametrize(
    ("rows", "model", "fragment"),
    [
        (lines([1, 2, 3, 4], b"{not json"), IRIS, "line 2 is not valid JSON"),
        (lines([1, 2, 3, 4], [1, 2, 3]), IRIS, "lines 1-2: input 'input': nested data is ragged"),
        (lines([1, 2, 3], [1, 2, 3]), IRIS, "lines 1-2: input 'input' has shape [2, 3]"),
        (lines({"input": [1, 2, 3, 4], "x": 1}), IRIS, "line 1: a row needs exactly the model's inputs"),
        (lines({"a": [1, 2]}), TWO_INPUTS, "missing ['b']"),
        (lines([1, 2]), TWO_INPUTS, "line 1: a row must be an object"),
        (lines(["a", "b", "c", "d"]), IRIS, "data must be numbers"),
        (lines(None), IRIS, "line 1: a row must be an object"),
        ([], IRIS, "no rows"),
        (lines(b"", b"  "), IRIS, "no rows"),
    ],
    ids=["json", "ragged", "width", "unknown", "missing", "list-multi", "strings", "null", "empty", "blank"],
)
def test_bad_rows_name_their_line(rows, model, fragment):
    with pytest.raises(BadRequest) as raised:
        list(iter_row_batches(rows, model, batch_size=64, max_rows=10))
    assert fragment in raised.value.message


def test_a_row_nested_too_deeply_is_a_bad_request_naming_its_line():
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(BadRequest, match="line 2"):
        list(iter_row_batches(lines([1, 2, 3, 4], deep), IRIS, batch_size=4, max_rows=100))


def test_the_row_limit_is_enforced_while_streaming():
    consumed = []

    def endless():
        for i in range(1_000_000):
            consumed.append(i)
            yield b"[1, 2, 3, 4]"

    with pytest.raises(PayloadTooLarge, match="more than 5 rows"):
        list(iter_row_batches(endless(), IRIS, batch_size=2, max_rows=5))
    assert len(consumed) == 6  # stopped at the first row over the limit, not at the end


def test_models_without_a_batch_dimension_refuse_rows():
    fixed = manifest(TensorSpec("x", "FP32", (3, 4)))
    with pytest.raises(BadRequest, match=r"send a \.json"):
        list(iter_row_batches(lines([1]), fixed, batch_size=4, max_rows=10))


def test_a_fixed_batch_of_one_is_fed_row_by_row():
    single = manifest(TensorSpec("x", "FP32", (1, 2)))
    batches = list(iter_row_batches(lines([1, 2], [3, 4]), single, batch_size=64, max_rows=10))
    assert [r.inputs["x"].shape for r, _ in batches] == [(1, 2), (1, 2)]


def test_lines_across_chunk_boundaries_and_crlf():
    chunks = [b"[1,2,3,4]\r\n[5,", b"6,7,8]\n", b"\n[9,10,11,12]"]
    assert list(iter_lines(chunks, 100)) == [b"[1,2,3,4]", b"[5,6,7,8]", b"", b"[9,10,11,12]"]


def test_a_line_longer_than_the_limit_is_refused_before_it_is_whole():
    with pytest.raises(PayloadTooLarge, match="over 10 bytes"):
        list(iter_lines([b"x" * 8, b"x" * 8, b"\n"], 10))


def splits(data: bytes) -> Iterator[list[bytes]]:
    """``data`` as one chunk, and cut into two and three chunks at every place."""
    yield [data]
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]
        for j in range(i, len(data) + 1):
            yield [data[:i], data[i:j], data[j:]]


@pytest.mark.parametrize(
    "data",
    [
        b"[1]\n" + b"x" * 7 + b"\n[2]",  # 7 bytes: one over, in the middle
        b"x" * 7,  # the last line, with no newline after it
        b"[1]\r\n" + b"x" * 7 + b"\r\n",
        b"x" * 6 + b"\rx\n",  # a carriage return inside a line counts
    ],
)
def test_a_line_over_the_limit_is_refused_wherever_the_chunks_split_it(data):
    for chunks in splits(data):
        with pytest.raises(PayloadTooLarge, match=r"over 6 bytes.*TIERSERVE_MAX_INPUT_MB"):
            list(iter_lines(chunks, 6))


@pytest.mark.parametrize("data", [b"x" * 6 + b"\n[1]", b"[1]\r\n" + b"x" * 6 + b"\r\n", b"x" * 6 + b"\r"])
def test_a_line_at_the_limit_is_kept_wherever_the_chunks_split_it(data):
    expected = [line.rstrip(b"\r") for line in data.split(b"\n")]
    expected = expected if expected[-1] else expected[:-1]
    for chunks in splits(data):
        assert list(iter_lines(chunks, 6)) == expected, chunks


def test_a_long_line_is_refused_before_more_than_the_limit_is_read():
    read: list[bytes] = []

    def endless() -> Iterator[bytes]:
        while True:
            read.append(b"x" * 4)
            yield read[-1]

    with pytest.raises(PayloadTooLarge):
        list(iter_lines(endless(), 10))
    assert len(read) == 3  # 12 bytes: the first chunk that takes the line past 10


# ---------------------------------------------------------------- settings


def test_pipeline_settings_from_the_environment():
    settings = PipelineSettings.from_env(
        {
            "TIERSERVE_DATA_BUCKET": "data",
            "TIERSERVE_GPU_ENDPOINTS": "big=big-ep/big-ic, huge = huge-ep ,",
            "TIERSERVE_ROW_BATCH_SIZE": "8",
            "TIERSERVE_MAX_INPUT_MB": "0.5",
            "TIERSERVE_MAX_ROWS": "10",
            "TIERSERVE_MAX_JSONL_MB": "2",
        }
    )
    assert settings.data_bucket == "data"
    assert dict(settings.gpu_endpoints) == {
        "big": GpuTarget("big-ep", "big-ic"),
        "huge": GpuTarget("huge-ep"),
    }
    assert (settings.row_batch_size, settings.max_rows) == (8, 10)
    assert (settings.max_input_bytes, settings.max_jsonl_bytes) == (512 * 1024, 2 * 1024 * 1024)
    defaults = PipelineSettings.from_env({})
    assert (defaults.data_bucket, defaults.row_batch_size, dict(defaults.gpu_endpoints)) == (None, 64, {})


@pytest.mark.parametrize(
    "text",
    ["big", "big=", "=ep", "big=ep/", "big=ep/-ic", "big=e_p", "Big=ep", "big=ep/ic/x", f"big={'e' * 64}"],
)
def test_malformed_endpoint_lists_fail_at_init(text):
    with pytest.raises(
        SettingsError, match=r"TIERSERVE_GPU_ENDPOINTS='.*' has .* model=endpoint-name\[/component-name\]"
    ):
        PipelineSettings.from_env({"TIERSERVE_GPU_ENDPOINTS": text})


def test_a_model_named_twice_in_the_endpoint_list_fails_at_init():
    with pytest.raises(SettingsError, match="names model 'big' twice"):
        PipelineSettings.from_env({"TIERSERVE_GPU_ENDPOINTS": "big=a/x,big=b/y"})


def test_gpu_targets_round_trip_through_the_variable():
    targets = {"zeta": GpuTarget("tierserve-g5-xlarge", "tierserve-zeta-g5-xlarge"), "alpha": GpuTarget("ep")}
    text = GpuTarget.join(targets)
    assert text == "alpha=ep,zeta=tierserve-g5-xlarge/tierserve-zeta-g5-xlarge"
    assert parse_gpu_targets(text) == targets


# ---------------------------------------------------------------- SageMaker errors


def client_error(code: str, status: int, **extra) -> ClientError:
    response = {
        "Error": {"Code": code, "Message": "msg"},
        "ResponseMetadata": {"HTTPStatusCode": status},
        **extra,
    }
    return ClientError(response, "InvokeEndpoint")


def model_error(status: object, message: object) -> ClientError:
    return client_error("ModelError", 424, OriginalStatusCode=status, OriginalMessage=message)


@pytest.mark.parametrize(
    ("error", "expected", "fragment"),
    [
        (model_error(400, '{"error": "bad shape"}'), BadRequest, "bad shape"),
        (model_error(413, "too big"), PayloadTooLarge, "too big"),
        (model_error(503, "{}"), UpstreamUnavailable, "503"),
        (client_error("ModelError", 424, OriginalStatusCode=504), UpstreamTimeout, "timed out"),
        (client_error("ModelError", 424, OriginalStatusCode=429), UpstreamUnavailable, "busy"),
        (client_error("ModelNotReadyException", 429), UpstreamUnavailable, "retry"),
        (client_error("ThrottlingException", 400), UpstreamUnavailable, "retry"),
        (client_error("ServiceUnavailable", 503), UpstreamUnavailable, "retry"),
        (client_error("InternalFailure", 500), UpstreamUnavailable, "retry"),
        (client_error("ValidationError", 400), ModelUnavailable, "TIERSERVE_GPU_ENDPOINTS"),
        (
            ClientError(
                {
                    "Error": {
                        "Code": "ValidationError",
                        "Message": "Inference Component has no capacity to process this request. "
                        "ApplicationAutoScaling may be in-progress (if configured) or try to increase the "
                        "capacity by invoking UpdateInferenceComponentRuntimeConfig API.",
                    },
                    "ResponseMetadata": {"HTTPStatusCode": 400},
                },
                "InvokeEndpoint",
            ),
            ModelStarting,
            "starting from zero",
        ),
        (client_error("AccessDeniedException", 403), ModelUnavailable, "sagemaker:InvokeEndpoint"),
        (ReadTimeoutError(endpoint_url="http://x"), UpstreamTimeout, "in time"),
        (ConnectTimeoutError(endpoint_url="http://x"), UpstreamTimeout, "in time"),
        (EndpointConnectionError(endpoint_url="http://x"), UpstreamUnavailable, "cannot be reached"),
        (RecursionError("botocore parsing a nested answer"), UpstreamUnavailable, "cannot be read"),
        (OutOfTime("no time left"), UpstreamTimeout, "no time left"),
    ],
)
def test_sagemaker_errors_map_to_typed_errors(error, expected, fragment):
    mapped = sagemaker_error(error, "ep")
    assert isinstance(mapped, expected)
    assert fragment in mapped.message


NESTED = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("status", "body", "expected", "fragment"),
    [
        (400, NESTED, BadRequest, "[[[["),
        (400, '{"error": ' + NESTED + "}", BadRequest, '{"error": [[['),
        (400, "x" * 5_000_000, BadRequest, "xxx"),
        (400, json.dumps({"error": "y" * 1_000_000}), BadRequest, "yyy"),
        (400, '{"error": {"nested": [1, 2]}}', BadRequest, '{"error": {"nested": [1, 2]}}'),
        (400, '{"error": 1e400}', BadRequest, "1e400"),
        (400, '{"error": ' + "9" * 10_000 + "}", BadRequest, "999"),
        (400, b"\xff\xfe not UTF-8", BadRequest, "not UTF-8"),
        (400, '{"error": "a lone \\ud800 and\\nlines\\u0000"}', BadRequest, "a lone \\ud800 and lines"),
        (400, ["not", "text"], BadRequest, "refused the input (400)"),
        (1e400, "{}", UpstreamUnavailable, "no status"),
        ("500", "{}", UpstreamUnavailable, "failed (500)"),
        ({"status": 400}, "{}", UpstreamUnavailable, "no status"),
        (True, "{}", UpstreamUnavailable, "no status"),
        (10**30, "{}", UpstreamUnavailable, "no status"),
    ],
    ids=[
        "nested",
        "nested-error",
        "huge",
        "huge-error",
        "error-object",
        "error-number",
        "error-huge-integer",
        "bytes-not-utf8",
        "surrogate-and-controls",
        "message-not-text",
        "status-1e400",
        "status-text",
        "status-object",
        "status-bool",
        "status-huge",
    ],
)
def test_every_hostile_container_answer_maps_to_a_typed_error(status, body, expected, fragment):
    mapped = sagemaker_error(model_error(status, body), "ep")
    assert type(mapped) is expected
    assert fragment in mapped.message
    assert len(mapped.message) <= 500 and "\n" not in mapped.message
    mapped.message.encode("utf-8")  # printable: no lone surrogate left to break a log line


def test_custom_attributes_parse():
    assert parse_custom_attributes("inference-header-content-length=42, a=b; c=d,junk") == {
        "inference-header-content-length": "42",
        "a": "b",
        "c": "d",
    }
    assert parse_custom_attributes(None) == {}


# ---------------------------------------------------------------- S3 errors on data objects


def test_data_errors_name_the_action_and_the_worker_role():
    assert "while reading s3://b/k" in data_error(client_error("SlowDown", 503), "s3://b/k").message
    writing = data_error(client_error("SlowDown", 503), "s3://b/k", action="writing")
    assert type(writing) is UpstreamUnavailable and "while writing s3://b/k (SlowDown)" in writing.message
    deleting = data_error(ReadTimeoutError(endpoint_url="http://x"), "s3://b/k", action="deleting")
    assert type(deleting) is UpstreamTimeout and "while deleting s3://b/k" in deleting.message
    denied = data_error(client_error("AccessDenied", 403), "s3://b/k", action="writing")
    assert type(denied) is ModelUnavailable and "worker's role must allow s3:PutObject" in denied.message
    assert "s3:GetObject" in data_error(client_error("AccessDenied", 403), "s3://b/k").message
    assert type(data_error(ValueError("no botocore error"), "s3://b/k")) is UpstreamUnavailable


def test_a_missing_data_bucket_names_the_data_setting_never_the_model_bucket():
    missing = client_error("NoSuchBucket", 404)
    configured = data_error(
        missing, "s3://results/outputs/x.json", "writing", bucket_setting="TIERSERVE_DATA_BUCKET"
    )
    assert "check TIERSERVE_DATA_BUCKET" in configured.message
    from_event = data_error(missing, "s3://inputs-bucket/outputs/x.json", "writing")
    assert "deleted after the event" in from_event.message
    assert "MODEL_BUCKET" not in configured.message + from_event.message
