"""Helpers for the GPU server's tests: small models with the traits batching must respect,
a loaded model without a server, a model whose runs the test holds, the server in-process on
a loopback port, and a client."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tierserve.capture import Capture
from tierserve.model import LoadTimings, OnnxModel, create_session
from tierserve.sagemaker_hosting import ModelHost, ServerSettings, build_registry
from tierserve.tools.packaging import PackagedModel, package_model

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE = REPO_ROOT / "functions" / "gpu_server" / "serve"


def _save(graph: Any, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def gather_model(path: Path) -> Path:
    """``y[r] = x[r, i[r]]``: an index out of [0, 4) passes validation (any INT64 does) and
    makes onnxruntime fail at run time. Inputs ``x`` FP32 [-1, 4], ``i`` INT64 [-1, 1]."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("GatherElements", ["x", "i"], ["y"], axis=1)],
        "gather",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("i", TensorProto.INT64, ["batch", 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
    )
    return _save(graph, path)


def row_sum_model(path: Path) -> Path:
    """``y = sum(x, axis=1)`` for ``x`` FP32 [-1, -1]: requests may differ in their second
    dimension, so only same-width requests may share a run."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
        "row_sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    return _save(graph, path)


def fp16_model(path: Path) -> Path:
    """A half-precision classifier end to end: ``x`` FP16 [-1, 8] -> ``y`` FP16 [-1, 4]."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float16)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Softmax", ["r"], ["y"], axis=1),
        ],
        "fp16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 4])],
        [numpy_helper.from_array(weight, "w")],
    )
    return _save(graph, path)


def package(path: Path, name: str, out_dir: Path) -> PackagedModel:
    return package_model(path, name=name, version="1", out_dir=out_dir)


def load(packaged: PackagedModel, source: Path, threads: int = 2) -> OnnxModel:
    """A plain onnxruntime model for ``packaged`` (its source file), no registry, no server."""
    session = create_session(source, packaged.manifest, threads=threads)
    return OnnxModel(packaged.manifest, session, LoadTimings(0, 0, 0, False))


STALL = -13.0  # a request whose first value is this stalls in the model (see Stalling)
CRASH = -17.0  # and one whose first value is this raises Stalling.crash at once


class Stalling:
    """A real model whose runs of a request starting with :data:`STALL` signal ``entered``,
    wait for ``go``, then raise ``then`` (or run normally when ``then`` is None); a request
    starting with :data:`CRASH` raises ``crash``; other requests run at once. What holds a run
    in flight while a test queues requests behind it."""

    def __init__(
        self, inner: Any, then: BaseException | None = None, crash: BaseException | None = None
    ) -> None:
        self.inner = inner
        self.manifest = inner.manifest
        self.providers = getattr(inner, "providers", ())
        self.then = then
        self.crash = crash
        self.entered = threading.Event()
        self.go = threading.Event()

    def metadata(self) -> dict[str, Any]:
        return self.inner.metadata()

    def ready(self) -> bool:
        return True

    def predict(self, inputs: Mapping[str, np.ndarray], output_names: Any = None) -> dict[str, np.ndarray]:
        first = next(iter(inputs.values())).flat[0]
        if first == CRASH and self.crash is not None:
            raise self.crash
        if first == STALL:
            self.entered.set()
            assert self.go.wait(30), "the test never let the stalled run go"
            if self.then is not None:
                raise self.then
        return self.inner.predict(inputs, output_names)


class HeldRun:
    """A run of ``server``'s batched model ``name`` held in flight over HTTP: the model's inner
    model is wrapped in :class:`Stalling`, and ``body`` (a request whose first value is
    :data:`STALL`) is sent and runs at once; requests sent meanwhile queue behind it until
    :meth:`release`. What makes concurrent HTTP requests surely share a run."""

    def __init__(self, server: InProcessServer, name: str, body: bytes) -> None:
        self.batching = server.model(name)
        self.stalling = Stalling(self.batching.inner)
        self.batching.inner = self.stalling
        self.queued_before = self.batching.stats_snapshot()["requests"] + 1
        self._reply: list[tuple[int, bytes]] = []
        path = f"/v2/models/{name}/infer"
        self._thread = threading.Thread(
            target=lambda: self._reply.append(request(server.port, "POST", path, body)[::2]), daemon=True
        )
        self._thread.start()
        assert self.stalling.entered.wait(30), "the held request never reached the model"

    def queued(self) -> int:
        """Requests queued behind the held run so far."""
        return self.batching.stats_snapshot()["requests"] - self.queued_before

    def release(self) -> tuple[int, bytes]:
        """Let the held run go; its ``(status, body)``."""
        self.stalling.go.set()
        self._thread.join(30)
        self.batching.inner = self.stalling.inner
        return self._reply[0]


class InProcessServer:
    """The GPU server's HTTP layer and host in this process, on 127.0.0.1, until ``stop()``."""

    def __init__(self, environ: Mapping[str, str], *, limits: Any = None, **overrides: Any) -> None:
        from server import make_server

        from tierserve.asgi import ServerThread, bind

        settings = ServerSettings.from_env(environ, **overrides)
        self.host = ModelHost(
            build_registry(settings, environ),
            settings,
            retry_s=(0.2, 0.5),
            capture=Capture.from_env(environ),
        )
        self.http = ServerThread(make_server(self.host, limits), bind("127.0.0.1", 0), name="gpu-server-test")
        self.host.start()
        self.http.start()

    @property
    def port(self) -> int:
        return self.http.address[1]

    def stop(self) -> None:
        self.http.stop()
        self.host.close()

    def model(self, name: str) -> Any:
        return self.host.registry.loaded(self.host.registry.resolve(name))


def request(
    port: int, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One HTTP request on a fresh connection: ``(status, headers, body)``; the headers look up
    by any case, as HTTP's do (the servers send them in lower case)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body or None, headers=dict(headers or {}))
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()
