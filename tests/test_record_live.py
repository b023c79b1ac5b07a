"""`pkstrace record` on this machine's real kernel, with every backend (root).

The workload makes N synchronous cross-CPU calls (16-byte preads of
/dev/cpu/1/cpuid from CPU 0). Other processes on the host make such calls too,
so assertions count the workload's own events (its pid), which every backend
must see exactly N times.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from workload import CALLED_FUNC, workload_command, workload_pid, workload_result

from pkstrace import tracefile
from pkstrace.backends import checks
from pkstrace.backends.tracefs import find_tracefs

pytestmark = [pytest.mark.live]
N = 200
BACKENDS = ("tracefs", "perf", "bcc")
PKSTRACE = [sys.executable, "-m", "pkstrace"]


def need_backend(name: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to attach to the running kernel")
    if not os.path.exists("/dev/cpu/1/cpuid"):
        pytest.skip("needs /dev/cpu/1/cpuid (CONFIG_X86_CPUID and a second CPU)")
    problem = checks.backend_problem(name)
    if problem:
        pytest.skip(f"backend {name} cannot run here: {problem}")


def record_cli(backend: str, out: Path, *extra: str, calls: int = N,
               timeout: float = 180) -> tuple[subprocess.CompletedProcess[str], int]:
    cmd = [*PKSTRACE, "record", "--backend", backend, "-o", str(out), "--no-status", "-q",
           *extra, "--", *workload_command(calls)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr
    return p, workload_pid(p.stdout)


def skip_if_perf_starved(meta, got: int, want: int) -> None:  # noqa: ANN001
    """Another process's BPF program returning 0 on a tracepoint hides it from every
    perf event (not from tracefs or our BPF): the perf backend cannot see those
    events at all then, and says so in the trace."""
    foreign = meta.extra.get("perf", {}).get("foreign_bpf") or {}
    if got < want and foreign:
        pytest.skip(f"other processes' BPF programs hide tracepoints from perf while this "
                    f"test ran: {foreign}")


_PERF_IDLE: list[tuple[bool | None, str]] = []


def perf_drops_idle_samples() -> bool:
    """Measured once per session (checks.perf_samples_idle_cpus)."""
    if not _PERF_IDLE:
        _PERF_IDLE.append(checks.perf_samples_idle_cpus())
    return _PERF_IDLE[0][0] is False


@contextlib.contextmanager
def busy_cpu(cpu: int) -> Iterator[None]:
    """A process spinning on ``cpu`` for the duration, so the CPU never idles."""
    spin = subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})"
                             "\nwhile True: pass"])
    try:
        time.sleep(0.2)
        yield
    finally:
        spin.kill()
        spin.wait()


def round_trips(p: subprocess.CompletedProcess[str]) -> np.ndarray:
    return np.asarray(workload_result(p.stdout)["round_trips_ns"], dtype=float)


def workload_queue(events, wpid: int):  # noqa: ANN001, ANN201 - DataFrame in, DataFrame out
    return events[(events["kind"] == "csd_queue") & (events["pid"] == wpid)
                  & (events["target_cpu"] == 1) & (events["func"] == CALLED_FUNC)]


def our_leftovers(pid: int) -> list[str]:
    """tracefs instances and kprobe events a recorder with this pid left behind."""
    root = find_tracefs()
    out = []
    if root:
        out += [n for n in os.listdir(f"{root}/instances")
                if n == f"pkstrace-{pid}" or n.startswith(f"pkstrace-{pid}-")]
        if os.path.exists(f"{root}/kprobe_events"):
            out += [ln for ln in Path(f"{root}/kprobe_events").read_text().splitlines()
                    if f"pkstrace_{pid}/" in ln or f"pkstrace_{pid}_" in ln]
    return out


def bpf_prog_ids_of(pid: int) -> set[int]:
    """Ids of the BPF programs a process holds open (from /proc/PID/fdinfo)."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("prog_id:"):
                    ids.add(int(line.split()[1]))
        except OSError:
            pass
    return ids


