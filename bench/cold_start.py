"""Cold start to first prediction: the loader against the floors, from a loopback S3.

Per round, in a rotating order, each from an S3 client made (and connected) before timing:

- floor: one GET of the stored bytes, read fully into memory, then an onnxruntime session from
  the decompressed model (a file in the page cache or bytes in memory, whichever is cheaper;
  the same SessionOptions as ours) and the first inference. No verification, no decompression:
  a bound no loader that keeps its checks can beat on one stream.
- parallel_floor: the same bytes as ``--connections`` ranged GETs at once into memory, then the
  floor's session and first inference (its median, same run). The floor of a loader bound by
  the network; ``parallel_floor_theory`` is bytes / (connections x rate) + the same.
- ours: a fresh ``ModelRegistry`` (disk cache emptied) doing ``resolve`` + ``get`` (manifest
  GET, ranged GETs on ``--connections``, one sha256, the loader's layout, the session) + the
  first ``predict``.
- single_stream: the loader as it was before (``store.py`` of ``SINGLE_STREAM_REV``, read from
  git history: one stream, both sha256 passes, the /tmp write on the critical path, a session
  from the file).

S3 is ``bench/loopback_s3.py`` in a child process (moto's ranged GETs are slow), unpaced or
paced per connection (``--mb-per-s``, about 90 from Lambda) and with S3's time to first byte
(``--first-byte-ms``, 10-30 from Lambda). Pin both sides to one core to
take the second core's overlap out (Lambda gives one vCPU up to 1,769 MB):

    taskset -c 0 python -m bench cold_start --size-mb 100 --rounds 7
    python -m bench cold_start --size-mb 400 --mb-per-s 90 --rounds 5
"""

from __future__ import annotations

import argparse
import gc
import math
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import WORK_DIR, baseline_tree, fmt_ms, plot_bars, say, summarize, timer, write_results

BUCKET = "bench-models"
PREFIX = "models"
NAME, VERSION = "mlp", "1"
LAYERS, FEATURES = 8, 256
PART_BYTES = 8 * 1024 * 1024
TARGET_VS_FLOOR = 1.15
TARGET_VS_PARALLEL_FLOOR = 1.15
TARGET_VS_SINGLE_STREAM = 3.0


def hidden_for(size_mb: float) -> int:
    """The MLP width whose ``LAYERS`` square FP32 layers weigh about ``size_mb``."""
    return max(64, round(math.sqrt(size_mb * 1e6 / (4 * (LAYERS - 2)))))  # six square layers


def packaged_model(size_mb: float) -> Any:
    """The sample MLP packaged by ``tierserve package`` (offline-optimized; zstd only if it pays
    at the default target, which FP32 weights do not), built once into .tierserve/bench."""
    from tierserve.tools.local import samples
    from tierserve.tools.packaging import PackageOptions, package, read_package

    hidden = hidden_for(size_mb)
    folder = WORK_DIR / "packages" / f"mlp-h{hidden}-l{LAYERS}"
    try:
        return read_package(folder)
    except (FileNotFoundError, ValueError):
        pass
    source = WORK_DIR / "samples" / f"mlp-f{FEATURES}-h{hidden}-l{LAYERS}.onnx"
    if not source.exists():
        say(f"cold_start: building the sample MLP (hidden={hidden}, layers={LAYERS})")
        samples.mlp(source, features=FEATURES, hidden=hidden, layers=LAYERS)
    say("cold_start: packaging it with tierserve package (optimize, accuracy check, compression if it pays)")
    return package(source, folder, PackageOptions(name=NAME, version=VERSION)).packaged


def decompressed(stored: bytes, manifest: Any) -> bytes:
    if manifest.compression == "none":
        return stored
    import zstandard

    return zstandard.ZstdDecompressor().decompress(stored, max_output_size=manifest.model.bytes)


# The last commit whose loader read one S3 stream (both sha256 passes, the /tmp write on the
# critical path): its store.py, which imports only modules the working tree still has.
SINGLE_STREAM_REV = "7d4dc367d93519209a368826ab2492fcf4cdf614"


