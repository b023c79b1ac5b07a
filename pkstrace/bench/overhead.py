"""What tracing costs: pkstrace's backends beside bpftrace and perf, on one workload.

The workload is a tight loop of synchronous cross-CPU calls (16-byte ``pread`` of
``/dev/cpu/T/cpuid`` from CPU S): each call fires csd_queue_cpu, ipi_send_cpu,
write_msr (x2APIC ICR), call_function_single entry/exit and csd_function
entry/exit on the way there, the same again for the wake-up IPI that brings the
sleeping caller back (``sched_ttwu_pending``), and sched_switch on both CPUs:
10-18 events per call (varies with idle states and load), i.e. a few hundred
thousand events per second untraced.

Every tracer wraps the same workload command, the way a user runs it
(``bpftrace -c CMD``, ``perf record -a -- CMD``, ``pkstrace record -- CMD``), so
each tool's own attach logic decides when the workload starts. The workload times
its own loop, so tracer start-up and tear-down are not counted.

Two independent measures:

1. Kernel BPF accounting (BPF-based tracers only): with run-time statistics on
   (``BPF_ENABLE_STATS``, the fd form of ``sysctl kernel.bpf_stats_enabled=1``,
   which switches off again when the fd closes, even if we are killed), the
   workload reads ``run_time_ns`` / ``run_cnt`` of its tracer's BPF programs
   (``/proc/PID/fdinfo``: the counters ``bpftool prog show --json`` prints) just
   before and after its loop: nanoseconds per event inside the BPF programs.
2. Workload slowdown (every tracer, statistics off): the median call traced
   minus untraced, divided by events per call (the cost added in the kernel;
   robust to the stalls other work on a shared host causes), and the same from
   the mean call ("all in": also the CPU the tracer's reader takes from the
   workload); and the ratios to the untraced run.
   Each traced run is paired with an untraced run just before it (the host is
   shared and its load drifts); several rounds, order rotated; medians of pairs.

Targets from the issue: pkstrace counts mode <= half of bpftrace count()'s cost
per event; events mode <= bpftrace count(); zero lost events at >= 100k events/s.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pkstrace.errors import InputError, KernelFeatureError, PrivilegeError

RESULT_KIND = "pkstrace-bench-overhead"
RESULT_VERSION = 1
TARGET_EVENT_RATE = 100_000  # events/s at which no event may be lost

Progress = Callable[[str], None]


def tracepoints() -> list[str]:
    """The tracepoints `pkstrace record` attaches by default ("system:event")."""
    from pkstrace import schema

    return [f"{sysname}:{ev}" for ev, sysname in schema.TRACEPOINT_SYSTEMS.items()
            if ev != "read_msr"]


# ---------------------------------------------------------------------------
# BPF program accounting
# ---------------------------------------------------------------------------

FDINFO_COUNTERS = ("run_time_ns", "run_cnt", "recursion_misses")


def bpf_prog_fdinfo(pid: int) -> dict[int, dict[str, int]]:
    """prog_id -> the counters of FDINFO_COUNTERS the kernel shows (``recursion_misses``
    since Linux 5.12) for every BPF program ``pid`` holds open: what `bpftool prog show
    --json` prints for them."""
    out: dict[int, dict[str, int]] = {}
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return out
    for fd in fds:
        try:
            if os.readlink(f"{fd_dir}/{fd}") != "anon_inode:bpf-prog":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # closed meanwhile
        try:
            out[int(info["prog_id"])] = {k: int(info[k]) for k in FDINFO_COUNTERS if k in info}
        except (KeyError, ValueError):
            continue
    return out


BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
# Programs that run on every hit of their tracepoint but act for another program
# only when the kernel skipped it (probes/pkstrace.bpf.c: write_msr's twin): their
# runs are not events. By the kernel's program name (15 characters at most).
HELPER_PROGRAMS = ("twin_write_msr",)


def bpf_prog_name(prog_id: int) -> str:
    """The kernel's name of BPF program ``prog_id`` ("" if it cannot be read)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    attr = ctypes.create_string_buffer(16)
    ctypes.memmove(attr, prog_id.to_bytes(4, "little"), 4)
    fd = int(libc.syscall(SYS_BPF, BPF_PROG_GET_FD_BY_ID, attr, len(attr)))
    if fd < 0:
        return ""
    try:
        info = ctypes.create_string_buffer(96)  # struct bpf_prog_info up to its name
        attr = ctypes.create_string_buffer(16)
        ctypes.memmove(attr, fd.to_bytes(4, "little") + len(info).to_bytes(4, "little")
                       + ctypes.addressof(info).to_bytes(8, "little"), 16)
        if libc.syscall(SYS_BPF, BPF_OBJ_GET_INFO_BY_FD, attr, len(attr)) < 0:
            return ""
        return info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    finally:
        os.close(fd)


def bpf_prog_stats(pid: int) -> dict[int, tuple[int, int]]:
    """prog_id -> (run_time_ns, run_cnt) for every BPF program ``pid`` holds open."""
    return {i: (c["run_time_ns"], c["run_cnt"]) for i, c in bpf_prog_fdinfo(pid).items()
            if "run_time_ns" in c and "run_cnt" in c}


