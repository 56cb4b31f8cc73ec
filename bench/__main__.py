"""``python -m bench``: the issue-2 benchmarks (cold start, warm overhead, tensor encoding).

    python -m bench                          # all three, default sizes
    python -m bench cold_start --rounds 15   # one, with its own options
    python -m bench tensor_encoding --help

Figures go to stdout, JSON (and a PNG when matplotlib is installed) to bench/results/.
Other benchmarks in this folder run on their own (``python -m bench.<module>``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bench.common import say

# name -> (module, one line); the issue-2 set, run in this order by a bare ``python -m bench``.
BENCHMARKS = {
    "cold_start": (
        "bench.cold_start",
        "cold start to first prediction, ~100 MB model: ours vs the floors and the old single-stream loader",
    ),
    "warm_overhead": ("bench.warm_overhead", "Lambda handler overhead over a bare session.run (iris)"),
    "tensor_encoding": ("bench.tensor_encoding", "binary vs JSON tensors for a 1x3x224x224 FP32 input"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run the issue-2 benchmarks: all of them, or one with its own options.",
        epilog="benchmarks:\n"
        + "\n".join(f"  {name:16s} {line}" for name, (_, line) in BENCHMARKS.items())
        + "\n\n"
        + "each takes its own options after its name: python -m bench cold_start --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("benchmark", nargs="?", choices=tuple(BENCHMARKS), help="run only this one")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="options for that benchmark")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.benchmark:
        importlib.import_module(BENCHMARKS[args.benchmark][0]).main(args.options)
        return 0
    if args.options:
        build_parser().error(
            "options need a benchmark name first, e.g. python -m bench cold_start --rounds 5"
        )
    for name, (module, line) in BENCHMARKS.items():
        say(f"== {name}: {line}")
        importlib.import_module(module).main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
