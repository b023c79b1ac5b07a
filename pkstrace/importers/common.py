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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pkstrace import schema
from pkstrace.importers import kprobe_calls

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


@dataclass
class Lines:
    """A chunk of text as one byte buffer plus line boundaries (no copy per line).

    ``raw[starts[i]:ends[i]]`` is line i without its line end. ``\r`` bytes are
    removed (serial consoles write ``\r\r\n``); invalid UTF-8 is replaced.
    """

    raw: np.ndarray  # uint8
    starts: np.ndarray  # int64
    ends: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.starts)

    def take(self, rows: np.ndarray) -> pa.Array:
        """The given lines as a pyarrow string array."""
        from pkstrace.importers.landmarks import substrings
        return substrings(pa.py_buffer(self.raw), self.starts[rows], self.ends[rows])


def split_lines(data: bytes | memoryview | str) -> Lines:
    """Cut text into :class:`Lines` (vectorised: newline positions via numpy)."""
    if isinstance(data, str):
        data = data.encode("utf-8", errors="replace")
    raw = np.frombuffer(data, np.uint8)  # bytes or a memoryview slice: no copy
    is_cr = raw == CR
    if is_cr.any():
        raw = raw[~is_cr]
    if len(raw) and not _valid_utf8(raw):
        fixed = raw.tobytes().decode("utf-8", errors="replace").encode()
        raw = np.frombuffer(fixed, np.uint8)
    nl = np.flatnonzero(raw == NL)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [len(raw)]]).astype(np.int64)
    if len(raw) == 0 or raw[-1] == NL:  # no line after the last newline
        starts, ends = starts[:-1], ends[:-1]
    return Lines(raw=raw, starts=starts, ends=ends)


def _valid_utf8(raw: np.ndarray) -> bool:
    typ = pa.large_string()
    offs = pa.py_buffer(np.array([0, len(raw)], np.int64))
    arr = pa.Array.from_buffers(typ, 1, [None, offs, pa.py_buffer(raw)])
    try:
        arr.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def split_text(data: bytes | str) -> pa.Array:
    """Lines of ``data`` as a pyarrow string array."""
    lines = split_lines(data)
    return lines.take(np.arange(len(lines)))


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


def _string_bytes(arr: pa.Array, skip: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                         np.ndarray]:
    """A string array's bytes (zero-padded both sides) and each string's [start, end).

    Also the valid mask. Numbers are then read from windows of these bytes: no
    per-value string copies (lower-casing, slicing, padding) in between.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(pa.string())
    n = len(arr)
    bufs = arr.buffers()
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    offs = np.frombuffer(bufs[1], np.int64 if large else np.int32)[arr.offset:arr.offset + n + 1]
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    pad = 32
    padded = np.concatenate([np.zeros(pad, np.uint8), data, np.zeros(pad, np.uint8)])
    ends = offs[1:].astype(np.int64) + pad
    starts = np.minimum(offs[:-1].astype(np.int64) + pad + skip, ends)  # skip a "key="
    valid = np.asarray(arr.is_valid()) if arr.null_count else np.ones(n, bool)
    return padded, starts, ends, valid


def _right_window(buf: np.ndarray, ends: np.ndarray, width: int) -> np.ndarray:
    view = np.lib.stride_tricks.sliding_window_view(buf, width)
    return view[np.maximum(ends - width, 0)]


_HEX_W = 18  # "0x" + 16 hex digits
_HEX_SHIFTS = np.array([0] * (_HEX_W - 16) + list(range(60, -4, -4)), np.uint64)
_NIL = np.frombuffer(b"(nil)", np.uint8)


def hex_to_u64(arr: pa.Array, skip: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Hex strings (optional ``0x``; ``(nil)`` means 0) -> (uint64 values, ok mask).

    ``skip``: characters to ignore at the start of every string (a ``key=``)."""
    buf, starts, ends, valid = _string_bytes(arr, skip)
    if not len(starts):
        return np.zeros(0, np.uint64), np.zeros(0, bool)
    length = ends - starts
    win = _right_window(buf, ends, _HEX_W)
    nib = _HEX_LUT[win]
    rev = (nib != 255)[:, ::-1]
    run = np.minimum(np.where(rev.all(axis=1), _HEX_W, np.argmin(rev, axis=1)), length)
    first2 = _right_window(buf, starts + 2, 2)
    has_0x = (first2[:, 0] == ord("0")) & ((first2[:, 1] | 0x20) == ord("x"))
    ok = valid & (run >= 1) & (run <= 16) & ((run == length) | (has_0x & (run == length - 2)))
    nil = (length == 5) & (_right_window(buf, starts + 5, 5) == _NIL).all(axis=1)
    inside = np.arange(_HEX_W)[None, :] >= (_HEX_W - run)[:, None]
    nib = np.where(inside, nib, 0).astype(np.uint64)
    vals = (nib << _HEX_SHIFTS).sum(axis=1, dtype=np.uint64)
    return np.where(ok, vals, 0).astype(np.uint64), ok | (nil & valid)


