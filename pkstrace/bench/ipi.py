"""What a synchronous cross-CPU call costs on this host: the calibration for projections.

A 16-byte ``pread`` of ``/dev/cpu/N/cpuid`` runs ``smp_call_function_single(N, ...,
wait=1)``: the mechanism behind ``wrmsrl_on_cpu()``. We time it from each CPU to
each other CPU (target idle, and target busy with a spinning process), and on the
caller's own CPU (no interrupt: the local baseline).

Then the review's pattern: a global update that walks CPUs one after another
(``serial``: one pread per target, as ``update_global_pkrs()`` calls
``wrmsrl_on_cpu()`` per CPU) against one broadcast that interrupts them all at
once (``broadcast``: ``membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)``, which IPIs
every CPU running a thread of this process and waits for all of them), for 1 to
ncpu-1 target CPUs. Both run with the targets busy (the broadcast reaches only
CPUs running our threads); ``serial_idle`` adds the walk over idle targets.

The result is a ``pkstrace-calibration`` JSON document (see :func:`validate`),
which ``pkstrace replay --calibration FILE`` uses for its stall projection.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pkstrace.bench.common import (
    SpinningThreads,
    git_revision,
    host_facts,
    percentiles,
    pinned,
    spinning_process,
)
from pkstrace.errors import InputError, KernelFeatureError, PrivilegeError

CALIBRATION_KIND = "pkstrace-calibration"
CALIBRATION_VERSION = 1
STATES = ("idle", "busy")

SYS_MEMBARRIER = 324  # x86-64
MEMBARRIER_CMD_QUERY = 0
MEMBARRIER_CMD_PRIVATE_EXPEDITED = 1 << 3
MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED = 1 << 4

Progress = Callable[[str], None]


def _cpuid_fd(cpu: int) -> int:
    path = f"/dev/cpu/{cpu}/cpuid"
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KernelFeatureError(
            f"{path} is missing: CPU {cpu} is offline or the kernel lacks CONFIG_X86_CPUID "
            "(try: modprobe cpuid)") from None
    except PermissionError:
        raise PrivilegeError(f"cannot open {path}: needs root") from None


def _time_preads(fd: int, n: int) -> np.ndarray:
    """n round trips of one synchronous cross-CPU call (or local call), ns each."""
    out = np.empty(n, dtype=np.int64)
    clock, pread = time.perf_counter_ns, os.pread
    for i in range(n):
        t0 = clock()
        pread(fd, 16, 0)
        out[i] = clock() - t0
    return out


def _time_serial_walk(fds: list[int], n: int) -> np.ndarray:
    """n walks calling each target in turn (as update_global_pkrs() does), ns per walk."""
    out = np.empty(n, dtype=np.int64)
    clock, pread = time.perf_counter_ns, os.pread
    for i in range(n):
        t0 = clock()
        for fd in fds:
            pread(fd, 16, 0)
        out[i] = clock() - t0
    return out


class _Membarrier:
    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        supported = self._syscall(MEMBARRIER_CMD_QUERY)
        if supported < 0 or not supported & MEMBARRIER_CMD_PRIVATE_EXPEDITED:
            raise KernelFeatureError("membarrier(PRIVATE_EXPEDITED) is not supported")
        if self._syscall(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) != 0:
            raise KernelFeatureError(
                f"membarrier register failed: {os.strerror(ctypes.get_errno())}")

    def _syscall(self, cmd: int) -> int:
        return int(self._libc.syscall(SYS_MEMBARRIER, cmd, 0, 0))

    def time_calls(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        clock, syscall = time.perf_counter_ns, self._libc.syscall
        for i in range(n):
            t0 = clock()
            syscall(SYS_MEMBARRIER, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0)
            out[i] = clock() - t0
        return out


def _check_cpus(cpus: list[int] | None) -> list[int]:
    allowed = sorted(os.sched_getaffinity(0))
    if cpus is None:
        cpus = allowed
    cpus = sorted(set(cpus))
    missing = [c for c in cpus if c not in allowed]
    if missing:
        raise InputError(f"CPU(s) {missing} are not online or not allowed for this process "
                         f"(allowed: {allowed})")
    if len(cpus) < 2:
        raise InputError("need at least two CPUs to measure cross-CPU calls")
    return cpus


def run(cpus: list[int] | None = None, iterations: int = 2000, warmup: int = 50,
        progress: Progress | None = None) -> dict[str, Any]:
    """Measure everything and return the calibration document."""
    if iterations < 1:
        raise InputError("--iterations must be at least 1")
    cpus = _check_cpus(cpus)
    say = progress or (lambda _msg: None)
    fds = {c: _cpuid_fd(c) for c in cpus}
    notes: list[str] = []
    try:
        remote: dict[str, list[np.ndarray]] = {s: [] for s in STATES}
        local: list[np.ndarray] = []
        per_pair: list[dict[str, Any]] = []

        def add_pair(src: int, tgt: int, state: str, s: np.ndarray) -> None:
            per_pair.append({"source_cpu": src, "target_cpu": tgt, "state": state,
                             **percentiles(s), "n": len(s)})

        for src in cpus:
            with pinned(src):
                say(f"local call on CPU {src}")
                _time_preads(fds[src], warmup)
                s = _time_preads(fds[src], iterations)
                local.append(s)
                add_pair(src, src, "local", s)
                for tgt in cpus:
                    if tgt == src:
                        continue
                    say(f"CPU {src} -> CPU {tgt}, target idle")
                    _time_preads(fds[tgt], warmup)
                    s = _time_preads(fds[tgt], iterations)
                    remote["idle"].append(s)
                    add_pair(src, tgt, "idle", s)
                    say(f"CPU {src} -> CPU {tgt}, target busy")
                    with spinning_process(tgt):
                        _time_preads(fds[tgt], warmup)
                        s = _time_preads(fds[tgt], iterations)
                    remote["busy"].append(s)
                    add_pair(src, tgt, "busy", s)

        caller, others = cpus[0], cpus[1:]
        serial, serial_idle, broadcast = [], [], []
        try:
            barrier: _Membarrier | None = _Membarrier()
        except KernelFeatureError as e:
            barrier = None
            notes.append(f"no broadcast measured: {e}")
        with pinned(caller):
            for k in range(1, len(others) + 1):
                targets = others[:k]
                say(f"serial walk over {k} idle CPU(s)")
                _time_serial_walk([fds[t] for t in targets], warmup)
                serial_idle.append({"cpus": k, "state": "idle", "stall_ns": _time_serial_walk(
                    [fds[t] for t in targets], iterations).tolist()})
                say(f"serial walk vs broadcast over {k} busy CPU(s)")
                with SpinningThreads(targets):
                    _time_serial_walk([fds[t] for t in targets], warmup)
                    serial.append({"cpus": k, "state": "busy", "stall_ns": _time_serial_walk(
                        [fds[t] for t in targets], iterations).tolist()})
                    if barrier is not None:
                        barrier.time_calls(warmup)
                        broadcast.append({"cpus": k, "state": "busy",
                                          "stall_ns": barrier.time_calls(iterations).tolist()})
        if len(cpus) == 2:
            notes.append("2 CPUs: serial and broadcast are measured for 1 target CPU only "
                         "(1..ncpu-1 targets)")
        facts = host_facts()
        if facts.get("virtualised"):
            notes.append("virtualised host: every IPI costs VM exits; bare metal is "
                         "1-2 orders of magnitude faster")
    finally:
        for fd in fds.values():
            os.close(fd)

    return {
        "kind": CALIBRATION_KIND,
        "version": CALIBRATION_VERSION,
        "host": facts,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_rev": git_revision(),
        "cpus": cpus,
        "iterations": iterations,
        "mechanism": {
            "remote": "16-byte pread of /dev/cpu/N/cpuid (smp_call_function_single, wait=1)",
            "serial": "one pread per target CPU in turn, caller on CPU "
                      f"{caller}; targets busy (serial) or idle (serial_idle)",
            "broadcast": "membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) with a thread of "
                         "this process spinning on each target CPU",
        },
        "remote_ns": {s: np.concatenate(remote[s]).tolist() for s in STATES},
        "local_ns": np.concatenate(local).tolist(),
        "per_pair": per_pair,
        "serial": serial,
        "serial_idle": serial_idle,
        "broadcast": broadcast,
        "notes": notes,
    }


# ---------------------------------------------------------------------------
# Reading and checking calibration files
# ---------------------------------------------------------------------------

def _samples_ok(v: Any) -> bool:
    return (isinstance(v, list) and len(v) > 0
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                    for x in v))


def validate(doc: Any) -> list[str]:
    """Problems with a calibration document (empty list = usable)."""
    if not isinstance(doc, dict):
        return ["not a JSON object"]
    problems = []
    if doc.get("kind") != CALIBRATION_KIND:
        problems.append(f"kind is {doc.get('kind')!r}, expected {CALIBRATION_KIND!r}")
    if doc.get("version") != CALIBRATION_VERSION:
        problems.append(f"version is {doc.get('version')!r}, expected {CALIBRATION_VERSION}")
    if not isinstance(doc.get("host"), dict):
        problems.append("host is not an object")
    try:
        dt.datetime.fromisoformat(str(doc.get("created")))
    except ValueError:
        problems.append("created is not an ISO 8601 time")
    remote = doc.get("remote_ns")
    if not isinstance(remote, dict) or not all(_samples_ok(remote.get(s)) for s in STATES):
        problems.append("remote_ns needs non-empty positive sample lists 'idle' and 'busy'")
    if not _samples_ok(doc.get("local_ns")):
        problems.append("local_ns is not a non-empty list of positive samples")
    pairs = doc.get("per_pair")
    keys = {"source_cpu", "target_cpu", "state", "p50_ns", "p90_ns", "p99_ns", "n"}
    if not isinstance(pairs, list) or not pairs or not all(
            isinstance(p, dict) and keys <= set(p) for p in pairs):
        problems.append(f"per_pair must be a non-empty list of objects with {sorted(keys)}")
    for name in ("serial", "broadcast"):
        rows = doc.get(name)
        if not isinstance(rows, list) or not all(
                isinstance(r, dict) and isinstance(r.get("cpus"), int) and r["cpus"] > 0
                and _samples_ok(r.get("stall_ns")) for r in rows):
            problems.append(f"{name} must be a list of {{cpus > 0, stall_ns: [samples]}}")
    if isinstance(doc.get("serial"), list) and not doc["serial"]:
        problems.append("serial is empty")
    return problems


def load(path: str | Path) -> dict[str, Any]:
    """Read a calibration file; InputError (one line) if it is not one."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    problems = validate(doc)
    if problems:
        raise InputError(f"{path}: not a pkstrace calibration file: {problems[0]}")
    return doc


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

