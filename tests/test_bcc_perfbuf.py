"""The bcc backend's perf-buffer path (kernels before 5.8, or `--bpf-buffer perf`), on
this machine's real kernel (root), which has both buffers so the two can be compared.

The workload makes N synchronous cross-CPU calls (16-byte preads of
/dev/cpu/1/cpuid from CPU 0); assertions count the workload's own events (its pid).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_record_live import (
    PKSTRACE,
    STREAMING_CALLS,
    N,
    _wait_for_line,
    bpf_prog_ids_of,
    bpftool_prog_ids,
    need_backend,
    perf_fds_of,
    record_cli,
    workload_queue,
)
from workload import (
    CALLED_FUNC,
    cross_cpu_calls,
    foreign_slow_bpf,
    workload_command,
    workload_pid,
)

from pkstrace import schema, tracefile

pytestmark = [pytest.mark.live]


def need_perf_buffer() -> None:
    need_backend("bcc")
    if not os.path.exists("/dev/cpu/0/cpuid"):
        pytest.skip("needs /dev/cpu/0/cpuid (CONFIG_X86_CPUID)")


def perf_backend(buffer: str = "perf", **kw):  # noqa: ANN003, ANN201 - a BccBackend
    from pkstrace.backends.base import RecordOptions, plan_probes
    from pkstrace.backends.bcc import BccBackend
    from pkstrace.backends.symbols import function_names

    specs, _ = plan_probes(RecordOptions(), function_names(), False, False)
    return BccBackend(specs, bpf_buffer=buffer, **kw)


def workload_rows(trace, wpid: int) -> pd.DataFrame:  # noqa: ANN001
    """The workload's calls as the analysis pairs them: queue on 0, entry on 1."""
    from pkstrace.analysis import analyse

    calls = analyse(trace).calls
    return calls[(calls["pid"] == wpid) & (calls["func"] == CALLED_FUNC)
                 & (calls["target_cpu"] == 1) & ~calls["local"]]


def test_perf_buffer_records_the_workload_and_agrees_with_the_ring(tmp_path: Path) -> None:
    need_perf_buffer()
    traces = {}
    for buf in ("perf", "ring"):
        out = tmp_path / f"{buf}.pkstrace"
        p, wpid = record_cli("bcc", out, "--bpf-buffer", buf)
        assert f"BPF buffer {buf} (asked for)" in p.stderr, p.stderr
        traces[buf] = (tracefile.read_trace(out), wpid)
    per_buffer = {}
    for buf, (trace, wpid) in traces.items():
        meta = trace.meta
        assert meta.extra["bcc"]["buffer"] == buf and not meta.partial
        perf_notes = [n for n in meta.notes if "per-CPU perf buffers" in n]
        assert perf_notes == (["bcc: events through per-CPU perf buffers (perf (asked for))"]
                              if buf == "perf" else []), meta.notes
        # Lost per CPU, and (CPU -1) runs the kernel's BPF recursion guard skipped
        # while another tool's BPF program ran on that CPU (other engineers' tests
        # on this shared host): reported, never silently missing.
        reported = sum(meta.lost_events.values())
        queued = workload_queue(trace.events, wpid)
        assert (queued["cpu"] == 0).all()
        calls = workload_rows(trace, wpid)
        if reported == 0:
            # Every call queued on CPU 0 and entered on CPU 1; the kernel's own 1%
            # of unrecorded entries (test_record_live) is allowed.
            assert len(queued) == N, (buf, len(queued), meta.lost_events)
            assert len(calls) >= N * 0.99, (buf, len(calls))
        else:
            assert len(queued) + reported >= N, (buf, len(queued), meta.lost_events)
            assert len(calls) + reported >= N * 0.99, (buf, len(calls), meta.lost_events)
        lat = calls["latency_ns"].to_numpy(dtype=float)
        assert (lat > 0).all() and np.median(lat) < 10e6
        per_buffer[buf] = (len(queued), len(calls), reported)
        # Same schema and decoding: identical column types.
        assert list(trace.events.dtypes.astype(str)) == \
            list(traces["ring"][0].events.dtypes.astype(str))
    if per_buffer["perf"][2] == 0 and per_buffer["ring"][2] == 0:
        assert per_buffer["perf"][0] == per_buffer["ring"][0] == N, per_buffer
        assert abs(per_buffer["perf"][1] - per_buffer["ring"][1]) <= N // 100, per_buffer

    meta = traces["perf"][0].meta
    pb = meta.extra["bcc"]["perf_buffer"]
    # Every output the kernel accepted arrived (or is counted as lost, never silent),
    # and the trace's lost events per CPU are the perf buffer's.
    for cpu, sent in pb["sent"].items():
        assert sent == pb["arrived"][cpu] + pb["never_arrived"].get(cpu, 0), pb
        assert meta.lost_events[int(cpu)] == pb["lost"][cpu], (meta.lost_events, pb)
    # The rows the trace holds are all the samples that arrived.
    assert len(traces["perf"][0].events) == sum(pb["arrived"].values())


