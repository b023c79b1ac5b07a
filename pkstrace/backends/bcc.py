"""bcc backend: the BPF program in probes/pkstrace.bpf.c, compiled by bcc.

* ``events`` mode: every event through a per-CPU BPF ring buffer (kernel >= 5.8)
  as a 56-byte record (64 with its header: one cache line); a failed reserve is
  counted per CPU and becomes TraceMeta.lost_events. The rings are read straight
  from their memory (:class:`RingReader`, no callback per event, no wake-up per
  record: they are polled) and decoded with one numpy structured dtype (columns, not objects).
  Kernels before 5.8 (or ``--bpf-buffer perf``) get the same records through
  per-CPU perf rings instead (BPF_PERF_OUTPUT; :class:`PerfRingReader` reads them
  the same way, 72 bytes a record). Lost events per CPU there are the kernel's
  PERF_RECORD_LOST counts, or the outputs the BPF program saw fail where the
  kernel has not written its LOST record yet (it does so before the next record
  that fits); outputs the kernel accepted (counted per CPU in the BPF program)
  but that never reached the reader are counted as lost too, and named in a note.
  TraceMeta.extra["bcc"]["buffer"] says which buffer a trace used.
  Only sched_switch records carry task names; every other row's ``comm`` comes
  from the pid -> name map those build (or /proc/PID/comm for a task not yet
  switched), so a task that renames itself (exec) between two of its switches
  shows its later name.
* ``counts`` mode: nothing per event leaves the kernel. Per-CPU counts by (kind,
  MSR slot) in a per-CPU array, cross-CPU calls by (target CPU, func) and log2
  histograms of the queue -> entry latency (matched by csd pointer in a BPF LRU
  hash) are read at the end into TraceMeta.aggregates (format below); the trace
  has no rows.

How the programs attach (``--bpf-attach``, TraceMeta.extra["bcc"]["attach"]):
raw tracepoints (BPF_PROG_TYPE_RAW_TRACEPOINT on the TP_PROTO arguments, Linux
>= 4.17) by default, classic tracepoint programs (TRACEPOINT_PROBE) where raw
ones are not available or fail to attach, or when asked for (``tp``). A classic
program runs under the kernel's one per-CPU guard for all kprobe / tracepoint
BPF programs (trace_call_bpf: bpf_prog_active), so an IPI's tracepoint that
fires while any such program runs on that CPU is skipped; a raw program's guard
is its own (__bpf_trace_run: prog->active), so only the same program
interrupting itself is. sched_switch stays classic under ``auto`` (interrupts
are off while it runs, so no guard ever skips it, and its raw program costs
more); ``raw`` makes it raw too where vmlinux BTF gives task_struct's offsets
and the four-argument TP_PROTO (5.18+). The one such
nesting seen here, an MSR write in an interrupt while write_msr's program runs
for a process-context write, is recorded by a second program on write_msr (its
twin: it acts only while the first is busy on that CPU, Linux 6.1+), and what it
took over is subtracted from the first's misses; TraceMeta.extra["bcc"]
["recursion_guard"] keeps the kernel's own skip counts and that number.

Program runs the kernel skipped (its BPF recursion guard: another BPF program
was running on that CPU) are events nobody saw: they are counted as lost under
CPU -1 ("CPU unknown"; the kernel counts them per program, not per CPU), and
listed per program in TraceMeta.extra["bcc"]["recursion_misses"] (less those
write_msr's twin recorded).
* ``both``: one program doing both (tests use it to check that the two agree).

TraceMeta.aggregates (counts mode, ``format`` 1)::

    {"format": 1,
     "per_cpu":  [{"cpu", "kind", "msr", "count"}],   # msr: int for msr_* kinds, else None
     "calls":    [{"source_cpu", "target_cpu", "func", "count"}],   # csd_queue
     "latency_log2": [{"target_cpu", "func", "slot", "low_ns", "high_ns", "count"}],
     "unmatched_entries": int,    # csd entries whose queue was not seen (or whose
                                  # in-flight slot another call took meanwhile)
     "inflight_at_end": int,      # queued calls whose entry was not seen
     "calls_not_broken_down": int,       # beyond NFUNC functions on one CPU
     "latencies_not_broken_down": int}

``slot`` k holds latencies in [2**k, 2**(k+1)) ns (``low_ns``/``high_ns``).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import platform
import select
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pkstrace import schema
from pkstrace.backends.base import (
    WRITE_PKRS_ARGS,
    Backend,
    ProbeResult,
    ProbeSpec,
    kernel_version,
    quiet_stderr,
)
from pkstrace.backends.symbols import kernel_symbols

PROBE_FILE = "pkstrace.bpf.c"
MIN_RINGBUF_PAGES = 1024  # 4 MiB in all
MIN_RING_PAGES_PER_CPU = 64  # 256 KiB
KIND_CODES = {k: i for i, k in enumerate(schema.KINDS)}
MSR_KINDS = (KIND_CODES["msr_write"], KIND_CODES["msr_read"])
NFUNC = 32  # cross-CPU functions told apart per CPU in counts mode
INFLIGHT_BITS = 8  # 256 in-flight slots per target CPU
UNKNOWN_CPU = -1  # lost_events key for losses the kernel does not place on a CPU
BUFFERS = ("auto", "ring", "perf")  # --bpf-buffer
ATTACHES = ("auto", "raw", "tp")  # --bpf-attach
# Scratch records per CPU on the perf-buffer path where programs nest (raw
# tracepoints): process context, soft irq, irq, NMI.
PERF_NEST_RAW = 4
# Tracepoints with a raw twin in probes/pkstrace.bpf.c ("system:event"); the raw
# program is rawtp_<event>, compiled in by -DRAW_<EVENT>.
RAW_TRACEPOINTS = ("msr:write_msr", "msr:read_msr", "csd:csd_queue_cpu",
                   "csd:csd_function_entry", "csd:csd_function_exit", "ipi:ipi_send_cpu",
                   "ipi:ipi_send_cpumask", "irq_vectors:call_function_entry",
                   "irq_vectors:call_function_exit", "irq_vectors:call_function_single_entry",
                   "irq_vectors:call_function_single_exit", "sched:sched_switch")
# Why auto leaves sched_switch classic (`--bpf-attach raw` makes it raw too).
SCHED_SWITCH_CLASSIC = (
    "auto: sched_switch runs with interrupts off, so the shared guard never skips it, "
    "and its raw program reads task_struct through helpers (430 against 200 ns a run "
    "by bpf_stats here)")
# Mirror of struct event_t in probes/pkstrace.bpf.c: a head and a union body,
# `g` (generic: a, b, c, i) or `sw` (sched_switch), overlaid here by offsets.
EVENT_DTYPE = np.dtype({
    "names": ["ts", "pid", "cpu", "kind", "failed", "a", "b", "c", "i",
              "prev_state", "next_pid", "prev_comm", "next_comm"],
    "formats": ["<u8", "<u4", "<u2", "u1", "i1", "<u8", "<u8", "<u8", "<i4",
                "<i4", "<i4", "S16", "S16"],
    "offsets": [0, 8, 12, 14, 15, 16, 24, 32, 40, 16, 20, 24, 40],
    "itemsize": 56,
})
assert EVENT_DTYPE.itemsize == 56


def msr_slots(extra_msrs: Sequence[int] = ()) -> list[int]:
    """MSRs with their own counter slot in counts mode (slot k + 1 is the k-th)."""
    return sorted(set(schema.MSRS) | {int(m) for m in extra_msrs})[:62]


def possible_cpus() -> int:
    """Number of CPU ids the kernel may ever use (array sizes in the BPF program)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            return max(schema.parse_cpulist(f.read().strip())) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