def dec_to_i64(arr: pa.Array, skip: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Decimal strings -> (int64 values, ok mask); non-numbers give ok=False.

    ``skip``: characters to ignore at the start of every string (a ``key=``)."""
    if skip:
        arr = pc.utf8_slice_codeunits(arr, skip)
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


# Largest header numbers a line may carry: a pid (PID_MAX_LIMIT is 4194304) and a
# CPU number stay far inside int32, and seconds * 1e9 (or microseconds * 1e3) inside
# int64. Bigger ones would wrap silently or make the cast raise, so such lines are
# counted as not understood instead.
MAX_PID_DIGITS = 9
MAX_CPU_DIGITS = 6
MAX_TS_SECONDS = (2**63 - 1) // 1_000_000_000 - 1
MAX_TS_MICROSECONDS = (2**63 - 1) // 1_000 - 1


def header_numbers_fit(pid: pa.Array, cpu: pa.Array, sec: pa.Array,
                       is_us: np.ndarray | None = None) -> np.ndarray:
    """Rows whose pid, CPU and timestamp fit their columns (digit strings; '-' allowed)."""
    def digits(a: pa.Array) -> np.ndarray:
        return np.asarray(pc.fill_null(pc.binary_length(pc.utf8_ltrim(a, "-")), 0))

    ok = (digits(pid) <= MAX_PID_DIGITS) & (digits(cpu) <= MAX_CPU_DIGITS) \
        & (digits(sec) <= 18)
    secs = np.asarray(pc.cast(pc.if_else(pa.array(ok), pc.fill_null(sec, "0"), "0"),
                              pa.int64()))
    limit = MAX_TS_SECONDS if is_us is None else np.where(is_us, MAX_TS_MICROSECONDS,
                                                           MAX_TS_SECONDS)
    return ok & (secs <= limit)


def timestamps_ns(sec: pa.Array, frac: pa.Array) -> np.ndarray:
    """Seconds and fraction digits (any count; ``"200"``, ``"923667"``) -> int64 ns."""
    s = np.asarray(pc.cast(pc.fill_null(sec, "0"), pa.int64()))
    f = pc.fill_null(frac, "")
    f = pc.utf8_slice_codeunits(pc.utf8_rpad(f, width=9, padding="0"), 0, 9)
    return s * 1_000_000_000 + np.asarray(pc.cast(f, pa.int64()))


# ---------------------------------------------------------------------------
# Flags column ("d.h1." and the like)
# ---------------------------------------------------------------------------

# Per Documentation/trace/ftrace.rst and trace_print_lat_fmt(): irqs-off ('d',
# 'D' = also BH off, 'b' = only BH off), need-resched (N n p B b L l), hardirq/
# softirq, preempt-depth (low 4 bits, hex), migrate-disable (absent before 5.13).
# A negative preempt count shows as garbage such as "bnZe.": depth 0xe, "NMI".
FLAGS_RE = r"[dDbX.][NnpBbLl.][ZzHhs.][0-9a-fA-F.][0-9a-fA-F.]?"
_IRQS_OFF = np.full(256, -1, np.int8)
_IRQS_OFF[ord(".")] = 0
_IRQS_OFF[ord("d")] = 1
_IRQS_OFF[ord("D")] = 1  # irqs off and BH disabled
_IRQS_OFF[ord("b")] = 0  # only BH disabled
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
    call_func = kprobe_calls.canonical(name)  # cross-CPU call kprobes (kernels < 6.3)
    if call_func:
        return kprobe_calls.KINDS[call_func], call_func
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
        rf"^cpumask=(?P<cpumask>[0-9a-fA-F,\-]*),? callsite=(?P<callsite>{_SYM}),? "
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


_NULL_SYMBOL = r"^(?:0[xX])?0+$|^\((?:null|nil)\)$"


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
    # A NULL pointer (tracefs and perf print %pS of NULL as "0x0") is no symbol:
    # store the schema's NA "", as the bcc backend does, not a fake name "0x0".
    vals = pc.if_else(pc.match_substring_regex(vals, _NULL_SYMBOL), "", vals)
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


def _cpumask_from_text(arr: pa.Array) -> pa.Array:
    """tracefs prints ``__get_cpumask()`` as a hex bitmap ("00000000,000000fe": 32-bit
    words, most significant first); other tools print a CPU list ("1-7"). Both -> list."""
    d = pc.dictionary_encode(arr)
    if isinstance(d, pa.ChunkedArray):
        d = d.combine_chunks()
    lists = []
    for text in d.dictionary.to_pylist():  # distinct masks only: few
        text = text or ""
        words = text.split(",")
        if "-" not in text and text and (
                all(len(w) == 8 for w in words) or re.search(r"[a-fA-F]", text)):
            try:
                bits = int("".join(w.zfill(8) for w in words), 16)
            except ValueError:
                lists.append(text)
                continue
            lists.append(schema.format_cpulist(
                [i for i in range(bits.bit_length()) if bits >> i & 1]))
        else:
            lists.append(text)
    return pa.DictionaryArray.from_arrays(d.indices, pa.array(lists, pa.string()))


@dataclass
class HeaderFields:
    """The common part of each event line, as cut out by a format's header parser.

    One entry per event line, in input order; ``event`` is the name as printed
    (a group prefix such as ``csd:`` is stripped here). Flags are decoded
    (-1 where the source has no flags column).
    """

    comm: pa.Array
    pid: np.ndarray
    cpu: np.ndarray
    ts: np.ndarray
    irqs_off: np.ndarray
    irq_ctx: np.ndarray
    preempt_depth: np.ndarray
    event: pa.Array
    args: pa.Array

    def __len__(self) -> int:
        return len(self.pid)

    @staticmethod
    def concat(parts: list[tuple[np.ndarray, HeaderFields]]) -> HeaderFields:
        """Merge fields cut by different paths back into line order (by line number)."""
        parts = [(r, h) for r, h in parts if len(r)]
        if len(parts) == 1:
            return parts[0][1]
        if not parts:
            e = pa.array([], pa.string())
            z = np.zeros(0, np.int64)
            return HeaderFields(e, z.astype(np.int32), z.astype(np.int32), z, *(
                z.astype(np.int8),) * 3, e, e)
        order = np.argsort(np.concatenate([r for r, _ in parts]), kind="stable")
        idx = pa.array(order)

        def cat_arrow(name: str) -> pa.Array:
            arrs = [getattr(h, name) for _, h in parts]
            arrs = [a.cast(pa.large_string()) for a in arrs]
            return pa.concat_arrays(arrs).take(idx)

        def cat_np(name: str) -> np.ndarray:
            return np.concatenate([getattr(h, name) for _, h in parts])[order]

        return HeaderFields(
            comm=cat_arrow("comm"), pid=cat_np("pid"), cpu=cat_np("cpu"), ts=cat_np("ts"),
            irqs_off=cat_np("irqs_off"), irq_ctx=cat_np("irq_ctx"),
            preempt_depth=cat_np("preempt_depth"), event=cat_arrow("event"),
            args=cat_arrow("args"))


class _CodedStrings:
    """A string column built piecewise as integer codes (no Python string per row)."""

    def __init__(self, n: int) -> None:
        self.codes = np.full(n, 0, np.int32)
        self.categories: list[str] = [""]
        self._index: dict[str, int] = {"": 0}

    def assign(self, rows: np.ndarray, values: pa.Array | list[str]) -> None:
        if isinstance(values, list):
            values = pa.array(values, pa.string())
        d = values if pa.types.is_dictionary(values.type) else pc.dictionary_encode(values)
        if isinstance(d, pa.ChunkedArray):
            d = d.combine_chunks()
        mapping = np.array([self._code(v) for v in d.dictionary.to_pylist()] or [0], np.int32)
        idx = np.asarray(d.indices.fill_null(-1))
        self.codes[rows] = np.where(idx >= 0, mapping[np.maximum(idx, 0)], 0)

    def _code(self, v: str | None) -> int:
        v = v or ""
        c = self._index.get(v)
        if c is None:
            c = self._index[v] = len(self.categories)
            self.categories.append(v)
        return c

    def categorical(self, sel: np.ndarray) -> pd.Categorical:
        return pd.Categorical.from_codes(self.codes[sel], categories=pd.Index(
            self.categories, dtype=object))


def _categorical(arr: pa.Array) -> pd.Categorical:
    d = pc.dictionary_encode(arr)
    if isinstance(d, pa.ChunkedArray):
        d = d.combine_chunks()
    cats = d.dictionary.to_pylist()
    codes = np.asarray(d.indices.fill_null(-1)).astype(np.int32)
    if len(set(cats)) != len(cats):  # cannot happen, but from_codes would mislabel
        return pd.Categorical(np.asarray(cats, dtype=object)[codes])
    return pd.Categorical.from_codes(codes, categories=pd.Index(cats, dtype=object))


def events_from_fields(h: HeaderFields, stats: ImportStats) -> pd.DataFrame:
    """Turn parsed header fields into schema rows; count unmodeled events and bad args."""
    n = len(h)
    if n == 0:
        return schema.empty_events()
    ev = pc.dictionary_encode(h.event)
    if isinstance(ev, pa.ChunkedArray):
        ev = ev.combine_chunks()
    codes = np.asarray(ev.indices.fill_null(-1))
    # strip groups ("csd:csd_queue_cpu" -> "csd_queue_cpu") on the distinct names only
    names = [nm.rsplit(":", 1)[-1] for nm in ev.dictionary.to_pylist()]
    counts = np.bincount(codes[codes >= 0], minlength=len(names))
    keep = np.zeros(n, bool)
    kind_codes = np.full(n, -1, np.int8)
    cols: dict[str, np.ndarray] = {
        "msr": np.full(n, -1, np.int64), "value": np.zeros(n, np.uint64),
        "failed": np.full(n, -1, np.int8), "target_cpu": np.full(n, -1, np.int32),
        "csd": np.zeros(n, np.uint64), "vector": np.full(n, -1, np.int32),
        "pkey": np.full(n, -1, np.int16), "prot": np.full(n, -1, np.int64),
        "next_pid": np.full(n, -1, np.int32),
    }
    str_cols = {c: _CodedStrings(n)
                for c in ("callsite", "func", "cpumask", "next_comm", "prev_state")}
    by_name: dict[str, list[int]] = {}
    view: ArgsView | None = None
    for code, name in enumerate(names):
        if counts[code]:
            by_name.setdefault(name, []).append(code)
    for name, name_codes in by_name.items():
        kind, canon = kind_of_event(name)
        rows = np.flatnonzero(np.isin(codes, name_codes)) if len(name_codes) > 1 \
            else np.flatnonzero(codes == name_codes[0])
        if kind is None:
            stats.count_unmodeled(name, len(rows))
            continue
        if canon in kprobe_calls.KINDS:  # their kind depends on the row (local calls)
            keep[rows] = kprobe_calls.store(canon, h.args.take(pa.array(rows)), h.cpu[rows],
                                            rows, cols, str_cols, kind_codes, stats)
            continue
        if kind in _KPROBE_PATTERNS:
            ok = _kprobe_args(kind, name, h.args.take(pa.array(rows)), rows, cols, stats)
        else:
            if view is None:
                view = ArgsView.of(h.args)
            ok = _tracepoint_args(canon, view, h.args, rows, cols, str_cols, kind)
            bad = int((~ok).sum())
            if bad:
                stats.count_unparsed(f"bad arguments for {name}", bad)
        ok_rows = rows[ok]
        keep[ok_rows] = True
        kind_codes[ok_rows] = schema.KINDS.index(kind.value)
    sel = np.flatnonzero(keep)
    data: dict[str, Any] = {
        "ts": h.ts[sel], "cpu": h.cpu[sel].astype(np.int32), "pid": h.pid[sel],
        "comm": _categorical(h.comm.take(pa.array(sel))),
        "kind": pd.Categorical.from_codes(kind_codes[sel], dtype=schema.KIND_DTYPE),
        "irqs_off": h.irqs_off[sel], "irq_ctx": h.irq_ctx[sel],
        "preempt_depth": h.preempt_depth[sel],
    }
    for c, v in cols.items():
        data[c] = v[sel]
    for c, sv in str_cols.items():
        data[c] = sv.categorical(sel)
    stats.events += len(sel)
    return schema.normalize(data)


def _kprobe_args(kind: schema.Kind, name: str, args: pa.Array, rows: np.ndarray,
                 cols: dict[str, np.ndarray], stats: ImportStats) -> np.ndarray:
    """write_pkrs / global update probes: named arguments, each optional."""
    ret = np.asarray(pc.fill_null(pc.match_substring(args, " <- "), False))
    if ret.any():  # a return probe on the function: not a call
        stats.count_unmodeled(f"{name} (return probe)", int(ret.sum()))
    for col, pat in _KPROBE_PATTERNS[kind].items():
        m = pc.extract_regex(args, pat)
        found = np.asarray(m.is_valid())
        if not found.any():
            continue
        vals, vok = int_to_u64(pc.fill_null(m.field("x"), "0"))
        sel = found & vok & ~ret
        if col == "value":
            cols["value"][rows[sel]] = vals[sel]
        elif col == "pkey":
            cols["pkey"][rows[sel]] = vals[sel].astype(np.int64).astype(np.int16)
        else:
            cols["prot"][rows[sel]] = vals[sel].astype(np.int64)
    return ~ret


# The usual spelling as keys in order: (text before the value, column). A value
# runs to the next key's text (or the end of the arguments). Columns starting
# with "_" are checked (numbers) or skipped, not stored.
FAST_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    "csd_queue_cpu": (("cpu=", "target_cpu"), (" callsite=", "callsite"), (" func=", "func"),
                      (" csd=", "csd")),
    "csd_function_entry": (("func=", "func"), (", csd=", "csd")),
    "csd_function_exit": (("func=", "func"), (", csd=", "csd")),
    "ipi_send_cpu": (("cpu=", "target_cpu"), (" callsite=", "callsite"),
                     (" callback=", "func")),
    "ipi_send_cpumask": (("cpumask=", "cpumask"), (" callsite=", "callsite"),
                         (" callback=", "func")),
    "sched_switch": (("prev_comm=", "_prev_comm"), (" prev_pid=", "_prev_pid"),
                     (" prev_prio=", "_prev_prio"), (" prev_state=", "prev_state"),
                     (" ==> next_comm=", "next_comm"), (" next_pid=", "next_pid"),
                     (" next_prio=", "_next_prio")),
    "call_function_entry": (("vector=", "vector"),),
    "call_function_exit": (("vector=", "vector"),),
    "call_function_single_entry": (("vector=", "vector"),),
    "call_function_single_exit": (("vector=", "vector"),),
    # "830, value 1000000fb": the first value has no key; cut at the comma
    "write_msr": (("", "msr"), (", value ", "value")),
    "read_msr": (("", "msr"), (", value ", "value")),
}
_SIGNED_CHECK = ("_prev_pid", "_prev_prio", "_next_prio")


@dataclass
class ArgsView:
    """A chunk's argument strings as byte positions in one zero-padded buffer."""

    buf: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    eq: np.ndarray  # positions of every '='
    comma: np.ndarray  # positions of every ','

    @staticmethod
    def of(args: pa.Array) -> ArgsView:
        buf, starts, ends, _ = _string_bytes(args)
        return ArgsView(buf, starts, ends, np.flatnonzero(buf == ord("=")),
                        np.flatnonzero(buf == ord(",")))


def _text_at(buf: np.ndarray, pos: np.ndarray, text: bytes) -> np.ndarray:
    """Rows where buf[pos:pos+len(text)] == text (8 bytes per uint64 comparison)."""
    from pkstrace.importers.landmarks import _words
    words = _words(buf)
    pos = np.clip(pos, 0, len(words) - 1)
    ok = np.ones(len(pos), bool)
    for i in range(0, len(text), 8):
        piece = text[i:i + 8]
        mask = np.uint64((1 << (8 * len(piece))) - 1)
        ok &= (words[np.minimum(pos + i, len(words) - 1)] & mask) \
            == np.uint64(int.from_bytes(piece, "little"))
    return ok


def _next_marks(marks: np.ndarray, at: np.ndarray, k: int, end: int) -> list[np.ndarray]:
    """The first k mark positions at or after each ``at`` (``end``, past every string,
    if none: a position still inside the buffer)."""
    j = np.searchsorted(marks, at)
    ext = np.append(marks, end)
    return [ext[np.minimum(j + i, len(marks))] for i in range(k)]


def _dec_at(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray,
            signed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Decimal numbers of 1-9 digits at [starts, ends) -> (int64 values, ok)."""
    from pkstrace.importers.landmarks import _uint_ending_at
    neg = (buf[starts] == ord("-")) & signed
    first = starts + neg
    val, length = _uint_ending_at(buf, ends, 10)
    ok = (length == ends - first) & (length >= 1) & (length <= 9)
    return np.where(neg, -val, val), ok


def _fast_args_at(canon: str, view: ArgsView, rows: np.ndarray,
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """Rows in the usual spelling (mask over ``rows``) and their fields, cut by position.

    Keys are found as the k-th '=' after the start of the arguments and checked
    byte for byte; a value holding a '=' or ending in ',' (another spelling) or a
    number that does not convert leaves its row to the patterns.
    """
    spec = FAST_KEYS.get(canon)
    n = len(rows)
    if spec is None or n == 0:
        return np.zeros(n, bool), {}
    buf = view.buf
    starts, ends = view.starts[rows], view.ends[rows]
    keyless = spec[0][0] == ""
    mark = "," if keyless else "="
    marks = view.comma if keyless else view.eq
    # Each text's last mark (its '=', or the ',' of ", value "); " ==> " holds two
    # more. A mark's index among the row's marks follows from the texts before it.
    last_mark = np.cumsum([text.count(mark) for text, _ in spec]) - 1
    *found, after = _next_marks(marks, starts, int(last_mark[-1]) + 2, len(buf) - 1)
    key_end = []
    for (text, _col), k in zip(spec, last_mark, strict=True):
        if not text:
            key_end.append(starts - 1)  # a value at the very start
        else:  # the text's last byte: its last mark plus what follows it in the text
            key_end.append(found[k] + len(text) - 1 - text.rindex(mark))
    ok = np.ones(n, bool)
    # no further mark inside the arguments: exactly the keys we expect
    ok &= after >= ends
    v_start, v_end = [], []
    for i, (text, _col) in enumerate(spec):
        if text:
            t0 = key_end[i] + 1 - len(text)
            ok &= _text_at(buf, t0, text.encode()) & (key_end[i] < ends)
            if i == 0:
                ok &= t0 == starts
        vs = key_end[i] + 1
        ve = ends if i == len(spec) - 1 else key_end[i + 1] + 1 - len(spec[i + 1][0])
        ok &= ve > vs
        v_start.append(vs)
        v_end.append(np.maximum(ve, vs))
    last = np.maximum(ends - 1, 0)
    ok &= (buf[last] != ord(" ")) & (buf[last] != ord("\t"))  # trailing blanks: patterns
    fields: dict[str, Any] = {}
    from pkstrace.importers.landmarks import substrings
    data = pa.py_buffer(buf)
    for (_text, col), ve in zip(spec, v_end, strict=True):
        if col in _HEX_COLUMNS or col in _DEC_COLUMNS or col in _SIGNED_CHECK:
            continue
        ok &= buf[np.maximum(ve - 1, 0)] != ord(",")
    sel = np.flatnonzero(ok)
    for (_text, col), vs, ve in zip(spec, v_start, v_end, strict=True):
        vs, ve = vs[sel], ve[sel]
        if col in _HEX_COLUMNS:
            vals, vok = hex_to_u64(substrings(data, vs, ve))
            fields[col] = vals
        elif col in _DEC_COLUMNS or col in _SIGNED_CHECK:
            vals, vok = _dec_at(buf, vs, ve, signed=col in _SIGNED_CHECK or col == "next_pid")
            if col in _DEC_COLUMNS:
                fields[col] = vals
        elif col.startswith("_"):
            continue
        else:
            fields[col] = substrings(data, vs, ve)
            if col == "cpumask":
                vok = _is_cpumask_text(fields[col])
            else:
                continue
        bad = ~vok
        if bad.any():
            ok[sel[bad]] = False
    if not ok.any():
        return ok, {}
    keep = ok[sel]
    if not keep.all():
        fk = pa.array(keep)
        fields = {c: v[keep] if isinstance(v, np.ndarray) else v.filter(fk)
                  for c, v in fields.items()}
    return ok, fields


def _is_cpumask_text(arr: pa.Array) -> np.ndarray:
    d = pc.dictionary_encode(arr)
    good = pc.match_substring_regex(d.dictionary, r"^[0-9a-fA-F,\-]*$")
    return np.asarray(good.fill_null(False))[np.asarray(d.indices)]


def _store(fields: dict[str, Any], rows: np.ndarray, kind: schema.Kind,
           cols: dict[str, np.ndarray], str_cols: dict[str, _CodedStrings]) -> np.ndarray:
    """Convert and store one batch of argument fields for ``rows``; returns the ok mask."""
    good = np.ones(len(rows), bool)
    parsed: dict[str, Any] = {}
    for col, a in fields.items():
        if col.startswith(("_prev", "_x")):
            continue  # sched_switch's prev comm/pid (the line's own) and priorities
        if isinstance(a, np.ndarray):  # converted already (the positional path)
            parsed[col] = a
            continue
        a, skip = a if isinstance(a, tuple) else (a, 0)
        if col in _HEX_COLUMNS:
            parsed[col], vok = hex_to_u64(a, skip)
            good &= vok
        elif col in _DEC_COLUMNS:
            parsed[col], vok = dec_to_i64(a, skip)
            # these columns are int32: a bigger number would wrap into a wrong CPU/pid
            good &= vok & (np.abs(parsed[col]) <= np.iinfo(np.int32).max)
        elif col == "_gp":
            parsed["failed"] = np.asarray(
                pc.greater(pc.binary_length(pc.fill_null(a, "")), 0)).astype(np.int8)
        else:
            parsed[col] = a
    if kind in (schema.Kind.MSR_WRITE, schema.Kind.MSR_READ) and "failed" not in parsed:
        parsed["failed"] = np.zeros(len(rows), np.int8)
    gi = np.flatnonzero(good)
    rg = rows[gi]
    all_good = len(gi) == len(rows)
    for col, v in parsed.items():
        if isinstance(v, np.ndarray):
            cols[col][rg] = v[gi]
            continue
        v = v if all_good else v.filter(pa.array(good))
        if col == "_cpumask_array":
            str_cols["cpumask"].assign(rg, _cpumask_from_array(v))
        elif col == "cpumask":
            str_cols["cpumask"].assign(rg, _cpumask_from_text(v))
        elif col in ("callsite", "func"):
            str_cols[col].assign(rg, _normalise_symbols(v, is_func=col == "func"))
        else:
            str_cols[col].assign(rg, v)
    return good


def _tracepoint_args(canon: str, view: ArgsView, all_args: pa.Array, rows: np.ndarray,
                     cols: dict[str, np.ndarray], str_cols: dict[str, _CodedStrings],
                     kind: schema.Kind) -> np.ndarray:
    """Parse one tracepoint's arguments: usual spelling first, then its patterns in order.

    ``rows`` index ``all_args`` (and ``view``, the same strings as byte positions).
    Returns the mask of rows whose arguments were understood. A row the usual
    spelling cut but could not convert (a number too long, a mask that is no mask)
    goes through the patterns like any other row, so both paths agree on it.
    """
    ok = np.zeros(len(rows), bool)
    fast_mask, fields = _fast_args_at(canon, view, rows)
    if fast_mask.any():
        fi = np.flatnonzero(fast_mask)
        good = _store(fields, rows[fi], kind, cols, str_cols)
        ok[fi[good]] = True
    remaining = ~ok
    for pat in ARG_PATTERNS[canon]:
        if not remaining.any():
            break
        sub_idx = np.flatnonzero(remaining)
        sub_args = all_args.take(pa.array(rows[sub_idx]))
        m = pc.extract_regex(sub_args, pat)
        matched = np.asarray(m.is_valid())
        if not matched.any():
            continue
        remaining[sub_idx[matched]] = False
        if not matched.all():
            m = m.filter(pa.array(matched))
        mi = sub_idx[matched]
        fields = {m.type.field(i).name: m.field(i) for i in range(m.type.num_fields)}
        good = _store(fields, rows[mi], kind, cols, str_cols)
        ok[mi[good]] = True
    return ok


def parse_chunk(data: bytes | str | Lines, style: str,
                regex_fields: Callable[[pa.Array], tuple[np.ndarray, HeaderFields | None]],
                classify: Callable[[list[str], ImportStats], None],
                stats: ImportStats) -> pd.DataFrame:
    """Parse a chunk of whole lines: fast path, then RE2 path, then classification.

    ``style`` selects the fast path's layout (``"ftrace"`` / ``"perf"``);
    ``regex_fields`` is the format's RE2 header parser for the lines the fast
    path did not accept; ``classify`` accounts for the lines neither accepted.
    """
    from pkstrace.importers import landmarks

    lines = data if isinstance(data, Lines) else split_lines(data)
    stats.lines += len(lines)
    if len(lines) == 0:
        return schema.empty_events()
    fast_parts = landmarks.parse_parts(lines.raw, lines.starts, lines.ends, style)
    parts: list[tuple[np.ndarray, HeaderFields]] = [(fast.rows, fast) for fast in fast_parts]
    n_fast = sum(len(fast.rows) for fast in fast_parts)
    if n_fast < len(lines):
        mask = np.ones(len(lines), bool)
        for fast in fast_parts:
            mask[fast.rows] = False
        rest = np.flatnonzero(mask)
        rest_lines = lines.take(rest)
        matched, rf = regex_fields(rest_lines)
        if rf is not None:
            parts.append((rest[matched], rf))
        if not matched.all():
            other = np.flatnonzero(~matched)
            classify(rest_lines.take(pa.array(other)).to_pylist(), stats)
    return events_from_fields(HeaderFields.concat(parts), stats)
