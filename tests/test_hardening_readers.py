"""Property tests for every reader: the .pkstrace reader, the text importers, the
calibration JSON. Each generated input is either read correctly or refused with a
one-line PkstraceError; never another exception, never an invalid table, never
unbounded memory (each property runs under an address-space ceiling).

Example counts are small so the normal suite stays quick; a longer campaign:

    PKSTRACE_HYPOTHESIS_EXAMPLES=5000 .venv/bin/pytest -q tests/test_hardening_readers.py

(docs/hardening.md lists the counts measured that way.)
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fuzz.targets import (
    FIXTURES,
    check_calibration_bytes,
    check_pkstrace_bytes,
    check_text_bytes,
    memory_ceiling,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pkstrace import schema, tracefile
from pkstrace.importers import import_text

EXAMPLES = int(os.environ.get("PKSTRACE_HYPOTHESIS_EXAMPLES", "0")) or None


def cfg(default: int) -> settings:
    """Bounded examples, no deadline (the host is shared and loaded), no database dir."""
    return settings(max_examples=EXAMPLES or default, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def _bounded_memory() -> Any:
    with memory_ceiling(3 << 30):
        yield


HOSTILE = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "\"'><&", "\u202e",
           "a\x00b", "comm with spaces", "-", "", "x" * 300, "日本語", "\\n"]
names = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=40))


# ---------------------------------------------------------------------------
# .pkstrace: what is written is read back exactly, whatever the values
# ---------------------------------------------------------------------------

def _ints(dtype: str) -> st.SearchStrategy[int]:
    info = np.iinfo(dtype)
    edges = [v for v in (info.min, info.max, -1, 0, 1) if info.min <= v <= info.max]
    return st.one_of(st.sampled_from(edges),
                     st.integers(int(info.min), int(info.max)))


@st.composite
def event_tables(draw: st.DrawFn) -> pd.DataFrame:
    n = draw(st.integers(0, 30))
    cols: dict[str, Any] = {}
    for c in schema.COLUMNS:
        if c.dtype == "kind":
            cols[c.name] = draw(st.lists(st.sampled_from(schema.KINDS), min_size=n, max_size=n))
        elif c.dtype == "category":
            cols[c.name] = draw(st.lists(names, min_size=n, max_size=n))
        else:
            cols[c.name] = np.array(draw(st.lists(_ints(c.dtype), min_size=n, max_size=n)),
                                    dtype=c.dtype)
    return schema.normalize(cols)


cpu_lists = st.lists(st.integers(0, 1 << 16), max_size=8)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64),
                         st.floats(allow_nan=False, allow_infinity=False), names)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(names, inner, max_size=4)), max_leaves=12)


@st.composite
def metas(draw: st.DrawFn) -> schema.TraceMeta:
    m = schema.TraceMeta()
    m.host = {"hostname": draw(names), "online_cpus": draw(cpu_lists),
              "isolated_cpus": draw(cpu_lists), "nohz_full_cpus": draw(cpu_lists)}
    m.backend, m.clock, m.source = draw(names), draw(names), draw(names)
    m.lost_events = draw(st.dictionaries(st.integers(0, 1 << 16), st.integers(0, 2**63 - 1),
                                         max_size=4))
    m.symbols = draw(st.dictionaries(st.integers(0, 2**64 - 1), names, max_size=4))
    m.notes = draw(st.lists(names, max_size=3))
    m.partial = draw(st.booleans())
    m.extra = draw(st.dictionaries(names, json_values, max_size=3))
    return m


@cfg(60)
@given(events=event_tables(), meta=metas())
def test_pkstrace_roundtrip_keeps_every_value(tmp_path: Path, events: pd.DataFrame,
                                              meta: schema.TraceMeta) -> None:
    p = tmp_path / "t.pkstrace"
    tracefile.write_trace(p, schema.Trace(events, meta), force=True)
    assert check_pkstrace_bytes(p.read_bytes(), str(tmp_path)) == "ok"
    back = tracefile.read_trace(p)
    assert back.meta.to_json() == meta.to_json()
    for c in schema.COLUMNS:
        if c.dtype in ("category", "kind"):
            assert back.events[c.name].astype(str).tolist() == \
                events[c.name].astype(str).tolist(), c.name
        else:
            assert np.array_equal(back.events[c.name].to_numpy(), events[c.name].to_numpy()), \
                c.name


def _base_files(tmp: Path) -> list[bytes]:
    """Valid traces to damage: one row group and several (the recorder streams groups)."""
    from pkstrace.importers import open_trace

    real = open_trace(FIXTURES / "ftrace_cpuid_2cpu.txt")
    one = tmp / "one.pkstrace"
    tracefile.write_trace(one, real, force=True)
    many = tmp / "many.pkstrace"
    w = tracefile.TraceWriter(many, force=True)
    for i in range(0, 600, 200):
        w.write(real.events.iloc[i:i + 200].reset_index(drop=True))
    w.close(real.meta)
    return [one.read_bytes(), many.read_bytes()]


@pytest.fixture(scope="module")
def base_files(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    return _base_files(tmp_path_factory.mktemp("base"))


@st.composite
def damaged(draw: st.DrawFn, base: bytes) -> bytes:
    b = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "splice", "zero", "footer"]))
        if not b:
            break
        at = draw(st.integers(0, len(b) - 1))
        if op == "truncate":
            del b[at:]
        elif op == "flip":
            b[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "splice":
            b[at:at] = draw(st.binary(max_size=64))
        elif op == "zero":
            b[at:at + draw(st.integers(1, 256))] = b"\x00" * 8
        else:  # the footer (metadata, schema, row-group offsets) sits at the end
            k = draw(st.integers(1, min(len(b), 2048)))
            i = len(b) - k
            b[i] = draw(st.integers(0, 255))
    return bytes(b)


@cfg(300)
@given(data=st.data())
def test_pkstrace_damaged_files_are_read_or_refused(tmp_path: Path, base_files: list[bytes],
                                                    data: st.DataObject) -> None:
    base = data.draw(st.sampled_from(base_files))
    check_pkstrace_bytes(data.draw(damaged(base)), str(tmp_path))


def _with_metadata(tmp: Path, raw: bytes) -> bytes:
    events = schema.normalize({"ts": [1, 2], "cpu": [0, 1], "kind": ["msr_write"] * 2})
    t = tracefile._table(events).replace_schema_metadata({schema.META_KEY: raw})
    p = tmp / "m.pkstrace"
    pq.write_table(t, p)
    return p.read_bytes()


meta_docs = st.one_of(
    json_values,
    st.fixed_dictionaries({"format_version": st.one_of(st.integers(-5, 5), json_scalars)},
                          optional={k: json_values for k in schema.TraceMeta().to_json()
                                    if k != "format_version"}),
    st.fixed_dictionaries({"format_version": st.just(1), "host": st.dictionaries(
        st.sampled_from(["online_cpus", "isolated_cpus", "nohz_full_cpus", "pks"]),
        json_values)}),
)


@cfg(200)
@given(doc=meta_docs)
def test_pkstrace_any_metadata_document_is_read_or_refused(tmp_path: Path, doc: Any) -> None:
    check_pkstrace_bytes(_with_metadata(tmp_path, json.dumps(doc).encode()), str(tmp_path))


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"format_version": 1e400}',
                                 b'{"format_version": 1, "window": {"a": 1e400}}',
                                 b'{"format_version": 2}', b"\xff\xfe", b""])
def test_pkstrace_metadata_edge_cases_refused(tmp_path: Path, raw: bytes) -> None:
    assert check_pkstrace_bytes(_with_metadata(tmp_path, raw), str(tmp_path)) == "refused"


# ---------------------------------------------------------------------------
# Text importers: well-formed lines are read exactly; anything else is counted
# ---------------------------------------------------------------------------

comms = st.text(alphabet=string.ascii_letters + string.digits + "_/.:<>()=' -", min_size=1,
                max_size=15).filter(lambda s: s.strip() == s and s.strip())
# the flag characters each position of ftrace's flags column may hold
FLAG_CHARS = (".dDbX", ".NnpBbLl", ".shHzZ", ".0123456789abcdef", ".0123456789abcdef")


@st.composite
def ftrace_flags(draw: st.DrawFn) -> str:
    return "".join(draw(st.sampled_from(list(c))) for c in FLAG_CHARS)


@st.composite
def event_lines(draw: st.DrawFn, style: str) -> tuple[str, dict[str, Any]]:
    """A well-formed csd_queue_cpu or write_msr line and the row it must give."""
    comm, pid = draw(comms), draw(st.integers(0, 4_194_304))
    cpu = draw(st.integers(0, 99_999))
    sec, usec = draw(st.integers(0, 9_000_000_000)), draw(st.integers(0, 999_999))
    ts = sec * 1_000_000_000 + usec * 1000
    if draw(st.booleans()):
        target = draw(st.integers(0, 99_999))
        csd = draw(st.integers(1, 2**64 - 1))
        args = f"cpu={target} callsite=f+0x1/0x2 func=g csd={csd:016x}"
        ev, row = "csd_queue_cpu", {"kind": "csd_queue", "target_cpu": target, "csd": csd}
        group = "csd"
    else:
        msr, val = draw(st.integers(0, 0xFFFFFFFF)), draw(st.integers(0, 2**64 - 1))
        args = f"{msr:x}, value {val:x}"
        ev, row = "write_msr", {"kind": "msr_write", "msr": msr, "value": val}
        group = "msr"
    if style == "ftrace":
        line = f"{comm:>16}-{pid:<7} [{cpu:03d}] {draw(ftrace_flags())} {sec:5d}.{usec:06d}: " \
               f"{ev}: {args}"
    else:
        line = f"{comm:>16} {pid:6d} [{cpu:03d}] {sec:5d}.{usec:06d}: {group}:{ev}: {args}"
    return line, {"pid": pid, "cpu": cpu, "ts": ts, **row}


@cfg(150)
@given(style=st.sampled_from(["ftrace", "perf"]), data=st.data())
def test_well_formed_lines_import_exactly(style: str, data: st.DataObject) -> None:
    lines = data.draw(st.lists(event_lines(style), min_size=1, max_size=20))
    text = "\n".join(line for line, _ in lines) + "\n"
    events, stats = import_text(text.encode(), "ftrace_text" if style == "ftrace"
                                else "perf_script", "gen")
    assert stats.unparsed_lines == {}, (stats.unparsed_lines, text[:500])
    assert len(events) == len(lines)
    for i, (_, want) in enumerate(lines):
        got = events.iloc[i]
        for k, v in want.items():
            assert (str(got[k]) if k == "kind" else int(got[k])) == v, (k, got[k], v, lines[i])


@cfg(100)
@given(style=st.sampled_from(["ftrace", "perf"]), data=st.data(),
       field=st.sampled_from(["pid", "cpu", "sec", "target"]),
       big=st.one_of(st.integers(10**5, 10**30), st.sampled_from([2**31 - 1, 2**31, 2**32])))
def test_big_numbers_are_exact_or_counted_never_wrapped(style: str, data: st.DataObject,
                                                        field: str, big: int) -> None:
    """A pid, CPU, timestamp or target CPU far beyond real ones: the line is imported
    with exactly that number, or counted as not understood; never a wrapped number."""
    good, want = data.draw(event_lines(style))
    if field == "target" and want["kind"] != "csd_queue":
        field = "cpu"
    bad = {
        "pid": lambda s: s.replace(f"-{want['pid']} ", f"-{big} ", 1) if style == "ftrace"
        else s.replace(f" {want['pid']} [", f" {big} [", 1),
        "cpu": lambda s: s.replace(f"[{want['cpu']:03d}]", f"[{big}]", 1),
        "sec": lambda s: s.replace(f"{want['ts'] // 10**9:5d}.", f"{big}.", 1),
        "target": lambda s: s.replace(f"cpu={want.get('target_cpu')} ", f"cpu={big} ", 1),
    }[field](good)
    assume(bad != good)
    text = (good + "\n" + bad + "\n").encode()
    events, stats = import_text(text, "ftrace_text" if style == "ftrace" else "perf_script",
                                "gen")
    assert schema.validate(events) == []
    row = events.iloc[0]
    assert int(row["pid"]) == want["pid"] and int(row["cpu"]) == want["cpu"]
    if len(events) == 1:
        assert stats.unparsed_total == 1, stats.unparsed_lines
        return
    assert len(events) == 2 and stats.unparsed_total == 0
    got = events.iloc[1]
    column = {"pid": "pid", "cpu": "cpu", "target": "target_cpu"}.get(field)
    if column:
        assert int(got[column]) == big, (column, int(got[column]), big)
    else:
        assert int(got["ts"]) == big * 10**9 + want["ts"] % 10**9, (int(got["ts"]), big)


def _fixture_lines() -> list[bytes]:
    out = []
    for name in ("ftrace_cpuid_2cpu.txt", "perf_script_cpuid_2cpu.txt",
                 "trace_cmd_report_cpuid_2cpu.txt", "ftrace_tgid_cpuid_2cpu.txt",
                 "ftrace_latfmt_cpuid_2cpu.txt", "ftrace_noflags_cpuid_2cpu.txt",
                 "ftrace_pipe_lost_cpuid_2cpu.txt", "ftrace_stack_cpuid_2cpu.txt",
                 # later formats: -l flags, 4-char flags, quoted in mail, a serial
                 # console, the guest's raw stream with its header, and the kprobe
                 # cross-CPU call lines of kernels without csd tracepoints
                 "trace_cmd_report_l_cpuid_2cpu.txt", "ftrace_4char_flags_derived.txt",
                 "ftrace_mail_quoted_derived.txt", "ftrace_serial_console_derived.txt",
                 "guest_v3_raw_excerpt.txt", "guest_csd_kprobes_broadcast_4cpu.txt",
                 "ftrace_kprobe_old_kernel_derived.txt"):
        lines = (FIXTURES / name).read_bytes().splitlines()  # a missing one fails here
        out += lines[:40] + lines[len(lines) // 2:len(lines) // 2 + 40]
        # kprobe events ("name: (sym+0x4/0x120) args"), wherever they are in the file
        out += [ln for ln in lines if b": (" in ln and not ln.startswith(b"#")][:40]
    return out


FIXTURE_LINES = _fixture_lines()
TOKENS = [b"-1", b"100000", b"99999999999999999999", b"0x", b"f" * 20, b"\xff\xfe", b"\x00",
          b"nan", b"1e308", b"(nil)", b"cpu=", b"[", b"]", b":", b": ", b"=", b"\t", b"\r",
          b"18446744073709551616", b"-9223372036854775809", b"#P:", b"CPU:1 [LOST 9 EVENTS]",
          b"<script>alert(1)</script>", b"x" * 5000]


@st.composite
def mutated_text(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.sampled_from(FIXTURE_LINES), min_size=1, max_size=30))
    lines = list(lines)
    for _ in range(draw(st.integers(0, 8))):
        i = draw(st.integers(0, len(lines) - 1))
        ln = bytearray(lines[i])
        at = draw(st.integers(0, len(ln)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "byte", "junk"]))
        if op == "insert":
            ln[at:at] = draw(st.sampled_from(TOKENS))
        elif op == "delete":
            del ln[at:at + draw(st.integers(1, 12))]
        elif op == "replace":
            ln[at:at + draw(st.integers(1, 6))] = draw(st.sampled_from(TOKENS))
        elif op == "byte" and ln:
            ln[min(at, len(ln) - 1)] = draw(st.integers(0, 255))
        else:
            ln = bytearray(draw(st.binary(max_size=80)))
        lines[i] = bytes(ln)
    sep = draw(st.sampled_from([b"\n", b"\r\n"]))
    return sep.join(lines) + draw(st.sampled_from([b"", sep]))


@cfg(300)
@given(data=mutated_text(), fmt=st.sampled_from([None, "ftrace_text", "perf_script"]))
def test_mutated_captures_import_or_refuse(data: bytes, fmt: str | None) -> None:
    check_text_bytes(data, fmt)


@cfg(100)
@given(data=st.binary(max_size=2000))
def test_random_bytes_import_or_refuse(data: bytes) -> None:
    check_text_bytes(data)


# ---------------------------------------------------------------------------
# Calibration JSON
# ---------------------------------------------------------------------------

samples = st.lists(st.one_of(st.floats(min_value=0, max_value=1e9), st.integers(0, 10**6),
                             json_scalars), max_size=6)
calibrations = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"kind": st.one_of(st.just("pkstrace-calibration"), names),
         "version": st.one_of(st.just(1), json_scalars),
         "remote_ns": st.one_of(st.fixed_dictionaries({"idle": samples, "busy": samples}),
                                json_values)},
        optional={"local_ns": samples, "host": json_values,
                  "serial": st.lists(st.fixed_dictionaries(
                      {"cpus": st.one_of(st.integers(-2, 2**70), json_scalars),
                       "stall_ns": samples}), max_size=3),
                  "broadcast": st.lists(st.fixed_dictionaries(
                      {"cpus": st.one_of(st.integers(-2, 2**70), json_scalars),
                       "stall_ns": samples}), max_size=3)}),
)


@cfg(150)
@given(doc=calibrations)
def test_calibration_documents_load_or_refuse(tmp_path: Path, doc: Any) -> None:
    check_calibration_bytes(json.dumps(doc).encode(), str(tmp_path))


@pytest.mark.parametrize("raw", [b"[" * 100_000, b"", b"\xff", b"{}", b"null",
                                 b'{"kind":"pkstrace-calibration","version":1,'
                                 b'"remote_ns":{"idle":[1e308],"busy":[1e308]}}'])
def test_calibration_edge_cases_refused(tmp_path: Path, raw: bytes) -> None:
    assert check_calibration_bytes(raw, str(tmp_path)) == "refused"
