"""Hostile manifests (deeply nested, ``1e400``, ``Infinity``, ``"false"`` for a boolean, and the
rest of ``support.manifests``) where each reader meets them: the Lambda API handler and the GPU
server's host reading S3, the GPU server's model directory, and the command line's catalog
and upload commands. Each says "not a valid manifest: <what>" (a 503 on the servers, one line
and exit 1 on the command line); none is a 500, a traceback or a manifest read wrongly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from support.common import BUCKET, load_event, make_invoke
from support.manifests import HOSTILE_MANIFESTS
from tierserve.errors import ArtifactRejected
from tierserve.routes import HttpRequest
from tierserve.sagemaker_hosting import ModelHost, ServerSettings, build_host, build_registry
from tierserve.tools.cli import main

# The store refuses a manifest over 1 MiB before parsing it, in its own words.
SERVED = {k: v for k, v in HOSTILE_MANIFESTS.items() if k != "over-a-megabyte"}
MANIFEST_KEY = "models/iris/1/manifest.json"


def put_manifest(s3: object, text: str) -> None:
    s3.put_object(Bucket=BUCKET, Key=MANIFEST_KEY, Body=text.encode())  # type: ignore[attr-defined]


def assert_refused(status: int, body: bytes, fragment: str) -> None:
    assert status == 503, body[:300]
    message = json.loads(body)["error"]
    assert "is not a valid manifest: " in message and re.search(fragment, message), message


@pytest.mark.filterwarnings("ignore:No application metrics to publish")  # a refused load records none
@pytest.mark.parametrize(("text", "fragment"), SERVED.values(), ids=SERVED)
def test_the_api_handler_refuses_a_hostile_manifest_with_a_503(
    s3, uploaded_iris, cache_dir, monkeypatch, text, fragment
):
    put_manifest(s3, text)
    invoke = make_invoke(monkeypatch, cache_dir)
    for event in ("metadata", "infer-json"):
        status, _, body = invoke(load_event(event))
        assert_refused(status, body, fragment)


@pytest.mark.parametrize(("text", "fragment"), SERVED.values(), ids=SERVED)
def test_the_gpu_servers_host_refuses_a_hostile_manifest_in_s3_with_a_503(
    s3, uploaded_iris, cache_dir, text, fragment
):
    put_manifest(s3, text)
    environ = {
        "TIERSERVE_MODEL_BUCKET": BUCKET,
        "TIERSERVE_MODELS": "iris@1",
        "TIERSERVE_CACHE_DIR": str(cache_dir),
    }
    settings = ServerSettings.from_env(environ)
    host = ModelHost(build_registry(settings, environ), settings)
    response = host.respond(HttpRequest("GET", "/v2/models/iris"))
    assert_refused(response.status, response.body, fragment)


@pytest.mark.parametrize(("text", "fragment"), HOSTILE_MANIFESTS.values(), ids=HOSTILE_MANIFESTS)
def test_the_gpu_server_refuses_a_model_directory_with_a_hostile_manifest(tmp_path, text, fragment):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ArtifactRejected) as caught:
        build_host({"TIERSERVE_MODEL_DIR": str(tmp_path), "TIERSERVE_CACHE_DIR": str(tmp_path / "cache")})
    assert "is not a valid manifest: " in caught.value.message
    assert re.search(fragment, caught.value.message), caught.value.message


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def hostile_catalog(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.json"
    path.write_text('{"models": [{"name": "iris", "version": "1", "manifest": ' + text + "}]}")
    return path


CATALOGED = {k: v for k, v in HOSTILE_MANIFESTS.items() if k != "over-a-megabyte"}


@pytest.mark.parametrize(("text", "fragment"), CATALOGED.values(), ids=CATALOGED)
def test_catalog_validate_fails_the_entry_in_one_line(tmp_path, capsys, text, fragment):
    code, out, err = cli(capsys, "catalog", "validate", "--catalog", hostile_catalog(tmp_path, text))
    assert code == 1
    lines = (out + err).strip().splitlines()
    assert "Traceback" not in out + err and "unexpected error" not in out + err
    assert any(re.search(fragment, line) for line in lines), out + err


@pytest.mark.parametrize(("text", "fragment"), CATALOGED.values(), ids=CATALOGED)
@pytest.mark.parametrize("command", ["list", "show"])
def test_catalog_list_and_show_fail_in_one_line(tmp_path, capsys, command, text, fragment):
    extra = ["iris"] if command == "show" else []
    code, out, err = cli(capsys, "catalog", command, *extra, "--catalog", hostile_catalog(tmp_path, text))
    assert code == 1 and out == ""
    [line] = err.strip().splitlines()
    assert line.startswith("tierserve catalog: error: ") and re.search(fragment, line), line


@pytest.mark.parametrize(("text", "fragment"), HOSTILE_MANIFESTS.values(), ids=HOSTILE_MANIFESTS)
def test_upload_refuses_a_package_with_a_hostile_manifest_in_one_line(
    s3, iris_package, tmp_path, capsys, text, fragment
):
    package_dir = tmp_path / "pkg"
    package_dir.mkdir()
    (package_dir / iris_package.artifact.name).write_bytes(iris_package.artifact.read_bytes())
    (package_dir / "manifest.json").write_text(text)
    code, _, err = cli(capsys, "upload", package_dir, f"s3://{BUCKET}/models", "--no-register")
    assert code == 1
    [line] = [line for line in err.splitlines() if line.startswith("tierserve ")]
    assert line.startswith("tierserve upload: error: ") and "is not a valid manifest: " in line, line
    assert re.search(fragment, line), line
    assert not s3.list_objects_v2(Bucket=BUCKET).get("Contents")  # nothing was sent
