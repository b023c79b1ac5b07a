"""Importers: text traces other tools wrote -> schema rows + metadata.

``open_trace(path)`` is the one entry point the rest of pkstrace uses: it opens a
``.pkstrace`` file as it is, or recognises and imports a text capture

- ftrace text: tracefs ``trace`` / ``trace_pipe`` (any kernel since 4.x, with or
  without flags and tgid columns), ``trace-cmd report`` (also ``-l``), captures
  wrapped in a serial console log or a mail quote (:mod:`.ftrace_text`);
- ``perf script`` default output (:mod:`.perf_script`);

optionally compressed (gzip, xz, bzip2, zstd). Lines that are not understood and
events the schema does not model are counted (``meta.unparsed_lines``,
``meta.unmodeled_events``), never fatal and never dropped silently.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pkstrace import schema
from pkstrace.errors import InputError
from pkstrace.importers import ftrace_text, perf_script
from pkstrace.importers.common import ImportStats, split_text

__all__ = ["FORMATS", "ImportStats", "detect_format", "import_text", "open_trace", "read_input"]

# format name -> (parser of a line array, backend name written into the metadata)
FORMATS: dict[str, Callable[..., tuple[pd.DataFrame, ImportStats]]] = {
    "ftrace_text": ftrace_text.parse_bytes,
    "perf_script": perf_script.parse_bytes,
}
# Chunks of about this many bytes are parsed at a time (bounded memory, and
# the same code path the live tracefs backend uses for trace_pipe chunks).
CHUNK_BYTES = 8 << 20
MAX_THREADS = 4
_DETECT_BYTES = 4 << 20
# Online CPUs are inferred from the highest CPU seen only up to this many
# (Linux's NR_CPUS tops out at 8192; parse_cpulist accepts up to 65536).
MAX_INFERRED_CPUS = 1 << 16

_MAGIC_HINTS = (
    (b"PERFILE", "a perf.data file: convert it with `perf script -i FILE > FILE.txt`"),
    (b"\x17\x08\x44tracing", "a trace-cmd trace.dat file: convert it with "
                             "`trace-cmd report -i FILE > FILE.txt`"),
)


def read_input(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a text capture (``-`` = stdin), decompressed if need be.

    Read block by block with a size ceiling (:func:`max_input_bytes`), so that
    ``/dev/urandom``, a device, an endless pipe or a decompression bomb ends in a
    one-line error instead of filling memory; binary input is refused at its
    first block.
    """
    p = str(path)
    limit = max_input_bytes()
    try:
        if p == "-":
            import sys
            data = _read_bounded(sys.stdin.buffer, p, limit)
        else:
            if os.path.isdir(p):
                raise InputError(f"{p}: is a directory")
            with open(p, "rb") as f:
                data = _read_bounded(f, p, limit)
        return _decompress(p, data, limit)
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except OSError as e:
        raise InputError(f"{p}: {e.strerror or e}") from None
    except MemoryError:
        raise InputError(f"{p}: out of memory reading the capture (split it with "
                         "`split -l` and import the parts)") from None


READ_BLOCK = 16 << 20
_COMPRESSED = (b"\x1f\x8b", b"\xfd7zXZ\x00", b"BZh", b"\x28\xb5\x2f\xfd")


