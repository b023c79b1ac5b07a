"""Import ``perf script`` default output for tracepoints and probes::

            perf  3887 [000]   201.164267:  csd:csd_function_entry: func=remote_function, csd=(nil)
     migration/0    18 [000]   201.164341:    csd:csd_queue_cpu: cpu=1 callsite=... csd=0xffff...
          insmod 85/85 [002]    12.345678:    pks:write_pkrs: (ffffffffc0123004) new=0x4

Event names carry their group (``csd:``, ``probe:``, ``pks:``), which is dropped.
perf prints no flags column, so irq context and preempt depth are unknown (-1).
Arguments use the same print formats as tracefs, so everything after the
header is shared with the ftrace importer (``common.events_from_fields``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pkstrace.importers.common import (
    HeaderFields,
    ImportStats,
    header_numbers_fit,
    parse_chunk,
    timestamps_ns,
)
from pkstrace.importers.ftrace_text import classify_other_lines, parse_lines_with

FORMAT = "perf_script"

LINE_RE = (
    r"^(?P<prefix>(?:\s*>)*)\s*(?P<comm>.*?)\s+(?P<pid>-?\d+)(?:/(?P<tid>-?\d+))?\s+"
    r"\[(?P<cpu>\d+)\]\s+(?P<sec>\d+)(?:\.(?P<frac>\d+))?:\s+(?:(?P<period>\d+)\s+)?"
    r"(?P<event>[\w.]+(?::[\w.]+)*):\s*(?P<args>.*?)\s*$"
)


def _regex_fields(lines: pa.Array) -> tuple[np.ndarray, HeaderFields | None]:
    """The RE2 path: match lines against LINE_RE. Returns (matched mask, fields)."""
    m = pc.extract_regex(lines, LINE_RE)
    matched = np.asarray(m.is_valid())
    if not matched.any():
        return matched, None
    m = m.filter(pa.array(matched))
    f = {m.type.field(i).name: m.field(i) for i in range(m.type.num_fields)}
    has_tid = pa.array(np.asarray(pc.greater(pc.binary_length(f["tid"]), 0)))
    pid = pc.if_else(has_tid, f["tid"], f["pid"])  # the kernel's pid is perf's tid
    fits = header_numbers_fit(pid, f["cpu"], f["sec"])
    if not fits.all():  # absurd pid / CPU / timestamp: not understood, left to classify
        matched[np.flatnonzero(matched)[~fits]] = False
        if not fits.any():
            return matched, None
        keep = pa.array(fits)
        f = {k: v.filter(keep) for k, v in f.items()}
        pid = pid.filter(keep)
        m = m.filter(keep)
    no_flags = np.full(len(m), -1, np.int8)
    return matched, HeaderFields(
        comm=f["comm"],
        pid=np.asarray(pc.cast(pid, pa.int64())).astype(np.int32),
        cpu=np.asarray(pc.cast(f["cpu"], pa.int64())).astype(np.int32),
        ts=timestamps_ns(f["sec"], f["frac"]),
        irqs_off=no_flags, irq_ctx=no_flags.copy(), preempt_depth=no_flags.copy(),
        event=f["event"],
        args=f["args"],
    )


def parse_bytes(data: bytes | str, stats: ImportStats | None = None,
                ) -> tuple[pd.DataFrame, ImportStats]:
    """Parse a chunk of whole lines; adds to ``stats`` if given (chunk after chunk)."""
    stats = stats if stats is not None else ImportStats(format=FORMAT)
    stats.format = stats.format or FORMAT
    return parse_chunk(data, "perf", _regex_fields, classify_other_lines, stats), stats


def parse_text(text: str | bytes) -> tuple[pd.DataFrame, ImportStats]:
    """Parse ``perf script`` output (any chunk of whole lines): schema rows + statistics."""
    return parse_bytes(text)


def parse_lines(lines: Iterable[str], batch: int = 1 << 18) -> tuple[pd.DataFrame, ImportStats]:
    """:func:`parse_text` over an iterable of lines (with or without line ends)."""
    return parse_lines_with(parse_bytes, FORMAT, lines, batch)
