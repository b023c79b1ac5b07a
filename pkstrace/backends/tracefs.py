"""tracefs backend: pure standard library, in a private tracefs instance.

Two layers:

* :class:`TracefsSession` (stdlib only, also runs inside the QEMU guest whose
  initramfs has a bare Python): creates its OWN instance
  ``instances/pkstrace-<pid>[-n]`` (never the global buffer other tools use), sets
  the trace clock and buffer size, enables tracepoints with in-kernel filters
  (``msr == 0x6e1``), adds kprobe events in the group ``pkstrace_<pid>[_n]`` where
  the kernel has kprobes, streams ``trace_pipe`` as chunks of whole text lines and
  reads lost-event counters from ``per_cpu/cpuN/stats``. ``detach()`` (also run
  from ``atexit``) turns tracing off, removes the instance and the kprobe events.
* :class:`TracefsBackend` (host side): the :class:`~pkstrace.backends.base.Backend`
  that turns those lines into schema rows with the ftrace text importer
  (imported lazily, so this module stays import-light).

Guest / standalone use (streams raw ftrace text lines until SIGTERM/SIGINT, the
stop file appears, or the duration ends)::

    python3 -m pkstrace.backends.tracefs --out /dev/hvc0 \\
        --events msr:write_msr,csd:csd_queue_cpu,csd:csd_function_entry \\
        --msr 0x6e1 --kprobe 'write_pkrs:write_pkrs new=%di:x32' \\
        --kprobe 'update_global_pkrs:update_global_pkrs pkey=%di:s32 prot=%si:x64' \\
        --stop-file /tmp/pkstrace.stop

``--events`` defaults to every tracepoint pkstrace knows (:data:`DEFAULT_EVENTS`);
``--kprobe EVENT:SYMBOL ARGS`` may repeat. The output is ftrace ``trace_pipe``
text, one event per line, which ``pkstrace import`` / the ftrace text importer
reads. Besides event lines the stream carries comment lines the importer skips
and a host may read for metadata:

    # pkstrace-probe: {"name": "csd:csd_queue_cpu", "attached": true, ...}
    # pkstrace-lost: {"0": 0, "1": 12}        (at the end: lost events per CPU)
    # pkstrace-end: {"reason": "stop-file"}   (last line)
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import re
import select
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pkstrace.backends.base import Backend, ProbeResult, ProbeSpec

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
INSTANCE_PREFIX = "pkstrace-"
KPROBE_GROUP_PREFIX = "pkstrace_"
# Every tracepoint pkstrace models, as "system:event" (schema.TRACEPOINT_SYSTEMS;
# a test checks the two agree). Repeated here because this module must not
# import the schema (pandas) inside the guest.
DEFAULT_EVENTS: tuple[str, ...] = (
    "msr:write_msr",
    "csd:csd_queue_cpu",
    "csd:csd_function_entry",
    "csd:csd_function_exit",
    "ipi:ipi_send_cpu",
    "ipi:ipi_send_cpumask",
    "irq_vectors:call_function_entry",
    "irq_vectors:call_function_exit",
    "irq_vectors:call_function_single_entry",
    "irq_vectors:call_function_single_exit",
    "sched:sched_switch",
)
READ_CHUNK = 1 << 20


class TracefsError(OSError):
    """tracefs refused something (message is one line)."""


def find_tracefs() -> str | None:
    """The mounted tracefs directory, or None."""
    for d in TRACEFS_DIRS:
        if os.path.isdir(os.path.join(d, "events")):
            return d
    return None


def mount_tracefs() -> str | None:
    """Mount tracefs at /sys/kernel/tracing if it is not mounted (root only)."""
    d = find_tracefs()
    if d:
        return d
    if os.geteuid() == 0:
        os.system("mount -t tracefs nodev /sys/kernel/tracing >/dev/null 2>&1")
    return find_tracefs()


def msr_filter(msrs: Sequence[int] | None) -> str:
    """tracefs filter for msr:write_msr/read_msr; '' = every MSR."""
    if not msrs:
        return ""
    return " || ".join(f"msr == {int(m):#x}" for m in sorted(set(msrs)))


def cpumask_hex(cpus: Iterable[int]) -> str:
    """tracing_cpumask format: 32-bit hex groups, most significant first, comma-separated."""
    cpus = sorted(set(int(c) for c in cpus))
    if not cpus:
        raise ValueError("empty CPU list")
    mask = 0
    for c in cpus:
        mask |= 1 << c
    groups = []
    while True:
        groups.append(f"{mask & 0xFFFFFFFF:08x}")
        mask >>= 32
        if not mask:
            break
    return ",".join(reversed(groups))


def _write(path: str, text: str, append: bool = False) -> None:
    flags = os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _oserr(e: OSError) -> str:
    return e.strerror or str(e)


def instance_owner_pid(name: str) -> int | None:
    """pid of the recorder owning an instance / kprobe group name, None if not ours."""
    m = re.fullmatch(r"pkstrace[-_](\d+)(?:[-_]\d+)?", name)
    return int(m.group(1)) if m else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class KprobeSpec:
    """A kprobe event: ``p:<group>/<event> <symbol> <fetchargs>``."""

    event: str
    symbol: str
    fetchargs: str = ""
    required: bool = False

    @classmethod
    def parse(cls, text: str) -> KprobeSpec:
        """'EVENT:SYMBOL ARGS...' (as the CLI takes it)."""
        head, _, args = text.strip().partition(" ")
        event, _, symbol = head.partition(":")
        if not event or not symbol or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", event):
            raise ValueError(f"bad kprobe spec {text!r} (want 'EVENT:SYMBOL ARGS')")
        return cls(event=event, symbol=symbol, fetchargs=args.strip())


@dataclass
class TracefsSession:
    """One private tracefs instance (plus kprobe events) owned by this process.

    Usage::

        with TracefsSession(["csd:csd_queue_cpu"], filters={}) as s:
            results = s.attach()
            while ...:
                text = s.read_chunk(0.2)
    """

    events: Sequence[str] = DEFAULT_EVENTS
    filters: dict[str, str] = field(default_factory=dict)  # "sys:event" -> filter
    kprobes: Sequence[KprobeSpec] = ()
    required: frozenset[str] = frozenset()  # "sys:event" names that must attach
    clock: str = "mono"
    buffer_kb: int = 8192
    cpus: Sequence[int] | None = None
    root: str | None = None

    def __post_init__(self) -> None:
        self.instance: str | None = None
        self.group: str | None = None
        self._added_kprobes: list[str] = []
        self._pipe_fd: int | None = None
        self._partial = b""
        self._detached = False
        self.clock_used = ""
        self.results: list[ProbeResult] = []

    # ---- attach ---------------------------------------------------------------
    def attach(self) -> list[ProbeResult]:
        root = self.root or mount_tracefs()
        if not root:
            raise TracefsError(errno.ENOENT, "tracefs is not mounted "
                               "(mount -t tracefs nodev /sys/kernel/tracing)")
        self.root = root
        atexit.register(self.detach)
        self._make_instance()
        inst = self.instance
        assert inst is not None
        _write(f"{inst}/tracing_on", "0")
        try:
            _write(f"{inst}/buffer_size_kb", str(int(self.buffer_kb)))
        except OSError as e:
            raise TracefsError(e.errno, f"cannot size the trace buffer: {_oserr(e)}") from None
        # A streaming reader wants new events dropped (and counted), not old ones
        # overwritten behind its back.
        try:
            _write(f"{inst}/options/overwrite", "0")
        except OSError:
            pass
        self.clock_used = self._set_clock()
        if self.cpus:
            _write(f"{inst}/tracing_cpumask", cpumask_hex(self.cpus))
        results = []
        for name in self.events:
            results.append(self._enable_tracepoint(name))
        for kp in self.kprobes:
            results.append(self._add_kprobe(kp))
        self.results = results
        self._pipe_fd = os.open(f"{inst}/trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
        _write(f"{inst}/tracing_on", "1")
        return results

    def _make_instance(self) -> None:
        pid = os.getpid()
        base = f"{self.root}/instances"
        for n in range(0, 1000):
            suffix = "" if n == 0 else f"-{n}"
            path = f"{base}/{INSTANCE_PREFIX}{pid}{suffix}"
            try:
                os.mkdir(path)
            except FileExistsError:
                continue
            except OSError as e:
                raise TracefsError(e.errno, f"cannot create tracefs instance {path}: "
                                   f"{_oserr(e)}") from None
            self.instance = path
            self.group = f"{KPROBE_GROUP_PREFIX}{pid}" + ("" if n == 0 else f"_{n}")
            return
        raise TracefsError(errno.EEXIST, "too many pkstrace instances for this pid")

    def _set_clock(self) -> str:
        assert self.instance
        avail = _read(f"{self.instance}/trace_clock").replace("[", "").replace("]", "").split()
        for clock in (self.clock, "mono", "local"):
            if clock in avail:
                _write(f"{self.instance}/trace_clock", clock)
                return clock
        return "local"

    def _enable_tracepoint(self, name: str) -> ProbeResult:
        required = name in self.required
        sysname, _, ev = name.partition(":")
        d = f"{self.instance}/events/{sysname}/{ev}"
        if not os.path.isdir(d):
            return ProbeResult(name, required, False, "tracepoint not in this kernel")
        flt = self.filters.get(name, "")
        if flt:
            try:
                _write(f"{d}/filter", flt)
            except OSError as e:
                return ProbeResult(name, required, False,
                                   f"kernel refused filter {flt!r}: {_oserr(e)}")
        try:
            _write(f"{d}/enable", "1")
        except OSError as e:
            return ProbeResult(name, required, False, f"cannot enable: {_oserr(e)}")
        return ProbeResult(name, required, True, f"tracefs, filter {flt!r}" if flt else "tracefs")

    def _add_kprobe(self, kp: KprobeSpec) -> ProbeResult:
        name = f"kprobe:{kp.symbol}"
        kpe = f"{self.root}/kprobe_events"
        if not os.path.exists(kpe):
            return ProbeResult(name, kp.required, False,
                               "kernel has no kprobes (CONFIG_KPROBES off)")
        line = f"p:{self.group}/{kp.event} {kp.symbol} {kp.fetchargs}".rstrip()
        try:
            _write(kpe, line + "\n", append=True)
        except OSError as e:
            reason = _oserr(e)
            if e.errno == errno.ENOENT:
                reason = "no such kernel function"
            return ProbeResult(name, kp.required, False, f"kprobe refused: {reason}")
        self._added_kprobes.append(f"{self.group}/{kp.event}")
        try:
            _write(f"{self.instance}/events/{self.group}/{kp.event}/enable", "1")
        except OSError as e:
            return ProbeResult(name, kp.required, False, f"cannot enable kprobe: {_oserr(e)}")
        return ProbeResult(name, kp.required, True, f"kprobe {line}")

    # ---- stream ---------------------------------------------------------------
    def read_chunk(self, timeout: float = 0.2) -> str:
        """Whole lines read from trace_pipe (may be ''), waiting up to ``timeout`` s."""
        fd = self._pipe_fd
        if fd is None:
            return ""
        data = self._read_available(fd)
        if not data and timeout > 0:
            try:
                select.select([fd], [], [], timeout)
            except InterruptedError:
                pass
            data = self._read_available(fd)
        if not data:
            return ""
        buf = self._partial + data
        cut = buf.rfind(b"\n") + 1
        self._partial = buf[cut:]
        return buf[:cut].decode("utf-8", "replace")

    def _read_available(self, fd: int) -> bytes:
        parts = []
        total = 0
        while total < 8 * READ_CHUNK:
            try:
                b = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            if not b:
                break
            parts.append(b)
            total += len(b)
        return b"".join(parts)

    def stop(self) -> None:
        """Tracing off; what is buffered stays readable."""
        if self.instance and not self._detached:
            try:
                _write(f"{self.instance}/tracing_on", "0")
            except OSError:
                pass

    def drain(self) -> str:
        """Everything still buffered (stops tracing first)."""
        self.stop()
        out = []
        while True:
            t = self.read_chunk(0)
            if not t:
                break
            out.append(t)
        if self._partial:
            out.append(self._partial.decode("utf-8", "replace") + "\n")
            self._partial = b""
        return "".join(out)

    def lost_events(self) -> dict[int, int]:
        """Events the kernel could not keep, per CPU (overrun + dropped)."""
        lost: dict[int, int] = {}
        if not self.instance or self._detached:
            return lost
        base = f"{self.instance}/per_cpu"
        try:
            cpudirs = os.listdir(base)
        except OSError:
            return lost
        for d in cpudirs:
            if not d.startswith("cpu"):
                continue
            try:
                stats = _read(f"{base}/{d}/stats")
            except OSError:
                continue
            n = 0
            for line in stats.splitlines():
                key, _, val = line.partition(":")
                if key.strip() in ("overrun", "commit overrun", "dropped events"):
                    try:
                        n += int(val.strip())
                    except ValueError:
                        pass
            lost[int(d[3:])] = n
        return lost

    # ---- detach ---------------------------------------------------------------
    def detach(self) -> list[str]:
        """Stop tracing, remove the instance and our kprobe events. Idempotent.

        Returns problems (empty when everything was removed).
        """
        if self._detached:
            return []
        self._detached = True
        problems = []
        inst = self.instance
        if inst:
            try:
                _write(f"{inst}/tracing_on", "0")
            except OSError:
                pass
        if self._pipe_fd is not None:
            try:
                os.close(self._pipe_fd)
            except OSError:
                pass
            self._pipe_fd = None
        if inst:
            for name in [*self.events, *(f"{self.group}:{k.event}" for k in self.kprobes)]:
                sysname, _, ev = name.partition(":")
                p = f"{inst}/events/{sysname}/{ev}/enable"
                try:
                    if os.path.exists(p):
                        _write(p, "0")
                except OSError:
                    pass
            for attempt in range(50):
                try:
                    os.rmdir(inst)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno == errno.EBUSY and attempt < 49:
                        time.sleep(0.02)
                        continue
                    problems.append(f"cannot remove {inst}: {_oserr(e)}")
                    break
        for ev in self._added_kprobes:
            try:
                _write(f"{self.root}/kprobe_events", f"-:{ev}\n", append=True)
            except OSError as e:
                problems.append(f"cannot remove kprobe {ev}: {_oserr(e)}")
        self._added_kprobes = []
        try:
            atexit.unregister(self.detach)
        except Exception:
            pass
        return problems

    def __enter__(self) -> TracefsSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()


def leftovers(root: str | None = None) -> list[tuple[str, str, int, bool]]:
    """Our instances and kprobe groups on this host: (kind, name, pid, pid_alive)."""
    root = root or find_tracefs()
    out: list[tuple[str, str, int, bool]] = []
    if not root:
        return out
    try:
        names = os.listdir(f"{root}/instances")
    except OSError:
        names = []
    for name in names:
        pid = instance_owner_pid(name)
        if pid is not None and name.startswith(INSTANCE_PREFIX):
            out.append(("instance", name, pid, pid_alive(pid)))
    groups = set()
    try:
        for line in _read(f"{root}/kprobe_events").splitlines():
            m = re.match(r"[pr]\S*:(\w+)/(\w+)", line)
            if m and m.group(1).startswith(KPROBE_GROUP_PREFIX):
                groups.add(f"{m.group(1)}/{m.group(2)}")
    except OSError:
        pass
    for g in sorted(groups):
        pid = instance_owner_pid(g.split("/")[0])
        if pid is not None:
            out.append(("kprobe", g, pid, pid_alive(pid)))
    return out


def remove_leftover(kind: str, name: str, root: str | None = None) -> str:
    """Remove one dead recorder's instance or kprobe event; returns '' or a problem."""
    root = root or find_tracefs()
    if not root:
        return "tracefs not mounted"
    try:
        if kind == "instance":
            if instance_owner_pid(name) is None:
                return f"{name} is not a pkstrace instance"
            _write(f"{root}/instances/{name}/tracing_on", "0")
            os.rmdir(f"{root}/instances/{name}")
        elif kind == "kprobe":
            if instance_owner_pid(name.split("/")[0]) is None:
                return f"{name} is not a pkstrace kprobe"
            _write(f"{root}/kprobe_events", f"-:{name}\n", append=True)
        else:
            return f"unknown leftover kind {kind}"
    except OSError as e:
        return f"cannot remove {name}: {_oserr(e)}"
    return ""