def bpftool_prog_ids() -> set[int]:
    """Ids of every BPF program loaded in the kernel, as `bpftool prog show` lists them."""
    p = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"bpftool prog show failed: {p.stderr.strip()[:200]}")
    return {int(x["id"]) for x in json.loads(p.stdout or "[]")}


def perf_fds_of(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[perf_event]":
                n += 1
        except OSError:
            pass
    return n


@pytest.mark.parametrize("backend", BACKENDS)
def test_record_sees_every_cross_cpu_call(backend: str, tmp_path: Path) -> None:
    need_backend(backend)
    out = tmp_path / f"{backend}.pkstrace"
    # perf on a kernel that never samples tracepoints hit in interrupts on an idle
    # CPU (this 6.18 host: test_perf_reports_what_an_idle_cpu_never_sampled) can
    # only show CPU 1's side of the calls while CPU 1 is kept busy.
    idle_blind = backend == "perf" and perf_drops_idle_samples()
    with busy_cpu(1) if idle_blind else contextlib.nullcontext():
        proc, wpid = record_cli(backend, out)
    trace = tracefile.read_trace(out)
    meta = trace.meta
    assert meta.backend == backend and meta.source == "live" and not meta.partial
    assert meta.extra["record"]["stop_reason"] == "command exited"
    assert meta.host["online_cpus"] and "cpuidle" in meta.host
    attached = {p["name"] for p in meta.probes if p["attached"]}
    assert {"csd:csd_queue_cpu", "csd:csd_function_entry", "msr:write_msr"} <= attached
    absent = {p["name"]: p["reason"] for p in meta.probes if not p["attached"]}
    assert "kprobe:write_pkrs" in absent or "kprobe:write_pkrs" in attached

    queued = workload_queue(trace.events, wpid)
    skip_if_perf_starved(meta, len(queued), N)
    # Events the kernel dropped must be reported, never silently missing: lost
    # per CPU, and (bcc) runs skipped by the BPF recursion guard while another
    # tool's BPF program ran on that CPU, which are lost under CPU -1.
    reported = sum(meta.lost_events.values())
    misses = sum(meta.extra.get("bcc", {}).get("recursion_misses", {}).values())
    assert meta.lost_events.get(-1, 0) == misses, (meta.lost_events, meta.extra)
    assert len(queued) + reported >= N, (len(queued), meta.lost_events, meta.extra)
    assert (queued["cpu"] == 0).all()  # the workload is pinned to CPU 0

    from pkstrace.analysis import analyse

    calls = analyse(trace).calls
    ours = calls[(calls["pid"] == wpid) & (calls["func"] == CALLED_FUNC)
                 & (calls["target_cpu"] == 1) & ~calls["local"]]
    # Every queued call of the workload is matched to its entry on CPU 1, but for
    # at most 3%: the kernel itself now and then records no entry and counts no
    # loss (see test_cpus_option_records_only_those_cpus), and with other tracers
    # attached the perf recursion guard can drop a hit before any probe runs.
    assert len(ours) + reported >= N - max(1, 3 * N // 100), (
        len(ours), len(queued), meta.lost_events, meta.extra)
    lat = ours.sort_values("queue_ns")["latency_ns"].to_numpy(dtype=float)
    assert np.isfinite(lat).all() and (lat > 0).all()
    # Delivery is part of each call's round trip, which the workload timed itself:
    # the i-th call's latency must be below the i-th round trip (a mismatched
    # queue/entry pair would break this). The median must be well below 10 ms;
    # single calls take longer when this 2-vCPU VM's vCPU is descheduled.
    if len(lat) == N:
        rt = round_trips(proc)
        assert (lat < rt).all(), np.flatnonzero(lat >= rt)[:5]
    assert np.median(lat) < 10e6, np.median(lat)


def test_perf_reports_what_an_idle_cpu_never_sampled(tmp_path: Path) -> None:
    """Every csd entry on idle CPU 1 is either a perf sample or counted as lost; where
    the kernel counts hits it never samples (no LOST record), the trace says so, and
    the doctor's measurement agrees with the recording."""
    need_backend("perf")
    out = tmp_path / "perf.pkstrace"
    record_cli("perf", out)
    trace = tracefile.read_trace(out)
    ev = trace.events
    entries = ev[(ev["kind"] == "csd_entry") & (ev["cpu"] == 1) & (ev["func"] == CALLED_FUNC)]
    skip_if_perf_starved(trace.meta, len(entries), N)
    lost1 = trace.meta.lost_events.get(1, 0)
    unreported = max(1, 3 * N // 100)  # the kernel's own (test_cpus_option_records_only...)
    assert len(entries) + lost1 >= N - unreported, (len(entries), trace.meta.lost_events)
    unsampled = trace.meta.extra["perf"]["unsampled_hits"]
    if perf_drops_idle_samples():
        assert int(unsampled.get("1", 0)) >= N - len(entries) - unreported, unsampled
        assert any("never reached perf's ring" in n for n in trace.meta.notes), trace.meta.notes
        replay = subprocess.run([*PKSTRACE, "replay", str(out)], capture_output=True,
                                text=True, timeout=120)
        assert "recorded with: perf: the kernel counted" in replay.stdout
    else:
        assert len(entries) >= N - unreported, (len(entries), unsampled)


def test_backends_agree_on_the_workload(tmp_path: Path) -> None:
    counts = {}
    for backend in BACKENDS:
        if os.geteuid() != 0 or checks.backend_problem(backend):
            continue
        out = tmp_path / f"{backend}.pkstrace"
        _, wpid = record_cli(backend, out, calls=N)
        trace = tracefile.read_trace(out)
        counts[backend] = len(workload_queue(trace.events, wpid))
        skip_if_perf_starved(trace.meta, counts[backend], N)
    if len(counts) < 2:
        pytest.skip(f"needs two usable backends to compare, have {sorted(counts)}")
    # Every backend sees exactly the workload's N calls (background calls are
    # other pids); more would mean duplicates, fewer lost events.
    assert set(counts.values()) == {N}, counts


def test_bcc_counts_and_events_agree_on_one_run() -> None:
    """One BPF program counting in the kernel and streaming every event at once."""
    need_backend("bcc")
    import pandas as pd
    from workload import cross_cpu_calls

    from pkstrace.backends.base import RecordOptions, plan_probes
    from pkstrace.backends.bcc import BccBackend
    from pkstrace.backends.symbols import function_names

    specs, _ = plan_probes(RecordOptions(), function_names(), False, False)
    backend = BccBackend(specs, mode="both")
    batches = []
    with backend:
        backend.attach()
        for _ in range(3):
            cross_cpu_calls(N // 2, target_cpu=1, source_cpu=0)
            batches.append(backend.read(0.05))
        backend.stop()  # programs off: the maps and the ring now hold the same events
        batches.append(backend.drain())
        lost = backend.lost_events()
        agg = backend.aggregates()
    # No ring losses. Recursion-guard misses (CPU -1) skip one run of the program,
    # so the count and the event are missed together and still agree below.
    assert sum(v for cpu, v in lost.items() if cpu >= 0) == 0, lost
    # The per-CPU rings are read one after another; batches still follow each
    # other in time (rows beyond the slowest ring wait for the next batch).
    spans = [(b["ts"].min(), b["ts"].max()) for b in batches if len(b)]
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:], strict=False)), spans
    events = pd.concat(batches, ignore_index=True)
    assert bpf_prog_ids_of(os.getpid()) == set()  # detached on leaving the with block

    from_events = (events.assign(msr=events["msr"].where(events["msr"] >= 0))
                   .groupby(["cpu", "kind", "msr"], observed=True, dropna=False).size())
    from_counts = pd.DataFrame(agg["per_cpu"]).set_index(["cpu", "kind", "msr"])["count"]
    ev = {(int(c), str(k), None if pd.isna(m) else int(m)): int(n)
          for (c, k, m), n in from_events.items()}
    ct = {(int(c), str(k), None if m is None or pd.isna(m) else int(m)): int(n)
          for (c, k, m), n in from_counts.items()}
    assert ev == ct

    queued = events[(events["kind"] == "csd_queue") & (events["cpu"] == 0)
                    & (events["target_cpu"] == 1) & (events["func"] == CALLED_FUNC)]
    calls = {(r["source_cpu"], r["target_cpu"], r["func"]): r["count"] for r in agg["calls"]}
    assert calls[(0, 1, CALLED_FUNC)] == len(queued) >= N
    hist = [r for r in agg["latency_log2"] if r["target_cpu"] == 1 and r["func"] == CALLED_FUNC]
    assert sum(r["count"] for r in hist) >= N
    # log2 slots: the median call lands in a slot above 0 ns and below 10 ms.
    slots = np.repeat([r["slot"] for r in hist], [r["count"] for r in hist])
    median_slot = int(np.median(slots))
    assert 0 < (1 << median_slot) < 10_000_000


