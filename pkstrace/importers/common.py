"""What the text importers share: line splitting, the per-event argument parsers,
vectorised number conversion, flag decoding and the import statistics.

Both text formats (tracefs ``trace``/``trace_pipe``/``trace-cmd report`` and
``perf script``) print a tracepoint's arguments with the kernel's own print format,
so once a format-specific header parser has cut each line into
(comm, pid, cpu, flags, timestamp, event name, arguments), everything from the
argument text to schema rows is done here, once.

Everything works on whole columns (pyarrow compute, RE2, numpy): a Python loop per
line cannot reach the 1 M lines/s this importer is built for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pkstrace import schema

# ---------------------------------------------------------------------------
# Import statistics
# ---------------------------------------------------------------------------


@dataclass
class ImportStats:
    """What an import saw besides the events: nothing is dropped silently.

    ``unparsed_lines`` counts lines that were not understood, by a short reason;
    ``unmodeled_events`` counts well-formed events the schema does not model, by
    event name. ``header`` holds facts from header lines: ``nr_cpus`` (``#P:N`` or
    trace-cmd's ``cpus=N``), ``tracer``, ``entries_in_buffer``, ``entries_written``.
    """

    format: str = ""
    lines: int = 0  # lines read, all kinds
    events: int = 0  # rows produced (modeled events)
    blank_lines: int = 0
    header_lines: int = 0  # '#' comments, trace-cmd 'cpus=N', 'CPU N is empty', ...
    stack_lines: int = 0  # '<stack trace>' and ' => sym' lines
    unparsed_lines: dict[str, int] = field(default_factory=dict)
    unmodeled_events: dict[str, int] = field(default_factory=dict)
    lost_events: dict[int, int] = field(default_factory=dict)  # cpu -> events lost
    header: dict[str, Any] = field(default_factory=dict)

    @property
    def unparsed_total(self) -> int:
        return sum(self.unparsed_lines.values())

    @property
    def unmodeled_total(self) -> int:
        return sum(self.unmodeled_events.values())

    @property
    def trace_lines(self) -> int:
        """Lines recognised as trace events (modeled or not)."""
        return self.events + self.unmodeled_total

    def count_unparsed(self, reason: str, n: int = 1) -> None:
        if n:
            self.unparsed_lines[reason] = self.unparsed_lines.get(reason, 0) + int(n)

    def count_unmodeled(self, name: str, n: int = 1) -> None:
        if n:
            self.unmodeled_events[name] = self.unmodeled_events.get(name, 0) + int(n)

    def merge(self, other: ImportStats) -> ImportStats:
        """Add another chunk's statistics into this one (returns self)."""
        if not self.format:
            self.format = other.format
        self.lines += other.lines
        self.events += other.events
        self.blank_lines += other.blank_lines
        self.header_lines += other.header_lines
        self.stack_lines += other.stack_lines
        for k, v in other.unparsed_lines.items():
            self.count_unparsed(k, v)
        for k, v in other.unmodeled_events.items():
            self.count_unmodeled(k, v)
        for cpu, v in other.lost_events.items():
            self.lost_events[cpu] = self.lost_events.get(cpu, 0) + v
        for k, v in other.header.items():
            self.header.setdefault(k, v)
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "lines": self.lines,
            "events": self.events,
            "blank_lines": self.blank_lines,
            "header_lines": self.header_lines,
            "stack_lines": self.stack_lines,
            "unparsed_lines": dict(sorted(self.unparsed_lines.items())),
            "unmodeled_events": dict(sorted(self.unmodeled_events.items())),
            "lost_events": {str(k): v for k, v in sorted(self.lost_events.items())},
            "header": self.header,
        }


# ---------------------------------------------------------------------------
# Lines
# ---------------------------------------------------------------------------

NL = 10
CR = 13


