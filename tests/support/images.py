"""Image build contexts, checked without a Docker engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from support.common import REPO_ROOT

# Imports a handler module with sys.path narrowed to an image's staged build context (its
# copy of the core and of the handler folder) plus the interpreter's own paths, never the checkout.
_IMPORT_FROM_CONTEXT = """
import importlib, json, sys
core, handlers, modules = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
checkout = sys.argv[4]
sys.path = [handlers, core] + [p for p in sys.path if p and (p.startswith(sys.prefix) or not p.startswith(checkout))]
for name in modules:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.startswith("tierserve"))
print(json.dumps({"loaded": loaded, "files": [sys.modules[m].__file__ for m in loaded]}))
"""


def import_from_context(
    asset_dir: Path, handler_dir: str, modules: list[str], environ: dict[str, str] | None = None
) -> dict[str, Any]:
    """Import ``modules`` (e.g. ``["api", "worker"]``) as the image would: only the staged
    context's core and handlers are importable; ``environ`` adds what a handler needs at init.
    Returns the tierserve modules that loaded and the files they came from."""
    env = {
        "PATH": "/usr/bin:/bin",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
        **(environ or {}),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _IMPORT_FROM_CONTEXT,
            str(asset_dir / "layers/tierserve/python"),
            str(asset_dir / handler_dir),
            ",".join(modules),
            str(REPO_ROOT),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
