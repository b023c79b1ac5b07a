#!/usr/bin/env python3
"""The tracer's own overhead beside bpftrace and perf -> benchmarks/results/overhead.json.

A thin wrapper around `pkstrace bench overhead` (pkstrace/bench/overhead.py).
Needs root (attaches tracers). Full: 5 slowdown runs and 3 BPF-accounting runs of
50 000 calls per tracer; `--smoke`: 1 run each of 1 000 calls.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pkstrace.bench import overhead  # noqa: E402
from pkstrace.bench.common import write_json_atomic  # noqa: E402
from pkstrace.errors import PkstraceError  # noqa: E402

# run_all.py --results-dir passes its directory down in PKSTRACE_BENCH_RESULTS.
RESULTS = Path(os.environ.get("PKSTRACE_BENCH_RESULTS")
               or Path(__file__).resolve().parent / "results")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny run for CI")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    runs, bpf_runs, calls = (1, 1, 1000) if a.smoke else (5, 3, 50_000)
    try:
        doc = overhead.run(runs=runs, bpf_runs=bpf_runs, calls=calls,
                           progress=lambda m: print(f"bench_overhead: {m}", file=sys.stderr))
    except PkstraceError as e:
        print(f"bench_overhead: error: {e}", file=sys.stderr)
        return 2
    doc["smoke"] = a.smoke
    doc["command"] = ["python", "benchmarks/bench_overhead.py"] + (["--smoke"] if a.smoke else [])
    a.results_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.results_dir / "overhead.json", doc)
    print(overhead.format_table(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
