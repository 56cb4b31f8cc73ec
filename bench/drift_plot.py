"""What the drift report's PNG costs the shared image: Pillow (what tierserve uses) against matplotlib.

    python -m bench.drift_plot --mpl-python /tmp/mplvenv/bin/python   # a venv with matplotlib
    python -m bench.drift_plot --rounds 9

Each round starts fresh interpreters and times, on top of ``import numpy`` (what every image
pays anyway), the import of the plotting library (``PIL.Image`` + ``ImageDraw`` + ``ImageFont``,
or ``matplotlib`` with the Agg backend and ``pyplot``), then one render of a 4-feature report
to PNG bytes with tierserve's own renderer (Pillow) or an equivalent matplotlib figure. The
installed size of each library (its packages and bundled shared libraries, transitive
dependencies included) is read from the venv. Ratios are within one round.
JSON to bench/results/drift_plot.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, say, write_results

PILLOW_PROBE = """
import time, datetime as dt
import numpy as np
start = time.perf_counter()
from PIL import Image, ImageDraw, ImageFont
middle = time.perf_counter()
from tierserve.catalog import TensorSpec
from tierserve.drift.baseline import build_baseline, feature_columns
from tierserve.drift.psi import compare
from tierserve.drift.report import DriftReport, render_png
from tierserve.settings import ModelRef
rng = np.random.default_rng(0)
b = build_baseline("m", "1", [TensorSpec("input", "FP32", (-1, 4))], {"input": rng.normal(size=(2000, 4))}, source="b")
f = compare(b, feature_columns(["input"], {"input": rng.normal(size=(1000, 4)) + [0, 0.5, 1, 0]}))
now = dt.datetime.now(dt.UTC)
r = DriftReport(ModelRef("m", "1"), now - dt.timedelta(hours=1), now, 0.25, 10, 1000, tuple(f), 2000)
t = time.perf_counter()
png = render_png(r)
end = time.perf_counter()
print((middle - start) * 1000, (end - t) * 1000, len(png))
"""

MPL_PROBE = """
import time, io
import numpy as np
start = time.perf_counter()
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
middle = time.perf_counter()
psi = [0.017, 0.258, 0.94, 0.017]
fig, axes = plt.subplots(4, 1, figsize=(9, 6.8))
axes[0].barh(["input[0]", "input[1]", "input[2]", "input[3]"], psi)
for ax in axes[1:]:
    ax.bar(np.arange(10) - 0.2, np.full(10, 0.1), width=0.4)
    ax.bar(np.arange(10) + 0.2, np.linspace(0.02, 0.3, 10), width=0.4)
out = io.BytesIO()
t = time.perf_counter()
fig.savefig(out, format="png")
end = time.perf_counter()
print((middle - start) * 1000, (end - t) * 1000, len(out.getvalue()))
"""

PILLOW_PACKAGES = ("PIL", "pillow.libs")
MPL_PACKAGES = (
    "matplotlib", "mpl_toolkits", "contourpy", "cycler", "fontTools", "kiwisolver", "pyparsing", "PIL", "pillow.libs",
    "kiwisolver.libs", "matplotlib.libs",
)  # fmt: skip


def run(python: str, probe: str) -> tuple[float, float, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "layers" / "tierserve" / "python")}
    done = subprocess.run(
        [python, "-c", probe], capture_output=True, text=True, env=env, check=True, timeout=120
    )
    import_ms, render_ms, size = done.stdout.split()
    return float(import_ms), float(render_ms), int(size)


def installed_mb(python: str, packages: tuple[str, ...]) -> float:
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    total = 0
    for name in packages:
        root = Path(site) / name
        total += sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0
    return total / 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.drift_plot", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9)")
    parser.add_argument("--mpl-python", default="", help="a Python whose environment has matplotlib")
    args = parser.parse_args(argv)
    sides = {"pillow": (sys.executable, PILLOW_PROBE, PILLOW_PACKAGES)}
    if args.mpl_python:
        sides["matplotlib"] = (args.mpl_python, MPL_PROBE, MPL_PACKAGES)
    samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, (python, probe, _packages) in sides.items():
            samples[name].append(run(python, probe))
    results: dict[str, Any] = {"rounds": args.rounds, "libraries": {}}
    for name, rows in samples.items():
        python, _, packages = sides[name]
        entry = {
            "import_ms": statistics.median(r[0] for r in rows),
            "render_ms": statistics.median(r[1] for r in rows),
            "png_bytes": rows[0][2],
            "installed_mb": round(installed_mb(python, packages), 1),
        }
        results["libraries"][name] = entry
        say(
            f"  {name:10s} import {entry['import_ms']:7.1f} ms  render {entry['render_ms']:6.1f} ms  "
            f"installed {entry['installed_mb']:5.1f} MB"
        )
    print(json.dumps(results["libraries"], indent=2))
    write_results("drift_plot", results, command=" ".join(["python -m bench.drift_plot", *(argv or [])]))


if __name__ == "__main__":
    main()
