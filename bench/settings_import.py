"""What one settings reader costs on a cold start: tierserve's own helper vs pydantic-settings.

    python -m bench.settings_import               # 15 interleaved rounds
    python -m bench.settings_import --rounds 30

Each round starts fresh interpreters (nothing cached in memory but the OS page cache) and,
in each, times ``import boto3, numpy, onnxruntime`` (what every Lambda image pays anyway),
then the import of the reader on top of it: ``tierserve.settings`` (the helper, with the
settings object) or ``pydantic_settings`` (the library alone, before any model is declared).
The API handler's whole import (``functions/inference/api.py``, no model loaded) is timed
too, as the later budget reads: at most 1.2x the baseline. Ratios are within one round, so
the shared machine's noise hits both sides alike. JSON to bench/results/settings_import.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

from bench.common import REPO_ROOT, say, write_results

BASELINE = "import boto3, numpy, onnxruntime"
READERS = {
    "tierserve.settings": "import tierserve.settings",
    "pydantic_settings": "import pydantic_settings",
    "api handler": "import api",
}
PROBE = """
import time
start = time.perf_counter()
{baseline}
middle = time.perf_counter()
{reader}
end = time.perf_counter()
print((middle - start) * 1000, (end - middle) * 1000)
"""


def time_import(reader: str) -> tuple[float, float]:
    """Milliseconds for the baseline and then for ``reader`` in a fresh interpreter."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT / "layers" / "tierserve" / "python"), str(REPO_ROOT / "functions" / "inference")]
        ),
        "POWERTOOLS_METRICS_DISABLED": "true",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "TIERSERVE_MODELS": "iris@1",
        "TIERSERVE_MODEL_BUCKET": "bench-models",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(baseline=BASELINE, reader=reader)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )
    baseline_ms, reader_ms = (float(x) for x in done.stdout.split())
    return baseline_ms, reader_ms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.settings_import", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    args = parser.parse_args(argv)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in READERS}
    for index in range(args.rounds):
        order = list(READERS.items())[index % len(READERS) :] + list(READERS.items())[: index % len(READERS)]
        for name, statement in order:
            samples[name].append(time_import(statement))
    results: dict[str, Any] = {"baseline": BASELINE, "rounds": args.rounds, "readers": {}}
    say(f"baseline: {BASELINE}; {args.rounds} rounds, medians")
    for name, pairs in samples.items():
        baseline = statistics.median(b for b, _ in pairs)
        extra = statistics.median(r for _, r in pairs)
        ratio = statistics.median((b + r) / b for b, r in pairs)
        results["readers"][name] = {"baseline_ms": baseline, "import_ms": extra, "ratio": ratio}
        say(f"  {name:20s} +{extra:7.1f} ms on a {baseline:6.1f} ms baseline: {ratio:.2f}x")
    print(json.dumps(results["readers"], indent=2))
    write_results(
        "settings_import", results, command=" ".join(["python -m bench.settings_import", *(argv or [])])
    )


if __name__ == "__main__":
    main()
