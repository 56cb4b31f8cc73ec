"""The model interface every tier implements, and its onnxruntime implementation.

Importing this module turns onnxruntime's telemetry off (``disable_telemetry_events``); every
entry point imports it before creating a session.

A model answers ``metadata``, ``ready`` and ``predict``; the SageMaker client (GPU tier,
seen from the worker) is another implementation, never a branch inside a handler.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from tierserve.catalog import Manifest, TensorSpec
from tierserve.errors import ArtifactRejected, BadRequest
from tierserve.onnx_layout import GRAPH_FILE, WEIGHTS_FILE, NotOnnx, write_graph
from tierserve.protocol import ONNX_TO_DATATYPE, model_metadata

# The one place tierserve imports onnxruntime before using it: the Lambda handlers, the GPU
# server, the worker, the local stack and the command line all come through here (the packager
# imports ``ort`` from this module), so no process of ours sends telemetry events.
ort.disable_telemetry_events()

CPU_PROVIDERS = ("CPUExecutionProvider",)
RUN_ERROR_LIMIT = 300  # characters of onnxruntime's message a client sees
SIGNATURE_PROBLEMS_SHOWN = 5

# "... while running GatherElements node. Name:'g' Status Message: <what went wrong>"
_NODE_FAILURE = re.compile(r"while running (\w+) node\. Name:'([^']*)' Status Message: (.*)", re.DOTALL)
# Faults of the machine, not of the input: a GPU, its libraries, memory. They stay 500s.
_DEVICE_FAULT = re.compile(
    r"cuda|cudnn|cublas|curand|cufft|tensorrt|nvinfer|\bgpu\b|out of memory|alloc", re.IGNORECASE
)
# "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : " (session.run), "Error in execution: " (IO binding)
_ORT_PREFIX = re.compile(r"^(?:\[ONNXRuntimeError\] : \d+ : \w+ : |Error in execution: )")
# "/onnxruntime_src/onnxruntime/core/providers/cpu/tensor/gather_elements.cc:150 "
_SOURCE_LOCATION = re.compile(r"^\S+\.(?:cc|cpp|cu|h):\d+ ")

# An execution provider as onnxruntime takes it: a name, or (name, options) as the GPU server
# passes TensorRT and CUDA (tierserve.execution_providers).
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
    artifact_gets: int = 0


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
    path: Path,
    manifest: Manifest,
    *,
    threads: int,
    providers: Sequence[ProviderSpec] = CPU_PROVIDERS,
    map_weights: bool = True,
) -> ort.InferenceSession:
    """Open an onnxruntime session for a verified model file, the fastest way measured.

    An ``.onnx`` model is opened in the loader's own layout (:mod:`tierserve.onnx_layout`): a
    small graph file beside it whose large weights are references into the verified file, which
    onnxruntime memory-maps instead of copying every initializer out of the protobuf (about
    half the session time of a 100 MB model: bench/README.md). ``map_weights`` false (the file
    will not stay on disk) opens the file itself, so the session holds its own copy.

    ORT-format models are read by onnxruntime into one buffer that the session keeps and
    uses for its initializers (``use_ort_model_bytes_for_initializers``): no second copy of
    the weights. The path, never Python bytes: pybind copies bytes into a temporary that is
    gone once the call returns, and initializers pointing into it read freed memory.

    Raises:
        ArtifactRejected: onnxruntime cannot open the file (not a model, an operator or opset
            it lacks), the model declares external data of its own, or the session's inputs or
            outputs are not the manifest's (:func:`check_signature`).
    """
    options = session_options(manifest, threads)
    model_file = _mapped_form(path, manifest) if map_weights else path
    try:
        if manifest.format == "ort":
            options.add_session_config_entry("session.use_ort_model_bytes_for_initializers", "1")
        session = ort.InferenceSession(str(model_file), options, providers=list(providers))
    except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph/... family
        raise ArtifactRejected(
            f"onnxruntime cannot load {manifest.name}@{manifest.version} ({type(error).__name__}): "
            "check the model with `tierserve package` (onnx checker) and re-upload it"
        ) from None
    check_signature(manifest, session)
    return session


def _mapped_form(path: Path, manifest: Manifest) -> Path:
    """The file to open: the loader's graph file beside ``path`` (written on first use), or
    ``path`` itself when the layout does not apply (ORT format, nothing large to map, or bytes
    this cannot read: onnxruntime then says what is wrong with them)."""
    if manifest.format != "onnx" or path.name != WEIGHTS_FILE:
        return path
    graph = path.with_name(GRAPH_FILE)
    if graph.exists():
        return graph
    try:
        moved = write_graph(path, graph, f"{manifest.name}@{manifest.version}")
    except NotOnnx:
        return path
    if not moved:
        graph.unlink()
        return path
    return graph


def check_signature(manifest: Manifest, session: ort.InferenceSession) -> None:
    """Refuse a session whose inputs or outputs are not what the manifest declares: the same
    names, datatypes and ranks, and no fixed dimension that differs. A manifest that promises
    another signature would have every request refused as the client's fault.

    Raises:
        ArtifactRejected: naming each mismatch (the first few) and the fix.
    """
    problems = [
        *_mismatches("input", manifest.inputs, session.get_inputs()),
        *_mismatches("output", manifest.outputs, session.get_outputs()),
    ]
    if problems:
        shown = "; ".join(problems[:SIGNATURE_PROBLEMS_SHOWN])
        more = (
            f"; and {len(problems) - SIGNATURE_PROBLEMS_SHOWN} more"
            if len(problems) > SIGNATURE_PROBLEMS_SHOWN
            else ""
        )
        raise ArtifactRejected(
            f"{manifest.name}@{manifest.version}: its manifest does not match the model: {shown}{more}. "
            "Package the model again (tierserve package writes the signature from the model) and upload "
            "it as a new version"
        )


def _mismatches(kind: str, declared: Sequence[TensorSpec], actual: Sequence[Any]) -> list[str]:
    """How the manifest's ``declared`` tensors differ from the session's ``actual`` ones."""
    found = {arg.name: arg for arg in actual}
    problems = [
        f"{kind} {reprlib.repr(spec.name)} is in the manifest, not in the model"
        for spec in declared
        if spec.name not in found
    ]
    names = {spec.name for spec in declared}
    problems += [
        f"the model's {kind} {reprlib.repr(name)} is not in the manifest"
        for name in found
        if name not in names
    ]
    for spec in declared:
        arg = found.get(spec.name)
        if arg is None:
            continue
        datatype = ONNX_TO_DATATYPE.get(arg.type, arg.type)
        if datatype != spec.datatype:
            problems.append(
                f"{kind} {reprlib.repr(spec.name)} is {datatype} in the model, {spec.datatype} in the manifest"
            )
        dims = list(arg.shape or [])
        if len(dims) != len(spec.shape):
            problems.append(
                f"{kind} {reprlib.repr(spec.name)} has rank {len(dims)} in the model, {len(spec.shape)} in the manifest"
            )
            continue
        for axis, (have, want) in enumerate(zip(dims, spec.shape, strict=True)):
            if isinstance(have, int) and have >= 0 and want >= 0 and have != want:
                problems.append(
                    f"{kind} {reprlib.repr(spec.name)} has dimension {axis} of {have} in the model, "
                    f"{want} in the manifest"
                )
    return problems


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
        with run_errors_translated():
            results = self.session.run(names, dict(inputs))
        return dict(zip(names, results, strict=True))


@contextmanager
def run_errors_translated() -> Iterator[None]:
    """Around a model run: a failure the input caused becomes its :class:`BadRequest`
    (:func:`translate_run_error`); any other propagates as it is."""
    try:
        yield
    except Exception as error:
        client_error = translate_run_error(error)
        if client_error is None:
            raise
        raise client_error from None


def translate_run_error(error: BaseException) -> BadRequest | None:
    """The client's error for an onnxruntime failure while running a model, or None when the
    failure is the server's (a GPU, its libraries, memory, anything unrecognised): the caller
    re-raises those, and they become a 500 that is logged and leaks nothing.

    - ``InvalidArgument`` and ``ValueError`` (a wrong name, type or shape):
      "the model rejected the input: ...";
    - a failure that names the node it happened in (``Fail``, ``RuntimeException``, or the
      ``RuntimeError`` of IO binding), e.g. an out-of-range ``GatherElements`` index:
      "the model failed on this input: ...".

    Both quote onnxruntime's message without its source locations, first line only, bounded.
    """
    message = str(error)
    if isinstance(error, ort.capi.onnxruntime_pybind11_state.InvalidArgument | ValueError):
        return BadRequest(f"the model rejected the input: {_run_error_detail(message)}")
    if _DEVICE_FAULT.search(message):
        return None
    if _NODE_FAILURE.search(message):
        return BadRequest(
            f"the model failed on this input: {_run_error_detail(message)}; "
            "check the values are in the range the model expects (indices, sizes)"
        )
    return None


def _run_error_detail(message: str) -> str:
    found = _NODE_FAILURE.search(message)
    if found is None:
        detail = _ORT_PREFIX.sub("", message.strip())
    else:
        op, name, status = found.groups()
        where = f"{op} node {name!r}" if name else f"{op} node"
        detail = f"{where}: {_without_source_location(status.strip())}"
    first_line = detail.splitlines()[0] if detail else "no detail"
    return first_line if len(first_line) <= RUN_ERROR_LIMIT else first_line[: RUN_ERROR_LIMIT - 3] + "..."


def _without_source_location(status: str) -> str:
    """``status`` without the ``file.cc:123 <C++ signature>`` prefix an ``ORT_ENFORCE`` adds."""
    found = _SOURCE_LOCATION.match(status)
    if found is None:
        return status
    rest, depth, bracketed = status[found.end() :], 0, False
    for index, char in enumerate(rest):
        if char in "([":
            depth, bracketed = depth + 1, True
        elif char in ")]":
            depth -= 1
        elif char == " " and depth == 0 and bracketed and not rest.startswith(("[with", "const"), index + 1):
            return rest[index + 1 :]
    return rest


# How a registry turns a new session into the model it serves: ``OnnxModel`` by default; the
# GPU server adds IO binding and dynamic batching (tierserve.execution_providers, tierserve.batching).
ModelFactory = Callable[[Manifest, ort.InferenceSession, LoadTimings], Model]
