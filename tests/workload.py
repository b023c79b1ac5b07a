"""Test helper: real synchronous cross-CPU calls (see pkstrace.workload).

``workload_command(n)`` is the argv of a process that makes ``n`` calls from
CPU 0 to CPU 1 and prints ``{"pid": ..., "calls": ...}`` as its last line;
``workload_pid(stdout)`` reads that pid back, so a test can pick the workload's
own events out of a trace that also holds other processes' background calls.
"""

from __future__ import annotations

import json
import sys

from pkstrace.workload import CALLED_FUNC, available, cross_cpu_calls, summary

__all__ = ["CALLED_FUNC", "available", "cross_cpu_calls", "summary", "workload_command",
           "workload_pid"]


def workload_command(calls: int, target_cpu: int = 1, source_cpu: int = 0,
                     delay: float = 0.0) -> list[str]:
    cmd = [sys.executable, "-m", "pkstrace.workload", "--calls", str(calls),
           "--target-cpu", str(target_cpu), "--source-cpu", str(source_cpu), "--json",
           "--times"]
    if delay:
        cmd += ["--delay", str(delay)]
    return cmd


def workload_result(stdout: str) -> dict:
    """The workload's JSON summary line: pid, calls, round_trips_ns (in call order)."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and '"pid"' in line:
            return json.loads(line)
    raise AssertionError(f"no workload summary in output: {stdout[-300:]!r}")


def workload_pid(stdout: str) -> int:
    return int(workload_result(stdout)["pid"])
