"""tierserve: serve ONNX models serverlessly on AWS through the Open Inference Protocol."""

import os

__version__ = "0.1.0"

# onnxruntime 1.29+ uploads telemetry to Microsoft (1DS) from Linux too, unless this is set
# before its environment initializes; disable_telemetry_events() (tierserve.model) comes too
# late for the process-info event. Every process of ours imports this package before
# onnxruntime. A user who wants to send it sets the variable to 0 themselves.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
