"""``tierserve package``, ``tierserve upload`` and ``tierserve catalog``: the ops side.

:func:`add_commands` adds them to the main parser (``tierserve.tools.cli``). Every failure is one
line on stderr that says what to do, and a non-zero exit code; set TIERSERVE_DEBUG=1 to see
the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tierserve.catalog import NAME_PATTERN, VERSION_PATTERN, ManifestError, lambda_memory_mb, tier_for

DEBUG_ENV = "TIERSERVE_DEBUG"
DEFAULT_WORK_DIR = Path(".tierserve") / "packages"

PACKAGE_EXAMPLES = """\
examples:
  # check and describe a model as it is (zstd where it pays at the target bandwidth, measured)
  tierserve package model.onnx --name iris --version 1

  # int8 weights for the CPU (Lambda) tier, ORT format, uploaded and registered in the catalog
  tierserve package model.onnx --name minilm --version 2 --quantization int8 --format ort \\
      --upload s3://my-model-bucket/models

  # static int8, calibrated and checked on real inputs (.npz: one array per input name)
  tierserve package model.onnx --name resnet --version 1 --quantization int8 --calibration rows.npz

  # a drift baseline (per-input quantile bins beside the manifest) from real rows
  tierserve package model.onnx --name iris --version 2 --inputs rows.npy --baseline traffic-sample.jsonl

  # fp16 for the GPU tier, a looser budget, and the tier forced
  tierserve package big.onnx --name llm-head --version 1 --quantization fp16 --tier gpu --max-abs-diff 0.05

what it prints: size before and after, the stored/original ratio, session load time and
batch-1 latency before and after, and the accuracy against the original (docs/packaging.md).
A package outside the accuracy budget is refused (exit 1) unless --force.
"""

UPLOAD_EXAMPLES = """\
examples:
  tierserve upload .tierserve/packages/iris/1 s3://my-model-bucket/models
  tierserve upload ./pkg s3://my-model-bucket/models --catalog deploy/catalog.json
  AWS_PROFILE=ops tierserve upload ./pkg s3://my-model-bucket   # s3://bucket means s3://bucket/models

The artifact goes first (multipart above 16 MiB), the manifest last; a version that already
holds the same model is left alone (nothing is sent).
"""

CATALOG_EXAMPLES = """\
examples:
  tierserve catalog list
  tierserve catalog show iris
  tierserve catalog validate
  tierserve catalog validate --check-s3 s3://my-model-bucket/models

