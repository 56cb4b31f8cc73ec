"""What importing the Lambda API handler costs a cold start, against what every image pays.

    python -m bench.import_time               # 15 interleaved rounds
    python -m bench.import_time --rounds 30 --show 15

Each round starts fresh interpreters (nothing cached in memory but the OS page cache) under
``python -X importtime`` and sums the top-level imports: ``import boto3, numpy, onnxruntime``
(the baseline: the libraries the handler cannot do without), then ``import api``
(``functions/inference/api.py`` as Lambda's init imports it, with a model configured and no
preload), with tracing off and, in Lambda terms, on (``LAMBDA_TASK_ROOT`` set: powertools then
traces, and the X-Ray SDK comes in). The ratio of a round is its api import over its baseline;
the target is at most 1.2x with tracing off. ``--show N`` prints the N slowest modules of the
last api import (self time), to see where the rest goes. JSON to bench/results/import_time.json.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from typing import Any

from bench.common import REPO_ROOT, say, write_results

BASELINE = "import boto3, numpy, onnxruntime"
HANDLER = "import api"
TARGET = 1.2
_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)$")


def environment(tracing: bool) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT / "layers" / "tierserve" / "python"), str(REPO_ROOT / "functions" / "inference")]
        ),
        "TIERSERVE_MODELS": "iris@1",
        "TIERSERVE_MODEL_BUCKET": "bench-models",
        "AWS_DEFAULT_REGION": "us-east-1",
        "POWERTOOLS_METRICS_DISABLED": "false",
    }
    env.pop("POWERTOOLS_TRACE_DISABLED", None)
    env.pop("LAMBDA_TASK_ROOT", None)
    if tracing:
        env["LAMBDA_TASK_ROOT"] = str(REPO_ROOT / "functions" / "inference")
    return env


def import_ms(statement: str, env: dict[str, str]) -> tuple[float, list[tuple[int, str]]]:
    """Milliseconds of the top-level imports of ``statement`` in a fresh interpreter, and every
    module's self time (microseconds)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    total, modules = 0, []
    for line in done.stderr.splitlines():
        found = _LINE.match(line)
        if found:
            own, cumulative, indent, name = found.groups()
            modules.append((int(own), name))
            if not indent:
                total += int(cumulative)
    return total / 1000, modules


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.import_time", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--show", type=int, default=0, metavar="N", help="the N slowest modules of api")
    args = parser.parse_args(argv)
    runs = {
        "baseline": (BASELINE, environment(False)),
        "api, tracing off": (HANDLER, environment(False)),
        "api, tracing on": (HANDLER, environment(True)),
    }
    samples: dict[str, list[float]] = {name: [] for name in runs}
    last_modules: list[tuple[int, str]] = []
    for index in range(args.rounds):
        names = list(runs)
        for name in names[index % len(names) :] + names[: index % len(names)]:
            statement, env = runs[name]
            ms, modules = import_ms(statement, env)
            samples[name].append(ms)
            if name == "api, tracing off":
                last_modules = modules
    results: dict[str, Any] = {"baseline": BASELINE, "rounds": args.rounds, "target": TARGET, "imports": {}}
    say(f"{args.rounds} rounds, medians (ms of top-level imports)")
    for name, values in samples.items():
        ratio = statistics.median(v / b for v, b in zip(values, samples["baseline"], strict=True))
        of_medians = statistics.median(values) / statistics.median(samples["baseline"])
        results["imports"][name] = {
            "median_ms": statistics.median(values),
            "ratio_to_baseline": ratio,
            "ratio_of_medians": of_medians,
            "samples_ms": values,
        }
        say(
            f"  {name:18s} {statistics.median(values):7.1f} ms  {ratio:.2f}x the baseline per round "
            f"({of_medians:.2f}x of the medians)"
        )
    met = results["imports"]["api, tracing off"]["ratio_to_baseline"] <= TARGET
    say(f"  target: api (tracing off) at most {TARGET}x the baseline: {'met' if met else 'missed'}")
    if args.show:
        say("slowest modules of the last api import (self ms):")
        for own, name in sorted(last_modules, reverse=True)[: args.show]:
            say(f"  {own / 1000:7.1f}  {name}")
    write_results("import_time", results, command=" ".join(["python -m bench.import_time", *(argv or [])]))
    return results


if __name__ == "__main__":
    main()
