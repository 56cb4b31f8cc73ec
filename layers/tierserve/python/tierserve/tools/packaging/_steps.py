"""``tierserve package`` as a function: validate, quantize, optimize, compress, measure, emit.

    report = package(Path("model.onnx"), Path("out/iris/1"), PackageOptions(name="iris", version="1"))
    print(report.table())

Everything is built in a folder beside ``out_dir`` and renamed into place at the end: a
failure (or Ctrl-C) leaves no package behind, and a previous package at ``out_dir`` stays
whole until the new one replaces it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tierserve import __version__
from tierserve.catalog import DEFAULT_LAMBDA_MAX_MODEL_MB, MB, Manifest, TensorSpec, tier_for
from tierserve.drift.baseline import Baseline, BaselineError, build_baseline, read_baseline_rows
from tierserve.tools.packaging import _accuracy as accuracy
from tierserve.tools.packaging._artifact import (
    DEFAULT_COMPRESS_BUDGET_S,
    DEFAULT_TARGET_MB_S,
    GZIP_LEVEL,
    CompressionChoice,
    LevelChoice,
    PackagedModel,
    choose_compression,
    choose_zstd_level,
    install_dir,
    sha256_file,
    signature_of,
    size_text,
    staging_dir_for,
    write_baseline,
    write_manifest,
    write_package,
)
from tierserve.tools.packaging._errors import AccuracyOutOfBudget, InvalidModel, PackagingError
from tierserve.tools.packaging._feeds import first_row, generate_inputs, load_calibration, row_count
from tierserve.tools.packaging._transform import optimize, quantize
from tierserve.tools.packaging._validate import check_model

UNSET: Any = object()


@dataclass(frozen=True)
class PackageOptions:
    """What ``tierserve package`` takes; every field has the command line's default."""

    name: str
    version: str
    quantization: str = "none"
    calibration: Path | None = None
    inputs: Path | None = None
    per_channel: bool | None = None
    optimize: bool = True
    model_format: str = "onnx"
    compression: str = "auto"
    zstd_level: int | None = None
    compress_budget_s: float = DEFAULT_COMPRESS_BUDGET_S
    target_mb_s: float = DEFAULT_TARGET_MB_S
    tier: str | None = None
    lambda_max_model_mb: float = DEFAULT_LAMBDA_MAX_MODEL_MB
    max_abs_diff: float | None = UNSET
    min_top1: float = accuracy.DEFAULT_MIN_TOP1
    min_cosine: float = accuracy.DEFAULT_MIN_COSINE
    force: bool = False
    rows: int | None = None
    threads: int = 1
    seed: int = 0
    baseline: Path | None = None  # rows for the drift baseline; default: --inputs or --calibration


@dataclass(frozen=True)
class PackageReport:
    """What was built and what it costs, for the table and the benchmarks."""

    packaged: PackagedModel
    source_bytes: int
    tier: str
    before: accuracy.Timing
    after: accuracy.Timing
    accuracy: Mapping[str, Any]
    level: LevelChoice | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    compression_choice: CompressionChoice | None = None

    @property
    def manifest(self) -> Manifest:
        return self.packaged.manifest

    @property
    def stored_ratio(self) -> float:
        return self.manifest.stored.bytes / self.source_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.manifest.name,
            "version": self.manifest.version,
            "quantization": self.manifest.quantization,
            "format": self.manifest.format,
            "compression": self.manifest.compression,
            "zstd_level": self.level.level if self.level else None,
            "tier": self.tier,
            "source_bytes": self.source_bytes,
            "model_bytes": self.manifest.model.bytes,
            "stored_bytes": self.manifest.stored.bytes,
            "stored_ratio": round(self.stored_ratio, 4),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "accuracy": dict(self.accuracy),
            "notes": list(self.notes),
            "compression_choice": self.compression_choice.to_dict() if self.compression_choice else None,
        }

    def table(self) -> str:
        """The report ``tierserve package`` prints (see docs/packaging.md for its meaning)."""
        m = self.manifest
        level = f" level {self.level.level}" if self.level else ""
        rows = [
            ("", "original", "packaged"),
            (
                "model size",
                size_text(self.source_bytes),
                f"{size_text(m.model.bytes)} ({m.format}, {m.quantization})",
            ),
            (
                "stored size",
                size_text(self.source_bytes),
                f"{size_text(m.stored.bytes)} ({m.compression}{level})",
            ),
            ("stored / original", "", f"{self.stored_ratio:.3f}  ({1 / self.stored_ratio:.1f}x smaller)"),
            ("session load", f"{self.before.load_ms:,.1f} ms", f"{self.after.load_ms:,.1f} ms"),
            ("batch-1 latency", f"{self.before.latency_ms:,.3f} ms", f"{self.after.latency_ms:,.3f} ms"),
        ]
        width = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{m.name}@{m.version} -> tier {self.tier}" + (" (override)" if m.tier else " (by size)")]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)).rstrip() for r in rows]
        lines.append(f"accuracy on {self.accuracy['inputs']}:")
        for name, metrics in self.accuracy["outputs"].items():
            lines.append(f"  {name}: {_describe_metrics(metrics)}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def package(
    source: Path,
    out_dir: Path,
    options: PackageOptions,
    say: Callable[[str], None] = lambda _: None,
) -> PackageReport:
    """Build ``out_dir/{artifact, manifest.json}`` from ``source``; see the module docstring.

    Raises:
        PackagingError and its subclasses: the one-line reason and what to do.
    """
    out_dir = Path(out_dir)
    staging = staging_dir_for(out_dir)
    work = staging / ".work"
    work.mkdir()
    try:
        report = _build(Path(source), staging, work, options, say)
        shutil.rmtree(work)
        install_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    packaged = PackagedModel(report.manifest, out_dir / report.manifest.artifact)
    return replace(report, packaged=packaged)


