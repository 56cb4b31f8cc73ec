"""Cold start to first prediction for a ~100 MB model from the embedded S3, three ways.

- floor: one GET of the stored bytes (read fully into memory) + an onnxruntime session from
  the already-decompressed model (from a file in the page cache or from bytes in memory,
  whichever is cheaper; the same SessionOptions as ours) + the first inference. No
  decompression, no verification: a bound no loader can beat.
- ours: a fresh ``ModelRegistry`` (disk cache emptied every round) doing ``resolve`` +
  ``get`` (manifest GET, streaming fetch with decompression and both sha256 checks, the
  atomic /tmp cache write, the session) + the first ``predict``.
- naive: boto3 ``download_file`` to /tmp, decompress to a file, a session from that path with
  default SessionOptions, the first inference.

All three use an S3 client created before timing starts (with a warm connection), so
client creation is out of every figure. The three run interleaved, in a rotating order,
for ``--rounds`` rounds; the figures are medians.

    python -m bench cold_start --rounds 9
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import WORK_DIR, S3Server, fmt_ms, plot_bars, say, summarize, timer, write_results

BUCKET = "bench-models"
PREFIX = "models"
NAME, VERSION = "mlp", "1"
TARGET_VS_FLOOR = 1.3
TARGET_VS_NAIVE = 3.0


def package_for_bench(model_path: Path, out_dir: Path, packaging: str) -> Any:
    """``pipeline``: as ``tierserve package`` builds it (offline-optimized, so the loader skips
    graph optimization; zstd at the level its budget picks). ``plain``: ``package_model``
    (zstd level 10, not optimized, so the loader optimizes at ORT_ENABLE_ALL)."""
    from tierserve.tools.packaging import PackageOptions, package, package_model

    if packaging == "plain":
        return package_model(model_path, name=NAME, version=VERSION, out_dir=out_dir)
    say("cold_start: packaging with the tierserve package pipeline (optimize, zstd, accuracy check)")
    return package(model_path, out_dir, PackageOptions(name=NAME, version=VERSION)).packaged


def load_store_copy(path: str) -> Any:
    """Import another copy of tierserve/store.py (e.g. ``git show HEAD:<path> > /tmp/store_head.py``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_baseline_store", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline-store: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def build_model(hidden: int, layers: int, features: int) -> Path:
    from tierserve.tools.local import samples

    path = WORK_DIR / "samples" / f"mlp-f{features}-h{hidden}-l{layers}.onnx"
    if not path.exists():
        say(f"cold_start: building the sample MLP (hidden={hidden}, layers={layers}, features={features})")
        samples.mlp(path, features=features, hidden=hidden, layers=layers)
    return path


class ColdStart:
    def __init__(
        self, server: S3Server, model_path: Path, work: Path, *, packaging: str, threads: int
    ) -> None:
        import numpy as np
        import zstandard

        from tierserve.settings import ModelRef, Settings
        from tierserve.tools.packaging import upload_package

        self.work = work
        self.client = server.client()
        self.client.create_bucket(Bucket=BUCKET)
        self.packaged = package_for_bench(model_path, work / "package", packaging)
        self.manifest = upload_package(self.packaged, self.client, BUCKET, PREFIX).manifest
        self.key = f"{PREFIX}/{self.manifest.key_prefix}/{self.manifest.artifact}"
        # The floor starts from the decompressed model: prepared once, outside the timing.
        self.model_bytes = zstandard.ZstdDecompressor().decompress(
            self.packaged.artifact.read_bytes(), max_output_size=self.manifest.model.bytes
        )
        self.model_file = self.work / "floor-model.onnx"
        self.model_file.write_bytes(self.model_bytes)
        self.cache_dir = self.work / "cache"
        self.naive_dir = self.work / "naive"
        self.threads = threads
        self.settings = Settings(
            model_bucket=BUCKET,
            model_prefix=PREFIX,
            models=(ModelRef(NAME, VERSION),),
            threads=threads,
            cache_dir=self.cache_dir,
            memory_budget_mb=8192,
        )
        features = self.manifest.inputs[0].shape[1]
        self.x = np.random.default_rng(0).standard_normal((1, features)).astype(np.float32)

    # Each run returns (total ms, {phase: ms}).

    def floor(self, source: str) -> tuple[float, dict[str, float]]:
        import onnxruntime as ort

        from tierserve.model import session_options

        model = str(self.model_file) if source == "path" else self.model_bytes
        with timer() as total:
            with timer() as get_ms:
                data = self.client.get_object(Bucket=BUCKET, Key=self.key)["Body"].read()
            with timer() as session_ms:
                session = ort.InferenceSession(
                    model, session_options(self.manifest, self.threads), providers=["CPUExecutionProvider"]
                )
            with timer() as infer_ms:
                session.run(None, {"input": self.x})
        assert len(data) == self.manifest.stored.bytes
        return total[0], {"get": get_ms[0], "session": session_ms[0], "first_infer": infer_ms[0]}

    def ours(self, store_module: Any = None) -> tuple[float, dict[str, float]]:
        """``store_module``: another copy of tierserve/store.py to load with (before/after)."""
        from tierserve import aws
        from tierserve.registry import ModelRegistry

        shutil.rmtree(self.cache_dir, ignore_errors=True)
        factory = None
        if store_module is not None:
            source = store_module.S3Source(BUCKET, PREFIX, aws.s3_client)
            factory = lambda: store_module.ArtifactStore(source, self.cache_dir, 1 << 34)  # noqa: E731
        registry = ModelRegistry(self.settings, store_factory=factory)
        with timer() as total:
            ref = registry.resolve(NAME)
            model = registry.get(ref)
            model.predict({"input": self.x})
        timings = model.timings  # type: ignore[attr-defined]
        assert not timings.cache_hit
        phases = {
            "fetch_wait": timings.fetch_ms,
            "decompress_verify": timings.decompress_ms,
            "session": timings.session_ms,
        }
        phases["other"] = total[0] - sum(phases.values())
        return total[0], phases

    def naive(self) -> tuple[float, dict[str, float]]:
        import onnxruntime as ort
        import zstandard

        shutil.rmtree(self.naive_dir, ignore_errors=True)
        self.naive_dir.mkdir()
        compressed, decompressed = self.naive_dir / "model.onnx.zst", self.naive_dir / "model.onnx"
        with timer() as total:
            with timer() as download_ms:
                self.client.download_file(BUCKET, self.key, str(compressed))
            with (
                timer() as decompress_ms,
                compressed.open("rb") as reader,
                decompressed.open("wb") as writer,
            ):
                zstandard.ZstdDecompressor().copy_stream(reader, writer)
            with timer() as session_ms:
                session = ort.InferenceSession(str(decompressed), providers=["CPUExecutionProvider"])
            with timer() as infer_ms:
                session.run(None, {"input": self.x})
        return total[0], {
            "download": download_ms[0],
            "decompress": decompress_ms[0],
            "session": session_ms[0],
            "first_infer": infer_ms[0],
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    from tierserve import aws

    model_path = build_model(args.hidden, args.layers, args.features)
    # Work files (cache, naive download) under the system temp folder, as /tmp in Lambda.
    with (
        S3Server(args.s3, throttle_mb_per_s=args.throttle_mb_per_s) as server,
        tempfile.TemporaryDirectory(prefix="tierserve-bench-") as tmp,
    ):
        aws.clear_clients()
        bench = ColdStart(server, model_path, Path(tmp), packaging=args.packaging, threads=args.threads)
        aws.s3_client().head_bucket(Bucket=BUCKET)  # ours: client created, connection open
        runs = {
            "floor_path": lambda: bench.floor("path"),
            "floor_bytes": lambda: bench.floor("bytes"),
            "ours": bench.ours,
            "naive": bench.naive,
        }
        if args.baseline_store:
            baseline = load_store_copy(args.baseline_store)
            runs["ours_baseline"] = lambda: bench.ours(baseline)
        say(
            f"cold_start: {bench.manifest.model.bytes / 1e6:.1f} MB model, "
            f"{bench.manifest.stored.bytes / 1e6:.1f} MB stored (zstd); S3 in a {args.s3}, "
            f"paced at {args.throttle_mb_per_s or 'loopback speed'} MB/s per connection; "
            f"{args.rounds} rounds + 1 warm-up"
        )
        for fn in runs.values():  # warm-up: imports, allocator, page cache, connections
            fn()
        totals: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        phases: dict[str, dict[str, list[float]]] = {name: {} for name in runs}
        names = list(runs)
        for round_index in range(args.rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                gc.collect()
                cpu_start = time.process_time()
                total, parts = runs[name]()
                cpu[name].append((time.process_time() - cpu_start) * 1000)
                totals[name].append(total)
                for phase, ms in parts.items():
                    phases[name].setdefault(phase, []).append(ms)
            say(f"  round {round_index + 1}: " + "  ".join(f"{n} {totals[n][-1]:.0f}" for n in names))
        manifest = bench.manifest
    aws.clear_clients()

    summary = {name: summarize(samples) for name, samples in totals.items()}
    floor_name = min(("floor_path", "floor_bytes"), key=lambda n: summary[n]["median"])
    floor, ours, naive = (summary[n]["median"] for n in (floor_name, "ours", "naive"))
    # Per-round ratios too: rounds share the machine's load, so they are steadier than ratios of medians.
    paired_floor = [
        o / min(p, b)
        for o, p, b in zip(totals["ours"], totals["floor_path"], totals["floor_bytes"], strict=True)
    ]
    paired_naive = [n / o for n, o in zip(totals["naive"], totals["ours"], strict=True)]
    results = {
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "features": args.features,
            "model_bytes": manifest.model.bytes,
            "stored_bytes": manifest.stored.bytes,
            "compression": manifest.compression,
            "optimized": manifest.optimized,
            "packaging": args.packaging,
        },
        "s3": args.s3,
        "throttle_mb_per_s": args.throttle_mb_per_s,
        "threads": args.threads,
        "rounds": args.rounds,
        "total_ms": summary,
        "phases_ms_median": {n: {p: statistics.median(v) for p, v in ph.items()} for n, ph in phases.items()},
        # This process's CPU time (all threads; the embedded S3 in its own process is not counted).
        "cpu_ms_median": {n: statistics.median(v) for n, v in cpu.items()},
        "floor": floor_name,
        "ours_vs_floor": ours / floor,
        "naive_vs_ours": naive / ours,
        "ours_vs_floor_per_round_median": statistics.median(paired_floor),
        "naive_vs_ours_per_round_median": statistics.median(paired_naive),
        "targets": {
            "ours_vs_floor_at_most": TARGET_VS_FLOOR,
            "naive_vs_ours_at_least": TARGET_VS_NAIVE,
            "met": ours / floor <= TARGET_VS_FLOOR and naive / ours >= TARGET_VS_NAIVE,
        },
    }
    return results


def report(results: dict[str, Any]) -> str:
    model = results["model"]
    throttle = results["throttle_mb_per_s"]
    paced = f" at {throttle:g} MB/s per connection" if throttle else ""
    lines = [
        f"cold start, {model['model_bytes'] / 1e6:.1f} MB model ({model['stored_bytes'] / 1e6:.1f} MB zstd), "
        f"S3 in a {results['s3']}{paced}, {results['rounds']} rounds (median, p90):"
    ]
    for name, stats in results["total_ms"].items():
        parts = ", ".join(f"{p} {v:.0f}" for p, v in results["phases_ms_median"][name].items())
        cpu = results["cpu_ms_median"][name]
        lines.append(
            f"  {name:14s}{fmt_ms(stats['median'])}  p90 {stats['p90']:7.1f}  cpu {cpu:6.0f}   [{parts}]"
        )
    lines.append(
        f"  ours / floor ({results['floor']}) = {results['ours_vs_floor']:.2f}x (target <= {TARGET_VS_FLOOR}; "
        f"per-round median {results['ours_vs_floor_per_round_median']:.2f}x)"
    )
    lines.append(
        f"  naive / ours = {results['naive_vs_ours']:.2f}x (target >= {TARGET_VS_NAIVE}; "
        f"per-round median {results['naive_vs_ours_per_round_median']:.2f}x)"
    )
    if "ours_baseline" in results["total_ms"]:
        before, after = (results["total_ms"][n]["median"] for n in ("ours_baseline", "ours"))
        lines.append(f"  ours vs ours_baseline: {after:.0f} vs {before:.0f} ms ({after / before:.2f}x)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument(
        "--layers", type=int, default=8, help="8 layers of 2048 (the default) is about 100 MB"
    )
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (Lambda at 2 GB has 1 vCPU)")
    parser.add_argument(
        "--s3",
        choices=("process", "thread"),
        default="process",
        help="embedded S3 in a child process or a thread",
    )
    parser.add_argument(
        "--throttle-mb-per-s",
        type=float,
        default=None,
        metavar="N",
        help="pace each S3 connection to N MB/s (one S3 connection from Lambda: about 90)",
    )
    parser.add_argument(
        "--baseline-store",
        metavar="FILE",
        help="also time ours with this copy of tierserve/store.py, as ours_baseline (before/after)",
    )
    parser.add_argument(
        "--packaging",
        choices=("pipeline", "plain"),
        default="pipeline",
        help="pipeline: tierserve package (offline-optimized, the default); plain: package_model",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench cold_start", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    results = run(args)
    print(report(results), flush=True)
    # One file per scenario, so a paced or in-process run does not overwrite the default one.
    name = "cold_start"
    if args.throttle_mb_per_s:
        name += f"_{args.throttle_mb_per_s:g}mbps"
    if args.s3 == "thread":
        name += "_s3thread"
    path = write_results(name, results)
    medians = {name: stats["median"] for name, stats in results["total_ms"].items()}
    plot_bars(name, "cold start to first prediction (median ms)", medians)
    say(f"cold_start: results in {path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
