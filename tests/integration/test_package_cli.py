"""`tierserve package | upload | catalog` against the embedded S3 (moto on 127.0.0.1), and
the packaged model served by the core: what ops run, end to end, with its failures."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from support.common import BUCKET, REPO_ROOT, count_s3_calls
from support.sklearn_models import sklearn_classifier
from tierserve import aws
from tierserve.catalog import Catalog, Digest, Manifest
from tierserve.registry import ModelRegistry
from tierserve.settings import ModelRef, Settings
from tierserve.store import ArtifactStore, S3Source
from tierserve.tools.cli import main
from tierserve.tools.local import samples
from tierserve.tools.packaging import (
    BucketForbidden,
    BucketNotFound,
    InvalidModel,
    PackagedModel,
    VersionConflict,
    generate_inputs,
    read_package,
    upload_package,
)
from tierserve.tools.packaging import transfer_config as make_transfer_config
from tierserve.tools.packaging._upload import stored_artifact_name


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    """Our error: one line, the last of ours on stderr (progress lines may come before it).

    The embedded S3 runs in this process and may log to stderr too: only lines that start
    with ``tierserve`` are ours. The subprocess test checks the whole stream.
    """
    ours = [line for line in err.splitlines() if line.startswith("tierserve ")]
    errors = [line for line in ours if ": error: " in line]
    assert len(errors) == 1 and ours[-1] == errors[0], err
    return errors[0]


@pytest.fixture
def packaged_mlp(mlp_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp_path / "pkg" / "mlp" / "1"
    code, stdout, _ = cli(
        capsys, "package", mlp_onnx, "--name", "mlp", "--version", "1", "--quantization", "int8", "--out", out
    )
    assert code == 0 and "stored / original" in stdout
    return out


def test_package_upload_register_and_serve(s3, mlp_onnx, tmp_path, cache_dir, capsys):
    catalog_path = tmp_path / "catalog.json"
    out = tmp_path / "pkg"
    code, stdout, stderr = cli(
        capsys,
        "package",
        mlp_onnx,
        "--name",
        "mlp",
        "--version",
        "1",
        "--quantization",
        "int8",
        "--out",
        out,
        "--upload",
        f"s3://{BUCKET}/models",
        "--catalog",
        catalog_path,
    )
    assert code == 0, stderr
    assert "uploaded: s3://test-models/models/mlp/1/manifest.json" in stdout
    assert f"registered: mlp@1 (tier lambda) in {catalog_path}" in stdout
    assert "upload mlp@1 [" in stderr  # the progress bar's final line

    entry = Catalog.load(catalog_path).get("mlp")
    assert entry is not None and entry.manifest.quantization == "int8-dynamic"
    suffix = {"zstd": ".zst", "none": ""}[entry.manifest.compression]  # zstd only where it pays
    artifact = f"model-{entry.manifest.stored.sha256[:16]}.onnx{suffix}"  # content-addressed
    assert entry.manifest.artifact == artifact
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"])
    assert keys == ["models/mlp/1/manifest.json", f"models/mlp/1/{artifact}"]

    # Served by the core from S3: predictions within the tolerance the package measured.
    registry = ModelRegistry(
        Settings(model_bucket=BUCKET, models=(ModelRef("mlp", "1"),), cache_dir=cache_dir)
    )
    model = registry.get(ModelRef("mlp", "1"))
    assert model.manifest == entry.manifest
    rows = generate_inputs(entry.manifest.inputs, rows=256)["input"]
    original = ort.InferenceSession(str(mlp_onnx), providers=["CPUExecutionProvider"])
    expected = np.concatenate([original.run(None, {"input": row[None]})[0] for row in rows])
    served = np.concatenate([model.predict({"input": row[None]})["probabilities"] for row in rows])
    accuracy = entry.manifest.accuracy
    assert np.abs(expected - served).max() <= accuracy["max_abs_diff"] * (1 + 1e-5)
    assert np.mean(expected.argmax(1) == served.argmax(1)) >= accuracy["top1"] - 1e-6  # stored to 6 digits

    code, stdout, _ = cli(capsys, "catalog", "list", "--catalog", catalog_path)
    assert code == 0 and "mlp" in stdout and "int8-dynamic" in stdout and "lambda" in stdout
    code, stdout, _ = cli(capsys, "catalog", "show", "mlp", "--catalog", catalog_path)
    shown = json.loads(stdout)
    assert code == 0 and shown["tier"] == "lambda" and shown["manifest"]["name"] == "mlp"
    code, stdout, _ = cli(
        capsys, "catalog", "validate", "--catalog", catalog_path, "--check-s3", f"s3://{BUCKET}/models"
    )
    assert code == 0 and "ok   mlp@1  tier lambda (in S3)" in stdout

    s3.delete_object(Bucket=BUCKET, Key=f"models/mlp/1/{artifact}")
    code, stdout, _ = cli(
        capsys, "catalog", "validate", "--catalog", catalog_path, "--check-s3", f"s3://{BUCKET}/models"
    )
    assert code == 1 and f"FAIL mlp@1: s3://test-models/models/mlp/1/{artifact} is missing" in stdout


def test_reupload_of_the_same_digest_is_a_no_op(s3, embedded_s3, packaged_mlp, capsys, tmp_path):
    catalog = tmp_path / "catalog.json"
    code, stdout, _ = cli(capsys, "upload", packaged_mlp, f"s3://{BUCKET}/models", "--catalog", catalog)
    assert code == 0 and "uploaded:" in stdout

    client = embedded_s3.client()
    calls = count_s3_calls(client)
    result = upload_package(read_package(packaged_mlp), client, BUCKET, "models")
    assert result.uploaded is False
    assert calls == ["GetObject", "HeadObject"]  # the manifest, and that its artifact is whole

    code, stdout, _ = cli(capsys, "upload", packaged_mlp, f"s3://{BUCKET}/models", "--catalog", catalog)
    assert code == 0 and "already there" in stdout and "nothing sent" in stdout
    assert len(Catalog.load(catalog).entries) == 1


def test_an_artifact_left_by_a_stopped_upload_is_not_sent_again(s3, embedded_s3, packaged_mlp):
    packaged = read_package(packaged_mlp)
    s3.upload_file(
        str(packaged.artifact),
        BUCKET,
        f"models/mlp/1/{stored_artifact_name(packaged.manifest)}",
        ExtraArgs={"Metadata": {"sha256": packaged.manifest.stored.sha256}},
    )
    client = embedded_s3.client()
    calls = count_s3_calls(client)
    result = upload_package(packaged, client, BUCKET, "models")
    assert result.uploaded and not result.artifact_sent
    assert calls == ["GetObject", "HeadObject", "PutObject"]  # the manifest only


def test_large_artifacts_go_multipart_and_verify_on_fetch(s3, embedded_s3, tmp_path, packaged_mlp, cache_dir):
    """A 12 MiB artifact with a 5 MiB threshold: three parts, and the loader verifies the digest."""
    small = read_package(packaged_mlp)
    artifact = tmp_path / "big" / "model.onnx"
    artifact.parent.mkdir()
    artifact.write_bytes(np.random.default_rng(0).bytes(12 * 1024 * 1024))
    from tierserve.tools.packaging import sha256_file

    digest = Digest(sha256_file(artifact), artifact.stat().st_size)
    manifest = replace(
        small.manifest, name="big", compression="none", artifact="model.onnx", stored=digest, model=digest
    )
    client = embedded_s3.client()
    calls = count_s3_calls(client)
    result = upload_package(
        PackagedModel(manifest, artifact),
        client,
        BUCKET,
        "models",
        config=make_transfer_config(threshold_mib=5, chunk_mib=5),
    )
    assert calls.count("UploadPart") == 3 and calls[-1] == "PutObject"
    assert result.manifest.artifact == f"model-{digest.sha256[:16]}.onnx"
    aws.clear_clients()
    fetched = ArtifactStore(S3Source(BUCKET, "models", aws.s3_client), cache_dir, 1 << 30).fetch(
        result.manifest
    )
    assert fetched.path.stat().st_size == digest.bytes


def test_a_version_holding_another_model_is_refused(
    s3, embedded_s3, packaged_mlp, iris_package, capsys, tmp_path
):
    code, _, _ = cli(capsys, "upload", packaged_mlp, f"s3://{BUCKET}/models", "--no-register")
    assert code == 0
    other = read_package(iris_package.artifact.parent)
    clash = PackagedModel(replace(other.manifest, name="mlp"), other.artifact)
    with pytest.raises(VersionConflict, match="versions are immutable, package it as a new --version"):
        upload_package(clash, embedded_s3.client(), BUCKET, "models")


def test_a_racing_upload_cannot_overwrite_a_version(s3, embedded_s3, packaged_mlp, monkeypatch):
    from tierserve.tools.packaging import _upload

    upload_package(read_package(packaged_mlp), embedded_s3.client(), BUCKET, "models")
    monkeypatch.setattr(_upload, "_existing_manifest", lambda *_: None)  # as if it landed after our check
    with pytest.raises(VersionConflict, match=r"another upload wrote .* while this one ran"):
        upload_package(read_package(packaged_mlp), embedded_s3.client(), BUCKET, "models")


def manifest_in_s3(s3, name: str = "mlp") -> Manifest:
    raw = s3.get_object(Bucket=BUCKET, Key=f"models/{name}/1/manifest.json")["Body"].read()
    return Manifest.from_dict(json.loads(raw))


def fetch_from_s3(manifest: Manifest, cache_dir: Path) -> Path:
    """What a function does with the manifest: fetch the artifact it names and verify both digests."""
    aws.clear_clients()
    source = S3Source(BUCKET, "models", aws.s3_client)
    return ArtifactStore(source, cache_dir, 1 << 30).fetch(manifest).path


def manifest_put_hook(client, on_manifest) -> None:
    """Call ``on_manifest()`` just before ``client`` writes a manifest (not an artifact)."""

    def hook(params, **_):
        if params["Key"].endswith("/manifest.json"):
            on_manifest()

    client.meta.events.register("before-parameter-build.s3.PutObject", hook)


def test_racing_uploads_of_two_models_leave_the_winners_artifact_whole(
    s3, embedded_s3, packaged_mlp, iris_package, cache_dir
):
    """Winner and loser both find the version empty. The winner sends its artifact, then the
    loser sends its own; the winner writes the manifest first, the loser's conditional write
    fails. The manifest must name the winner's bytes, which must still be in S3."""
    winner = read_package(packaged_mlp)
    other = read_package(iris_package.artifact.parent)
    loser = PackagedModel(replace(other.manifest, name="mlp"), other.artifact)  # another model, same version
    loser_waits, loser_goes = threading.Event(), threading.Event()
    raised: list[BaseException] = []

    def loser_upload() -> None:
        client = embedded_s3.client()
        manifest_put_hook(client, lambda: (loser_waits.set(), loser_goes.wait(30)))
        try:
            upload_package(loser, client, BUCKET, "models")
        except BaseException as error:
            raised.append(error)

    thread = threading.Thread(target=loser_upload)

    def start_the_loser() -> None:  # the winner's artifact is in S3; its manifest is not yet
        thread.start()
        assert loser_waits.wait(30), raised  # the loser's artifact is in S3; its manifest is next

    client = embedded_s3.client()
    manifest_put_hook(client, start_the_loser)
    try:
        result = upload_package(winner, client, BUCKET, "models")
    finally:
        loser_goes.set()
        thread.join(30)
    assert result.uploaded
    [error] = raised
    assert isinstance(error, VersionConflict) and "another upload wrote" in error.message

    stored = manifest_in_s3(s3)
    assert stored == result.manifest and stored.model == winner.manifest.model
    head = s3.head_object(Bucket=BUCKET, Key=f"models/mlp/1/{stored.artifact}")
    assert head["ContentLength"] == winner.manifest.stored.bytes
    assert fetch_from_s3(stored, cache_dir).stat().st_size == winner.manifest.model.bytes
    assert upload_package(winner, embedded_s3.client(), BUCKET, "models").uploaded is False


