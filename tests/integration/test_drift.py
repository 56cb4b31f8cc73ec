"""Drift end to end on the embedded S3 (moto's server on 127.0.0.1): the baseline that
packaging records and uploads, the API handler capturing real requests, the scheduled drift
handler on a shifted feed (it must alarm: PSI over the threshold, the metric emitted, the
report written) and on an unshifted one (it must not), and `tierserve drift` on both."""

from __future__ import annotations

import datetime as dt
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from support.common import BUCKET, load_event, make_handler
from tierserve import aws
from tierserve.capture import Capture, CaptureRule
from tierserve.catalog import Catalog
from tierserve.drift import BASELINE_NAME, DriftError, build_baseline, check_model, load_baseline
from tierserve.settings import ModelRef
from tierserve.tools import cli
from tierserve.tools.local import samples
from tierserve.tools.local.apigw import LocalLambdaContext
from tierserve.tools.local.stack import load_handler
from tierserve.tools.local.state import write_state
from tierserve.tools.packaging import PackageOptions, package, package_model, signature_of, upload_package

DATA = "test-data"
IRIS = ModelRef("iris", "1")


@pytest.fixture(scope="module")
def iris_rows() -> np.ndarray:
    return samples.iris_rows()


@pytest.fixture(scope="module")
def iris_with_baseline(iris_onnx, iris_rows, tmp_path_factory):
    inputs, _ = signature_of(iris_onnx)
    baseline = build_baseline("iris", "1", inputs, {"input": iris_rows}, source="iris data")
    return package_model(
        iris_onnx, name="iris", version="1", out_dir=tmp_path_factory.mktemp("b"), baseline=baseline
    )


@pytest.fixture
def buckets(s3, iris_with_baseline):
    """The model bucket holding iris with its baseline, and an empty data bucket."""
    s3.create_bucket(Bucket=DATA)
    stored = upload_package(iris_with_baseline, s3, BUCKET, "models").manifest
    return stored


def captured_feed(rows: np.ndarray, *, per_request: int = 5) -> None:
    """Requests of ``rows`` captured through :class:`Capture` into the data bucket (real S3 PUTs)."""
    capture = Capture({"iris": CaptureRule(1.0)}, bucket=DATA, batch=40)
    for start in range(0, len(rows), per_request):
        capture.offer(IRIS, {"input": rows[start : start + per_request].astype(np.float32)}, {})
    capture.close()


def captured_lines(s3, prefix: str = "capture/iris/1/") -> list[dict]:
    """Every line captured under ``prefix`` of the data bucket, as JSON."""
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=DATA, Prefix=prefix).get("Contents", [])]
    return [
        json.loads(line)
        for key in keys
        for line in s3.get_object(Bucket=DATA, Key=key)["Body"].read().splitlines()
    ]


def shifted(rows: np.ndarray) -> np.ndarray:
    return rows + np.array([0.0, 0.0, 2.0, 0.8], dtype=np.float32)  # longer, wider petals


def unshifted(rows: np.ndarray, seed: int = 1) -> np.ndarray:
    return rows[np.random.default_rng(seed).integers(0, len(rows), size=600)]


# ---------------------------------------------------------------- packaging


def test_packaging_records_the_baseline_of_the_accuracy_rows_and_uploads_it(
    iris_onnx, iris_rows, s3, tmp_path
):
    np.save(tmp_path / "rows.npy", iris_rows)
    report = package(
        iris_onnx, tmp_path / "pkg", PackageOptions(name="iris", version="2", inputs=tmp_path / "rows.npy")
    )
    digest = report.manifest.extra["baseline"]
    written = (tmp_path / "pkg" / BASELINE_NAME).read_bytes()
    assert digest["bytes"] == len(written) and digest["rows"] == 150
    stored = upload_package(report.packaged, s3, BUCKET, "models").manifest
    baseline = load_baseline(s3, BUCKET, ModelRef("iris", stored.version))
    assert [f.name for f in baseline.features] == [f"input[{i}]" for i in range(4)]
    assert baseline.source == "150 rows from rows.npy"


def test_a_baseline_file_wins_and_generated_rows_give_none(iris_onnx, iris_rows, tmp_path):
    (tmp_path / "traffic.jsonl").write_text("\n".join(json.dumps(r) for r in iris_rows[:60].tolist()))
    chosen = package(
        iris_onnx,
        tmp_path / "a",
        PackageOptions(name="iris", version="3", baseline=tmp_path / "traffic.jsonl"),
    )
    assert chosen.manifest.extra["baseline"]["rows"] == 60
    generated = package(iris_onnx, tmp_path / "b", PackageOptions(name="iris", version="4"))
    assert "baseline" not in generated.manifest.extra
    assert not (tmp_path / "b" / BASELINE_NAME).exists()
    assert any("no drift baseline" in note for note in generated.notes)


