"""What ``tierserve package`` buys: stored size, accuracy, load time and latency, per model.

    python -m bench.packaging                 # all models (MiniLM when its venv exists)
    python -m bench.packaging --skip-minilm
    python -m bench.packaging --minilm-python /tmp/venv-minilm/bin/python

Models:
- iris: the scikit-learn logistic regression sample (skl2onnx). It has no op int8 can
  quantize (LinearClassifier is an ai.onnx.ml op): reported as refused, with zstd alone.
- digits-mlp: a scikit-learn MLPClassifier trained on the digits data (skl2onnx); top-1 on
  the 1,797 real digit images, where top-1 means something.
- mlp-100mb: samples.mlp(hidden=2048, layers=8, features=256), about 103 MB, seeded random
  weights (layers=6 is 69 MB, not 100). Random weights give near-uniform softmax outputs,
  so top-1 flips on near-ties say little about quantization quality: its verdict uses the
  cosine, and its top-1 is reported beside it.
- minilm: all-MiniLM-L6-v2 through examples/minilm (its own venv with torch), cosine of the
  sentence embeddings over 50 sentences.

Each model is packaged as fp32 + zstd and as int8 + zstd through ``tierserve.tools.packaging``.
Targets: int8 + zstd stored bytes <= 0.3 of the fp32 ONNX, and top-1 >= 99% (classifiers)
or cosine >= 0.99 (embeddings). JSON to bench/results/packaging.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, WORK_DIR, say, write_results

TARGET_RATIO = 0.3
TARGET_TOP1 = 0.99
TARGET_COSINE = 0.99
DEFAULT_MINILM_PYTHON = Path("/tmp/venv-minilm/bin/python")


def build_models(work: Path) -> dict[str, dict[str, Any]]:
    """The models and the real inputs (.npz) their accuracy is measured on."""
    import numpy as np
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    from tierserve.tools.local import samples

    work.mkdir(parents=True, exist_ok=True)
    models: dict[str, dict[str, Any]] = {}

    iris = work / "iris.onnx"
    if not iris.exists():
        samples.iris_classifier(iris)
    np.savez(work / "iris-rows.npz", input=samples.iris_rows())
    models["iris"] = {"path": iris, "inputs": work / "iris-rows.npz", "kind": "classifier"}

    digits = work / "digits-mlp.onnx"
    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype(np.float32)
    if not digits.exists():
        classifier = MLPClassifier(hidden_layer_sizes=(512, 256), max_iter=300, random_state=0).fit(
            images, labels
        )
        onnx_model = to_onnx(
            classifier, images[:1], options={id(classifier): {"zipmap": False}}, target_opset=17
        )
        digits.write_bytes(onnx_model.SerializeToString())
    np.savez(work / "digits-rows.npz", X=images)
    models["digits-mlp"] = {
        "path": digits,
        "inputs": work / "digits-rows.npz",
        "kind": "classifier",
        "labels": labels,
    }

    large = work / "mlp-100mb.onnx"
    if not large.exists():
        samples.mlp(large, hidden=2048, layers=8, features=256)
    models["mlp-100mb"] = {"path": large, "inputs": None, "kind": "classifier (random weights)"}
    return models


def bench_model(name: str, spec: dict[str, Any], work: Path) -> dict[str, Any]:
    from tierserve.tools.packaging import PackageOptions, PackagingError, package

    result: dict[str, Any] = {"source_bytes": spec["path"].stat().st_size, "kind": spec["kind"]}
    for quantization in ("none", "int8"):
        say(f"{name}: {quantization} + zstd")
        options = PackageOptions(
            name=name, version="1", quantization=quantization, inputs=spec["inputs"], force=True
        )
        try:
            report = package(spec["path"], work / "packages" / name / quantization, options)
        except PackagingError as error:
            result[quantization] = {"refused": error.message}
            say(f"  refused: {error.message}")
            continue
        entry = report.to_dict()
        entry["int8_scales"] = report.manifest.extra.get("int8_scales")
        if "labels" in spec and quantization == "int8":
            entry["top1_vs_true_labels"] = _true_label_accuracy(spec, work / "packages" / name)
        result[quantization] = entry
        say("  " + report.table().replace("\n", "\n  "))
    return result


def _true_label_accuracy(spec: dict[str, Any], packages: Path) -> dict[str, float]:
    """Accuracy against the digits' true labels, fp32 vs the int8 package (one image per run)."""
    import numpy as np
    import onnxruntime as ort
    import zstandard

    from tierserve.tools.packaging import read_package

    images = np.load(spec["inputs"])["X"]
    int8 = read_package(packages / "int8")
    decompressed = packages / "int8.onnx"
    with int8.artifact.open("rb") as source, decompressed.open("wb") as target:
        zstandard.ZstdDecompressor().copy_stream(source, target)
    scores = {}
    for label, path in (("fp32", spec["path"]), ("int8", decompressed)):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        predicted = np.array([session.run(None, {"X": row[None]})[0][0] for row in images])
        scores[label] = round(float(np.mean(predicted == spec["labels"])), 4)
    return scores