def split_lines(data: bytes) -> pa.StringArray:
    """Split text into a pyarrow array of lines, without copying per line.

    Line ends (``\\n``, and ``\\r`` anywhere, as serial consoles write ``\\r\\r\\n``)
    are dropped. Invalid UTF-8 (a comm with odd bytes) is replaced, never fatal.
    """
    if not data:
        return pa.array([], pa.string())
    buf = np.frombuffer(data, np.uint8)
    if data.find(b"\r") >= 0:
        buf = buf[buf != CR]
    is_nl = buf == NL
    nl = np.flatnonzero(is_nl)
    n_lines = len(nl) + (0 if len(buf) and buf[-1] == NL else 1)
    body = buf[~is_nl]
    # Line i starts at its byte position minus the i newlines before it.
    starts = np.empty(n_lines + 1, np.int64)
    starts[0] = 0
    starts[1:len(nl) + 1] = nl + 1 - np.arange(1, len(nl) + 1)
    starts[n_lines] = len(body)
    offset_type = np.int32 if len(body) < 2**31 - 1 else np.int64
    arr_type = pa.string() if offset_type is np.int32 else pa.large_string()
    offsets = pa.py_buffer(starts.astype(offset_type))
    values = pa.py_buffer(body.tobytes())
    arr = pa.Array.from_buffers(arr_type, n_lines, [None, offsets, values])
    try:
        arr.validate(full=True)
    except pa.ArrowInvalid:
        # Invalid UTF-8 (a comm with odd bytes, line noise): replace, never fail.
        return split_lines(buf.tobytes().decode("utf-8", errors="replace").encode())
    return arr


def split_text(data: bytes | str) -> pa.Array:
    """Lines of ``data`` as a pyarrow string array (see :func:`split_lines`)."""
    if isinstance(data, str):
        data = data.encode("utf-8", errors="replace")
    return split_lines(data)


# ---------------------------------------------------------------------------
# Numbers, vectorised
# ---------------------------------------------------------------------------