def test_perf_buffer_sees_what_an_idle_cpu_does() -> None:
    """This host's perf rings get no tracepoint sample hit in an interrupt on an idle
    CPU (test_perf_reports_what_an_idle_cpu_never_sampled); bpf_perf_event_output()
    writes the ring another way. Calls 1 ms apart, so CPU 1 idles between them,
    recorded by the perf-buffer and the ring path at once: the same csd entries on
    CPU 1, and every output the kernel accepted there arrived."""
    need_perf_buffer()
    from pkstrace import workload
    from pkstrace.backends import checks
    from pkstrace.backends.base import ProbeSpec

    perf_buf = perf_backend()
    ring = perf_backend("ring")  # the same program on the BPF ring buffer
    # For comparison only (printed, not asserted): perf's own tracepoint samples.
    samples = None
    if not checks.backend_problem("perf"):
        from pkstrace.backends.perf import PerfBackend

        samples = PerfBackend([ProbeSpec("csd:csd_function_entry", "tracepoint", True)],
                              cpus=[1])
    entries = {}
    with perf_buf, ring, samples or contextlib.nullcontext():
        perf_buf.attach()
        ring.attach()
        if samples:
            samples.attach()
        workload.cross_cpu_calls(N, target_cpu=1, source_cpu=0, gap_s=0.001)
        if samples:
            samples.stop()
            ev = samples.drain()
            samples.lost_events()
            entries["perf tracepoint samples"] = int(((ev["cpu"] == 1)
                                                      & (ev["func"] == CALLED_FUNC)).sum())
            entries["perf unsampled hits"] = samples.unsampled_hits().get(1, 0)
        skipped = {}
        for name, b in (("perf", perf_buf), ("ring", ring)):
            b.stop()
            ev = b.drain()
            lost = b.lost_events()
            assert sum(v for c, v in lost.items() if c >= 0) == 0, (name, lost)
            entries[name] = int(((ev["kind"] == "csd_entry") & (ev["cpu"] == 1)
                                 & (ev["func"] == CALLED_FUNC)).sum())
            # Hits the kernel's BPF recursion guard skipped (another BPF program was
            # running on that CPU): gone from both paths alike, counted under CPU -1.
            skipped[name] = lost.get(-1, 0)
        pb = perf_buf.extra()["perf_buffer"]
    print(f"csd entries on CPU 1 of {N} calls 1 ms apart: {entries}; perf buffer CPU 1 "
          f"sent {pb['sent']['1']}, arrived {pb['arrived']['1']}")
    assert entries["perf"] == entries["ring"], entries
    # Both paths may miss the same few hits no BPF program ran for: seen once in
    # ~20 runs, 3 of 200 (197 each), which perf counted but did not sample either.
    assert entries["perf"] + skipped["perf"] >= N - N // 50, (entries, skipped)
    assert pb["sent"]["1"] == pb["arrived"]["1"] and pb["never_arrived"] == {}, pb