def bench_minilm(python: Path, work: Path) -> dict[str, Any]:
    out = work / "minilm"
    say(f"minilm: examples/minilm/export_and_package.py with {python}")
    completed = subprocess.run(
        [str(python), str(REPO_ROOT / "examples" / "minilm" / "export_and_package.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": ""},
    )
    if completed.returncode != 0:
        tail = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return {"failed": tail}
    say(completed.stdout)
    return json.loads((out / "report.json").read_text())


def verdict(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """int8 + zstd against the targets (or why it could not be judged)."""
    if "cosine_int8_vs_torch" in result:  # minilm
        ratio, cosine = result["stored_ratio"], result["cosine_int8_vs_torch"]["mean"]
        return {
            "stored_ratio": ratio,
            "cosine": round(cosine, 5),
            "meets_ratio": ratio <= TARGET_RATIO,
            "meets_accuracy": cosine >= TARGET_COSINE,
        }
    int8 = result.get("int8", {})
    if "refused" in int8 or "failed" in result:
        fp32 = result.get("none", {})
        return {
            "int8": "refused",
            "reason": int8.get("refused") or result.get("failed"),
            "zstd_only_stored_ratio": fp32.get("stored_ratio"),
        }
    accuracy = int8["accuracy"]
    top1 = accuracy.get("top1", accuracy.get("agreement"))
    cosine = accuracy.get("outputs", {}).get("probabilities", {}).get("cosine")
    random_weights = "random" in result.get("kind", "")
    judged_by = "cosine (random weights)" if random_weights else "top1"
    meets = (cosine or 0) >= TARGET_COSINE if random_weights else top1 is not None and top1 >= TARGET_TOP1
    return {
        "stored_ratio": int8["stored_ratio"],
        "top1": top1,
        "cosine": cosine,
        "judged_by": judged_by,
        "meets_ratio": int8["stored_ratio"] <= TARGET_RATIO,
        "meets_accuracy": meets,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.packaging", description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument(
        "--minilm-python",
        type=Path,
        default=Path(os.environ.get("MINILM_PYTHON", DEFAULT_MINILM_PYTHON)),
        help="python of the MiniLM example's venv (default $MINILM_PYTHON or /tmp/venv-minilm/bin/python)",
    )
    parser.add_argument("--fresh", action="store_true", help="rebuild the models instead of reusing them")
    args = parser.parse_args(argv)

    work = WORK_DIR / "packaging"
    if args.fresh and work.exists():
        shutil.rmtree(work)
    results: dict[str, Any] = {}
    for name, spec in build_models(work).items():
        results[name] = bench_model(name, spec, work)
    if args.skip_minilm:
        results["minilm"] = {"skipped": "--skip-minilm"}
    elif args.minilm_python.exists():
        results["minilm"] = bench_minilm(args.minilm_python, work)
    else:
        results["minilm"] = {"skipped": f"no {args.minilm_python}: see examples/minilm/requirements.txt"}

    verdicts = {name: verdict(name, result) for name, result in results.items() if "skipped" not in result}
    say("\nint8 + zstd against the targets (stored <= 0.3 of fp32 ONNX; top-1 >= 99% or cosine >= 0.99):")
    for name, judged in verdicts.items():
        say(f"  {name:12s} {json.dumps(judged)}")
    path = write_results(
        "packaging",
        {
            "targets": {"stored_ratio": TARGET_RATIO, "top1": TARGET_TOP1, "cosine": TARGET_COSINE},
            "verdicts": verdicts,
            "results": results,
        },
        command=" ".join([Path(sys.executable).name, "-m", "bench.packaging", *(argv or sys.argv[1:])]),
    )
    say(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
