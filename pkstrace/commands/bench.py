"""`pkstrace bench`: what cross-CPU calls cost on this host, and what tracing them costs."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator

HELP = "measure cross-CPU call cost (ipi) and the tracer's own overhead (overhead)"
DESCRIPTION = """\
Benchmarks on the live host (root).

  ipi       round trip of a synchronous cross-CPU call (16-byte pread of
            /dev/cpu/N/cpuid runs cpuid_smp_cpuid on CPU N) from each CPU to
            each other CPU, target idle and busy, the local baseline, the same
            with a spinning caller (membarrier to one busy CPU), and a serial
            walk over N CPUs against one membarrier broadcast. -o writes the
            calibration file `pkstrace replay --calibration` reads.
  overhead  the tracer's cost per event for each pkstrace backend and mode,
            beside bpftrace count() and perf record on the same tracepoints:
            kernel BPF accounting (run_time_ns / run_cnt) and workload slowdown.
"""
EXAMPLES = """\
examples:
  sudo pkstrace bench ipi                          # all CPUs, 2000 calls per measurement
  sudo pkstrace bench ipi --cpus 0-3 -o calib.json --html ipi.html
  pkstrace replay trace.pkstrace --calibration calib.json
  sudo pkstrace bench overhead                     # every tracer, 5 runs each
  sudo pkstrace bench overhead --tracers untraced,bpftrace,perf --runs 3 -o overhead.json
"""


def _cpulist(text: str) -> list[int]:
    from pkstrace.schema import parse_cpulist

    try:
        cpus = parse_cpulist(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not cpus:
        raise argparse.ArgumentTypeError("empty CPU list")
    return cpus


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {n}")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH")
    sub.required = True
    ipi = sub.add_parser(
        "ipi", help="cost of a synchronous cross-CPU call; serial walk vs broadcast",
        description="Round trip of a synchronous cross-CPU call (cpuid pread: the caller "
        "sleeps until the target wakes it) between each pair of CPUs (target idle / busy), "
        "the local baseline, the spinning-caller kind (membarrier to one busy CPU, as "
        "wrmsrl_on_cpu waits), and a global update done as a serial walk vs one membarrier "
        "broadcast, for 1..ncpu-1 target CPUs.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ipi.add_argument("--cpus", type=_cpulist, default=None, metavar="LIST",
                     help="CPUs to measure, e.g. 0-3,6 (default: all this process may use)")
    ipi.add_argument("--iterations", "-n", type=_positive_int, default=2000, metavar="N",
                     help="calls per measurement (default 2000)")
    ipi.add_argument("--warmup", type=int, default=50, metavar="N",
                     help="calls discarded before each measurement (default 50)")
    ipi.add_argument("-o", "--output", metavar="FILE",
                     help="write the calibration JSON (samples, percentiles, host facts)")
    ipi.add_argument("--html", metavar="FILE", help="write a small self-contained plotly report")
    ipi.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    ipi.set_defaults(_bench=_run_ipi)

    ov = sub.add_parser(
        "overhead", help="tracer cost per event: pkstrace backends vs bpftrace and perf",
        description="Runs one workload of synchronous cross-CPU calls (about ten tracepoint "
        "hits per call) untraced and under each tracer: every pkstrace backend and mode, "
        "bpftrace count() and perf record -a on the same tracepoints. Measures BPF "
        "programs' run_time_ns/run_cnt (kernel accounting) and the workload's slowdown "
        "(ns/event, ratio to untraced; medians), lost events, and the issue's targets.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ov.add_argument("--tracers", default=None, metavar="LIST",
                    help="comma-separated subset of: untraced, bpftrace, bpf-floor (an empty "
                    "BPF program), perf, tracefs, pkstrace-perf, bcc-events, bcc-counts "
                    "(default: all of these), and bpftrace-unkeyed (one counter for all "
                    "events; only when named)")
    ov.add_argument("--runs", type=_positive_int, default=5, metavar="N",
                    help="slowdown runs per tracer (default 5)")
    ov.add_argument("--bpf-runs", type=int, default=3, metavar="N",
                    help="runs per BPF tracer with kernel BPF accounting on (default 3)")
    ov.add_argument("--calls", type=_positive_int, default=50_000, metavar="N",
                    help="cross-CPU calls per workload run (default 50000)")
    ov.add_argument("--source-cpu", type=int, default=0, metavar="CPU",
                    help="CPU the workload runs on (default 0)")
    ov.add_argument("--target-cpu", type=int, default=1, metavar="CPU",
                    help="CPU the workload calls (default 1)")
    ov.add_argument("--timeout", type=float, default=600, metavar="SECONDS",
                    help="give up on one traced run after this long (default 600)")
    ov.add_argument("-o", "--output", metavar="FILE", help="write the result JSON")
    ov.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    ov.set_defaults(_bench=_run_overhead)


def _check_writable(path: str | None) -> None:
    """Fail on a bad output path before minutes of measuring, not after."""
    if path is None:
        return
    from pathlib import Path

    from pkstrace.errors import InputError

    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"cannot write {p}: directory {parent} does not exist")
    if p.is_dir():
        raise InputError(f"cannot write {p}: it is a directory")


def _run_ipi(args: argparse.Namespace) -> int:
    from pkstrace.bench import ipi
    from pkstrace.bench.common import write_json_atomic, write_text_atomic

    _check_writable(args.output)
    _check_writable(args.html)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"bench ipi: {msg}", file=sys.stderr, flush=True)

    with _terminate_as_interrupt():
        doc = ipi.run(cpus=args.cpus, iterations=args.iterations, warmup=max(0, args.warmup),
                      progress=progress)
    print(ipi.format_table(doc))
    if args.output:
        write_json_atomic(args.output, doc)
        print(f"wrote {args.output}", file=sys.stderr)
    if args.html:
        write_text_atomic(args.html, ipi.render_html(doc))
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM / SIGHUP unwind like Ctrl-C, so every tracer we started is stopped."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _run_overhead(args: argparse.Namespace) -> int:
    from pkstrace.bench import overhead
    from pkstrace.bench.common import write_json_atomic

    _check_writable(args.output)
    tracers = None
    if args.tracers:
        tracers = overhead.select_tracers([k.strip() for k in args.tracers.split(",")
                                           if k.strip()])

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"bench overhead: {msg}", file=sys.stderr, flush=True)

    with _terminate_as_interrupt():
        doc = overhead.run(tracers=tracers, runs=args.runs, bpf_runs=max(0, args.bpf_runs),
                           calls=args.calls, source_cpu=args.source_cpu,
                           target_cpu=args.target_cpu, timeout_s=args.timeout,
                           progress=progress)
    print(overhead.format_table(doc))
    if args.output:
        write_json_atomic(args.output, doc)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    return int(args._bench(args))