STREAMING_CALLS = ("import os; os.sched_setaffinity(0, {0}); "
                   "fd = os.open('/dev/cpu/1/cpuid', os.O_RDONLY)\n"
                   "for _ in range(20000): os.pread(fd, 16, 0)")


def test_bcc_batches_follow_each_other_in_time() -> None:
    """Per-CPU rings read one after another while both CPUs produce: no batch may
    hold an event older than one already handed on (without the watermark, 11 of
    49 batch pairs overlapped here)."""
    need_backend("bcc")
    from pkstrace.backends.base import RecordOptions, plan_probes
    from pkstrace.backends.bcc import BccBackend
    from pkstrace.backends.symbols import function_names

    specs, _ = plan_probes(RecordOptions(), function_names(), False, False)
    backend = BccBackend(specs, mode="events")
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


@pytest.mark.parametrize("mode", ["counts", "events"])
def test_bcc_recursion_misses_are_lost_events(mode: str) -> None:
    """Runs the kernel skipped (BPF recursion guard) count as lost, under CPU -1.

    Classic tracepoint programs: the foreign program holds the CPU's one shared guard, which
    raw tracepoint programs (per-program guard) do not share, so only classic ones miss."""
    need_backend("bcc")
    from workload import cross_cpu_calls, foreign_slow_bpf

    from pkstrace.backends.base import RecordOptions, plan_probes
    from pkstrace.backends.bcc import BccBackend
    from pkstrace.backends.symbols import function_names

    specs, _ = plan_probes(RecordOptions(), function_names(), False, False)
    backend = BccBackend(specs, mode=mode, bpf_attach="tp")
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


