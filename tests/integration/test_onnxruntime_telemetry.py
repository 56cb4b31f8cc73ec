"""onnxruntime's telemetry is off in every process tierserve starts: each entry point, run in a
fresh interpreter whose ``onnxruntime.disable_telemetry_events`` and ``InferenceSession``
record their calls, turns telemetry off, and does so before it creates any session; and
``ORT_DISABLE_TELEMETRY=1`` is set before onnxruntime is first imported (1.29+ uploads a
process-info event from Linux at initialization otherwise)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.common import REPO_ROOT

HARNESS = """
import json, sys
import onnxruntime

events = []
onnxruntime.disable_telemetry_events = lambda: events.append("telemetry off")
_open = onnxruntime.InferenceSession.__init__

def _recording_open(self, *args, **kwargs):
    events.append("session")
    _open(self, *args, **kwargs)

onnxruntime.InferenceSession.__init__ = _recording_open
try:
    exec(sys.argv[1])
finally:
    print("EVENTS " + json.dumps(events))
"""

IMPORT_WATCH = """
import json, os, sys

seen = []

class _WatchOnnxruntime:
    def find_spec(self, name, path=None, target=None):
        if name == "onnxruntime" and not seen:
            seen.append(os.environ.get("ORT_DISABLE_TELEMETRY"))
        return None

sys.meta_path.insert(0, _WatchOnnxruntime())
try:
    exec(sys.argv[1])
finally:
    print("SEEN " + json.dumps(seen))
"""

ENTRY_POINTS = {
    "lambda-api": "import api",
    "lambda-worker": "import worker",
    "lambda-batch": "import batch",
    "lambda-stream": 'import os\nos.environ.update(TIERSERVE_OUTPUT_STREAM="results", TIERSERVE_STREAM_MODEL="iris", TIERSERVE_MODELS="iris@1")\nimport stream',
    "gpu-server": "import server",
    "local-stack": (
        "from pathlib import Path\n"
        "from tierserve.tools.local.stack import SAMPLES, package_samples\n"
        "package_samples(Path(sys.argv[2]), [s for s in SAMPLES if s.name == 'iris'])"
    ),
    "cli-package": (
        "from tierserve.tools.cli import main\n"
        "from tierserve.tools.local import samples\n"
        "from pathlib import Path\n"
        "source = samples.iris_classifier(Path(sys.argv[2]) / 'iris.onnx')\n"
        "code = main(['package', str(source), '--name', 'iris', '--version', '1', '--out', sys.argv[2] + '/pkg'])\n"
        "assert code == 0, code"
    ),
}


def _environment() -> dict[str, str]:
    paths = ("layers/tierserve/python", "functions/inference", "functions/gpu_server", ".")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(REPO_ROOT / p) for p in paths),
        "TIERSERVE_MODELS": "",
        "POWERTOOLS_METRICS_DISABLED": "true",
        "POWERTOOLS_TRACE_DISABLED": "true",
    }
    env.pop("ORT_DISABLE_TELEMETRY", None)  # the Makefile's, say: the process must set it itself
    return env


def _run(harness: str, code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", harness, code, str(tmp_path)],
        capture_output=True,
        text=True,
        env=_environment(),
        cwd=tmp_path,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("code", ENTRY_POINTS.values(), ids=ENTRY_POINTS)
def test_every_entry_point_turns_telemetry_off_before_any_session(code, tmp_path: Path):
    result = _run(HARNESS, code, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    [line] = [line for line in result.stdout.splitlines() if line.startswith("EVENTS ")]
    events = json.loads(line.removeprefix("EVENTS "))
    assert "telemetry off" in events, events
    if "session" in events:
        assert events.index("telemetry off") < events.index("session"), events


@pytest.mark.parametrize("code", [*ENTRY_POINTS.values(), "import app"], ids=[*ENTRY_POINTS, "cdk-app"])
def test_every_entry_point_opts_out_before_onnxruntime_is_imported(code, tmp_path: Path):
    result = _run(IMPORT_WATCH, code, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    [line] = [line for line in result.stdout.splitlines() if line.startswith("SEEN ")]
    assert json.loads(line.removeprefix("SEEN ")) == ["1"], "onnxruntime imported before the opt-out"