def _build(
    source: Path, staging: Path, work: Path, options: PackageOptions, say: Callable[[str], None]
) -> PackageReport:
    from tierserve.model import ort  # onnxruntime, its telemetry off

    notes: list[str] = []
    say(f"checking {source}")
    validated = check_model(source, work)
    notes += validated.notes
    try:
        inputs, outputs = signature_of(validated.path)
    except Exception as error:  # onnxruntime's own exception family
        raise InvalidModel(
            f"onnxruntime {ort.__version__} cannot load {source} ({_first_line(error)}): check the exporter's "
            "opset and ops, or upgrade onnxruntime"
        ) from None
    if options.calibration is not None and options.quantization != "int8":
        raise PackagingError(
            "--calibration calibrates static int8: add --quantization int8, or pass the rows as --inputs "
            "to measure accuracy on them"
        )
    calibration = load_calibration(options.calibration, inputs) if options.calibration is not None else None
    if options.inputs is not None:
        feeds = load_calibration(options.inputs, inputs)
        described_inputs = f"{row_count(feeds)} rows from {options.inputs.name}"
    elif calibration is not None and options.calibration is not None:
        feeds = calibration
        described_inputs = f"{row_count(feeds)} calibration rows from {options.calibration.name}"
    else:
        feeds = generate_inputs(inputs, options.rows, options.seed)
        described_inputs = f"{row_count(feeds)} generated rows (seed {options.seed})"

    baseline = _drift_baseline(
        options, inputs, feeds if options.inputs or calibration is not None else None, described_inputs
    )
    if baseline is None:
        notes.append(
            "no drift baseline: generated rows say nothing about real inputs; pass --inputs or --baseline "
            "FILE (real inputs) for `tierserve drift`"
        )

    say(f"measuring the original on {described_inputs}")
    one_row = first_row(feeds, inputs)
    before, reference = _measure_original(validated.path, options.threads, feeds, inputs, one_row)

    say(f"quantization: {options.quantization}")
    if options.quantization == "int8" and options.per_channel is None:
        quantized, label, per_channel = _more_accurate_int8(
            validated, work, inputs, outputs, calibration, feeds, reference, say
        )
    else:
        quantized, label = quantize(
            validated,
            options.quantization,
            work,
            inputs=inputs,
            calibration=calibration,
            per_channel=bool(options.per_channel),
        )
        per_channel = bool(options.per_channel) if options.quantization == "int8" else None
    tier = options.tier or _tier_by_size(quantized, options.lambda_max_model_mb)
    notes += _tier_notes(label, tier)
    if options.model_format == "ort" and tier != "lambda":
        raise PackagingError(
            "--format ort is for the CPU (lambda) tier: the GPU server optimizes for its own execution "
            "provider at load; drop --format ort or pass --tier lambda"
        )
    optimized = options.optimize and tier == "lambda"
    if optimized or options.model_format == "ort":
        say(
            "optimizing offline for onnxruntime's CPU provider"
            + (" (ORT format)" if options.model_format == "ort" else "")
        )
        final = optimize(quantized, work, ort_format=options.model_format == "ort")
        optimized = True
    else:
        final = quantized
        if options.optimize and tier != "lambda":
            notes.append(
                "not optimized offline: the GPU tier optimizes at load for its own execution provider"
            )
    _check_signature(final, inputs, outputs)

    level = None
    compression = options.compression
    choice = None
    if compression == "auto":
        say(f"measuring whether zstd pays at {options.target_mb_s:g} MB/s")
        choice = choose_compression(final, options.target_mb_s, options.compress_budget_s, options.zstd_level)
        compression = choice.compression
        notes.append(choice.describe())
    if compression == "zstd":
        if options.zstd_level is not None:
            level = LevelChoice(options.zstd_level)
        elif choice is not None and choice.level is not None:
            level = LevelChoice(choice.level)
        else:
            level = choose_zstd_level(final, options.compress_budget_s)
        say(f"compressing with zstd level {level.level}")
    packaged = write_package(
        final,
        staging,
        name=options.name,
        version=options.version,
        compression=compression,
        level=level.level if level else GZIP_LEVEL,
        tier=options.tier,
        quantization=label,
        optimized=optimized,
        extra={
            "packaged_by": f"tierserve {__version__}",
            "onnxruntime": ort.__version__,
            "source_sha256": sha256_file(validated.source),
            "source_bytes": _source_bytes(validated),
            "opset": validated.opset,
            **(
                {"int8_scales": "per-channel" if per_channel else "per-tensor"}
                if per_channel is not None
                else {}
            ),
            **({"zstd_level": level.level} if level else {}),
            **({"compression_choice": choice.to_dict()} if choice else {}),
            **({"baseline": write_baseline(staging, baseline)} if baseline else {}),
        },
    )

    say(f"measuring the package on {described_inputs}")
    after, candidate_session = accuracy.time_model(
        lambda: _candidate_session(final, packaged.manifest, options.threads), one_row
    )
    candidate = accuracy.collect(lambda f: candidate_session.run(None, dict(f)), feeds, inputs)
    per_output = accuracy.compare(reference, candidate, outputs)
    budget = (
        accuracy.Budget.default_for(label)
        if options.max_abs_diff is UNSET
        else accuracy.Budget(max_abs_diff=options.max_abs_diff)
    )
    budget = replace(budget, min_top1=options.min_top1, min_cosine=options.min_cosine)
    problems = accuracy.violations(per_output, budget)
    measured: dict[str, Any] = {
        "inputs": described_inputs,
        "rows": row_count(feeds),
        "outputs": per_output,
        **accuracy.summary(per_output),
        "budget": budget.to_dict(),
        "within_budget": not problems,
    }
    if problems and not options.force:
        raise AccuracyOutOfBudget(
            f"{options.name}@{options.version} ({label}) is outside the accuracy budget: {'; '.join(problems)}. "
            "Try --quantization none, int8 with --calibration FILE.npz, a looser budget "
            "(--max-abs-diff/--min-top1/--min-cosine), or --force"
        )
    if problems:
        measured["forced"] = True
        notes.append("packaged with --force outside the accuracy budget: " + "; ".join(problems))
    if after.latency_ms > 1.5 * before.latency_ms and label.startswith("int8"):
        notes.append(
            f"{label} runs slower than the original here ({after.latency_ms:.3g} ms vs {before.latency_ms:.3g} ms): "
            "dynamic int8 suits MatMul-heavy models (transformers, MLPs); for conv nets try --calibration "
            "(static int8) or --quantization none"
        )
    packaged = PackagedModel(replace(packaged.manifest, accuracy=measured), packaged.artifact)
    write_manifest(packaged)
    return PackageReport(
        packaged,
        source_bytes=_source_bytes(validated),
        tier=tier_for(packaged.manifest, options.lambda_max_model_mb),
        before=before,
        after=after,
        accuracy=measured,
        level=level,
        notes=tuple(notes),
        compression_choice=choice,
    )


