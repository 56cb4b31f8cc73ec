"""``tierserve drift MODEL``: the drift job's comparison, from a terminal.

Against a running ``tierserve local`` (``--local``: its embedded S3, its catalog) or a deployed
data bucket (``--bucket``; the model bucket from ``--model-bucket`` or the storage stack's
output), it reads the model version's baseline and the last ``--window`` of capture, prints
the table (feature, rows, PSI, verdict) and writes the plot to ``--out``. Exit 0 when nothing
drifted, 3 when a feature did (scripts can alarm on it), 1 when the comparison cannot run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tierserve import aws
from tierserve.drift.job import DriftError, check_model, write_report
from tierserve.drift.psi import DEFAULT_MIN_ROWS, DRIFT, DRIFTED
from tierserve.drift.report import render_png
from tierserve.settings import DEFAULT_MODEL_PREFIX, ModelRef

STORAGE_STACK = "TierserveStorage"
MODEL_BUCKET_OUTPUT = "ModelBucketName"
EXIT_DRIFT = 3
WINDOW = re.compile(r"^(\d+)\s*([mhd])$")
UNITS = {"m": "minutes", "h": "hours", "d": "days"}

EXAMPLES = """\
examples:
  tierserve local &                                  # serves iris and captures its requests
  curl ... /v2/models/iris/infer                     # some traffic (at least 100 rows)
  tierserve drift iris --local                       # table, and drift-iris.png
  tierserve drift iris --local --window 30m --out /tmp/iris.png
  tierserve drift iris --bucket my-data-bucket --version 3 --window 7d
  tierserve drift iris --bucket my-data-bucket --model-bucket my-model-bucket --write-report

the statistic: the population stability index of each input feature over the baseline's
deciles (recorded by `tierserve package`); under 0.1 stable, 0.1 to --threshold moderate,
--threshold (0.25) and over drift. A feature with fewer than --min-rows rows is not judged.
exit status: 0 no drift, 3 drift, 1 the comparison could not run (the message says why).
"""


class DriftCommandError(RuntimeError):
    """What stops ``tierserve drift``; the message names the fix."""


def add_drift_command(commands: Any) -> None:
    """Add ``tierserve drift`` to the main parser's subcommands."""
    drift = commands.add_parser(
        "drift",
        help="compare a model's captured requests with its packaging baseline (PSI per input feature)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Reads the baseline beside MODEL's manifest and the requests captured for it in the last\n"
            "--window (capture/MODEL/VERSION/ in the data bucket), computes the population stability\n"
            "index of every input feature, prints a table and writes a PNG plot: the comparison the\n"
            "scheduled drift function runs in AWS."
        ),
        epilog=EXAMPLES,
    )
    drift.add_argument("model", metavar="MODEL", help="the model's name, e.g. iris")
    drift.add_argument("--version", help="the version (default: the catalog's, or the local stack's)")
    drift.add_argument(
        "--window", default="24h", help="how far back to read capture: 30m, 6h, 7d (default 24h)"
    )
    where = drift.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="the running `tierserve local` (its embedded S3)")
    where.add_argument(
        "--bucket", metavar="DATA_BUCKET", help="a deployed data bucket (AWS credentials needed)"
    )
    drift.add_argument(
        "--model-bucket",
        help=f"with --bucket: the model bucket (default: the {STORAGE_STACK} stack's output)",
    )
    drift.add_argument(
        "--model-prefix", default=DEFAULT_MODEL_PREFIX, help="key prefix of the models (default models)"
    )
    drift.add_argument("--out", type=Path, help="the PNG plot (default drift-MODEL.png)")
    drift.add_argument(
        "--threshold", type=float, default=DRIFT, help=f"PSI that counts as drift (default {DRIFT:g})"
    )
    drift.add_argument(
        "--min-rows",
        type=int,
        default=DEFAULT_MIN_ROWS,
        help=f"rows a verdict needs (default {DEFAULT_MIN_ROWS})",
    )
    drift.add_argument(
        "--write-report",
        action="store_true",
        help="also put report.json and psi.png under drift-reports/ in the bucket",
    )
    drift.add_argument("--work-dir", type=Path, default=Path(".tierserve"), help="as for `tierserve local`")
    drift.set_defaults(run=run_drift)


def parse_window(text: str) -> dt.timedelta:
    """``30m``, ``6h``, ``7d`` -> a timedelta.

    Raises:
        DriftCommandError: anything else.
    """
    match = WINDOW.match(text.strip().lower())
    if match is None or int(match.group(1)) == 0:
        raise DriftCommandError(
            f"--window {text!r} is not a duration: give minutes, hours or days, e.g. 30m, 6h, 7d"
        )
    return dt.timedelta(**{UNITS[match.group(2)]: int(match.group(1))})