def test_perf_buffer_counts_lost_events_per_cpu_under_a_flood() -> None:
    """Tiny perf rings not read while both CPUs make 20000 calls each: both rings
    overflow. Each CPU's failed outputs are its lost events; once the rings are read
    and the next sample fits, the kernel's PERF_RECORD_LOST carries the same count;
    nothing the kernel accepted goes missing."""
    need_perf_buffer()
    backend = perf_backend(buffer_kb=8)
    with backend:
        backend.attach()
        assert backend.ring_pages * 4096 <= 2 << 20  # a ring holds < 30 k records
        cross_cpu_calls(20_000, target_cpu=1, source_cpu=0)
        cross_cpu_calls(20_000, target_cpu=0, source_cpu=1)
        overflow = backend.lost_events()
        first = backend.read(0)  # frees the rings: the next samples fit again
        cross_cpu_calls(N, target_cpu=1, source_cpu=0)  # ... and carry LOST records
        cross_cpu_calls(N, target_cpu=0, source_cpu=1)
        backend.stop()
        rest = backend.drain()
        lost = backend.lost_events()
        extra = backend.extra()
        notes = backend.notes()
    pb = extra["perf_buffer"]
    assert overflow[0] > 0 and overflow[1] > 0, overflow
    for cpu in (0, 1):
        c = str(cpu)
        assert pb["output_failed"][c] > 0, pb
        # The kernel's LOST records and the program's failed outputs agree...
        assert pb["lost_records"][c] == pb["output_failed"][c], pb
        # ... and are the CPU's lost events; everything accepted was read.
        assert lost[cpu] == pb["output_failed"][c] >= overflow[cpu], (lost, pb)
        assert pb["sent"][c] == pb["arrived"][c] and pb["never_arrived"] == {}, pb
    assert not any("never wrote" in n for n in notes), notes
    # Records that wrapped around the end of the small rings decode like the rest.
    events = pd.concat([first, rest], ignore_index=True)
    assert len(events) == sum(pb["arrived"].values())
    assert set(events["kind"].astype(str)) <= set(schema.KINDS)
    assert set(events["cpu"]) <= {0, 1}
    for _, per_cpu in events.groupby("cpu"):
        assert per_cpu["ts"].is_monotonic_increasing  # one CPU's records in order
    late = rest[(rest["kind"] == "csd_queue") & (rest["cpu"] == 0)
                & (rest["target_cpu"] == 1) & (rest["func"] == CALLED_FUNC)]
    assert len(late) >= N  # the calls after the overflow all arrived


def test_perf_buffer_batches_follow_each_other_in_time() -> None:
    """The perf rings get a record after its timestamp was taken: the `writing` word
    keeps batches in time order while both CPUs produce."""
    need_perf_buffer()
    backend = perf_backend()
    batches = []
    with backend:
        backend.attach()
        proc = subprocess.Popen([sys.executable, "-c", STREAMING_CALLS])
        while proc.poll() is None:
            batches.append(backend.read(0.01))
        backend.stop()
        batches.append(backend.drain())
    spans = [(b["ts"].min(), b["ts"].max()) for b in batches if len(b)]
    assert len(spans) >= 5, spans
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:], strict=False)), spans


def test_perf_buffer_keeps_the_recursion_miss_accounting() -> None:
    """Runs the kernel's BPF recursion guard skipped are lost under CPU -1, as on the ring.
    Classic tracepoint programs: they share the kernel's one per-CPU guard with the
    foreign program (raw ones have their own and are not skipped: test_bcc_rawtp.py)."""
    need_perf_buffer()
    backend = perf_backend(bpf_attach="tp")
    with backend:
        backend.attach()
        with foreign_slow_bpf():
            cross_cpu_calls(N, target_cpu=0, source_cpu=1)
        backend.read(0.05)
        backend.stop()
        backend.drain()
        lost = backend.lost_events()
        misses = backend.misses
    assert sum(misses.values()) > 0, "the slow program made no recursion misses"
    assert lost[-1] == sum(misses.values()), (lost, misses)


