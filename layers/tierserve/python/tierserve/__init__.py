"""tierserve: serve ONNX models serverlessly on AWS through the Open Inference Protocol."""

__version__ = "0.1.0"
