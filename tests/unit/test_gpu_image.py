"""The GPU server's image without a Docker engine: every file it copies exists and is in its
build context, its requirements are pinned (and agree with the Lambda image's), it runs
``serve`` from PATH on port 8080, and its CUDA forward-compatibility entrypoint switches
libraries only for an older host driver. (That ``serve`` answers on CPU:
tests/integration/test_gpu_serve_process.py.)"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from support.common import REPO_ROOT

SERVER_DIR = REPO_ROOT / "functions" / "gpu_server"
DOCKERFILE = SERVER_DIR / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def copies() -> list[tuple[list[str], str]]:
    result = []
    for keyword, rest in instructions():
        if keyword == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            result.append((parts[:-1], parts[-1]))
    return result


def env() -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, rest in instructions():
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                values[name] = value
    return values


def in_context(path: str) -> bool:
    """Whether Dockerfile.dockerignore (deny all, then allow) sends ``path`` to the build."""
    allowed = False
    for pattern in (SERVER_DIR / "Dockerfile.dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def test_every_copied_file_exists_and_is_in_the_build_context():
    assert copies(), "the Dockerfile copies nothing?"
    for sources, _destination in copies():
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"COPY {source}: no such file"
            assert in_context(source.rstrip("/")), f"COPY {source}: excluded by Dockerfile.dockerignore"


def test_the_image_runs_serve_from_path_on_port_8080():
    found = dict(instructions())
    assert found["EXPOSE"] == "8080"
    assert json.loads(found["CMD"]) == ["serve"]
    entrypoint = json.loads(found["ENTRYPOINT"])
    program = {Path(d) for _, d in copies() if d.startswith("/opt/program")}
    copied = {Path(s).name for sources, d in copies() if Path(d) in program for s in sources}
    assert {"serve", "server.py", "cuda_compat.sh"} <= copied
    assert Path(entrypoint[0]).parent in program and Path(entrypoint[0]).name == "cuda_compat.sh"
    variables = env()
    assert "/opt/program" in variables["PATH"].split(":")
    core = next(d for sources, d in copies() if sources == ["layers/tierserve/python/"])
    assert core.rstrip("/") in variables["PYTHONPATH"].split(":")
    assert variables["TIERSERVE_MODEL_DIR"] == "/opt/ml/model"
    # The TensorRT libraries' path is the venv of the base image's Python (Ubuntu 24.04: 3.12).
    base = next(
        rest for keyword, rest in instructions() if keyword == "ARG" and rest.startswith("CUDA_IMAGE=")
    )
    assert base.endswith("-cudnn-runtime-ubuntu24.04") and ":13." in base
    assert "python3.12/site-packages/tensorrt_libs" in variables["LD_LIBRARY_PATH"]


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[A-Za-z0-9_.+\-]+", line), (
                f"{path.name}: {line!r} is not pinned"
            )
            name, version = line.split("==")
            found[name.lower().replace("_", "-")] = version
    return found


def test_requirements_are_pinned_and_agree_with_the_lambda_image():
    gpu = pins(SERVER_DIR / "requirements.txt")
    lambda_image = pins(REPO_ROOT / "functions" / "inference" / "requirements.txt")
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu  # the two packages clash
    shared = set(gpu) & set(lambda_image)
    assert {"numpy", "boto3", "aws-lambda-powertools", "zstandard", "orjson"} <= shared
    assert {n: gpu[n] for n in shared} == {n: lambda_image[n] for n in shared}


@pytest.fixture
def fake_gpu(tmp_path) -> tuple[Path, Path]:
    """A CUDA compat folder holding libcuda 580.65.06, and a bin/ with an nvidia-smi whose
    driver version the test chooses through FAKE_DRIVER."""
    compat = tmp_path / "compat"
    compat.mkdir()
    (compat / "libcuda.so.580.65.06").write_bytes(b"")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "$FAKE_DRIVER"\n')
    smi.chmod(0o755)
    return compat, bin_dir


@pytest.mark.parametrize(
    ("driver", "uses_compat"),
    [("550.163.01", True), ("535.54.03", True), ("580.65.06", False), ("590.10.02", False), ("", False)],
)
def test_the_entrypoint_uses_cuda_compat_only_for_an_older_driver(fake_gpu, driver, uses_compat):
    compat, bin_dir = fake_gpu
    environ = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CUDA_COMPAT_DIR": str(compat),
        "FAKE_DRIVER": driver,
        "LD_LIBRARY_PATH": "/opt/other",
    }
    result = subprocess.run(
        [str(SERVER_DIR / "cuda_compat.sh"), "sh", "-c", 'echo "$LD_LIBRARY_PATH"'],
        env=environ,
        capture_output=True,
        text=True,
        check=True,
    )
    expected = f"{compat}:/opt/other" if uses_compat else "/opt/other"
    assert result.stdout.strip() == expected