def max_input_bytes() -> int:
    """Largest capture (decompressed) imported at once: a sixth of the memory available
    now (reading holds the text twice for a moment, parsing needs about twice the text
    again), and at least 256 MiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return max(256 << 20, int(line.split()[1]) * 1024 // 6)
    except (OSError, ValueError, IndexError):
        pass
    return 4 << 30


def _read_bounded(stream: Any, p: str, limit: int) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        block = stream.read(READ_BLOCK)
        if not block:
            break
        if not parts:
            for magic, hint in _MAGIC_HINTS:
                if block.startswith(magic):
                    raise InputError(f"{p}: {hint}")
            if b"\x00" in block[:4096] and not block.startswith((b"PAR1", *_COMPRESSED)):
                raise InputError(f"{p}: binary data, not a text trace")
        total += len(block)
        if total > limit:
            raise InputError(f"{p}: more than {limit >> 20} MiB of text, over a sixth of the "
                             "memory available here; split it with `split -l` and import "
                             "the parts")
        parts.append(block)
    return b"".join(parts)


def _open_compressed(data: bytes) -> Any:
    """A stream of the decompressed bytes, or None for data that is not compressed."""
    buf = io.BytesIO(data)
    if data[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=buf)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(buf)
    if data[:3] == b"BZh":
        return bz2.BZ2File(buf)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        # pyarrow's streaming zstd reader: no extra dependency for zstd captures.
        return pa.CompressedInputStream(pa.BufferReader(data), "zstd")
    return None


def _decompress(p: str, data: bytes, limit: int) -> bytes:
    try:
        stream = _open_compressed(data)
        if stream is None:
            return data
        with stream:
            return _read_bounded(stream, p, limit)
    except (OSError, EOFError, lzma.LZMAError, ValueError, pa.ArrowException) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise InputError(f"{p}: corrupt or truncated compressed file ({msg})") from None


def detect_format(data: bytes, name: str = "input") -> str:
    """``"ftrace_text"`` or ``"perf_script"`` for a text capture; InputError otherwise."""
    head = data[:4096]
    for magic, hint in _MAGIC_HINTS:
        if head.startswith(magic):
            raise InputError(f"{name}: {hint}")
    if re.search(rb"\S", data) is None:  # stops at the first non-blank byte
        raise InputError(f"{name}: empty input")
    if b"\x00" in head:
        raise InputError(f"{name}: binary data, not a text trace")
    sample = data if len(data) <= _DETECT_BYTES else data[:data.rfind(b"\n", 0, _DETECT_BYTES)]
    for attempt in (sample, data):
        lines = split_text(attempt)
        scores = {fmt: _count_matches(lines, mod.LINE_RE)
                  for fmt, mod in (("ftrace_text", ftrace_text), ("perf_script", perf_script))}
        best = max(scores, key=lambda k: scores[k])
        if scores[best] > 0:
            return best
        if attempt is data or len(sample) == len(data):
            break
    first = next((ln.strip() for ln in data[:4096].decode("utf-8", "replace").splitlines()
                  if ln.strip()), "")
    raise InputError(f"{name}: not a trace (no line looks like ftrace text, trace-cmd report "
                     f"or perf script; first line: {first[:60]!r})")


def _count_matches(lines: pa.Array, pattern: str) -> int:
    return int(pc.sum(pc.match_substring_regex(lines, pattern)).as_py() or 0)


def _chunks(data: bytes, size: int) -> list[memoryview]:
    """Cut ``data`` into pieces of about ``size`` bytes at line ends (views, no copies)."""
    view = memoryview(data)
    out = []
    start = 0
    while start < len(data):
        nl = data.find(b"\n", start + size) if start + size < len(data) else -1
        end = len(data) if nl < 0 else nl + 1
        out.append(view[start:end])
        start = end
    return out


def import_text(data: bytes, fmt: str | None = None, name: str = "input",
                ) -> tuple[pd.DataFrame, ImportStats]:
    """Parse a whole text capture (format detected unless given)."""
    fmt = fmt or detect_format(data, name)
    if fmt not in FORMATS:
        raise InputError(f"unknown input format {fmt!r} (known: {', '.join(FORMATS)})")
    parse = FORMATS[fmt]
    chunks = _chunks(data, CHUNK_BYTES)
    workers = min(len(chunks), max(1, min(MAX_THREADS, os.cpu_count() or 1)))
    if workers > 1:
        # numpy and pyarrow release the GIL in their kernels: chunks parse in parallel
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda c: parse(c, ImportStats(format=fmt)), chunks))
    else:
        results = [parse(c, ImportStats(format=fmt)) for c in chunks]
    stats = ImportStats(format=fmt)
    for _, st in results:
        stats.merge(st)
    events = ftrace_text.concat_events([df for df, _ in results])
    if stats.trace_lines == 0:
        raise InputError(f"{name}: not a trace (no event lines; {_summary(stats)})")
    return events, stats


def _summary(stats: ImportStats) -> str:
    parts = [f"{stats.lines} lines"]
    if stats.unparsed_lines:
        parts.append(", ".join(f"{k}: {v}" for k, v in sorted(stats.unparsed_lines.items())))
    return "; ".join(parts)


def meta_for_import(stats: ImportStats, events: pd.DataFrame, source: str,
                    isolated: list[int] | None = None, cpus: int | None = None,
                    ) -> schema.TraceMeta:
    """Metadata for an imported trace: host CPUs, window, lost events, statistics."""
    meta = schema.TraceMeta()
    fmt = stats.format
    if fmt == "ftrace_text" and stats.header.get("source") == "trace-cmd report":
        fmt = "trace_cmd_report"
    meta.backend = f"import:{fmt}"
    meta.clock = str(stats.header.get("clock") or (
        "perf" if stats.format == "perf_script" else "unknown"))
    meta.probes = list(stats.header.get("probes", []))
    meta.source = source
    meta.host = {}
    _apply_cpus(meta, events, stats, isolated, cpus)
    if len(events):
        meta.window = {"start_ns": int(events["ts"].min()), "end_ns": int(events["ts"].max())}
    meta.lost_events = dict(stats.lost_events)
    meta.unmodeled_events = dict(stats.unmodeled_events)
    meta.unparsed_lines = dict(stats.unparsed_lines)
    meta.extra = {"import": stats.to_json()}
    if stats.unparsed_total:
        reasons = sorted(stats.unparsed_lines.items())
        meta.notes.append(f"{stats.unparsed_total} input lines not understood: "
                          + ", ".join(f"{k} ({v})" for k, v in reasons))
    written, kept = stats.header.get("entries_written"), stats.header.get("entries_in_buffer")
    if written and kept is not None and written > kept:
        meta.notes.append(f"the ring buffer overwrote {written - kept} of {written} events "
                          f"before this capture was read (entries-in-buffer/entries-written)")
    if stats.lost_events:
        meta.notes.append("the source lost events: " + ", ".join(
            f"CPU {c}: {n}" for c, n in sorted(stats.lost_events.items())))
    return meta


def _apply_cpus(meta: schema.TraceMeta, events: pd.DataFrame, stats: ImportStats | None,
                isolated: list[int] | None, cpus: int | None) -> None:
    if cpus is not None:
        if cpus < 1:
            raise InputError(f"--cpus must be at least 1, not {cpus}")
        meta.host["online_cpus"] = list(range(cpus))
    elif not meta.host.get("online_cpus"):
        n = stats.header.get("nr_cpus") if stats is not None else None
        if not n and len(events):
            seen = [int(events["cpu"].max())]
            tc = events["target_cpu"]
            if (tc >= 0).any():
                seen.append(int(tc.max()))
            n = max(seen) + 1
        if n and int(n) > MAX_INFERRED_CPUS:
            # An absurd CPU number (or a damaged header) must not become a list of
            # billions of online CPUs: leave them unknown and say so.
            meta.notes.append(f"CPU numbers up to {int(n) - 1}: online CPUs not inferred "
                              f"(more than {MAX_INFERRED_CPUS}; give --cpus N)")
        elif n:
            meta.host["online_cpus"] = list(range(int(n)))
    if isolated is not None:
        meta.host["isolated_cpus"] = sorted({int(c) for c in isolated})
        online = set(meta.host.get("online_cpus") or [])
        outside = sorted(set(meta.host["isolated_cpus"]) - online) if online else []
        if outside:
            meta.notes.append(f"isolated CPUs {schema.format_cpulist(outside)} are not among "
                              f"the online CPUs {schema.format_cpulist(sorted(online))}")
    else:
        meta.host.setdefault("isolated_cpus", [])
    meta.host.setdefault("nohz_full_cpus", [])


def open_trace(path: str | os.PathLike[str], isolated: list[int] | None = None,
               cpus: int | None = None, fmt: str | None = None) -> schema.Trace:
    """Open a ``.pkstrace`` file or import a text capture (format detected).

    ``isolated`` overrides the isolated CPUs in the metadata; ``cpus`` sets the
    online CPUs to 0..cpus-1 (otherwise taken from the capture's ``#P:N`` /
    ``cpus=N`` header or the highest CPU seen). Raises :class:`InputError` (one
    line) for input that is empty, not a trace, or in no known format.
    """
    from pkstrace import tracefile

    p = Path(path)
    if str(path) != "-" and p.is_file():
        try:
            with open(p, "rb") as f:
                head = f.read(4)
        except OSError as e:
            raise InputError(f"{p}: {e.strerror or e}") from None
        if head == b"PAR1":
            trace = tracefile.read_trace(p)
            _apply_cpus(trace.meta, trace.events, None, isolated, cpus)
            return trace
    data = read_input(path)
    if data[:4] == b"PAR1":  # a compressed .pkstrace
        import tempfile
        with tempfile.NamedTemporaryFile(suffix=schema.FILE_SUFFIX) as tmp:
            tmp.write(data)
            tmp.flush()
            trace = tracefile.read_trace(tmp.name)
        _apply_cpus(trace.meta, trace.events, None, isolated, cpus)
        return trace
    name = str(path)
    events, stats = import_text(data, fmt, name)
    meta = meta_for_import(stats, events, os.path.abspath(name) if name != "-" else "-",
                           isolated, cpus)
    return schema.Trace(events=events, meta=meta)


def parse_isolated(text: str) -> list[int]:
    """``--isolated`` value (a kernel CPU list) -> CPUs; InputError if malformed."""
    try:
        return schema.parse_cpulist(text)
    except ValueError as e:
        raise InputError(f"--isolated {text!r}: {e}") from None