def recursion_misses(counters: dict[int, dict[str, int]]) -> int | None:
    """Total recursion-guard misses of these programs (None: the kernel does not say).

    A miss is a run the kernel skipped because a BPF program was already running on
    that CPU: an event the tracer never saw. bpftrace reports none of them itself,
    so they are its lost events, like for like with pkstrace's (which counts its own
    under CPU -1)."""
    vals = [c["recursion_misses"] for c in counters.values() if "recursion_misses" in c]
    return sum(vals) if vals else None


def find_bpf_holder(start_pid: int, stop_pid: int) -> int | None:
    """The nearest ancestor of ``start_pid`` (below ``stop_pid``) holding BPF programs."""
    pid = start_pid
    for _ in range(16):
        if pid <= 1 or pid == stop_pid:
            return None
        if bpf_prog_stats(pid):
            return pid
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
    return None


BPF_ENABLE_STATS = 32  # bpf(2) command
BPF_STATS_RUN_TIME = 0
SYS_BPF = 321  # x86-64


@contextlib.contextmanager
def bpf_run_time_stats() -> Iterator[str]:
    """Turn BPF run-time statistics on for the duration; always back off after.

    Uses BPF_ENABLE_STATS (an fd that holds the statistics on): closing it, or our
    death, switches them off again, and the ``kernel.bpf_stats_enabled`` sysctl is
    never touched. Falls back to the sysctl (restored afterwards) where the
    command is missing. Yields how statistics were enabled.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    attr = (ctypes.c_uint32 * 36)()  # union bpf_attr, zeroed; enable_stats.type first
    attr[0] = BPF_STATS_RUN_TIME
    fd = int(libc.syscall(SYS_BPF, BPF_ENABLE_STATS, ctypes.byref(attr), 4))
    if fd >= 0:
        try:
            yield "BPF_ENABLE_STATS fd"
        finally:
            os.close(fd)
        return
    err = ctypes.get_errno()
    if err == 1:
        raise PrivilegeError("enabling BPF statistics needs root (CAP_SYS_ADMIN)")
    sysctl = Path("/proc/sys/kernel/bpf_stats_enabled")
    try:
        before = sysctl.read_text().strip()
        sysctl.write_text("1")
    except OSError as e:
        raise KernelFeatureError(f"cannot enable BPF statistics: {e.strerror}") from None
    try:
        yield "sysctl kernel.bpf_stats_enabled=1 (restored after)"
    finally:
        sysctl.write_text(before)


# ---------------------------------------------------------------------------
# The workload (runs as a child of each tracer)
# ---------------------------------------------------------------------------

def workload_command(calls: int, source_cpu: int, target_cpu: int, result: Path,
                     bench_pid: int) -> list[str]:
    return [sys.executable, "-m", "pkstrace.bench.overhead", "--workload",
            "--calls", str(calls), "--source-cpu", str(source_cpu),
            "--target-cpu", str(target_cpu), "--result", str(result),
            "--bench-pid", str(bench_pid)]


def run_workload(calls: int, source_cpu: int, target_cpu: int,
                 bench_pid: int) -> dict[str, Any]:
    """Time ``calls`` synchronous cross-CPU calls; BPF counters of our tracer around them."""
    os.sched_setaffinity(0, {source_cpu})
    fd = os.open(f"/dev/cpu/{target_cpu}/cpuid", os.O_RDONLY)
    try:
        for _ in range(min(200, calls)):  # warm caches and the idle target's path
            os.pread(fd, 16, 0)
        holder = find_bpf_holder(os.getppid(), bench_pid)
        before = bpf_prog_fdinfo(holder) if holder else {}
        pread, clock = os.pread, time.perf_counter_ns
        stamps = np.empty(calls + 1, dtype=np.int64)
        stamps[0] = clock()
        for i in range(1, calls + 1):
            pread(fd, 16, 0)
            stamps[i] = clock()
        after = bpf_prog_fdinfo(holder) if holder else {}
    finally:
        os.close(fd)
    per_call = np.diff(stamps)
    ids = sorted(i for i in set(before) & set(after)
                 if "run_cnt" in after[i] and "run_cnt" in before[i])
    helpers = [i for i in ids if bpf_prog_name(i) in HELPER_PROGRAMS]
    runs = sum(after[i]["run_cnt"] - before[i]["run_cnt"] for i in ids)
    helper_runs = sum(after[i]["run_cnt"] - before[i]["run_cnt"] for i in helpers)
    # A helper's own skips are not events lost (the program it stands in for ran).
    misses_after = recursion_misses({i: c for i, c in after.items() if i not in helpers})
    misses_before = recursion_misses({i: c for i, c in before.items() if i not in helpers})
    return {
        "calls": calls,
        "elapsed_ns": int(stamps[-1] - stamps[0]),
        # The median call is what tracing adds inside the kernel; the mean
        # (elapsed / calls) also carries the CPU the tracer's reader takes from
        # the workload, and every stall other work on the host causes.
        "median_ns_per_call": float(np.median(per_call)),
        "p90_ns_per_call": float(np.percentile(per_call, 90)),
        "bpf_holder_pid": holder,
        "bpf_progs": len(ids),
        # All programs' time (a helper's too: it is part of the cost) over the events:
        # the runs of the programs that record (a helper's runs are not events).
        "bpf_run_time_ns": sum(after[i]["run_time_ns"] - before[i]["run_time_ns"] for i in ids),
        "bpf_run_cnt": runs - helper_runs,
        "bpf_helper_run_cnt": helper_runs,
        # Recursion-guard misses of the tracer's programs: in the timed loop, and
        # since they were loaded (up to the loop's end: the tracer's whole run but
        # its last moments, as its own lost count covers).
        "bpf_recursion_misses": (misses_after - misses_before
                                 if misses_after is not None and misses_before is not None
                                 else None),
        "bpf_recursion_misses_since_load": misses_after,
    }


def _workload_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pkstrace.bench.overhead --workload")
    p.add_argument("--workload", action="store_true", required=True)
    p.add_argument("--calls", type=int, required=True)
    p.add_argument("--source-cpu", type=int, required=True)
    p.add_argument("--target-cpu", type=int, required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--bench-pid", type=int, default=0)
    a = p.parse_args(argv)
    res = run_workload(a.calls, a.source_cpu, a.target_cpu, a.bench_pid)
    Path(a.result).write_text(json.dumps(res))
    return 0


# ---------------------------------------------------------------------------
# Tracers
# ---------------------------------------------------------------------------

@dataclass
class RunOutcome:
    events: int | None = None  # events the tracer recorded / counted (whole run)
    lost: int | None = None  # events the tracer says it lost
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Tracer:
    """One way of tracing the workload. ``kind``: untraced, bpftrace, perf, pkstrace."""

    key: str  # short name for --tracers
    name: str
    kind: str
    uses_bpf: bool = False
    backend: str = ""
    mode: str = ""
    options: tuple[str, ...] = ()  # more `pkstrace record` options

    def unavailable(self) -> str:
        """Why this tracer cannot run here ("" = it can)."""
        if self.kind == "bpftrace" and not shutil.which("bpftrace"):
            return "bpftrace is not installed (apt-get install bpftrace)"
        if self.kind == "perf" and not shutil.which("perf"):
            return "perf is not installed (apt-get install linux-perf)"
        if self.kind == "pkstrace":
            try:
                import pkstrace.commands.record  # noqa: F401
            except ImportError as e:
                return f"pkstrace record is not available in this build ({e})"
        return ""

    def command(self, tps: list[str], workload: list[str], workdir: Path) -> list[str]:
        if self.kind == "untraced":
            return workload
        if self.kind == "bpftrace":
            probes = ",".join(f"tracepoint:{tp}" for tp in tps)
            action = {"empty": "{ }", "unkeyed": "{ @ = count(); }"}.get(
                self.mode, "{ @[probe, cpu] = count(); }")
            return ["bpftrace", "-e", f"{probes} {action}", "-c", " ".join(workload)]
        if self.kind == "perf":
            events = [a for tp in tps for a in ("-e", tp)]
            return ["perf", "record", "-q", "-a", *events, "-o", str(workdir / "perf.data"),
                    "--", *workload]
        if self.kind == "pkstrace":
            return [sys.executable, "-m", "pkstrace", "record", "--backend", self.backend,
                    "--mode", self.mode, *self.options, "-o", str(workdir / "trace.pkstrace"),
                    "--force", "--", *workload]
        raise ValueError(self.kind)

    def outcome(self, stdout: str, workdir: Path) -> RunOutcome:
        if self.kind == "bpftrace":
            return _bpftrace_outcome(stdout)
        if self.kind == "perf":
            return _perf_outcome(workdir / "perf.data")
        if self.kind == "pkstrace":
            return _pkstrace_outcome(workdir / "trace.pkstrace")
        return RunOutcome()


def default_tracers() -> list[Tracer]:
    return [
        Tracer("untraced", "untraced", "untraced"),
        Tracer("bpftrace", "bpftrace count()", "bpftrace", uses_bpf=True),
        # The floor: an empty BPF program on the same tracepoints costs the
        # tracepoint-to-BPF dispatch and the accounting itself, nothing else.
        Tracer("bpf-floor", "bpftrace empty program", "bpftrace", uses_bpf=True, mode="empty"),
        Tracer("perf", "perf record", "perf"),
        Tracer("tracefs", "pkstrace tracefs events", "pkstrace", backend="tracefs",
               mode="events"),
        Tracer("pkstrace-perf", "pkstrace perf events", "pkstrace", backend="perf",
               mode="events"),
        Tracer("bcc-events", "pkstrace bcc events", "pkstrace", uses_bpf=True, backend="bcc",
               mode="events"),
        Tracer("bcc-counts", "pkstrace bcc counts", "pkstrace", uses_bpf=True, backend="bcc",
               mode="counts"),
    ]


def extra_tracers() -> list[Tracer]:
    """References run only when asked for (``--tracers``)."""
    # One counter for everything: what a minimal in-kernel count costs here.
    return [Tracer("bpftrace-unkeyed", "bpftrace count() unkeyed", "bpftrace", uses_bpf=True,
                   mode="unkeyed"),
            # The events path of kernels before 5.8 (perf rings), on this kernel.
            Tracer("bcc-events-perfbuf", "pkstrace bcc events perfbuf", "pkstrace",
                   uses_bpf=True, backend="bcc", mode="events",
                   options=("--bpf-buffer", "perf")),
            # Classic tracepoint programs (one global recursion guard), against the
            # default raw tracepoints: the A/B of --bpf-attach.
            Tracer("bcc-events-tp", "pkstrace bcc events classic tp", "pkstrace",
                   uses_bpf=True, backend="bcc", mode="events", options=("--bpf-attach", "tp")),
            Tracer("bcc-counts-tp", "pkstrace bcc counts classic tp", "pkstrace",
                   uses_bpf=True, backend="bcc", mode="counts", options=("--bpf-attach", "tp"))]


def select_tracers(keys: list[str]) -> list[Tracer]:
    """Tracers by short name (``untraced``, ``bpftrace``, ...); InputError for unknown ones."""
    by_key = {t.key: t for t in default_tracers() + extra_tracers()}
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise InputError(f"unknown tracer(s) {unknown}; choose from {', '.join(by_key)}")
    return [by_key[k] for k in dict.fromkeys(keys)]


def _bpftrace_outcome(stdout: str) -> RunOutcome:
    # Lines like "@[tracepoint:msr:write_msr, 1]: 19359".
    per_probe: dict[str, int] = {}
    total = 0
    for line in stdout.splitlines():
        if not line.startswith("@["):
            continue
        key, _, count = line.rpartition("]: ")
        probe = key[2:].split(",")[0].removeprefix("tracepoint:")
        try:
            n = int(count)
        except ValueError:
            continue
        per_probe[probe] = per_probe.get(probe, 0) + n
        total += n
    return RunOutcome(events=total, lost=0, detail={"per_probe": per_probe})


def _perf_outcome(data: Path) -> RunOutcome:
    res = subprocess.run(["perf", "report", "-i", str(data), "--stats"],
                         capture_output=True, text=True, timeout=300, check=False)
    samples = lost_records = None
    for line in res.stdout.splitlines():
        key, _, rest = line.strip().partition(":")
        if samples is None and key == "SAMPLE events":
            samples = int(rest.split()[0])
        elif lost_records is None and key in ("LOST events", "LOST_SAMPLES events"):
            lost_records = int(rest.split()[0])
    lost = 0
    if lost_records:
        # Each LOST record carries a count of lost samples; sum them.
        dump = subprocess.run(["perf", "script", "-i", str(data), "--show-lost-events",
                               "-F", "event"], capture_output=True, text=True, timeout=600,
                              check=False)
        for line in dump.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "LOST" and parts[1].isdigit():
                lost += int(parts[1])
        lost = max(lost, lost_records)
    return RunOutcome(events=samples, lost=lost,
                      detail={"lost_records": lost_records or 0,
                              "data_bytes": data.stat().st_size if data.exists() else 0})


def _pkstrace_outcome(path: Path) -> RunOutcome:
    from pkstrace import tracefile

    if not path.exists():
        return RunOutcome(detail={"error": "no trace written"})
    trace = tracefile.read_trace(path)
    meta = trace.meta
    events = len(trace.events)
    if meta.mode == "counts":
        counted = _aggregate_count(meta.aggregates)
        if counted is not None:
            events = counted
    attached = sorted(p["name"] for p in meta.probes if p.get("attached"))
    bcc = meta.extra.get("bcc", {})
    attach = bcc.get("attach", {})
    return RunOutcome(events=events, lost=int(sum(meta.lost_events.values())),
                      detail={"mode": meta.mode, "rows": len(trace.events),
                              "attached": attached, "partial": meta.partial,
                              # bcc: its own count, part of `lost` (under CPU -1)
                              "recursion_misses": sum(bcc.get("recursion_misses", {}).values()),
                              # ... per program (which tracepoint's runs were skipped)
                              "recursion_misses_by_program": bcc.get("recursion_misses", {}),
                              "bpf_buffer": bcc.get("buffer", ""),
                              # tracepoints attached raw / classic (--bpf-attach)
                              "bpf_attach_raw": attach.get("raw", []),
                              "bpf_attach_classic": sorted(attach.get("classic", {}))})


def _aggregate_count(aggregates: dict[str, Any]) -> int | None:
    """Total events in a counts-mode trace's aggregates ({"per_cpu": [{..., count}]})."""
    rows = aggregates.get("per_cpu")
    if not isinstance(rows, list):
        return None
    try:
        return int(sum(int(r["count"]) for r in rows))
    except (KeyError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------

def _run_once(tracer: Tracer, tps: list[str], calls: int, source_cpu: int, target_cpu: int,
              timeout_s: float) -> dict[str, Any]:
    """One traced (or untraced) run of the workload; the tracer is always stopped."""
    with tempfile.TemporaryDirectory(prefix="pkstrace-bench-") as tmp:
        workdir = Path(tmp)
        result = workdir / "workload.json"
        cmd = tracer.command(tps, workload_command(calls, source_cpu, target_cpu, result,
                                                   os.getpid()), workdir)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except BaseException:
            # Ctrl-C or timeout: stop the tracer as a user would (SIGINT), so it
            # detaches its probes; then make sure.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
            raise
        wall = time.monotonic() - t0
        load1 = os.getloadavg()[0]
        if not result.exists():
            tail = (stderr or stdout).strip().splitlines()[-3:]
            return {"ok": False, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
        run = json.loads(result.read_text())
        outcome = tracer.outcome(stdout, workdir)
        if tracer.kind == "bpftrace":
            # bpftrace reports no loss; the runs its programs' recursion guard skipped
            # are the events it missed (None where the kernel does not count them).
            outcome.lost = run.get("bpf_recursion_misses_since_load")
        run.update({"ok": True, "tracer_exit": proc.returncode, "wall_s": round(wall, 3),
                    "loadavg_1min": round(load1, 2),
                    "events": outcome.events, "lost": outcome.lost, "detail": outcome.detail})
        return run


def _median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.median(vals)) if vals else None


def run(tracers: list[Tracer] | None = None, runs: int = 5, bpf_runs: int = 3,
        calls: int = 50_000, source_cpu: int = 0, target_cpu: int = 1,
        timeout_s: float = 600, progress: Progress | None = None) -> dict[str, Any]:
    """Run the whole comparison and return the result document."""
    from pkstrace.bench.common import git_revision, host_facts

    if os.geteuid() != 0:
        raise PrivilegeError("bench overhead attaches tracers to the kernel: run as root")
    if calls < 1 or runs < 1 or bpf_runs < 0:
        raise InputError("--calls and --runs must be at least 1")
    if source_cpu == target_cpu:
        raise InputError("source and target CPU must differ (the workload is cross-CPU)")
    allowed = os.sched_getaffinity(0)
    for c in (source_cpu, target_cpu):
        if c not in allowed:
            raise InputError(f"CPU {c} is not online or not allowed for this process")
    if not os.path.exists(f"/dev/cpu/{target_cpu}/cpuid"):
        raise KernelFeatureError(f"/dev/cpu/{target_cpu}/cpuid is missing (CONFIG_X86_CPUID)")
    say = progress or (lambda _msg: None)
    tracers = list(tracers if tracers is not None else default_tracers())
    if not any(t.kind == "untraced" for t in tracers):
        tracers.insert(0, Tracer("untraced", "untraced", "untraced"))
    tps = tracepoints()
    notes: list[str] = []
    skipped = {t.name: t.unavailable() for t in tracers}
    active = [t for t in tracers if not skipped[t.name]]
    stats_runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in active}
    slow_runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in active}
    errors: dict[str, list[str]] = {t.name: [] for t in active}

    bpf_tracers = [t for t in active if t.uses_bpf]
    stats_how = ""
    if bpf_tracers and bpf_runs:
        with bpf_run_time_stats() as stats_how:
            for r in range(bpf_runs):
                for t in bpf_tracers:
                    say(f"bpf accounting run {r + 1}/{bpf_runs}: {t.name}")
                    res = _run_once(t, tps, calls, source_cpu, target_cpu, timeout_s)
                    (stats_runs if res["ok"] else errors)[t.name].append(
                        res if res["ok"] else res["error"])
    stats_after = Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip()
    if stats_after != "0":
        notes.append("kernel.bpf_stats_enabled was on during the slowdown runs (set by "
                     "someone else): BPF tracers' slowdown includes the accounting")

    untraced = next(t for t in active if t.kind == "untraced")
    traced = [t for t in active if t.kind != "untraced"]
    for r in range(runs):
        # Each traced run is paired with an untraced run just before it, and the
        # order rotates each round: load from other work on a shared host drifts
        # over minutes, and a pair sees nearly the same load.
        order = traced[r % len(traced):] + traced[:r % len(traced)] if traced else []
        for t in order or [untraced]:
            say(f"slowdown run {r + 1}/{runs}: untraced (baseline for {t.name})")
            base = _run_once(untraced, tps, calls, source_cpu, target_cpu, timeout_s)
            if not base["ok"]:
                errors[untraced.name].append(base["error"])
                continue
            slow_runs[untraced.name].append(base)
            if t is untraced:
                continue
            say(f"slowdown run {r + 1}/{runs}: {t.name}")
            res = _run_once(t, tps, calls, source_cpu, target_cpu, timeout_s)
            if res["ok"]:
                res["baseline"] = {k: base[k] for k in ("calls", "elapsed_ns",
                                                        "median_ns_per_call")}
                slow_runs[t.name].append(res)
            else:
                errors[t.name].append(res["error"])

    # Events per call: from BPF run counts inside the workload window (bpftrace
    # sees every tracepoint hit, nothing else), else from recorded events / calls.
    epc_samples = [r["bpf_run_cnt"] / r["calls"] for r in stats_runs.get("bpftrace count()", [])
                   if r["bpf_run_cnt"]]
    epc_source = "bpftrace run_cnt in the workload window"
    if not epc_samples:
        epc_samples = [r["events"] / r["calls"] for name, rs in slow_runs.items() for r in rs
                       if r.get("events") and name == "bpftrace count()"]
        epc_source = "bpftrace counts over the whole run / calls"
    events_per_call = _median(epc_samples)

    base_ns_per_call = _median([r["median_ns_per_call"] for r in slow_runs["untraced"]])
    rows = []
    for t in tracers:
        row: dict[str, Any] = {"key": t.key, "name": t.name, "kind": t.kind, "backend": t.backend,
                               "mode": t.mode, "uses_bpf": t.uses_bpf}
        if skipped[t.name]:
            row.update({"available": False, "skip_reason": skipped[t.name]})
            rows.append(row)
            continue
        row["available"] = True
        row["errors"] = errors[t.name]
        srs = stats_runs[t.name]
        if t.uses_bpf:
            per_ev = [r["bpf_run_time_ns"] / r["bpf_run_cnt"] for r in srs if r["bpf_run_cnt"]]
            row["bpf_stats"] = {
                "ns_per_event_runs": [round(v, 1) for v in per_ev],
                "ns_per_event_p50": _median(per_ev),
                "progs": max((r["bpf_progs"] for r in srs), default=0),
                "run_cnt_per_call_runs": [round(r["bpf_run_cnt"] / r["calls"], 3) for r in srs],
                # runs of helper programs (not events; their time is in ns_per_event)
                "helper_run_cnt_runs": [r.get("bpf_helper_run_cnt", 0) for r in srs],
            }
        ns_call = [r["median_ns_per_call"] for r in slow_runs[t.name]]
        mean_call = [r["elapsed_ns"] / r["calls"] for r in slow_runs[t.name]]
        med = _median(ns_call)
        slowdown: dict[str, Any] = {
            "ns_per_call_runs": [round(v, 1) for v in ns_call],  # median call of each run
            "ns_per_call_p50": med,
            "mean_ns_per_call_runs": [round(v, 1) for v in mean_call],
            "mean_ns_per_call_p50": _median(mean_call),
        }
        if t.kind != "untraced" and slow_runs[t.name]:
            # Median call: the cost tracing adds in the kernel per call.
            pairs = [(r["median_ns_per_call"], r["baseline"]["median_ns_per_call"])
                     for r in slow_runs[t.name]]
            # Mean call: all in, including the CPU the tracer's reader takes.
            mean_pairs = [(r["elapsed_ns"] / r["calls"],
                           r["baseline"]["elapsed_ns"] / r["baseline"]["calls"])
                          for r in slow_runs[t.name]]
            slowdown["baseline_ns_per_call_runs"] = [round(b, 1) for _, b in pairs]
            slowdown["ratio_runs"] = [round(v / b, 3) for v, b in pairs]
            slowdown["ratio_to_untraced"] = _median([v / b for v, b in pairs])
            slowdown["mean_ratio_runs"] = [round(v / b, 3) for v, b in mean_pairs]
            slowdown["mean_ratio_to_untraced"] = _median([v / b for v, b in mean_pairs])
            if events_per_call:
                per_ev = [(v - b) / events_per_call for v, b in pairs]
                slowdown["overhead_ns_per_event_runs"] = [round(x, 1) for x in per_ev]
                slowdown["overhead_ns_per_event"] = _median(per_ev)
                all_in = [(v - b) / events_per_call for v, b in mean_pairs]
                slowdown["all_in_ns_per_event_runs"] = [round(x, 1) for x in all_in]
                slowdown["all_in_ns_per_event"] = _median(all_in)
        row["slowdown"] = slowdown
        if t.uses_bpf:
            runs_all = slow_runs[t.name] + srs
            since_load = [r.get("bpf_recursion_misses_since_load") for r in runs_all]
            known = [m for m in since_load if m is not None]
            row["recursion_misses"] = {
                "in_workload_runs": [r.get("bpf_recursion_misses") for r in runs_all],
                "since_load_runs": since_load,
                "total": int(sum(known)) if known else None,
            }
        if t.kind != "untraced":
            evs = [r["events"] for r in slow_runs[t.name] + srs if r.get("events") is not None]
            lost = [r["lost"] for r in slow_runs[t.name] + srs if r.get("lost") is not None]
            # The workload's own event rate under this tracer (events it generated
            # per call x calls / its run time); background traffic only adds to it.
            if events_per_call:
                rates = [events_per_call * r["calls"] / (r["elapsed_ns"] / 1e9)
                         for r in slow_runs[t.name]]
            else:
                rates = [r["events"] / (r["elapsed_ns"] / 1e9) for r in slow_runs[t.name]
                         if r.get("events")]
            row["events_runs"] = evs
            row["lost_runs"] = lost
            row["lost_total"] = int(sum(lost)) if lost else None
            row["event_rate_per_s_p50"] = _median(rates)
            row["events_per_call_p50"] = _median(
                [r["events"] / r["calls"] for r in slow_runs[t.name] if r.get("events")])
            row["detail"] = (slow_runs[t.name] or srs or [{}])[-1].get("detail", {})
        rows.append(row)

    doc = {
        "kind": RESULT_KIND,
        "version": RESULT_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_rev": git_revision(),
        "host": host_facts(),
        "command": ["pkstrace", "bench", "overhead", "--runs", str(runs), "--bpf-runs",
                    str(bpf_runs), "--calls", str(calls)],
        "workload": {
            "description": f"{calls} x 16-byte pread of /dev/cpu/{target_cpu}/cpuid "
                           f"pinned to CPU {source_cpu} (cpuid_smp_cpuid on CPU {target_cpu}; "
                           "the caller sleeps until the target wakes it)",
            "calls": calls, "source_cpu": source_cpu, "target_cpu": target_cpu,
            "untraced_ns_per_call_p50": base_ns_per_call,
            "events_per_call": events_per_call,
            "events_per_call_source": epc_source if events_per_call else "",
            "event_rate_per_s_untraced": (events_per_call * 1e9 / base_ns_per_call
                                          if events_per_call and base_ns_per_call else None),
        },
        "tracepoints": tps,
        # Other work on the host (1-min load average at the end of each run):
        # the slowdown measure is only as good as the host is quiet.
        "loadavg_1min_runs": sorted(r["loadavg_1min"] for rs in slow_runs.values()
                                    for r in rs),
        "ncpus": os.cpu_count(),
        "bpf_stats_enabled_by": stats_how,
        "runs": runs,
        "bpf_runs": bpf_runs,
        "tracers": rows,
        "notes": notes,
    }
    doc["targets"] = evaluate_targets(doc)
    return doc


