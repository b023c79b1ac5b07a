"""Import ftrace text: tracefs ``trace`` / ``trace_pipe`` and ``trace-cmd report``.

A line looks like (Documentation/trace/ftrace.rst)::

        bash-3879    [000] d.h1.   200.923667: write_msr: 830, value 1000000fb
        bash-3879    (   3879) [000] ...1.   200.92: ...     (options/record-tgid)
        bash-3879    [000]   200.923667: ...                 (no irq-info, trace-cmd report)
  h1tc: bash-9138    1d.h1.  503.784115: ...                 (trace-cmd report -l, instance)

Every kernel since 4.x writes one of these; the flags column has 5 characters
(4 before migrate-disable was added) or is absent. Lines may carry junk in front
(a serial console's ``[   12.345678] `` timestamp, a mail quote ``> ``) and junk
lines may sit between them: those are counted by reason, never fatal.

Parsing is columnar: a numpy pass finds the fixed landmarks of well-formed lines
(the ``[cpu]`` field, the ``: `` after the timestamp and after the event name);
lines it cannot vouch for go through one RE2 expression (pyarrow, vectorised);
what that rejects is classified line by line (only those lines).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pkstrace import schema
from pkstrace.importers.common import (
    FLAGS_RE,
    HeaderFields,
    ImportStats,
    decode_flags,
    header_numbers_fit,
    parse_chunk,
    timestamps_ns,
)

FORMAT = "ftrace_text"

# Junk that may precede a trace line: mail quotes, a console timestamp
# ("[   12.345678] "), a printk caller id ("[    T1] "), a trace-cmd instance name.
PREFIX_RE = (r"(?:\s*>)*\s*(?:\[\s*\d+\.\d+\]\s?)?(?:\[\s*[TC]\d+\]\s?)?(?:>\s?)*"
             r"(?:[\w.-]+: )?")
LINE_RE = (
    r"^(?P<prefix>" + PREFIX_RE + r")"
    r"\s*(?P<comm>.*?)-(?P<pid>\d+)\s+"
    r"(?:\(\s*(?P<tgid>\d+|-+)\)\s+)?"
    r"(?:\[(?P<cpu>\d+)\]\s+(?:(?P<flags>" + FLAGS_RE + r")\s+)?"
    r"|(?P<latcpu>\d+)(?P<latflags>" + FLAGS_RE + r")\s+)"
    # latency format: "1401198603us+:" (delay mark: space + ! # * @ $)
    r"(?P<sec>\d+)(?:\.(?P<frac>\d+))?(?P<us>us)?[+!#*@$]?\s*:\s+"
    r"(?P<event>[\w:]+):\s*(?P<args>.*?)\s*$"
)

# Classifying lines that are not events (Python, run only on those lines).
_HEADER_P = re.compile(r"#P:(\d+)")
_HEADER_TRACER = re.compile(r"^#\s*tracer:\s*(\S+)")
_HEADER_ENTRIES = re.compile(r"entries-in-buffer/entries-written:\s*(\d+)/(\d+)")
_TC_CPUS = re.compile(r"^\s*cpus=(\d+)\s*$")
# Comment lines pkstrace's own tracefs streamer adds (backends/tracefs.py):
# "# pkstrace-probe: {...}", "# pkstrace-lost: {"0": 0}", "# pkstrace-clock: "mono"".
_PKSTRACE_META = re.compile(r"^#\s*pkstrace-([\w-]+):\s*(.*)$")
_LOST = re.compile(r"CPU:?\s*(\d+)\s*\[LOST (\d+) EVENTS\]")
_STACK = re.compile(r"^\s*(?:>\s*)*(?:\[\s*\d+\.\d+\]\s*)?=>\s|<stack trace>|<user stack trace>")
_HEADERISH = re.compile(r"^\s*(?:#|CPU \d+ is empty|version = |##### CPU \d+ buffer started)")
_FUNCTION_LINE = re.compile(r"-\d+\s+(?:\(.*?\)\s+)?\[\d+\].*?\d+\.\d+:\s+\S+\s+<-\S+")
_TRACE_LIKE = re.compile(r"-\d+\s+(?:\(.*?\)\s+)?(?:\[\d+\]|\d+[dDX.][NnpBb.])")
_CONSOLE = re.compile(r"^\s*(?:>\s*)*\[\s*\d+\.\d+\]")
_QUOTE = re.compile(r"^\s*>")


def classify_other_lines(lines: list[str], stats: ImportStats) -> None:
    """Account for lines that are not events: headers, stacks, lost-event marks, junk."""
    for line in lines:
        s = line.strip()
        if not s:
            stats.blank_lines += 1
            continue
        if _STACK.search(line):
            stats.stack_lines += 1
            continue
        m = _LOST.search(line)
        if m:
            cpu, lost = int(m.group(1)), int(m.group(2))
            stats.lost_events[cpu] = stats.lost_events.get(cpu, 0) + lost
            stats.header_lines += 1
            continue
        if _HEADERISH.match(line) or _TC_CPUS.match(line):
            stats.header_lines += 1
            _header_facts(line, stats)
            continue
        if _FUNCTION_LINE.search(line):
            stats.count_unmodeled("function")  # function tracer: "f <-caller"
            continue
        if _TRACE_LIKE.search(line):
            stats.count_unparsed("malformed or truncated trace line")
        elif _CONSOLE.match(line):
            stats.count_unparsed("console log line")
        elif _QUOTE.match(line):
            stats.count_unparsed("quoted text")
        else:
            stats.count_unparsed("not a trace line")


def _header_facts(line: str, stats: ImportStats) -> None:
    h = stats.header
    m = _PKSTRACE_META.match(line)
    if m:
        _pkstrace_fact(m.group(1), m.group(2), stats)
        return
    m = _HEADER_P.search(line)
    if m:
        h.setdefault("nr_cpus", int(m.group(1)))
    m = _HEADER_TRACER.match(line)
    if m:
        h.setdefault("tracer", m.group(1))
    m = _HEADER_ENTRIES.search(line)
    if m:
        h.setdefault("entries_in_buffer", int(m.group(1)))
        h.setdefault("entries_written", int(m.group(2)))
    m = _TC_CPUS.match(line)
    if m:
        h.setdefault("nr_cpus", int(m.group(1)))
        h.setdefault("source", "trace-cmd report")


def _pkstrace_fact(key: str, raw: str, stats: ImportStats) -> None:
    try:
        val = json.loads(raw)
    except ValueError:
        stats.count_unparsed("bad pkstrace comment line")
        return
    if key == "lost" and isinstance(val, dict):
        for cpu, n in val.items():
            try:
                c, k = int(cpu), int(n)
            except (TypeError, ValueError):
                continue
            stats.lost_events[c] = max(stats.lost_events.get(c, 0), k)
    elif key == "probe" and isinstance(val, dict):
        stats.header.setdefault("probes", []).append(val)
    elif key == "clock" and isinstance(val, str):
        stats.header["clock"] = val
    else:
        stats.header.setdefault("pkstrace", {})[key] = val


def _regex_fields(lines: pa.Array) -> tuple[np.ndarray, HeaderFields | None]:
    """The RE2 path: match lines against LINE_RE. Returns (matched mask, fields)."""
    m = pc.extract_regex(lines, LINE_RE)
    matched = np.asarray(m.is_valid())
    if not matched.any():
        return matched, None
    m = m.filter(pa.array(matched))
    f = {m.type.field(i).name: m.field(i) for i in range(m.type.num_fields)}
    lat = pa.array(np.asarray(pc.greater(pc.binary_length(f["latcpu"]), 0)))
    cpu_s = pc.if_else(lat, f["latcpu"], f["cpu"])
    is_us = np.asarray(pc.greater(pc.binary_length(f["us"]), 0))
    fits = header_numbers_fit(f["pid"], cpu_s, f["sec"], is_us)
    if not fits.all():  # absurd pid / CPU / timestamp: not understood, left to classify
        matched[np.flatnonzero(matched)[~fits]] = False
        if not fits.any():
            return matched, None
        keep = pa.array(fits)
        f = {k: v.filter(keep) for k, v in f.items()}
        lat, cpu_s, is_us = lat.filter(keep), cpu_s.filter(keep), is_us[fits]
    ts = timestamps_ns(f["sec"], f["frac"])
    if is_us.any():  # latency format ("12345678us"): microseconds
        ts = np.where(is_us, np.asarray(pc.cast(f["sec"], pa.int64())) * 1000, ts)
    return matched, HeaderFields(
        comm=f["comm"],
        pid=np.asarray(pc.cast(f["pid"], pa.int64())).astype(np.int32),
        cpu=np.asarray(pc.cast(cpu_s, pa.int64())).astype(np.int32),
        ts=ts,
        **decode_flags(pc.if_else(lat, f["latflags"], f["flags"])),
        event=f["event"],
        args=f["args"],
    )


def parse_bytes(data: bytes | str, stats: ImportStats | None = None,
                ) -> tuple[pd.DataFrame, ImportStats]:
    """Parse a chunk of whole lines; adds to ``stats`` if given (chunk after chunk)."""
    stats = stats if stats is not None else ImportStats(format=FORMAT)
    stats.format = stats.format or FORMAT
    return parse_chunk(data, "ftrace", _regex_fields, classify_other_lines, stats), stats


def parse_text(text: str | bytes) -> tuple[pd.DataFrame, ImportStats]:
    """Parse ftrace text (any chunk of whole lines) into schema rows plus statistics.

    Rows keep the input's order. Header facts (``#P:N``, tracer, trace-cmd's
    ``cpus=N``) and lost-event marks (``CPU:1 [LOST 12 EVENTS]``) land in the
    statistics; so do lines not understood (by reason) and events the schema
    does not model (by name).
    """
    return parse_bytes(text)


def parse_lines(lines: Iterable[str], batch: int = 1 << 18) -> tuple[pd.DataFrame, ImportStats]:
    """:func:`parse_text` over an iterable of lines (with or without line ends)."""
    return parse_lines_with(parse_bytes, FORMAT, lines, batch)


def parse_lines_with(parse: Callable[..., tuple[pd.DataFrame, ImportStats]], fmt: str,
                     lines: Iterable[str], batch: int) -> tuple[pd.DataFrame, ImportStats]:
    stats = ImportStats(format=fmt)
    frames = []
    buf: list[str] = []
    for line in lines:
        buf.append(line.rstrip("\r\n"))
        if len(buf) >= batch:
            frames.append(parse("\n".join(buf), stats)[0])
            buf = []
    if buf or not frames:
        frames.append(parse("\n".join(buf), stats)[0])
    return concat_events(frames), stats


def concat_events(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate schema frames (categories unified)."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return schema.empty_events()
    if len(frames) == 1:
        return frames[0]
    from pandas.api.types import union_categoricals
    out = {}
    for c in schema.COLUMN_NAMES:
        if isinstance(frames[0][c].dtype, pd.CategoricalDtype) and c != "kind":
            out[c] = union_categoricals([f[c] for f in frames], ignore_order=True)
        else:
            out[c] = pd.concat([f[c] for f in frames], ignore_index=True)
    return schema.normalize(out)
