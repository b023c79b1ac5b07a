"""`pkstrace replay`: analyse a recorded or imported trace and print the findings."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pkstrace.errors import InputError

HELP = "analyse a trace (.pkstrace or ftrace / perf script text) and print the findings"
DESCRIPTION = """\
Analyse a trace and print what it shows: per-CPU event and MSR counts, redundant
MSR writes, cross-CPU call latency, global-update episodes with their projected
stall on 64/256/1024 CPUs, isolation violations, preempt-count drift and lost
PKRS updates. The same analysis runs at the end of `pkstrace record`.

TRACE is a .pkstrace file, or a text capture (tracefs `trace`/`trace_pipe`,
trace-cmd report, perf script) which is imported on the fly.
"""
EXAMPLES = """\
examples:
  pkstrace replay host.pkstrace                      # tables on the terminal
  pkstrace replay trace.txt                          # a tracefs text capture, directly
  pkstrace replay v3.pkstrace --json > v3.json       # the versioned JSON document
  pkstrace replay host.pkstrace --isolated 6-7       # treat CPUs 6 and 7 as isolated
  pkstrace replay v3.pkstrace --fail-on drift,lost   # exit 1 if drift or lost updates
  pkstrace replay host.pkstrace --calibration review # add the review's projection
  pkstrace replay host.pkstrace --calibration ipi.json

exit status: 0 ok, 1 a --fail-on finding is present, 2 bad input or usage.
"""

FAIL_KINDS = ("redundant", "isolation", "drift", "lost")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", metavar="TRACE", help=".pkstrace file or text trace")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (schema: `pkstrace schema`)")
    p.add_argument("--isolated", metavar="LIST",
                   help="CPUs to treat as isolated, e.g. 6-7 (default: the trace's "
                        "isolated and nohz_full CPUs); '' for none")
    p.add_argument("--fail-on", metavar="KINDS", default="",
                   help="exit 1 if any of these findings is present: "
                        + ",".join(FAIL_KINDS) + " (comma-separated)")
    p.add_argument("--calibration", metavar="FILE",
                   help="IPI calibration from `pkstrace bench ipi`, or 'review' for the "
                        "review's figures (3-5 us busy, 100 us idle): adds projection rows")
    p.add_argument("--cpus", type=int, metavar="N",
                   help="text traces: number of CPUs of the traced host, if not in the text")
    p.add_argument("--episode-gap-us", type=float, default=1000.0, metavar="US",
                   help="calls further apart than this start a new episode (default 1000)")


def parse_fail_on(text: str) -> list[str]:
    kinds = [k.strip() for k in (text or "").split(",") if k.strip()]
    bad = [k for k in kinds if k not in FAIL_KINDS]
    if bad:
        raise InputError(f"--fail-on: unknown finding kind {bad[0]!r} "
                         f"(choose from {', '.join(FAIL_KINDS)})")
    return kinds


def parse_isolated(text: str | None) -> list[int] | None:
    if text is None:
        return None
    from pkstrace import schema

    try:
        return schema.parse_cpulist(text)
    except ValueError as e:
        raise InputError(f"--isolated: {e}") from None


def load_trace(path: str, isolated: list[int] | None = None, cpus: int | None = None) -> Any:
    """A .pkstrace (only the columns the analysis reads) or an importable text trace."""
    from pathlib import Path

    from pkstrace import tracefile
    from pkstrace.analysis.prep import ANALYSIS_COLUMNS

    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: no such file")
    if p.is_dir():
        raise InputError(f"{path}: is a directory")
    head = b""
    if p.is_file():  # a pipe (`replay <(zcat t.gz)`) can be read once only: no peeking
        try:
            with open(p, "rb") as f:
                head = f.read(4)
        except OSError as e:
            raise InputError(f"{path}: {e.strerror or e}") from None
    if head == b"PAR1":
        trace = tracefile.read_trace(p, columns=list(ANALYSIS_COLUMNS), low_memory=True)
    else:
        try:
            from pkstrace.importers import open_trace
        except ImportError:
            if not head:
                raise InputError(f"{path}: empty file") from None
            raise InputError(f"{path}: not a .pkstrace file, and this build cannot "
                             "import text traces") from None
        trace = open_trace(path, isolated=isolated, cpus=cpus)
    if len(trace.events) == 0:
        from pkstrace.analysis.aggregates import uses_aggregates

        if not uses_aggregates(trace.meta):  # a counts-mode trace has aggregates, no rows
            raise InputError(f"{path}: the trace has no events")
    return trace


def run(args: argparse.Namespace) -> int:
    fail_on = parse_fail_on(args.fail_on)
    isolated = parse_isolated(args.isolated)
    if args.episode_gap_us <= 0:
        raise InputError("--episode-gap-us must be positive")
    calibration = None
    if args.calibration:
        from pkstrace.analysis.projection import load_calibration

        calibration = load_calibration(args.calibration)
    trace = load_trace(args.trace, isolated=isolated, cpus=args.cpus)
    if not trace.meta.source:
        trace.meta.source = args.trace

    from pkstrace.analysis import analyse

    findings = analyse(trace, isolated=isolated, calibration=calibration,
                       episode_gap_ns=int(args.episode_gap_us * 1000))
    if args.json:
        from pkstrace.reports.json import render
    else:
        from pkstrace.reports.terminal import render
    sys.stdout.write(render(findings))
    sys.stdout.flush()
    present = findings.present()
    hit = [k for k in fail_on if present.get(k)]
    if hit:
        print("pkstrace replay: failing on " + ", ".join(f"{k} ({present[k]})" for k in hit),
              file=sys.stderr)
        return 1
    return 0
