"""perf backend: perf's Python bindings (Debian's linux-perf, ``import perf``).

One ``perf.evlist`` per tracepoint, on every CPU (a single-event evlist needs no
sample ids to tell events apart: the 6.1 binding returns None, without consuming,
for a sample it cannot map to an event, which stalls a shared ring). MSR filters
go to the kernel with the PERF_EVENT_IOC_SET_FILTER ioctl on each event fd.
Samples carry raw pointers (callsite, func, csd); they are symbolised from
/proc/kallsyms (:mod:`pkstrace.backends.symbols`) into the same spellings the
kernel's ``%pS`` / ``%ps`` give in tracefs text. Lost events come from
PERF_RECORD_LOST records while recording and, at the end, from each event's count
minus the samples read (which also catches samples a kernel drops silently).

The binding reads one event per call (a Python object each): this is the one
per-event loop in pkstrace, and it only appends to column lists.

Not available here: irqs-off / irq context / preempt depth (ftrace's flags
column); use the tracefs backend when the preempt-count drift matters.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import select
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pkstrace import schema
from pkstrace.backends.base import Backend, ProbeResult, ProbeSpec, quiet_stderr
from pkstrace.backends.symbols import kernel_symbols

PERF_EVENT_IOC_SET_FILTER = 0x40082406  # _IOW('$', 6, char *)
PERF_EVENT_IOC_DISABLE = 0x2401  # _IO('$', 1)
RING_PAGES = 512  # per CPU per tracepoint: 2 MiB
# Samples taken per read(), over all rings (taken READ_CHUNK at a time from each ring
# in turn, so a busy ring does not starve the others). Under a flood the kernel
# refills the rings about as fast as Python empties them (5-8 us a sample on a loaded
# host): reading until they were empty held the recorder for seconds past its
# duration or Ctrl-C, with the rows in memory. What is not read in time is
# overwritten and counted as lost by the kernel.
READ_BUDGET = 1 << 16
READ_CHUNK = 1 << 10
# Kernel task state bits -> ftrace's letters (sched_switch prev_state).
_STATE_LETTERS = ((0x1, "S"), (0x2, "D"), (0x4, "T"), (0x8, "t"), (0x10, "X"), (0x20, "Z"),
                  (0x40, "P"), (0x80, "I"))


def prev_state_letters(states: np.ndarray) -> np.ndarray:
    """sched_switch prev_state numbers -> 'R', 'S', 'D', ... (+ for preempted), vectorised."""
    s = np.asarray(states, dtype=np.int64)
    uniq, inv = np.unique(s, return_inverse=True)
    labels = []
    for v in uniq.tolist():
        low = v & 0xFF
        letters = "|".join(ch for bit, ch in _STATE_LETTERS if low & bit) or "R"
        labels.append(letters + ("+" if v & 0x100 else ""))
    return np.asarray(labels, dtype=object)[inv]


def cpumask_to_list(mask: Any) -> str:
    """Raw cpumask bytes (array of unsigned long) -> '0-3,6'."""
    if isinstance(mask, str):
        return mask
    b = bytes(mask or b"")
    bits = np.unpackbits(np.frombuffer(b, dtype=np.uint8), bitorder="little")
    return schema.format_cpulist(np.flatnonzero(bits).tolist())


# Per tracepoint: the sample fields read, in the order stored in a row tuple.
FIELDS: dict[str, tuple[str, ...]] = {
    "write_msr": ("msr", "val", "failed"),
    "read_msr": ("msr", "val", "failed"),
    "csd_queue_cpu": ("cpu", "callsite", "func", "csd"),
    "csd_function_entry": ("func", "csd"),
    "csd_function_exit": ("func", "csd"),
    "ipi_send_cpu": ("cpu", "callsite", "callback"),
    "ipi_send_cpumask": ("cpumask", "callsite", "callback"),
    "call_function_entry": ("vector",),
    "call_function_exit": ("vector",),
    "call_function_single_entry": ("vector",),
    "call_function_single_exit": ("vector",),
    "sched_switch": ("prev_comm", "prev_pid", "prev_state", "next_comm", "next_pid"),
}


def _perf_mappings() -> set[tuple[int, int]]:
    """(start, end) of this process's perf ring-buffer mappings."""
    out = set()
    with open("/proc/self/maps") as f:
        for line in f:
            if "[perf_event]" in line:
                a, _, b = line.split()[0].partition("-")
                out.add((int(a, 16), int(b, 16)))
    return out


