"""Test helper: real synchronous cross-CPU calls (see pkstrace.workload).

``workload_command(n)`` is the argv of a process that makes ``n`` calls from
CPU 0 to CPU 1 and prints ``{"pid": ..., "calls": ...}`` as its last line;
``workload_pid(stdout)`` reads that pid back, so a test can pick the workload's
own events out of a trace that also holds other processes' background calls.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from collections.abc import Iterator

from pkstrace.workload import CALLED_FUNC, available, cross_cpu_calls, summary

__all__ = ["CALLED_FUNC", "available", "cross_cpu_calls", "foreign_slow_bpf", "summary",
           "workload_command", "workload_pid"]

# Another tool's BPF program that runs long (with interrupts on) on every syscall of
# one process: IPIs sent to that CPU meanwhile hit the tracepoints while a BPF
# program runs there, and the kernel's recursion guard skips the other programs.
SLOW_BPF = r"""
TRACEPOINT_PROBE(raw_syscalls, sys_enter)
{
    if ((bpf_get_current_pid_tgid() >> 32) != SLOW_PID)
        return 1;
    u64 t0 = bpf_ktime_get_ns();
    for (int i = 0; i < 4000; i++) {
        if (bpf_ktime_get_ns() - t0 > 100000)
            break;
    }
    return 1;  // 0 would hide sys_enter from perf users meanwhile
}
"""
# Syscalls on CPU 0 until killed (a loop that stopped by itself could end while a
# loaded host still compiles the slow program: then it never runs).
SYSCALL_LOOP = "import os; os.sched_setaffinity(0, {0})\nwhile True: os.getppid()"


@contextlib.contextmanager
def foreign_slow_bpf() -> Iterator[None]:
    """A busy process on CPU 0 with SLOW_BPF running on its every syscall (needs bcc)."""
    from bcc import BPF

    busy = subprocess.Popen([sys.executable, "-c", SYSCALL_LOOP])
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            slow = BPF(text=SLOW_BPF, cflags=[f"-DSLOW_PID={busy.pid}"])
        try:
            yield
        finally:
            slow.cleanup()
    finally:
        busy.kill()
        busy.wait()


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
