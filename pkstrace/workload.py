"""A workload of real synchronous cross-CPU calls, for tests and benchmarks.

Each 16-byte ``os.pread`` on ``/dev/cpu/N/cpuid`` makes the kernel run
``smp_call_function_single(N, cpuid_smp_cpuid, ..., wait=1)``: a synchronous
cross-CPU call, the mechanism ``wrmsrl_on_cpu()`` uses. (A buffered ``read()``
would ask for 4 KiB and so issue 256 calls.)

    python -m pkstrace.workload --calls 200 --target-cpu 1 [--source-cpu 0] [--json]

prints the round-trip times. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence

CALLED_FUNC = "cpuid_smp_cpuid"  # what the csd events name as func


def cpuid_device(cpu: int) -> str:
    return f"/dev/cpu/{cpu}/cpuid"


def available(target_cpu: int = 1) -> bool:
    return os.path.exists(cpuid_device(target_cpu))


def default_source_cpu(target_cpu: int) -> int:
    cpus = sorted(os.sched_getaffinity(0))
    others = [c for c in cpus if c != target_cpu]
    return others[0] if others else target_cpu


def cross_cpu_calls(calls: int, target_cpu: int = 1, source_cpu: int | None = None,
                    gap_s: float = 0.0) -> list[int]:
    """Make ``calls`` synchronous calls to ``target_cpu`` from ``source_cpu``.

    The calling thread is pinned to ``source_cpu`` for the duration and its
    affinity restored afterwards. Returns each call's round trip in ns.
    """
    if source_cpu is None:
        source_cpu = default_source_cpu(target_cpu)
    path = cpuid_device(target_cpu)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise OSError(e.errno, f"cannot open {path}: {e.strerror} "
                      "(needs root and CONFIG_X86_CPUID)") from None
    old = os.sched_getaffinity(0)
    times = []
    try:
        os.sched_setaffinity(0, {source_cpu})
        clock = time.perf_counter_ns
        for _ in range(calls):
            t = clock()
            os.pread(fd, 16, 0)
            times.append(clock() - t)
            if gap_s:
                time.sleep(gap_s)
    finally:
        os.sched_setaffinity(0, old)
        os.close(fd)
    return times


def summary(times: Sequence[int]) -> dict[str, float]:
    """Round-trip statistics, and the pid that made the calls (what traces show)."""
    if not times:
        return {"pid": os.getpid(), "calls": 0}
    s = sorted(times)
    return {
        "pid": os.getpid(),
        "calls": len(s),
        "median_us": statistics.median(s) / 1e3,
        "p99_us": s[min(len(s) - 1, int(len(s) * 0.99))] / 1e3,
        "max_us": s[-1] / 1e3,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pkstrace.workload",
                                 description="Make N synchronous cross-CPU calls "
                                 "(16-byte preads of /dev/cpu/N/cpuid).")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--target-cpu", type=int, default=1)
    ap.add_argument("--source-cpu", type=int, default=None)
    ap.add_argument("--gap-ms", type=float, default=0.0, help="sleep between calls")
    ap.add_argument("--delay", type=float, default=0.0, help="wait SECONDS before starting")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--times", action="store_true",
                    help="with --json: also every call's round trip (round_trips_ns)")
    args = ap.parse_args(argv)
    if args.delay:
        time.sleep(args.delay)
    try:
        times = cross_cpu_calls(args.calls, args.target_cpu, args.source_cpu,
                                args.gap_ms / 1e3)
    except OSError as e:
        print(f"workload: error: {e.strerror or e}", flush=True)
        return 2
    s = summary(times)
    if args.json:
        print(json.dumps({**s, "round_trips_ns": times} if args.times else s))
    else:
        print(f"{s['calls']} calls to CPU {args.target_cpu}: "
              f"median {s.get('median_us', 0):.1f} us, p99 {s.get('p99_us', 0):.1f} us, "
              f"max {s.get('max_us', 0):.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