def _disable(fds: Sequence[int]) -> None:
    """Stop the events counting (a closed or already disabled fd is fine)."""
    for fd in fds:
        try:
            fcntl.ioctl(fd, PERF_EVENT_IOC_DISABLE, 0)
        except OSError:
            pass


class _Source:
    """One tracepoint's evlist and the rows read from it since the last batch."""

    def __init__(self, spec: ProbeSpec, evlist: Any, cpus: list[int]) -> None:
        self.spec = spec
        self.event = spec.tracepoint
        self.kind = schema.TRACEPOINT_KINDS[self.event].value
        self.fields = FIELDS[self.event]
        self.evlist = evlist
        self.cpus = cpus
        self.fds = [f.fileno() for f in evlist.get_pollfd()]
        self.rows: list[tuple[Any, ...]] = []
        self.format_parsed = False
        self.received = np.zeros(max(cpus, default=0) + 1, dtype=np.int64)  # samples per CPU
        self.mappings: list[tuple[int, int]] = []


class PerfBackend(Backend):
    name = "perf"

    def __init__(self, probes: Sequence[ProbeSpec], cpus: Sequence[int] | None = None) -> None:
        super().__init__()
        self.probes = [p for p in probes if p.kind == "tracepoint"]
        self.kprobes = [p for p in probes if p.kind == "kprobe"]
        self.only_cpus = list(cpus) if cpus else None
        self.sources: list[_Source] = []
        self.lost: dict[int, int] = {}
        self.comms: dict[int, str] = {}
        self._syms = None
        self._symbols: dict[int, str] = {}
        self._detached = False
        self._notes: list[str] = []
        self._graveyard: list[Any] = []
        self._stopped = False
        self.throttled: dict[int, int] = {}
        self.foreign_bpf: dict[str, list[int]] = {}
        self._unsampled: dict[int, int] = {}

    @property
    def clock(self) -> str:
        return "perf"  # perf_clock (local_clock), not CLOCK_MONOTONIC

    def attach(self) -> list[ProbeResult]:
        import perf

        self._syms = kernel_symbols()
        # Events are opened only on the CPUs asked for (--cpus).
        cpumap = (perf.cpu_map(cpustr=schema.format_cpulist(self.only_cpus))
                  if self.only_cpus else perf.cpu_map())
        cpus = [int(c) for c in cpumap]
        threads = perf.thread_map(-1)
        results = []
        sample_type = perf.SAMPLE_RAW | perf.SAMPLE_TIME | perf.SAMPLE_CPU | perf.SAMPLE_TID
        for spec in self.probes:
            if spec.tracepoint not in FIELDS:
                results.append(ProbeResult(spec.name, spec.required, False,
                                           "perf backend cannot decode this tracepoint"))
                continue
            try:
                with quiet_stderr():  # libtraceevent's complaints about __get_cpumask
                    tp = perf.tracepoint(spec.system, spec.tracepoint)
            except Exception as e:  # noqa: BLE001 - the binding raises several kinds
                tp = -1
                err = str(e)
            else:
                err = ""
            if tp is None or tp < 0:
                results.append(ProbeResult(spec.name, spec.required, False,
                                           f"tracepoint not in this kernel {err}".strip()))
                continue
            try:
                # freq=0: the binding defaults to frequency mode, which would sample
                # a tracepoint at most once a second instead of every time.
                ev = perf.evsel(type=perf.TYPE_TRACEPOINT, config=tp, sample_period=1, freq=0,
                                sample_type=sample_type, watermark=1, wakeup_events=1 << 16)
                evl = perf.evlist(cpumap, threads)
                evl.add(ev)
                before = _perf_mappings()
                with quiet_stderr():  # libperf prints debug lines for every mmap
                    evl.open()
                    evl.mmap(pages=RING_PAGES)
                mapped = sorted(_perf_mappings() - before)
            except Exception as e:  # noqa: BLE001
                results.append(ProbeResult(spec.name, spec.required, False,
                                           f"perf_event_open failed: {e}"))
                continue
            src = _Source(spec, evl, cpus)
            src.mappings = mapped
            reason = "perf_event_open"
            if spec.filter:
                try:
                    for fd in src.fds:
                        fcntl.ioctl(fd, PERF_EVENT_IOC_SET_FILTER, spec.filter.encode() + b"\0")
                    reason += f", filter {spec.filter!r}"
                except OSError as e:
                    reason += f", filter in user space (kernel refused: {e.strerror})"
            self.sources.append(src)
            results.append(ProbeResult(spec.name, spec.required, True, reason))
        for k in self.kprobes:
            results.append(ProbeResult(k.name, k.required, False,
                                       "perf backend records tracepoints only "
                                       "(use --backend tracefs for kprobes)"))
        if not self.sources:
            raise self._error("perf: no tracepoint could be opened")
        self._foreign_bpf()
        # Events start counting when opened, one tracepoint after the other: the
        # first calls of a recording may show a queue without its entry. (Opening
        # them disabled and enabling them together through the pollfd fds lost
        # whole recordings now and then with this binding; not used.)
        return results

    # ---- reading ----------------------------------------------------------------
    def read(self, timeout: float = 0.2) -> pd.DataFrame:
        fds = [fd for s in self.sources for fd in s.fds]
        if timeout > 0 and fds:
            try:
                select.select(fds, [], [], timeout)
            except (InterruptedError, OSError):
                pass
        return self._read_all(READ_BUDGET)

    def _foreign_bpf(self) -> None:
        """Other processes' BPF programs on our tracepoints hide events from perf."""
        from pkstrace.backends.checks import bpf_on_tracepoints

        found = bpf_on_tracepoints({s.event for s in self.sources}, exclude_pid=os.getpid())
        for tp, pids in found.items():
            self.foreign_bpf.setdefault(tp, [])
            self.foreign_bpf[tp] = sorted(set(self.foreign_bpf[tp]) | set(pids))

    def stop(self) -> None:
        self._foreign_bpf()
        if self.foreign_bpf:
            self._notes.append(
                "perf: other BPF programs were attached to " + ", ".join(
                    f"{tp} (pid {','.join(map(str, p))})"
                    for tp, p in sorted(self.foreign_bpf.items()))
                + ": the kernel skips perf events where such a program returns 0, so "
                "events of these tracepoints may be missing and are not counted as lost")
        self._stopped = True
        for src in self.sources:
            _disable(src.fds)

    def drain(self) -> pd.DataFrame:
        return self._read_all()

    def _read_all(self, budget: int = 0) -> pd.DataFrame:
        """Samples from every ring, up to ``budget`` in all (0: until every ring is
        empty, for the drain, when the events are disabled and the rings no longer fill)."""
        import perf

        sample_cls, lost_cls = perf.sample_event, perf.lost_event
        throttle_cls = perf.throttle_event
        for src in self.sources:
            if not src.format_parsed:
                # The binding parses the tracepoint's format at the first field
                # access and complains on stderr about helpers it lacks
                # (__get_cpumask); the fields pkstrace reads decode fine.
                with quiet_stderr():
                    self._read_source(src, sample_cls, lost_cls, first_only=True)
        left = budget or float("inf")
        rings = [(src, cpu) for src in self.sources for cpu in src.cpus]
        while rings and left > 0:
            more = []  # rings that gave a whole chunk: maybe not empty yet
            for src, cpu in rings:
                evl, fields, rows = src.evlist, src.fields, src.rows
                n, chunk = 0, int(min(READ_CHUNK, left))
                while n < chunk:
                    e = evl.read_on_cpu(cpu)
                    if e is None:
                        break
                    n += 1
                    if isinstance(e, sample_cls):
                        rows.append((e.sample_time, e.sample_cpu, e.sample_tid,
                                     *[getattr(e, f) for f in fields]))
                    elif isinstance(e, lost_cls):
                        self.lost[cpu] = self.lost.get(cpu, 0) + int(e.lost)
                    elif isinstance(e, throttle_cls):
                        # PERF_RECORD_THROTTLE / UNTHROTTLE: the kernel stopped
                        # sampling this event for a while (counted as lost at the end).
                        self.throttled[cpu] = self.throttled.get(cpu, 0) + 1
                if n == chunk:
                    more.append((src, cpu))
                left -= n
                if left <= 0:
                    break
            rings = more
        frames = []
        for src in self.sources:
            if src.rows:
                rows, src.rows = src.rows, []
                frames.append(schema.normalize(self._frame(src, rows)))
        if not frames:
            return schema.empty_events()
        df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        df = df.sort_values("ts", kind="stable", ignore_index=True)
        self._fill_comm(df)
        return schema.normalize(df)

    def _read_source(self, src: _Source, sample_cls: Any, lost_cls: Any,
                     first_only: bool) -> None:
        for cpu in src.cpus:
            e = src.evlist.read_on_cpu(cpu)
            if e is None:
                continue
            if isinstance(e, sample_cls):
                src.rows.append((e.sample_time, e.sample_cpu, e.sample_tid,
                                 *[getattr(e, f) for f in src.fields]))
                src.format_parsed = True
            elif isinstance(e, lost_cls):
                self.lost[cpu] = self.lost.get(cpu, 0) + int(e.lost)
            if first_only and src.format_parsed:
                return

    def _frame(self, src: _Source, rows: list[tuple[Any, ...]]) -> pd.DataFrame:
        ev = src.event
        cols = list(zip(*rows, strict=True))
        n = len(rows)
        out: dict[str, Any] = {
            "ts": np.asarray(cols[0], dtype=np.int64),
            "cpu": np.asarray(cols[1], dtype=np.int32),
            "pid": np.asarray(cols[2], dtype=np.int32),
            "kind": np.full(n, src.kind, dtype=object),
        }
        src.received += np.bincount(out["cpu"], minlength=len(src.received))[:len(src.received)]
        f = dict(zip(src.fields, cols[3:], strict=True))
        syms = self._syms
        assert syms is not None
        if ev in ("write_msr", "read_msr"):
            out["msr"] = np.asarray(f["msr"], dtype=np.int64)
            out["value"] = np.asarray(f["val"], dtype=np.uint64)
            out["failed"] = np.asarray(f["failed"], dtype=np.int8)
            if src.spec.msrs:
                keep = np.isin(out["msr"], np.asarray(src.spec.msrs, dtype=np.int64))
                out = {k: v[keep] for k, v in out.items()}
        elif ev.startswith("csd_"):
            func = np.asarray(f["func"], dtype=np.uint64)
            out["func"] = syms.symbolize(func, with_offset=False)
            out["csd"] = np.asarray(f["csd"], dtype=np.uint64)
            self._symbols.update(syms.table(func))
            if ev == "csd_queue_cpu":
                out["target_cpu"] = np.asarray(f["cpu"], dtype=np.int32)
                cs = np.asarray(f["callsite"], dtype=np.uint64)
                out["callsite"] = syms.symbolize(cs)
                self._symbols.update(syms.table(cs))
        elif ev.startswith("ipi_send"):
            cs = np.asarray(f["callsite"], dtype=np.uint64)
            cb = np.asarray(f["callback"], dtype=np.uint64)
            out["callsite"] = syms.symbolize(cs)
            out["func"] = syms.symbolize(cb, with_offset=False)
            self._symbols.update(syms.table(cs))
            self._symbols.update(syms.table(cb))
            if ev == "ipi_send_cpu":
                out["target_cpu"] = np.asarray(f["cpu"], dtype=np.int32)
            else:
                out["cpumask"] = pd.Categorical([cpumask_to_list(m) for m in f["cpumask"]])
        elif ev.startswith("call_function"):
            out["vector"] = np.asarray(f["vector"], dtype=np.int32)
        elif ev == "sched_switch":
            prev_comm = np.asarray(f["prev_comm"], dtype=object)
            next_comm = np.asarray(f["next_comm"], dtype=object)
            out["pid"] = np.asarray(f["prev_pid"], dtype=np.int32)
            out["next_pid"] = np.asarray(f["next_pid"], dtype=np.int32)
            out["next_comm"] = next_comm
            out["prev_state"] = prev_state_letters(np.asarray(f["prev_state"]))
            # Context switches name tasks: remember them for other events' comm.
            self.comms.update(zip(out["next_pid"].tolist(), next_comm.tolist(), strict=True))
            self.comms.update(zip(out["pid"].tolist(), prev_comm.tolist(), strict=True))
        return pd.DataFrame(out)

    def _fill_comm(self, df: pd.DataFrame) -> None:
        """Samples have no task name: take it from sched_switch or /proc, per distinct pid."""
        if "comm" not in df.columns:
            df["comm"] = ""
        comm = df["comm"].to_numpy(dtype=object)
        missing = pd.isna(comm) | (comm == "")
        if not missing.any():
            return
        pids = df["pid"].to_numpy()
        uniq = np.unique(pids[missing])
        names = np.asarray([self._comm_of(int(p)) for p in uniq], dtype=object)
        idx = np.searchsorted(uniq, pids[missing])
        comm = comm.copy()
        comm[missing] = names[idx]
        df["comm"] = comm

    def _comm_of(self, pid: int) -> str:
        if pid == 0:
            return "<idle>"  # as ftrace names every CPU's swapper
        name = self.comms.get(pid)
        if name is None:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    name = f.read().strip()
            except OSError:
                name = "<...>"  # as ftrace shows a task it has no name for
            self.comms[pid] = name
        return name

    def _deficits(self) -> dict[int, int] | None:
        """Per CPU: the kernel's count of tracepoint hits minus the samples read.

        Each event fd reads as its count (every hit, sampled or not). None when
        a count cannot be read.
        """
        out: dict[int, int] = {}
        for src in self.sources:
            for cpu, fd in zip(src.cpus, src.fds, strict=False):
                try:
                    hits = int.from_bytes(os.read(fd, 8)[:8], "little")
                except OSError:
                    return None
                got = int(src.received[cpu]) if cpu < len(src.received) else 0
                out[cpu] = out.get(cpu, 0) + max(0, hits - got)
        return out

    def lost_events(self) -> dict[int, int]:
        """Lost samples per CPU.

        While recording: PERF_RECORD_LOST records. Once stopped and drained: each
        event's count minus the samples read. The kernel writes a LOST record
        only at the next sample that fits, so drops in the last moments would
        otherwise go unseen; and some kernels drop samples without any record
        (see :meth:`unsampled_hits`).
        """
        lost = dict(self.lost)
        if not self._stopped:
            return lost
        exact = self._deficits()
        if exact is None:
            return lost
        self._unsampled = {cpu: n - lost.get(cpu, 0) for cpu, n in sorted(exact.items())
                           if n > lost.get(cpu, 0)}
        return {cpu: max(n, lost.get(cpu, 0)) for cpu, n in exact.items()}

    def unsampled_hits(self) -> dict[int, int]:
        """Hits the kernel counted but neither sampled nor reported in a LOST record.

        Seen on Linux 6.18 (a 2-vCPU Firecracker guest, haltpoll idle): a
        tracepoint that fires in an interrupt on an idle CPU is counted by the
        perf event but never written to its ring, and `perf record -a` loses the
        same samples. Ring overflow, by contrast, always leaves LOST records.
        Known once :meth:`lost_events` ran after stopping (the counts are read
        from the event fds, which :meth:`detach` closes).
        """
        return dict(self._unsampled)

    def extra(self) -> dict[str, Any]:
        return {"ring_pages_per_cpu_per_tracepoint": RING_PAGES,
                "throttle_records": {str(k): v for k, v in self.throttled.items()},
                "foreign_bpf": dict(self.foreign_bpf),
                "unsampled_hits": {str(k): v for k, v in self.unsampled_hits().items()},
                "lost_from": "event counts minus samples read" if self._stopped
                else "PERF_RECORD_LOST"}

    def symbols(self) -> dict[int, str]:
        return dict(self._symbols)

    def notes(self) -> list[str]:
        notes = list(self._notes)
        unsampled = self.unsampled_hits()
        if unsampled:
            notes.append(
                "perf: the kernel counted " + ", ".join(
                    f"{n} hits on CPU {cpu}" for cpu, n in unsampled.items())
                + " that never reached perf's ring and left no LOST record (this kernel does "
                "not sample tracepoints hit in interrupts on an idle CPU; `perf record` loses "
                "them too); they are counted as lost: --backend bcc or tracefs records them")
        return notes + [
            "perf: no irqs-off / irq context / preempt depth (ftrace flags) in this backend"]

    def detach(self) -> list[str]:
        """Disable, unmap and close every event. Idempotent.

        The 6.1 binding's objects neither unmap their rings nor close their fds
        when freed, and a mapped ring keeps its event (and the tracepoint) alive,
        so the backend does both itself, for the mappings and fds it created.
        """
        if self._detached:
            return []
        self._detached = True
        problems = []
        libc = ctypes.CDLL(None, use_errno=True)
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        for src in self.sources:
            _disable(src.fds)
            for start, end in src.mappings:
                if libc.munmap(start, end - start) != 0:
                    problems.append(f"munmap perf ring {start:#x}: "
                                    f"{os.strerror(ctypes.get_errno())}")
            for fd in src.fds:
                try:
                    os.close(fd)
                except OSError as e:
                    problems.append(f"close perf fd {fd}: {e.strerror}")
            # The binding's objects now point at closed fds and unmapped rings:
            # keep them (freeing them does not touch either) but never read again.
            self._graveyard.append(src.evlist)
            src.evlist = None
        self.sources = []
        return problems

    def open_fds(self) -> int:
        """How many perf event fds this process still has (for tests)."""
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[perf_event]":
                    n += 1
            except OSError:
                pass
        return n
