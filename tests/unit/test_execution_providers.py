"""Execution providers: TensorRT, then CUDA, then CPU, as far as onnxruntime has them, with
their options; IO binding gives the same results as a plain run (checked on CPU, the only
device here), FP16 included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from support.gpu import fp16_model, load, package
from tierserve.execution_providers import (
    CPU,
    CUDA,
    TENSORRT,
    IoBindingModel,
    ProviderConfig,
    choose_providers,
    missing_providers,
    onnx_model_factory,
    provider_names,
    runs_on_gpu,
)
from tierserve.model import OnnxModel, create_session

GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_a_gpu_build_gets_tensorrt_then_cuda_then_cpu_with_their_options(tmp_path):
    config = ProviderConfig(trt_cache_dir=tmp_path / "engines")
    providers = choose_providers(config, GPU_BUILD)
    assert provider_names(providers) == [TENSORRT, CUDA, CPU]
    trt_options = dict(providers[0][1])
    assert trt_options["trt_fp16_enable"] is True
    assert trt_options["trt_engine_cache_enable"] is True
    assert trt_options["trt_engine_cache_path"] == str(tmp_path / "engines")
    assert providers[1][1]["device_id"] == 0
    assert providers[2] == CPU


def test_a_cpu_build_gets_cpu_and_what_is_missing_is_reported():
    config = ProviderConfig(requested=ProviderConfig.parse_requested("cuda,cpu"))
    assert choose_providers(config, ["CPUExecutionProvider"]) == [CPU]
    assert missing_providers(config, ["CPUExecutionProvider"]) == [CUDA]
    assert choose_providers(ProviderConfig(), ["AzureExecutionProvider", CPU]) == [CPU]


def test_requested_providers_keep_their_order_and_cpu_stays_last():
    config = ProviderConfig(requested=ProviderConfig.parse_requested("cpu, cuda"), trt_fp16=False)
    assert provider_names(choose_providers(config, GPU_BUILD)) == [CUDA, CPU]
    assert ProviderConfig.parse_requested("auto") is None
    assert ProviderConfig.parse_requested("TensorrtExecutionProvider") == (TENSORRT,)
    with pytest.raises(ValueError, match="'rocm' is not one of"):
        ProviderConfig.parse_requested("rocm")


def test_runs_on_gpu_looks_at_the_provider_that_leads():
    assert runs_on_gpu([CUDA, CPU]) and runs_on_gpu([TENSORRT, CUDA, CPU])
    assert not runs_on_gpu([CPU]) and not runs_on_gpu([])


@pytest.fixture(scope="module")
def fp16(tmp_path_factory) -> tuple[object, Path]:
    folder = tmp_path_factory.mktemp("fp16")
    source = fp16_model(folder / "fp16.onnx")
    return package(source, "half", folder / "pkg"), source


def test_io_binding_matches_a_plain_run_in_fp16(fp16):
    packaged, source = fp16
    plain = load(packaged, source)
    session = create_session(source, packaged.manifest, threads=1)
    bound = IoBindingModel(packaged.manifest, session, plain.timings, device="cpu")
    x = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float16)
    expected = plain.predict({"x": x})["y"]
    got = bound.predict({"x": x})["y"]
    assert got.dtype == np.float16 and got.shape == (5, 4)
    np.testing.assert_array_equal(got, expected)
    assert bound.predict({"x": x}, ["y"]).keys() == {"y"}


def test_the_factory_binds_io_only_where_it_pays(fp16):
    packaged, source = fp16
    session = create_session(source, packaged.manifest, threads=1)
    timings = load(packaged, source).timings
    assert type(onnx_model_factory("auto")(packaged.manifest, session, timings)) is OnnxModel  # CPU session
    assert isinstance(onnx_model_factory("on")(packaged.manifest, session, timings), IoBindingModel)
    assert type(onnx_model_factory("off")(packaged.manifest, session, timings)) is OnnxModel
    with pytest.raises(ValueError, match="IO binding mode"):
        onnx_model_factory("sometimes")
