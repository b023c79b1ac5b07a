"""bcc backend: the BPF program in probes/pkstrace.bpf.c, compiled by bcc.

* ``events`` mode: every event through a BPF ring buffer (kernel >= 5.8); a
  failed reserve is counted per CPU and becomes TraceMeta.lost_events. The ring
  is read straight from its memory (:class:`RingReader`, no callback per event)
  and decoded with one numpy structured dtype (columns, not objects).
* ``counts`` mode: nothing per event leaves the kernel. Per-CPU counts by (kind,
  MSR), cross-CPU calls by (target CPU, func) and log2 histograms of the
  queue -> entry latency (matched by csd pointer in a BPF hash) are read at the
  end into TraceMeta.aggregates (format below); the trace has no rows.
* ``both``: one program doing both (tests use it to check that the two agree).

TraceMeta.aggregates (counts mode, ``format`` 1)::

    {"format": 1,
     "per_cpu":  [{"cpu", "kind", "msr", "count"}],   # msr: int for msr_* kinds, else None
     "calls":    [{"source_cpu", "target_cpu", "func", "count"}],   # csd_queue
     "latency_log2": [{"target_cpu", "func", "slot", "low_ns", "high_ns", "count"}],
     "unmatched_entries": int,    # csd entries whose queue was not seen
     "inflight_at_end": int}      # queued calls whose entry was not seen

``slot`` k holds latencies in [2**k, 2**(k+1)) ns (``low_ns``/``high_ns``).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import platform
import select
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pkstrace import schema
from pkstrace.backends.base import WRITE_PKRS_ARGS, Backend, ProbeResult, ProbeSpec
from pkstrace.backends.symbols import kernel_symbols

PROBE_FILE = "pkstrace.bpf.c"
MIN_RINGBUF_PAGES = 1024  # 4 MiB
KIND_CODES = {k: i for i, k in enumerate(schema.KINDS)}
# Mirror of struct event_t in probes/pkstrace.bpf.c.
EVENT_DTYPE = np.dtype([
    ("ts", "<u8"), ("value", "<u8"), ("csd", "<u8"), ("callsite", "<u8"), ("func", "<u8"),
    ("prot", "<u8"), ("cpumask", "<u8"), ("prev_state", "<i8"),
    ("cpu", "<u4"), ("pid", "<u4"), ("target_cpu", "<i4"), ("vector", "<i4"), ("msr", "<u4"),
    ("next_pid", "<i4"), ("kind", "<u2"), ("failed", "<i2"), ("pkey", "<i2"), ("pad", "<u2"),
    ("comm", "S16"), ("next_comm", "S16"),
])
assert EVENT_DTYPE.itemsize == 128


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


def kernel_has_ringbuf() -> bool:
    try:
        major, minor = (int(x) for x in platform.release().split(".")[:2])
    except ValueError:
        return True
    return (major, minor) >= (5, 8)


def _cstr(col: np.ndarray) -> np.ndarray:
    """S16 NUL-padded bytes -> str objects, decoding each distinct name once."""
    uniq, inv = np.unique(col, return_inverse=True)
    names = np.asarray([b.decode("utf-8", "replace") for b in uniq], dtype=object)
    return names[inv]


@contextlib.contextmanager
def _quiet_stderr() -> Any:
    """bcc's compiler prints header warnings on stderr; keep them out of the status line."""
    saved = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


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

    def wait(self, timeout: float) -> None:
        if self.pending():
            return
        try:
            select.select([self.fd], [], [], timeout)
        except (InterruptedError, OSError):
            pass

    def pending(self) -> int:
        prod = struct.unpack_from("<Q", self.producer, 0)[0]
        cons = struct.unpack_from("<Q", self.consumer, 0)[0]
        return prod - cons

    def read(self) -> bytes:
        """Payloads of every committed record, concatenated; frees their space."""
        prod = struct.unpack_from("<Q", self.producer, 0)[0]
        cons = struct.unpack_from("<Q", self.consumer, 0)[0]
        n = (prod - cons) // self.stride
        if n <= 0:
            return b""
        start = self.data_off + (cons & self.mask)
        recs = np.frombuffer(self.producer, dtype=np.uint8, count=n * self.stride,
                             offset=start).reshape(n, self.stride)
        lens = recs[:, :4].copy().view("<u4").ravel()
        busy = np.flatnonzero(lens & self.BUSY)
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


