"""KServe's Python model server over one ONNX file: what ``bench.kserve_compare`` measures
tierserve's GPU server against.

Run by that benchmark with the Python of its throwaway KServe virtual environment (KServe is
never one of tierserve's requirements), so this file imports KServe, numpy and onnxruntime
only, never tierserve:

    KSERVE_VENV/bin/python bench/kserve_model.py --model-path iris.onnx --model-name iris --http_port 8085

A small custom ``kserve.Model``, as KServe's documentation shows for a custom predictor: one
onnxruntime session (CPU, the same intra-op thread count as the GPU server gives it), the V2
request's inputs as numpy, every output back as V2 JSON. Everything else (the server, FastAPI,
its V2 endpoints and their validation, the event loop, latency logging and Prometheus
histograms) is KServe's default. gRPC is off: nothing calls it.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server

# onnxruntime's element types as V2 datatypes (only what a benchmark model outputs).
DATATYPES = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(float16)": "FP16",
    "tensor(bool)": "BOOL",
}


class OnnxModel(Model):
    """One ONNX file behind KServe's V2 protocol."""

    def __init__(self, name: str, path: str, threads: int) -> None:
        super().__init__(name)
        self.path = path
        self.threads = threads
        self.session: ort.InferenceSession | None = None
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.outputs = [(o.name, DATATYPES[o.type]) for o in self.session.get_outputs()]
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        assert self.session is not None
        feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        results = self.session.run([name for name, _ in self.outputs], feeds)
        outputs = [
            InferOutput(name, list(np.shape(array)), datatype, np.asarray(array).flatten().tolist())
            for (name, datatype), array in zip(self.outputs, results, strict=True)
        ]
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs)


def main() -> None:
    parser = argparse.ArgumentParser(parents=[model_server.parser], description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args, _ = parser.parse_known_args()
    model = OnnxModel(args.model_name, args.model_path, args.threads)
    ModelServer(http_port=args.http_port, enable_grpc=False, workers=1).start([model])


if __name__ == "__main__":
    main()
