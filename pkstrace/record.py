"""The recorder loop: backend -> TraceWriter, live status line, signals, cleanup.

Whatever ends the recording (duration, Ctrl-C, SIGTERM, the command exiting, an
exception), the backend is detached and the trace file is closed with what was
recorded; an error marks the trace ``partial`` with a note saying why.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from pkstrace import schema, tracefile
from pkstrace.backends.base import Backend, ProbeResult
from pkstrace.errors import KernelFeatureError, PkstraceError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class RecordResult:
    path: Path
    rows: int
    stop_reason: str
    exit_status: int  # the command's exit status (0 without a command)
    counts: dict[str, int] = field(default_factory=dict)  # rows by kind
    lost: dict[int, int] = field(default_factory=dict)
    probes: list[ProbeResult] = field(default_factory=list)
    elapsed_s: float = 0.0
    partial: bool = False


class StatusLine:
    """'\\r[  3.2s] csd_queue 1.2k/s  msr_write 310/s  lost 0' on stderr, ~4 times a second."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self._last_t = time.monotonic()
        self._last_counts: dict[str, int] = {}
        self._width = 0

    def update(self, elapsed: float, counts: dict[str, int], lost: int,
               force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        dt = now - self._last_t
        if dt < 0.25 and not force:
            return
        rates = []
        for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            r = (n - self._last_counts.get(kind, 0)) / dt if dt > 0 else 0.0
            if n:
                rates.append(f"{kind} {_si(r)}/s")
        self._last_t, self._last_counts = now, dict(counts)
        total = sum(counts.values())
        text = f"[{elapsed:6.1f}s] {total} events  " + "  ".join(rates[:6]) + f"  lost {lost}"
        pad = max(0, self._width - len(text))
        self._width = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()


def _si(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.1f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


class _Stopper:
    """Turns SIGINT/SIGTERM/SIGHUP into a stop request; restores the old handlers."""

    def __init__(self) -> None:
        self.reason = ""
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Stopper:
        for s in STOP_SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except (ValueError, OSError):  # not the main thread
                pass
        # A Ctrl-C that arrived while modules were still importing can surface as an
        # ImportError that a feature check swallowed; the CLI remembers it. Honour it
        # here, or the recording would run until the next signal.
        from pkstrace import cli

        if cli.sigint_seen():
            self.reason = signal.SIGINT.name
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.reason:
            self.reason = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            try:
                signal.signal(s, h)
            except (ValueError, OSError):
                pass


def _start_command(command: Sequence[str]) -> subprocess.Popen[bytes]:
    try:
        # The command keeps our terminal's process group, so Ctrl-C reaches it
        # too, as with `perf record -- cmd`.
        return subprocess.Popen(list(command))
    except OSError as e:
        raise PkstraceError(f"cannot run {shlex.join(command)}: {e.strerror or e}") from None


def _stop_command(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _exit_status(rc: int | None) -> int:
    if rc is None:
        return 0
    return 128 - rc if rc < 0 else rc  # killed by signal N -> 128+N, as a shell says


def record(backend: Backend, out: str | os.PathLike[str], meta: schema.TraceMeta, *,
           duration: float = 0.0, command: Sequence[str] = (), force: bool = False,
           status: bool | None = None, status_stream: TextIO | None = None,
           on_attached: Callable[[list[ProbeResult]], None] | None = None) -> RecordResult:
    """Record from ``backend`` into ``out`` until duration/signal/command exit.

    ``meta`` carries host facts, probes known absent, command line; the recorder
    adds window, lost events, probe results, aggregates and symbols.
    """
    stream = status_stream or sys.stderr
    if status is None:
        status = stream.isatty()
    line = StatusLine(stream, bool(status))
    counts: dict[str, int] = {}
    lost: dict[int, int] = {}
    results: list[ProbeResult] = []
    proc: subprocess.Popen[bytes] | None = None
    rc: int | None = None
    error: BaseException | None = None
    stop_reason = ""
    t0 = time.monotonic()
    start_ns = end_ns = 0
    ts_min, ts_max = None, None
    recording = False  # probes attached: from here on a trace file is kept

    def take(batch: pd.DataFrame) -> None:
        nonlocal ts_min, ts_max
        if batch is None or len(batch) == 0:
            return
        writer.write(batch)
        vc = batch["kind"].value_counts(sort=False)
        for k, n in zip(vc.index.astype(str), vc.to_numpy(), strict=True):
            if n:
                counts[k] = counts.get(k, 0) + int(n)
        ts = batch["ts"].to_numpy()
        ts = ts[ts >= 0]
        if len(ts):
            lo, hi = int(ts.min()), int(ts.max())
            ts_min = lo if ts_min is None else min(ts_min, lo)
            ts_max = hi if ts_max is None else max(ts_max, hi)

    with _Stopper() as stopper:
        # Created once a stop signal can no longer end the process by its default
        # action: a signal before this point leaves no temporary file behind.
        writer = tracefile.TraceWriter(out, force=force)
        try:
            try:
                results = backend.attach()
            finally:
                start_ns = time.monotonic_ns()
                t0 = time.monotonic()
            failed_required = [r for r in results if r.required and not r.attached]
            if failed_required:
                r = failed_required[0]
                raise KernelFeatureError(f"required probe {r.name} did not attach: {r.reason}")
            recording = True
            if on_attached:
                on_attached(results)
            if command and not stopper.reason:
                proc = _start_command(command)
            while True:
                if stopper.reason:
                    stop_reason = stopper.reason
                    break
                if proc is not None and proc.poll() is not None:
                    rc = proc.returncode
                    stop_reason = "command exited"
                    break
                elapsed = time.monotonic() - t0
                if duration and elapsed >= duration:
                    stop_reason = "duration"
                    break
                timeout = 0.2 if not duration else max(0.0, min(0.2, duration - elapsed))
                take(backend.read(timeout))
                line.update(time.monotonic() - t0, counts, sum(lost.values()))
                if line.enabled:
                    lost = backend.lost_events()
            backend.stop()
            take(backend.drain())
        except BaseException as e:  # noqa: BLE001 - recorded in the trace, then re-raised
            error = e
            stop_reason = stop_reason or f"error: {_one_line(e)}"
        finally:
            end_ns = time.monotonic_ns()
            if proc is not None:
                rc = _stop_command(proc) if rc is None else rc
            try:
                lost = backend.lost_events() or lost
            except Exception:  # noqa: BLE001 - lost counts are best effort at this point
                pass
            try:
                meta.aggregates = backend.aggregates() or meta.aggregates
                meta.symbols.update(backend.symbols())
            except Exception as e:  # noqa: BLE001
                meta.notes.append(f"aggregates unavailable: {_one_line(e)}")
            problems = backend.detach()
            line.update(time.monotonic() - t0, counts, sum(lost.values()), force=True)
            line.finish()
    elapsed = time.monotonic() - t0

    meta.backend = backend.name
    meta.mode = backend.mode
    meta.clock = backend.clock
    meta.source = "live"
    meta.lost_events = {int(k): int(v) for k, v in lost.items()}
    meta.probes = [*meta.probes, *(r.to_json() for r in results)]
    meta.unmodeled_events = dict(backend.unmodeled)
    meta.unparsed_lines = dict(backend.unparsed)
    meta.notes.extend(backend.notes())
    extra = backend.extra()
    if extra:
        meta.extra[backend.name] = extra
    if backend.clock in ("mono", "monotonic"):
        meta.window = {"start_ns": int(start_ns), "end_ns": int(end_ns)}
    elif ts_min is not None and ts_max is not None:
        # The perf clock is not CLOCK_MONOTONIC: bound the window by the events.
        meta.window = {"start_ns": int(ts_min), "end_ns": int(ts_max)}
    meta.extra.setdefault("record", {}).update(
        {"stop_reason": stop_reason, "elapsed_s": round(elapsed, 3),
         "command_exit_status": rc, "cleanup_problems": problems})
    if problems:
        meta.notes.append("cleanup problems: " + "; ".join(problems))
    if error is not None:
        meta.partial = True
        meta.notes.append(f"recording ended by an error: {_one_line(error)}")
    if error is not None and not recording:
        # Nothing was recorded (attach failed): no file, just the error.
        writer.abort()
        if isinstance(error, (PkstraceError, KeyboardInterrupt)):
            raise error
        raise PkstraceError(f"cannot start recording: {_one_line(error)}") from error
    try:
        # A signal while the footer is written would leave no trace at all: the
        # stop handlers stay in place (a stop request now changes nothing).
        with _Stopper():
            path = writer.close(meta)
    except PkstraceError:
        writer.abort()
        raise
    if error is not None:
        if isinstance(error, KeyboardInterrupt):
            stop_reason = "SIGINT"
        elif isinstance(error, PkstraceError):
            raise type(error)(f"{error} (partial trace of {writer.rows} events kept in {path})") \
                from None
        else:
            raise PkstraceError(f"recording failed: {_one_line(error)} "
                                f"(partial trace of {writer.rows} events kept in {path})") \
                from error
    return RecordResult(path=path, rows=writer.rows, stop_reason=stop_reason,
                        exit_status=_exit_status(rc), counts=counts, lost=meta.lost_events,
                        probes=results, elapsed_s=elapsed, partial=meta.partial)


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__


def counts_table(trace: schema.Trace) -> str:
    """Fallback summary when the analysis package is unavailable: rows per kind and CPU."""
    ev = trace.events
    if len(ev) == 0:
        return "no events recorded"
    t = ev.groupby(["kind", "cpu"], observed=True).size().unstack(fill_value=0)
    return t.to_string()



def render_aggregates(agg: dict[str, Any]) -> str:
    """Counts-mode summary (bcc --mode counts): counts per CPU, calls, log2 latency
    histograms in the style of bcc's funclatency."""
    if not agg:
        return "no aggregates recorded"
    out = []
    per_cpu = pd.DataFrame(agg.get("per_cpu") or [], columns=["cpu", "kind", "msr", "count"])
    if len(per_cpu):
        label = per_cpu["kind"].astype(str)
        has_msr = per_cpu["msr"].notna()
        label[has_msr] = label[has_msr] + " " + per_cpu.loc[has_msr, "msr"].map(
            lambda m: schema.msr_name(int(m)))
        t = per_cpu.assign(event=label).pivot_table(index="event", columns="cpu",
                                                    values="count", aggfunc="sum",
                                                    fill_value=0)
        t.columns = [f"cpu{c}" for c in t.columns]
        t["total"] = t.sum(axis=1)
        out += ["Events per CPU (counted in the kernel)", t.to_string(), ""]
    calls = pd.DataFrame(agg.get("calls") or [],
                         columns=["source_cpu", "target_cpu", "func", "count"])
    if len(calls):
        out += ["Cross-CPU calls queued (source -> target, function)",
                calls.sort_values("count", ascending=False).head(20).to_string(index=False), ""]
    hist = pd.DataFrame(agg.get("latency_log2") or [],
                        columns=["target_cpu", "func", "slot", "low_ns", "high_ns", "count"])
    for (cpu, func), h in hist.groupby(["target_cpu", "func"], sort=True):
        total = int(h["count"].sum())
        if total < 10 and len(hist) > 10:
            continue
        out.append(f"queue -> entry latency, target CPU {cpu}, {func} ({total} calls)")
        out.append(f"{'ns':>26} : {'count':<8} distribution")
        peak = int(h["count"].max()) or 1
        for r in h.sort_values("slot").itertuples():
            bar = "*" * int(round(40 * r.count / peak))
            out.append(f"{r.low_ns:>12} -> {r.high_ns - 1:<10} : {r.count:<8} |{bar:<40}|")
        out.append("")
    out.append(f"entries without a seen queue: {agg.get('unmatched_entries', 0)}; "
               f"queued but not entered at the end: {agg.get('inflight_at_end', 0)}")
    return "\n".join(out)