def load_single_stream() -> Any:
    """``tierserve/store.py`` of :data:`SINGLE_STREAM_REV`, from git history, as a module."""
    import importlib.util

    path = baseline_tree(SINGLE_STREAM_REV) / "layers/tierserve/python/tierserve/store.py"
    spec = importlib.util.spec_from_file_location("bench_single_stream_store", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class ColdStart:
    def __init__(self, endpoint: str, packaged: Any, work: Path, *, threads: int, connections: int) -> None:
        import numpy as np

        from tierserve import aws
        from tierserve.settings import ModelRef, Settings

        self.manifest = packaged.manifest
        self.key = f"{PREFIX}/{self.manifest.key_prefix}/{self.manifest.artifact}"
        self.client = aws.client("s3", endpoint_url=endpoint)
        self.client.head_object(Bucket=BUCKET, Key=self.key)  # connected before timing
        # The floor starts from the decompressed model: prepared once, outside the timing.
        self.model_bytes = decompressed(packaged.artifact.read_bytes(), self.manifest)
        self.model_file = work / "floor-model.onnx"
        self.model_file.write_bytes(self.model_bytes)
        self.cache_dir = work / "cache"
        self.threads, self.connections = threads, connections
        self.settings = Settings(
            model_bucket=BUCKET,
            model_prefix=PREFIX,
            models=(ModelRef(NAME, VERSION),),
            threads=threads,
            cache_dir=self.cache_dir,
            memory_budget_mb=16384,
            cache_max_mb=16384,
            fetch_connections=connections,
        )
        features = self.manifest.inputs[0].shape[1]
        self.x = np.random.default_rng(0).standard_normal((1, features)).astype(np.float32)
        self.single_stream = load_single_stream()
        self._pool = ThreadPoolExecutor(connections)

    # Each run returns (total ms, {phase: ms}).

    def _session(self, source: str) -> Any:
        import onnxruntime as ort

        from tierserve.model import session_options

        model = str(self.model_file) if source == "path" else self.model_bytes
        return ort.InferenceSession(
            model, session_options(self.manifest, self.threads), providers=["CPUExecutionProvider"]
        )

    def floor(self, source: str) -> tuple[float, dict[str, float]]:
        with timer() as total:
            with timer() as get_ms:
                data = self.client.get_object(Bucket=BUCKET, Key=self.key)["Body"].read()
            with timer() as session_ms:
                session = self._session(source)
            with timer() as infer_ms:
                session.run(None, {"input": self.x})
        assert len(data) == self.manifest.stored.bytes
        return total[0], {"get": get_ms[0], "session": session_ms[0], "first_infer": infer_ms[0]}

    def parallel_get(self) -> tuple[float, dict[str, float]]:
        """Only the ranged GETs of the parallel floor (its session is the floor's, added later)."""
        size = self.manifest.stored.bytes
        buffer = bytearray(size)

        def part(start: int) -> None:
            end = min(size, start + PART_BYTES)
            body = self.client.get_object(Bucket=BUCKET, Key=self.key, Range=f"bytes={start}-{end - 1}")[
                "Body"
            ]
            view = memoryview(buffer)[start:end]
            while view:
                count = body.readinto(view)
                view = view[count:]

        with timer() as total:
            list(self._pool.map(part, range(0, size, PART_BYTES)))
        return total[0], {"get": total[0]}

    def ours(self) -> tuple[float, dict[str, float]]:
        from tierserve.registry import ModelRegistry

        shutil.rmtree(self.cache_dir, ignore_errors=True)
        registry = ModelRegistry(self.settings)
        with timer() as total:
            model = registry.get(registry.resolve(NAME))
            model.predict({"input": self.x})
        timings = model.timings  # type: ignore[attr-defined]
        assert not timings.cache_hit
        phases = {
            "fetch_wait": timings.fetch_ms,
            "verify_write": timings.decompress_ms,
            "session": timings.session_ms,
        }
        phases["other"] = total[0] - sum(phases.values())
        phases["gets"] = timings.artifact_gets  # not ms: 1 when one connection read it all
        return total[0], phases

    def old_loader(self) -> tuple[float, dict[str, float]]:
        from tierserve import aws
        from tierserve.model import session_options

        shutil.rmtree(self.cache_dir, ignore_errors=True)
        module = self.single_stream
        import onnxruntime as ort

        with timer() as total:
            store = module.ArtifactStore(
                module.S3Source(BUCKET, PREFIX, aws.s3_client), self.cache_dir, 1 << 34
            )
            manifest = store.read_manifest(NAME, VERSION)
            with store.verified(manifest) as fetched, timer() as session_ms:
                session = ort.InferenceSession(
                    str(fetched.path),
                    session_options(manifest, self.threads),
                    providers=["CPUExecutionProvider"],
                )
            session.run(None, {"input": self.x})
        return total[0], {
            "fetch_wait": fetched.fetch_ms,
            "decompress_verify_write": fetched.decompress_ms,
            "session": session_ms[0],
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import os

    from bench.loopback_s3 import LoopbackS3
    from tierserve import aws
    from tierserve.tools.local.embedded_s3 import LOCAL_CREDENTIALS

    packaged = packaged_model(args.size_mb)
    manifest = packaged.manifest
    with tempfile.TemporaryDirectory(prefix="tierserve-bench-") as tmp:
        root = Path(tmp) / "s3"
        folder = root / BUCKET / PREFIX / manifest.key_prefix
        folder.mkdir(parents=True)
        shutil.copy(packaged.artifact, folder / manifest.artifact)
        (folder / "manifest.json").write_text(manifest.to_json())
        work = Path(tmp) / "work"
        work.mkdir()
        with LoopbackS3(root, args.mb_per_s, args.first_byte_ms) as s3:
            os.environ.update(LOCAL_CREDENTIALS)
            os.environ["AWS_ENDPOINT_URL_S3"] = s3.endpoint
            aws.clear_clients()
            bench = ColdStart(s3.endpoint, packaged, work, threads=args.threads, connections=args.connections)
            aws.s3_client().head_object(Bucket=BUCKET, Key=bench.key)  # the loader's client, connected
            runs = {
                "floor_path": lambda: bench.floor("path"),
                "floor_bytes": lambda: bench.floor("bytes"),
                "parallel_get": bench.parallel_get,
                "ours": bench.ours,
                "single_stream": bench.old_loader,
            }
            pace = f"{args.mb_per_s:g} MB/s per connection" if args.mb_per_s else "unpaced"
            pace += f", first byte after {args.first_byte_ms:g} ms" if args.first_byte_ms else ""
            say(
                f"cold_start: {manifest.model.bytes / 1e6:.1f} MB model, {manifest.stored.bytes / 1e6:.1f} MB "
                f"stored ({manifest.compression}); loopback S3 {pace}; {args.connections} connections; "
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
    aws.clear_clients()
    return summarize_runs(args, manifest, totals, cpu, phases)


def summarize_runs(
    args: argparse.Namespace, manifest: Any, totals: dict, cpu: dict, phases: dict
) -> dict[str, Any]:
    summary = {name: summarize(samples) for name, samples in totals.items()}
    floor_name = min(("floor_path", "floor_bytes"), key=lambda n: summary[n]["median"])
    floor = summary[floor_name]["median"]
    floor_session = statistics.median(
        s + i for s, i in zip(phases[floor_name]["session"], phases[floor_name]["first_infer"], strict=True)
    )
    parallel_floor = summary["parallel_get"]["median"] + floor_session
    # Each connection's parts wait for their first byte one after the other.
    waits = -(-math.ceil(manifest.stored.bytes / PART_BYTES) // args.connections) * args.first_byte_ms
    theory = (
        manifest.stored.bytes / (args.connections * args.mb_per_s * 1e6) * 1000 + waits + floor_session
        if args.mb_per_s
        else None
    )
    ours, single = summary["ours"]["median"], summary["single_stream"]["median"]
    # Per-round ratios too: a round's runs share the machine's load, so they are steadier.
    per_round = [
        o / min(p, b)
        for o, p, b in zip(totals["ours"], totals["floor_path"], totals["floor_bytes"], strict=True)
    ]
    return {
        "model": {
            "size_mb": args.size_mb,
            "hidden": hidden_for(args.size_mb),
            "layers": LAYERS,
            "model_bytes": manifest.model.bytes,
            "stored_bytes": manifest.stored.bytes,
            "compression": manifest.compression,
            "optimized": manifest.optimized,
        },
        "mb_per_s_per_connection": args.mb_per_s,
        "first_byte_ms": args.first_byte_ms,
        "connections": args.connections,
        "threads": args.threads,
        "rounds": args.rounds,
        "total_ms": summary,
        "phases_ms_median": {n: {p: statistics.median(v) for p, v in ph.items()} for n, ph in phases.items()},
        # This process's CPU time (all threads; the S3 child process is not counted).
        "cpu_ms_median": {n: statistics.median(v) for n, v in cpu.items()},
        "floor": floor_name,
        "floor_ms": floor,
        "floor_session_and_first_infer_ms": floor_session,
        "parallel_floor_ms": parallel_floor,
        "parallel_floor_theory_ms": theory,
        "ours_vs_floor": ours / floor,
        "ours_vs_floor_per_round_median": statistics.median(per_round),
        "ours_vs_parallel_floor": ours / parallel_floor,
        "single_stream_vs_ours": single / ours,
        "targets": {
            "ours_vs_floor_at_most": TARGET_VS_FLOOR,
            "ours_vs_parallel_floor_at_most": TARGET_VS_PARALLEL_FLOOR,
            "single_stream_vs_ours_at_least": TARGET_VS_SINGLE_STREAM,
        },
    }


def report(results: dict[str, Any]) -> str:
    model = results["model"]
    rate = results["mb_per_s_per_connection"]
    pace = f"paced {rate:g} MB/s per connection" if rate else "unpaced"
    lines = [
        f"cold start, {model['model_bytes'] / 1e6:.1f} MB model ({model['stored_bytes'] / 1e6:.1f} MB "
        f"{model['compression']}), loopback S3 {pace}, {results['connections']} connections, "
        f"{results['rounds']} rounds (median, p90):"
    ]
    for name, stats in results["total_ms"].items():
        parts = ", ".join(f"{p} {v:.0f}" for p, v in results["phases_ms_median"][name].items())
        cpu = results["cpu_ms_median"][name]
        lines.append(
            f"  {name:14s}{fmt_ms(stats['median'])}  p90 {stats['p90']:7.1f}  cpu {cpu:6.0f}   [{parts}]"
        )
    lines.append(
        f"  floor ({results['floor']}) {results['floor_ms']:.0f} ms; parallel floor "
        f"{results['parallel_floor_ms']:.0f} ms"
        + (
            f" (theory {results['parallel_floor_theory_ms']:.0f})"
            if results["parallel_floor_theory_ms"] is not None
            else ""
        )
    )
    lines.append(
        f"  ours / floor = {results['ours_vs_floor']:.2f}x (target <= {TARGET_VS_FLOOR}; per-round median "
        f"{results['ours_vs_floor_per_round_median']:.2f}x)"
    )
    lines.append(
        f"  ours / parallel floor = {results['ours_vs_parallel_floor']:.2f}x (target <= {TARGET_VS_PARALLEL_FLOOR})"
    )
    lines.append(
        f"  single_stream / ours = {results['single_stream_vs_ours']:.2f}x (target >= {TARGET_VS_SINGLE_STREAM})"
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--size-mb", type=float, default=100, help="model size, MB (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (Lambda at 2 GB has 1 vCPU)")
    parser.add_argument(
        "--mb-per-s",
        type=float,
        default=0.0,
        metavar="N",
        help="pace each S3 connection to N MB/s (one S3 connection from Lambda: about 90); 0: unpaced",
    )
    parser.add_argument(
        "--first-byte-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="hold each GET this long before its answer (S3 from Lambda: 10-30 ms); 0: none",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=8,
        help="ranged GETs at once: ours and the parallel floor (default 8)",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench cold_start", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    results = run(args)
    print(report(results), flush=True)
    name = (
        f"cold_start_{args.size_mb:g}mb"
        + (f"_{args.mb_per_s:g}mbps" if args.mb_per_s else "")
        + (f"_{args.first_byte_ms:g}msfirst" if args.first_byte_ms else "")
    )
    path = write_results(name, results)
    plot_bars(
        name,
        "cold start to first prediction (median ms)",
        {n: s["median"] for n, s in results["total_ms"].items()},
    )
    say(f"cold_start: results in {path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
