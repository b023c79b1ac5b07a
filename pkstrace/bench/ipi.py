"""What a synchronous cross-CPU call costs on this host: the calibration for projections.

``remote_ns``: a 16-byte ``pread`` of ``/dev/cpu/N/cpuid`` runs ``cpuid_smp_cpuid``
on CPU N. We time it from each CPU to each other CPU, with the target idle and
with it busy (a spinning process), and on the caller's own CPU (``local_ns``: no
interrupt). Note how the cpuid driver waits (arch/x86/kernel/cpuid.c, since
Linux 4.18): ``smp_call_function_single_async()`` then ``wait_for_completion()``,
so the caller *sleeps* and the target wakes it with a second IPI
(``ttwu_queue_wakelist`` -> ``sched_ttwu_pending``); ``caller_slept_fraction``
records it per measurement. That round trip is therefore an upper bound on
``wrmsrl_on_cpu()``, whose caller spins (``smp_call_function_single(..., 1)``).

``remote_spin_ns``: the spinning kind, measured directly where the target is
busy: ``membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`` with one thread of ours
running on the target IPIs exactly that CPU through ``smp_call_function_many(...,
wait=1)`` and spins until it has run (per_pair state ``busy_spin``). membarrier
skips CPUs not running our threads, so there is no spinning-caller figure for an
idle target.

Then the review's pattern: a global update that walks CPUs one after another
(``serial``: one pread per target, as ``update_global_pkrs()`` calls
``wrmsrl_on_cpu()`` per CPU) against one broadcast that interrupts them all at
once (``broadcast``: one membarrier to every target running our thread), for 1
to ncpu-1 target CPUs. Both with the targets busy (the broadcast reaches only
CPUs running our threads); ``serial_idle`` adds the walk over idle targets.

Samples during which the caller was preempted (involuntary context switch), or
a membarrier target thread was switched out (the CPU might not have been
interrupted), are dropped and retaken (``preempted_samples_dropped``).

The result is a ``pkstrace-calibration`` JSON document (see :func:`validate`),
which ``pkstrace replay --calibration FILE`` uses for its stall projection.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import functools
import json
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class _Samples:
    ns: np.ndarray  # round trip of each kept call
    preempted: int  # samples dropped: the caller was preempted during them
    slept: int  # kept samples during which the caller slept (voluntary switch)


def _timed(call: Callable[[], object], n: int, max_tries: int = 5,
           spinners: SpinningThreads | None = None, wait_s: float = 20.0) -> _Samples:
    """n round trips of ``call`` in ns.

    A sample during which the caller was preempted (involuntary context switch:
    another task took its CPU) measures the scheduler, not the call; it is
    dropped and retaken, up to ``max_tries * n`` attempts. Voluntary switches
    are kept and counted: the cpuid driver's caller sleeps until the target
    wakes it (see the module docstring), which is part of that mechanism.
    ``spinners`` (membarrier only): the target threads. A sample is dropped as
    well unless each was on its CPU just before and just after the call and
    none was switched in meanwhile: otherwise membarrier may have skipped a
    CPU and measured nothing. While a spinner is off its CPU we wait (at most
    ``wait_s`` in all) instead of calling.
    """
    out = np.empty(n, dtype=np.int64)
    clock, usage, thread = time.perf_counter_ns, resource.getrusage, resource.RUSAGE_THREAD
    kept = preempted = slept = 0
    deadline = time.monotonic() + wait_s
    while kept < n and kept + preempted < max_tries * n:
        if spinners is not None:
            if not spinners.all_running():
                # A target thread is off its CPU (another task runs there): wait
                # for the scheduler to put it back rather than measure nothing.
                if time.monotonic() > deadline:
                    break
                time.sleep(0.0002)
                continue
            ins0 = spinners.schedule_ins()
        r0 = usage(thread)
        t0 = clock()
        call()
        t1 = clock()
        r1 = usage(thread)
        if r1.ru_nivcsw != r0.ru_nivcsw or (spinners is not None and not (
                spinners.all_running() and spinners.schedule_ins() == ins0)):
            preempted += 1
            continue
        slept += r1.ru_nvcsw != r0.ru_nvcsw
        out[kept] = t1 - t0
        kept += 1
    return _Samples(out[:kept], preempted, slept)


def _pread_once(fd: int) -> Callable[[], object]:
    """One synchronous call to the CPU behind ``fd`` (or a local call on its own CPU)."""
    return functools.partial(os.pread, fd, 16, 0)


def _serial_walk(fds: list[int]) -> Callable[[], object]:
    """Call each target in turn, as update_global_pkrs() calls wrmsrl_on_cpu() per CPU."""
    pread = os.pread

    def walk() -> None:
        for fd in fds:
            pread(fd, 16, 0)
    return walk


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

    def call(self) -> Callable[[], object]:
        """One broadcast: IPI every CPU running a thread of this process, wait for all."""
        return functools.partial(self._libc.syscall, SYS_MEMBARRIER,
                                 MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0)


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
    load_before = os.getloadavg()[0]
    notes: list[str] = []
    dropped: dict[str, int] = {}  # label -> samples dropped because we were preempted
    slept: dict[str, float] = {}  # label -> share of calls during which the caller slept
    remote_spin: list[np.ndarray] = []
    spinner_policy: set[str] = set()
    try:
        remote: dict[str, list[np.ndarray]] = {s: [] for s in STATES}
        local: list[np.ndarray] = []
        per_pair: list[dict[str, Any]] = []

        def add_pair(src: int, tgt: int, state: str, s: np.ndarray) -> None:
            per_pair.append({"source_cpu": src, "target_cpu": tgt, "state": state,
                             **percentiles(s), "n": len(s)})

        def measure(label: str, call: Callable[[], object],
                    spinners: SpinningThreads | None = None) -> np.ndarray:
            _timed(call, warmup)
            got = _timed(call, iterations, max_tries=20 if spinners else 5,
                         spinners=spinners)
            if spinners is not None:
                spinner_policy.add(spinners.policy)
            if got.preempted:
                dropped[label] = got.preempted
            if len(got.ns) == 0:
                raise KernelFeatureError(f"{label}: every sample was preempted; "
                                         "the host is too busy to measure")
            slept[label] = round(got.slept / len(got.ns), 3)
            return got.ns

        try:
            barrier: _Membarrier | None = _Membarrier()
        except KernelFeatureError as e:
            barrier = None
            notes.append(f"no spinning-caller or broadcast measurement: {e}")

        for src in cpus:
            with pinned(src):
                say(f"local call on CPU {src}")
                s = measure(f"{src}->{src} local", _pread_once(fds[src]))
                local.append(s)
                add_pair(src, src, "local", s)
                for tgt in cpus:
                    if tgt == src:
                        continue
                    say(f"CPU {src} -> CPU {tgt}, target idle")
                    s = measure(f"{src}->{tgt} idle", _pread_once(fds[tgt]))
                    remote["idle"].append(s)
                    add_pair(src, tgt, "idle", s)
                    say(f"CPU {src} -> CPU {tgt}, target busy")
                    with spinning_process(tgt):
                        s = measure(f"{src}->{tgt} busy", _pread_once(fds[tgt]))
                    remote["busy"].append(s)
                    add_pair(src, tgt, "busy", s)
                    if barrier is not None:
                        # The same call with the caller spinning, as wrmsrl_on_cpu()
                        # does: membarrier IPIs the one CPU running our thread.
                        say(f"CPU {src} -> CPU {tgt}, target busy, caller spinning")
                        with SpinningThreads([tgt]) as spinner:
                            s = measure(f"{src}->{tgt} busy_spin", barrier.call(),
                                        spinner)
                        remote_spin.append(s)
                        add_pair(src, tgt, "busy_spin", s)

        caller, others = cpus[0], cpus[1:]
        serial, serial_idle, broadcast = [], [], []
        with pinned(caller):
            for k in range(1, len(others) + 1):
                walk = _serial_walk([fds[t] for t in others[:k]])
                say(f"serial walk over {k} idle CPU(s)")
                serial_idle.append({"cpus": k, "state": "idle", "stall_ns": measure(
                    f"serial {k} idle", walk).tolist()})
                say(f"serial walk vs broadcast over {k} busy CPU(s)")
                with SpinningThreads(others[:k]) as spinners:
                    serial.append({"cpus": k, "state": "busy", "stall_ns": measure(
                        f"serial {k} busy", walk).tolist()})
                    if barrier is not None:
                        broadcast.append({"cpus": k, "state": "busy", "stall_ns": measure(
                            f"broadcast {k}", barrier.call(), spinners).tolist()})
        if len(cpus) == 2:
            notes.append("2 CPUs: serial and broadcast are measured for 1 target CPU only "
                         "(1..ncpu-1 targets)")
        if dropped:
            notes.append(f"{sum(dropped.values())} samples dropped and retaken: the caller "
                         "was preempted, or a membarrier target thread was switched out "
                         "(busy host)")
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
        # Other work on the host (1-min load average before and after): the
        # tails of these distributions are only as good as the host is quiet.
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "mechanism": {
            "remote": "16-byte pread of /dev/cpu/N/cpuid: smp_call_function_single_async + "
                      "wait_for_completion (caller sleeps; the target wakes it)",
            "remote_spin": "membarrier(PRIVATE_EXPEDITED) to one busy target: "
                           "smp_call_function_many(wait=1), caller spins",
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
        "remote_spin_ns": {"busy": np.concatenate(remote_spin).tolist() if remote_spin
                           else []},
        "caller_slept_fraction": slept,
        "spinner_policy": sorted(spinner_policy),
        "preempted_samples_dropped": dropped,
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
    load = doc.get("loadavg_1min") or ["?", "?"]
    lines = [f"synchronous cross-CPU call round trip ({doc['host'].get('kernel', '?')}, "
             f"{doc['iterations']} calls each, load average {load[0]} -> {load[-1]}), us",
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
             **{s: np.asarray(doc["remote_ns"][s]) for s in STATES},
             "busy_spin": np.asarray((doc.get("remote_spin_ns") or {}).get("busy", []))}
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
