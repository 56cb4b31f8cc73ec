"""A lean init: importing the Lambda API handler loads what the first request needs and no
more. The X-Ray SDK only when tracing is on (powertools' Tracer imports it even disabled, so
telemetry makes one only then), the tools (CLI, packager, local stack) never."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support.common import REPO_ROOT

PROBE = "import json, sys, api; print(json.dumps(sorted(sys.modules)))"


def modules_after_importing_the_handler(**env: str) -> set[str]:
    environ = {
        **{k: v for k, v in os.environ.items() if k not in ("LAMBDA_TASK_ROOT", "POWERTOOLS_TRACE_DISABLED")},
        "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT / "layers/tierserve/python"), str(REPO_ROOT / "functions/inference")]
        ),
        "TIERSERVE_MODELS": "iris@1",
        "TIERSERVE_MODEL_BUCKET": "test-models",
        **env,
    }
    environ.pop("TIERSERVE_PRELOAD", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=environ, check=True, timeout=60
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


@pytest.fixture(scope="module")
def untraced() -> set[str]:
    return modules_after_importing_the_handler()


def test_without_tracing_the_handler_imports_no_xray_sdk(untraced):
    assert not [m for m in untraced if m.startswith("aws_xray_sdk")]
    assert "onnxruntime" in untraced and "numpy" in untraced  # what the first request needs


def test_the_handler_imports_none_of_the_tools(untraced):
    assert not [m for m in untraced if m.startswith("tierserve.tools")]


def test_with_tracing_on_powertools_traces_with_the_xray_sdk():
    traced = modules_after_importing_the_handler(LAMBDA_TASK_ROOT=str(REPO_ROOT / "functions/inference"))
    assert "aws_xray_sdk.core" in traced