def _drift_baseline(
    options: PackageOptions, inputs: tuple[TensorSpec, ...], feeds: Mapping[str, Any] | None, described: str
) -> Baseline | None:
    """Each input's quantile bins, from ``--baseline`` or else the real rows accuracy is checked on."""
    try:
        if options.baseline is not None:
            rows = read_baseline_rows(options.baseline, inputs)
            return build_baseline(options.name, options.version, inputs, rows, source=options.baseline.name)
        if feeds is None:
            return None
        return build_baseline(options.name, options.version, inputs, feeds, source=described)
    except BaselineError as error:
        raise PackagingError(f"drift baseline: {error}") from None


def _measure_original(
    path: Path, threads: int, feeds: Any, inputs: tuple[TensorSpec, ...], one_row: Any
) -> tuple[accuracy.Timing, list[Any]]:
    """Load time, batch-1 latency and every output of the original (its session is then freed)."""
    timing, session = accuracy.time_model(lambda: _reference_session(path, threads), one_row)
    return timing, accuracy.collect(lambda f: session.run(None, dict(f)), feeds, inputs)


def _more_accurate_int8(
    validated: Any,
    work: Path,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    calibration: Any,
    feeds: Any,
    reference: list[Any],
    say: Callable[[str], None],
) -> tuple[Path, str, bool]:
    """Quantize with one scale per tensor and with one per output channel; keep the more accurate.

    Neither wins everywhere: per-channel scales rescue weights whose channels differ in range
    (transformers), per-tensor ones are as good or better elsewhere and a little smaller.
    A tie goes to per-tensor.
    """
    best: tuple[tuple[float, float], Path, str, bool] | None = None
    for per_channel in (False, True):
        folder = work / ("per-channel" if per_channel else "per-tensor")
        folder.mkdir()
        path, label = quantize(
            validated, "int8", folder, inputs=inputs, calibration=calibration, per_channel=per_channel
        )
        session = _reference_session(path, 1)
        candidate = accuracy.collect(lambda f, s=session: s.run(None, dict(f)), feeds, inputs)
        score = accuracy.score(accuracy.compare(reference, candidate, outputs))
        say(f"int8 with {folder.name} scales: worst agreement {score[0]:.5f}, worst cosine {score[1]:.5f}")
        if best is None or score > best[0]:
            best = (score, path, label, per_channel)
    assert best is not None
    return best[1], best[2], best[3]