def _us(ns: float) -> str:
    return f"{ns / 1000:8.1f}"


def format_table(doc: dict[str, Any]) -> str:
    """The terminal summary: per pair and state, then serial vs broadcast (us)."""
    lines = [f"synchronous cross-CPU call round trip ({doc['host'].get('kernel', '?')}, "
             f"{doc['iterations']} calls each), us",
             f"{'source':>6} {'target':>6} {'state':<6} {'p50':>8} {'p90':>8} {'p99':>8}"]
    for p in doc["per_pair"]:
        lines.append(f"{p['source_cpu']:>6} {p['target_cpu']:>6} {p['state']:<6} "
                     f"{_us(p['p50_ns'])} {_us(p['p90_ns'])} {_us(p['p99_ns'])}")
    lines.append("")
    lines.append("global update stall: serial walk vs one broadcast, us")
    lines.append(f"{'cpus':>4} {'design':<22} {'p50':>8} {'p90':>8} {'p99':>8}")
    rows = ([("serial (targets idle)", r) for r in doc.get("serial_idle", [])]
            + [("serial (targets busy)", r) for r in doc["serial"]]
            + [("broadcast (busy)", r) for r in doc["broadcast"]])
    for label, r in sorted(rows, key=lambda x: x[1]["cpus"]):
        q = percentiles(np.asarray(r["stall_ns"]))
        lines.append(f"{r['cpus']:>4} {label:<22} {_us(q['p50_ns'])} {_us(q['p90_ns'])} "
                     f"{_us(q['p99_ns'])}")
    for n in doc.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _pair_samples(doc: dict[str, Any]) -> list[tuple[dict[str, Any], np.ndarray]]:
    """Each per_pair row with its samples: the pools hold them in per_pair order."""
    pools = {"local": np.asarray(doc["local_ns"]),
             **{s: np.asarray(doc["remote_ns"][s]) for s in STATES}}
    offset = dict.fromkeys(pools, 0)
    out = []
    for p in doc["per_pair"]:
        state, n = p["state"], int(p["n"])
        out.append((p, pools[state][offset[state]:offset[state] + n]))
        offset[state] += n
    return out