def test_perf_buffer_detach_releases_everything() -> None:
    """After detach() this process holds no perf event and no BPF program of ours."""
    need_perf_buffer()
    before = perf_fds_of(os.getpid())
    backend = perf_backend()
    backend.attach()
    ncpu = len(backend._ring_cpus)
    assert perf_fds_of(os.getpid()) >= before + ncpu  # one BPF output event per CPU
    prog_ids = bpf_prog_ids_of(os.getpid())
    assert prog_ids
    backend.read(0.05)
    assert backend.detach() == []
    assert backend.detach() == []  # idempotent
    assert perf_fds_of(os.getpid()) == before
    assert bpf_prog_ids_of(os.getpid()) == set()
    assert prog_ids.isdisjoint(bpftool_prog_ids())


def test_ctrl_c_on_the_perf_buffer_leaves_a_trace_and_nothing_attached(tmp_path: Path) -> None:
    need_perf_buffer()
    out = tmp_path / "sigint.pkstrace"
    rec = subprocess.Popen([*PKSTRACE, "record", "--backend", "bcc", "--bpf-buffer", "perf",
                            "-o", str(out), "--no-status", "-q"], stderr=subprocess.PIPE,
                           text=True)
    try:
        _wait_for_line(rec, "probes attached")
        prog_ids = bpf_prog_ids_of(rec.pid)
        assert prog_ids and perf_fds_of(rec.pid) >= 2
        w = subprocess.run(workload_command(50), capture_output=True, text=True, timeout=60)
        wpid = workload_pid(w.stdout)
        time.sleep(0.3)
        rec.send_signal(signal.SIGINT)
        rc = rec.wait(timeout=60)
    finally:
        if rec.poll() is None:
            rec.kill()
            rec.wait()
    assert rc == 0, rec.stderr.read() if rec.stderr else ""
    assert prog_ids.isdisjoint(bpftool_prog_ids())
    trace = tracefile.read_trace(out)
    assert trace.meta.extra["record"]["stop_reason"] == "SIGINT"
    assert trace.meta.extra["record"]["cleanup_problems"] == []
    assert trace.meta.extra["bcc"]["buffer"] == "perf"
    got = len(workload_queue(trace.events, wpid))
    assert got == 50 or got + sum(trace.meta.lost_events.values()) >= 50, \
        (got, trace.meta.lost_events)


def test_bpf_buffer_option_is_refused_where_it_means_nothing(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("record refuses to run without root before reading options")
    p = subprocess.run([*PKSTRACE, "record", "--backend", "tracefs", "--bpf-buffer", "perf",
                        "-o", str(tmp_path / "x.pkstrace"), "-d", "1"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "pkstrace record: error: --bpf-buffer perf: only for --backend bcc in --mode events "
        "(this is tracefs, --mode events)"], p.stderr
    assert not (tmp_path / "x.pkstrace").exists()


def test_buffer_choice_follows_the_kernel_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: the ring from 5.8 (BPF_MAP_TYPE_RINGBUF), perf rings before; asking for
    the ring on an older kernel is a one-line KernelFeatureError before anything loads."""
    import platform

    from pkstrace.backends import bcc
    from pkstrace.errors import KernelFeatureError

    monkeypatch.setattr(platform, "release", lambda: "5.4.0-150-generic")
    assert bcc.choose_buffer("auto") == (
        "perf", "auto: perf buffer (Linux 5.4.0-150-generic < 5.8 has no BPF ring buffer)")
    assert bcc.choose_buffer("perf")[0] == "perf"
    with pytest.raises(ValueError, match="bad BPF buffer"):
        bcc.choose_buffer("rings")
    backend = bcc.BccBackend([], bpf_buffer="ring")
    try:
        import bcc as _  # noqa: F401 - attach imports it first
    except ImportError:
        pytest.skip("needs bcc (python3-bpfcc) importable to reach the kernel check")
    with pytest.raises(KernelFeatureError, match=r"needs Linux >= 5\.8, this is 5\.4\.0"):
        backend.attach()
    assert backend.bpf is None  # nothing was loaded
    monkeypatch.setattr(platform, "release", lambda: "5.8.0")
    assert bcc.choose_buffer("auto")[0] == "ring"