def test_an_upload_that_finds_its_manifest_checks_the_artifact_it_names(
    s3, embedded_s3, packaged_mlp, cache_dir
):
    packaged = read_package(packaged_mlp)
    first = upload_package(packaged, embedded_s3.client(), BUCKET, "models")
    s3.delete_object(Bucket=BUCKET, Key=f"models/mlp/1/{first.manifest.artifact}")  # lost, or never whole

    again = upload_package(packaged, embedded_s3.client(), BUCKET, "models")
    assert again.uploaded and again.artifact_sent and again.manifest == first.manifest  # repaired
    assert fetch_from_s3(manifest_in_s3(s3), cache_dir).stat().st_size == packaged.manifest.model.bytes

    s3.put_object(Bucket=BUCKET, Key=f"models/mlp/1/{first.manifest.artifact}", Body=b"not the artifact")
    other_bytes = PackagedModel(
        replace(packaged.manifest, stored=Digest("f" * 64, 123)), packaged.artifact
    )  # the same model, compressed otherwise: it cannot repair this version
    with pytest.raises(VersionConflict, match="is missing or is not the") as raised:
        upload_package(other_bytes, embedded_s3.client(), BUCKET, "models")
    assert first.manifest.artifact in raised.value.message


def test_a_missing_bucket_fails_in_one_line(s3, packaged_mlp, capsys):
    code, _, err = cli(capsys, "upload", packaged_mlp, "s3://no-such-bucket/models", "--no-register")
    assert code == 1
    line = one_error_line(err)
    assert line.startswith(
        "tierserve upload: error: bucket no-such-bucket does not exist: deploy the model store"
    )
    with pytest.raises(BucketNotFound):
        upload_package(read_package(packaged_mlp), s3, "no-such-bucket", "models")


