"""What every live backend provides, and the probe plan they share.

A backend attaches probes, hands out batches of schema rows, counts lost events
and detaches (idempotently, also as a context manager). The recorder
(:mod:`pkstrace.record`) drives it and streams the batches into the trace writer.

This module imports only the standard library at import time: the tracefs
backend builds on it and also runs inside the emulated guest (no pandas there).
"""

from __future__ import annotations

import contextlib
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pkstrace.errors import KernelFeatureError

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class ProbeResult:
    """How one probe attached (stdlib twin of schema.ProbeStatus)."""

    name: str
    required: bool
    attached: bool
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "required": self.required, "attached": self.attached,
                "reason": self.reason}


@dataclass(frozen=True)
class ProbeSpec:
    """One probe a recording wants.

    ``kind`` is "tracepoint" (``name`` = "system:event") or "kprobe"
    (``name`` = "kprobe:<symbol>", ``event`` = the event name the importer maps to a
    schema kind: "write_pkrs" or "update_global_pkrs"), or "fentry" (the same
    functions through a BPF trampoline, ``name`` = "fentry:<symbol>"; bcc only).
    """

    name: str
    kind: str
    required: bool
    event: str = ""
    symbol: str = ""
    fetchargs: str = ""
    filter: str = ""  # tracefs filter syntax
    msrs: tuple[int, ...] = ()  # msr:* probes: MSRs to keep (empty = all)

    @property
    def system(self) -> str:
        return self.name.partition(":")[0] if self.kind == "tracepoint" else ""

    @property
    def tracepoint(self) -> str:
        return self.name.partition(":")[2] if self.kind == "tracepoint" else ""


# The fetch-args of the probed functions: the guest's test module uses exactly
# these signatures: write_pkrs(u32 new), update_global_pkrs(int pkey, unsigned long prot).
WRITE_PKRS_ARGS = "new=%di:x32"
GLOBAL_UPDATE_ARGS = "pkey=%di:s32 prot=%si:x64"
# What analysis cannot work without: queue and entry make the cross-CPU calls,
# write_msr the MSR state. Everything else is optional and reported if absent.
REQUIRED_TRACEPOINTS = frozenset({"msr:write_msr", "csd:csd_queue_cpu", "csd:csd_function_entry"})

# Cross-CPU calls on kernels without the csd tracepoints (before 6.3; the ipi ones
# came in 6.6): kprobes where the calls are queued, and the call-function vector
# tracepoints (since 3.x) as the entry side, matched by time in the analysis.
# The event names are what the importer (importers/kprobe_calls.py) maps to kinds.
CSD_QUEUE_FUNC = "generic_exec_single"
# smp_call_function_many_cond() since 5.7; before it smp_call_function_many() (both
# take (mask, func, ...)). Probe the first the kernel has: on 5.7+ the second calls
# the first, so probing both would count every send twice.
CSD_MANY_FUNCS: tuple[str, ...] = ("smp_call_function_many_cond", "smp_call_function_many")
CSD_FALLBACK_REPLACES = ("csd:", "ipi:")  # tracepoints the fallback stands in for
CALLFUNC_TRACEPOINTS = ("irq_vectors:call_function_single_entry",
                        "irq_vectors:call_function_single_exit",
                        "irq_vectors:call_function_entry", "irq_vectors:call_function_exit")