# ---------------------------------------------------------------------------
# Host side: schema rows via the ftrace text importer
# ---------------------------------------------------------------------------

class TracefsBackend(Backend):
    """Backend over :class:`TracefsSession`; parses text with the ftrace importer."""

    name = "tracefs"

    def __init__(self, probes: Sequence[ProbeSpec], cpus: Sequence[int] | None = None,
                 buffer_kb: int = 8192) -> None:
        super().__init__()
        self.probes = list(probes)
        events = [p.name for p in self.probes if p.kind == "tracepoint"]
        kprobes = [KprobeSpec(p.event, p.symbol, p.fetchargs, p.required)
                   for p in self.probes if p.kind == "kprobe"]
        self.session = TracefsSession(
            events=events,
            filters={p.name: p.filter for p in self.probes if p.filter},
            kprobes=kprobes,
            required=frozenset(p.name for p in self.probes if p.required),
            buffer_kb=buffer_kb,
            cpus=cpus,
        )
        self.unmodeled: dict[str, int] = {}
        self.unparsed: dict[str, int] = {}

    @property
    def clock(self) -> str:
        return self.session.clock_used or "mono"

    def attach(self) -> list[ProbeResult]:
        try:
            return self.session.attach()
        except OSError as e:
            self.session.detach()
            raise self._error(f"tracefs: {_oserr(e)}") from None

    def read(self, timeout: float = 0.2) -> Any:
        return self._parse(self.session.read_chunk(timeout))

    def stop(self) -> None:
        self.session.stop()

    def drain(self) -> Any:
        return self._parse(self.session.drain())

    def _parse(self, text: str) -> Any:
        from pkstrace import schema
        from pkstrace.importers.ftrace_text import parse_text
        if not text:
            return schema.empty_events()
        df, stats = parse_text(text)
        self._merge_stats(stats)
        return df

    def _merge_stats(self, stats: Any) -> None:
        def get(key: str) -> dict[str, int]:
            v = stats.get(key) if isinstance(stats, dict) else getattr(stats, key, None)
            return dict(v or {})
        for k, v in get("unmodeled_events").items():
            self.unmodeled[k] = self.unmodeled.get(k, 0) + int(v)
        for k, v in get("unparsed_lines").items():
            self.unparsed[k] = self.unparsed.get(k, 0) + int(v)
        lost = get("lost_events")
        # "[LOST n EVENTS]" lines in the text stream: the stats files count the same
        # events, so they are not added twice (see lost_events()).
        _ = lost

    def lost_events(self) -> dict[int, int]:
        return self.session.lost_events()

    def extra(self) -> dict[str, Any]:
        s = self.session
        return {"instance": os.path.basename(s.instance or ""), "kprobe_group": s.group or "",
                "buffer_kb_per_cpu": s.buffer_kb, "clock": s.clock_used}

    def detach(self) -> list[str]:
        return self.session.detach()