def test_a_baseline_that_does_not_match_its_manifest_is_refused(s3, buckets):
    s3.put_object(Bucket=BUCKET, Key=f"models/iris/1/{BASELINE_NAME}", Body=b'{"model": "iris"}')
    with pytest.raises(DriftError, match="does not match the digest its manifest records"):
        load_baseline(s3, BUCKET, IRIS)


# ---------------------------------------------------------------- serving captures


def test_the_api_handler_captures_sampled_requests_into_the_data_bucket(s3, buckets, cache_dir, monkeypatch):
    monkeypatch.setenv("TIERSERVE_CAPTURE", "iris:1")
    monkeypatch.setenv("TIERSERVE_DATA_BUCKET", DATA)
    handler = make_handler(monkeypatch, cache_dir)
    for _ in range(3):
        assert handler(load_event("infer-json"), LocalLambdaContext())["statusCode"] == 200
    capture = sys_modules_capture()
    capture.close()  # the end of the process: what is buffered is written
    lines = captured_lines(s3)
    assert len(lines) == 3 and all(line["inputs"]["input"]["shape"] == [2, 4] for line in lines)
    assert "outputs" not in lines[0]


def test_the_gpu_server_captures_sampled_requests_into_the_data_bucket(
    s3, buckets, iris_with_baseline, cache_dir
):
    """The GPU tier captures as the Lambda tier does: the same sampler in the server process,
    its lines written to capture/{model}/{version}/ (here when the server stops)."""
    from support.gpu import InProcessServer, request

    environ = {
        "POWERTOOLS_METRICS_DISABLED": "true",
        "TIERSERVE_MODEL_DIR": str(iris_with_baseline.artifact.parent),
        "TIERSERVE_CACHE_DIR": str(cache_dir),
        "TIERSERVE_CAPTURE": "iris:1",
        "TIERSERVE_DATA_BUCKET": DATA,
    }
    server = InProcessServer(environ)
    try:
        assert server.host.wait_ready(30)
        body = json.loads(load_event("infer-json")["body"])
        for _ in range(3):
            status, _, answer = request(server.port, "POST", "/invocations", json.dumps(body).encode())
            assert status == 200, answer
    finally:
        server.stop()  # closes the capture: what it holds is written
    lines = captured_lines(s3)
    assert len(lines) == 3 and all(line["inputs"]["input"]["shape"] == [2, 4] for line in lines)


def sys_modules_capture() -> Capture:
    import sys

    capture = sys.modules["api"].capture
    assert isinstance(capture, Capture)
    return capture


def test_capture_failing_to_write_never_fails_the_inference(s3, buckets, cache_dir, monkeypatch):
    monkeypatch.setenv("TIERSERVE_CAPTURE", "iris:1")
    monkeypatch.setenv("TIERSERVE_DATA_BUCKET", "no-such-data-bucket")
    handler = make_handler(monkeypatch, cache_dir)
    assert handler(load_event("infer-json"), LocalLambdaContext())["statusCode"] == 200
    capture = sys_modules_capture()
    capture.close()
    assert capture.counts["CaptureWriteFailed"] == 1


# ---------------------------------------------------------------- the scheduled job


