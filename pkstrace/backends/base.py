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
    schema kind: "write_pkrs" or "update_global_pkrs").
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


@dataclass
class RecordOptions:
    msrs: list[int] | None = None  # None: PKRS if the CPU has PKS, else every MSR
    read_msr: bool = False
    cpus: list[int] | None = None  # record only events on these CPUs
    symbols: list[str] = field(default_factory=list)  # extra global-update functions
    sched_switch: bool = True
    mode: str = "events"
    buffer_kb: int = 8192


def plan_probes(opts: RecordOptions, kernel_symbols: set[str] | None, kprobes_available: bool,
                have_pks: bool) -> tuple[list[ProbeSpec], list[ProbeResult]]:
    """The probes to attach, and the ones known absent up front (with the reason).

    ``kernel_symbols`` are function names from /proc/kallsyms (None = unknown).
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
        if not kprobes_available:
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
        specs.append(ProbeSpec(name=name, kind="kprobe", required=required, event=ev_name,
                               symbol=func, fetchargs=args))
    return specs, absent


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