def _row(doc: dict[str, Any], name: str) -> dict[str, Any] | None:
    for r in doc["tracers"]:
        if r["name"] == name and r.get("available"):
            return r
    return None


def _failed(row: dict[str, Any]) -> bool:
    return not row.get("slowdown", {}).get("ns_per_call_runs")


def _why_not(doc: dict[str, Any], key: str) -> str:
    for r in doc["tracers"]:
        if r["key"] == key:
            if not r.get("available"):
                return r.get("skip_reason", "unavailable")
            if r.get("errors"):
                return r["errors"][0][-200:]
    return "not selected"


def _target(name: str, value: float | None, limit: float | None, unit: str,
            measure: str, missing: str = "") -> dict[str, Any]:
    if value is None or limit is None:
        return {"target": name, "measure": measure, "met": None,
                "why_unknown": missing or "not measured"}
    if limit <= 0:
        # bpftrace's own slowdown vanished in the run-to-run noise: nothing to compare.
        return {"target": name, "measure": measure, "value": round(value, 1),
                "limit": round(limit, 1), "unit": unit, "met": None,
                "why_unknown": "the reference's slowdown is within noise (<= 0); more runs"}
    if value < 0:
        # A traced run faster than its untraced pair is not a cost below the limit: on a
        # small VM the tracer's reader keeps the target CPU out of idle, so its wake-up gets
        # cheaper by more than the tracer costs. The slowdown cannot see this tracer's cost.
        return {"target": name, "measure": measure, "value": round(value, 1),
                "limit": round(limit, 1), "unit": unit, "met": None,
                "why_unknown": "the traced runs were faster than the untraced ones (the "
                               "tracer's reader keeps the target CPU out of idle): this "
                               "measure cannot see its cost here"}
    met = value <= limit
    out = {"target": name, "measure": measure, "value": round(value, 1),
           "limit": round(limit, 1), "unit": unit, "met": met}
    out["margin_pct"] = round(100 * (limit - value) / limit, 1)  # headroom below the limit
    if not met:
        out["missed_by_pct"] = round(100 * (value - limit) / limit, 1)
    return out


