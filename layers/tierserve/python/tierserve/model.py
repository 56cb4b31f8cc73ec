"""The model interface every tier implements, and its onnxruntime implementation.

A model answers ``metadata``, ``ready`` and ``predict``; the SageMaker client (GPU tier,
seen from the worker) is another implementation, never a branch inside a handler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from tierserve.catalog import Manifest
from tierserve.errors import BadRequest, ModelUnavailable
from tierserve.protocol import model_metadata

CPU_PROVIDERS = ("CPUExecutionProvider",)

# An execution provider as onnxruntime takes it: a name, or (name, options) as the GPU server
# passes TensorRT and CUDA (tierserve.providers).
ProviderSpec = str | tuple[str, dict[str, Any]]


class Model(Protocol):
    manifest: Manifest

    def metadata(self) -> dict[str, Any]: ...

    def ready(self) -> bool: ...

    def predict(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class LoadTimings:
    fetch_ms: float
    decompress_ms: float
    session_ms: float
    cache_hit: bool


def session_options(manifest: Manifest, threads: int) -> ort.SessionOptions:
    """Options for one model: threads from the function's memory, not the host's cores."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # A model packaged with offline optimization needs none at load: skip it for a faster cold start.
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if manifest.optimized
        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    options.log_severity_level = 3
    if manifest.format == "ort":
        options.add_session_config_entry("session.load_model_format", "ORT")
    return options


def create_session(
    path: Path, manifest: Manifest, *, threads: int, providers: Sequence[ProviderSpec] = CPU_PROVIDERS
) -> ort.InferenceSession:
    """Open an onnxruntime session for a verified model file.

    ORT-format models are read by onnxruntime into one buffer that the session keeps and
    uses for its initializers (``use_ort_model_bytes_for_initializers``): no second copy of
    the weights. The path, never Python bytes: pybind copies bytes into a temporary that is
    gone once the call returns, and initializers pointing into it read freed memory.
    """
    options = session_options(manifest, threads)
    try:
        if manifest.format == "ort":
            options.add_session_config_entry("session.use_ort_model_bytes_for_initializers", "1")
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph/... family
        raise ModelUnavailable(
            f"onnxruntime cannot load {manifest.name}@{manifest.version} ({type(error).__name__}): "
            "check the model with `tierserve package` (onnx checker) and re-upload it"
        ) from None


class OnnxModel:
    """A loaded onnxruntime session behind the model interface."""

    def __init__(self, manifest: Manifest, session: ort.InferenceSession, timings: LoadTimings) -> None:
        self.manifest = manifest
        self.session = session
        self.timings = timings
        self.providers = tuple(session.get_providers())
        self._output_names = [o.name for o in session.get_outputs()]

    def metadata(self) -> dict[str, Any]:
        return model_metadata(self.manifest, execution_providers=list(self.providers))

    def ready(self) -> bool:
        return True

    def predict(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        names = list(output_names) if output_names else self._output_names
        try:
            results = self.session.run(names, dict(inputs))
        except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ValueError) as error:
            first_line = str(error).splitlines()[0][:300]
            raise BadRequest(f"the model rejected the input: {first_line}") from None
        return dict(zip(names, results, strict=True))


# How a registry turns a new session into the model it serves: ``OnnxModel`` by default; the
# GPU server adds IO binding and dynamic batching (tierserve.providers, tierserve.batching).
ModelFactory = Callable[[Manifest, ort.InferenceSession, LoadTimings], Model]