class BccBackend(Backend):
    name = "bcc"

    def __init__(self, probes: Sequence[ProbeSpec], cpus: Sequence[int] | None = None,
                 mode: str = "events", buffer_kb: int = 8192) -> None:
        super().__init__()
        if mode not in ("events", "counts", "both"):
            raise ValueError(f"bad bcc mode {mode!r}")
        self.mode = "counts" if mode == "counts" else "events"
        self.want_events = mode in ("events", "both")
        self.want_counts = mode in ("counts", "both")
        self.probes = list(probes)
        self.cpus = list(cpus) if cpus else []
        self.bpf: Any = None
        self._ring: RingReader | None = None
        # One ring for all CPUs holding about as many events as tracefs's per-CPU
        # buffers together: a ring record (136 bytes) is ~3x a tracefs entry, so
        # KB x CPUs x 3, rounded up to a power of two pages as BPF requires.
        ncpu = os.cpu_count() or 1
        pages = max(MIN_RINGBUF_PAGES, (int(buffer_kb) * ncpu * 3) // 4)
        self.ringbuf_pages = 1 << (pages - 1).bit_length()
        self._chunks: list[bytes] = []
        self._symbols: dict[int, str] = {}
        self._syms = None
        self._detached = False
        self._aggregates: dict[str, Any] = {}
        self._notes: list[str] = []
        self._kprobes: list[str] = []
        self._stopped = False
        self.misses: dict[str, int] = {}

    @property
    def clock(self) -> str:
        return "mono"  # bpf_ktime_get_ns() is CLOCK_MONOTONIC

    def cflags(self) -> list[str]:
        names = {p.name for p in self.probes if p.kind == "tracepoint"}
        msr = next((p for p in self.probes if p.name == "msr:write_msr"), None)
        flags = [f"-DRINGBUF_PAGES={self.ringbuf_pages}",
                 f"-DMSR_KEEP(m)={_cond('m', msr.msrs if msr else ())}",
                 f"-DCPU_KEEP(c)={_cond('c', self.cpus)}"]
        flags += [f"-DKIND_{k.upper()}={v}" for k, v in KIND_CODES.items()]
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
        return flags

    def attach(self) -> list[ProbeResult]:
        from bcc import BPF

        if self.want_events and not kernel_has_ringbuf():
            raise self._error("bcc: the BPF ring buffer needs Linux >= 5.8 "
                              "(use --backend perf or tracefs)")
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
        try:
            with _quiet_stderr():
                self.bpf = BPF(text=text, cflags=self.cflags())
        except Exception as e:  # noqa: BLE001 - bcc raises Exception for compile errors
            raise self._error(f"bcc: cannot compile/load {src_path.name}: {_one_line(e)}") \
                from None
        results = [ProbeResult(p.name, p.required, False, "tracepoint not in this kernel")
                   for p in missing]
        attached = {k.decode() if isinstance(k, bytes) else k  # "system:event"
                    for k in getattr(self.bpf, "tracepoint_fds", {})}
        for p in self.probes:
            if p.kind == "tracepoint":
                how = "BPF tracepoint program" + (f", filter {p.filter!r}" if p.filter else "")
                ok = p.name in attached
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
        if self.want_events:
            self._ring = RingReader(self.bpf[b"events"].map_fd,
                                    self.ringbuf_pages * mmap.PAGESIZE, EVENT_DTYPE.itemsize)
        self._switch(True)  # every probe starts at the same instant
        return results

    def _switch(self, on: bool) -> None:
        self.bpf[b"control"][ctypes.c_int(0)] = ctypes.c_uint32(1 if on else 0)

    def prog_ids(self) -> dict[str, int]:
        """Kernel ids of the loaded programs (from /proc/self/fdinfo), by function name."""
        out: dict[str, int] = {}
        for name, fn in (getattr(self.bpf, "funcs", None) or {}).items():
            try:
                with open(f"/proc/self/fdinfo/{fn.fd}") as f:
                    for line in f:
                        if line.startswith("prog_id:"):
                            out[name.decode() if isinstance(name, bytes) else name] = \
                                int(line.split()[1])
            except (OSError, AttributeError):
                pass
        return out

    def recursion_misses(self) -> dict[str, int]:
        """Runs each program skipped because a BPF program was already running on that
        CPU (the kernel's recursion guard; another tool's BPF program counts too).

        Those events are missing from the trace and from the counts, and the
        kernel does not say on which CPU; `bpftool prog show` reports the total.
        """
        import json
        import shutil
        import subprocess

        ids = self.prog_ids()
        tool = shutil.which("bpftool") or "/usr/sbin/bpftool"
        if not ids or not os.path.exists(tool):
            return {}
        try:
            p = subprocess.run([tool, "-j", "prog", "show"], capture_output=True, text=True,
                               timeout=10)
            progs = {int(x["id"]): x for x in json.loads(p.stdout or "[]")}
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return {}
        return {name: int(progs[i].get("recursion_misses", 0))
                for name, i in ids.items() if i in progs}

    def _on_event(self, ctx: Any, data: int, size: int) -> None:
        # Per event: one copy of the bytes; decoding happens per batch in numpy.
        self._chunks.append(ctypes.string_at(data, size))

    def read(self, timeout: float = 0.2) -> pd.DataFrame:
        if self.bpf is None:
            return schema.empty_events()
        if self._ring is not None:
            self._ring.wait(timeout)
            self._chunks.append(self._ring.read())
        else:
            import time

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
        for sym in self._kprobes:
            try:
                self.bpf.detach_kprobe(event=sym)
            except Exception as e:  # noqa: BLE001
                self._notes.append(f"detach kprobe {sym}: {_one_line(e)}")
        self._kprobes = []

    def drain(self) -> pd.DataFrame:
        if self._ring is not None:
            self._chunks.append(self._ring.read())
        return self._decode()

    def _decode(self) -> pd.DataFrame:
        raw, self._chunks = b"".join(self._chunks), []
        if not raw:
            return schema.empty_events()
        ev = np.frombuffer(raw, dtype=EVENT_DTYPE)
        syms = self._syms
        assert syms is not None
        kinds = np.asarray(schema.KINDS, dtype=object)[ev["kind"]]
        is_msr = np.isin(ev["kind"], [KIND_CODES["msr_write"], KIND_CODES["msr_read"]])
        is_queue = ev["kind"] == KIND_CODES["csd_queue"]
        is_csd = is_queue | np.isin(ev["kind"], [KIND_CODES["csd_entry"], KIND_CODES["csd_exit"]])
        is_ipi = ev["kind"] == KIND_CODES["ipi_send"]
        is_sched = ev["kind"] == KIND_CODES["sched_switch"]
        is_global = ev["kind"] == KIND_CODES["global_update"]
        is_wpkrs = ev["kind"] == KIND_CODES["write_pkrs"]
        callsite = np.where(is_queue | is_ipi, ev["callsite"], 0).astype(np.uint64)
        func = np.where(is_csd | is_ipi, ev["func"], 0).astype(np.uint64)
        self._symbols.update(syms.table(callsite))
        self._symbols.update(syms.table(func))
        cpumask = np.full(len(ev), "", dtype=object)
        has_mask = is_ipi & (ev["target_cpu"] < 0)
        if has_mask.any():
            masks = ev["cpumask"][has_mask]
            uniq, inv = np.unique(masks, return_inverse=True)
            labels = np.asarray([schema.format_cpulist([c for c in range(64) if (m >> c) & 1])
                                 for m in uniq.tolist()], dtype=object)
            cpumask[has_mask] = labels[inv]
        from pkstrace.backends.perf import prev_state_letters

        prev_state = np.full(len(ev), "", dtype=object)
        if is_sched.any():
            prev_state[is_sched] = prev_state_letters(ev["prev_state"][is_sched])
        pid = ev["pid"].astype(np.int32)
        comm = _cstr(ev["comm"])
        comm[pid == 0] = "<idle>"  # as ftrace names every CPU's swapper
        cols: dict[str, Any] = {
            "ts": ev["ts"].astype(np.int64),
            "cpu": ev["cpu"].astype(np.int32),
            "pid": pid,
            "comm": comm,
            "kind": kinds,
            "msr": np.where(is_msr, ev["msr"].astype(np.int64), -1),
            "value": np.where(is_msr | is_wpkrs, ev["value"], 0).astype(np.uint64),
            "failed": np.where(is_msr, ev["failed"], -1).astype(np.int8),
            "target_cpu": ev["target_cpu"],
            "cpumask": cpumask,
            "callsite": syms.symbolize(callsite),
            "func": syms.symbolize(func, with_offset=False),
            "csd": np.where(is_csd, ev["csd"], 0).astype(np.uint64),
            "vector": ev["vector"],
            "pkey": ev["pkey"],
            "prot": np.where(is_global, ev["prot"].astype(np.int64), -1),
            "next_pid": ev["next_pid"],
            "next_comm": np.where(is_sched, _cstr(ev["next_comm"]), ""),
            "prev_state": prev_state,
        }
        df = schema.normalize(cols)
        return df.sort_values("ts", kind="stable", ignore_index=True)

    def lost_events(self) -> dict[int, int]:
        if self.bpf is None or not self.want_events:
            return {}
        vals = self.bpf[b"lost"][ctypes.c_int(0)]
        return {cpu: int(v) for cpu, v in enumerate(vals)}

    def aggregates(self) -> dict[str, Any]:
        if self._aggregates or self.bpf is None or not self.want_counts:
            return self._aggregates
        syms = self._syms
        assert syms is not None
        b = self.bpf
        per_cpu = []
        for k, vals in b[b"counts"].items():
            kind = schema.KINDS[k.kind]
            msr = None if k.msr == 0xFFFFFFFF else int(k.msr)
            for cpu, n in enumerate(vals):
                if n:
                    per_cpu.append({"cpu": cpu, "kind": kind, "msr": msr, "count": int(n)})
        calls = []
        call_items = list(b[b"calls"].items())
        funcs = np.asarray([k.func for k, _ in call_items], dtype=np.uint64)
        names = syms.symbolize(funcs, with_offset=False).astype(str) if len(funcs) else []
        for (k, vals), fname in zip(call_items, names, strict=True):
            for cpu, n in enumerate(vals):
                if n:
                    calls.append({"source_cpu": cpu, "target_cpu": int(k.target_cpu),
                                  "func": str(fname), "count": int(n)})
        hist = []
        lat_items = list(b[b"latency"].items())
        funcs = np.asarray([k.func for k, _ in lat_items], dtype=np.uint64)
        names = syms.symbolize(funcs, with_offset=False).astype(str) if len(funcs) else []
        for (k, v), fname in zip(lat_items, names, strict=True):
            hist.append({"target_cpu": int(k.target_cpu), "func": str(fname),
                         "slot": int(k.slot), "low_ns": 1 << int(k.slot) if k.slot else 0,
                         "high_ns": 1 << (int(k.slot) + 1), "count": int(v.value)})
        unmatched = sum(int(x) for x in b[b"unmatched"][ctypes.c_int(0)])
        self._aggregates = {
            "format": 1,
            "per_cpu": sorted(per_cpu, key=lambda r: (r["kind"], r["msr"] or -1, r["cpu"])),
            "calls": sorted(calls, key=lambda r: (r["source_cpu"], r["target_cpu"], r["func"])),
            "latency_log2": sorted(hist, key=lambda r: (r["target_cpu"], r["func"], r["slot"])),
            "unmatched_entries": unmatched,
            "inflight_at_end": len(b[b"inflight"]),
        }
        return self._aggregates

    def extra(self) -> dict[str, Any]:
        return {"ringbuf_pages": self.ringbuf_pages, "recursion_misses": dict(self.misses),
                "mode": "both" if self.want_events and self.want_counts else self.mode}

    def symbols(self) -> dict[int, str]:
        return dict(self._symbols)

    def notes(self) -> list[str]:
        out = list(self._notes)
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
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self.bpf is not None:
            try:
                self.bpf.cleanup()
            except Exception as e:  # noqa: BLE001
                problems.append(f"bcc cleanup: {_one_line(e)}")
            self.bpf = None
        return problems


def _tp_dir(system: str, name: str) -> str:
    from pkstrace.backends.tracefs import find_tracefs

    root = find_tracefs() or "/sys/kernel/tracing"
    return f"{root}/events/{system}/{name}"


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__