def evaluate_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with met true/false/None and the margin."""
    out = []
    bt = _row(doc, "bpftrace count()")
    bt_bpf = (bt or {}).get("bpf_stats", {}).get("ns_per_event_p50")
    bt_slow = (bt or {}).get("slowdown", {}).get("overhead_ns_per_event")
    counts = _row(doc, "pkstrace bcc counts")
    if counts and not _failed(counts):
        out.append(_target("pkstrace counts mode <= 1/2 bpftrace count() per event",
                           counts.get("bpf_stats", {}).get("ns_per_event_p50"),
                           bt_bpf / 2 if bt_bpf else None, "ns/event", "bpf_stats"))
        out.append(_target("pkstrace counts mode <= 1/2 bpftrace count() per event",
                           counts["slowdown"].get("overhead_ns_per_event"),
                           bt_slow / 2 if bt_slow else None, "ns/event",
                           "workload slowdown (median call)"))
    else:
        out.append(_target("pkstrace counts mode <= 1/2 bpftrace count() per event", None, None,
                           "ns/event", "bpf_stats",
                           "pkstrace bcc counts did not run: " + _why_not(doc, "bcc-counts")))
    for r in doc["tracers"]:
        if r["kind"] != "pkstrace" or r.get("mode") != "events":
            continue
        if not r.get("available") or _failed(r):
            out.append(_target(f"{r['name']} <= bpftrace count() per event", None, None,
                               "ns/event", "workload slowdown (median call)",
                               _why_not(doc, r["key"])))
            continue
        if r.get("uses_bpf"):
            out.append(_target(f"{r['name']} <= bpftrace count() per event",
                               r.get("bpf_stats", {}).get("ns_per_event_p50"), bt_bpf,
                               "ns/event", "bpf_stats"))
        out.append(_target(f"{r['name']} <= bpftrace count() per event",
                           r["slowdown"].get("overhead_ns_per_event"), bt_slow, "ns/event",
                           "workload slowdown (median call)"))
        rate = r.get("event_rate_per_s_p50")
        lost = r.get("lost_total")
        name = f"{r['name']}: zero lost events at >= 100k events/s"
        if lost is None or rate is None:
            out.append({"target": name, "met": None, "why_unknown": "no lost count"})
        else:
            # Losing events below the target rate fails it outright; losing none
            # proves it only if the workload reached the rate under this tracer.
            met = False if lost else (True if rate >= TARGET_EVENT_RATE else None)
            row = {"target": name, "measure": "tracer's lost count, all runs",
                   "lost": lost, "event_rate_per_s_p50": round(rate),
                   "rate_reached": rate >= TARGET_EVENT_RATE, "met": met}
            if met is None:
                row["why_unknown"] = (f"no loss, but under this tracer the workload made only "
                                      f"{round(rate)} events/s (< {TARGET_EVENT_RATE})")
            out.append(row)
    return out


# ---------------------------------------------------------------------------
# Rendering and checking
# ---------------------------------------------------------------------------

def _fmt(v: float | None, spec: str = "8.1f") -> str:
    return format(v, spec) if v is not None else "       -"


def _misses(row: dict[str, Any]) -> str:
    total = row.get("recursion_misses", {}).get("total")
    return "-" if total is None else str(total)


def format_table(doc: dict[str, Any]) -> str:
    w = doc["workload"]
    lines = [f"workload: {w['description']}",
             f"untraced: {_fmt(w['untraced_ns_per_call_p50'], '.0f')} ns/call, "
             f"{_fmt(w['events_per_call'], '.2f')} events/call "
             f"({_fmt(w['event_rate_per_s_untraced'], '.0f')} events/s); medians of "
             f"{doc['runs']} runs (bpf_stats: {doc['bpf_runs']} runs); ns/call = median "
             "call; ns/ev = added per event (median call), all-in = same from the mean call",
             "lost = the tracer's lost count (bpftrace: its programs' recursion-guard "
             "misses); rmiss = recursion-guard misses of the BPF programs (in lost, but for "
             "those bcc's write_msr twin recorded)",
             f"{'tracer':<26} {'bpf ns/ev':>9} {'ns/call':>9} {'ratio':>6} {'ns/ev':>8} "
             f"{'all-in':>8} {'events/s':>9} {'lost':>7} {'rmiss':>6}"]
    for r in doc["tracers"]:
        if not r.get("available"):
            lines.append(f"{r['name']:<26} skipped: {r.get('skip_reason', '')}")
            continue
        s = r.get("slowdown", {})
        lines.append(
            f"{r['name']:<26} {_fmt(r.get('bpf_stats', {}).get('ns_per_event_p50'), '9.1f')} "
            f"{_fmt(s.get('ns_per_call_p50'), '9.0f')} "
            f"{_fmt(s.get('ratio_to_untraced'), '6.2f')} "
            f"{_fmt(s.get('overhead_ns_per_event'), '8.1f')} "
            f"{_fmt(s.get('all_in_ns_per_event'), '8.0f')} "
            f"{_fmt(r.get('event_rate_per_s_p50'), '9.0f')} "
            f"{r['lost_total'] if r.get('lost_total') is not None else '-':>7} "
            f"{_misses(r):>6}")
        for e in r.get("errors", []):
            lines.append(f"{'':<26} error: {e}")
    lines.append("")
    for t in doc["targets"]:
        state = {True: "met", False: "MISSED", None: "unknown"}[t["met"]]
        extra = ""
        if t["met"] is None and t.get("why_unknown"):
            extra = f" ({t['why_unknown']})"
        elif "value" in t:
            how = (f"missed by {t['missed_by_pct']}%" if "missed_by_pct" in t
                   else f"{t['margin_pct']}% below the limit")
            extra = f" ({t['measure']}: {t['value']} vs limit {t['limit']} {t['unit']}, {how})"
        elif "lost" in t:
            extra = f" (lost {t['lost']} at {t['event_rate_per_s_p50']} events/s)"
        elif t.get("why_unknown"):
            extra = f" ({t['why_unknown']})"
        lines.append(f"target {state}: {t['target']}{extra}")
    for n in doc.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)


def validate(doc: Any) -> list[str]:
    """Problems with an overhead result document (empty = well formed)."""
    if not isinstance(doc, dict):
        return ["not a JSON object"]
    problems = []
    if doc.get("kind") != RESULT_KIND or doc.get("version") != RESULT_VERSION:
        problems.append("kind/version is not pkstrace-bench-overhead v1")
    for key in ("created", "host", "workload", "tracers", "targets", "tracepoints"):
        if key not in doc:
            problems.append(f"missing {key!r}")
    for r in doc.get("tracers", []):
        if not isinstance(r, dict) or "name" not in r or "available" not in r:
            problems.append("tracer row without name/available")
            continue
        if r["available"] and not r.get("slowdown", {}).get("ns_per_call_runs") \
                and not r.get("errors"):
            problems.append(f"{r['name']}: no runs and no errors")
    for t in doc.get("targets", []):
        if t.get("met") not in (True, False, None):
            problems.append(f"target {t.get('target')!r}: met is not true/false/null")
    return problems


if __name__ == "__main__":
    if "--workload" in sys.argv[1:]:
        raise SystemExit(_workload_main(sys.argv[1:]))
    raise SystemExit("usage: python -m pkstrace.bench.overhead --workload ... "
                     "(use `pkstrace bench overhead`)")