CSD_KPROBE_BACKENDS = ("tracefs",)  # backends that attach these kprobes


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a release string ("6.12.117+deb12-amd64" -> (6, 12)); (0, 0)
    if unreadable."""
    m = re.match(r"(\d+)\.(\d+)", release or "")
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def csd_kprobe_fetchargs(release: str) -> tuple[str, str]:
    """Fetch-args of the two fallback kprobes for this kernel release.

    ``generic_exec_single``: from 5.8 it is ``(int cpu, struct __call_single_data
    *csd)`` and ``func`` sits at offset 16 of the csd (``struct __call_single_node``
    node: llist 8 + flags 4 + src/dst 2x2 bytes, include/linux/smp_types.h); before
    5.8 the signature was ``(int cpu, call_single_data_t *csd, smp_call_func_t func,
    void *info)`` (func in the third register, csd->func at offset 8). An unreadable
    release gets the 5.8+ layout. The many-CPU send takes ``(mask, func, ...)`` on
    every version; ``mask`` is read as its first 64 bits (CPUs 0-63). ``caller`` is
    the return address on the stack at entry: who asked for the call.
    """
    caller = "caller=$stack0:symbol"
    if (0, 0) < kernel_version(release) < (5, 8):
        single = f"cpu=%di:s32 func=%dx:symbol csd=%si:x64 {caller}"
    else:
        single = f"cpu=%di:s32 func=+16(%si):symbol csd=%si:x64 {caller}"
    many = f"mask=+0(%di):x64 func=%si:symbol {caller}"
    return single, many


def has_csd_tracepoints() -> bool | None:
    """Whether this kernel has csd:csd_queue_cpu (None: tracefs not mounted)."""
    for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        if os.path.isdir(f"{d}/events"):
            return os.path.isdir(f"{d}/events/csd/csd_queue_cpu")
    return None


@dataclass
class RecordOptions:
    msrs: list[int] | None = None  # None: PKRS if the CPU has PKS, else every MSR
    read_msr: bool = False
    cpus: list[int] | None = None  # record only events on these CPUs
    symbols: list[str] = field(default_factory=list)  # extra global-update functions
    sched_switch: bool = True
    mode: str = "events"
    buffer_kb: int = 8192
    # Record cross-CPU calls with kprobes on generic_exec_single /
    # smp_call_function_many_cond and the call-function vectors instead of the csd /
    # ipi tracepoints, as on a kernel before 6.3 (done anyway where the kernel lacks
    # csd:csd_queue_cpu). For testing the fallback and comparing the two paths.
    csd_kprobes: bool = False
    # write_pkrs / global-update functions: "kprobe", "fentry" (BPF trampoline, bcc
    # only), or "auto" (kprobes where the kernel has them, else fentry if allowed)
    func_probes: str = "auto"


def plan_probes(opts: RecordOptions, kernel_symbols: set[str] | None, kprobes_available: bool,
                have_pks: bool, backend: str = "", csd_tracepoints: bool | None = None,
                kernel_release: str | None = None, fentry_available: bool = False,
                ) -> tuple[list[ProbeSpec], list[ProbeResult]]:
    """The probes to attach, and the ones known absent up front (with the reason).

    ``kernel_symbols`` are function names from /proc/kallsyms (None = unknown).
    ``backend``: the backend that will attach them ("" = any); only tracefs attaches
    the cross-CPU fallback kprobes. ``csd_tracepoints``: whether the kernel has
    csd:csd_queue_cpu (None = look in tracefs); without it (or with
    ``opts.csd_kprobes``) cross-CPU calls are planned as kprobes (see
    :func:`plan_csd_fallback`). ``kernel_release`` picks their fetch-args
    (None = this kernel's).
    """
    from pkstrace import schema
    from pkstrace.backends.tracefs import msr_filter

    msrs = opts.msrs
    if msrs is None:
        msrs = [schema.MSR_PKRS] if have_pks else []
    flt = msr_filter(msrs)
    specs: list[ProbeSpec] = []
    for ev, sysname in schema.TRACEPOINT_SYSTEMS.items():
        name = f"{sysname}:{ev}"
        if ev == "read_msr" and not opts.read_msr:
            continue
        if ev == "sched_switch" and not opts.sched_switch:
            continue
        required = name in REQUIRED_TRACEPOINTS or (ev == "read_msr" and opts.read_msr)
        specs.append(ProbeSpec(name=name, kind="tracepoint", required=required,
                               filter=flt if sysname == "msr" else "",
                               msrs=tuple(msrs) if sysname == "msr" else ()))
    absent: list[ProbeResult] = []
    funcs = [(f, "write_pkrs", WRITE_PKRS_ARGS) for f in schema.WRITE_PKRS_FUNCS]
    for f in [*schema.GLOBAL_UPDATE_FUNCS, *opts.symbols]:
        if f.startswith("write:"):
            funcs.append((f[6:], "write_pkrs", WRITE_PKRS_ARGS))
        elif f not in [x[0] for x in funcs]:
            funcs.append((f, "update_global_pkrs", GLOBAL_UPDATE_ARGS))
    used_events: set[str] = set()
    for func, event, args in funcs:
        name = f"kprobe:{func}"
        required = func in opts.symbols
        if kernel_symbols is not None and func not in kernel_symbols:
            absent.append(ProbeResult(name, required, False,
                                      "absent: the kernel has no such function"))
            continue
        # fentry_available: the backend can load fentry programs here (bcc, with
        # checks.fentry_allowed()); kprobes win under "auto" where both work.
        fentry = opts.func_probes == "fentry" or (
            opts.func_probes == "auto" and not kprobes_available and fentry_available)
        if fentry and not fentry_available:
            absent.append(ProbeResult(f"fentry:{func}", required, False,
                                      "--func-probes fentry: fentry is not allowed here "
                                      "or not with this backend (bcc only)"))
            continue
        if not fentry and not kprobes_available:
            absent.append(ProbeResult(name, required, False,
                                      "kernel has the function but no kprobes "
                                      "(CONFIG_KPROBES off) and fentry is not allowed"))
            continue
        # The event name tells the importer the kind: "write_pkrs" /
        # "update_global_pkrs", then tracefs-style "p_<name>_<n>" for a second
        # function of the same kind (the importer maps both to the kind).
        ev_name = event
        n = 1
        while ev_name in used_events:
            ev_name = f"p_{event}_{n}"
            n += 1
        used_events.add(ev_name)
        specs.append(ProbeSpec(name=f"fentry:{func}" if fentry else name,
                               kind="fentry" if fentry else "kprobe", required=required,
                               event=ev_name, symbol=func, fetchargs=args))
    if csd_tracepoints is None:
        csd_tracepoints = has_csd_tracepoints()
    if opts.csd_kprobes or csd_tracepoints is False:
        why = ("--csd-kprobes" if opts.csd_kprobes
               else "the kernel has no csd tracepoints (before 6.3)")
        specs, more = plan_csd_fallback(specs, why, kernel_symbols, kprobes_available, backend,
                                        kernel_release if kernel_release is not None
                                        else os.uname().release)
        unplanned = [r for r in more if r.required]
        if opts.csd_kprobes and unplanned:
            # asked for by name: a recording without its cross-CPU calls is no answer
            raise KernelFeatureError(f"--csd-kprobes: {unplanned[0].name}: "
                                     f"{unplanned[0].reason}")
        absent += more
    return specs, absent


def plan_csd_fallback(specs: list[ProbeSpec], why: str, kernel_symbols: set[str] | None,
                      kprobes_available: bool, backend: str, release: str,
                      ) -> tuple[list[ProbeSpec], list[ProbeResult]]:
    """Replace the csd / ipi tracepoints by kprobes where calls are queued, and make
    the call-function vector tracepoints (their entry side) required.

    Every replaced or unattachable probe is returned with its reason, so the trace
    metadata says what the recording stood on.
    """
    absent: list[ProbeResult] = []
    out: list[ProbeSpec] = []
    for s in specs:
        if s.kind == "tracepoint" and s.name.startswith(CSD_FALLBACK_REPLACES):
            absent.append(ProbeResult(s.name, False, False,
                                      f"replaced by kprobes on {CSD_QUEUE_FUNC} / "
                                      f"{CSD_MANY_FUNCS[0]} ({why})"))
        elif s.name in CALLFUNC_TRACEPOINTS and s.name.endswith("_entry"):
            # the only delivery time the fallback has: required
            out.append(ProbeSpec(name=s.name, kind=s.kind, required=True))
        else:
            out.append(s)
    have = {s.name for s in out}
    for tp in CALLFUNC_TRACEPOINTS:
        if tp not in have:
            out.append(ProbeSpec(name=tp, kind="tracepoint", required=tp.endswith("_entry")))
    single_args, many_args = csd_kprobe_fetchargs(release)
    many = CSD_MANY_FUNCS[0]
    if kernel_symbols is not None:
        many = next((f for f in CSD_MANY_FUNCS if f in kernel_symbols), CSD_MANY_FUNCS[0])
    for func, args in ((CSD_QUEUE_FUNC, single_args), (many, many_args)):
        name = f"kprobe:{func}"
        if backend and backend not in CSD_KPROBE_BACKENDS:
            absent.append(ProbeResult(name, True, False,
                                      f"needs kprobes; use --backend tracefs ({backend} "
                                      "does not attach the cross-CPU fallback kprobes)"))
        elif kernel_symbols is not None and func not in kernel_symbols:
            absent.append(ProbeResult(name, True, False,
                                      "absent: the kernel has no such function (inlined?)"))
        elif not kprobes_available:
            absent.append(ProbeResult(name, True, False,
                                      "needs kprobes: kernel built without CONFIG_KPROBES"))
        else:
            out.append(ProbeSpec(name=name, kind="kprobe", required=True, event=func,
                                 symbol=func, fetchargs=args))
    return out, absent


class Backend(ABC):
    """A live event source. Subclasses set ``name`` and implement the abstract methods."""

    name = "base"
    mode = "events"

    def __init__(self) -> None:
        self.unmodeled: dict[str, int] = {}
        self.unparsed: dict[str, int] = {}

    @property
    def clock(self) -> str:
        return "unknown"

    @abstractmethod
    def attach(self) -> list[ProbeResult]:
        """Attach every probe; returns how each went. Raises PkstraceError if nothing works."""

    @abstractmethod
    def read(self, timeout: float = 0.2) -> pd.DataFrame:
        """The next batch of schema rows (possibly empty), waiting up to ``timeout`` s."""

    def stop(self) -> None:  # noqa: B027 - optional hook, default: nothing to stop
        """Stop producing events (probes off) but keep what is buffered for drain()."""

    def drain(self) -> pd.DataFrame:
        """Whatever is still buffered once recording stops."""
        return self.read(0)

    @abstractmethod
    def lost_events(self) -> dict[int, int]:
        """Events lost so far, per CPU."""

    @abstractmethod
    def detach(self) -> list[str]:
        """Detach everything (idempotent). Returns cleanup problems, empty if clean."""

    def aggregates(self) -> dict[str, Any]:
        """Counts-mode aggregates for TraceMeta.aggregates ({} in events mode)."""
        return {}

    def symbols(self) -> dict[int, str]:
        """Addresses this backend symbolised (TraceMeta.symbols)."""
        return {}

    def notes(self) -> list[str]:
        return []

    def extra(self) -> dict[str, Any]:
        """Backend facts for TraceMeta.extra[<backend name>] (buffer sizes, misses)."""
        return {}

    def _error(self, msg: str) -> KernelFeatureError:
        return KernelFeatureError(msg)

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()


def probe_statuses(results: Sequence[ProbeResult]) -> list[dict[str, Any]]:
    return [r.to_json() for r in results]


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence fd 2 for a moment: bcc's compiler and libperf/libtraceevent print
    warnings there that would tear the recorder's status line."""
    saved = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
