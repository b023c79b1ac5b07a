"""`pkstrace replay` and `pkstrace schema` end to end, as a user runs them (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pkstrace import schema, tracefile

ROOT = Path(__file__).resolve().parents[1]
PKSTRACE = ROOT / ".venv" / "bin" / "pkstrace"
FIX = ROOT / "tests" / "fixtures"
FTRACE = FIX / "ftrace_cpuid_2cpu.txt"


def run(*args: str) -> subprocess.CompletedProcess:
    exe = [str(PKSTRACE)] if PKSTRACE.exists() else [sys.executable, "-m", "pkstrace"]
    return subprocess.run([*exe, *args], capture_output=True, text=True, timeout=120)


def check(doc, sch, path="$"):
    """A small JSON Schema checker (type, const, enum, properties, required,
    additionalProperties: false, items): enough for the schema we generate."""
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
             "integer": int, "number": (int, float)}
    if "const" in sch:
        assert doc == sch["const"], path
    if "enum" in sch:
        assert doc in sch["enum"], f"{path}: {doc!r} not in {sch['enum']}"
    if "type" in sch:
        ts = sch["type"] if isinstance(sch["type"], list) else [sch["type"]]
        ok = any(isinstance(doc, types[t]) and not (t in ("integer", "number")
                                                    and isinstance(doc, bool)) for t in ts)
        assert ok, f"{path}: {doc!r} is not {ts}"
    if isinstance(doc, dict) and "properties" in sch:
        for k in sch.get("required", []):
            assert k in doc, f"{path}: missing {k}"
        if sch.get("additionalProperties") is False:
            extra = set(doc) - set(sch["properties"])
            assert not extra, f"{path}: unexpected keys {extra}"
        for k, v in doc.items():
            if k in sch["properties"]:
                check(v, sch["properties"][k], f"{path}.{k}")
    if isinstance(doc, list) and "items" in sch:
        for i, v in enumerate(doc):
            check(v, sch["items"], f"{path}[{i}]")


@pytest.fixture(scope="module")
def replay_schema():
    r = run("schema")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"replay", "trace_columns"}
    return doc["replay"]


def v3_trace(path: Path) -> Path:
    """A .pkstrace of a serial walk over CPUs 1-7 leaking preempt count, 6-7 isolated."""
    rows = {k: [] for k in ("ts", "cpu", "pid", "comm", "kind", "target_cpu", "callsite",
                            "func", "csd", "preempt_depth", "msr", "value")}

    def add(**kw):
        for k in rows:
            rows[k].append(kw.get(k, schema.column(k).na))

    t = 1000
    for i, tgt in enumerate(range(1, 8)):
        add(ts=t, cpu=0, pid=42, comm="pks_test", kind="csd_queue", target_cpu=tgt,
            callsite="smp_call_function_single+0x7a", func="__wrmsr_on_cpu", csd=0xBEEF,
            preempt_depth=(1 - i) % 16)
        add(ts=t + 20_000, cpu=tgt, pid=0, comm="swapper", kind="csd_entry",
            func="__wrmsr_on_cpu", csd=0xBEEF)
        add(ts=t + 20_001, cpu=tgt, pid=0, comm="swapper", kind="msr_write", msr=0x6E1, value=4)
        add(ts=t + 22_000, cpu=tgt, pid=0, comm="swapper", kind="csd_exit",
            func="__wrmsr_on_cpu", csd=0xBEEF)
        t += 24_000
    cols = {k: v for k, v in rows.items()}
    cols["value"] = np.array(cols["value"], dtype=np.uint64)
    cols["csd"] = np.array(cols["csd"], dtype=np.uint64)
    meta = schema.TraceMeta(host={"online_cpus": list(range(8)), "isolated_cpus": [6, 7]},
                            backend="test")
    tracefile.write_trace(path, schema.Trace(schema.normalize(cols), meta))
    return path


def test_replay_text_trace_prints_tables():
    r = run("replay", str(FTRACE))
    assert r.returncode == 0, r.stderr
    for section in ("Events per CPU", "Redundant MSR writes", "Cross-CPU calls",
                    "cpuid_smp_cpuid", "Global-update episodes", "Preempt-count drift: none",
                    "Lost updates: none"):
        assert section in r.stdout


def test_replay_json_matches_schema(replay_schema):
    r = run("replay", str(FTRACE), "--json", "--isolated", "1", "--calibration", "review")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    check(doc, replay_schema)
    assert doc["schema_version"] == 1
    v = doc["findings"]["isolation_violations"]
    assert len(v) > 200 and {"time_ns", "source_cpu", "target_cpu", "func", "callsite",
                             "comm", "tracer_induced"} <= set(v[0])
    cc = doc["cross_cpu_calls"]
    assert cc["count"] > 0 and 0 < cc["p50_ns"] < 10_000_000
    assert {r["func"] for r in cc["per_func"]} >= {"cpuid_smp_cpuid"}
    assert [r["target_cpu"] for r in cc["per_target_cpu"]] == [1, 0]
    assert doc["preempt_drift"] == [] and doc["lost_updates"] == []
    assert doc["global_updates"]["episodes"] == []
    review = [r for r in doc["global_updates"]["projection"]
              if r["source"] == "review" and r["design"] == "serial" and r["cpus"] == 256]
    assert 1_000_000 <= review[0]["p50_stall_ns"] <= 25_000_000
    assert all(r["msr"] is None for r in doc["counts"] if not r["kind"].startswith("msr"))


def test_replay_pkstrace_file_and_fail_on(tmp_path, replay_schema):
    p = v3_trace(tmp_path / "v3.pkstrace")
    r = run("replay", str(p), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    check(doc, replay_schema)
    ep = doc["global_updates"]["episodes"]
    assert len(ep) == 1 and ep[0]["targets"] == 7 and ep[0]["mode"] == "serial"
    assert doc["preempt_drift"][0]["depths"] == [1, 0, 15, 14, 13, 12, 11]
    assert len(doc["findings"]["isolation_violations"]) == 2
    r = run("replay", str(p), "--fail-on", "drift")
    assert r.returncode == 1 and "drift" in r.stderr
    r = run("replay", str(p), "--fail-on", "isolation", "--isolated", "")
    assert r.returncode == 0, r.stderr
    r = run("replay", str(p), "--fail-on", "lost,redundant")
    assert r.returncode == 0, r.stderr
    r = run("replay", str(FTRACE), "--fail-on", "isolation", "--isolated", "1")
    assert r.returncode == 1


def _one_line_error(r: subprocess.CompletedProcess, what: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pkstrace replay: error:"), r.stderr
    assert what in lines[0]


def test_bad_input_is_a_one_line_error(tmp_path):
    good = v3_trace(tmp_path / "good.pkstrace")
    data = good.read_bytes()
    trunc = tmp_path / "trunc.pkstrace"
    trunc.write_bytes(data[: len(data) // 2])
    _one_line_error(run("replay", str(trunc)), "corrupt or truncated")
    empty = tmp_path / "empty.pkstrace"
    empty.write_bytes(b"")
    _one_line_error(run("replay", str(empty)), "empty")
    junk = tmp_path / "junk.txt"
    junk.write_text("Dear reviewer,\nthis is not a trace at all.\n")
    r = run("replay", str(junk))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    _one_line_error(run("replay", str(tmp_path / "missing.pkstrace")), "no such file")
    _one_line_error(run("replay", str(good), "--fail-on", "drift,bogus"), "bogus")
    _one_line_error(run("replay", str(good), "--isolated", "3-1"), "--isolated")
    cal = tmp_path / "cal.json"
    cal.write_text('{"kind": "pkstrace-calibration", "version": 2}')
    _one_line_error(run("replay", str(good), "--calibration", str(cal)), "version")


def test_unknown_format_version_is_refused(tmp_path):
    t = tracefile.read_trace(v3_trace(tmp_path / "a.pkstrace"))
    t.meta.format_version = schema.FORMAT_VERSION + 1
    tracefile.write_trace(tmp_path / "new.pkstrace", t)
    _one_line_error(run("replay", str(tmp_path / "new.pkstrace")), "newer")


def test_empty_trace_is_refused(tmp_path):
    p = tmp_path / "none.pkstrace"
    tracefile.write_trace(p, schema.Trace(schema.empty_events(), schema.TraceMeta()))
    _one_line_error(run("replay", str(p)), "no events")


def test_schema_trace_columns_generated_from_schema_module():
    r = run("schema", "--only", "trace")
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    assert doc["$schema"].endswith("2020-12/schema")
    assert list(doc["properties"]) == list(schema.COLUMN_NAMES)
    assert doc["properties"]["kind"]["enum"] == list(schema.KINDS)
    assert doc["properties"]["csd"]["maximum"] == 2**64 - 1


def test_docs_describe_every_top_level_key(replay_schema):
    text = (ROOT / "docs" / "json-schema.md").read_text()
    assert f"schema version {replay_schema['properties']['schema_version']['const']}" in text
    for key in replay_schema["properties"]:
        assert f"`{key}`" in text, key