The catalog is the file cdk.json names (context "catalog", default catalog.json beside
cdk.json); --catalog PATH picks another.
"""


def add_commands(commands: Any) -> None:
    """Add ``package``, ``upload`` and ``catalog`` to the ``tierserve`` subcommands."""
    formatter = argparse.RawDescriptionHelpFormatter
    package = commands.add_parser(
        "package",
        help="validate, quantize, optimize and compress a model; check its accuracy; optionally upload it",
        description="Turn MODEL.onnx into a tierserve package: a compressed artifact and its manifest.",
        epilog=PACKAGE_EXAMPLES,
        formatter_class=formatter,
    )
    package.add_argument(
        "model",
        type=Path,
        metavar="MODEL.onnx",
        help="the trained model (external data beside it is allowed)",
    )
    package.add_argument(
        "--name", required=True, type=_name, help="model name: lowercase letters, digits, dashes"
    )
    package.add_argument(
        "--version", required=True, type=_version, help="model version, e.g. 1 or 2024-06-01"
    )
    package.add_argument("--out", type=Path, help=f"package folder (default {DEFAULT_WORK_DIR}/NAME/VERSION)")
    shaping = package.add_argument_group("what to build")
    shaping.add_argument(
        "--quantization",
        choices=("none", "int8", "fp16"),
        default="none",
        help="none (default); int8: int8 weights for CPU, dynamic, or static with --calibration; fp16: for GPU",
    )
    shaping.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE.npy|.npz",
        help="static int8: real inputs (rows on the first axis) to calibrate with; also the accuracy check's inputs",
    )
    shaping.add_argument(
        "--inputs",
        type=Path,
        metavar="FILE.npy|.npz",
        help="real inputs for the accuracy check only (default: the calibration rows, else generated rows)",
    )
    shaping.add_argument(
        "--baseline",
        type=Path,
        metavar="FILE.npy|.json|.jsonl",
        help="real inputs whose distribution `tierserve drift` compares traffic with (default: the --inputs or "
        "--calibration rows; with neither, no baseline)",
    )
    shaping.add_argument(
        "--int8-scales",
        choices=("auto", "per-tensor", "per-channel"),
        default="auto",
        help="int8 weight scales; auto (default) tries both and keeps the more accurate",
    )
    shaping.add_argument(
        "--format", choices=("onnx", "ort"), default="onnx", help="ort: ORT format (CPU tier)"
    )
    shaping.add_argument(
        "--no-optimize",
        dest="optimize",
        action="store_false",
        help="skip offline graph optimization (done by default for the lambda tier)",
    )
    shaping.add_argument(
        "--compression",
        choices=("auto", "zstd", "gzip", "none"),
        default="auto",
        help="auto (default): zstd where it makes a cold start faster at --target-mb-s, else none "
        "(measured); or zstd (level measured), gzip, none",
    )
    shaping.add_argument(
        "--target-mb-s",
        type=float,
        metavar="MB/S",
        help="the S3 bandwidth a cold start reads at, for --compression auto (default: cdk.json "
        "fetch_connections x s3_mb_per_s_per_connection, 8 x 90)",
    )
    shaping.add_argument(
        "--zstd-level", type=int, choices=range(1, 23), metavar="1-22", help="default: measured"
    )
    shaping.add_argument(
        "--compress-seconds",
        type=float,
        default=20.0,
        metavar="S",
        help="time budget for choosing the zstd level (default 20)",
    )
    shaping.add_argument(
        "--tier", choices=("lambda", "gpu"), help="override the size rule (cdk.json lambda_max_model_mb)"
    )
    budget = package.add_argument_group("accuracy budget (against the original model)")
    budget.add_argument(
        "--max-abs-diff",
        type=_optional_float,
        default=_DEFAULT,
        metavar="X",
        help="largest allowed |difference| of any float output; default 1e-3 (none), 1e-2 (fp16), unchecked "
        "for int8; 'off' disables it",
    )
    budget.add_argument(
        "--min-top1", type=float, default=0.98, metavar="F", help="classifier top-1 agreement (0.98)"
    )
    budget.add_argument(
        "--min-cosine", type=float, default=0.99, metavar="F", help="embedding cosine similarity (0.99)"
    )
    budget.add_argument("--rows", type=int, metavar="N", help="rows of generated inputs (default up to 256)")
    budget.add_argument("--force", action="store_true", help="emit the package even outside the budget")
    shipping = package.add_argument_group("upload and registration")
    shipping.add_argument(
        "--upload", metavar="s3://BUCKET/PREFIX", help="upload it and add it to the catalog"
    )
    _add_registration(shipping)
    package.set_defaults(run=_guarded("package", run_package))

    upload = commands.add_parser(
        "upload",
        help="upload a package folder to S3 and register it in the catalog",
        description="Upload PACKAGE_DIR (from `tierserve package`) to S3, then add it to the catalog.",
        epilog=UPLOAD_EXAMPLES,
        formatter_class=formatter,
    )
    upload.add_argument("package_dir", type=Path, metavar="PACKAGE_DIR")
    upload.add_argument("destination", metavar="s3://BUCKET/PREFIX")
    _add_registration(upload)
    upload.set_defaults(run=_guarded("upload", run_upload))

    catalog = commands.add_parser(
        "catalog",
        help="list, show or validate the models in the catalog",
        description="The models cdk deploy will serve.",
        epilog=CATALOG_EXAMPLES,
        formatter_class=formatter,
    )
    actions = catalog.add_subparsers(dest="catalog_command", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        help="one line per model: version, tier, sizes, quantization",
        description="One line per catalog entry: the tier comes from the tier rule (cdk.json's lambda_max_model_mb).",
        epilog="example:\n  tierserve catalog list\n  tierserve catalog list --catalog other.json",
        formatter_class=formatter,
    )
    show = actions.add_parser(
        "show",
        help="one model's manifest, tier and Lambda memory",
        description="The manifest of one entry, its tier and the Lambda memory the CDK app gives it.",
        epilog="example:\n  tierserve catalog show iris",
        formatter_class=formatter,
    )
    show.add_argument("model_name", metavar="NAME")
    validate = actions.add_parser(
        "validate",
        help="check every entry; exit 1 on any problem",
        description=(
            "Checks that every manifest parses, its digests are present and its tier is decided;\n"
            "with --check-s3 also that each manifest and artifact is in S3 with the declared size."
        ),
        epilog="examples:\n  tierserve catalog validate\n  tierserve catalog validate --check-s3 s3://BUCKET/models",
        formatter_class=formatter,
    )
    validate.add_argument(
        "--check-s3", metavar="s3://BUCKET/PREFIX", help="also check that each manifest and artifact is in S3"
    )
    for parser, handler in (
        (listing, run_catalog_list),
        (show, run_catalog_show),
        (validate, run_catalog_validate),
    ):
        parser.add_argument("--catalog", type=Path, metavar="PATH", help="default: the file cdk.json names")
        parser.set_defaults(run=_guarded("catalog", handler))


def _add_registration(parser: Any) -> None:
    parser.add_argument(
        "--catalog", type=Path, metavar="PATH", help="catalog to register in (default: cdk.json's)"
    )
    parser.add_argument(
        "--no-register", dest="register", action="store_false", help="upload without registering"
    )


def run_package(args: argparse.Namespace) -> int:
    from tierserve.tools.packaging import PackageOptions, S3Location, UploadFailed, package, project_config
    from tierserve.tools.packaging._steps import UNSET

    destination = S3Location.parse(args.upload) if args.upload else None
    register = destination is not None and args.register
    config = project_config(args.catalog, need_catalog=register)
    out_dir = args.out or DEFAULT_WORK_DIR / args.name / args.version
    options = PackageOptions(
        name=args.name,
        version=args.version,
        quantization=args.quantization,
        calibration=args.calibration,
        inputs=args.inputs,
        baseline=args.baseline,
        per_channel={"auto": None, "per-tensor": False, "per-channel": True}[args.int8_scales],
        optimize=args.optimize,
        model_format=args.format,
        compression=args.compression,
        zstd_level=args.zstd_level,
        compress_budget_s=args.compress_seconds,
        target_mb_s=args.target_mb_s or config.target_mb_s,
        tier=args.tier,
        lambda_max_model_mb=config.lambda_max_model_mb,
        max_abs_diff=UNSET if args.max_abs_diff is _DEFAULT else args.max_abs_diff,
        min_top1=args.min_top1,
        min_cosine=args.min_cosine,
        force=args.force,
        rows=args.rows,
    )
    report = package(args.model, out_dir, options, say=_say("package"))
    print(report.table())
    print(f"package: {out_dir}")
    if destination is not None:
        try:
            _ship(report.packaged, destination, config if register else None)
        except UploadFailed as error:
            raise type(error)(
                f"{error.message} (the package is kept: tierserve upload {out_dir} {args.upload})"
            ) from None
    return 0


def run_upload(args: argparse.Namespace) -> int:
    from tierserve.tools.packaging import PackagingError, S3Location, project_config, read_package

    destination = S3Location.parse(args.destination)
    config = project_config(args.catalog, need_catalog=args.register)
    try:
        packaged = read_package(args.package_dir)
    except FileNotFoundError as error:
        raise PackagingError(
            f"{args.package_dir} is not a package ({error.filename or error}): make one with `tierserve package`"
        ) from None
    except ManifestError as error:
        raise PackagingError(f"{error}; package the model again (tierserve package)") from None
    except ValueError as error:
        raise PackagingError(
            f"{args.package_dir} is not a usable package ({error}): package the model again"
        ) from None
    _ship(packaged, destination, config if args.register else None)
    return 0


def _ship(packaged: Any, destination: Any, config: Any) -> None:
    from tierserve.aws import s3_client
    from tierserve.tools.packaging import Progress, register, upload_package
    from tierserve.tools.packaging._catalog import load_catalog

    manifest = packaged.manifest
    if config is not None and config.catalog_path is not None:
        load_catalog(config.catalog_path)  # a broken catalog stops us before anything is sent
    progress = Progress(manifest.stored.bytes, f"upload {manifest.name}@{manifest.version}")
    result = upload_package(packaged, s3_client(), destination.bucket, destination.prefix, progress=progress)
    if result.uploaded:
        progress.close("(artifact already there, manifest written)" if not result.artifact_sent else "")
        print(f"uploaded: {result.manifest_uri}")
    else:
        print(f"already there: {result.manifest_uri} holds this model; nothing sent")
    if config is not None and config.catalog_path is not None:
        register(result.manifest, config.catalog_path)
        tier = tier_for(result.manifest, config.lambda_max_model_mb)
        print(f"registered: {manifest.name}@{manifest.version} (tier {tier}) in {config.catalog_path}")


def run_catalog_list(args: argparse.Namespace) -> int:
    from tierserve.tools.packaging._artifact import size_text
    from tierserve.tools.packaging._catalog import load_catalog

    config = _config(args.catalog)
    catalog = load_catalog(config.catalog_path)
    if not catalog.entries:
        print(f"{config.catalog_path}: no models yet (tierserve package ... --upload s3://...)")
        return 0
    rows = [("NAME", "VERSION", "TIER", "MODEL", "STORED", "QUANTIZATION", "FORMAT")]
    for entry in catalog.entries:
        m = entry.manifest
        rows.append(
            (
                m.name,
                m.version,
                tier_for(m, config.lambda_max_model_mb) + (" (override)" if m.tier else ""),
                size_text(m.model.bytes),
                f"{size_text(m.stored.bytes)} {m.compression}",
                m.quantization,
                m.format + (" optimized" if m.optimized else ""),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def run_catalog_show(args: argparse.Namespace) -> int:
    from tierserve.tools.packaging import CatalogProblem
    from tierserve.tools.packaging._catalog import load_catalog

    config = _config(args.catalog)
    catalog = load_catalog(config.catalog_path)
    entry = catalog.get(args.model_name)
    if entry is None:
        names = ", ".join(e.name for e in catalog.entries) or "none"
        raise CatalogProblem(f"{args.model_name!r} is not in {config.catalog_path} (models: {names})")
    tier = tier_for(entry.manifest, config.lambda_max_model_mb)
    shown = {
        "tier": tier,
        "tier_rule": "override"
        if entry.manifest.tier
        else f"size vs lambda_max_model_mb={config.lambda_max_model_mb:g}",
        **({"lambda_memory_mb": lambda_memory_mb(entry.manifest)} if tier == "lambda" else {}),
        "manifest": entry.manifest.to_dict(),
    }
    print(json.dumps(shown, indent=2, sort_keys=False))
    return 0


def run_catalog_validate(args: argparse.Namespace) -> int:
    from tierserve.aws import s3_client
    from tierserve.tools.packaging import S3Location, validate_catalog

    config = _config(args.catalog)
    where = S3Location.parse(args.check_s3) if args.check_s3 else None
    checks = validate_catalog(config.catalog_path, config.lambda_max_model_mb, where, s3_client)
    if not checks:
        print(f"{config.catalog_path}: no models (an empty catalog deploys none)")
        return 0
    failed = [c for c in checks if c.problems]
    for check in checks:
        if check.problems:
            for problem in check.problems:
                print(f"FAIL {check.label}: {problem}")
        else:
            print(f"ok   {check.label}  tier {check.tier}" + (" (in S3)" if where else ""))
    summary = f"{len(checks) - len(failed)} of {len(checks)} entries valid in {config.catalog_path}"
    print(summary, file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


def _config(catalog: Path | None) -> Any:
    """The project's configuration; a catalog named with --catalog must exist (the one cdk.json
    names may not yet: that is a project with no models)."""
    from tierserve.tools.packaging import CatalogProblem, project_config

    if catalog is not None and not catalog.exists():
        raise CatalogProblem(
            f"no catalog at {catalog}: check the path, or leave out --catalog for the one cdk.json names"
        )
    return project_config(catalog)


def _guarded(
    command: str, handler: Callable[[argparse.Namespace], int]
) -> Callable[[argparse.Namespace], int]:
    """Turn every failure into one line on stderr and an exit code; no tracebacks."""

    def run(args: argparse.Namespace) -> int:
        from tierserve.tools.packaging import PackagingError

        try:
            return handler(args)
        except PackagingError as error:
            print(f"tierserve {command}: error: {error.message}", file=sys.stderr)
            return error.exit_code
        except BrokenPipeError:
            raise  # the reader of our output went away: tierserve.tools.cli.main ends quietly
        except KeyboardInterrupt:
            print(f"tierserve {command}: interrupted; nothing was left half-written", file=sys.stderr)
            return 130
        except Exception as error:
            if os.environ.get(DEBUG_ENV):
                raise
            first = (str(error).strip().splitlines() or [""])[0][:300]
            print(
                f"tierserve {command}: unexpected error ({type(error).__name__}: {first}); "
                f"rerun with {DEBUG_ENV}=1 for the traceback, and report it",
                file=sys.stderr,
            )
            return 1

    return run


def _say(command: str) -> Callable[[str], None]:
    return lambda step: print(f"tierserve {command}: {step}", file=sys.stderr, flush=True)


class _Default:
    def __repr__(self) -> str:
        return "default"


_DEFAULT: Any = _Default()


def _optional_float(text: str) -> float | None:
    if text.lower() in {"off", "none"}:
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (or 'off')") from None


def _name(text: str) -> str:
    if not NAME_PATTERN.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use lowercase letters, digits and dashes (max 64), e.g. iris"
        )
    return text


def _version(text: str) -> str:
    if not VERSION_PATTERN.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use letters, digits, '.', '_' or '-', e.g. 1 or 2024-06-01"
        )
    return text
