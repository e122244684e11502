"""Run every benchmark one after the other (each in its own process), then regenerate docs/benchmarks.md.

    .venv/bin/python benchmarks/run_all.py             # full runs: about 20 minutes on a 2-core machine
    .venv/bin/python benchmarks/run_all.py --quick     # smoke test: about 2 minutes, numbers are noise

Run it on an otherwise idle machine: every latency is measured on one thread, and anything else running
shifts the medians (ratios, measured interleaved, suffer less).  A failing benchmark does not stop the others;
the exit status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("fuse_cost", "deploy_latency", "concat_vs_add", "latency_vs_macs", "fusion_accuracy")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (smoke test)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="output directory (default benchmarks/results)")
    p.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    p.add_argument("--no-summary", action="store_true", help="do not regenerate docs/benchmarks.md afterwards")
    args = p.parse_args(argv)

    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    status: dict[str, tuple[int, float]] = {}
    for name in names:
        cmd = [sys.executable, str(HERE / f"{name}.py"), "--out", str(args.out)] + (["--quick"] if args.quick else [])
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        status[name] = (rc, time.perf_counter() - t0)
    if not args.no_summary:
        cmd = [sys.executable, str(HERE / "summarize.py"), "--results", str(args.out)]
        print(f"\n=== summarize: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        status["summarize"] = (subprocess.call(cmd), time.perf_counter() - t0)
    print("\nbenchmark         status   time")
    for name, (rc, seconds) in status.items():
        print(f"{name:<16}  {'ok' if rc == 0 else f'FAILED ({rc})':<7}  {seconds:6.0f} s")
    return 0 if all(rc == 0 for rc, _ in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