def test_package_then_failed_upload_keeps_the_package_and_says_how_to_retry(s3, mlp_onnx, tmp_path, capsys):
    out = tmp_path / "pkg"
    code, _, err = cli(
        capsys, "package", mlp_onnx, "--name", "mlp", "--version", "1", "--out", out,
        "--upload", "s3://no-such-bucket/models", "--no-register",
    )  # fmt: skip
    assert code == 1
    assert f"(the package is kept: tierserve upload {out} s3://no-such-bucket/models)" in one_error_line(err)
    assert (out / "manifest.json").exists()


def test_a_broken_catalog_stops_the_upload_before_anything_is_sent(s3, packaged_mlp, tmp_path, capsys):
    catalog = tmp_path / "catalog.json"
    catalog.write_text("{not json")
    code, _, err = cli(capsys, "upload", packaged_mlp, f"s3://{BUCKET}/models", "--catalog", catalog)
    assert code == 1 and f"catalog {catalog} is not valid JSON" in one_error_line(err)
    assert s3.list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0


def test_a_forbidden_bucket_fails_in_one_line_and_writes_nothing(s3, packaged_mlp, capsys, tmp_path):
    s3.create_bucket(Bucket="locked")
    deny = {
        "Effect": "Deny",
        "Principal": "*",
        "Action": "s3:*",
        "Resource": ["arn:aws:s3:::locked", "arn:aws:s3:::locked/*"],
    }
    s3.put_bucket_policy(Bucket="locked", Policy=json.dumps({"Version": "2012-10-17", "Statement": [deny]}))
    catalog = tmp_path / "catalog.json"
    code, _, err = cli(capsys, "upload", packaged_mlp, "s3://locked/models", "--catalog", catalog)
    assert code == 1
    line = one_error_line(err)
    assert "access to s3://locked/models is denied" in line and "s3:PutObject" in line
    assert not catalog.exists()
    with pytest.raises(BucketForbidden):
        upload_package(read_package(packaged_mlp), s3, "locked", "models")