# ---------------------------------------------------------------------------
# CLI (guest side): stream raw lines to a file or character device
# ---------------------------------------------------------------------------

def _parse_msrs(text: str) -> list[int]:
    if not text or text == "all":
        return []
    return [int(x, 0) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python3 -m pkstrace.backends.tracefs",
        description="Stream ftrace text from a private tracefs instance (stdlib only).")
    ap.add_argument("--events", default=",".join(DEFAULT_EVENTS),
                    help="comma-separated system:event list (default: all pkstrace knows)")
    ap.add_argument("--msr", default="all",
                    help="MSRs to keep for msr:write_msr/read_msr, e.g. 0x6e1 (default all)")
    ap.add_argument("--kprobe", action="append", default=[], metavar="'EVENT:SYMBOL ARGS'",
                    help="kprobe event, e.g. 'write_pkrs:write_pkrs new=%%di:x32' (repeatable)")
    ap.add_argument("--out", default="-", help="file or device to write lines to (default stdout)")
    ap.add_argument("--stop-file", default="", help="stop when this file exists")
    ap.add_argument("--duration", type=float, default=0.0, help="stop after SECONDS (0 = never)")
    ap.add_argument("--buffer-kb", type=int, default=8192, help="per-CPU buffer size")
    ap.add_argument("--clock", default="mono", help="trace_clock (default mono)")
    ap.add_argument("--ready-file", default="", help="create this file once tracing is on")
    args = ap.parse_args(argv)

    events = [e.strip() for e in args.events.split(",") if e.strip()]
    try:
        kprobes = [KprobeSpec.parse(k) for k in args.kprobe]
        msrs = _parse_msrs(args.msr)
    except ValueError as e:
        print(f"tracefs: error: {e}", file=sys.stderr)
        return 2
    flt = msr_filter(msrs)
    filters = {e: flt for e in events if e in ("msr:write_msr", "msr:read_msr") and flt}

    stop = {"reason": ""}

    def on_signal(signum: int, frame: Any) -> None:
        stop["reason"] = signal.Signals(signum).name

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    out = sys.stdout if args.out == "-" else open(args.out, "w", buffering=1)  # noqa: SIM115
    session = TracefsSession(events=events, filters=filters, kprobes=kprobes,
                             clock=args.clock, buffer_kb=args.buffer_kb)
    t0 = time.monotonic()
    try:
        try:
            results = session.attach()
        except OSError as e:
            print(f"tracefs: error: {_oserr(e)}", file=sys.stderr)
            return 2
        for r in results:
            out.write("# pkstrace-probe: " + json.dumps(r.to_json()) + "\n")
        out.write("# pkstrace-clock: " + json.dumps(session.clock_used) + "\n")
        out.flush()
        if args.ready_file:
            with open(args.ready_file, "w") as f:
                f.write(str(os.getpid()))
        while not stop["reason"]:
            text = session.read_chunk(0.1)
            if text:
                out.write(text)
                out.flush()
            if args.stop_file and os.path.exists(args.stop_file):
                stop["reason"] = "stop-file"
            elif args.duration and time.monotonic() - t0 >= args.duration:
                stop["reason"] = "duration"
        text = session.drain()
        if text:
            out.write(text)
        lost = session.lost_events()
        out.write("# pkstrace-lost: " + json.dumps({str(k): v for k, v in lost.items()}) + "\n")
        problems = session.detach()
        out.write("# pkstrace-end: " + json.dumps({"reason": stop["reason"],
                                                  "cleanup_problems": problems}) + "\n")
        out.flush()
    finally:
        session.detach()
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