def run_drift(args: argparse.Namespace) -> int:
    try:
        window = parse_window(args.window)
        if not args.local and not args.bucket:
            raise DriftCommandError(
                "say where the capture is: --local (a running `tierserve local`) or --bucket DATA_BUCKET (deployed)"
            )
        s3, ref, model_bucket, data_bucket, prefix = _local(args) if args.local else _deployed(args)
        progress = Bar(sys.stderr)
        report = check_model(
            s3,
            ref,
            model_bucket=model_bucket,
            data_bucket=data_bucket,
            model_prefix=prefix,
            window=window,
            threshold=args.threshold,
            min_rows=args.min_rows,
            progress=progress,
        )
        progress.close()
        print(report.table())
        out = args.out or Path(f"drift-{ref.name}.png")
        out.write_bytes(render_png(report))
        print(f"plot: {out}", file=sys.stderr)
        if args.write_report:
            keys = _s3_call(
                lambda: write_report(s3, data_bucket, report), f"s3://{data_bucket}/drift-reports/"
            )
            print(f"report: s3://{data_bucket}/{keys[0]}", file=sys.stderr)
    except (DriftCommandError, DriftError) as error:
        print(f"tierserve drift: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"tierserve drift: {error}", file=sys.stderr)
        return 1
    return EXIT_DRIFT if report.verdict == DRIFTED else 0


def _local(args: argparse.Namespace) -> tuple[Any, ModelRef, str, str, str]:
    from tierserve.catalog import Catalog
    from tierserve.tools.local.embedded_s3 import embedded_client, endpoint_env
    from tierserve.tools.local.state import LocalStackNotRunning, running_stack

    try:
        state = running_stack(args.work_dir)
    except LocalStackNotRunning as error:
        raise DriftCommandError(str(error)) from None
    os.environ.update(endpoint_env(state["s3_endpoint"]))  # nothing this process makes reaches AWS
    aws.clear_clients()
    catalog = Catalog.load(Path(args.work_dir) / "catalog.json")
    entry = catalog.get(args.model)
    if entry is None:
        names = ", ".join(e.name for e in catalog.entries) or "none"
        raise DriftCommandError(f"the local stack does not serve {args.model!r} (it serves {names})")
    ref = ModelRef(args.model, args.version or entry.version)
    return (
        embedded_client(state["s3_endpoint"]),
        ref,
        state["model_bucket"],
        state["data_bucket"],
        state["model_prefix"],
    )


def _deployed(args: argparse.Namespace) -> tuple[Any, ModelRef, str, str, str]:
    version = args.version
    if version is None:
        from tierserve.catalog import Catalog, ManifestError
        from tierserve.tools.packaging import CatalogProblem, project_config

        try:
            entry = Catalog.load(project_config(None, need_catalog=True).catalog_path).get(args.model)
        except (CatalogProblem, ManifestError, OSError) as error:  # name the way around it
            raise DriftCommandError(f"{error}; or pass --version") from None
        if entry is None:
            raise DriftCommandError(f"the catalog holds no {args.model!r}: pass --version, or check the name")
        version = entry.version
    model_bucket = args.model_bucket or _storage_output()
    return aws.client("s3"), ModelRef(args.model, version), model_bucket, args.bucket, args.model_prefix


def _storage_output() -> str:
    try:
        stacks = aws.client("cloudformation").describe_stacks(StackName=STORAGE_STACK)["Stacks"]
    except Exception as error:
        failure = aws.classify(error)
        raise DriftCommandError(
            f"cannot read the {STORAGE_STACK} stack's outputs ({failure.code or failure.kind}): check your AWS "
            "credentials and region, or pass --model-bucket"
        ) from None
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs", [])} if stacks else {}
    if MODEL_BUCKET_OUTPUT not in outputs:
        raise DriftCommandError(
            f"the {STORAGE_STACK} stack has no {MODEL_BUCKET_OUTPUT} output: pass --model-bucket"
        )
    return outputs[MODEL_BUCKET_OUTPUT]


def _s3_call(call: Any, where: str) -> Any:
    try:
        return call()
    except Exception as error:
        failure = aws.classify(error)
        raise DriftCommandError(
            f"writing {where} failed ({failure.code or failure.kind}): check access, retry"
        ) from None


class Bar:
    """Objects of capture read so far, on one redrawn line when stderr is a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.interactive = bool(getattr(stream, "isatty", lambda: False)())
        self.drawn = 0.0
        self.last = (0, 0)

    def __call__(self, done: int, total: int) -> None:
        self.last = (done, total)
        now = time.perf_counter()
        if self.interactive and (now - self.drawn > 0.1 or done == total):
            self.drawn = now
            filled = int(30 * done / max(total, 1))
            self.stream.write(
                f"\rreading capture [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} objects"
            )
            self.stream.flush()

    def close(self) -> None:
        if self.interactive and self.last[1]:
            self.stream.write("\n")
        elif self.last[1]:
            self.stream.write(f"read {self.last[1]} capture objects\n")