def render_html(doc: dict[str, Any]) -> str:
    """A small self-contained plotly page (plotly.js inlined: works offline)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], subplot_titles=(
        "one synchronous cross-CPU call (round trip)",
        "global update stall: serial walk vs broadcast"))
    for p, samples in _pair_samples(doc):
        fig.add_trace(go.Box(y=samples / 1000, boxpoints=False,
                             name=f"{p['source_cpu']}->{p['target_cpu']} {p['state']}"),
                      row=1, col=1)
    for label, key in (("serial, targets idle", "serial_idle"),
                       ("serial, targets busy", "serial"), ("broadcast", "broadcast")):
        rows = doc.get(key) or []
        if not rows:
            continue
        x = [r["cpus"] for r in rows]
        q = [np.percentile(r["stall_ns"], [10, 50, 90]) / 1000 for r in rows]
        fig.add_trace(go.Scatter(
            x=x, y=[v[1] for v in q], name=label, mode="lines+markers",
            error_y={"type": "data", "symmetric": False,
                     "array": [v[2] - v[1] for v in q], "arrayminus": [v[1] - v[0] for v in q]}),
            row=1, col=2)
    fig.update_yaxes(title_text="us (log)", type="log", row=1, col=1)
    fig.update_yaxes(title_text="stall us (p50, bars p10-p90)", row=1, col=2)
    fig.update_xaxes(title_text="target CPUs", dtick=1, row=1, col=2)
    host = doc["host"]
    fig.update_layout(
        title=f"pkstrace bench ipi: {host.get('hostname', '')} {host.get('kernel', '')}, "
              f"{host.get('cpu_model', '')} ({doc['created']}, rev {doc.get('git_rev', '')})",
        height=520, showlegend=True)
    notes = "".join(f"<li>{_escape(n)}</li>" for n in doc.get("notes", []))
    page = fig.to_html(include_plotlyjs=True, full_html=True)
    return page.replace("</body>", f"<ul>{notes}</ul></body>", 1) if notes else page


def _escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))