def drift_handler(monkeypatch):
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    env = {
        "TIERSERVE_MODELS": "iris@1",
        "TIERSERVE_MODEL_BUCKET": BUCKET,
        "TIERSERVE_DATA_BUCKET": DATA,
        "TIERSERVE_DRIFT_WINDOW_HOURS": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_handler({}, module="drift")


def emf_documents(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith('{"_aws"')]


def test_a_shifted_feed_alarms_emits_its_metric_and_writes_the_report(
    s3, buckets, iris_rows, monkeypatch, capsys
):
    captured_feed(np.concatenate([shifted(iris_rows)] * 4))
    handler = drift_handler(monkeypatch)
    answer = handler(load_event("drift-schedule"), LocalLambdaContext())
    result = answer["models"]["iris@1"]
    assert result["verdict"] == "drift" and result["max_psi"] > 0.25
    (metrics,) = emf_documents(capsys.readouterr().out)
    assert metrics["model"] == "iris" and metrics["version"] == "1"
    assert metrics["DriftMaxPSI"] == [pytest.approx(result["max_psi"], abs=1e-6)]
    assert metrics["DriftFeaturesOver"] == [2]  # petal length and width
    assert ["model", "service", "version"] in [
        sorted(d) for d in metrics["_aws"]["CloudWatchMetrics"][0]["Dimensions"]
    ]
    report = json.loads(s3.get_object(Bucket=DATA, Key=result["report"])["Body"].read())
    assert report["drifted"] == ["input[2]", "input[3]"] and report["rows"] == 600
    plot = Image.open(io.BytesIO(s3.get_object(Bucket=DATA, Key=result["plot"])["Body"].read()))
    assert plot.format == "PNG"


def test_an_unshifted_feed_does_not_alarm(s3, buckets, iris_rows, monkeypatch, capsys):
    captured_feed(unshifted(iris_rows))
    handler = drift_handler(monkeypatch)
    result = handler({}, LocalLambdaContext())["models"]["iris@1"]
    assert result["verdict"] == "stable" and result["max_psi"] < 0.1
    (metrics,) = emf_documents(capsys.readouterr().out)
    assert metrics["DriftMaxPSI"][0] < 0.1 and metrics["DriftFeaturesOver"] == [0]


def test_a_model_without_capture_or_baseline_is_reported_not_raised(s3, buckets, monkeypatch, tmp_path):
    handler = drift_handler(monkeypatch)
    result = handler({}, LocalLambdaContext())["models"]["iris@1"]
    assert result["verdict"] == "not captured"
    monkeypatch.setenv("TIERSERVE_MODELS", "iris@9")
    handler = load_handler({}, module="drift")
    assert "upload iris@9" in handler({}, LocalLambdaContext())["models"]["iris@9"]["error"]


def test_the_window_leaves_out_older_capture(s3, buckets, iris_rows):
    captured_feed(np.concatenate([shifted(iris_rows)] * 4))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=3)
    report = check_model(
        s3, IRIS, model_bucket=BUCKET, data_bucket=DATA, window=dt.timedelta(hours=1), until=later
    )
    assert report.requests == 0 and report.verdict == "not captured"


# ---------------------------------------------------------------- the command line


@pytest.fixture
def local_stack(s3, embedded_s3, buckets, tmp_path, restore_environ):
    """What a running `tierserve local` leaves: its catalog and state file (this process's pid)."""
    Catalog(()).with_entry(buckets).save(tmp_path / "catalog.json")
    state = {"pid": os.getpid(), "s3_endpoint": embedded_s3.endpoint, "model_bucket": BUCKET,
             "model_prefix": "models", "data_bucket": DATA}  # fmt: skip
    write_state(tmp_path, state)
    return tmp_path


def test_drift_local_prints_the_table_writes_the_plot_and_exits_3_on_drift(
    local_stack, iris_rows, capsys, tmp_path
):
    captured_feed(np.concatenate([shifted(iris_rows)] * 4))
    out_png = tmp_path / "iris.png"
    code = cli.main(
        ["drift", "iris", "--local", "--work-dir", str(local_stack), "--window", "1h", "--out", str(out_png)]
    )
    printed = capsys.readouterr()
    assert code == 3, printed.err
    assert "iris@1: 120 requests, 600 rows" in printed.out
    assert [line.split()[-1] for line in printed.out.splitlines() if line.startswith("  input[")] == [
        "stable", "stable", "drift", "drift",
    ]  # fmt: skip
    assert Image.open(out_png).format == "PNG"


def test_drift_on_a_deployed_bucket_writes_the_report_when_asked(s3, buckets, iris_rows, capsys, tmp_path):
    captured_feed(unshifted(iris_rows))
    args = ["drift", "iris", "--bucket", DATA, "--model-bucket", BUCKET, "--version", "1",
            "--out", str(tmp_path / "p.png"), "--write-report"]  # fmt: skip
    assert cli.main(args) == 0
    printed = capsys.readouterr()
    assert "verdict: stable" in printed.out
    assert "report: s3://test-data/drift-reports/iris/1/" in printed.err
    assert s3.list_objects_v2(Bucket=DATA, Prefix="drift-reports/iris/1/")["KeyCount"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["drift", "iris"], "--local (a running `tierserve local`) or --bucket"),
        (["drift", "iris", "--bucket", DATA, "--window", "soon"], "give minutes, hours or days"),
    ],
)
def test_drift_errors_name_the_fix(args, message, capsys):
    assert cli.main(args) == 1
    assert message in capsys.readouterr().err


def test_drift_local_without_a_stack_says_to_start_one(tmp_path, capsys):
    assert cli.main(["drift", "iris", "--local", "--work-dir", str(tmp_path)]) == 1
    assert "start `tierserve local` first" in capsys.readouterr().err


def test_drift_of_a_model_without_baseline_says_how_to_make_one(s3, uploaded_iris, capsys, tmp_path):
    s3.create_bucket(Bucket=DATA)
    args = [
        "drift",
        "iris",
        "--bucket",
        DATA,
        "--model-bucket",
        BUCKET,
        "--version",
        "1",
        "--out",
        str(tmp_path / "x.png"),
    ]
    assert cli.main(args) == 1
    assert (
        "packaged without a baseline: package it again with --inputs FILE or --baseline FILE"
        in capsys.readouterr().err
    )
    aws.clear_clients()