_HEX_LUT = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_LUT[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_LUT[_c] = 10 + _i


def _fixed_width_bytes(arr: pa.Array, width: int, pad: str) -> np.ndarray:
    """(n, width) uint8 matrix of strings left-padded with ``pad`` (all <= width)."""
    padded = pc.utf8_lpad(arr, width=width, padding=pad)
    padded = pc.if_else(pc.is_null(padded), pad * width, padded)
    if isinstance(padded, pa.ChunkedArray):
        padded = padded.combine_chunks()
    offs = np.frombuffer(padded.buffers()[1], dtype=np.int32 if padded.type == pa.string()
                         else np.int64)[padded.offset:padded.offset + len(padded) + 1]
    data = np.frombuffer(padded.buffers()[2], np.uint8) if len(padded) else np.zeros(0, np.uint8)
    idx = offs[:-1, None] + np.arange(width)
    return data[idx] if len(padded) else np.zeros((0, width), np.uint8)


def hex_to_u64(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Hex strings (optional ``0x``; ``(nil)`` and empty mean 0) -> (uint64 values, ok mask)."""
    s = pc.utf8_lower(arr)
    s = pc.replace_substring_regex(s, r"^0x", "")
    s = pc.if_else(pc.equal(s, "(nil)"), "0", s)
    lengths = np.asarray(pc.fill_null(pc.binary_length(s), 0))
    ok = (lengths > 0) & (lengths <= 16)
    s = pc.if_else(pa.array(ok), s, "0")
    mat = _HEX_LUT[_fixed_width_bytes(s, 16, "0")]
    ok &= (mat != 255).all(axis=1)
    mat = np.where(mat == 255, 0, mat).astype(np.uint64)
    shifts = np.arange(60, -4, -4, dtype=np.uint64)
    vals = (mat << shifts).sum(axis=1, dtype=np.uint64) if len(mat) else np.zeros(0, np.uint64)
    return vals, ok


def dec_to_i64(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Decimal strings -> (int64 values, ok mask); non-numbers give ok=False."""
    ok = np.asarray(pc.fill_null(pc.match_substring_regex(arr, r"^-?\d{1,18}$"), False))
    s = pc.if_else(pa.array(ok), arr, "0")
    return np.asarray(pc.cast(s, pa.int64())), ok


def int_to_u64(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``0x..`` hex or decimal (two's complement for negatives) -> uint64."""
    is_hex = np.asarray(pc.fill_null(pc.starts_with(pc.utf8_lower(arr), "0x"), False))
    hv, hok = hex_to_u64(arr)
    dv, dok = dec_to_i64(arr)
    vals = np.where(is_hex, hv, dv.view(np.uint64))
    ok = np.where(is_hex, hok, dok)
    return vals, ok


def timestamps_ns(sec: pa.Array, frac: pa.Array) -> np.ndarray:
    """Seconds and fraction digits (any count; ``"200"``, ``"923667"``) -> int64 ns."""
    s = np.asarray(pc.cast(pc.fill_null(sec, "0"), pa.int64()))
    f = pc.fill_null(frac, "")
    f = pc.utf8_slice_codeunits(pc.utf8_rpad(f, width=9, padding="0"), 0, 9)
    return s * 1_000_000_000 + np.asarray(pc.cast(f, pa.int64()))


# ---------------------------------------------------------------------------
# Flags column ("d.h1." and the like)
# ---------------------------------------------------------------------------

# Per Documentation/trace/ftrace.rst: irqs-off, need-resched, hardirq/softirq,
# preempt-depth, migrate-disable (the 5th character is absent before 5.13-ish).
FLAGS_RE = r"[dDX.][NnpBb.][ZzHhs.][0-9a-fA-F.][0-9a-fA-F.]?"
_IRQS_OFF = np.full(256, -1, np.int8)
_IRQS_OFF[ord(".")] = 0
_IRQS_OFF[ord("d")] = 1
_IRQS_OFF[ord("D")] = 1  # irqs off and BH disabled
_IRQ_CTX = np.full(256, -1, np.int8)
_IRQ_CTX[ord(".")] = schema.IrqCtx.TASK
_IRQ_CTX[ord("s")] = schema.IrqCtx.SOFTIRQ
_IRQ_CTX[ord("h")] = schema.IrqCtx.HARDIRQ
_IRQ_CTX[ord("H")] = schema.IrqCtx.HARDIRQ  # hard irq inside a softirq
_IRQ_CTX[ord("z")] = schema.IrqCtx.NMI
_IRQ_CTX[ord("Z")] = schema.IrqCtx.NMI  # NMI inside a hard irq
_DEPTH = np.full(256, -1, np.int8)
_DEPTH[ord(".")] = 0
for _i, _c in enumerate(b"0123456789abcdef"):
    _DEPTH[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _DEPTH[_c] = 10 + _i


def decode_flags(flags: pa.Array) -> dict[str, np.ndarray]:
    """Flags strings (null/empty = no flags column) -> irqs_off, irq_ctx, preempt_depth."""
    n = len(flags)
    f = pc.fill_null(flags, "")
    has = np.asarray(pc.greater_equal(pc.binary_length(f), 4))
    out = {k: np.full(n, -1, np.int8) for k in ("irqs_off", "irq_ctx", "preempt_depth")}
    if not has.any():
        return out
    mat = _fixed_width_bytes(pc.utf8_slice_codeunits(pc.utf8_rpad(f, 5, "."), 0, 5), 5, ".")
    out["irqs_off"] = np.where(has, _IRQS_OFF[mat[:, 0]], -1).astype(np.int8)
    out["irq_ctx"] = np.where(has, _IRQ_CTX[mat[:, 2]], -1).astype(np.int8)
    out["preempt_depth"] = np.where(has, _DEPTH[mat[:, 3]], -1).astype(np.int8)
    return out


# ---------------------------------------------------------------------------
# Events -> kinds, arguments -> columns
# ---------------------------------------------------------------------------

# A kprobe's event name: the probed function, "p_<func>_<n>" (tracefs default
# names) or "<func>__entry"; a group ("pks:", "probe:") is stripped beforehand.
_KPROBE_DEFAULT = re.compile(r"^p_(?P<func>\w+?)_\d+$")


def kind_of_event(name: str) -> tuple[schema.Kind | None, str]:
    """Kind for an event name (group already stripped) and the event's canonical name."""
    kind = schema.TRACEPOINT_KINDS.get(name)
    if kind is not None:
        return kind, name
    func = name
    m = _KPROBE_DEFAULT.match(name)
    if m:
        func = m.group("func")
    elif name.endswith("__entry"):
        func = name[: -len("__entry")]
    if func in schema.WRITE_PKRS_FUNCS:
        return schema.Kind.WRITE_PKRS, func
    if func in schema.GLOBAL_UPDATE_FUNCS:
        return schema.Kind.GLOBAL_UPDATE, func
    return None, name


# Argument patterns (RE2), per event name: named groups are schema columns (or
# helpers starting with "_"). Several patterns: tried in order (tracefs,
# trace-cmd's plugin format, ...). Symbols with a module print as "sym [mod]".
_SYM = r".+?"
ARG_PATTERNS: dict[str, list[str]] = {
    "write_msr": [r"^(?P<msr>[0-9a-fA-F]+), value (?P<value>[0-9a-fA-F]+)(?P<_gp>\s*#GP)?\s*$"],
    "read_msr": [r"^(?P<msr>[0-9a-fA-F]+), value (?P<value>[0-9a-fA-F]+)(?P<_gp>\s*#GP)?\s*$"],
    "csd_queue_cpu": [rf"^cpu=(?P<target_cpu>\d+),? callsite=(?P<callsite>{_SYM}),? "
                      rf"func=(?P<func>{_SYM}),? csd=(?P<csd>\S+)\s*$"],
    "csd_function_entry": [rf"^func=(?P<func>{_SYM}),? csd=(?P<csd>\S+)\s*$"],
    "csd_function_exit": [rf"^func=(?P<func>{_SYM}),? csd=(?P<csd>\S+)\s*$"],
    "ipi_send_cpu": [rf"^cpu=(?P<target_cpu>\d+),? callsite=(?P<callsite>{_SYM}),? "
                     rf"callback=(?P<func>{_SYM})\s*$"],
    "ipi_send_cpumask": [
        rf"^cpumask=(?P<cpumask>[0-9,\-]*),? callsite=(?P<callsite>{_SYM}),? "
        rf"callback=(?P<func>{_SYM})\s*$",
        # perf/libtraceevent cannot print __get_cpumask(): raw bitmap bytes instead
        r"^(?:\[FAILED TO PARSE\] )?cpumask=(?P<_cpumask_array>ARRAY\[[^\]]*\]),? "
        r"callsite=(?P<callsite>\S+),? callback=(?P<func>\S+)\s*$",
    ],
    "call_function_entry": [r"^vector=(?P<vector>\d+)\s*$"],
    "call_function_exit": [r"^vector=(?P<vector>\d+)\s*$"],
    "call_function_single_entry": [r"^vector=(?P<vector>\d+)\s*$"],
    "call_function_single_exit": [r"^vector=(?P<vector>\d+)\s*$"],
    "sched_switch": [
        r"^prev_comm=(?P<_prev_comm>.*?) prev_pid=(?P<_prev_pid>-?\d+) prev_prio=-?\d+ "
        r"prev_state=(?P<prev_state>\S+) ==> next_comm=(?P<next_comm>.*?) "
        r"next_pid=(?P<next_pid>-?\d+) next_prio=-?\d+\s*$",
        # trace-cmd's sched_switch plugin: "bash:3879 [120] D ==> swapper/0:0 [120]"
        r"^(?P<_prev_comm>.*?):(?P<_prev_pid>-?\d+) \[-?\d+\] (?P<prev_state>\S+) ==> "
        r"(?P<next_comm>.*?):(?P<next_pid>-?\d+) \[-?\d+\]\s*$",
    ],
}
_NUM = r"(?:0[xX][0-9a-fA-F]+|-?\d+)"
_KPROBE_PATTERNS: dict[schema.Kind, dict[str, str]] = {
    schema.Kind.WRITE_PKRS: {"value": rf"(?:^|[\s,(])(?:new|val|value|pkrs)=(?P<x>{_NUM})"},
    schema.Kind.GLOBAL_UPDATE: {
        "value": rf"(?:^|[\s,(])(?:value|new|val|pkrs)=(?P<x>{_NUM})",
        "pkey": rf"(?:^|[\s,(])pkey=(?P<x>{_NUM})",
        "prot": rf"(?:^|[\s,(])(?:prot|protection)=(?P<x>{_NUM})",
    },
}
_HEX_COLUMNS = ("msr", "value", "csd")
_DEC_COLUMNS = ("target_cpu", "vector", "next_pid", "_prev_pid")
_STR_COLUMNS = ("callsite", "func", "cpumask", "next_comm", "prev_state", "_prev_comm")


def _normalise_symbols(arr: pa.Array, is_func: bool) -> pa.Array:
    """Callsites as ``sym+0xoff`` (drop ftrace's ``/0xsize``), functions as bare ``sym``.

    Sources disagree (tracefs prints ``%pS`` as ``f+0x20/0x60``, libtraceevent as
    ``f+0x20``); one spelling lets traces from both be compared.
    """
    d = pc.dictionary_encode(arr)
    if isinstance(d, pa.ChunkedArray):
        d = d.combine_chunks()
    vals = d.dictionary
    vals = pc.replace_substring_regex(vals, r"(\+0x[0-9a-fA-F]+)/0x[0-9a-fA-F]+", r"\1")
    if is_func:
        vals = pc.replace_substring_regex(vals, r"\+0x0+(\s|$)", r"\1")
    return pa.DictionaryArray.from_arrays(d.indices, vals)


def _cpumask_from_array(arr: pa.Array) -> list[str]:
    """perf's ``ARRAY[03, 00, ...]`` bitmap bytes (little-endian) -> cpu list strings."""
    out = []
    for s in arr.to_pylist():  # only ipi_send_cpumask lines from perf: few
        cpus = []
        for i, byte in enumerate(re.findall(r"[0-9a-fA-F]{2}", s or "")):
            b = int(byte, 16)
            cpus.extend(i * 8 + bit for bit in range(8) if b >> bit & 1)
        out.append(schema.format_cpulist(cpus))
    return out


@dataclass
class HeaderFields:
    """The common part of each trace line, as parsed by a format's header parser.

    All arrays have one entry per event line; ``event`` is the event name without
    its group (``csd:csd_queue_cpu`` -> ``csd_queue_cpu``).
    """

    comm: pa.Array
    pid: np.ndarray
    cpu: np.ndarray
    ts: np.ndarray
    flags: pa.Array  # strings, empty/null when the source has no flags column
    event: pa.Array
    args: pa.Array


def events_from_fields(h: HeaderFields, stats: ImportStats) -> pd.DataFrame:
    """Turn parsed header fields into schema rows; count unmodeled events and bad args."""
    n = len(h.event)
    if n == 0:
        return schema.empty_events()
    ev = pc.dictionary_encode(h.event)
    if isinstance(ev, pa.ChunkedArray):
        ev = ev.combine_chunks()
    codes = np.asarray(ev.indices.fill_null(-1))
    names = ev.dictionary.to_pylist()
    counts = np.bincount(codes[codes >= 0], minlength=len(names))
    keep = np.zeros(n, bool)
    kind_codes = np.full(n, -1, np.int8)
    cols: dict[str, np.ndarray | list] = {
        "msr": np.full(n, -1, np.int64), "value": np.zeros(n, np.uint64),
        "failed": np.full(n, -1, np.int8), "target_cpu": np.full(n, -1, np.int32),
        "csd": np.zeros(n, np.uint64), "vector": np.full(n, -1, np.int32),
        "pkey": np.full(n, -1, np.int16), "prot": np.full(n, -1, np.int64),
        "next_pid": np.full(n, -1, np.int32),
    }
    str_cols: dict[str, np.ndarray] = {c: np.full(n, None, object)
                                       for c in ("callsite", "func", "cpumask", "next_comm",
                                                 "prev_state")}
    for code, name in enumerate(names):
        if counts[code] == 0:
            continue
        kind, canon = kind_of_event(name)
        rows = np.flatnonzero(codes == code)
        if kind is None:
            stats.count_unmodeled(name, len(rows))
            continue
        args = h.args.take(pa.array(rows))
        ok = np.zeros(len(rows), bool)
        if kind in _KPROBE_PATTERNS:
            ret = np.asarray(pc.fill_null(pc.match_substring(args, " <- "), False))
            if ret.any():  # a return probe on the function: not a call event
                stats.count_unmodeled(f"{name} (return probe)", int(ret.sum()))
            ok = ~ret
            for col, pat in _KPROBE_PATTERNS[kind].items():
                m = pc.extract_regex(args, pat)
                found = np.asarray(m.is_valid())
                if not found.any():
                    continue
                vals, vok = int_to_u64(m.field("x"))
                sel = found & vok
                if col == "value":
                    cols["value"][rows[sel]] = vals[sel]
                elif col == "pkey":
                    cols["pkey"][rows[sel]] = vals[sel].astype(np.int64).astype(np.int16)
                else:
                    cols["prot"][rows[sel]] = vals[sel].astype(np.int64)
        else:
            remaining = np.ones(len(rows), bool)
            for pat in ARG_PATTERNS[canon]:
                if not remaining.any():
                    break
                sub_idx = np.flatnonzero(remaining)
                sub_args = args if len(sub_idx) == len(rows) else args.take(pa.array(sub_idx))
                m = pc.extract_regex(sub_args, pat)
                matched = np.asarray(m.is_valid())
                if not matched.any():
                    continue
                mi = sub_idx[matched]
                r = rows[mi]
                m = m.filter(pa.array(matched))
                fields = {m.type.field(i).name for i in range(m.type.num_fields)}
                good = np.ones(len(mi), bool)
                parsed: dict[str, Any] = {}
                for col in fields:
                    a = m.field(col)
                    if col in _HEX_COLUMNS:
                        parsed[col], vok = hex_to_u64(a)
                        good &= vok
                    elif col in _DEC_COLUMNS:
                        parsed[col], vok = dec_to_i64(a)
                        good &= vok
                    elif col == "_gp":
                        parsed["failed"] = np.asarray(
                            pc.greater(pc.binary_length(pc.fill_null(a, "")), 0)).astype(np.int8)
                    else:
                        parsed[col] = a
                if kind in (schema.Kind.MSR_WRITE, schema.Kind.MSR_READ) and "failed" not in parsed:
                    parsed["failed"] = np.zeros(len(mi), np.int8)
                gi = np.flatnonzero(good)
                rg = r[gi]
                for col, v in parsed.items():
                    if col in ("_prev_comm", "_prev_pid"):
                        continue  # the line's own comm/pid are the prev task's
                    if col == "_cpumask_array":
                        str_cols["cpumask"][rg] = _cpumask_from_array(v.filter(pa.array(good)))
                        continue
                    if col in str_cols:
                        if col in ("callsite", "func"):
                            v = _normalise_symbols(v, is_func=col == "func")
                        str_cols[col][rg] = np.asarray(
                            v.filter(pa.array(good)).to_pandas(), dtype=object)
                    else:
                        cols[col][rg] = v[gi] if isinstance(v, np.ndarray) else v
                ok[mi[gi]] = True
                remaining[mi] = False
        bad = int((~ok).sum())
        if kind in _KPROBE_PATTERNS:
            bad = 0  # arguments are optional for probes; return probes counted above
            ok_rows = rows[ok]
        else:
            ok_rows = rows[ok]
        if bad:
            stats.count_unparsed(f"bad arguments for {name}", bad)
        keep[ok_rows] = True
        kind_codes[ok_rows] = schema.KINDS.index(kind.value)
    sel = np.flatnonzero(keep)
    flags = decode_flags(h.flags.take(pa.array(sel)))
    comm_col = h.comm.take(pa.array(sel)).dictionary_encode().to_pandas()
    data: dict[str, Any] = {
        "ts": h.ts[sel], "cpu": h.cpu[sel].astype(np.int32), "pid": h.pid[sel], "comm": comm_col,
        "kind": pd.Categorical.from_codes(kind_codes[sel], dtype=schema.KIND_DTYPE),
        **flags,
    }
    for c, v in cols.items():
        data[c] = v[sel]
    for c, v in str_cols.items():
        vals = v[sel]
        vals[pd.isna(vals)] = ""
        data[c] = pd.Categorical(vals)
    stats.events += len(sel)
    return schema.normalize(data)
