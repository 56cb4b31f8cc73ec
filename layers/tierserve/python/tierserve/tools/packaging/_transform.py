"""Quantize and optimize a validated model.

    quantize(validated, "int8", workdir)                    -> dynamic int8 (weights int8, CPU)
    quantize(validated, "int8", workdir, calibration=feeds) -> static int8 (QDQ, calibrated)
    quantize(validated, "fp16", workdir)                    -> float16 weights and compute (GPU)
    optimize(model, workdir, ort_format=True)               -> offline-optimized ORT format

Each result is opened with onnxruntime before it is returned: a quantization that leaves a
model onnxruntime cannot run, or that changes nothing, is refused with the reason.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from tierserve.catalog import TensorSpec
from tierserve.tools.packaging._errors import QuantizationUnsupported
from tierserve.tools.packaging._feeds import iter_batches
from tierserve.tools.packaging._validate import ValidatedModel

QUANTIZATIONS = ("none", "int8", "fp16")
# Ops whose presence proves that a quantizer did something.
QUANTIZED_OP_MARKERS = ("Quantize", "Integer", "QLinear", "QAttention", "QGemm")


def quantize(
    validated: ValidatedModel,
    quantization: str,
    workdir: Path,
    *,
    inputs: Sequence[TensorSpec] = (),
    calibration: Mapping[str, np.ndarray] | None = None,
    per_channel: bool = False,
) -> tuple[Path, str]:
    """Apply ``quantization`` (``none``, ``int8``, ``fp16``); returns the model and its manifest label.

    Labels: ``none``, ``int8-dynamic``, ``int8-static`` (with ``calibration``), ``fp16``.

    Raises:
        QuantizationUnsupported: the quantizer failed, changed nothing, or left a model that
            onnxruntime cannot run.
    """
    import tierserve.model  # noqa: F401  (onnxruntime's telemetry off before its quantizers load)

    if quantization == "none":
        return validated.path, "none"
    if quantization == "int8" and calibration is not None:
        target, label = workdir / "quantized.onnx", "int8-static"
        _run(label, validated, lambda: _int8_static(validated.path, target, inputs, calibration, per_channel))
    elif quantization == "int8":
        target, label = workdir / "quantized.onnx", "int8-dynamic"
        _run(label, validated, lambda: _int8_dynamic(validated.path, target, per_channel))
    elif quantization == "fp16":
        target, label = workdir / "quantized.onnx", "fp16"
        _run(label, validated, lambda: _fp16(validated.path, target))
    else:
        raise QuantizationUnsupported(
            f"quantization {quantization!r} must be one of {', '.join(QUANTIZATIONS)}"
        )
    _check_changed(target, label, validated)
    _check_loads(target, label)
    return target, label


def _run(label: str, validated: ValidatedModel, work: object) -> None:
    try:
        with _quiet():
            work()  # type: ignore[operator]
    except QuantizationUnsupported:
        raise
    except Exception as error:  # the quantizers raise anything from ValueError to onnx's C++ errors
        raise QuantizationUnsupported(
            f"{label} quantization failed on this model ({_first_line(error)}); its ops: {validated.describe_ops()}. "
            "Package it with --quantization none (or try another quantization)"
        ) from None


def _int8_dynamic(source: Path, target: Path, per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=per_channel)


class _Reader:
    """Calibration batches for onnxruntime's static quantizer."""

    def __init__(self, feeds: Mapping[str, np.ndarray], inputs: Sequence[TensorSpec]) -> None:
        self._batches = iter(list(iter_batches(feeds, inputs)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _int8_static(
    source: Path,
    target: Path,
    inputs: Sequence[TensorSpec],
    calibration: Mapping[str, np.ndarray],
    per_channel: bool,
) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    reader = _Reader(calibration, inputs)
    CalibrationDataReader.register(_Reader)
    quantize_static(
        source,
        target,
        reader,  # type: ignore[arg-type]
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
    )


def _fp16(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # onnxruntime ships onnxconverter-common's converter; inputs and outputs stay float32 so
    # clients and the signature do not change, and ops without float16 kernels stay float32.
    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(target))


def _check_changed(target: Path, label: str, validated: ValidatedModel) -> None:
    import onnx

    model = onnx.load(str(target))
    if label.startswith("int8"):
        changed = any(marker in node.op_type for node in model.graph.node for marker in QUANTIZED_OP_MARKERS)
    else:
        changed = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    if not changed:
        raise QuantizationUnsupported(
            f"{label} quantization changed nothing: none of this model's ops can be quantized that way "
            f"({validated.describe_ops()}). Package it with --quantization none"
        )


def _check_loads(target: Path, label: str) -> None:
    from tierserve.model import ort  # onnxruntime, its telemetry off

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's Fail/NotImplemented/InvalidGraph family
        raise QuantizationUnsupported(
            f"onnxruntime cannot run the {label} model ({_first_line(error)}): an op has no {label} kernel. "
            "Package it with --quantization none"
        ) from None


def optimize(source: Path, workdir: Path, *, ort_format: bool = False) -> Path:
    """Offline graph optimization for the CPU execution provider.

    ``ORT_ENABLE_EXTENDED``: constant folding, redundant-node removal and CPU fusions (e.g.
    MatMul+Add, dynamic-quantized MatMul). Layout optimizations (``ORT_ENABLE_ALL``) are left
    out: they depend on the host's instruction set, and the packaging host is not the Lambda
    host. The loader then skips optimization (``manifest.optimized``).
    """
    from tierserve.model import ort  # onnxruntime, its telemetry off

    target = workdir / ("optimized.ort" if ort_format else "optimized.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    if ort_format:
        options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return target


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizers log advice on the root logger; the report says what matters."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]
