"""The event schema: the one place that knows a column's name and type.

Every backend, importer, analysis and report goes through this module. A trace is
one long table of events (one row per kernel event) plus a metadata document.
Columns that do not apply to an event kind hold the column's NA sentinel
(``-1`` for integer columns, ``""`` for strings), so every column stays a dense,
non-nullable array that pandas, polars and DuckDB read quickly.

Bump ``FORMAT_VERSION`` whenever a column or a metadata key changes meaning;
readers refuse files newer than they understand.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

FORMAT_VERSION = 1
# Parquet key/value metadata key under which the JSON metadata document lives.
META_KEY = b"pkstrace"
FILE_SUFFIX = ".pkstrace"


class Kind(enum.StrEnum):
    """Event kinds. The value is what is stored in the ``kind`` column."""

    MSR_WRITE = "msr_write"  # msr:write_msr (msr, value, failed)
    MSR_READ = "msr_read"  # msr:read_msr (msr, value, failed)
    WRITE_PKRS = "write_pkrs"  # kprobe on write_pkrs (value = new PKRS value)
    GLOBAL_UPDATE = "global_update"  # kprobe on update_global_pkrs & co (value, pkey, prot)
    CSD_QUEUE = "csd_queue"  # csd:csd_queue_cpu (target_cpu, callsite, func, csd)
    CSD_ENTRY = "csd_entry"  # csd:csd_function_entry (func, csd)
    CSD_EXIT = "csd_exit"  # csd:csd_function_exit (func, csd)
    IPI_SEND = "ipi_send"  # ipi:ipi_send_cpu / ipi_send_cpumask (target_cpu or cpumask)
    CALLFUNC_ENTRY = "callfunc_entry"  # irq_vectors:call_function[_single]_entry (vector)
    CALLFUNC_EXIT = "callfunc_exit"  # irq_vectors:call_function[_single]_exit (vector)
    SCHED_SWITCH = "sched_switch"  # sched:sched_switch (pid/comm = prev, next_pid/next_comm)


KINDS: tuple[str, ...] = tuple(k.value for k in Kind)
KIND_DTYPE = pd.CategoricalDtype(categories=list(KINDS), ordered=False)

# Kernel event names (as tracefs / perf spell them) -> kind. Importers and
# backends share this map so that a new tracepoint is added in one place.
TRACEPOINT_KINDS: dict[str, Kind] = {
    "write_msr": Kind.MSR_WRITE,
    "read_msr": Kind.MSR_READ,
    "csd_queue_cpu": Kind.CSD_QUEUE,
    "csd_function_entry": Kind.CSD_ENTRY,
    "csd_function_exit": Kind.CSD_EXIT,
    "ipi_send_cpu": Kind.IPI_SEND,
    "ipi_send_cpumask": Kind.IPI_SEND,
    "call_function_entry": Kind.CALLFUNC_ENTRY,
    "call_function_single_entry": Kind.CALLFUNC_ENTRY,
    "call_function_exit": Kind.CALLFUNC_EXIT,
    "call_function_single_exit": Kind.CALLFUNC_EXIT,
    "sched_switch": Kind.SCHED_SWITCH,
}
# Tracepoint "system:name" for each tracepoint above (what record enables).
TRACEPOINT_SYSTEMS: dict[str, str] = {
    "write_msr": "msr",
    "read_msr": "msr",
    "csd_queue_cpu": "csd",
    "csd_function_entry": "csd",
    "csd_function_exit": "csd",
    "ipi_send_cpu": "ipi",
    "ipi_send_cpumask": "ipi",
    "call_function_entry": "irq_vectors",
    "call_function_single_entry": "irq_vectors",
    "call_function_exit": "irq_vectors",
    "call_function_single_exit": "irq_vectors",
    "sched_switch": "sched",
}
# Probed kernel functions (kprobe / fentry) -> kind. `--symbols` adds names.
WRITE_PKRS_FUNCS: tuple[str, ...] = ("write_pkrs",)
GLOBAL_UPDATE_FUNCS: tuple[str, ...] = (
    "update_global_pkrs",
    "pks_update_protection",
    "pks_update_global",
)


# Interrupt context of an event, from the ftrace flags column (or the backend).
class IrqCtx(enum.IntEnum):
    UNKNOWN = -1
    TASK = 0
    SOFTIRQ = 1
    HARDIRQ = 2
    NMI = 3


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str  # numpy / pandas dtype string, or "category"
    na: Any  # sentinel for "does not apply / unknown"
    doc: str


# The columns, in file order. The NA sentinel keeps every column dense.
COLUMNS: tuple[Column, ...] = (
    Column("ts", "int64", -1, "timestamp, ns (clock named in metadata['clock'])"),
    Column("cpu", "int32", -1, "CPU the event happened on"),
    Column("pid", "int32", -1, "current task's pid (0 = idle/swapper)"),
    Column("comm", "category", "", "current task's name"),
    Column("kind", "kind", "", "event kind, one of schema.KINDS"),
    Column("irqs_off", "int8", -1, "1 if interrupts were disabled (ftrace 'd' flag)"),
    Column("irq_ctx", "int8", -1, "schema.IrqCtx: 0 task, 1 softirq, 2 hardirq, 3 nmi"),
    Column("preempt_depth", "int8", -1, "preempt count's depth (ftrace flags, 4th char)"),
    Column("msr", "int64", -1, "MSR number (msr_write / msr_read)"),
    Column("value", "uint64", 0, "MSR value / new PKRS value / global update value"),
    Column("failed", "int8", -1, "MSR access failed (msr_write / msr_read)"),
    Column("target_cpu", "int32", -1, "csd_queue / ipi_send: the CPU that is called"),
    Column("cpumask", "category", "", "ipi_send to a set: the CPU list ('0-3,6')"),
    Column("callsite", "category", "", "csd_queue / ipi_send: caller symbol (sym+off)"),
    Column("func", "category", "", "csd / ipi: function run on the target (symbol)"),
    Column("csd", "uint64", 0, "csd token (0 = none, e.g. a call run locally)"),
    Column("vector", "int32", -1, "call_function*: the interrupt vector"),
    Column("pkey", "int16", -1, "global_update: protection key"),
    Column("prot", "int64", -1, "global_update: protection bits"),
    Column("next_pid", "int32", -1, "sched_switch: next task's pid"),
    Column("next_comm", "category", "", "sched_switch: next task's name"),
    Column("prev_state", "category", "", "sched_switch: prev task's state (R, S, D ...)"),
)
COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)
_BY_NAME = {c.name: c for c in COLUMNS}
STRING_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.dtype == "category")
INT_COLUMNS: tuple[str, ...] = tuple(
    c.name for c in COLUMNS if c.dtype not in ("category", "kind")
)


def column(name: str) -> Column:
    return _BY_NAME[name]


def arrow_schema() -> pa.Schema:
    """The Arrow schema of the events table (strings dictionary-encoded)."""
    fields = []
    for c in COLUMNS:
        if c.dtype in ("category", "kind"):
            t = pa.dictionary(pa.int32(), pa.string())
        else:
            t = pa.from_numpy_dtype(np.dtype(c.dtype))
        fields.append(pa.field(c.name, t, nullable=False))
    return pa.schema(fields)


def empty_events() -> pd.DataFrame:
    return normalize({})


def normalize(columns: dict[str, Any] | pd.DataFrame) -> pd.DataFrame:
    """Build a schema-conforming DataFrame from (possibly partial) columns.

    Missing columns are filled with their NA sentinel; dtypes are coerced.
    Unknown columns are an error, so a typo cannot silently lose data.
    """
    if isinstance(columns, pd.DataFrame):
        src = {k: columns[k] for k in columns.columns}
    else:
        src = dict(columns)
    unknown = set(src) - set(COLUMN_NAMES)
    if unknown:
        raise ValueError(f"unknown event columns: {sorted(unknown)}")
    n = 0
    for v in src.values():
        n = len(v)
        break
    out: dict[str, Any] = {}
    for c in COLUMNS:
        if c.name in src:
            v = src[c.name]
        else:
            v = None
        if c.dtype == "kind":
            if v is None:
                v = pd.Categorical.from_codes(np.full(n, -1, dtype=np.int8), dtype=KIND_DTYPE)
            if not (isinstance(getattr(v, "dtype", None), pd.CategoricalDtype)
                    and v.dtype == KIND_DTYPE):
                raw = np.asarray(v, dtype=object)
                bad_mask = ~pd.Index(raw).isin(KINDS) if n else np.zeros(0, bool)
                if bad_mask.any():
                    bad = sorted(set(map(str, raw[bad_mask])))[:5]
                    raise ValueError(f"unknown event kinds: {bad}")
                v = pd.Categorical(raw, dtype=KIND_DTYPE)
            out[c.name] = v
        elif c.dtype == "category":
            if v is None:
                out[c.name] = pd.Categorical(np.full(n, "", dtype=object))
            elif isinstance(getattr(v, "dtype", None), pd.CategoricalDtype):
                out[c.name] = v
            else:
                arr = np.asarray(v, dtype=object)
                out[c.name] = pd.Categorical(arr)
        else:
            if v is None:
                out[c.name] = np.full(n, c.na, dtype=c.dtype)
            else:
                out[c.name] = np.asarray(v).astype(c.dtype, copy=False)
    df = pd.DataFrame(out, copy=False)
    return df


def validate(df: pd.DataFrame) -> list[str]:
    """Problems with a DataFrame claiming to be an events table (empty = fine)."""
    problems = []
    for c in COLUMNS:
        if c.name not in df.columns:
            problems.append(f"missing column {c.name!r}")
            continue
        dt = df[c.name].dtype
        if c.dtype in ("category", "kind"):
            if not isinstance(dt, pd.CategoricalDtype):
                problems.append(f"column {c.name!r} has dtype {dt}, expected category")
        elif dt != np.dtype(c.dtype):
            problems.append(f"column {c.name!r} has dtype {dt}, expected {c.dtype}")
    if "kind" in df.columns and isinstance(df["kind"].dtype, pd.CategoricalDtype):
        bad = set(map(str, df["kind"].cat.categories)) - set(KINDS)
        if bad:
            problems.append(f"unknown event kinds: {sorted(bad)[:5]}")
    return problems


# ---------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------

@dataclass
class ProbeStatus:
    """What a backend tried to attach, and how it went."""

    name: str  # "msr:write_msr", "kprobe:write_pkrs", ...
    required: bool
    attached: bool
    reason: str = ""  # why not attached / how (e.g. "fentry not allowed: EPERM")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "required": self.required, "attached": self.attached,
                "reason": self.reason}


# Key of ``TraceMeta.lost_events`` for losses the kernel does not attribute to a
# CPU (BPF recursion-guard misses: a probe skipped because a BPF program was
# already running on that CPU).
LOST_CPU_UNKNOWN = -1


def lost_cpu_label(cpu: int | str) -> str:
    """How reports name a ``lost_events`` key."""
    return "CPU unknown (BPF recursion guard)" if int(cpu) == LOST_CPU_UNKNOWN else f"CPU {cpu}"


@dataclass
class TraceMeta:
    """The metadata document stored beside the events (JSON in the Parquet footer).

    ``host`` keys: hostname, kernel, cpu_model, cpu_flags (list), online_cpus (list),
    isolated_cpus (list), nohz_full_cpus (list),
    cpuidle (list of {name, latency_us, residency_us}), pks (bool), emulated (bool).
    """

    format_version: int = FORMAT_VERSION
    host: dict[str, Any] = field(default_factory=dict)
    clock: str = "unknown"  # tracefs trace_clock ("local", "mono", "boot", ...) or "perf"
    backend: str = "unknown"  # "tracefs", "bcc", "perf", "import:ftrace_text", ...
    mode: str = "events"  # "events" or "counts"
    window: dict[str, int] = field(default_factory=dict)  # {"start_ns", "end_ns"}
    lost_events: dict[int, int] = field(default_factory=dict)  # cpu -> count
    symbols: dict[int, str] = field(default_factory=dict)  # address -> symbol
    probes: list[dict[str, Any]] = field(default_factory=list)  # ProbeStatus.to_json()
    # Events the source had but the schema does not model, by event name.
    unmodeled_events: dict[str, int] = field(default_factory=dict)
    # Lines an importer could not parse, by a short reason.
    unparsed_lines: dict[str, int] = field(default_factory=dict)
    # counts mode: {"per_cpu": [{cpu, kind, msr, count}], "latency_hist": [...]} etc.
    aggregates: dict[str, Any] = field(default_factory=dict)
    scenario: dict[str, Any] = field(default_factory=dict)  # emulated hosts
    ground_truth: dict[str, Any] = field(default_factory=dict)  # emulated hosts
    command: list[str] = field(default_factory=list)  # what was recorded / imported
    source: str = ""  # file imported from, or "live"
    partial: bool = False  # recording ended early (error, disk full, flood)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "host": self.host,
            "clock": self.clock,
            "backend": self.backend,
            "mode": self.mode,
            "window": self.window,
            "lost_events": {str(k): int(v) for k, v in self.lost_events.items()},
            "symbols": {f"{k:#x}": v for k, v in self.symbols.items()},
            "probes": self.probes,
            "unmodeled_events": self.unmodeled_events,
            "unparsed_lines": self.unparsed_lines,
            "aggregates": self.aggregates,
            "scenario": self.scenario,
            "ground_truth": self.ground_truth,
            "command": self.command,
            "source": self.source,
            "partial": self.partial,
            "notes": self.notes,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TraceMeta:
        if not isinstance(d, dict):
            raise ValueError("metadata is not a JSON object")
        m = cls()
        m.format_version = int(d.get("format_version", -1))
        m.host = dict(d.get("host") or {})
        m.clock = str(d.get("clock", "unknown"))
        m.backend = str(d.get("backend", "unknown"))
        m.mode = str(d.get("mode", "events"))
        m.window = {str(k): int(v) for k, v in (d.get("window") or {}).items()}
        m.lost_events = {int(k): int(v) for k, v in (d.get("lost_events") or {}).items()}
        m.symbols = {int(k, 16): str(v) for k, v in (d.get("symbols") or {}).items()}
        m.probes = list(d.get("probes") or [])
        m.unmodeled_events = {str(k): int(v) for k, v in (d.get("unmodeled_events") or {}).items()}
        m.unparsed_lines = {str(k): int(v) for k, v in (d.get("unparsed_lines") or {}).items()}
        m.aggregates = dict(d.get("aggregates") or {})
        m.scenario = dict(d.get("scenario") or {})
        m.ground_truth = dict(d.get("ground_truth") or {})
        m.command = [str(x) for x in (d.get("command") or [])]
        m.source = str(d.get("source", ""))
        m.partial = bool(d.get("partial", False))
        m.notes = [str(x) for x in (d.get("notes") or [])]
        m.extra = dict(d.get("extra") or {})
        return m

    # Convenience accessors used by the analysis (isolation, projection).
    @property
    def isolated_cpus(self) -> list[int]:
        host = self.host
        cpus = set(host.get("isolated_cpus") or []) | set(host.get("nohz_full_cpus") or [])
        return sorted(int(c) for c in cpus)

    @property
    def online_cpus(self) -> list[int]:
        return [int(c) for c in (self.host.get("online_cpus") or [])]


@dataclass
class Trace:
    """A trace in memory: the events table and its metadata."""

    events: pd.DataFrame
    meta: TraceMeta

    def __len__(self) -> int:
        return len(self.events)


# ---------------------------------------------------------------------------
# Well-known MSRs. Knowledge about MSRs lives here, with their names: which ones
# hold state (a rewrite of the same value is redundant) and which are commands
# (every write does something, so "the same value again" is never redundant).
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class MsrInfo:
    name: str
    is_command: bool  # writes are actions (ICR, EOI, self-IPI), not state


MSRS: dict[int, MsrInfo] = {
    0x10: MsrInfo("IA32_TIME_STAMP_COUNTER", False),
    0x1B: MsrInfo("IA32_APIC_BASE", False),
    0x3A: MsrInfo("IA32_FEATURE_CONTROL", False),
    0x48: MsrInfo("IA32_SPEC_CTRL", False),
    0x49: MsrInfo("IA32_PRED_CMD", True),
    0x10B: MsrInfo("IA32_FLUSH_CMD", True),
    0x174: MsrInfo("IA32_SYSENTER_CS", False),
    0x175: MsrInfo("IA32_SYSENTER_ESP", False),
    0x176: MsrInfo("IA32_SYSENTER_EIP", False),
    0x1D9: MsrInfo("IA32_DEBUGCTL", False),
    0x277: MsrInfo("IA32_PAT", False),
    0x38F: MsrInfo("IA32_PERF_GLOBAL_CTRL", False),
    0x6E0: MsrInfo("IA32_TSC_DEADLINE", False),
    0x6E1: MsrInfo("IA32_PKRS", False),
    0x800 + 0x08: MsrInfo("X2APIC_TPR", False),
    0x80B: MsrInfo("X2APIC_EOI", True),
    0x80F: MsrInfo("X2APIC_SIVR", False),
    0x830: MsrInfo("X2APIC_ICR", True),
    0x832: MsrInfo("X2APIC_LVT_TIMER", False),
    0x838: MsrInfo("X2APIC_TMICT", False),
    0x83F: MsrInfo("X2APIC_SELF_IPI", True),
    0xC0000080: MsrInfo("IA32_EFER", False),
    0xC0000081: MsrInfo("STAR", False),
    0xC0000082: MsrInfo("LSTAR", False),
    0xC0000084: MsrInfo("SFMASK", False),
    0xC0000100: MsrInfo("FS_BASE", False),
    0xC0000101: MsrInfo("GS_BASE", False),
    0xC0000102: MsrInfo("KERNEL_GS_BASE", False),
    0xC0000103: MsrInfo("TSC_AUX", False),
    0xC0010117: MsrInfo("AMD_VM_HSAVE_PA", False),
}
MSR_PKRS = 0x6E1


def msr_name(msr: int) -> str:
    info = MSRS.get(int(msr))
    return info.name if info else f"MSR_{int(msr):#x}"


def command_msrs() -> list[int]:
    """MSRs whose writes are commands: never 'redundant'."""
    return sorted(m for m, i in MSRS.items() if i.is_command)


def parse_cpulist(text: str) -> list[int]:
    """Parse a kernel CPU list ("0-3,6,8-9"); empty string -> []. Raises ValueError."""
    text = (text or "").strip()
    if not text:
        return []
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            a, b = int(lo), int(hi)
            if a > b or a < 0 or b > 1 << 16:
                raise ValueError(f"bad CPU range {part!r}")
            cpus.update(range(a, b + 1))
        else:
            c = int(part)
            if c < 0 or c > 1 << 16:
                raise ValueError(f"bad CPU number {part!r}")
            cpus.add(c)
    return sorted(cpus)


def format_cpulist(cpus: list[int] | set[int]) -> str:
    """Inverse of parse_cpulist: [0,1,2,3,6] -> "0-3,6"."""
    s = sorted(set(int(c) for c in cpus))
    out = []
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        out.append(str(s[i]) if i == j else f"{s[i]}-{s[j]}")
        i = j + 1
    return ",".join(out)