def test_hostile_capture_lines_are_skipped_and_counted(s3, buckets, iris_rows):
    captured_feed(unshifted(iris_rows))
    now = dt.datetime.now(dt.UTC)
    good = {
        "time": now.isoformat(),
        "inputs": {"input": {"dtype": "float32", "shape": [1, 4], "data": [5, 3, 1, 0]}},
    }
    lines = [
        b"not json",
        b"[1, 2]",
        json.dumps(
            {**good, "inputs": {"input": {"dtype": "float32", "shape": [2, 4], "data": [1, 2]}}}
        ).encode(),
        json.dumps(
            {**good, "inputs": {"input": {"dtype": "object", "shape": [1], "data": ["rm -rf"]}}}
        ).encode(),
        json.dumps(
            {**good, "inputs": {"input": {"dtype": "int8", "shape": [1, 4], "data": [999, 0, 0, 0]}}}
        ).encode(),
        json.dumps({**good, "time": "yesterday"}).encode(),
        json.dumps(good).encode(),
    ]
    key = f"capture/iris/1/date={now:%Y-%m-%d}/{now:%H%M%S}-0123456789ab.jsonl"
    s3.put_object(Bucket=DATA, Key=key, Body=b"\n".join(lines))
    s3.put_object(Bucket=DATA, Key=f"capture/iris/1/date={now:%Y-%m-%d}/../../../models/x.jsonl", Body=b"x")
    report = check_model(s3, IRIS, model_bucket=BUCKET, data_bucket=DATA, window=dt.timedelta(hours=1))
    assert report.requests == 120 + 1 and report.rows == 601
    assert any("5 captured lines were not requests of this model" in note for note in report.notes)
    assert report.verdict == "stable"


def test_a_window_larger_than_one_run_reads_compares_its_newest_and_says_so(
    s3, buckets, iris_rows, monkeypatch
):
    from tierserve.drift import window

    captured_feed(unshifted(iris_rows))  # 600 rows in batches of 40 requests (200 rows)
    monkeypatch.setattr(window, "MAX_ROWS", 300)
    report = check_model(s3, IRIS, model_bucket=BUCKET, data_bucket=DATA, window=dt.timedelta(hours=1))
    assert report.rows == 400  # two of the three batches, then the bound
    assert any("its newest requests were compared" in note for note in report.notes)


def test_drift_on_a_bucket_that_does_not_exist_names_the_fix(s3, buckets, capsys, tmp_path):
    args = ["drift", "iris", "--bucket", "no-such-data", "--model-bucket", BUCKET, "--version", "1",
            "--out", str(tmp_path / "x.png")]  # fmt: skip
    assert cli.main(args) == 1
    assert (
        "the data bucket no-such-data does not exist: give the deployed data bucket"
        in capsys.readouterr().err
    )


def test_the_drift_handler_reports_an_s3_outage_per_model_without_raising(
    s3, buckets, monkeypatch, flaky, capsys
):
    handler = drift_handler(monkeypatch)
    aws.clear_clients()
    flaky.down = True  # S3 answers 503 SlowDown to everything, botocore's retries included
    result = handler(load_event("drift-schedule"), LocalLambdaContext())["models"]["iris@1"]
    assert result == {
        "error": "s3://test-models/models/iris/1/manifest.json could not be read (SlowDown): try again"
    }


def test_tierserve_package_baseline_from_the_command_line(iris_onnx, iris_rows, tmp_path, capsys):
    (tmp_path / "traffic.json").write_text(json.dumps({"input": iris_rows.tolist()}))
    out = tmp_path / "pkg"
    args = ["package", str(iris_onnx), "--name", "iris", "--version", "7", "--out", str(out),
            "--baseline", str(tmp_path / "traffic.json")]  # fmt: skip
    assert cli.main(args) == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["baseline"]["rows"] == 150
    assert json.loads((out / BASELINE_NAME).read_text())["source"] == "traffic.json"
    assert "no drift baseline" not in capsys.readouterr().out


def test_tierserve_package_refuses_a_bad_baseline_in_one_line_and_builds_nothing(iris_onnx, tmp_path, capsys):
    (tmp_path / "traffic.jsonl").write_text("[1, 2, 3]\n")
    out = tmp_path / "pkg"
    args = ["package", str(iris_onnx), "--name", "iris", "--version", "8", "--out", str(out),
            "--baseline", str(tmp_path / "traffic.jsonl")]  # fmt: skip
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "drift baseline: baseline rows of 'input'" in err and "the model takes [-1, 4]" in err
    assert "Traceback" not in err and not out.exists()