def probes_dir() -> Path:
    env = os.environ.get("PKSTRACE_PROBES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "probes"


def _cond(var: str, values: Sequence[int]) -> str:
    """C expression: var is one of values (ranges collapsed)."""
    if not values:
        return "1"
    vals = sorted(set(int(v) for v in values))
    parts, i = [], 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        if i == j:
            parts.append(f"({var}) == {vals[i]:#x}")
        else:
            parts.append(f"(({var}) >= {vals[i]:#x} && ({var}) <= {vals[j]:#x})")
        i = j + 1
    return "(" + " || ".join(parts) + ")"


def _kernel_at_least(major: int, minor: int) -> bool:
    have = kernel_version(platform.release())
    return have == (0, 0) or have >= (major, minor)  # unreadable: assume a new kernel


def kernel_has_ringbuf() -> bool:
    return _kernel_at_least(5, 8)


def kernel_has_raw_tracepoints() -> bool:
    return _kernel_at_least(4, 17)


def kernel_has_per_program_guard() -> bool:
    """Raw tracepoint programs skip only their own nesting (prog->active in
    __bpf_trace_run, counted in recursion_misses) from Linux 6.1; before, none."""
    return _kernel_at_least(6, 1)


def choose_attach(requested: str) -> tuple[str, str]:
    """(attach, why): "raw" (raw tracepoint programs) or "tp" (classic ones)."""
    if requested not in ATTACHES:
        raise ValueError(f"bad BPF attach {requested!r} (choose {', '.join(ATTACHES)})")
    if requested == "auto":
        if kernel_has_raw_tracepoints():
            return "raw", "auto: raw tracepoints (Linux >= 4.17)"
        return "tp", (f"auto: classic tracepoints (Linux {platform.release()} < 4.17 has "
                      "no raw tracepoints)")
    return requested, f"{requested} (asked for)"


def raw_sched_switch_offsets() -> tuple[dict[str, int] | None, str]:
    """(task_struct offsets of pid, comm, exit_state, "") for the raw sched_switch
    program, or (None, why not): it needs vmlinux BTF and the four-argument
    TP_PROTO (bool preempt, prev, next, unsigned int prev_state) of Linux 5.18+."""
    from pkstrace.backends.checks import btf_facts

    facts = btf_facts()
    if facts is None:
        return None, "no kernel BTF for task_struct's layout"
    if facts.tracepoint_args.get("sched_switch") != 4:
        return None, (f"sched_switch has {facts.tracepoint_args.get('sched_switch', '?')} "
                      "raw arguments (want 4: Linux 5.18+)")
    need = ("pid", "comm", "exit_state")
    missing = [m for m in need if m not in facts.member_offsets]
    if missing:
        return None, f"task_struct members {missing} not in BTF"
    return {m: facts.member_offsets[m] for m in need}, ""


def choose_buffer(requested: str) -> tuple[str, str]:
    """(buffer, why) for events mode: "ring" (BPF ring buffer) or "perf" (perf rings)."""
    if requested not in BUFFERS:
        raise ValueError(f"bad BPF buffer {requested!r} (choose {', '.join(BUFFERS)})")
    has_ring = kernel_has_ringbuf()
    if requested == "auto":
        if has_ring:
            return "ring", "auto: BPF ring buffer (Linux >= 5.8)"
        return "perf", (f"auto: perf buffer (Linux {platform.release()} < 5.8 has no "
                        "BPF ring buffer)")
    return requested, f"{requested} (asked for)"


def _cstr(col: np.ndarray) -> np.ndarray:
    """S16 NUL-padded bytes -> str objects, decoding each distinct name once."""
    uniq, inv = np.unique(col, return_inverse=True)
    names = np.asarray([b.decode("utf-8", "replace") for b in uniq], dtype=object)
    return names[inv]


class RingReader:
    """Reads a BPF ring buffer's memory directly, many records per call.

    bcc (like libbpf) hands records to a Python callback one by one, which caps
    a Python consumer far below what the kernel produces in a flood. Every record
    here has one size (struct event_t), so the committed records between the
    consumer and producer positions form a regular array: one numpy view finds
    the first still-busy record, one copy takes the payloads, one store releases
    the space. Layout (kernel/bpf/ringbuf.c): page 0 consumer position (rw),
    page 1 producer position, then the data pages mapped twice in a row so a
    wrapped range reads contiguously; each record has an 8-byte header whose
    length word carries the BUSY (not yet committed) and DISCARD bits.
    """

    BUSY = 1 << 31
    DISCARD = 1 << 30

    def __init__(self, map_fd: int, data_bytes: int, record_bytes: int) -> None:
        page = mmap.PAGESIZE
        self.fd = map_fd
        self.mask = data_bytes - 1
        self.payload = record_bytes
        self.stride = (record_bytes + 8 + 7) & ~7
        self.consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self.producer = mmap.mmap(map_fd, page + 2 * data_bytes, mmap.MAP_SHARED,
                                  mmap.PROT_READ, offset=page)
        self.data_off = page
        self.stopped_at_busy = False  # the last read() stopped at an uncommitted record
        self.last_ts = 0  # ts of the last record read (a CPU's records come in ts order)

    def pending(self) -> int:
        prod = struct.unpack_from("<Q", self.producer, 0)[0]
        cons = struct.unpack_from("<Q", self.consumer, 0)[0]
        return prod - cons

    def read(self) -> bytes:
        """Payloads of every committed record, concatenated; frees their space."""
        prod = struct.unpack_from("<Q", self.producer, 0)[0]
        cons = struct.unpack_from("<Q", self.consumer, 0)[0]
        n = (prod - cons) // self.stride
        self.stopped_at_busy = False
        if n <= 0:
            return b""
        start = self.data_off + (cons & self.mask)
        recs = np.frombuffer(self.producer, dtype=np.uint8, count=n * self.stride,
                             offset=start).reshape(n, self.stride)
        lens = recs[:, :4].copy().view("<u4").ravel()
        busy = np.flatnonzero(lens & self.BUSY)
        self.stopped_at_busy = bool(len(busy))
        if len(busy):
            n = int(busy[0])  # stop at the first record a CPU is still writing
        lens = lens[:n]
        if n and ((lens & ~np.uint32(self.BUSY | self.DISCARD)) != self.payload).any():
            del recs
            raise ValueError("BPF ring buffer record of unexpected size "
                             "(probes/pkstrace.bpf.c and EVENT_DTYPE disagree)")
        keep = (lens & self.DISCARD) == 0
        out = recs[:n, 8:8 + self.payload][keep].tobytes()
        del recs
        struct.pack_into("<Q", self.consumer, 0, cons + n * self.stride)
        return out

    def close(self) -> None:
        for m in (self.consumer, self.producer):
            with contextlib.suppress(BufferError, ValueError):
                m.close()


# perf_event_open(2) for the BPF output events (x86-64; see <linux/perf_event.h>).
NR_PERF_EVENT_OPEN = 298
PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_BPF_OUTPUT = 10
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_ATTR_FLAG_WATERMARK = 1 << 14
PERF_EVENT_IOC_DISABLE = 0x2401
PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9
_PERF_ATTR = struct.Struct("<IIQQQQQII")  # type size config period sample_type
#                                            read_format flags wakeup_watermark bp_type
PERF_ATTR_SIZE = 112  # PERF_ATTR_SIZE_VER5 (4.1); the rest zero


def open_bpf_output_event(cpu: int, wakeup_bytes: int) -> int:
    """A PERF_COUNT_SW_BPF_OUTPUT event on ``cpu``: what bpf_perf_event_output()
    writes into. It wakes a poller only past ``wakeup_bytes`` in its ring (a
    wake-up is an irq_work self-IPI: another x2APIC ICR write, i.e. another
    msr:write_msr event here); the reader polls on a timer anyway."""
    attr = ctypes.create_string_buffer(PERF_ATTR_SIZE)
    _PERF_ATTR.pack_into(attr, 0, PERF_TYPE_SOFTWARE, PERF_ATTR_SIZE,
                         PERF_COUNT_SW_BPF_OUTPUT, 1, PERF_SAMPLE_RAW, 0,
                         PERF_ATTR_FLAG_WATERMARK, wakeup_bytes, 0)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(NR_PERF_EVENT_OPEN, attr, -1, cpu, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open(BPF output, cpu {cpu}): {os.strerror(err)}")
    return int(fd)


class PerfRingReader:
    """Reads one CPU's perf ring (a BPF output event's) directly, many records a call.

    bcc's open_perf_buffer() calls a Python function per record; here, as in
    :class:`RingReader`, the records form a regular array: every sample is
    8 (header) + 4 (raw size) + the 56-byte event + 4 bytes of padding to 8. One
    numpy view checks all headers; only a record of another type (a
    PERF_RECORD_LOST after an overflow: its count is taken) breaks the run and
    is stepped over. Layout (<linux/perf_event.h>): page 0 is perf_event_mmap_page
    (data_head at 1024, written by the kernel; data_tail at 1032, ours), then a
    power-of-two data area that records wrap around (not mapped twice).
    """

    HEAD = 1024
    TAIL = 1032
    LOST_OFF = 16  # PERF_RECORD_LOST: header, u64 id, u64 lost

    def __init__(self, event_fd: int, data_pages: int, record_bytes: int) -> None:
        page = mmap.PAGESIZE
        self.fd = event_fd
        self.size = data_pages * page
        self.payload = record_bytes
        self.stride = 8 + ((4 + record_bytes + 7) & ~7)
        self.mm = mmap.mmap(event_fd, page + self.size, mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE)
        self.data_off = page
        self.lost = 0  # from PERF_RECORD_LOST records
        self.arrived = 0  # samples read
        self.other_records = 0  # records of other types (none expected)
        self.stopped_at_busy = False  # a perf ring has no half-written records
        self.last_ts = 0

    def pending(self) -> int:
        head, tail = struct.unpack_from("<QQ", self.mm, self.HEAD)
        return head - tail

    def read(self) -> bytes:
        """Payloads of every sample in the ring, concatenated; frees their space."""
        head, tail = struct.unpack_from("<QQ", self.mm, self.HEAD)
        n = head - tail
        if n <= 0:
            return b""
        start = self.data_off + tail % self.size
        end = self.data_off + self.size
        if start + n <= end:
            buf = self.mm[start:start + n]
        else:  # the records wrap around the end of the data area
            buf = self.mm[start:end] + self.mm[self.data_off:self.data_off + n - (end - start)]
        out = []
        off = 0
        stride, payload = self.stride, self.payload
        while off < n:
            count = (n - off) // stride
            if count:
                recs = np.frombuffer(buf, dtype=np.uint8, count=count * stride,
                                     offset=off).reshape(count, stride)
                hdr = recs[:, :8].copy().view("<u4")  # type, misc | size << 16
                odd = np.flatnonzero((hdr[:, 0] != PERF_RECORD_SAMPLE)
                                     | ((hdr[:, 1] >> 16) != stride))
                k = int(odd[0]) if len(odd) else count
                if k:
                    out.append(recs[:k, 12:12 + payload].tobytes())
                    self.arrived += k
                    off += k * stride
                del recs
            if off >= n:
                break
            rtype, _, rsize = struct.unpack_from("<IHH", buf, off)
            if rsize < 8 or off + rsize > n:
                raise ValueError(f"perf ring record of size {rsize} at {off} of {n} bytes "
                                 "(corrupt ring)")
            if rtype == PERF_RECORD_LOST:
                self.lost += struct.unpack_from("<Q", buf, off + self.LOST_OFF)[0]
            elif rtype == PERF_RECORD_SAMPLE:
                raise ValueError("perf ring sample of unexpected size "
                                 "(probes/pkstrace.bpf.c and EVENT_DTYPE disagree)")
            else:
                self.other_records += 1
            off += rsize
        struct.pack_into("<Q", self.mm, self.TAIL, head)
        return b"".join(out)

    def close(self) -> None:
        if self.fd < 0:
            return  # closed already (the fd number may belong to someone else now)
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.fd, PERF_EVENT_IOC_DISABLE, 0)
        with contextlib.suppress(BufferError, ValueError):
            self.mm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1


def wait_any(rings: Sequence[RingReader | PerfRingReader], timeout: float) -> None:
    """Until a ring has records or the timeout passes (the probes never wake us:
    BPF_RB_NO_WAKEUP, so this is a poll on a timer)."""
    if any(r.pending() for r in rings):
        return
    try:
        select.select([r.fd for r in rings], [], [], timeout)
    except (InterruptedError, OSError, ValueError):
        pass


class BccBackend(Backend):
    name = "bcc"

    def __init__(self, probes: Sequence[ProbeSpec], cpus: Sequence[int] | None = None,
                 mode: str = "events", buffer_kb: int = 8192, bpf_buffer: str = "auto",
                 bpf_attach: str = "auto") -> None:
        super().__init__()
        if mode not in ("events", "counts", "both"):
            raise ValueError(f"bad bcc mode {mode!r}")
        # Where events mode streams: "ring" (BPF ring buffer) or "perf" (perf rings).
        self.buffer, self.buffer_why = choose_buffer(bpf_buffer)
        # How tracepoints attach: "raw" (where each can) or "tp" (classic).
        self.attach_mode, self.attach_why = choose_attach(bpf_attach)
        self.attach_requested = bpf_attach
        self.raw: set[str] = set()  # tracepoints ("system:event") attached raw
        # write_msr's twin program (probes/pkstrace.bpf.c: WRITE_MSR_TWIN) and what
        # it recorded for the first one, which the kernel skipped meanwhile.
        self.twin = False
        self._twin_fd = -1
        self._twin_took_at_start = 0
        self.guard: dict[str, Any] = {}
        self.classic_why: dict[str, str] = {}  # tracepoint -> why it is classic
        self._task_offsets: dict[str, int] = {}
        self.mode = "counts" if mode == "counts" else "events"
        self.want_events = mode in ("events", "both")
        self.want_counts = mode in ("counts", "both")
        self.probes = list(probes)
        self.cpus = list(cpus) if cpus else []
        self.bpf: Any = None
        self._rings: list[Any] = []  # RingReader or PerfRingReader, one per CPU
        self._ring_cpus: list[int] = []  # the CPU of each (perf rings: online CPUs only)
        self._drained = False
        self._perfbuf_fd = -1  # the perfbuf map's fd (owned by bcc)
        self._perf_sent: dict[int, int] = {}  # perf buffer: outputs the kernel accepted
        self._perf_failed: dict[int, int] = {}  # ... and refused (ring full)
        # One ring for all CPUs, KB x CPUs x 3 rounded up to a power of two pages
        # as BPF requires (64 MiB for the default 8 MiB x 2 CPUs): with 64-byte
        # records (56 + header) about 1 M events, 2.5 s at this host's peak
        # rate, while the reader polls every 0.2 s.
        ncpu = os.cpu_count() or 1
        pages = max(MIN_RINGBUF_PAGES, (int(buffer_kb) * ncpu * 3) // 4)
        self.ringbuf_pages = 1 << (pages - 1).bit_length()
        # ... split into one ring per possible CPU (the probes write their own CPU's).
        self.nrings = possible_cpus()
        per_ring = max(MIN_RING_PAGES_PER_CPU, self.ringbuf_pages // self.nrings)
        self.ring_pages = 1 << (per_ring - 1).bit_length()
        self._chunks: list[bytes] = []
        self._held = b""  # records after the watermark, for the next batch
        self._watermark: int | None = None
        self._comms: dict[int, str] = {0: "<idle>"}  # pid -> name (from sched_switch)
        self._msr_slots: list[int] = []
        self._symbols: dict[int, str] = {}
        self._syms = None
        self._detached = False
        self._aggregates: dict[str, Any] = {}
        self._notes: list[str] = []
        self._kprobes: list[str] = []
        self._fentry: list[Any] = []  # fentry.FentryLink, one per attached function
        self._stopped = False
        self.misses: dict[str, int] = {}
        self._misses_at_start: dict[str, int] = {}

    @property
    def clock(self) -> str:
        return "mono"  # bpf_ktime_get_ns() is CLOCK_MONOTONIC

    def cflags(self) -> list[str]:
        names = {p.name for p in self.probes if p.kind == "tracepoint"}
        msr = next((p for p in self.probes if p.name == "msr:write_msr"), None)
        self._msr_slots = msr_slots(msr.msrs if msr else ())
        other_slot = len(self._msr_slots) + 1
        # Known MSR -> its slot as a chain of constant compares (no map lookup).
        slot_expr = str(other_slot)
        for k, m in reversed(list(enumerate(self._msr_slots, 1))):
            slot_expr = f"((m) == {m:#x} ? {k} : {slot_expr})"
        flags = []
        if self.buffer == "perf":
            flags.append("-DPERF_BUFFER")
        else:
            rings = " ".join(f"BPF_RINGBUF_OUTPUT(events{i}, RINGBUF_PAGES);"
                             for i in range(self.nrings))
            flags += [f"-DRINGBUF_PAGES={self.ring_pages}", f"-DEVENT_RINGS={rings}"]
        flags += [f"-DMSR_KEEP(m)={_cond('m', msr.msrs if msr else ())}",
                 f"-DCPU_KEEP(c)={_cond('c', self.cpus)}",
                 f"-DNKINDS={len(KIND_CODES)}", f"-DNSLOTS={other_slot + 1}",
                 f"-DOTHER_SLOT={other_slot}", f"-DMSR_SLOT(m)={slot_expr}",
                 f"-DNCPUS={possible_cpus()}", f"-DNFUNC={NFUNC}",
                 f"-DINFLIGHT_BITS={INFLIGHT_BITS}", f"-DINFLIGHT_SLOTS={1 << INFLIGHT_BITS}"]
        flags += [f"-DKIND_{k.upper()}={v}" for k, v in KIND_CODES.items()]
        raw = sorted(self.raw & names)
        flags += [f"-DRAW_{n.split(':')[1].upper()}" for n in raw]
        if raw:
            flags.append("-DNESTING")
            if not kernel_has_per_program_guard():
                flags.append("-DSELF_NESTING")  # no guard: a program nests in itself
            if self.buffer == "perf":
                flags.append(f"-DPERF_NEST={PERF_NEST_RAW}")
        if self.twin:
            flags.append("-DWRITE_MSR_TWIN")
        if "sched:sched_switch" in raw:
            flags += [f"-DTASK_PID_OFF={self._task_offsets['pid']}",
                      f"-DTASK_COMM_OFF={self._task_offsets['comm']}",
                      f"-DTASK_EXIT_STATE_OFF={self._task_offsets['exit_state']}"]
        if self.want_events:
            flags.append("-DWANT_EVENTS")
        if self.want_counts:
            flags.append("-DWANT_COUNTS")
        if "msr:read_msr" in names:
            flags.append("-DWITH_READ_MSR")
        if names & {"ipi:ipi_send_cpu", "ipi:ipi_send_cpumask"}:
            flags.append("-DWITH_IPI")
        if any(n.startswith("irq_vectors:") for n in names):
            flags.append("-DWITH_CALLFUNC")
        if "sched:sched_switch" in names:
            flags.append("-DWITH_SCHED")
        if any(p.kind == "kprobe" for p in self.probes):
            flags.append("-DWITH_KPROBES")
        progs = self._fentry_progs()
        if progs:
            flags += ["-DWITH_FENTRY", "-DFENTRY_PROGS=" + " ".join(m for _, _, m in progs)]
        return flags

    def _fentry_progs(self) -> list[tuple[ProbeSpec, str, str]]:
        """(spec, program name, FENTRY_* macro call) for each fentry probe."""
        out, n = [], {"wpkrs": 0, "global": 0}
        for p in self.probes:
            if p.kind != "fentry":
                continue
            what = "wpkrs" if p.fetchargs == WRITE_PKRS_ARGS else "global"
            i = n[what]
            n[what] += 1
            out.append((p, f"fentry_{what}_{i}", f"FENTRY_{what.upper()}({i})"))
        return out

    def _attach_fentry(self) -> list[ProbeResult]:
        """Load and attach the fentry programs (backends/fentry.py: bcc 0.26 cannot
        target a module's function)."""
        from bcc import lib

        from pkstrace.backends import fentry

        results = []
        module = self.bpf.module
        lic = lib.bpf_module_license(module) or b"GPL"
        for p, prog, _ in self._fentry_progs():
            start = lib.bpf_function_start(module, prog.encode())
            size = lib.bpf_function_size(module, prog.encode())
            try:
                if not start:
                    raise fentry.FentryError(f"{prog} not in the compiled program")
                link = fentry.load_and_attach(start, size, lic, prog, p.symbol)
                self._fentry.append(link)
                results.append(ProbeResult(p.name, p.required, True,
                                           f"BPF fentry ({link.btf} BTF)"))
            except fentry.FentryError as e:
                results.append(ProbeResult(p.name, p.required, False, str(e)))
        return results

    def attach(self) -> list[ProbeResult]:
        from bcc import BPF

        if self.want_events and self.buffer == "ring" and not kernel_has_ringbuf():
            raise self._error(f"bcc: the BPF ring buffer needs Linux >= 5.8, this is "
                              f"{platform.release()} (use --bpf-buffer perf)")
        self._syms = kernel_symbols()
        src_path = probes_dir() / PROBE_FILE
        try:
            text = src_path.read_text()
        except OSError as e:
            raise self._error(f"bcc: cannot read {src_path}: {e.strerror}") from None
        # Tracepoints the kernel lacks would fail the whole compile: leave them out.
        missing = [p for p in self.probes if p.kind == "tracepoint"
                   and not os.path.isdir(_tp_dir(p.system, p.tracepoint))]
        if missing:
            self.probes = [p for p in self.probes if p not in missing]
        self._plan_raw()
        # A raw tracepoint that fails to load or attach is compiled again as a
        # classic one (each failure moves at least one; classic ones are last).
        for _ in range(len(self.raw) + 1):
            # Events mode only: in counts mode the twin's run on every MSR write
            # cost 11% of the BPF time per event for the few writes it takes over.
            self.twin = ("msr:write_msr" in self.raw and kernel_has_per_program_guard()
                         and self.want_events)
            try:
                with quiet_stderr():
                    self.bpf = BPF(text=text, cflags=self.cflags())
            except Exception as e:  # noqa: BLE001 - bcc raises Exception for compile errors
                if self.raw:
                    why = f"raw program did not compile/load: {_one_line(e)}"
                    self.classic_why.update({n: why for n in self.raw})
                    self.raw = set()
                    continue
                raise self._error(f"bcc: cannot compile/load {src_path.name}: "
                                  f"{_one_line(e)}") from None
            failed = self._attach_raw()
            if not failed:
                break
            self.classic_why.update(failed)
            self.raw -= set(failed)
            self._close_twin()
            with contextlib.suppress(Exception):
                self.bpf.cleanup()
            self.bpf = None
        results = [ProbeResult(p.name, p.required, False, "tracepoint not in this kernel")
                   for p in missing]
        attached = {k.decode() if isinstance(k, bytes) else k  # "system:event"
                    for k in getattr(self.bpf, "tracepoint_fds", {})}
        attached_raw = {k.decode() if isinstance(k, bytes) else k  # "event"
                        for k in getattr(self.bpf, "raw_tracepoint_fds", {})}
        for p in self.probes:
            if p.kind != "tracepoint":
                continue
            if p.name in self.raw:
                ok = p.tracepoint in attached_raw
                how = "BPF raw tracepoint program"
            else:
                ok = p.name in attached
                how = "BPF tracepoint program" + (f", filter {p.filter!r}" if p.filter else "")
                if p.name in self.classic_why:
                    how += f" (not raw: {self.classic_why[p.name]})"
            results.append(ProbeResult(p.name, p.required, ok,
                                       how if ok else "not attached by bcc"))
        for p in self.probes:
            if p.kind != "kprobe":
                continue
            fn = "kprobe_write_pkrs" if p.fetchargs == WRITE_PKRS_ARGS else "kprobe_global_update"
            try:
                self.bpf.attach_kprobe(event=p.symbol, fn_name=fn)
                self._kprobes.append(p.symbol)
                results.append(ProbeResult(p.name, p.required, True, "BPF kprobe"))
            except Exception as e:  # noqa: BLE001
                results.append(ProbeResult(p.name, p.required, False,
                                           f"kprobe refused: {_one_line(e)}"))
        results += self._attach_fentry()
        if self.want_events and self.buffer == "perf":
            self._open_perf_rings()
        elif self.want_events:
            rings = self.bpf[b"rings"]
            for cpu in range(self.nrings):
                fd = self.bpf[f"events{cpu}".encode()].map_fd
                rings[ctypes.c_int(cpu)] = ctypes.c_int(fd)
                self._rings.append(RingReader(fd, self.ring_pages * mmap.PAGESIZE,
                                              EVENT_DTYPE.itemsize))
                self._ring_cpus.append(cpu)
        # Misses before the switch are not events of this recording.
        self._misses_at_start = self.recursion_misses()
        self._twin_took_at_start = self._twin_took()
        self._switch(True)  # every probe starts at the same instant
        return results

    def _plan_raw(self) -> None:
        """Which tracepoints go raw (self.raw), and why the others do not."""
        self.raw, self.classic_why = set(), {}
        names = [p.name for p in self.probes if p.kind == "tracepoint"]
        if self.attach_mode != "raw":
            self.classic_why = {n: self.attach_why for n in names}
            return
        for n in names:
            if n not in RAW_TRACEPOINTS:
                self.classic_why[n] = "no raw program for it"
            elif n == "sched:sched_switch" and self.attach_requested == "auto":
                self.classic_why[n] = SCHED_SWITCH_CLASSIC
            elif n == "sched:sched_switch":
                offsets, why = raw_sched_switch_offsets()
                if offsets is None:
                    self.classic_why[n] = why
                else:
                    self._task_offsets = offsets
                    self.raw.add(n)
            else:
                self.raw.add(n)

    def _attach_raw(self) -> dict[str, str]:
        """Attach each raw program; {tracepoint: why} for those that failed."""
        failed = {}
        for n in sorted(self.raw):
            event = n.split(":")[1]
            try:
                with quiet_stderr():
                    self.bpf.attach_raw_tracepoint(tp=event, fn_name=f"rawtp_{event}")
            except Exception as e:  # noqa: BLE001 - bcc raises Exception
                failed[n] = f"raw attach failed: {_one_line(e)}"
        if self.twin and not failed:
            self._attach_twin()
        return failed

    def _attach_twin(self) -> None:
        """write_msr's second raw program, after the first (bcc keeps one program per
        raw tracepoint name, so this one is attached by hand)."""
        from bcc import BPF, lib

        try:
            with quiet_stderr():
                fn = self.bpf.load_func(b"twin_write_msr", BPF.RAW_TRACEPOINT)
            fd = lib.bpf_attach_raw_tracepoint(fn.fd, b"write_msr")
            if fd < 0:
                raise OSError(ctypes.get_errno(), "bpf_raw_tracepoint_open failed")
        except Exception as e:  # noqa: BLE001 - record without it: misses stay counted
            self.twin = False
            self._notes.append(f"bcc: write_msr's twin program not attached ({_one_line(e)}): "
                               "MSR writes in interrupts during another are lost (counted)")
            return
        self._twin_fd = fd

    def _close_twin(self) -> None:
        if self._twin_fd >= 0:
            os.close(self._twin_fd)
            self._twin_fd = -1

    def _twin_took(self) -> int:
        if not self.twin or self.bpf is None:
            return 0
        return sum(int(v) for v in self.bpf[b"twin_took"][ctypes.c_int(0)])

    def _open_perf_rings(self) -> None:
        """One BPF output perf event and ring per online CPU, its fd stored at that
        CPU's index of `events` (an offline CPU runs no probe)."""
        from pkstrace.backends.hostfacts import online_cpus

        table = self.bpf[b"events"]
        size = self.ring_pages * mmap.PAGESIZE
        for cpu in online_cpus():
            if cpu >= self.nrings:
                continue
            fd = -1
            try:
                fd = open_bpf_output_event(cpu, wakeup_bytes=size // 2)
                reader = PerfRingReader(fd, self.ring_pages, EVENT_DTYPE.itemsize)
            except OSError as e:
                if fd >= 0:
                    os.close(fd)
                raise self._error(f"bcc: cannot open the perf buffer on CPU {cpu}: "
                                  f"{e.strerror or e}") from None
            self._rings.append(reader)
            self._ring_cpus.append(cpu)
            table[ctypes.c_int(cpu)] = ctypes.c_int(fd)

    def _perfbuf_state(self) -> np.ndarray:
        """perfbuf's per-CPU (writing, sent) words, one bpf() lookup for all CPUs."""
        from bcc.libbcc import lib

        ncpu = possible_cpus()
        nest = PERF_NEST_RAW if self.raw else 1
        rec_bytes = EVENT_DTYPE.itemsize * nest
        vsize = (rec_bytes + 16 + 7) & ~7  # struct perfbuf_t, per CPU
        buf = ctypes.create_string_buffer(vsize * ncpu)
        key = ctypes.c_int(0)
        if self._perfbuf_fd < 0:
            # By fd: bcc's table object cannot decode the struct (its s8 field).
            self._perfbuf_fd = lib.bpf_table_fd(self.bpf.module, b"perfbuf")
        if lib.bpf_lookup_elem(self._perfbuf_fd, ctypes.byref(key), buf) != 0:
            raise OSError(ctypes.get_errno(), "bpf lookup of perfbuf failed")
        words = np.frombuffer(buf.raw, dtype="<u8").reshape(ncpu, vsize // 8)
        return words[:, rec_bytes // 8:rec_bytes // 8 + 2]

    def _snapshot_perf_counters(self) -> None:
        if self.bpf is None or self.buffer != "perf" or not self.want_events:
            return
        state = self._perfbuf_state()
        self._perf_sent = {cpu: int(n) for cpu, n in enumerate(state[:, 1]) if n}
        failed = self.bpf[b"lost"][ctypes.c_int(0)]
        self._perf_failed = {cpu: int(n) for cpu, n in enumerate(failed) if n}

    def _perf_lost(self) -> tuple[dict[int, int], dict[int, int]]:
        """(lost per CPU, of which never arrived) on the perf buffer.

        Lost: the kernel's PERF_RECORD_LOST counts, or the outputs the program saw
        fail where they are more (the kernel writes a LOST record only before the
        next sample that fits, so the last overflow's may never come). Never arrived
        (known once drained): outputs the kernel accepted minus samples read.
        """
        lost: dict[int, int] = {}
        unarrived: dict[int, int] = {}
        for cpu, r in zip(self._ring_cpus, self._rings, strict=True):
            n = max(r.lost, self._perf_failed.get(cpu, 0))
            if self._drained:
                gone = self._perf_sent.get(cpu, 0) - r.arrived
                if gone > 0:
                    unarrived[cpu] = gone
                    n += gone
            lost[cpu] = n
        for cpu, n in self._perf_failed.items():
            # A CPU without a ring of ours (it came online after attach): every
            # output there failed.
            lost.setdefault(cpu, n)
        return lost, unarrived

    def _switch(self, on: bool) -> None:
        self.bpf[b"control"][ctypes.c_int(0)] = ctypes.c_uint32(1 if on else 0)

    def _prog_fdinfo(self) -> dict[str, dict[str, int]]:
        """Each loaded program's /proc/self/fdinfo counters, by function name."""
        fds = {name.decode() if isinstance(name, bytes) else name: getattr(fn, "fd", -1)
               for name, fn in (getattr(self.bpf, "funcs", None) or {}).items()}
        fds.update({link.prog_name: link.prog_fd for link in self._fentry})  # fentry.py's
        out: dict[str, dict[str, int]] = {}
        for key, fd in fds.items():
            try:
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    info = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            out[key] = {k: int(v) for k, v in info.items()
                        if k in ("prog_id", "recursion_misses") and v.strip().isdigit()}
        return out

    def prog_ids(self) -> dict[str, int]:
        """Kernel ids of the loaded programs (from /proc/self/fdinfo), by function name."""
        return {k: v["prog_id"] for k, v in self._prog_fdinfo().items() if "prog_id" in v}

    def recursion_misses(self) -> dict[str, int]:
        """Runs each program skipped because a BPF program was already running on that
        CPU (the kernel's recursion guard; another tool's BPF program counts too),
        since recording was switched on.

        Those events are missing from the trace and from the counts, and the
        kernel does not say on which CPU; `bpftool prog show` reports the same
        totals (from /proc/PID/fdinfo, read here).
        """
        now = {k: v.get("recursion_misses", 0) for k, v in self._prog_fdinfo().items()}
        return {k: n - self._misses_at_start.get(k, 0) for k, n in now.items()}

    def read(self, timeout: float = 0.2) -> pd.DataFrame:
        if self.bpf is None:
            return schema.empty_events()
        if self._rings:
            wait_any(self._rings, timeout)
            self._read_rings()
        else:
            time.sleep(timeout)
        return self._decode()

    def stop(self) -> None:
        """Detach the programs but keep the maps and ring: the final drain and the
        counts then describe exactly the same events."""
        if self.bpf is None or self._stopped:
            return
        self._stopped = True
        try:
            self._switch(False)  # every probe stops at the same instant
        except Exception as e:  # noqa: BLE001 - detaching below stops them anyway
            self._notes.append(f"bcc: could not switch recording off: {_one_line(e)}")
        misses = self.recursion_misses()
        took = self._twin_took() - self._twin_took_at_start
        if self.twin:
            self.guard = {"skipped_by_kernel": {k: v for k, v in misses.items() if v},
                          "write_msr_twin_took": took}
            # The twin's own skips are not lost: the first program ran for those
            # events (when both were busy, the first's skip is the one counted).
            misses.pop("twin_write_msr", None)
            if "rawtp_write_msr" in misses:
                misses["rawtp_write_msr"] = max(0, misses["rawtp_write_msr"] - took)
        self.misses = {k: v for k, v in misses.items() if v}
        if self.misses:
            self._notes.append(
                f"bcc: {sum(self.misses.values())} probe hits skipped by the kernel's BPF "
                "recursion guard (a BPF program was already running on that CPU; CPU "
                "unknown): " + ", ".join(f"{k} {v}" for k, v in sorted(self.misses.items())))
        for tp in list(self.bpf.tracepoint_fds):
            try:
                self.bpf.detach_tracepoint(tp)
            except Exception as e:  # noqa: BLE001 - cleanup() retries
                self._notes.append(f"detach {tp!r}: {_one_line(e)}")
        self._close_twin()
        for tp in list(getattr(self.bpf, "raw_tracepoint_fds", {})):
            try:
                self.bpf.detach_raw_tracepoint(tp)
            except Exception as e:  # noqa: BLE001 - cleanup() retries
                self._notes.append(f"detach raw {tp!r}: {_one_line(e)}")
        for sym in self._kprobes:
            try:
                self.bpf.detach_kprobe(event=sym)
            except Exception as e:  # noqa: BLE001
                self._notes.append(f"detach kprobe {sym}: {_one_line(e)}")
        self._kprobes = []
        for link in self._fentry:
            link.close()  # closing the link fd detaches the trampoline program
        self._fentry = []

    def _read_rings(self) -> None:
        """Take every committed record, and move the watermark up to which no CPU can
        still produce an earlier one.

        Each CPU's ring is in time order, but the rings are read one after another:
        a batch can hold CPU 0's events up to t and CPU 1's only up to t - d, and
        CPU 1's events from t - d to t then come in the next batch. Rows are handed
        on only up to the smallest time every ring has been read to, so batches
        follow each other in time. A ring read empty up to its producer position at
        t0 can only produce records stamped after t0 (the probe takes the time
        after reserving the record); one that stopped at a record still being
        written, only records stamped at or after its last committed one.
        """
        if self._detached:
            return  # the readers are closed
        marks = []
        writing = None
        if self.buffer == "perf" and self._rings and self.bpf is not None:
            # Perf rings get a record after its ts was taken (the program builds it,
            # then copies it out): a CPU whose program is between the two may still
            # add an earlier record. It raised its `writing` word before taking the
            # ts, so a CPU seen not writing now can only add records stamped later.
            t_flags = time.monotonic_ns()
            writing = self._perfbuf_state()[:, 0]
        for cpu, r in zip(self._ring_cpus, self._rings, strict=True):
            t0 = time.monotonic_ns() if writing is None else t_flags
            data = r.read()
            if data:
                self._chunks.append(data)
                r.last_ts = int(np.frombuffer(data, dtype=EVENT_DTYPE, offset=len(data)
                                              - EVENT_DTYPE.itemsize)["ts"][0])
            busy = r.stopped_at_busy or (writing is not None and cpu < len(writing)
                                         and bool(writing[cpu]))
            marks.append(r.last_ts if busy else max(t0, r.last_ts))
        self._watermark = min(marks) if marks else None

    def drain(self) -> pd.DataFrame:
        self._read_rings()
        self._watermark = None  # stopped: nothing earlier can come any more
        self._drained = self._stopped
        return self._decode()

    def _decode(self) -> pd.DataFrame:
        raw, self._chunks = b"".join([self._held, *self._chunks]), []
        self._held = b""
        if not raw:
            return schema.empty_events()
        ev = np.frombuffer(raw, dtype=EVENT_DTYPE)
        if self._watermark is not None:
            later = ev["ts"] > self._watermark
            if later.any():
                self._held = ev[later].tobytes()  # next batch (or the drain)
                ev = ev[~later]
                if not len(ev):
                    return schema.empty_events()
        syms = self._syms
        assert syms is not None
        kind = ev["kind"]
        kinds = np.asarray(schema.KINDS, dtype=object)[kind]
        is_msr = np.isin(kind, MSR_KINDS)
        is_queue = kind == KIND_CODES["csd_queue"]
        is_csd = is_queue | np.isin(kind, [KIND_CODES["csd_entry"], KIND_CODES["csd_exit"]])
        is_ipi = kind == KIND_CODES["ipi_send"]
        is_sched = kind == KIND_CODES["sched_switch"]
        is_global = kind == KIND_CODES["global_update"]
        is_wpkrs = kind == KIND_CODES["write_pkrs"]
        is_callfunc = np.isin(kind, [KIND_CODES["callfunc_entry"], KIND_CODES["callfunc_exit"]])
        gen_i = ev["i"]
        callsite = np.where(is_queue | is_ipi, ev["b"], 0).astype(np.uint64)
        func = np.where(is_csd | is_ipi, ev["c"], 0).astype(np.uint64)
        self._symbols.update(syms.table(callsite))
        self._symbols.update(syms.table(func))
        target_cpu = np.where(is_queue | is_ipi, gen_i, -1).astype(np.int32)
        cpumask = np.full(len(ev), "", dtype=object)
        has_mask = is_ipi & (target_cpu < 0)
        if has_mask.any():
            masks = ev["a"][has_mask]
            uniq, inv = np.unique(masks, return_inverse=True)
            labels = np.asarray([schema.format_cpulist([c for c in range(64) if (m >> c) & 1])
                                 for m in uniq.tolist()], dtype=object)
            cpumask[has_mask] = labels[inv]
        from pkstrace.backends.perf import prev_state_letters

        prev_state = np.full(len(ev), "", dtype=object)
        next_comm = np.full(len(ev), "", dtype=object)
        comm = np.full(len(ev), "", dtype=object)
        pid = ev["pid"].astype(np.int32)
        if is_sched.any():
            sw = ev[is_sched]
            prev_state[is_sched] = prev_state_letters(sw["prev_state"].astype(np.int64))
            prev_names = _cstr(sw["prev_comm"])
            next_names = _cstr(sw["next_comm"])
            comm[is_sched] = prev_names
            next_comm[is_sched] = next_names
            self._learn_comms(np.concatenate([pid[is_sched], sw["next_pid"]]),
                              np.concatenate([prev_names, next_names]),
                              np.concatenate([sw["ts"], sw["ts"]]))
        others = ~is_sched
        if others.any():
            upids, inv = np.unique(pid[others], return_inverse=True)
            names = np.asarray([self._comm_of(int(p)) for p in upids.tolist()], dtype=object)
            comm[others] = names[inv]
        comm[pid == 0] = "<idle>"  # as ftrace names every CPU's swapper
        cols: dict[str, Any] = {
            "ts": ev["ts"].astype(np.int64),
            "cpu": ev["cpu"].astype(np.int32),
            "pid": pid,
            "comm": comm,
            "kind": kinds,
            "msr": np.where(is_msr, gen_i.astype(np.int64) & 0xFFFFFFFF, -1),
            "value": np.where(is_msr | is_wpkrs, ev["a"], 0).astype(np.uint64),
            "failed": np.where(is_msr, ev["failed"], -1).astype(np.int8),
            "target_cpu": target_cpu,
            "cpumask": cpumask,
            "callsite": syms.symbolize(callsite),
            "func": syms.symbolize(func, with_offset=False),
            "csd": np.where(is_csd, ev["a"], 0).astype(np.uint64),
            "vector": np.where(is_callfunc, gen_i, -1).astype(np.int32),
            "pkey": np.where(is_global, gen_i, -1).astype(np.int16),
            "prot": np.where(is_global, ev["b"].astype(np.int64), -1),
            "next_pid": np.where(is_sched, ev["next_pid"], -1).astype(np.int32),
            "next_comm": next_comm,
            "prev_state": prev_state,
        }
        df = schema.normalize(cols)
        return df.sort_values("ts", kind="stable", ignore_index=True)

    def _learn_comms(self, pids: np.ndarray, names: np.ndarray, ts: np.ndarray) -> None:
        """Remember each pid's latest name seen in a sched_switch (prev or next)."""
        order = np.argsort(ts, kind="stable")
        pids, names = pids[order], names[order]
        # The last occurrence of each pid: unique on the reversed arrays.
        upids, first = np.unique(pids[::-1], return_index=True)
        latest = names[::-1][first]
        self._comms.update(zip(upids.tolist(), latest.tolist(), strict=True))

    def _comm_of(self, pid: int) -> str:
        name = self._comms.get(pid)
        if name is None:
            # Running since before the recording started and not switched yet.
            try:
                with open(f"/proc/{pid}/comm") as f:
                    name = f.read().rstrip("\n")
            except OSError:
                name = ""
            self._comms[pid] = name
        return name

    def lost_events(self) -> dict[int, int]:
        if self.bpf is None:
            return {}
        out: dict[int, int] = {}
        if self.want_events and self.buffer == "perf":
            self._snapshot_perf_counters()
            out = self._perf_lost()[0]
        elif self.want_events:
            vals = self.bpf[b"lost"][ctypes.c_int(0)]
            out = {cpu: int(v) for cpu, v in enumerate(vals)}
        missed = sum(self.misses.values())
        if missed:
            out[UNKNOWN_CPU] = out.get(UNKNOWN_CPU, 0) + missed
        return out

    def aggregates(self) -> dict[str, Any]:
        if self._aggregates or self.bpf is None or not self.want_counts:
            return self._aggregates
        syms = self._syms
        assert syms is not None
        b = self.bpf
        per_cpu = []
        nslots = len(self._msr_slots) + 2
        slot_msr = [None, *self._msr_slots, None]
        other: dict[tuple[int, int], int] = {}  # (kind, cpu) -> other-MSR count by number
        for k, vals in b[b"other_msrs"].items():
            for cpu, n in enumerate(vals):
                if n:
                    per_cpu.append({"cpu": cpu, "kind": schema.KINDS[k.kind],
                                    "msr": int(k.msr), "count": int(n)})
                    other[(int(k.kind), cpu)] = other.get((int(k.kind), cpu), 0) + int(n)
        for idx, vals in b[b"counts"].items():
            kind, slot = divmod(int(idx.value), nslots)
            for cpu, n in enumerate(vals):
                if not n:
                    continue
                if slot == nslots - 1:
                    # Other MSRs, counted by number above; what the full hash missed:
                    short = int(n) - other.get((kind, cpu), 0)
                    if short:
                        self._notes.append(f"bcc counts: {short} {schema.KINDS[kind]} events "
                                           f"on CPU {cpu} of MSRs beyond the table's 1024")
                    continue
                per_cpu.append({"cpu": cpu, "kind": schema.KINDS[kind], "msr": slot_msr[slot],
                                "count": int(n)})
        ncpus = possible_cpus()
        # Each CPU numbers the functions it saw in its own functab rows: row 0
        # (FUNCTAB_QUEUE) for `calls`, row 1 (FUNCTAB_ENTRY) for `latency`.
        ftab = b[b"functab"]
        functab, entry_tab = ([np.asarray(t.func[:], dtype=np.uint64)
                               for t in ftab[ctypes.c_int(row)]] for row in (0, 1))
        both = functab + entry_tab
        all_funcs = np.unique(np.concatenate(both)) if both else np.zeros(0, np.uint64)
        fnames = dict(zip(all_funcs.tolist(),
                          syms.symbolize(all_funcs, with_offset=False).astype(str).tolist(),
                          strict=True)) if len(all_funcs) else {}
        calls = []
        for idx, vals in b[b"calls"].items():
            fi, target = divmod(int(idx.value), ncpus)
            for cpu, n in enumerate(vals):
                if n and cpu < len(functab) and functab[cpu][fi]:
                    calls.append({"source_cpu": cpu, "target_cpu": target,
                                  "func": fnames[int(functab[cpu][fi])], "count": int(n)})
        hist = []
        for idx, vals in b[b"latency"].items():
            fi, slot = divmod(int(idx.value), 64)
            for cpu, n in enumerate(vals):
                if n and cpu < len(entry_tab) and entry_tab[cpu][fi]:
                    hist.append({"target_cpu": cpu, "func": fnames[int(entry_tab[cpu][fi])],
                                 "slot": slot, "low_ns": 1 << slot if slot else 0,
                                 "high_ns": 1 << (slot + 1), "count": int(n)})
        unmatched, calls_other, latency_other = (
            sum(int(x) for x in b[b"unmatched"][ctypes.c_int(i)]) for i in range(3))
        if calls_other or latency_other:
            self._notes.append(f"bcc counts: more than {NFUNC} cross-CPU functions on a CPU: "
                               f"{calls_other} calls and {latency_other} latencies of the "
                               "others are not in the aggregates")
        self._aggregates = {
            "format": 1,
            "per_cpu": sorted(per_cpu, key=lambda r: (r["kind"], r["msr"] or -1, r["cpu"])),
            "calls": sorted(calls, key=lambda r: (r["source_cpu"], r["target_cpu"], r["func"])),
            "latency_log2": sorted(hist, key=lambda r: (r["target_cpu"], r["func"], r["slot"])),
            "unmatched_entries": unmatched,
            "inflight_at_end": sum(1 for v in b[b"inflight"].values() if v.ts),
            "calls_not_broken_down": calls_other,
            "latencies_not_broken_down": latency_other,
        }
        return self._aggregates

    def extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "recursion_misses": dict(self.misses),
            "mode": "both" if self.want_events and self.want_counts else self.mode,
            # How each tracepoint attached (--bpf-attach): raw tracepoints, and
            # the classic ones with why they are not raw.
            "attach": {"requested": self.attach_requested, "mode": self.attach_mode,
                       "choice": self.attach_why,
                       "raw": sorted(self.raw), "write_msr_twin": self.twin,
                       "classic": {n: self.classic_why.get(n, "")
                                   for n in sorted({p.name for p in self.probes
                                                    if p.kind == "tracepoint"} - self.raw)}}}
        if self.guard:
            # recursion_misses above are the events lost; these are the kernel's
            # own skip counts, and the MSR writes the twin recorded for skips.
            out["recursion_guard"] = self.guard
        if not self.want_events:
            return out
        out["buffer"] = self.buffer
        out["buffer_choice"] = self.buffer_why
        if self.buffer == "ring":
            out.update({"ringbuf_pages": self.ring_pages * self.nrings, "rings": self.nrings})
            return out
        lost, unarrived = self._perf_lost()
        by_cpu = {cpu: r for cpu, r in zip(self._ring_cpus, self._rings, strict=True)}
        out["perf_pages_per_cpu"] = self.ring_pages
        # JSON object keys are strings: CPUs as "0", "1", ...
        out["perf_buffer"] = {
            "sent": {str(c): self._perf_sent.get(c, 0) for c in by_cpu},
            "arrived": {str(c): r.arrived for c, r in by_cpu.items()},
            "lost_records": {str(c): r.lost for c, r in by_cpu.items()},
            "output_failed": {str(c): self._perf_failed.get(c, 0) for c in by_cpu},
            "never_arrived": {str(c): n for c, n in unarrived.items()},
            "lost": {str(c): n for c, n in lost.items()},
        }
        return out

    def symbols(self) -> dict[int, str]:
        return dict(self._symbols)

    def notes(self) -> list[str]:
        out = list(self._notes)
        if self.want_events and self.buffer == "perf":
            out.append(f"bcc: events through per-CPU perf buffers ({self.buffer_why})")
            _, unarrived = self._perf_lost()
            if unarrived:
                out.append("bcc perf buffer: outputs the kernel accepted but never wrote to "
                           "the perf ring (counted as lost): " + ", ".join(
                               f"CPU {c} {n}" for c, n in sorted(unarrived.items())))
        out.append("bcc: no irqs-off / irq context / preempt depth (ftrace flags) "
                   "in this backend")
        if self.mode == "counts":
            out.append("counts mode: no event rows; see aggregates")
        return out

    def detach(self) -> list[str]:
        if self._detached:
            return []
        self._detached = True
        self.stop()
        if self.want_counts and self.bpf is not None:
            try:
                self.aggregates()
            except Exception as e:  # noqa: BLE001 - keep detaching
                self._notes.append(f"aggregates lost: {_one_line(e)}")
        problems = []
        try:
            self._snapshot_perf_counters()
        except Exception as e:  # noqa: BLE001 - keep detaching
            self._notes.append(f"perf buffer counters lost: {_one_line(e)}")
        for r in self._rings:
            r.close()  # readers (and their counts) stay for extra() and notes()
        if self.bpf is not None:
            ids = set(self.prog_ids().values())
            try:
                self.bpf.cleanup()
            except Exception as e:  # noqa: BLE001
                problems.append(f"bcc cleanup: {_one_line(e)}")
            self.bpf = None
            # The kernel frees a detached program after an RCU grace period (a raw
            # tracepoint link's only after an RCU-tasks-trace one: 20-60 ms here):
            # return once `bpftool prog show` no longer lists ours.
            left = wait_programs_freed(ids, timeout=5.0)
            if left:
                self._notes.append(f"bcc: the kernel had not freed BPF programs {sorted(left)} "
                                   "5 s after they were detached")
        return problems


BPF_PROG_GET_FD_BY_ID = 13
SYS_BPF = 321  # x86-64


def bpf_prog_alive(prog_id: int) -> bool:
    """Whether the kernel still has BPF program ``prog_id`` (ENOENT once freed; any
    other error, e.g. no CAP_SYS_ADMIN, answers no rather than wait for nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    attr = ctypes.create_string_buffer(prog_id.to_bytes(4, "little"), 16)
    fd = int(libc.syscall(SYS_BPF, BPF_PROG_GET_FD_BY_ID, attr, 16))
    if fd < 0:
        return False
    os.close(fd)
    return True


def wait_programs_freed(ids: set[int], timeout: float) -> set[int]:
    """Poll until the kernel has freed these programs; the ones still there."""
    deadline = time.monotonic() + timeout
    left = set(ids)
    while left:
        left = {i for i in left if bpf_prog_alive(i)}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    return left


def _tp_dir(system: str, name: str) -> str:
    from pkstrace.backends.tracefs import find_tracefs

    root = find_tracefs() or "/sys/kernel/tracing"
    return f"{root}/events/{system}/{name}"


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__