def test_an_unreachable_endpoint_fails_in_one_line(s3, packaged_mlp, capsys, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{closed_port}")
    code, _, err = cli(capsys, "upload", packaged_mlp, f"s3://{BUCKET}/models", "--no-register")
    assert code == 1
    line = one_error_line(err)
    assert "cannot reach S3 for s3://test-models/models" in line
    assert "start `tierserve local`" in line and "unset AWS_ENDPOINT_URL_S3" in line


def test_upload_to_a_stopped_local_stack_fails_at_once_naming_the_fix(
    packaged_mlp, tmp_path, capsys, monkeypatch
):
    """What the banner of a `tierserve local` that has since stopped told the user to export."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        gone = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{gone}")
    began = time.monotonic()
    code, _, err = cli(capsys, "upload", packaged_mlp, "s3://tierserve-models/models", "--no-register")
    assert code == 1 and time.monotonic() - began < 30
    assert f"at http://127.0.0.1:{gone}" in one_error_line(err) and "start `tierserve local`" in err


def test_invalid_model_fails_in_one_line_and_leaves_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a model")
    out = tmp_path / "out"
    code, _, err = cli(capsys, "package", bad, "--name", "bad", "--version", "1", "--out", out)
    assert code == 1
    assert "bad.onnx" in one_error_line(err) and "export it again" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_quantization_and_budget_failures_exit_non_zero(iris_onnx, mlp_onnx, tmp_path, capsys):
    code, _, err = cli(
        capsys,
        "package",
        iris_onnx,
        "--name",
        "iris",
        "--version",
        "1",
        "--quantization",
        "int8",
        "--out",
        tmp_path / "a",
    )
    assert code == 1 and "--quantization none" in one_error_line(err)
    code, _, err = cli(
        capsys,
        "package",
        mlp_onnx,
        "--name",
        "mlp",
        "--version",
        "1",
        "--quantization",
        "int8",
        "--min-top1",
        "1.0",
        "--min-cosine",
        "1.0",
        "--max-abs-diff",
        "1e-9",
        "--out",
        tmp_path / "b",
    )
    assert code == 1 and "outside the accuracy budget" in one_error_line(err) and "--force" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cdk_json_names_the_catalog_and_the_tier_threshold(s3, tmp_path, capsys, monkeypatch):
    wide = samples.mlp(tmp_path / "wide.onnx", features=16, hidden=512, layers=3, classes=5)  # 2 MB
    project = tmp_path / "project"
    (project / "deploy").mkdir(parents=True)
    context = {"catalog": "deploy/models.json", "lambda_max_model_mb": 1}  # whole MB, as cdk synth wants
    (project / "cdk.json").write_text(json.dumps({"app": "python3 app.py", "context": context}))
    monkeypatch.chdir(project / "deploy")
    code, stdout, err = cli(
        capsys, "package", wide, "--name", "mlp", "--version", "2", "--upload", f"s3://{BUCKET}"
    )
    assert code == 0, err
    assert "tier gpu (by size)" in stdout and "not optimized offline" in stdout
    assert (project / "deploy" / ".tierserve" / "packages" / "mlp" / "2" / "manifest.json").exists()
    entry = Catalog.load(project / "deploy" / "models.json").get("mlp")
    assert entry is not None and entry.manifest.optimized is False
    assert s3.head_object(Bucket=BUCKET, Key="models/mlp/2/manifest.json")["ContentLength"] > 0
    code, stdout, _ = cli(capsys, "catalog", "validate")
    assert code == 0 and "ok   mlp@2  tier gpu" in stdout


def test_registration_without_a_catalog_is_refused_before_anything_is_built(
    mlp_onnx, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(
        capsys, "package", mlp_onnx, "--name", "mlp", "--version", "1", "--upload", "s3://b/models"
    )
    assert code == 1 and "no cdk.json" in one_error_line(err) and "--catalog PATH" in err
    assert not (tmp_path / ".tierserve").exists()


def test_the_console_entry_point_exits_non_zero_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00" * 8)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "layers" / "tierserve" / "python")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tierserve.tools.cli",
            "package",
            str(bad),
            "--name",
            "bad",
            "--version",
            "1",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert one_error_line(result.stderr).startswith("tierserve package: error: ")
    usage = subprocess.run(
        [
            sys.executable,
            "-m",
            "tierserve.tools.cli",
            "package",
            str(bad),
            "--name",
            "Not_Valid",
            "--version",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert usage.returncode == 2 and "use lowercase letters" in usage.stderr


def test_catalog_validate_reports_every_bad_entry(iris_package, tmp_path, capsys):
    good = iris_package.manifest.to_dict()
    bad_digest = {**good, "name": "broken", "stored": {"sha256": "nope", "bytes": 1}}
    catalog = tmp_path / "catalog.json"
    catalog.write_text(
        json.dumps(
            {
                "models": [
                    {"name": "iris", "version": "1", "manifest": good},
                    {"name": "broken", "version": "1", "manifest": bad_digest},
                    {"name": "iris", "version": "2", "manifest": good},
                    {"name": "iris", "version": "1", "manifest": good},
                ]
            }
        )
    )
    code, stdout, err = cli(capsys, "catalog", "validate", "--catalog", catalog)
    assert code == 1
    assert "ok   iris@1  tier lambda" in stdout
    assert (
        "FAIL broken@1: models[1] is not a valid manifest: manifest for broken@1: stored and model digests "
        "need a 64-hex sha256" in stdout
    )
    assert "FAIL iris@2: models[2]: the entry says iris@2 but its manifest describes iris@1" in stdout
    assert "FAIL iris@1: iris is listed more than once" in stdout
    assert "1 of 4 entries valid" in err
    code, _, err = cli(capsys, "catalog", "validate", "--catalog", tmp_path / "absent.json")
    assert code == 1 and "no catalog at" in err  # a path given on purpose that is not there


def test_a_default_skl2onnx_classifier_is_packaged_with_a_probability_tensor(tmp_path, capsys):
    source, _ = sklearn_classifier(tmp_path / "clf.onnx", zipmap=True)
    out = tmp_path / "pkg"
    code, stdout, err = cli(capsys, "package", source, "--name", "clf", "--version", "1", "--out", out)
    assert code == 0, err
    assert "note: output 'output_probability' was a ZipMap" in stdout
    outputs = {o.name: o for o in read_package(out).manifest.outputs}
    assert (outputs["output_probability"].datatype, outputs["output_probability"].shape) == ("FP32", (-1, 3))


def linked_package(iris_package: PackagedModel, tmp_path: Path, link: str) -> Path:
    """A copy of the iris package whose artifact (or manifest) is a symlink: to a file outside the
    folder that holds the very bytes its manifest describes, or to a copy inside the folder."""
    folder, outside = tmp_path / "pkg", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    artifact, manifest = iris_package.artifact.name, "manifest.json"
    shutil.copy(iris_package.artifact, outside / artifact)
    shutil.copy(iris_package.directory / manifest, outside / manifest)
    if link == "artifact-outside":
        (folder / artifact).symlink_to(outside / artifact)
        shutil.copy(outside / manifest, folder / manifest)
    elif link == "artifact-inside":
        shutil.copy(outside / artifact, folder / "copy.zst")
        (folder / artifact).symlink_to("copy.zst")
        shutil.copy(outside / manifest, folder / manifest)
    elif link == "manifest":
        shutil.copy(outside / artifact, folder / artifact)
        (folder / manifest).symlink_to(outside / manifest)
    return folder


@pytest.mark.parametrize("link", ["artifact-outside", "artifact-inside", "manifest"])
def test_upload_refuses_a_package_with_a_symlink_and_sends_nothing(s3, iris_package, tmp_path, capsys, link):
    folder = linked_package(iris_package, tmp_path, link)
    code, _, err = cli(capsys, "upload", folder, f"s3://{BUCKET}/models", "--no-register")
    assert code == 1
    line = one_error_line(err)
    assert "is a symbolic link: a package holds its own files" in line, line
    assert s3.list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0


def test_upload_package_refuses_a_symlinked_artifact_however_it_is_called(s3, iris_package, tmp_path):
    folder = linked_package(iris_package, tmp_path, "artifact-outside")
    packaged = PackagedModel(iris_package.manifest, folder / iris_package.artifact.name)
    with pytest.raises(InvalidModel, match="is a symbolic link"):
        upload_package(packaged, s3, BUCKET, "models")
    assert s3.list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0


def test_a_package_folder_reached_through_a_symlink_uploads(s3, iris_package, tmp_path, capsys):
    (tmp_path / "current").symlink_to(iris_package.directory, target_is_directory=True)
    code, stdout, err = cli(capsys, "upload", tmp_path / "current", f"s3://{BUCKET}/models", "--no-register")
    assert code == 0, err
    assert "uploaded: s3://test-models/models/iris/1/manifest.json" in stdout