def _tier_by_size(model: Path, lambda_max_model_mb: float) -> str:
    return "lambda" if model.stat().st_size <= lambda_max_model_mb * MB else "gpu"


def _tier_notes(label: str, tier: str) -> list[str]:
    if label == "fp16" and tier == "lambda":
        return [
            "fp16 on the CPU (lambda) tier: onnxruntime's CPU kernels mostly lack fp16 and add casts; "
            "int8 is the CPU choice, fp16 the GPU one"
        ]
    if label.startswith("int8") and tier == "gpu":
        return ["int8 on the GPU tier: CUDA kernels for dynamic int8 are few; fp16 is usually faster there"]
    return []


def _check_signature(model: Path, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
    new_inputs, new_outputs = signature_of(model)

    def names(specs: tuple[TensorSpec, ...]) -> list[tuple[str, str]]:
        return [(s.name, s.datatype) for s in specs]

    if names(new_inputs) != names(inputs) or names(new_outputs) != names(outputs):
        raise PackagingError(
            "the packaged model's inputs or outputs differ from the original's "
            f"({names(new_inputs)} -> {names(new_outputs)}): package it with --quantization none"
        )


def _reference_session(path: Path, threads: int) -> Any:
    """The original as an unpackaged deployment would open it: all optimizations at load."""
    from tierserve.model import ort  # onnxruntime, its telemetry off

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _candidate_session(path: Path, manifest: Manifest, threads: int) -> Any:
    """The packaged model exactly as the serving core opens it."""
    from tierserve.model import create_session

    return create_session(path, manifest, threads=threads)


def _source_bytes(validated: Any) -> int:
    return validated.source.stat().st_size + sum(p.stat().st_size for p in validated.external_files)


def _describe_metrics(metrics: Mapping[str, Any]) -> str:
    parts = []
    if "top1" in metrics:
        parts.append(f"top-1 agreement {metrics['top1']:.2%}")
    if "agreement" in metrics:
        parts.append(f"label agreement {metrics['agreement']:.2%}")
    if "cosine" in metrics:
        parts.append(f"cosine {metrics['cosine']:.5f} (min {metrics['cosine_min']:.5f})")
    if "max_abs_diff" in metrics:
        parts.append(
            f"max |diff| {metrics['max_abs_diff']:.3g}, mean rel diff {metrics['mean_rel_diff']:.3g}"
        )
    if "problem" in metrics:
        parts.append(str(metrics["problem"]))
    return "; ".join(parts)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


__all__ = ["PackageOptions", "PackageReport", "package"]
