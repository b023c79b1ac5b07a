"""The reader contracts, as plain functions the fuzzers and the property tests share.

Each ``check_*`` takes raw input bytes and returns ``"ok"`` (read, and what was read
is a valid events table / calibration) or ``"refused"`` (a one-line
:class:`~pkstrace.errors.PkstraceError`). Anything else (another exception, a
multi-line message, an invalid table) is a failure: an AssertionError or the
exception itself propagates, which is what atheris and hypothesis report.

Used by tests/test_hardening_readers.py (hypothesis) and tests/fuzz/fuzz_*.py
(atheris). Memory is bounded by the caller (:func:`memory_ceiling`).
"""

from __future__ import annotations

import contextlib
import os
import resource
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pkstrace import schema, tracefile
from pkstrace.errors import PkstraceError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def assert_one_line(e: PkstraceError) -> None:
    msg = str(e)
    assert msg.strip(), f"{type(e).__name__} with an empty message"
    assert "\n" not in msg, f"multi-line error message: {msg[:300]!r}"
    assert len(msg) < 2000, f"error message of {len(msg)} characters"


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def memory_ceiling(extra_bytes: int = 3 << 30) -> Iterator[None]:
    """Lower this process's address-space limit to (current size + extra) for a while.

    A reader that tries to allocate without bound then raises MemoryError (a test
    failure) instead of the kernel's OOM killer ending the test run, or another
    process on the machine. Only the soft limit moves, so it is restored after.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    ceiling = _vm_bytes() + extra_bytes
    if hard != resource.RLIM_INFINITY:
        ceiling = min(ceiling, hard)
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ---------------------------------------------------------------------------
# .pkstrace reader
# ---------------------------------------------------------------------------

def check_pkstrace_bytes(data: bytes, workdir: str | None = None) -> str:
    """read_trace (and read_meta) on a file holding ``data``."""
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        p = Path(d) / "input.pkstrace"
        p.write_bytes(data)
        try:
            meta = tracefile.read_meta(p)
            trace = tracefile.read_trace(p)
        except PkstraceError as e:
            assert_one_line(e)
            return "refused"
    assert schema.validate(trace.events) == [], schema.validate(trace.events)
    assert list(trace.events.columns) == list(schema.COLUMN_NAMES)
    assert trace.meta.to_json() == meta.to_json()
    assert 1 <= trace.meta.format_version <= schema.FORMAT_VERSION
    return "ok"


# ---------------------------------------------------------------------------
# Text importers (ftrace text, trace-cmd report, perf script)
# ---------------------------------------------------------------------------

def check_text_bytes(data: bytes, fmt: str | None = None) -> str:
    """import_text + meta_for_import, as `pkstrace import` runs them."""
    from pkstrace.importers import import_text, meta_for_import

    try:
        events, stats = import_text(data, fmt, "input")
        meta = meta_for_import(stats, events, "input")
    except PkstraceError as e:
        assert_one_line(e)
        return "refused"
    assert schema.validate(events) == [], schema.validate(events)
    assert len(events) == stats.events, (len(events), stats.events)
    assert len(events) > 0 or stats.unmodeled_total > 0
    # nothing invented: every row came from a line, and numbers are in range
    assert len(events) <= stats.lines
    for col in ("cpu", "pid", "target_cpu"):
        assert (events[col].to_numpy() >= -1).all(), col
    if len(events):
        assert meta.window["start_ns"] <= meta.window["end_ns"]
    online = meta.host.get("online_cpus") or []
    assert len(online) <= 1 << 16
    return "ok"


# ---------------------------------------------------------------------------
# Calibration JSON
# ---------------------------------------------------------------------------

_CALLS_TRACE: schema.Trace | None = None


def _calls_trace() -> schema.Trace:
    """A small real trace (the host's cross-CPU calls) for the projection to run on."""
    global _CALLS_TRACE
    if _CALLS_TRACE is None:
        from pkstrace.importers import open_trace

        _CALLS_TRACE = open_trace(FIXTURES / "ftrace_cpuid_2cpu.txt")
    return _CALLS_TRACE


def check_calibration_bytes(data: bytes, workdir: str | None = None,
                            analyse_too: bool = True) -> str:
    """load_calibration, then the projection it feeds (finite, non-negative stalls)."""
    from pkstrace.analysis.projection import load_calibration

    with tempfile.TemporaryDirectory(dir=workdir) as d:
        p = Path(d) / "calibration.json"
        p.write_bytes(data)
        try:
            cal = load_calibration(str(p))
        except PkstraceError as e:
            assert_one_line(e)
            return "refused"
    if analyse_too:
        from pkstrace.analysis import analyse

        f = analyse(_calls_trace(), calibration=cal)
        proj = f.projection
        cal_rows = proj[proj["source"] == "calibration"]
        assert len(cal_rows) > 0, "a loaded calibration gave no projection rows"
        for c in ("p50_stall_ns", "p99_stall_ns"):
            v = cal_rows[c].to_numpy(dtype=float)
            assert np.isfinite(v).all() and (v >= 0).all(), (c, v[:5])
    return "ok"
