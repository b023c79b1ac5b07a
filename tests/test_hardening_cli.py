"""The CLI end to end on bad and absurd inputs: exit status 2 with one line on stderr
(or, for absurd but well-formed traces, a normal run), never a traceback, a hang or
unbounded memory.

Most cases call ``pkstrace.cli.main`` in this process (fast; any exception other
than the CLI's own error exit fails the test) under an address-space ceiling.
The ones about hangs and memory run the real ``python -m pkstrace`` under
``prlimit --as`` and a timeout: devices that never end, a FIFO, stdin.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fuzz.targets import FIXTURES, memory_ceiling

from pkstrace import cli, schema, tracefile
from pkstrace.importers import open_trace

PKSTRACE = [sys.executable, "-m", "pkstrace"]
MEMORY_LIMIT = 4 << 30  # bytes of address space for a CLI process (it needs ~1.5 GB)


@pytest.fixture(autouse=True)
def _bounded_memory() -> Any:
    with memory_ceiling(3 << 30):
        yield


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_refused(rc: int, err: str, command: str, needle: str = "") -> None:
    assert rc == 2, (rc, err[-800:])
    assert "Traceback" not in err, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-800:]
    assert lines[0].startswith(f"pkstrace {command}: error: "), lines[0]
    assert needle.lower() in lines[0].lower(), (needle, lines[0])


# ---------------------------------------------------------------------------
# Bad input files, every reading command
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    real = open_trace(FIXTURES / "ftrace_cpuid_2cpu.txt")
    good = d / "good.pkstrace"
    tracefile.write_trace(good, real)
    blob = good.read_bytes()
    files: dict[str, bytes] = {
        "empty": b"",
        "binary": bytes(range(256)) * 64,
        "not_a_trace": b"hello\nworld\n",
        "one_10mb_line": b"x" * (10 << 20),
        "truncated_pkstrace": blob[: len(blob) // 2],
        "pkstrace_tail_only": blob[-2000:],
        "perf_data": b"PERFILE2" + b"\x00" * 200,
        "trace_dat": b"\x17\x08\x44tracing6" + b"\x00" * 200,
        "corrupt_gzip": gzip.compress(b"x" * 10000)[:40],
        "gzip_of_nothing": gzip.compress(b""),
        "latin1_junk": "caf\xe9 \xff\xfe".encode("latin-1") * 100,
    }
    out = {k: d / k for k in files}
    for k, v in files.items():
        out[k].write_bytes(v)
    out["directory"] = d / "a_directory"
    out["directory"].mkdir()
    out["missing"] = d / "does_not_exist"
    # a newer format version, an unknown event kind, Parquet without our metadata
    ev = schema.normalize({"ts": [1, 2], "cpu": [0, 1], "kind": ["msr_write"] * 2})
    table = tracefile._table(ev)
    newer = schema.TraceMeta(format_version=schema.FORMAT_VERSION + 1).to_json()
    pq.write_table(table.replace_schema_metadata(
        {schema.META_KEY: json.dumps(newer).encode()}), d / "newer_version")
    out["newer_version"] = d / "newer_version"
    kinds = pd.Categorical(["msr_write", "rowhammer"])
    raw = pd.DataFrame({c: ev[c] for c in schema.COLUMN_NAMES}).assign(kind=kinds)
    import pyarrow as pa
    t = pa.Table.from_pandas(raw, preserve_index=False).replace_schema_metadata(
        {schema.META_KEY: json.dumps(schema.TraceMeta().to_json()).encode()})
    pq.write_table(t, d / "unknown_kind")
    out["unknown_kind"] = d / "unknown_kind"
    pq.write_table(table.replace_schema_metadata(None), d / "plain_parquet")
    out["plain_parquet"] = d / "plain_parquet"
    out["good"] = good
    return out


# input -> a word the one-line error must contain
BAD_INPUTS = {
    "missing": "no such file",
    "directory": "directory",
    "empty": "empty",
    "binary": "binary",
    "not_a_trace": "not a trace",
    "one_10mb_line": "not a trace",
    "truncated_pkstrace": "corrupt or truncated",
    "pkstrace_tail_only": "",
    "perf_data": "perf script",
    "trace_dat": "trace-cmd report",
    "corrupt_gzip": "compressed",
    "gzip_of_nothing": "empty",
    "latin1_junk": "not a trace",
    "newer_version": "newer",
    "unknown_kind": "unknown event kinds",
    "plain_parquet": "without pkstrace metadata",
}


def _command(cmd: str, src: Path, tmp: Path) -> list[str]:
    return {
        "replay": ["replay", str(src)],
        "import": ["import", str(src), "-o", str(tmp / "out.pkstrace")],
        "report": ["report", str(src), "-o", str(tmp / "out.html")],
        "export": ["export", str(src), "--format", "perfetto", "-o", str(tmp / "out.json")],
    }[cmd]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("cmd", ["replay", "import", "report", "export"])
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(cmd: str, name: str, bad: dict[str, Path],
                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_main(_command(cmd, bad[name], tmp_path), capsys)
    assert_refused(rc, err, cmd, BAD_INPUTS[name])
    assert not any(tmp_path.iterdir()), "a refused input left an output file"


@pytest.mark.parametrize("argv,needle", [
    (["replay", "{good}", "--isolated", "7-3"], "--isolated"),
    (["replay", "{good}", "--isolated", "x"], "--isolated"),
    (["replay", "{good}", "--isolated", "0-99999999"], "--isolated"),
    (["replay", "{good}", "--fail-on", "everything"], "--fail-on"),
    (["replay", "{good}", "--episode-gap-us", "0"], "--episode-gap-us"),
    (["replay", "{good}", "--calibration", "{missing}"], "no such"),
    (["replay", "{good}", "--calibration", "{binary}"], "calibration"),
    (["replay", "{good}", "--calibration", "{good}"], "calibration"),
    (["import", "{good}", "-o", "{missing}/x/y.pkstrace"], "does not exist"),
    (["import", "{not_a_trace}", "-o", "{directory}"], ""),
    (["import", "{good}", "-o", "{good}"], "exists"),
    (["import", str(FIXTURES / "ftrace_cpuid_2cpu.txt"), "-o", "{tmp}/a.pkstrace",
      "--cpus", "0"], "--cpus"),
    (["report", "{good}", "-o", "{directory}"], "directory"),
    (["report", "{good}", "{good}", "{good}", "-o", "{tmp}/r.html"], "two"),
    (["export", "{good}", "--format", "csv", "-o", "{good}"], ""),
])
def test_bad_options_are_one_line_exit_2(argv: list[str], needle: str, bad: dict[str, Path],
                                         tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    names = {k: str(v) for k, v in bad.items()} | {"tmp": str(tmp_path)}
    argv = [a.format(**names) for a in argv]
    rc, _, err = run_main(argv, capsys)
    assert_refused(rc, err, argv[0], needle)


# ---------------------------------------------------------------------------
# Absurd values in well-formed traces: handled (exit 0) or refused in one line
# ---------------------------------------------------------------------------

def _absurd(base: schema.Trace, name: str) -> schema.Trace:
    ev = base.events.copy()
    meta = schema.TraceMeta.from_json(base.meta.to_json())

    def put(col: str, val: Any, rows: Any = slice(0, 5)) -> None:
        a = ev[col].to_numpy().copy()
        a[rows] = val
        ev[col] = a

    queues = np.flatnonzero((ev["kind"] == "csd_queue").to_numpy())[:5]
    if name == "cpu_100000":
        put("cpu", 100_000)
    elif name == "cpu_2pow31_no_host_facts":
        put("cpu", 2**31 - 1)
        meta.host = {}
    elif name == "target_cpu_2pow31":
        put("target_cpu", 2**31 - 1, queues)
    elif name == "negative_timestamps":
        put("ts", -(10**18), slice(0, 100))
    elif name == "decreasing_timestamps":
        ev["ts"] = ev["ts"].to_numpy()[::-1].copy()
    elif name == "int64_max_timestamps":
        put("ts", 2**63 - 1, slice(0, 3))
    elif name == "huge_counts":
        put("value", 2**64 - 1, slice(None))
        meta.lost_events = {0: 2**63 - 1, 1: 2**62}
        meta.unparsed_lines = {"x": 2**63 - 1}
    elif name == "comm_10mb":
        comm = ev["comm"].astype(str).to_numpy().copy()
        comm[:3] = "c" * (10 << 20)
        ev["comm"] = pd.Categorical(comm)
    elif name == "isolated_cpu_1e9":
        meta.host["isolated_cpus"] = [10**9]
    elif name == "reversed_window":
        meta.window = {"start_ns": 10**18, "end_ns": -(10**18)}
    return schema.Trace(schema.normalize(ev), meta)


ABSURD = ["cpu_100000", "cpu_2pow31_no_host_facts", "target_cpu_2pow31", "negative_timestamps",
          "decreasing_timestamps", "int64_max_timestamps", "huge_counts", "comm_10mb",
          "isolated_cpu_1e9", "reversed_window"]


@pytest.fixture(scope="module")
def absurd_traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("absurd")
    base = open_trace(FIXTURES / "ftrace_cpuid_2cpu.txt")
    out = {}
    for name in ABSURD:
        out[name] = d / f"{name}.pkstrace"
        tracefile.write_trace(out[name], _absurd(base, name))
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ABSURD)
def test_absurd_values_are_handled_or_refused(name: str, absurd_traces: dict[str, Path],
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    src = absurd_traces[name]
    rc, out, err = run_main(["replay", str(src), "--json"], capsys)
    if rc == 2:
        assert_refused(rc, err, "replay")
        return
    assert rc == 0 and "Traceback" not in err, err[-1000:]
    doc = json.loads(out)
    assert doc["trace"]["source"]
    if name == "huge_counts":
        assert doc["trace"]["lost_events"] == {"0": 2**63 - 1, "1": 2**62}
    for cmd in ("report", "export"):
        rc, _, err = run_main(_command(cmd, src, tmp_path), capsys)
        assert rc in (0, 2) and "Traceback" not in err, (cmd, rc, err[-1000:])
        if rc == 2:
            assert_refused(rc, err, cmd)
    html = tmp_path / "out.html"
    if html.exists():  # a 10 MB name is not copied into the page over and over
        assert html.stat().st_size < 60 << 20, html.stat().st_size


# ---------------------------------------------------------------------------
# Real processes: endless devices, FIFOs, stdin, decompression bombs
# ---------------------------------------------------------------------------

def run_cli(args: list[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["prlimit", f"--as={MEMORY_LIMIT}", *PKSTRACE, *args],
                          capture_output=True, text=True, timeout=timeout, **kw)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_endless_device_is_refused_quickly(device: str) -> None:
    p = run_cli(["replay", device], timeout=120)
    assert_refused(p.returncode, p.stderr, "replay", "binary")


def test_stdin_import_and_garbage_on_stdin(tmp_path: Path) -> None:
    text = (FIXTURES / "perf_script_cpuid_2cpu.txt").read_bytes()
    p = subprocess.run(["prlimit", f"--as={MEMORY_LIMIT}", *PKSTRACE, "import", "-",
                        "-o", str(tmp_path / "s.pkstrace"), "-q"], input=text,
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert len(tracefile.read_trace(tmp_path / "s.pkstrace")) == 2023
    p = subprocess.run(["prlimit", f"--as={MEMORY_LIMIT}", *PKSTRACE, "import", "-",
                        "-o", str(tmp_path / "g.pkstrace")], input=os.urandom(1 << 16),
                       capture_output=True, timeout=120)
    assert_refused(p.returncode, p.stderr.decode(), "import", "binary")


def test_fifo_with_a_writer_is_read(tmp_path: Path) -> None:
    """`pkstrace replay <(zcat trace.gz)`: a pipe, not a regular file, read to its end."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    text = (FIXTURES / "ftrace_cpuid_2cpu.txt").read_bytes()

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(text)

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    p = run_cli(["replay", str(fifo), "--json"], timeout=120)
    t.join(5)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["counts"]


def test_decompression_bomb_stops_at_the_ceiling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """64 MiB of text in 64 KiB of gzip, with the ceiling set to 16 MiB: refused, and
    the process never held the whole expansion."""
    from pkstrace import importers

    bomb = tmp_path / "bomb.txt.gz"
    bomb.write_bytes(gzip.compress(b"a" * (64 << 20), compresslevel=9))
    assert bomb.stat().st_size < 1 << 20
    monkeypatch.setattr(importers, "max_input_bytes", lambda: 16 << 20)
    rc, _, err = run_main(["replay", str(bomb)], capsys)
    assert_refused(rc, err, "replay", "more than 16 MiB")
