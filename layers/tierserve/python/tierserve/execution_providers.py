"""Execution providers for the GPU server: TensorRT, then CUDA, then CPU, as far as this
machine has them, and the model that uses IO binding where a GPU runs the session.

    choose_providers(ProviderConfig())  # on a GPU image with TensorRT:
    [("TensorrtExecutionProvider", {...fp16, engine cache...}),
     ("CUDAExecutionProvider", {...}),
     "CPUExecutionProvider"]

onnxruntime assigns each graph node to the first provider in the list that supports it, so
CPU is always last: a node neither GPU provider runs still runs. What a session really got
is ``session.get_providers()``; the server logs it and reports it in the model metadata
(``parameters.execution_providers``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tierserve.catalog import Manifest
from tierserve.model import (
    LoadTimings,
    Model,
    ModelFactory,
    OnnxModel,
    ProviderSpec,
    run_errors_translated,
)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PREFERENCE: tuple[str, ...] = (TENSORRT, CUDA, CPU)
GPU_PROVIDERS = frozenset({TENSORRT, CUDA})
# Short names accepted in TIERSERVE_PROVIDERS, e.g. "cuda,cpu".
ALIASES = {"tensorrt": TENSORRT, "trt": TENSORRT, "cuda": CUDA, "cpu": CPU}
DEFAULT_TRT_CACHE_DIR = "/tmp/tierserve/trt-engines"
IO_BINDING_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class ProviderConfig:
    """Which providers to try and how to configure them.

    ``requested`` None means automatic (TensorRT, CUDA, CPU); otherwise the providers to try,
    in order (full names or the aliases in :data:`ALIASES`).
    """

    requested: tuple[str, ...] | None = None
    trt_fp16: bool = True
    trt_cache_dir: Path = field(default_factory=lambda: Path(DEFAULT_TRT_CACHE_DIR))
    device_id: int = 0

    @staticmethod
    def parse_requested(text: str) -> tuple[str, ...] | None:
        """``"auto"`` or empty -> None; ``"cuda,cpu"`` -> the full provider names.

        Raises:
            ValueError: a name that is neither a provider nor an alias.
        """
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts or parts == ["auto"]:
            return None
        names = []
        for part in parts:
            name = ALIASES.get(part.lower(), part)
            if name not in PREFERENCE:
                raise ValueError(
                    f"execution provider {part!r} is not one of {list(ALIASES)} or {list(PREFERENCE)}"
                )
            names.append(name)
        return tuple(names)


def choose_providers(config: ProviderConfig, available: Sequence[str] | None = None) -> list[ProviderSpec]:
    """The providers to open sessions with: the wanted ones this build of onnxruntime has,
    in preference order, each with its options, and CPU last in every case."""
    available = list(ort.get_available_providers() if available is None else available)
    wanted = config.requested or PREFERENCE
    chosen = [name for name in wanted if name in available and name != CPU]
    return [_with_options(name, config) for name in chosen] + [CPU]


def missing_providers(config: ProviderConfig, available: Sequence[str] | None = None) -> list[str]:
    """Providers explicitly asked for that this onnxruntime build lacks (worth a warning)."""
    available = list(ort.get_available_providers() if available is None else available)
    return [name for name in config.requested or () if name not in available]


def provider_names(providers: Sequence[ProviderSpec]) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


def runs_on_gpu(session_providers: Sequence[str]) -> bool:
    """True when a GPU provider leads the session's providers (it runs the graph's nodes)."""
    return bool(session_providers) and session_providers[0] in GPU_PROVIDERS


def _with_options(name: str, config: ProviderConfig) -> ProviderSpec:
    if name == TENSORRT:
        cache = str(config.trt_cache_dir)
        # Engines and timing caches survive a session restart in the same container, so a
        # model reloaded after eviction skips the minutes-long engine build.
        return (
            TENSORRT,
            {
                "device_id": config.device_id,
                "trt_fp16_enable": config.trt_fp16,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": cache,
            },
        )
    if name == CUDA:
        return (
            CUDA,
            {
                "device_id": config.device_id,
                # Grow the memory arena by what is asked, not to the next power of two: batches
                # of varying size would otherwise reserve up to twice the memory they use.
                "arena_extend_strategy": "kSameAsRequested",
                "cudnn_conv_use_max_workspace": "1",
                "do_copy_in_default_stream": True,
            },
        )
    return name


class IoBindingModel(OnnxModel):
    """An onnxruntime session run through IO binding: inputs are copied to the device once,
    outputs are allocated there by onnxruntime and copied back once, with no intermediate
    host buffers. Worth it where a GPU runs the session; on CPU it is the same work as
    ``session.run`` (which is how tests exercise this path without a GPU).
    """

    def __init__(
        self,
        manifest: Manifest,
        session: ort.InferenceSession,
        timings: LoadTimings,
        *,
        device: str = "cuda",
        device_id: int = 0,
    ) -> None:
        super().__init__(manifest, session, timings)
        self.device, self.device_id = device, device_id

    def predict(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        names = list(output_names) if output_names else self._output_names
        binding = self.session.io_binding()
        try:
            with run_errors_translated():
                for name, array in inputs.items():
                    if array.dtype.kind == "O":  # strings live on the host whatever the provider
                        binding.bind_cpu_input(name, array)
                        continue
                    value = ort.OrtValue.ortvalue_from_numpy(
                        np.ascontiguousarray(array), self.device, self.device_id
                    )
                    binding.bind_ortvalue_input(name, value)
                for name in names:
                    binding.bind_output(name, self.device, self.device_id)
                self.session.run_with_iobinding(binding)
                results = binding.copy_outputs_to_cpu()
        finally:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
        return dict(zip(names, results, strict=True))


def onnx_model_factory(io_binding: str = "auto", device_id: int = 0) -> ModelFactory:
    """Build ``IoBindingModel`` where it pays (``auto``: a GPU provider leads the session),
    always (``on``) or never (``off``); otherwise the plain ``OnnxModel``."""
    if io_binding not in IO_BINDING_MODES:
        raise ValueError(f"IO binding mode {io_binding!r} must be one of {list(IO_BINDING_MODES)}")

    def build(manifest: Manifest, session: ort.InferenceSession, timings: LoadTimings) -> Model:
        on_gpu = runs_on_gpu(session.get_providers())
        if io_binding == "on" or (io_binding == "auto" and on_gpu):
            device = "cuda" if on_gpu else "cpu"
            return IoBindingModel(manifest, session, timings, device=device, device_id=device_id)
        return OnnxModel(manifest, session, timings)

    return build
