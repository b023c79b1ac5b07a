#!/usr/bin/env python3
"""Cost of a synchronous cross-CPU call on this host -> benchmarks/results/ipi.json.

A thin wrapper around `pkstrace bench ipi` (pkstrace/bench/ipi.py): the result file
is a calibration document that `pkstrace replay --calibration` also accepts.
Needs root (opens /dev/cpu/N/cpuid). `--smoke`: 50 calls per measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pkstrace.bench import ipi  # noqa: E402
from pkstrace.bench.common import write_json_atomic, write_text_atomic  # noqa: E402
from pkstrace.errors import PkstraceError  # noqa: E402

# run_all.py --results-dir passes its directory down in PKSTRACE_BENCH_RESULTS.
RESULTS = Path(os.environ.get("PKSTRACE_BENCH_RESULTS")
               or Path(__file__).resolve().parent / "results")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny run for CI")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    iterations = 50 if a.smoke else 2000
    try:
        doc = ipi.run(iterations=iterations, warmup=10 if a.smoke else 50,
                      progress=lambda m: print(f"bench_ipi: {m}", file=sys.stderr))
    except PkstraceError as e:
        print(f"bench_ipi: error: {e}", file=sys.stderr)
        return 2
    doc["smoke"] = a.smoke
    doc["command"] = ["python", "benchmarks/bench_ipi.py"] + (["--smoke"] if a.smoke else [])
    a.results_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.results_dir / "ipi.json", doc)
    write_text_atomic(a.results_dir / "ipi.html", ipi.render_html(doc))
    print(ipi.format_table(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