def test_record_counts_mode_cli(tmp_path: Path) -> None:
    need_backend("bcc")
    out = tmp_path / "counts.pkstrace"
    record_cli("bcc", out, "--mode", "counts")
    trace = tracefile.read_trace(out)
    assert trace.meta.mode == "counts" and len(trace.events) == 0
    agg = trace.meta.aggregates
    assert agg["format"] == 1
    calls = sum(r["count"] for r in agg["calls"]
                if r["source_cpu"] == 0 and r["target_cpu"] == 1 and r["func"] == CALLED_FUNC)
    assert calls >= N
    assert any(r["kind"] == "csd_entry" and r["cpu"] == 1 and r["count"] >= N
               for r in agg["per_cpu"])


def _wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float = 60) -> str:
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"recorder never said {needle!r}: {''.join(seen)[-500:]}")


def _holds_probes(backend: str, pid: int) -> bool:
    if backend == "tracefs":
        return bool(our_leftovers(pid))
    if backend == "bcc":
        ids = bpf_prog_ids_of(pid)
        return bool(ids) and ids <= bpftool_prog_ids()
    return perf_fds_of(pid) > 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_signal_mid_recording_leaves_valid_trace_and_nothing_attached(
        backend: str, sig: signal.Signals, tmp_path: Path) -> None:
    need_backend(backend)
    out = tmp_path / "sig.pkstrace"
    rec = subprocess.Popen([*PKSTRACE, "record", "--backend", backend, "-o", str(out),
                            "--no-status", "-q"], stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_line(rec, "probes attached")
        assert _holds_probes(backend, rec.pid)  # the checks below can fail
        prog_ids = bpf_prog_ids_of(rec.pid)
        w = subprocess.run(workload_command(50), capture_output=True, text=True, timeout=60)
        wpid = workload_pid(w.stdout)
        time.sleep(0.3)
        rec.send_signal(sig)
        rc = rec.wait(timeout=60)
    finally:
        if rec.poll() is None:
            rec.kill()
            rec.wait()
    assert rc == 0, rec.stderr.read() if rec.stderr else ""
    assert our_leftovers(rec.pid) == []
    assert prog_ids.isdisjoint(bpftool_prog_ids())
    trace = tracefile.read_trace(out)
    assert trace.meta.extra["record"]["stop_reason"] == sig.name
    assert trace.meta.extra["record"]["cleanup_problems"] == []
    got = len(workload_queue(trace.events, wpid))
    skip_if_perf_starved(trace.meta, got, 50)
    # All 50 calls, or the shortfall reported as lost (perf: the kernel throttled
    # sampling; the hits still counted), never silently missing.
    assert got == 50 or got + sum(trace.meta.lost_events.values()) >= 50, \
        (got, trace.meta.lost_events)


def test_in_process_detach_releases_everything() -> None:
    """After detach() nothing of ours is attached: no instance, perf fd or BPF program."""
    from pkstrace.backends import select
    from pkstrace.backends.base import RecordOptions, plan_probes
    from pkstrace.backends.symbols import function_names

    tried = 0
    for name in BACKENDS:
        if os.geteuid() != 0 or checks.backend_problem(name):
            continue
        tried += 1
        opts = RecordOptions()
        specs, _ = plan_probes(opts, function_names(), checks.kprobes_available(), False)
        backend = select.create(name, specs, opts)
        backend.attach()
        assert _holds_probes(name, os.getpid())
        prog_ids = bpf_prog_ids_of(os.getpid())
        backend.read(0.05)
        assert backend.detach() == []
        assert backend.detach() == []  # idempotent
        assert not _holds_probes(name, os.getpid()), name
        assert perf_fds_of(os.getpid()) == 0 and prog_ids.isdisjoint(bpftool_prog_ids())
    if not tried:
        pytest.skip("no backend can run here (see pkstrace doctor)")


def test_command_exit_status_passes_through(tmp_path: Path) -> None:
    need_backend("tracefs")
    out = tmp_path / "rc.pkstrace"
    p = subprocess.run([*PKSTRACE, "record", "--backend", "tracefs", "-o", str(out),
                        "--no-status", "-q", "--", "sh", "-c", "exit 3"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stderr
    meta = tracefile.read_meta(out)
    assert meta.extra["record"]["command_exit_status"] == 3


def test_two_concurrent_recorders_do_not_disturb_each_other(tmp_path: Path) -> None:
    need_backend("tracefs")
    outs = [tmp_path / "a.pkstrace", tmp_path / "b.pkstrace"]
    recs = [subprocess.Popen([*PKSTRACE, "record", "--backend", "tracefs", "-o", str(o),
                              "--no-status", "-q"], stderr=subprocess.PIPE, text=True)
            for o in outs]
    try:
        for r in recs:
            _wait_for_line(r, "probes attached")
        w = subprocess.run(workload_command(N), capture_output=True, text=True, timeout=60)
        wpid = workload_pid(w.stdout)
        time.sleep(0.3)
        for r in recs:
            r.send_signal(signal.SIGINT)
        for r in recs:
            assert r.wait(timeout=60) == 0
    finally:
        for r in recs:
            if r.poll() is None:
                r.kill()
                r.wait()
    for o in outs:
        assert len(workload_queue(tracefile.read_trace(o).events, wpid)) == N
    for r in recs:
        assert our_leftovers(r.pid) == []


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "exists.pkstrace"
    out.write_bytes(b"precious")
    p = subprocess.run([*PKSTRACE, "record", "-o", str(out), "-d", "1"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "--force" in p.stderr
    assert out.read_bytes() == b"precious"


def test_not_root_is_one_line_error(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged user")
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        *PKSTRACE, "record", "-o", str(tmp_path / "x.pkstrace"), "-d", "1"],
                       capture_output=True, text=True, timeout=60, cwd="/",
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    if "pkstrace record" not in p.stderr and "Permission denied" in p.stderr:
        pytest.skip(f"the unprivileged user cannot run the venv's python: {p.stderr[-200:]}")
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("pkstrace record: error:") and "sudo" in p.stderr
    assert p.stderr.strip().count("\n") == 0


def test_guest_cli_streams_with_a_bare_python(tmp_path: Path) -> None:
    """The tracefs raw layer runs without pandas (python -S: no site-packages)."""
    need_backend("tracefs")
    out, stop = tmp_path / "lines.txt", tmp_path / "stop"
    ready = tmp_path / "ready"
    top = str(Path(__file__).parents[1])
    g = subprocess.Popen(["/usr/bin/python3", "-S", "-m", "pkstrace.backends.tracefs",
                          "--events", "csd:csd_queue_cpu,csd:csd_function_entry,msr:write_msr",
                          "--msr", "0x830", "--out", str(out), "--stop-file", str(stop),
                          "--ready-file", str(ready)],
                         cwd=top, env={"PYTHONPATH": top, "PATH": os.environ["PATH"]},
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and g.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), g.stderr.read() if g.stderr else ""
        w = subprocess.run(workload_command(N), capture_output=True, text=True, timeout=60)
        wpid = workload_pid(w.stdout)
        time.sleep(0.3)
        stop.touch()
        assert g.wait(timeout=30) == 0
    finally:
        if g.poll() is None:
            g.kill()
            g.wait()
    text = out.read_text()
    assert text.splitlines()[-1].startswith("# pkstrace-end:")
    assert "stop-file" in text.splitlines()[-1]
    probes = [json.loads(ln.split(":", 1)[1]) for ln in text.splitlines()
              if ln.startswith("# pkstrace-probe:")]
    assert all(p["attached"] for p in probes) and len(probes) == 3
    ours = [ln for ln in text.splitlines()
            if f"-{wpid} " in ln and "csd_queue_cpu" in ln and CALLED_FUNC in ln]
    assert len(ours) == N
    msr = [ln for ln in text.splitlines() if " write_msr: " in ln]
    assert msr and all(" write_msr: 830," in ln for ln in msr)  # kernel-side filter
    assert our_leftovers(g.pid) == []

    from pkstrace.importers.ftrace_text import parse_text

    df, _ = parse_text(text)
    assert len(workload_queue(df, wpid)) == N


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_after_attach_keeps_a_partial_trace_and_detaches(backend: str,
                                                               tmp_path: Path) -> None:
    """A real failure once probes are attached (the command cannot be started)."""
    need_backend(backend)
    out = tmp_path / "err.pkstrace"
    p = subprocess.run([*PKSTRACE, "record", "--backend", backend, "-o", str(out),
                        "--no-status", "-q", "--", str(tmp_path / "no-such-command")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("pkstrace record: error: cannot run") and "partial trace" in last
    assert "Traceback" not in p.stderr
    meta = tracefile.read_meta(out)
    assert meta.partial and any("recording ended by an error" in n for n in meta.notes)
    assert meta.extra["record"]["cleanup_problems"] == []
    inst = meta.extra.get("tracefs", {}).get("instance")
    if inst:  # the recorder's own instance name, now gone
        assert not os.path.exists(f"{find_tracefs()}/instances/{inst}")


def test_isolated_and_msr_options_reach_the_trace(tmp_path: Path) -> None:
    need_backend("tracefs")
    out = tmp_path / "opts.pkstrace"
    record_cli("tracefs", out, "--isolated", "1", "--msr", "0x830", calls=20)
    trace = tracefile.read_trace(out)
    assert trace.meta.isolated_cpus == [1]
    msr = trace.events[trace.events["kind"] == "msr_write"]["msr"]
    assert len(msr) and set(msr.unique()) == {0x830}  # every IPI writes the x2APIC ICR
    probe = {p["name"]: p for p in trace.meta.probes}["msr:write_msr"]
    assert "msr == 0x830" in probe["reason"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpus_option_records_only_those_cpus(backend: str, tmp_path: Path) -> None:
    need_backend(backend)
    out = tmp_path / "cpu1.pkstrace"
    record_cli(backend, out, "--cpus", "1")
    trace = tracefile.read_trace(out)
    ev = trace.events
    entries = ev[(ev["kind"] == "csd_entry") & (ev["func"] == CALLED_FUNC)]
    skip_if_perf_starved(trace.meta, len(entries), N)
    assert len(ev) and set(ev["cpu"].unique()) == {1}
    # The calls arrive on CPU 1 (their queues, on CPU 0, are not kept); a shortfall
    # must be reported as lost. This 6.18 kernel itself now and then records no
    # csd_function_entry for a remote call and counts no loss: the plain-shell tracefs
    # capture in tests/fixtures/ftrace_cpuid_2cpu.txt (no pkstrace code) has 200
    # cpuid queues to CPU 1 but 199 remote entries, and a clean-clone CI run on the
    # quiet machine (2026-11-26 10:35, tracefs: the kernel's own ring buffer, which
    # counted no loss) had 196. Allow 3%, no more.
    unreported = max(1, 3 * N // 100)
    assert len(entries) + sum(trace.meta.lost_events.values()) >= N - unreported, \
        (len(entries), trace.meta.lost_events)


def test_perf_sees_events_while_the_bcc_backend_runs(tmp_path: Path) -> None:
    """A BPF tracepoint program returning 0 hides the tracepoint from every perf
    event; pkstrace's BPF probes return 1, so perf users keep their events."""
    need_backend("bcc")
    need_backend("perf")
    rec = subprocess.Popen([*PKSTRACE, "record", "--backend", "bcc", "-o",
                            str(tmp_path / "bcc.pkstrace"), "--no-status", "-q"],
                           stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_line(rec, "probes attached")
        out = tmp_path / "perf.pkstrace"
        _, wpid = record_cli("perf", out)
        perf_trace = tracefile.read_trace(out)
        got = len(workload_queue(perf_trace.events, wpid))
        foreign = perf_trace.meta.extra["perf"]["foreign_bpf"]
        # Our bcc recorder is listed (its BPF is on the same tracepoints) and
        # must not be what hides them; a third party's program may.
        if got < N and set(sum(foreign.values(), [])) - {rec.pid}:
            pytest.skip(f"a third process's BPF program hides tracepoints: {foreign}")
        assert got == N, foreign
    finally:
        rec.send_signal(signal.SIGINT)
        rec.wait(timeout=60)
    bcc_trace = tracefile.read_trace(tmp_path / "bcc.pkstrace")
    assert len(workload_queue(bcc_trace.events, wpid)) == N
